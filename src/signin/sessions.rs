//! Bearer sessions of signed-in users: issued, looked up, refreshed, revoked, listed.
//!
//! Stored in the ledger's SQLite file (table `sessions`), or with `[store] url` in the
//! PostgreSQL database every replica shares ([`crate::store::sessions`] runs that SQL), so they
//! survive a restart and work on every replica; a copy of the live ones is kept in memory for
//! the request path. Tokens exist in clear only in the answer that hands them out: the store
//! keeps SHA-256 hashes. The IdP's own refresh token is kept (it is what a refresh checks the
//! identity with); the database is the proxy's private state. Every change (here, in another
//! replica, or from `sessions revoke`) bumps `session_changes.generation`; the server polls it
//! every [`POLL_INTERVAL`] and reloads, so a revocation anywhere is refused everywhere within
//! a second. This module never logs a token and never decides who may sign in (that is
//! `signin::flow`).

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

/// Prefix of a session's bearer token; a secret scanner can recognise a leaked one.
pub const ACCESS_PREFIX: &str = "bgs_";
/// Prefix of a session's refresh token.
pub const REFRESH_PREFIX: &str = "bgr_";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sessions (
    id                  INTEGER PRIMARY KEY,
    access_hash         TEXT NOT NULL UNIQUE,
    refresh_hash        TEXT UNIQUE,
    user                TEXT NOT NULL,
    subject             TEXT NOT NULL,
    email               TEXT,
    groups              TEXT NOT NULL,
    idp_refresh         TEXT,
    surface             TEXT,
    created_ms          INTEGER NOT NULL,
    refreshed_ms        INTEGER NOT NULL,
    expires_ms          INTEGER NOT NULL,
    refresh_expires_ms  INTEGER,
    revoked_ms          INTEGER
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user);
CREATE TABLE IF NOT EXISTS session_changes (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  INTEGER NOT NULL
);
INSERT OR IGNORE INTO session_changes (id, generation) VALUES (1, 0);
";

/// How often the server looks for revocations made by another process.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// SHA-256 of a token, hex: what the store keeps and compares.
fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn random_token(prefix: &str) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// A live session as the request path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: i64,
    pub user: String,
    pub subject: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    /// When the bearer stops working, Unix milliseconds.
    pub expires_ms: i64,
}

/// Who a new session is for (from a verified id_token). `Debug` leaves the IdP's refresh
/// token out.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Grant {
    pub user: String,
    pub subject: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    /// The IdP's refresh token; without one the session gets no refresh token either (the
    /// identity could not be checked again).
    pub idp_refresh: Option<String>,
    pub surface: Option<String>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("user", &self.user)
            .field("subject", &self.subject)
            .field("email", &self.email)
            .field("groups", &self.groups)
            .field("idp_refresh", &self.idp_refresh.as_ref().map(|_| "*****"))
            .field("surface", &self.surface)
            .finish()
    }
}

/// The tokens handed out once.
pub struct Issued {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in: u64,
    pub email: Option<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// A session found by its refresh token, with what a refresh needs.
#[derive(Clone)]
pub struct Refreshable {
    pub session: Session,
    pub idp_refresh: String,
    pub surface: Option<String>,
}

/// What a bearer token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Live(Arc<Session>),
    /// Known, but past its expiry.
    Expired,
    /// Never issued, revoked or signed out.
    Unknown,
}

/// One row of `sessions list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: i64,
    pub user: String,
    pub email: Option<String>,
    pub surface: Option<String>,
    pub created_ms: i64,
    pub refreshed_ms: i64,
    pub expires_ms: i64,
    pub refreshable: bool,
}

/// Opens (creating if needed) the sessions tables in the ledger file at `path`.
pub fn open_db(path: &Path) -> anyhow::Result<Connection> {
    let conn = crate::meter::ledger::open_db(path)?;
    conn.execute_batch(SCHEMA)
        .context("cannot create the sessions tables")?;
    Ok(conn)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn bump(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE session_changes SET generation = generation + 1 WHERE id = 1",
        [],
    )
    .map(|_| ())
}

/// Revokes every live session of `user` (all users when `None`); returns how many.
pub fn revoke_user(conn: &Connection, user: Option<&str>) -> anyhow::Result<usize> {
    let now = now_ms();
    let n = match user {
        Some(u) => conn.execute(
            "UPDATE sessions SET revoked_ms = ?1, idp_refresh = NULL WHERE user = ?2 AND revoked_ms IS NULL",
            params![now, u],
        )?,
        None => conn.execute(
            "UPDATE sessions SET revoked_ms = ?1, idp_refresh = NULL WHERE revoked_ms IS NULL",
            params![now],
        )?,
    };
    bump(conn)?;
    Ok(n)
}

/// Sessions not revoked whose bearer or refresh token still works, oldest first.
pub fn list(conn: &Connection) -> anyhow::Result<Vec<Listed>> {
    let now = now_ms();
    let mut stmt = conn.prepare(
        "SELECT id, user, email, surface, created_ms, refreshed_ms, expires_ms,
                refresh_hash IS NOT NULL AND refresh_expires_ms > ?1
         FROM sessions
         WHERE revoked_ms IS NULL AND (expires_ms > ?1 OR (refresh_hash IS NOT NULL AND refresh_expires_ms > ?1))
         ORDER BY created_ms, id",
    )?;
    let rows = stmt
        .query_map([now], |r| {
            Ok(Listed {
                id: r.get(0)?,
                user: r.get(1)?,
                email: r.get(2)?,
                surface: r.get(3)?,
                created_ms: r.get(4)?,
                refreshed_ms: r.get(5)?,
                expires_ms: r.get(6)?,
                refreshable: r.get(7)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn groups_of(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// The columns a [`Session`] is read from, in this order, starting at column `at`.
const SESSION_COLUMNS: &str = "id, user, subject, email, groups, expires_ms";

fn session_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Session> {
    Ok(Session {
        id: r.get(at)?,
        user: r.get(at + 1)?,
        subject: r.get(at + 2)?,
        email: r.get(at + 3)?,
        groups: groups_of(&r.get::<_, String>(at + 4)?),
        expires_ms: r.get(at + 5)?,
    })
}

/// Where the sessions live.
enum Db {
    /// The ledger's SQLite file (one replica).
    Sqlite(Mutex<Connection>),
    /// The PostgreSQL store every replica shares.
    Postgres(Box<Pg>),
}

/// The shared store, and a handle to run its calls for the blocking callers (they run off
/// the async threads).
struct Pg {
    conn: Arc<crate::store::Lazy>,
    runtime: tokio::runtime::Handle,
}

impl Pg {
    async fn client(
        &self,
    ) -> anyhow::Result<tokio::sync::MappedMutexGuard<'_, tokio_postgres::Client>> {
        self.conn.get().await
    }

    fn block<R>(&self, f: impl Future<Output = R>) -> R {
        self.runtime.block_on(f)
    }
}

/// The store the server uses: the database and the in-memory copy of live bearers.
pub struct SessionStore {
    db: Db,
    live: RwLock<HashMap<String, Arc<Session>>>,
    generation: Mutex<i64>,
    /// Bearers recently looked up in the shared store and not found there (hash → when), so
    /// a stream of bad tokens costs the database one query per token a second at most.
    missed: Mutex<HashMap<String, std::time::Instant>>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore").finish_non_exhaustive()
    }
}

/// Misses remembered at most (beyond it, unknown bearers are not looked up until they age out).
const MAX_MISSES: usize = 10_000;
/// How long a dead session's row is kept (for `sessions list` history and audits).
pub const KEEP_DEAD: Duration = Duration::from_secs(30 * 86_400);
/// The longest a request waits to look a bearer up in the shared store.
const FIND_WAIT: Duration = Duration::from_millis(300);

impl SessionStore {
    /// Sessions in the ledger's SQLite file at `path`.
    pub fn open(path: &Path) -> anyhow::Result<SessionStore> {
        let store = SessionStore::with_db(Db::Sqlite(Mutex::new(open_db(path)?)));
        store.poll()?;
        Ok(store)
    }

    /// Sessions in the shared PostgreSQL store (its schema migrated already), over `conn`.
    pub async fn open_store(conn: Arc<crate::store::Lazy>) -> anyhow::Result<SessionStore> {
        let store = SessionStore::with_db(Db::Postgres(Box::new(Pg {
            conn,
            runtime: tokio::runtime::Handle::current(),
        })));
        store
            .poll_async()
            .await
            .context("cannot read the sign-in sessions from the store")?;
        Ok(store)
    }

    fn with_db(db: Db) -> SessionStore {
        SessionStore {
            db,
            live: RwLock::new(HashMap::new()),
            generation: Mutex::new(-1),
            missed: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the sessions are shared with other replicas (a bearer unknown here may be new
    /// there: see [`SessionStore::find_new`]).
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    fn sqlite(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
        match conn.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, i64> {
        match self.generation.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn replace_live(&self, rows: Vec<(String, Session)>) {
        let map = rows.into_iter().map(|(h, s)| (h, Arc::new(s))).collect();
        *self.live.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// Reloads the live bearers when another process (or this one) changed the table.
    /// Returns whether it reloaded. Blocking: call it off the async threads.
    pub fn poll(&self) -> anyhow::Result<bool> {
        let conn = match &self.db {
            Db::Sqlite(conn) => Self::sqlite(conn),
            Db::Postgres(pg) => return pg.block(self.poll_async()),
        };
        // Twice a second on an idle proxy: the statement is prepared once.
        let generation: i64 = conn
            .prepare_cached("SELECT generation FROM session_changes WHERE id = 1")?
            .query_row([], |r| r.get(0))?;
        let mut seen = self.seen();
        if *seen == generation {
            return Ok(false);
        }
        let mut stmt = conn.prepare(&format!(
            "SELECT access_hash, {SESSION_COLUMNS} FROM sessions
             WHERE revoked_ms IS NULL AND expires_ms > ?1 - 86400000"
        ))?;
        let rows = stmt
            .query_map([now_ms()], |r| {
                Ok((r.get::<_, String>(0)?, session_at(r, 1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        self.replace_live(rows);
        *seen = generation;
        Ok(true)
    }

    /// Deletes sessions dead (revoked, or past both their bearer's and refresh token's
    /// expiry) for more than [`KEEP_DEAD`]: the table stays the size of the live ones plus a
    /// month, on either store. Blocking. Returns how many went.
    pub fn prune(&self) -> anyhow::Result<u64> {
        let cutoff = now_ms() - i64::try_from(KEEP_DEAD.as_millis()).unwrap_or(i64::MAX / 2);
        match &self.db {
            Db::Sqlite(conn) => Ok(Self::sqlite(conn).execute(
                "DELETE FROM sessions WHERE revoked_ms < ?1
                    OR max(expires_ms, coalesce(refresh_expires_ms, expires_ms)) < ?1",
                [cutoff],
            )? as u64),
            Db::Postgres(pg) => pg
                .block(async { crate::store::sessions::prune(&*pg.client().await?, cutoff).await }),
        }
    }

    async fn poll_async(&self) -> anyhow::Result<bool> {
        let Db::Postgres(pg) = &self.db else {
            return Ok(false);
        };
        let client = pg.client().await?;
        let generation = crate::store::sessions::generation(&client).await?;
        if *self.seen() == generation {
            return Ok(false);
        }
        let rows = crate::store::sessions::live(&client, now_ms()).await?;
        self.replace_live(rows);
        *self.seen() = generation;
        Ok(true)
    }

    /// What a bearer token is (the request path: memory only).
    pub fn lookup(&self, token: &str) -> Lookup {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        match live.get(&hash(token)) {
            Some(s) if s.expires_ms > now_ms() => Lookup::Live(s.clone()),
            Some(_) => Lookup::Expired,
            None => Lookup::Unknown,
        }
    }

    /// A bearer this replica does not know may have been issued by another one since the last
    /// poll (a client signs in through one replica and its next call lands on another): look
    /// it up in the shared store once and keep it. Does nothing on SQLite or for a token
    /// already looked up and missed in the last second.
    pub async fn find_new(&self, token: &str) {
        let Db::Postgres(pg) = &self.db else { return };
        let h = hash(token);
        {
            let mut missed = self.missed.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            missed.retain(|_, at| now.duration_since(*at) < Duration::from_secs(1));
            if missed.contains_key(&h) {
                return;
            }
            if missed.len() >= MAX_MISSES {
                return;
            }
            missed.insert(h.clone(), now);
        }
        let found = tokio::time::timeout(FIND_WAIT, async {
            let client = pg.client().await?;
            crate::store::sessions::by_access(&client, &h).await
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the store did not answer in {FIND_WAIT:?}")));
        match found {
            Ok(Some(session)) => {
                self.missed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&h);
                let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
                live.retain(|_, s| s.id != session.id);
                live.insert(h, Arc::new(session));
                drop(live);
                // A revocation may have been read between the query and now: reload at the
                // next poll rather than keep a session the store no longer has live.
                *self.seen() = -1;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not look a sign-in up in the store")
            }
        }
    }

    fn tokens(
        grant_has_refresh: bool,
        ttl: Duration,
    ) -> anyhow::Result<(String, Option<String>, i64)> {
        let access = random_token(ACCESS_PREFIX)?;
        let refresh = if grant_has_refresh {
            Some(random_token(REFRESH_PREFIX)?)
        } else {
            None
        };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        Ok((access, refresh, now_ms().saturating_add(ttl_ms)))
    }

    /// Starts a session for a verified identity. Blocking.
    pub fn issue(
        &self,
        grant: &Grant,
        ttl: Duration,
        refresh_ttl: Duration,
    ) -> anyhow::Result<Issued> {
        let (access, refresh, expires_ms) = Self::tokens(grant.idp_refresh.is_some(), ttl)?;
        let now = now_ms();
        let refresh_expires = refresh
            .as_ref()
            .map(|_| now + i64::try_from(refresh_ttl.as_millis()).unwrap_or(i64::MAX / 2));
        let groups = serde_json::to_string(&grant.groups)?;
        let access_hash = hash(&access);
        let refresh_hash = refresh.as_deref().map(hash);
        let id = match &self.db {
            Db::Sqlite(conn) => {
                let conn = Self::sqlite(conn);
                conn.execute(
                    "INSERT INTO sessions (access_hash, refresh_hash, user, subject, email, groups, idp_refresh,
                        surface, created_ms, refreshed_ms, expires_ms, refresh_expires_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10, ?11)",
                    params![
                        access_hash,
                        refresh_hash,
                        grant.user,
                        grant.subject,
                        grant.email,
                        groups,
                        grant.idp_refresh,
                        grant.surface,
                        now,
                        expires_ms,
                        refresh_expires,
                    ],
                )?;
                let id = conn.last_insert_rowid();
                bump(&conn)?;
                id
            }
            Db::Postgres(pg) => {
                let row = crate::store::sessions::NewSession::of(
                    grant,
                    (&access_hash, refresh_hash.as_deref()),
                    &groups,
                    (now, expires_ms, refresh_expires),
                );
                pg.block(async {
                    crate::store::sessions::insert(&mut *pg.client().await?, &row).await
                })?
            }
        };
        Ok(self.hand_out(id, access, refresh, grant, expires_ms, ttl))
    }

    /// Keeps a new bearer in memory and makes the answer that hands it out.
    fn hand_out(
        &self,
        id: i64,
        access: String,
        refresh: Option<String>,
        grant: &Grant,
        expires_ms: i64,
        ttl: Duration,
    ) -> Issued {
        self.remember(
            &access,
            Session {
                id,
                user: grant.user.clone(),
                subject: grant.subject.clone(),
                email: grant.email.clone(),
                groups: grant.groups.clone(),
                expires_ms,
            },
        );
        Issued {
            access_token: access,
            refresh_token: refresh,
            expires_in: ttl.as_secs(),
            email: grant.email.clone(),
        }
    }

    fn remember(&self, access: &str, session: Session) {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, s| s.id != session.id);
        live.insert(hash(access), Arc::new(session));
        drop(live);
        // Written after the store was: a revocation read in between must not be outlived.
        *self.seen() = -1;
    }

    fn forget(&self, id: i64) {
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        live.retain(|_, s| s.id != id);
    }

    /// The session a refresh token belongs to, if it is live and may still refresh. Blocking.
    pub fn refreshable(&self, refresh: &str) -> anyhow::Result<Option<Refreshable>> {
        let conn = match &self.db {
            Db::Sqlite(conn) => Self::sqlite(conn),
            Db::Postgres(pg) => {
                return pg.block(async {
                    let client = pg.client().await?;
                    crate::store::sessions::refreshable(&client, &hash(refresh), now_ms()).await
                });
            }
        };
        let row = conn
            .query_row(
                &format!(
                    "SELECT {SESSION_COLUMNS}, idp_refresh, surface FROM sessions
                     WHERE refresh_hash = ?1 AND revoked_ms IS NULL AND refresh_expires_ms > ?2
                       AND idp_refresh IS NOT NULL"
                ),
                params![hash(refresh), now_ms()],
                |r| {
                    Ok(Refreshable {
                        session: session_at(r, 0)?,
                        idp_refresh: r.get(6)?,
                        surface: r.get(7)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// Rotates a session after the IdP accepted the refresh: new bearer, new refresh token,
    /// the old pair dead. `grant` carries what the IdP said now. Blocking.
    pub fn rotate(
        &self,
        id: i64,
        grant: &Grant,
        ttl: Duration,
        refresh_ttl: Duration,
    ) -> anyhow::Result<Issued> {
        let (access, refresh, expires_ms) = Self::tokens(true, ttl)?;
        let now = now_ms();
        let refresh_expires = now + i64::try_from(refresh_ttl.as_millis()).unwrap_or(i64::MAX / 2);
        let groups = serde_json::to_string(&grant.groups)?;
        let access_hash = hash(&access);
        let refresh_hash = refresh.as_deref().map(hash);
        let rotated = match &self.db {
            Db::Sqlite(conn) => {
                let conn = Self::sqlite(conn);
                let n = conn.execute(
                    "UPDATE sessions SET access_hash = ?1, refresh_hash = ?2, user = ?3, email = ?4, groups = ?5,
                        idp_refresh = COALESCE(?6, idp_refresh), refreshed_ms = ?7, expires_ms = ?8,
                        refresh_expires_ms = ?9
                     WHERE id = ?10 AND revoked_ms IS NULL",
                    params![
                        access_hash,
                        refresh_hash,
                        grant.user,
                        grant.email,
                        groups,
                        grant.idp_refresh,
                        now,
                        expires_ms,
                        refresh_expires,
                        id,
                    ],
                )?;
                if n > 0 {
                    bump(&conn)?;
                }
                n > 0
            }
            Db::Postgres(pg) => {
                let row = crate::store::sessions::NewSession::of(
                    grant,
                    (&access_hash, refresh_hash.as_deref()),
                    &groups,
                    (now, expires_ms, Some(refresh_expires)),
                );
                pg.block(async {
                    crate::store::sessions::rotate(&mut *pg.client().await?, id, &row).await
                })?
            }
        };
        if !rotated {
            anyhow::bail!("the session was revoked during the refresh");
        }
        Ok(self.hand_out(id, access, refresh, grant, expires_ms, ttl))
    }

    /// Ends a session by id (the IdP refused it, or the user is gone). Blocking.
    pub fn end(&self, id: i64) -> anyhow::Result<()> {
        match &self.db {
            Db::Sqlite(conn) => {
                let conn = Self::sqlite(conn);
                conn.execute(
                    "UPDATE sessions SET revoked_ms = ?1, idp_refresh = NULL WHERE id = ?2 AND revoked_ms IS NULL",
                    params![now_ms(), id],
                )?;
                bump(&conn)?;
            }
            Db::Postgres(pg) => pg.block(async {
                crate::store::sessions::end(&mut *pg.client().await?, id, now_ms()).await
            })?,
        }
        self.forget(id);
        Ok(())
    }

    /// RFC 7009: ends the session this bearer or refresh token belongs to. Returns whether
    /// one was found. Blocking.
    pub fn revoke_token(&self, token: &str) -> anyhow::Result<bool> {
        let h = hash(token);
        let id: Option<i64> = match &self.db {
            Db::Sqlite(conn) => Self::sqlite(conn)
                .query_row(
                    "SELECT id FROM sessions WHERE (access_hash = ?1 OR refresh_hash = ?1) AND revoked_ms IS NULL",
                    [&h],
                    |r| r.get(0),
                )
                .optional()?,
            Db::Postgres(pg) => pg.block(async {
                crate::store::sessions::id_of_token(&*pg.client().await?, &h).await
            })?,
        };
        match id {
            Some(id) => {
                self.end(id)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(user: &str, refresh: bool) -> Grant {
        Grant {
            user: user.into(),
            subject: format!("sub-{user}"),
            email: Some(format!("{user}@corp.example")),
            groups: vec!["dev".into()],
            idp_refresh: refresh.then(|| "idp-rt".to_string()),
            surface: Some("claude_code".into()),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn issue_lookup_rotate_revoke_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let store = SessionStore::open(&path).unwrap();
        let issued = store.issue(&grant("alice", true), HOUR, HOUR).unwrap();
        assert!(issued.access_token.starts_with(ACCESS_PREFIX));
        let refresh = issued.refresh_token.clone().unwrap();
        let Lookup::Live(s) = store.lookup(&issued.access_token) else {
            panic!("not live")
        };
        assert_eq!(s.user, "alice");
        assert_eq!(store.lookup("bgs_nope"), Lookup::Unknown);

        // A restart sees the same session.
        drop(store);
        let store = SessionStore::open(&path).unwrap();
        assert!(matches!(
            store.lookup(&issued.access_token),
            Lookup::Live(_)
        ));

        let r = store.refreshable(&refresh).unwrap().unwrap();
        assert_eq!(r.idp_refresh, "idp-rt");
        let rotated = store
            .rotate(r.session.id, &grant("alice", false), HOUR, HOUR)
            .unwrap();
        assert_eq!(store.lookup(&issued.access_token), Lookup::Unknown);
        assert!(
            store.refreshable(&refresh).unwrap().is_none(),
            "old refresh token is dead"
        );
        assert!(matches!(
            store.lookup(&rotated.access_token),
            Lookup::Live(_)
        ));

        assert!(store.revoke_token(&rotated.access_token).unwrap());
        assert_eq!(store.lookup(&rotated.access_token), Lookup::Unknown);
        assert!(!store.revoke_token(&rotated.access_token).unwrap());
    }

    #[test]
    fn sessions_dead_for_a_month_are_pruned_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let store = SessionStore::open(&path).unwrap();
        let old = store.issue(&grant("alice", true), HOUR, HOUR).unwrap();
        let revoked = store.issue(&grant("bob", true), HOUR, HOUR).unwrap();
        let live = store.issue(&grant("carol", true), HOUR, HOUR).unwrap();
        let long_ago = now_ms() - 40 * 86_400_000;
        let other = open_db(&path).unwrap();
        other
            .execute(
                "UPDATE sessions SET expires_ms = ?1, refresh_expires_ms = ?1 WHERE access_hash = ?2",
                params![long_ago, hash(&old.access_token)],
            )
            .unwrap();
        other
            .execute(
                "UPDATE sessions SET revoked_ms = ?1 WHERE access_hash = ?2",
                params![long_ago, hash(&revoked.access_token)],
            )
            .unwrap();
        assert_eq!(store.prune().unwrap(), 2);
        let left: Vec<String> = other
            .prepare("SELECT user FROM sessions")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, ["carol"]);
        assert!(matches!(store.lookup(&live.access_token), Lookup::Live(_)));
        assert_eq!(store.prune().unwrap(), 0);
    }

    #[test]
    fn no_idp_refresh_token_means_no_refresh_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(&dir.path().join("l.db")).unwrap();
        let issued = store.issue(&grant("bob", false), HOUR, HOUR).unwrap();
        assert!(issued.refresh_token.is_none());
    }

    #[test]
    fn another_process_revoking_is_seen_on_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let store = SessionStore::open(&path).unwrap();
        let a = store.issue(&grant("alice", true), HOUR, HOUR).unwrap();
        let b = store.issue(&grant("bob", true), HOUR, HOUR).unwrap();
        let other = open_db(&path).unwrap();
        assert_eq!(list(&other).unwrap().len(), 2);
        assert_eq!(revoke_user(&other, Some("alice")).unwrap(), 1);
        assert!(store.poll().unwrap());
        assert_eq!(store.lookup(&a.access_token), Lookup::Unknown);
        assert!(matches!(store.lookup(&b.access_token), Lookup::Live(_)));
        assert_eq!(revoke_user(&other, None).unwrap(), 1);
        store.poll().unwrap();
        assert_eq!(store.lookup(&b.access_token), Lookup::Unknown);
        assert!(list(&other).unwrap().is_empty());
    }
}
