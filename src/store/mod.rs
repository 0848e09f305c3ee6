//! Where the ledger lives: the embedded SQLite file (one machine, the default) or a PostgreSQL
//! database that several replicas share (`[store] url`).
//!
//! This module owns the `[store]` settings and how to reach PostgreSQL: the URL, the password
//! (from `BEDROCK_GATE_STORE_PASSWORD` or `[store] password_file`, never from a log line), TLS
//! with rustls, and the versioned schema ([`pg::migrate`]). It never logs a password and never
//! prints a URL with one in it ([`Settings::redacted_url`]).

pub mod device;
pub mod pg;
pub mod sessions;
pub mod spool;
pub mod writer;

use std::path::{Path, PathBuf};

/// A connection to the store for its occasional reads and writes besides the ledger's (sign-in
/// sessions and flows, the gateway's `/usage`): made when first needed and again after it was
/// lost; callers take turns on it, each waiting a bounded time.
pub struct Lazy {
    settings: Settings,
    dir: PathBuf,
    client: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
}

impl std::fmt::Debug for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lazy")
            .field("url", &self.settings.redacted_url())
            .finish_non_exhaustive()
    }
}

/// The longest a caller of [`Lazy::get`] waits for the connection to be free.
pub const LAZY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Lazy {
    pub fn new(settings: &Settings, dir: &Path) -> Lazy {
        Lazy {
            settings: settings.clone(),
            dir: dir.to_path_buf(),
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The connection, connecting first when there is none or it was closed. Waits at most
    /// [`LAZY_WAIT`] for another caller's turn to end.
    pub async fn get(
        &self,
    ) -> anyhow::Result<tokio::sync::MappedMutexGuard<'_, tokio_postgres::Client>> {
        let mut guard = tokio::time::timeout(LAZY_WAIT, self.client.lock())
            .await
            .map_err(|_| anyhow::anyhow!("the store connection stayed busy for {LAZY_WAIT:?}"))?;
        if guard.as_ref().is_none_or(|c| c.is_closed()) {
            *guard = Some(pg::connect(&self.settings, &self.dir).await?);
        }
        tokio::sync::MutexGuard::try_map(guard, |c| c.as_mut())
            .map_err(|_| anyhow::anyhow!("the store connection is gone"))
    }
}

/// Where a password for the store may come from instead of the URL.
pub const PASSWORD_ENV: &str = "BEDROCK_GATE_STORE_PASSWORD";

/// What serving does when the store cannot be reached and the spool is all there is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnavailable {
    /// Admit calls on the last known spend plus what this replica has seen since.
    #[default]
    Open,
    /// Refuse calls until the store answers again.
    Closed,
}

/// `[store]`, validated. Absent: the embedded SQLite ledger.
#[derive(Clone)]
pub struct Settings {
    /// `postgres://user@host:port/db?sslmode=…`, as written.
    pub url: String,
    /// `password_file`, relative to the config file.
    pub password_file: Option<String>,
    /// `ca_file`: PEM roots to trust for the server's certificate, besides the webpki roots.
    pub ca_file: Option<String>,
    pub on_unavailable: OnUnavailable,
    /// `replica`: this process's name in the rows it writes; stable across restarts, so a
    /// restarted replica finds the calls it had in flight. Default: the host name and port.
    pub replica: Option<String>,
    /// `spool_path`, relative to the config file.
    pub spool_path: String,
    /// `replica_gone_secs`: how long a replica may go unseen before the others record the
    /// calls it had in flight (see [`pg::recover_stale`]).
    pub replica_gone: std::time::Duration,
}

/// `[store] replica_gone_secs` when unset: far longer than any poll gap or restart.
pub const DEFAULT_REPLICA_GONE: std::time::Duration = std::time::Duration::from_secs(900);

/// The spool file when `[store] spool_path` says nothing.
pub const DEFAULT_SPOOL: &str = "bedrock-gate.spool";

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("url", &self.redacted_url())
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("on_unavailable", &self.on_unavailable)
            .field("replica", &self.replica)
            .field("spool_path", &self.spool_path)
            .field("replica_gone", &self.replica_gone)
            .finish()
    }
}

impl Settings {
    /// Checks the URL's shape (a PostgreSQL URL the driver understands); the error never
    /// quotes it, since it may hold a password.
    pub fn new(
        url: String,
        password_file: Option<String>,
        ca_file: Option<String>,
        on_unavailable: OnUnavailable,
    ) -> Result<Settings, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(
                "must be a postgres:// URL (leave [store] out for the SQLite ledger)".into(),
            );
        }
        url.parse::<tokio_postgres::Config>()
            .map_err(|_| "is not a PostgreSQL URL the driver can read (postgres://user@host:port/database?sslmode=…)".to_string())?;
        Ok(Settings {
            url,
            password_file,
            ca_file,
            on_unavailable,
            replica: None,
            spool_path: DEFAULT_SPOOL.to_string(),
            replica_gone: DEFAULT_REPLICA_GONE,
        })
    }

    /// This replica's name: `replica`, else `HOST:PORT` of the main listener as bound (a `:0` in
    /// `listen` names the port the system chose).
    pub fn replica_name(&self, listen: std::net::SocketAddr) -> String {
        self.replica.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "bedrock-gate".to_string());
            format!("{host}:{}", listen.port())
        })
    }

    /// The URL with any password replaced by `*****`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// The driver's connection settings, with the password from the environment or the
    /// password file (relative to `dir`) when the URL has none.
    pub fn connect_config(&self, dir: &Path) -> anyhow::Result<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|_| anyhow::anyhow!("store.url is not a PostgreSQL URL"))?;
        if config.get_password().is_none() {
            if let Ok(pw) = std::env::var(PASSWORD_ENV) {
                config.password(pw);
            } else if let Some(file) = &self.password_file {
                let path = dir.join(file);
                let pw = std::fs::read_to_string(&path).map_err(|e| {
                    anyhow::anyhow!("store.password_file: cannot read {}: {e}", path.display())
                })?;
                config.password(pw.trim_end_matches(['\r', '\n']));
            }
        }
        if config.get_application_name().is_none() {
            config.application_name("bedrock-gate");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        // A connection whose server vanished (a failover, a cut network) fails in seconds
        // instead of after the kernel's retransmits (~15 min): every wait on the store is
        // bounded.
        config.keepalives(true);
        config.keepalives_idle(std::time::Duration::from_secs(5));
        config.tcp_user_timeout(std::time::Duration::from_secs(5));
        Ok(config)
    }

    /// The ca_file's path, relative to `dir`.
    pub fn ca_path(&self, dir: &Path) -> Option<PathBuf> {
        self.ca_file.as_ref().map(|f| dir.join(f))
    }
}

/// `scheme://user:password@host…` → `scheme://user:*****@host…`; also a `password=` query
/// parameter. The user part ends at the first `@`, as the driver reads it (a password may
/// hold `/` or `?`), so a password never survives whatever it contains.
fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        if let Some(at) = out[rest_start..].find('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest_start + colon + 1..rest_start + at, "*****");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=*****"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show_in_a_redacted_url() {
        assert_eq!(
            redact("postgres://gate:s3cret@db:5432/gate?sslmode=require"),
            "postgres://gate:*****@db:5432/gate?sslmode=require"
        );
        assert_eq!(
            redact("postgres://gate@db/gate?password=s3cret&sslmode=disable"),
            "postgres://gate@db/gate?password=*****&sslmode=disable"
        );
        assert_eq!(redact("postgres://db/gate"), "postgres://db/gate");
        // Found in review: a password with `/` or `?` (base64 often has them).
        assert_eq!(
            redact("postgres://gate:ab/cd?e+f==@db:5432/gate"),
            "postgres://gate:*****@db:5432/gate"
        );
        let s = Settings::new(
            "postgres://gate:s3cret@db/gate".into(),
            None,
            None,
            OnUnavailable::Open,
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("s3cret"));
    }

    #[test]
    fn only_postgres_urls_are_stores() {
        for bad in ["mysql://db/x", "db.internal:5432", ""] {
            let e = Settings::new(bad.into(), None, None, OnUnavailable::Open).unwrap_err();
            assert!(e.contains("postgres://"), "{e}");
        }
    }
}
