//! Fuzzes `UsageMeter`: any response (op, status, headers, body) cut into any chunks.
//!
//! Every input is metered in one chunk, in the fuzzed chunking and byte by byte; the three
//! results must be equal (chunk-boundary bugs) and agree with what is known independently:
//! - a refused or unmeterable response (non-200, CountTokens, a stream op without an
//!   event-stream content type) reads nothing and is complete exactly when the body ended;
//! - InvokeModel: usage equals the plain-digit token-count headers, whatever the body;
//! - Converse: a body that is a JSON object, re-serialised compactly and pretty-printed, gives the
//!   `usage` that serde_json sees;
//! - event streams: the result does not depend on `ended`, and when the body was built from
//!   well-formed frames (framed mode), equals a model that decodes the frames in one go
//!   (unless an event is JSON that a `serde_json::Value` refuses, which the model leaves open:
//!   see `parse_event`).
//!
//! Input layout (missing bytes read as 0; see README.md):
//! `op, status, content-type, flags, 4 x token header, plan length, plan..., body`.
//! flags: bit 0 `ended`, bit 1 framed mode (the body is a list of records encoded as valid
//! event-stream frames, so mutations get past the CRCs), bit 2 chunk sizes x16.

#![no_main]

use std::sync::OnceLock;

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bedrock_gate::domain::{RuntimeOp, Usage};
use bedrock_gate::meter::usage::{MAX_USAGE_CAPTURE, Metered, UsageMeter};
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

const OPS: [RuntimeOp; 5] = [
    RuntimeOp::Invoke,
    RuntimeOp::InvokeStream,
    RuntimeOp::Converse,
    RuntimeOp::ConverseStream,
    RuntimeOp::CountTokens,
];

/// Statuses other than 200 (selected when the status byte is >= 0xC0).
const OTHER_STATUSES: [u16; 16] = [
    0,
    100,
    199,
    201,
    204,
    206,
    299,
    304,
    400,
    403,
    404,
    429,
    500,
    503,
    999,
    u16::MAX,
];

/// Content types, with whether the meter must treat each as an event stream.
const CONTENT_TYPES: [(Option<&str>, bool); 7] = [
    (Some("application/vnd.amazon.eventstream"), true),
    (Some("APPLICATION/VND.AMAZON.EVENTSTREAM"), true),
    (
        Some("application/vnd.amazon.eventstream; charset=binary"),
        true,
    ),
    (Some("application/json"), false),
    (None, false),
    (Some("application/vnd.amazon.eventstrea"), false),
    (Some(" application/vnd.amazon.eventstream"), false),
];

const TOKEN_HEADERS: [&str; 4] = [
    "x-amzn-bedrock-input-token-count",
    "x-amzn-bedrock-output-token-count",
    "x-amzn-bedrock-cache-read-input-token-count",
    "x-amzn-bedrock-cache-write-input-token-count",
];

const EXCEPTION_TYPES: [&str; 3] = [
    "throttlingException",
    "modelStreamErrorException",
    "internalServerException",
];

/// Event types neither dialect reads.
const OTHER_EVENTS: [&str; 4] = [
    "messageStart",
    "contentBlockDelta",
    "messageStop",
    "contentBlockStop",
];

/// The meter's base64 engine (lenient padding), so the model decodes exactly what it decodes.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Reads the input front to back; past the end every byte is 0 and every slice empty.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        first
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(self.0.len())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Reader(data);
    let op = OPS[usize::from(input.byte()) % OPS.len()];
    let status = match input.byte() {
        b if b < 0xC0 => 200,
        b => OTHER_STATUSES[usize::from(b) % OTHER_STATUSES.len()],
    };
    let (content_type, is_event_stream) =
        CONTENT_TYPES[usize::from(input.byte()) % CONTENT_TYPES.len()];
    let flags = input.byte();
    let ended = flags & 1 != 0;
    let framed = flags & 2 != 0;
    let scale = if flags & 4 != 0 { 16 } else { 1 };

    let mut headers = HeaderMap::new();
    if let Some(ct) = content_type {
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(ct),
        );
    }
    // Per token header: a length byte (>= 0x80: absent) and up to 24 bytes of value.
    let mut header_values: [Option<&[u8]>; 4] = [None; 4];
    for (name, slot) in TOKEN_HEADERS.iter().zip(&mut header_values) {
        let len = input.byte();
        if len >= 0x80 {
            continue;
        }
        let raw = input.take(usize::from(len % 25));
        if let Ok(value) = http::HeaderValue::from_bytes(raw) {
            headers.insert(*name, value);
            *slot = Some(raw);
        }
    }

    let plan_len = usize::from(input.byte() % 17);
    let plan: Vec<usize> = input
        .take(plan_len)
        .iter()
        .map(|&s| usize::from(s) * scale)
        .collect();

    let (body, frames) = if framed {
        build_frames(input.rest())
    } else {
        (input.rest().to_vec(), None)
    };

    let whole = meter(op, status, &headers, &[&body], ended);
    let chunked = meter(op, status, &headers, &plan_chunks(&body, &plan), ended);
    assert_eq!(whole, chunked, "one chunk vs chunking {plan:?}");
    let bytewise: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(
        whole,
        meter(op, status, &headers, &bytewise, ended),
        "one chunk vs byte by byte"
    );

    if show() {
        eprintln!("{op:?} {status} framed={framed} ended={ended} plan={plan:?} -> {whole:?}");
    }
    if !whole.found {
        assert_eq!(
            whole.usage,
            Usage::default(),
            "usage without anything found"
        );
    }
    if whole.complete {
        assert!(whole.exception.is_none(), "complete despite an exception");
    }

    let stream_op = matches!(op, RuntimeOp::InvokeStream | RuntimeOp::ConverseStream);
    let inert = status != 200 || op == RuntimeOp::CountTokens || (stream_op && !is_event_stream);
    if inert {
        let nothing = Metered {
            usage: Usage::default(),
            complete: ended,
            found: false,
            exception: None,
        };
        assert_eq!(whole, nothing, "an unmetered response read something");
        return;
    }
    match op {
        RuntimeOp::Invoke => check_invoke_headers(&whole, &header_values, ended),
        RuntimeOp::Converse => check_converse_json(&whole, &headers, &body, &plan, ended),
        RuntimeOp::InvokeStream | RuntimeOp::ConverseStream => {
            assert_eq!(
                whole,
                meter(op, status, &headers, &plan_chunks(&body, &plan), !ended),
                "a stream's result depends on how the body ended"
            );
            if let Some(expected) = frames.and_then(|frames| model_stream(op, &frames)) {
                assert_eq!(whole, expected, "frames decoded differently");
            }
        }
        RuntimeOp::CountTokens => {}
    }
});

/// `FUZZ_SHOW=1`: print what the meter made of each input (to check seeds or a crash input).
fn show() -> bool {
    static SHOW: OnceLock<bool> = OnceLock::new();
    *SHOW.get_or_init(|| std::env::var_os("FUZZ_SHOW").is_some())
}

fn meter(
    op: RuntimeOp,
    status: u16,
    headers: &HeaderMap,
    pieces: &[&[u8]],
    ended: bool,
) -> Metered {
    let mut meter = UsageMeter::new(op, status, headers);
    for piece in pieces {
        meter.feed(piece);
    }
    // An empty chunk after the data must change nothing.
    meter.feed(&[]);
    meter.finish(ended)
}

/// Cuts `body` by cycling through `plan` (0 = an empty chunk); bounded so a plan of zeros
/// cannot spin, with whatever is left as one last chunk.
fn plan_chunks<'b>(body: &'b [u8], plan: &[usize]) -> Vec<&'b [u8]> {
    let mut pieces = Vec::new();
    let mut rest = body;
    let limit = 2 * body.len() + 16;
    for &size in plan.iter().cycle() {
        if rest.is_empty() || pieces.len() >= limit {
            break;
        }
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces.push(rest);
    pieces
}

/// Token counts by field (input, output, cache read, cache write); `None` = not reported.
type Tally = [Option<u64>; 4];

fn overlay(old: Tally, new: Tally) -> Tally {
    let mut out = old;
    for (slot, value) in out.iter_mut().zip(new) {
        if value.is_some() {
            *slot = value;
        }
    }
    out
}

fn tally_of(value: Option<&Value>, names: [&str; 4]) -> Tally {
    let obj = value.and_then(Value::as_object);
    names.map(|name| obj.and_then(|o| o.get(name)).and_then(Value::as_u64))
}

fn usage_of(t: Tally) -> Usage {
    let [input, output, read, write] = t.map(|v| v.unwrap_or(0));
    Usage {
        input_tokens: input,
        output_tokens: output,
        cache_read_tokens: read,
        cache_write_tokens: write,
    }
}

const CONVERSE_NAMES: [&str; 4] = [
    "inputTokens",
    "outputTokens",
    "cacheReadInputTokens",
    "cacheWriteInputTokens",
];

/// InvokeModel reads only the headers. A value of plain digits must be read as that number, a
/// value without any digit as nothing; anything in between is not pinned down here.
fn check_invoke_headers(got: &Metered, values: &[Option<&[u8]>; 4], ended: bool) {
    let got_fields = [
        got.usage.input_tokens,
        got.usage.output_tokens,
        got.usage.cache_read_tokens,
        got.usage.cache_write_tokens,
    ];
    let mut all_known = true;
    let mut any = false;
    for (value, got_field) in values.iter().zip(got_fields) {
        let expected = match value {
            None => Some(None),
            Some(v) if !v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit) => {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(Some)
            }
            Some(v) if !v.iter().any(u8::is_ascii_digit) => Some(None),
            Some(_) => None,
        };
        match expected {
            Some(e) => {
                assert_eq!(got_field, e.unwrap_or(0), "token header {value:?}");
                any |= e.is_some();
            }
            None => all_known = false,
        }
    }
    if all_known {
        assert_eq!(got.found, any, "found vs headers");
    }
    assert_eq!(got.complete, ended && got.found);
    assert!(got.exception.is_none());
}

/// A Converse body that serde_json reads as an object, written back out canonically (no
/// escaped keys, no duplicates) and pretty-printed, must meter as serde_json's `usage`.
fn check_converse_json(
    got: &Metered,
    headers: &HeaderMap,
    body: &[u8],
    plan: &[usize],
    ended: bool,
) {
    assert_eq!(got.complete, ended && got.found);
    assert!(got.exception.is_none());
    if body.len() > MAX_USAGE_CAPTURE / 8 {
        return;
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let tally = tally_of(obj.get("usage"), CONVERSE_NAMES);
    let found = tally.iter().any(Option::is_some);
    let expected = Metered {
        usage: usage_of(tally),
        complete: ended && found,
        found,
        exception: None,
    };
    let value = Value::Object(obj);
    for text in [
        serde_json::to_vec(&value),
        serde_json::to_vec_pretty(&value),
    ]
    .into_iter()
    .flatten()
    {
        let got = meter(
            RuntimeOp::Converse,
            200,
            headers,
            &plan_chunks(&text, plan),
            ended,
        );
        assert_eq!(
            got,
            expected,
            "canonical body {}",
            String::from_utf8_lossy(&text)
        );
    }
}

/// One record of framed mode, as the model needs it.
enum Frame {
    /// `:message-type` = event with this `:event-type`.
    Event {
        event_type: &'static str,
        payload: Vec<u8>,
    },
    /// An exception or error frame, with the type the meter must report.
    Failure(String),
    /// A frame the meter must ignore (no headers, odd header types, unknown message type).
    Ignored,
}

/// Framed mode: the body is records `[kind][len: u16 BE][data]`, each encoded as one valid
/// event-stream frame (kind 7: `data` verbatim, which voids the model). Returns the bytes, and
/// the frames when every record became a frame.
fn build_frames(records: &[u8]) -> (Vec<u8>, Option<Vec<Frame>>) {
    let mut input = Reader(records);
    let mut body = Vec::new();
    let mut frames = Some(Vec::new());
    while !input.0.is_empty() {
        let kind = input.byte();
        let len = usize::from(u16::from_be_bytes([input.byte(), input.byte()]));
        let data = input.take(len);
        let variant = usize::from(kind / 8);
        let (headers, payload, frame): (Vec<(&str, HeaderValue)>, Vec<u8>, Frame) = match kind % 8 {
            0 | 1 => {
                // 0 wraps `data` as Bedrock does, 1 sends `data` as the wrapper itself.
                let payload = if kind % 8 == 0 {
                    let mut wrapper = serde_json::json!({ "bytes": STANDARD.encode(data) });
                    if variant % 2 == 1 {
                        wrapper["p"] = Value::from("abcdefghijklmnopqrstuvwxyz");
                    }
                    wrapper.to_string().into_bytes()
                } else {
                    data.to_vec()
                };
                (
                    event_headers("chunk"),
                    payload.clone(),
                    Frame::Event {
                        event_type: "chunk",
                        payload,
                    },
                )
            }
            2 => (
                event_headers("metadata"),
                data.to_vec(),
                Frame::Event {
                    event_type: "metadata",
                    payload: data.to_vec(),
                },
            ),
            3 => {
                let mut h = vec![(":message-type", string("exception"))];
                let kind = if variant % 4 == 3 {
                    "exception"
                } else {
                    let k = EXCEPTION_TYPES[variant % EXCEPTION_TYPES.len()];
                    h.push((":exception-type", string(k)));
                    k
                };
                (h, data.to_vec(), Frame::Failure(kind.to_owned()))
            }
            4 => {
                let mut h = vec![(":message-type", string("error"))];
                let code = if variant % 2 == 1 {
                    "error"
                } else {
                    h.push((":error-code", string("InternalFailure")));
                    "InternalFailure"
                };
                (h, data.to_vec(), Frame::Failure(code.to_owned()))
            }
            5 => (
                event_headers(OTHER_EVENTS[variant % OTHER_EVENTS.len()]),
                data.to_vec(),
                Frame::Ignored,
            ),
            6 => {
                let h = match variant % 3 {
                    0 => Vec::new(),
                    1 => vec![
                        (":message-type", HeaderValue::Int32(1)),
                        (":event-type", string("metadata")),
                    ],
                    _ => vec![
                        (":message-type", string("eventual")),
                        (":event-type", string("chunk")),
                    ],
                };
                (h, data.to_vec(), Frame::Ignored)
            }
            _ => {
                body.extend_from_slice(data);
                frames = None;
                continue;
            }
        };
        let mut message = Message::new(payload);
        for (name, value) in headers {
            message = message.add_header(Header::new(name, value));
        }
        if write_message_to(&message, &mut body).is_err() {
            return (body, None);
        }
        if let Some(f) = frames.as_mut() {
            f.push(frame);
        }
    }
    (body, frames)
}

fn string(s: &'static str) -> HeaderValue {
    HeaderValue::String(s.into())
}

fn event_headers(event_type: &'static str) -> Vec<(&'static str, HeaderValue)> {
    vec![
        (":event-type", string(event_type)),
        (":content-type", string("application/json")),
        (":message-type", string("event")),
    ]
}

#[derive(Deserialize)]
struct ChunkPayload {
    bytes: String,
}

/// An event's JSON as the model reads it: `Ok(Some)` for an object, `Ok(None)` for anything
/// the meter must ignore, `Err(())` for JSON that is well-formed but that a `Value` refuses
/// (invalid UTF-8 in a string, a number beyond f64, nesting past 128). The meter builds only
/// the fields it reads and skips the others unchecked, so it counts such an event when the
/// odd part is elsewhere; the model does not try to say which, and leaves the result open.
fn parse_event(json: &[u8]) -> Result<Option<serde_json::Map<String, Value>>, ()> {
    match serde_json::from_slice::<Value>(json) {
        Ok(Value::Object(event)) => Ok(Some(event)),
        Ok(_) => Ok(None),
        Err(_) if serde_json::from_slice::<IgnoredAny>(json).is_ok() => Err(()),
        Err(_) => Ok(None),
    }
}

/// What the meter must report for a stream of well-formed frames, decoded all at once; `None`
/// when an event is one [`parse_event`] leaves open.
fn model_stream(op: RuntimeOp, frames: &[Frame]) -> Option<Metered> {
    let mut events: Tally = [None; 4];
    let mut metrics: Tally = [None; 4];
    let mut terminal = false;
    let mut exception = None;
    for frame in frames {
        let (event_type, payload) = match frame {
            Frame::Event {
                event_type,
                payload,
            } => (*event_type, payload),
            Frame::Failure(kind) => {
                exception = Some(kind.clone());
                continue;
            }
            Frame::Ignored => continue,
        };
        match (op, event_type) {
            (RuntimeOp::InvokeStream, "chunk") => {
                let Some(decoded) = serde_json::from_slice::<ChunkPayload>(payload)
                    .ok()
                    .and_then(|c| LENIENT.decode(c.bytes.as_bytes()).ok())
                else {
                    continue;
                };
                let Some(event) = parse_event(&decoded).ok()? else {
                    continue;
                };
                let names = [
                    "input_tokens",
                    "output_tokens",
                    "cache_read_input_tokens",
                    "cache_creation_input_tokens",
                ];
                match event.get("type").and_then(Value::as_str) {
                    Some("message_start") => {
                        let usage = event.get("message").and_then(|m| m.get("usage"));
                        if usage.is_some_and(Value::is_object) {
                            events = overlay(events, tally_of(usage, names));
                        }
                    }
                    Some("message_delta") => {
                        let usage = event.get("usage");
                        if usage.is_some_and(Value::is_object) {
                            events = overlay(events, tally_of(usage, names));
                        }
                    }
                    Some("message_stop") => terminal = true,
                    _ => {}
                }
                let m = event.get("amazon-bedrock-invocationMetrics");
                if m.is_some_and(Value::is_object) {
                    let names = [
                        "inputTokenCount",
                        "outputTokenCount",
                        "cacheReadInputTokenCount",
                        "cacheWriteInputTokenCount",
                    ];
                    metrics = overlay(metrics, tally_of(m, names));
                    terminal = true;
                }
            }
            (RuntimeOp::ConverseStream, "metadata") => {
                let Some(metadata) = parse_event(payload).ok()? else {
                    continue;
                };
                if let Some(usage) = metadata.get("usage") {
                    events = overlay(events, tally_of(Some(usage), CONVERSE_NAMES));
                }
                terminal = true;
            }
            _ => {}
        }
    }
    let tally = overlay(events, metrics);
    Some(Metered {
        usage: usage_of(tally),
        complete: terminal && exception.is_none(),
        found: tally.iter().any(Option::is_some),
        exception,
    })
}
