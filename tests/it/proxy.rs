//! Black-box tests of the real binary against the fake Bedrock: routing, signing, header
//! hygiene and refusals.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use http::Method;

#[tokio::test]
async fn each_user_reaches_bedrock_with_their_own_profile_signed_by_the_proxy() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;

    let a = post(
        &proxy,
        &format!("/model/us.{SONNET}/invoke"),
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["content"][0]["text"], fake::TEXT);
    assert_eq!(a.headers["x-amzn-bedrock-input-token-count"], "11");
    let b = post(
        &proxy,
        &format!("/model/us.{SONNET}/invoke"),
        BOB_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(b.status, 200);

    let got = fake.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].model, alice_sonnet());
    assert_eq!(got[1].model, bob_sonnet());
    assert_ne!(got[0].model, got[1].model);
    for r in &got {
        // The ARN travels as one path segment with `:` and `/` encoded.
        assert!(r.raw_path.starts_with("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2F"), "{}", r.raw_path);
        let sig = r.signature.as_ref().expect("signature verifies");
        assert_eq!(sig.access_key, sigv4::ACCESS_KEY);
        assert_eq!(sig.service, "bedrock");
        assert_eq!(sig.region, "us-east-1");
        assert_eq!(r.body, INVOKE_BODY.as_bytes(), "body forwarded untouched");
        assert!(r.headers.get("x-api-key").is_none());
        let auth = r.headers["authorization"].to_str().unwrap();
        assert!(!auth.contains(ALICE_KEY) && !auth.contains(BOB_KEY));
    }
}

#[tokio::test]
async fn every_spelling_of_the_model_resolves_and_regions_follow_the_profile() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let enc = |s: &str| s.replace(':', "%3A").replace('/', "%2F");
    let claude_style = |s: &str| s.replace('/', "%2F");
    let cases = [
        (SONNET.to_string(), alice_sonnet()),
        (format!("us.{SONNET}"), alice_sonnet()),
        (format!("global.{SONNET}"), alice_sonnet()),
        (
            enc(&format!(
                "arn:aws:bedrock:us-east-1::foundation-model/{SONNET}"
            )),
            alice_sonnet(),
        ),
        (
            enc(&format!(
                "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.{SONNET}"
            )),
            alice_sonnet(),
        ),
        (enc(&alice_sonnet()), alice_sonnet()),
        (claude_style(&alice_sonnet()), alice_sonnet()),
        ("alicesonnet1".to_string(), alice_sonnet()),
        (format!("eu.{HAIKU}"), alice_haiku()),
    ];
    for (path_id, _) in &cases {
        let r = converse(&proxy, path_id, ALICE_KEY).await;
        assert_eq!(r.status, 200, "{path_id}: {:?}", r.body);
    }
    let got = fake.received();
    for ((path_id, want), r) in cases.iter().zip(&got) {
        assert_eq!(&r.model, want, "{path_id}");
        let region = want.split(':').nth(3).unwrap();
        assert_eq!(
            r.signature.as_ref().unwrap().region,
            region,
            "{path_id} signed for the profile's region"
        );
    }
}

#[tokio::test]
async fn headers_are_filtered_and_caller_credentials_never_leak() {
    let fake = FakeBedrock::start().await;
    // A guardrail is a billing option alice must be allowed (see the hardening tests).
    let config = two_user_config(&fake, "").replace(
        "[users.alice]\n",
        "[users.alice]\nallow_headers = [\"guardrail\"]\n",
    );
    let proxy = Proxy::start(&config).await;
    let r = send(request(
        Method::POST,
        &format!("{}/model/{SONNET}/invoke", proxy.url()),
        &[
            ("x-api-key", ALICE_KEY),
            ("content-type", "application/json"),
            ("accept", "application/json"),
            ("x-amz-security-token", "caller-session-token"),
            ("x-amz-date", "20200101T000000Z"),
            ("accept-encoding", "gzip, br"),
            ("x-amzn-bedrock-guardrailidentifier", "gr-1"),
            ("x-amzn-bedrock-trace", "ENABLED"),
            ("anthropic-beta", "something"),
        ],
        INVOKE_BODY,
    ))
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let got = &fake.received()[0];
    let h = &got.headers;
    assert_eq!(h["x-amzn-bedrock-guardrailidentifier"], "gr-1");
    assert_eq!(h["x-amzn-bedrock-trace"], "ENABLED");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["accept"], "application/json");
    assert!(h.get("x-api-key").is_none());
    assert!(
        h.get("x-amz-security-token").is_none(),
        "caller's token must not leak; ours is absent with static creds"
    );
    assert!(h.get("accept-encoding").is_none());
    assert_ne!(h["x-amz-date"], "20200101T000000Z");
    assert_eq!(h["host"], fake.addr.to_string().as_str());
    let signed = &got.signature.as_ref().unwrap().signed_headers;
    assert!(signed.contains(&"x-amzn-bedrock-guardrailidentifier".to_string()));
    let logs = proxy.wait_for_log("InvokeModel").await;
    assert!(!logs.contains(ALICE_KEY), "key in log:\n{logs}");
    assert!(!logs.contains("\"hi\""), "prompt in log:\n{logs}");
}

#[tokio::test]
async fn count_tokens_goes_to_the_mapped_foundation_model() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let body = r#"{"input":{"invokeModel":{"body":"e30="}}}"#;
    let r = post(
        &proxy,
        &format!("/model/{}/count-tokens", alice_haiku().replace('/', "%2F")),
        ALICE_KEY,
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["inputTokens"], 42);
    let got = &fake.received()[0];
    assert_eq!(got.model, HAIKU);
    assert_eq!(got.op, "count-tokens");
    assert_eq!(got.signature.as_ref().unwrap().region, "us-west-2");
}

#[tokio::test]
async fn control_plane_reads_are_forwarded_for_system_and_own_profiles_only() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let auth = format!("Bearer {ALICE_KEY}");
    let get = |path: String| {
        let auth = auth.clone();
        let url = format!("{}{path}", proxy.url());
        async move { send(request(Method::GET, &url, &[("authorization", &auth)], "")).await }
    };
    let list = get("/inference-profiles?type=SYSTEM_DEFINED&maxResults=10".into()).await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    assert!(list.json()["inferenceProfileSummaries"].is_array());
    let own = get(format!(
        "/inference-profiles/{}",
        alice_sonnet().replace(':', "%3A").replace('/', "%2F")
    ))
    .await;
    assert_eq!(own.status, 200, "{:?}", own.body);
    assert_eq!(own.json()["inferenceProfileArn"], alice_sonnet());
    let system = get(format!("/inference-profiles/us.{SONNET}")).await;
    assert_eq!(system.status, 200);
    let other = get(format!(
        "/inference-profiles/{}",
        bob_sonnet().replace(':', "%3A").replace('/', "%2F")
    ))
    .await;
    assert_eq!(other.status, 403);
    assert_eq!(other.error_type(), "AccessDeniedException");

    // A system-profile ARN with a made-up id, one in a region its geo does not cover, and
    // one with a region that is no region's shape are refused before they reach a URL.
    let arn = |region: &str, id: &str| {
        format!("arn:aws:bedrock:{region}:123456789012:inference-profile/{id}")
            .replace(':', "%3A")
            .replace('/', "%2F")
    };
    for (path, status) in [
        (arn("us-east-1", "anything"), 403),
        (arn("us-east-1", "us.nothing"), 403),
        (arn("eu-west-1", &format!("us.{SONNET}")), 400),
        (arn("us-east-1-evil", &format!("us.{SONNET}")), 400),
        (arn("useast1", &format!("us.{SONNET}")), 400),
        ("us.nothing".to_string(), 403),
    ] {
        let r = get(format!("/inference-profiles/{path}")).await;
        assert_eq!(r.status, status, "{path}: {:?}", r.body);
    }

    let got = fake.received();
    assert_eq!(got.len(), 3, "the refused lookups never reached AWS");
    assert_eq!(got[0].op, "inference-profiles");
    assert_eq!(
        got[0].query.as_deref(),
        Some("type=SYSTEM_DEFINED&maxResults=10")
    );
    assert_eq!(got[1].model, alice_sonnet());
    for r in &got {
        assert_eq!(r.method, "GET");
        r.signature
            .as_ref()
            .expect("control-plane calls are signed too");
    }
}

#[tokio::test]
async fn refusals_are_aws_shaped_say_what_to_fix_and_never_reach_bedrock() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "[limits]\nmax_body_bytes = 1000")).await;
    let url = proxy.url();

    let no_key = send(request(
        Method::POST,
        &format!("{url}/model/{SONNET}/invoke"),
        &[],
        INVOKE_BODY,
    ))
    .await;
    assert_eq!(no_key.status, 403);
    assert_eq!(no_key.error_type(), "AccessDeniedException");
    assert!(
        no_key.message().contains("AWS_BEARER_TOKEN_BEDROCK"),
        "{}",
        no_key.message()
    );
    assert!(no_key.headers.contains_key("x-amzn-requestid"));

    let bad_key = post(
        &proxy,
        &format!("/model/{SONNET}/invoke"),
        "bgk_wrong",
        INVOKE_BODY,
    )
    .await;
    assert_eq!(bad_key.status, 403);
    assert!(
        bad_key.message().contains("not known"),
        "{}",
        bad_key.message()
    );

    let others = post(
        &proxy,
        &format!("/model/{}/invoke", bob_sonnet().replace('/', "%2F")),
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(others.status, 403);
    assert!(
        others.message().contains("belongs to another user"),
        "{}",
        others.message()
    );

    let unmapped = post(
        &proxy,
        &format!("/model/us.{OPUS}/invoke-with-response-stream"),
        BOB_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(
        unmapped.status, 403,
        "never 404: Claude Code reads 404 as 'model not on this deployment'"
    );
    assert_eq!(unmapped.error_type(), "AccessDeniedException");
    assert!(
        unmapped.message().contains(OPUS) && unmapped.message().contains("bob"),
        "{}",
        unmapped.message()
    );

    let malformed = post(
        &proxy,
        "/model/anthropic%20claude/invoke",
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.error_type(), "ValidationException");

    for (method, path) in [
        (Method::POST, "/model/x/explode"),
        (Method::GET, "/foundation-models"),
        (Method::DELETE, "/inference-profiles/x"),
        (Method::GET, "/"),
    ] {
        let r = send(request(
            method.clone(),
            &format!("{url}{path}"),
            &[("authorization", &format!("Bearer {ALICE_KEY}"))],
            "",
        ))
        .await;
        assert_eq!(r.status, 404, "{method} {path}");
        assert_eq!(r.error_type(), "UnknownOperationException");
    }

    let big = "x".repeat(1001);
    let too_big = post(&proxy, &format!("/model/{SONNET}/invoke"), ALICE_KEY, &big).await;
    assert_eq!(too_big.status, 413);
    assert!(
        too_big.message().contains("max_body_bytes"),
        "{}",
        too_big.message()
    );

    assert!(
        fake.received().is_empty(),
        "no refusal may reach Bedrock: {:?}",
        fake.received()
    );
    let logs = proxy.wait_for_log("AccessDeniedException").await;
    assert!(
        !logs.contains(ALICE_KEY) && !logs.contains(BOB_KEY),
        "{logs}"
    );
}

#[tokio::test]
async fn oversized_chunked_body_is_refused_too() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "[limits]\nmax_body_bytes = 1000")).await;
    // A streamed body has no Content-Length; the limit still applies while reading.
    let chunks = futures_util::stream::iter((0..20).map(|_| {
        Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::from(vec![b'x'; 100])))
    }));
    let body = http_body_util::StreamBody::new(chunks);
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(format!("{}/model/{SONNET}/invoke", proxy.url()))
        .header("authorization", format!("Bearer {ALICE_KEY}"))
        .body(body)
        .unwrap();
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn a_large_body_streamed_in_pieces_arrives_whole_and_correctly_signed() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    // 600 KB of a Converse body in uneven pieces, chunked: the proxy hashes them as they come
    // and sends them on without joining them.
    let mut pieces: Vec<bytes::Bytes> = vec![bytes::Bytes::from_static(
        br#"{"messages":[{"role":"user","content":[{"text":""#,
    )];
    pieces.extend(
        (0..150u32).map(|i| {
            bytes::Bytes::from(vec![b'a' + (i % 26) as u8; 1000 + (i as usize * 37) % 5000])
        }),
    );
    pieces.push(bytes::Bytes::from_static(br#""}]}]}"#));
    let whole: Vec<u8> = pieces.iter().flat_map(|p| p.to_vec()).collect();
    let chunks = futures_util::stream::iter(
        pieces
            .into_iter()
            .map(|p| Ok::<_, std::io::Error>(http_body::Frame::data(p))),
    );
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(format!("{}/model/{SONNET}/converse", proxy.url()))
        .header("authorization", format!("Bearer {ALICE_KEY}"))
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let resp = c.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = fake.received();
    assert_eq!(got[0].body.as_ref(), &whole[..]);
    assert!(got[0].signature.is_ok(), "{:?}", got[0].signature);
    assert_eq!(got[0].headers["content-length"], whole.len().to_string());
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    for (status, kind, msg) in [
        (
            429u16,
            "ThrottlingException",
            "Too many tokens, please wait before trying again.",
        ),
        (400, "ValidationException", "max_tokens: Field required"),
        (
            500,
            "InternalServerException",
            "The system encountered an unexpected error",
        ),
    ] {
        fake.script(&alice_sonnet(), fake::Script::Error(status, kind, msg));
        let r = post(
            &proxy,
            &format!("/model/{SONNET}/invoke"),
            ALICE_KEY,
            INVOKE_BODY,
        )
        .await;
        assert_eq!(r.status.as_u16(), status);
        assert!(r.error_type().starts_with(kind), "{}", r.error_type());
        assert!(
            r.error_type().contains("internal.amazon.com"),
            "suffix kept: {}",
            r.error_type()
        );
        assert_eq!(r.message(), msg);
    }
}

#[tokio::test]
async fn a_200_json_error_is_passed_through_as_json() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let body = r#"{"Output":{"__type":"com.amazon.coral.service#UnknownOperationException"}}"#;
    fake.script(&alice_sonnet(), fake::Script::Json200(body));
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/invoke-with-response-stream"),
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.body, body.as_bytes());
}

#[tokio::test]
async fn health_needs_no_key_and_reports_users() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let r = send(request(
        Method::GET,
        &format!("{}/healthz", proxy.url()),
        &[],
        "",
    ))
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(r.json()["users"], 2);
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn unreachable_upstream_is_a_clean_502() {
    // Nothing listens at the runtime endpoint: the connect fails, so the request never left.
    let config = unreachable_upstream_config();
    let proxy = Proxy::start(&config).await;
    let r = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_type(), "ServiceUnavailableException");
}

#[tokio::test]
async fn json_logs_have_one_line_per_request_with_user_profile_and_status() {
    let fake = FakeBedrock::start().await;
    let proxy =
        Proxy::start_with_args(&two_user_config(&fake, ""), &["--log-format", "json"]).await;
    let r = post(
        &proxy,
        &format!("/model/us.{SONNET}/converse"),
        ALICE_KEY,
        CONVERSE_BODY,
    )
    .await;
    assert_eq!(r.status, 200);
    let logs = proxy.wait_for_log("\"operation\":\"Converse\"").await;
    let line = logs
        .lines()
        .find(|l| l.contains("\"operation\":\"Converse\""))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["user"], "alice");
    assert_eq!(v["model"], format!("us.{SONNET}"));
    assert_eq!(v["profile"], alice_sonnet());
    assert_eq!(v["status"], 200);
    assert_eq!(v["outcome"], "complete");
    assert_eq!(v["bytes_out"].as_u64().unwrap(), r.body.len() as u64);
    assert!(v["latency_ms"].is_u64());
}

/// A container-credentials endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`, as ECS and EKS Pod
/// Identity give a task) handing out the test keys with a session token that expires
/// `lifetime` after each fetch; counts the fetches.
async fn container_credentials(lifetime: chrono::Duration) -> (String, Arc<AtomicUsize>) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    let app = axum::Router::new().route(
        "/creds",
        axum::routing::get(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let expiration = (chrono::Utc::now() + lifetime)
                    .format("%Y-%m-%dT%H:%M:%SZ")
                    .to_string();
                axum::Json(serde_json::json!({
                    "AccessKeyId": sigv4::ACCESS_KEY,
                    "SecretAccessKey": sigv4::SECRET_KEY,
                    "Token": "container-session-token",
                    "Expiration": expiration,
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/creds", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, fetches)
}

/// The proxy on credentials from the container endpoint only (the static test keys blanked).
async fn proxy_on_container_credentials(fake: &FakeBedrock, url: &str) -> Proxy {
    Proxy::start_with_env(
        &two_user_config(fake, ""),
        &[],
        &[
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", url),
        ],
    )
    .await
}

#[tokio::test]
async fn credentials_from_the_container_endpoint_are_fetched_once_not_per_request() {
    let fake = FakeBedrock::start().await;
    let (url, fetches) = container_credentials(chrono::Duration::hours(6)).await;
    let proxy = proxy_on_container_credentials(&fake, &url).await;

    for _ in 0..5 {
        let r = converse(&proxy, &format!("us.{SONNET}"), ALICE_KEY).await;
        assert_eq!(r.status, 200, "{:?}\n{}", r.body, proxy.logs());
    }
    let received = fake.received();
    assert_eq!(received.len(), 5);
    for r in &received {
        r.signature.as_ref().expect("signed with the fetched keys");
        assert_eq!(
            r.headers["x-amz-security-token"], "container-session-token",
            "the session token is sent"
        );
    }
    // Every request asking the endpoint again would be a round trip per call, and on EKS
    // (web identity) an STS call per call, throttled at a few per second.
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        1,
        "fetched once for 5 requests"
    );
}

#[tokio::test]
async fn credentials_about_to_expire_are_fetched_again_before_signing() {
    let fake = FakeBedrock::start().await;
    // Inside the refresh margin from the start: each signature needs fresh ones.
    let (url, fetches) = container_credentials(chrono::Duration::seconds(30)).await;
    let proxy = proxy_on_container_credentials(&fake, &url).await;

    for _ in 0..3 {
        let r = converse(&proxy, &format!("us.{SONNET}"), ALICE_KEY).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 3);
}
