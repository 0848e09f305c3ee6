//! The Bedrock-native front: Bedrock's own REST paths, as Claude Code in Bedrock mode and the
//! AWS SDKs call them.
//!
//! Decodes from the method and the raw path alone (never the body) which operation is called
//! and which model or profile it names; the body passes through untouched, and so does the
//! answer, frame by frame. Refusals look like Bedrock's own errors: a status, an
//! `x-amzn-ErrorType` header, an `x-amzn-RequestId` header and `{"message": ...}`, so the AWS
//! SDKs and Claude Code classify and retry them as they would Bedrock's. This front never
//! converts a stream and never reaches the network.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use percent_encoding::percent_decode_str;

use crate::arn::ModelRef;
use crate::call::{Call, Wanted};
use crate::domain::{Front, Labels, Op, RuntimeOp};
use crate::premium::{self, Asked};
use crate::refusal::{Reason, Refusal, shown};
use crate::upstream::headers;
use crate::upstream::payload::Payload;

/// Longest path accepted; ARNs are short, anything longer is not a Bedrock call.
const MAX_PATH_LEN: usize = 2048;

/// Longest query string forwarded to ListInferenceProfiles.
const MAX_QUERY_LEN: usize = 1024;

/// How a client of this front sends its key; ends every refusal of a missing or unknown key.
pub const KEY_HINT: &str = "Set AWS_BEARER_TOKEN_BEDROCK to the API key your bedrock-gate admin gave you \
     (it is sent as `Authorization: Bearer <key>`), or send it in an `x-api-key` header.";

/// A recognised request, with ids percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    /// `GET /usage`: the caller's own usage this month.
    Usage,
    Runtime {
        op: RuntimeOp,
        model: String,
    },
    ListProfiles,
    GetProfile {
        id: String,
    },
}

impl Route {
    /// The operation, for logs, metrics and the ledger.
    pub fn op(&self) -> Op {
        match self {
            Route::Health => Op::Health,
            Route::Usage => Op::Usage,
            Route::Runtime { op, .. } => Op::Runtime(*op),
            Route::ListProfiles => Op::ListInferenceProfiles,
            Route::GetProfile { .. } => Op::GetInferenceProfile,
        }
    }
}

fn decode_id(raw: &str, what: &str) -> Result<String, Refusal> {
    let decoded = percent_decode_str(raw).decode_utf8().map_err(|_| {
        Refusal::invalid(format!(
            "The {what} in the path is not valid UTF-8 after percent-decoding."
        ))
    })?;
    if decoded.is_empty() {
        return Err(Refusal::invalid(format!(
            "The {what} in the path is empty."
        )));
    }
    Ok(decoded.into_owned())
}

/// Parses method and raw (still percent-encoded) path into a [`Route`].
pub fn parse(method: &Method, path: &str) -> Result<Route, Refusal> {
    if path.len() > MAX_PATH_LEN {
        return Err(Refusal::invalid(format!(
            "The request path is longer than {MAX_PATH_LEN} bytes."
        )));
    }
    if path == "/healthz" && method == Method::GET {
        return Ok(Route::Health);
    }
    if path == "/usage" && method == Method::GET {
        return Ok(Route::Usage);
    }
    if let Some(rest) = path.strip_prefix("/model/") {
        // The operation is the last segment; everything before it is the model id, which some
        // clients send with a raw `/` (an ARN) and others with `%2F`.
        if let Some((raw_model, suffix)) = rest.rsplit_once('/')
            && let Some(op) = RuntimeOp::from_suffix(suffix)
            && method == Method::POST
        {
            let model = decode_id(raw_model, "model id")?;
            ModelRef::parse(&model).map_err(|e| {
                Refusal::invalid(format!(
                    "The model id `{}` is not valid: {e}.",
                    shown(&model)
                ))
            })?;
            return Ok(Route::Runtime { op, model });
        }
    }
    if method == Method::GET {
        if path == "/inference-profiles" || path == "/inference-profiles/" {
            return Ok(Route::ListProfiles);
        }
        if let Some(raw_id) = path.strip_prefix("/inference-profiles/")
            && !raw_id.contains('/')
        {
            let id = decode_id(raw_id, "inference profile id")?;
            ModelRef::parse(&id).map_err(|e| {
                Refusal::invalid(format!(
                    "The inference profile id `{}` is not valid: {e}.",
                    shown(&id)
                ))
            })?;
            return Ok(Route::GetProfile { id });
        }
    }
    Err(unknown_operation(method, path))
}

/// A path that is none of the operations this front forwards.
pub fn unknown_operation(method: &Method, path: &str) -> Refusal {
    Refusal::new(
        Reason::UnknownOperation,
        format!(
            "bedrock-gate does not forward {method} {}. It serves the Bedrock Runtime operations \
             POST /model/{{modelId}}/invoke, /invoke-with-response-stream, /converse, /converse-stream, \
             /count-tokens and GET /inference-profiles[/{{id}}].",
            shown(path)
        ),
    )
}

/// The call a routed request makes, with its body as read. Health and usage are answered by
/// the proxy and make no call.
pub fn decode(
    route: Route,
    query: Option<&str>,
    incoming: &HeaderMap,
    body: Payload,
    labels: Labels,
) -> Result<Call, Refusal> {
    let op = route.op();
    let mut asked = Asked::default();
    if let Route::Runtime { op, .. } = &route {
        premium::from_headers(incoming, &mut asked)?;
        if matches!(op, RuntimeOp::Converse | RuntimeOp::ConverseStream) {
            premium::from_converse(&body, &mut asked)?;
        }
    }
    let (wanted, model) = match route {
        Route::Runtime { op, model } => (Wanted::Runtime(op), Some(model)),
        Route::ListProfiles => (
            Wanted::ListProfiles {
                query: list_query(query)?,
            },
            None,
        ),
        Route::GetProfile { id } => (Wanted::GetProfile, Some(id)),
        Route::Health | Route::Usage => {
            return Err(Refusal::internal("health and usage make no upstream call"));
        }
    };
    Ok(Call {
        front: Front::Bedrock,
        op,
        wanted,
        model,
        headers: headers::forwardable_request_headers(incoming),
        body,
        labels,
        asked,
    })
}

/// The query for ListInferenceProfiles: system-defined profiles only, so no caller can list
/// the account's application profiles (other users' ARNs); paging parameters pass through.
fn list_query(query: Option<&str>) -> Result<String, Refusal> {
    let query = query.unwrap_or("");
    if query.len() > MAX_QUERY_LEN {
        return Err(Refusal::invalid(format!(
            "The query string is longer than {MAX_QUERY_LEN} bytes."
        )));
    }
    let mut out = vec!["type=SYSTEM_DEFINED".to_string()];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "type" | "typeEquals" if v == "SYSTEM_DEFINED" => {}
            "type" | "typeEquals" => {
                return Err(Refusal::forbidden(
                    "bedrock-gate lists system-defined inference profiles only; \
                     look up your own profiles with GetInferenceProfile.",
                ));
            }
            "maxResults" | "nextToken" => out.push(pair.to_string()),
            other => {
                return Err(Refusal::invalid(format!(
                    "ListInferenceProfiles has no parameter `{}`.",
                    other.chars().take(64).collect::<String>()
                )));
            }
        }
    }
    Ok(out.join("&"))
}

/// The status Bedrock would answer a refusal of this kind with.
pub fn status(reason: Reason) -> StatusCode {
    match reason {
        Reason::Unauthenticated
        | Reason::UnknownAccessKey
        | Reason::BadSignature
        | Reason::ModelNotAllowed
        | Reason::Forbidden => StatusCode::FORBIDDEN,
        Reason::Invalid => StatusCode::BAD_REQUEST,
        Reason::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Reason::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        Reason::UnknownOperation => StatusCode::NOT_FOUND,
        Reason::OverBudget | Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Reason::Unreachable => StatusCode::BAD_GATEWAY,
        Reason::ShuttingDown | Reason::SessionUnavailable | Reason::Overloaded => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
        Reason::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A refusal as Bedrock shapes its errors, with a request id the caller can quote to the
/// operator.
pub fn error_response(refusal: &Refusal, request_id: &str) -> Response {
    let body = serde_json::json!({ "message": refusal.message }).to_string();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status(refusal.reason);
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "x-amzn-errortype",
        HeaderValue::from_static(refusal.reason.name()),
    );
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-amzn-requestid", v);
    }
    if let Some(secs) = refusal.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const A1: &str = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/aaa111";

    fn refused(method: Method, path: &str) -> StatusCode {
        status(parse(&method, path).unwrap_err().reason)
    }

    #[test]
    fn parses_runtime_paths_with_raw_and_encoded_arns() {
        let enc = "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Faaa111/invoke";
        let claude = "/model/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile%2Faaa111/invoke-with-response-stream";
        let raw = "/model/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/aaa111/converse";
        for (p, op) in [
            (enc, RuntimeOp::Invoke),
            (claude, RuntimeOp::InvokeStream),
            (raw, RuntimeOp::Converse),
        ] {
            assert_eq!(
                parse(&Method::POST, p).unwrap(),
                Route::Runtime {
                    op,
                    model: A1.to_string()
                }
            );
        }
        assert_eq!(
            parse(
                &Method::POST,
                "/model/us.anthropic.claude-x-v1%3A0/count-tokens"
            )
            .unwrap(),
            Route::Runtime {
                op: RuntimeOp::CountTokens,
                model: "us.anthropic.claude-x-v1:0".into()
            }
        );
    }

    #[test]
    fn unknown_and_malformed_paths_are_refused() {
        assert_eq!(refused(Method::GET, "/model/x/invoke"), 404);
        assert_eq!(refused(Method::POST, "/model/x/explode"), 404);
        assert_eq!(refused(Method::POST, "/foundation-models"), 404);
        assert_eq!(refused(Method::POST, "/model//invoke"), 400);
        assert_eq!(refused(Method::POST, "/model/%FF%FE/invoke"), 400);
        assert_eq!(refused(Method::POST, "/model/a%20b/invoke"), 400);
        assert_eq!(
            refused(Method::POST, &format!("/model/{}/invoke", "a".repeat(3000))),
            400
        );
    }

    #[test]
    fn profile_paths() {
        assert_eq!(
            parse(&Method::GET, "/inference-profiles").unwrap(),
            Route::ListProfiles
        );
        assert_eq!(
            parse(&Method::GET, "/inference-profiles/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Faaa111").unwrap(),
            Route::GetProfile { id: A1.into() }
        );
    }

    #[test]
    fn listing_is_narrowed_to_system_profiles() {
        assert_eq!(list_query(None).unwrap(), "type=SYSTEM_DEFINED");
        assert_eq!(
            list_query(Some("maxResults=5&typeEquals=SYSTEM_DEFINED&nextToken=abc")).unwrap(),
            "type=SYSTEM_DEFINED&maxResults=5&nextToken=abc"
        );
        assert_eq!(
            list_query(Some("typeEquals=APPLICATION"))
                .unwrap_err()
                .reason,
            Reason::Forbidden
        );
        assert_eq!(
            list_query(Some("evil=1")).unwrap_err().reason,
            Reason::Invalid
        );
    }
}
