//! Fuzzes the Messages front's parsers: the body translation (`front::messages::translate`), the
//! SSE re-encoder (`front::sse::SseEncoder`) over any upstream bytes in any chunking, and the
//! message redaction. Nothing may panic, and:
//! - a translated body is a JSON object with Bedrock's `anthropic_version`, without `model`,
//!   `stream` or `tags`, and (for a message) with every other field of the input unchanged; a
//!   count is a CountTokens body around an invoke body with a `max_tokens`;
//! - the SSE output is the same in one chunk, in the fuzzed chunking and byte by byte; it is
//!   UTF-8 blocks of `event: <name>` and `data:` lines, and an `error` event is the last thing
//!   sent;
//! - a redacted message has no run of exactly 12 digits and no `arn:` word.
//!
//! Input layout: byte 0 flags (bit 0: count_tokens; bit 1: framed mode, the rest is records
//! `[len: u16 BE][event JSON]` each wrapped in a valid `chunk` frame as Bedrock sends them, so
//! mutations reach the JSON past the CRCs), byte 1 the chunk size (`% 64`, 0 = 1), the rest the
//! body.

#![no_main]

use std::time::Duration;

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use base64::Engine as _;
use bedrock_gate::domain::RuntimeOp;
use bedrock_gate::front::messages::{redact, translate};
use bedrock_gate::front::sse::SseEncoder;
use bedrock_gate::meter::usage::UsageMeter;
use bedrock_gate::stream::Encoder;
use bytes::Bytes;
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let flags = data.first().copied().unwrap_or(0);
    let chunk = usize::from(data.get(1).copied().unwrap_or(1) % 64).max(1);
    let body = data.get(2..).unwrap_or_default();
    check_translate(body, flags & 1 == 1);
    let upstream = if flags & 2 == 2 {
        framed(body)
    } else {
        body.to_vec()
    };
    check_sse(&upstream, chunk);
    check_redact(&String::from_utf8_lossy(body));
});

fn check_translate(body: &[u8], count: bool) {
    let betas = vec!["claude-code-20250219".to_string(), "request-tags-x".to_string()];
    let Ok(t) = translate(body, &betas, count, "project") else {
        return;
    };
    let out: Value = serde_json::from_slice(&t.body).expect("a translated body is JSON");
    let invoke = if count {
        let encoded = out["input"]["invokeModel"]["body"]
            .as_str()
            .expect("a count wraps an invoke body");
        let inner = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        let inner: Value = serde_json::from_slice(&inner).expect("the invoke body is JSON");
        assert!(inner.get("max_tokens").is_some(), "{inner}");
        inner
    } else {
        out
    };
    let obj = invoke.as_object().expect("an object");
    assert_eq!(obj["anthropic_version"], "bedrock-2023-05-31");
    for dropped in ["model", "stream", "tags"] {
        assert!(!obj.contains_key(dropped), "{dropped} kept: {invoke}");
    }
    if let Some(b) = obj.get("anthropic_beta") {
        assert!(
            b.as_array()
                .expect("beta array")
                .iter()
                .all(|v| !v.as_str().unwrap_or("").starts_with("request-tags-"))
        );
    }
    // Everything else is the caller's, unchanged (where serde_json can read the input at all).
    if !count && let Ok(Value::Object(input)) = serde_json::from_slice::<Value>(body) {
        for (k, v) in &input {
            if matches!(
                k.as_str(),
                "model" | "stream" | "tags" | "anthropic_version" | "anthropic_beta"
            ) {
                continue;
            }
            assert_eq!(obj.get(k), Some(v), "field {k} changed");
        }
    }
}

/// Runs the encoder over `bytes` in pieces of `size`, as the relay would; returns the output and
/// whether it ended the stream.
fn encode(bytes: &[u8], size: usize) -> (Vec<u8>, bool) {
    let mut e = SseEncoder::new(Duration::from_secs(10), |_kind, said| ("api_error", redact(said)));
    let mut usage = UsageMeter::new(RuntimeOp::InvokeStream, 200, &event_stream());
    let mut out = Vec::new();
    for piece in bytes.chunks(size) {
        let r = e.encode(Bytes::copy_from_slice(piece), Some(&mut usage));
        if let Some(o) = r.out {
            out.extend_from_slice(&o);
        }
        if r.ended {
            let _ = usage.finish(false);
            return (out, true);
        }
    }
    let _ = usage.finish(true);
    (out, false)
}

fn check_sse(bytes: &[u8], size: usize) {
    let whole = encode(bytes, bytes.len().max(1));
    assert_eq!(encode(bytes, size), whole, "chunking changed the output");
    assert_eq!(encode(bytes, 1), whole, "byte by byte changed the output");
    let (out, ended) = whole;
    let text = std::str::from_utf8(&out).expect("SSE output is UTF-8");
    assert!(text.is_empty() || text.ends_with("\n\n"), "{text:?}");
    let blocks: Vec<&str> = text.split_terminator("\n\n").collect();
    for (i, block) in blocks.iter().enumerate() {
        let mut lines = block.split('\n');
        let event = lines
            .next()
            .and_then(|l| l.strip_prefix("event: "))
            .expect("a block starts with its event");
        assert!(
            !event.is_empty()
                && event
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{event:?}"
        );
        assert!(lines.all(|l| l.starts_with("data: ")), "{block:?}");
        if event == "error" {
            assert_eq!(i + 1, blocks.len(), "an error event is the last");
            assert!(ended);
        }
    }
}

fn check_redact(s: &str) {
    let r = redact(s);
    assert!(r.chars().count() <= 2000);
    // A run of exactly 12 digits that starts a word is an account id.
    let bytes = r.as_bytes();
    let mut run = 0usize;
    for i in 0..=bytes.len() {
        if bytes.get(i).is_some_and(u8::is_ascii_digit) {
            run += 1;
            continue;
        }
        assert!(
            run != 12 || (i > 12 && bytes[i - 13].is_ascii_alphanumeric()),
            "{r:?}"
        );
        run = 0;
    }
    assert!(!r.split(|c: char| !c.is_ascii_alphanumeric() && c != ':').any(|w| w.starts_with("arn:")), "{r:?}");
}

fn event_stream() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/vnd.amazon.eventstream"),
    );
    h
}

/// Records `[len: u16 BE][event JSON]`, each as a `chunk` frame wrapping it in base64.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let data = &rest[2..(2 + len).min(rest.len())];
        rest = &rest[(2 + len).min(rest.len())..];
        let payload = serde_json::json!({
            "bytes": base64::engine::general_purpose::STANDARD.encode(data),
            "p": "abc"
        })
        .to_string();
        let msg = Message::new(payload.into_bytes())
            .add_header(Header::new(":event-type", HeaderValue::String("chunk".into())))
            .add_header(Header::new(":message-type", HeaderValue::String("event".into())));
        let _ = write_message_to(&msg, &mut out);
    }
    out
}
