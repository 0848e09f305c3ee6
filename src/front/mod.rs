//! Fronts: the protocols a caller can speak to the proxy. A front decodes a request into a
//! [`Call`] at the start of the pipeline and encodes the answer (or a [`Refusal`]) in its own
//! protocol at the end; every phase in between is shared.
//!
//! - [`bedrock`]: Bedrock's own REST paths, passed through byte for byte.
//! - [`messages`]: the Anthropic Messages API, translated to InvokeModel; streams re-encoded as
//!   SSE by [`sse`].
//! - [`gateway`]: the Claude Code gateway protocol's other bearer endpoints (managed settings,
//!   usage, telemetry), answered by the proxy.
//!
//! A front never decides who may call what (that is `resolve` and `admit`) and never signs or
//! sends anything (that is `forward`).

pub mod bedrock;
pub mod gateway;
pub mod messages;
pub mod sse;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, Method, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::call::Call;
use crate::call::Wanted;
use crate::config::{Config, User};
use crate::domain::{Front, Labels, Op};
use crate::inflight::{BodyBudget, Reservation};
use crate::meter::Meter;
use crate::meter::limits::Admission;
use crate::meter::usage::UsageMeter;
use crate::observe::Recorder;
use crate::refusal::{Reason, Refusal};
use crate::stream::{self, PassThrough, Relay};
use crate::upstream::headers;
use crate::upstream::payload::{Payload, PayloadBuilder};

/// A request recognised from its method and path, before anything else is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Bedrock(bedrock::Route),
    Messages(messages::Route),
    Gateway(gateway::Route),
}

impl Request {
    pub fn front(&self) -> Front {
        match self {
            Request::Bedrock(_) => Front::Bedrock,
            Request::Messages(_) | Request::Gateway(_) => Front::Anthropic,
        }
    }

    pub fn op(&self) -> Op {
        match self {
            Request::Bedrock(route) => route.op(),
            Request::Messages(route) => route.op(),
            Request::Gateway(_) => Op::Gateway,
        }
    }

    /// The model or profile the path names (a Messages call names its model in the body).
    pub fn model(&self) -> Option<&str> {
        match self {
            Request::Bedrock(bedrock::Route::Runtime { model, .. }) => Some(model),
            Request::Bedrock(bedrock::Route::GetProfile { id }) => Some(id),
            _ => None,
        }
    }
}

/// The front whose protocol a request to this path speaks, so that even a request no front
/// recognises is refused in the shape its client reads.
pub fn front_of(path: &str) -> Front {
    if messages::owns(path) || gateway::owns(path) {
        Front::Anthropic
    } else {
        Front::Bedrock
    }
}

/// Which front serves the request, and what it asks for.
pub fn route(method: &Method, uri: &Uri) -> Result<Request, Refusal> {
    if let Some(route) = gateway::parse(method, uri.path()) {
        return Ok(Request::Gateway(route));
    }
    match front_of(uri.path()) {
        Front::Anthropic => messages::parse(method, uri.path()).map(Request::Messages),
        Front::Bedrock => bedrock::parse(method, uri.path()).map(Request::Bedrock),
    }
}

/// How a client of `front` sends its key (ends the refusal of a missing or unknown one).
pub fn key_hint(front: Front) -> &'static str {
    match front {
        Front::Bedrock => bedrock::KEY_HINT,
        Front::Anthropic => messages::KEY_HINT,
    }
}

/// Requests the proxy answers itself once it knows the caller: their own usage, their models.
pub fn answer_locally(
    request: &Request,
    user: &User,
    meter: &Meter,
    config: &Config,
    request_id: &str,
) -> Option<Response> {
    match request {
        Request::Bedrock(bedrock::Route::Usage) => Some(usage_response(meter, user)),
        Request::Messages(messages::Route::ListModels) => Some(messages::models_response(
            user,
            &config.users,
            None,
            request_id,
        )),
        Request::Messages(messages::Route::GetModel { id }) => Some(messages::models_response(
            user,
            &config.users,
            Some(id),
            request_id,
        )),
        _ => None,
    }
}

/// The labels every front reads from headers. `x-bedrock-gate-project` is the caller's own
/// request to record a project, so a value that cannot be recorded is refused with a message;
/// Claude Code's `x-claude-code-session-id` is never a reason to fail (an odd one is ignored).
fn header_labels(headers: &HeaderMap) -> Result<Labels, Refusal> {
    const PROJECT: &str = "x-bedrock-gate-project";
    const SESSION: &str = "x-claude-code-session-id";
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| std::str::from_utf8(v.as_bytes()).map_err(|_| ()))
    };
    let project = match text(PROJECT) {
        None => None,
        Some(Ok(v)) => messages::label(v, PROJECT)?,
        Some(Err(())) => {
            return Err(Refusal::invalid(format!(
                "The `{PROJECT}` header must be UTF-8 text."
            )));
        }
    };
    let session = match text(SESSION) {
        Some(Ok(v)) => messages::label(v, SESSION).ok().flatten(),
        _ => None,
    };
    Ok(Labels { project, session })
}

/// The refusal of a body on a GET.
fn body_on_get() -> Refusal {
    Refusal::invalid("A GET request to bedrock-gate carries no body; send it without one.")
}

/// Refuses a body on a GET that says it has one (a `Content-Length` above 0): no GET route
/// reads one, and it would be held for nothing. Checked before anything is read. A GET whose
/// length is not known (chunked, or HTTP/2 without END_STREAM on its headers) may still be
/// empty; [`decode`] reads it with room for no byte at all.
pub fn no_body_on_get(method: &Method, body: &Body) -> Result<(), Refusal> {
    use http_body::Body as _;
    if method == Method::GET && body.size_hint().lower() > 0 {
        return Err(body_on_get());
    }
    Ok(())
}

/// The request body's declared length (`Content-Length`), if any.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reserves the body's declared length of `limits.max_inflight_body_bytes` before a byte of
/// it is read (a body over `max_body_bytes` is left to `read_body` to refuse as too large).
pub fn reserve(
    headers: &HeaderMap,
    budget: &Arc<BodyBudget>,
    config: &Config,
) -> Result<Reservation, Refusal> {
    let declared = declared_length(headers)
        .filter(|n| *n <= config.max_body_bytes as u64)
        .unwrap_or(0);
    Reservation::new(budget, declared, config.max_inflight_body_bytes)
}

/// Reads the body of a routed request (under the size and time limits, hashing it as it
/// arrives, within its `reservation`) and decodes the call it makes.
pub async fn decode(
    request: Request,
    parts: &http::request::Parts,
    body: Body,
    config: &Config,
    reservation: Reservation,
) -> Result<Call, Refusal> {
    // A body that goes upstream as read is hashed as it arrives (SigV4 signs its hash); one
    // the front rewrites is not, its rewrite is.
    let builder = match request {
        Request::Bedrock(_) => PayloadBuilder::default(),
        Request::Messages(_) | Request::Gateway(_) => PayloadBuilder::unhashed(),
    };
    let get = parts.method == Method::GET;
    let payload = read_body(
        body,
        builder,
        &parts.headers,
        if get { 0 } else { config.max_body_bytes },
        config.timeouts.request_body,
        Some(reservation),
    )
    .await
    .map_err(|r| {
        if get && r.reason == Reason::TooLarge {
            body_on_get()
        } else {
            r
        }
    })?;
    let labels = header_labels(&parts.headers)?;
    match request {
        Request::Bedrock(route) => {
            bedrock::decode(route, parts.uri.query(), &parts.headers, payload, labels)
        }
        Request::Messages(route) => {
            messages::decode(route, &parts.headers, payload, labels, config)
        }
        Request::Gateway(_) => Err(Refusal::internal(
            "a gateway-protocol request reached the model pipeline",
        )),
    }
}

/// Reads a request body into `payload` under the size and time limits; with a
/// `reservation`, a body that outgrows it must fit in the in-flight limit as it arrives, and
/// the payload holds it.
pub async fn read_body(
    mut body: Body,
    mut payload: PayloadBuilder,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
    mut reservation: Option<Reservation>,
) -> Result<Payload, Refusal> {
    let too_large = || {
        Refusal::new(
            Reason::TooLarge,
            format!(
                "The request body is larger than this bedrock-gate accepts ({limit} bytes, limits.max_body_bytes)."
            ),
        )
    };
    if let Some(len) = declared_length(headers)
        && len > limit as u64
    {
        return Err(too_large());
    }
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| Refusal::invalid("The request body could not be read."))?;
            if let Ok(data) = frame.into_data() {
                let total = payload.len() + data.len() as u64;
                if total > limit as u64 {
                    return Err(too_large());
                }
                if let Some(r) = &mut reservation {
                    r.cover(total)?;
                }
                payload.push(data);
            }
        }
        Ok(payload.finish().holding(reservation.take().map(Arc::new)))
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(Refusal::new(
            Reason::BodyTimeout,
            format!(
                "The request body did not arrive within {} s.",
                timeout.as_secs()
            ),
        )),
        Ok(result) => result,
    }
}

/// A refusal in the protocol of `front`.
pub fn error_response(front: Front, refusal: &Refusal, request_id: &str) -> Response {
    match front {
        Front::Bedrock => bedrock::error_response(refusal, request_id),
        Front::Anthropic => messages::error_response(refusal, request_id),
    }
}

/// A call Bedrock answered: what the `forward` phase hands to the front's encoder.
pub struct Answered {
    pub call: Call,
    pub admission: Admission,
    pub upstream: http::Response<Incoming>,
}

/// What encoding an answer needs besides the answer: the meter its record goes to, the signal
/// that cuts streams at shutdown, and the config the request started with.
#[derive(Clone, Copy)]
pub struct Encoding<'a> {
    pub meter: &'a Arc<Meter>,
    pub shutdown: &'a tokio_util::sync::CancellationToken,
    pub config: &'a Config,
}

impl Encoding<'_> {
    /// The response body that carries Bedrock's answer to the client through `encoder`,
    /// metered by `usage`, and writes the request's record when it ends (see `stream`).
    fn relay<E: stream::Encoder>(
        self,
        incoming: Incoming,
        encoder: E,
        recorder: Recorder,
        usage: Option<UsageMeter>,
    ) -> Body {
        let limits = stream::Limits {
            idle: self.config.timeouts.stream_idle,
        };
        Body::new(Relay::new(
            incoming,
            encoder,
            recorder,
            usage,
            self.meter.clone(),
            self.shutdown.clone(),
            limits,
        ))
    }
}

/// Encodes Bedrock's answer in the caller's protocol and hands the record of the request to
/// the body, which writes it when the response ends.
pub async fn respond(answered: Answered, recorder: Recorder, enc: Encoding<'_>) -> Response {
    match answered.call.front {
        Front::Bedrock => pass_through(answered, recorder, enc),
        Front::Anthropic => messages::respond(answered, recorder, enc).await,
    }
}

/// The Bedrock-native answer: Bedrock's status, headers (but hop-by-hop ones) and body.
fn pass_through(answered: Answered, recorder: Recorder, enc: Encoding<'_>) -> Response {
    let Answered { call, upstream, .. } = answered;
    let (mut head, incoming) = upstream.into_parts();
    headers::strip_hop_by_hop(&mut head.headers);
    let usage = match call.wanted {
        Wanted::Runtime(op) => Some(UsageMeter::new(op, head.status.as_u16(), &head.headers)),
        _ => None,
    };
    let body = enc.relay(incoming, PassThrough, recorder, usage);
    Response::from_parts(head, body)
}

/// `GET /usage`: the caller's own usage this month.
pub fn usage_response(meter: &Meter, user: &crate::config::User) -> Response {
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
    json_response(StatusCode::OK, body.to_string(), "")
}

/// A JSON answer of the proxy's own, with the request id the caller can quote (when there is
/// one).
fn json_response(status: StatusCode, body: String, request_id: &str) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if !request_id.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(request_id)
    {
        h.insert("request-id", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn labels(pairs: &[(&'static str, &[u8])]) -> Result<Labels, Refusal> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_bytes(v).unwrap());
        }
        header_labels(&h)
    }

    #[test]
    fn labels_from_headers() {
        let l = labels(&[
            ("x-bedrock-gate-project", "Projekt Ä".as_bytes()),
            ("x-claude-code-session-id", b" 6a200518-cc2d "),
        ])
        .unwrap();
        assert_eq!(l.project.as_deref(), Some("Projekt Ä"));
        assert_eq!(l.session.as_deref(), Some("6a200518-cc2d"));
        let e = labels(&[("x-bedrock-gate-project", &[0xff, 0xfe])]).unwrap_err();
        assert!(
            e.message.contains("x-bedrock-gate-project"),
            "{}",
            e.message
        );
        assert!(labels(&[("x-bedrock-gate-project", "p".repeat(129).as_bytes())]).is_err());
        // Claude Code's own header never fails a call.
        let l = labels(&[("x-claude-code-session-id", "s".repeat(500).as_bytes())]).unwrap();
        assert_eq!(l.session, None);
        assert_eq!(labels(&[]).unwrap(), Labels::default());
    }

    #[test]
    fn the_path_picks_the_front() {
        assert_eq!(front_of("/v1/messages"), Front::Anthropic);
        assert_eq!(front_of("/v1/anything"), Front::Anthropic);
        assert_eq!(front_of("/model/x/invoke"), Front::Bedrock);
        assert_eq!(front_of("/v1x"), Front::Bedrock);
    }
}
