//! The admin dashboard on `admin_listen`: who spends what, live, as server-rendered pages with
//! inline SVG charts, and the same figures as JSON under `/api/` (and the users table as CSV).
//!
//! Access is the admin token's (`[admin] token_sha256`): `Authorization: Bearer`, or the
//! cookie the sign-in form at `/login` sets. Without a credential the answer is 401; with a
//! user's API key, or any token that is not the admin's, 403.
//!
//! This module never serves on the main listener (only [`crate::server::admin_router`] mounts
//! it), never shows a prompt or a completion (the ledger holds none), never writes to the
//! ledger and never reads the month's raw rows (see [`data`]).

pub mod data;
mod render;
pub mod sso;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::auth::KeyHash;
use crate::meter::report::{GroupBy, Row};
use crate::state::AppState;
use data::{Minute, Period, Recent, Source};

/// The cookie the sign-in form sets: the admin token itself, HttpOnly and SameSite=Strict.
pub const COOKIE: &str = "bedrock_gate_admin";
/// Models listed on the overview.
const TOP_MODELS: usize = 5;
/// Longest token the sign-in form takes.
const MAX_FORM_BYTES: usize = 4096;

/// Budget use past which a user's bar turns amber; at the cap it is red.
pub const AMBER_AT: f64 = 0.75;

/// The dashboard's routes, for the admin listener.
pub fn routes() -> Router<Arc<AppState>> {
    use axum::routing::get;
    Router::new()
        .route("/", get(overview_page))
        .route("/users", get(users_page))
        .route("/users/{name}", get(user_page))
        .route("/profiles", get(profiles_page))
        .route("/login", get(login_page).post(login))
        .route("/login/sso", get(sso::start))
        .route("/oauth/callback", get(sso::finish))
        .route("/logout", axum::routing::post(logout))
        .route("/api/overview", get(overview_api))
        .route("/api/users", get(users_api))
        .route("/api/users.csv", get(users_csv))
        .route("/api/users/{name}", get(user_api))
        .route("/api/profiles", get(profiles_api))
}

/// Who asks: the admin, or why not.
enum Access {
    Admin,
    /// No credential: 401, and a browser is sent to the sign-in form.
    Unauthenticated(&'static str),
    /// A credential that is not the admin's: 403.
    Forbidden(&'static str),
}

fn access(state: &AppState, headers: &HeaderMap) -> Access {
    let live = state.live.load();
    if let Some(session) = sso::cookie(headers, sso::SESSION_COOKIE)
        && state.admin_sso.session(&session)
    {
        return Access::Admin;
    }
    let presented = bearer(headers).or_else(|| sso::cookie(headers, COOKIE));
    let Some(token) = presented else {
        return Access::Unauthenticated(
            "sign in with the admin token (Authorization: Bearer, or the form at /login)",
        );
    };
    let hash = KeyHash::of_key(&token);
    match &live.config.admin.token {
        Some(admin) if *admin == hash => Access::Admin,
        _ if live.config.users.by_key(&hash).is_some() => {
            Access::Forbidden("this is a user's API key; the dashboard takes the admin token")
        }
        None => Access::Forbidden(
            "no admin token is configured: set [admin] token_sha256 (bedrock-gate keygen makes one)",
        ),
        Some(_) => Access::Forbidden("not the admin token"),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// The refusal for a page (a browser goes to the sign-in form) or an API call (JSON).
fn refuse(access: Access, page: bool) -> Response {
    let (status, why) = match access {
        Access::Admin => return StatusCode::OK.into_response(),
        Access::Unauthenticated(why) => (StatusCode::UNAUTHORIZED, why),
        Access::Forbidden(why) => (StatusCode::FORBIDDEN, why),
    };
    let mut resp = failure(status, why, page);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"bedrock-gate admin\""),
        );
    }
    resp
}

/// An answer that is not the figures: `status` and why, as a page or as the API's JSON error.
fn failure(status: StatusCode, why: &str, page: bool) -> Response {
    secure(if page {
        (status, render::html(&render::refusal(status, why))).into_response()
    } else {
        (
            status,
            axum::Json(serde_json::json!({"error": {"status": status.as_u16(), "message": why}})),
        )
            .into_response()
    })
}

/// Every answer: not cached, not framed, no referrer, no script or style from anywhere else.
fn secure(mut resp: Response) -> Response {
    use header::HeaderValue;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn source(state: &AppState) -> Source {
    match &state.meter.reader {
        Some(reader) => Source::Store(reader.clone()),
        None => Source::Sqlite(state.meter.ledger.path().to_path_buf()),
    }
}

/// A read of the ledger failed: 503, saying so (the ledger's own error goes to the log only).
fn unavailable(e: &anyhow::Error, page: bool) -> Response {
    tracing::warn!(error = %format!("{e:#}"), "dashboard: ledger read failed");
    failure(
        StatusCode::SERVICE_UNAVAILABLE,
        "the ledger could not be read just now; try again in a moment",
        page,
    )
}

/// Sums of a period.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_usd: f64,
    pub errors: u64,
    /// errors / requests (0 without requests).
    pub error_rate: f64,
}

impl Totals {
    /// The report's TOTAL line of `rows`, with its error rate.
    fn of(rows: &[Row]) -> Totals {
        let t = crate::meter::report::total(rows);
        Totals {
            requests: t.requests,
            input_tokens: t.input_tokens,
            output_tokens: t.output_tokens,
            cache_read_tokens: t.cache_read_tokens,
            cache_write_tokens: t.cache_write_tokens,
            cost_usd: t.cost_usd,
            errors: t.error_requests,
            error_rate: rate(t.error_requests, t.requests),
        }
    }
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Spend per day, one series per user (the chart's stacks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Daily {
    pub days: Vec<String>,
    pub series: Vec<Series>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub user: String,
    /// One per day of [`Daily::days`].
    pub cost_usd: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    pub generated_at: String,
    pub period: Period,
    pub month: Totals,
    pub daily: Daily,
    /// The last 60 minutes, oldest first, every minute present.
    pub minutes: Vec<Minute>,
    pub last_hour: Totals,
    pub top_models: Vec<Row>,
}

/// A user's line in the users table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserLine {
    pub user: String,
    /// Whether the config still has this user (a removed user's spend stays in the ledger).
    pub configured: bool,
    pub requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_usd: f64,
    pub errors: u64,
    pub budget_usd: Option<f64>,
    /// cost / budget.
    pub budget_used: Option<f64>,
    /// `ok`, `amber` (≥ 75 % of the budget) or `red` (at the cap); `none` without a budget.
    pub budget_level: &'static str,
    /// Last call, Unix ms (any time, not only this period).
    pub last_seen_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Users {
    pub generated_at: String,
    pub period: Period,
    pub users: Vec<UserLine>,
    /// Calls no key identified (refused before a user was known).
    pub unidentified: Option<Row>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserDetail {
    pub generated_at: String,
    pub period: Period,
    pub line: UserLine,
    pub days: Vec<Row>,
    pub models: Vec<Row>,
    pub projects: Vec<Row>,
    pub sessions: Vec<Row>,
    pub recent: Vec<Recent>,
}

/// A profile the config maps, as the proxy calls it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProfileLine {
    pub user: String,
    /// The config key: the base model id the user asks for.
    pub model: String,
    /// The profile's ARN; `auto` when `profiles apply` has not made it yet.
    pub arn: String,
    pub region: String,
    /// The cost-allocation tag the profile carries (`provisioning.tag_key`) and its value.
    pub tag_key: String,
    pub tag_value: String,
    /// Mapped to `"auto"` and not provisioned yet.
    pub pending: bool,
    /// This profile's line in the last `profiles verify` (`exists`, `status`,
    /// `model_matches`, `tags`, `shared`), if it was checked.
    pub verify: Option<serde_json::Value>,
    /// Whether that line was all right.
    pub verify_ok: Option<bool>,
}

/// When a check last ran and whether it passed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Checked {
    pub at: String,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Profiles {
    pub generated_at: String,
    pub profiles: Vec<ProfileLine>,
    /// The last `profiles verify`: when, whether all was well, and the cost tags' states.
    pub verify: Option<Checked>,
    pub tags: Option<serde_json::Value>,
    /// The last `reconcile`: when, whether every final day agreed, and its result (`since`,
    /// `until`, `rows`, `total`, `tolerance_pct`, `days_over`).
    pub reconcile: Option<Checked>,
    pub reconcile_result: Option<serde_json::Value>,
}

async fn profiles(state: &AppState, now: DateTime<Utc>) -> anyhow::Result<Profiles> {
    let checks = source(state).checks().await?;
    let find = |kind: &str| checks.iter().find(|c| c.kind == kind);
    let checked = |c: &crate::admin::checks::Check| Checked {
        at: chrono::DateTime::from_timestamp_millis(c.at_ms).map_or_else(String::new, stamp),
        ok: c.ok,
    };
    let verify = find(crate::admin::checks::VERIFY);
    let reconcile = find(crate::admin::checks::RECONCILE);
    // The last verify's line for a profile, and whether it was all right by verify's own rule.
    let verified = |user: &str, model: &str, arn: &str| -> Option<(serde_json::Value, bool)> {
        let line = verify?.result["profiles"]
            .as_array()?
            .iter()
            .find(|r| r["user"] == user && r["model"] == model && r["arn"] == arn)?
            .clone();
        let ok = serde_json::from_value::<crate::admin::provision::VerifyRow>(line.clone())
            .is_ok_and(|r| r.ok());
        Some((line, ok))
    };
    let live = state.live.load();
    let config = &live.config;
    let tag_key = config.provisioning.tag_key.clone();
    let mut out = Vec::new();
    for user in config.users.iter() {
        for (model, p) in &user.models {
            let (v, ok) = verified(&user.name, model, &p.arn).unzip();
            out.push(ProfileLine {
                user: user.name.clone(),
                model: model.clone(),
                arn: p.arn.clone(),
                region: p.parsed.region.clone(),
                tag_key: tag_key.clone(),
                tag_value: user.name.clone(),
                pending: false,
                verify_ok: ok,
                verify: v,
            });
        }
        for model in &user.pending {
            out.push(ProfileLine {
                user: user.name.clone(),
                model: model.clone(),
                arn: "auto".into(),
                region: config.aws.region.clone(),
                tag_key: tag_key.clone(),
                tag_value: user.name.clone(),
                pending: true,
                verify: None,
                verify_ok: None,
            });
        }
    }
    Ok(Profiles {
        generated_at: stamp(now),
        profiles: out,
        verify: verify.map(checked),
        tags: verify.map(|c| c.result["tags"].clone()),
        reconcile: reconcile.map(checked),
        reconcile_result: reconcile.map(|c| c.result.clone()),
    })
}

fn stamp(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

async fn overview(state: &AppState, now: DateTime<Utc>) -> anyhow::Result<Overview> {
    let src = source(state);
    let period = Period::month_to_date(now);
    let by_user = src.report(&period, GroupBy::User).await?;
    let mut models = src.report(&period, GroupBy::Model).await?;
    models.truncate(TOP_MODELS);
    let chart = Period::last_days(now, data::CHART_DAYS);
    let spend = src.daily_by_user(&chart).await?;
    let hour_start = (now.timestamp() / 60 - 59) * 60;
    let seen = src.minutes_since(hour_start * 1000).await?;
    let minutes: Vec<Minute> = (0..60)
        .map(|i| {
            let at = hour_start + i * 60;
            seen.iter().find(|m| m.at == at).cloned().unwrap_or(Minute {
                at,
                requests: 0,
                errors: 0,
            })
        })
        .collect();
    let count =
        |f: fn(&Minute) -> i64| u64::try_from(minutes.iter().map(f).sum::<i64>()).unwrap_or(0);
    let (requests, errors) = (count(|m| m.requests), count(|m| m.errors));
    let last_hour = Totals {
        requests,
        errors,
        error_rate: rate(errors, requests),
        ..Totals::default()
    };
    Ok(Overview {
        generated_at: stamp(now),
        month: Totals::of(&by_user),
        daily: daily(&chart, &spend),
        minutes,
        last_hour,
        top_models: models,
        period,
    })
}

fn daily(chart: &Period, spend: &BTreeMap<(String, String), f64>) -> Daily {
    let mut days = Vec::new();
    let mut d = chart.since.clone();
    while d < chart.until {
        days.push(d.clone());
        d = chrono::NaiveDate::parse_from_str(&d, "%Y-%m-%d")
            .ok()
            .and_then(|x| x.succ_opt())
            .map_or_else(|| chart.until.clone(), |x| x.format("%Y-%m-%d").to_string());
    }
    let mut by_user: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for ((day, user), cost) in spend {
        if let Some(i) = days.iter().position(|d| d == day) {
            by_user.entry(user).or_insert_with(|| vec![0.0; days.len()])[i] += cost;
        }
    }
    let mut series: Vec<Series> = by_user
        .into_iter()
        .map(|(user, cost_usd)| Series {
            user: user.to_string(),
            cost_usd,
        })
        .collect();
    // Biggest spender at the bottom of each stack.
    series.sort_by(|a, b| {
        let (sa, sb) = (
            a.cost_usd.iter().sum::<f64>(),
            b.cost_usd.iter().sum::<f64>(),
        );
        sb.total_cmp(&sa).then_with(|| a.user.cmp(&b.user))
    });
    Daily { days, series }
}

fn line(
    name: &str,
    row: Option<&Row>,
    config: &crate::config::Config,
    seen: &BTreeMap<String, i64>,
) -> UserLine {
    let row = row.cloned().unwrap_or_default();
    let user = config.users.by_name(name);
    let budget = user.and_then(|u| u.limits.monthly_budget_usd);
    let used = budget.map(|b| if b > 0.0 { row.cost_usd / b } else { 1.0 });
    UserLine {
        user: name.to_string(),
        configured: user.is_some(),
        requests: row.requests,
        input_tokens: row.input_tokens,
        output_tokens: row.output_tokens,
        cache_read_tokens: row.cache_read_tokens,
        cache_write_tokens: row.cache_write_tokens,
        cost_usd: row.cost_usd,
        errors: row.error_requests,
        budget_usd: budget,
        budget_used: used,
        budget_level: match used {
            None => "none",
            Some(u) if u >= 1.0 => "red",
            Some(u) if u >= AMBER_AT => "amber",
            Some(_) => "ok",
        },
        last_seen_ms: seen.get(name).copied(),
    }
}

async fn users(state: &AppState, now: DateTime<Utc>) -> anyhow::Result<Users> {
    let src = source(state);
    let period = Period::month_to_date(now);
    let rows = src.report(&period, GroupBy::User).await?;
    let live = state.live.load();
    let config = &live.config;
    let unidentified = rows.iter().find(|r| r.key == "(unidentified)").cloned();
    let mut names: Vec<String> = config.users.iter().map(|u| u.name.clone()).collect();
    for r in &rows {
        if r.key != "(unidentified)" && !names.contains(&r.key) {
            names.push(r.key.clone());
        }
    }
    let seen = src.last_seen(&names).await?;
    let mut users: Vec<UserLine> = names
        .iter()
        .map(|n| line(n, rows.iter().find(|r| &r.key == n), config, &seen))
        .collect();
    users.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then_with(|| a.user.cmp(&b.user))
    });
    Ok(Users {
        generated_at: stamp(now),
        period,
        users,
        unidentified,
    })
}

async fn user_detail(
    state: &AppState,
    name: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Option<UserDetail>> {
    let src = source(state);
    let period = Period::month_to_date(now);
    let live = state.live.load();
    let rows = src.user_report(name, &period, GroupBy::User).await?;
    if rows.is_empty() && live.config.users.by_name(name).is_none() {
        return Ok(None);
    }
    let seen = src.last_seen(&[name.to_string()]).await?;
    let line = line(name, rows.first(), &live.config, &seen);
    let chart = Period::last_days(now, data::CHART_DAYS);
    Ok(Some(UserDetail {
        generated_at: stamp(now),
        line,
        days: src.user_report(name, &chart, GroupBy::Day).await?,
        models: src.user_report(name, &period, GroupBy::Model).await?,
        projects: src.user_report(name, &period, GroupBy::Project).await?,
        sessions: src.user_report(name, &period, GroupBy::Session).await?,
        recent: src.recent(name).await?,
        period,
    }))
}

// ---- handlers ----

/// How an answer is written: a page (HTML by this renderer; refusals as pages too) or the
/// API (JSON).
enum As<T> {
    Page(fn(&T) -> String),
    Json,
}

/// The admin's answer: `fetch` the figures, then write them as `how` says; a missing subject
/// (`Ok(None)`) is a 404, a failed read a 503.
async fn answer<T, Fut>(state: &AppState, headers: &HeaderMap, how: As<T>, fetch: Fut) -> Response
where
    T: Serialize,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let page = matches!(how, As::Page(_));
    let a = access(state, headers);
    if !matches!(a, Access::Admin) {
        return refuse(a, page);
    }
    match fetch.await {
        Ok(Some(v)) => match how {
            As::Page(write) => secure(render::html(&write(&v)).into_response()),
            As::Json => secure(axum::Json(v).into_response()),
        },
        Ok(None) => failure(
            StatusCode::NOT_FOUND,
            "no such user in the config or in this month's ledger",
            page,
        ),
        Err(e) => unavailable(&e, page),
    }
}

async fn overview_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let how = As::Page(render::overview);
    answer(&state, &headers, how, async {
        overview(&state, Utc::now()).await.map(Some)
    })
    .await
}

async fn overview_api(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    answer(&state, &headers, As::Json, async {
        overview(&state, Utc::now()).await.map(Some)
    })
    .await
}

async fn users_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let how = As::Page(render::users);
    answer(&state, &headers, how, async {
        users(&state, Utc::now()).await.map(Some)
    })
    .await
}

async fn users_api(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    answer(&state, &headers, As::Json, async {
        users(&state, Utc::now()).await.map(Some)
    })
    .await
}

async fn user_page(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let how = As::Page(render::user);
    answer(
        &state,
        &headers,
        how,
        user_detail(&state, &name, Utc::now()),
    )
    .await
}

async fn user_api(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer(
        &state,
        &headers,
        As::Json,
        user_detail(&state, &name, Utc::now()),
    )
    .await
}

async fn profiles_page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let how = As::Page(render::profiles);
    answer(&state, &headers, how, async {
        profiles(&state, Utc::now()).await.map(Some)
    })
    .await
}

async fn profiles_api(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    answer(&state, &headers, As::Json, async {
        profiles(&state, Utc::now()).await.map(Some)
    })
    .await
}

async fn users_csv(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let a = access(&state, &headers);
    if !matches!(a, Access::Admin) {
        return refuse(a, false);
    }
    match users(&state, Utc::now()).await {
        Ok(u) => {
            let name = format!("bedrock-gate-users-{}.csv", u.period.since);
            let mut resp = render::users_csv(&u).into_response();
            let h = resp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/csv; charset=utf-8"),
            );
            if let Ok(v) =
                header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
            {
                h.insert(header::CONTENT_DISPOSITION, v);
            }
            secure(resp)
        }
        Err(e) => unavailable(&e, false),
    }
}

async fn login_page(State(state): State<Arc<AppState>>) -> Response {
    let sso = state.live.load().config.admin.sso();
    secure(render::html(&render::login(None, sso)).into_response())
}

/// The sign-in form's POST: a right token sets the cookie and goes to the overview.
async fn login(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    if body.len() > MAX_FORM_BYTES {
        return secure(
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                render::html(&render::login(Some("that is not an admin token"), false)),
            )
                .into_response(),
        );
    }
    let token = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let right = state
        .live
        .load()
        .config
        .admin
        .token
        .as_ref()
        .is_some_and(|h| *h == KeyHash::of_key(&token));
    if !right {
        return secure(
            (
                StatusCode::FORBIDDEN,
                render::html(&render::login(
                    Some("not the admin token ([admin] token_sha256 in the config)"),
                    state.live.load().config.admin.sso(),
                )),
            )
                .into_response(),
        );
    }
    let value = percent_encoding::utf8_percent_encode(&token, percent_encoding::NON_ALPHANUMERIC);
    let cookie = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    secure(resp)
}

async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(session) = sso::cookie(&headers, sso::SESSION_COOKIE) {
        if let Some(who) = state.admin_sso.who(&session) {
            tracing::info!(who = %who, "admin signed out of the dashboard");
        }
        state.admin_sso.end(&session);
    }
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
    for name in [COOKIE, sso::SESSION_COOKIE] {
        let gone = format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
        if let Ok(v) = header::HeaderValue::from_str(&gone) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    secure(resp)
}
