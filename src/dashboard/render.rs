//! The dashboard's HTML: every page whole, server-rendered, its charts inline SVG, a few lines
//! of inline script that fetch the same page every few seconds and swap its `<main>` (so the
//! figures stay live without a reload, and without a second rendering in JavaScript). Nothing is
//! loaded from anywhere else: it works offline. Every string from the config or the ledger is
//! escaped here; nothing else in the dashboard writes HTML.

use std::fmt::Write as _;

use axum::http::StatusCode;
use axum::response::Html;

use super::{AMBER_AT, Overview, Profiles, UserDetail, UserLine, Users};
use crate::meter::report::Row;

/// Seconds between two refreshes of a page.
pub const REFRESH_SECS: u32 = 5;

/// Colours of the users' series, in turn.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#232f3e;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header a{color:#fff;text-decoration:none}header a.here{text-decoration:underline}
header form{margin-left:auto}
main{padding:16px 20px;max-width:1200px}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:150px}
.card .v{font-size:22px;font-weight:600}.card .k{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff;margin:8px 0}
th,td{border-bottom:1px solid #eee;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}
.bar{width:160px;height:12px;background:#eee;border-radius:3px;display:inline-block;vertical-align:middle}
.bar span{display:block;height:100%;border-radius:3px}
.bar.ok span{background:#59a14f}.bar.amber span{background:#f2a900}.bar.red span{background:#d62728}
.legend span{display:inline-block;margin-right:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
svg{background:#fff;border:1px solid #ddd}
.muted{color:#888}
"#;

/// Refetches this page and swaps its `<main>`, every [`REFRESH_SECS`].
const LIVE: &str = r#"
setInterval(async()=>{try{const r=await fetch(location.href,{credentials:'same-origin'});
if(!r.ok)return;const d=new DOMParser().parseFromString(await r.text(),'text/html');
const m=d.querySelector('main');if(m)document.querySelector('main').replaceWith(m);}catch(e){}},REFRESH_MS);
"#;

pub fn html(body: &str) -> Html<String> {
    Html(body.to_string())
}

use crate::signin::page::escape as esc;

fn page(title: &str, here: &str, main: &str, live: bool) -> String {
    let nav = |href: &str, label: &str| {
        let class = if href == here { " class=\"here\"" } else { "" };
        format!("<a href=\"{href}\"{class}>{label}</a>")
    };
    let script = if live {
        format!(
            "<script>const REFRESH_MS={};{LIVE}</script>",
            REFRESH_SECS * 1000
        )
    } else {
        String::new()
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title} · bedrock-gate</title><style>{STYLE}</style></head><body>\
         <header><strong>bedrock-gate</strong>{}{}{}\
         <form method=\"post\" action=\"/logout\"><button>Sign out</button></form></header>\
         <main>{main}</main>{script}</body></html>",
        nav("/", "Overview"),
        nav("/users", "Users"),
        nav("/profiles", "Profiles"),
        title = esc(title),
    )
}

pub fn usd(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("${v:.4}")
    } else {
        format!("${v:.2}")
    }
}

fn int(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn percent(v: f64) -> String {
    format!("{:.1} %", v * 100.0)
}

fn card(key: &str, value: &str, field: &str) -> String {
    format!(
        "<div class=\"card\"><div class=\"v\" data-field=\"{field}\">{value}</div>\
         <div class=\"k\">{key}</div></div>"
    )
}

fn when(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "never".to_string(),
            |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        )
}

pub fn refusal(status: StatusCode, why: &str) -> String {
    let main = format!(
        "<h1>{} {}</h1><p id=\"why\">{}</p><p><a href=\"/login\">Sign in</a></p>",
        status.as_u16(),
        esc(status.canonical_reason().unwrap_or("")),
        esc(why)
    );
    page("Refused", "", &main, false)
}

pub fn login(error: Option<&str>, sso: bool) -> String {
    let err = error.map_or_else(String::new, |e| {
        format!("<p id=\"why\" style=\"color:#d62728\">{}</p>", esc(e))
    });
    let sso = if sso {
        "<p><a id=\"sso\" href=\"/login/sso\">Sign in with the company's sign-in provider</a></p><p>or</p>"
    } else {
        ""
    };
    let main = format!(
        "<h1>Sign in</h1>{err}{sso}<form method=\"post\" action=\"/login\">\
         <label>Admin token <input type=\"password\" name=\"token\" autocomplete=\"off\" size=\"50\"></label> \
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"muted\">The token whose hash is <code>[admin] token_sha256</code> in the config.</p>"
    );
    page("Sign in", "/login", &main, false)
}

/// After an admin's sign-in through the IdP: on to the overview from a page of our own.
pub fn signed_in(who: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"0;url=/\"><title>Signed in · bedrock-gate</title>\
         </head><body><p id=\"who\">Signed in as {}. <a href=\"/\">Open the dashboard</a>.</p></body></html>",
        esc(who)
    )
}

pub fn overview(o: &Overview) -> String {
    let m = &o.month;
    let mut main = format!(
        "<h1>This month <span class=\"muted\">{} to {}</span></h1><div class=\"cards\">{}{}{}{}{}{}</div>",
        esc(&o.period.since),
        esc(&o.period.last),
        card("spend (estimated)", &usd(m.cost_usd), "month-cost"),
        card("requests", &int(m.requests), "month-requests"),
        card("input tokens", &int(m.input_tokens), "month-input"),
        card("output tokens", &int(m.output_tokens), "month-output"),
        card("error rate", &percent(m.error_rate), "month-error-rate"),
        card(
            "requests, last hour",
            &int(o.last_hour.requests),
            "hour-requests"
        ),
    );
    main.push_str("<h2>Spend per day, last 30 days</h2>");
    main.push_str(&daily_chart(o));
    main.push_str(&format!(
        "<h2>Requests per minute, last hour <span class=\"muted\">errors {}</span></h2>",
        percent(o.last_hour.error_rate)
    ));
    main.push_str(&minutes_chart(o));
    main.push_str("<h2>Top models this month</h2>");
    main.push_str(&rows_table("model", &o.top_models, "top-models"));
    main.push_str(&format!(
        "<p class=\"muted\">Updated {} (every {REFRESH_SECS} s). JSON: <a href=\"/api/overview\">/api/overview</a></p>",
        esc(&o.generated_at)
    ));
    page("Overview", "/", &main, true)
}

/// Spend per day stacked by user: one `<g class="series" data-user=…>` per user.
fn daily_chart(o: &Overview) -> String {
    let (w, h, pad) = (900.0, 240.0, 40.0);
    let days = &o.daily.days;
    let n = days.len().max(1) as f64;
    let totals: Vec<f64> = (0..days.len())
        .map(|i| o.daily.series.iter().map(|s| s.cost_usd[i]).sum())
        .collect();
    let top = totals.iter().copied().fold(0.0, f64::max);
    let scale = if top > 0.0 {
        (h - 2.0 * pad) / top
    } else {
        0.0
    };
    let slot = (w - 2.0 * pad) / n;
    let mut svg = format!(
        "<svg id=\"daily\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
         aria-label=\"spend per day by user\">"
    );
    let _ = write!(
        svg,
        "<text x=\"4\" y=\"{}\" font-size=\"11\">{}</text>\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        pad - 6.0,
        esc(&usd(top)),
        h - pad,
        w - pad,
        h - pad
    );
    let mut base = vec![0.0; days.len()];
    for (k, s) in o.daily.series.iter().enumerate() {
        let colour = PALETTE[k % PALETTE.len()];
        let _ = write!(
            svg,
            "<g class=\"series\" data-user=\"{}\" fill=\"{colour}\">",
            esc(&s.user)
        );
        for (i, v) in s.cost_usd.iter().enumerate() {
            if *v <= 0.0 {
                continue;
            }
            let height = v * scale;
            let y = h - pad - base[i] - height;
            base[i] += height;
            let _ = write!(
                svg,
                "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{height:.1}\"><title>{} {}: {}</title></rect>",
                pad + i as f64 * slot + 1.0,
                (slot - 2.0).max(1.0),
                esc(&s.user),
                esc(&days[i]),
                esc(&usd(*v))
            );
        }
        svg.push_str("</g>");
    }
    for (i, d) in days.iter().enumerate() {
        if i % 5 == 0 || i + 1 == days.len() {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\">{}</text>",
                pad + i as f64 * slot,
                h - pad + 14.0,
                esc(d.get(5..).unwrap_or(d))
            );
        }
    }
    svg.push_str("</svg><div class=\"legend\">");
    for (k, s) in o.daily.series.iter().enumerate() {
        let _ = write!(
            svg,
            "<span><i style=\"background:{}\"></i>{}</span>",
            PALETTE[k % PALETTE.len()],
            esc(&s.user)
        );
    }
    svg.push_str("</div>");
    svg
}

fn minutes_chart(o: &Overview) -> String {
    let (w, h, pad) = (900.0, 160.0, 30.0);
    let top = o
        .minutes
        .iter()
        .map(|m| m.requests)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let slot = (w - 2.0 * pad) / o.minutes.len().max(1) as f64;
    let mut svg = format!(
        "<svg id=\"minutes\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
         aria-label=\"requests per minute\"><text x=\"4\" y=\"{}\" font-size=\"11\">{}/min</text>",
        pad - 6.0,
        top
    );
    for (i, m) in o.minutes.iter().enumerate() {
        let x = pad + i as f64 * slot;
        let ok = (m.requests - m.errors).max(0) as f64 / top * (h - 2.0 * pad);
        let bad = m.errors as f64 / top * (h - 2.0 * pad);
        let _ = write!(
            svg,
            "<rect class=\"minute\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{ok:.1}\" fill=\"#4e79a7\"><title>{} requests, {} errors</title></rect>",
            h - pad - ok,
            (slot - 1.0).max(1.0),
            m.requests,
            m.errors
        );
        if bad > 0.0 {
            let _ = write!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bad:.1}\" fill=\"#d62728\"/>",
                h - pad - ok - bad,
                (slot - 1.0).max(1.0)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

fn rows_table(key: &str, rows: &[Row], id: &str) -> String {
    let mut t = format!(
        "<table id=\"{id}\"><tr><th>{key}</th><th>requests</th><th>input tokens</th>\
         <th>output tokens</th><th>cost</th><th>errors</th></tr>"
    );
    for r in rows {
        let _ = write!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&r.key),
            int(r.requests),
            int(r.input_tokens),
            int(r.output_tokens),
            usd(r.cost_usd),
            int(r.error_requests)
        );
    }
    if rows.is_empty() {
        t.push_str("<tr><td class=\"muted\" colspan=\"6\">nothing yet</td></tr>");
    }
    t.push_str("</table>");
    t
}

fn budget_cell(l: &UserLine) -> String {
    match (l.budget_usd, l.budget_used) {
        (Some(b), Some(u)) => format!(
            "<span class=\"bar {}\" data-used=\"{u:.4}\"><span style=\"width:{:.1}%\"></span></span> {} of {}",
            l.budget_level,
            (u * 100.0).min(100.0),
            percent(u),
            esc(&usd(b))
        ),
        _ => "<span class=\"muted\">no budget</span>".to_string(),
    }
}

pub fn users(u: &Users) -> String {
    let mut main = format!(
        "<h1>Users <span class=\"muted\">{} to {}</span></h1>\
         <p><a href=\"/api/users.csv\">Download CSV</a> · <a href=\"/api/users\">JSON</a></p>\
         <table id=\"users\"><tr><th>user</th><th>spend</th><th>budget (amber at {:.0} %)</th>\
         <th>requests</th><th>input tokens</th><th>output tokens</th><th>last seen</th></tr>",
        esc(&u.period.since),
        esc(&u.period.last),
        AMBER_AT * 100.0
    );
    for l in &u.users {
        let href = format!(
            "/users/{}",
            percent_encoding::utf8_percent_encode(&l.user, percent_encoding::NON_ALPHANUMERIC)
        );
        let _ = write!(
            main,
            "<tr data-user=\"{}\"><td><a href=\"{}\">{}</a>{}</td><td class=\"cost\" data-usd=\"{}\">{}</td><td>{}</td>\
             <td class=\"requests\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&l.user),
            esc(&href),
            esc(&l.user),
            if l.configured {
                ""
            } else {
                " <span class=\"muted\">(not in the config)</span>"
            },
            l.cost_usd,
            usd(l.cost_usd),
            budget_cell(l),
            int(l.requests),
            int(l.input_tokens),
            int(l.output_tokens),
            esc(&when(l.last_seen_ms))
        );
    }
    main.push_str("</table>");
    if let Some(r) = &u.unidentified {
        let _ = write!(
            main,
            "<p class=\"muted\">Unidentified calls (refused before a user was known): {}</p>",
            int(r.requests)
        );
    }
    let _ = write!(
        main,
        "<p class=\"muted\">Updated {} (every {REFRESH_SECS} s).</p>",
        esc(&u.generated_at)
    );
    page("Users", "/users", &main, true)
}

pub fn user(d: &UserDetail) -> String {
    let l = &d.line;
    let mut main = format!(
        "<h1>{} <span class=\"muted\">{} to {}</span></h1><div class=\"cards\">{}{}{}{}</div><p>Budget: {}</p>",
        esc(&l.user),
        esc(&d.period.since),
        esc(&d.period.last),
        card("spend (estimated)", &usd(l.cost_usd), "user-cost"),
        card("requests", &int(l.requests), "user-requests"),
        card("input tokens", &int(l.input_tokens), "user-input"),
        card("output tokens", &int(l.output_tokens), "user-output"),
        budget_cell(l),
    );
    main.push_str("<h2>Per day, last 30 days</h2>");
    main.push_str(&rows_table("day", &d.days, "days"));
    main.push_str("<h2>Per model</h2>");
    main.push_str(&rows_table("model", &d.models, "models"));
    main.push_str("<h2>Per project</h2>");
    main.push_str(&rows_table("project", &d.projects, "projects"));
    main.push_str("<h2>Per Claude Code session</h2>");
    main.push_str(&rows_table("session", &d.sessions, "sessions"));
    main.push_str(
        "<h2>Recent requests</h2><table id=\"recent\"><tr><th>time</th><th>front</th>\
         <th>operation</th><th>model</th><th>status</th><th>outcome</th><th>latency</th>\
         <th>tokens in / out</th><th>cost</th></tr>",
    );
    for r in &d.recent {
        let _ = write!(
            main,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{} / {}</td><td>{}</td></tr>",
            esc(&when(Some(r.at_ms))),
            esc(&r.front),
            esc(&r.operation),
            esc(&r.model),
            r.status,
            esc(&r.outcome),
            r.latency_ms,
            r.input_tokens,
            r.output_tokens,
            r.cost_usd.map_or_else(|| "-".to_string(), usd)
        );
    }
    main.push_str("</table>");
    let _ = write!(
        main,
        "<p class=\"muted\">Updated {} (every {REFRESH_SECS} s).</p>",
        esc(&d.generated_at)
    );
    page(&l.user, "", &main, true)
}

pub fn profiles(p: &Profiles) -> String {
    let checked = |c: &Option<super::Checked>, what: &str| match c {
        Some(c) => format!(
            "last <code>{what}</code> {} at {}",
            if c.ok {
                "passed"
            } else {
                "<strong>found problems</strong>"
            },
            esc(&c.at)
        ),
        None => format!("<code>{what}</code> has not been run here yet"),
    };
    let mut main = format!(
        "<h1>Profiles</h1><p id=\"verified\">{}.</p><table id=\"profiles\"><tr><th>user</th><th>model</th>\
         <th>profile</th><th>region</th><th>cost tag</th><th>verify</th></tr>",
        checked(&p.verify, "bedrock-gate profiles verify")
    );
    for l in &p.profiles {
        let arn = if l.pending {
            "<span class=\"muted\">auto: not made yet (<code>profiles apply</code>)</span>"
                .to_string()
        } else {
            format!("<code>{}</code>", esc(&l.arn))
        };
        let verdict = match (&l.verify, l.verify_ok) {
            (Some(_), Some(true)) => "<span class=\"verdict ok\">ok</span>".to_string(),
            (Some(v), _) => {
                let mut why = Vec::new();
                if v["exists"] != true {
                    why.push("missing".to_string());
                } else {
                    if v["status"] != "ACTIVE" {
                        why.push(format!("status {}", v["status"].as_str().unwrap_or("?")));
                    }
                    if v["model_matches"] != true {
                        why.push("another model".into());
                    }
                    if v["tags"] != "ok" {
                        why.push(format!("tags: {}", v["tags"].as_str().unwrap_or("?")));
                    }
                }
                if v["shared"] == true {
                    why.push("shared with another user".into());
                }
                format!(
                    "<span class=\"verdict drift\" style=\"color:#d62728\">DRIFT: {}</span>",
                    esc(&why.join("; "))
                )
            }
            (None, _) => "<span class=\"verdict muted\">not checked</span>".to_string(),
        };
        let _ = write!(
            main,
            "<tr data-user=\"{}\"><td>{}</td><td>{}</td><td>{arn}</td><td>{}</td><td>{}={}</td><td>{verdict}</td></tr>",
            esc(&l.user),
            esc(&l.user),
            esc(&l.model),
            esc(&l.region),
            esc(&l.tag_key),
            esc(&l.tag_value)
        );
    }
    main.push_str("</table>");
    if let Some(tags) = p.tags.as_ref().and_then(|t| t.as_object()) {
        main.push_str("<h2>Cost allocation tags</h2><ul>");
        for state in tags.values() {
            let _ = write!(main, "<li>{}</li>", esc(state.as_str().unwrap_or("")));
        }
        main.push_str("</ul>");
    }
    let _ = write!(
        main,
        "<h2>The bill</h2><p id=\"reconciled\">{}.</p>",
        checked(&p.reconcile, "bedrock-gate reconcile")
    );
    if let Some(r) = &p.reconcile_result {
        let t = &r["total"];
        let f = |v: &serde_json::Value| usd(v.as_f64().unwrap_or(0.0));
        let _ = write!(
            main,
            "<table id=\"reconcile\"><tr><th>period</th><th>ledger</th><th>Cost Explorer</th>\
             <th>difference</th><th>of which untagged</th><th>final days over {}%</th></tr>\
             <tr><td>{} to {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>",
            r["tolerance_pct"],
            esc(r["since"].as_str().unwrap_or("")),
            esc(r["until"].as_str().unwrap_or("")),
            f(&t["ledger_usd"]),
            f(&t["billed_usd"]),
            f(&t["diff_usd"]),
            f(&t["untagged_usd"]),
            r["days_over"]
        );
    }
    let _ = write!(
        main,
        "<p class=\"muted\">Profiles from the config as loaded {}; the checks as their last run \
         recorded them.</p>",
        esc(&p.generated_at)
    );
    page("Profiles", "/profiles", &main, false)
}

/// The users table as CSV, one line per user.
pub fn users_csv(u: &Users) -> String {
    let mut out = String::from(
        "user,requests,input_tokens,output_tokens,cache_read_tokens,cache_write_tokens,cost_usd,errors,budget_usd,budget_used,last_seen\n",
    );
    for l in &u.users {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{}",
            csv(&l.user),
            l.requests,
            l.input_tokens,
            l.output_tokens,
            l.cache_read_tokens,
            l.cache_write_tokens,
            l.cost_usd,
            l.errors,
            l.budget_usd.map_or_else(String::new, |b| b.to_string()),
            l.budget_used
                .map_or_else(String::new, |b| format!("{b:.4}")),
            l.last_seen_ms
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map_or_else(String::new, |t| t.to_rfc3339())
        );
    }
    out
}

/// A CSV field, quoted when it must be; a leading `=`, `+`, `-` or `@` is quoted with a `'`
/// before it so a spreadsheet does not take it for a formula.
fn csv(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_numbers_grouped() {
        assert_eq!(csv("a,b"), "\"a,b\"");
        assert_eq!(csv("=SUM(A1)"), "'=SUM(A1)");
        assert_eq!(csv("plain"), "plain");
        assert_eq!(int(1234567), "1,234,567");
        assert_eq!(usd(0.000366), "$0.0004");
    }
}
