//! Metering: what each response cost, read alongside the bytes as they pass, recorded in the
//! ledger, counted against budgets and rate limits, and exported as Prometheus metrics.
//!
//! - [`usage`]: exact token counts from headers, JSON and event streams, inline.
//! - [`prices`]: USD per million tokens; cost estimation that never guesses.
//! - [`ledger`]: the SQLite ledger, written in batches off the request path.
//! - [`limits`]: per-user monthly budget and per-minute rate accounting.
//! - [`metrics`]: Prometheus exposition for the admin listener.
//! - [`report`]: the `usage` command's queries and formats.

pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod prices;
pub mod report;
pub mod usage;

use std::path::Path;
use std::time::Duration;

use chrono::Utc;

use ledger::Ledger;
use limits::{Accounts, Month};
use metrics::Metrics;

/// Everything metering needs at run time, shared by all requests.
#[derive(Debug)]
pub struct Meter {
    pub ledger: Ledger,
    pub accounts: Accounts,
    pub metrics: Metrics,
}

impl Meter {
    /// Opens the ledger and rebuilds budget and rate counters from it.
    pub fn open(path: &Path, flush_interval: Duration) -> anyhow::Result<Meter> {
        let now = Utc::now();
        let month = Month::of(now);
        let conn = ledger::open_db(path)?;
        let totals = ledger::totals_since(&conn, month.start().timestamp_millis())?;
        let recent = ledger::recent(&conn, now.timestamp_millis() - 60_000)?;
        drop(conn);
        let rebuilt = totals.len();
        let accounts = Accounts::rebuild(month, totals, recent);
        let ledger = Ledger::open(path, flush_interval)?;
        tracing::info!(ledger = %path.display(), users_with_usage = rebuilt, "ledger open; counters rebuilt for {month}");
        Ok(Meter {
            ledger,
            accounts,
            metrics: Metrics::new(),
        })
    }
}
