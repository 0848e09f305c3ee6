//! The Anthropic Messages front through the real binary against the SigV4-checking fake
//! Bedrock: translation, streaming as SSE (proven without timing), count_tokens, the model list,
//! the error envelope and its statuses, usage-limit headers, labels in the ledger.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use http::Method;
use http_body_util::BodyExt;

/// Alice maps Sonnet (us-east-1) and Haiku (us-west-2), as in the Bedrock-front tests.
async fn start(extra: &str) -> (FakeBedrock, Proxy) {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, extra)).await;
    (fake, proxy)
}

fn runtime_calls(fake: &FakeBedrock) -> Vec<fake::Received> {
    fake.received()
        .into_iter()
        .filter(|r| r.raw_path.starts_with("/model/"))
        .collect()
}

#[tokio::test]
async fn a_message_reaches_bedrock_on_the_callers_profile_translated_and_signed() {
    let (fake, proxy) = start("").await;
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}],
        "thinking":{"type":"enabled","budget_tokens":32},"metadata":{"user_id":"u1"},
        "tags":{"project":"apollo"}}"#;
    let r = messages(
        &proxy,
        ALICE_KEY,
        body,
        &[
            (
                "anthropic-beta",
                "interleaved-thinking-2025-05-14,request-tags-2026-08-21",
            ),
            ("x-claude-code-session-id", "sess-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    assert_eq!(v["content"][0]["text"], fake::TEXT);
    assert!(
        !r.headers.contains_key("anthropic-ratelimit-unified-status"),
        "the upstream's rate-limit headers are never passed on"
    );
    assert!(r.headers.contains_key("request-id"));

    let calls = runtime_calls(&fake);
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.op, "invoke");
    assert_eq!(call.model, alice_sonnet(), "the caller's own profile ARN");
    assert!(call.signature.is_ok(), "{:?}", call.signature);
    assert_eq!(call.signature.as_ref().unwrap().region, "us-east-1");
    assert!(call.headers.get("x-api-key").is_none());
    assert!(
        call.headers
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("AWS4-HMAC-SHA256")
    );
    assert!(
        call.headers.get("anthropic-beta").is_none(),
        "betas move into the body"
    );
    assert_eq!(call.headers["anthropic-version"], "2023-06-01");
    let sent: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(sent["anthropic_version"], "bedrock-2023-05-31");
    assert_eq!(
        sent["anthropic_beta"],
        serde_json::json!(["interleaved-thinking-2025-05-14"])
    );
    for dropped in ["model", "stream", "tags"] {
        assert!(
            sent.get(dropped).is_none(),
            "{dropped} reached Bedrock: {sent}"
        );
    }
    assert_eq!(sent["thinking"]["budget_tokens"], 32);
    assert_eq!(sent["metadata"]["user_id"], "u1");

    let rows = ledger_with(&proxy, 1).await;
    let row = &rows[0];
    assert_eq!(row.front.as_deref(), Some("anthropic"));
    assert_eq!(row.operation, "Messages");
    assert_eq!(row.model.as_deref(), Some("claude-sonnet-4-5"));
    assert_eq!(row.profile.as_deref(), Some(alice_sonnet().as_str()));
    assert_eq!(
        row.tokens,
        (11, 7, 4, 3),
        "the same exact usage as InvokeModel"
    );
    assert!(row.complete);
    assert_eq!(row.project.as_deref(), Some("apollo"));
    assert_eq!(row.session.as_deref(), Some("sess-1"));
}

#[tokio::test]
async fn every_model_spelling_resolves_the_same_and_an_unmapped_one_is_a_400_listing_mine() {
    let (fake, proxy) = start("").await;
    for model in [
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-5",
        SONNET,
        &format!("us.{SONNET}"),
        &alice_sonnet(),
        "claude-haiku-4-5",
    ] {
        let r = messages(&proxy, ALICE_KEY, &messages_body(model, false), &[]).await;
        assert_eq!(r.status, 200, "{model}: {:?}", r.body);
    }
    let profiles: Vec<String> = runtime_calls(&fake).into_iter().map(|c| c.model).collect();
    assert_eq!(
        profiles,
        [
            alice_sonnet(),
            alice_sonnet(),
            alice_sonnet(),
            alice_sonnet(),
            alice_sonnet(),
            alice_haiku()
        ]
    );

    let r = messages(
        &proxy,
        ALICE_KEY,
        &messages_body("claude-opus-4-1", false),
        &[],
    )
    .await;
    assert_eq!(r.status, 400);
    let (kind, message) = r.anthropic_error();
    assert_eq!(kind, "invalid_request_error");
    assert!(
        message.contains("claude-opus-4-1")
            && message.contains("claude-sonnet-4-5-20250929")
            && message.contains("claude-haiku-4-5-20251001"),
        "names the model and lists the caller's: {message}"
    );
    let r = messages(&proxy, ALICE_KEY, &messages_body(&bob_sonnet(), false), &[]).await;
    assert_eq!(r.status, 400);
    assert!(r.anthropic_error().1.contains("belongs to another user"));
    assert_eq!(
        runtime_calls(&fake).len(),
        6,
        "refusals never reach Bedrock"
    );
}

/// Reads an SSE response, releasing the fake's next event only after each complete event
/// arrived, and returns (event, data) pairs.
async fn read_sse_gated(
    resp: http::Response<hyper::body::Incoming>,
    gate: Option<tokio::sync::mpsc::Sender<()>>,
) -> Vec<(String, serde_json::Value)> {
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            buf.push_str(std::str::from_utf8(data).unwrap());
        }
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            events.push((event, serde_json::from_str(&data).unwrap()));
            if let Some(g) = &gate {
                let _ = g.try_send(());
            }
        }
    }
    assert!(buf.is_empty(), "trailing partial event: {buf:?}");
    events
}

async fn stream_request(proxy: &Proxy, body: String) -> http::Response<hyper::body::Incoming> {
    client()
        .request(request(
            Method::POST,
            &format!("{}/v1/messages?beta=true", proxy.url()),
            &[
                ("authorization", &format!("Bearer {ALICE_KEY}")),
                ("content-type", "application/json"),
            ],
            body,
        ))
        .await
        .expect("send")
}

#[tokio::test]
async fn a_stream_is_sse_event_by_event_never_buffered() {
    let (fake, proxy) = start("").await;
    let gate = fake.gate_streams();
    let resp = stream_request(&proxy, messages_body("claude-haiku-4-5", true)).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(
        !resp
            .headers()
            .contains_key("anthropic-ratelimit-unified-status")
    );
    // A buffering proxy never delivers the first event, so the fake never sends the second:
    // the read would never finish.
    let events = tokio::time::timeout(Duration::from_secs(60), read_sse_gated(resp, Some(gate)))
        .await
        .expect("the proxy buffered the stream: event N+1 is only sent after event N arrived");
    let expected = fake::anthropic_events(&alice_haiku());
    assert_eq!(events.len(), expected.len());
    for ((event, data), want) in events.iter().zip(&expected) {
        assert_eq!(event, want["type"].as_str().unwrap());
        assert_eq!(data, want, "the event's JSON exactly as Bedrock sent it");
    }
    let calls = runtime_calls(&fake);
    assert_eq!(calls[0].op, "invoke-with-response-stream");
    assert_eq!(calls[0].model, alice_haiku());
    assert_eq!(calls[0].signature.as_ref().unwrap().region, "us-west-2");
    let rows = ledger_with(&proxy, 1).await;
    assert_eq!(rows[0].operation, "MessagesStream");
    assert_eq!(
        rows[0].tokens,
        (25, 6, 3, 2),
        "usage from the same event frames, exact"
    );
    assert!(rows[0].complete);
}

#[tokio::test]
async fn a_silent_stream_gets_pings_and_a_mid_stream_exception_becomes_an_error_event() {
    // The stalled stream is still read after its client leaves, until stream_idle_secs.
    let (fake, proxy) = start("[timeouts]\nstream_ping_secs = 1\nstream_idle_secs = 3").await;
    fake.script(&alice_sonnet(), fake::Script::StallAfterFirst);
    let resp = stream_request(&proxy, messages_body("claude-sonnet-4-5", true)).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = String::new();
    // The first event, then silence: the proxy must say `ping` (however long that takes).
    tokio::time::timeout(Duration::from_secs(30), async {
        while !seen.contains("event: ping\ndata: {\"type\": \"ping\"}\n\n") {
            let frame = body.frame().await.expect("open").expect("frame");
            if let Some(d) = frame.data_ref() {
                seen.push_str(std::str::from_utf8(d).unwrap());
            }
        }
    })
    .await
    .expect("no ping during upstream silence");
    assert!(seen.starts_with("event: message_start\n"), "{seen}");
    drop(body);

    fake.script(
        &alice_haiku(),
        fake::Script::MidStreamException("modelStreamErrorException", "fake: model stream error"),
    );
    let resp = stream_request(&proxy, messages_body("claude-haiku-4-5", true)).await;
    let events = read_sse_gated(resp, None).await;
    let (last, data) = events.last().unwrap();
    assert_eq!(events[0].0, "message_start");
    assert_eq!(last, "error");
    assert_eq!(
        data,
        &serde_json::json!({"type": "error", "error": {"type": "api_error",
            "message": "Bedrock failed to answer (modelStreamErrorException); retry."}}),
        "the error type, and a message of the proxy's (Bedrock's can name accounts)"
    );

    // Closed cleanly after the first event: on the wire that looks whole, so the proxy says it
    // is not.
    fake.script(&alice_haiku(), fake::Script::EndAfterFirst);
    let resp = stream_request(&proxy, messages_body("claude-haiku-4-5", true)).await;
    let events = read_sse_gated(resp, None).await;
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(kinds, ["message_start", "error"]);
    assert_eq!(events[1].1["error"]["type"], "api_error");
    let rows = ledger_with(&proxy, 3).await;
    assert!(
        rows.iter().any(|r| r.outcome == "client_gone"),
        "the stalled stream, dropped by its client: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.outcome == "complete" && !r.complete),
        "a stream ended by an exception is not complete usage: {rows:?}"
    );
}

#[tokio::test]
async fn count_tokens_goes_to_the_foundation_model_and_a_refusal_is_501() {
    let (fake, proxy) = start("").await;
    let count = |model: &str| {
        let url = format!("{}/v1/messages/count_tokens?beta=true", proxy.url());
        let body = format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"tools":[]}}"#
        );
        async move {
            send(request(
                Method::POST,
                &url,
                &[
                    ("x-api-key", ALICE_KEY),
                    (
                        "anthropic-beta",
                        "claude-code-20250219,interleaved-thinking-2025-05-14",
                    ),
                ],
                body,
            ))
            .await
        }
    };
    let r = count("claude-sonnet-4-5").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json(), serde_json::json!({"input_tokens": 42}));
    let call = &runtime_calls(&fake)[0];
    assert_eq!(call.op, "count-tokens");
    assert_eq!(call.model, SONNET, "CountTokens takes the foundation model");
    assert!(call.signature.is_ok());
    let sent: serde_json::Value = serde_json::from_slice(&call.body).unwrap();
    let inner = base64::engine::general_purpose::STANDARD
        .decode(sent["input"]["invokeModel"]["body"].as_str().unwrap())
        .unwrap();
    let inner: serde_json::Value = serde_json::from_slice(&inner).unwrap();
    assert_eq!(inner["anthropic_version"], "bedrock-2023-05-31");
    assert_eq!(inner["max_tokens"], 1);
    assert_eq!(
        inner["anthropic_beta"],
        serde_json::json!(["claude-code-20250219"])
    );
    assert!(inner.get("tools").is_none() && inner.get("model").is_none());

    fake.script(
        HAIKU,
        fake::Script::Error(400, "ValidationException", "fake: count not supported"),
    );
    let r = count("claude-haiku-4-5").await;
    assert_eq!(r.status, 501);
    assert_eq!(r.headers["x-should-retry"], "false");
    assert_eq!(r.anthropic_error().0, "not_supported");
    let rows = ledger_with(&proxy, 2).await;
    assert!(
        rows.iter()
            .all(|r| r.operation == "CountTokens" && r.front.as_deref() == Some("anthropic"))
    );
}

#[tokio::test]
async fn bedrock_errors_arrive_in_the_anthropic_envelope_with_the_statuses_clients_act_on() {
    let (fake, proxy) = start("").await;
    for (status, kind, message, want_status, want_type, want_message) in [
        (
            429u16,
            "ThrottlingException",
            "Too many requests",
            429u16,
            "rate_limit_error",
            None,
        ),
        (
            503,
            "ServiceUnavailableException",
            "busy",
            529,
            "overloaded_error",
            None,
        ),
        (
            400,
            "ValidationException",
            "Input is too long.",
            400,
            "invalid_request_error",
            Some("Input is too long."),
        ),
        (
            400,
            "ValidationException",
            "prompt is too long: 210000 tokens > 200000 maximum",
            400,
            "invalid_request_error",
            Some("prompt is too long: 210000 tokens > 200000 maximum"),
        ),
        (
            403,
            "AccessDeniedException",
            "arn:aws:sts::123456789012:assumed-role/gw is not authorized",
            403,
            "permission_error",
            None,
        ),
        (
            500,
            "InternalServerException",
            "boom",
            500,
            "api_error",
            None,
        ),
    ] {
        fake.script(&alice_sonnet(), fake::Script::Error(status, kind, message));
        for stream in [false, true] {
            let r = messages(
                &proxy,
                ALICE_KEY,
                &messages_body("claude-sonnet-4-5", stream),
                &[],
            )
            .await;
            assert_eq!(r.status.as_u16(), want_status, "{kind} stream={stream}");
            let (t, m) = r.anthropic_error();
            assert_eq!(t, want_type, "{kind}");
            if let Some(w) = want_message {
                assert_eq!(
                    m, w,
                    "the client's recovery keys on Bedrock's exact message"
                );
            }
            assert!(!m.contains("123456789012"), "{m}");
        }
    }
}

#[tokio::test]
async fn the_proxys_own_refusals_are_anthropic_shaped_and_never_reach_bedrock() {
    let (fake, proxy) = start("[limits]\nmax_body_bytes = 2000").await;
    let body = messages_body("claude-sonnet-4-5", false);

    let no_key = send(request(
        Method::POST,
        &format!("{}/v1/messages", proxy.url()),
        &[("content-type", "application/json")],
        body.clone(),
    ))
    .await;
    assert_eq!(no_key.status, 401);
    assert_eq!(no_key.headers["x-should-retry"], "false");
    let (kind, message) = no_key.anthropic_error();
    assert_eq!(kind, "authentication_error");
    assert!(message.contains("ANTHROPIC_API_KEY"), "{message}");

    let bad_key = messages(&proxy, "bgk_wrong", &body, &[]).await;
    assert_eq!(bad_key.status, 401);
    assert!(bad_key.anthropic_error().1.contains("not known"));

    let bearer = send(request(
        Method::POST,
        &format!("{}/v1/messages", proxy.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        body.clone(),
    ))
    .await;
    assert_eq!(
        bearer.status, 200,
        "ANTHROPIC_AUTH_TOKEN is sent as a bearer"
    );

    for bad in ["{not json", "[]", r#"{"messages":[]}"#] {
        let r = messages(&proxy, ALICE_KEY, bad, &[]).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.anthropic_error().0, "invalid_request_error");
    }
    let big = messages(&proxy, ALICE_KEY, &"x".repeat(2001), &[]).await;
    assert_eq!(big.status, 413);
    assert_eq!(big.anthropic_error().0, "request_too_large");
    let unknown = send(request(
        Method::GET,
        &format!("{}/v1/files", proxy.url()),
        &[("x-api-key", ALICE_KEY)],
        "",
    ))
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.anthropic_error().0, "not_found_error");
    let long_project = "p".repeat(200);
    let labelled = messages(
        &proxy,
        ALICE_KEY,
        &body,
        &[("x-bedrock-gate-project", long_project.as_str())],
    )
    .await;
    assert_eq!(
        labelled.status, 400,
        "a label too long to record is refused"
    );
    assert_eq!(
        runtime_calls(&fake).len(),
        1,
        "only the good call reached Bedrock"
    );
    let logs = proxy.settled_logs().await;
    assert!(!logs.contains(ALICE_KEY), "{logs}");
}

#[tokio::test]
async fn usage_headers_warn_past_75_percent_and_the_cap_is_a_billing_error() {
    // Each Messages call costs 11 in, 7 out, 4 cache read, 3 cache write tokens (25 in all);
    // at $16,000 per million tokens of each kind that is $0.40 of a $1 budget.
    let (fake, proxy) = start(&format!(
        "[prices.\"{SONNET}\"]\ninput_per_mtok = 16000\noutput_per_mtok = 16000\ncache_read_per_mtok = 16000\ncache_write_per_mtok = 16000\n\
         [users.alice.limits]\nmonthly_budget_usd = 1.0"
    ))
    .await;
    let body = messages_body("claude-sonnet-4-5", false);
    let first = messages(&proxy, ALICE_KEY, &body, &[]).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.headers["anthropic-ratelimit-unified-status"],
        "allowed"
    );
    assert_eq!(
        first.headers["anthropic-ratelimit-unified-overage-utilization"],
        "0.00"
    );
    assert_eq!(
        first.headers["anthropic-ratelimit-unified-representative-claim"],
        "overage"
    );
    let reset: i64 = first.headers["anthropic-ratelimit-unified-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        reset > chrono::Utc::now().timestamp(),
        "the next month's start"
    );
    // A response's spend is counted before its last byte leaves, so the next call sees it.
    let second = messages(&proxy, ALICE_KEY, &body, &[]).await;
    assert_eq!(
        second.headers["anthropic-ratelimit-unified-overage-utilization"],
        "0.40"
    );
    let third = messages(&proxy, ALICE_KEY, &body, &[]).await;
    assert_eq!(third.status, 200);
    assert_eq!(
        third.headers["anthropic-ratelimit-unified-status"],
        "allowed_warning"
    );
    assert_eq!(
        third.headers["anthropic-ratelimit-unified-overage-utilization"],
        "0.80"
    );
    assert_eq!(
        third.headers["anthropic-ratelimit-unified-overage-surpassed-threshold"],
        "0.75"
    );

    let capped = messages(&proxy, ALICE_KEY, &body, &[]).await;
    assert_eq!(capped.status, 429, "$1.20 spent of $1");
    let (kind, message) = capped.anthropic_error();
    assert_eq!(kind, "billing_error");
    assert!(message.contains("resets at"), "{message}");
    assert_eq!(capped.headers["x-should-retry"], "false");
    assert_eq!(
        capped.headers["anthropic-ratelimit-unified-status"],
        "rejected"
    );
    assert_eq!(
        capped.headers["anthropic-ratelimit-unified-overage-period"],
        "monthly"
    );
    assert!(capped.headers.contains_key("retry-after"));
    assert!(
        !capped
            .headers
            .contains_key("anthropic-ratelimit-unified-representative-claim")
    );
    let calls = runtime_calls(&fake).len();
    let again = messages(&proxy, ALICE_KEY, &body, &[]).await;
    assert_eq!(again.status, 429);
    assert_eq!(runtime_calls(&fake).len(), calls, "refused before Bedrock");
}

#[tokio::test]
async fn the_model_list_is_the_callers_own_in_anthropic_names() {
    let (_fake, proxy) = start("").await;
    let get = |path: &str, key: &str| {
        let url = format!("{}{path}", proxy.url());
        let key = key.to_string();
        async move { send(request(Method::GET, &url, &[("x-api-key", &key)], "")).await }
    };
    let r = get("/v1/models", ALICE_KEY).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"]
    );
    assert_eq!(v["data"][1]["display_name"], "Claude Sonnet 4.5");
    assert_eq!(v["data"][1]["type"], "model");
    let bob = get("/v1/models", BOB_KEY).await.json();
    assert_eq!(bob["data"].as_array().unwrap().len(), 1);
    let one = get("/v1/models/claude-sonnet-4-5", ALICE_KEY).await;
    assert_eq!(one.json()["id"], "claude-sonnet-4-5-20250929");
    let not_mine = get("/v1/models/claude-haiku-4-5", BOB_KEY).await;
    assert_eq!(not_mine.status, 404);
    assert_eq!(get("/v1/models", "bgk_nobody").await.status, 401);
}

/// What one Messages client saw; anything else (above all a short answer that looks whole)
/// fails the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    Full,
    ErrorResponse,
    StreamError,
    TransferError,
}

async fn chaos_call(proxy_url: String, stream: bool) -> Seen {
    let resp = client()
        .request(request(
            Method::POST,
            &format!("{proxy_url}/v1/messages"),
            &[
                ("x-api-key", ALICE_KEY),
                ("content-type", "application/json"),
            ],
            messages_body("claude-sonnet-4-5", stream),
        ))
        .await
        .expect("the proxy always answers");
    let status = resp.status();
    let mut body = resp.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => bytes.extend_from_slice(f.data_ref().map(|d| &d[..]).unwrap_or(&[])),
            Err(_) if status == 200 => return Seen::TransferError,
            Err(e) => panic!("{status} body failed: {e}"),
        }
    }
    if status != 200 {
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON error body");
        assert_eq!(v["type"], "error");
        assert!(v["error"]["type"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        return Seen::ErrorResponse;
    }
    if !stream {
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON answer");
        assert_eq!(v["content"][0]["text"], fake::TEXT);
        return Seen::Full;
    }
    let text = String::from_utf8(bytes).expect("SSE is text");
    assert!(
        text.ends_with("\n\n"),
        "stream ended inside an event: {text:?}"
    );
    let last = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .and_then(|b| b.lines().next())
        .and_then(|l| l.strip_prefix("event: "))
        .expect("an event")
        .to_string();
    match last.as_str() {
        "error" => Seen::StreamError,
        "message_stop" => Seen::Full,
        other => panic!("a 200 stream that stops early, at {other}: {text}"),
    }
}

#[tokio::test]
async fn random_upstream_failures_each_end_cleanly_in_the_callers_protocol_with_one_row() {
    const N: usize = 400;
    let fake = FakeBedrock::start().await;
    fake.script(&alice_sonnet(), fake::Script::Chaos);
    let proxy = Proxy::start(&two_user_config(&fake, "[timeouts]\nfirst_byte_secs = 1\n")).await;
    let url = proxy.url();
    let seen = concurrently(N, 64, |i| chaos_call(url.clone(), i % 2 == 0)).await;
    let tally = tally_all(
        &seen,
        &[
            Seen::Full,
            Seen::ErrorResponse,
            Seen::StreamError,
            Seen::TransferError,
        ],
    );
    assert_eq!(fake.received().len(), N, "one upstream request per call");
    let rows = ledger_with(&proxy, N).await;
    assert_eq!(rows.len(), N, "{tally:?}");
    assert_eq!(
        rows.iter()
            .filter(|r| r.outcome == "upstream_error")
            .count(),
        tally[&Seen::TransferError],
        "each cut stream is recorded as upstream_error"
    );
}
