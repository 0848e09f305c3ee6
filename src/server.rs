//! The HTTP server: the router, the request pipeline that every front shares, and
//! `serve(listener, shutdown)`.
//!
//! `handle` is the pipeline, one line per phase, each owned by its module:
//! `identify` (key or sign-in → user) → `front` (which protocol, which operation; read the body,
//! decode the call) → `resolve` (user × model → the caller's own profile: the model id swap) →
//! `admit` (budget and rate limits) → `forward` (sign, send) → `front` (encode the answer:
//! pass-through or re-encoded, through `stream`) → `observe` (one record per request, written
//! when the response ends or the request is dropped).
//!
//! Middleware (outermost first): `SetSensitiveRequestHeaders` (Authorization, x-api-key), then
//! the handler. Nothing here buffers a response; a refusal never reaches AWS.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderName, StatusCode, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;

use crate::domain::Op;
use crate::front::{self, Answered};
use crate::identify::identify;
use crate::meter::Meter;
use crate::observe::{Recorder, RequestInfo};
use crate::premium;
use crate::refusal::Refusal;
use crate::resolve;
use crate::state::{AppState, Live};
use crate::upstream::Upstream;
use crate::upstream::sessions::Sessions;
use crate::workers::Workers;

/// Builds the router around the state.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(crate::signin::router())
        .fallback(proxy)
        .with_state(state)
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]))
}

/// Serves on an already-bound listener, each connection on one of `workers`, until `shutdown`
/// resolves, then stops accepting and waits up to `grace` for requests in flight (streams
/// included).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    workers: &Workers,
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
    crate::listen::serve(
        listener,
        router(state.clone()),
        state,
        tls,
        workers,
        shutdown,
        grace,
    )
    .await
}

/// What the pipeline made of a request.
enum Handled {
    /// Answered by the proxy itself (health, the caller's own usage): nothing to record.
    Local(Response),
    /// Bedrock answered; the front encodes it.
    Upstream(Box<Answered>),
    /// The client went away before the call was sent; nothing was.
    Gone,
}

/// Runs the pipeline in a task of its own and answers in the protocol of the front the request
/// came in on.
///
/// The task is what lets a client hang up without cancelling a call Bedrock will bill anyway:
/// once the call is sent, the task runs on without the client, reads the answer to its end,
/// meters and records it (see `stream`). Before the send, a client that left stops the request
/// (`gone`), and nothing is sent.
async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let front = front::front_of(request.uri().path());
    let gone = CancellationToken::new();
    let hung_up = gone.clone().drop_guard();
    // Boxed, so the task holds a pointer: tokio moves a task's future several times (into the
    // task, its output over it, the output out). This one is about 4 KB; with the rarely run
    // branches inline and unboxed it was 29 KB, and those copies were a tenth of the proxy's
    // instructions per request.
    let pipeline = Box::pin(pipeline(state, request, gone));
    let response = match tokio::spawn(pipeline).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "the request pipeline failed");
            front::error_response(
                front,
                &Refusal::internal("the request pipeline failed"),
                "-",
            )
        }
    };
    hung_up.disarm();
    response
}

/// The pipeline of one request, and its answer. The request's record is made here and consumed
/// exactly once (see `observe`).
async fn pipeline(state: Arc<AppState>, request: Request, gone: CancellationToken) -> Response {
    let mut recorder = Recorder::start(&state);
    let live = state.live.load_full();
    let front = front::front_of(request.uri().path());
    let started = recorder.started();
    let (parts, body) = request.into_parts();
    let mut body = Some(body);
    match handle(
        &state,
        &live,
        &parts,
        &mut body,
        &mut recorder.info,
        started,
        &gone,
    )
    .await
    {
        Ok(Handled::Gone) => {
            // Recorded as the client leaving, by the recorder's drop.
            drop(recorder);
            Response::default()
        }
        Ok(Handled::Local(response)) => {
            recorder.skip();
            response
        }
        Ok(Handled::Upstream(answered)) => {
            let enc = front::Encoding {
                meter: &state.meter,
                shutdown: &state.shutdown,
                config: &live.config,
            };
            front::respond(*answered, recorder, enc).await
        }
        Err(_) if gone.is_cancelled() && !recorder.info.sent => {
            // The client left before the call was sent (its body stopped arriving, most
            // likely): recorded as gone, by the recorder's drop, not as a refusal.
            drop(recorder);
            Response::default()
        }
        Err(refusal) => {
            let mut response = front::error_response(front, &refusal, &recorder.info.request_id);
            if let Some(unread) = body.take() {
                finish_unread(unread, &parts.headers, &mut response).await;
            }
            recorder.refused(response.status().as_u16(), &refusal);
            response
        }
    }
}

/// The request pipeline; see the module doc. `info` collects what the record needs.
async fn handle(
    state: &AppState,
    live: &Live,
    parts: &http::request::Parts,
    body: &mut Option<axum::body::Body>,
    info: &mut RequestInfo,
    started: std::time::Instant,
    gone: &CancellationToken,
) -> Result<Handled, Refusal> {
    let config = &live.config;
    if parts.method == http::Method::GET && parts.uri.path() == "/healthz" {
        info.operation = Some(Op::Health);
        return Ok(Handled::Local(health(live, &state.meter)));
    }
    // Who is calling comes first, so every identified request gets its row, even one whose
    // path no front serves.
    let front = front::front_of(parts.uri.path());
    info.front = Some(front);
    if state.signin.store.is_shared()
        && let Some(token) = crate::identify::unknown_session(parts, &state.signin.store)
    {
        // Signed in through another replica since this one last read the sessions.
        // Boxed, as the gateway's answer below: a large future few requests run, kept out of
        // every request's (see `proxy`).
        Box::pin(state.signin.store.find_new(&token)).await;
    }
    let caller = match identify(
        parts,
        &config.users,
        &state.signin.store,
        front::key_hint(front),
    ) {
        Ok(caller) => caller,
        Err(unidentified) => {
            info.user = unidentified.user.map(|u| u.name.clone());
            return Err(unidentified.refusal);
        }
    };
    info.user = Some(caller.user.name.clone());
    let request = front::route(&parts.method, &parts.uri)?;
    if caller.signature.is_some() && !matches!(request, front::Request::Bedrock(_)) {
        return Err(Refusal::unauthenticated(format!(
            "AWS signatures are accepted on the Bedrock routes only. {}",
            front::key_hint(request.front())
        )));
    }
    info.front = Some(request.front());
    info.operation = Some(request.op());
    // Known before the body is read, so even a body refused as too large records its model.
    info.model = request.model().map(str::to_string);
    if let Some(b) = body.as_ref() {
        front::no_body_on_get(&parts.method, b)?;
    }
    if let front::Request::Gateway(route) = &request {
        let answer = Box::pin(front::gateway::answer(
            route,
            &caller,
            &parts.headers,
            take_body(body),
            state,
            config,
        ))
        .await?;
        return Ok(Handled::Local(answer));
    }
    let user = caller.user;
    if let Some(answer) =
        front::answer_locally(&request, &user, &state.meter, config, &info.request_id)
    {
        // Local answers are reads with no body to hash.
        if let Some(signature) = &caller.signature {
            signature.verify(
                config.auth.master_key.as_ref(),
                crate::upstream::payload::EMPTY_SHA256,
            )?;
        }
        return Ok(Handled::Local(answer));
    }

    // Before a byte of the body is read: a body that does not fit is refused unread.
    let reservation = front::reserve(&parts.headers, &state.bodies, config)?;
    tracing::debug!(request_id = %info.request_id, "reading request body");
    let mut call = tokio::select! {
        biased;
        () = state.shutdown.cancelled() => return Err(crate::forward::shutting_down()),
        call = front::decode(request, parts, take_body(body), config, reservation) => call?,
    };
    if let Some(signature) = &caller.signature {
        signature.verify(config.auth.master_key.as_ref(), call.body.sha256_hex())?;
    }
    info.operation = Some(call.op);
    info.model = call.model.clone();
    info.labels = call.labels.clone();
    info.bytes_in = usize::try_from(call.body.len()).unwrap_or(usize::MAX);

    let target = resolve::target(&user, config, &call)?;
    let special = premium::check(&user.name, &user.allow, &call.asked)?;
    if let Some(profile) = &target.profile {
        info.profile = Some(profile.arn.clone());
        info.base_model = Some(profile.model.clone());
        info.price = match special {
            Some(rate) if call.is_metered() => Some(
                config
                    .prices
                    .special(&profile.model, rate)
                    .ok_or_else(|| premium::unpriced(&call.asked, rate, &profile.model))?,
            ),
            _ => config
                .prices
                .get(&profile.model, &profile.parsed.region, profile.tier),
        };
    }

    if store_closed(config, &state.meter) {
        let mut refusal = Refusal::new(
            crate::refusal::Reason::Unreachable,
            "bedrock-gate's ledger store is unavailable and [store] on_unavailable = \"closed\": no call is admitted until it is back; retry shortly.",
        );
        refusal.retry_after = Some(1);
        return Err(refusal);
    }
    let admission = state
        .meter
        .accounts
        .admit_call(&user, &call, chrono::Utc::now())?;
    info.admitted = admission.counted;
    // The last moment a client that left costs nothing: from the send on, Bedrock bills.
    if gone.is_cancelled() {
        return Ok(Handled::Gone);
    }

    let upstream = crate::forward::forward(
        state,
        &user,
        &mut call,
        target,
        config.timeouts.first_byte,
        info,
        started,
    )
    .await?;
    Ok(Handled::Upstream(Box::new(Answered {
        call,
        admission,
        upstream,
    })))
}

/// Whether calls are refused because the store is away and `[store] on_unavailable` says so.
fn store_closed(config: &crate::config::Config, meter: &Meter) -> bool {
    config
        .store
        .as_ref()
        .is_some_and(|s| s.on_unavailable == crate::store::OnUnavailable::Closed)
        && meter
            .store
            .as_ref()
            .is_some_and(|h| h.degraded.load(std::sync::atomic::Ordering::Relaxed))
}

/// The request body, for the phase that reads it (once).
fn take_body(body: &mut Option<axum::body::Body>) -> axum::body::Body {
    body.take().unwrap_or_else(axum::body::Body::empty)
}

/// Bodies up to this size are read and dropped after a refusal that came before them, so the
/// connection can serve the client's next request.
const DRAIN_LIMIT: u64 = 64 * 1024;

/// A refusal came before the body was read: drain a small one (so keep-alive survives), or
/// tell the client the connection closes, rather than closing it under its next request.
async fn finish_unread(body: axum::body::Body, headers: &http::HeaderMap, response: &mut Response) {
    use http_body_util::BodyExt as _;
    let small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= DRAIN_LIMIT);
    if small {
        let limited = http_body_util::Limited::new(body, DRAIN_LIMIT as usize);
        if tokio::time::timeout(Duration::from_secs(2), limited.collect())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            return;
        }
    }
    response
        .headers_mut()
        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
}

/// Picks up sessions revoked by `bedrock-gate sessions revoke` (another process) within a
/// second, on a thread of its own: one wake-up per poll. (A timer on the server's runtime
/// handing the query to a blocking thread and back woke three threads a poll, which was most
/// of an idle proxy's CPU.) The thread ends at the first poll after the state is gone.
fn spawn_session_poll(state: &Arc<AppState>) {
    let state = Arc::downgrade(state);
    let started = std::thread::Builder::new()
        .name("session-poll".into())
        .spawn(move || {
            let mut last_prune: Option<std::time::Instant> = None;
            loop {
                std::thread::sleep(crate::signin::sessions::POLL_INTERVAL);
                let Some(state) = state.upgrade() else {
                    return;
                };
                let store = &state.signin.store;
                // Hourly (and at start): rows of sessions dead for a month go.
                if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
                    last_prune = Some(std::time::Instant::now());
                    match store.prune() {
                        Ok(n) if n > 0 => tracing::info!(sessions = n, "dead sessions pruned"),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "could not prune the sessions table")
                        }
                    }
                }
                match store.poll() {
                    Ok(true) => tracing::debug!("sessions reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "could not read the sessions table")
                    }
                }
            }
        });
    if let Err(e) = started {
        tracing::error!(error = %e, "cannot start the session poll: revocations by other processes are seen only after a restart");
    }
}

/// `GET /healthz`: the proxy is up, with the live config's identity and, on PostgreSQL,
/// whether the store takes rows (`degraded` while they wait in the spool). Needs no key.
fn health(live: &Live, meter: &Meter) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let store = meter
        .store
        .as_ref()
        .map(|h| (h.degraded.load(Relaxed), h.spool_bytes.load(Relaxed)));
    let body = serde_json::json!({
        "status": if store.as_ref().is_some_and(|s| s.0) { "degraded" } else { "ok" },
        "store": store.map(|(degraded, spool_bytes)| serde_json::json!({
            "degraded": degraded,
            "spool_bytes": spool_bytes,
        })),
        "users": live.config.users.len(),
        "config_generation": live.generation,
        "config_sha256": live.sha256,
    });
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// How `serve` was asked to run.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config_path: PathBuf,
    pub listen: Option<SocketAddr>,
    pub grace: Duration,
    /// Reload when the config file changes (SIGHUP reloads either way).
    pub watch: bool,
    /// A reload may leave no users (`--allow-empty-reload`).
    pub allow_empty_reload: bool,
    /// Overrides `admin_listen` in the config.
    pub admin_listen: Option<SocketAddr>,
    /// Overrides `ledger.path` in the config.
    pub ledger: Option<PathBuf>,
    /// Serving threads (`--workers`); `None`: one per core.
    pub workers: Option<usize>,
}

/// Loads the config, binds, prints the address and serves until SIGTERM or SIGINT. Returns
/// the meter, whose ledger the caller closes once no request can still record (after it has
/// stopped `workers`, the threads connections are served on).
pub async fn run(
    opts: ServeOptions,
    workers: &Workers,
) -> anyhow::Result<(Arc<Meter>, std::io::Result<()>)> {
    let (config, sha256) = crate::reload::read_config(&opts.config_path)
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let listen = opts.listen.unwrap_or(config.listen);
    let sdk = crate::upstream::sdk_config(&config.aws).await;
    let upstream = Upstream::from_sdk(&sdk, config.timeouts.connect)?;
    let sessions = config.aws.user_role_arn.clone().map(|role| {
        tracing::info!(role = %role, "signing each user's calls with a session of their own");
        Sessions::new(&sdk, &config.aws, role, config.provisioning.tag_key.clone())
    });
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
    if config.ledger.flush_interval_ignored {
        tracing::warn!(
            "ledger.flush_interval_ms no longer has an effect: each row is committed before its answer ends; remove it"
        );
    }
    // Bound before the store is opened, so a replica started on port 0 is named after the port
    // it got: every process on a host would otherwise be `HOST:0`, each counting the others'
    // rows as its own (and recovering their in-flight calls as interrupted).
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr()?;
    // The store this process serves on, and its name there: the meter opens on them, and the
    // poll of the other replicas' spend reads the same.
    let on_store = config.store.clone().map(|s| (s.replica_name(local), s));
    let config_dir = crate::config::dir_of(&opts.config_path);
    let meter = match &on_store {
        Some((replica, settings)) => {
            Meter::open_store(
                settings,
                &config_dir,
                config.ledger.synchronous,
                replica.clone(),
            )
            .await?
        }
        None => Meter::open(&ledger_path, config.ledger.synchronous)?,
    };
    // On the store, the sessions and the sign-ins in progress take turns on the meter's
    // connection for reads off the ledger's path: one per replica, not one each.
    let (store, flows) = match &meter.reader {
        Some(conn) => (
            crate::signin::sessions::SessionStore::open_store(conn.clone()).await?,
            crate::signin::device::DeviceFlows::on_store(conn.clone()),
        ),
        None => (
            crate::signin::sessions::SessionStore::open(&ledger_path)?,
            crate::signin::device::DeviceFlows::default(),
        ),
    };
    let signin = crate::signin::SignInState::new(store, flows);
    let state = AppState::new(
        config,
        sha256,
        upstream,
        sessions,
        meter,
        signin,
        Some(opts.config_path.clone()),
    );
    state.allow_empty_reload.store(
        opts.allow_empty_reload,
        std::sync::atomic::Ordering::Relaxed,
    );
    spawn_session_poll(&state);
    if let Some((replica, settings)) = on_store {
        crate::meter::spawn_store_poll(state.meter.clone(), settings, config_dir, replica);
    }
    let _reloader = crate::reload::spawn(state.clone(), opts.config_path.clone(), opts.watch)?;
    let admin = match admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {a} (admin_listen): {e}"))?,
        ),
        None => None,
    };
    let scheme = if tls { "https" } else { "http" };
    tracing::info!(addr = %local, users, tls, workers = workers.threads(), config = %opts.config_path.display(), "bedrock-gate listening");
    // Plain lines on stdout for scripts and tests that start us on port 0.
    println!("bedrock-gate listening on {scheme}://{local}");
    let admin_task = match admin {
        Some(admin) => {
            let addr = admin.local_addr()?;
            state.admin_sso.set_origin(format!("http://{addr}"));
            tracing::info!(addr = %addr, "admin listener (GET /metrics, the dashboard) listening");
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
    let served = serve(
        listener,
        state.clone(),
        workers,
        shutdown_signal(),
        opts.grace,
    )
    .await;
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

/// Runs `serve` until SIGTERM/SIGINT, then drops every task left (each records its ledger row
/// as it goes) and only then commits and closes the ledger.
///
/// The main thread runs a single-threaded runtime of its own: start-up, the accept loop, the
/// admin listener and the background polls. Connections are served on [`Workers`], one per core.
pub fn serve_blocking(opts: ServeOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let workers = match opts.workers {
        Some(n) => Workers::start(n),
        None => Workers::per_core(),
    }
    .map_err(|e| anyhow::anyhow!("cannot start the worker threads: {e}"))?;
    let (meter, served) = runtime.block_on(run(opts, &workers))?;
    workers.stop();
    runtime.shutdown_timeout(Duration::from_secs(2));
    meter.ledger.close();
    tracing::info!("ledger flushed; bedrock-gate stopped");
    served?;
    Ok(())
}

/// The admin listener: Prometheus metrics, health and the dashboard (behind the admin token,
/// see [`crate::dashboard`]). It forwards nothing; keep it on loopback or behind a network
/// policy.
pub fn admin_router(state: Arc<AppState>) -> Router {
    crate::dashboard::routes()
        .route(
            "/metrics",
            axum::routing::get(|State(state): State<Arc<AppState>>| async move {
                let live = state.live.load();
                let text = state.meter.metrics.render(
                    live.generation,
                    Some(&state.meter.ledger.stats),
                    state.meter.store.as_deref(),
                );
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
