//! Sign-in sessions in PostgreSQL: the same rows and rules as the SQLite tables of
//! [`crate::signin::sessions`], in the database every replica shares, so a session issued on one
//! replica works on all and a revocation on one is seen by all within a poll.
//!
//! Every change bumps `session_changes.generation` in the same transaction; replicas poll it
//! and reload their in-memory copy. This module only runs the SQL: tokens arrive here already
//! hashed, and it never logs a hash, a token or the IdP's refresh token.

use tokio_postgres::{Client, GenericClient};

use crate::signin::sessions::{Listed, Refreshable, Session};

/// The columns a [`Session`] is read from, in this order.
const SESSION_COLUMNS: &str = r#"id, "user", subject, email, groups, expires_ms"#;

fn session_at(r: &tokio_postgres::Row, at: usize) -> Result<Session, tokio_postgres::Error> {
    Ok(Session {
        id: r.try_get(at)?,
        user: r.try_get(at + 1)?,
        subject: r.try_get(at + 2)?,
        email: r.try_get(at + 3)?,
        groups: serde_json::from_str(&r.try_get::<_, String>(at + 4)?).unwrap_or_default(),
        expires_ms: r.try_get(at + 5)?,
    })
}

async fn bump(client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE session_changes SET generation = generation + 1 WHERE id = 1",
            &[],
        )
        .await
        .map(|_| ())
}

/// The change counter replicas poll.
pub async fn generation(client: &Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT generation FROM session_changes WHERE id = 1", &[])
        .await?
        .try_get(0)?)
}

/// Live bearers (access hash, session) not revoked and not expired for more than a day.
pub async fn live(client: &Client, now_ms: i64) -> anyhow::Result<Vec<(String, Session)>> {
    let rows = client
        .query(
            &format!(
                "SELECT access_hash, {SESSION_COLUMNS} FROM sessions
                 WHERE revoked_ms IS NULL AND expires_ms > $1::BIGINT - 86400000"
            ),
            &[&now_ms],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, session_at(r, 1)?)))
        .collect()
}

/// The live session of one bearer, when a replica meets one issued elsewhere since its last
/// poll.
pub async fn by_access(client: &Client, access_hash: &str) -> anyhow::Result<Option<Session>> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE access_hash = $1 AND revoked_ms IS NULL"
            ),
            &[&access_hash],
        )
        .await?;
    Ok(row.map(|r| session_at(&r, 0)).transpose()?)
}

/// What a new session's row holds.
pub struct NewSession<'a> {
    pub access_hash: &'a str,
    pub refresh_hash: Option<&'a str>,
    pub user: &'a str,
    pub subject: &'a str,
    pub email: Option<&'a str>,
    pub groups: &'a str,
    pub idp_refresh: Option<&'a str>,
    pub surface: Option<&'a str>,
    pub now_ms: i64,
    pub expires_ms: i64,
    pub refresh_expires_ms: Option<i64>,
}

impl<'a> NewSession<'a> {
    /// The row for `grant` with these token hashes, groups (JSON) and times
    /// (now, bearer expiry, refresh expiry).
    pub fn of(
        grant: &'a crate::signin::sessions::Grant,
        (access_hash, refresh_hash): (&'a str, Option<&'a str>),
        groups: &'a str,
        (now_ms, expires_ms, refresh_expires_ms): (i64, i64, Option<i64>),
    ) -> NewSession<'a> {
        NewSession {
            access_hash,
            refresh_hash,
            user: &grant.user,
            subject: &grant.subject,
            email: grant.email.as_deref(),
            groups,
            idp_refresh: grant.idp_refresh.as_deref(),
            surface: grant.surface.as_deref(),
            now_ms,
            expires_ms,
            refresh_expires_ms,
        }
    }
}

/// Inserts a session; returns its id.
pub async fn insert(client: &mut Client, s: &NewSession<'_>) -> anyhow::Result<i64> {
    let tx = client.transaction().await?;
    let id: i64 = tx
        .query_one(
            r#"INSERT INTO sessions (access_hash, refresh_hash, "user", subject, email, groups,
                idp_refresh, surface, created_ms, refreshed_ms, expires_ms, refresh_expires_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11) RETURNING id"#,
            &[
                &s.access_hash,
                &s.refresh_hash,
                &s.user,
                &s.subject,
                &s.email,
                &s.groups,
                &s.idp_refresh,
                &s.surface,
                &s.now_ms,
                &s.expires_ms,
                &s.refresh_expires_ms,
            ],
        )
        .await?
        .try_get(0)?;
    bump(&tx).await?;
    tx.commit().await?;
    Ok(id)
}

/// The session a refresh token (hashed) belongs to, if it may still refresh.
pub async fn refreshable(
    client: &Client,
    refresh_hash: &str,
    now_ms: i64,
) -> anyhow::Result<Option<Refreshable>> {
    let row = client
        .query_opt(
            &format!(
                "SELECT {SESSION_COLUMNS}, idp_refresh, surface FROM sessions
                 WHERE refresh_hash = $1 AND revoked_ms IS NULL AND refresh_expires_ms > $2
                   AND idp_refresh IS NOT NULL"
            ),
            &[&refresh_hash, &now_ms],
        )
        .await?;
    row.map(|r| {
        Ok(Refreshable {
            session: session_at(&r, 0)?,
            idp_refresh: r.try_get(6)?,
            surface: r.try_get(7)?,
        })
    })
    .transpose()
}

/// Gives session `id` new tokens after a refresh; false when it was revoked meanwhile.
pub async fn rotate(client: &mut Client, id: i64, s: &NewSession<'_>) -> anyhow::Result<bool> {
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            r#"UPDATE sessions SET access_hash = $1, refresh_hash = $2, "user" = $3, email = $4,
                groups = $5, idp_refresh = COALESCE($6, idp_refresh), refreshed_ms = $7,
                expires_ms = $8, refresh_expires_ms = $9
             WHERE id = $10 AND revoked_ms IS NULL"#,
            &[
                &s.access_hash,
                &s.refresh_hash,
                &s.user,
                &s.email,
                &s.groups,
                &s.idp_refresh,
                &s.now_ms,
                &s.expires_ms,
                &s.refresh_expires_ms,
                &id,
            ],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    bump(&tx).await?;
    tx.commit().await?;
    Ok(true)
}

/// Ends session `id`.
pub async fn end(client: &mut Client, id: i64, now_ms: i64) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE sessions SET revoked_ms = $1, idp_refresh = NULL WHERE id = $2 AND revoked_ms IS NULL",
        &[&now_ms, &id],
    )
    .await?;
    bump(&tx).await?;
    tx.commit().await?;
    Ok(())
}

/// The live session a bearer or refresh token (hashed) belongs to.
pub async fn id_of_token(client: &Client, hash: &str) -> anyhow::Result<Option<i64>> {
    let row = client
        .query_opt(
            "SELECT id FROM sessions WHERE (access_hash = $1 OR refresh_hash = $1) AND revoked_ms IS NULL",
            &[&hash],
        )
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// Revokes every live session of `user` (all users when `None`); returns how many.
pub async fn revoke_user(
    client: &mut Client,
    user: Option<&str>,
    now_ms: i64,
) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    let n = match user {
        Some(u) => {
            tx.execute(
                r#"UPDATE sessions SET revoked_ms = $1, idp_refresh = NULL
                   WHERE "user" = $2 AND revoked_ms IS NULL"#,
                &[&now_ms, &u],
            )
            .await?
        }
        None => {
            tx.execute(
                "UPDATE sessions SET revoked_ms = $1, idp_refresh = NULL WHERE revoked_ms IS NULL",
                &[&now_ms],
            )
            .await?
        }
    };
    bump(&tx).await?;
    tx.commit().await?;
    Ok(n)
}

/// Sessions not revoked whose bearer or refresh token still works, oldest first.
pub async fn list(client: &Client, now_ms: i64) -> anyhow::Result<Vec<Listed>> {
    let rows = client
        .query(
            r#"SELECT id, "user", email, surface, created_ms, refreshed_ms, expires_ms,
                    refresh_hash IS NOT NULL AND refresh_expires_ms > $1
             FROM sessions
             WHERE revoked_ms IS NULL
               AND (expires_ms > $1 OR (refresh_hash IS NOT NULL AND refresh_expires_ms > $1))
             ORDER BY created_ms, id"#,
            &[&now_ms],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Listed {
                id: r.try_get(0)?,
                user: r.try_get(1)?,
                email: r.try_get(2)?,
                surface: r.try_get(3)?,
                created_ms: r.try_get(4)?,
                refreshed_ms: r.try_get(5)?,
                expires_ms: r.try_get(6)?,
                refreshable: r.try_get(7)?,
            })
        })
        .collect()
}

/// Deletes sessions revoked, or past both expiries, before `cutoff_ms`; returns how many.
pub async fn prune(client: &Client, cutoff_ms: i64) -> anyhow::Result<u64> {
    Ok(client
        .execute(
            "DELETE FROM sessions WHERE revoked_ms < $1
                OR greatest(expires_ms, coalesce(refresh_expires_ms, expires_ms)) < $1",
            &[&cutoff_ms],
        )
        .await?)
}
