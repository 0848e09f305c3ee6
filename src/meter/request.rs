//! The end of a request: one access-log line, one ledger row, counters and metrics, written
//! together from what the handler and the usage meter saw.

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};

use crate::domain::Usage;
use crate::meter::Meter;
use crate::meter::ledger::Record;
use crate::meter::prices::Price;

/// What is known about a request, filled in while it is handled.
#[derive(Debug, Default)]
pub struct RequestInfo {
    pub request_id: String,
    /// Wall-clock start, Unix milliseconds.
    pub started_ms: i64,
    pub user: Option<String>,
    pub operation: &'static str,
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
}

impl RequestInfo {
    pub fn new() -> RequestInfo {
        let mut b = [0u8; 16];
        let request_id = match getrandom::fill(&mut b) {
            Ok(()) => hex::encode(b),
            Err(_) => "-".to_string(),
        };
        RequestInfo {
            request_id,
            started_ms: Utc::now().timestamp_millis(),
            operation: "Unknown",
            ..RequestInfo::default()
        }
    }
}

impl Meter {
    /// Records a finished request: what usage was seen, whether that is all of it (a request
    /// refused before it was sent is complete with none), and how it ended: `complete`,
    /// `client_gone`, `upstream_error`, `upstream_idle`, `shutdown`, or the error type of a refusal.
    pub fn finish(
        &self,
        info: RequestInfo,
        started: Instant,
        bytes_out: u64,
        usage: Usage,
        complete: bool,
        outcome: &str,
    ) {
        let elapsed = started.elapsed();
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
            operation = info.operation,
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
            "request"
        );
        self.metrics
            .request(info.user.as_deref(), info.operation, info.status);
        self.metrics.timing(
            info.operation,
            elapsed.as_secs_f64(),
            info.ttfb.map(|d| d.as_secs_f64()),
        );
        if let Some(user) = &info.user {
            // Attribute to the start time, as the ledger does, so a restart rebuilds the same sums.
            let at = Utc
                .timestamp_millis_opt(info.started_ms)
                .single()
                .unwrap_or_else(Utc::now);
            self.accounts.complete(user, &usage, cost, at, Utc::now());
            let model = info
                .base_model
                .as_deref()
                .or(info.model.as_deref())
                .unwrap_or("-");
            self.metrics.usage(user, model, &usage, cost);
        }
        // Callers the proxy could not identify get a log line and a metric, but no ledger row:
        // they cost nothing, and anyone on the network could otherwise fill the disk.
        let Some(user) = info.user else {
            return;
        };
        self.ledger.record(Record {
            ts_ms: info.started_ms,
            user: Some(user),
            operation: info.operation.to_string(),
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
        });
    }
}
