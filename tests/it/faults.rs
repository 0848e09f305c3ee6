//! Faults on either side of the proxy: an upstream that fails at random, goes silent mid-stream,
//! cannot be reached or drops a request it received; a client that dribbles its headers or its
//! body. Every client gets the full answer or a clean error, every request one ledger row, and
//! nothing that may have reached the model is sent twice.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use http::Method;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn outcomes(proxy: &Proxy) -> Vec<(String, i64, String)> {
    ledger_query(
        proxy,
        "SELECT request_id, status, outcome FROM requests ORDER BY id",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// The ledger's rows once there is at least one (rows are committed in the background).
async fn ledger_rows(proxy: &Proxy) -> Vec<(String, i64, String)> {
    eventually("a ledger row", || async {
        let rows = outcomes(proxy);
        (!rows.is_empty()).then_some(rows)
    })
    .await
}

/// What one client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Seen {
    /// 200 and the whole answer.
    Full,
    /// An AWS-shaped error response: status, `x-amzn-ErrorType`, JSON `message`.
    ErrorResponse,
    /// A stream that ended with an exception event.
    StreamException,
    /// The transfer failed (the client knows the answer is incomplete).
    TransferError,
}

/// Sends one request and classifies what came back; panics on anything that is neither a
/// full answer nor a clean error (a silently truncated answer above all).
async fn call(proxy_url: String, stream: bool) -> Seen {
    let (op, body) = if stream {
        ("invoke-with-response-stream", INVOKE_BODY)
    } else {
        ("converse", CONVERSE_BODY)
    };
    let req = request(
        Method::POST,
        &format!("{proxy_url}/model/{SONNET}/{op}"),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        body.to_string(),
    );
    let resp = client()
        .request(req)
        .await
        .expect("the proxy always answers");
    let status = resp.status();
    let error_type = resp
        .headers()
        .get("x-amzn-errortype")
        .map(|v| v.to_str().unwrap().to_string());
    let mut body = resp.into_body();
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => bytes.extend_from_slice(f.data_ref().map(|d| &d[..]).unwrap_or(&[])),
            Err(_) if status == 200 => return Seen::TransferError,
            Err(e) => panic!("{status} body failed: {e}"),
        }
    }
    if status != 200 {
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON error body");
        assert!(
            error_type.is_some_and(|t| !t.is_empty()),
            "{status} without x-amzn-ErrorType"
        );
        assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        return Seen::ErrorResponse;
    }
    if !stream {
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON answer");
        assert_eq!(json["output"]["message"]["content"][0]["text"], fake::TEXT);
        return Seen::Full;
    }
    let mut decoder = aws_smithy_eventstream::frame::MessageFrameDecoder::new();
    let messages = fake::decode_messages(&mut decoder, &mut bytes);
    assert!(bytes.is_empty(), "stream ended inside a frame");
    let last = messages.last().expect("at least one event");
    if fake::header_str(last, ":message-type").as_deref() == Some("exception") {
        return Seen::StreamException;
    }
    let payload: serde_json::Value = serde_json::from_slice(last.payload()).unwrap();
    let event = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        payload["bytes"].as_str().unwrap(),
    )
    .unwrap();
    let event: serde_json::Value = serde_json::from_slice(&event).unwrap();
    assert_eq!(
        event["type"], "message_stop",
        "a 200 stream that stops early"
    );
    Seen::Full
}

#[tokio::test]
async fn a_thousand_requests_with_random_upstream_failures_each_end_cleanly_with_one_row() {
    const N: usize = 1000;
    let fake = FakeBedrock::start().await;
    fake.script(&alice_sonnet(), fake::Script::Chaos);
    // Hangs end at the first-byte timeout; a loaded machine may time out others too, which
    // is still a clean error.
    let proxy = Proxy::start(&two_user_config(&fake, "[timeouts]\nfirst_byte_secs = 1\n")).await;
    let url = proxy.url();
    let rss_before = crate::hangup::rss_kib(proxy.pid());
    let seen = concurrently(N, 64, |i| call(url.clone(), i % 2 == 0)).await;
    let rss_peak_after = crate::hangup::rss_kib(proxy.pid());
    // The draw is deterministic, so every kind of failure happened.
    let tally = tally_all(
        &seen,
        &[
            Seen::Full,
            Seen::ErrorResponse,
            Seen::StreamException,
            Seen::TransferError,
        ],
    );
    assert_eq!(fake.received().len(), N, "one upstream request per call");

    let rows = eventually("one ledger row per request", || async {
        let rows = outcomes(&proxy);
        (rows.len() >= N).then_some(rows)
    })
    .await;
    eprintln!(
        "chaos run: sent {N}, answered {tally:?}, upstream requests {}, ledger rows {}, RSS KiB before {rss_before} after the load {rss_peak_after}",
        fake.received().len(),
        rows.len()
    );
    assert_eq!(rows.len(), N, "{tally:?}");
    let ids: std::collections::HashSet<_> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(ids.len(), N, "request ids are unique");
    let cut = rows.iter().filter(|r| r.2 == "upstream_error").count();
    assert_eq!(
        cut,
        tally[&Seen::TransferError],
        "each cut stream is recorded as upstream_error"
    );
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection_per_worker() {
    // Each call comes on a connection of its own, and connections go to the workers in turn;
    // each worker keeps its connection to Bedrock alive for the next.
    for workers in [1, 2] {
        let fake = FakeBedrock::start().await;
        let proxy = Proxy::start_with_args(
            &two_user_config(&fake, ""),
            &["--workers", &workers.to_string()],
        )
        .await;
        for stream in [false, true, false, true, false, true] {
            assert_eq!(call(proxy.url(), stream).await, Seen::Full);
        }
        assert_eq!(fake.received().len(), 6);
        assert_eq!(
            fake.connections(),
            workers,
            "keep-alive to Bedrock: one connection per worker ({workers})"
        );
    }
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_cut_after_stream_idle_secs_and_recorded() {
    let fake = FakeBedrock::start().await;
    fake.script(&alice_sonnet(), fake::Script::StallAfterFirst);
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[timeouts]\nstream_idle_secs = 1\n",
    ))
    .await;
    let reading = tokio::spawn(call(proxy.url(), true));
    let seen = tokio::time::timeout(Duration::from_secs(60), reading)
        .await
        .expect("the silent stream was never cut")
        .unwrap();
    assert_eq!(seen, Seen::TransferError);
    let rows = ledger_rows(&proxy).await;
    assert_eq!(rows[0].2, "upstream_idle");
    proxy.wait_for_log("stream_idle_secs").await;
}

#[tokio::test]
async fn the_header_timeout_does_not_cut_a_response_that_takes_longer() {
    // The connection waits on its response far past request_header_secs; only the stream
    // idle timeout may end it.
    let fake = FakeBedrock::start().await;
    fake.script(&alice_sonnet(), fake::Script::StallAfterFirst);
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[timeouts]\nrequest_header_secs = 1\nstream_idle_secs = 4\n",
    ))
    .await;
    assert_eq!(call(proxy.url(), true).await, Seen::TransferError);
    let rows = ledger_rows(&proxy).await;
    assert_eq!(rows[0].2, "upstream_idle", "not client_gone");
}

#[tokio::test]
async fn a_failed_connect_is_retried_until_bedrock_comes_up() {
    let port = free_port();
    let config = alice_config(&format!("http://127.0.0.1:{port}"), "");
    let proxy = Proxy::start(&config).await;
    let call = tokio::spawn(converse_owned(proxy.url()));
    // Only once the first connect has failed does Bedrock come up.
    proxy
        .wait_for_log("could not connect to Bedrock; retrying")
        .await;
    let fake = FakeBedrock::start_on(&format!("127.0.0.1:{port}")).await;
    let reply = call.await.unwrap();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(fake.received().len(), 1);
}

async fn converse_owned(url: String) -> Reply {
    send(request(
        Method::POST,
        &format!("{url}/model/{SONNET}/converse"),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        CONVERSE_BODY,
    ))
    .await
}

#[tokio::test]
async fn a_request_that_reached_bedrock_is_never_sent_again() {
    // An upstream that reads the request, then drops the connection without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                drop(sock);
            });
        }
    });
    let config = alice_config(&format!("http://{addr}"), "");
    let proxy = Proxy::start(&config).await;
    let reply = converse_owned(proxy.url()).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.error_type(), "ServiceUnavailableException");
    assert_eq!(requests.load(Ordering::SeqCst), 1, "sent exactly once");
    // The row says Bedrock may have run it.
    let conn_rows = ledger_rows(&proxy).await;
    assert_eq!(conn_rows.len(), 1);
    assert!(!proxy.settled_logs().await.contains("retrying"));
}

#[tokio::test]
async fn a_tls_handshake_that_never_finishes_is_a_connect_failure_and_retried() {
    // Accepts TCP, then never answers the ClientHello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (sock, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    let config = alice_config(&format!("https://{addr}"), "[timeouts]\nconnect_secs = 1\n");
    let proxy = Proxy::start(&config).await;
    let reply = converse_owned(proxy.url()).await;
    assert_eq!(reply.status, 502, "{:?}", reply.body);
    // The first try and three retries, each cut at connect_secs.
    assert_eq!(accepted.load(Ordering::SeqCst), 4);
    proxy
        .wait_for_log("TLS handshake took longer than 1 s")
        .await;
}

/// Reads until the peer closes the connection; returns what it sent.
async fn read_to_close(sock: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut out))
        .await
        .expect("the proxy never closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_client_that_dribbles_its_headers_is_disconnected() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[timeouts]\nrequest_header_secs = 1\n",
    ))
    .await;
    let mut sock = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    sock.write_all(b"POST /model/x/converse HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // ... and never finishes the head.
    read_to_close(&mut sock).await;
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn a_client_that_dribbles_its_body_gets_408_and_nothing_reaches_bedrock() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[timeouts]\nrequest_body_secs = 1\n",
    ))
    .await;
    let mut sock = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    let head = format!(
        "POST /model/{SONNET}/converse HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE_KEY}\r\ncontent-length: 100\r\n\r\n{{\"messages\""
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut sock).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-amzn-errortype"));
    assert!(fake.received().is_empty());
    let rows = ledger_rows(&proxy).await;
    assert_eq!(rows[0].1, 408);
}

#[tokio::test]
async fn healthcheck_command_passes_on_a_running_proxy_and_fails_on_a_dead_port() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let ok = command(dir.path())
        .args([
            "healthcheck",
            "--url",
            &format!("{}/healthz", proxy.admin_url()),
        ])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let port = free_port();
    let bad = command(dir.path())
        .args([
            "healthcheck",
            "--timeout-secs",
            "5",
            "--url",
            &format!("http://127.0.0.1:{port}/healthz"),
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("healthcheck"));
}

#[tokio::test]
async fn connections_that_never_start_a_request_are_closed() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[timeouts]\nrequest_header_secs = 1\n",
    ))
    .await;
    // Silent; one byte; the HTTP/2 preface and nothing else.
    for opening in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"] {
        let mut sock = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
        sock.write_all(opening).await.unwrap();
        read_to_close(&mut sock).await;
    }
}

#[tokio::test]
async fn connect_failures_until_the_first_byte_deadline_are_502_never_sent() {
    let config = format!(
        "{}[timeouts]\nfirst_byte_secs = 1\n",
        unreachable_upstream_config()
    );
    let proxy = Proxy::start(&config).await;
    let reply = converse_owned(proxy.url()).await;
    assert_eq!(reply.status, 502, "{:?}", reply.body);
    assert_eq!(reply.error_type(), "ServiceUnavailableException");
    let rows = ledger_rows(&proxy).await;
    assert_eq!(rows[0].1, 502);
}

#[tokio::test]
async fn a_closed_stderr_neither_blocks_requests_nor_shutdown() {
    use std::io::BufRead as _;
    let fake = FakeBedrock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bedrock-gate.toml");
    std::fs::write(&config, two_user_config(&fake, "")).unwrap();
    let mut child = command(dir.path())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads stderr any more: every write to it fails (EPIPE).
    drop(child.stderr.take());
    let mut line = String::new();
    // Kept open to the end: stdout still has its reader.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("bedrock-gate listening on ")
        .unwrap()
        .to_string();
    for i in 0..300 {
        // Refusals (unknown key) log a WARN line each; some succeed and log INFO.
        let key = if i % 2 == 0 { "bgk_nobody" } else { ALICE_KEY };
        let reply = tokio::time::timeout(
            Duration::from_secs(30),
            send(request(
                Method::POST,
                &format!("{addr}/model/{SONNET}/converse"),
                &[("authorization", &format!("Bearer {key}"))],
                CONVERSE_BODY,
            )),
        )
        .await
        .expect("a request stalled on logging");
        assert!(
            reply.status == 200 || reply.status == 403,
            "{}",
            reply.status
        );
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bedrock-gate hung at shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    drop(stdout);
}

/// Reads one HTTP/1.1 response (head and a Content-Length body) from `sock`.
async fn read_response(sock: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = sock.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            return Some((head, body));
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_refusal_before_the_body_is_read_keeps_the_connection_usable() {
    // Refused before its body was read (an unknown key, a model that is not the caller's):
    // either the small body is drained and the connection serves the next request, or the
    // answer says `Connection: close`. Never a silent close the client's next write hits.
    use tokio::io::AsyncWriteExt;
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    for (key, big) in [
        ("bgk_nobody", false),
        (ALICE_KEY, false),
        ("bgk_nobody", true),
    ] {
        let mut sock = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
        let body = if big {
            "x".repeat(1024 * 1024)
        } else {
            format!(r#"{{"messages":[],"pad":"{}"}}"#, "x".repeat(3000))
        };
        let model = if key == ALICE_KEY { OPUS } else { SONNET };
        let req = format!(
            "POST /model/{model}/converse HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        // Send the body in pieces after the headers, as a slow client would.
        let _ = sock.write_all(body.as_bytes()).await;
        let (head, _) = read_response(&mut sock).await.expect("a response");
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
        let closes = head.to_ascii_lowercase().contains("connection: close");
        if big {
            assert!(
                closes,
                "a large unread body: the answer says it closes: {head}"
            );
            continue;
        }
        assert!(
            !closes,
            "a small body is drained, the connection kept: {head}"
        );
        let next = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        sock.write_all(next.as_bytes())
            .await
            .expect("the connection is still open");
        let (head, body) = read_response(&mut sock)
            .await
            .expect("the next request on the same connection is answered");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    }
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_and_recorded() {
    // The client reads the response head, then nothing: the proxy's writes wait on a full
    // socket buffer. After timeouts.client_write_secs the connection is cut, the stream
    // recorded, and the upstream let go.
    use tokio::io::AsyncWriteExt;
    let fake = FakeBedrock::start().await;
    fake.script(&alice_sonnet(), fake::Script::Large(400));
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[timeouts]\nclient_write_secs = 1\nstream_idle_secs = 300",
    ))
    .await;
    let mut sock = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    let req = format!(
        "POST /model/{SONNET}/invoke-with-response-stream HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {ALICE_KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{INVOKE_BODY}",
        INVOKE_BODY.len()
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    // Read nothing at all; the proxy must give up by itself.
    let rows = ledger_with(&proxy, 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(rows[0].user.as_deref(), Some("alice"));
    assert_eq!(rows[0].outcome, "client_gone", "{rows:?}");
    proxy.wait_for_log("timeouts.client_write_secs").await;
    drop(sock);
}
