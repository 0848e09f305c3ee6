"""The official Anthropic Python SDK against bedrock-gate's Messages front.

Run by tests/it/anthropic_sdk.rs with the proxy and the fake Bedrock already up:
    BASE_URL=http://127.0.0.1:port KEY=bgk_... OTHER_PROFILE=arn:... python anthropic_sdk.py

Exits non-zero, with what went wrong, if any call does not behave as against the Anthropic API.
The Rust side then checks what reached the fake Bedrock.
"""

import os
import sys

import anthropic

BASE_URL = os.environ["BASE_URL"]
KEY = os.environ["KEY"]
LIMITED_KEY = os.environ["LIMITED_KEY"]
TEXT = "Hello from the fake Bedrock"
HELLO = [{"role": "user", "content": "hi"}]


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def expect_error(cls, call, what):
    try:
        call()
    except cls as e:
        return e
    except Exception as e:  # noqa: BLE001 - report whatever else came
        check(False, f"{what}: expected {cls.__name__}, got {type(e).__name__}: {e}")
    check(False, f"{what}: expected {cls.__name__}, got a success")


# No retries: a refusal must surface as its error class at once.
client = anthropic.Anthropic(base_url=BASE_URL, api_key=KEY, max_retries=0)

# create
msg = client.messages.create(
    model="claude-sonnet-4-5", max_tokens=256, messages=HELLO,
    metadata={"user_id": "sdk-user"}, extra_headers={"x-bedrock-gate-project": "sdk-project"},
)
check(msg.content[0].text == TEXT, f"create: text {msg.content!r}")
check(msg.usage.input_tokens == 11 and msg.usage.output_tokens == 7, f"create: usage {msg.usage!r}")
check(msg.stop_reason == "end_turn", f"create: stop_reason {msg.stop_reason!r}")

# stream: every event, and the final message assembled from them
with client.messages.stream(model="claude-haiku-4-5", max_tokens=256, messages=HELLO) as stream:
    kinds = [event.type for event in stream]
    final = stream.get_final_message()
for kind in ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
             "message_delta", "message_stop"]:
    check(kind in kinds, f"stream: no {kind} event in {kinds}")
check(final.content[0].text == TEXT, f"stream: final text {final.content!r}")
check(final.usage.output_tokens == 6, f"stream: final usage {final.usage!r}")

# the raw stream=True form too
raw = client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=HELLO, stream=True)
text = "".join(e.delta.text for e in raw if e.type == "content_block_delta")
check(text == TEXT, f"stream=True: text {text!r}")

# count_tokens
count = client.messages.count_tokens(model="claude-sonnet-4-5", messages=HELLO)
check(count.input_tokens == 42, f"count_tokens: {count!r}")

# the model list
models = client.models.list()
ids = [m.id for m in models.data]
check("claude-sonnet-4-5-20250929" in ids, f"models.list: {ids}")

# error classes
bad = anthropic.Anthropic(base_url=BASE_URL, api_key="bgk_not_a_key", max_retries=0)
e = expect_error(anthropic.AuthenticationError,
                 lambda: bad.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HELLO),
                 "unknown key")
check("ANTHROPIC_API_KEY" in str(e), f"unknown key: the message says what to set: {e}")

e = expect_error(anthropic.BadRequestError,
                 lambda: client.messages.create(model="claude-opus-4-1", max_tokens=8, messages=HELLO),
                 "unmapped model")
check("claude-opus-4-1" in str(e), f"unmapped model: named in {e}")

e = expect_error(anthropic.BadRequestError,
                 lambda: client.messages.create(model=os.environ["OTHER_PROFILE"], max_tokens=8,
                                                messages=HELLO),
                 "another user's profile")

limited = anthropic.Anthropic(base_url=BASE_URL, api_key=LIMITED_KEY, max_retries=0)
limited.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HELLO)
e = expect_error(anthropic.RateLimitError,
                 lambda: limited.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HELLO),
                 "over the rate limit")
check(e.response.headers.get("retry-after"), "rate limit: retry-after")

def broken_stream():
    with client.messages.stream(model=os.environ["BROKEN_MODEL"], max_tokens=8, messages=HELLO) as s:
        for _ in s:
            pass

e = expect_error(anthropic.APIError, broken_stream, "a mid-stream exception")
check("modelStreamErrorException" in str(e), f"mid-stream exception: named in {e}")

print("ok")
