//! What happens to a response body on its way back: [`Relay`] passes the upstream body to the
//! client piece by piece as it arrives, through the front's [`Encoder`] (unchanged bytes on the
//! Bedrock-native front), with the usage meter reading alongside.
//!
//! It never holds a piece back to wait for the next one and never buffers a whole response. It
//! cuts a response (as a transfer error, never a silent short answer) when Bedrock goes silent
//! for `timeouts.stream_idle_secs` or the shutdown grace period is over. When the body ends,
//! fails, or is dropped early (the client went away, which also drops the upstream connection),
//! the request is recorded once, with the usage seen so far.

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

/// The upstream body on its way to the client; see the module doc.
pub struct Relay<B, E> {
    inner: B,
    encoder: E,
    /// Taken by the first of end, error or drop.
    end: Option<(Recorder, Option<UsageMeter>)>,
    meter: Arc<Meter>,
    operation: &'static str,
    bytes_out: u64,
    /// The encoder ended the response: nothing more is sent.
    done: bool,
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
}

impl<B, E: Encoder> Relay<B, E> {
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
        Relay {
            inner,
            encoder,
            end: Some((recorder, usage)),
            meter,
            operation,
            bytes_out: 0,
            done: false,
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            shutdown_token: shutdown,
            timer: Box::pin(tokio::time::sleep(first)),
            idle_after: limits.idle,
            keepalive_after,
            last_in: now,
            last_out: now,
        }
    }
}

impl<B, E> Relay<B, E> {
    fn finish(&mut self, outcome: Outcome) {
        if let Some((recorder, usage)) = self.end.take() {
            let ended = outcome == Outcome::Complete;
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
            });
        }
    }

    /// Counts bytes on their way to the client.
    fn sent(&mut self, out: Bytes) -> Frame<Bytes> {
        self.bytes_out += out.len() as u64;
        self.last_out = tokio::time::Instant::now();
        Frame::data(out)
    }
}

impl<B, E> http_body::Body for Relay<B, E>
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
                    let upstream_ended = !encoded.ended && this.inner.is_end_stream();
                    if upstream_ended && let Some(tail) = this.encoder.end() {
                        out = Some(match out {
                            Some(o) => [o, tail].concat().into(),
                            None => tail,
                        });
                    }
                    let out = out.map(|o| this.sent(o));
                    if encoded.ended || upstream_ended {
                        this.done = true;
                        this.finish(Outcome::Complete);
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
                    this.done = true;
                    this.finish(Outcome::Complete);
                    return Poll::Ready(tail.map(Ok));
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
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.encoder.passes_through() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

impl<B, E> Drop for Relay<B, E> {
    fn drop(&mut self) {
        let outcome = if self.shutdown_token.is_cancelled() {
            Outcome::Shutdown
        } else {
            Outcome::ClientGone
        };
        self.finish(outcome);
    }
}
