//! Log output for `serve`: tracing lines to stderr through a shared buffer.
//!
//! A direct `write(2)` per line on a tokio worker costs a syscall per request and stalls that
//! worker whenever the reader of stderr (a pipe, journald, a container runtime) is slow. Lines
//! are appended to one buffer instead; a background thread writes it out every
//! [`FLUSH_EVERY`], a full buffer is written at once, and WARN and ERROR lines are written
//! immediately. [`flush`] runs at exit and from the panic hook, so only a `kill -9` can lose
//! the last few milliseconds of INFO lines (the ledger holds every request either way).

use std::io::{BufWriter, Stderr, Write};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::LogFormat;

/// Longest time an INFO line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
const BUFFER_BYTES: usize = 64 * 1024;

type Shared = Arc<Mutex<BufWriter<Stderr>>>;

static BUFFER: OnceLock<Shared> = OnceLock::new();

/// Installs the global subscriber (`RUST_LOG`, default `info`) writing through the buffer,
/// and starts the flusher thread.
pub fn init(format: LogFormat, ansi: bool) {
    let shared = BUFFER
        .get_or_init(|| {
            Arc::new(Mutex::new(BufWriter::with_capacity(
                BUFFER_BYTES,
                std::io::stderr(),
            )))
        })
        .clone();
    let flusher = shared.clone();
    let _ = std::thread::Builder::new()
        .name("log-flusher".into())
        .spawn(move || {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                if let Ok(mut w) = flusher.lock() {
                    let _ = w.flush();
                }
            }
        });
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        flush();
        default_hook(info);
    }));
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(Buffered(shared));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Writes out whatever is buffered.
pub fn flush() {
    if let Some(shared) = BUFFER.get()
        && let Ok(mut w) = shared.lock()
    {
        let _ = w.flush();
    }
}

struct Buffered(Shared);

/// One log line's access to the buffer; writes it out on drop when `urgent`.
pub struct LineWriter<'a> {
    guard: Option<MutexGuard<'a, BufWriter<Stderr>>>,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.guard.as_mut() {
            Some(w) => w.write(buf),
            // A poisoned lock (a panic mid-write): fall back to plain stderr.
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.guard.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if self.urgent
            && let Some(w) = self.guard.as_mut()
        {
            let _ = w.flush();
        }
    }
}

impl<'a> MakeWriter<'a> for Buffered {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            guard: self.0.lock().ok(),
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> LineWriter<'a> {
        LineWriter {
            guard: self.0.lock().ok(),
            urgent: *meta.level() <= Level::WARN,
        }
    }
}
