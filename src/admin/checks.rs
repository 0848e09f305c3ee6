//! The last result of each admin check, `profiles verify` and `reconcile`, kept in the ledger's
//! store (a `checks` table in the SQLite file, or in PostgreSQL) so the dashboard's profiles
//! page can show when each ran and what it found. One line per check, replaced by each run.
//!
//! Recording is best effort: a check's own answer (its table and exit status) never depends
//! on it, and a failure to record is printed as a warning. This module never records a
//! secret; the results are the checks' own JSON.

use std::path::Path;

use serde::Serialize;

use crate::config::Config;

/// `checks.kind` of `profiles verify`.
pub const VERIFY: &str = "profiles verify";
/// `checks.kind` of `reconcile`.
pub const RECONCILE: &str = "reconcile";

/// The SQLite side's table (PostgreSQL's is migration 5).
pub const SQLITE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS checks (
    kind   TEXT PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    ok     INTEGER NOT NULL,
    result TEXT NOT NULL
)";

/// A recorded check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub kind: String,
    pub at_ms: i64,
    pub ok: bool,
    pub result: serde_json::Value,
}

/// Records `result` as the last run of `kind`; says on stderr when it cannot.
pub async fn record(config: &Config, path: &Path, kind: &str, ok: bool, result: &impl Serialize) {
    if let Err(e) = try_record(config, path, kind, ok, result).await {
        eprintln!("note: the dashboard will not show this {kind}: {e:#}");
    }
}

async fn try_record(
    config: &Config,
    path: &Path,
    kind: &str,
    ok: bool,
    result: &impl Serialize,
) -> anyhow::Result<()> {
    let text = serde_json::to_string(result)?;
    let at = chrono::Utc::now().timestamp_millis();
    match &config.store {
        Some(store) => {
            let mut client = crate::store::pg::connect(store, &crate::config::dir_of(path)).await?;
            crate::store::pg::migrate(&mut client).await?;
            client
                .execute(
                    "INSERT INTO checks (kind, at_ms, ok, result) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (kind) DO UPDATE
                     SET at_ms = excluded.at_ms, ok = excluded.ok, result = excluded.result",
                    &[&kind, &at, &ok, &text],
                )
                .await?;
        }
        None => {
            let db = config.ledger.resolve(path);
            if !db.exists() {
                anyhow::bail!(
                    "there is no ledger at {} yet (start `serve` once)",
                    db.display()
                );
            }
            let kind = kind.to_string();
            tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let conn = rusqlite::Connection::open(&db)?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                conn.execute_batch(SQLITE_SCHEMA)?;
                conn.execute(
                    "INSERT INTO checks (kind, at_ms, ok, result) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (kind) DO UPDATE
                     SET at_ms = excluded.at_ms, ok = excluded.ok, result = excluded.result",
                    rusqlite::params![kind, at, ok, text],
                )?;
                Ok(())
            })
            .await??;
        }
    }
    Ok(())
}
