//! Both fronts run one pipeline: the same refusal, whichever protocol it came in, is worded in
//! that protocol's shape, never reaches Bedrock, and is recorded the same way (one ledger row for
//! an identified caller; an unknown key gets a log line, and no row, on either).

use crate::common;

use common::*;
use http::Method;

/// The same call on each front: a Bedrock-native InvokeModel and a Messages create.
async fn on_both(proxy: &Proxy, key: &str, model: &str) -> (Reply, Reply) {
    let bedrock = post(
        proxy,
        &format!("/model/{}/invoke", model.replace('/', "%2F")),
        key,
        INVOKE_BODY,
    )
    .await;
    let anthropic = messages(proxy, key, &messages_body(model, false), &[]).await;
    (bedrock, anthropic)
}

#[tokio::test]
async fn the_same_refusals_in_each_fronts_shape_recorded_once() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[users.bob.limits]\nmonthly_budget_usd = 0",
    ))
    .await;

    // Unknown key.
    let (b, a) = on_both(&proxy, "bgk_nobody", SONNET).await;
    assert_eq!(
        (b.status.as_u16(), b.error_type().as_str()),
        (403, "AccessDeniedException")
    );
    assert!(
        b.message().contains("AWS_BEARER_TOKEN_BEDROCK"),
        "{}",
        b.message()
    );
    assert_eq!(a.status, 401);
    assert_eq!(a.anthropic_error().0, "authentication_error");
    assert!(a.anthropic_error().1.contains("ANTHROPIC_API_KEY"));

    // Another user's profile.
    let (b, a) = on_both(&proxy, ALICE_KEY, &bob_sonnet()).await;
    assert_eq!(
        (b.status.as_u16(), b.error_type().as_str()),
        (403, "AccessDeniedException")
    );
    assert!(b.message().contains("belongs to another user"));
    assert_eq!(a.status, 400);
    assert_eq!(a.anthropic_error().0, "invalid_request_error");
    assert!(a.anthropic_error().1.contains("belongs to another user"));

    // Over budget ($0 of $0).
    let (b, a) = on_both(&proxy, BOB_KEY, SONNET).await;
    assert_eq!(
        (b.status.as_u16(), b.error_type().as_str()),
        (429, "ThrottlingException")
    );
    assert!(b.message().contains("monthly budget"), "{}", b.message());
    assert_eq!(a.status, 429);
    assert_eq!(a.anthropic_error().0, "billing_error");
    assert_eq!(a.headers["x-should-retry"], "false");
    assert!(a.anthropic_error().1.contains("monthly budget"));

    assert!(fake.received().is_empty(), "no refusal reached Bedrock");
    let rows = ledger_with(&proxy, 4).await;
    let seen: Vec<(Option<&str>, Option<&str>, i64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.user.as_deref(),
                r.front.as_deref(),
                r.status,
                r.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (Some("alice"), Some("bedrock"), 403, "AccessDeniedException"),
            (
                Some("alice"),
                Some("anthropic"),
                400,
                "AccessDeniedException"
            ),
            (Some("bob"), Some("bedrock"), 429, "ThrottlingException"),
            (Some("bob"), Some("anthropic"), 429, "ThrottlingException"),
        ],
        "one row per identified call, the refusal named alike on both fronts"
    );
    // Give the unidentified calls as long as the others had: still no row.
    // (A log line is written once its answer has ended, so wait for the last call's.)
    let logs = proxy.wait_for_log("user=\"bob\" front=\"anthropic\"").await;
    assert_eq!(ledger(&proxy).len(), 4);
    assert!(
        logs.matches("bedrock_gate::access").count() >= 6,
        "every call, unknown keys included, has its log line:\n{logs}"
    );
}

#[tokio::test]
async fn labels_reach_the_ledger_from_either_front_and_the_report_groups_by_them() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let labelled = [
        ("x-bedrock-gate-project", "apollo"),
        ("x-claude-code-session-id", "s-1"),
    ];
    let r = send(request(
        Method::POST,
        &format!("{}/model/{SONNET}/converse", proxy.url()),
        &[
            ("authorization", &format!("Bearer {ALICE_KEY}")),
            labelled[0],
            labelled[1],
        ],
        CONVERSE_BODY,
    ))
    .await;
    assert_eq!(r.status, 200);
    let r = messages(
        &proxy,
        ALICE_KEY,
        r#"{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[],"tags":{"project":"gemini"}}"#,
        &[labelled[1]],
    )
    .await;
    assert_eq!(r.status, 200);
    let r = messages(
        &proxy,
        BOB_KEY,
        &messages_body("claude-sonnet-4-5", false),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    let rows = ledger_with(&proxy, 3).await;
    let labels: Vec<(Option<&str>, Option<&str>)> = rows
        .iter()
        .map(|r| (r.project.as_deref(), r.session.as_deref()))
        .collect();
    assert_eq!(
        labels,
        [
            (Some("apollo"), Some("s-1")),
            (Some("gemini"), Some("s-1")),
            (None, None)
        ]
    );

    let report = |by: &str| {
        let out = command(proxy.dir.path())
            .args(["usage", "-c"])
            .arg(&proxy.config_path)
            .args(["--by", by, "--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut rows: Vec<(String, u64)> = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["key"].as_str().unwrap().to_string(),
                    r["requests"].as_u64().unwrap(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(
        report("project"),
        [
            ("-".to_string(), 1),
            ("apollo".to_string(), 1),
            ("gemini".to_string(), 1)
        ]
    );
    assert_eq!(
        report("session"),
        [("-".to_string(), 1), ("s-1".to_string(), 2)]
    );
    assert_eq!(
        report("front"),
        [("anthropic".to_string(), 2), ("bedrock".to_string(), 1)]
    );
}
