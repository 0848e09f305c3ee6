//! The spool: a bounded append-only file per replica where ledger entries wait while the
//! database cannot take them, so an answer can still end with its row safe on disk.
//!
//! Each entry is one JSON line; an append is synced before it returns. Replay reads the
//! entries in the order they were written; the database's inserts are idempotent (a row
//! carries its request id), so a replay cut short by a crash is simply done again, and the
//! file is emptied only after everything in it is in the database. A line torn by a crash in
//! the middle of an append is the last one, and is skipped. This module never drops an entry
//! silently: past `max_bytes` an append fails and the caller counts the loss.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The spool file and how full it is.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    file: File,
    bytes: u64,
    max_bytes: u64,
}

impl Spool {
    /// Opens (or creates) the spool at `path`, keeping what a previous run left in it.
    pub fn open(path: &Path, max_bytes: u64) -> anyhow::Result<Spool> {
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the spool {}", path.display()))?;
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
        let bytes = whole as u64;
        Ok(Spool {
            path: path.to_path_buf(),
            file,
            bytes,
            max_bytes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes waiting.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Appends `items`, one line each, and syncs; all or none (a spool that would pass its
    /// bound takes nothing).
    pub fn append<T: Serialize>(&mut self, items: &[T]) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        for item in items {
            serde_json::to_writer(&mut buf, item)?;
            buf.push(b'\n');
        }
        if self.bytes + buf.len() as u64 > self.max_bytes {
            anyhow::bail!(
                "the spool {} is full ({} bytes)",
                self.path.display(),
                self.max_bytes
            );
        }
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data())
        {
            // Take back a partial write, so the spool stays whole lines.
            let _ = self.file.set_len(self.bytes);
            return Err(e.into());
        }
        self.bytes += buf.len() as u64;
        Ok(())
    }

    /// Everything waiting, in the order it was appended. A torn last line is skipped (with a
    /// warning); a bad line elsewhere is an error, since it would mean the file is not ours.
    pub fn read_all<T: DeserializeOwned>(&mut self) -> anyhow::Result<Vec<T>> {
        self.file.seek(SeekFrom::Start(0))?;
        let mut out = Vec::new();
        let mut lines = BufReader::new(&self.file).split(b'\n').peekable();
        while let Some(line) = lines.next() {
            let line = line?;
            match serde_json::from_slice(&line) {
                Ok(item) => out.push(item),
                Err(_) if lines.peek().is_none() => {
                    tracing::warn!(spool = %self.path.display(), "skipping a spool line cut short by a crash");
                }
                Err(e) => {
                    return Err(anyhow::anyhow!(
                        "the spool {} has a line that is not an entry: {e}",
                        self.path.display()
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Empties the spool once its entries are in the database.
    pub fn clear(&mut self) -> anyhow::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.bytes = 0;
        Ok(())
    }
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

    #[test]
    fn entries_come_back_in_order_after_a_reopen_and_clear_empties() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, 1 << 20).unwrap();
        assert!(s.is_empty());
        s.append(&[e("a", 1), e("b", 2)]).unwrap();
        s.append(&[e("c", 3)]).unwrap();
        drop(s);
        let mut s = Spool::open(&path, 1 << 20).unwrap();
        assert!(!s.is_empty());
        let got: Vec<E> = s.read_all().unwrap();
        assert_eq!(got, [e("a", 1), e("b", 2), e("c", 3)]);
        s.clear().unwrap();
        assert!(s.is_empty());
        assert!(s.read_all::<E>().unwrap().is_empty());
        s.append(&[e("d", 4)]).unwrap();
        assert_eq!(s.read_all::<E>().unwrap(), [e("d", 4)]);
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_a_full_spool_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool");
        let mut s = Spool::open(&path, 64).unwrap();
        s.append(&[e("a", 1)]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"id":"b","#)
            .unwrap();
        let mut s = Spool::open(&path, 64).unwrap();
        assert_eq!(s.read_all::<E>().unwrap(), [e("a", 1)]);
        // The torn line is gone, so a new entry is a line of its own.
        s.append(&[e("c", 3)]).unwrap();
        assert_eq!(s.read_all::<E>().unwrap(), [e("a", 1), e("c", 3)]);
        let before = s.len();
        let err = s.append(&[e("x".repeat(80).as_str(), 1)]).unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert_eq!(s.len(), before);
    }
}
