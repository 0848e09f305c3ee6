//! Fuzzes the caller-signature parser: `identify::sigv4::parse_authorization` on any text, then
//! `Signature::start` on a request carrying it with fuzzed `X-Amz-Date`, Host and path. Nothing
//! may panic, and:
//! - a refusal never quotes the signature (a run of hex digits) it was given;
//! - an accepted header has a 64-hex-digit signature, `host` among its signed headers and a
//!   scope date of eight digits.
//!
//! Input layout: the input is split at the first two `\n`: the Authorization value, the
//! X-Amz-Date value, then the path (each lossy UTF-8).

#![no_main]

use std::time::{Duration, SystemTime};

use bedrock_gate::identify::sigv4::{Signature, parse_authorization};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let auth = parts.next().unwrap_or_default();
    let date = parts.next().unwrap_or("20261202T000000Z");
    let path = parts.next().unwrap_or("/");
    match parse_authorization(auth) {
        Err(refusal) => {
            // A run of 16+ hex digits after `Signature=` (shorter ones, or prose, can occur in
            // the message by chance).
            if let Some(sig) = auth.split("Signature=").nth(1)
                && let Some(sig) = sig.split([',', ' ']).next()
                && sig.len() >= 16
                && sig.bytes().all(|b| b.is_ascii_hexdigit())
            {
                assert!(!refusal.message.contains(sig), "{}", refusal.message);
            }
        }
        Ok(parsed) => {
            assert_eq!(parsed.signature.len(), 64);
            assert!(parsed.signed_headers.contains(&"host"));
            assert_eq!(parsed.date.len(), 8);
            let Ok(mut request) = http::Request::builder()
                .uri(path)
                .header("host", "127.0.0.1:8787")
                .body(())
            else {
                return;
            };
            if let Ok(v) = http::HeaderValue::from_str(date) {
                request.headers_mut().insert("x-amz-date", v);
            }
            let (head, ()) = request.into_parts();
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_000_000);
            let _ = Signature::start(&head, &parsed, now);
        }
    }
});
