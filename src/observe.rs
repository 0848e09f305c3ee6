//! Phase `observe`: the end of every request, in one place. One access-log line, one ledger row,
//! the budget and rate counters and the metrics, written together from what the phases and the
//! usage meter saw.
//!
//! A [`Recorder`] is made when a request arrives and is consumed exactly once: by a refusal, by
//! the response body when it ends (see `stream`), or, if the request is dropped on the way (the
//! client went away while the proxy waited on Bedrock, or shutdown), by its own `Drop`. So every
//! request is recorded once, whatever happens to it. Callers the proxy could not identify get a
//! log line and a metric but no ledger row: they cost nothing, and anyone on the network could
//! otherwise fill the disk.
//!
//! The ledger commits each row before the request's answer ends: [`Recorder::finish`] and
//! [`Recorder::answered`] hand back the row's [`Receipt`], and whoever ends the answer (the
//! response body, see `stream`, or the front for an answer read whole) waits on it first.
//! Before a call is sent, [`sent_marker`] says what to write ahead of it (see `forward`), so a
//! crash between send and row leaves an `interrupted` row at the next start. This module
//! never blocks a request itself (the ledger only queues; the waiting is done by the caller,
//! bounded by the ledger's `COMMIT_WAIT`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::domain::{Front, Labels, Op, Outcome, Usage};
use crate::meter::Meter;
use crate::meter::ledger::{Receipt, Record, Sent};
use crate::meter::prices::Price;
use crate::refusal::{Reason, Refusal};
use crate::state::AppState;

/// What is known about a request, filled in by the phases as it is handled.
#[derive(Debug, Default)]
pub struct RequestInfo {
    pub request_id: String,
    /// Wall-clock start, Unix milliseconds.
    pub started_ms: i64,
    pub front: Option<Front>,
    pub user: Option<String>,
    /// Project and session labels of the call.
    pub labels: Labels,
    pub operation: Option<Op>,
    /// The model id as the caller asked for it.
    pub model: Option<String>,
    /// The mapped model (config key) of the caller's profile.
    pub base_model: Option<String>,
    pub profile: Option<String>,
    /// The mapped model's price, looked up in the config snapshot the request started with.
    pub price: Option<Price>,
    pub status: u16,
    pub bytes_in: usize,
    pub ttfb: Option<Duration>,
    pub upstream_request_id: Option<String>,
    /// Passed the budget and rate-limit check (counts in the rate window).
    pub admitted: bool,
    /// Handed to the upstream client: from here on Bedrock may have run (and billed) it.
    pub sent: bool,
    /// Its sent marker was queued (see [`sent_marker`]): its row must be written, and replaces
    /// the marker.
    pub marked: bool,
    /// Bedrock's error type when it answered 4xx/5xx.
    pub upstream_error: Option<&'static str>,
}

impl RequestInfo {
    fn new() -> RequestInfo {
        let mut b = [0u8; 16];
        let request_id = match getrandom::fill(&mut b) {
            Ok(()) => hex::encode(b),
            Err(_) => "-".to_string(),
        };
        RequestInfo {
            request_id,
            started_ms: Utc::now().timestamp_millis(),
            ..RequestInfo::default()
        }
    }

    fn op(&self) -> Op {
        self.operation.unwrap_or(Op::Unknown)
    }
}

/// The marker to commit before `info`'s call goes to Bedrock, and notes that it was made; `None`
/// for a caller the proxy could not identify (no row, so no marker either).
pub fn sent_marker(info: &mut RequestInfo) -> Option<Sent> {
    let user = info.user.clone()?;
    info.marked = true;
    Some(Sent {
        ts_ms: info.started_ms,
        request_id: info.request_id.clone(),
        user,
        front: info.front.map(|f| f.name().to_string()),
        project: info.labels.project.clone(),
        session: info.labels.session.clone(),
        operation: info.op().name().to_string(),
        model: info.model.clone(),
        base_model: info.base_model.clone(),
        profile_arn: info.profile.clone(),
        admitted: info.admitted,
    })
}

/// How a response ended, as the body relay saw it.
#[derive(Debug, Clone, Copy)]
pub struct Ending {
    pub bytes_out: u64,
    pub usage: Usage,
    /// All of the usage was seen (the response reached its natural end).
    pub complete: bool,
    pub outcome: Outcome,
}

/// The one record of one request; see the module doc.
pub struct Recorder {
    pub info: RequestInfo,
    meter: Arc<Meter>,
    started: Instant,
    shutdown: CancellationToken,
    /// Cleared once recorded (or skipped), so nothing is recorded twice.
    armed: bool,
    /// Held until recorded, so shutdown can wait for the last row.
    _tracked: TaskTrackerToken,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("request_id", &self.info.request_id)
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// Starts the record of a request that just arrived.
    pub fn start(state: &AppState) -> Recorder {
        Recorder {
            info: RequestInfo::new(),
            meter: state.meter.clone(),
            started: Instant::now(),
            shutdown: state.shutdown.clone(),
            armed: true,
            _tracked: state.requests.token(),
        }
    }

    /// When the request arrived.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Nothing to record: answered by the proxy itself (health, the caller's own usage).
    pub fn skip(mut self) {
        self.armed = false;
    }

    /// A refusal by the proxy, answered with `status`.
    pub fn refused(mut self, status: u16, refusal: &Refusal) {
        let outcome = match refusal.reason {
            Reason::ShuttingDown => Outcome::Shutdown,
            reason => Outcome::Refused(reason.name()),
        };
        self.unanswered(status, outcome);
    }

    /// Bedrock's answer was read whole and answered with `status` (an error, a count): it
    /// carried no usage, and that is all of it. Send the answer once the receipt resolves.
    pub fn answered(mut self, status: http::StatusCode) -> Receipt {
        self.info.status = status.as_u16();
        let outcome = self
            .info
            .upstream_error
            .map_or(Outcome::Complete, Outcome::UpstreamFailed);
        self.record(0, Usage::default(), true, outcome)
    }

    /// Ends a request that got no answer from Bedrock. One that was sent may have run anyway
    /// (Bedrock did not answer in time, the client left), so no usage seen is not complete.
    fn unanswered(&mut self, status: u16, outcome: Outcome) {
        self.info.status = status;
        let complete = !self.info.sent;
        self.record(0, Usage::default(), complete, outcome);
    }

    /// The response ended (or was cut) as `ending` says. End the answer once the receipt
    /// resolves.
    pub fn finish(mut self, ending: Ending) -> Receipt {
        self.record(
            ending.bytes_out,
            ending.usage,
            ending.complete,
            ending.outcome,
        )
    }

    /// The one place a request is written down. The receipt resolves once its row is
    /// committed (at once when it gets none).
    fn record(
        &mut self,
        bytes_out: u64,
        usage: Usage,
        complete: bool,
        outcome: Outcome,
    ) -> Receipt {
        if !std::mem::replace(&mut self.armed, false) || self.info.operation == Some(Op::Health) {
            return Receipt::none();
        }
        let info = std::mem::take(&mut self.info);
        let op = info.op();
        let failed_upstream = outcome.is_upstream_error();
        let refused_locally = matches!(outcome, Outcome::Refused(_)) && !info.sent;
        let outcome = outcome.name();
        let elapsed = self.started.elapsed();
        let cost = if usage.total() == 0 {
            Some(0.0)
        } else {
            info.price.and_then(|p| p.cost(&usage))
        };
        let latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let ttfb_ms = info
            .ttfb
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        tracing::info!(
            target: "bedrock_gate::access",
            request_id = %info.request_id,
            user = info.user.as_deref().unwrap_or("-"),
            front = info.front.map_or("-", |f| f.name()),
            operation = op.name(),
            model = info.model.as_deref().unwrap_or("-"),
            profile = info.profile.as_deref().unwrap_or("-"),
            status = info.status,
            latency_ms,
            ttfb_ms,
            bytes_in = info.bytes_in,
            bytes_out,
            input_tokens = usage.input_tokens,
            output_tokens = usage.output_tokens,
            cache_read_tokens = usage.cache_read_tokens,
            cache_write_tokens = usage.cache_write_tokens,
            cost_usd = cost,
            complete,
            outcome,
            project = info.labels.project.as_deref().unwrap_or("-"),
            session = info.labels.session.as_deref().unwrap_or("-"),
            "request"
        );
        let meter = &self.meter;
        meter
            .metrics
            .request(info.user.as_deref(), op.name(), info.status);
        if failed_upstream {
            meter
                .metrics
                .upstream_error(info.user.as_deref(), op.name(), outcome);
        }
        meter.metrics.timing(
            op.name(),
            elapsed.as_secs_f64(),
            info.ttfb.map(|d| d.as_secs_f64()),
        );
        let Some(user) = info.user else {
            return Receipt::none();
        };
        // Attribute to the start time, as the ledger does, so a restart rebuilds the same sums.
        let at = Utc
            .timestamp_millis_opt(info.started_ms)
            .single()
            .unwrap_or_else(Utc::now);
        meter.accounts.complete(&user, &usage, cost, at, Utc::now());
        let model = info
            .base_model
            .as_deref()
            .or(info.model.as_deref())
            .unwrap_or("-");
        meter.metrics.usage(&user, model, &usage, cost);
        // The ledger grows with admitted work: past a cap per user and minute, refusals the
        // proxy made itself are counted, not written (never one with a marker to replace).
        if refused_locally && !info.marked && !meter.refusals.allow(&user, info.started_ms) {
            meter.metrics.refusal_not_recorded(&user);
            return Receipt::none();
        }
        meter.ledger.record(Record {
            ts_ms: info.started_ms,
            user: Some(user),
            front: info.front.map(|f| f.name().to_string()),
            project: info.labels.project,
            session: info.labels.session,
            operation: op.name().to_string(),
            model: info.model,
            base_model: info.base_model,
            profile_arn: info.profile,
            status: info.status,
            usage,
            cost_usd: cost,
            latency_ms,
            ttfb_ms,
            request_id: info.request_id,
            upstream_request_id: info.upstream_request_id,
            complete,
            admitted: info.admitted,
            outcome: outcome.to_string(),
            marked: info.marked,
        })
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let outcome = if self.shutdown.is_cancelled() {
            Outcome::Shutdown
        } else {
            Outcome::ClientGone
        };
        self.unanswered(499, outcome);
    }
}
