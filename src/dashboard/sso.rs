//! Admins signing in to the dashboard through the company's IdP (`[oidc]`, the same client
//! as developers' sign-in): an authorization-code flow with PKCE and a nonce, its redirect
//! coming back to the admin listener's own `/oauth/callback`. Whoever the IdP names is an
//! admin if `[admin] emails` or `[admin] groups` says so; they get a session cookie for
//! [`SESSION_TTL`].
//!
//! Sign-ins in progress and admin sessions live in this process's memory, both bounded: a
//! restart signs admins out (the admin token keeps working). A sign-in is bound to the browser
//! that began it by a cookie holding its `state`. This module never stores a token in the
//! clear (sessions are kept by the SHA-256 of their cookie) and never logs one.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::KeyHash;
use crate::state::AppState;

/// The cookie of an admin's session.
pub const SESSION_COOKIE: &str = "bedrock_gate_admin_session";
/// The cookie binding a sign-in in progress to its browser.
const SIGNIN_COOKIE: &str = "bedrock_gate_admin_signin";
/// How long an admin stays signed in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// How long a sign-in may take at the IdP.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Most sign-ins in progress (older ones are dropped first).
const PENDING_MAX: usize = 1_000;
/// Most admin sessions (the oldest is dropped first).
const SESSIONS_MAX: usize = 10_000;

struct Pending {
    nonce: String,
    verifier: String,
    at: Instant,
}

struct Session {
    /// Who, as the IdP named them (email, else subject): for the log.
    who: String,
    expires: Instant,
}

/// The admin listener's sign-ins in progress and sessions.
#[derive(Default)]
pub struct Sso {
    /// `http://ADDR` of the admin listener as bound: the redirect URI's origin.
    origin: OnceLock<String>,
    pending: Mutex<HashMap<String, Pending>>,
    sessions: Mutex<HashMap<KeyHash, Session>>,
}

impl std::fmt::Debug for Sso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sso")
            .field("origin", &self.origin.get())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sso {
    /// Records where the admin listener is bound (once, at start).
    pub fn set_origin(&self, origin: String) {
        let _ = self.origin.set(origin);
    }

    /// Whether `cookie` is a live admin session.
    pub fn session(&self, cookie: &str) -> bool {
        let key = KeyHash::of_key(cookie);
        let mut sessions = lock(&self.sessions);
        match sessions.get(&key) {
            Some(s) if s.expires > Instant::now() => true,
            Some(_) => {
                sessions.remove(&key);
                false
            }
            None => false,
        }
    }

    pub fn end(&self, cookie: &str) {
        lock(&self.sessions).remove(&KeyHash::of_key(cookie));
    }

    fn begin(&self, state: String, nonce: String, verifier: String) {
        let mut pending = lock(&self.pending);
        pending.retain(|_, p| p.at.elapsed() < PENDING_TTL);
        if pending.len() >= PENDING_MAX
            && let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, p)| p.at)
                .map(|(k, _)| k.clone())
        {
            pending.remove(&oldest);
        }
        pending.insert(
            state,
            Pending {
                nonce,
                verifier,
                at: Instant::now(),
            },
        );
    }

    fn take(&self, state: &str) -> Option<Pending> {
        lock(&self.pending)
            .remove(state)
            .filter(|p| p.at.elapsed() < PENDING_TTL)
    }

    fn open(&self, who: String) -> anyhow::Result<String> {
        let token = random()?;
        let mut sessions = lock(&self.sessions);
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= SESSIONS_MAX
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            KeyHash::of_key(&token),
            Session {
                who,
                expires: now + SESSION_TTL,
            },
        );
        Ok(token)
    }
}

/// 32 random bytes, base64url: a session token, a `state`, a nonce or a PKCE verifier.
fn random() -> anyhow::Result<String> {
    crate::signin::device::random(32).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))
}

/// The first cookie called `name`, percent-decoded; none when empty.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    crate::auth::cookies(headers, name)
        .next()
        .map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|t| !t.is_empty())
}

/// The developers' sign-in settings with the admin listener as the redirect's origin.
fn settings(state: &AppState) -> Result<crate::config::signin::SignIn, &'static str> {
    let live = state.live.load();
    if !live.config.admin.sso() {
        return Err(
            "no admin signs in through the IdP here: set [admin] groups or emails (or use the admin token)",
        );
    }
    let mut s = live
        .config
        .signin
        .clone()
        .ok_or("[oidc] is not configured")?;
    s.public_url = match &live.config.admin.public_url {
        Some(url) => url.clone(),
        None => {
            let bound = state
                .admin_sso
                .origin
                .get()
                .cloned()
                .ok_or("the admin listener is not bound yet")?;
            // A wildcard address is no place a browser can come back to.
            if bound.starts_with("http://0.0.0.0") || bound.starts_with("http://[::]") {
                return Err(
                    "admin_listen is a wildcard address: set [admin] public_url to the URL admins open the dashboard at",
                );
            }
            bound
        }
    };
    Ok(s)
}

fn page(status: StatusCode, why: &str) -> Response {
    super::failure(status, why, true)
}

/// `GET /login/sso`: off to the IdP.
pub async fn start(State(state): State<std::sync::Arc<AppState>>) -> Response {
    let s = match settings(&state) {
        Ok(s) => s,
        Err(why) => return page(StatusCode::NOT_FOUND, why),
    };
    let d = match state.signin.idp.discovery(&s).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "admin sign-in: the IdP is unavailable");
            return page(
                StatusCode::BAD_GATEWAY,
                "the sign-in provider cannot be reached just now; try again, or use the admin token",
            );
        }
    };
    let (Ok(st), Ok(nonce), Ok(verifier)) = (random(), random(), random()) else {
        return page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no randomness from the OS",
        );
    };
    let url = crate::signin::oidc::Idp::authorize_url(&d, &s, &st, &nonce, &verifier);
    state.admin_sso.begin(st.clone(), nonce, verifier);
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, url)]).into_response();
    // Lax: the IdP's redirect back is a cross-site top-level GET.
    let bind = format!(
        "{SIGNIN_COOKIE}={st}; Path=/oauth/callback; HttpOnly; SameSite=Lax; Max-Age={}",
        PENDING_TTL.as_secs()
    );
    if let Ok(v) = header::HeaderValue::from_str(&bind) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    super::secure(resp)
}

/// The callback's query: `code` and `state`, or the IdP's `error`.
#[derive(Default)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

impl Callback {
    /// Reads the first of each; a query past 8 KiB is not read at all.
    fn parse(uri: &axum::http::Uri) -> Callback {
        let mut q = Callback::default();
        let query = uri.query().filter(|q| q.len() <= 8192).unwrap_or("");
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match k.as_ref() {
                "code" => &mut q.code,
                "state" => &mut q.state,
                "error" => &mut q.error,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v.into_owned());
            }
        }
        q
    }
}

/// `GET /oauth/callback` on the admin listener: the IdP's answer.
pub async fn finish(
    State(state): State<std::sync::Arc<AppState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let q = Callback::parse(&uri);
    let s = match settings(&state) {
        Ok(s) => s,
        Err(why) => return page(StatusCode::NOT_FOUND, why),
    };
    if let Some(e) = q.error {
        return page(
            StatusCode::FORBIDDEN,
            &format!(
                "the sign-in provider did not sign you in: {}",
                crate::refusal::shown(&e)
            ),
        );
    }
    let (Some(code), Some(st)) = (q.code, q.state) else {
        return page(
            StatusCode::BAD_REQUEST,
            "this address is where the sign-in provider sends you back; start at /login",
        );
    };
    if cookie(&headers, SIGNIN_COOKIE).as_deref() != Some(st.as_str()) {
        return page(
            StatusCode::BAD_REQUEST,
            "this sign-in was not started in this browser; start again at /login",
        );
    }
    let Some(p) = state.admin_sso.take(&st) else {
        return page(
            StatusCode::BAD_REQUEST,
            "this sign-in expired or was already used; start again at /login",
        );
    };
    let signed_in = state
        .signin
        .idp
        .sign_in(&s, &code, &p.verifier, &p.nonce)
        .await;
    let who = match signed_in {
        Ok((who, _)) => who,
        Err(e) => {
            tracing::warn!(error = %e, "admin sign-in refused");
            return page(StatusCode::FORBIDDEN, &e.to_string());
        }
    };
    let name = who.email.clone().unwrap_or_else(|| who.subject.clone());
    if !state
        .live
        .load()
        .config
        .admin
        .admits(who.email.as_deref(), &who.groups)
    {
        tracing::warn!(who = %name, "admin sign-in: not an admin");
        return page(
            StatusCode::FORBIDDEN,
            &format!(
                "{} is signed in but is not an admin ([admin] emails and groups)",
                crate::refusal::shown(&name)
            ),
        );
    }
    let token = match state.admin_sso.open(name.clone()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "admin sign-in: no session");
            return page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no session could be made",
            );
        }
    };
    tracing::info!(who = %name, "admin signed in to the dashboard");
    // A page of our own, not a redirect: the session cookie is SameSite=Strict, and a
    // navigation that began at the IdP would not carry it.
    let mut resp = super::render::html(&super::render::signed_in(&name)).into_response();
    let h = resp.headers_mut();
    let session = format!(
        "{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_TTL.as_secs()
    );
    if let Ok(v) = header::HeaderValue::from_str(&session) {
        h.append(header::SET_COOKIE, v);
    }
    h.append(
        header::SET_COOKIE,
        header::HeaderValue::from_static(
            "bedrock_gate_admin_signin=; Path=/oauth/callback; HttpOnly; SameSite=Lax; Max-Age=0",
        ),
    );
    super::secure(resp)
}

impl Sso {
    /// Who holds the session `cookie`, if it is live.
    pub fn who(&self, cookie: &str) -> Option<String> {
        lock(&self.sessions)
            .get(&KeyHash::of_key(cookie))
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.who.clone())
    }
}
