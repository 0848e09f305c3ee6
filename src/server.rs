//! The HTTP front: router, the proxy handler and `serve(listener, shutdown)`.
//!
//! Request path, in order: parse the route from method and raw path → health answers at once →
//! extract and hash the API key → resolve the caller's profile → check the caller's budget and
//! rate limits → read the body under the size and time limits → sign and send → stream the
//! response back as it arrives, with the usage meter reading alongside → when the body ends (or
//! the client goes away) write one log line and one ledger row.
//!
//! Middleware (outermost first): `SetSensitiveRequestHeaders` (Authorization, x-api-key), then
//! the handler. Nothing here buffers a response; a refusal never reaches AWS.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderName, Method, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::domain::{RuntimeOp, Usage};
use crate::error::{ApiError, ErrorKind};
use crate::meter::Meter;
use crate::meter::request::RequestInfo;
use crate::meter::usage::UsageMeter;
use crate::route::{self, Route};
use crate::state::AppState;
use crate::upstream::payload::{Payload, PayloadBuilder};
use crate::upstream::{Outbound, Upstream, headers};

/// Longest query string forwarded to ListInferenceProfiles.
const MAX_QUERY_LEN: usize = 1024;

/// Builds the router around the state.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .fallback(proxy)
        .with_state(state)
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]))
}

/// Serves on an already-bound listener until `shutdown` resolves, then stops accepting and
/// waits up to `grace` for requests in flight (streams included).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let tls = state
        .live
        .load()
        .config
        .tls
        .as_ref()
        .and_then(|t| t.server.clone());
    crate::listen::serve(listener, router(state.clone()), state, tls, shutdown, grace).await
}

/// A request not yet handed to [`Observed`]. If the handler future is dropped (the client
/// went away while the proxy waited on Bedrock, or shutdown), the request is still recorded.
struct Pending {
    info: RequestInfo,
    armed: bool,
    meter: Arc<Meter>,
    started: Instant,
    shutdown: CancellationToken,
    _tracked: TaskTrackerToken,
}

impl Pending {
    fn record(&mut self, status: u16, outcome: &str) {
        if !std::mem::replace(&mut self.armed, false) || self.info.operation == "Health" {
            return;
        }
        let mut info = std::mem::take(&mut self.info);
        info.status = status;
        // Once sent, Bedrock may have run the call: no usage seen is not "complete".
        let complete = !info.sent;
        self.meter
            .finish(info, self.started, 0, Usage::default(), complete, outcome);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let outcome = if self.shutdown.is_cancelled() {
            "shutdown"
        } else {
            "client_gone"
        };
        self.record(499, outcome);
    }
}

async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let mut pending = Pending {
        info: RequestInfo::new(),
        armed: true,
        meter: state.meter.clone(),
        started,
        shutdown: state.shutdown.clone(),
        _tracked: state.requests.token(),
    };
    match handle(&state, request, &mut pending.info, started).await {
        Ok(resp) => {
            // Recorded by `Observed` when the body ends, or not at all (health, usage).
            pending.armed = false;
            resp
        }
        Err(e) => {
            let id = pending.info.request_id.clone();
            let outcome = match e.kind {
                ErrorKind::ShuttingDown => "shutdown",
                _ => e.aws_type(),
            };
            pending.record(e.status.as_u16(), outcome);
            e.into_response_with_id(&id)
        }
    }
}

async fn handle(
    state: &AppState,
    request: Request,
    info: &mut RequestInfo,
    started: Instant,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let route = route::parse(&parts.method, parts.uri.path())?;
    info.operation = route.operation();
    let live = state.live.load_full();
    let config = &live.config;

    if route == Route::Health {
        let body = serde_json::json!({
            "status": "ok",
            "users": config.users.len(),
            "config_generation": live.generation,
            "config_sha256": live.sha256,
        });
        return Ok((StatusCode::OK, axum::Json(body)).into_response());
    }

    let key = crate::auth::extract_key(&parts.headers)?;
    let user = config
        .users
        .by_key(&key.hash())
        .cloned()
        .ok_or_else(|| ApiError::access_denied(crate::auth::unknown_key_message()))?;
    drop(key);
    info.user = Some(user.name.clone());

    if route == Route::Usage {
        return Ok(usage_response(&state.meter, &user));
    }

    let (method, url, region) = match &route {
        Route::Runtime { op, model } => {
            info.model = Some(model.clone());
            let profile = route::resolve_runtime(&user, &config.users, model)?;
            info.profile = Some(profile.arn.clone());
            info.base_model = Some(profile.model.clone());
            info.price = config.prices.get(&profile.model).copied();
            // CountTokens is free: no budget or rate limit applies to it.
            if *op != RuntimeOp::CountTokens {
                state
                    .meter
                    .accounts
                    .admit(&user.name, &user.limits, chrono::Utc::now())?;
                info.admitted = true;
            }
            let region = profile.parsed.region.clone();
            // CountTokens is free and takes a foundation model id, not a profile.
            let upstream_id = match op {
                RuntimeOp::CountTokens => crate::arn::strip_geo_prefix(&profile.model).to_string(),
                _ => profile.arn.clone(),
            };
            let url = format!(
                "{}/model/{}/{}",
                config.aws.runtime_endpoint.for_region(&region),
                route::encode_segment(&upstream_id),
                op.suffix()
            );
            (Method::POST, url, region)
        }
        Route::ListProfiles => {
            let region = config.aws.region.clone();
            let mut url = format!(
                "{}/inference-profiles",
                config.aws.control_endpoint.for_region(&region)
            );
            url.push('?');
            url.push_str(&list_query(parts.uri.query())?);
            (Method::GET, url, region)
        }
        Route::GetProfile { id } => {
            info.model = Some(id.clone());
            let lookup = route::resolve_profile_lookup(&user, &config.users, id)?;
            let region = lookup.region.unwrap_or_else(|| config.aws.region.clone());
            let url = format!(
                "{}/inference-profiles/{}",
                config.aws.control_endpoint.for_region(&region),
                route::encode_segment(&lookup.id)
            );
            (Method::GET, url, region)
        }
        Route::Health | Route::Usage => {
            return Err(ApiError::new(ErrorKind::Internal, "unreachable"));
        }
    };

    let shutting_down = || {
        ApiError::new(
            ErrorKind::ShuttingDown,
            "bedrock-gate is shutting down; retry.",
        )
    };
    tracing::debug!(request_id = %info.request_id, "reading request body");
    let body = tokio::select! {
        biased;
        () = state.shutdown.cancelled() => return Err(shutting_down()),
        b = read_body(body, &parts.headers, config.max_body_bytes, config.timeouts.request_body) => b?,
    };
    info.bytes_in = usize::try_from(body.len()).unwrap_or(usize::MAX);
    let out = Outbound {
        method,
        url,
        region,
        headers: headers::forwardable_request_headers(&parts.headers),
        body,
    };
    // Shutdown is checked first, so a request whose body arrived after the grace period is
    // never sent. From the send on, Bedrock may have run the call.
    info.sent = true;
    let upstream = tokio::select! {
        biased;
        () = state.shutdown.cancelled() => return Err(shutting_down()),
        r = state.upstream.send(out, config.timeouts.first_byte) => match r {
            Ok(resp) => resp,
            Err(e) => {
                info.sent = e.maybe_sent;
                return Err(e.error);
            }
        },
    };
    info.ttfb = Some(started.elapsed());
    info.status = upstream.status().as_u16();
    info.upstream_request_id = upstream
        .headers()
        .get("x-amzn-requestid")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(128).collect());

    let (mut head, incoming) = upstream.into_parts();
    headers::strip_hop_by_hop(&mut head.headers);
    let usage = match &route {
        Route::Runtime { op, .. } => {
            Some(UsageMeter::new(*op, head.status.as_u16(), &head.headers))
        }
        _ => None,
    };
    state.meter.metrics.in_flight(info.operation, 1);
    let observed = Observed {
        inner: incoming,
        finish: Some((std::mem::take(info), usage)),
        meter: state.meter.clone(),
        started,
        bytes_out: 0,
        shutdown: Box::pin(state.shutdown.clone().cancelled_owned()),
        shutdown_token: state.shutdown.clone(),
        idle: Box::pin(tokio::time::sleep(config.timeouts.stream_idle)),
        idle_after: config.timeouts.stream_idle,
        last_frame: tokio::time::Instant::now(),
        _tracked: state.requests.token(),
    };
    Ok(Response::from_parts(head, Body::new(observed)))
}

/// Reads the request body under the size and time limits, hashing it as it arrives.
async fn read_body(
    mut body: Body,
    headers: &http::HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<Payload, ApiError> {
    let too_large = || {
        ApiError::validation(format!(
            "The request body is larger than this bedrock-gate accepts ({limit} bytes, limits.max_body_bytes)."
        ))
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let read = async {
        let mut payload = PayloadBuilder::default();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ApiError::validation("The request body could not be read."))?;
            if let Ok(data) = frame.into_data() {
                if payload.len() + data.len() as u64 > limit as u64 {
                    return Err(too_large());
                }
                payload.push(data);
            }
        }
        Ok(payload.finish())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ApiError::validation(format!(
            "The request body did not arrive within {} s.",
            timeout.as_secs()
        ))
        .with_status(StatusCode::REQUEST_TIMEOUT)),
        Ok(result) => result,
    }
}

/// The upstream body on its way to the client, frame by frame, unchanged. The usage meter
/// reads each frame as it passes (never holding it back); when the body ends, fails, or is
/// dropped early (the client went away, which also drops the upstream connection), the
/// request is recorded once.
struct Observed<B> {
    inner: B,
    /// Taken by the first of end, error or drop.
    finish: Option<(RequestInfo, Option<UsageMeter>)>,
    meter: Arc<Meter>,
    started: Instant,
    bytes_out: u64,
    /// Resolves when the shutdown grace period is over; the stream is then cut and recorded.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_token: CancellationToken,
    /// Fires `idle_after` past the last frame at the earliest; re-armed lazily (when it
    /// fires early) rather than on every frame, which keeps timers off the hot path.
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_after: Duration,
    last_frame: tokio::time::Instant,
    _tracked: TaskTrackerToken,
}

impl<B> Observed<B> {
    fn finish(&mut self, outcome: &'static str) {
        if let Some((info, usage)) = self.finish.take() {
            let ended = outcome == "complete";
            let (seen, complete) = match usage.map(|u| u.finish(ended)) {
                Some(m) => (m.usage, m.complete),
                // Control-plane reads carry no usage; they are complete when they end.
                None => (Usage::default(), ended),
            };
            self.meter.metrics.in_flight(info.operation, -1);
            self.meter
                .finish(info, self.started, self.bytes_out, seen, complete, outcome);
        }
    }
}

impl<B> http_body::Body for Observed<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        if this.finish.is_some() && this.shutdown.as_mut().poll(cx).is_ready() {
            this.finish("shutdown");
            return Poll::Ready(Some(Err(
                "bedrock-gate shut down before the response ended".into(),
            )));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = tokio::time::Instant::now();
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                    if let Some((_, Some(usage))) = this.finish.as_mut() {
                        usage.feed(data);
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish("complete");
                }
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %crate::upstream::error_chain(e), "upstream body failed mid-stream");
                this.finish("upstream_error");
            }
            Poll::Ready(None) => this.finish("complete"),
            Poll::Pending if this.finish.is_some() => {
                while this.idle.as_mut().poll(cx).is_ready() {
                    let deadline = this.last_frame + this.idle_after;
                    if tokio::time::Instant::now() >= deadline {
                        tracing::warn!(
                            idle_secs = this.idle_after.as_secs(),
                            "Bedrock sent nothing for timeouts.stream_idle_secs; cutting the response"
                        );
                        this.finish("upstream_idle");
                        return Poll::Ready(Some(Err(
                            "Bedrock went silent mid-response (bedrock-gate timeouts.stream_idle_secs)".into(),
                        )));
                    }
                    this.idle.as_mut().reset(deadline);
                }
            }
            Poll::Pending => {}
        }
        polled.map(|o| o.map(|r| r.map_err(axum::BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        let outcome = if self.shutdown_token.is_cancelled() {
            "shutdown"
        } else {
            "client_gone"
        };
        self.finish(outcome);
    }
}

/// `GET /usage`: the caller's own usage this month.
fn usage_response(meter: &Meter, user: &crate::config::User) -> Response {
    let (month, t) = meter.accounts.month_totals(&user.name, chrono::Utc::now());
    let budget = user.limits.monthly_budget_usd;
    let body = serde_json::json!({
        "user": user.name,
        "month": month.to_string(),
        "requests": t.requests,
        "input_tokens": t.usage.input_tokens,
        "output_tokens": t.usage.output_tokens,
        "cache_read_tokens": t.usage.cache_read_tokens,
        "cache_write_tokens": t.usage.cache_write_tokens,
        "cost_usd": t.cost_usd,
        "unpriced_requests": t.unpriced,
        "limits": {
            "monthly_budget_usd": budget,
            "requests_per_minute": user.limits.requests_per_minute,
            "tokens_per_minute": user.limits.tokens_per_minute,
        },
        "budget_remaining_usd": budget.map(|b| (b - t.cost_usd).max(0.0)),
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// The query for ListInferenceProfiles: system-defined profiles only, so no caller can list
/// the account's application profiles (other users' ARNs); paging parameters pass through.
fn list_query(query: Option<&str>) -> Result<String, ApiError> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_LEN {
        return Err(ApiError::validation(format!(
            "The query string is longer than {MAX_QUERY_LEN} bytes."
        )));
    }
    let mut out = vec!["type=SYSTEM_DEFINED".to_string()];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "type" | "typeEquals" if v == "SYSTEM_DEFINED" => {}
            "type" | "typeEquals" => {
                return Err(ApiError::access_denied(
                    "bedrock-gate lists system-defined inference profiles only; \
                     look up your own profiles with GetInferenceProfile.",
                ));
            }
            "maxResults" | "nextToken" => out.push(pair.to_string()),
            other => {
                return Err(ApiError::validation(format!(
                    "ListInferenceProfiles has no parameter `{}`.",
                    other.chars().take(64).collect::<String>()
                )));
            }
        }
    }
    Ok(out.join("&"))
}

/// How `serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config_path: PathBuf,
    pub listen: Option<SocketAddr>,
    pub grace: Duration,
    /// Reload when the config file changes (SIGHUP reloads either way).
    pub watch: bool,
    /// Overrides `admin_listen` in the config.
    pub admin_listen: Option<SocketAddr>,
    /// Overrides `ledger.path` in the config.
    pub ledger: Option<PathBuf>,
}

/// Loads the config, binds, prints the address and serves until SIGTERM or SIGINT. Returns
/// the meter, whose ledger the caller closes once no request can still record.
pub async fn run(opts: ServeOptions) -> anyhow::Result<(Arc<Meter>, std::io::Result<()>)> {
    let (config, sha256) = crate::reload::read_config(&opts.config_path)
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let listen = opts.listen.unwrap_or(config.listen);
    let upstream = Upstream::new(&config.aws, config.timeouts.connect).await?;
    let users = config.users.len();
    let tls = config.tls.is_some();
    let admin_listen = match opts.admin_listen {
        Some(a) => Some(a),
        None => config.admin_listen,
    };
    let ledger_path = opts
        .ledger
        .clone()
        .unwrap_or_else(|| config.ledger.resolve(&opts.config_path));
    let meter = Meter::open(&ledger_path, config.ledger.flush_interval)?;
    let state = AppState::new(config, sha256, upstream, meter);
    let _reloader = crate::reload::spawn(state.clone(), opts.config_path.clone(), opts.watch)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let admin = match admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {a} (admin_listen): {e}"))?,
        ),
        None => None,
    };
    let local = listener.local_addr()?;
    let scheme = if tls { "https" } else { "http" };
    tracing::info!(addr = %local, users, tls, config = %opts.config_path.display(), "bedrock-gate listening");
    // Plain lines on stdout for scripts and tests that start us on port 0.
    println!("bedrock-gate listening on {scheme}://{local}");
    let admin_task = match admin {
        Some(admin) => {
            let addr = admin.local_addr()?;
            tracing::info!(addr = %addr, "admin listener (GET /metrics) listening");
            println!("bedrock-gate admin listening on http://{addr}");
            let app = admin_router(state.clone());
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(admin, app).await {
                    tracing::error!(error = %e, "admin listener failed");
                }
            }))
        }
        None => None,
    };
    let served = serve(listener, state.clone(), shutdown_signal(), opts.grace).await;
    if let Some(t) = admin_task {
        t.abort();
    }
    // Past the grace period: cut what still runs, and give each a moment to record its row.
    // Anything that cannot see the cancel (a response its client stopped reading, which the
    // server no longer polls) is recorded when `serve_blocking` drops the runtime's tasks.
    state.shutdown.cancel();
    state.requests.close();
    if tokio::time::timeout(Duration::from_secs(5), state.requests.wait())
        .await
        .is_err()
    {
        tracing::warn!("requests still open 5 s after shutdown; dropping them");
    }
    Ok((state.meter.clone(), served))
}

/// Runs `serve` on its own runtime until SIGTERM/SIGINT, then drops every task left (each
/// records its ledger row as it goes) and only then commits and closes the ledger.
pub fn serve_blocking(opts: ServeOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let (meter, served) = runtime.block_on(run(opts))?;
    runtime.shutdown_timeout(Duration::from_secs(2));
    meter.ledger.close();
    tracing::info!("ledger flushed; bedrock-gate stopped");
    served?;
    Ok(())
}

/// The admin listener: Prometheus metrics and health. It accepts no API keys and forwards
/// nothing; keep it on loopback or behind a network policy.
pub fn admin_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/metrics",
            axum::routing::get(|State(state): State<Arc<AppState>>| async move {
                let live = state.live.load();
                let text = state
                    .meter
                    .metrics
                    .render(live.generation, Some(&state.meter.ledger.stats));
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .with_state(state)
}

/// GETs `url` (plain HTTP) and succeeds on a 2xx answer within `timeout`: the probe behind
/// `bedrock-gate healthcheck`.
pub fn healthcheck(url: &str, timeout: Duration) -> anyhow::Result<StatusCode> {
    let uri: http::Uri = url.parse().map_err(|e| anyhow::anyhow!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        anyhow::bail!("only http:// URLs can be probed; point it at the admin listener");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Empty<Bytes>>();
        let status = tokio::time::timeout(timeout, client.get(uri))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {} s", timeout.as_secs()))?
            .map_err(|e| anyhow::anyhow!("{}", crate::upstream::error_chain(&e)))?
            .status();
        if !status.is_success() {
            anyhow::bail!("answered {status}");
        }
        Ok(status)
    })
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received; finishing requests in flight");
}
