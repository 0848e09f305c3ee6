//! Defects found by trying to break the proxy: an HTTP/2 client that ignored GOAWAY holding
//! shutdown.

use crate::common;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use tokio::io::{AsyncRead, AsyncWrite};

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
