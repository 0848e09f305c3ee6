//! PostgreSQL: connecting (rustls), the versioned schema, and moving ledger rows in.
//!
//! [`migrate`] applies the numbered migrations in [`MIGRATIONS`] that a database has not had,
//! each in its own transaction, under a session advisory lock, so every replica can run it at
//! start (and `store migrate` from anywhere) at the same time: one applies, the others wait and
//! find nothing left to do. [`insert_rows`] writes ledger rows idempotently: a row carries its
//! request id, a second insert of the same id is a no-op, and the daily rollup only counts rows
//! that were new, in the same transaction. [`import_sqlite`] moves an embedded ledger in with
//! it, so running it twice moves each row once. [`publish_window`], [`others_window`] and
//! [`sweep_window`] trade the per-minute rate window between replicas through `rate_window`.
//!
//! This module never logs a password or a URL with one (see [`super::Settings`]), and never
//! changes a ledger row once written (`rate_window` holds live counters, each replica's rewritten
//! by it as they grow and swept once old).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_postgres::{Client, GenericClient, NoTls};

use super::Settings;
use crate::meter::ledger::{Record, day_of, from_i64, to_i64};

/// The advisory lock key migrations hold (any constant shared by every bedrock-gate).
const MIGRATION_LOCK: i64 = 0x6265_6472_6f63_6b67; // "bedrockg"

/// The schema, one entry per version, applied in order and never edited once released: a
/// change is a new entry.
pub const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2), (3, V3), (4, V4), (5, V5)];

const V1: &str = r#"
CREATE TABLE requests (
    id                  BIGSERIAL PRIMARY KEY,
    ts_ms               BIGINT NOT NULL,
    "user"              TEXT,
    operation           TEXT NOT NULL,
    model               TEXT,
    base_model          TEXT,
    profile_arn         TEXT,
    status              INTEGER NOT NULL,
    input_tokens        BIGINT NOT NULL,
    output_tokens       BIGINT NOT NULL,
    cache_read_tokens   BIGINT NOT NULL,
    cache_write_tokens  BIGINT NOT NULL,
    cost_usd            DOUBLE PRECISION,
    latency_ms          BIGINT NOT NULL,
    ttfb_ms             BIGINT,
    request_id          TEXT NOT NULL UNIQUE,
    upstream_request_id TEXT,
    complete            BOOLEAN NOT NULL,
    admitted            BOOLEAN NOT NULL,
    outcome             TEXT NOT NULL,
    front               TEXT,
    project             TEXT,
    session             TEXT,
    replica             TEXT NOT NULL
);
CREATE INDEX requests_ts ON requests (ts_ms);
CREATE INDEX requests_user_ts ON requests ("user", ts_ms);
CREATE TABLE sent (
    request_id  TEXT PRIMARY KEY,
    ts_ms       BIGINT NOT NULL,
    "user"      TEXT NOT NULL,
    front       TEXT,
    project     TEXT,
    session     TEXT,
    operation   TEXT NOT NULL,
    model       TEXT,
    base_model  TEXT,
    profile_arn TEXT,
    admitted    BOOLEAN NOT NULL,
    replica     TEXT NOT NULL
);
CREATE TABLE usage_daily (
    day                TEXT NOT NULL,
    "user"             TEXT NOT NULL,
    model              TEXT NOT NULL,
    profile            TEXT NOT NULL,
    project            TEXT NOT NULL,
    session            TEXT NOT NULL,
    front              TEXT NOT NULL,
    replica            TEXT NOT NULL,
    requests           BIGINT NOT NULL,
    input_tokens       BIGINT NOT NULL,
    output_tokens      BIGINT NOT NULL,
    cache_read_tokens  BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cost_usd           DOUBLE PRECISION NOT NULL,
    unpriced           BIGINT NOT NULL,
    incomplete         BIGINT NOT NULL,
    errors             BIGINT NOT NULL,
    PRIMARY KEY (day, "user", model, profile, project, session, front, replica)
);
CREATE TABLE usage_minute (
    minute   BIGINT NOT NULL,
    "user"   TEXT NOT NULL,
    replica  TEXT NOT NULL,
    requests BIGINT NOT NULL,
    tokens   BIGINT NOT NULL,
    PRIMARY KEY (minute, "user", replica)
);
"#;

/// Sign-in sessions shared by every replica (a revocation on one is seen by all), and each
/// replica's last minute of admitted requests per second (a per-minute rate limit is shared).
const V2: &str = r#"
CREATE TABLE sessions (
    id                  BIGSERIAL PRIMARY KEY,
    access_hash         TEXT NOT NULL UNIQUE,
    refresh_hash        TEXT UNIQUE,
    "user"              TEXT NOT NULL,
    subject             TEXT NOT NULL,
    email               TEXT,
    groups              TEXT NOT NULL,
    idp_refresh         TEXT,
    surface             TEXT,
    created_ms          BIGINT NOT NULL,
    refreshed_ms        BIGINT NOT NULL,
    expires_ms          BIGINT NOT NULL,
    refresh_expires_ms  BIGINT,
    revoked_ms          BIGINT
);
CREATE INDEX sessions_user ON sessions ("user");
CREATE TABLE session_changes (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  BIGINT NOT NULL
);
INSERT INTO session_changes (id, generation) VALUES (1, 0);
CREATE TABLE rate_window (
    replica   TEXT NOT NULL,
    "user"    TEXT NOT NULL,
    sec       BIGINT NOT NULL,
    requests  BIGINT NOT NULL,
    tokens    BIGINT NOT NULL,
    PRIMARY KEY (replica, "user", sec)
);
CREATE INDEX rate_window_sec ON rate_window (sec);
"#;

/// When each replica was last seen, so the calls a vanished replica had in flight are
/// recorded by the others (see [`recover_stale`]).
const V3: &str = r#"
CREATE TABLE replicas (
    replica  TEXT PRIMARY KEY,
    seen_ms  BIGINT NOT NULL
);
"#;

/// Sign-ins in progress (RFC 8628 device flows and their browser logins), so each step may
/// reach any replica.
/// The last result of each admin check (`profiles verify`, `reconcile`), for the dashboard.
const V5: &str = r#"
CREATE TABLE checks (
    kind   TEXT PRIMARY KEY,
    at_ms  BIGINT NOT NULL,
    ok     BOOLEAN NOT NULL,
    result TEXT NOT NULL
);
"#;

const V4: &str = r#"
CREATE TABLE device_flows (
    device_hash   TEXT PRIMARY KEY,
    user_code     TEXT NOT NULL UNIQUE,
    expires_ms    BIGINT NOT NULL,
    interval_ms   BIGINT NOT NULL,
    last_poll_ms  BIGINT,
    state         TEXT NOT NULL,
    approval      TEXT,
    denied        TEXT,
    surface       TEXT
);
CREATE TABLE device_logins (
    state_hash  TEXT PRIMARY KEY,
    user_code   TEXT NOT NULL,
    nonce       TEXT NOT NULL,
    verifier    TEXT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
"#;

/// Connects with the store's settings: rustls (aws-lc-rs, the webpki roots and `ca_file`)
/// unless the URL says `sslmode=disable`. The connection is driven by a task of its own.
pub async fn connect(settings: &Settings, dir: &Path) -> anyhow::Result<Client> {
    let config = settings.connect_config(dir)?;
    let what = settings.redacted_url();
    let client = match config.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => {
            let (client, conn) = config
                .connect(NoTls)
                .await
                .with_context(|| format!("cannot connect to {what}"))?;
            drive(conn);
            client
        }
        _ => {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(
                settings.ca_path(dir).as_deref(),
            )?);
            let (client, conn) = config
                .connect(tls)
                .await
                .with_context(|| format!("cannot connect to {what}"))?;
            drive(conn);
            client
        }
    };
    Ok(client)
}

/// Drives a connection on a task of its own until it ends.
fn drive<F>(conn: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "store connection ended");
        }
    });
}

/// rustls for the database: the webpki roots, plus the PEM certificates of `ca` (a private CA,
/// or the cloud provider's bundle).
fn tls_config(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        let pem = std::fs::read(path)
            .with_context(|| format!("store.ca_file: cannot read {}", path.display()))?;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.with_context(|| format!("store.ca_file: {} is not PEM", path.display()))?;
            roots.add(cert).with_context(|| {
                format!(
                    "store.ca_file: a certificate in {} is not usable",
                    path.display()
                )
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Applies the migrations the database lacks; returns the versions applied now (empty when it
/// was up to date). Safe to run from many processes at once.
pub async fn migrate(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .context("waiting for the migration lock")?;
    let result = apply_missing(client).await;
    // Released however the migrations went; a dropped connection releases it too.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result
}

async fn apply_missing(client: &mut Client) -> anyhow::Result<Vec<i32>> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .context("creating schema_migrations")?;
    let done: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(newer) = done.iter().max().filter(|v| **v > latest()) {
        anyhow::bail!(
            "the database has schema version {newer}, newer than this bedrock-gate knows ({}); upgrade bedrock-gate",
            latest()
        );
    }
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("applying schema version {version}"))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tx.commit().await?;
        applied.push(*version);
    }
    Ok(applied)
}

/// The newest schema version this build knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

/// The schema version a database is at (0 when never migrated).
pub async fn version(client: &Client) -> anyhow::Result<i32> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// The rollup key of a row: (day, user, model, profile, project, session, front), with ''
/// for an absent value, as `usage_daily` keeps it.
type DayKey = (String, String, String, String, String, String, String);

/// The sums a row adds to its day.
#[derive(Debug, Default, Clone, Copy)]
struct DaySums {
    requests: i64,
    input: i64,
    output: i64,
    cache_read: i64,
    cache_write: i64,
    cost: f64,
    unpriced: i64,
    incomplete: i64,
    errors: i64,
}

/// Inserts `rows` (from `replica`) in one transaction: each request id once, and the daily
/// rollup of the rows that were new. Returns how many were new.
pub async fn insert_rows(
    client: &mut Client,
    replica: &str,
    rows: &[Record],
) -> anyhow::Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let tx = client.transaction().await?;
    let refs: Vec<&Record> = rows.iter().collect();
    let new = insert_in(&tx, replica, &refs).await?;
    tx.commit().await?;
    Ok(new)
}

/// [`insert_rows`] inside a transaction the caller holds.
pub async fn insert_in(
    tx: &impl GenericClient,
    replica: &str,
    rows: &[&Record],
) -> anyhow::Result<u64> {
    let col = |f: &dyn Fn(&&Record) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
    let ts: Vec<i64> = rows.iter().map(|r| r.ts_ms).collect();
    let user = col(&|r| r.user.clone());
    let operation: Vec<String> = rows.iter().map(|r| r.operation.clone()).collect();
    let model = col(&|r| r.model.clone());
    let base_model = col(&|r| r.base_model.clone());
    let profile = col(&|r| r.profile_arn.clone());
    let status: Vec<i32> = rows.iter().map(|r| i32::from(r.status)).collect();
    let input: Vec<i64> = rows.iter().map(|r| to_i64(r.usage.input_tokens)).collect();
    let output: Vec<i64> = rows.iter().map(|r| to_i64(r.usage.output_tokens)).collect();
    let cache_read: Vec<i64> = rows
        .iter()
        .map(|r| to_i64(r.usage.cache_read_tokens))
        .collect();
    let cache_write: Vec<i64> = rows
        .iter()
        .map(|r| to_i64(r.usage.cache_write_tokens))
        .collect();
    let cost: Vec<Option<f64>> = rows.iter().map(|r| r.cost_usd).collect();
    let latency: Vec<i64> = rows.iter().map(|r| to_i64(r.latency_ms)).collect();
    let ttfb: Vec<Option<i64>> = rows.iter().map(|r| r.ttfb_ms.map(to_i64)).collect();
    let request_id: Vec<String> = rows.iter().map(|r| r.request_id.clone()).collect();
    let upstream_id = col(&|r| r.upstream_request_id.clone());
    let complete: Vec<bool> = rows.iter().map(|r| r.complete).collect();
    let admitted: Vec<bool> = rows.iter().map(|r| r.admitted).collect();
    let outcome: Vec<String> = rows.iter().map(|r| r.outcome.clone()).collect();
    let front = col(&|r| r.front.clone());
    let project = col(&|r| r.project.clone());
    let session = col(&|r| r.session.clone());
    let inserted = tx
        .query(
            r#"INSERT INTO requests (ts_ms, "user", operation, model, base_model, profile_arn, status,
                   input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
                   latency_ms, ttfb_ms, request_id, upstream_request_id, complete, admitted, outcome,
                   front, project, session, replica)
               SELECT *, $23::text FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                   $6::text[], $7::int[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[],
                   $12::float8[], $13::bigint[], $14::bigint[], $15::text[], $16::text[], $17::bool[],
                   $18::bool[], $19::text[], $20::text[], $21::text[], $22::text[])
               ON CONFLICT (request_id) DO NOTHING
               RETURNING request_id"#,
            &[
                &ts, &user, &operation, &model, &base_model, &profile, &status, &input, &output,
                &cache_read, &cache_write, &cost, &latency, &ttfb, &request_id, &upstream_id,
                &complete, &admitted, &outcome, &front, &project, &session, &replica,
            ],
        )
        .await
        .context("inserting ledger rows")?;
    let new: std::collections::HashSet<String> =
        inserted.iter().map(|r| r.get::<_, String>(0)).collect();
    let mut days: BTreeMap<DayKey, DaySums> = BTreeMap::new();
    for r in rows.iter().filter(|r| new.contains(&r.request_id)) {
        let key = (
            day_of(r.ts_ms),
            r.user.clone().unwrap_or_default(),
            r.base_model
                .clone()
                .or_else(|| r.model.clone())
                .unwrap_or_default(),
            r.profile_arn.clone().unwrap_or_default(),
            r.project.clone().unwrap_or_default(),
            r.session.clone().unwrap_or_default(),
            r.front.clone().unwrap_or_default(),
        );
        // The one classification the SQLite ledger uses too.
        let class = crate::meter::ledger::classify(
            r.status,
            r.complete,
            &r.outcome,
            r.usage.total(),
            r.cost_usd,
        );
        let (unpriced, incomplete, error) = (class.unpriced, class.incomplete, class.error);
        let s = days.entry(key).or_default();
        s.requests += 1;
        s.input += to_i64(r.usage.input_tokens);
        s.output += to_i64(r.usage.output_tokens);
        s.cache_read += to_i64(r.usage.cache_read_tokens);
        s.cache_write += to_i64(r.usage.cache_write_tokens);
        s.cost += r.cost_usd.unwrap_or(0.0);
        s.unpriced += i64::from(unpriced);
        s.incomplete += i64::from(incomplete);
        s.errors += i64::from(error);
    }
    if !days.is_empty() {
        let k = |i: usize| -> Vec<String> {
            days.keys()
                .map(|key| match i {
                    0 => key.0.clone(),
                    1 => key.1.clone(),
                    2 => key.2.clone(),
                    3 => key.3.clone(),
                    4 => key.4.clone(),
                    5 => key.5.clone(),
                    _ => key.6.clone(),
                })
                .collect()
        };
        let v = |f: &dyn Fn(&DaySums) -> i64| days.values().map(f).collect::<Vec<i64>>();
        let costs: Vec<f64> = days.values().map(|s| s.cost).collect();
        tx.execute(
            r#"INSERT INTO usage_daily (day, "user", model, profile, project, session, front, replica,
                   requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                   cost_usd, unpriced, incomplete, errors)
               SELECT d, u, m, p, pr, s, f, $8::text, rq, i, o, cr, cw, c, up, inc, e
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                   $7::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[],
                   $14::float8[], $15::bigint[], $16::bigint[], $17::bigint[])
                   AS t(d, u, m, p, pr, s, f, rq, i, o, cr, cw, c, up, inc, e)
               ON CONFLICT (day, "user", model, profile, project, session, front, replica) DO UPDATE SET
                   requests = usage_daily.requests + excluded.requests,
                   input_tokens = usage_daily.input_tokens + excluded.input_tokens,
                   output_tokens = usage_daily.output_tokens + excluded.output_tokens,
                   cache_read_tokens = usage_daily.cache_read_tokens + excluded.cache_read_tokens,
                   cache_write_tokens = usage_daily.cache_write_tokens + excluded.cache_write_tokens,
                   cost_usd = usage_daily.cost_usd + excluded.cost_usd,
                   unpriced = usage_daily.unpriced + excluded.unpriced,
                   incomplete = usage_daily.incomplete + excluded.incomplete,
                   errors = usage_daily.errors + excluded.errors"#,
            &[
                &k(0),
                &k(1),
                &k(2),
                &k(3),
                &k(4),
                &k(5),
                &k(6),
                &replica,
                &v(&|s| s.requests),
                &v(&|s| s.input),
                &v(&|s| s.output),
                &v(&|s| s.cache_read),
                &v(&|s| s.cache_write),
                &costs,
                &v(&|s| s.unpriced),
                &v(&|s| s.incomplete),
                &v(&|s| s.errors),
            ],
        )
        .await
        .context("rolling up ledger rows")?;
    }
    Ok(new.len() as u64)
}

/// Writes the markers of calls about to be sent (see `meter::ledger::Sent`).
pub async fn insert_marks(
    tx: &impl GenericClient,
    replica: &str,
    marks: &[&crate::meter::ledger::Sent],
) -> anyhow::Result<()> {
    if marks.is_empty() {
        return Ok(());
    }
    let text = |f: &dyn Fn(&crate::meter::ledger::Sent) -> Option<String>| {
        marks.iter().map(|m| f(m)).collect::<Vec<_>>()
    };
    let id: Vec<String> = marks.iter().map(|m| m.request_id.clone()).collect();
    let ts: Vec<i64> = marks.iter().map(|m| m.ts_ms).collect();
    let user: Vec<String> = marks.iter().map(|m| m.user.clone()).collect();
    let op: Vec<String> = marks.iter().map(|m| m.operation.clone()).collect();
    let admitted: Vec<bool> = marks.iter().map(|m| m.admitted).collect();
    tx.execute(
        r#"INSERT INTO sent (request_id, ts_ms, "user", front, project, session, operation, model,
               base_model, profile_arn, admitted, replica)
           SELECT i, t, u, f, p, s, o, m, b, pa, a, $11::text
           FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
               $7::text[], $8::text[], $9::text[], $12::text[], $10::bool[])
               AS x(i, t, u, f, p, s, o, m, b, pa, a)
           ON CONFLICT (request_id) DO NOTHING"#,
        &[
            &id,
            &ts,
            &user,
            &text(&|m| m.front.clone()),
            &text(&|m| m.project.clone()),
            &text(&|m| m.session.clone()),
            &op,
            &text(&|m| m.model.clone()),
            &text(&|m| m.base_model.clone()),
            &admitted,
            &replica,
            &text(&|m| m.profile_arn.clone()),
        ],
    )
    .await
    .context("writing sent markers")?;
    Ok(())
}

/// Turns the markers `replica` left (calls in flight when it last died) into `interrupted`
/// rows, rolled up like any row; a marker whose call has a row is only removed. Run at start.
pub async fn recover_interrupted(client: &mut Client, replica: &str) -> anyhow::Result<u64> {
    let tx = client.transaction().await?;
    let n = recover_in(&tx, replica).await?;
    tx.commit().await?;
    Ok(n)
}

/// Says this replica is alive (every few polls), on the database's clock.
pub async fn heartbeat(client: &Client, replica: &str) -> anyhow::Result<()> {
    client
        .execute(
            "INSERT INTO replicas (replica, seen_ms)
             VALUES ($1, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
             ON CONFLICT (replica) DO UPDATE SET seen_ms = excluded.seen_ms",
            &[&replica],
        )
        .await?;
    Ok(())
}

/// Records as `interrupted` the calls in flight on replicas unseen for `gone` (on the
/// database's clock): scaled away, or replaced under a new name as a Kubernetes pod is, so no
/// restart under their name would ever recover them. The caller must itself have been seen
/// without a break for longer than `gone` (after an outage nobody could say they were alive,
/// and no one is taken for gone before they could). Each stale replica is claimed by one caller
/// (row lock, others skip it) and forgotten once recovered. Returns (replica, calls).
pub async fn recover_stale(
    client: &mut Client,
    me: &str,
    gone: std::time::Duration,
) -> anyhow::Result<Vec<(String, u64)>> {
    let gone_ms = i64::try_from(gone.as_millis()).unwrap_or(i64::MAX);
    let stale: Vec<String> = client
        .query(
            "SELECT replica FROM replicas
             WHERE seen_ms < (extract(epoch FROM clock_timestamp()) * 1000)::bigint - $1
               AND replica <> $2",
            &[&gone_ms, &me],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut out = Vec::new();
    for replica in stale {
        let tx = client.transaction().await?;
        let claimed = tx
            .query_opt(
                "SELECT 1 FROM replicas
                 WHERE replica = $1
                   AND seen_ms < (extract(epoch FROM clock_timestamp()) * 1000)::bigint - $2
                 FOR UPDATE SKIP LOCKED",
                &[&replica, &gone_ms],
            )
            .await?;
        if claimed.is_none() {
            continue;
        }
        let n = recover_in(&tx, &replica).await?;
        tx.execute("DELETE FROM replicas WHERE replica = $1", &[&replica])
            .await?;
        tx.commit().await?;
        out.push((replica, n));
    }
    Ok(out)
}

async fn recover_in(tx: &tokio_postgres::Transaction<'_>, replica: &str) -> anyhow::Result<u64> {
    let left = tx
        .query(
            r#"SELECT s.request_id, s.ts_ms, s."user", s.front, s.project, s.session, s.operation,
                      s.model, s.base_model, s.profile_arn, s.admitted
               FROM sent s WHERE s.replica = $1
                 AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.request_id = s.request_id)
               ORDER BY s.ts_ms"#,
            &[&replica],
        )
        .await?;
    let rows: Vec<Record> = left
        .iter()
        .map(|r| Record {
            ts_ms: r.get(1),
            user: Some(r.get(2)),
            front: r.get(3),
            project: r.get(4),
            session: r.get(5),
            operation: r.get(6),
            model: r.get(7),
            base_model: r.get(8),
            profile_arn: r.get(9),
            status: 0,
            usage: crate::domain::Usage::default(),
            cost_usd: None,
            latency_ms: 0,
            ttfb_ms: None,
            request_id: r.get(0),
            upstream_request_id: None,
            complete: false,
            admitted: r.get(10),
            outcome: crate::domain::Outcome::Interrupted.name().to_string(),
            marked: true,
        })
        .collect();
    let n = insert_in(tx, replica, &rows.iter().collect::<Vec<_>>()).await?;
    // Only the markers read above (and those whose call has its row): one written meanwhile
    // belongs to a call still in flight.
    let ids: Vec<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    tx.execute(
        r#"DELETE FROM sent s WHERE s.replica = $1
             AND (s.request_id = ANY($2)
                  OR EXISTS (SELECT 1 FROM requests r WHERE r.request_id = s.request_id))"#,
        &[&replica, &ids],
    )
    .await?;
    Ok(n)
}

/// Each user's totals since the start of `day` (`YYYY-MM-DD`), from the rollup: what the
/// budget counters start from.
/// `mine` picks this replica's rows (`replica = mine.0`) or the others' (`mine.1 == false`).
pub async fn totals_since_day(
    client: &Client,
    day: &str,
    mine: (&str, bool),
) -> anyhow::Result<Vec<(String, crate::meter::ledger::Totals)>> {
    let rows = client
        .query(
            r#"SELECT "user", sum(requests)::bigint, sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                      sum(cache_read_tokens)::bigint, sum(cache_write_tokens)::bigint,
                      sum(cost_usd)::float8, sum(unpriced)::bigint
               FROM usage_daily WHERE day >= $1 AND "user" <> '' AND (replica = $2) = $3
               GROUP BY "user""#,
            &[&day, &mine.0, &mine.1],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                crate::meter::ledger::Totals {
                    requests: from_i64(r.get(1)),
                    usage: crate::domain::Usage {
                        input_tokens: from_i64(r.get(2)),
                        output_tokens: from_i64(r.get(3)),
                        cache_read_tokens: from_i64(r.get(4)),
                        cache_write_tokens: from_i64(r.get(5)),
                    },
                    cost_usd: r.get(6),
                    unpriced: from_i64(r.get(7)),
                },
            )
        })
        .collect())
}

/// (user, start ms, tokens) of each request `replica` admitted at or after `since_ms`: its own
/// rate window, rebuilt at start (the other replicas' comes from [`others_window`]).
pub async fn recent(
    client: &Client,
    replica: &str,
    since_ms: i64,
) -> anyhow::Result<Vec<(String, i64, u64)>> {
    let rows = client
        .query(
            r#"SELECT "user", ts_ms, input_tokens + output_tokens + cache_read_tokens + cache_write_tokens
               FROM requests WHERE ts_ms >= $1 AND "user" IS NOT NULL AND admitted AND replica = $2"#,
            &[&since_ms, &replica],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), from_i64(r.get(2))))
        .collect())
}

/// Writes `replica`'s seconds of the rate window, each with its figures so far (a second
/// already there is overwritten, so offering one again is harmless). One statement, one round
/// trip, whatever the number of seconds; `seconds` holds each (user, second) once.
pub async fn publish_window(
    client: &Client,
    replica: &str,
    seconds: &[crate::meter::limits::WindowSecond],
) -> anyhow::Result<()> {
    if seconds.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = seconds.iter().map(|s| s.user.as_str()).collect();
    let secs: Vec<i64> = seconds.iter().map(|s| s.sec).collect();
    let requests: Vec<i64> = seconds.iter().map(|s| to_i64(s.requests)).collect();
    let tokens: Vec<i64> = seconds.iter().map(|s| to_i64(s.tokens)).collect();
    client
        .execute(
            r#"INSERT INTO rate_window (replica, "user", sec, requests, tokens)
               SELECT $1, u, s, r, t FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
                   AS w(u, s, r, t)
               ON CONFLICT (replica, "user", sec)
               DO UPDATE SET requests = EXCLUDED.requests, tokens = EXCLUDED.tokens"#,
            &[&replica, &users, &secs, &requests, &tokens],
        )
        .await
        .context("writing the rate window")?;
    Ok(())
}

/// The other replicas' seconds of the rate window after `since_sec`, each with the replica
/// that counted it (one row per replica, user and second; a caller sums them), by the `sec`
/// index.
pub async fn others_window(
    client: &Client,
    replica: &str,
    since_sec: i64,
) -> anyhow::Result<Vec<(String, crate::meter::limits::WindowSecond)>> {
    let rows = client
        .query(
            r#"SELECT replica, "user", sec, requests, tokens FROM rate_window
               WHERE sec > $2 AND replica <> $1"#,
            &[&replica, &since_sec],
        )
        .await
        .context("reading the rate window")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                crate::meter::limits::WindowSecond {
                    user: r.get(1),
                    sec: r.get(2),
                    requests: from_i64(r.get(3)),
                    tokens: from_i64(r.get(4)),
                },
            )
        })
        .collect())
}

/// Deletes `replica`'s seconds of the rate window before `before_sec`, which no replica reads
/// any more, and anyone's before `abandoned_sec` (a replica that is gone for good cannot
/// delete its own). Returns how many went.
pub async fn sweep_window(
    client: &Client,
    replica: &str,
    before_sec: i64,
    abandoned_sec: i64,
) -> anyhow::Result<u64> {
    client
        .execute(
            "DELETE FROM rate_window WHERE sec < $2 AND (replica = $1 OR sec < $3)",
            &[&replica, &before_sec, &abandoned_sec],
        )
        .await
        .context("sweeping the rate window")
}

/// Deletes all of `replica`'s rate window: at start, before it writes the window it rebuilt
/// from its rows, so a second from before the restart does not count twice.
pub async fn clear_window(client: &Client, replica: &str) -> anyhow::Result<u64> {
    client
        .execute("DELETE FROM rate_window WHERE replica = $1", &[&replica])
        .await
        .context("clearing the rate window")
}

/// The `usage` report from the rollup: days `since..until` (`YYYY-MM-DD`, `until`
/// excluded), grouped as `by`, most expensive first; the same rows the SQLite ledger gives.
pub async fn report(
    client: &Client,
    since: &str,
    until: &str,
    by: crate::meter::report::GroupBy,
) -> anyhow::Result<Vec<crate::meter::report::Row>> {
    let sql = format!(
        "SELECT {key} AS k, sum(requests)::bigint, sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                sum(cache_read_tokens)::bigint, sum(cache_write_tokens)::bigint,
                coalesce(sum(cost_usd), 0)::float8, sum(unpriced)::bigint, sum(incomplete)::bigint,
                sum(errors)::bigint
         FROM usage_daily WHERE day >= $1 AND day < $2
         GROUP BY k ORDER BY coalesce(sum(cost_usd), 0) DESC, k",
        key = by.rollup_column()
    );
    Ok(client
        .query(&sql, &[&since, &until])
        .await?
        .iter()
        .map(|r| crate::meter::report::Row {
            key: r.get(0),
            requests: from_i64(r.get(1)),
            input_tokens: from_i64(r.get(2)),
            output_tokens: from_i64(r.get(3)),
            cache_read_tokens: from_i64(r.get(4)),
            cache_write_tokens: from_i64(r.get(5)),
            cost_usd: r.get(6),
            unpriced_requests: from_i64(r.get(7)),
            incomplete_requests: from_i64(r.get(8)),
            error_requests: from_i64(r.get(9)),
        })
        .collect())
}

/// Each (day, user)'s estimated cost for days `since..until` (`until` excluded), every
/// replica's, from the rollup: what `reconcile` compares with the bill.
pub async fn daily_costs(
    client: &Client,
    since: &str,
    until: &str,
) -> anyhow::Result<BTreeMap<(String, String), f64>> {
    Ok(client
        .query(
            r#"SELECT day, "user", coalesce(sum(cost_usd), 0)::float8 FROM usage_daily
               WHERE day >= $1 AND day < $2 AND "user" <> '' GROUP BY day, "user""#,
            &[&since, &until],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// What `user` spent since the start of each of `days` (`YYYY-MM-DD`), on every replica, from
/// the rollup.
pub async fn spend_since_days(
    client: &Client,
    user: &str,
    days: &[String],
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(days.len());
    for day in days {
        let row = client
            .query_one(
                r#"SELECT coalesce(sum(cost_usd), 0)::float8 FROM usage_daily
                   WHERE "user" = $1 AND day >= $2"#,
                &[&user, day],
            )
            .await?;
        out.push(row.get(0));
    }
    Ok(out)
}

/// Rows read from the SQLite ledger and moved per transaction.
const IMPORT_BATCH: usize = 5_000;

/// What [`import_sqlite`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Rows read from the SQLite ledger.
    pub read: u64,
    /// Rows that were not in PostgreSQL yet.
    pub inserted: u64,
}

/// Moves every row of the SQLite ledger at `path` into the database, in batches, each request
/// id once: a second run inserts nothing. Refuses a ledger whose spool still holds entries (a
/// `serve` that crashed, or runs): those rows are not in the file yet.
pub async fn import_sqlite(client: &mut Client, path: &Path) -> anyhow::Result<Imported> {
    let spool = crate::meter::ledger::spool_path_of(path);
    if let Ok(m) = std::fs::metadata(&spool)
        && m.len() > 0
    {
        anyhow::bail!(
            "{} holds {} byte(s) of ledger entries not yet in {}: stop `bedrock-gate serve` on this ledger, or if it is not running start it once and stop it (it moves them in at start), then import again",
            spool.display(),
            m.len(),
            path.display()
        );
    }
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("cannot open {}", path.display()))?;
    let has = |column: &str| -> anyhow::Result<bool> {
        Ok(conn
            .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = ?1")?
            .exists([column])?)
    };
    let opt = |c: &str| -> anyhow::Result<String> {
        Ok(if has(c)? {
            c.to_string()
        } else {
            "NULL".to_string()
        })
    };
    let admitted = if has("admitted")? { "admitted" } else { "1" };
    let sql = format!(
        "SELECT id, ts_ms, user, operation, model, base_model, profile_arn, status, input_tokens,
                output_tokens, cache_read_tokens, cache_write_tokens, cost_usd, latency_ms, ttfb_ms,
                request_id, upstream_request_id, complete, {admitted}, outcome, {front}, {project}, {session}
         FROM requests WHERE id > ?1 ORDER BY id LIMIT {IMPORT_BATCH}",
        front = opt("front")?,
        project = opt("project")?,
        session = opt("session")?,
    );
    let mut stmt = conn.prepare(&sql).context("reading the SQLite ledger")?;
    let mut after = 0i64;
    let mut done = Imported::default();
    loop {
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        let mut rows = stmt.query([after])?;
        while let Some(r) = rows.next()? {
            after = r.get(0)?;
            let u = |i: usize| -> rusqlite::Result<u64> { Ok(from_i64(r.get(i)?)) };
            batch.push(Record {
                ts_ms: r.get(1)?,
                user: r.get(2)?,
                operation: r.get(3)?,
                model: r.get(4)?,
                base_model: r.get(5)?,
                profile_arn: r.get(6)?,
                status: u16::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                usage: crate::domain::Usage {
                    input_tokens: u(8)?,
                    output_tokens: u(9)?,
                    cache_read_tokens: u(10)?,
                    cache_write_tokens: u(11)?,
                },
                cost_usd: r.get(12)?,
                latency_ms: u(13)?,
                ttfb_ms: r.get::<_, Option<i64>>(14)?.map(from_i64),
                request_id: r.get(15)?,
                upstream_request_id: r.get(16)?,
                complete: r.get(17)?,
                admitted: r.get(18)?,
                outcome: r.get(19)?,
                front: r.get(20)?,
                project: r.get(21)?,
                session: r.get(22)?,
                marked: false,
            });
        }
        drop(rows);
        if batch.is_empty() {
            return Ok(done);
        }
        done.read += batch.len() as u64;
        done.inserted += insert_rows(client, "import", &batch).await?;
    }
}
