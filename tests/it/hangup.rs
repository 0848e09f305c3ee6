//! A client that hangs up does not make a call free: once the call reached Bedrock (which bills
//! it whatever the client does), the proxy reads the answer to its end, sends it nowhere, and
//! records and charges the exact usage, with outcome `client_gone`.

use crate::common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A budget in the config, so the test can see the charge land on it too.
fn config(fake: &FakeBedrock) -> String {
    two_user_config(fake, "").replace(
        "[users.alice.models]",
        "[users.alice.limits]\nmonthly_budget_usd = 100\n[users.alice.models]",
    )
}

/// Sends a request on a raw connection, so the test decides exactly when the client goes away.
async fn raw_request(proxy: &Proxy, path: &str, body: &str) -> tokio::net::TcpStream {
    raw_request_to(&proxy.addr, path, body).await
}

async fn raw_request_to(addr: &str, path: &str, body: &str) -> tokio::net::TcpStream {
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    sock
}

/// Reads the response head and the first event, as a client that then hangs up would.
async fn read_first(sock: &mut tokio::net::TcpStream) {
    let mut buf = vec![0u8; 4096];
    let n = sock.read(&mut buf).await.unwrap();
    assert!(n > 0 && buf.starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}

/// Lets the fake send the rest of a gated stream.
async fn release(gate: tokio::sync::mpsc::Sender<()>) {
    for _ in 0..16 {
        if gate.send(()).await.is_err() {
            break;
        }
    }
}

/// Alice's spend this month, as she sees it on `GET /usage`.
async fn spent(proxy: &Proxy) -> f64 {
    let r = send(request(
        http::Method::GET,
        &format!("{}/usage", proxy.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        "",
    ))
    .await;
    r.json()["cost_usd"].as_f64().unwrap()
}

#[tokio::test]
async fn a_stream_the_client_hangs_up_on_is_read_to_its_end_and_charged() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config(&fake)).await;
    let path = format!("/model/{SONNET}/invoke-with-response-stream");

    // The same call read to its end, for the numbers a hang-up must reach.
    let whole = post(&proxy, &path, ALICE_KEY, INVOKE_BODY).await;
    assert_eq!(whole.status, 200);
    let reference = ledger_with(&proxy, 1).await.remove(0);
    assert_eq!(reference.outcome, "complete");
    let cost_one = spent(&proxy).await;
    assert!(cost_one > 0.0);

    // Bedrock sends one event, the client reads it and hangs up, then Bedrock sends the rest.
    let gate = fake.gate_streams();
    let mut sock = raw_request(&proxy, &path, INVOKE_BODY).await;
    read_first(&mut sock).await;
    drop(sock);
    tokio::time::sleep(Duration::from_millis(100)).await;
    release(gate).await;

    let rows = ledger_with(&proxy, 2).await;
    let hung_up = &rows[1];
    assert_eq!(hung_up.outcome, "client_gone", "{rows:#?}");
    assert_eq!(
        hung_up.tokens, reference.tokens,
        "the exact usage Bedrock billed"
    );
    assert!(hung_up.complete, "all of the usage was seen: {hung_up:?}");
    assert_eq!(
        fake.streams_cut(),
        0,
        "the upstream stream was read to its end"
    );
    let cost_two = spent(&proxy).await;
    assert!(
        (cost_two - 2.0 * cost_one).abs() < 1e-9,
        "charged to the budget like the whole call: {cost_one} then {cost_two}"
    );
}

#[tokio::test]
async fn a_call_the_client_leaves_before_bedrock_answers_is_charged_when_it_does() {
    let fake = FakeBedrock::start().await;
    fake.script(&alice_sonnet(), fake::Script::Slow(600));
    let proxy = Proxy::start(&config(&fake)).await;

    let sock = raw_request(&proxy, &format!("/model/{SONNET}/converse"), CONVERSE_BODY).await;
    eventually("the call reached the fake", || async {
        (fake.received().len() == 1).then_some(())
    })
    .await;
    drop(sock);

    let rows = ledger_with(&proxy, 1).await;
    assert_eq!(rows[0].outcome, "client_gone", "{rows:#?}");
    assert_eq!(rows[0].status, 200);
    assert_eq!(
        rows[0].tokens,
        (9, 4, 5, 6),
        "the usage of Bedrock's answer"
    );
    assert!(rows[0].complete);
    assert!(spent(&proxy).await > 0.0);
}

#[tokio::test]
async fn a_messages_stream_the_client_hangs_up_on_is_charged_too() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config(&fake)).await;
    let body = messages_body("claude-sonnet-4-5-20250929", true);

    let whole = messages(&proxy, ALICE_KEY, &body, &[]).await;
    assert_eq!(whole.status, 200);
    let reference = ledger_with(&proxy, 1).await.remove(0);

    let gate = fake.gate_streams();
    let mut sock = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    let req = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: {ALICE_KEY}\r\n\
         anthropic-version: 2023-06-01\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    read_first(&mut sock).await;
    drop(sock);
    tokio::time::sleep(Duration::from_millis(100)).await;
    release(gate).await;
    let rows = ledger_with(&proxy, 2).await;
    assert_eq!(rows[1].outcome, "client_gone", "{rows:#?}");
    assert_eq!(rows[1].tokens, reference.tokens);
    assert_eq!(fake.streams_cut(), 0);
}

/// A process's resident memory, in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn two_hundred_clients_that_hang_up_mid_stream_are_each_charged_in_full() {
    const N: usize = 200;
    let fake = FakeBedrock::start().await;
    fake.script(&alice_sonnet(), fake::Script::Dribble(40));
    let proxy = Proxy::start(&config(&fake)).await;
    let path = format!("/model/{SONNET}/invoke-with-response-stream");
    let pid = proxy.pid();
    let rss_before = rss_kib(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let answered = concurrently(N, N, |_| {
        let addr = proxy.addr.clone();
        let path = path.clone();
        let peak = peak.clone();
        async move {
            let mut sock = raw_request_to(&addr, &path, INVOKE_BODY).await;
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
            // Hang up after the first event, long before the last.
            buf.starts_with(b"HTTP/1.1 200") && n > 0
        }
    })
    .await;
    let answered = answered.iter().filter(|a| **a).count();
    let rows = ledger_with(&proxy, N).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_after = rss_kib(pid);
    let gone = rows.iter().filter(|r| r.outcome == "client_gone").count();
    let tokens = rows.iter().fold((0, 0, 0, 0), |a, r| {
        (
            a.0 + r.tokens.0,
            a.1 + r.tokens.1,
            a.2 + r.tokens.2,
            a.3 + r.tokens.3,
        )
    });
    let n = N as i64;
    eprintln!(
        "hang-up run: sent {N}, answered {answered}, ledger rows {}, client_gone {gone}, tokens recorded {tokens:?} \
         vs served {:?}, upstream streams cut {}, RSS KiB before {rss_before} peak {} after {rss_after}",
        rows.len(),
        (25 * n, 6 * n, 3 * n, 2 * n),
        fake.streams_cut(),
        peak.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(answered, N);
    assert_eq!(rows.len(), N);
    assert_eq!(gone, N, "every client hung up mid-stream");
    assert_eq!(
        tokens,
        (25 * n, 6 * n, 3 * n, 2 * n),
        "every stream charged in full"
    );
    assert_eq!(
        fake.streams_cut(),
        0,
        "every upstream stream read to its end"
    );
}
