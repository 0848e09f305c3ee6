//! The ledger: one SQLite row per request, on disk before the request's answer ends.
//!
//! An entry (a [`Sent`] marker before a call, its [`Record`] after) is committed first to the
//! spool beside the database (`<ledger>-spool`, [`spool_path_of`]): an append-only file of
//! entries, one `write` each (see [`crate::store::writer`], which PostgreSQL uses the same way).
//! The request path gets a [`Receipt`] back. A caller that finds the writer idle, with nothing
//! queued, appends its own entry, on its own thread, and its receipt is resolved at once;
//! otherwise (the writer busy, entries queued, `ledger.synchronous = "full"`) it does a
//! non-blocking `try_send` into a bounded channel, and a writer thread appends it with whatever
//! queued meanwhile (a group commit, [`MAX_BATCH`] entries at most), then wakes every receipt
//! of the batch. A shipper thread moves what the spool holds into the SQLite file, at most
//! every [`SHIP_EVERY`], in one transaction per shipment. At the few
//! requests a second developers make, a SQLite transaction per entry cost more CPU than the
//! rest of the request (a dozen page writes and as many lock calls each), and handing every
//! entry to another thread and back cost several wake-ups. What this costs: readers of the
//! file (reports, `usage`, the dashboard) see a row up to a second after its answer ended
//! (a flush ships at once). Budgets and rate limits count in memory, at once.
//!
//! The response body holds back its end until its receipt resolves (see `stream`), so a call
//! whose answer a client has read whole is on disk: a crash or `kill -9` loses no answered
//! call. `ledger.synchronous = "full"` syncs the spool at every append and the database's WAL at
//! every shipment (rows survive a power loss); `normal` leaves both to the operating system and
//! the checkpoint (rows survive a crash of the process).
//!
//! A call is also written down *before* it is sent to Bedrock: [`Ledger::sent`] commits a
//! [`Sent`] marker (request id, user, model, profile, time), and the call goes out once it is
//! committed. In the database the marker is in the `sent` table, and the call's row deletes it
//! in the transaction that inserts the row (a marker whose row ships in the same batch is
//! never inserted), so at any moment a call Bedrock may have seen has exactly one of the two.
//! At the next start, [`Ledger::open`] ships what the spool kept first, then
//! [`recover_interrupted`] turns every marker left by a crash into a row with outcome
//! `interrupted` (incomplete: Bedrock may have run and billed it); one `serve` per ledger
//! file, since a second one would take the first one's calls in flight for a crash's. A batch
//! shipped again (a crash after its commit, before the spool was cut) changes nothing: a row
//! already there (same time and request id) is skipped with its rollup, a marker replaced.
//!
//! Every row is also added to its line in `usage_daily` (one per UTC day, user, model,
//! profile, project, session and front) in the transaction that inserts it, so budgets at start
//! and reports read rollups whose size grows with days and people, not with calls. The rows stay
//! for detail. What keeps the two in step, and so what this module must never do: insert into
//! `requests` other than through [`put_row`] (the writer and [`recover_interrupted`] both use
//! it), update or delete a row of `requests` (rows are append-only; a change would leave its
//! rollup wrong), or classify a row other than by [`classify`] and its SQL twins. A ledger from
//! before the rollups is rolled up once, in one statement, by [`migrate`] on first open.
//!
//! Checkpoints (copying the WAL into the database file, and syncing it) run on a thread of
//! their own every [`CHECKPOINT_EVERY`], so no commit waits for one.
//!
//! [`Ledger::close`] (called on SIGTERM) drains and commits everything, and ships the spool,
//! before the process exits. This module never blocks a request: a full queue drops the row
//! (counted and logged) and a receipt waits at most [`COMMIT_WAIT`], so a stalled disk slows
//! answers down by that much, never holds them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags, params};

use crate::domain::{Outcome, Usage};
use crate::store::writer::Entry as SpoolEntry;

/// Rows waiting in memory at most; beyond this a row is dropped and counted, never blocking.
const CHANNEL_CAPACITY: usize = 65_536;
/// Rows per transaction at most.
const MAX_BATCH: usize = 2_048;
/// Longest a [`Receipt`] waits for its commit; past it the answer goes on (and a warning says
/// its row is not on disk yet).
pub const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// How long the writer waits for a lock another connection holds (a sign-in, `sessions
/// revoke`) before its commit fails and is retried.
const BUSY_WAIT: Duration = Duration::from_secs(5);
/// How soon a batch whose commit failed is tried again when nothing new arrives.
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Shortest time between two shipments of the spool into the file. Each is one transaction
/// whose cost hardly depends on how many rows it holds (at 20 requests a second, shipping ten
/// times a second cost a fifth of the proxy's CPU); what this delays is only when readers of
/// the file see a row. A flush ([`Ledger::flush`]) and the close ship at once.
pub const SHIP_EVERY: Duration = Duration::from_secs(1);
/// How often the checkpoint thread copies the WAL into the database (and syncs it): a few
/// [`SHIP_EVERY`]s' worth of pages at a time, many of them the same pages written again.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// WAL pages past which the writer checkpoints itself, should the checkpoint thread fall
/// behind; SQLite's default is 1,000.
const WRITER_CHECKPOINT_PAGES: i64 = 20_000;

/// How hard SQLite syncs a commit (`ledger.synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// Sync the WAL at every commit: a committed row survives a power loss. Each group commit
    /// then waits for the disk (milliseconds, tens of them on a busy disk), and every answer
    /// waits for its group.
    Full,
    /// Sync at checkpoints only: a committed row is in the OS's hands and survives a crash or
    /// `kill -9` of the process, not a crash of the machine.
    #[default]
    Normal,
}

impl Synchronous {
    /// The value `ledger.synchronous` spells it with.
    pub fn name(self) -> &'static str {
        match self {
            Synchronous::Full => "full",
            Synchronous::Normal => "normal",
        }
    }

    pub fn parse(s: &str) -> Option<Synchronous> {
        match s {
            "full" => Some(Synchronous::Full),
            "normal" => Some(Synchronous::Normal),
            _ => None,
        }
    }
}

/// One finished request, as the ledger stores it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// `complete`, `client_gone`, `upstream_error`, `upstream_idle`, `shutdown`,
    /// `interrupted` (written at start for a call a crash cut, see [`recover_interrupted`]), or
    /// the error type of a refusal.
    pub outcome: String,
    /// A [`Sent`] marker was written for this request; the row replaces it.
    pub marked: bool,
}

/// A call about to go to Bedrock, written (and committed) before it is sent; see the module
/// doc. What it holds is what an `interrupted` row can say.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sent {
    /// Request start, Unix milliseconds (the row's `ts_ms`).
    pub ts_ms: i64,
    pub request_id: String,
    pub user: String,
    pub front: Option<String>,
    pub project: Option<String>,
    pub session: Option<String>,
    pub operation: String,
    pub model: Option<String>,
    pub base_model: Option<String>,
    pub profile_arn: Option<String>,
    pub admitted: bool,
}

/// What the writer commits. It is written to the spool as it is, from the queue: it
/// serializes as the spool's [`SpoolEntry`] (same variant names, a box is transparent), which
/// is what the shipper reads back.
#[derive(serde::Serialize)]
enum Entry {
    Row(Box<Record>),
    Mark(Box<Sent>),
}

/// An entry on its way to the database, with the receipt to wake once it is there.
struct Queued {
    entry: Entry,
    at: Instant,
    ack: Option<tokio::sync::oneshot::Sender<()>>,
}

enum Msg {
    Entry(Queued),
    Flush(SyncSender<()>),
    Close(SyncSender<()>),
}

/// Resolves once a queued row or marker is committed; see [`Receipt::committed`].
#[derive(Debug)]
pub struct Receipt(Option<tokio::sync::oneshot::Receiver<()>>);

impl Receipt {
    /// Nothing was queued, so there is nothing to wait for.
    pub fn none() -> Receipt {
        Receipt(None)
    }

    /// The entry was dropped: resolves at once, uncommitted.
    fn lost() -> Receipt {
        let (_, rx) = tokio::sync::oneshot::channel();
        Receipt(Some(rx))
    }

    /// Waits until the entry is committed, at most [`COMMIT_WAIT`]. False when it was not: the
    /// queue was full or closed, the writes keep failing, or the disk is that slow.
    pub async fn committed(self) -> bool {
        let Some(rx) = self.0 else {
            return true;
        };
        match tokio::time::timeout(COMMIT_WAIT, rx).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => false,
            Err(_) => {
                tracing::warn!(
                    wait_secs = COMMIT_WAIT.as_secs(),
                    "a ledger commit took longer than the wait; the answer goes on without it"
                );
                false
            }
        }
    }
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
    /// Where entries are committed, shared by the writer thread and a caller committing its own
    /// entry (see the module doc).
    sink: Arc<Mutex<Sink>>,
    /// Entries handed to the writer and not yet committed or given up on. A caller commits its
    /// own entry only when this is zero, so an entry never overtakes one queued before it.
    queued: Arc<AtomicU64>,
    /// Callers may commit their own entries: the commit syncs nothing (`normal`).
    inline: bool,
    /// Set by [`Ledger::close`]: nothing is committed any more, by anyone.
    closed: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Checkpoints off the writer thread, so a commit (and the answers waiting on it) never
    /// pays for copying the WAL and syncing the database file; stops when its sender drops.
    checkpointer: Mutex<Option<(SyncSender<()>, JoinHandle<()>)>>,
    /// Whether the spool is in the database yet (for a flush), without taking the sink.
    shipped: crate::store::writer::Shipped,
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
CREATE TABLE IF NOT EXISTS sent (
    request_id  TEXT PRIMARY KEY,
    ts_ms       INTEGER NOT NULL,
    user        TEXT NOT NULL,
    front       TEXT,
    project     TEXT,
    session     TEXT,
    operation   TEXT NOT NULL,
    model       TEXT,
    base_model  TEXT,
    profile_arn TEXT,
    admitted    INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Schema version written to `PRAGMA user_version`. Version 4 added the `sent` table, which
/// [`SCHEMA`] creates on an older ledger; version 5 added the `usage_daily` rollups, which
/// [`migrate`] creates and fills from the rows already there.
const SCHEMA_VERSION: i64 = 5;

/// One line per (UTC day, user, model, profile, project, session, front): the sums of that
/// day's rows, so that budgets at start and reports read a few thousand lines, not a month of
/// rows. The writer keeps it in step with `requests` in the same transaction as the rows (see
/// [`put_row`]); a NULL label is `''` here and the report prints it as it prints NULL.
const ROLLUP_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS usage_daily (
    day                TEXT NOT NULL,  -- UTC day of the row's ts_ms, 'YYYY-MM-DD'
    "user"             TEXT NOT NULL,  -- '' when the row has no user
    model              TEXT NOT NULL,  -- coalesce(base_model, model, '')
    profile            TEXT NOT NULL,  -- coalesce(profile_arn, '')
    project            TEXT NOT NULL,  -- coalesce(project, '')
    session            TEXT NOT NULL,  -- coalesce(session, '')
    front              TEXT NOT NULL,  -- coalesce(front, '')
    requests           INTEGER NOT NULL,
    input_tokens       INTEGER NOT NULL,
    output_tokens      INTEGER NOT NULL,
    cache_read_tokens  INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_usd           REAL NOT NULL,    -- total(cost_usd)
    unpriced           INTEGER NOT NULL, -- rows with tokens > 0 and cost_usd NULL
    incomplete         INTEGER NOT NULL, -- the report's incomplete_requests rule
    errors             INTEGER NOT NULL, -- the report's error_requests rule
    PRIMARY KEY (day, "user", model, profile, project, session, front)
) WITHOUT ROWID;
"#;

/// The first schema version with `usage_daily`.
const ROLLUP_VERSION: i64 = 5;

/// How one row counts beyond its sums: the report's `unpriced`, `incomplete` and `errors`
/// columns. [`classify`] decides it for the writer; [`UNPRICED_SQL`], [`INCOMPLETE_SQL`] and
/// [`ERROR_SQL`] say the same over a `requests` row for the migration and for reports on raw
/// rows. A test checks that the two agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Class {
    /// Tokens but no price: its cost is missing from the sums.
    pub unpriced: bool,
    /// Not all usage seen: a stream cut before its end, or a call a crash interrupted.
    pub incomplete: bool,
    /// Not a 200, or Bedrock ended it with an error. An interrupted call is incomplete, not an
    /// error; a client gone or a shutdown is neither Bedrock's error.
    pub error: bool,
}

/// Classifies one row; see [`Class`]. Change it together with the three `_SQL` twins below.
pub fn classify(
    status: u16,
    complete: bool,
    outcome: &str,
    tokens: u64,
    cost_usd: Option<f64>,
) -> Class {
    let interrupted = outcome == Outcome::Interrupted.name();
    Class {
        unpriced: cost_usd.is_none() && tokens > 0,
        incomplete: !complete && (status == 200 || interrupted),
        error: (status != 200 && !interrupted)
            || !matches!(
                outcome,
                "complete" | "client_gone" | "shutdown" | "interrupted"
            ),
    }
}

/// [`classify`]'s `unpriced`, as SQL over a `requests` row.
pub(crate) const UNPRICED_SQL: &str = "cost_usd IS NULL AND (input_tokens + output_tokens + cache_read_tokens + cache_write_tokens) > 0";
/// [`classify`]'s `incomplete`, as SQL over a `requests` row.
pub(crate) const INCOMPLETE_SQL: &str =
    "complete = 0 AND (status = 200 OR outcome = 'interrupted')";
/// [`classify`]'s `error`, as SQL over a `requests` row.
pub(crate) const ERROR_SQL: &str = "(status <> 200 AND outcome <> 'interrupted') \
     OR outcome NOT IN ('complete', 'client_gone', 'shutdown', 'interrupted')";

/// A row's UTC day as `usage_daily` keys it: SQL over a `requests` row's `ts_ms` (`''` for a
/// time SQLite cannot print). The writer binds the row's time in its place ([`UPSERT_SQL`]), so
/// the writer and the migration compute the day with the same expression.
macro_rules! day_sql {
    ($ts:literal) => {
        concat!(
            "coalesce(strftime('%Y-%m-%d', ",
            $ts,
            " / 1000, 'unixepoch'), '')"
        )
    };
}
pub(crate) const DAY_SQL: &str = day_sql!("ts_ms");

/// Adds one row to its `usage_daily` line ([`put_row`]).
const UPSERT_SQL: &str = concat!(
    "INSERT INTO usage_daily (day, \"user\", model, profile, project, session, front,
        requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
        cost_usd, unpriced, incomplete, errors)
     VALUES (",
    day_sql!("?1"),
    ", ?2, ?3, ?4, ?5, ?6, ?7, 1, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
     ON CONFLICT (day, \"user\", model, profile, project, session, front) DO UPDATE SET
        requests = requests + excluded.requests,
        input_tokens = input_tokens + excluded.input_tokens,
        output_tokens = output_tokens + excluded.output_tokens,
        cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
        cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
        cost_usd = cost_usd + excluded.cost_usd,
        unpriced = unpriced + excluded.unpriced,
        incomplete = incomplete + excluded.incomplete,
        errors = errors + excluded.errors"
);

/// The UTC day of `ts_ms` as [`DAY_SQL`] prints it, `YYYY-MM-DD`, for the bounds of a range of
/// days; `''` outside the years 0000 to 9999, which no range of a report reaches.
pub fn day_of(ts_ms: i64) -> String {
    use chrono::Datelike as _;
    chrono::DateTime::from_timestamp(ts_ms / 1000, 0)
        .filter(|d| (0..=9999).contains(&d.year()))
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_default()
}

/// Whether `conn`'s ledger has rollups (a ledger not yet opened by a `serve` of version 5 or
/// later has only rows).
pub fn rolled_up(conn: &Connection) -> rusqlite::Result<bool> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    Ok(version >= ROLLUP_VERSION)
}

/// Brings an older ledger up to [`SCHEMA_VERSION`], keeping its rows, in one transaction: a
/// crash during it leaves the old version, to be upgraded again at the next start.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version = |c: &Connection| -> rusqlite::Result<i64> {
        c.query_row("PRAGMA user_version", [], |r| r.get(0))
    };
    if version(conn)? >= SCHEMA_VERSION {
        return Ok(());
    }
    // Immediate: a second process opening the ledger waits here, then finds it upgraded.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version = version(&tx)?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let has = |column: &str| -> rusqlite::Result<bool> {
        tx.prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = ?1")?
            .exists([column])
    };
    // Version 1 had no `admitted`; its rows predate refusal tracking in the rate window.
    if version < 2 && !has("admitted")? {
        tx.execute_batch("ALTER TABLE requests ADD COLUMN admitted INTEGER NOT NULL DEFAULT 1")?;
    }
    // Version 2 had one front (Bedrock-native) and no labels.
    if version < 3 {
        for column in ["front", "project", "session"] {
            if !has(column)? {
                tx.execute_batch(&format!("ALTER TABLE requests ADD COLUMN {column} TEXT"))?;
            }
        }
    }
    // Version 4 had no rollups: roll every row up once, in one statement. It is the writer's
    // `put_row` in SQL: the same key, and `classify` as its `_SQL` twins. Rollups an older build
    // left behind (it ran on this ledger after a newer one, and set the version back) miss that
    // build's rows, so they are rebuilt, not kept.
    if version < ROLLUP_VERSION {
        let rows: i64 = tx.query_row("SELECT coalesce(max(id), 0) FROM requests", [], |r| {
            r.get(0)
        })?;
        if rows > 0 {
            tracing::info!(
                rows,
                "upgrading the ledger: rolling its rows up into usage_daily once (a few seconds per million rows)"
            );
        }
        tx.execute_batch(ROLLUP_SCHEMA)?;
        tx.execute("DELETE FROM usage_daily", [])?;
        tx.execute(
            &format!(
                "INSERT INTO usage_daily (day, \"user\", model, profile, project, session, front,
                    requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                    cost_usd, unpriced, incomplete, errors)
                 SELECT {DAY_SQL}, coalesce(user, ''), coalesce(base_model, model, ''),
                    coalesce(profile_arn, ''), coalesce(project, ''), coalesce(session, ''),
                    coalesce(front, ''), count(*), sum(input_tokens), sum(output_tokens),
                    sum(cache_read_tokens), sum(cache_write_tokens), total(cost_usd),
                    sum(CASE WHEN {UNPRICED_SQL} THEN 1 ELSE 0 END),
                    sum(CASE WHEN {INCOMPLETE_SQL} THEN 1 ELSE 0 END),
                    sum(CASE WHEN {ERROR_SQL} THEN 1 ELSE 0 END)
                 FROM requests GROUP BY 1, 2, 3, 4, 5, 6, 7"
            ),
            [],
        )?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()
}

/// Opens (creating if needed) a ledger database for writing, with the default sync.
pub fn open_db(path: &Path) -> anyhow::Result<Connection> {
    open_db_with(path, Synchronous::default())
}

/// Opens (creating if needed) a ledger database for writing, syncing commits as `sync` says.
pub fn open_db_with(path: &Path, sync: Synchronous) -> anyhow::Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut conn =
        Connection::open(path).with_context(|| format!("cannot open ledger {}", path.display()))?;
    conn.busy_timeout(BUSY_WAIT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", sync.name())?;
    conn.execute_batch(SCHEMA)
        .context("cannot create the ledger schema")?;
    migrate(&mut conn).context("cannot upgrade the ledger schema")?;
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

/// A count for a signed column (saturating: no count reaches it).
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Inserts one row and adds it to its `usage_daily` line, in the caller's transaction: the
/// only way a row reaches `requests` (the writer and [`recover_interrupted`] both use it), so
/// the rollups never miss a row nor count one twice.
fn put_row(tx: &rusqlite::Transaction<'_>, r: &Record) -> rusqlite::Result<()> {
    // A row already there (the spool shipped again after a crash) is left as it is, and so
    // is its rollup.
    let inserted = tx
        .prepare_cached(
            "INSERT INTO requests (ts_ms, user, operation, model, base_model, profile_arn, status,
            input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
            latency_ms, ttfb_ms, request_id, upstream_request_id, complete, admitted, outcome,
            front, project, session)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
            ?20, ?21, ?22
         WHERE NOT EXISTS (SELECT 1 FROM requests WHERE ts_ms = ?1 AND request_id = ?15)",
        )?
        .execute(params![
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
    if inserted == 0 {
        return Ok(());
    }
    let u = &r.usage;
    let tokens = u
        .input_tokens
        .saturating_add(u.output_tokens)
        .saturating_add(u.cache_read_tokens)
        .saturating_add(u.cache_write_tokens);
    let class = classify(r.status, r.complete, &r.outcome, tokens, r.cost_usd);
    let label = |v: &Option<String>| v.as_deref().unwrap_or("").to_string();
    tx.prepare_cached(UPSERT_SQL)?.execute(params![
        r.ts_ms,
        label(&r.user),
        label(&r.base_model.clone().or_else(|| r.model.clone())),
        label(&r.profile_arn),
        label(&r.project),
        label(&r.session),
        label(&r.front),
        to_i64(u.input_tokens),
        to_i64(u.output_tokens),
        to_i64(u.cache_read_tokens),
        to_i64(u.cache_write_tokens),
        r.cost_usd.unwrap_or(0.0),
        class.unpriced,
        class.incomplete,
        class.error,
    ])?;
    Ok(())
}

/// Commits a batch the spool's shipper read back, in one transaction (see [`SqliteTarget`]).
fn write_entries(conn: &mut Connection, entries: &[&SpoolEntry]) -> rusqlite::Result<()> {
    // A marker whose row is in the same batch would be inserted and deleted in one
    // transaction: it is left out (the row's own delete still runs, for a marker an earlier
    // batch committed).
    let ended: std::collections::HashSet<&str> = entries
        .iter()
        .filter_map(|e| match e {
            SpoolEntry::Row(r) => Some(r.request_id.as_str()),
            SpoolEntry::Mark(_) => None,
        })
        .collect();
    let tx = conn.transaction()?;
    {
        let mut unmark = tx.prepare_cached("DELETE FROM sent WHERE request_id = ?1")?;
        let mut mark = tx.prepare_cached(
            "INSERT OR REPLACE INTO sent (request_id, ts_ms, user, front, project, session,
                operation, model, base_model, profile_arn, admitted)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for e in entries {
            match e {
                SpoolEntry::Row(r) => {
                    put_row(&tx, r)?;
                    // In the row's own transaction: never a row and its marker, never neither.
                    if r.marked {
                        unmark.execute([&r.request_id])?;
                    }
                }
                SpoolEntry::Mark(m) if !ended.contains(m.request_id.as_str()) => {
                    mark.execute(params![
                        m.request_id,
                        m.ts_ms,
                        m.user,
                        m.front,
                        m.project,
                        m.session,
                        m.operation,
                        m.model,
                        m.base_model,
                        m.profile_arn,
                        m.admitted,
                    ])?;
                }
                SpoolEntry::Mark(_) => {}
            }
        }
    }
    tx.commit()
}

/// The SQLite file as the spool shipper's target: its own connection, the only one that writes
/// `requests` and `sent` while `serve` runs.
pub struct SqliteTarget {
    conn: Connection,
    path: PathBuf,
}

impl crate::store::writer::Target for SqliteTarget {
    fn commit(&mut self, entries: &[&SpoolEntry]) -> anyhow::Result<()> {
        Ok(write_entries(&mut self.conn, entries)?)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// The spool of the SQLite ledger at `path`: beside it, as its `-wal` is.
pub fn spool_path_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-spool");
    PathBuf::from(name)
}

/// Turns every [`Sent`] marker a crash left (a call that was on its way to or from Bedrock
/// when the process died) into a row with outcome `interrupted`: status 0 (the client got no
/// answer), no tokens, cost unknown, incomplete. A marker whose request already has a row is
/// only removed, so a request never has two. Returns how many rows it wrote. Run it at start,
/// before the writer takes new calls.
pub fn recover_interrupted(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let cut: Vec<Record> = tx
        .prepare(
            "SELECT s.ts_ms, s.user, s.operation, s.model, s.base_model, s.profile_arn,
                s.request_id, s.admitted, s.front, s.project, s.session
             FROM sent s
             WHERE NOT EXISTS (SELECT 1 FROM requests r
                               WHERE r.ts_ms = s.ts_ms AND r.request_id = s.request_id)
             ORDER BY s.ts_ms",
        )?
        .query_map([], |r| {
            Ok(Record {
                ts_ms: r.get(0)?,
                user: r.get(1)?,
                operation: r.get(2)?,
                model: r.get(3)?,
                base_model: r.get(4)?,
                profile_arn: r.get(5)?,
                request_id: r.get(6)?,
                admitted: r.get(7)?,
                front: r.get(8)?,
                project: r.get(9)?,
                session: r.get(10)?,
                status: 0,
                usage: Usage::default(),
                cost_usd: None,
                latency_ms: 0,
                ttfb_ms: None,
                upstream_request_id: None,
                complete: false,
                outcome: Outcome::Interrupted.name().to_string(),
                marked: false,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for r in &cut {
        put_row(&tx, r)?;
    }
    tx.execute("DELETE FROM sent", [])?;
    tx.commit()?;
    Ok(cut.len())
}

/// Where the writer and the callers commit: the spool, which a shipper thread moves into the
/// SQLite file or PostgreSQL (see [`crate::store::writer`]).
struct Sink(Box<crate::store::writer::SpoolSink>);

impl Sink {
    fn write(&mut self, batch: &[Queued]) -> anyhow::Result<()> {
        let entries: Vec<&Entry> = batch.iter().map(|q| &q.entry).collect();
        self.0.write(&entries)
    }

    /// Before the writer stops: lets the shipper take what the spool holds.
    fn close(&mut self) {
        self.0.close();
    }
}

struct Writer {
    sink: Arc<Mutex<Sink>>,
    rx: Receiver<Msg>,
    stats: Arc<LedgerStats>,
    /// See [`Ledger::queued`].
    queued: Arc<AtomicU64>,
    batch: Vec<Queued>,
}

/// The sink, even if a thread panicked holding it (the SQLite transaction it was in rolled back).
fn lock_sink(sink: &Mutex<Sink>) -> std::sync::MutexGuard<'_, Sink> {
    sink.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Writer {
    fn commit(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let oldest = self.batch.iter().map(|q| q.at).min();
        let rows = self
            .batch
            .iter()
            .filter(|q| matches!(q.entry, Entry::Row(_)))
            .count();
        // A failed write is retried (the receipts keep waiting, up to their bound) rather than
        // dropped; only a batch that keeps failing while memory fills is at risk, and that is
        // logged loudly.
        let written = lock_sink(&self.sink).write(&self.batch);
        match written {
            Ok(()) => {
                // Before the receipts wake: whoever waited on one may commit its next entry
                // itself.
                self.queued
                    .fetch_sub(self.batch.len() as u64, Ordering::AcqRel);
                self.stats.pending.fetch_sub(rows as i64, Ordering::Relaxed);
                self.stats.written.fetch_add(rows as u64, Ordering::Relaxed);
                if let Some(t) = oldest {
                    self.stats.last_lag_us.store(
                        u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX),
                        Ordering::Relaxed,
                    );
                }
                for q in self.batch.drain(..) {
                    if let Some(ack) = q.ack {
                        let _ = ack.send(());
                    }
                }
            }
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %format!("{e:#}"), entries = self.batch.len(), "ledger write failed; will retry");
                if self.batch.len() > CHANNEL_CAPACITY {
                    self.stats.pending.fetch_sub(rows as i64, Ordering::Relaxed);
                    self.stats.dropped.fetch_add(rows as u64, Ordering::Relaxed);
                    tracing::error!(rows, "ledger rows dropped after repeated write failures");
                    self.queued
                        .fetch_sub(self.batch.len() as u64, Ordering::AcqRel);
                    // Dropping the receipts' senders tells their waiters.
                    self.batch.clear();
                }
            }
        }
    }

    /// Sleeps until something arrives, then commits it with everything that queued while the
    /// last commit ran: one transaction (and one sync) for a whole group, so the rate of
    /// commits falls as the rate of requests rises.
    fn run(mut self) {
        loop {
            let first = if self.batch.is_empty() {
                match self.rx.recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => {
                        lock_sink(&self.sink).close();
                        return;
                    }
                }
            } else {
                // A batch whose commit failed: try again soon even if nothing new comes.
                match self.rx.recv_timeout(RETRY_AFTER) {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.commit();
                        lock_sink(&self.sink).close();
                        return;
                    }
                }
            };
            let mut next = first;
            while let Some(msg) = next {
                match msg {
                    Msg::Entry(q) => {
                        self.batch.push(q);
                        if self.batch.len() >= MAX_BATCH {
                            self.commit();
                        }
                    }
                    // Everything queued before the flush is in the batch by now.
                    Msg::Flush(ack) => {
                        self.commit();
                        let _ = ack.send(());
                    }
                    Msg::Close(ack) => {
                        self.drain();
                        self.commit();
                        lock_sink(&self.sink).close();
                        let _ = ack.send(());
                        return;
                    }
                }
                next = self.rx.try_recv().ok();
            }
            self.commit();
        }
    }

    /// Takes every entry still queued (at close).
    fn drain(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Entry(q) => self.batch.push(q),
                Msg::Flush(ack) | Msg::Close(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

impl Ledger {
    /// Opens the database and its spool ([`spool_path_of`]), commits what a previous run left
    /// in the spool, and starts the writer and the shipper.
    pub fn open(path: &Path, sync: Synchronous) -> anyhow::Result<Ledger> {
        let conn = open_db_with(path, sync)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES)?;
        let checkpointer = spawn_checkpointer(path)?;
        let target = SqliteTarget {
            conn,
            path: path.to_path_buf(),
        };
        let sink = crate::store::writer::SpoolSink::open(
            Box::new(target),
            &spool_path_of(path),
            sync == Synchronous::Full,
            SHIP_EVERY,
            Arc::default(),
        )?;
        let (tx, rx) = sync_channel(CHANNEL_CAPACITY);
        Self::start(
            Sink(Box::new(sink)),
            Some(checkpointer),
            path,
            sync == Synchronous::Normal,
            (tx, rx),
        )
    }

    /// Starts the writer on PostgreSQL (with its spool); `spool_path` also stands in for the
    /// file path of [`Ledger::path`].
    pub fn open_postgres(
        sink: crate::store::writer::SpoolSink,
        spool_path: &Path,
        sync: Synchronous,
    ) -> anyhow::Result<Ledger> {
        Self::start(
            Sink(Box::new(sink)),
            None,
            spool_path,
            sync == Synchronous::Normal,
            sync_channel(CHANNEL_CAPACITY),
        )
    }

    fn start(
        sink: Sink,
        checkpointer: Option<(SyncSender<()>, JoinHandle<()>)>,
        path: &Path,
        inline: bool,
        (tx, rx): (SyncSender<Msg>, Receiver<Msg>),
    ) -> anyhow::Result<Ledger> {
        let stats = Arc::new(LedgerStats::default());
        let shipped = sink.0.shipped();
        let sink = Arc::new(Mutex::new(sink));
        let queued = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            sink: sink.clone(),
            rx,
            stats: stats.clone(),
            queued: queued.clone(),
            batch: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer.run())
            .context("cannot start the ledger writer")?;
        Ok(Ledger {
            tx,
            sink,
            queued,
            inline,
            closed: Arc::default(),
            thread: Mutex::new(Some(thread)),
            checkpointer: Mutex::new(checkpointer),
            shipped,
            stats,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits `entry` on the caller's thread if the writer is idle with nothing queued (see
    /// the module doc); hands it back otherwise, for the writer.
    fn commit_here(&self, entry: Entry) -> Result<(), Entry> {
        if !self.inline || self.queued.load(Ordering::Acquire) != 0 {
            return Err(entry);
        }
        let Ok(mut sink) = self.sink.try_lock() else {
            return Err(entry);
        };
        // Looked at again with the sink held: the writer takes it for every commit, so what it
        // has not committed yet is still counted here.
        if self.queued.load(Ordering::Acquire) != 0 || self.closed.load(Ordering::Acquire) {
            return Err(entry);
        }
        let one = [Queued {
            entry,
            at: Instant::now(),
            ack: None,
        }];
        match sink.write(&one) {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "ledger entry handed to the writer");
                let [q] = one;
                Err(q.entry)
            }
        }
    }

    /// Queues `entry` for the writer.
    fn queue(&self, entry: Entry) -> Result<Receipt, ()> {
        let (ack, receipt) = tokio::sync::oneshot::channel();
        let msg = Msg::Entry(Queued {
            entry,
            at: Instant::now(),
            ack: Some(ack),
        });
        self.queued.fetch_add(1, Ordering::AcqRel);
        match self.tx.try_send(msg) {
            Ok(()) => Ok(Receipt(Some(receipt))),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Err(())
            }
        }
    }

    /// Commits a row, or queues it without blocking; the receipt resolves once it is
    /// committed. A full queue drops the row, counts it and logs (and its receipt resolves at
    /// once, uncommitted).
    pub fn record(&self, record: Record) -> Receipt {
        let entry = Entry::Row(Box::new(record));
        let entry = match self.commit_here(entry) {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
                self.stats.last_lag_us.store(0, Ordering::Relaxed);
                return Receipt::none();
            }
            Err(entry) => entry,
        };
        match self.queue(entry) {
            Ok(receipt) => {
                self.stats.pending.fetch_add(1, Ordering::Relaxed);
                receipt
            }
            Err(()) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::error!("ledger queue full or closed; a usage row was dropped");
                Receipt::lost()
            }
        }
    }

    /// Queues the marker of a call about to be sent; send it once the receipt resolves (see
    /// the module doc). A full queue loses the marker (logged), never the call.
    pub fn sent(&self, sent: Sent) -> Receipt {
        let entry = match self.commit_here(Entry::Mark(Box::new(sent))) {
            Ok(()) => return Receipt::none(),
            Err(entry) => entry,
        };
        self.queue(entry).unwrap_or_else(|()| {
            tracing::error!("ledger queue full or closed; a sent marker was dropped");
            Receipt::lost()
        })
    }

    /// Commits every row queued so far and waits (up to [`COMMIT_WAIT`]) until the shipper has
    /// moved it into the database; blocks (call from a blocking context).
    pub fn flush(&self) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
        self.shipped.wait(COMMIT_WAIT);
    }

    /// Whether entries a previous run committed wait in the spool for the database still.
    pub fn has_spooled(&self) -> bool {
        self.shipped.pending()
    }

    /// Commits everything queued and stops the writer. Later rows are dropped (and counted).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let (ack, done) = sync_channel(1);
        if self.tx.send(Msg::Close(ack)).is_ok() {
            let _ = done.recv();
        }
        if let Ok(mut t) = self.thread.lock()
            && let Some(t) = t.take()
        {
            let _ = t.join();
        }
        if let Ok(mut c) = self.checkpointer.lock()
            && let Some((stop, t)) = c.take()
        {
            drop(stop);
            let _ = t.join();
        }
    }
}

/// Starts the thread that checkpoints the WAL every [`CHECKPOINT_EVERY`] on a connection of
/// its own. A passive checkpoint never waits for the writer, nor the writer for it.
fn spawn_checkpointer(path: &Path) -> anyhow::Result<(SyncSender<()>, JoinHandle<()>)> {
    let conn =
        Connection::open(path).with_context(|| format!("cannot open ledger {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let (stop, stopped) = sync_channel::<()>(1);
    let checkpoint = move || {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "ledger checkpoint failed; the writer will do it");
        }
    };
    let thread = std::thread::Builder::new()
        .name("ledger-checkpoint".into())
        .spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY) {
                checkpoint();
            }
            checkpoint();
        })
        .context("cannot start the ledger checkpoint thread")?;
    Ok((stop, thread))
}

/// Per-user totals read back from the ledger (to rebuild counters after a restart).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub requests: u64,
    pub usage: Usage,
    pub cost_usd: f64,
    pub unpriced: u64,
}

/// A count read back from a signed column (a negative one is no count).
pub(crate) fn from_i64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// Totals per user for requests at or after `since_ms`: from `usage_daily` when `since_ms` is
/// the start of a UTC day (a month's start is), from the rows otherwise.
pub fn totals_since(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<(String, Totals)>> {
    let from_rollups = since_ms.rem_euclid(DAY_MS) == 0 && rolled_up(conn)?;
    let sql = if from_rollups {
        "SELECT \"user\", sum(requests), sum(input_tokens), sum(output_tokens),
                sum(cache_read_tokens), sum(cache_write_tokens), total(cost_usd), sum(unpriced)
         FROM usage_daily WHERE day >= ?1 AND \"user\" <> '' GROUP BY \"user\""
            .to_string()
    } else {
        format!(
            "SELECT user, count(*), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
                    sum(cache_write_tokens), total(cost_usd),
                    sum(CASE WHEN {UNPRICED_SQL} THEN 1 ELSE 0 END)
             FROM requests WHERE ts_ms >= ?1 AND user IS NOT NULL GROUP BY user"
        )
    };
    let mut stmt = conn.prepare(&sql)?;
    let map = |r: &rusqlite::Row<'_>| {
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
    };
    if from_rollups {
        stmt.query_map([day_of(since_ms)], map)?.collect()
    } else {
        stmt.query_map([since_ms], map)?.collect()
    }
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

/// A request id no other test row has, as every request's is unique: the ledger takes a row
/// once per time and id, so test rows that shared one would be skipped.
#[cfg(test)]
pub(crate) fn unique_request_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "req-{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
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
            request_id: unique_request_id(),
            upstream_request_id: None,
            complete: true,
            admitted: true,
            outcome: "complete".into(),
            marked: false,
        }
    }

    #[test]
    fn rows_survive_close_and_totals_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
        ledger.record(record("alice", 1_000, 10, Some(0.5)));
        ledger.record(record("alice", 2_000, 20, None));
        ledger.record(record("bob", 500, 1, Some(0.25)));
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
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
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
        let rolled: (i64, i64) = conn
            .query_row(
                "SELECT sum(requests), sum(input_tokens) FROM usage_daily",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            rolled,
            (2, 2),
            "the old row is rolled up, the new one added"
        );
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

    #[tokio::test]
    async fn a_receipt_resolves_once_its_row_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Full).unwrap();
        let receipts: Vec<Receipt> = (0..100)
            .map(|i| ledger.record(record("alice", i, 1, Some(0.0))))
            .collect();
        for r in receipts {
            assert!(r.committed().await);
        }
        // Another connection sees them all a shipment later, with no flush or close.
        let until = Instant::now() + Duration::from_secs(5);
        while count(&path, "requests") < 100 {
            assert!(Instant::now() < until, "the spool was not shipped");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(count(&path, "requests"), 100);
        ledger.close();
        let late = ledger.record(record("alice", 1, 1, None));
        assert!(!late.committed().await, "a closed ledger commits nothing");
    }

    fn sent(id: &str, ts_ms: i64) -> Sent {
        Sent {
            ts_ms,
            request_id: id.into(),
            user: "alice".into(),
            front: Some("anthropic".into()),
            project: Some("p".into()),
            session: None,
            operation: "Messages".into(),
            model: Some("m".into()),
            base_model: Some("m".into()),
            profile_arn: Some("arn".into()),
            admitted: true,
        }
    }

    #[tokio::test]
    async fn markers_left_by_a_crash_become_interrupted_rows_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
        for (id, ts) in [("done", 10), ("cut", 20), ("cut2", 30)] {
            assert!(ledger.sent(sent(id, ts)).committed().await);
        }
        // `done` finished: its row replaces its marker.
        let mut row = record("alice", 10, 5, Some(0.1));
        row.request_id = "done".into();
        row.marked = true;
        assert!(ledger.record(row).committed().await);
        ledger.flush();
        // The process dies here: nothing more is written.
        drop(ledger);

        let mut conn = open_db(&path).unwrap();
        // A marker whose row made it (written by an older build that kept both) stays one row.
        conn.execute(
            "INSERT INTO sent (request_id, ts_ms, user, operation, admitted) VALUES ('done', 10, 'alice', 'Messages', 1)",
            [],
        )
        .unwrap();
        assert_eq!(recover_interrupted(&mut conn).unwrap(), 2);
        assert_eq!(
            recover_interrupted(&mut conn).unwrap(),
            0,
            "markers are gone"
        );
        type Seen = (String, String, i64, bool, Option<f64>, Option<String>);
        let rows: Vec<Seen> = conn
            .prepare(
                "SELECT request_id, outcome, status, complete, cost_usd, project FROM requests ORDER BY ts_ms",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            [
                ("done".into(), "complete".into(), 200, true, Some(0.1), None),
                (
                    "cut".into(),
                    "interrupted".into(),
                    0,
                    false,
                    None,
                    Some("p".into())
                ),
                (
                    "cut2".into(),
                    "interrupted".into(),
                    0,
                    false,
                    None,
                    Some("p".into())
                ),
            ]
        );
    }

    /// Rows of every kind the rollups must count: interrupted, refused, unpriced, cut streams,
    /// Bedrock errors, NULL labels, two days, one key shared by several rows.
    fn assorted() -> Vec<Record> {
        let day = 1_764_547_200_000; // 2025-12-01T00:00:00Z
        let mut rows = Vec::new();
        let base = |ts, cost| record("alice", day + ts, 10, cost);
        rows.push(base(1, Some(0.5)));
        rows.push(base(2, Some(0.25)));
        rows.push(base(3, None)); // unpriced
        let mut free = base(4, None);
        free.usage = Usage::default(); // no tokens: not unpriced
        rows.push(free);
        let mut cut = base(5, Some(0.125));
        cut.complete = false;
        cut.outcome = "client_gone".into(); // cut stream: incomplete, no error
        rows.push(cut);
        let mut idle = base(6, Some(0.125));
        idle.complete = false;
        idle.outcome = "upstream_idle".into(); // incomplete and an error
        rows.push(idle);
        let mut refused = base(7, None);
        refused.status = 429;
        refused.usage = Usage::default();
        refused.admitted = false;
        refused.complete = false;
        refused.outcome = "ThrottlingException".into();
        rows.push(refused);
        let mut failed = base(8, None);
        failed.status = 500;
        failed.usage = Usage::default();
        failed.outcome = "InternalServerException".into();
        rows.push(failed);
        let mut exception = base(9, Some(1.5));
        exception.outcome = "upstream_error".into(); // a 200 that ended with an exception frame
        rows.push(exception);
        let mut shut = base(10, Some(2.0));
        shut.complete = false;
        shut.outcome = "shutdown".into();
        rows.push(shut);
        let mut anon = base(11, None);
        anon.user = None;
        anon.front = None;
        anon.model = None;
        anon.base_model = None;
        anon.status = 403;
        anon.usage = Usage::default();
        anon.outcome = "AccessDeniedException".into();
        rows.push(anon);
        let mut labelled = base(DAY_MS + 12, Some(4.0));
        labelled.base_model = None; // the requested model stands in
        labelled.model = Some("us.m".into());
        labelled.project = Some("apollo".into());
        labelled.session = Some("s1".into());
        labelled.profile_arn = Some("arn:p".into());
        labelled.front = Some("anthropic".into());
        rows.push(labelled.clone());
        labelled.ts_ms += 1;
        rows.push(labelled);
        let mut bob = record("bob", day + DAY_MS + 14, 3, Some(0.0625));
        bob.usage.cache_read_tokens = 7;
        bob.usage.cache_write_tokens = 5;
        rows.push(bob);
        rows
    }

    type Line = (
        String,
        String,
        String,
        String,
        String,
        String,
        String,
        Vec<i64>,
        f64,
    );

    fn rollups(conn: &Connection) -> Vec<Line> {
        conn.prepare(
            "SELECT day, \"user\", model, profile, project, session, front, requests, input_tokens,
                output_tokens, cache_read_tokens, cache_write_tokens, unpriced, incomplete, errors,
                cost_usd
             FROM usage_daily ORDER BY 1, 2, 3, 4, 5, 6, 7",
        )
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                (7..15).map(|i| r.get(i)).collect::<Result<_, _>>()?,
                r.get(15)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[tokio::test]
    async fn the_writer_and_the_migration_roll_up_the_same() {
        let dir = tempfile::tempdir().unwrap();
        // Written by this build: the writer's upserts, and a crash's marker recovered at start.
        let written = dir.path().join("written.db");
        let ledger = Ledger::open(&written, Synchronous::Normal).unwrap();
        for r in assorted() {
            ledger.record(r);
        }
        let mut marker = sent("cut-by-a-crash", 1_764_547_200_000 + 20);
        marker.project = None;
        assert!(ledger.sent(marker).committed().await);
        ledger.close();
        let mut conn = open_db(&written).unwrap();
        assert_eq!(recover_interrupted(&mut conn).unwrap(), 1);

        // The same rows in a version 4 ledger, rolled up by the migration.
        let old = dir.path().join("old.db");
        let v4 = Connection::open(&old).unwrap();
        v4.execute_batch(SCHEMA).unwrap();
        v4.pragma_update(None, "user_version", 4).unwrap();
        v4.execute("ATTACH DATABASE ?1 AS w", [written.to_str().unwrap()])
            .unwrap();
        v4.execute_batch("INSERT INTO requests SELECT * FROM w.requests; DETACH DATABASE w;")
            .unwrap();
        assert!(!rolled_up(&v4).unwrap());
        drop(v4);
        let migrated = open_db(&old).unwrap();
        assert!(rolled_up(&migrated).unwrap());

        let by_writer = rollups(&conn);
        assert_eq!(by_writer, rollups(&migrated));
        assert_eq!(by_writer.len(), 5, "{by_writer:#?}");
        let requests: i64 = by_writer.iter().map(|l| l.7[0]).sum();
        assert_eq!(requests, 15);
        // Each row's class, by the function and by its SQL twins.
        let sql = format!(
            "SELECT status, complete, outcome,
                input_tokens + output_tokens + cache_read_tokens + cache_write_tokens, cost_usd,
                {UNPRICED_SQL}, {INCOMPLETE_SQL}, {ERROR_SQL} FROM requests"
        );
        let mut stmt = conn.prepare(&sql).unwrap();
        let seen: Vec<(Class, Class)> = stmt
            .query_map([], |r| {
                let by_fn = classify(
                    r.get(0)?,
                    r.get(1)?,
                    &r.get::<_, String>(2)?,
                    from_i64(r.get(3)?),
                    r.get(4)?,
                );
                let by_sql = Class {
                    unpriced: r.get(5)?,
                    incomplete: r.get(6)?,
                    error: r.get(7)?,
                };
                Ok((by_fn, by_sql))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(seen.len(), 15);
        for (by_fn, by_sql) in &seen {
            assert_eq!(by_fn, by_sql);
        }
        for class in [
            Class {
                unpriced: true,
                ..Class::default()
            },
            Class {
                incomplete: true,
                ..Class::default()
            },
            Class {
                incomplete: true,
                error: true,
                ..Class::default()
            },
            Class {
                error: true,
                ..Class::default()
            },
        ] {
            assert!(seen.iter().any(|(c, _)| *c == class), "no row is {class:?}");
        }
    }

    #[test]
    fn month_totals_from_rollups_match_the_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
        for r in assorted() {
            ledger.record(r);
        }
        ledger.close();
        let conn = open_db(&path).unwrap();
        let since = 1_764_547_200_000;
        let sorted = |mut t: Vec<(String, Totals)>| {
            t.sort_by(|a, b| a.0.cmp(&b.0));
            t
        };
        let from_rollups = sorted(totals_since(&conn, since).unwrap());
        conn.pragma_update(None, "user_version", 4).unwrap();
        let from_rows = sorted(totals_since(&conn, since).unwrap());
        assert_eq!(from_rollups, from_rows);
        assert_eq!(from_rollups.len(), 2);
        assert_eq!(
            from_rollups[0].1.requests, 12,
            "the unidentified call is no one's"
        );
    }

    #[test]
    fn day_of_matches_sqlite() {
        let conn = Connection::open_in_memory().unwrap();
        for ts in [
            0,
            -1,
            -1_500,
            999,
            86_399_999,
            86_400_000,
            1_764_547_200_000,
            253_402_300_799_999,
            253_402_300_800_000,
            -62_167_219_200_001,
        ] {
            let sql: String = conn
                .query_row(
                    &format!("SELECT {DAY_SQL} FROM (SELECT ?1 AS ts_ms)"),
                    [ts],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(day_of(ts), sql, "{ts}");
        }
    }

    #[test]
    fn flush_commits_what_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
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

    fn count(path: &Path, table: &str) -> i64 {
        open_read_only(path)
            .unwrap()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn with_normal_sync_an_idle_writer_lets_the_caller_commit_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
        // Committed to the spool by the call itself: nothing left to wait for.
        let marker = ledger.sent(sent("r1", 1_000));
        assert!(marker.0.is_none(), "the marker was committed by its caller");
        ledger.flush();
        assert_eq!(count(&path, "sent"), 1);
        let mut row = record("alice", 1_000, 1, Some(0.0));
        row.request_id = "r1".into();
        row.marked = true;
        let receipt = ledger.record(row);
        assert!(receipt.0.is_none(), "the row was committed by its caller");
        ledger.flush();
        assert_eq!((count(&path, "requests"), count(&path, "sent")), (1, 0));
        assert_eq!(ledger.stats.written.load(Ordering::Relaxed), 1);
        ledger.close();
        let late = ledger.record(record("alice", 2_000, 1, None));
        assert!(!late.committed().await, "a closed ledger commits nothing");
        assert_eq!(count(&path, "requests"), 1);
    }

    #[tokio::test]
    async fn a_locked_database_costs_the_callers_nothing_and_the_shipper_commits_later() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let t = Instant::now();
        let receipts: Vec<Receipt> = (0..10)
            .map(|i| ledger.record(record("alice", i, 1, Some(0.0))))
            .collect();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "the callers waited {:?} on a lock",
            t.elapsed()
        );
        assert!(
            receipts.iter().all(|r| r.0.is_none()),
            "every row was committed to the spool by its caller"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            count(&path, "requests"),
            0,
            "the shipper waits for the lock"
        );
        other.execute_batch("COMMIT").unwrap();
        ledger.flush();
        assert_eq!(count(&path, "requests"), 10);
        ledger.close();
    }

    /// The writer spools its own entries, unconverted; the shipper must read each back as the
    /// same entry.
    #[test]
    fn an_entry_is_spooled_as_the_shipper_reads_it() {
        let row = record("alice", 10, 5, Some(0.5));
        let mark = sent("m", 20);
        let json = serde_json::to_string(&[
            Entry::Row(Box::new(row.clone())),
            Entry::Mark(Box::new(mark.clone())),
        ])
        .unwrap();
        let back: Vec<SpoolEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&[SpoolEntry::Row(row), SpoolEntry::Mark(mark)]).unwrap()
        );
    }

    /// What a crash leaves: entries in the spool, some of them maybe in the database already
    /// (committed, the spool not cut yet).
    #[test]
    fn a_spool_left_by_a_crash_is_shipped_at_open_and_shipping_it_again_changes_nothing() {
        use crate::store::spool::Spool;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let mut done = record("alice", 10, 5, Some(0.5));
        done.request_id = "done".into();
        done.marked = true;
        let mut bob = record("bob", 30, 7, Some(0.25));
        bob.request_id = "bob".into();
        let left = [
            SpoolEntry::Mark(sent("done", 10)),
            SpoolEntry::Mark(sent("cut", 20)),
            SpoolEntry::Row(done),
            SpoolEntry::Row(bob),
        ];
        let spill = |entries: &[SpoolEntry]| {
            let mut spool = Spool::open(&spool_path_of(&path), 1 << 20, false).unwrap();
            spool.append(entries).unwrap();
        };
        let seen = || {
            let conn = open_read_only(&path).unwrap();
            let rows: Vec<(String, String)> = conn
                .prepare("SELECT request_id, outcome FROM requests ORDER BY ts_ms")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let rolled: (i64, i64, f64) = conn
                .query_row(
                    "SELECT sum(requests), sum(input_tokens), sum(cost_usd) FROM usage_daily",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            (rows, rolled, count(&path, "sent"))
        };
        spill(&left);
        let meter = crate::meter::Meter::open(&path, Synchronous::Normal).unwrap();
        meter.ledger.close();
        let first = seen();
        assert_eq!(
            first,
            (
                vec![
                    ("done".into(), "complete".into()),
                    ("cut".into(), "interrupted".into()),
                    ("bob".into(), "complete".into()),
                ],
                (3, 12, 0.75),
                0
            ),
            "the spool's rows and the one call left without a row"
        );
        assert!(
            std::fs::metadata(spool_path_of(&path)).unwrap().len() == 0,
            "the shipped spool is empty"
        );
        // The same entries again, as if the last shipment's commit made it and its cut did not.
        spill(&left[2..]);
        let ledger = Ledger::open(&path, Synchronous::Normal).unwrap();
        ledger.close();
        assert_eq!(seen(), first, "nothing counted twice");
    }

    #[tokio::test]
    async fn with_full_sync_every_entry_goes_to_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = Ledger::open(&path, Synchronous::Full).unwrap();
        let receipt = ledger.record(record("alice", 1, 1, None));
        assert!(
            receipt.0.is_some(),
            "a synced commit is never made on a caller's thread"
        );
        assert!(receipt.committed().await);
        ledger.close();
    }
}
