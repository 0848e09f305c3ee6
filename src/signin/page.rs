//! The verification page's HTML: the code form, and the outcome of a sign-in. Server-rendered,
//! no script, every interpolated value escaped; the headers forbid framing, caching and
//! referrers. This module never decides anything.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};

/// Escapes text for HTML element content and double-quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:34rem;margin:4rem auto;padding:0 1rem;color:#222}\
h1{font-size:1.4rem}code,input{font-family:ui-monospace,monospace}input{font-size:1.3rem;letter-spacing:.15em;\
padding:.3rem;width:12rem;text-transform:uppercase}button{font-size:1rem;padding:.4rem 1.2rem}.muted{color:#666}";

/// A complete page with the security headers.
pub fn page(status: StatusCode, title: &str, body_html: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} · bedrock-gate</title><style>{STYLE}</style></head><body>\
         <h1>{}</h1>{body_html}</body></html>",
        escape(title),
        escape(title)
    );
    let mut resp = Response::new(Body::from(html));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The form where the user enters or confirms the code. Never submitted by itself.
pub fn code_form(prefilled: Option<&str>, issuer: &str, problem: Option<&str>) -> Response {
    let value = prefilled.map(escape).unwrap_or_default();
    let problem = problem
        .map(|p| format!("<p role=\"alert\"><strong>{}</strong></p>", escape(p)))
        .unwrap_or_default();
    let body = format!(
        "{problem}<p>Claude Code asked to sign in to this bedrock-gate. Check that the code below is \
         the one Claude Code shows you, then continue: you sign in with your company account at \
         <code>{}</code>, and Claude Code's calls are then billed to you.</p>\
         <form method=\"post\" action=\"/device\">\
         <label for=\"user_code\">Code</label><br>\
         <input id=\"user_code\" name=\"user_code\" value=\"{value}\" autocomplete=\"off\" \
         spellcheck=\"false\" maxlength=\"20\" required autofocus> \
         <button type=\"submit\">Continue</button></form>\
         <p class=\"muted\">If you did not start a sign-in in Claude Code, close this page.</p>",
        escape(issuer)
    );
    page(
        if problem.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::BAD_REQUEST
        },
        "Sign in to bedrock-gate",
        &body,
    )
}

/// The end of a sign-in that worked.
pub fn signed_in(email: Option<&str>, user: &str) -> Response {
    let who = match email {
        Some(e) => format!(
            "<p>Signed in as <strong id=\"email\">{}</strong> (bedrock-gate user <code id=\"user\">{}</code>).</p>",
            escape(e),
            escape(user)
        ),
        None => format!(
            "<p>Signed in as bedrock-gate user <code id=\"user\">{}</code>.</p>",
            escape(user)
        ),
    };
    page(
        StatusCode::OK,
        "Signed in",
        &format!(
            "{who}<p>Return to Claude Code: it shows the same email for you to confirm. You can close this tab.</p>"
        ),
    )
}

/// The end of a sign-in that did not work, with what to do.
pub fn failed(status: StatusCode, message: &str) -> Response {
    page(
        status,
        "Sign-in did not work",
        &format!(
            "<p role=\"alert\" id=\"problem\">{}</p><p>Run <code>/login</code> in Claude Code to try again.</p>",
            escape(message)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
