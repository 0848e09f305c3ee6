//! The event-stream half of the meter: frames are decoded inline with
//! `aws-smithy-eventstream` as chunks pass, keeping only the bytes of the one frame not yet
//! complete.
//!
//! It never buffers more than [`MAX_FRAME_LEN`]; a longer declared frame or any decode error
//! stops metering for the response instead of resynchronising on a guess.

use std::borrow::Cow;
use std::fmt;

use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use aws_smithy_types::event_stream::Message;
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Buf;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::{MAX_FRAME_LEN, Metered, Tally};

/// Bedrock pads `bytes` correctly, but being lenient costs nothing and loses no usage.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A partial-frame buffer that grew past this is released once the frame is done, so one large
/// frame does not pin its memory for the rest of a long stream.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Which operation's events the stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dialect {
    /// InvokeModelWithResponseStream: `chunk` events wrapping provider JSON in base64.
    InvokeModel,
    /// ConverseStream: typed events, usage in `metadata`.
    Converse,
}

/// The payload of an InvokeModelWithResponseStream `chunk` event; the `p` padding and anything
/// else is ignored.
#[derive(Deserialize)]
struct ChunkPayload<'a> {
    /// Borrowed from the payload: base64 has nothing JSON must escape.
    #[serde(borrow)]
    bytes: Cow<'a, str>,
}

/// The fields of a provider event (or of Anthropic's `message`) the meter reads, each left
/// unparsed until it is needed. Every other field is skipped without being built: most events
/// are text deltas, and none of their fields matter here. Nor is it checked beyond JSON's
/// syntax (serde_json skips a string's UTF-8, a number's range and nesting depth unread), so
/// an event whose only odd part is a field the meter does not read is counted, as Bedrock
/// bills it; the fields it reads must be well-formed. A repeated key keeps its last value,
/// as a `serde_json::Value` would, and a field of an unexpected shape reads as absent when it
/// is parsed, so one odd field never discards the others.
#[derive(Default)]
struct EventFields<'a> {
    kind: Option<&'a RawValue>,
    message: Option<&'a RawValue>,
    usage: Option<&'a RawValue>,
    invocation_metrics: Option<&'a RawValue>,
}

impl<'a> EventFields<'a> {
    /// `None` unless `json` is one JSON object.
    fn read(json: &'a [u8]) -> Option<EventFields<'a>> {
        serde_json::from_slice(json).ok()
    }

    fn kind(&self) -> Option<Cow<'a, str>> {
        #[derive(Deserialize)]
        #[serde(transparent)]
        struct Str<'a>(#[serde(borrow)] Cow<'a, str>);
        let raw = self.kind?;
        serde_json::from_str::<Str>(raw.get()).ok().map(|s| s.0)
    }
}

/// `raw` as a JSON object, or `None` for any other value.
fn object(raw: Option<&RawValue>) -> Option<Map<String, Value>> {
    serde_json::from_str(raw?.get()).ok()
}

impl<'de> Deserialize<'de> for EventFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        enum Key {
            Kind,
            Message,
            Usage,
            InvocationMetrics,
            Other,
        }
        impl<'de> Deserialize<'de> for Key {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct KeyVisitor;
                impl Visitor<'_> for KeyVisitor {
                    type Value = Key;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                        Ok(match key {
                            "type" => Key::Kind,
                            "message" => Key::Message,
                            "usage" => Key::Usage,
                            "amazon-bedrock-invocationMetrics" => Key::InvocationMetrics,
                            _ => Key::Other,
                        })
                    }
                }
                deserializer.deserialize_identifier(KeyVisitor)
            }
        }
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = EventFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = EventFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    let slot = match key {
                        Key::Kind => &mut fields.kind,
                        Key::Message => &mut fields.message,
                        Key::Usage => &mut fields.usage,
                        Key::InvocationMetrics => &mut fields.invocation_metrics,
                        Key::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[derive(Debug)]
pub(super) struct EventStreamMeter {
    dialect: Dialect,
    decoder: MessageFrameDecoder,
    /// Bytes of the frame being assembled that the decoder has not taken yet.
    pending: Vec<u8>,
    /// Declared total length of that frame, once its first four bytes have arrived.
    frame_len: Option<usize>,
    /// Metering gave up on this response (oversized frame or decode error).
    stopped: bool,
    /// The operation's terminal event was seen.
    terminal: bool,
    /// Usage from the provider's own events (Anthropic `message_*`, Converse `metadata`).
    events: Tally,
    /// Usage from `amazon-bedrock-invocationMetrics`, which overrides `events` field by field.
    metrics: Tally,
    exception: Option<String>,
}

impl EventStreamMeter {
    pub(super) fn new(dialect: Dialect) -> Self {
        EventStreamMeter {
            dialect,
            decoder: MessageFrameDecoder::new(),
            pending: Vec::new(),
            frame_len: None,
            stopped: false,
            terminal: false,
            events: Tally::default(),
            metrics: Tally::default(),
            exception: None,
        }
    }

    pub(super) fn feed(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        while !self.stopped {
            if self.frame_len.is_none() {
                match declared_len(&self.pending, rest) {
                    None => {
                        self.pending.extend_from_slice(rest);
                        return;
                    }
                    Some(len) if len > MAX_FRAME_LEN => {
                        self.stop();
                        return;
                    }
                    Some(len) => self.frame_len = Some(len),
                }
            }

            let held = self.pending.len();
            let (decoded, held_left, unread) = {
                let mut buf = self.pending.as_slice().chain(rest);
                let decoded = self.decoder.decode_frame(&mut buf);
                let (held_rest, unread) = buf.into_inner();
                (decoded, held_rest.len(), unread)
            };
            self.pending.drain(..held - held_left);
            rest = unread;

            match decoded {
                Ok(DecodedFrame::Incomplete) => {
                    // Everything left belongs to the unfinished frame, which is at most
                    // `frame_len` long.
                    self.pending.extend_from_slice(rest);
                    return;
                }
                Ok(DecodedFrame::Complete(message)) => {
                    self.frame_len = None;
                    if self.pending.is_empty() && self.pending.capacity() > KEEP_CAPACITY {
                        self.pending = Vec::new();
                    }
                    self.on_message(&message);
                }
                Err(_) => self.stop(),
            }
        }
    }

    pub(super) fn finish(self) -> Metered {
        let tally = self.events.overlaid_with(self.metrics);
        Metered {
            usage: tally.usage(),
            complete: self.terminal && !self.stopped && self.exception.is_none(),
            found: tally.found(),
            exception: self.exception,
        }
    }

    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.pending.len()
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.pending = Vec::new();
    }

    pub(super) fn on_message(&mut self, message: &Message) {
        match header_str(message, ":message-type") {
            Some("event") => {}
            Some("exception") => {
                let kind = header_str(message, ":exception-type").unwrap_or("exception");
                self.exception = Some(kind.to_owned());
                return;
            }
            // The event-stream spec's other failure shape; Bedrock uses `exception`, but an
            // `error` frame ends the stream just the same.
            Some("error") => {
                let kind = header_str(message, ":error-code").unwrap_or("error");
                self.exception = Some(kind.to_owned());
                return;
            }
            _ => return,
        }
        match (self.dialect, header_str(message, ":event-type")) {
            (Dialect::InvokeModel, Some("chunk")) => self.on_invoke_chunk(message.payload()),
            (Dialect::Converse, Some("metadata")) => self.on_converse_metadata(message.payload()),
            _ => {}
        }
    }

    fn on_invoke_chunk(&mut self, payload: &[u8]) {
        if let Some(event) = chunk_bytes(payload) {
            self.on_invoke_event(&event);
        }
    }

    /// A `chunk` event's decoded `bytes`, given by a front that decoded the message itself;
    /// ignored unless this is an InvokeModel stream, as [`EventStreamMeter::on_message`] would.
    pub(super) fn on_chunk_event(&mut self, event: &[u8]) {
        if matches!(self.dialect, Dialect::InvokeModel) {
            self.on_invoke_event(event);
        }
    }

    /// The provider event one `chunk` carried (its `bytes`, decoded).
    fn on_invoke_event(&mut self, event: &[u8]) {
        let Some(event) = EventFields::read(event) else {
            return;
        };
        let anthropic = |usage: Option<&RawValue>| {
            object(usage).map(|u| {
                Tally::from_object(
                    &u,
                    [
                        "input_tokens",
                        "output_tokens",
                        "cache_read_input_tokens",
                        "cache_creation_input_tokens",
                    ],
                )
            })
        };
        let from_event = match event.kind().as_deref() {
            Some("message_start") => anthropic(
                event
                    .message
                    .and_then(|m| EventFields::read(m.get().as_bytes()))
                    .and_then(|m| m.usage),
            ),
            // Counts here are cumulative, so the latest simply replaces what came before.
            Some("message_delta") => anthropic(event.usage),
            Some("message_stop") => {
                self.terminal = true;
                None
            }
            _ => None,
        };
        if let Some(tally) = from_event {
            self.events = self.events.overlaid_with(tally);
        }
        // Bedrock adds this to the last chunk of every provider's stream; it is what Bedrock
        // bills, so it wins over the provider's own figures.
        if let Some(metrics) = object(event.invocation_metrics) {
            let tally = Tally::from_object(
                &metrics,
                [
                    "inputTokenCount",
                    "outputTokenCount",
                    "cacheReadInputTokenCount",
                    "cacheWriteInputTokenCount",
                ],
            );
            self.metrics = self.metrics.overlaid_with(tally);
            self.terminal = true;
        }
    }

    fn on_converse_metadata(&mut self, payload: &[u8]) {
        let Some(metadata) = EventFields::read(payload) else {
            return;
        };
        if let Some(usage) = metadata.usage {
            let usage = serde_json::from_str(usage.get()).unwrap_or(Value::Null);
            self.events = self
                .events
                .overlaid_with(Tally::from_converse_usage(&usage));
        }
        self.terminal = true;
    }
}

/// The big-endian total length that starts every frame, read across the held bytes and the new
/// chunk without copying either.
fn declared_len(held: &[u8], rest: &[u8]) -> Option<usize> {
    let mut bytes = held.iter().chain(rest).copied();
    let mut word = [0u8; 4];
    for slot in &mut word {
        *slot = bytes.next()?;
    }
    Some(usize::try_from(u32::from_be_bytes(word)).unwrap_or(usize::MAX))
}

/// The provider event a `chunk` frame's payload (`{"bytes": base64, "p": padding}`) carries.
pub fn chunk_bytes(payload: &[u8]) -> Option<Vec<u8>> {
    let chunk = serde_json::from_slice::<ChunkPayload>(payload).ok()?;
    BASE64.decode(chunk.bytes.as_bytes()).ok()
}

/// The string value of an event-stream header (`:message-type`, `:event-type`, …).
pub fn header_str<'m>(message: &'m Message, name: &str) -> Option<&'m str> {
    message
        .headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| h.value().as_string().ok())
        .map(|s| s.as_str())
}
