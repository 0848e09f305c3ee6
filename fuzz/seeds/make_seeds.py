#!/usr/bin/env python3
"""Writes the checked-in seed corpus: fuzz/seeds/usage_meter/* and fuzz/seeds/route_parse/*.

    python3 fuzz/seeds/make_seeds.py

Standard library only. The response shapes are the ones src/meter/usage/tests.rs and
tests/common/fake.rs use. A usage_meter seed is the prefix the target reads
(op, status, content-type, flags, 4 token headers, chunk plan; see fuzz_targets/usage_meter.rs)
followed by the body: raw event-stream frames or a Converse JSON body, or, in framed mode,
records the target encodes as frames itself.
"""

import base64
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))

# usage_meter prefix values
INVOKE, INVOKE_STREAM, CONVERSE, CONVERSE_STREAM, COUNT_TOKENS = range(5)
STATUS_200, STATUS_400 = 0x00, 0xC8
CT_EVENTSTREAM, CT_JSON = 0, 3
ENDED, FRAMED = 1, 2
ABSENT = 0x80

TRICKY = 'He wrote "usage": {"inputTokens": 999}}, then \\"}]{[ and ,"usage":1 \u00e9'


def prefix(op, status, ct, flags, headers=(None, None, None, None), plan=()):
    out = bytes([op, status, ct, flags])
    for value in headers:
        if value is None:
            out += bytes([ABSENT])
        else:
            out += bytes([len(value)]) + value.encode()
    return out + bytes([len(plan)]) + bytes(plan)


def frame(headers, payload):
    """One event-stream message: prelude, CRC, string headers, payload, CRC."""
    hdrs = b""
    for name, value in headers:
        value = value.encode()
        hdrs += bytes([len(name)]) + name.encode() + b"\x07" + struct.pack(">H", len(value)) + value
    total = 12 + len(hdrs) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hdrs))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + hdrs + payload
    return message + struct.pack(">I", zlib.crc32(message))


def compact(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def event(event_type, payload):
    headers = [(":event-type", event_type), (":content-type", "application/json"),
               (":message-type", "event")]
    return frame(headers, compact(payload))


def chunk(provider_event):
    return event("chunk", {"bytes": base64.b64encode(compact(provider_event)).decode(),
                           "p": "abcdefghijklmnopqrstuvwxyzABCDEFGH"})


def exception(kind, message):
    headers = [(":exception-type", kind), (":content-type", "application/json"),
               (":message-type", "exception")]
    return frame(headers, compact({"message": message}))


ANTHROPIC_EVENTS = [
    {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": 25, "output_tokens": 1,
                  "cache_read_input_tokens": 100, "cache_creation_input_tokens": 50}}},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": TRICKY}},
    {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 17}},
    {"type": "content_block_stop", "index": 0},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}},
]
MESSAGE_STOP = {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
    "inputTokenCount": 25, "outputTokenCount": 42, "invocationLatency": 1234,
    "firstByteLatency": 321, "cacheReadInputTokenCount": 100, "cacheWriteInputTokenCount": 50}}

CONVERSE_EVENTS = [
    ("messageStart", {"p": "abcd", "role": "assistant"}),
    ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": TRICKY}, "p": "ab"}),
    ("contentBlockStop", {"contentBlockIndex": 0, "p": "abc"}),
    ("messageStop", {"stopReason": "end_turn", "p": "a"}),
]
METADATA = {"metrics": {"latencyMs": 812},
            "usage": {"inputTokens": 30, "outputTokens": 7, "totalTokens": 237,
                      "cacheReadInputTokens": 120, "cacheWriteInputTokens": 80},
            "p": "abcdefgh"}

CONVERSE_USAGE = {"inputTokens": 11, "outputTokens": 22, "totalTokens": 110,
                  "cacheReadInputTokens": 44, "cacheWriteInputTokens": 33}
CONVERSE_OUTPUT = {"message": {"role": "assistant", "content": [
    {"text": TRICKY}, {"text": '{"usage":{"inputTokens":1}}'}],
    "usage": {"inputTokens": 999, "outputTokens": 999}}}


def record(kind, data):
    """A framed-mode record: the target turns it into one valid frame."""
    return bytes([kind]) + struct.pack(">H", len(data)) + data


def usage_meter_seeds():
    claude = b"".join(chunk(e) for e in ANTHROPIC_EVENTS) + chunk(MESSAGE_STOP)
    converse_stream = b"".join(event(t, p) for t, p in CONVERSE_EVENTS) + event("metadata", METADATA)
    yield "invoke_stream_claude", prefix(INVOKE_STREAM, STATUS_200, CT_EVENTSTREAM, ENDED,
                                         plan=[7, 100, 1, 250]) + claude
    yield "invoke_stream_cut", prefix(INVOKE_STREAM, STATUS_200, CT_EVENTSTREAM, 0,
                                      plan=[64]) + claude[: len(claude) * 2 // 3]
    yield "converse_stream", prefix(CONVERSE_STREAM, STATUS_200, CT_EVENTSTREAM, ENDED,
                                    plan=[13, 0, 200]) + converse_stream
    yield "converse_stream_exception", prefix(CONVERSE_STREAM, STATUS_200, CT_EVENTSTREAM, ENDED) + (
        b"".join(event(t, p) for t, p in CONVERSE_EVENTS[:2])
        + exception("modelStreamErrorException", "The model stopped."))
    yield "converse_usage_last", prefix(CONVERSE, STATUS_200, CT_JSON, ENDED, plan=[5, 31]) + compact(
        {"metrics": {"latencyMs": 90}, "output": CONVERSE_OUTPUT, "stopReason": "end_turn",
         "usage": CONVERSE_USAGE})
    yield "converse_usage_first_pretty", prefix(CONVERSE, STATUS_200, CT_JSON, ENDED) + json.dumps(
        {"usage": CONVERSE_USAGE, "output": CONVERSE_OUTPUT, "stopReason": "usage"},
        indent=2, ensure_ascii=False).encode()
    yield "invoke_headers", prefix(INVOKE, STATUS_200, CT_JSON, ENDED,
                                   headers=("12", "34", "5", "6")) + compact(
        {"content": [{"type": "text", "text": "hi"}], "usage": {"input_tokens": 1}})
    yield "stream_op_json_error_200", prefix(INVOKE_STREAM, STATUS_200, CT_JSON, ENDED) + compact(
        {"message": "Malformed input request"})
    yield "error_400", prefix(CONVERSE, STATUS_400, CT_JSON, ENDED) + compact(
        {"message": "The provided model identifier is invalid.", "usage": CONVERSE_USAGE})
    yield "count_tokens", prefix(COUNT_TOKENS, STATUS_200, CT_JSON, ENDED) + compact({"inputTokens": 12})
    # Framed mode: kind 0 = chunk wrapping the data in base64, 8 = the same with `p` padding,
    # 2 = metadata, 3 = exception, 5 = an event neither dialect reads, 7 = raw bytes.
    yield "framed_invoke_stream", prefix(INVOKE_STREAM, STATUS_200, CT_EVENTSTREAM, ENDED | FRAMED,
                                         plan=[3, 40]) + (
        record(0, compact(ANTHROPIC_EVENTS[0])) + record(8, compact(ANTHROPIC_EVENTS[2]))
        + record(0, compact(ANTHROPIC_EVENTS[5])) + record(8, compact(MESSAGE_STOP)))
    yield "framed_converse_stream", prefix(CONVERSE_STREAM, STATUS_200, CT_EVENTSTREAM,
                                           ENDED | FRAMED, plan=[9]) + (
        record(5, compact(CONVERSE_EVENTS[0][1])) + record(2, compact(METADATA))
        + record(3, compact({"message": "slow down"})))


ROUTE_GET, ROUTE_POST, ROUTE_CUSTOM = 0, 1, 7
PROFILE_ARN = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"


def route_parse_seeds():
    def enc(s):
        return "".join(c if c.isalnum() or c in "-._~" else "%%%02X" % ord(c) for c in s)

    yield "invoke_geo_id", bytes([ROUTE_POST]) + b"/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke"
    yield "converse_stream_encoded_arn", bytes([ROUTE_POST]) + f"/model/{enc(PROFILE_ARN)}/converse-stream".encode()
    yield "converse_raw_arn", bytes([ROUTE_POST]) + f"/model/{PROFILE_ARN}/converse".encode()
    yield "count_tokens_fm_arn", bytes([ROUTE_POST]) + (
        b"/model/arn:aws:bedrock:us-west-2::foundation-model/anthropic.claude-3-haiku-20240307-v1:0"
        b"/count-tokens")
    yield "invoke_stream_claude_style", bytes([ROUTE_POST]) + (
        b"/model/arn:aws:bedrock:eu-west-1:123456789012:inference-profile%2Feu.anthropic.claude-x"
        b"/invoke-with-response-stream")
    yield "get_profile", bytes([ROUTE_GET]) + f"/inference-profiles/{enc(PROFILE_ARN)}".encode()
    yield "list_profiles", bytes([ROUTE_GET]) + b"/inference-profiles"
    yield "healthz", bytes([ROUTE_GET]) + b"/healthz"
    yield "usage", bytes([ROUTE_GET]) + b"/usage"
    yield "custom_method", bytes([ROUTE_CUSTOM, 4]) + b"BREW/model/anthropic.claude/invoke"


MSG_COUNT, MSG_FRAMED = 1, 2


def messages_seeds():
    """fuzz_targets/messages.rs: flags, chunk size, then a Messages body or stream bytes."""
    body = {"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "tools": [],
            "tags": {"project": "apollo"}, "metadata": {"user_id": "u"},
            "anthropic_beta": ["interleaved-thinking-2025-05-14"]}
    yield "create", bytes([0, 7]) + compact(body)
    yield "count", bytes([MSG_COUNT, 3]) + compact(body)
    yield "duplicate_model", bytes([0, 1]) + b'{"model":"a","model":"b"}'
    yield "arn_message", bytes([0, 5]) + (
        b"User arn:aws:sts::123456789012:assumed-role/gw/x is not authorized. Input is too long.")

    def records(events):
        out = b""
        for e in events:
            data = compact(e)
            out += struct.pack(">H", len(data)) + data
        return out

    yield "framed_stream", bytes([MSG_FRAMED, 11]) + records(ANTHROPIC_EVENTS + [MESSAGE_STOP])
    yield "framed_bad_type", bytes([MSG_FRAMED, 2]) + records([{"type": "a\nb"}])
    yield "raw_frames", bytes([0, 9]) + b"".join(chunk(e) for e in ANTHROPIC_EVENTS[:3]) + (
        exception("throttlingException", "slow down"))


def main():
    for target, seeds in (("usage_meter", usage_meter_seeds()), ("route_parse", route_parse_seeds()),
                          ("messages", messages_seeds())):
        directory = os.path.join(HERE, target)
        os.makedirs(directory, exist_ok=True)
        for name, data in seeds:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
