//! Every request is recorded exactly once, whatever happens to it: a client that gives up
//! before Bedrock answers, a stream cut at shutdown, an upstream that cannot be reached. And
//! only what was admitted counts against a rate limit, before and after a restart.

use crate::common;

use std::time::Duration;

use common::*;
use http::Method;
use http_body_util::BodyExt;

fn ledger(proxy: &Proxy) -> Vec<(String, i64, bool, bool, String)> {
    ledger_query(
        proxy,
        "SELECT coalesce(user, '-'), status, complete, admitted, outcome FROM requests ORDER BY id",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )
}

#[tokio::test]
async fn a_client_that_gives_up_before_bedrock_answers_is_still_recorded() {
    // The call reached Bedrock, so the proxy keeps waiting for the answer after the client
    // left (it would be billed); here Bedrock never answers, and the row says so when
    // timeouts.first_byte_secs runs out.
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "[timeouts]\nfirst_byte_secs = 1")).await;
    fake.script(&alice_sonnet(), fake::Script::Hang);
    let url = format!("{}/model/{SONNET}/converse", proxy.url());
    let call = tokio::spawn(async move {
        send(request(
            Method::POST,
            &url,
            &[("authorization", &format!("Bearer {ALICE_KEY}"))],
            CONVERSE_BODY,
        ))
        .await
    });
    eventually("the call reached the fake", || async {
        (fake.received().len() == 1).then_some(())
    })
    .await;
    call.abort();
    let _ = call.await;
    proxy.wait_for_log("ModelTimeoutException").await;
    assert!(proxy.terminate().success());
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (user, status, complete, admitted, outcome) = &rows[0];
    assert_eq!(user, "alice");
    assert_eq!(*status, 504);
    assert!(!complete, "Bedrock may have run it: not complete");
    assert!(admitted);
    assert_eq!(outcome, "ModelTimeoutException");
}

#[tokio::test]
async fn a_stream_still_open_when_the_grace_period_ends_is_cut_and_recorded() {
    let fake = FakeBedrock::start().await;
    let mut proxy =
        Proxy::start_with_args(&two_user_config(&fake, ""), &["--shutdown-grace-secs", "1"]).await;
    let _gate = fake.gate_streams(); // never released: the stream stays open
    let body = alice_stream_in_flight(&proxy).await;
    let status = proxy.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        body.collect().await.is_err(),
        "the client sees the stream cut, not a clean end"
    );
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 1, "{rows:?}\n{}", proxy.logs());
    assert_eq!(rows[0].4, "shutdown");
    assert!(!rows[0].2);
    let logs = proxy.settled_logs().await;
    assert!(!logs.contains("dropped"), "{logs}");
}

#[tokio::test]
async fn a_graceful_shutdown_lets_a_stream_finish_and_records_it() {
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let gate = fake.gate_streams();
    let body = alice_stream_in_flight(&proxy).await;
    let pid = proxy.pid();
    assert!(
        std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
    proxy.wait_for_log("shutdown signal received").await;
    for _ in 1..fake::anthropic_events(&alice_sonnet()).len() {
        gate.send(()).await.unwrap();
    }
    body.collect()
        .await
        .expect("the stream finishes during the grace period");
    let status = proxy
        .wait_exit(Duration::from_secs(30))
        .expect("exits after the stream");
    assert!(status.success());
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].4, "complete");
    assert!(rows[0].2);
}

#[tokio::test]
async fn refusals_do_not_count_against_the_rate_limit_after_a_restart() {
    let fake = FakeBedrock::start().await;
    let config = two_user_config(&fake, "").replace(
        "[users.bob.models]",
        "[users.bob.limits]\nrequests_per_minute = 2\n[users.bob.models]",
    );
    let proxy = Proxy::start(&config).await;
    for _ in 0..3 {
        let r = converse(&proxy, OPUS, BOB_KEY).await;
        assert_eq!(r.status, 403);
    }
    let proxy = proxy.restart(&[]).await;
    let r = converse(&proxy, SONNET, BOB_KEY).await;
    assert_eq!(r.status, 200, "{}", r.message());
}

#[tokio::test]
async fn every_identified_request_gets_a_row_even_one_no_front_serves() {
    // A malformed model id, an unknown operation and an over-long path, with a valid key:
    // refused before anything else, and each recorded for its caller.
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let long = format!("/model/{}/converse", "a".repeat(5000));
    for (path, status) in [
        ("/model/not%20a%20model/converse".to_string(), 400),
        (format!("/model/{SONNET}/frobnicate"), 404),
        (long, 400),
        ("/v1/nothing-here".to_string(), 404),
    ] {
        let r = post(&proxy, &path, ALICE_KEY, "{}").await;
        assert_eq!(
            r.status,
            status,
            "{}: {:?}",
            &path[..path.len().min(60)],
            r.body
        );
    }
    // Without a key nothing is recorded (and nothing tells a stranger which paths exist).
    let anon = send(request(
        http::Method::POST,
        &format!("{}/model/{SONNET}/frobnicate", proxy.url()),
        &[],
        "{}",
    ))
    .await;
    assert_eq!(anon.status, 403, "{:?}", anon.body);
    assert!(proxy.terminate().success());
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn local_refusals_do_not_use_up_the_rate_limit() {
    // Only admitted calls count: bodies too large, malformed Messages bodies and models that
    // are not the caller's are refused before admission.
    let fake = FakeBedrock::start().await;
    let config = two_user_config(&fake, "")
        .replace(
            "[users.bob.models]",
            "[users.bob.limits]\nrequests_per_minute = 3\n[users.bob.models]",
        )
        .replace(
            "[users.alice]",
            "[limits]\nmax_body_bytes = 1000\n[users.alice]",
        );
    let proxy = Proxy::start(&config).await;
    let big = format!(
        r#"{{"messages":[{{"role":"user","content":[{{"text":"{}"}}]}}]}}"#,
        "x".repeat(2000)
    );
    for _ in 0..3 {
        let r = post(&proxy, &format!("/model/{SONNET}/converse"), BOB_KEY, &big).await;
        assert_eq!(r.status, 413);
        assert_eq!(converse(&proxy, OPUS, BOB_KEY).await.status, 403);
        let m = messages(&proxy, BOB_KEY, "{\"model\": 5}", &[]).await;
        assert_eq!(m.status, 400);
    }
    for i in 0..3 {
        let r = converse(&proxy, SONNET, BOB_KEY).await;
        assert_eq!(r.status, 200, "admitted call {i}: {}", r.message());
    }
    assert_eq!(
        converse(&proxy, SONNET, BOB_KEY).await.status,
        429,
        "the limit still holds"
    );
}

#[tokio::test]
async fn a_call_that_never_connected_is_complete_and_one_that_timed_out_is_not() {
    // Nothing listens at the runtime endpoint: the connect fails, so the request never left.
    let config = unreachable_upstream_config();
    let mut proxy = Proxy::start(&config).await;
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 502);
    assert_eq!(converse(&proxy, OPUS, ALICE_KEY).await.status, 403);
    assert!(proxy.terminate().success());
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].1, rows[0].2, rows[0].4.as_str()),
        (502, true, "ServiceUnavailableException")
    );
    assert_eq!(
        (rows[1].1, rows[1].2, rows[1].3),
        (403, true, false),
        "a refusal is complete and not admitted"
    );

    // Sent, then no answer within first_byte_secs: Bedrock may have run it.
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "[timeouts]\nfirst_byte_secs = 1")).await;
    fake.script(&alice_sonnet(), fake::Script::Hang);
    let r = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_type(), "ModelTimeoutException");
    assert!(proxy.terminate().success());
    let rows = ledger(&proxy);
    assert_eq!((rows[0].1, rows[0].2), (504, false));
}

#[tokio::test]
async fn a_request_still_uploading_at_shutdown_is_recorded_and_never_sent() {
    use tokio::io::AsyncWriteExt;
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start_with_env(
        &two_user_config(&fake, ""),
        &["--shutdown-grace-secs", "1"],
        &[("RUST_LOG", "info,bedrock_gate::server=debug")],
    )
    .await;
    let mut conn = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    let head = format!(
        "POST /model/{SONNET}/converse HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\ncontent-length: 1000\r\n\r\n{{\"messages\""
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.flush().await.unwrap();
    proxy.wait_for_log("reading request body").await;
    let status = proxy.terminate();
    assert!(status.success(), "{status:?}");
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 1, "{rows:?}\n{}", proxy.logs());
    assert_eq!(rows[0].4, "shutdown");
    assert!(rows[0].2, "never sent, so nothing is missing");
    assert!(fake.received().is_empty());
    let logs = proxy.settled_logs().await;
    assert!(!logs.contains("dropped"), "{logs}");
    drop(conn);
}

#[tokio::test]
async fn nobody_can_list_the_accounts_application_profiles() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let get = |q: &str| {
        let url = format!("{}/inference-profiles{q}", proxy.url());
        async move {
            send(request(
                Method::GET,
                &url,
                &[("authorization", &format!("Bearer {ALICE_KEY}"))],
                "",
            ))
            .await
        }
    };
    let r = get("?type=APPLICATION").await;
    assert_eq!(r.status, 403);
    assert!(r.message().contains("system-defined"), "{}", r.message());
    assert_eq!(get("?typeEquals=APPLICATION").await.status, 403);
    assert_eq!(get("?foo=bar").await.status, 400);
    assert_eq!(get("").await.status, 200);
    assert_eq!(get("?maxResults=5&nextToken=abc").await.status, 200);
    let got = fake.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].query.as_deref(), Some("type=SYSTEM_DEFINED"));
    assert_eq!(
        got[1].query.as_deref(),
        Some("type=SYSTEM_DEFINED&maxResults=5&nextToken=abc")
    );
}

#[tokio::test]
async fn unidentified_callers_are_logged_but_never_fill_the_ledger() {
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "")).await;
    for key in ["bgk_nobody", ""] {
        let r = converse(&proxy, SONNET, key).await;
        assert_eq!(r.status, 403);
    }
    assert_eq!(
        send(request(
            Method::GET,
            &format!("{}/nowhere", proxy.url()),
            &[],
            ""
        ))
        .await
        .status,
        403,
        "who is calling comes first, so a stranger learns no path"
    );
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    assert!(proxy.terminate().success());
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, "alice");
    assert_eq!(
        proxy.logs().matches("bedrock_gate::access").count(),
        4,
        "every request still has its log line"
    );
}
