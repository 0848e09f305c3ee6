//! What happens to a response body on its way back: [`Relay`] passes the upstream body to the
//! client piece by piece as it arrives, through the front's [`Encoder`] (unchanged bytes on the
//! Bedrock-native front), with the usage meter reading alongside.
//!
//! It never holds a piece back to wait for the next one and never buffers a whole response. It
//! cuts a response (as a transfer error, never a silent short answer) when Bedrock goes silent
//! for `timeouts.stream_idle_secs` or the shutdown grace period is over. When the body ends or
//! fails the request is recorded once, with the usage seen.
//!
//! A client that goes away does not end a metered answer: Bedrock runs (and bills) the call to
//! its end anyway, so the relay keeps reading it in a task of its own, under the same idle and
//! shutdown limits, sending nothing anywhere, and records the whole usage with outcome
//! `client_gone`. Only a body that is not metered (control-plane reads) ends with the client.
//!
//! The one thing it holds back is the end: once Bedrock's body has ended, the last piece (and
//! the end of the body) waits until the request's ledger row is committed, so a client never
//! has a whole answer whose row a crash could still lose. With a `Content-Length` the last
//! piece is the end, so it is the piece that waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::domain::{Outcome, Usage};
use crate::meter::Meter;
use crate::meter::ledger::Receipt;
use crate::meter::usage::UsageMeter;
use crate::observe::{Ending, Recorder};

/// How a front turns the upstream body into what its client reads.
pub trait Encoder: Send + Unpin + 'static {
    /// One piece of the upstream body, as it arrived. Returns what to send the client now
    /// (possibly nothing, until a whole unit has arrived). `usage` is the meter to feed, if the
    /// response is metered.
    fn encode(&mut self, data: Bytes, usage: Option<&mut UsageMeter>) -> Encoded;

    /// The upstream body ended cleanly: what, if anything, the client must still be told (an
    /// encoder that knows the answer is cut says so here).
    fn end(&mut self) -> Option<Bytes> {
        None
    }

    /// How long the client may go without hearing anything before [`Encoder::keepalive`] is
    /// sent; `None` sends nothing extra.
    fn keepalive_after(&self) -> Option<Duration> {
        None
    }

    /// Bytes that tell the client the response is still alive (an SSE `ping`).
    fn keepalive(&mut self) -> Option<Bytes> {
        None
    }

    /// Whether the client's bytes are exactly the upstream's (so its size is too).
    fn passes_through(&self) -> bool {
        false
    }
}

/// What an [`Encoder`] made of one piece.
#[derive(Debug, Default)]
pub struct Encoded {
    /// Bytes for the client.
    pub out: Option<Bytes>,
    /// The response is over (an error event ended it); nothing more is read upstream.
    pub ended: bool,
}

/// The Bedrock-native encoder: every byte as Bedrock sent it.
#[derive(Debug, Default)]
pub struct PassThrough;

impl Encoder for PassThrough {
    fn encode(&mut self, data: Bytes, usage: Option<&mut UsageMeter>) -> Encoded {
        if let Some(usage) = usage {
            usage.feed(&data);
        }
        Encoded {
            out: Some(data),
            ended: false,
        }
    }

    fn passes_through(&self) -> bool {
        true
    }
}

/// Timeouts a relay enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest silence from Bedrock between two pieces.
    pub idle: Duration,
}

/// The end of a response, waiting for its ledger row.
struct Closing {
    /// The last piece for the client, if any.
    last: Option<Frame<Bytes>>,
    committed: Pin<Box<dyn Future<Output = bool> + Send>>,
}

/// The upstream body on its way to the client; see the module doc.
pub struct Relay<B, E>(Option<Flow<B, E>>)
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
    E: Encoder;

/// The relay's state; [`Relay`] hands it to a draining task when the client goes away.
struct Flow<B, E> {
    inner: B,
    encoder: E,
    /// Taken by the first of end, error or drop.
    end: Option<(Recorder, Option<UsageMeter>)>,
    meter: Arc<Meter>,
    operation: &'static str,
    bytes_out: u64,
    /// The encoder ended the response: nothing more is sent.
    done: bool,
    /// The response is over upstream and recorded; its end waits here for the commit.
    closing: Option<Closing>,
    /// Resolves when the shutdown grace period is over; the stream is then cut and recorded.
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_token: CancellationToken,
    /// Fires at the earliest of the idle cut and the next keep-alive; re-armed lazily (when it
    /// fires early) rather than on every piece, which keeps timers off the hot path.
    timer: Pin<Box<tokio::time::Sleep>>,
    idle_after: Duration,
    keepalive_after: Option<Duration>,
    /// When the last piece arrived from Bedrock.
    last_in: tokio::time::Instant,
    /// When the client was last sent anything.
    last_out: tokio::time::Instant,
    /// The client went away and the rest of the answer is read only to meter it.
    draining: bool,
}

impl<B, E> Relay<B, E>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
    E: Encoder,
{
    pub fn new(
        inner: B,
        encoder: E,
        recorder: Recorder,
        usage: Option<UsageMeter>,
        meter: Arc<Meter>,
        shutdown: CancellationToken,
        limits: Limits,
    ) -> Relay<B, E> {
        let operation = recorder.info.operation.map_or("Unknown", |op| op.name());
        meter.metrics.in_flight(operation, 1);
        let keepalive_after = encoder.keepalive_after();
        let first = keepalive_after.map_or(limits.idle, |k| k.min(limits.idle));
        let now = tokio::time::Instant::now();
        Relay(Some(Flow {
            inner,
            encoder,
            end: Some((recorder, usage)),
            meter,
            operation,
            bytes_out: 0,
            done: false,
            closing: None,
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            shutdown_token: shutdown,
            timer: Box::pin(tokio::time::sleep(first)),
            idle_after: limits.idle,
            keepalive_after,
            last_in: now,
            last_out: now,
            draining: false,
        }))
    }
}

impl<B, E> Flow<B, E> {
    /// Records the request (the first time only); the receipt says when its row is committed.
    fn finish(&mut self, outcome: Outcome) -> Receipt {
        if let Some((recorder, usage)) = self.end.take() {
            let ended = outcome == Outcome::Complete;
            // Read after the client left: however it ended, the client did not get it
            // (`complete` says whether all of the usage was seen).
            let outcome = match outcome {
                Outcome::Shutdown => Outcome::Shutdown,
                _ if self.draining => Outcome::ClientGone,
                other => other,
            };
            let (usage, complete, exception) = match usage.map(|u| u.finish(ended)) {
                Some(m) => (m.usage, m.complete, m.exception),
                // Control-plane reads carry no usage; they are complete when they end.
                None => (Usage::default(), ended, None),
            };
            // A whole answer that is Bedrock's error, or a stream its exception frame ended,
            // is recorded as that error, not as complete.
            let outcome = match (outcome, recorder.info.upstream_error, exception) {
                (Outcome::Complete, Some(kind), _) => Outcome::UpstreamFailed(kind),
                (Outcome::Complete, None, Some(kind)) => {
                    Outcome::UpstreamFailed(crate::domain::upstream_error_type(&kind))
                }
                (other, _, _) => other,
            };
            self.meter.metrics.in_flight(self.operation, -1);
            recorder.finish(Ending {
                bytes_out: self.bytes_out,
                usage,
                complete,
                outcome,
            })
        } else {
            Receipt::none()
        }
    }

    /// The response ended: records it and holds `last` (and the end) until the row is
    /// committed.
    fn close(&mut self, last: Option<Frame<Bytes>>) {
        self.done = true;
        let receipt = self.finish(Outcome::Complete);
        self.closing = Some(Closing {
            last,
            committed: Box::pin(receipt.committed()),
        });
    }

    /// Counts bytes on their way to the client.
    fn sent(&mut self, out: Bytes) -> Frame<Bytes> {
        if !self.draining {
            self.bytes_out += out.len() as u64;
        }
        self.last_out = tokio::time::Instant::now();
        Frame::data(out)
    }

    /// Whether the rest of the answer is worth reading after the client left: it is metered,
    /// not over yet, and the proxy is not shutting down.
    fn worth_draining(&self) -> bool {
        !self.done
            && !self.shutdown_token.is_cancelled()
            && self.end.as_ref().is_some_and(|(_, usage)| usage.is_some())
    }
}

impl<B, E> Flow<B, E>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
    E: Encoder,
{
    /// Reads the rest of the answer, to nobody, until it ends, fails, goes idle or shutdown
    /// cuts it; then it is recorded.
    async fn drain(mut self) {
        use http_body::Body as _;
        self.draining = true;
        self.keepalive_after = None;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_frame(cx)).await
        {
            if frame.is_err() {
                break;
            }
        }
    }
}

impl<B, E> http_body::Body for Relay<B, E>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
    E: Encoder,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        match self.get_mut().0.as_mut() {
            Some(flow) => Pin::new(flow).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(|f| f.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |f| f.size_hint())
    }
}

impl<B, E> Drop for Relay<B, E>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
    E: Encoder,
{
    fn drop(&mut self) {
        let Some(flow) = self.0.take() else {
            return;
        };
        if flow.worth_draining()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            tracing::debug!("the client went away mid-answer; reading the rest to meter it");
            runtime.spawn(flow.drain());
        }
        // Otherwise the flow records itself as it drops.
    }
}

impl<B, E> http_body::Body for Flow<B, E>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
    E: Encoder,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        if let Some(closing) = this.closing.as_mut() {
            if closing.committed.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let last = this.closing.take().and_then(|c| c.last);
            return Poll::Ready(last.map(Ok));
        }
        if this.end.is_some() && this.shutdown.as_mut().poll(cx).is_ready() {
            this.finish(Outcome::Shutdown);
            return Poll::Ready(Some(Err(
                "bedrock-gate shut down before the response ended".into(),
            )));
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.last_in = tokio::time::Instant::now();
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        // Trailers go on only where the client reads Bedrock's own framing.
                        Err(frame) if this.encoder.passes_through() => {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        Err(_) => continue,
                    };
                    let usage = this.end.as_mut().and_then(|(_, u)| u.as_mut());
                    let encoded = this.encoder.encode(data, usage);
                    let mut out = encoded.out.filter(|o| !o.is_empty());
                    // A body with a length is over at its last byte, whether or not the
                    // upstream has said so yet (HTTP/2 may end the stream in a later frame).
                    let upstream_ended = !encoded.ended
                        && (this.inner.is_end_stream()
                            || this.inner.size_hint().exact() == Some(0));
                    if upstream_ended && let Some(tail) = this.encoder.end() {
                        out = Some(match out {
                            Some(o) => [o, tail].concat().into(),
                            None => tail,
                        });
                    }
                    let out = out.map(|o| this.sent(o));
                    if encoded.ended || upstream_ended {
                        this.close(out);
                        // Polls the commit, which registers the wake-up.
                        return Pin::new(this).poll_frame(cx);
                    }
                    match out {
                        Some(frame) => return Poll::Ready(Some(Ok(frame))),
                        None => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %crate::upstream::error_chain(&e), "upstream body failed mid-stream");
                    this.finish(Outcome::UpstreamError);
                    return Poll::Ready(Some(Err(axum::BoxError::from(e))));
                }
                Poll::Ready(None) => {
                    let tail = this.encoder.end().map(|t| this.sent(t));
                    this.close(tail);
                    return Pin::new(this).poll_frame(cx);
                }
                Poll::Pending => {
                    if this.end.is_none() {
                        return Poll::Pending;
                    }
                    while this.timer.as_mut().poll(cx).is_ready() {
                        let now = tokio::time::Instant::now();
                        let cut_at = this.last_in + this.idle_after;
                        if now >= cut_at {
                            tracing::warn!(
                                idle_secs = this.idle_after.as_secs(),
                                "Bedrock sent nothing for timeouts.stream_idle_secs; cutting the response"
                            );
                            this.finish(Outcome::UpstreamIdle);
                            return Poll::Ready(Some(Err(
                                "Bedrock went silent mid-response (bedrock-gate timeouts.stream_idle_secs)".into(),
                            )));
                        }
                        let mut next = cut_at;
                        if let Some(after) = this.keepalive_after {
                            let due = this.last_out + after;
                            if now < due {
                                next = next.min(due);
                            } else if let Some(ping) = this.encoder.keepalive() {
                                this.timer.as_mut().reset((now + after).min(cut_at));
                                return Poll::Ready(Some(Ok(this.sent(ping))));
                            }
                        }
                        this.timer.as_mut().reset(next);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not before the row is committed: the end is what the client waits for.
        self.done && self.closing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.encoder.passes_through() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

impl<B, E> Drop for Flow<B, E> {
    fn drop(&mut self) {
        let outcome = if self.shutdown_token.is_cancelled() {
            Outcome::Shutdown
        } else {
            Outcome::ClientGone
        };
        let _ = self.finish(outcome);
    }
}
