//! What the dashboard shows, read from the ledger of either store: the SQLite file (read-only,
//! its own connection per read) or PostgreSQL (every replica's rows, on the meter's shared
//! reader connection).
//!
//! Everything over a month or 30 days comes from the `usage_daily` rollups, the same lines
//! `usage` reads (the users and models tables *are* `usage`'s report), so a page costs the same
//! with 10 M rows in the month as with 10 k. The raw rows are read only through their indexes
//! and bounded: the last hour by time, a user's last requests and last call by (user, time).
//! This module never writes, never reads a prompt or a completion (the ledger has none), and
//! never scans the month's rows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Days, Utc};
use serde::Serialize;

use crate::meter::report::{self, GroupBy, Row};

/// Most recent requests listed on a user's page.
pub const RECENT: i64 = 50;
/// Days of the spend chart.
pub const CHART_DAYS: u64 = 30;

/// The ledger to read.
#[derive(Clone)]
pub enum Source {
    Sqlite(PathBuf),
    Store(Arc<crate::store::Lazy>),
}

/// A value of a result cell.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Int(i64),
    Real(f64),
    Text(String),
    Null,
}

impl Cell {
    fn int(&self) -> i64 {
        match self {
            Cell::Int(v) => *v,
            Cell::Real(v) => *v as i64,
            _ => 0,
        }
    }
    fn real(&self) -> f64 {
        match self {
            Cell::Int(v) => *v as f64,
            Cell::Real(v) => *v,
            _ => 0.0,
        }
    }
    fn text(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Int(v) => v.to_string(),
            Cell::Real(v) => v.to_string(),
            Cell::Null => String::new(),
        }
    }
}

/// A bound parameter.
#[derive(Debug, Clone)]
enum Param {
    Text(String),
    Int(i64),
}

/// The UTC days of a period: `since` included, `until` excluded, as `usage_daily` keys them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Period {
    pub since: String,
    /// Excluded.
    pub until: String,
    /// The last day in it (what `usage --until` takes).
    pub last: String,
}

impl Period {
    /// This UTC month up to and including today: `usage`'s default period.
    pub fn month_to_date(now: DateTime<Utc>) -> Period {
        let today = now.date_naive();
        Period {
            since: today.format("%Y-%m-01").to_string(),
            until: (today + Days::new(1)).format("%Y-%m-%d").to_string(),
            last: today.format("%Y-%m-%d").to_string(),
        }
    }

    /// The last `n` UTC days, today included.
    pub fn last_days(now: DateTime<Utc>, n: u64) -> Period {
        let today = now.date_naive();
        Period {
            since: (today - Days::new(n.saturating_sub(1)))
                .format("%Y-%m-%d")
                .to_string(),
            until: (today + Days::new(1)).format("%Y-%m-%d").to_string(),
            last: today.format("%Y-%m-%d").to_string(),
        }
    }

    fn ms(&self) -> anyhow::Result<(i64, i64)> {
        let since = report::day_start_ms(&self.since).map_err(anyhow::Error::msg)?;
        let until = report::day_start_ms(&self.until).map_err(anyhow::Error::msg)?;
        Ok((since, until))
    }
}

/// One minute of the last hour.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Minute {
    /// Unix seconds of the minute's start.
    pub at: i64,
    pub requests: i64,
    pub errors: i64,
}

/// One of a user's latest requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recent {
    pub at_ms: i64,
    pub request_id: String,
    pub front: String,
    pub operation: String,
    pub model: String,
    pub status: i64,
    pub outcome: String,
    pub latency_ms: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: Option<f64>,
}

impl Source {
    /// The `usage` report for `period` grouped as `by`: the same rows `usage --format json`
    /// prints.
    pub async fn report(&self, period: &Period, by: GroupBy) -> anyhow::Result<Vec<Row>> {
        match self {
            Source::Store(reader) => {
                let client = reader.get().await?;
                crate::store::pg::report(&client, &period.since, &period.until, by).await
            }
            Source::Sqlite(path) => {
                let (path, (since, until)) = (path.clone(), period.ms()?);
                blocking(move || {
                    let conn = crate::meter::ledger::open_read_only(&path)?;
                    Ok(report::query(&conn, since, until, by)?)
                })
                .await
            }
        }
    }

    /// Spend per (day, user) in `period`, identified callers only.
    pub async fn daily_by_user(
        &self,
        period: &Period,
    ) -> anyhow::Result<BTreeMap<(String, String), f64>> {
        let rows = self
            .query(
                "SELECT day, \"user\", sum(cost_usd)::float8 FROM usage_daily
                 WHERE day >= $1 AND day < $2 AND \"user\" <> '' GROUP BY day, \"user\"",
                vec![
                    Param::Text(period.since.clone()),
                    Param::Text(period.until.clone()),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ((r[0].text(), r[1].text()), r[2].real()))
            .collect())
    }

    /// One user's sums in `period` grouped by `by` (day, model, project or session), from the
    /// rollup; the report's rules for keys (`-` for none).
    pub async fn user_report(
        &self,
        user: &str,
        period: &Period,
        by: GroupBy,
    ) -> anyhow::Result<Vec<Row>> {
        let sql = format!(
            "SELECT {key} AS k, sum(requests)::bigint, sum(input_tokens)::bigint,
                    sum(output_tokens)::bigint, sum(cache_read_tokens)::bigint,
                    sum(cache_write_tokens)::bigint, sum(cost_usd)::float8, sum(unpriced)::bigint,
                    sum(incomplete)::bigint, sum(errors)::bigint
             FROM usage_daily WHERE day >= $1 AND day < $2 AND \"user\" = $3
             GROUP BY k ORDER BY k",
            key = by.rollup_column()
        );
        let rows = self
            .query(
                &sql,
                vec![
                    Param::Text(period.since.clone()),
                    Param::Text(period.until.clone()),
                    Param::Text(user.to_string()),
                ],
            )
            .await?;
        let n = |c: &Cell| u64::try_from(c.int()).unwrap_or(0);
        Ok(rows
            .iter()
            .map(|r| Row {
                key: r[0].text(),
                requests: n(&r[1]),
                input_tokens: n(&r[2]),
                output_tokens: n(&r[3]),
                cache_read_tokens: n(&r[4]),
                cache_write_tokens: n(&r[5]),
                cost_usd: r[6].real(),
                unpriced_requests: n(&r[7]),
                incomplete_requests: n(&r[8]),
                error_requests: n(&r[9]),
            })
            .collect())
    }

    /// Requests and errors per minute since `since_ms` (the last hour), from the rows by their
    /// time index; minutes without requests are left out.
    pub async fn minutes_since(&self, since_ms: i64) -> anyhow::Result<Vec<Minute>> {
        let sql = format!(
            "SELECT ts_ms / 60000 AS m, count(*)::bigint,
                    sum(CASE WHEN {err} THEN 1 ELSE 0 END)::bigint
             FROM requests WHERE ts_ms >= $1 GROUP BY m ORDER BY m",
            err = crate::meter::ledger::ERROR_SQL
        );
        let rows = self.query(&sql, vec![Param::Int(since_ms)]).await?;
        Ok(rows
            .iter()
            .map(|r| Minute {
                at: r[0].int() * 60,
                requests: r[1].int(),
                errors: r[2].int(),
            })
            .collect())
    }

    /// When each of `users` last called (Unix ms), by the (user, time) index: one lookup each.
    pub async fn last_seen(&self, users: &[String]) -> anyhow::Result<BTreeMap<String, i64>> {
        let mut out = BTreeMap::new();
        // One statement per user keeps each an index lookup on both engines.
        for user in users {
            let rows = self
                .query(
                    "SELECT max(ts_ms)::bigint FROM requests WHERE \"user\" = $1",
                    vec![Param::Text(user.clone())],
                )
                .await?;
            if let Some(Cell::Int(ts)) = rows.first().and_then(|r| r.first()) {
                out.insert(user.clone(), *ts);
            }
        }
        Ok(out)
    }

    /// `user`'s latest [`RECENT`] requests, newest first.
    pub async fn recent(&self, user: &str) -> anyhow::Result<Vec<Recent>> {
        let rows = self
            .query(
                "SELECT ts_ms, request_id, coalesce(front, 'bedrock'), operation,
                        coalesce(base_model, model, '-'), status::bigint, outcome, latency_ms::bigint,
                        input_tokens::bigint, output_tokens::bigint, cost_usd::float8
                 FROM requests WHERE \"user\" = $1 ORDER BY ts_ms DESC LIMIT $2",
                vec![Param::Text(user.to_string()), Param::Int(RECENT)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Recent {
                at_ms: r[0].int(),
                request_id: r[1].text(),
                front: r[2].text(),
                operation: r[3].text(),
                model: r[4].text(),
                status: r[5].int(),
                outcome: r[6].text(),
                latency_ms: r[7].int(),
                input_tokens: r[8].int(),
                output_tokens: r[9].int(),
                cost_usd: match r[10] {
                    Cell::Null => None,
                    ref c => Some(c.real()),
                },
            })
            .collect())
    }

    /// The last `profiles verify` and `reconcile` results (see [`crate::admin::checks`]).
    pub async fn checks(&self) -> anyhow::Result<Vec<crate::admin::checks::Check>> {
        if let Source::Sqlite(_) = self {
            // The table is made by the first check recorded.
            let n = self
                .query(
                    "SELECT count(*)::bigint FROM sqlite_master WHERE type = 'table' AND name = 'checks'",
                    vec![],
                )
                .await?;
            if n.first().and_then(|r| r.first()).map(Cell::int) != Some(1) {
                return Ok(Vec::new());
            }
        }
        let rows = self
            .query(
                "SELECT kind, at_ms::bigint, (CASE WHEN ok THEN 1 ELSE 0 END)::bigint, result
                 FROM checks ORDER BY kind",
                vec![],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| crate::admin::checks::Check {
                kind: r[0].text(),
                at_ms: r[1].int(),
                ok: r[2].int() == 1,
                result: serde_json::from_str(&r[3].text()).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }

    /// Runs `sql`, written for PostgreSQL (`$n` parameters, `::bigint`/`::float8` casts so the
    /// sums come back as the types read here); on SQLite the casts are dropped and `$n` is
    /// `?n`.
    async fn query(&self, sql: &str, params: Vec<Param>) -> anyhow::Result<Vec<Vec<Cell>>> {
        match self {
            Source::Store(reader) => {
                let client = reader.get().await?;
                let values: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = params
                    .iter()
                    .map(|p| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
                        match p {
                            Param::Text(s) => Box::new(s.clone()),
                            Param::Int(v) => Box::new(*v),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
                    .iter()
                    .map(|v| v.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let rows = client.query(sql, &refs).await?;
                rows.iter().map(pg_cells).collect()
            }
            Source::Sqlite(path) => {
                let sql = sqlite_sql(sql);
                let path = path.clone();
                blocking(move || {
                    let conn = crate::meter::ledger::open_read_only(&path)?;
                    let mut stmt = conn.prepare(&sql)?;
                    let width = stmt.column_count();
                    let values: Vec<rusqlite::types::Value> = params
                        .into_iter()
                        .map(|p| match p {
                            Param::Text(s) => rusqlite::types::Value::Text(s),
                            Param::Int(v) => rusqlite::types::Value::Integer(v),
                        })
                        .collect();
                    let rows = stmt.query_map(rusqlite::params_from_iter(values), |r| {
                        (0..width)
                            .map(|i| {
                                Ok(match r.get_ref(i)? {
                                    rusqlite::types::ValueRef::Integer(v) => Cell::Int(v),
                                    rusqlite::types::ValueRef::Real(v) => Cell::Real(v),
                                    rusqlite::types::ValueRef::Text(t) => {
                                        Cell::Text(String::from_utf8_lossy(t).into_owned())
                                    }
                                    _ => Cell::Null,
                                })
                            })
                            .collect::<rusqlite::Result<Vec<Cell>>>()
                    })?;
                    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
                })
                .await
            }
        }
    }
}

/// A query written for PostgreSQL, for SQLite: without the casts, `$n` as `?n`.
fn sqlite_sql(sql: &str) -> String {
    sql.replace("::bigint", "")
        .replace("::float8", "")
        .replace('$', "?")
}

fn pg_cells(row: &tokio_postgres::Row) -> anyhow::Result<Vec<Cell>> {
    use tokio_postgres::types::Type;
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_().clone();
            Ok(if ty == Type::INT8 {
                row.try_get::<_, Option<i64>>(i)?
                    .map_or(Cell::Null, Cell::Int)
            } else if ty == Type::INT4 {
                row.try_get::<_, Option<i32>>(i)?
                    .map_or(Cell::Null, |v| Cell::Int(i64::from(v)))
            } else if ty == Type::FLOAT8 {
                row.try_get::<_, Option<f64>>(i)?
                    .map_or(Cell::Null, Cell::Real)
            } else {
                row.try_get::<_, Option<String>>(i)?
                    .map_or(Cell::Null, Cell::Text)
            })
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_for_postgresql_reads_on_sqlite() {
        assert_eq!(
            sqlite_sql("SELECT sum(a)::bigint, b::float8 FROM t WHERE x = $1 AND y < $2"),
            "SELECT sum(a), b FROM t WHERE x = ?1 AND y < ?2"
        );
    }

    #[test]
    fn periods_are_whole_utc_days() {
        let now = DateTime::parse_from_rfc3339("2026-12-02T15:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let m = Period::month_to_date(now);
        assert_eq!(
            (m.since.as_str(), m.until.as_str(), m.last.as_str()),
            ("2026-12-01", "2026-12-03", "2026-12-02")
        );
        let d = Period::last_days(now, 30);
        assert_eq!(
            (d.since.as_str(), d.until.as_str()),
            ("2026-11-03", "2026-12-03")
        );
    }
}
