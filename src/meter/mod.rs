//! Metering: what each response cost, read alongside the bytes as they pass, recorded in the
//! ledger, counted against budgets and rate limits, and exported as Prometheus metrics.
//!
//! - [`usage`]: exact token counts from headers, JSON and event streams, inline.
//! - [`prices`]: USD per million tokens; cost estimation that never guesses.
//! - [`ledger`]: the SQLite ledger, group-committed off the request path; each answer's end
//!   waits for its row.
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

use chrono::Utc;

use ledger::{Ledger, Synchronous};
use limits::{Accounts, Month};
use metrics::Metrics;

/// Everything metering needs at run time, shared by all requests.
#[derive(Debug)]
pub struct Meter {
    pub ledger: Ledger,
    /// The PostgreSQL store's state, when the ledger is there.
    pub store: Option<std::sync::Arc<crate::store::writer::Health>>,
    /// A connection to the store for reads off the request path (the gateway's `/usage`).
    pub reader: Option<crate::store::Lazy>,
    pub accounts: Accounts,
    pub metrics: Metrics,
    /// How many refusals each user had written this minute.
    pub refusals: RefusalCap,
}

/// Reads the other replicas' spend this month from the store twice a second into `meter`'s
/// accounts, for the budget check. A store that does not answer keeps the last figures.
pub fn spawn_store_poll(
    meter: std::sync::Arc<Meter>,
    settings: crate::store::Settings,
    dir: std::path::PathBuf,
    replica: String,
) {
    tokio::spawn(async move {
        let mut client = None;
        let mut tick = tokio::time::interval(STORE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if client.is_none() {
                client = crate::store::pg::connect(&settings, &dir).await.ok();
            }
            let Some(c) = client.as_ref() else { continue };
            let month = Month::of(Utc::now());
            let day = month.start().format("%Y-%m-%d").to_string();
            match tokio::time::timeout(
                STORE_POLL * 4,
                crate::store::pg::totals_since_day(c, &day, (&replica, false)),
            )
            .await
            {
                Ok(Ok(others)) => meter.accounts.set_others(month, others),
                _ => client = None,
            }
        }
    });
}

/// Records the calls vanished replicas had in flight (see [`crate::store::pg::recover_stale`]);
/// a failure is logged and tried again later.
async fn recover_stale(client: &mut tokio_postgres::Client, replica: &str) {
    match crate::store::pg::recover_stale(client, replica, Utc::now().timestamp_millis()).await {
        Ok(done) => {
            for (gone, calls) in done {
                tracing::warn!(
                    replica = %gone,
                    calls,
                    "a replica unseen for 15 minutes had calls in flight: they are recorded as `interrupted`"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not check for vanished replicas")
        }
    }
}

/// How often the other replicas' spend is read.
pub const STORE_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Refusal rows per user and minute that reach the ledger; beyond it they are counted in
/// `bedrock_gate_refusals_not_recorded_total` and the log line says so once a minute.
pub const MAX_REFUSAL_ROWS_PER_MINUTE: u32 = 60;

/// Counts refusal rows per user and UTC minute.
#[derive(Debug, Default)]
pub struct RefusalCap {
    inner: std::sync::Mutex<std::collections::HashMap<String, (i64, u32)>>,
}

impl RefusalCap {
    /// Counts a refusal of `user` at `ts_ms`; false once the minute's cap is used.
    pub fn allow(&self, user: &str, ts_ms: i64) -> bool {
        let minute = ts_ms.div_euclid(60_000);
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (m, _)| *m == minute);
        }
        let entry = map.entry(user.to_string()).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 == MAX_REFUSAL_ROWS_PER_MINUTE + 1 {
            tracing::warn!(
                user,
                cap = MAX_REFUSAL_ROWS_PER_MINUTE,
                "refusals beyond the cap this minute are counted in /metrics, not written to the ledger"
            );
        }
        entry.1 <= MAX_REFUSAL_ROWS_PER_MINUTE
    }
}

impl Meter {
    /// Opens the ledger in PostgreSQL: migrates the schema (under its lock), records the calls
    /// this replica had in flight when it last died as `interrupted`, rebuilds the counters from
    /// the rollup, and starts the writer with its spool. `dir` is the config's directory.
    pub async fn open_store(
        settings: &crate::store::Settings,
        dir: &Path,
        replica: String,
    ) -> anyhow::Result<Meter> {
        use crate::store::pg;
        let now = Utc::now();
        let month = Month::of(now);
        let mut client = pg::connect(settings, dir).await?;
        let applied = pg::migrate(&mut client).await?;
        if !applied.is_empty() {
            tracing::info!(versions = ?applied, "store schema migrated");
        }
        let interrupted = pg::recover_interrupted(&mut client, &replica).await?;
        if interrupted > 0 {
            tracing::warn!(
                calls = interrupted,
                replica = %replica,
                "calls this replica had in flight when it last stopped without closing the ledger are recorded as `interrupted`"
            );
        }
        pg::heartbeat(&client, &replica, now.timestamp_millis()).await?;
        recover_stale(&mut client, &replica).await;
        let day = month.start().format("%Y-%m-%d").to_string();
        // This replica's own rows rebuild its counters; the others' are read alongside, and
        // again twice a second (see `spawn_store_poll`), so no spend counts twice.
        let totals = pg::totals_since_day(&client, &day, (&replica, true)).await?;
        let others = pg::totals_since_day(&client, &day, (&replica, false)).await?;
        let recent = pg::recent(&client, now.timestamp_millis() - 60_000).await?;
        drop(client);
        let rebuilt = totals.len();
        let accounts = Accounts::rebuild(month, totals, recent);
        accounts.set_others(month, others);
        let spool_path = dir.join(&settings.spool_path);
        let health = std::sync::Arc::new(crate::store::writer::Health::default());
        let writer_health = health.clone();
        let (s, d, p, r) = (
            settings.clone(),
            dir.to_path_buf(),
            spool_path.clone(),
            replica.clone(),
        );
        // The sink owns a runtime of its own for the writer thread, so it is made off this one.
        let sink = tokio::task::spawn_blocking(move || {
            crate::store::writer::PgSink::open(s, &d, &p, r, writer_health)
        })
        .await??;
        let ledger = Ledger::open_postgres(sink, &spool_path)?;
        let store = Some(health);
        tracing::info!(store = %settings.redacted_url(), replica = %replica, users_with_usage = rebuilt, "ledger open in the store; counters rebuilt for {month}");
        Ok(Meter {
            ledger,
            store,
            reader: Some(crate::store::Lazy::new(settings, dir)),
            accounts,
            metrics: Metrics::new(),
            refusals: RefusalCap::default(),
        })
    }

    /// Opens the ledger (upgrading it first, which rolls an older ledger's rows up once), records
    /// the calls a crash interrupted (see [`ledger::recover_interrupted`]) and rebuilds budget
    /// and rate counters from it: the month's spend from the `usage_daily` rollups (the month
    /// starts on a day boundary, so its rollups hold exactly its rows), the last minute's calls
    /// from the rows (indexed by time, and a minute's worth at most). Only `serve` opens a meter:
    /// it must be the one process taking calls on this ledger.
    pub fn open(path: &Path, sync: Synchronous) -> anyhow::Result<Meter> {
        let now = Utc::now();
        let month = Month::of(now);
        let mut conn = ledger::open_db_with(path, sync)?;
        let interrupted = ledger::recover_interrupted(&mut conn)?;
        if interrupted > 0 {
            tracing::warn!(
                calls = interrupted,
                "calls that were in flight when the proxy last stopped without closing the ledger are recorded as `interrupted`"
            );
        }
        let totals = ledger::totals_since(&conn, month.start().timestamp_millis())?;
        let recent = ledger::recent(&conn, now.timestamp_millis() - 60_000)?;
        drop(conn);
        let rebuilt = totals.len();
        let accounts = Accounts::rebuild(month, totals, recent);
        let ledger = Ledger::open(path, sync)?;
        tracing::info!(ledger = %path.display(), users_with_usage = rebuilt, "ledger open; counters rebuilt for {month}");
        Ok(Meter {
            ledger,
            store: None,
            reader: None,
            accounts,
            metrics: Metrics::new(),
            refusals: RefusalCap::default(),
        })
    }
}
