//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, graceful shutdown.
//!
//! Written out (rather than `axum::serve`) for three things a gateway needs: a timer, so a
//! client that dribbles its request headers (or leaves a keep-alive connection idle) is
//! dropped after `timeouts.request_header_secs`; the TLS handshake, bounded in time; and a
//! shutdown that stops accepting at once, lets open connections finish their requests, and
//! gives up after the grace period.
//!
//! A connection asked to close is closed by the proxy itself once nothing has been in flight on
//! it for a while, even if the client never closes it: a second (`CLOSE_LINGER`) at shutdown,
//! `timeouts.request_header_secs` when it was idle (a response body hyper has taken whole may
//! still be on its way to a slow reader). An HTTP/2 client that ignores GOAWAY (or never
//! answers the PING that comes with it) would otherwise keep it open, and hold shutdown for
//! the whole grace period.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::state::AppState;
use crate::workers::Workers;

/// A client has this long to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error (out of file descriptors, say) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// How long a connection asked to close, with no request in flight, may stay open for the
/// client to close it (an HTTP/2 client acks the GOAWAY's PING within a round trip).
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Largest HTTP/2 header list a client may send. (HTTP/1.1 heads are bounded by hyper's read
/// buffer, about 400 KB, and 100 headers.)
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, asks every
/// connection to close after its current request, and waits up to `grace` for them.
/// With `tls`, every connection must complete a TLS handshake first. Each connection is served
/// on one of `workers`, in turn.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    state: Arc<AppState>,
    tls: Option<Arc<rustls::ServerConfig>>,
    workers: &Workers,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let closing = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Per-connection errors (reset before accept) are not the listener's
                    // fault; resource errors (EMFILE) pass if we wait a moment.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // One look at the live config per connection: its timeouts and certificate.
        let live = state.live.load_full();
        let idle_after = live.config.timeouts.request_header;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let active = Arc::new(Active::default());
        let in_flight = active.clone();
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(move |r: http::Request<Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let mut r = r.map(Body::new);
                    r.extensions_mut().insert(crate::signin::Peer(peer));
                    r
                })
                .map_future(move |response| {
                    // In flight from here until its response body is dropped (sent whole,
                    // or the request dropped before it had one).
                    let guard = in_flight.enter();
                    async move {
                        let response: http::Response<Body> = response.await?;
                        Ok::<_, std::convert::Infallible>(response.map(|body| {
                            Body::new(Guarded {
                                body,
                                _guard: guard,
                            })
                        }))
                    }
                }),
        );
        let conn = Conn {
            builder: builder(idle_after),
            requests,
            active,
            idle_after,
            closing: closing.clone(),
            write_after: live.config.timeouts.client_write,
        };
        // The live config's certificate, so a reload rotates it; the one we started with if
        // TLS was since removed from the file (that needs a restart).
        let server = tls.as_ref().map(|initial| {
            live.config
                .tls
                .as_ref()
                .and_then(|t| t.server.clone())
                .unwrap_or_else(|| initial.clone())
        });
        // From here on the connection is the worker's: see `workers`.
        match stream.into_std() {
            Ok(stream) => {
                connections.spawn_on(conn.run(stream, peer, server, service), workers.next());
            }
            Err(e) => tracing::warn!(%peer, error = %e, "cannot hand the connection to a worker"),
        }
    }
    drop(listener);
    tracing::debug!(
        connections = connections.len(),
        "stopped accepting; closing connections"
    );
    closing.cancel();
    connections.close();
    tokio::select! {
        () = connections.wait() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_secs = grace.as_secs(), "grace period over; dropping requests still in flight");
        }
    }
    Ok(())
}

/// What a connection serves: the router behind hyper's service adapter.
trait AppService:
    hyper::service::Service<
        http::Request<Incoming>,
        Response = http::Response<Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> AppService for S where
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = http::Response<Body>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// One accepted connection and what decides when it ends.
struct Conn {
    builder: auto::Builder<TokioExecutor>,
    /// Requests started on this connection so far.
    requests: Arc<AtomicU64>,
    /// Requests on this connection whose response has not ended.
    active: Arc<Active>,
    /// `timeouts.request_header`: how long a connection may go without starting a request.
    idle_after: Duration,
    /// Cancelled at shutdown.
    closing: CancellationToken,
    /// `timeouts.client_write_secs`: how long a write to the client may wait.
    write_after: Duration,
}

impl Conn {
    /// Serves an accepted connection on the worker it was handed to: the TLS handshake first
    /// with `tls` (bounded by [`TLS_HANDSHAKE_TIMEOUT`]), then its requests (see
    /// [`Conn::serve`]).
    async fn run<S: AppService>(
        self,
        stream: std::net::TcpStream,
        peer: std::net::SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        service: S,
    ) {
        // Registered with this worker's runtime, which polls it from now on.
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot serve the connection");
                return;
            }
        };
        let Some(server) = tls else {
            return self.serve(stream, service).await;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let tls_stream =
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
        self.serve(tls_stream, service).await;
    }

    /// Serves the connection until it ends. One that starts no request within `idle_after`
    /// of opening (silent, or stuck before its first request, HTTP/2 included) is dropped;
    /// one that starts none for that long after earlier requests, and every one at shutdown,
    /// is asked to close after its current responses, which still finish.
    async fn serve<I, S>(self, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AppService,
    {
        let io = WriteDeadline::new(io, self.write_after);
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let check = tokio::time::sleep(self.idle_after);
        tokio::pin!(check);
        let mut seen = 0;
        let mut asked_to_close = false;
        // How long a connection asked to close may stay open with nothing in flight: a second
        // at shutdown; on the idle path as long as a request may take to start, since a body
        // hyper has taken whole may still be on its way to a slow reader.
        let mut linger = CLOSE_LINGER;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = self.closing.cancelled(), if !asked_to_close => {
                    conn.as_mut().graceful_shutdown();
                    asked_to_close = true;
                }
                () = self.closing.cancelled(), if asked_to_close && linger != CLOSE_LINGER => {
                    linger = CLOSE_LINGER;
                }
                () = self.active.quiet_for(linger), if asked_to_close => {
                    tracing::debug!("connection asked to close is still open with nothing in flight; closing it");
                    return;
                }
                () = &mut check, if !asked_to_close => {
                    let started = self.requests.load(Ordering::Relaxed);
                    if started == 0 {
                        tracing::debug!("no request within timeouts.request_header_secs; closing the connection");
                        return;
                    }
                    if started == seen {
                        conn.as_mut().graceful_shutdown();
                        asked_to_close = true;
                        linger = self.idle_after.max(CLOSE_LINGER);
                    }
                    seen = started;
                    check.as_mut().reset(tokio::time::Instant::now() + self.idle_after);
                }
            }
        }
    }
}

/// How many requests of one connection have a response that has not ended.
#[derive(Default)]
struct Active {
    count: AtomicUsize,
    /// Woken when the count drops to zero.
    idle: tokio::sync::Notify,
}

impl Active {
    fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        ActiveGuard(self.clone())
    }

    /// Resolves once nothing has been in flight for `linger`.
    async fn quiet_for(&self, linger: Duration) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                tokio::time::sleep(linger).await;
                if self.count.load(Ordering::Acquire) == 0 {
                    return;
                }
            } else {
                idle.await;
            }
        }
    }
}

/// One request in flight; dropped with its response body.
struct ActiveGuard(Arc<Active>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A response body that holds its request's place in [`Active`] until it is dropped.
struct Guarded {
    body: Body,
    _guard: ActiveGuard,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        http_body::Body::poll_frame(Pin::new(&mut self.body), cx)
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.body)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::Body::size_hint(&self.body)
    }
}

/// HTTP/1.1 and HTTP/2, with hyper's HTTP/1 header timeout at `header_timeout`.
fn builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    builder
}

/// A connection whose writes may wait at most `limit`: a client that stops reading fills its
/// socket buffer, and then every write waits; past the limit the write fails (`TimedOut`), the
/// connection ends, and a stream in flight is recorded as its client gone. The timer exists
/// only while a write waits, so a reading client costs nothing.
struct WriteDeadline<I> {
    inner: I,
    limit: Duration,
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    fn new(inner: I, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            waiting: None,
        }
    }

    /// What a write (or flush) that was polled becomes: done, it resets the deadline; not ready,
    /// it fails once it has waited `limit`.
    fn bounded<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                self.waiting = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.waited(cx).map(Err),
        }
    }

    /// After a write was not ready: fail it once it has waited `limit`.
    fn waited(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        let limit = self.limit;
        let sleep = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                tracing::warn!(
                    secs = limit.as_secs(),
                    "the client read nothing for timeouts.client_write_secs; closing its connection"
                );
                Poll::Ready(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client stopped reading (timeouts.client_write_secs)",
                ))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
