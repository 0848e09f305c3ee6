//! A real client: aws-sdk-bedrockruntime with a bearer token and an endpoint override, through
//! the proxy, for all five runtime operations. Responses must parse and every stream event
//! must arrive, exactly as against Bedrock.

use crate::common;

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::{BehaviorVersion, Region, Token};
use aws_sdk_bedrockruntime::error::ProvideErrorMetadata;
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseStreamOutput, CountTokensInput,
    InvokeModelTokensRequest, Message, ResponseStream,
};
use common::*;

fn sdk_client(proxy: &Proxy, key: &str) -> Client {
    let config = aws_sdk_bedrockruntime::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(proxy.url())
        .bearer_token(Token::new(key, None))
        .build();
    Client::from_conf(config)
}

fn hello() -> Message {
    Message::builder()
        .role(ConversationRole::User)
        .content(ContentBlock::Text("hi".into()))
        .build()
        .unwrap()
}

#[tokio::test]
async fn converse_and_converse_stream() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let client = sdk_client(&proxy, ALICE_KEY);

    let out = client
        .converse()
        .model_id(format!("us.{SONNET}"))
        .messages(hello())
        .send()
        .await
        .unwrap();
    let text = out.output().unwrap().as_message().unwrap().content()[0]
        .as_text()
        .unwrap()
        .clone();
    assert_eq!(text, fake::TEXT);
    assert_eq!(out.usage().unwrap().input_tokens(), 9);

    let mut stream = client
        .converse_stream()
        .model_id(HAIKU)
        .messages(hello())
        .send()
        .await
        .unwrap()
        .stream;
    let mut text = String::new();
    let mut events = 0;
    let mut usage = None;
    while let Some(event) = stream.recv().await.unwrap() {
        events += 1;
        match event {
            ConverseStreamOutput::ContentBlockDelta(d) => {
                if let Some(ContentBlockDelta::Text(t)) = d.delta() {
                    text.push_str(t);
                }
            }
            ConverseStreamOutput::Metadata(m) => usage = m.usage().map(|u| u.output_tokens()),
            _ => {}
        }
    }
    assert_eq!(events, 9);
    assert_eq!(text, fake::TEXT);
    assert_eq!(usage, Some(5));

    let got = fake.received();
    assert_eq!(got[0].model, alice_sonnet());
    assert_eq!(got[1].model, alice_haiku());
    assert!(got.iter().all(|r| r.signature.is_ok()));
}

#[tokio::test]
async fn invoke_model_and_invoke_model_with_response_stream() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let client = sdk_client(&proxy, BOB_KEY);

    // The SDK percent-encodes `:` and `/` in the ARN; the proxy must accept that spelling.
    let out = client
        .invoke_model()
        .model_id(bob_sonnet())
        .content_type("application/json")
        .body(Blob::new(INVOKE_BODY))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(out.body().as_ref()).unwrap();
    assert_eq!(body["content"][0]["text"], fake::TEXT);

    let mut stream = client
        .invoke_model_with_response_stream()
        .model_id(format!("us.{SONNET}"))
        .content_type("application/json")
        .body(Blob::new(INVOKE_BODY))
        .send()
        .await
        .unwrap()
        .body;
    let mut events = Vec::new();
    while let Some(event) = stream.recv().await.unwrap() {
        if let ResponseStream::Chunk(part) = event {
            let v: serde_json::Value =
                serde_json::from_slice(part.bytes().unwrap().as_ref()).unwrap();
            events.push(v);
        }
    }
    assert_eq!(events, fake::anthropic_events(&bob_sonnet()));

    let got = fake.received();
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|r| r.model == bob_sonnet()));
}

#[tokio::test]
async fn count_tokens() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let client = sdk_client(&proxy, ALICE_KEY);
    let out = client
        .count_tokens()
        .model_id(SONNET)
        .input(CountTokensInput::InvokeModel(
            InvokeModelTokensRequest::builder()
                .body(Blob::new(INVOKE_BODY))
                .build()
                .unwrap(),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(out.input_tokens(), 42);
    assert_eq!(fake.received()[0].model, SONNET);
}

#[tokio::test]
async fn errors_parse_as_the_sdks_modelled_exceptions() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;

    // The proxy's own refusal.
    let err = sdk_client(&proxy, BOB_KEY)
        .converse()
        .model_id(HAIKU)
        .messages(hello())
        .send()
        .await
        .unwrap_err();
    let err = err.into_service_error();
    assert!(err.is_access_denied_exception(), "{err:?}");
    assert!(err.message().unwrap().contains("bob"), "{err:?}");

    // Upstream throttling, passed through.
    fake.script(
        &alice_sonnet(),
        fake::Script::Error(429, "ThrottlingException", "slow down"),
    );
    let err = sdk_client(&proxy, ALICE_KEY)
        .converse()
        .model_id(SONNET)
        .messages(hello())
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_throttling_exception(), "{err:?}");
    assert_eq!(err.message(), Some("slow down"));

    // A mid-stream exception surfaces as the stream's modelled error.
    fake.script(
        &alice_haiku(),
        fake::Script::MidStreamException("throttlingException", "mid-stream slow down"),
    );
    let mut stream = sdk_client(&proxy, ALICE_KEY)
        .invoke_model_with_response_stream()
        .model_id(HAIKU)
        .body(Blob::new(INVOKE_BODY))
        .send()
        .await
        .unwrap()
        .body;
    let first = stream.recv().await.unwrap();
    assert!(matches!(first, Some(ResponseStream::Chunk(_))));
    let err = stream.recv().await.unwrap_err();
    let err = err.into_service_error();
    assert!(err.is_throttling_exception(), "{err:?}");
}
