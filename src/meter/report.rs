//! The `usage` report: per user, model, profile, day, project, Claude Code session or front,
//! from the ledger, as a table, CSV or JSON. Read-only; safe to run while `serve` writes, and on
//! a ledger older than the labels (its rows count as unlabelled).
//!
//! A range of whole UTC days (what the CLI always asks for) is answered from the ledger's
//! `usage_daily` rollups, a few lines per user and day, so a month costs the same with 10 M rows
//! as with 10 k; any other range, or a ledger no `serve` of schema version 5 has opened yet,
//! from the rows. Both give the same report: a rollup's `''` prints as the NULL it stands for.

use chrono::{NaiveDate, TimeZone, Utc};
use rusqlite::Connection;
use serde::Serialize;

use crate::meter::ledger::{DAY_MS, ERROR_SQL, INCOMPLETE_SQL, UNPRICED_SQL, day_of, rolled_up};

/// What rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    User,
    Model,
    Profile,
    Day,
    /// `x-bedrock-gate-project`, or the Messages body's `tags` value.
    Project,
    /// Claude Code's `x-claude-code-session-id`.
    Session,
    /// The protocol: `bedrock` or `anthropic`.
    Front,
}

impl GroupBy {
    /// The grouping expression; `labelled` says whether the ledger has the label columns.
    fn column(self, labelled: bool) -> &'static str {
        match (self, labelled) {
            (GroupBy::User, _) => "coalesce(user, '(unidentified)')",
            (GroupBy::Model, _) => "coalesce(base_model, model, '-')",
            (GroupBy::Profile, _) => "coalesce(profile_arn, '-')",
            (GroupBy::Day, _) => "strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch')",
            (GroupBy::Project, true) => "coalesce(project, '-')",
            (GroupBy::Session, true) => "coalesce(session, '-')",
            (GroupBy::Front, true) => "coalesce(front, 'bedrock')",
            // Written before there were labels, or a second front.
            (GroupBy::Project | GroupBy::Session, false) => "'-'",
            (GroupBy::Front, false) => "'bedrock'",
        }
    }

    /// The grouping expression over `usage_daily`, printing `''` as [`GroupBy::column`] prints
    /// NULL.
    pub(crate) fn rollup_column(self) -> &'static str {
        match self {
            GroupBy::User => "CASE \"user\" WHEN '' THEN '(unidentified)' ELSE \"user\" END",
            GroupBy::Model => "CASE model WHEN '' THEN '-' ELSE model END",
            GroupBy::Profile => "CASE profile WHEN '' THEN '-' ELSE profile END",
            GroupBy::Day => "day",
            GroupBy::Project => "CASE project WHEN '' THEN '-' ELSE project END",
            GroupBy::Session => "CASE session WHEN '' THEN '-' ELSE session END",
            GroupBy::Front => "CASE front WHEN '' THEN 'bedrock' ELSE front END",
        }
    }

    fn name(self) -> &'static str {
        match self {
            GroupBy::User => "user",
            GroupBy::Model => "model",
            GroupBy::Profile => "profile",
            GroupBy::Day => "day",
            GroupBy::Project => "project",
            GroupBy::Session => "session",
            GroupBy::Front => "front",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// One line of the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    pub key: String,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// Estimated, priced requests only.
    pub cost_usd: f64,
    /// Requests with tokens but no price: their cost is missing from `cost_usd`.
    pub unpriced_requests: u64,
    /// Calls whose usage was not all seen: streams cut before their end, and calls a crash of
    /// the proxy interrupted (outcome `interrupted`; Bedrock may have billed them).
    pub incomplete_requests: u64,
    /// Requests that did not get a 200, or that Bedrock ended with an error (an exception
    /// frame, a broken or silent stream). An interrupted call is incomplete, not an error.
    pub error_requests: u64,
}

/// Parses `YYYY-MM-DD` as the start of that UTC day, in Unix milliseconds.
pub fn day_start_ms(s: &str) -> Result<i64, String> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| format!("`{s}` is not a date like 2026-11-01"))?;
    let t = d.and_hms_opt(0, 0, 0).ok_or("bad date")?;
    Ok(Utc.from_utc_datetime(&t).timestamp_millis())
}

/// The `[since, until)` range as `usage_daily` days, when it is whole UTC days and the ledger
/// has rollups.
fn rollup_days(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<Option<(String, String)>> {
    let whole = since_ms.rem_euclid(DAY_MS) == 0 && until_ms.rem_euclid(DAY_MS) == 0;
    let (since, until) = (day_of(since_ms), day_of(until_ms));
    // `''` is a day too far for SQLite to print: leave those ranges to the rows.
    if !whole || since.is_empty() || until.is_empty() || !rolled_up(conn)? {
        return Ok(None);
    }
    Ok(Some((since, until)))
}

/// Rows with `since_ms <= ts < until_ms`, most expensive first.
pub fn query(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
    by: GroupBy,
) -> rusqlite::Result<Vec<Row>> {
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let map = |r: &rusqlite::Row<'_>| {
        Ok(Row {
            key: r.get(0)?,
            requests: n(r.get(1)?),
            input_tokens: n(r.get(2)?),
            output_tokens: n(r.get(3)?),
            cache_read_tokens: n(r.get(4)?),
            cache_write_tokens: n(r.get(5)?),
            cost_usd: r.get(6)?,
            unpriced_requests: n(r.get(7)?),
            incomplete_requests: n(r.get(8)?),
            error_requests: n(r.get(9)?),
        })
    };
    if let Some((since, until)) = rollup_days(conn, since_ms, until_ms)? {
        let sql = format!(
            "SELECT {key} AS k, sum(requests), sum(input_tokens), sum(output_tokens),
                    sum(cache_read_tokens), sum(cache_write_tokens), total(cost_usd),
                    sum(unpriced), sum(incomplete), sum(errors)
             FROM usage_daily WHERE day >= ?1 AND day < ?2
             GROUP BY k ORDER BY total(cost_usd) DESC, k",
            key = by.rollup_column()
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([since, until], map)?;
        return rows.collect();
    }
    let labelled = conn
        .prepare("SELECT 1 FROM pragma_table_info('requests') WHERE name = 'project'")?
        .exists([])?;
    let sql = format!(
        "SELECT {key} AS k, count(*), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
                sum(cache_write_tokens), total(cost_usd),
                sum(CASE WHEN {UNPRICED_SQL} THEN 1 ELSE 0 END),
                sum(CASE WHEN {INCOMPLETE_SQL} THEN 1 ELSE 0 END),
                sum(CASE WHEN {ERROR_SQL} THEN 1 ELSE 0 END)
         FROM requests WHERE ts_ms >= ?1 AND ts_ms < ?2 GROUP BY k ORDER BY total(cost_usd) DESC, k",
        key = by.column(labelled)
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([since_ms, until_ms], map)?;
    rows.collect()
}

/// Estimated cost per (UTC day, user) of identified callers' requests with
/// `since_ms <= ts < until_ms`: the ledger's side of `reconcile`.
pub fn daily_costs(
    conn: &Connection,
    since_ms: i64,
    until_ms: i64,
) -> rusqlite::Result<std::collections::BTreeMap<(String, String), f64>> {
    let map = |r: &rusqlite::Row<'_>| {
        Ok((
            (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            r.get::<_, f64>(2)?,
        ))
    };
    if let Some((since, until)) = rollup_days(conn, since_ms, until_ms)? {
        let mut stmt = conn.prepare(
            "SELECT day, \"user\", total(cost_usd) FROM usage_daily
             WHERE day >= ?1 AND day < ?2 AND \"user\" <> '' GROUP BY day, \"user\"",
        )?;
        let rows = stmt.query_map([since, until], map)?;
        return rows.collect();
    }
    let mut stmt = conn.prepare(
        "SELECT strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch') AS d, user, total(cost_usd)
         FROM requests WHERE ts_ms >= ?1 AND ts_ms < ?2 AND user IS NOT NULL GROUP BY d, user",
    )?;
    let rows = stmt.query_map([since_ms, until_ms], map)?;
    rows.collect()
}

/// Writes `rows` as columns two spaces apart, each as wide as its widest cell: the first
/// `left` columns left-aligned (names), the rest right-aligned (numbers).
pub fn aligned<R: AsRef<[String]>>(out: &mut String, rows: &[R], left: usize) {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, c) in row.as_ref().iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            // `format!` pads by characters.
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, &w))| {
                if i < left {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
}

/// The sums of `rows`, as the report's TOTAL line.
pub(crate) fn total(rows: &[Row]) -> Row {
    rows.iter().fold(
        Row {
            key: "TOTAL".into(),
            ..Row::default()
        },
        |mut t, r| {
            t.requests += r.requests;
            t.input_tokens += r.input_tokens;
            t.output_tokens += r.output_tokens;
            t.cache_read_tokens += r.cache_read_tokens;
            t.cache_write_tokens += r.cache_write_tokens;
            t.cost_usd += r.cost_usd;
            t.unpriced_requests += r.unpriced_requests;
            t.incomplete_requests += r.incomplete_requests;
            t.error_requests += r.error_requests;
            t
        },
    )
}

fn cells(r: &Row) -> [String; 10] {
    [
        r.key.clone(),
        r.requests.to_string(),
        r.input_tokens.to_string(),
        r.output_tokens.to_string(),
        r.cache_read_tokens.to_string(),
        r.cache_write_tokens.to_string(),
        format!("{:.4}", r.cost_usd),
        r.unpriced_requests.to_string(),
        r.incomplete_requests.to_string(),
        r.error_requests.to_string(),
    ]
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Renders a report. `since`/`until` are shown as given (until exclusive).
pub fn render(rows: &[Row], by: GroupBy, format: Format, since: &str, until: &str) -> String {
    let header = [
        by.name(),
        "requests",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cost_usd",
        "unpriced",
        "incomplete",
        "errors",
    ];
    match format {
        Format::Json => serde_json::json!({
            "since": since,
            "until": until,
            "by": by.name(),
            "rows": rows,
            "total": total(rows),
        })
        .to_string(),
        Format::Csv => {
            let mut out = header.join(",");
            out.push('\n');
            for r in rows {
                out.push_str(
                    &cells(r)
                        .iter()
                        .map(|c| csv_field(c))
                        .collect::<Vec<_>>()
                        .join(","),
                );
                out.push('\n');
            }
            out
        }
        Format::Table => {
            let mut all: Vec<[String; 10]> = vec![header.map(|h| h.to_uppercase())];
            all.extend(rows.iter().map(cells));
            all.push(cells(&total(rows)));
            let mut out = format!("usage from {since} until {until} (UTC, cost estimated)\n");
            aligned(&mut out, &all, 1);
            if rows.iter().any(|r| r.unpriced_requests > 0) {
                out.push_str("note: unpriced requests have tokens but no [prices] entry; their cost is not included\n");
            }
            out
        }
    }
}

/// `until` given as an inclusive day becomes the next day's start.
pub fn until_exclusive_ms(day: &str) -> Result<i64, String> {
    Ok(day_start_ms(day)? + DAY_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Usage;
    use crate::meter::ledger::{Ledger, Record, open_read_only};

    fn rec(user: &str, day: &str, model: &str, input: u64, cost: Option<f64>) -> Record {
        Record {
            ts_ms: day_start_ms(day).unwrap() + 3_600_000,
            user: Some(user.into()),
            front: Some(
                if user == "alice" {
                    "anthropic"
                } else {
                    "bedrock"
                }
                .into(),
            ),
            project: (model == "m1").then(|| "apollo".into()),
            session: Some(format!("{user}-session")),
            operation: "Converse".into(),
            model: Some(format!("us.{model}")),
            base_model: Some(model.into()),
            profile_arn: Some(format!("arn:{user}:{model}")),
            status: 200,
            usage: Usage {
                input_tokens: input,
                output_tokens: 1,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
            },
            cost_usd: cost,
            latency_ms: 1,
            ttfb_ms: Some(1),
            request_id: crate::meter::ledger::unique_request_id(),
            upstream_request_id: None,
            complete: true,
            admitted: true,
            outcome: "complete".into(),
            marked: false,
        }
    }

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let l = Ledger::open(&path, crate::meter::ledger::Synchronous::Normal).unwrap();
        l.record(rec("alice", "2026-11-01", "m1", 10, Some(1.0)));
        l.record(rec("alice", "2026-11-02", "m2", 20, Some(2.0)));
        l.record(rec("bob", "2026-11-02", "m1", 5, None));
        l.record(rec("bob", "2026-10-31", "m1", 7, Some(9.0)));
        l.close();
        let c = open_read_only(&path).unwrap();
        (dir, c)
    }

    #[test]
    fn an_interrupted_call_is_incomplete_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let l = Ledger::open(&path, crate::meter::ledger::Synchronous::Normal).unwrap();
        let mut cut = rec("alice", "2026-11-01", "m1", 0, None);
        cut.usage = Usage::default();
        cut.status = 0;
        cut.complete = false;
        cut.outcome = "interrupted".into();
        l.record(cut);
        l.record(rec("alice", "2026-11-01", "m1", 10, Some(1.0)));
        l.close();
        let c = open_read_only(&path).unwrap();
        let rows = query(&c, 0, i64::MAX, GroupBy::User).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].requests, 2);
        assert_eq!(rows[0].incomplete_requests, 1);
        assert_eq!(rows[0].error_requests, 0);
        assert_eq!(
            rows[0].unpriced_requests, 0,
            "no tokens, so nothing unpriced"
        );
    }

    #[test]
    fn groups_and_date_ranges() {
        let (_d, c) = db();
        let since = day_start_ms("2026-11-01").unwrap();
        let until = until_exclusive_ms("2026-11-30").unwrap();
        let by_user = query(&c, since, until, GroupBy::User).unwrap();
        assert_eq!(by_user.len(), 2);
        assert_eq!(by_user[0].key, "alice");
        assert_eq!(by_user[0].input_tokens, 30);
        assert!((by_user[0].cost_usd - 3.0).abs() < 1e-9);
        assert_eq!(by_user[1].unpriced_requests, 1);
        let by_day = query(&c, since, until, GroupBy::Day).unwrap();
        let days: Vec<&str> = by_day.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(days, ["2026-11-02", "2026-11-01"]);
        let by_model = query(&c, since, until, GroupBy::Model).unwrap();
        assert_eq!(by_model.len(), 2);
        let by_profile = query(&c, 0, i64::MAX, GroupBy::Profile).unwrap();
        assert_eq!(by_profile.len(), 3);
        let keys = |by| -> Vec<(String, u64)> {
            let mut rows: Vec<_> = query(&c, since, until, by)
                .unwrap()
                .into_iter()
                .map(|r| (r.key, r.requests))
                .collect();
            rows.sort();
            rows
        };
        assert_eq!(
            keys(GroupBy::Project),
            [("-".to_string(), 1), ("apollo".to_string(), 2)]
        );
        assert_eq!(
            keys(GroupBy::Session),
            [
                ("alice-session".to_string(), 2),
                ("bob-session".to_string(), 1)
            ]
        );
        assert_eq!(
            keys(GroupBy::Front),
            [("anthropic".to_string(), 2), ("bedrock".to_string(), 1)]
        );
    }

    #[test]
    fn renders_all_formats() {
        let (_d, c) = db();
        let rows = query(&c, 0, i64::MAX, GroupBy::User).unwrap();
        let table = render(&rows, GroupBy::User, Format::Table, "a", "b");
        assert!(
            table.contains("TOTAL") && table.contains("USER") && table.contains("unpriced"),
            "{table}"
        );
        let csv = render(&rows, GroupBy::User, Format::Csv, "a", "b");
        assert_eq!(
            csv.lines().next().unwrap(),
            "user,requests,input_tokens,output_tokens,cache_read_tokens,cache_write_tokens,cost_usd,unpriced,incomplete,errors"
        );
        assert_eq!(csv.lines().count(), 3);
        let json: serde_json::Value =
            serde_json::from_str(&render(&rows, GroupBy::User, Format::Json, "a", "b")).unwrap();
        assert_eq!(json["total"]["requests"], 4);
        assert_eq!(json["rows"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn daily_costs_per_user() {
        let (_d, c) = db();
        let costs = daily_costs(&c, 0, i64::MAX).unwrap();
        assert_eq!(costs[&("2026-11-02".to_string(), "alice".to_string())], 2.0);
        assert_eq!(costs[&("2026-11-02".to_string(), "bob".to_string())], 0.0);
        assert_eq!(costs.len(), 4);
    }

    #[test]
    fn whole_days_from_rollups_read_as_the_rows_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let l = Ledger::open(&path, crate::meter::ledger::Synchronous::Normal).unwrap();
        l.record(rec("alice", "2026-11-01", "m1", 10, Some(1.0)));
        l.record(rec("alice", "2026-11-02", "m2", 20, Some(2.0)));
        l.record(rec("bob", "2026-11-02", "m1", 5, None));
        l.record(rec("bob", "2026-10-31", "m1", 7, Some(9.0)));
        let mut anon = rec("x", "2026-11-03", "m1", 0, None);
        anon.user = None;
        anon.front = None;
        anon.session = None;
        anon.profile_arn = None;
        anon.base_model = None;
        anon.model = None;
        anon.status = 403;
        anon.usage = Usage::default();
        anon.outcome = "AccessDeniedException".into();
        l.record(anon);
        let mut cut = rec("alice", "2026-11-03", "m2", 3, Some(0.5));
        cut.complete = false;
        cut.outcome = "upstream_idle".into();
        l.record(cut);
        l.close();
        let conn = crate::meter::ledger::open_db(&path).unwrap();
        let since = day_start_ms("2026-11-01").unwrap();
        let until = until_exclusive_ms("2026-11-30").unwrap();
        let all = [
            GroupBy::User,
            GroupBy::Model,
            GroupBy::Profile,
            GroupBy::Day,
            GroupBy::Project,
            GroupBy::Session,
            GroupBy::Front,
        ];
        let read = |conn: &Connection| {
            let reports: Vec<Vec<Row>> = all
                .iter()
                .map(|&by| query(conn, since, until, by).unwrap())
                .collect();
            (reports, daily_costs(conn, since, until).unwrap())
        };
        let from_rollups = read(&conn);
        assert!(from_rollups.0[0].iter().any(|r| r.key == "(unidentified)"));
        assert!(from_rollups.0[1].iter().any(|r| r.key == "-"));
        assert!(from_rollups.0[6].iter().any(|r| r.key == "bedrock"));
        // The same ledger as a version 4 one: the rows are read instead.
        conn.pragma_update(None, "user_version", 4).unwrap();
        assert_eq!(from_rollups, read(&conn));
        for (by, rows) in all.iter().zip(&from_rollups.0) {
            let table = render(rows, *by, Format::Table, "2026-11-01", "2026-11-30");
            let raw = query(&conn, since, until, *by).unwrap();
            assert_eq!(
                table,
                render(&raw, *by, Format::Table, "2026-11-01", "2026-11-30")
            );
        }
    }

    #[test]
    fn bad_dates_are_refused() {
        assert!(day_start_ms("2026-13-01").is_err());
        assert!(day_start_ms("yesterday").is_err());
    }
}
