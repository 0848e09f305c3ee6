//! The ledger writer's spooled side: the spool the writer commits each batch to, and the
//! shipper thread that moves what the spool holds into the database (a [`Target`]: the SQLite
//! file, `crate::meter::ledger::SqliteTarget`, or PostgreSQL, [`PgTarget`]).
//!
//! An answer ends once its row is committed on this machine's disk: [`SpoolSink::write`]
//! appends the batch to the spool (synced as `ledger.synchronous` says) and returns, so no
//! request waits on a database transaction, nor on a round trip to PostgreSQL. The shipper
//! wakes on an append, at most once per interval ([`SHIP_INTERVAL`] for PostgreSQL, the
//! SQLite ledger's own for its file), or at once for a flush, reads everything not yet shipped and
//! commits it (markers first, then rows, then the markers those rows replace) in transactions
//! of up to [`SHIP_BATCH`] entries, in order: under a steady load the database sees a few
//! transactions a second, however many requests they carry. When the
//! database cannot take a batch (down, unreachable, slow past [`STATEMENT_WAIT`]) the store is
//! degraded and the shipper tries again every second; the spool keeps everything meanwhile.
//! Commits are idempotent (rows are unique by request id), so a batch shipped again after a
//! crash changes nothing. This module never drops an entry unless the spool is full, and then
//! it says so in the error the writer counts; it never lets a request wait on the database.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use tokio_postgres::Client;

use super::Settings;
use super::pg;
use super::spool::Spool;
use crate::meter::ledger::{Record, Sent};

/// Longest wait for the database on one batch before the shipper calls the store degraded.
pub const STATEMENT_WAIT: Duration = Duration::from_secs(3);
/// Most bytes the spool holds unshipped (about a million rows); past it an append fails and
/// the writer counts the rows as lost.
pub const DEFAULT_SPOOL_MAX: u64 = 1 << 30;
/// Most entries in one transaction of the shipper.
pub const SHIP_BATCH: usize = 2_000;
/// Most bytes of the spool the shipper reads (and holds in memory) at a time.
const READ_MAX: u64 = 4 << 20;
/// How long the shipper waits before trying again after the database failed a batch.
const BACKOFF: Duration = Duration::from_secs(1);
/// Shortest time between two shipments to PostgreSQL. The rows are already safe in the
/// spool; what this delays is only when the other replicas see them, and their spend poll
/// (twice a second) is slower. A transaction per request would cost the database about ten times the CPU of
/// the request itself at 1,000 req/s, and that CPU is the answers' latency on a shared machine.
pub const SHIP_INTERVAL: Duration = Duration::from_millis(100);

/// One entry of a batch, as the writer hands it over and as the spool keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Entry {
    Row(Record),
    Mark(Sent),
}

/// What `/healthz` and `/metrics` say about the store.
#[derive(Debug, Default)]
pub struct Health {
    /// The last batch the shipper tried could not reach the database (it waits in the spool).
    pub degraded: AtomicBool,
    /// Bytes in the spool not yet in the database.
    pub spool_bytes: AtomicU64,
}

/// Where the shipper commits what the spool holds.
pub trait Target: Send + 'static {
    /// Commits `entries` in one transaction: markers first, then rows, then the markers those
    /// rows replace. Must be idempotent: after a crash a batch may come again.
    fn commit(&mut self, entries: &[&Entry]) -> anyhow::Result<()>;
    /// The store, for logs (no secret in it).
    fn name(&self) -> String;
}

/// The writer's side: the spool it commits to, and the shipper it wakes.
pub struct SpoolSink {
    spool: Arc<Mutex<Spool>>,
    health: Arc<Health>,
    wake: Option<SyncSender<()>>,
    /// Ends the shipper's wait for the interval: ship now (a flush, the close).
    now: SyncSender<()>,
    shipper: Option<JoinHandle<()>>,
}

/// The PostgreSQL store as the shipper's target: a runtime and a connection of its own.
pub struct PgTarget {
    rt: tokio::runtime::Runtime,
    settings: Settings,
    dir: PathBuf,
    client: Option<Client>,
    replica: String,
}

impl PgTarget {
    /// The target; connects on its first commit.
    pub fn new(settings: Settings, dir: &Path, replica: String) -> anyhow::Result<PgTarget> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("the store writer's runtime")?;
        Ok(PgTarget {
            rt,
            settings,
            dir: dir.to_path_buf(),
            client: None,
            replica,
        })
    }
}

impl SpoolSink {
    /// Opens the spool (`sync`: each append synced to disk, for `ledger.synchronous =
    /// "full"`), ships what a previous run left in it (if the target takes it; else the
    /// shipper keeps trying) and starts the shipper thread, which ships at most every
    /// `interval` unless asked to ship now.
    pub fn open(
        target: Box<dyn Target>,
        spool_path: &Path,
        sync: bool,
        interval: Duration,
        health: Arc<Health>,
    ) -> anyhow::Result<SpoolSink> {
        let spool = Arc::new(Mutex::new(Spool::open(
            spool_path,
            DEFAULT_SPOOL_MAX,
            sync,
        )?));
        let mut shipper = Shipper {
            target,
            spool: spool.clone(),
            health: health.clone(),
            interval,
        };
        let left = lock(&spool).len();
        health.spool_bytes.store(left, Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(spool = %spool_path.display(), bytes = left, "ledger rows wait in the spool from the last run; shipping them");
            shipper.ship();
        }
        let (wake, woken) = sync_channel(1);
        let (now, asked) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ledger-shipper".into())
            .spawn(move || shipper.run(&woken, &asked))
            .context("cannot start the ledger shipper")?;
        Ok(SpoolSink {
            spool,
            health,
            wake: Some(wake),
            now,
            shipper: Some(thread),
        })
    }

    /// A handle that tells when the spool is shipped, without the sink.
    pub fn shipped(&self) -> Shipped {
        Shipped {
            spool: self.spool.clone(),
            now: self.now.clone(),
        }
    }

    /// Appends `entries` (each serialized as an [`Entry`], which the shipper reads them back
    /// as) to the spool and wakes the shipper; an error means they are not kept.
    pub fn write<T: serde::Serialize>(&mut self, entries: &[T]) -> anyhow::Result<()> {
        let waiting = {
            let mut spool = lock(&self.spool);
            spool.append(entries)?;
            spool.len()
        };
        self.health.spool_bytes.store(waiting, Ordering::Relaxed);
        if let Some(wake) = &self.wake {
            match wake.try_send(()) {
                // Full: a wake-up is already pending, and it will see these too.
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => {
                    tracing::error!(
                        "the ledger shipper is gone; rows wait in the spool until the next start"
                    );
                }
            }
        }
        Ok(())
    }

    /// Stops the shipper after one last try to ship everything (bounded by
    /// [`STATEMENT_WAIT`] per batch); what the database did not take stays in the spool for
    /// the next start.
    pub fn close(&mut self) {
        // Full: a request to ship now is pending already; disconnected: the shipper is gone.
        let _ = self.now.try_send(());
        self.wake = None;
        if let Some(thread) = self.shipper.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SpoolSink {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whether the spool is shipped: for a flush, and for the start, which must not take a
/// marker in the spool for a call that never ended. It never keeps the shipper from stopping
/// (only the sink's wake-up sender does); every append has woken the shipper already, and a
/// wait asks it to ship now rather than at the end of its interval.
#[derive(Clone)]
pub struct Shipped {
    spool: Arc<Mutex<Spool>>,
    now: SyncSender<()>,
}

impl Shipped {
    /// Whether entries wait in the spool for the database.
    pub fn pending(&self) -> bool {
        !lock(&self.spool).is_empty()
    }

    /// Asks the shipper to ship now and waits until the spool is empty, `wait` at most; true
    /// if it is.
    pub fn wait(&self, wait: Duration) -> bool {
        let until = std::time::Instant::now() + wait;
        if self.pending() {
            // Full: asked already; disconnected: the shipper is gone, and the wait says so.
            let _ = self.now.try_send(());
        }
        while self.pending() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

fn lock(spool: &Mutex<Spool>) -> MutexGuard<'_, Spool> {
    spool
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The shipper thread: its target, and the spool it empties.
struct Shipper {
    target: Box<dyn Target>,
    spool: Arc<Mutex<Spool>>,
    health: Arc<Health>,
    /// Shortest time between two shipments, unless asked to ship now.
    interval: Duration,
}

impl Shipper {
    /// Ships on a wake-up, at most every `interval` (sooner when `asked` to ship now), and
    /// every [`BACKOFF`] while the database is away; at close, ships once more and returns.
    fn run(mut self, woken: &Receiver<()>, asked: &Receiver<()>) {
        let mut behind = false;
        let mut last = std::time::Instant::now();
        loop {
            let wait = if behind {
                woken.recv_timeout(BACKOFF)
            } else {
                woken.recv().map_err(|_| RecvTimeoutError::Disconnected)
            };
            if let Err(RecvTimeoutError::Disconnected) = wait {
                if !self.ship() {
                    tracing::warn!(
                        bytes = lock(&self.spool).len(),
                        "ledger rows stay in the spool until the next start: the store did not take them at close"
                    );
                }
                return;
            }
            // What comes in meanwhile goes in the same transaction, unless a flush or the
            // close wants it shipped now.
            let _ = asked.recv_timeout(self.interval.saturating_sub(last.elapsed()));
            last = std::time::Instant::now();
            behind = !self.ship();
        }
    }

    /// Ships what the spool holds now (what is appended meanwhile waits for the next
    /// shipment, or the shipper would commit each request on its own under a steady load);
    /// false if the database failed a batch.
    fn ship(&mut self) -> bool {
        loop {
            let unshipped = lock(&self.spool).unshipped();
            if unshipped.is_empty() {
                return true;
            }
            let snapshot_end = unshipped.end();
            let (entries, end) = match unshipped.read::<Entry>(READ_MAX) {
                Ok(read) => read,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot read the spool");
                    self.health.degraded.store(true, Ordering::Relaxed);
                    return false;
                }
            };
            let mut shipped = 0;
            for chunk in entries.chunks(SHIP_BATCH) {
                let batch: Vec<&Entry> = chunk.iter().map(|(e, _)| e).collect();
                if let Err(e) = self.target.commit(&batch) {
                    if !self.health.degraded.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %format!("{e:#}"), store = %self.target.name(), "the store did not take a ledger batch; rows wait in the spool");
                    } else {
                        tracing::debug!(error = %format!("{e:#}"), "the store is still away; the spool waits");
                    }
                    return false;
                }
                shipped += chunk.len();
                let to = if shipped == entries.len() {
                    end
                } else {
                    chunk[chunk.len() - 1].1
                };
                if !self.shipped_to(to) {
                    // The file was emptied or rewritten: its offsets changed; read afresh.
                    break;
                }
            }
            if entries.is_empty() {
                self.shipped_to(end);
            }
            if self.health.degraded.swap(false, Ordering::Relaxed) {
                tracing::info!("the store takes ledger rows again; the spool is shipped");
            }
            if shipped == entries.len() && end >= snapshot_end {
                return true;
            }
        }
    }

    /// Records that the spool is shipped up to `offset`; false if that changed its offsets.
    fn shipped_to(&self, offset: u64) -> bool {
        let mut spool = lock(&self.spool);
        let same = match spool.shipped_to(offset) {
            Ok(changed) => !changed,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), spool = %spool.path().display(), "cannot cut the shipped entries off the spool; they will be shipped again");
                true
            }
        };
        self.health
            .spool_bytes
            .store(spool.len(), Ordering::Relaxed);
        same
    }
}

impl Target for PgTarget {
    fn name(&self) -> String {
        self.settings.redacted_url()
    }

    fn commit(&mut self, entries: &[&Entry]) -> anyhow::Result<()> {
        let rows: Vec<&Record> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Row(r) => Some(r),
                Entry::Mark(_) => None,
            })
            .collect();
        // A marker whose row is in the same batch would be inserted and deleted in one
        // transaction: leave it out (the row's own delete still runs, for a marker an earlier
        // run shipped).
        let ended: std::collections::HashSet<&str> =
            rows.iter().map(|r| r.request_id.as_str()).collect();
        let marks: Vec<&Sent> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Mark(m) if !ended.contains(m.request_id.as_str()) => Some(m),
                _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A target that keeps the request ids of what it was given.
    struct Kept(Arc<Mutex<Vec<String>>>);

    impl Target for Kept {
        fn commit(&mut self, entries: &[&Entry]) -> anyhow::Result<()> {
            let mut kept = self.0.lock().unwrap();
            for e in entries {
                kept.push(match e {
                    Entry::Row(r) => r.request_id.clone(),
                    Entry::Mark(m) => m.request_id.clone(),
                });
            }
            Ok(())
        }

        fn name(&self) -> String {
            "kept".into()
        }
    }

    fn mark(id: &str) -> Entry {
        Entry::Mark(Sent {
            ts_ms: 1_000,
            request_id: id.into(),
            user: "alice".into(),
            front: None,
            project: None,
            session: None,
            operation: "Converse".into(),
            model: None,
            base_model: None,
            profile_arn: None,
            admitted: true,
        })
    }

    /// A sink whose shipper would wait a minute between shipments.
    fn slow_sink(dir: &Path) -> (SpoolSink, Arc<Mutex<Vec<String>>>) {
        let kept = Arc::new(Mutex::new(Vec::new()));
        let sink = SpoolSink::open(
            Box::new(Kept(kept.clone())),
            &dir.join("spool"),
            false,
            Duration::from_secs(60),
            Arc::default(),
        )
        .unwrap();
        (sink, kept)
    }

    #[test]
    fn entries_wait_for_the_interval_and_a_flush_ships_them_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, kept) = slow_sink(dir.path());
        sink.write(&[mark("r1"), mark("r2")]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            kept.lock().unwrap().is_empty(),
            "shipped before its interval"
        );
        let shipped = sink.shipped();
        // Within 10 s, against the shipper's minute: the wait returns false past it.
        assert!(
            shipped.wait(Duration::from_secs(10)),
            "a flush did not ship"
        );
        assert_eq!(*kept.lock().unwrap(), ["r1", "r2"]);
        assert!(!shipped.pending());
    }

    #[test]
    fn the_close_ships_at_once_and_leaves_the_spool_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, kept) = slow_sink(dir.path());
        sink.write(&[mark("r1")]).unwrap();
        let closing = std::time::Instant::now();
        sink.close();
        assert!(
            closing.elapsed() < Duration::from_secs(10),
            "the close waited out the interval"
        );
        assert_eq!(*kept.lock().unwrap(), ["r1"]);
        assert_eq!(
            std::fs::metadata(dir.path().join("spool")).unwrap().len(),
            0
        );
    }
}
