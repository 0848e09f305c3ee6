//! Header hygiene in both directions.
//!
//! Requests: an allowlist. Only `Content-Type`, `Accept` and the `X-Amzn-Bedrock-*` request
//! headers Bedrock Runtime defines (accept, trace, guardrail, performance config, service
//! tier) cross to Bedrock, the billing ones after `premium` let them; any other
//! `X-Amzn-Bedrock-*` header (a new billing option nobody priced), the caller's
//! `Authorization`, `x-api-key`, `x-amz-*`, `Host`, `Accept-Encoding` and hop-by-hop headers
//! never do, so the signature covers only headers the proxy chose.
//! Responses: everything but hop-by-hop headers is passed back as Bedrock sent it.

use http::header::{self, HeaderMap, HeaderName};

/// The `X-Amzn-Bedrock-*` request headers of InvokeModel and InvokeModelWithResponseStream.
const BEDROCK_REQUEST_HEADERS: &[&str] = &[
    "x-amzn-bedrock-accept",
    "x-amzn-bedrock-trace",
    "x-amzn-bedrock-guardrailidentifier",
    "x-amzn-bedrock-guardrailversion",
    "x-amzn-bedrock-performanceconfig-latency",
    "x-amzn-bedrock-service-tier",
];

/// Copies the request headers Bedrock should see.
pub fn forwardable_request_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in incoming {
        if name == header::CONTENT_TYPE
            || name == header::ACCEPT
            || BEDROCK_REQUEST_HEADERS.contains(&name.as_str())
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including any named in `Connection`, from a response.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(*n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn only_allowlisted_request_headers_cross() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer secret"),
            ("x-api-key", "secret"),
            ("x-amz-security-token", "tok"),
            ("x-amz-date", "20250101T000000Z"),
            ("host", "evil"),
            ("accept-encoding", "gzip"),
            ("connection", "keep-alive"),
            ("content-type", "application/json"),
            ("accept", "application/vnd.amazon.eventstream"),
            ("x-amzn-bedrock-guardrailidentifier", "g1"),
            ("x-amzn-bedrock-trace", "ENABLED"),
            ("x-amzn-bedrock-future-billing-option", "on"),
            ("anthropic-beta", "x"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let out = forwardable_request_headers(&h);
        let mut names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "content-type",
                "x-amzn-bedrock-guardrailidentifier",
                "x-amzn-bedrock-trace"
            ]
        );
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert(
            "x-amzn-errortype",
            HeaderValue::from_static("ThrottlingException"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-amzn-errortype"));
    }
}
