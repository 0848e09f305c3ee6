//! The spool: a bounded append-only file per replica, the commit point of the ledger when it
//! lives in PostgreSQL. The writer appends each batch here before the answers it holds may
//! end; the shipper reads what is not yet in the database from here, in order, and
//! marks it shipped once the database has committed it.
//!
//! Each entry is one JSON line. An append is in the OS's hands when it returns, so it survives
//! a crash or `kill -9` of the process, as a SQLite commit with `ledger.synchronous = "normal"`
//! does; with `sync` (`"full"`) it is also synced to disk first, and survives a power loss.
//! What is shipped is an
//! offset, kept in memory only: after a crash everything still in the file is shipped again,
//! which is safe because the database's inserts are idempotent (a row carries its request id).
//! The file is emptied when all of it is shipped, and rewritten with only its unshipped tail
//! (a new file renamed over it) when the shipped head grows past [`COMPACT_AT`], so under a
//! steady load that never lets the shipper catch up it still stays small. A line torn by a
//! crash in the middle of an append is the last one, and is cut off at open. This module never
//! drops an entry silently: past `max_bytes` of unshipped entries an append fails and the
//! caller counts the loss.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Shipped bytes at the head of the file past which it is rewritten with its tail only.
pub const COMPACT_AT: u64 = 8 << 20;

/// The spool file, how much of it is shipped and how full it may get.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: Arc<File>,
    /// Length of the file: every appended line, shipped or not.
    bytes: u64,
    /// Offset up to which the entries are in the database.
    shipped: u64,
    max_bytes: u64,
    /// Sync each append to disk before it returns.
    sync: bool,
}

/// A snapshot of the unshipped part of the spool, read without holding the spool.
#[derive(Debug)]
pub struct Unshipped {
    file: Arc<File>,
    from: u64,
    to: u64,
}

impl Spool {
    /// Opens (or creates) the spool at `path`, keeping what a previous run left in it (all of
    /// it unshipped: this run cannot know what the last one shipped). `sync`: see [`Spool::append`].
    pub fn open(path: &Path, max_bytes: u64, sync: bool) -> anyhow::Result<Spool> {
        let _ = std::fs::remove_file(tmp_path(path));
        let file = open_append(path)?;
        // A crash in the middle of an append leaves a torn last line; cut it off, or the next
        // append would glue itself to it.
        let content = std::fs::read(path)?;
        let whole = content
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        if whole < content.len() {
            tracing::warn!(spool = %path.display(), bytes = content.len() - whole, "cutting a spool line torn by a crash");
            file.set_len(whole as u64)?;
            file.sync_all()?;
        }
        Ok(Spool {
            path: path.to_path_buf(),
            file: Arc::new(file),
            bytes: whole as u64,
            shipped: 0,
            max_bytes,
            sync,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes waiting to be shipped.
    pub fn len(&self) -> u64 {
        self.bytes - self.shipped
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `items`, one line each, synced to disk if the spool was opened with `sync`; all
    /// or none (a spool whose unshipped entries would pass its bound takes nothing).
    pub fn append<T: Serialize>(&mut self, items: &[T]) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        for item in items {
            serde_json::to_writer(&mut buf, item)?;
            buf.push(b'\n');
        }
        if self.len() + buf.len() as u64 > self.max_bytes {
            anyhow::bail!(
                "the spool {} is full ({} bytes)",
                self.path.display(),
                self.max_bytes
            );
        }
        let mut file: &File = &self.file;
        let sync = self.sync;
        if let Err(e) = file
            .write_all(&buf)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
        {
            // Take back a partial write, so the spool stays whole lines.
            let _ = self.file.set_len(self.bytes);
            return Err(e.into());
        }
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// What is not shipped yet, to read with [`Unshipped::read`] while appends go on.
    pub fn unshipped(&self) -> Unshipped {
        Unshipped {
            file: self.file.clone(),
            from: self.shipped,
            to: self.bytes,
        }
    }

    /// Marks everything before `offset` (an end offset [`Unshipped::read`] gave) as in the
    /// database: empties the file when that is all of it, rewrites it with its tail when the
    /// shipped head is past [`COMPACT_AT`]. Offsets from an earlier snapshot are void after
    /// either; take a new snapshot.
    /// Returns whether it did either.
    pub fn shipped_to(&mut self, offset: u64) -> anyhow::Result<bool> {
        self.shipped = offset.clamp(self.shipped, self.bytes);
        if self.shipped == self.bytes {
            // No sync: if the emptying is lost in a crash, the entries are shipped again, and
            // the next synced append makes the new length durable anyway.
            self.file.set_len(0)?;
            self.bytes = 0;
            self.shipped = 0;
            Ok(true)
        } else if self.shipped >= COMPACT_AT {
            self.compact()?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Rewrites the file with its unshipped tail only: a new file, synced, renamed over it.
    fn compact(&mut self) -> anyhow::Result<()> {
        let mut tail = vec![0; usize::try_from(self.bytes - self.shipped)?];
        self.file.read_exact_at(&mut tail, self.shipped)?;
        let tmp = tmp_path(&self.path);
        {
            let mut f = File::create(&tmp)
                .with_context(|| format!("cannot write the spool {}", tmp.display()))?;
            f.write_all(&tail)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = Arc::new(open_append(&self.path)?);
        self.bytes = tail.len() as u64;
        self.shipped = 0;
        Ok(())
    }
}

impl Unshipped {
    /// Whether there is nothing to ship.
    pub fn is_empty(&self) -> bool {
        self.from >= self.to
    }

    /// Where the snapshot ends: the spool's length when it was taken.
    pub fn end(&self) -> u64 {
        self.to
    }

    /// Up to about `max` bytes of the unshipped entries (at least one), in order, each with
    /// the offset where it ends, and the offset where what was read ends. A line that is not
    /// an entry (the file was edited by hand) is skipped and logged as an error, so it cannot
    /// hold back the ones after it.
    pub fn read<T: DeserializeOwned>(&self, max: u64) -> anyhow::Result<(Vec<(T, u64)>, u64)> {
        let all = self.to - self.from;
        let mut len = all.min(max.max(1));
        let buf = loop {
            let mut buf = vec![0; usize::try_from(len)?];
            self.file.read_exact_at(&mut buf, self.from)?;
            if len == all || buf.contains(&b'\n') {
                break buf;
            }
            // The first line is longer than that: read more until it ends.
            len = all.min(len.saturating_mul(2));
        };
        let mut out = Vec::new();
        let mut at = self.from;
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if line.last() != Some(&b'\n') {
                break;
            }
            at += line.len() as u64;
            match serde_json::from_slice(&line[..line.len() - 1]) {
                Ok(item) => out.push((item, at)),
                Err(e) => {
                    tracing::error!(error = %e, end = at, "skipping a spool line that is not a ledger entry");
                }
            }
        }
        Ok((out, at))
    }
}

fn open_append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the spool {}", path.display()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct E {
        id: String,
        n: u64,
    }

    fn e(id: &str, n: u64) -> E {
        E { id: id.into(), n }
    }

    fn unshipped(s: &Spool) -> Vec<E> {
        s.unshipped()
            .read::<E>(u64::MAX)
            .unwrap()
            .0
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    #[test]
    fn entries_come_back_in_order_after_a_reopen_and_shipping_all_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, 1 << 20, true).unwrap();
        assert!(s.is_empty() && s.unshipped().is_empty());
        s.append(&[e("a", 1), e("b", 2)]).unwrap();
        s.append(&[e("c", 3)]).unwrap();
        drop(s);
        let mut s = Spool::open(&path, 1 << 20, true).unwrap();
        assert!(!s.is_empty());
        assert_eq!(unshipped(&s), [e("a", 1), e("b", 2), e("c", 3)]);
        // Shipping part of it keeps the rest; an append while shipping comes after it.
        let snap = s.unshipped();
        let (first, _) = snap.read::<E>(1).unwrap();
        assert_eq!(first.len(), 1, "at least one entry, even past `max`");
        s.append(&[e("d", 4)]).unwrap();
        assert!(!s.shipped_to(first[0].1).unwrap());
        assert_eq!(unshipped(&s), [e("b", 2), e("c", 3), e("d", 4)]);
        let (rest, end) = s.unshipped().read::<E>(u64::MAX).unwrap();
        assert_eq!(rest.last().unwrap().1, end);
        assert!(s.shipped_to(end).unwrap());
        assert!(s.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        s.append(&[e("e", 5)]).unwrap();
        assert_eq!(unshipped(&s), [e("e", 5)]);
        drop(s);
        // Only the append after the emptying is there after a reopen.
        let s = Spool::open(&path, 1 << 20, true).unwrap();
        assert_eq!(unshipped(&s), [e("e", 5)]);
    }

    #[test]
    fn a_shipped_head_past_the_threshold_is_cut_off_and_the_tail_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, 1 << 30, true).unwrap();
        let big = "x".repeat(1 << 16);
        let mut n = 0;
        while s.len() <= COMPACT_AT + (1 << 18) {
            s.append(&[e(&big, n)]).unwrap();
            n += 1;
        }
        let (entries, _) = s.unshipped().read::<E>(u64::MAX).unwrap();
        let keep = 3;
        let cut = entries[entries.len() - keep - 1].1;
        assert!(cut >= COMPACT_AT);
        assert!(s.shipped_to(cut).unwrap(), "compacted");
        let on_disk = std::fs::metadata(&path).unwrap().len();
        assert_eq!(on_disk, s.len());
        assert!(on_disk < 4 * (1 << 16), "{on_disk}");
        s.append(&[e("after", 0)]).unwrap();
        drop(s);
        let s = Spool::open(&path, 1 << 30, true).unwrap();
        let got: Vec<u64> = unshipped(&s).iter().map(|e| e.n).collect();
        assert_eq!(got, [n - 3, n - 2, n - 1, 0]);
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn a_torn_last_line_is_cut_a_bad_line_is_skipped_and_a_full_spool_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, 64, true).unwrap();
        s.append(&[e("a", 1)]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"id":"b","#)
            .unwrap();
        let mut s = Spool::open(&path, 64, true).unwrap();
        assert_eq!(unshipped(&s), [e("a", 1)]);
        // The torn line is gone, so a new entry is a line of its own.
        s.append(&[e("c", 3)]).unwrap();
        assert_eq!(unshipped(&s), [e("a", 1), e("c", 3)]);
        let before = s.len();
        let err = s.append(&[e("x".repeat(80).as_str(), 1)]).unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert_eq!(s.len(), before);
        drop(s);
        // A line that is not an entry is skipped, and the offset still passes it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"not json\n")
            .unwrap();
        let s = Spool::open(&path, 64, true).unwrap();
        let (got, end) = s.unshipped().read::<E>(u64::MAX).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(end, std::fs::metadata(&path).unwrap().len());
    }
}
