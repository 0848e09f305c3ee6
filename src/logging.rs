//! Log output for `serve`: tracing lines to stderr, written by a thread of their own.
//!
//! A request thread never writes to stderr: it appends its line to a shared buffer in memory
//! and goes on. A background thread swaps the buffer out and writes it every [`FLUSH_EVERY`],
//! or at once when a WARN or ERROR line arrives or the buffer passes [`FLUSH_AT`]. (A second:
//! at the few requests a second developers make, each wake-up of the writer costs more than
//! the lines it writes.) A reader of stderr that is slow or gone (a
//! pipe, journald, a container runtime restarting) therefore never stalls a request: the buffer
//! holds up to [`MAX_BUFFERED`] bytes, and lines beyond that are dropped and counted (the count
//! is logged once writing works again). [`flush`] runs at exit and, without waiting on a lock,
//! from the panic hook. A `kill -9` can lose the last [`FLUSH_EVERY`] of lines; the ledger keeps
//! every request either way.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::LogFormat;

/// Longest time a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Buffered bytes at which the writer is woken before [`FLUSH_EVERY`] (at thousands of
/// requests a second, a few times a second), so a busy proxy stays far from [`MAX_BUFFERED`].
pub const FLUSH_AT: usize = 256 * 1024;
/// Bytes held for a stderr that does not keep up; lines beyond are dropped and counted.
pub const MAX_BUFFERED: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    dropped_lines: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    /// The writer thread, woken early for WARN and ERROR lines.
    writer: OnceLock<Thread>,
    /// Held while writing to stderr, so an exit-time flush and the writer thread do not
    /// interleave their output.
    output: Mutex<()>,
}

static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

/// Installs the global subscriber (`RUST_LOG`, default `info`) and starts the writer thread.
pub fn init(format: LogFormat, ansi: bool) {
    let shared = SHARED
        .get_or_init(|| {
            Arc::new(Shared {
                pending: Mutex::new(Pending::default()),
                writer: OnceLock::new(),
                output: Mutex::new(()),
            })
        })
        .clone();
    let for_thread = shared.clone();
    if let Ok(handle) = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            loop {
                std::thread::park_timeout(FLUSH_EVERY);
                write_out(&for_thread, true);
            }
        })
    {
        let _ = shared.writer.set(handle.thread().clone());
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Never wait on a lock here: the panic may have happened while it was held.
        if let Some(shared) = SHARED.get() {
            write_out(shared, false);
        }
        default_hook(info);
    }));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        // A failed write must not print (and possibly panic) from inside the logger.
        .log_internal_errors(false)
        .with_writer(Buffered(shared));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Writes out whatever is buffered (at exit).
pub fn flush() {
    if let Some(shared) = SHARED.get() {
        write_out(shared, true);
    }
}

/// Takes the buffer and writes it to stderr outside the buffer's lock. With `wait` false it
/// gives up rather than block on either lock.
fn write_out(shared: &Shared, wait: bool) {
    let output = if wait {
        shared.output.lock().ok()
    } else {
        shared.output.try_lock().ok()
    };
    if output.is_none() {
        return;
    }
    let taken = {
        let pending = if wait {
            shared.pending.lock().ok()
        } else {
            shared.pending.try_lock().ok()
        };
        match pending {
            Some(mut p) if !p.bytes.is_empty() || p.dropped_lines > 0 => std::mem::take(&mut *p),
            _ => return,
        }
    };
    let mut err = std::io::stderr().lock();
    // Nowhere to report a failed write to stderr; the lines are lost either way.
    let _ = err.write_all(&taken.bytes);
    if taken.dropped_lines > 0 {
        let _ = writeln!(
            err,
            "bedrock-gate: {} log lines dropped: stderr did not keep up",
            taken.dropped_lines
        );
    }
    let _ = err.flush();
}

struct Buffered(Arc<Shared>);

/// One log line on its way into the buffer.
pub struct LineWriter<'a> {
    shared: &'a Shared,
    line: Vec<u8>,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let mut wake = self.urgent;
        if let Ok(mut p) = self.shared.pending.lock() {
            let before = p.bytes.len();
            if before + self.line.len() > MAX_BUFFERED {
                p.dropped_lines += 1;
            } else {
                p.bytes.extend_from_slice(&self.line);
                // Once, as the buffer passes the mark: the writer empties it on waking.
                wake |= before < FLUSH_AT && p.bytes.len() >= FLUSH_AT;
            }
        }
        if wake && let Some(writer) = self.shared.writer.get() {
            writer.unpark();
        }
    }
}

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            shared: &self.0,
            line: Vec::new(),
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            shared: &self.0,
            line: Vec::new(),
            urgent: *meta.level() <= Level::WARN,
        }
    }
}
