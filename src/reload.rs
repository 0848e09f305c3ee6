//! Live reload of the config: on file change (notify) and on SIGHUP.
//!
//! A reload reads the file, parses and validates it completely, and only then swaps it in
//! whole (ArcSwap); an invalid file is logged and the running config stays. Nothing is ever
//! half-applied, and requests in flight keep the snapshot they started with. `listen` and
//! `timeouts.connect_secs` are read at start only; a change to them is logged as needing a
//! restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{Config, ConfigError};
use crate::state::{AppState, Live};

/// Editors and `mv` produce bursts of events; one reload per burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// Reads and validates a config file, returning it with the SHA-256 of its bytes.
pub fn read_config(path: &Path) -> Result<(Config, String), ConfigError> {
    Config::load_hashed(path)
}

/// What a reload attempt did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file's bytes are what is already live.
    Unchanged,
    /// Swapped in as this generation.
    Reloaded(u64),
}

/// Reloads once: validate completely, then swap. On error the live config is untouched.
pub fn reload(state: &AppState, path: &Path) -> Result<Outcome, ConfigError> {
    let current = state.live.load();
    let (config, sha256) = read_config(path)?;
    let tls_sha = |c: &Config| c.tls.as_ref().map(|t| t.sha256.clone());
    if sha256 == current.sha256
        && tls_sha(&config) == tls_sha(&current.config)
        && config.prices_file == current.config.prices_file
    {
        return Ok(Outcome::Unchanged);
    }
    if config.users.is_empty()
        && !current.config.users.is_empty()
        && !state
            .allow_empty_reload
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        return Err(ConfigError::new(
            "(file)",
            format!(
                "has no users while {} are being served; refused, as a file an editor is still \
                 writing reads like that (serve --allow-empty-reload allows it)",
                current.config.users.len()
            ),
        ));
    }
    if config.aws.user_role_arn != current.config.aws.user_role_arn {
        tracing::warn!("`aws.user_role_arn` changed; it takes effect after a restart");
    }
    if config.tls.is_some() != current.config.tls.is_some() {
        tracing::warn!("TLS turned on or off; that takes effect after a restart");
    }
    if config.listen != current.config.listen {
        tracing::warn!(old = %current.config.listen, new = %config.listen, "`listen` changed; it takes effect after a restart");
    }
    if config.timeouts.connect != current.config.timeouts.connect {
        tracing::warn!("`timeouts.connect_secs` changed; it takes effect after a restart");
    }
    let generation = current.generation + 1;
    let users = config.users.len();
    state.live.store(Arc::new(Live {
        config,
        generation,
        sha256: sha256.clone(),
    }));
    tracing::info!(generation, users, config_sha256 = %sha256, "config reloaded");
    Ok(Outcome::Reloaded(generation))
}

fn reload_and_log(state: &AppState, path: &Path, why: &str) {
    match reload(state, path) {
        Ok(Outcome::Unchanged) => tracing::debug!(why, "config unchanged"),
        Ok(Outcome::Reloaded(_)) => {}
        Err(e) => {
            tracing::error!(why, error = %e, "config reload rejected; the running config stays")
        }
    }
}

/// Keeps the reloads going; dropping it stops them (and the watch, see [`watch_file`]).
pub struct Reloader {
    _watcher: Option<Watcher>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts reloading on SIGHUP and, with `watch`, on changes to the file (or to the prices file
/// it names, when that lives in the same directory).
pub fn spawn(state: Arc<AppState>, path: PathBuf, watch: bool) -> anyhow::Result<Reloader> {
    let (tx, mut rx) = mpsc::channel::<&'static str>(1);
    let prices = state
        .live
        .load()
        .config
        .prices_file
        .as_ref()
        .map(|(name, _)| crate::config::dir_of(&path).join(name));
    let watcher = if watch {
        Some(watch_file(&path, prices.as_deref(), tx.clone())?)
    } else {
        None
    };
    #[cfg(unix)]
    {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send("SIGHUP").await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let task = tokio::spawn(async move {
        while let Some(why) = rx.recv().await {
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            let (state, path) = (state.clone(), path.clone());
            let _ = tokio::task::spawn_blocking(move || reload_and_log(&state, &path, why)).await;
        }
    });
    Ok(Reloader {
        _watcher: watcher,
        task,
    })
}

/// Whether a change to `name` in the config's directory asks for a reload: the config file,
/// the prices file beside it, or a Kubernetes ConfigMap's `..data` symlink swap.
fn relevant(
    name: Option<&std::ffi::OsStr>,
    config: Option<&std::ffi::OsStr>,
    prices: Option<&std::ffi::OsStr>,
) -> bool {
    name.is_some_and(|n| {
        Some(n) == config || Some(n) == prices || n.to_string_lossy().starts_with("..")
    })
}

/// The names [`relevant`] looks for: the config's directory, its file name and the prices
/// file's, when that lives in the same directory.
fn watched(
    path: &Path,
    prices: Option<&Path>,
) -> (
    PathBuf,
    Option<std::ffi::OsString>,
    Option<std::ffi::OsString>,
) {
    let dir = crate::config::dir_of(path);
    let name = path.file_name().map(|n| n.to_os_string());
    let prices_name = prices
        .filter(|p| crate::config::dir_of(p) == dir)
        .and_then(|p| p.file_name().map(|n| n.to_os_string()));
    (dir, name, prices_name)
}

/// What keeps watching while it is held.
#[cfg(target_os = "linux")]
type Watcher = ();
#[cfg(not(target_os = "linux"))]
type Watcher = notify::RecommendedWatcher;

/// Watches the file's directory, so a file replaced by rename (editors, `bedrock-gate` admin
/// commands, Kubernetes ConfigMap symlink swaps) is still seen.
///
/// On Linux, with inotify and only the events that end a change: a file closed after writing,
/// created, renamed, deleted, or its attributes changed. Not every write (`IN_MODIFY`) nor every
/// open: a ledger in the same directory writes a page at a time, and each write would wake this
/// thread, several times per request. A file written in place is seen when its writer closes it.
/// The thread ends at the first change after the reloader is gone.
#[cfg(target_os = "linux")]
fn watch_file(
    path: &Path,
    prices: Option<&Path>,
    tx: mpsc::Sender<&'static str>,
) -> anyhow::Result<Watcher> {
    use inotify::{Inotify, WatchMask};
    let (dir, name, prices_name) = watched(path, prices);
    let mut inotify = Inotify::init()?;
    inotify.watches().add(
        &dir,
        WatchMask::CLOSE_WRITE
            | WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::ATTRIB,
    )?;
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                let events = match inotify.read_events_blocking(&mut buffer) {
                    Ok(events) => events,
                    Err(e) => {
                        tracing::warn!(error = %e, "config watch stopped; SIGHUP still reloads");
                        return;
                    }
                };
                let changed = events
                    .into_iter()
                    .any(|e| relevant(e.name, name.as_deref(), prices_name.as_deref()));
                // A full channel already means "reload soon"; dropping this event loses nothing.
                if changed
                    && let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send("file changed")
                {
                    return;
                }
            }
        })?;
    Ok(())
}

/// Watches the file's directory (see the Linux version) with the platform's watcher.
#[cfg(not(target_os = "linux"))]
fn watch_file(
    path: &Path,
    prices: Option<&Path>,
    tx: mpsc::Sender<&'static str>,
) -> anyhow::Result<Watcher> {
    use notify::Watcher as _;
    let (dir, name, prices_name) = watched(path, prices);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event
            .paths
            .iter()
            .any(|p| relevant(p.file_name(), name.as_deref(), prices_name.as_deref()))
        {
            // A full channel already means "reload soon"; dropping this event loses nothing.
            let _ = tx.try_send("file changed");
        }
    })?;
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
