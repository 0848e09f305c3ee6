//! Bedrock's event stream re-encoded as the Anthropic Messages API's server-sent events.
//!
//! InvokeModelWithResponseStream sends one event-stream `chunk` frame per Anthropic event, its
//! `bytes` the base64 of exactly that event's JSON. [`SseEncoder`] decodes each frame as soon as
//! its last byte arrives and writes `event: <type>` + `data: <json>` at once: it never waits for
//! a second event and holds at most one partial frame ([`MAX_FRAME_LEN`]). A mid-stream
//! exception frame becomes an SSE `error` event in the Anthropic envelope and ends the response;
//! so does a stream it cannot read (it never passes on bytes it could not decode), and one that
//! Bedrock closes before `message_stop` (a client must never take a cut answer for a whole one).
//! During upstream silence it sends `event: ping`, which Bedrock never does.

use std::borrow::Cow;
use std::time::Duration;

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message;
use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;

use crate::meter::usage::{MAX_FRAME_LEN, UsageMeter, chunk_bytes, header_str};
use crate::stream::{Encoded, Encoder};

const PING: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

/// The one field of an Anthropic event the encoder reads.
#[derive(Deserialize)]
struct EventType<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
}

#[derive(Deserialize)]
struct ExceptionPayload {
    #[serde(default)]
    message: String,
}

/// How a front words a Bedrock stream exception: from its `:exception-type` and Bedrock's
/// message, the Anthropic error type and the message the caller sees.
pub type Describe = fn(&str, &str) -> (&'static str, String);

/// An SSE `error` event in the Anthropic envelope.
pub fn error_event(error_type: &str, message: &str) -> Bytes {
    let data = serde_json::json!({
        "type": "error",
        "error": {"type": error_type, "message": message},
    });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

/// Re-encodes an InvokeModelWithResponseStream body as Anthropic SSE; see the module doc.
pub struct SseEncoder {
    decoder: MessageFrameDecoder,
    /// Bytes of the frame not yet complete.
    pending: BytesMut,
    ping_after: Duration,
    /// Words exceptions (and keeps account ids and ARNs out of what the caller sees).
    describe: Describe,
    /// `message_stop` went out: the answer is whole.
    stopped: bool,
}

impl SseEncoder {
    pub fn new(ping_after: Duration, describe: Describe) -> SseEncoder {
        SseEncoder {
            decoder: MessageFrameDecoder::new(),
            pending: BytesMut::new(),
            ping_after,
            describe,
            stopped: false,
        }
    }

    /// Writes one decoded frame as SSE and shows it to `usage`; `Err` carries the error event
    /// that ends the stream. A `chunk` is decoded once, for both.
    fn message(
        &mut self,
        message: &Message,
        mut usage: Option<&mut UsageMeter>,
        out: &mut BytesMut,
    ) -> Result<(), Bytes> {
        let message_type = header_str(message, ":message-type");
        let chunk =
            message_type == Some("event") && header_str(message, ":event-type") == Some("chunk");
        if !chunk && let Some(usage) = usage.take() {
            usage.observe(message);
        }
        match message_type {
            Some("event") => {}
            Some("exception") | Some("error") => {
                let kind = header_str(message, ":exception-type")
                    .or_else(|| header_str(message, ":error-code"))
                    .unwrap_or("exception");
                let said = serde_json::from_slice::<ExceptionPayload>(message.payload())
                    .map(|p| p.message)
                    .unwrap_or_default();
                tracing::warn!(exception = kind, message = %said, "Bedrock ended the stream with an exception");
                let (error_type, text) = (self.describe)(kind, &said);
                return Err(error_event(error_type, &text));
            }
            _ => return Ok(()),
        }
        if !chunk {
            return Ok(());
        }
        let unreadable = || {
            error_event(
                "api_error",
                "bedrock-gate could not read Bedrock's stream; the answer is incomplete.",
            )
        };
        let event = chunk_bytes(message.payload()).ok_or_else(unreadable)?;
        if let Some(usage) = usage {
            usage.observe_chunk(&event);
        }
        // serde_json does not check the UTF-8 of fields it skips; SSE must be UTF-8 throughout.
        if std::str::from_utf8(&event).is_err() {
            return Err(unreadable());
        }
        let kind = serde_json::from_slice::<EventType>(&event).map_err(|_| unreadable())?;
        if kind.kind.is_empty()
            || !kind
                .kind
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(unreadable());
        }
        if kind.kind == "message_stop" {
            self.stopped = true;
        }
        out.put_slice(b"event: ");
        out.put_slice(kind.kind.as_bytes());
        out.put_slice(b"\n");
        // JSON has line breaks only between tokens. SSE ends a line at CR, LF or CRLF, so each
        // line gets its own `data:` field, which the client joins back with newlines.
        for line in lines(&event) {
            out.put_slice(b"data: ");
            out.put_slice(line);
            out.put_slice(b"\n");
        }
        out.put_slice(b"\n");
        Ok(())
    }
}

impl Encoder for SseEncoder {
    fn encode(&mut self, data: Bytes, mut usage: Option<&mut UsageMeter>) -> Encoded {
        self.pending.extend_from_slice(&data);
        let mut out = BytesMut::new();
        loop {
            if self.pending.len() > MAX_FRAME_LEN {
                out.put(error_event(
                    "api_error",
                    "Bedrock sent a stream frame larger than bedrock-gate reads; the answer is incomplete.",
                ));
                return Encoded {
                    out: Some(out.freeze()),
                    ended: true,
                };
            }
            let message = match self.decoder.decode_frame(&mut self.pending) {
                Ok(DecodedFrame::Complete(message)) => message,
                Ok(DecodedFrame::Incomplete) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Bedrock's event stream could not be decoded");
                    out.put(error_event(
                        "api_error",
                        "bedrock-gate could not read Bedrock's stream; the answer is incomplete.",
                    ));
                    return Encoded {
                        out: Some(out.freeze()),
                        ended: true,
                    };
                }
            };
            if let Err(end) = self.message(&message, usage.as_deref_mut(), &mut out) {
                out.put(end);
                return Encoded {
                    out: Some(out.freeze()),
                    ended: true,
                };
            }
        }
        Encoded {
            out: (!out.is_empty()).then(|| out.freeze()),
            ended: false,
        }
    }

    fn end(&mut self) -> Option<Bytes> {
        if self.stopped && self.pending.is_empty() {
            return None;
        }
        tracing::warn!(
            partial_frame_bytes = self.pending.len(),
            "Bedrock's stream ended before message_stop"
        );
        Some(error_event(
            "api_error",
            "Bedrock ended the stream before the answer was complete; retry.",
        ))
    }

    fn keepalive_after(&self) -> Option<Duration> {
        Some(self.ping_after)
    }

    fn keepalive(&mut self) -> Option<Bytes> {
        Some(Bytes::from_static(PING))
    }
}

/// The lines of `bytes` as SSE sees lines: ended by CRLF, CR or LF.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let s = rest?;
        match s.iter().position(|b| *b == b'\r' || *b == b'\n') {
            None => {
                rest = None;
                Some(s)
            }
            Some(i) => {
                let skip = if s[i] == b'\r' && s.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = Some(&s[i + skip..]);
                Some(&s[..i])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_smithy_types::event_stream::{Header, HeaderValue};

    fn frame(headers: &[(&'static str, &str)], payload: &[u8]) -> Vec<u8> {
        let mut msg = Message::new(payload.to_vec());
        for (k, v) in headers {
            msg = msg.add_header(Header::new(*k, HeaderValue::String(v.to_string().into())));
        }
        let mut buf = Vec::new();
        aws_smithy_eventstream::frame::write_message_to(&msg, &mut buf).unwrap();
        buf
    }

    fn chunk(event: &str) -> Vec<u8> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(event);
        let payload = serde_json::json!({"bytes": b64, "p": "abc"}).to_string();
        frame(
            &[(":event-type", "chunk"), (":message-type", "event")],
            payload.as_bytes(),
        )
    }

    fn encoder() -> SseEncoder {
        SseEncoder::new(Duration::from_secs(10), |kind, said| {
            (
                if kind == "throttlingException" {
                    "rate_limit_error"
                } else {
                    "api_error"
                },
                said.to_string(),
            )
        })
    }

    #[test]
    fn each_chunk_becomes_one_event_as_soon_as_it_is_whole() {
        let start = r#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":3}}}"#;
        let stop = r#"{"type":"message_stop"}"#;
        let mut bytes = chunk(start);
        bytes.extend(chunk(stop));
        let mut e = encoder();
        let mut got = Vec::new();
        // Byte by byte: an event comes out exactly when its frame's last byte arrives.
        for (i, b) in bytes.iter().enumerate() {
            let r = e.encode(Bytes::copy_from_slice(&[*b]), None);
            assert!(!r.ended);
            if let Some(out) = r.out {
                got.push((i, String::from_utf8(out.to_vec()).unwrap()));
            }
        }
        let first_end = chunk(start).len() - 1;
        assert_eq!(
            got,
            vec![
                (
                    first_end,
                    format!("event: message_start\ndata: {start}\n\n")
                ),
                (
                    bytes.len() - 1,
                    format!("event: message_stop\ndata: {stop}\n\n")
                ),
            ]
        );
    }

    /// The encoder shows the meter each frame it decodes; the meter must count exactly what it
    /// would from the same bytes fed whole, exceptions and events it ignores included.
    #[test]
    fn usage_counts_as_if_the_bytes_were_fed_to_the_meter() {
        use crate::domain::RuntimeOp;
        let start = r#"{"type":"message_start","message":{"usage":{"input_tokens":3,"cache_read_input_tokens":5}}}"#;
        let delta = r#"{"type":"message_delta","delta":{},"usage":{"output_tokens":9}}"#;
        let stop = r#"{"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":4,"outputTokenCount":10}}"#;
        let mut whole = chunk(start);
        whole.extend(frame(
            &[(":event-type", "metadata"), (":message-type", "event")],
            br#"{"usage":{"inputTokens":77}}"#,
        ));
        whole.extend(chunk(delta));
        let mut cut = whole.clone();
        whole.extend(chunk(stop));
        cut.extend(frame(
            &[
                (":exception-type", "modelStreamErrorException"),
                (":message-type", "exception"),
            ],
            br#"{"message":"boom"}"#,
        ));
        let headers = http::HeaderMap::from_iter([(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/vnd.amazon.eventstream"),
        )]);
        for (bytes, complete) in [(whole, true), (cut, false)] {
            let mut fed = UsageMeter::new(RuntimeOp::InvokeStream, 200, &headers);
            fed.feed(&bytes);
            let fed = fed.finish(true);
            let mut seen = UsageMeter::new(RuntimeOp::InvokeStream, 200, &headers);
            let mut e = encoder();
            for piece in bytes.chunks(7) {
                e.encode(Bytes::copy_from_slice(piece), Some(&mut seen));
            }
            let seen = seen.finish(true);
            assert_eq!(seen, fed);
            assert_eq!(seen.complete, complete, "{seen:?}");
            assert!(seen.usage.input_tokens > 0, "{seen:?}");
        }
    }

    #[test]
    fn an_exception_frame_ends_the_stream_with_an_error_event() {
        let mut bytes = chunk(r#"{"type":"message_start","message":{}}"#);
        bytes.extend(frame(
            &[
                (":exception-type", "throttlingException"),
                (":message-type", "exception"),
            ],
            br#"{"message":"slow down"}"#,
        ));
        let r = encoder().encode(Bytes::from(bytes), None);
        assert!(r.ended);
        let text = String::from_utf8(r.out.unwrap().to_vec()).unwrap();
        assert!(text.starts_with("event: message_start\n"), "{text}");
        assert!(
            text.ends_with(
                "event: error\ndata: {\"error\":{\"message\":\"slow down\",\"type\":\"rate_limit_error\"},\"type\":\"error\"}\n\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn garbage_is_an_error_event_never_forwarded() {
        let r = encoder().encode(
            Bytes::from_static(&[0, 0, 0, 20, 0, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9]),
            None,
        );
        assert!(r.ended);
        let text = String::from_utf8(r.out.unwrap().to_vec()).unwrap();
        assert!(text.starts_with("event: error\n"), "{text}");
        let mut e = encoder();
        let r = e.encode(Bytes::from(chunk("not json")), None);
        assert!(r.ended);
        assert!(
            String::from_utf8(r.out.unwrap().to_vec())
                .unwrap()
                .contains("api_error")
        );
        let r = encoder().encode(Bytes::from(chunk(r#"{"type":"x\ny"}"#)), None);
        assert!(r.ended, "an event name that would break the SSE framing");
    }

    #[test]
    fn multi_line_json_keeps_the_sse_framing() {
        let r = encoder().encode(
            Bytes::from(chunk("{\"type\":\n\"ping\",\r\"a\":\r\n1}")),
            None,
        );
        assert_eq!(
            String::from_utf8(r.out.unwrap().to_vec()).unwrap(),
            "event: ping\ndata: {\"type\":\ndata: \"ping\",\ndata: \"a\":\ndata: 1}\n\n"
        );
    }

    #[test]
    fn a_stream_closed_before_message_stop_ends_with_an_error_event() {
        let mut e = encoder();
        let start = chunk(r#"{"type":"message_start","message":{}}"#);
        assert!(e.encode(Bytes::from(start), None).out.is_some());
        let end = String::from_utf8(e.end().unwrap().to_vec()).unwrap();
        assert!(
            end.starts_with("event: error\n") && end.contains("api_error"),
            "{end}"
        );
        // Half a frame left over is a cut too, even after message_stop.
        let mut e = encoder();
        let mut bytes = chunk(r#"{"type":"message_stop"}"#);
        bytes.extend(&chunk(r#"{"type":"ping"}"#)[..5]);
        e.encode(Bytes::from(bytes), None);
        assert!(e.end().is_some());
        let mut e = encoder();
        e.encode(Bytes::from(chunk(r#"{"type":"message_stop"}"#)), None);
        assert_eq!(e.end(), None, "a whole answer ends quietly");
    }
}
