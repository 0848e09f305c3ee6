//! Prometheus metrics, served on the admin listener only.
//!
//! Label values are bounded: users and models come from the config, operations and statuses
//! from small fixed sets. No key, prompt or completion is ever a label.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::domain::Usage;
use crate::meter::ledger::LedgerStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub user: String,
    pub operation: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub user: String,
    pub operation: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub user: String,
    pub model: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UserLabels {
    pub user: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: String,
}

/// What became of a sign-in or a refresh (a small fixed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~524 s
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_errors: Family<ErrorLabels, Counter>,
    refusals_not_recorded: Family<UserLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<UserLabels, Counter<f64, AtomicU64>>,
    unpriced: Family<UserLabels, Counter>,
    latency: Family<OperationLabels, Histogram, fn() -> Histogram>,
    ttfb: Family<OperationLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<OperationLabels, Gauge>,
    signins: Family<OutcomeLabels, Counter>,
    refreshes: Family<OutcomeLabels, Counter>,
    config_generation: Gauge,
    ledger_lag: Gauge<f64, AtomicU64>,
    ledger_pending: Gauge,
    ledger_dropped: Gauge,
    store_degraded: Gauge,
    store_spool_bytes: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("bedrock_gate");
        let m = Metrics {
            requests: Family::default(),
            upstream_errors: Family::default(),
            refusals_not_recorded: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            unpriced: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            ttfb: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            signins: Family::default(),
            refreshes: Family::default(),
            config_generation: Gauge::default(),
            ledger_lag: Gauge::default(),
            ledger_pending: Gauge::default(),
            ledger_dropped: Gauge::default(),
            store_degraded: Gauge::default(),
            store_spool_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by user, operation and status",
            m.requests.clone(),
        );
        registry.register(
            "upstream_errors",
            "Calls Bedrock answered with an error or cut (a 4xx/5xx, an exception frame, a broken or silent stream), by user, operation and error type",
            m.upstream_errors.clone(),
        );
        registry.register(
            "refusals_not_recorded",
            "Refusals past the per-user cap of ledger rows per minute, counted here instead, by user",
            m.refusals_not_recorded.clone(),
        );
        registry.register(
            "tokens",
            "Tokens by user, model and kind (input, output, cache_read, cache_write)",
            m.tokens.clone(),
        );
        registry.register(
            "cost_usd",
            "Estimated cost in USD by user (priced requests only)",
            m.cost.clone(),
        );
        registry.register(
            "unpriced_requests",
            "Requests with tokens but no configured price, by user",
            m.unpriced.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to the end of the response, by operation",
            m.latency.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Time from request to upstream response headers, by operation",
            m.ttfb.clone(),
        );
        registry.register(
            "in_flight_responses",
            "Responses being streamed to clients, by operation",
            m.in_flight.clone(),
        );
        registry.register(
            "signins",
            "SSO sign-ins that reached the callback, by outcome (approved, denied, idp_unavailable)",
            m.signins.clone(),
        );
        registry.register(
            "session_refreshes",
            "Refresh grants, by outcome (rotated, refused, idp_unavailable)",
            m.refreshes.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the live config (1 at start, +1 per reload)",
            m.config_generation.clone(),
        );
        registry.register(
            "ledger_write_lag_seconds",
            "Age of the oldest row in the last ledger commit",
            m.ledger_lag.clone(),
        );
        registry.register(
            "ledger_pending_rows",
            "Ledger rows waiting to be committed",
            m.ledger_pending.clone(),
        );
        registry.register(
            "ledger_dropped_rows",
            "Ledger rows dropped (queue full or repeated write failures)",
            m.ledger_dropped.clone(),
        );
        registry.register(
            "store_degraded",
            "1 while the PostgreSQL store cannot take rows and they wait in the spool (0 on SQLite)",
            m.store_degraded.clone(),
        );
        registry.register(
            "store_spool_bytes",
            "Bytes of ledger rows waiting in the spool for the PostgreSQL store",
            m.store_spool_bytes.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A browser sign-in that came back from the IdP: `approved`, `denied` or `idp_unavailable`.
    pub fn signin(&self, outcome: &'static str) {
        self.signins.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A refresh grant: `rotated`, `refused` (the session ended) or `idp_unavailable`.
    pub fn refresh(&self, outcome: &'static str) {
        self.refreshes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A call that failed upstream; `kind` is Bedrock's error type or the outcome's name.
    pub fn upstream_error(&self, user: Option<&str>, operation: &str, kind: &str) {
        self.upstream_errors
            .get_or_create(&ErrorLabels {
                user: user.unwrap_or("-").to_string(),
                operation: operation.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// A refusal past the per-minute cap of ledger rows.
    pub fn refusal_not_recorded(&self, user: &str) {
        self.refusals_not_recorded
            .get_or_create(&UserLabels {
                user: user.to_string(),
            })
            .inc();
    }

    pub fn request(&self, user: Option<&str>, operation: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                user: user.unwrap_or("-").to_string(),
                operation: operation.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    pub fn usage(&self, user: &str, model: &str, usage: &Usage, cost: Option<f64>) {
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        user: user.to_string(),
                        model: model.to_string(),
                        kind: kind.to_string(),
                    })
                    .inc_by(n);
            }
        }
        let labels = UserLabels {
            user: user.to_string(),
        };
        match cost {
            Some(c) => {
                self.cost.get_or_create(&labels).inc_by(c);
            }
            None if usage.input_tokens + usage.output_tokens > 0 => {
                self.unpriced.get_or_create(&labels).inc();
            }
            None => {}
        }
    }

    pub fn timing(&self, operation: &str, total_secs: f64, ttfb_secs: Option<f64>) {
        let labels = OperationLabels {
            operation: operation.to_string(),
        };
        self.latency.get_or_create(&labels).observe(total_secs);
        if let Some(t) = ttfb_secs {
            self.ttfb.get_or_create(&labels).observe(t);
        }
    }

    pub fn in_flight(&self, operation: &str, delta: i64) {
        self.in_flight
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
            })
            .inc_by(delta);
    }

    /// Renders the exposition text, sampling the gauges that live elsewhere.
    pub fn render(
        &self,
        generation: u64,
        ledger: Option<&LedgerStats>,
        store: Option<&crate::store::writer::Health>,
    ) -> String {
        if let Some(h) = store {
            self.store_degraded
                .set(i64::from(h.degraded.load(Ordering::Relaxed)));
            self.store_spool_bytes
                .set(i64::try_from(h.spool_bytes.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        }
        self.config_generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        if let Some(l) = ledger {
            self.ledger_lag
                .set(l.last_lag_us.load(Ordering::Relaxed) as f64 / 1e6);
            self.ledger_pending.set(l.pending.load(Ordering::Relaxed));
            self.ledger_dropped
                .set(i64::try_from(l.dropped.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let m = Metrics::new();
        m.request(Some("alice"), "Converse", 200);
        m.usage(
            "alice",
            "anthropic.x",
            &Usage {
                input_tokens: 5,
                output_tokens: 3,
                ..Usage::default()
            },
            Some(0.25),
        );
        m.timing("Converse", 0.01, Some(0.005));
        m.in_flight("Converse", 1);
        let text = m.render(3, None, None);
        assert!(
            text.contains(
                r#"bedrock_gate_requests_total{user="alice",operation="Converse",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"bedrock_gate_tokens_total{user="alice",model="anthropic.x",kind="input"} 5"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"bedrock_gate_cost_usd_total{user="alice"} 0.25"#),
            "{text}"
        );
        assert!(text.contains("bedrock_gate_config_generation 3"), "{text}");
        assert!(
            text.contains("bedrock_gate_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
