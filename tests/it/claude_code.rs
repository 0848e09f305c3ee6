//! Claude Code itself, unchanged, through the proxy against the fake Bedrock.
//!
//! Needs the pinned Claude Code that `.ci/run` installs (into
//! `~/.cache/bedrock-gate/claude-code`), or `BEDROCK_GATE_CLAUDE` pointing at a `claude`
//! binary. Without one the test fails and says how to get it: a skipped test proves nothing.

use crate::common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// Claude Code's default opus tier on Bedrock (us-east-1), as it probes it.
const CLAUDE_OPUS_DEFAULT: &str = "anthropic.claude-opus-5-5";

fn claude_binary() -> PathBuf {
    installed_client(
        "BEDROCK_GATE_CLAUDE",
        "claude-code/node_modules/.bin/claude",
        "Claude Code",
    )
}

fn config(fake: &FakeBedrock) -> String {
    config_with(
        fake,
        &format!(
            "\"{CLAUDE_OPUS_DEFAULT}\" = \"{}\"",
            arn("us-east-1", "devopus")
        ),
    )
}

fn config_with(fake: &FakeBedrock, extra_models: &str) -> String {
    format!(
        r#"
[aws]
region = "us-east-1"
runtime_endpoint = "{url}"
control_endpoint = "{url}"
[users.dev]
keys = ["{k}"]
[users.dev.models]
"{SONNET}" = "{s}"
"{HAIKU}" = "{h}"
{extra_models}
"#,
        url = fake.url(),
        k = hash(ALICE_KEY),
        s = arn("us-east-1", "devsonnet"),
        h = arn("us-east-1", "devhaiku"),
    )
}

/// Claude Code in Bedrock mode against the proxy, as the README sets it up.
fn bedrock_mode(proxy: &Proxy) -> Vec<(&'static str, String)> {
    vec![
        ("CLAUDE_CODE_USE_BEDROCK", "1".into()),
        ("ANTHROPIC_BEDROCK_BASE_URL", proxy.url()),
        ("AWS_BEARER_TOKEN_BEDROCK", ALICE_KEY.into()),
        ("AWS_REGION", "us-east-1".into()),
    ]
}

/// Claude Code in plain Anthropic mode against the proxy: no Bedrock variable at all.
fn anthropic_mode(proxy: &Proxy) -> Vec<(&'static str, String)> {
    vec![
        ("ANTHROPIC_BASE_URL", proxy.url()),
        ("ANTHROPIC_API_KEY", ALICE_KEY.into()),
    ]
}

async fn run_claude(proxy: &Proxy, extra_env: &[(&str, &str)]) -> (bool, String, String) {
    run_claude_in(&bedrock_mode(proxy), extra_env).await
}

pub(crate) async fn run_claude_in(
    mode: &[(&'static str, String)],
    extra_env: &[(&str, &str)],
) -> (bool, String, String) {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(claude_binary());
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_ERROR_REPORTING", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .current_dir(home.path())
        .arg("-p")
        .arg("Say hello")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in mode {
        cmd.env(k, v);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("claude -p did not finish in 180 s")
        .expect("run claude");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `claude -p` and fails, with everything needed to see why, unless it printed the
/// fake's answer.
async fn claude_must_answer(proxy: &Proxy, fake: &FakeBedrock, env: &[(&str, &str)]) {
    let (ok, stdout, stderr) = run_claude(proxy, env).await;
    let calls: Vec<String> = fake
        .received()
        .iter()
        .map(|r| format!("{} {}", r.method, r.raw_path))
        .collect();
    assert!(
        ok && stdout.contains(fake::TEXT),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nupstream calls: {calls:#?}\nproxy log:\n{}",
        proxy.logs()
    );
}

fn assert_all_attributed(fake: &FakeBedrock) {
    let got = fake.received();
    if std::env::var_os("BEDROCK_GATE_SHOW_CALLS").is_some() {
        for r in &got {
            eprintln!("upstream: {} {}", r.method, r.raw_path);
        }
    }
    let runtime: Vec<_> = got
        .iter()
        .filter(|r| r.raw_path.starts_with("/model/"))
        .collect();
    assert!(
        runtime
            .iter()
            .any(|r| r.op == "invoke-with-response-stream"),
        "no turn reached Bedrock: {got:#?}"
    );
    for r in &runtime {
        assert!(r.signature.is_ok(), "{:?}", r.signature);
        if r.op != "count-tokens" {
            assert!(
                r.model.contains(":application-inference-profile/dev"),
                "a call reached Bedrock without the user's profile: {} {}",
                r.op,
                r.model
            );
        }
    }
}

#[tokio::test]
async fn claude_code_with_its_default_models() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config(&fake)).await;
    claude_must_answer(&proxy, &fake, &[]).await;
    if std::env::var_os("BEDROCK_GATE_SHOW_CALLS").is_some() {
        eprintln!("{}", proxy.logs());
    }
    assert_all_attributed(&fake);
}

#[tokio::test]
async fn claude_code_with_anthropic_model_pinned_to_a_plain_id() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config(&fake)).await;
    claude_must_answer(
        &proxy,
        &fake,
        &[("ANTHROPIC_MODEL", &format!("us.{HAIKU}"))],
    )
    .await;
    assert_all_attributed(&fake);
    let turns: Vec<_> = fake
        .received()
        .into_iter()
        .filter(|r| r.op == "invoke-with-response-stream")
        .collect();
    assert!(
        turns
            .iter()
            .any(|r| r.model == arn("us-east-1", "devhaiku")),
        "the pinned model's profile was used"
    );
}

#[tokio::test]
async fn claude_code_falls_back_when_a_tier_is_not_mapped() {
    // Only sonnet and haiku are mapped: the opus probe gets a 403 and Claude Code must settle
    // on a tier the user has, never reaching Bedrock without a profile.
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config_with(&fake, "")).await;
    claude_must_answer(&proxy, &fake, &[]).await;
    assert_all_attributed(&fake);
    // The opus probe was refused.
    proxy.wait_for_log("AccessDeniedException").await;
}

#[tokio::test]
async fn claude_code_with_anthropic_model_set_to_the_users_profile_arn() {
    // The by-hand setup users come from: the profile ARN pasted into ANTHROPIC_MODEL. Claude
    // Code then asks GetInferenceProfile for the underlying model, through the proxy.
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config(&fake)).await;
    let arn = arn("us-east-1", "devsonnet");
    claude_must_answer(&proxy, &fake, &[("ANTHROPIC_MODEL", &arn)]).await;
    assert_all_attributed(&fake);
    let got = fake.received();
    assert!(
        got.iter()
            .any(|r| r.op == "get-inference-profile" && r.model == arn),
        "{got:#?}"
    );
    assert!(
        got.iter()
            .any(|r| r.op == "invoke-with-response-stream" && r.model == arn),
        "{got:#?}"
    );
}

#[tokio::test]
async fn claude_code_in_plain_anthropic_mode_calls_on_the_users_own_profiles() {
    // ANTHROPIC_BASE_URL + ANTHROPIC_API_KEY and nothing else: Claude Code speaks the Messages
    // API, and the proxy puts every call on the user's profile for the model it names.
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config(&fake)).await;
    let (ok, stdout, stderr) = run_claude_in(&anthropic_mode(&proxy), &[]).await;
    assert!(
        ok && stdout.contains(fake::TEXT),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nproxy log:\n{}",
        proxy.logs()
    );
    assert_all_attributed(&fake);
    let rows = ledger_with(&proxy, 1).await;
    assert!(
        rows.iter()
            .all(|r| r.front.as_deref() == Some("anthropic") && r.user.as_deref() == Some("dev")),
        "{rows:#?}"
    );
    assert!(
        rows.iter().any(|r| r.operation == "MessagesStream"
            && r.profile.as_deref() == Some(arn("us-east-1", "devopus").as_str())
            && r.session.is_some()),
        "the turn, on the opus profile Claude Code's default names, with its session: {rows:#?}"
    );
}

#[tokio::test]
async fn claude_code_in_bedrock_mode_signs_with_an_issued_key_pair() {
    // AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY instead of a bearer token: Claude Code signs
    // every call (the model probes and GetInferenceProfile included) with the issued pair.
    use crate::access_keys::{ALICE_ID, master_key, secret_of};
    let fake = FakeBedrock::start().await;
    let config = config(&fake).replace(
        "[users.dev]\n",
        &format!("[users.dev]\naccess_key_ids = [\"{ALICE_ID}\"]\n"),
    );
    let proxy = Proxy::start_with_env(
        &config,
        &[],
        &[("BEDROCK_GATE_SIGV4_MASTER_KEY", &master_key())],
    )
    .await;
    let secret = secret_of(ALICE_ID);
    let arn = arn("us-east-1", "devsonnet");
    let mode = vec![
        ("CLAUDE_CODE_USE_BEDROCK", "1".to_string()),
        ("ANTHROPIC_BEDROCK_BASE_URL", proxy.url()),
        ("AWS_ACCESS_KEY_ID", ALICE_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", secret.clone()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let (ok, stdout, stderr) = run_claude_in(&mode, &[("ANTHROPIC_MODEL", &arn)]).await;
    assert!(
        ok && stdout.contains(fake::TEXT),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nproxy log:\n{}",
        proxy.logs()
    );
    assert_all_attributed(&fake);
    let got = fake.received();
    assert!(
        got.iter()
            .any(|r| r.op == "get-inference-profile" && r.model == arn),
        "{got:#?}"
    );
    let rows = ledger_with(&proxy, 2).await;
    assert!(
        rows.iter().all(|r| r.user.as_deref() == Some("dev")),
        "{rows:#?}"
    );
    let logs = proxy.settled_logs().await;
    assert!(!logs.contains("InvalidSignatureException"), "{logs}");
    assert!(!logs.contains(&secret));
}
