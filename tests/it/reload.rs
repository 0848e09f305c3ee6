//! Live reload of the running binary: file changes and SIGHUP swap the config atomically; an
//! invalid file is refused and the old config keeps serving; streams in flight finish.

use crate::common;

use common::*;
use http_body_util::BodyExt;

/// Polls until `generation` is live. Reload is asynchronous by design; this waits for it
/// rather than sleeping a guessed time.
async fn wait_generation(proxy: &Proxy, generation: u64) {
    eventually(
        &format!("config generation {generation} goes live"),
        || async { (proxy.health().await["config_generation"] == generation).then_some(()) },
    )
    .await;
}

fn admin(proxy: &Proxy, args: &[&str]) -> String {
    let out = command(proxy.dir.path())
        .args(args)
        .arg("--config")
        .arg(&proxy.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_key_issued_or_revoked_with_the_cli_takes_effect_on_the_running_proxy() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let h0 = proxy.health().await;
    assert_eq!(h0["config_generation"], 1);

    let new_key = admin(&proxy, &["keys", "add", "alice"]).trim().to_string();
    wait_generation(&proxy, 2).await;
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/converse"),
        &new_key,
        CONVERSE_BODY,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    admin(&proxy, &["keys", "revoke", "alice", "--all"]);
    wait_generation(&proxy, 3).await;
    for key in [ALICE_KEY, new_key.as_str()] {
        let r = converse(&proxy, SONNET, key).await;
        assert_eq!(r.status, 403, "revoked key still works");
    }
    let r = converse(&proxy, SONNET, BOB_KEY).await;
    assert_eq!(r.status, 200, "other users unaffected");
    let h = proxy.health().await;
    assert_ne!(h["config_sha256"], h0["config_sha256"]);
    assert!(
        !proxy.settled_logs().await.contains(&new_key),
        "a key reached the log"
    );
}

#[tokio::test]
async fn a_broken_file_is_rejected_and_the_old_config_keeps_serving() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        good.replace("[users.alice]", "[users.alice]\nkeyz = []"),
    )
    .unwrap();
    let logs = proxy.wait_for_log("config reload rejected").await;
    assert!(
        logs.contains("users.alice.keyz"),
        "the log names the bad key:\n{logs}"
    );
    let r = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(r.status, 200);
    assert_eq!(proxy.health().await["config_generation"], 1);

    // Fixing the file is picked up.
    std::fs::write(
        &proxy.config_path,
        good.replace(&hash(ALICE_KEY), &hash("bgk_other")),
    )
    .unwrap();
    wait_generation(&proxy, 2).await;
    let r = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(r.status, 403);
}

#[tokio::test]
async fn a_truncated_file_is_not_swapped_in_unless_the_admin_allows_it() {
    // Some editors truncate the file before writing it: the empty file parses, to no users
    // and the real-AWS default endpoints. That reload is refused and everyone keeps working.
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    std::fs::write(&proxy.config_path, "").unwrap();
    let logs = proxy.wait_for_log("config reload rejected").await;
    assert!(
        logs.contains("has no users while 2 are being served"),
        "{logs}"
    );
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    assert_eq!(proxy.health().await["config_generation"], 1);

    // With the flag, emptying the config is a decision, and it is carried out.
    let proxy =
        Proxy::start_with_args(&two_user_config(&fake, ""), &["--allow-empty-reload"]).await;
    std::fs::write(&proxy.config_path, "").unwrap();
    wait_generation(&proxy, 2).await;
    assert_eq!(proxy.health().await["users"], 0);
}

#[tokio::test]
async fn a_plaintext_key_in_the_wrong_shape_is_never_echoed() {
    // `keys = "bgk_…"` (a string, not a list of hashes): the parse error must not quote it,
    // neither in the reload log nor in `check`.
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    let leaked = good.replace(
        &format!("keys = [\"{}\"]", hash(ALICE_KEY)),
        &format!("keys = \"{ALICE_KEY}\""),
    );
    assert_ne!(leaked, good);
    std::fs::write(&proxy.config_path, &leaked).unwrap();
    let logs = proxy.wait_for_log("config reload rejected").await;
    assert!(logs.contains("users.alice.keys"), "{logs}");
    assert!(
        !logs.contains(ALICE_KEY),
        "the key reached the log:\n{logs}"
    );
    let check = run(
        proxy.dir.path(),
        &["check", "-c", proxy.config_path.to_str().unwrap()],
    )
    .await;
    assert!(!check.ok);
    assert!(
        check.stderr.contains("users.alice.keys"),
        "{}",
        check.stderr
    );
    assert!(!check.stderr.contains(ALICE_KEY), "{}", check.stderr);
}

#[tokio::test]
async fn a_stream_in_flight_finishes_on_the_config_it_started_with() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let gate = fake.gate_streams();
    let req = keyed(
        &proxy,
        &format!("/model/{SONNET}/invoke-with-response-stream"),
        ALICE_KEY,
        INVOKE_BODY,
    );
    let resp = client().request(req).await.unwrap();
    let mut body = resp.into_body();
    let mut bytes = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .to_vec();

    // Remove alice entirely while her stream is open.
    admin(&proxy, &["users", "remove", "alice"]);
    wait_generation(&proxy, 2).await;
    let r = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(r.status, 403, "new calls use the new config");

    // Release the rest of the stream: it completes.
    let events = fake::anthropic_events(&alice_sonnet()).len();
    for _ in 1..events {
        gate.send(()).await.unwrap();
    }
    while let Some(f) = body.frame().await {
        bytes.extend_from_slice(&f.unwrap().into_data().unwrap());
    }
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut decoder = aws_smithy_eventstream::frame::MessageFrameDecoder::new();
    assert_eq!(fake::decode_messages(&mut decoder, &mut buf).len(), events);

    // And it was accounted to alice and her profile, although she is gone from the config.
    let mut proxy = proxy;
    assert!(proxy.terminate().success());
    let conn = rusqlite::Connection::open(proxy.ledger_path()).unwrap();
    let (user, profile, complete, tokens): (String, String, bool, i64) = conn
        .query_row(
            "SELECT user, profile_arn, complete, output_tokens FROM requests WHERE operation = 'InvokeModelWithResponseStream'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        (user.as_str(), profile, complete, tokens),
        ("alice", alice_sonnet(), true, 6)
    );
}

#[tokio::test]
async fn sighup_reloads_when_watching_is_off() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start_with_args(&two_user_config(&fake, ""), &["--no-watch"]).await;
    proxy.edit_config(|t| t.replace(&hash(BOB_KEY), &hash("bgk_bob_rotated")));
    let status = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(proxy.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    wait_generation(&proxy, 2).await;
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/converse"),
        "bgk_bob_rotated",
        CONVERSE_BODY,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(converse(&proxy, SONNET, BOB_KEY).await.status, 403);
}
