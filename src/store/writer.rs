//! The ledger writer's PostgreSQL side: what the writer thread calls to commit a batch when the
//! ledger lives in PostgreSQL, and the spool it falls back to.
//!
//! [`PgSink::write`] commits a batch (markers first, then rows, then the markers those rows
//! replace) in one transaction. When the database cannot take it (down, unreachable, slow past
//! [`STATEMENT_WAIT`]), the batch goes to the spool instead, synced, so the answers still end
//! with their rows safe on this replica's disk; every later batch follows it there until the
//! spool has been replayed in order. Replays are idempotent (rows are unique by request id),
//! so one cut short is simply done again. This module never drops an entry unless the spool is
//! full, and then it says so in the error the writer counts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio_postgres::Client;

use super::Settings;
use super::pg;
use super::spool::Spool;
use crate::meter::ledger::{Record, Sent};

/// Longest wait for the database on one batch before it is spooled instead.
pub const STATEMENT_WAIT: Duration = Duration::from_secs(3);
/// Spool size when `[store] spool_max_bytes` says nothing: about a million rows.
pub const DEFAULT_SPOOL_MAX: u64 = 1 << 30;

/// One entry of a batch, as the writer hands it over and as the spool keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Entry {
    Row(Record),
    Mark(Sent),
}

/// What `/healthz` and `/metrics` say about the store.
#[derive(Debug, Default)]
pub struct Health {
    /// The last batch could not reach the database (it is in the spool).
    pub degraded: AtomicBool,
    /// Bytes in the spool.
    pub spool_bytes: AtomicU64,
}

/// The writer's connection to PostgreSQL, and its spool.
pub struct PgSink {
    rt: tokio::runtime::Runtime,
    settings: Settings,
    dir: PathBuf,
    client: Option<Client>,
    spool: Spool,
    replica: String,
    health: Arc<Health>,
    /// After a failure, batches go straight to the spool until then (the writer's own
    /// once-a-second replay tries the database meanwhile), so answers never wait on a
    /// database that hangs.
    quiet_until: Option<std::time::Instant>,
}

/// How long batches go straight to the spool after the database failed one.
const BACKOFF: Duration = Duration::from_secs(1);

impl PgSink {
    /// Opens the spool and tries the database once (failing to reach it is not an error:
    /// the spool takes the rows until it answers).
    pub fn open(
        settings: Settings,
        dir: &Path,
        spool_path: &Path,
        replica: String,
        health: Arc<Health>,
    ) -> anyhow::Result<PgSink> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the store writer's runtime")?;
        let spool = Spool::open(spool_path, DEFAULT_SPOOL_MAX)?;
        health.spool_bytes.store(spool.len(), Ordering::Relaxed);
        let mut sink = PgSink {
            rt,
            settings,
            dir: dir.to_path_buf(),
            client: None,
            spool,
            replica,
            health,
            quiet_until: None,
        };
        if !sink.spool.is_empty() {
            tracing::warn!(spool = %sink.spool.path().display(), bytes = sink.spool.len(), "ledger rows wait in the spool from the last run; replaying");
            sink.replay();
        }
        Ok(sink)
    }

    /// Whether entries wait in the spool (the writer then retries on its own every second).
    pub fn has_spooled(&self) -> bool {
        !self.spool.is_empty()
    }

    /// Commits `entries`, or spools them; an error means they are in neither.
    pub fn write(&mut self, entries: &[Entry]) -> anyhow::Result<()> {
        let quiet = self
            .quiet_until
            .is_some_and(|t| std::time::Instant::now() < t);
        if self.has_spooled() && !quiet {
            self.replay();
        }
        if !self.has_spooled() && !quiet {
            match self.commit(entries) {
                Ok(()) => {
                    self.health.degraded.store(false, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), store = %self.settings.redacted_url(), "the store did not take a ledger batch; spooling it");
                    self.client = None;
                    self.quiet_until = Some(std::time::Instant::now() + BACKOFF);
                }
            }
        }
        self.spool.append(entries)?;
        self.health
            .spool_bytes
            .store(self.spool.len(), Ordering::Relaxed);
        self.health.degraded.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Tries to move the spool into the database, in order; empties it once it is all there.
    pub fn replay(&mut self) -> bool {
        let entries: Vec<Entry> = match self.spool.read_all() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot read the spool");
                return false;
            }
        };
        for chunk in entries.chunks(2_000) {
            if let Err(e) = self.commit(chunk) {
                tracing::debug!(error = %format!("{e:#}"), "the store is still away; the spool waits");
                self.client = None;
                self.quiet_until = Some(std::time::Instant::now() + BACKOFF);
                return false;
            }
        }
        match self.spool.clear() {
            Ok(()) => {
                self.quiet_until = None;
                self.health.spool_bytes.store(0, Ordering::Relaxed);
                self.health.degraded.store(false, Ordering::Relaxed);
                tracing::info!(
                    entries = entries.len(),
                    "the spool is replayed into the store"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot empty the spool");
                false
            }
        }
    }

    fn commit(&mut self, entries: &[Entry]) -> anyhow::Result<()> {
        let rows: Vec<&Record> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Row(r) => Some(r),
                Entry::Mark(_) => None,
            })
            .collect();
        let marks: Vec<&Sent> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Mark(m) => Some(m),
                Entry::Row(_) => None,
            })
            .collect();
        let unmark: Vec<String> = rows
            .iter()
            .filter(|r| r.marked)
            .map(|r| r.request_id.clone())
            .collect();
        let settings = self.settings.clone();
        let dir = self.dir.clone();
        let replica = self.replica.clone();
        let mut client = self.client.take();
        let result = self.rt.block_on(async {
            tokio::time::timeout(STATEMENT_WAIT, async {
                if client.is_none() {
                    client = Some(pg::connect(&settings, &dir).await?);
                }
                let Some(c) = client.as_mut() else {
                    anyhow::bail!("no connection");
                };
                let tx = c.transaction().await?;
                pg::insert_marks(&tx, &replica, &marks).await?;
                pg::insert_in(&tx, &replica, &rows).await?;
                if !unmark.is_empty() {
                    tx.execute("DELETE FROM sent WHERE request_id = ANY($1)", &[&unmark])
                        .await?;
                }
                tx.commit().await?;
                anyhow::Ok(())
            })
            .await
            .map_err(|_| anyhow::anyhow!("the store did not answer within {STATEMENT_WAIT:?}"))?
        });
        if result.is_ok() {
            self.client = client;
        }
        result
    }
}
