//! Streams pass through frame by frame: proven without timing, by a fake that sends event N+1
//! only after the test client has received event N. A proxy that buffers deadlocks here.

use crate::common;

use std::time::Duration;

use bytes::BytesMut;
use common::*;
use http_body_util::BodyExt;

/// Reads the proxy's streaming response, releasing the fake's next event after each complete
/// message, and returns the messages.
async fn read_gated(
    proxy: &Proxy,
    path: &str,
    body: &str,
    gate: tokio::sync::mpsc::Sender<()>,
) -> Vec<aws_smithy_types::event_stream::Message> {
    let req = request(
        http::Method::POST,
        &format!("{}{path}", proxy.url()),
        &[
            ("authorization", &format!("Bearer {ALICE_KEY}")),
            ("accept", "application/vnd.amazon.eventstream"),
        ],
        body.to_string(),
    );
    let resp = client().request(req).await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/vnd.amazon.eventstream"
    );
    let mut body = resp.into_body();
    let mut decoder = aws_smithy_eventstream::frame::MessageFrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut messages = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body frame");
        if let Some(data) = frame.data_ref() {
            buf.extend_from_slice(data);
        }
        for m in fake::decode_messages(&mut decoder, &mut buf) {
            messages.push(m);
            // Only now may the fake send the next event.
            let _ = gate.try_send(());
        }
    }
    assert!(buf.is_empty(), "trailing partial frame");
    messages
}

/// A buffering proxy never delivers the first event, so the read never completes; this
/// deadline turns that deadlock into a failure instead of a hung CI job.
const DEADLOCK: Duration = Duration::from_secs(60);

#[tokio::test]
async fn invoke_with_response_stream_is_forwarded_event_by_event() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let gate = fake.gate_streams();
    let messages = tokio::time::timeout(
        DEADLOCK,
        read_gated(
            &proxy,
            &format!("/model/us.{SONNET}/invoke-with-response-stream"),
            INVOKE_BODY,
            gate,
        ),
    )
    .await
    .expect("the proxy buffered the stream: event N+1 is only sent after event N arrived");
    let expected = fake::anthropic_events(&alice_sonnet());
    assert_eq!(messages.len(), expected.len());
    for (m, want) in messages.iter().zip(&expected) {
        assert_eq!(fake::header_str(m, ":event-type").as_deref(), Some("chunk"));
        let payload: serde_json::Value = serde_json::from_slice(m.payload()).unwrap();
        use base64::Engine as _;
        let inner = base64::engine::general_purpose::STANDARD
            .decode(payload["bytes"].as_str().unwrap())
            .unwrap();
        let inner: serde_json::Value = serde_json::from_slice(&inner).unwrap();
        assert_eq!(&inner, want);
    }
}

#[tokio::test]
async fn converse_stream_is_forwarded_event_by_event() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let gate = fake.gate_streams();
    let messages = tokio::time::timeout(
        DEADLOCK,
        read_gated(
            &proxy,
            &format!("/model/{HAIKU}/converse-stream"),
            CONVERSE_BODY,
            gate,
        ),
    )
    .await
    .expect("the proxy buffered the stream");
    let types: Vec<String> = messages
        .iter()
        .map(|m| fake::header_str(m, ":event-type").unwrap())
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("messageStart"));
    assert_eq!(types.last().map(String::as_str), Some("metadata"));
    assert_eq!(types.len(), 9);
    assert_eq!(fake.received()[0].model, alice_haiku());
}

#[tokio::test]
async fn mid_stream_exceptions_reach_the_client_unchanged() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    fake.script(
        &alice_sonnet(),
        fake::Script::MidStreamException("throttlingException", "Too many requests mid-stream"),
    );
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/invoke-with-response-stream"),
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(r.status, 200);
    let mut decoder = aws_smithy_eventstream::frame::MessageFrameDecoder::new();
    let mut buf = BytesMut::from(&r.body[..]);
    let messages = fake::decode_messages(&mut decoder, &mut buf);
    assert_eq!(messages.len(), 2);
    let exc = &messages[1];
    assert_eq!(
        fake::header_str(exc, ":message-type").as_deref(),
        Some("exception")
    );
    assert_eq!(
        fake::header_str(exc, ":exception-type").as_deref(),
        Some("throttlingException")
    );
    assert_eq!(
        exc.payload().as_ref(),
        br#"{"message":"Too many requests mid-stream"}"#
    );
}

#[tokio::test]
async fn a_client_that_goes_away_mid_stream_is_logged_and_the_upstream_read_to_its_end() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let gate = fake.gate_streams(); // held: the stream stalls after event 1
    let req = request(
        http::Method::POST,
        &format!("{}/model/{SONNET}/invoke-with-response-stream", proxy.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        INVOKE_BODY,
    );
    let resp = client().request(req).await.expect("send");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("first frame").expect("ok");
    assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
    drop(body);
    // Let the fake send the rest: Bedrock bills the whole answer, so the proxy reads it to the
    // end (to nobody) and only then records the request.
    for _ in 0..16 {
        if gate.send(()).await.is_err() {
            break;
        }
    }
    let logs = proxy.wait_for_log("client_gone").await;
    assert!(logs.contains("InvokeModelWithResponseStream"), "{logs}");
    assert!(logs.contains("output_tokens=6"), "{logs}");
    assert_eq!(
        fake.streams_cut(),
        0,
        "the upstream stream was read to its end"
    );
}
