//! Metering: what each response cost, read alongside the bytes as they pass, recorded in the
//! ledger, counted against budgets and rate limits, and exported as Prometheus metrics.
//!
//! - [`usage`]: exact token counts from headers, JSON and event streams, inline.
//! - [`prices`]: USD per million tokens; cost estimation that never guesses.
//! - [`ledger`]: the SQLite ledger, group-committed off the request path; each answer's end
//!   waits for its row.
//! - [`limits`]: per-user monthly budget and per-minute rate accounting, counting the other
//!   replicas' use as the store poll ([`spawn_store_poll`]) last read it.
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
    pub reader: Option<std::sync::Arc<crate::store::Lazy>>,
    pub accounts: Accounts,
    pub metrics: Metrics,
    /// How many refusals each user had written this minute.
    pub refusals: RefusalCap,
}

/// Twice a second: reads the other replicas' spend this month from the store into `meter`'s
/// accounts, for the budget check, and trades rate windows with them (see `WindowSync`), for
/// the per-minute limits. A store that does not answer keeps the last figures (the others'
/// window seconds still leave the window as time passes); admission never waits for it.
pub fn spawn_store_poll(
    meter: std::sync::Arc<Meter>,
    settings: crate::store::Settings,
    dir: std::path::PathBuf,
    replica: String,
) {
    tokio::spawn(async move {
        let mut client = None;
        let mut window = WindowSync::default();
        let gone = settings.replica_gone;
        let beat_every = (gone / 4).min(HEARTBEAT);
        let (mut last_beat, mut seen_since, mut last_recovery) = (None, None, None);
        let mut tick = tokio::time::interval(STORE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // A replica that was idle trades its first change at once.
                () = meter.accounts.window_changed() => {}
            }
            if client.is_none() {
                client = crate::store::pg::connect(&settings, &dir).await.ok();
            }
            let Some(c) = client.as_mut() else {
                // Unseen meanwhile: the others may not be able to say they were alive either.
                seen_since = None;
                continue;
            };
            // Now and then: say this replica is alive, and, once it has been seen without a
            // break for longer than `replica_gone`, record the calls in flight of any replica
            // unseen for that long.
            let now = std::time::Instant::now();
            if last_beat.is_none_or(|t| now.duration_since(t) >= beat_every) {
                let beat =
                    tokio::time::timeout(STORE_POLL * 4, crate::store::pg::heartbeat(c, &replica))
                        .await;
                if !matches!(beat, Ok(Ok(()))) {
                    client = None;
                    seen_since = None;
                    continue;
                }
                last_beat = Some(now);
                let since = *seen_since.get_or_insert(now);
                if now.duration_since(since) > gone
                    && last_recovery.is_none_or(|t| now.duration_since(t) >= beat_every * 6)
                {
                    last_recovery = Some(now);
                    recover_stale(c, &replica, gone).await;
                }
            }
            let c = &*c;
            let month = Month::of(Utc::now());
            let day = month.start().format("%Y-%m-%d").to_string();
            match tokio::time::timeout(
                STORE_POLL * 4,
                crate::store::pg::totals_since_day(c, &day, (&replica, false)),
            )
            .await
            {
                Ok(Ok(others)) => meter.accounts.set_others(month, others),
                _ => {
                    client = None;
                    continue;
                }
            }
            match tokio::time::timeout(STORE_POLL * 4, window.sync(c, &meter.accounts, &replica))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "rate window not traded with the store this time");
                    client = None;
                }
                Err(_) => client = None,
            }
        }
    });
}

/// Records the calls vanished replicas had in flight (see [`crate::store::pg::recover_stale`]);
/// a failure is logged and tried again later.
async fn recover_stale(
    client: &mut tokio_postgres::Client,
    replica: &str,
    gone: std::time::Duration,
) {
    let done = tokio::time::timeout(
        STORE_POLL * 4,
        crate::store::pg::recover_stale(client, replica, gone),
    )
    .await
    .unwrap_or_else(|_| Err(anyhow::anyhow!("the store did not answer in time")));
    match done {
        Ok(done) => {
            for (gone_replica, calls) in done {
                tracing::warn!(
                    replica = %gone_replica,
                    calls,
                    "a replica unseen for store.replica_gone_secs had calls in flight: they are recorded as `interrupted`"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "could not check for vanished replicas")
        }
    }
}

/// The per-minute rate window shared through the store: each replica writes its own seconds
/// (per user) to `rate_window` and reads everyone else's, so a user's limit holds across
/// replicas. The request path never touches the store: admission counts this replica's window
/// plus the others' as last read, which is at most a poll or two behind.
#[derive(Debug, Default)]
struct WindowSync {
    /// Seconds taken from the accounts and not yet in the store, per (user, second), with
    /// their latest figures: a failed write is retried with what has happened since.
    pending: std::collections::HashMap<(String, i64), (u64, u64)>,
    /// Polls that traded windows since the last sweep of old seconds.
    since_sweep: u32,
}

/// Polls between sweeps of this replica's old seconds out of the store (about 30 s).
const SWEEP_EVERY: u32 = 60;

impl WindowSync {
    /// One poll's trade: writes the seconds that changed here, now and then deletes old ones,
    /// and reads the others'. Does nothing at all, no round trip, while no second changed here
    /// and no other replica's is still in any user's window.
    async fn sync(
        &mut self,
        client: &tokio_postgres::Client,
        accounts: &Accounts,
        replica: &str,
    ) -> anyhow::Result<()> {
        use crate::store::pg;
        let now = Utc::now();
        for s in accounts.take_window_changes(now) {
            self.pending.insert((s.user, s.sec), (s.requests, s.tokens));
        }
        let oldest = now.timestamp() - limits::WINDOW_SECS;
        self.pending.retain(|(_, sec), _| *sec > oldest);
        if self.pending.is_empty() && !accounts.has_others_window(now) {
            return Ok(());
        }
        let seconds: Vec<limits::WindowSecond> = self
            .pending
            .iter()
            .map(|((user, sec), (requests, tokens))| limits::WindowSecond {
                user: user.clone(),
                sec: *sec,
                requests: *requests,
                tokens: *tokens,
            })
            .collect();
        pg::publish_window(client, replica, &seconds).await?;
        self.pending.clear();
        if self.since_sweep == 0 {
            // Twice the window: a reader a little behind on its clock still finds what it reads.
            let before = oldest - limits::WINDOW_SECS;
            pg::sweep_window(client, replica, before, oldest - 3600).await?;
        }
        self.since_sweep = (self.since_sweep + 1) % SWEEP_EVERY;
        let others = pg::others_window(client, replica, oldest).await?;
        accounts.set_others_window(now, others);
        Ok(())
    }
}

/// The longest between heartbeats (a quarter of `store.replica_gone_secs` when that is
/// shorter); vanished replicas are looked for every sixth.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// Opens the ledger in PostgreSQL: migrates the schema (under its lock), ships what its
    /// spool kept from the last run, records the calls this replica had in flight when it last
    /// died as `interrupted`, rebuilds the counters from the rollup, and starts the writer on
    /// its spool. `dir` is the config's directory.
    pub async fn open_store(
        settings: &crate::store::Settings,
        dir: &Path,
        synchronous: Synchronous,
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
        // The spool first: what a crash left in it (rows of calls whose markers may already be
        // in the store) is shipped before the markers left without a row are taken for
        // interrupted calls.
        let spool_path = dir.join(&settings.spool_path);
        let health = std::sync::Arc::new(crate::store::writer::Health::default());
        let writer_health = health.clone();
        let (s, d, p, r) = (
            settings.clone(),
            dir.to_path_buf(),
            spool_path.clone(),
            replica.clone(),
        );
        // The sink owns a runtime of its own for its shipper thread, so it is made off this one.
        let sink = tokio::task::spawn_blocking(move || {
            crate::store::writer::SpoolSink::open(
                Box::new(crate::store::writer::PgTarget::new(s, &d, r)?),
                &p,
                synchronous == Synchronous::Full,
                crate::store::writer::SHIP_INTERVAL,
                writer_health,
            )
        })
        .await??;
        if sink.shipped().pending() {
            tracing::warn!(
                replica = %replica,
                "the spool from the last run is not all in the store yet, so the calls this replica had in flight then are left to the next start"
            );
        } else {
            let interrupted = pg::recover_interrupted(&mut client, &replica).await?;
            if interrupted > 0 {
                tracing::warn!(
                    calls = interrupted,
                    replica = %replica,
                    "calls this replica had in flight when it last stopped without closing the ledger are recorded as `interrupted`"
                );
            }
        }
        pg::heartbeat(&client, &replica).await?;
        let day = month.start().format("%Y-%m-%d").to_string();
        // This replica's own rows rebuild its counters; the others' are read alongside, and
        // again twice a second (see `spawn_store_poll`), so no spend counts twice.
        let totals = pg::totals_since_day(&client, &day, (&replica, true)).await?;
        let others = pg::totals_since_day(&client, &day, (&replica, false)).await?;
        // Likewise the rate window: this replica's from its rows (the poll writes it to
        // `rate_window` afresh, replacing what it wrote before it stopped), the others' from
        // theirs in `rate_window`.
        let recent = pg::recent(&client, &replica, now.timestamp_millis() - 60_000).await?;
        pg::clear_window(&client, &replica).await?;
        let others_window =
            pg::others_window(&client, &replica, now.timestamp() - limits::WINDOW_SECS).await?;
        drop(client);
        let rebuilt = totals.len();
        let accounts = Accounts::rebuild(month, totals, recent);
        accounts.set_others(month, others);
        accounts.set_others_window(now, others_window);
        let ledger = Ledger::open_postgres(sink, &spool_path, synchronous)?;
        let store = Some(health);
        tracing::info!(store = %settings.redacted_url(), replica = %replica, users_with_usage = rebuilt, "ledger open in the store; counters rebuilt for {month}");
        Ok(Meter {
            ledger,
            store,
            reader: Some(std::sync::Arc::new(crate::store::Lazy::new(settings, dir))),
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
        // First the ledger, which commits what the spool of the last run holds: a marker's row
        // may be in it.
        let ledger = Ledger::open(path, sync)?;
        let mut conn = ledger::open_db_with(path, sync)?;
        if ledger.has_spooled() {
            tracing::warn!(
                "the spool from the last run is not all in the ledger yet, so the calls in flight then are left to the next start"
            );
        } else {
            let interrupted = ledger::recover_interrupted(&mut conn)?;
            if interrupted > 0 {
                tracing::warn!(
                    calls = interrupted,
                    "calls that were in flight when the proxy last stopped without closing the ledger are recorded as `interrupted`"
                );
            }
        }
        let totals = ledger::totals_since(&conn, month.start().timestamp_millis())?;
        let recent = ledger::recent(&conn, now.timestamp_millis() - 60_000)?;
        drop(conn);
        let rebuilt = totals.len();
        let accounts = Accounts::rebuild(month, totals, recent);
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
