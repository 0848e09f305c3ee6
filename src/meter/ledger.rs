//! The ledger: one SQLite row per request, written in batches off the request path.
//!
//! The request path only does a non-blocking `try_send` of a finished [`Record`] into a
//! bounded channel, which wakes nothing; a writer thread wakes every `flush_interval` (or
//! early, once [`WAKE_AT_PENDING`] rows wait) and commits what has arrived, [`MAX_BATCH`] rows
//! per transaction. The database runs in WAL mode with
//! `synchronous = NORMAL`: a committed batch survives a crash of the process, so a crash loses
//! at most the rows of the last interval. [`Ledger::close`] (called on SIGTERM) drains and
//! commits everything before the process exits. This module never blocks a request.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags, params};

use crate::domain::Usage;

/// Rows waiting in memory at most; beyond this a row is dropped and counted, never blocking.
const CHANNEL_CAPACITY: usize = 65_536;
/// Rows per transaction at most.
const MAX_BATCH: usize = 2_048;
/// Queued rows at which a request wakes the writer before its interval is up.
const WAKE_AT_PENDING: usize = 8_192;

/// One finished request, as the ledger stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Request start, Unix milliseconds.
    pub ts_ms: i64,
    /// `None` when the caller was not identified.
    pub user: Option<String>,
    /// The protocol the call came in on: `bedrock` or `anthropic`.
    pub front: Option<String>,
    /// The project the call named (`x-bedrock-gate-project`, or a Messages body's `tags`).
    pub project: Option<String>,
    /// The Claude Code session (`x-claude-code-session-id`).
    pub session: Option<String>,
    pub operation: String,
    /// The model id the caller asked for.
    pub model: Option<String>,
    /// The model the caller's profile maps (pricing and reports use it).
    pub base_model: Option<String>,
    pub profile_arn: Option<String>,
    pub status: u16,
    pub usage: Usage,
    /// `None` when the model (or a token kind) has no price.
    pub cost_usd: Option<f64>,
    pub latency_ms: u64,
    pub ttfb_ms: Option<u64>,
    pub request_id: String,
    pub upstream_request_id: Option<String>,
    /// The response reached its natural end (all usage seen).
    pub complete: bool,
    /// Passed the budget and rate-limit check; only these count in the rate window.
    pub admitted: bool,
    /// `complete`, `client_gone`, `upstream_error`, `upstream_idle`, `shutdown`, or the error type of a refusal.
    pub outcome: String,
}

enum Msg {
    Row(Box<Record>, Instant),
    Flush(SyncSender<()>),
    Close(SyncSender<()>),
}

/// Counters the metrics exporter reads.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Rows accepted but not yet committed.
    pub pending: AtomicI64,
    pub written: AtomicU64,
    pub dropped: AtomicU64,
    /// Age of the oldest row in the last committed batch, in microseconds.
    pub last_lag_us: AtomicU64,
    pub write_errors: AtomicU64,
}

/// Handle to the ledger writer.
pub struct Ledger {
    tx: SyncSender<Msg>,
    /// The writer thread, to unpark for a flush, a close or a filling queue.
    writer: std::thread::Thread,
    thread: Mutex<Option<JoinHandle<()>>>,
    pub stats: Arc<LedgerStats>,
    path: PathBuf,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id                  INTEGER PRIMARY KEY,
    ts_ms               INTEGER NOT NULL,
    user                TEXT,
    operation           TEXT NOT NULL,
    model               TEXT,
    base_model          TEXT,
    profile_arn         TEXT,
    status              INTEGER NOT NULL,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cache_read_tokens   INTEGER NOT NULL,
    cache_write_tokens  INTEGER NOT NULL,
    cost_usd            REAL,
    latency_ms          INTEGER NOT NULL,
    ttfb_ms             INTEGER,
    request_id          TEXT NOT NULL,
    upstream_request_id TEXT,
    complete            INTEGER NOT NULL,
    admitted            INTEGER NOT NULL,
    outcome             TEXT NOT NULL,
    front               TEXT,
    project             TEXT,
    session             TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts_ms);
CREATE INDEX IF NOT EXISTS requests_user_ts ON requests (user, ts_ms);
";

/// Schema version written to `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 3;

/// Brings an older ledger up to [`SCHEMA_VERSION`], keeping its rows.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let has = |column: &str| -> rusqlite::Result<bool> {
        conn.prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = ?1")?
            .exists([column])
    };
    // Version 1 had no `admitted`; its rows predate refusal tracking in the rate window.
    if version < 2 && !has("admitted")? {
        conn.execute_batch("ALTER TABLE requests ADD COLUMN admitted INTEGER NOT NULL DEFAULT 1")?;
    }
    // Version 2 had one front (Bedrock-native) and no labels.
    if version < 3 {
        for column in ["front", "project", "session"] {
            if !has(column)? {
                conn.execute_batch(&format!("ALTER TABLE requests ADD COLUMN {column} TEXT"))?;
            }
        }
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// Opens (creating if needed) a ledger database for writing.
pub fn open_db(path: &Path) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let conn =
        Connection::open(path).with_context(|| format!("cannot open ledger {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA)
        .context("cannot create the ledger schema")?;
    migrate(&conn).context("cannot upgrade the ledger schema")?;
    Ok(conn)
}

/// Opens an existing ledger read-only (reports).
pub fn open_read_only(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| {
        format!(
            "cannot open ledger {} (has `serve` run with this config?)",
            path.display()
        )
    })?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn write_batch(conn: &mut Connection, batch: &[(Box<Record>, Instant)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO requests (ts_ms, user, operation, model, base_model, profile_arn, status,
                input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
                latency_ms, ttfb_ms, request_id, upstream_request_id, complete, admitted, outcome,
                front, project, session)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                ?20, ?21, ?22)",
        )?;
        for (r, _) in batch {
            stmt.execute(params![
                r.ts_ms,
                r.user,
                r.operation,
                r.model,
                r.base_model,
                r.profile_arn,
                r.status,
                to_i64(r.usage.input_tokens),
                to_i64(r.usage.output_tokens),
                to_i64(r.usage.cache_read_tokens),
                to_i64(r.usage.cache_write_tokens),
                r.cost_usd,
                to_i64(r.latency_ms),
                r.ttfb_ms.map(to_i64),
                r.request_id,
                r.upstream_request_id,
                r.complete,
                r.admitted,
                r.outcome,
                r.front,
                r.project,
                r.session,
            ])?;
        }
    }
    tx.commit()
}

struct Writer {
    conn: Connection,
    rx: Receiver<Msg>,
    interval: Duration,
    stats: Arc<LedgerStats>,
    batch: Vec<(Box<Record>, Instant)>,
}

impl Writer {
    fn commit(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let oldest = self.batch.iter().map(|(_, t)| *t).min();
        // A failed write is retried with the next batch rather than dropped; only a batch that
        // keeps failing while memory fills is at risk, and that is logged loudly.
        match write_batch(&mut self.conn, &self.batch) {
            Ok(()) => {
                let n = self.batch.len();
                self.stats.pending.fetch_sub(n as i64, Ordering::Relaxed);
                self.stats.written.fetch_add(n as u64, Ordering::Relaxed);
                if let Some(t) = oldest {
                    self.stats.last_lag_us.store(
                        u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                }
                self.batch.clear();
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, rows = self.batch.len(), "ledger write failed; will retry");
                if self.batch.len() > CHANNEL_CAPACITY {
                    let lost = self.batch.len();
                    self.stats.pending.fetch_sub(lost as i64, Ordering::Relaxed);
                    self.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                    tracing::error!(
                        rows = lost,
                        "ledger rows dropped after repeated write failures"
                    );
                    self.batch.clear();
                }
            }
        }
    }

    /// Sleeps a flush interval at a time (or until [`Ledger`] unparks it for a flush, a close
    /// or a filling queue), then takes everything queued and commits it. Rows are queued
    /// without waking this thread, so a request costs no context switch here.
    fn run(mut self) {
        loop {
            std::thread::park_timeout(self.interval);
            loop {
                match self.rx.try_recv() {
                    Ok(Msg::Row(r, t)) => {
                        self.batch.push((r, t));
                        if self.batch.len() >= MAX_BATCH {
                            self.commit();
                        }
                    }
                    // Everything queued before the flush is in the batch by now.
                    Ok(Msg::Flush(ack)) => {
                        self.commit();
                        let _ = ack.send(());
                    }
                    Ok(Msg::Close(ack)) => {
                        self.drain();
                        self.commit();
                        let _ = ack.send(());
                        return;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.commit();
                        return;
                    }
                }
            }
            self.commit();
        }
    }

    /// Takes every row still queued (at close).
    fn drain(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Row(r, t) => self.batch.push((r, t)),
                Msg::Flush(ack) | Msg::Close(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

impl Ledger {
    /// Opens the database and starts the writer thread.
    pub fn open(path: &Path, flush_interval: Duration) -> anyhow::Result<Ledger> {
        let conn = open_db(path)?;
        let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
        let stats = Arc::new(LedgerStats::default());
        let writer = Writer {
            conn,
            rx,
            interval: flush_interval,
            stats: stats.clone(),
            batch: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run())
            .context("cannot start the ledger writer")?;
        Ok(Ledger {
            writer: thread.thread().clone(),
            tx,
            thread: Mutex::new(Some(thread)),
            stats,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a row without blocking. A full queue drops the row, counts it and logs.
    pub fn record(&self, record: Record) {
        match self.tx.try_send(Msg::Row(Box::new(record), Instant::now())) {
            Ok(()) => {
                let pending = self.stats.pending.fetch_add(1, Ordering::Relaxed) + 1;
                // A burst faster than the interval: commit early rather than fill the queue.
                if pending >= WAKE_AT_PENDING as i64 {
                    self.writer.unpark();
                }
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!("ledger queue full or closed; a usage row was dropped");
            }
        }
    }

    /// Commits every row queued so far; blocks until done (call from a blocking context).
    pub fn flush(&self) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            self.writer.unpark();
            let _ = done.recv();
        }
    }

    /// Commits everything queued and stops the writer. Later rows are dropped (and counted).
    pub fn close(&self) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Close(ack)).is_ok() {
            self.writer.unpark();
            let _ = done.recv();
        }
        if let Ok(mut t) = self.thread.lock()
            && let Some(t) = t.take()
        {
            let _ = t.join();
        }
    }
}

/// Per-user totals read back from the ledger (to rebuild counters after a restart).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub usage: Usage,
    pub cost_usd: f64,
    pub unpriced: u64,
}

fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Totals per user for requests at or after `since_ms`.
pub fn totals_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<(String, Totals)>> {
    let mut stmt = conn.prepare(
        "SELECT user, count(*), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
                sum(cache_write_tokens), total(cost_usd),
                sum(CASE WHEN cost_usd IS NULL AND (input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) > 0 THEN 1 ELSE 0 END)
         FROM requests WHERE ts_ms >= ?1 AND user IS NOT NULL GROUP BY user",
    )?;
    let rows = stmt.query_map([since_ms], |r| {
        Ok((
            r.get::<_, String>(0)?,
            Totals {
                requests: from_i64(r.get(1)?),
                usage: Usage {
                    input_tokens: from_i64(r.get(2)?),
                    output_tokens: from_i64(r.get(3)?),
                    cache_read_tokens: from_i64(r.get(4)?),
                    cache_write_tokens: from_i64(r.get(5)?),
                },
                cost_usd: r.get(6)?,
                unpriced: from_i64(r.get(7)?),
            },
        ))
    })?;
    rows.collect()
}

/// (user, start ms, tokens) of each admitted request at or after `since_ms`, for rate
/// windows. Refusals and free calls never counted against a rate limit, so they don't here.
pub fn recent(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<(String, i64, u64)>> {
    let mut stmt = conn.prepare(
        "SELECT user, ts_ms, input_tokens + output_tokens + cache_read_tokens + cache_write_tokens
         FROM requests WHERE ts_ms >= ?1 AND user IS NOT NULL AND admitted = 1",
    )?;
    let rows = stmt.query_map([since_ms], |r| {
        Ok((r.get(0)?, r.get(1)?, from_i64(r.get(2)?)))
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(user: &str, ts_ms: i64, input: u64, cost: Option<f64>) -> Record {
        Record {
            ts_ms,
            user: Some(user.into()),
            front: Some("bedrock".into()),
            project: None,
            session: None,
            operation: "Converse".into(),
            model: Some("m".into()),
            base_model: Some("m".into()),
            profile_arn: None,
            status: 200,
            usage: Usage {
                input_tokens: input,
                output_tokens: 2,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
            },
            cost_usd: cost,
            latency_ms: 5,
            ttfb_ms: Some(1),
            request_id: "r".into(),
            upstream_request_id: None,
            complete: true,
            admitted: true,
            outcome: "complete".into(),
        }
    }

    #[test]
    fn rows_survive_close_and_totals_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Duration::from_secs(3600)).unwrap();
        ledger.record(record("alice", 1_000, 10, Some(0.5)));
        ledger.record(record("alice", 2_000, 20, None));
        ledger.record(record("bob", 500, 1, Some(0.25)));
        // The interval is an hour: only close() can have written these.
        ledger.close();
        let conn = open_read_only(&path).unwrap();
        let mut t = totals_since(&conn, 900).unwrap();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(t.len(), 1, "bob's row is before the cut-off");
        assert_eq!(t[0].1.requests, 2);
        assert_eq!(t[0].1.usage.input_tokens, 30);
        assert_eq!(t[0].1.unpriced, 1);
        assert!((t[0].1.cost_usd - 0.5).abs() < 1e-12);
        assert_eq!(recent(&conn, 0).unwrap().len(), 3);
        assert_eq!(ledger.stats.written.load(Ordering::Relaxed), 3);
        assert_eq!(ledger.stats.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_version_1_ledger_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE requests (id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, user TEXT,
                operation TEXT NOT NULL, model TEXT, base_model TEXT, profile_arn TEXT,
                status INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
                cache_read_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL, cost_usd REAL,
                latency_ms INTEGER NOT NULL, ttfb_ms INTEGER, request_id TEXT NOT NULL,
                upstream_request_id TEXT, complete INTEGER NOT NULL, outcome TEXT NOT NULL);
             INSERT INTO requests VALUES (1, 5, 'alice', 'Converse', 'm', 'm', NULL, 200, 1, 2, 0, 0, 0.1,
                3, 1, 'r', NULL, 1, 'complete');
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(old);
        let ledger = Ledger::open(&path, Duration::from_secs(60)).unwrap();
        ledger.record(record("bob", 10, 1, None));
        ledger.close();
        let conn = open_read_only(&path).unwrap();
        assert_eq!(
            recent(&conn, 0).unwrap().len(),
            2,
            "old rows count as admitted"
        );
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let labels: Vec<(Option<String>, Option<String>)> = conn
            .prepare("SELECT front, session FROM requests ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            labels,
            [(None, None), (Some("bedrock".into()), None)],
            "old rows have no labels, new ones do"
        );
    }

    #[test]
    fn flush_commits_without_waiting_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Duration::from_secs(3600)).unwrap();
        for i in 0..100 {
            ledger.record(record("alice", i, 1, Some(0.0)));
        }
        ledger.flush();
        let conn = open_read_only(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM requests", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100);
        ledger.close();
    }
}
