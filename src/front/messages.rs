//! The Anthropic Messages front: `POST /v1/messages`, `POST /v1/messages/count_tokens` and
//! `GET /v1/models`, as the Anthropic SDKs and Claude Code in Anthropic mode call them, served on
//! the caller's own profiles.
//!
//! Decoding translates a Messages body into Bedrock's InvokeModel body: `model`, `stream` and
//! `tags` are dropped, `anthropic_version: "bedrock-2023-05-31"` is added, the `anthropic-beta`
//! header's values move into `anthropic_beta`, and every other field passes byte for byte
//! (thinking, tools, cache_control, metadata, safeguards…). Encoding: a JSON answer passes
//! through; a stream is re-encoded as SSE one event at a time (see `sse`); CountTokens answers
//! become `{"input_tokens": N}`; every error, the proxy's own and Bedrock's, is in the Anthropic
//! envelope with the status Claude Code and the SDKs act on. For a user with a budget, each
//! answer carries the `anthropic-ratelimit-unified-*` headers Claude Code shows as "You've used
//! NN% of your usage credits".
//!
//! This front never forwards the caller's key or an upstream `anthropic-ratelimit-*` header,
//! never buffers a stream, and never shows a caller an account id or an ARN from Bedrock's
//! messages (those go to the log).

use std::collections::HashSet;
use std::marker::PhantomData;
use std::time::Duration;

use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::arn::{anthropic_display_name, anthropic_family, anthropic_name};
use crate::call::{Call, Wanted};
use crate::config::{Config, User, Users};
use crate::domain::{Front, Labels, Op, RuntimeOp, Standing};
use crate::front::sse::SseEncoder;
use crate::front::{Answered, Encoding};
use crate::meter::usage::{UsageMeter, is_event_stream};
use crate::observe::Recorder;
use crate::refusal::{Reason, Refusal, shown};
use crate::stream::PassThrough;
use crate::upstream::payload::Payload;

/// How a client of this front sends its key; ends every refusal of a missing or unknown one.
pub const KEY_HINT: &str = "Set ANTHROPIC_API_KEY (sent as `x-api-key`) or ANTHROPIC_AUTH_TOKEN \
     (sent as `Authorization: Bearer`) to the bgk_ key your bedrock-gate admin gave you.";

/// The `anthropic_version` Bedrock's Anthropic models take.
const BEDROCK_ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";

/// Betas Bedrock refuses: the request tags that label usage (their field is dropped too).
const REQUEST_TAGS_BETA: &str = "request-tags-";

/// The only betas Bedrock's CountTokens takes (the ones Claude Code sends it on a count).
const COUNT_TOKENS_BETAS: &[&str] = &["claude-code-20250219", "context-management-2025-06-27"];

/// At most this many `anthropic-beta` values are forwarded.
const MAX_BETAS: usize = 64;

/// Longest `model` value accepted.
const MAX_MODEL_LEN: usize = 256;

/// Longest label (project, session) recorded.
pub const MAX_LABEL_LEN: usize = 128;

/// How much of an upstream error body is read to word the caller's error.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A recognised Messages-front request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /v1/messages` (`?beta=true` or not).
    Create,
    /// `POST /v1/messages/count_tokens`.
    CountTokens,
    /// `GET /v1/models`.
    ListModels,
    /// `GET /v1/models/{id}`.
    GetModel { id: String },
}

impl Route {
    /// The operation before the body is read (a stream is only known from the body).
    pub fn op(&self) -> Op {
        match self {
            Route::Create => Op::Messages,
            Route::CountTokens => Op::Runtime(RuntimeOp::CountTokens),
            Route::ListModels | Route::GetModel { .. } => Op::ListModels,
        }
    }
}

/// Whether a path is this front's (`/v1/…`), so even an unknown one is refused in its shape.
pub fn owns(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/")
}

/// Parses method and path (the query, such as `?beta=true`, is ignored).
pub fn parse(method: &Method, path: &str) -> Result<Route, Refusal> {
    let path = path.strip_suffix('/').unwrap_or(path);
    match (method, path) {
        (&Method::POST, "/v1/messages") => Ok(Route::Create),
        (&Method::POST, "/v1/messages/count_tokens") => Ok(Route::CountTokens),
        (&Method::GET, "/v1/models") => Ok(Route::ListModels),
        (&Method::GET, p) => match p.strip_prefix("/v1/models/") {
            Some(id) if !id.is_empty() && !id.contains('/') && id.len() <= MAX_MODEL_LEN => {
                Ok(Route::GetModel { id: id.to_string() })
            }
            _ => Err(unknown_operation(method, path)),
        },
        _ => Err(unknown_operation(method, path)),
    }
}

fn unknown_operation(method: &Method, path: &str) -> Refusal {
    Refusal::new(
        Reason::UnknownOperation,
        format!(
            "bedrock-gate does not serve {method} {}. Its Anthropic Messages API has \
             POST /v1/messages, POST /v1/messages/count_tokens and GET /v1/models.",
            shown(path)
        ),
    )
}

/// A Messages body's top-level fields in their order, values unparsed (and borrowed).
struct TopLevel<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<'a>(PhantomData<&'a ()>);
        impl<'de> Visitor<'de> for Fields<'de> {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<TopLevel<'de>, M::Error> {
                let mut fields = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    fields.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(TopLevel(fields))
            }
        }
        d.deserialize_map(Fields(PhantomData))
    }
}

/// A Messages body as Bedrock takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    /// The `model` the caller asked for.
    pub model: String,
    /// `"stream": true`.
    pub stream: bool,
    /// The caller's project, from `tags` under the configured name.
    pub project: Option<String>,
    /// The InvokeModel body (for a count: the CountTokens request body around it).
    pub body: Vec<u8>,
}

#[derive(Deserialize)]
struct Thinking {
    budget_tokens: Option<u64>,
}

/// Translates a Messages (or count_tokens) body; `betas` are the `anthropic-beta` header's
/// values. Pure: no I/O, and any input gives a body or a clear `Invalid` refusal.
pub fn translate(
    body: &[u8],
    betas: &[String],
    count_tokens: bool,
    project_tag: &str,
) -> Result<Translated, Refusal> {
    let TopLevel(fields) = serde_json::from_slice::<TopLevel>(body).map_err(|e| {
        Refusal::invalid(format!(
            "The request body is not a JSON object: {}.",
            shown(&e.to_string())
        ))
    })?;
    let mut seen = HashSet::new();
    let mut model = None;
    let mut stream = false;
    let mut project = None;
    let mut betas: Vec<String> = betas.to_vec();
    let mut has_max_tokens = false;
    let mut thinking_budget = None;
    let mut kept: Vec<(&str, &RawValue)> = Vec::with_capacity(fields.len());
    for (key, value) in &fields {
        if !seen.insert(key.as_str()) {
            return Err(Refusal::invalid(format!(
                "The request body has the field `{}` twice.",
                shown(key)
            )));
        }
        match key.as_str() {
            "model" => {
                let m: String = serde_json::from_str(value.get())
                    .map_err(|_| Refusal::invalid("`model` must be a string."))?;
                if m.is_empty() || m.len() > MAX_MODEL_LEN {
                    return Err(Refusal::invalid(format!(
                        "`model` must be 1 to {MAX_MODEL_LEN} characters."
                    )));
                }
                model = Some(m);
            }
            "stream" => {
                stream = serde_json::from_str(value.get())
                    .map_err(|_| Refusal::invalid("`stream` must be true or false."))?;
            }
            // A label to record and drop, never a reason to fail the call (Claude Code puts
            // the developer's own setting here): one that cannot be recorded is left out.
            "tags" => {
                project =
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(value.get())
                        .ok()
                        .and_then(|tags| {
                            tags.get(project_tag)
                                .and_then(|v| v.as_str())
                                .and_then(|p| label(p, project_tag).ok().flatten())
                        });
            }
            // Ours replaces the caller's.
            "anthropic_version" => {}
            "anthropic_beta" => {
                let more: Vec<String> = serde_json::from_str(value.get()).map_err(|_| {
                    Refusal::invalid("`anthropic_beta` must be an array of strings.")
                })?;
                betas.extend(more);
            }
            "tools" if count_tokens && is_empty_array(value) => {}
            // Anthropic's tiers have no Bedrock field: a call without the service-tier header
            // is Bedrock's standard tier, which is what both values get. Anything else would
            // be a billing option this front cannot see priced.
            "service_tier" => match serde_json::from_str::<&str>(value.get()) {
                Ok("auto" | "standard_only") => {}
                _ => {
                    return Err(Refusal::invalid(
                        "`service_tier` must be \"auto\" or \"standard_only\"; through bedrock-gate \
                         both are Bedrock's standard tier.",
                    ));
                }
            },
            other => {
                if other == "max_tokens" {
                    has_max_tokens = true;
                }
                if other == "thinking" {
                    thinking_budget = serde_json::from_str::<Thinking>(value.get())
                        .ok()
                        .and_then(|t| t.budget_tokens);
                }
                kept.push((other, value));
            }
        }
    }
    let model = model.ok_or_else(|| Refusal::invalid("`model`: field required."))?;
    let betas = clean_betas(betas, count_tokens);

    let mut out = Vec::with_capacity(body.len() + 128);
    out.extend_from_slice(b"{\"anthropic_version\":\"");
    out.extend_from_slice(BEDROCK_ANTHROPIC_VERSION.as_bytes());
    out.push(b'"');
    if !betas.is_empty() {
        out.extend_from_slice(b",\"anthropic_beta\":");
        serde_json::to_writer(&mut out, &betas).map_err(|_| Refusal::internal("beta list"))?;
    }
    for (key, value) in kept {
        out.push(b',');
        serde_json::to_writer(&mut out, key).map_err(|_| Refusal::internal("field name"))?;
        out.push(b':');
        out.extend_from_slice(value.get().as_bytes());
    }
    if count_tokens && !has_max_tokens {
        // CountTokens validates an invoke body, which needs a max_tokens above any thinking
        // budget; nothing is generated.
        let max = thinking_budget.map_or(1, |b| b.saturating_add(1));
        out.extend_from_slice(format!(",\"max_tokens\":{max}").as_bytes());
    }
    out.push(b'}');
    if count_tokens {
        let encoded = base64::engine::general_purpose::STANDARD.encode(&out);
        out = serde_json::to_vec(&serde_json::json!({"input": {"invokeModel": {"body": encoded}}}))
            .map_err(|_| Refusal::internal("count body"))?;
    }
    Ok(Translated {
        model,
        stream: stream && !count_tokens,
        project,
        body: out,
    })
}

fn is_empty_array(value: &RawValue) -> bool {
    serde_json::from_str::<Vec<serde::de::IgnoredAny>>(value.get()).is_ok_and(|v| v.is_empty())
}

/// The betas to send: deduplicated, the request-tags beta dropped, and for a count only those
/// CountTokens takes.
fn clean_betas(betas: Vec<String>, count_tokens: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for beta in betas {
        let beta = beta.trim();
        if beta.is_empty()
            || beta.starts_with(REQUEST_TAGS_BETA)
            || (count_tokens && !COUNT_TOKENS_BETAS.contains(&beta))
            || out.iter().any(|b| b == beta)
            || out.len() >= MAX_BETAS
        {
            continue;
        }
        out.push(beta.to_string());
    }
    out
}

/// The `anthropic-beta` header's values. Values that are not plain tokens are dropped, never a
/// reason to fail the request.
pub fn header_betas(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|b| {
            !b.is_empty()
                && b.len() <= 128
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        })
        .take(MAX_BETAS)
        .map(str::to_string)
        .collect()
}

/// A label value as recorded: trimmed, `None` when empty, refused when too long or not text.
pub fn label(value: &str, what: &str) -> Result<Option<String>, Refusal> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if value.chars().count() > MAX_LABEL_LEN || value.chars().any(char::is_control) {
        return Err(Refusal::invalid(format!(
            "`{what}` must be at most {MAX_LABEL_LEN} characters of text."
        )));
    }
    Ok(Some(value.to_string()))
}

/// The call a Messages request makes.
pub fn decode(
    route: Route,
    incoming: &HeaderMap,
    body: Payload,
    mut labels: Labels,
    config: &Config,
) -> Result<Call, Refusal> {
    let count_tokens = match route {
        Route::Create => false,
        Route::CountTokens => true,
        Route::ListModels | Route::GetModel { .. } => {
            return Err(Refusal::internal("the model list makes no upstream call"));
        }
    };
    let t = translate(
        &body.to_bytes(),
        &header_betas(incoming),
        count_tokens,
        &config.attribution.project_tag,
    )?;
    if labels.project.is_none() {
        labels.project = t.project;
    }
    let (op, wanted) = match (count_tokens, t.stream) {
        (true, _) => (
            Op::Runtime(RuntimeOp::CountTokens),
            Wanted::Runtime(RuntimeOp::CountTokens),
        ),
        (false, true) => (Op::MessagesStream, Wanted::Runtime(RuntimeOp::InvokeStream)),
        (false, false) => (Op::Messages, Wanted::Runtime(RuntimeOp::Invoke)),
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if t.stream {
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/vnd.amazon.eventstream"),
        );
        headers.insert(
            "x-amzn-bedrock-accept",
            HeaderValue::from_static("application/json"),
        );
    } else {
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    }
    if let Some(v) = incoming.get("anthropic-version")
        && v.len() <= 64
    {
        headers.insert("anthropic-version", v.clone());
    }
    Ok(Call {
        front: Front::Anthropic,
        op,
        wanted,
        model: Some(t.model),
        headers,
        body: Payload::from_bytes(Bytes::from(t.body)).holding(body.reservation()),
        labels,
        asked: crate::premium::Asked::default(),
    })
}

/// The Anthropic status and error type for a refusal, and whether to tell the client not to
/// retry.
fn error_kind(reason: Reason) -> (StatusCode, &'static str) {
    match reason {
        Reason::Unauthenticated | Reason::UnknownAccessKey | Reason::BadSignature => {
            (StatusCode::UNAUTHORIZED, "authentication_error")
        }
        // The gateway protocol's rule: a model the user may not use is a bad request.
        Reason::ModelNotAllowed | Reason::Invalid => {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        Reason::Forbidden => (StatusCode::FORBIDDEN, "permission_error"),
        Reason::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
        Reason::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error"),
        Reason::UnknownOperation => (StatusCode::NOT_FOUND, "not_found_error"),
        Reason::OverBudget => (StatusCode::TOO_MANY_REQUESTS, "billing_error"),
        Reason::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
        Reason::Unreachable => (StatusCode::BAD_GATEWAY, "api_error"),
        Reason::Timeout => (StatusCode::GATEWAY_TIMEOUT, "api_error"),
        Reason::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded_error"),
        Reason::ShuttingDown | Reason::SessionUnavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "api_error")
        }
        Reason::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "api_error"),
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// An error in the Anthropic envelope, with the request id the caller can quote.
fn envelope(status: StatusCode, kind: &str, message: &str, request_id: &str) -> Response {
    let body = serde_json::to_string(&Envelope {
        kind: "error",
        error: ErrorBody { kind, message },
    })
    .unwrap_or_default();
    super::json_response(status, body, request_id)
}

/// A refusal in the Anthropic envelope, with the headers the client acts on.
pub fn error_response(refusal: &Refusal, request_id: &str) -> Response {
    let (status, kind) = error_kind(refusal.reason);
    let mut resp = envelope(status, kind, &refusal.message, request_id);
    let h = resp.headers_mut();
    if matches!(
        refusal.reason,
        Reason::Unauthenticated
            | Reason::UnknownAccessKey
            | Reason::BadSignature
            | Reason::OverBudget
            | Reason::ModelNotAllowed
    ) {
        // Retrying cannot help: a new key, a new month or another model can.
        h.insert("x-should-retry", HeaderValue::from_static("false"));
    }
    if let Some(secs) = refusal.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if refusal.reason == Reason::OverBudget
        && let Some(standing) = &refusal.standing
    {
        rejected_headers(h, standing);
    }
    resp
}

fn put(h: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// The caller's standing on a successful answer: Claude Code shows "You've used NN% of your
/// usage credits" once `-overage-surpassed-threshold` appears (past 75 % and 95 %).
fn usage_headers(h: &mut HeaderMap, s: &Standing) {
    let u = s.utilization();
    // Two decimals, and below 1 while calls are still allowed.
    let shown = ((u * 100.0).round() / 100.0).min(0.99);
    let threshold = if u > 0.95 {
        Some("0.95")
    } else if u > 0.75 {
        Some("0.75")
    } else {
        None
    };
    let status = if threshold.is_some() {
        "allowed_warning"
    } else {
        "allowed"
    };
    let reset = s.resets_at.to_string();
    put(h, "anthropic-ratelimit-unified-status", status.into());
    put(
        h,
        "anthropic-ratelimit-unified-representative-claim",
        "overage".into(),
    );
    put(
        h,
        "anthropic-ratelimit-unified-overage-status",
        status.into(),
    );
    put(
        h,
        "anthropic-ratelimit-unified-overage-utilization",
        format!("{shown:.2}"),
    );
    if let Some(t) = threshold {
        put(
            h,
            "anthropic-ratelimit-unified-overage-surpassed-threshold",
            t.into(),
        );
    }
    put(h, "anthropic-ratelimit-unified-reset", reset.clone());
    put(h, "anthropic-ratelimit-unified-overage-reset", reset);
}

/// The standing on the 429 at the cap. No `-representative-claim` or `-overage-status`: with
/// them Claude Code writes its own line and drops the message that says when it resets.
fn rejected_headers(h: &mut HeaderMap, s: &Standing) {
    let reset = s.resets_at.to_string();
    put(h, "anthropic-ratelimit-unified-status", "rejected".into());
    put(h, "anthropic-ratelimit-unified-reset", reset.clone());
    put(h, "anthropic-ratelimit-unified-overage-reset", reset);
    put(
        h,
        "anthropic-ratelimit-unified-overage-utilization",
        "1".into(),
    );
    put(
        h,
        "anthropic-ratelimit-unified-overage-surpassed-threshold",
        "1".into(),
    );
    put(
        h,
        "anthropic-ratelimit-unified-overage-period",
        "monthly".into(),
    );
    put(
        h,
        "anthropic-ratelimit-unified-overage-disabled-reason",
        "org_spend_cap_reached".into(),
    );
}

/// Takes account ids and ARNs out of a Bedrock message before a caller sees it: they can name
/// the gateway's account, its role, or other users' profiles. Everything else, such as
/// `Input is too long.` or `prompt is too long: …` that clients recover on, stays as it is.
pub fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(c) = rest.chars().next() {
        let at_word_start = !out
            .chars()
            .last()
            .is_some_and(|p| p.is_ascii_alphanumeric());
        if at_word_start && rest.starts_with("arn:") {
            let end = rest
                .find(|c: char| c.is_whitespace() || "\"'`,;()[]{}<>".contains(c))
                .unwrap_or(rest.len());
            // A sentence's full stop is not part of the ARN.
            let end = if rest[..end].ends_with('.') {
                end - 1
            } else {
                end
            };
            out.push_str("(an ARN)");
            rest = &rest[end..];
            continue;
        }
        if c.is_ascii_digit() && at_word_start {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 12 {
                out.push_str("(account)");
            } else {
                out.push_str(&rest[..digits]);
            }
            rest = &rest[digits..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.chars().take(2000).collect()
}

/// What Bedrock said in an error response.
struct UpstreamError {
    status: StatusCode,
    kind: String,
    message: String,
    /// Bedrock's own `retry-after`, if it sent one.
    retry_after: Option<HeaderValue>,
}

/// How long a small answer (an error, a count) may take to arrive whole; Bedrock sends them at
/// once.
const SMALL_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a small answer whole, up to [`MAX_ERROR_BODY`] and within `timeout`; what does not
/// arrive in time is left out.
async fn read_small(mut body: Incoming, timeout: Duration) -> Vec<u8> {
    let mut bytes = Vec::new();
    let read = async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                let room = MAX_ERROR_BODY.saturating_sub(bytes.len());
                bytes.extend_from_slice(&data[..data.len().min(room)]);
                if bytes.len() >= MAX_ERROR_BODY {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(timeout.min(SMALL_ANSWER_TIMEOUT), read).await;
    bytes
}

/// An AWS error type without its decorations: `ThrottlingException:http://internal…` and
/// `com.amazon.coral.service#UnknownOperationException` are `ThrottlingException` and
/// `UnknownOperationException`.
fn bare_error_type(kind: &str) -> &str {
    let kind = kind.split(':').next().unwrap_or_default();
    kind.rsplit('#').next().unwrap_or_default()
}

/// What Bedrock said in an error response.
fn upstream_error(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> UpstreamError {
    #[derive(Deserialize, Default)]
    struct Said {
        #[serde(alias = "Message")]
        message: Option<String>,
        #[serde(rename = "__type")]
        kind: Option<String>,
    }
    let said: Said = serde_json::from_slice(body).unwrap_or_default();
    let kind = headers
        .get("x-amzn-errortype")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(said.kind)
        .unwrap_or_default();
    UpstreamError {
        status,
        kind: bare_error_type(&kind).to_string(),
        message: said.message.unwrap_or_default(),
        retry_after: headers.get(header::RETRY_AFTER).cloned(),
    }
}

/// An error Bedrock reported, as the Messages API words it: its status, error type and message.
/// `kind` is the AWS error type (`ThrottlingException`, or a stream's `throttlingException`),
/// `status` Bedrock's HTTP status when it answered with one. Only a bad request's own message
/// is relayed (redacted): the client's recovery keys on it (`Input is too long.`, `prompt is
/// too long: …`); for anything else Bedrock's message can name accounts and roles, so it goes
/// to the log and the caller gets one of ours, with the error type.
pub fn bedrock_error(
    kind: &str,
    status: Option<u16>,
    said: &str,
) -> (StatusCode, &'static str, String) {
    let kind = bare_error_type(kind);
    let is = |name: &str| kind.eq_ignore_ascii_case(name);
    let code = status.unwrap_or(0);
    let ours = |s: StatusCode, t: &'static str, m: &str| (s, t, m.to_string());
    if is("ThrottlingException") || code == 429 {
        ours(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "Bedrock is throttling calls to this model; retry in a moment.",
        )
    } else if is("ServiceUnavailableException") || code == 503 {
        ours(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Bedrock is overloaded; retry in a moment.",
        )
    } else if is("AccessDeniedException") || code == 403 {
        ours(
            StatusCode::FORBIDDEN,
            "permission_error",
            "Bedrock refused bedrock-gate's own AWS credentials for this call (AccessDeniedException); \
             the operator must fix the gateway's IAM policy. The proxy log has Bedrock's message.",
        )
    } else if is("ResourceNotFoundException") || code == 404 {
        ours(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "Bedrock does not know the inference profile bedrock-gate maps this model to for you; \
             ask your admin to run `bedrock-gate profiles verify`.",
        )
    } else if is("ModelTimeoutException") || code == 408 {
        ours(
            StatusCode::GATEWAY_TIMEOUT,
            "api_error",
            "The model did not finish in time (ModelTimeoutException); retry.",
        )
    } else if code == 413 {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_too_large",
            redact(said),
        )
    } else if is("ValidationException") || code == 400 {
        let message = if said.is_empty() {
            format!("Bedrock refused the request ({kind}).")
        } else {
            redact(said)
        };
        (StatusCode::BAD_REQUEST, "invalid_request_error", message)
    } else {
        let status = match StatusCode::from_u16(code) {
            Ok(s) if s.is_server_error() => s,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let what = if kind.is_empty() { "an error" } else { kind };
        (
            status,
            "api_error",
            format!("Bedrock failed to answer ({what}); retry."),
        )
    }
}

/// A mid-stream exception as an SSE error event's type and message.
fn stream_exception(kind: &str, said: &str) -> (&'static str, String) {
    let (_, error_type, message) = bedrock_error(kind, None, said);
    (error_type, message)
}

/// Bedrock's error response in the Anthropic envelope.
fn upstream_error_response(e: &UpstreamError, request_id: &str) -> Response {
    let (status, error_type, message) = bedrock_error(&e.kind, Some(e.status.as_u16()), &e.message);
    let mut resp = envelope(status, error_type, &message, request_id);
    if status == StatusCode::TOO_MANY_REQUESTS {
        // Bedrock sends none; a short pause beats the SDK's guess.
        let after = e
            .retry_after
            .clone()
            .unwrap_or(HeaderValue::from_static("1"));
        resp.headers_mut().insert(header::RETRY_AFTER, after);
    }
    resp
}

/// Encodes Bedrock's answer in this front's protocol and hands the record to the body (or
/// writes it, for answers read whole: errors and counts).
pub async fn respond(answered: Answered, recorder: Recorder, enc: Encoding<'_>) -> Response {
    let config = enc.config;
    let Answered {
        call,
        admission,
        upstream,
    } = answered;
    let request_id = recorder.info.request_id.clone();
    let (head, incoming) = upstream.into_parts();
    let op = match call.wanted {
        Wanted::Runtime(op) => op,
        _ => RuntimeOp::Invoke,
    };
    let streaming = op == RuntimeOp::InvokeStream;
    let readable = head.status == StatusCode::OK && (!streaming || is_event_stream(&head.headers));
    let idle = config.timeouts.stream_idle;

    if op == RuntimeOp::CountTokens {
        let body = read_small(incoming, idle).await;
        let resp = count_tokens_response(head.status, &head.headers, &body, &request_id);
        recorder.answered(resp.status()).committed().await;
        return resp;
    }
    if !readable {
        let body = read_small(incoming, idle).await;
        let e = upstream_error(head.status, &head.headers, &body);
        tracing::warn!(
            request_id = %request_id,
            status = e.status.as_u16(),
            error_type = %e.kind,
            message = %e.message,
            "Bedrock refused a Messages call"
        );
        let resp = upstream_error_response(&e, &request_id);
        recorder.answered(resp.status()).committed().await;
        return resp;
    }

    let usage = Some(UsageMeter::new(op, head.status.as_u16(), &head.headers));
    let (content_type, body) = if streaming {
        let sse = SseEncoder::new(config.timeouts.stream_ping, stream_exception);
        let body = enc.relay(incoming, sse, recorder, usage);
        (
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
            body,
        )
    } else {
        let content_type = head
            .headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/json"));
        let body = enc.relay(incoming, PassThrough, recorder, usage);
        (content_type, body)
    };
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    if streaming {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("request-id", v);
    }
    if let Some(standing) = &admission.standing {
        usage_headers(headers, standing);
    }
    resp
}

/// CountTokens' `{"inputTokens": N}` as `{"input_tokens": N}`; anything else is
/// `501 not_supported` (Claude Code then estimates, or counts another way).
fn count_tokens_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
) -> Response {
    #[derive(Deserialize)]
    struct Counted {
        #[serde(rename = "inputTokens")]
        input_tokens: u64,
    }
    match (status, serde_json::from_slice::<Counted>(body).ok()) {
        (StatusCode::OK, Some(Counted { input_tokens })) => super::json_response(
            StatusCode::OK,
            serde_json::json!({ "input_tokens": input_tokens }).to_string(),
            request_id,
        ),
        _ => {
            let e = upstream_error(status, headers, body);
            tracing::warn!(
                request_id,
                status = status.as_u16(),
                error_type = %e.kind,
                message = %e.message,
                "Bedrock CountTokens refused; answering not_supported"
            );
            let mut resp = envelope(
                StatusCode::NOT_IMPLEMENTED,
                "not_supported",
                "Token counting is not available for this model on Bedrock.",
                request_id,
            );
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
            resp
        }
    }
}

/// One model of the caller's, in the shape of Anthropic's models API.
fn model_object(name: &str) -> serde_json::Value {
    let (_, date) = anthropic_family(name);
    let created = date
        .filter(|d| d.len() == 8)
        .map(|d| format!("{}-{}-{}T00:00:00Z", &d[..4], &d[4..6], &d[6..]))
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string());
    serde_json::json!({
        "type": "model",
        "id": name,
        "display_name": anthropic_display_name(name),
        "created_at": created,
    })
}

/// `GET /v1/models[/{id}]`: the caller's own mapped Anthropic models, newest first.
pub fn models_response(user: &User, users: &Users, id: Option<&str>, request_id: &str) -> Response {
    if let Some(id) = id {
        return match crate::resolve::profile_for(user, users, id, Front::Anthropic)
            .ok()
            .and_then(|p| anthropic_name(&p.model).map(str::to_string))
        {
            Some(name) => json(&model_object(&name), request_id),
            None => envelope(
                StatusCode::NOT_FOUND,
                "not_found_error",
                &format!("Model `{}` is not one of yours.", shown(id)),
                request_id,
            ),
        };
    }
    let mut names: Vec<&str> = user
        .models
        .keys()
        .filter_map(|k| anthropic_name(k))
        .collect();
    names.sort_by(|a, b| {
        anthropic_family(b)
            .1
            .cmp(&anthropic_family(a).1)
            .then(a.cmp(b))
    });
    names.dedup();
    let data: Vec<serde_json::Value> = names.iter().map(|n| model_object(n)).collect();
    json(
        &serde_json::json!({
            "data": data,
            "has_more": false,
            "first_id": names.first(),
            "last_id": names.last(),
        }),
        request_id,
    )
}

fn json(value: &serde_json::Value, request_id: &str) -> Response {
    super::json_response(StatusCode::OK, value.to_string(), request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translated(body: &str, betas: &[&str], count: bool) -> Result<Translated, Refusal> {
        let betas: Vec<String> = betas.iter().map(|b| b.to_string()).collect();
        translate(body.as_bytes(), &betas, count, "project")
    }

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn paths() {
        assert_eq!(parse(&Method::POST, "/v1/messages").unwrap(), Route::Create);
        assert_eq!(
            parse(&Method::POST, "/v1/messages/count_tokens").unwrap(),
            Route::CountTokens
        );
        assert_eq!(
            parse(&Method::GET, "/v1/models").unwrap(),
            Route::ListModels
        );
        assert_eq!(
            parse(&Method::GET, "/v1/models/claude-sonnet-4-5").unwrap(),
            Route::GetModel {
                id: "claude-sonnet-4-5".into()
            }
        );
        for (m, p) in [
            (Method::GET, "/v1/messages"),
            (Method::POST, "/v1/complete"),
            (Method::GET, "/v1/models/a/b"),
            (Method::DELETE, "/v1/models"),
        ] {
            assert_eq!(
                parse(&m, p).unwrap_err().reason,
                Reason::UnknownOperation,
                "{m} {p}"
            );
        }
        assert!(owns("/v1/messages") && owns("/v1") && !owns("/v1x") && !owns("/model/x/invoke"));
    }

    #[test]
    fn a_messages_body_becomes_an_invoke_body() {
        let body = r#"{"model":"claude-sonnet-4-5","max_tokens":256,"stream":true,
            "messages":[{"role":"user","content":"hi"}],
            "thinking":{"type":"enabled","budget_tokens":1024},
            "tools":[{"name":"t","input_schema":{"type":"object"}}],
            "metadata":{"user_id":"u"},"safeguards":{"x":1},
            "tags":{"project":"apollo","other":"x"},
            "anthropic_version":"2023-06-01"}"#;
        let t = translated(
            body,
            &["interleaved-thinking-2025-05-14", "request-tags-2026-08-21"],
            false,
        )
        .unwrap();
        assert_eq!(t.model, "claude-sonnet-4-5");
        assert!(t.stream);
        assert_eq!(t.project.as_deref(), Some("apollo"));
        let out = json(&t.body);
        let fields: Vec<&str> = out
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "anthropic_beta",
            "anthropic_version",
            "max_tokens",
            "messages",
            "metadata",
            "safeguards",
            "thinking",
            "tools",
        ];
        expected.sort_unstable();
        let mut got = fields.clone();
        got.sort_unstable();
        assert_eq!(got, expected, "model, stream and tags dropped");
        assert_eq!(out["anthropic_version"], "bedrock-2023-05-31");
        assert_eq!(
            out["anthropic_beta"],
            serde_json::json!(["interleaved-thinking-2025-05-14"]),
            "request tags are left out"
        );
        // Every other field byte for byte, in the caller's order.
        let text = String::from_utf8(t.body.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"anthropic_version":"bedrock-2023-05-31","anthropic_beta":["interleaved-thinking-2025-05-14"],"max_tokens":256,"messages":[{"role":"user","content":"hi"}],"thinking":{"type":"enabled","budget_tokens":1024},"#),
            "{text}"
        );
    }

    #[test]
    fn a_count_is_a_count_tokens_body_around_an_invoke_body() {
        let body = r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}],
            "tools":[],"thinking":{"type":"enabled","budget_tokens":2048}}"#;
        let t = translated(
            body,
            &["claude-code-20250219", "interleaved-thinking-2025-05-14"],
            true,
        )
        .unwrap();
        assert!(!t.stream);
        let out = json(&t.body);
        let inner = base64::engine::general_purpose::STANDARD
            .decode(out["input"]["invokeModel"]["body"].as_str().unwrap())
            .unwrap();
        let inner = json(&inner);
        assert_eq!(inner["anthropic_version"], "bedrock-2023-05-31");
        assert_eq!(inner["max_tokens"], 2049, "above the thinking budget");
        assert_eq!(
            inner["anthropic_beta"],
            serde_json::json!(["claude-code-20250219"])
        );
        assert!(inner.get("tools").is_none(), "no empty tools");
        assert!(inner.get("model").is_none());
    }

    #[test]
    fn bad_bodies_are_clear_refusals() {
        for (body, says) in [
            ("", "not a JSON object"),
            ("[1]", "not a JSON object"),
            ("{\"model\":", "not a JSON object"),
            (r#"{"messages":[]}"#, "`model`: field required"),
            (r#"{"model":7}"#, "`model` must be a string"),
            (r#"{"model":""}"#, "1 to 256"),
            (r#"{"model":"m","stream":"yes"}"#, "`stream`"),
            (r#"{"model":"m","model":"n"}"#, "twice"),
            (r#"{"model":"m","anthropic_beta":"x"}"#, "anthropic_beta"),
        ] {
            let e = translated(body, &[], false).unwrap_err();
            assert_eq!(e.reason, Reason::Invalid, "{body}");
            assert!(e.message.contains(says), "{body}: {}", e.message);
        }
    }

    #[test]
    fn tags_that_cannot_be_recorded_are_dropped_not_fatal() {
        let long = "p".repeat(MAX_LABEL_LEN + 1);
        for tags in [
            "[1]".to_string(),
            r#"{"project":5}"#.to_string(),
            format!(r#"{{"project":"{long}"}}"#),
            r#"{"project":"a\u0000b"}"#.to_string(),
        ] {
            let t = translated(&format!(r#"{{"model":"m","tags":{tags}}}"#), &[], false).unwrap();
            assert_eq!(t.project, None, "{tags}");
            assert!(json(&t.body).get("tags").is_none());
        }
    }

    #[test]
    fn beta_headers_are_split_cleaned_and_never_fatal() {
        let mut h = HeaderMap::new();
        h.append("anthropic-beta", HeaderValue::from_static("a-1, b-2,,a-1"));
        h.append(
            "anthropic-beta",
            HeaderValue::from_static("c.3,bad value,\"x\""),
        );
        assert_eq!(header_betas(&h), ["a-1", "b-2", "a-1", "c.3"]);
        assert_eq!(
            clean_betas(header_betas(&h), false),
            ["a-1", "b-2", "c.3"],
            "deduplicated"
        );
    }

    #[test]
    fn account_ids_and_arns_never_reach_the_caller() {
        assert_eq!(redact("Input is too long."), "Input is too long.");
        assert_eq!(
            redact("prompt is too long: 210000 tokens > 200000 maximum"),
            "prompt is too long: 210000 tokens > 200000 maximum"
        );
        assert_eq!(
            redact(
                "User: arn:aws:sts::123456789012:assumed-role/gw/x is not authorized on arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc."
            ),
            "User: (an ARN) is not authorized on (an ARN)."
        );
        assert_eq!(
            redact("account 123456789012 and 12345678901234"),
            "account (account) and 12345678901234"
        );
        assert_eq!(redact("héllo arn:x é"), "héllo (an ARN) é");
    }

    #[test]
    fn usage_headers_follow_the_gateway_protocol() {
        let standing = |spent: f64| Standing {
            budget_usd: 100.0,
            spent_usd: spent,
            resets_at: 1_796_083_200,
        };
        let mut h = HeaderMap::new();
        usage_headers(&mut h, &standing(42.0));
        assert_eq!(h["anthropic-ratelimit-unified-status"], "allowed");
        assert_eq!(h["anthropic-ratelimit-unified-overage-utilization"], "0.42");
        assert_eq!(
            h["anthropic-ratelimit-unified-representative-claim"],
            "overage"
        );
        assert_eq!(h["anthropic-ratelimit-unified-reset"], "1796083200");
        assert!(!h.contains_key("anthropic-ratelimit-unified-overage-surpassed-threshold"));
        let mut h = HeaderMap::new();
        usage_headers(&mut h, &standing(80.0));
        assert_eq!(h["anthropic-ratelimit-unified-status"], "allowed_warning");
        assert_eq!(
            h["anthropic-ratelimit-unified-overage-status"],
            "allowed_warning"
        );
        assert_eq!(
            h["anthropic-ratelimit-unified-overage-surpassed-threshold"],
            "0.75"
        );
        let mut h = HeaderMap::new();
        usage_headers(&mut h, &standing(99.999));
        assert_eq!(h["anthropic-ratelimit-unified-overage-utilization"], "0.99");
        assert_eq!(
            h["anthropic-ratelimit-unified-overage-surpassed-threshold"],
            "0.95"
        );
        let refusal = Refusal::new(Reason::OverBudget, "spent")
            .with_retry_after(60)
            .with_standing(standing(100.0));
        let resp = error_response(&refusal, "rid");
        let h = resp.headers();
        assert_eq!(resp.status(), 429);
        assert_eq!(h["anthropic-ratelimit-unified-status"], "rejected");
        assert_eq!(h["anthropic-ratelimit-unified-overage-period"], "monthly");
        assert_eq!(h["retry-after"], "60");
        assert_eq!(h["x-should-retry"], "false");
        assert!(!h.contains_key("anthropic-ratelimit-unified-representative-claim"));
        assert!(!h.contains_key("anthropic-ratelimit-unified-overage-status"));
    }
}
