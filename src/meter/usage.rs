//! Exact token usage of one Bedrock Runtime response, read alongside the body as it streams to
//! the client.
//!
//! This module owns the per-operation rules for where usage lives: the token-count headers of
//! InvokeModel, the top-level `usage` object of a Converse body, the Anthropic events and
//! `amazon-bedrock-invocationMetrics` of InvokeModelWithResponseStream, and the `metadata` event
//! of ConverseStream.
//!
//! It must never hold bytes back from the client, fail, or panic, whatever upstream sends, and it
//! must never buffer a whole response: it keeps at most one partial event-stream frame
//! ([`MAX_FRAME_LEN`]) or one captured `usage` value ([`MAX_USAGE_CAPTURE`]). When it cannot
//! follow a response it stops metering that response and says so (`complete = false`) rather
//! than guessing.

mod scan;
mod stream;
#[cfg(test)]
mod tests;

use std::fmt;

use aws_smithy_types::event_stream::Message;
use http::HeaderMap;
use serde_json::{Map, Value};

use self::scan::TopLevelValue;
use self::stream::{Dialect, EventStreamMeter};
pub use self::stream::{chunk_bytes, header_str};
use crate::domain::RuntimeOp;
use crate::domain::Usage;

/// Largest event-stream frame the meter will wait for; a longer declared length stops metering.
/// Bedrock's frames are a few KiB, so this only bounds memory against a broken upstream.
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// Largest Converse `usage` value captured; a real one is under 200 bytes.
pub const MAX_USAGE_CAPTURE: usize = 64 * 1024;

const EVENT_STREAM_CONTENT_TYPE: &[u8] = b"application/vnd.amazon.eventstream";

const INPUT_TOKENS_HEADER: &str = "x-amzn-bedrock-input-token-count";
const OUTPUT_TOKENS_HEADER: &str = "x-amzn-bedrock-output-token-count";
const CACHE_READ_HEADER: &str = "x-amzn-bedrock-cache-read-input-token-count";
const CACHE_WRITE_HEADER: &str = "x-amzn-bedrock-cache-write-input-token-count";

/// What the meter learned about one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    pub usage: Usage,
    /// The response reached its natural end (stream: the terminal event was seen —
    /// message_stop / invocation metrics for InvokeModelWithResponseStream, `metadata` for
    /// ConverseStream; non-stream: body ended and usage was found or the op has none).
    pub complete: bool,
    /// Whether any usage information was found at all.
    pub found: bool,
    /// Type of a mid-stream exception frame (`:exception-type` header), if one arrived.
    pub exception: Option<String>,
}

/// Usage fields as seen so far; `None` means "not reported", which differs from a reported zero
/// when one source overrides another.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_write: Option<u64>,
}

impl Tally {
    fn found(&self) -> bool {
        self.input.is_some()
            || self.output.is_some()
            || self.cache_read.is_some()
            || self.cache_write.is_some()
    }

    /// Fields reported in `newer` win; the rest keep their earlier value.
    fn overlaid_with(self, newer: Tally) -> Tally {
        Tally {
            input: newer.input.or(self.input),
            output: newer.output.or(self.output),
            cache_read: newer.cache_read.or(self.cache_read),
            cache_write: newer.cache_write.or(self.cache_write),
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input.unwrap_or(0),
            output_tokens: self.output.unwrap_or(0),
            cache_read_tokens: self.cache_read.unwrap_or(0),
            cache_write_tokens: self.cache_write.unwrap_or(0),
        }
    }

    /// Reads the four fields from a JSON object under the given names
    /// (input, output, cache read, cache write). Anything that is not a non-negative integer is
    /// treated as not reported, so one odd field does not discard the others.
    fn from_object(obj: &Map<String, Value>, names: [&str; 4]) -> Tally {
        let field = |name: &str| obj.get(name).and_then(Value::as_u64);
        Tally {
            input: field(names[0]),
            output: field(names[1]),
            cache_read: field(names[2]),
            cache_write: field(names[3]),
        }
    }

    /// Converse and ConverseStream spell usage the same way.
    fn from_converse_usage(value: &Value) -> Tally {
        value.as_object().map_or_else(Tally::default, |obj| {
            Tally::from_object(
                obj,
                [
                    "inputTokens",
                    "outputTokens",
                    "cacheReadInputTokens",
                    "cacheWriteInputTokens",
                ],
            )
        })
    }
}

/// Meters one upstream response. Feed it every body chunk as it passes, then [`finish`].
///
/// [`finish`]: UsageMeter::finish
pub struct UsageMeter {
    op: RuntimeOp,
    mode: Mode,
}

enum Mode {
    /// Nothing to read: an error status, CountTokens, or a stream op answered with something
    /// other than an event stream (Bedrock sends some errors as a 200 JSON body).
    Inert,
    /// InvokeModel: everything is in the headers, known before the body.
    Headers(Tally),
    /// Converse: the top-level `usage` value of the JSON body.
    Json { scan: TopLevelValue, tally: Tally },
    /// InvokeModelWithResponseStream and ConverseStream.
    Stream(Box<EventStreamMeter>),
}

impl UsageMeter {
    /// `status` and `headers` are the upstream response's. Only a 200 whose content-type starts
    /// with `application/vnd.amazon.eventstream` is ever fed to the event-stream decoder; a 200
    /// with a JSON body on a stream op (Bedrock does that for errors) is not.
    pub fn new(op: RuntimeOp, status: u16, headers: &HeaderMap) -> UsageMeter {
        let mode = if status != 200 {
            Mode::Inert
        } else {
            match op {
                RuntimeOp::Invoke => Mode::Headers(header_tally(headers)),
                RuntimeOp::Converse => Mode::Json {
                    scan: TopLevelValue::new(b"usage", MAX_USAGE_CAPTURE),
                    tally: Tally::default(),
                },
                RuntimeOp::InvokeStream | RuntimeOp::ConverseStream if is_event_stream(headers) => {
                    let dialect = if op == RuntimeOp::InvokeStream {
                        Dialect::InvokeModel
                    } else {
                        Dialect::Converse
                    };
                    Mode::Stream(Box::new(EventStreamMeter::new(dialect)))
                }
                RuntimeOp::InvokeStream | RuntimeOp::ConverseStream | RuntimeOp::CountTokens => {
                    Mode::Inert
                }
            }
        };
        UsageMeter { op, mode }
    }

    /// The operation this meter reads.
    pub fn op(&self) -> RuntimeOp {
        self.op
    }

    /// One body data chunk, as it passed to the client. Never fails, never panics.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Inert | Mode::Headers(_) => {}
            Mode::Json { scan, tally } => scan.feed(chunk, |raw| {
                // A value that is not JSON leaves the previous reading in place.
                if let Ok(value) = serde_json::from_slice::<Value>(raw) {
                    let read = Tally::from_converse_usage(&value);
                    if read.found() {
                        *tally = read;
                    }
                }
            }),
            Mode::Stream(meter) => meter.feed(chunk),
        }
    }

    /// One event-stream message, for a front that decodes the stream itself (the SSE
    /// re-encoder of the Messages front) instead of passing bytes through [`UsageMeter::feed`].
    /// Counts exactly as the same message would if fed as bytes.
    pub fn observe(&mut self, message: &Message) {
        if let Mode::Stream(meter) = &mut self.mode {
            meter.on_message(message);
        }
    }

    /// The provider event one InvokeModelWithResponseStream `chunk` message carried (its
    /// `bytes`, decoded by [`chunk_bytes`]), for a front that has decoded it already: counts
    /// exactly as [`UsageMeter::observe`] of that message would, without decoding it again.
    pub fn observe_chunk(&mut self, event: &[u8]) {
        if let Mode::Stream(meter) = &mut self.mode {
            meter.on_chunk_event(event);
        }
    }

    /// Call when the body ended normally (`ended = true`) or was cut (client went away /
    /// upstream error: `ended = false`). A cut stream returns what was seen with
    /// complete = false.
    ///
    /// For the stream ops completeness is the terminal event itself: once it has been seen the
    /// totals are final, even if the connection is dropped before the body formally ends.
    pub fn finish(self, ended: bool) -> Metered {
        match self.mode {
            Mode::Inert => Metered {
                usage: Usage::default(),
                complete: ended,
                found: false,
                exception: None,
            },
            Mode::Headers(tally) | Mode::Json { tally, .. } => Metered {
                usage: tally.usage(),
                complete: ended && tally.found(),
                found: tally.found(),
                exception: None,
            },
            Mode::Stream(meter) => meter.finish(),
        }
    }

    /// Bytes held for a partial frame or a partial `usage` value; never above the caps.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        match &self.mode {
            Mode::Inert | Mode::Headers(_) => 0,
            Mode::Json { scan, .. } => scan.buffered(),
            Mode::Stream(meter) => meter.buffered(),
        }
    }
}

impl fmt::Debug for UsageMeter {
    // Hand-written so a partial frame's bytes never end up in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match &self.mode {
            Mode::Inert => "inert",
            Mode::Headers(_) => "headers",
            Mode::Json { .. } => "json",
            Mode::Stream(_) => "event-stream",
        };
        f.debug_struct("UsageMeter")
            .field("op", &self.op)
            .field("mode", &mode)
            .finish_non_exhaustive()
    }
}

/// Whether a response says it is an AWS event stream (the only bodies ever decoded as one).
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().get(..EVENT_STREAM_CONTENT_TYPE.len()))
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(EVENT_STREAM_CONTENT_TYPE))
}

fn header_tally(headers: &HeaderMap) -> Tally {
    let count = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    Tally {
        input: count(INPUT_TOKENS_HEADER),
        output: count(OUTPUT_TOKENS_HEADER),
        cache_read: count(CACHE_READ_HEADER),
        cache_write: count(CACHE_WRITE_HEADER),
    }
}
