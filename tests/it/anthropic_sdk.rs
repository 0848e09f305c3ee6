//! The official `anthropic` Python SDK, unchanged, through the proxy's Messages front against
//! the fake Bedrock: create, stream, count_tokens, the model list and the error classes
//! (`anthropic_sdk.py` beside this file). The fake checks that every call arrived on the
//! caller's profile, signed, with the translated body.
//!
//! Needs the venv that `.ci/run` makes (`~/.cache/bedrock-gate/venv`, with the pinned SDK), or
//! `BEDROCK_GATE_PYTHON` pointing at a Python that has it. Without one the test fails and says
//! how to get it: a skipped test proves nothing.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

fn python() -> PathBuf {
    installed_client(
        "BEDROCK_GATE_PYTHON",
        "venv/bin/python",
        "A Python with the anthropic SDK",
    )
}

const OLD_HAIKU: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";

#[tokio::test]
async fn the_anthropic_python_sdk_works_unchanged() {
    let fake = FakeBedrock::start().await;
    let broken = arn("us-east-1", "alicebroken");
    fake.script(
        &broken,
        fake::Script::MidStreamException("modelStreamErrorException", "fake: model stream error"),
    );
    let config = format!(
        r#"
[aws]
region = "us-east-1"
runtime_endpoint = "{url}"
control_endpoint = "{url}"
[users.alice]
keys = ["{ka}"]
[users.alice.models]
"{SONNET}" = "{a_sonnet}"
"{HAIKU}" = "{a_haiku}"
"{OLD_HAIKU}" = "{broken}"
[users.bob]
keys = ["{kb}"]
[users.bob.models]
"{SONNET}" = "{b_sonnet}"
[users.bob.limits]
requests_per_minute = 1
"#,
        url = fake.url(),
        ka = hash(ALICE_KEY),
        kb = hash(BOB_KEY),
        a_sonnet = alice_sonnet(),
        a_haiku = alice_haiku(),
        b_sonnet = bob_sonnet(),
    );
    let proxy = Proxy::start(&config).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/anthropic_sdk.py");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(script)
            .env("BASE_URL", proxy.url())
            .env("KEY", ALICE_KEY)
            .env("LIMITED_KEY", BOB_KEY)
            .env("OTHER_PROFILE", bob_sonnet())
            .env("BROKEN_MODEL", "claude-3-5-haiku-20241022")
            .env_remove("ANTHROPIC_API_KEY")
            .env_remove("ANTHROPIC_BASE_URL")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the SDK script did not finish in 120 s")
    .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "stdout:\n{stdout}\nstderr:\n{stderr}\nproxy log:\n{}",
        proxy.logs()
    );

    let calls: Vec<_> = fake
        .received()
        .into_iter()
        .filter(|r| r.raw_path.starts_with("/model/"))
        .collect();
    // create, stream, stream=True, count_tokens, bob's one allowed call, the broken stream.
    assert_eq!(calls.len(), 6, "{calls:#?}");
    for c in &calls {
        assert!(c.signature.is_ok(), "{:?}", c.signature);
        assert!(c.headers.get("x-api-key").is_none());
        if c.op == "count-tokens" {
            assert_eq!(c.model, SONNET, "CountTokens takes the foundation model");
            continue;
        }
        assert!(
            [alice_sonnet(), alice_haiku(), broken.clone(), bob_sonnet()].contains(&c.model),
            "not a caller's own profile: {}",
            c.model
        );
        let body: serde_json::Value = serde_json::from_slice(&c.body).unwrap();
        assert_eq!(body["anthropic_version"], "bedrock-2023-05-31");
        assert!(body.get("model").is_none() && body.get("stream").is_none());
    }
    assert_eq!(calls[0].model, alice_sonnet());
    assert_eq!(calls[0].op, "invoke");
    let first: serde_json::Value = serde_json::from_slice(&calls[0].body).unwrap();
    assert_eq!(first["metadata"]["user_id"], "sdk-user");
    assert_eq!(calls[1].op, "invoke-with-response-stream");
    assert_eq!(calls[1].model, alice_haiku());

    // Every call of an identified caller is one row, refusals included; the model list is
    // answered by the proxy and the unknown key identifies nobody.
    let rows = ledger_with(&proxy, 9).await;
    let ops: Vec<(&str, i64)> = rows
        .iter()
        .map(|r| (r.operation.as_str(), r.status))
        .collect();
    assert_eq!(
        ops,
        [
            ("Messages", 200),
            ("MessagesStream", 200),
            ("MessagesStream", 200),
            ("CountTokens", 200),
            ("Messages", 400),
            ("Messages", 400),
            ("Messages", 200),
            ("Messages", 429),
            ("MessagesStream", 200),
        ],
        "{rows:#?}"
    );
    assert_eq!(rows[0].project.as_deref(), Some("sdk-project"));
    assert!(rows.iter().all(|r| r.front.as_deref() == Some("anthropic")));
}
