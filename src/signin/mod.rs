//! SSO sign-in: the OAuth side of the Claude Code gateway protocol, on top of the company's
//! OpenID Connect IdP.
//!
//! `GET /.well-known/oauth-authorization-server` → `POST /oauth/device_authorization` (RFC
//! 8628) → the browser at `/device` confirms the code and signs in at the IdP (authorization
//! code + PKCE + nonce) → `GET /oauth/callback` verifies the id_token and maps the identity to a
//! user → `POST /oauth/token` hands Claude Code a bearer and a refresh token → every refresh goes
//! back to the IdP → `POST /oauth/revoke` ends it.
//!
//! - [`device`]: device and user codes, browser sign-ins in progress, per-IP limits.
//! - [`oidc`]: the IdP client and id_token verification.
//! - [`sessions`]: bearer sessions, stored hashed in the ledger file.
//! - [`page`]: the verification page's HTML.
//!
//! Errors on these endpoints are OAuth's (`{"error","error_description"}`), the page's are
//! HTML. This module never logs a code or a token, never redirects anywhere but to the
//! configured IdP, and never issues a bearer for an identity it did not verify.

pub mod device;
pub mod oidc;
pub mod page;
pub mod sessions;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::BodyExt;

use crate::config::signin::SignIn;
use crate::config::{Config, User};
use crate::state::AppState;
use device::{Approval, CodeState, DeviceFlows, IpLimiter, Poll};
use oidc::{Identity, Idp, IdpError};
use sessions::{Grant, SessionStore};

/// Largest form accepted on the sign-in endpoints.
const MAX_FORM: usize = 16 * 1024;
/// The cookie that ties a callback to the browser that started the sign-in.
const LOGIN_COOKIE: &str = "bg_signin";

/// The client's address, put on each request by the listener.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Sign-in state shared by the handlers.
#[derive(Debug)]
pub struct SignInState {
    pub flows: DeviceFlows,
    pub idp: Idp,
    pub store: SessionStore,
    /// Device authorizations per address.
    device_limit: IpLimiter,
    /// Verification page loads and posts per address.
    page_limit: IpLimiter,
    /// One auto-provisioning at a time (each edits the config file).
    provisioning: tokio::sync::Mutex<()>,
    /// One refresh per refresh token at a time: two clients refreshing at once must not both
    /// present the IdP's (rotating) refresh token, or the IdP would end the session for both.
    refreshing: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl SignInState {
    /// `flows` in memory, or in the shared store with the sessions.
    pub fn new(store: SessionStore, flows: DeviceFlows) -> SignInState {
        SignInState {
            flows,
            idp: Idp::new(),
            store,
            device_limit: IpLimiter::default(),
            page_limit: IpLimiter::default(),
            provisioning: tokio::sync::Mutex::new(()),
            refreshing: std::sync::Mutex::default(),
        }
    }
}

/// The sign-in routes, merged into the main router.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/oauth/device_authorization", post(device_authorization))
        .route("/device", get(device_page).post(device_submit))
        .route("/oauth/callback", get(callback))
        .route("/oauth/token", post(token))
        .route("/oauth/revoke", post(revoke))
}

/// An OAuth error answer (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = serde_json::json!({"error": error, "error_description": description});
    let mut resp = (status, axum::Json(body)).into_response();
    no_store(resp.headers_mut());
    resp
}

fn no_store(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn not_configured() -> Response {
    oauth_error(
        StatusCode::NOT_FOUND,
        "invalid_request",
        "SSO sign-in is not configured on this bedrock-gate (its config has no [oidc]); use an API key",
    )
}

fn peer_ip(request: &Request) -> IpAddr {
    request
        .extensions()
        .get::<Peer>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |p| p.0.ip())
}

/// Reads a form body (bounded); `None` if it is too large, unreadable or not a form.
async fn read_form(request: Request) -> Option<Vec<(String, String)>> {
    let is_form = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !is_form {
        return None;
    }
    let body = http_body_util::Limited::new(request.into_body(), MAX_FORM)
        .collect()
        .await
        .ok()?
        .to_bytes();
    Some(
        form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    )
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn bad_form() -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "the body must be an application/x-www-form-urlencoded form of at most 16 KiB",
    )
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414).
async fn metadata(State(state): State<Arc<AppState>>) -> Response {
    let live = state.live.load();
    let Some(s) = &live.config.signin else {
        return not_configured();
    };
    let base = &s.public_url;
    let body = serde_json::json!({
        "issuer": base,
        "device_authorization_endpoint": format!("{base}/oauth/device_authorization"),
        "token_endpoint": format!("{base}/oauth/token"),
        "revocation_endpoint": format!("{base}/oauth/revoke"),
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
    });
    axum::Json(body).into_response()
}

/// `POST /oauth/device_authorization` (RFC 8628 §3.1–3.2). Needs no `client_id` or `scope`.
async fn device_authorization(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let live = state.live.load_full();
    let Some(s) = &live.config.signin else {
        return not_configured();
    };
    if !state
        .signin
        .device_limit
        .allow(peer_ip(&request), s.sign_ins_per_ip_per_minute)
    {
        let mut resp = oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "slow_down",
            "too many sign-ins from this address this minute (oidc.sign_ins_per_ip_per_minute); wait a minute",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        return resp;
    }
    let Some(form) = read_form(request).await else {
        return bad_form();
    };
    let surface = field(&form, "surface")
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string);
    let started = match state.signin.flows.start(surface).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "too many sign-ins in progress; try again in a few minutes",
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "no randomness for a device code");
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the proxy could not make a device code",
            );
        }
    };
    let verification_uri = format!("{}/device", s.public_url);
    let complete = format!(
        "{verification_uri}?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("user_code", &started.user_code)
            .finish()
    );
    tracing::info!("device authorization started");
    let body = serde_json::json!({
        "device_code": started.device_code,
        "user_code": started.user_code,
        "verification_uri": verification_uri,
        "verification_uri_complete": complete,
        "expires_in": started.expires_in,
        "interval": started.interval,
    });
    let mut resp = axum::Json(body).into_response();
    no_store(resp.headers_mut());
    resp
}

fn page_limited(state: &AppState, s: &SignIn, request: &Request) -> Option<Response> {
    if state
        .signin
        .page_limit
        .allow(peer_ip(request), s.sign_ins_per_ip_per_minute)
    {
        return None;
    }
    Some(page::failed(
        StatusCode::TOO_MANY_REQUESTS,
        "Too many sign-in attempts from your address this minute. Wait a minute and reload this page.",
    ))
}

fn page_not_configured() -> Response {
    page::failed(
        StatusCode::NOT_FOUND,
        "SSO sign-in is not configured on this bedrock-gate.",
    )
}

/// `GET /device[?user_code=…]`: the form, the code filled in if the link carried one (never
/// submitted by itself, RFC 8628 §5.4).
async fn device_page(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let live = state.live.load_full();
    let Some(s) = &live.config.signin else {
        return page_not_configured();
    };
    if let Some(limited) = page_limited(&state, s, &request) {
        return limited;
    }
    let code = request.uri().query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "user_code")
            .and_then(|(_, v)| device::normalize_user_code(&v))
    });
    page::code_form(code.as_deref(), &s.issuer, None)
}

/// The origin (`scheme://host[:port]`) of a URL.
fn origin_of(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    Some(format!("{}://{}", uri.scheme_str()?, uri.authority()?))
}

/// CSRF: the form must have been sent by a page of this origin.
fn same_origin(headers: &HeaderMap, public_url: &str) -> bool {
    let ours = origin_of(public_url);
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        Some(origin) => ours.as_deref() == Some(origin.trim_end_matches('/')),
        None => headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "same-origin"),
    }
}

/// `POST /device`: the user confirmed the code; off to the IdP.
async fn device_submit(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let live = state.live.load_full();
    let Some(s) = &live.config.signin else {
        return page_not_configured();
    };
    if let Some(limited) = page_limited(&state, s, &request) {
        return limited;
    }
    if !same_origin(request.headers(), &s.public_url) {
        return page::failed(
            StatusCode::FORBIDDEN,
            "This form must be sent from the sign-in page of this bedrock-gate (the request came from another site).",
        );
    }
    let Some(form) = read_form(request).await else {
        return page::code_form(
            None,
            &s.issuer,
            Some("The form could not be read. Enter the code again."),
        );
    };
    let typed = field(&form, "user_code").unwrap_or("");
    let Some(code) = device::normalize_user_code(typed) else {
        return page::code_form(
            None,
            &s.issuer,
            Some("That is not a code Claude Code shows: 8 letters like WDJB-MJHT."),
        );
    };
    match state.signin.flows.code_state(&code).await {
        CodeState::Open => {}
        CodeState::Used => {
            return page::code_form(
                None,
                &s.issuer,
                Some("That code was already used. Run /login in Claude Code for a new one."),
            );
        }
        CodeState::Unknown => {
            return page::code_form(
                None,
                &s.issuer,
                Some(
                    "That code is not valid or has expired. Check the code Claude Code shows, or run /login again.",
                ),
            );
        }
    }
    let discovery = match state.signin.idp.discovery(s).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "IdP discovery failed");
            return page::failed(
                StatusCode::BAD_GATEWAY,
                "The company sign-in provider cannot be reached right now. Try again in a minute.",
            );
        }
    };
    let (login_state, login) = match state.signin.flows.begin_login(&code).await {
        Ok(Some(l)) => l,
        Ok(None) => {
            return page::code_form(
                None,
                &s.issuer,
                Some("That code was just used, or has expired. Run /login again for a new one."),
            );
        }
        Err(e) => {
            tracing::error!(error = %e, "no randomness for a sign-in");
            return page::failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The proxy could not start the sign-in.",
            );
        }
    };
    let location = Idp::authorize_url(&discovery, s, &login_state, &login.nonce, &login.verifier);
    let secure = if s.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{LOGIN_COOKIE}={}; Path=/oauth/callback; HttpOnly; SameSite=Lax; Max-Age=600{secure}",
        cookie_value(&login_state)
    );
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    let h = resp.headers_mut();
    if let (Ok(loc), Ok(c)) = (
        HeaderValue::from_str(&location),
        HeaderValue::from_str(&cookie),
    ) {
        h.insert(header::LOCATION, loc);
        h.insert(header::SET_COOKIE, c);
    }
    no_store(h);
    resp
}

/// What the cookie holds for a sign-in: a hash of its `state`, not the state itself.
fn cookie_value(login_state: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(
        format!("bg-signin:{login_state}").as_bytes(),
    ))
}

fn cookie_matches(headers: &HeaderMap, login_state: &str) -> bool {
    let want = cookie_value(login_state);
    crate::auth::cookies(headers, LOGIN_COOKIE).any(|v| v == want)
}

/// Who may sign in, and as which user.
enum Decision {
    User(Arc<User>),
    /// No user yet; `[oidc.auto_users]` adds one under this name.
    Provision(String),
}

fn decide(config: &Config, s: &SignIn, who: &Identity) -> Result<Decision, String> {
    let shown = who.email.clone().unwrap_or_else(|| who.subject.clone());
    if !s.allowed_groups.is_empty() && !who.groups.iter().any(|g| s.allowed_groups.contains(g)) {
        return Err(format!(
            "`{shown}` is not in a group allowed to use this bedrock-gate (oidc.allowed_groups). Ask your bedrock-gate admin."
        ));
    }
    if let Some(user) = config.users.by_identity(&who.subject, who.email.as_deref()) {
        return Ok(Decision::User(user.clone()));
    }
    match (&s.auto_users, &who.email) {
        (Some(_), Some(email)) if crate::config::is_user_name(email) => {
            Ok(Decision::Provision(email.clone()))
        }
        (Some(_), _) => Err(format!(
            "`{shown}` cannot be added as a user automatically (the IdP sent no usable email). Ask your bedrock-gate admin."
        )),
        (None, _) => Err(format!(
            "No bedrock-gate user is mapped to `{shown}`. Ask your bedrock-gate admin to add it (users.NAME.emails)."
        )),
    }
}

/// `GET /oauth/callback`: back from the IdP. Verifies, maps, approves the device code.
async fn callback(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let live = state.live.load_full();
    let Some(s) = &live.config.signin else {
        return page_not_configured();
    };
    let params: Vec<(String, String)> = request
        .uri()
        .query()
        .map(|q| {
            form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let stale = || {
        page::failed(
            StatusCode::BAD_REQUEST,
            "This sign-in link is not valid any more (already used, expired, or not started in this browser).",
        )
    };
    let Some(login_state) = field(&params, "state").filter(|v| v.len() <= 128) else {
        return stale();
    };
    if !cookie_matches(request.headers(), login_state) {
        return stale();
    }
    let Some(login) = state.signin.flows.take_login(login_state).await else {
        return stale();
    };
    let flows = &state.signin.flows;
    if let Some(error) = field(&params, "error") {
        let message = format!(
            "The company sign-in provider did not sign you in ({}).",
            crate::refusal::shown(error)
        );
        return deny(&state, &login.user_code, message).await;
    }
    let Some(code) = field(&params, "code").filter(|c| !c.is_empty() && c.len() <= 4096) else {
        flows.reopen(&login.user_code).await;
        return stale();
    };
    let verified = state
        .signin
        .idp
        .sign_in(s, code, &login.verifier, &login.nonce);
    let (who, idp_refresh) = match verified.await {
        Ok(v) => v,
        Err(IdpError::Unavailable(e)) => {
            tracing::warn!(error = %e, "sign-in: IdP unavailable");
            state.meter.metrics.signin("idp_unavailable");
            flows.reopen(&login.user_code).await;
            return page::failed(
                StatusCode::BAD_GATEWAY,
                "The company sign-in provider did not answer in time. Go back to the code page and try again.",
            );
        }
        Err(IdpError::Refused(e)) => {
            tracing::warn!(error = %e, "sign-in refused");
            return deny(
                &state,
                &login.user_code,
                format!("The sign-in could not be verified: {e}."),
            )
            .await;
        }
    };
    let user = match decide(&live.config, s, &who) {
        Ok(Decision::User(u)) => u.name.clone(),
        Ok(Decision::Provision(name)) => match provision(&state, &name, &who).await {
            Ok(()) => name,
            Err(message) => return deny(&state, &login.user_code, message).await,
        },
        Err(message) => {
            tracing::info!(subject = %who.subject, "sign-in refused: {message}");
            return deny(&state, &login.user_code, message).await;
        }
    };
    tracing::info!(user = %user, "signed in through the IdP; device code approved");
    state.meter.metrics.signin("approved");
    let response = page::signed_in(who.email.as_deref(), &user);
    let surface = flows.surface(&login.user_code).await;
    flows
        .finish(
            &login.user_code,
            Ok(Approval {
                user,
                subject: who.subject,
                email: who.email,
                groups: who.groups,
                idp_refresh,
                surface,
            }),
        )
        .await;
    response
}

/// A browser sign-in that ends refused: the device poll gets `access_denied` with `message`,
/// and the browser the same words.
async fn deny(state: &AppState, user_code: &str, message: String) -> Response {
    state.meter.metrics.signin("denied");
    let page = page::failed(StatusCode::FORBIDDEN, &message);
    state.signin.flows.finish(user_code, Err(message)).await;
    page
}

/// `[oidc.auto_users]`: adds the user to the config, creates and tags their profiles, and
/// loads the config, before the device code is approved. A failure removes the entry again.
async fn provision(state: &AppState, name: &str, who: &Identity) -> Result<(), String> {
    let _one = state.signin.provisioning.lock().await;
    let Some(path) = state.config_path.clone() else {
        return Err("This bedrock-gate cannot add users (it runs without a config file).".into());
    };
    let live = state.live.load_full();
    let Some(auto) = live
        .config
        .signin
        .as_ref()
        .and_then(|s| s.auto_users.clone())
    else {
        return Err("Automatic sign-up is turned off.".into());
    };
    let email = who.email.clone().unwrap_or_default();
    match crate::admin::provision::add_signed_in_user(&path, name, &email, &auto).await {
        Ok(()) => {}
        Err(e) => {
            tracing::error!(user = %name, error = %format!("{e:#}"), "automatic sign-up failed");
            return Err(format!(
                "bedrock-gate could not set you up ({}). Ask your bedrock-gate admin; they can add you with `bedrock-gate users add`.",
                crate::refusal::shown(&format!("{e:#}"))
            ));
        }
    }
    match crate::reload::reload(state, &path) {
        Ok(_) => {
            tracing::info!(user = %name, "user added by their first sign-in");
            Ok(())
        }
        Err(e) => Err(format!(
            "bedrock-gate added you but could not load its config: {e}"
        )),
    }
}

fn issued_json(issued: &sessions::Issued) -> Response {
    let mut body = serde_json::json!({
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
    });
    if let Some(r) = &issued.refresh_token {
        body["refresh_token"] = r.clone().into();
    }
    if let Some(e) = &issued.email {
        body["email"] = e.clone().into();
    }
    let mut resp = axum::Json(body).into_response();
    no_store(resp.headers_mut());
    resp
}

/// Runs a store call off the async threads.
async fn blocking<R: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&SessionStore) -> anyhow::Result<R> + Send + 'static,
) -> anyhow::Result<R> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state.signin.store))
        .await
        .map_err(|e| anyhow::anyhow!("session store task failed: {e}"))?
}

fn store_failed(e: &anyhow::Error) -> Response {
    tracing::error!(error = %format!("{e:#}"), "session store failed");
    oauth_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "the proxy could not store the session; try again",
    )
}

/// `POST /oauth/token`: the device grant and the refresh grant.
async fn token(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let live = state.live.load_full();
    let Some(s) = live.config.signin.clone() else {
        return not_configured();
    };
    let Some(form) = read_form(request).await else {
        return bad_form();
    };
    match field(&form, "grant_type") {
        Some("urn:ietf:params:oauth:grant-type:device_code") => {
            let Some(device_code) = field(&form, "device_code").filter(|c| c.len() <= 256) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "device_code is missing",
                );
            };
            device_grant(&state, &live.config, &s, device_code).await
        }
        Some("refresh_token") => {
            let Some(refresh) = field(&form, "refresh_token").filter(|c| c.len() <= 256) else {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "refresh_token is missing",
                );
            };
            refresh_grant(&state, &live.config, &s, refresh.to_string()).await
        }
        Some(other) => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!(
                "`{}` is not a grant this bedrock-gate serves (device_code and refresh_token)",
                crate::refusal::shown(other)
            ),
        ),
        None => oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "grant_type is missing",
        ),
    }
}

async fn device_grant(
    state: &Arc<AppState>,
    config: &Config,
    s: &SignIn,
    device_code: &str,
) -> Response {
    let approval = match state.signin.flows.poll(device_code).await {
        Poll::Pending => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "authorization_pending",
                "waiting for the sign-in in the browser",
            );
        }
        Poll::SlowDown => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "slow_down",
                "polling faster than the interval",
            );
        }
        Poll::Denied(message) => {
            return oauth_error(StatusCode::BAD_REQUEST, "access_denied", &message);
        }
        Poll::Expired => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "expired_token",
                "the code expired before the sign-in finished; run /login again",
            );
        }
        Poll::Invalid => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "unknown or already used device_code",
            );
        }
        Poll::Approved(a) => a,
    };
    if config.users.by_name(&approval.user).is_none() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "access_denied",
            "the user this sign-in maps to is no longer in the config",
        );
    }
    let grant = *approval;
    let (ttl, refresh_ttl) = (s.session_ttl, s.refresh_ttl);
    match blocking(state, move |store| store.issue(&grant, ttl, refresh_ttl)).await {
        Ok(issued) => issued_json(&issued),
        Err(e) => store_failed(&e),
    }
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(StatusCode::UNAUTHORIZED, "invalid_grant", description)
}

async fn refresh_grant(
    state: &Arc<AppState>,
    config: &Config,
    s: &SignIn,
    refresh: String,
) -> Response {
    let lock = {
        let mut map = state
            .signin
            .refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(refresh.clone()).or_default().clone()
    };
    let _one = lock.lock().await;
    // Looked up under the lock: a refresh that just rotated this token made it unknown.
    let found = match blocking(state, move |store| store.refreshable(&refresh)).await {
        Ok(f) => f,
        Err(e) => return store_failed(&e),
    };
    let Some(found) = found else {
        return invalid_grant(
            "the refresh token is unknown, expired or revoked; sign in again with /login",
        );
    };
    let id = found.session.id;
    let end = |why: &str| {
        let why = why.to_string();
        let state = state.clone();
        async move {
            state.meter.metrics.refresh("refused");
            if let Err(e) = blocking(&state, move |store| store.end(id)).await {
                tracing::error!(error = %format!("{e:#}"), "could not end a session");
            }
            invalid_grant(&why)
        }
    };
    let tokens = match state.signin.idp.refresh(s, &found.idp_refresh).await {
        Ok(t) => t,
        Err(IdpError::Refused(e)) => {
            tracing::info!(user = %found.session.user, "refresh refused by the IdP; session ended: {e}");
            return end("the company sign-in provider no longer accepts this sign-in; run /login")
                .await;
        }
        Err(IdpError::Unavailable(e)) => {
            tracing::warn!(error = %e, "refresh: IdP unavailable");
            state.meter.metrics.refresh("idp_unavailable");
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the company sign-in provider could not be reached; the client retries later",
            );
        }
    };
    let mut who = Identity {
        subject: found.session.subject.clone(),
        email: found.session.email.clone(),
        groups: found.session.groups.clone(),
    };
    if let Some(id_token) = &tokens.id_token {
        match state.signin.idp.verify(s, id_token, None).await {
            Ok(claims) => match oidc::identity(s, &claims) {
                Ok(now) if now.subject == who.subject => who = now,
                _ => {
                    return end("the sign-in provider answered for another identity; run /login")
                        .await;
                }
            },
            Err(IdpError::Unavailable(_)) => {
                state.meter.metrics.refresh("idp_unavailable");
                return oauth_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    "the company sign-in provider's keys could not be fetched; the client retries later",
                );
            }
            Err(IdpError::Refused(e)) => {
                tracing::warn!(user = %found.session.user, "refresh: id_token refused: {e}");
                return end("the sign-in provider's answer could not be verified; run /login")
                    .await;
            }
        }
    }
    let user = match decide(config, s, &who) {
        Ok(Decision::User(u)) => u.name.clone(),
        // A user the config no longer has is not added back by a refresh.
        Ok(Decision::Provision(_)) => {
            return end("no bedrock-gate user is mapped to this sign-in any more; run /login")
                .await;
        }
        Err(message) => return end(&message).await,
    };
    let grant = Grant {
        user,
        subject: who.subject,
        email: who.email,
        groups: who.groups,
        idp_refresh: tokens.refresh_token,
        surface: found.surface,
    };
    let (ttl, refresh_ttl) = (s.session_ttl, s.refresh_ttl);
    match blocking(state, move |store| {
        store.rotate(id, &grant, ttl, refresh_ttl)
    })
    .await
    {
        Ok(issued) => {
            state.meter.metrics.refresh("rotated");
            issued_json(&issued)
        }
        Err(e) => store_failed(&e),
    }
}

/// `POST /oauth/revoke` (RFC 7009): ends the session of a bearer or refresh token. Always 200
/// for a well-formed request, known token or not.
async fn revoke(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let Some(form) = read_form(request).await else {
        return bad_form();
    };
    let Some(token) = field(&form, "token").filter(|t| !t.is_empty() && t.len() <= 256) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is missing",
        );
    };
    let token = token.to_string();
    match blocking(&state, move |store| store.revoke_token(&token)).await {
        Ok(found) => {
            if found {
                tracing::info!("session revoked by its client");
            }
            let mut resp = StatusCode::OK.into_response();
            no_store(resp.headers_mut());
            resp
        }
        Err(e) => store_failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_checks_origin_then_fetch_metadata() {
        let mut h = HeaderMap::new();
        assert!(!same_origin(&h, "https://gw.example:8787"));
        h.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(same_origin(&h, "https://gw.example:8787"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h, "https://gw.example:8787"));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://gw.example:8787"),
        );
        assert!(same_origin(&h, "https://gw.example:8787"));
    }

    #[test]
    fn the_cookie_is_bound_to_the_state() {
        let mut h = HeaderMap::new();
        let v = format!("a=b; {LOGIN_COOKIE}={}", cookie_value("s1"));
        h.insert(header::COOKIE, HeaderValue::from_str(&v).unwrap());
        assert!(cookie_matches(&h, "s1"));
        assert!(!cookie_matches(&h, "s2"));
    }
}
