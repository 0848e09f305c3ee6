use aws_smithy_eventstream::frame::{write_headers_to, write_message_to};
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderMap;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

const ES: &str = "application/vnd.amazon.eventstream";

const STREAM_OPS: [RuntimeOp; 2] = [RuntimeOp::InvokeStream, RuntimeOp::ConverseStream];
const ALL_OPS: [RuntimeOp; 5] = [
    RuntimeOp::Invoke,
    RuntimeOp::InvokeStream,
    RuntimeOp::Converse,
    RuntimeOp::ConverseStream,
    RuntimeOp::CountTokens,
];

/// Text that would fool a scanner that does not track strings and escapes.
const TRICKY: &str =
    "He wrote \"usage\": {\"inputTokens\": 999}}, then \\\"}]{[ and ,\"usage\":1 \u{e9}";

fn hdrs(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in pairs {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    map
}

fn es() -> HeaderMap {
    hdrs(&[("content-type", ES)])
}

fn json_ct() -> HeaderMap {
    hdrs(&[("content-type", "application/json")])
}

fn frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut message = Message::new(payload.to_vec());
    for (name, value) in headers {
        message = message.add_header(Header::new(
            name.to_string(),
            HeaderValue::String(value.to_string().into()),
        ));
    }
    let mut out = Vec::new();
    write_message_to(&message, &mut out).unwrap();
    out
}

fn event(event_type: &str, payload: &Value) -> Vec<u8> {
    frame(
        &[
            (":event-type", event_type),
            (":content-type", "application/json"),
            (":message-type", "event"),
        ],
        payload.to_string().as_bytes(),
    )
}

/// An InvokeModelWithResponseStream `chunk` wrapping one provider event, padded like Bedrock's.
fn chunk(provider_event: &Value) -> Vec<u8> {
    event(
        "chunk",
        &json!({
            "bytes": STANDARD.encode(provider_event.to_string()),
            "p": "abcdefghijklmnopqrstuvwxyzABCDEFGH",
        }),
    )
}

fn exception(kind: &str, message: &str) -> Vec<u8> {
    frame(
        &[
            (":exception-type", kind),
            (":content-type", "application/json"),
            (":message-type", "exception"),
        ],
        json!({ "message": message }).to_string().as_bytes(),
    )
}

fn metrics(input: u64, output: u64, cache: Option<(u64, u64)>) -> Value {
    let mut m = json!({
        "inputTokenCount": input,
        "outputTokenCount": output,
        "invocationLatency": 1234,
        "firstByteLatency": 321,
    });
    if let Some((read, write)) = cache {
        m["cacheReadInputTokenCount"] = json!(read);
        m["cacheWriteInputTokenCount"] = json!(write);
    }
    m
}

/// A Claude stream: input 25, cache read 100, cache write 50, output 42 (after a delta of 17).
fn anthropic_events() -> Vec<Value> {
    vec![
        json!({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "usage": {"input_tokens": 25, "output_tokens": 1,
                      "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50}}}),
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0,
               "delta": {"type": "text_delta", "text": TRICKY}}),
        json!({"type": "message_delta", "delta": {"stop_reason": null},
               "usage": {"output_tokens": 17}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
               "usage": {"output_tokens": 42}}),
    ]
}

fn invoke_stream(last: Value) -> Vec<u8> {
    let mut body = Vec::new();
    for e in anthropic_events() {
        body.extend(chunk(&e));
    }
    body.extend(chunk(&last));
    body
}

fn claude_stream() -> Vec<u8> {
    invoke_stream(json!({
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": metrics(25, 42, Some((100, 50))),
    }))
}

fn converse_stream_events() -> Vec<Vec<u8>> {
    vec![
        event("messageStart", &json!({"p": "abcd", "role": "assistant"})),
        event(
            "contentBlockDelta",
            &json!({"contentBlockIndex": 0, "delta": {"text": TRICKY}, "p": "ab"}),
        ),
        event(
            "contentBlockStop",
            &json!({"contentBlockIndex": 0, "p": "abc"}),
        ),
        event("messageStop", &json!({"stopReason": "end_turn", "p": "a"})),
        event(
            "metadata",
            &json!({
                "metrics": {"latencyMs": 812},
                "usage": {"inputTokens": 30, "outputTokens": 7, "totalTokens": 237,
                          "cacheReadInputTokens": 120, "cacheWriteInputTokens": 80},
                "p": "abcdefgh",
            }),
        ),
    ]
}

fn converse_stream() -> Vec<u8> {
    converse_stream_events().concat()
}

const CONVERSE_USAGE: &str = r#"{"inputTokens":11,"outputTokens":22,"totalTokens":110,"cacheReadInputTokens":44,"cacheWriteInputTokens":33}"#;

fn converse_output() -> String {
    format!(
        r#"{{"message":{{"role":"assistant","content":[{{"text":{}}},{{"text":"{{\"usage\":{{\"inputTokens\":1}}}}"}}],"usage":{{"inputTokens":999,"outputTokens":999}}}}}}"#,
        serde_json::to_string(TRICKY).unwrap()
    )
}

fn converse_body_usage_last() -> Vec<u8> {
    format!(
        r#"{{"metrics":{{"latencyMs":90}},"output":{},"stopReason":"end_turn","usage":{CONVERSE_USAGE}}}"#,
        converse_output()
    )
    .into_bytes()
}

fn converse_body_usage_first() -> Vec<u8> {
    format!(
        "{{ \"usage\" : {CONVERSE_USAGE} ,\n \"output\": {},\"stopReason\":\"usage\"}}",
        converse_output()
    )
    .into_bytes()
}

fn expected_converse() -> Metered {
    Metered {
        usage: Usage {
            input_tokens: 11,
            output_tokens: 22,
            cache_read_tokens: 44,
            cache_write_tokens: 33,
        },
        complete: true,
        found: true,
        exception: None,
    }
}

fn meter_pieces<'a>(
    op: RuntimeOp,
    status: u16,
    headers: &HeaderMap,
    pieces: impl IntoIterator<Item = &'a [u8]>,
    ended: bool,
) -> Metered {
    let mut meter = UsageMeter::new(op, status, headers);
    for piece in pieces {
        meter.feed(piece);
        assert!(meter.buffered() <= MAX_FRAME_LEN);
    }
    meter.finish(ended)
}

fn meter(op: RuntimeOp, headers: &HeaderMap, body: &[u8]) -> Metered {
    meter_pieces(op, 200, headers, [body], true)
}

/// Asserts that feeding `body` whole, byte by byte and split at every index gives one result.
fn assert_split_invariant(op: RuntimeOp, headers: &HeaderMap, body: &[u8]) -> Metered {
    let whole = meter(op, headers, body);
    assert_eq!(
        meter_pieces(op, 200, headers, body.chunks(1), true),
        whole,
        "byte by byte"
    );
    for at in 0..=body.len() {
        let (a, b) = body.split_at(at);
        assert_eq!(
            meter_pieces(op, 200, headers, [a, b], true),
            whole,
            "split at {at}"
        );
    }
    whole
}

/// IEEE CRC-32, for hand-built frames whose contents the encoder would refuse to write.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A frame with valid lengths and checksums around arbitrary header and payload bytes.
fn raw_frame(headers: &[u8], payload: &[u8]) -> Vec<u8> {
    let total = u32::try_from(12 + headers.len() + payload.len() + 4).unwrap();
    let mut out = Vec::new();
    out.extend(total.to_be_bytes());
    out.extend(u32::try_from(headers.len()).unwrap().to_be_bytes());
    out.extend(crc32(&out).to_be_bytes());
    out.extend(headers);
    out.extend(payload);
    out.extend(crc32(&out).to_be_bytes());
    out
}

// ---- InvokeModel ----

#[test]
fn invoke_reads_token_count_headers_including_cache() {
    let h = hdrs(&[
        ("content-type", "application/json"),
        ("X-Amzn-Bedrock-Input-Token-Count", "12"),
        ("X-Amzn-Bedrock-Output-Token-Count", "345"),
        ("X-Amzn-Bedrock-Cache-Read-Input-Token-Count", "6789"),
        ("X-Amzn-Bedrock-Cache-Write-Input-Token-Count", " 10 "),
    ]);
    let m = meter(RuntimeOp::Invoke, &h, br#"{"usage":{"input_tokens":1}}"#);
    assert_eq!(
        m,
        Metered {
            usage: Usage {
                input_tokens: 12,
                output_tokens: 345,
                cache_read_tokens: 6789,
                cache_write_tokens: 10,
            },
            complete: true,
            found: true,
            exception: None,
        }
    );
    // Known from the headers, but the body was cut.
    let cut = meter_pieces(RuntimeOp::Invoke, 200, &h, [&b"{"[..]], false);
    assert_eq!((cut.found, cut.complete), (true, false));
}

#[test]
fn invoke_without_or_with_bad_headers_finds_nothing() {
    let m = meter(RuntimeOp::Invoke, &json_ct(), b"{}");
    assert_eq!(
        (m.found, m.complete, m.usage),
        (false, false, Usage::default())
    );

    let h = hdrs(&[
        ("x-amzn-bedrock-input-token-count", "-3"),
        ("x-amzn-bedrock-output-token-count", "lots"),
    ]);
    let m = meter(RuntimeOp::Invoke, &h, b"{}");
    assert!(!m.found);

    let h = hdrs(&[
        ("x-amzn-bedrock-input-token-count", "3"),
        ("x-amzn-bedrock-output-token-count", "4"),
    ]);
    let m = meter(RuntimeOp::Invoke, &h, b"{}");
    assert_eq!(
        (
            m.usage.input_tokens,
            m.usage.output_tokens,
            m.usage.cache_read_tokens
        ),
        (3, 4, 0)
    );
    assert!(m.complete);
}

#[test]
fn non_200_has_no_usage_and_is_never_decoded() {
    let h = hdrs(&[
        ("content-type", ES),
        ("x-amzn-bedrock-input-token-count", "3"),
        ("x-amzn-ErrorType", "ThrottlingException"),
    ]);
    for op in ALL_OPS {
        for body in [
            claude_stream(),
            converse_stream(),
            converse_body_usage_last(),
        ] {
            for ended in [true, false] {
                let m = meter_pieces(op, 429, &h, [body.as_slice()], ended);
                assert_eq!(
                    m,
                    Metered {
                        usage: Usage::default(),
                        complete: ended,
                        found: false,
                        exception: None,
                    },
                    "{op:?}"
                );
            }
        }
    }
}

#[test]
fn count_tokens_is_free() {
    let m = meter(
        RuntimeOp::CountTokens,
        &json_ct(),
        br#"{"inputTokens":1234}"#,
    );
    assert_eq!(
        m,
        Metered {
            usage: Usage::default(),
            complete: true,
            found: false,
            exception: None,
        }
    );
    let cut = meter_pieces(RuntimeOp::CountTokens, 200, &json_ct(), [], false);
    assert!(!cut.complete);
}

// ---- InvokeModelWithResponseStream ----

#[test]
fn invoke_stream_exact_totals_with_cache() {
    let m = meter(RuntimeOp::InvokeStream, &es(), &claude_stream());
    assert_eq!(
        m,
        Metered {
            usage: Usage {
                input_tokens: 25,
                output_tokens: 42,
                cache_read_tokens: 100,
                cache_write_tokens: 50,
            },
            complete: true,
            found: true,
            exception: None,
        }
    );
}

#[test]
fn invocation_metrics_override_provider_counts() {
    let body = invoke_stream(json!({
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": metrics(26, 43, Some((7, 8))),
    }));
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    assert_eq!(
        m.usage,
        Usage {
            input_tokens: 26,
            output_tokens: 43,
            cache_read_tokens: 7,
            cache_write_tokens: 8,
        }
    );
    assert!(m.complete);

    // Metrics without cache fields override only what they report.
    let body = invoke_stream(json!({
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": metrics(26, 43, None),
    }));
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    assert_eq!(
        m.usage,
        Usage {
            input_tokens: 26,
            output_tokens: 43,
            cache_read_tokens: 100,
            cache_write_tokens: 50,
        }
    );
}

#[test]
fn message_stop_without_metrics_completes_with_event_counts() {
    let m = meter(
        RuntimeOp::InvokeStream,
        &es(),
        &invoke_stream(json!({"type": "message_stop"})),
    );
    assert_eq!(
        m.usage,
        Usage {
            input_tokens: 25,
            output_tokens: 42,
            cache_read_tokens: 100,
            cache_write_tokens: 50,
        }
    );
    assert!(m.complete && m.found);
}

#[test]
fn other_providers_are_metered_from_invocation_metrics() {
    let mut body = chunk(&json!({"generation": "Hi", "prompt_token_count": 9}));
    body.extend(chunk(&json!({
        "generation": "", "stop_reason": "stop",
        "amazon-bedrock-invocationMetrics": metrics(9, 2, None),
    })));
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    assert_eq!((m.usage.input_tokens, m.usage.output_tokens), (9, 2));
    assert!(m.complete);
}

#[test]
fn invoke_stream_every_split_point_agrees() {
    let whole = assert_split_invariant(RuntimeOp::InvokeStream, &es(), &claude_stream());
    assert_eq!(whole.usage.output_tokens, 42);
    assert!(whole.complete);
}

#[test]
fn cut_invoke_stream_reports_partial_usage() {
    let body = claude_stream();
    let half = &body[..body.len() / 2];
    let m = meter_pieces(RuntimeOp::InvokeStream, 200, &es(), [half], false);
    assert_eq!(
        m,
        Metered {
            usage: Usage {
                input_tokens: 25,
                output_tokens: 1,
                cache_read_tokens: 100,
                cache_write_tokens: 50,
            },
            complete: false,
            found: true,
            exception: None,
        }
    );
    // Body "ended" without the terminal event (upstream closed early): still not complete.
    let m = meter_pieces(RuntimeOp::InvokeStream, 200, &es(), [half], true);
    assert!(!m.complete && m.found);
}

#[test]
fn terminal_event_seen_makes_a_stream_complete_even_if_then_cut() {
    let m = meter_pieces(
        RuntimeOp::InvokeStream,
        200,
        &es(),
        [claude_stream().as_slice()],
        false,
    );
    assert!(m.complete);
}

#[test]
fn exception_frame_is_recorded_and_not_complete() {
    let mut body = chunk(&anthropic_events()[0]);
    body.extend(exception(
        "modelStreamErrorException",
        "The model stream failed",
    ));
    for op in STREAM_OPS {
        let m = meter(op, &es(), &body);
        assert_eq!(m.exception.as_deref(), Some("modelStreamErrorException"));
        assert!(!m.complete);
    }
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    assert!(m.found);
    assert_eq!(m.usage.input_tokens, 25);

    // Even after the terminal event an exception means the stream did not end cleanly.
    let mut body = converse_stream();
    body.extend(exception("internalServerException", "boom"));
    let m = meter(RuntimeOp::ConverseStream, &es(), &body);
    assert_eq!(m.exception.as_deref(), Some("internalServerException"));
    assert!(!m.complete && m.found);
}

#[test]
fn json_200_on_stream_op_is_not_decoded() {
    let error = br#"{"message":"Unknown operation","__type":"UnknownOperationException"}"#;
    for op in STREAM_OPS {
        for headers in [
            json_ct(),
            HeaderMap::new(),
            hdrs(&[("content-type", "text/plain")]),
        ] {
            // Even a body that *is* a valid event stream is left alone without the content-type.
            for body in [error.to_vec(), claude_stream(), converse_stream()] {
                let m = meter(op, &headers, &body);
                assert_eq!(
                    m,
                    Metered {
                        usage: Usage::default(),
                        complete: true,
                        found: false,
                        exception: None,
                    }
                );
            }
        }
    }
}

#[test]
fn event_stream_content_type_match_is_a_case_insensitive_prefix() {
    for ct in [
        "Application/VND.Amazon.EventStream",
        "application/vnd.amazon.eventstream; charset=utf-8",
    ] {
        let m = meter(
            RuntimeOp::InvokeStream,
            &hdrs(&[("content-type", ct)]),
            &claude_stream(),
        );
        assert!(m.found && m.complete, "{ct}");
    }
}

#[test]
fn oversized_frame_stops_metering_without_buffering() {
    let mut body = chunk(&anthropic_events()[0]);
    let mut big = raw_frame(b"", b"x");
    big[..4].copy_from_slice(&u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes());
    body.extend(&big[..4]);
    let mut meter = UsageMeter::new(RuntimeOp::InvokeStream, 200, &es());
    meter.feed(&body);
    assert_eq!(meter.buffered(), 0);
    // Anything after is ignored, including a terminal event.
    meter.feed(&chunk(&json!({
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": metrics(1, 1, None),
    })));
    assert_eq!(meter.buffered(), 0);
    let m = meter.finish(true);
    assert_eq!(m.usage.input_tokens, 25);
    assert!(m.found && !m.complete);
}

#[test]
fn a_large_declared_frame_holds_only_what_has_arrived() {
    let mut meter = UsageMeter::new(RuntimeOp::ConverseStream, 200, &es());
    let mut start = raw_frame(b"", b"");
    start[..4].copy_from_slice(&u32::try_from(MAX_FRAME_LEN).unwrap().to_be_bytes());
    meter.feed(&start[..4]);
    meter.feed(&[0; 4]);
    meter.feed(&[0; 100]);
    assert!(meter.buffered() <= 108);
    let m = meter.finish(false);
    assert_eq!((m.found, m.complete), (false, false));
}

#[test]
fn decode_error_stops_metering_and_keeps_what_was_seen() {
    let events = converse_stream_events();
    let mut body = events[0].clone();
    let mut corrupt = events[1].clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    body.extend(corrupt);
    body.extend(events[4].clone());
    let m = meter(RuntimeOp::ConverseStream, &es(), &body);
    assert_eq!((m.found, m.complete), (false, false));

    let mut body = claude_stream();
    let stop = chunk(&json!({"type": "message_stop"}));
    body.truncate(body.len() - 1);
    body.extend(stop);
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    assert_eq!(m.usage.output_tokens, 42);
    assert!(m.found && !m.complete);
}

#[test]
fn frames_of_unknown_shape_are_skipped() {
    let mut body = frame(&[(":message-type", "event")], b"{}");
    body.extend(event("chunk", &json!({"bytes": "!!not base64!!"})));
    body.extend(event(
        "chunk",
        &json!({"bytes": STANDARD.encode("not json")}),
    ));
    body.extend(event("chunk", &json!({"nope": 1})));
    body.extend(event("chunk", &json!({"bytes": STANDARD.encode("[1,2]")})));
    body.extend(frame(&[(":message-type", "mystery")], b"{}"));
    body.extend(raw_frame(b"", b""));
    body.extend(chunk(
        &json!({"type": "message_delta", "usage": {"output_tokens": -1}}),
    ));
    body.extend(chunk(
        &json!({"type": "message_delta", "usage": {"output_tokens": 5}}),
    ));
    // Unpadded base64 is accepted too.
    let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD
        .encode(json!({"type": "message_stop"}).to_string());
    body.extend(event("chunk", &json!({"bytes": unpadded})));
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    assert_eq!(m.usage.output_tokens, 5);
    assert!(m.found && m.complete);
}

/// The meter reads four fields of a provider event and skips the rest unbuilt; what it reads
/// must be what a full JSON parse would give: escapes decoded, the last of a repeated key, a
/// field of another shape as absent, nested look-alikes ignored.
#[test]
fn provider_event_fields_read_like_a_full_parse() {
    let raw = |text: &str| event("chunk", &json!({ "bytes": STANDARD.encode(text) }));
    let mut body = raw(concat!(
        r#"{"type":"message_start","message":{"usage":{"input_tokens":9},"#,
        r#""content":[{"type":"message_stop"}],"#,
        r#""usage":{"input_tokens":25,"output_tokens":"1","cache_read_input_tokens":100}}}"#,
    ));
    body.extend(raw(
        r#"{"type":"message_start","message":[{"usage":{"input_tokens":1}}]}"#,
    ));
    body.extend(raw(r#"{"type":"message_delta","usage":7}"#));
    body.extend(raw(concat!(
        r#"{"type":"message_stop","\u0074ype":"message\u005fdelta","#,
        r#""usage":{"output_tokens":42},"delta":{"type":"message_stop"},"#,
        r#""x":{"amazon-bedrock-invocationMetrics":{"inputTokenCount":1}}}"#,
    )));
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    let u = m.usage;
    let counts = (
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens,
        u.cache_write_tokens,
    );
    assert_eq!(counts, (25, 42, 100, 0), "{m:?}");
    assert!(m.found && !m.complete, "{m:?}");

    body.extend(raw(concat!(
        r#"{"amazon-bedrock-invocationMetrics":{"inputTokenCount":1},"#,
        r#""amazon-bedrock-invocationMetrics":{"inputTokenCount":26,"outputTokenCount":-3}}"#,
    )));
    let m = meter(RuntimeOp::InvokeStream, &es(), &body);
    assert_eq!((m.usage.input_tokens, m.usage.output_tokens), (26, 42));
    assert!(m.complete);
}

/// A field the meter does not read is skipped, not checked: an event whose other fields a
/// `serde_json::Value` would refuse (invalid UTF-8, a number beyond f64, deep nesting) is still
/// counted, as Bedrock bills it. A field it reads must be well-formed.
#[test]
fn fields_the_meter_does_not_read_are_not_checked() {
    let raw = |text: &[u8]| event("chunk", &json!({ "bytes": STANDARD.encode(text) }));
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let odd: [&[u8]; 3] = [b"\"\xff\xfe\"", b"1e999", deep.as_bytes()];
    for odd in odd {
        let mut text = br#"{"type":"message_delta","usage":{"output_tokens":5},"x":"#.to_vec();
        text.extend_from_slice(odd);
        text.push(b'}');
        assert!(serde_json::from_slice::<Value>(&text).is_err());
        let m = meter(RuntimeOp::InvokeStream, &es(), &raw(&text));
        assert_eq!(m.usage.output_tokens, 5, "{}", String::from_utf8_lossy(odd));
    }
    let bad_type = raw(b"{\"type\":\"message_\xffdelta\",\"usage\":{\"output_tokens\":5}}");
    assert!(!meter(RuntimeOp::InvokeStream, &es(), &bad_type).found);
}

// ---- ConverseStream ----

#[test]
fn converse_stream_metadata_gives_exact_usage_and_completion() {
    let m = assert_split_invariant(RuntimeOp::ConverseStream, &es(), &converse_stream());
    assert_eq!(
        m,
        Metered {
            usage: Usage {
                input_tokens: 30,
                output_tokens: 7,
                cache_read_tokens: 120,
                cache_write_tokens: 80,
            },
            complete: true,
            found: true,
            exception: None,
        }
    );
}

#[test]
fn converse_stream_message_stop_alone_is_not_complete() {
    let events = converse_stream_events();
    let body = events[..4].concat();
    let m = meter(RuntimeOp::ConverseStream, &es(), &body);
    assert_eq!((m.found, m.complete), (false, false));
    let m = meter_pieces(
        RuntimeOp::ConverseStream,
        200,
        &es(),
        [&body[..body.len() / 2]],
        false,
    );
    assert_eq!((m.found, m.complete), (false, false));
}

#[test]
fn stream_ops_ignore_the_other_ops_events() {
    let m = meter(RuntimeOp::ConverseStream, &es(), &claude_stream());
    assert_eq!((m.found, m.complete), (false, false));
    let m = meter(RuntimeOp::InvokeStream, &es(), &converse_stream());
    assert_eq!((m.found, m.complete), (false, false));
}

// ---- Converse ----

#[test]
fn converse_usage_after_output_with_tricky_text() {
    let body = converse_body_usage_last();
    serde_json::from_slice::<Value>(&body).unwrap();
    assert_eq!(
        assert_split_invariant(RuntimeOp::Converse, &json_ct(), &body),
        expected_converse()
    );
}

#[test]
fn converse_usage_before_output_with_whitespace() {
    let body = converse_body_usage_first();
    serde_json::from_slice::<Value>(&body).unwrap();
    assert_eq!(
        assert_split_invariant(RuntimeOp::Converse, &json_ct(), &body),
        expected_converse()
    );
}

#[test]
fn converse_pretty_printed() {
    let value: Value = serde_json::from_slice(&converse_body_usage_last()).unwrap();
    let body = serde_json::to_vec_pretty(&value).unwrap();
    assert_eq!(
        meter(RuntimeOp::Converse, &json_ct(), &body),
        expected_converse()
    );
}

#[test]
fn converse_nested_or_quoted_usage_is_not_top_level() {
    for body in [
        format!(r#"{{"output":{}}}"#, converse_output()),
        r#"{"stopReason":"usage","x":"\"usage\":{\"inputTokens\":5}","y":["usage",{"usage":{"inputTokens":5}}]}"#.to_string(),
        r#"{"usag":{"inputTokens":5},"usages":{"inputTokens":5},"us\u0061ge":{"inputTokens":5}}"#.to_string(),
        r#"[{"usage":{"inputTokens":5}}]"#.to_string(),
        String::new(),
        "not json".to_string(),
    ] {
        let m = meter(RuntimeOp::Converse, &json_ct(), body.as_bytes());
        assert_eq!((m.found, m.complete), (false, false), "{body}");
    }
}

#[test]
fn converse_ignores_anything_after_the_root_object() {
    let mut body = converse_body_usage_last();
    body.extend(br#" {"usage":{"inputTokens":5}}"#);
    assert_eq!(
        meter(RuntimeOp::Converse, &json_ct(), &body),
        expected_converse()
    );
}

#[test]
fn converse_cut_after_usage_is_found_but_not_complete() {
    let body = converse_body_usage_first();
    let at = body.windows(8).position(|w| w == b"\"output\"").unwrap();
    let m = meter_pieces(RuntimeOp::Converse, 200, &json_ct(), [&body[..at]], false);
    assert_eq!(m.usage, expected_converse().usage);
    assert!(m.found && !m.complete);
    // Cut inside the usage value: nothing is parsed from half a value.
    let at = body.windows(12).position(|w| w == b"outputTokens").unwrap();
    let m = meter_pieces(RuntimeOp::Converse, 200, &json_ct(), [&body[..at]], false);
    assert!(!m.found && !m.complete);
}

#[test]
fn converse_oversized_usage_value_is_dropped_within_the_cap() {
    let pad = "x".repeat(MAX_USAGE_CAPTURE);
    let body = format!(r#"{{"usage":{{"inputTokens":1,"pad":"{pad}"}}}}"#);
    let mut meter = UsageMeter::new(RuntimeOp::Converse, 200, &json_ct());
    for piece in body.as_bytes().chunks(1000) {
        meter.feed(piece);
        assert!(meter.buffered() <= MAX_USAGE_CAPTURE);
    }
    let m = meter.finish(true);
    assert!(!m.found && !m.complete);
}

// ---- helpers and properties ----

#[test]
fn hand_built_frames_match_the_encoder() {
    let message = Message::new(&b"{\"a\":1}"[..]).add_header(Header::new(
        ":event-type",
        HeaderValue::String("chunk".into()),
    ));
    let mut encoded = Vec::new();
    write_message_to(&message, &mut encoded).unwrap();
    let mut headers = Vec::new();
    write_headers_to(message.headers(), &mut headers).unwrap();
    assert_eq!(raw_frame(&headers, b"{\"a\":1}"), encoded);
}

#[test]
fn meter_can_cross_threads() {
    fn send<T: Send + 'static>() {}
    send::<UsageMeter>();
    send::<Metered>();
}

fn feed_in_chunks(meter: &mut UsageMeter, data: &[u8], sizes: &[usize]) {
    let mut rest = data;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = sizes.next().copied().unwrap_or(1).clamp(1, rest.len());
        let (piece, tail) = rest.split_at(n);
        meter.feed(piece);
        assert!(meter.buffered() <= MAX_FRAME_LEN);
        if meter.op() == RuntimeOp::Converse {
            assert!(meter.buffered() <= MAX_USAGE_CAPTURE);
        }
        rest = tail;
    }
}

fn chunkings() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..300, 1..20)
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        data in prop::collection::vec(any::<u8>(), 0..4096),
        sizes in chunkings(),
        status in prop::sample::select(vec![200u16, 400, 500]),
        ended in any::<bool>(),
    ) {
        for op in ALL_OPS {
            for headers in [es(), json_ct()] {
                let mut meter = UsageMeter::new(op, status, &headers);
                feed_in_chunks(&mut meter, &data, &sizes);
                let m = meter.finish(ended);
                prop_assert!(m.found || m.usage == Usage::default());
            }
        }
    }

    #[test]
    fn frames_with_valid_checksums_and_garbage_inside_never_panic(
        frames in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), 0..64), prop::collection::vec(any::<u8>(), 0..256)),
            1..8,
        ),
        trailing in prop::collection::vec(any::<u8>(), 0..16),
        sizes in chunkings(),
    ) {
        let mut body = Vec::new();
        for (headers, payload) in &frames {
            body.extend(raw_frame(headers, payload));
        }
        body.extend(&trailing);
        for op in STREAM_OPS {
            let mut meter = UsageMeter::new(op, 200, &es());
            feed_in_chunks(&mut meter, &body, &sizes);
            let _ = meter.finish(true);
        }
    }

    #[test]
    fn valid_event_headers_with_garbage_payloads_never_panic(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..200), 1..6),
        wrap in any::<bool>(),
        sizes in chunkings(),
    ) {
        let mut body = Vec::new();
        for p in &payloads {
            if wrap {
                body.extend(event("chunk", &json!({"bytes": STANDARD.encode(p)})));
            } else {
                body.extend(frame(&[(":message-type", "event"), (":event-type", "metadata")], p));
            }
        }
        for op in STREAM_OPS {
            let mut meter = UsageMeter::new(op, 200, &es());
            feed_in_chunks(&mut meter, &body, &sizes);
            let _ = meter.finish(true);
        }
    }

    #[test]
    fn any_chunking_of_a_real_response_gives_the_same_result(sizes in chunkings()) {
        for (op, headers, body) in [
            (RuntimeOp::InvokeStream, es(), claude_stream()),
            (RuntimeOp::ConverseStream, es(), converse_stream()),
            (RuntimeOp::Converse, json_ct(), converse_body_usage_last()),
            (RuntimeOp::Converse, json_ct(), converse_body_usage_first()),
        ] {
            let mut meter = UsageMeter::new(op, 200, &headers);
            feed_in_chunks(&mut meter, &body, &sizes);
            prop_assert_eq!(meter.finish(true), super::tests::meter(op, &headers, &body));
        }
    }

    #[test]
    fn converse_scanner_is_not_fooled_by_any_text(
        text in any::<String>(),
        key in any::<String>(),
        usage_first in any::<bool>(),
        input in any::<u64>(),
        output in any::<u64>(),
        sizes in chunkings(),
    ) {
        let usage = json!({"inputTokens": input, "outputTokens": output});
        let noise = format!(
            r#"{}:{{"output":{{"message":{{"content":[{{"text":{}}}],"usage":{{"inputTokens":0}}}}}}}}"#,
            serde_json::to_string(&key).unwrap(),
            serde_json::to_string(&text).unwrap(),
        );
        let body = if usage_first {
            format!(r#"{{"usage":{usage},{noise}}}"#)
        } else {
            format!(r#"{{{noise},"usage":{usage}}}"#)
        };
        // When `key` is itself "usage", its value carries no token fields and so does not
        // replace the real one, in either order.
        let mut meter = UsageMeter::new(RuntimeOp::Converse, 200, &json_ct());
        feed_in_chunks(&mut meter, body.as_bytes(), &sizes);
        let m = meter.finish(true);
        prop_assert_eq!(
            m.usage,
            Usage { input_tokens: input, output_tokens: output, ..Usage::default() }
        );
        prop_assert!(m.complete);
    }
}
