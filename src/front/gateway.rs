//! The Claude Code gateway protocol's bearer endpoints besides Messages: `GET
//! /managed/settings`, `GET /api/oauth/usage` and `POST /v1/{metrics,logs,traces}`. Answered by
//! the proxy itself once the caller is identified (a signed-in bearer or an API key); nothing
//! here reaches Bedrock.
//!
//! Managed settings follow the protocol's checksum rule (`sha256:` + hex SHA-256 of the settings
//! JSON with keys sorted at every level and no whitespace; the quoted checksum is the `ETag`;
//! 304 only on a matching `If-None-Match`; 404 for no policy). Telemetry is answered 200 at
//! once and, with `[telemetry] otlp_endpoint`, forwarded in the background with the proxy's own
//! headers: never the developer's bearer, never waiting on the collector.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use chrono::{DateTime, Datelike, Duration as Days, TimeZone, Utc};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::identify::Caller;
use crate::refusal::Refusal;
use crate::state::AppState;
use crate::upstream::payload::PayloadBuilder;

/// Largest telemetry batch accepted.
const MAX_TELEMETRY_BYTES: usize = 5 * 1024 * 1024;
/// At most this many forwards to the collector at once; more are dropped (and counted in the log).
const MAX_FORWARDS: usize = 8;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// A recognised gateway-protocol request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    ManagedSettings,
    Usage,
    /// `metrics`, `logs` or `traces`.
    Telemetry(&'static str),
}

/// Whether a path is one of these endpoints (the others under `/v1/` are Messages').
pub fn parse(method: &Method, path: &str) -> Option<Route> {
    let path = path.strip_suffix('/').unwrap_or(path);
    match (method, path) {
        (&Method::GET, "/managed/settings") => Some(Route::ManagedSettings),
        (&Method::GET, "/api/oauth/usage") => Some(Route::Usage),
        (&Method::POST, "/v1/metrics") => Some(Route::Telemetry("metrics")),
        (&Method::POST, "/v1/logs") => Some(Route::Telemetry("logs")),
        (&Method::POST, "/v1/traces") => Some(Route::Telemetry("traces")),
        _ => None,
    }
}

/// Paths whose unknown methods are still refused in the Anthropic shape.
pub fn owns(path: &str) -> bool {
    path.starts_with("/managed/") || path.starts_with("/api/oauth/")
}

/// Answers a gateway request for an identified caller.
pub async fn answer(
    route: &Route,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
    state: &AppState,
    config: &Config,
) -> Result<Response, Refusal> {
    match route {
        Route::ManagedSettings => Ok(managed_settings(caller, headers, config)),
        Route::Usage => Ok(usage(caller, state).await),
        Route::Telemetry(signal) => telemetry(signal, headers, body, config).await,
    }
}

/// JSON with keys sorted at every level and no whitespace.
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap_or_default());
                    out.push(':');
                    write(&map[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// The protocol's checksum of a settings object.
pub fn checksum(settings: &Map<String, Value>) -> String {
    let text = canonical_json(&Value::Object(settings.clone()));
    format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes())))
}

/// A stable id for a user's policy, UUID-shaped.
fn policy_uuid(user: &str) -> String {
    let h = hex::encode(Sha256::digest(format!(
        "bedrock-gate managed settings:{user}"
    )));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn if_none_match_hits(headers: &HeaderMap, checksum: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| t == checksum)
}

fn json(status: StatusCode, body: &Value) -> Response {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `GET /managed/settings`.
fn managed_settings(caller: &Caller, headers: &HeaderMap, config: &Config) -> Response {
    let groups = caller
        .session
        .as_ref()
        .map(|s| s.groups.as_slice())
        .unwrap_or_default();
    let Some(settings) = config
        .settings
        .for_user(caller.user.managed_settings.as_ref(), groups)
    else {
        return json(
            StatusCode::NOT_FOUND,
            &json!({"type": "error", "error": {"type": "not_found_error",
                "message": "This bedrock-gate has no managed settings for you."}}),
        );
    };
    let sum = checksum(&settings);
    let etag = HeaderValue::from_str(&format!("\"{sum}\"")).ok();
    let mut resp = if if_none_match_hits(headers, &sum) {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        json(
            StatusCode::OK,
            &json!({"uuid": policy_uuid(&caller.user.name), "checksum": sum, "settings": settings}),
        )
    };
    let h = resp.headers_mut();
    if let Some(etag) = etag {
        h.insert(header::ETAG, etag);
    }
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    resp
}

fn cents(usd: f64) -> i64 {
    (usd * 100.0).round() as i64
}

fn iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Spend in USD of `user` since the start of each of these days (`YYYY-MM-DD`), from the
/// ledger's daily rollup.
fn spend_since(path: &std::path::Path, user: &str, days: &[String]) -> anyhow::Result<Vec<f64>> {
    let conn = crate::meter::ledger::open_read_only(path)?;
    let mut stmt = conn.prepare_cached(
        "SELECT total(cost_usd) FROM usage_daily WHERE \"user\" = ?1 AND day >= ?2",
    )?;
    days.iter()
        .map(|d| {
            stmt.query_row(rusqlite::params![user, d], |r| r.get(0))
                .map_err(Into::into)
        })
        .collect()
}

/// The same from the shared store: every replica's spend.
async fn store_spend_since(
    reader: &crate::store::Lazy,
    user: &str,
    days: &[String],
) -> anyhow::Result<Vec<f64>> {
    let client = reader.get().await?;
    crate::store::pg::spend_since_days(&client, user, days).await
}

/// `GET /api/oauth/usage`: the caller's budget in dollars, as Claude Code's `/usage` reads it.
async fn usage(caller: &Caller, state: &AppState) -> Response {
    let now = Utc::now();
    let user = &caller.user;
    let (month, totals) = state.meter.accounts.month_totals(&user.name, now);
    let resets = month.next().start();
    let mut resp = match user.limits.monthly_budget_usd {
        Some(budget) => {
            let standing = crate::domain::Standing {
                budget_usd: budget,
                spent_usd: totals.cost_usd,
                resets_at: resets.timestamp(),
            };
            let mut percent = (standing.utilization() * 100.0).round();
            if !standing.exhausted() {
                // As the headers do: below the cap while calls are still allowed.
                percent = percent.min(99.0);
            }
            let percent = percent as i64;
            let severity = match percent {
                p if p >= 95 => "critical",
                p if p >= 75 => "warning",
                _ => "normal",
            };
            json(
                StatusCode::OK,
                &json!({
                    "extra_usage": {
                        "is_enabled": true,
                        "monthly_limit": cents(budget),
                        "used_credits": cents(totals.cost_usd),
                        "utilization": percent,
                        "currency": "USD",
                    },
                    "limits": [{
                        "kind": "spend",
                        "group": "monthly",
                        "percent": percent,
                        "resets_at": iso(resets),
                        "severity": severity,
                        "is_active": true,
                    }],
                }),
            )
        }
        None => {
            let day = Utc
                .with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0)
                .single()
                .unwrap_or(now);
            let week = day - Days::days(i64::from(now.weekday().num_days_from_monday()));
            let since = [day, week].map(|d| d.format("%Y-%m-%d").to_string());
            let spent = match &state.meter.reader {
                Some(reader) => store_spend_since(reader, &user.name, &since).await,
                None => {
                    let path = state.meter.ledger.path().to_path_buf();
                    let name = user.name.clone();
                    tokio::task::spawn_blocking(move || spend_since(&path, &name, &since))
                        .await
                        .map_err(anyhow::Error::from)
                        .and_then(|r| r)
                }
            };
            let (daily, weekly) = match spent {
                Ok(v) => (v[0], v[1]),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "usage: ledger read failed");
                    (0.0, 0.0)
                }
            };
            let amount =
                |usd: f64| json!({"limit": null, "used_credits": cents(usd), "utilization": null});
            json(
                StatusCode::OK,
                &json!({
                    "extra_usage": {
                        "is_enabled": true,
                        "monthly_limit": null,
                        "used_credits": cents(totals.cost_usd),
                        "utilization": null,
                        "currency": "USD",
                        "daily": amount(daily),
                        "weekly": amount(weekly),
                    },
                    "limits": [],
                }),
            )
        }
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<Bytes>,
>;

fn forwarder() -> &'static (Client, tokio::sync::Semaphore) {
    static CLIENT: OnceLock<(Client, tokio::sync::Semaphore)> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let https = crate::upstream::tls_connector().enable_http1().build();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(https);
        (client, tokio::sync::Semaphore::new(MAX_FORWARDS))
    })
}

/// `POST /v1/{metrics,logs,traces}`: 200 at once (a 404 makes the client log an error on
/// every flush); forwarded to `[telemetry] otlp_endpoint` when set.
async fn telemetry(
    signal: &'static str,
    headers: &HeaderMap,
    body: Body,
    config: &Config,
) -> Result<Response, Refusal> {
    let payload = super::read_body(
        body,
        PayloadBuilder::unhashed(),
        headers,
        MAX_TELEMETRY_BYTES,
        config.timeouts.request_body,
        None,
    )
    .await?;
    let content_type = headers.get(header::CONTENT_TYPE).cloned();
    let protobuf = content_type
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("protobuf"));
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        let url = format!("{endpoint}/v1/{signal}");
        let mut request = http::Request::builder().method(Method::POST).uri(&url);
        if let Some(ct) = &content_type {
            request = request.header(header::CONTENT_TYPE, ct.clone());
        }
        if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
            request = request.header(header::CONTENT_ENCODING, enc.clone());
        }
        for (name, value) in &config.telemetry.headers {
            request = request.header(name, value.clone());
        }
        let bytes = payload.to_bytes();
        match request.body(http_body_util::Full::new(bytes)) {
            Ok(request) => {
                let (client, slots) = forwarder();
                match slots.try_acquire() {
                    Ok(permit) => {
                        tokio::spawn(async move {
                            let _permit = permit;
                            match tokio::time::timeout(FORWARD_TIMEOUT, client.request(request))
                                .await
                            {
                                Ok(Ok(r)) if r.status().is_success() => {}
                                Ok(Ok(r)) => {
                                    tracing::warn!(status = %r.status(), signal, "OTLP collector refused telemetry")
                                }
                                Ok(Err(e)) => {
                                    tracing::warn!(error = %crate::upstream::error_chain(&e), signal, "OTLP collector unreachable")
                                }
                                Err(_) => {
                                    tracing::warn!(signal, "OTLP collector did not answer in time")
                                }
                            }
                        });
                    }
                    Err(_) => {
                        tracing::warn!(signal, "telemetry dropped: too many forwards in flight")
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "telemetry not forwarded: bad collector URL"),
        }
    }
    let mut resp = if protobuf {
        let mut r = Response::new(Body::empty());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        r
    } else {
        json(StatusCode::OK, &json!({}))
    };
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_sorts_every_level_without_whitespace() {
        let v = json!({"b": [ {"z": 1, "a": "x"} ], "a": {"d": true, "c": null}});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":null,"d":true},"b":[{"a":"x","z":1}]}"#
        );
    }

    #[test]
    fn if_none_match_accepts_quoted_weak_and_lists() {
        let mut h = HeaderMap::new();
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_static("\"x\", W/\"sha256:ab\""),
        );
        assert!(if_none_match_hits(&h, "sha256:ab"));
        assert!(!if_none_match_hits(&h, "sha256:cd"));
        h.insert(header::IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert!(
            !if_none_match_hits(&h, "sha256:ab"),
            "`*` is answered as if absent"
        );
    }

    #[test]
    fn routes() {
        assert_eq!(
            parse(&Method::GET, "/managed/settings"),
            Some(Route::ManagedSettings)
        );
        assert_eq!(
            parse(&Method::POST, "/v1/logs"),
            Some(Route::Telemetry("logs"))
        );
        assert_eq!(parse(&Method::POST, "/v1/messages"), None);
        assert_eq!(policy_uuid("alice").len(), 36);
    }
}
