//! Defects found by trying to break the proxy: memory pinned by concurrent uploads, bodies on
//! GET routes, billing options (priority tier, latency-optimized inference, guardrails) that
//! were forwarded unpriced, and an HTTP/2 client that ignored GOAWAY holding shutdown.

use crate::common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The proxy's resident set, in bytes (`VmRSS` of /proc/PID/status).
fn rss(proxy: &Proxy) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

const MIB: u64 = 1024 * 1024;

/// One upload over a raw connection: the head and all of the body but its last byte are sent,
/// then the connection waits for `release` before sending that byte, so the proxy holds what it
/// has read of every upload at once. Returns the status of the answer (0: none came).
async fn held_upload(
    addr: String,
    path: String,
    len: usize,
    written: Arc<tokio::sync::Semaphore>,
    mut release: tokio::sync::watch::Receiver<bool>,
) -> u16 {
    let stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {ALICE_KEY}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    let mut reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        text.split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0)
    });
    // A JSON string of `len` bytes: what a count-tokens call with a huge context looks like
    // to the proxy (it never parses it).
    let mut body = vec![b'a'; len];
    body[0] = b'"';
    body[len - 1] = b'"';
    let sent = async {
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&body[..len - 1]).await
    }
    .await;
    written.add_permits(1);
    // Held until released, unless the proxy answers first (it refused the upload).
    let early = if sent.is_ok() {
        tokio::select! {
            () = async { let _ = release.wait_for(|r| *r).await; } => {
                let _ = wr.write_all(&body[len - 1..]).await;
                None
            }
            status = &mut reader => Some(status),
        }
    } else {
        None
    };
    let status = match early {
        Some(status) => status.expect("reader"),
        None => tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("an answer within 60 s")
            .expect("reader"),
    };
    drop(wr);
    status
}

/// Starts a 1 MiB upload to `path` held one byte short of its end until `released`, and
/// returns once it is written.
async fn hold_upload(
    addr: &str,
    path: &str,
    released: &tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u16> {
    let written = Arc::new(tokio::sync::Semaphore::new(0));
    let held = tokio::spawn(held_upload(
        addr.to_string(),
        path.to_string(),
        1024 * 1024,
        written.clone(),
        released.clone(),
    ));
    let _w = written.acquire().await.expect("written");
    held
}

/// The largest RSS seen while sampling for `window`.
async fn peak_rss(proxy: &Proxy, window: Duration) -> u64 {
    let until = Instant::now() + window;
    let mut peak = 0;
    while Instant::now() < until {
        peak = peak.max(rss(proxy));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peak
}

#[tokio::test]
async fn concurrent_uploads_are_bounded_and_memory_is_given_back() {
    const UPLOADS: usize = 40;
    const BODY: usize = 4 * MIB as usize - 1;
    const INFLIGHT: u64 = 32 * MIB;
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(
        &fake,
        &format!(
            "[limits]\nmax_body_bytes = {}\nmax_inflight_body_bytes = {INFLIGHT}",
            4 * MIB
        ),
    ))
    .await;
    // Warm up (the first call builds the upstream pool and TLS-free client state).
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    let before = rss(&proxy);

    let written = Arc::new(tokio::sync::Semaphore::new(0));
    let (release, released) = tokio::sync::watch::channel(false);
    let path = format!("/model/{SONNET}/count-tokens");
    let tasks: Vec<_> = (0..UPLOADS)
        .map(|_| {
            tokio::spawn(held_upload(
                proxy.addr.clone(),
                path.clone(),
                BODY,
                written.clone(),
                released.clone(),
            ))
        })
        .collect();
    // Every upload has sent all it will before the release; then the proxy has read what it
    // reads of them.
    let _all = written.acquire_many(UPLOADS as u32).await.expect("written");
    let peak = peak_rss(&proxy, Duration::from_millis(1500))
        .await
        .max(rss(&proxy));
    release.send(true).expect("release");
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("upload task"));
    }
    let answered = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 503).count();

    // Memory comes back once the bodies are gone.
    let mut after = rss(&proxy);
    for _ in 0..100 {
        if after < before + 16 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = rss(&proxy);
    }
    println!(
        "upload run: {UPLOADS} uploads of {BODY} bytes, {answered} answered, {refused} refused (503), \
         other {:?}; RSS before {:.1} MiB, peak {:.1} MiB, after {:.1} MiB",
        statuses
            .iter()
            .filter(|s| **s != 200 && **s != 503)
            .collect::<Vec<_>>(),
        before as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        after as f64 / MIB as f64,
    );
    assert_eq!(answered + refused, UPLOADS, "{statuses:?}");
    assert_eq!(
        answered as u64,
        INFLIGHT / BODY as u64,
        "as many answered as fit in limits.max_inflight_body_bytes: {statuses:?}"
    );
    assert!(
        peak < before + INFLIGHT + 24 * MIB,
        "RSS grew from {before} to {peak} under uploads bounded to {INFLIGHT} bytes"
    );
    assert!(
        after < before + 16 * MIB,
        "RSS stayed at {after} after the uploads (it was {before} before)"
    );
    // The refusal says what to do, in Bedrock's shape.
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/converse"),
        ALICE_KEY,
        CONVERSE_BODY,
    )
    .await;
    assert_eq!(
        r.status, 200,
        "the proxy serves again once the uploads are gone"
    );
}

#[tokio::test]
async fn a_refusal_for_uploads_in_flight_is_a_503_that_says_why() {
    let fake = FakeBedrock::start().await;
    // One max-size body fits; a second one waiting would not.
    let proxy = Proxy::start(&two_user_config(
        &fake,
        "[limits]\nmax_body_bytes = 1048576\nmax_inflight_body_bytes = 1048576",
    ))
    .await;
    let (release, released) = tokio::sync::watch::channel(false);
    let count_tokens = format!("/model/{SONNET}/count-tokens");
    let mut held = hold_upload(&proxy.addr, &count_tokens, &released).await;
    // The held upload's Content-Length is reserved as soon as its head is read; wait for it
    // to show in the refusal of a second one.
    let mut seen = Vec::new();
    let mut held_refused = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let r = loop {
        // Written is not yet read: a probe whose head the proxy takes first holds its own
        // bytes, and the held upload is the one refused. Hold another, then.
        if held.is_finished() {
            let refused = held.await.expect("held");
            assert_eq!(refused, 503, "a held upload ended early, and not refused");
            held_refused += 1;
            held = hold_upload(&proxy.addr, &count_tokens, &released).await;
        }
        let r = post(
            &proxy,
            &format!("/model/{SONNET}/count-tokens"),
            ALICE_KEY,
            &format!("\"{}\"", "b".repeat(1000)),
        )
        .await;
        if r.status == 503 {
            break r;
        }
        seen.push(r.status);
        assert!(
            std::time::Instant::now() < deadline,
            "no 503 while an upload was held (held upload finished: {}, held uploads refused \
             before: {held_refused}); statuses seen: {seen:?}\n{}",
            held.is_finished(),
            proxy.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    };
    assert_eq!(r.error_type(), "ServiceUnavailableException");
    assert!(
        r.message().contains("limits.max_inflight_body_bytes"),
        "{}",
        r.message()
    );
    assert!(r.headers.contains_key("retry-after"), "{:?}", r.headers);
    let m = messages(
        &proxy,
        ALICE_KEY,
        &messages_body("claude-sonnet-4-5", false),
        &[],
    )
    .await;
    assert_eq!(m.status, 503, "{:?}", m.body);
    assert_eq!(m.anthropic_error().0, "overloaded_error");
    release.send(true).expect("release");
    assert_eq!(held.await.expect("held"), 200);
}

#[tokio::test]
async fn bodies_on_get_routes_are_refused_unread() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let auth = format!("Bearer {ALICE_KEY}");
    for path in [
        "/inference-profiles?type=SYSTEM_DEFINED".to_string(),
        format!("/inference-profiles/{}", alice_sonnet().replace('/', "%2F")),
        "/usage".to_string(),
    ] {
        let r = send(request(
            Method::GET,
            &format!("{}{path}", proxy.url()),
            &[("authorization", &auth)],
            "x".repeat(100_000),
        ))
        .await;
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
        assert_eq!(r.error_type(), "ValidationException", "{path}");
        assert!(r.message().contains("GET"), "{}", r.message());
    }
    // Without a body they still work.
    let r = send(request(
        Method::GET,
        &format!("{}/inference-profiles", proxy.url()),
        &[("authorization", &auth)],
        "",
    ))
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        fake.received().len(),
        1,
        "no body-carrying GET reached Bedrock"
    );
}

/// A call on the Bedrock-native front with extra headers.
async fn invoke_with(proxy: &Proxy, key: &str, headers: &[(&str, &str)]) -> Reply {
    let auth = format!("Bearer {key}");
    let mut h = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(headers);
    send(request(
        Method::POST,
        &format!("{}/model/{SONNET}/invoke", proxy.url()),
        &h,
        INVOKE_BODY,
    ))
    .await
}

/// A Converse (or ConverseStream) body with one extra top-level field.
fn converse_with(field: &str, value: &str) -> String {
    format!(r#"{{"messages":[{{"role":"user","content":[{{"text":"hi"}}]}}],"{field}":{value}}}"#)
}

#[tokio::test]
async fn billing_options_are_refused_unless_the_user_may_use_them() {
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    for (header, value, allow) in [
        ("x-amzn-bedrock-service-tier", "priority", "service-tier"),
        ("x-amzn-bedrock-service-tier", "flex", "service-tier"),
        (
            "x-amzn-bedrock-performanceconfig-latency",
            "optimized",
            "latency",
        ),
        (
            "x-amzn-bedrock-guardrailidentifier",
            "gr-other-team",
            "guardrail",
        ),
        ("x-amzn-bedrock-guardrailversion", "1", "guardrail"),
        ("x-amzn-bedrock-trace", "ENABLED", "guardrail"),
    ] {
        let r = invoke_with(&proxy, ALICE_KEY, &[(header, value)]).await;
        assert_eq!(r.status, 400, "{header}: {:?}", r.body);
        assert_eq!(r.error_type(), "ValidationException");
        let m = r.message();
        assert!(
            m.to_ascii_lowercase().contains(header)
                && m.contains("allow_headers")
                && m.contains(&format!("\"{allow}\""))
                && m.contains("[users.alice]"),
            "{header}: {m}"
        );
    }
    for (field, value, allow) in [
        ("serviceTier", r#"{"type":"priority"}"#, "service-tier"),
        ("performanceConfig", r#"{"latency":"optimized"}"#, "latency"),
        (
            "guardrailConfig",
            r#"{"guardrailIdentifier":"gr-other-team","guardrailVersion":"1"}"#,
            "guardrail",
        ),
    ] {
        for op in ["converse", "converse-stream"] {
            let r = post(
                &proxy,
                &format!("/model/{SONNET}/{op}"),
                ALICE_KEY,
                &converse_with(field, value),
            )
            .await;
            assert_eq!(r.status, 400, "{op} {field}: {:?}", r.body);
            let m = r.message();
            assert!(
                m.contains(field) && m.contains(&format!("\"{allow}\"")),
                "{field}: {m}"
            );
        }
    }
    assert!(
        fake.received().is_empty(),
        "nothing refused reached Bedrock"
    );

    // The standard settings are what every call gets anyway: they pass.
    let r = invoke_with(
        &proxy,
        ALICE_KEY,
        &[
            ("x-amzn-bedrock-service-tier", "default"),
            ("x-amzn-bedrock-performanceconfig-latency", "standard"),
            ("x-amzn-bedrock-trace", "DISABLED"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/converse"),
        ALICE_KEY,
        &converse_with("performanceConfig", r#"{"latency":"standard"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // The Messages front: Anthropic's `service_tier` has no Bedrock meaning beyond the
    // standard tier; it is dropped, never forwarded. A value Anthropic does not define is
    // refused.
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"service_tier":"auto","messages":[{"role":"user","content":"hi"}]}"#;
    let r = messages(&proxy, ALICE_KEY, body, &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let last = fake.received().pop().expect("received");
    assert!(
        !String::from_utf8_lossy(&last.body).contains("service_tier"),
        "{:?}",
        last.body
    );
    let r = messages(
        &proxy,
        ALICE_KEY,
        &body.replace("\"auto\"", "\"priority\""),
        &[("x-amzn-bedrock-service-tier", "priority")],
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let (kind, message) = r.anthropic_error();
    assert_eq!(kind, "invalid_request_error");
    assert!(message.contains("service_tier"), "{message}");
    assert_eq!(fake.received().len(), 3);
}

#[tokio::test]
async fn allowed_billing_options_are_forwarded_and_priced_with_their_own_entry() {
    let fake = FakeBedrock::start().await;
    let prices = format!(
        "[prices.\"{SONNET}\"]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\ncache_read_per_mtok = 0.3\n\
         cache_write_per_mtok = 3.75\n[prices.\"{SONNET}\".priority]\ninput_per_mtok = 6.0\n\
         output_per_mtok = 30.0\ncache_read_per_mtok = 0.6\ncache_write_per_mtok = 7.5\n"
    );
    let config = two_user_config(&fake, &prices).replace(
        "[users.alice]\n",
        "[users.alice]\nallow_headers = [\"service-tier\", \"latency\", \"guardrail\"]\n",
    );
    let proxy = Proxy::start(&config).await;

    let r = invoke_with(&proxy, ALICE_KEY, &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = invoke_with(
        &proxy,
        ALICE_KEY,
        &[
            ("x-amzn-bedrock-service-tier", "priority"),
            ("x-amzn-bedrock-guardrailidentifier", "gr-1"),
            ("x-amzn-bedrock-guardrailversion", "DRAFT"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let got = fake.received().pop().expect("received");
    assert_eq!(got.headers["x-amzn-bedrock-service-tier"], "priority");
    assert_eq!(got.headers["x-amzn-bedrock-guardrailidentifier"], "gr-1");

    // Latency-optimized is allowed, but the table has no rate for it: refused rather than
    // metered at the standard rate.
    let r = invoke_with(
        &proxy,
        ALICE_KEY,
        &[("x-amzn-bedrock-performanceconfig-latency", "optimized")],
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(
        r.message()
            .contains(&format!("[prices.\"{SONNET}\".latency_optimized]")),
        "{}",
        r.message()
    );
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/converse"),
        ALICE_KEY,
        &converse_with("serviceTier", r#"{"type":"priority"}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let got = fake.received().pop().expect("received");
    assert!(String::from_utf8_lossy(&got.body).contains("\"serviceTier\""));

    // Bob may not.
    let r = invoke_with(
        &proxy,
        BOB_KEY,
        &[("x-amzn-bedrock-service-tier", "priority")],
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.message().contains("[users.bob]"), "{}", r.message());

    let costs: Vec<(String, Option<f64>)> = eventually("5 ledger rows", || async {
        let rows = ledger_query(
            &proxy,
            "SELECT operation, cost_usd FROM requests ORDER BY id",
            |r| Ok((r.get(0)?, r.get(1)?)),
        );
        (rows.len() >= 5).then_some(rows)
    })
    .await;
    // The fake's InvokeModel: 11 in, 7 out, 4 cache read, 3 cache write.
    let standard = (11.0 * 3.0 + 7.0 * 15.0 + 4.0 * 0.3 + 3.0 * 3.75) / 1e6;
    let priority = (11.0 * 6.0 + 7.0 * 30.0 + 4.0 * 0.6 + 3.0 * 7.5) / 1e6;
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
    assert!(close(costs[0].1, standard), "{costs:?}");
    assert!(close(costs[1].1, priority), "{costs:?}");
    // The fake's Converse: 9 in, 4 out, 5 cache read, 6 cache write, at the priority rate.
    let converse_priority = (9.0 * 6.0 + 4.0 * 30.0 + 5.0 * 0.6 + 6.0 * 7.5) / 1e6;
    assert!(close(costs[3].1, converse_priority), "{costs:?}");
}

#[tokio::test]
async fn an_unknown_allow_headers_name_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeBedrock::start().await;
    let config = two_user_config(&fake, "").replace(
        "[users.bob]\n",
        "[users.bob]\nallow_headers = [\"priority\"]\n",
    );
    std::fs::write(dir.path().join("c.toml"), config).expect("write");
    let path = dir.path().join("c.toml");
    let out = run(
        dir.path(),
        &["check", "--config", path.to_str().expect("utf-8")],
    )
    .await;
    assert!(!out.ok, "{out}");
    assert!(
        out.stderr.contains("users.bob.allow_headers") && out.stderr.contains("\"service-tier\""),
        "{}",
        out.stderr
    );
}

/// A connection that, once frozen, reads nothing more and swallows what is written: a client
/// that ignores GOAWAY (and the PING that comes with it) and keeps the connection open.
struct Freezable {
    inner: tokio::net::TcpStream,
    frozen: Arc<AtomicBool>,
}

impl AsyncRead for Freezable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Freezable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.frozen.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_client_that_ignores_goaway_does_not_hold_shutdown() {
    const GRACE: u64 = 20;
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start_with_args(
        &two_user_config(&fake, ""),
        &["--shutdown-grace-secs", &GRACE.to_string()],
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(&proxy.addr)
        .await
        .expect("connect");
    let frozen = Arc::new(AtomicBool::new(false));
    let io = hyper_util::rt::TokioIo::new(Freezable {
        inner: tcp,
        frozen: frozen.clone(),
    });
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/model/{SONNET}/converse", proxy.addr))
        .header("authorization", format!("Bearer {ALICE_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(CONVERSE_BODY)))
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 request");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let _ = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body");
    // From here the client neither reads nor answers: it holds the connection open.
    frozen.store(true, Ordering::Relaxed);

    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = proxy.terminate();
        (s, proxy)
    })
    .await
    .expect("join");
    let took = started.elapsed();
    println!("SIGTERM to exit with an h2 client holding its connection: {took:?}");
    assert!(status.0.success(), "{:?}", status.0);
    assert!(
        took < Duration::from_secs(5),
        "shutdown took {took:?} (grace {GRACE} s): the idle h2 connection held it"
    );
    drop(sender);
    conn_task.abort();
}

#[tokio::test]
async fn billing_options_cannot_slip_past_the_check_in_another_spelling() {
    // Found in review: each of these reached Bedrock before, with priority asked for and not
    // allowed. A duplicate field (Bedrock reads the last), an escaped field name, a body that
    // is not JSON, and a repeated header (every value is forwarded).
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let converse_path = format!("/model/{SONNET}/converse");
    let msgs = r#""messages":[{"role":"user","content":[{"text":"hi"}]}]"#;
    for body in [
        format!(
            r#"{{{msgs},"serviceTier":{{"type":"default"}},"serviceTier":{{"type":"priority"}}}}"#
        ),
        format!(r#"{{{msgs},"service\u0054ier":{{"type":"priority"}}}}"#),
        format!(r#"{{{msgs},"serviceTier":{{"type":"priority"}}"#),
    ] {
        let r = post(&proxy, &converse_path, ALICE_KEY, &body).await;
        assert_eq!(r.status, 400, "{body}: {:?}", r.body);
    }
    let r = invoke_with(
        &proxy,
        ALICE_KEY,
        &[
            ("x-amzn-bedrock-service-tier", "default"),
            ("x-amzn-bedrock-service-tier", "priority"),
        ],
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert!(r.message().contains("more than once"), "{}", r.message());
    assert!(fake.received().is_empty(), "nothing reached Bedrock");
    // An ordinary call still goes through.
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
}

#[tokio::test]
async fn a_get_with_an_empty_chunked_body_is_served_and_one_with_data_is_refused() {
    // Found in review: a GET whose length is not known up front was refused even when empty.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let ask = |chunks: &'static str| {
        let addr = proxy.addr.clone();
        async move {
            let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let req = format!(
                "GET /inference-profiles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunks}"
            );
            sock.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            sock.read_to_end(&mut out).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let empty = ask("0\r\n\r\n").await;
    assert!(empty.starts_with("HTTP/1.1 200"), "{empty}");
    let with_data = ask("5\r\nhello\r\n0\r\n\r\n").await;
    assert!(with_data.starts_with("HTTP/1.1 400"), "{with_data}");
    assert!(with_data.contains("carries no body"), "{with_data}");
    assert_eq!(fake.received().len(), 1, "only the empty one was forwarded");
}
