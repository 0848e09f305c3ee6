//! Device authorizations and browser sign-ins in progress, in PostgreSQL: the same state
//! machine as [`crate::signin::device`]'s memory, in the database every replica shares, so
//! behind a load balancer Claude Code may poll one replica while the browser signs in through
//! another.
//!
//! Device codes and login `state`s arrive here hashed; user codes, nonces and PKCE verifiers
//! are kept as they are (they are what the flow needs back). This module only runs the SQL
//! and never logs a code.

use tokio_postgres::Client;

use crate::signin::device::{Approval, CodeState, Login};

/// A flow's state as stored: `pending`, `signing_in`, `approved` or `denied`.
fn state_of(text: &str) -> CodeState {
    match text {
        "pending" | "signing_in" => CodeState::Open,
        _ => CodeState::Used,
    }
}

/// Deletes what has expired.
async fn prune(client: &Client, now_ms: i64) -> anyhow::Result<()> {
    client
        .execute(
            "DELETE FROM device_flows WHERE expires_ms <= $1",
            &[&now_ms],
        )
        .await?;
    client
        .execute(
            "DELETE FROM device_logins WHERE expires_ms <= $1",
            &[&now_ms],
        )
        .await?;
    Ok(())
}

/// A new flow; false when `max` are in progress already. A user code another flow holds
/// fails on the unique index: the caller draws another.
pub async fn start(
    client: &Client,
    device_hash: &str,
    user_code: &str,
    surface: Option<&str>,
    (now_ms, expires_ms, interval_ms): (i64, i64, i64),
    max: i64,
) -> anyhow::Result<Result<bool, ()>> {
    prune(client, now_ms).await?;
    let pending: i64 = client
        .query_one("SELECT count(*) FROM device_flows", &[])
        .await?
        .get(0);
    if pending >= max {
        return Ok(Ok(false));
    }
    let n = client
        .execute(
            "INSERT INTO device_flows (device_hash, user_code, expires_ms, interval_ms, state, surface)
             VALUES ($1, $2, $3, $4, 'pending', $5) ON CONFLICT DO NOTHING",
            &[&device_hash, &user_code, &expires_ms, &interval_ms, &surface],
        )
        .await?;
    Ok(if n == 1 { Ok(true) } else { Err(()) })
}

/// Whether the verification page may start a sign-in for this user code.
pub async fn code_state(
    client: &Client,
    user_code: &str,
    now_ms: i64,
) -> anyhow::Result<CodeState> {
    let row = client
        .query_opt(
            "SELECT state FROM device_flows WHERE user_code = $1 AND expires_ms > $2",
            &[&user_code, &now_ms],
        )
        .await?;
    Ok(row.map_or(CodeState::Unknown, |r| state_of(r.get(0))))
}

/// Marks the flow of `user_code` as signing in and keeps `login` under the hash of its
/// `state`, replacing an earlier login of the same code; false when the code is not open.
pub async fn begin_login(
    client: &mut Client,
    state_hash: &str,
    login: &Login,
    now_ms: i64,
    expires_ms: i64,
    max: i64,
) -> anyhow::Result<bool> {
    let tx = client.transaction().await?;
    let logins: i64 = tx
        .query_one(
            "SELECT count(*) FROM device_logins WHERE expires_ms > $1",
            &[&now_ms],
        )
        .await?
        .get(0);
    if logins >= max {
        return Ok(false);
    }
    let n = tx
        .execute(
            "UPDATE device_flows SET state = 'signing_in'
             WHERE user_code = $1 AND expires_ms > $2 AND state IN ('pending', 'signing_in')",
            &[&login.user_code, &now_ms],
        )
        .await?;
    if n == 0 {
        return Ok(false);
    }
    tx.execute(
        "DELETE FROM device_logins WHERE user_code = $1",
        &[&login.user_code],
    )
    .await?;
    tx.execute(
        "INSERT INTO device_logins (state_hash, user_code, nonce, verifier, expires_ms)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &state_hash,
            &login.user_code,
            &login.nonce,
            &login.verifier,
            &expires_ms,
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Takes the login a callback's `state` (hashed) names: single use.
pub async fn take_login(
    client: &Client,
    state_hash: &str,
    now_ms: i64,
) -> anyhow::Result<Option<(String, String, String)>> {
    let row = client
        .query_opt(
            "DELETE FROM device_logins WHERE state_hash = $1 RETURNING user_code, nonce, verifier, expires_ms",
            &[&state_hash],
        )
        .await?;
    Ok(row
        .filter(|r| r.get::<_, i64>(3) > now_ms)
        .map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// The surface the flow of a user code was started by.
pub async fn surface(client: &Client, user_code: &str) -> anyhow::Result<Option<String>> {
    Ok(client
        .query_opt(
            "SELECT surface FROM device_flows WHERE user_code = $1",
            &[&user_code],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// Ends the browser sign-in of a user code: approved (the grant as JSON) or denied.
pub async fn finish(
    client: &Client,
    user_code: &str,
    outcome: &Result<Approval, String>,
) -> anyhow::Result<()> {
    let (state, approval, denied) = match outcome {
        Ok(a) => ("approved", Some(serde_json::to_string(a)?), None),
        Err(m) => ("denied", None, Some(m.as_str())),
    };
    client
        .execute(
            "UPDATE device_flows SET state = $2, approval = $3, denied = $4 WHERE user_code = $1",
            &[&user_code, &state, &approval, &denied],
        )
        .await?;
    Ok(())
}

/// A sign-in given up before it finished: the code may be tried again.
pub async fn reopen(client: &Client, user_code: &str) -> anyhow::Result<()> {
    client
        .execute(
            "UPDATE device_flows SET state = 'pending' WHERE user_code = $1 AND state = 'signing_in'",
            &[&user_code],
        )
        .await?;
    Ok(())
}

/// What one poll of a device code (hashed) finds, as the memory state machine answers it.
pub enum Polled {
    Invalid,
    Expired,
    Pending,
    SlowDown,
    Approved(String),
    Denied(String),
}

/// RFC 8628 §3.4/3.5 in one transaction (the row locked, so two replicas polled at once
/// answer as one would): slow_down when faster than the interval (which then grows by
/// `slow_down_ms`), and an approved or denied flow answered once, then deleted.
pub async fn poll(
    client: &mut Client,
    device_hash: &str,
    now_ms: i64,
    slow_down_ms: i64,
) -> anyhow::Result<Polled> {
    let tx = client.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "SELECT expires_ms, interval_ms, last_poll_ms, state, approval, denied
             FROM device_flows WHERE device_hash = $1 FOR UPDATE",
            &[&device_hash],
        )
        .await?
    else {
        return Ok(Polled::Invalid);
    };
    let (expires, interval): (i64, i64) = (row.get(0), row.get(1));
    let last: Option<i64> = row.get(2);
    let state: String = row.get(3);
    let delete = async |tx: &tokio_postgres::Transaction<'_>| {
        tx.execute(
            "DELETE FROM device_flows WHERE device_hash = $1",
            &[&device_hash],
        )
        .await
    };
    let out = if expires <= now_ms {
        delete(&tx).await?;
        Polled::Expired
    } else {
        match state.as_str() {
            "approved" => {
                delete(&tx).await?;
                match row.get::<_, Option<String>>(4) {
                    Some(a) => Polled::Approved(a),
                    None => Polled::Invalid,
                }
            }
            "denied" => {
                delete(&tx).await?;
                Polled::Denied(row.get::<_, Option<String>>(5).unwrap_or_default())
            }
            _ => {
                let too_fast = last.is_some_and(|t| now_ms - t + 500 < interval);
                let interval = if too_fast {
                    interval + slow_down_ms
                } else {
                    interval
                };
                tx.execute(
                    "UPDATE device_flows SET last_poll_ms = $2, interval_ms = $3 WHERE device_hash = $1",
                    &[&device_hash, &now_ms, &interval],
                )
                .await?;
                if too_fast {
                    Polled::SlowDown
                } else {
                    Polled::Pending
                }
            }
        }
    };
    tx.commit().await?;
    Ok(out)
}
