//! A fake OpenID Connect identity provider on 127.0.0.1:0, speaking plain-HTTP OIDC: discovery,
//! JWKS, the authorization endpoint (code flow with PKCE S256 and a nonce) and the token
//! endpoint (authorization code and refresh token grants, client_secret_basic or
//! client_secret_post). id_tokens are RS256 JWTs signed with a throwaway fixture key
//! (`tests/it/fixtures/idp/`). Tests choose who signs in, break the next id_token on purpose
//! ([`Tamper`]), refuse refreshes, slow every answer down, and read back what was asked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::{HeaderMap, Method, StatusCode, header};
use http_body_util::BodyExt;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};
use serde_json::{Value, json};
use sha2::Digest as _;

/// The `kid` of the signing key, in every id_token header and in the JWKS.
pub const KID: &str = "test-key-1";
/// PKCS#1 DER private key whose public half the JWKS serves.
const SIGNING_DER: &[u8] = include_bytes!("../fixtures/idp/signing.der");
/// PKCS#1 DER private key that is in no JWKS ([`Tamper::BadSignature`]).
const OTHER_DER: &[u8] = include_bytes!("../fixtures/idp/other.der");
/// The public JWK of [`SIGNING_DER`].
const SIGNING_JWK: &str = include_str!("../fixtures/idp/signing.jwk.json");

/// The scope every token response reports.
pub const GRANTED_SCOPE: &str = "openid email profile offline_access";
/// Lifetime of an id_token, seconds.
const ID_TOKEN_TTL: u64 = 300;

/// Who the authorization endpoint signs in.
#[derive(Debug, Clone)]
pub struct Identity {
    pub sub: String,
    pub email: String,
    pub groups: Vec<String>,
}

impl Identity {
    pub fn new(sub: &str, email: &str, groups: &[&str]) -> Identity {
        Identity {
            sub: sub.to_string(),
            email: email.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }
}

/// How the next id_token is broken. Each applies to one token only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Signed with a key the JWKS does not hold, still under kid `test-key-1`.
    BadSignature,
    /// `aud` is `someone-else`.
    WrongAudience,
    /// Expired ten minutes ago (`exp` now-600, `iat` now-900).
    Expired,
    /// `nonce` is `not-the-nonce` (also on a refresh, where there would be none).
    WrongNonce,
    /// `iss` is `http://evil.example`.
    WrongIssuer,
    /// Header `alg: none` and an empty signature.
    Unsigned,
}

/// An authorization code not yet redeemed, and what it was issued for.
struct Grant {
    client_id: String,
    redirect_uri: String,
    nonce: String,
    code_challenge: String,
    identity: Identity,
}

struct Inner {
    issuer: String,
    client_id: String,
    client_secret: String,
    identity: Option<Identity>,
    denied: bool,
    tamper: Option<Tamper>,
    refused: HashSet<String>,
    issue_refresh: bool,
    delay: Duration,
    authorize_requests: Vec<BTreeMap<String, String>>,
    token_requests: Vec<BTreeMap<String, String>>,
    refresh_count: usize,
    codes: HashMap<String, Grant>,
    refresh_tokens: HashMap<String, Identity>,
}

type Shared = Arc<Mutex<Inner>>;

#[derive(Clone)]
pub struct FakeIdp {
    pub addr: SocketAddr,
    inner: Shared,
}

impl FakeIdp {
    /// Starts the IdP for one registered client. Nobody signs in until [`FakeIdp::sign_in_as`].
    pub async fn start(client_id: &str, client_secret: &str) -> FakeIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake IdP");
        let addr = listener.local_addr().expect("addr");
        let inner = Arc::new(Mutex::new(Inner {
            issuer: format!("http://{addr}"),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            identity: None,
            denied: false,
            tamper: None,
            refused: HashSet::new(),
            issue_refresh: true,
            delay: Duration::ZERO,
            authorize_requests: Vec::new(),
            token_requests: Vec::new(),
            refresh_count: 0,
            codes: HashMap::new(),
            refresh_tokens: HashMap::new(),
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeIdp { addr, inner }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().expect("lock"))
    }

    /// `http://127.0.0.1:PORT`, the `iss` of its tokens and the base of every endpoint.
    pub fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on the authorization endpoint approves every request as `identity`.
    pub fn sign_in_as(&self, identity: Identity) {
        self.with(|i| {
            i.identity = Some(identity);
            i.denied = false;
        });
    }

    /// From now on the authorization endpoint redirects with `error=access_denied`.
    pub fn deny_sign_ins(&self) {
        self.with(|i| i.denied = true);
    }

    /// The next id_token issued (by either grant) is broken this way; later ones are sound.
    pub fn tamper_next(&self, t: Tamper) {
        self.with(|i| i.tamper = Some(t));
    }

    /// Refresh grants for subject `sub` get 400 `invalid_grant` from now on.
    pub fn refuse_refresh(&self, sub: &str) {
        self.with(|i| i.refused.insert(sub.to_string()));
    }

    /// Whether token responses carry a `refresh_token` (default true). Without, a refresh
    /// grant keeps the presented token valid and returns none.
    pub fn issue_refresh_tokens(&self, yes: bool) {
        self.with(|i| i.issue_refresh = yes);
    }

    /// Every response is delayed by `d` (a slow IdP).
    pub fn set_delay(&self, d: Duration) {
        self.with(|i| i.delay = d);
    }

    /// The query parameters of each `/authorize` call, in order.
    pub fn authorize_requests(&self) -> Vec<BTreeMap<String, String>> {
        self.with(|i| i.authorize_requests.clone())
    }

    /// The form parameters of each `/token` call, in order; `client_secret` values are `***`.
    pub fn token_requests(&self) -> Vec<BTreeMap<String, String>> {
        self.with(|i| i.token_requests.clone())
    }

    /// How many refresh grants succeeded.
    pub fn refresh_count(&self) -> usize {
        self.with(|i| i.refresh_count)
    }
}

/// `application/x-www-form-urlencoded` (also a query string): `+` is a space, then
/// percent-decoding. A repeated name keeps its last value.
pub fn parse_form(s: &str) -> BTreeMap<String, String> {
    let decode = |v: &str| {
        percent_decode(v.replace('+', " ").as_bytes())
            .decode_utf8_lossy()
            .into_owned()
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Everything but the RFC 3986 unreserved characters.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one query component.
pub fn encode(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// The S256 code challenge for `verifier`.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// 32 random bytes, base64url.
fn random_token() -> Result<String, String> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).map_err(|e| format!("no randomness: {e}"))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn text(status: StatusCode, msg: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{msg}\n"),
    )
        .into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn server_error(description: &str) -> Response {
    oauth_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        description,
    )
}

async fn handle(State(inner): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let delay = inner.lock().expect("lock").delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or_default();
    match (&parts.method, path) {
        (&Method::GET, "/.well-known/openid-configuration") => discovery(&inner),
        (&Method::GET, "/jwks") => jwks(),
        (&Method::GET, "/authorize") => authorize(&inner, parse_form(query)),
        (&Method::POST, "/token") => {
            let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
                return text(StatusCode::BAD_REQUEST, "could not read the request body");
            };
            token(&inner, &parts.headers, &body)
        }
        (_, "/.well-known/openid-configuration" | "/jwks" | "/authorize" | "/token") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed on {path}", parts.method),
        ),
        _ => text(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

fn discovery(inner: &Shared) -> Response {
    let issuer = inner.lock().expect("lock").issuer.clone();
    json_response(
        StatusCode::OK,
        &json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/authorize"),
            "token_endpoint": format!("{issuer}/token"),
            "jwks_uri": format!("{issuer}/jwks"),
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": ["openid", "email", "profile", "offline_access"],
        }),
    )
}

fn jwks() -> Response {
    match serde_json::from_str::<Value>(SIGNING_JWK) {
        Ok(key) => json_response(StatusCode::OK, &json!({"keys": [key]})),
        Err(e) => server_error(&format!("bad JWK fixture: {e}")),
    }
}

/// `redirect_uri` with `params` appended to its query.
fn redirect(redirect_uri: &str, params: &[(&str, &str)]) -> Response {
    let mut location = redirect_uri.to_string();
    let mut sep = if redirect_uri.contains('?') { '&' } else { '?' };
    for (k, v) in params {
        location.push(sep);
        location.push_str(&encode(k));
        location.push('=');
        location.push_str(&encode(v));
        sep = '&';
    }
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

fn authorize(inner: &Shared, q: BTreeMap<String, String>) -> Response {
    let mut inner = inner.lock().expect("lock");
    inner.authorize_requests.push(q.clone());
    let get = |k: &str| q.get(k).map(String::as_str).filter(|v| !v.is_empty());
    let problem = if get("client_id") != Some(inner.client_id.as_str()) {
        Some(format!("unknown client_id {:?}", get("client_id")))
    } else if get("redirect_uri").is_none() {
        Some("redirect_uri is missing".to_string())
    } else if get("response_type") != Some("code") {
        Some(format!(
            "response_type must be \"code\", not {:?}",
            get("response_type")
        ))
    } else if !get("scope").is_some_and(|s| s.split(' ').any(|s| s == "openid")) {
        Some(format!("scope must contain openid: {:?}", get("scope")))
    } else if get("state").is_none() {
        Some("state is missing".to_string())
    } else if get("nonce").is_none() {
        Some("nonce is missing".to_string())
    } else if get("code_challenge").is_none() {
        Some("code_challenge is missing (PKCE is required)".to_string())
    } else if get("code_challenge_method") != Some("S256") {
        Some(format!(
            "code_challenge_method must be S256, not {:?}",
            get("code_challenge_method")
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("invalid_request: {problem}"),
        );
    }
    let field = |k: &str| get(k).unwrap_or_default().to_string();
    let (redirect_uri, state) = (field("redirect_uri"), field("state"));
    let identity = match (&inner.identity, inner.denied) {
        (Some(identity), false) => identity.clone(),
        _ => {
            return redirect(
                &redirect_uri,
                &[
                    ("error", "access_denied"),
                    ("error_description", "The user denied the sign-in"),
                    ("state", &state),
                ],
            );
        }
    };
    let code = match random_token() {
        Ok(c) => c,
        Err(e) => return server_error(&e),
    };
    inner.codes.insert(
        code.clone(),
        Grant {
            client_id: field("client_id"),
            redirect_uri: redirect_uri.clone(),
            nonce: field("nonce"),
            code_challenge: field("code_challenge"),
            identity,
        },
    );
    redirect(&redirect_uri, &[("code", &code), ("state", &state)])
}

/// The client credentials of a token request: HTTP Basic (each half form-urlencoded, RFC 6749
/// §2.3.1) if present, else the `client_id` and `client_secret` form fields.
fn client_credentials(
    headers: &HeaderMap,
    form: &BTreeMap<String, String>,
) -> Option<(String, String)> {
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let auth = auth.to_str().ok()?;
        let (scheme, b64) = auth.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(b64.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        let unescape = |s: &str| {
            parse_form(&format!("x={s}"))
                .remove("x")
                .unwrap_or_default()
        };
        return Some((unescape(id), unescape(secret)));
    }
    Some((
        form.get("client_id")?.clone(),
        form.get("client_secret")?.clone(),
    ))
}

fn token(inner: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let form = parse_form(&String::from_utf8_lossy(body));
    let mut inner = inner.lock().expect("lock");
    let mut recorded = form.clone();
    if let Some(s) = recorded.get_mut("client_secret") {
        *s = "***".to_string();
    }
    inner.token_requests.push(recorded);

    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let authenticated = client_credentials(headers, &form)
        .is_some_and(|(id, secret)| id == inner.client_id && secret == inner.client_secret);
    if !authenticated {
        let mut resp = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        );
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Basic realm=\"fake-idp\""),
        );
        return resp;
    }
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    match field("grant_type") {
        "authorization_code" => {
            // A code is spent by any attempt to redeem it, successful or not.
            let Some(grant) = inner.codes.remove(field("code")) else {
                return invalid_grant("unknown, expired or already used authorization code");
            };
            if grant.client_id != inner.client_id {
                return invalid_grant("the code was issued to another client");
            }
            if grant.redirect_uri != field("redirect_uri") {
                return invalid_grant("redirect_uri does not match the authorization request");
            }
            if pkce_challenge(field("code_verifier")) != grant.code_challenge {
                return invalid_grant("PKCE verification failed");
            }
            issue(&mut inner, &grant.identity, Some(&grant.nonce), None)
        }
        "refresh_token" => {
            let presented = field("refresh_token");
            let Some(identity) = inner.refresh_tokens.get(presented).cloned() else {
                return invalid_grant("unknown or revoked refresh token");
            };
            if inner.refused.contains(&identity.sub) {
                return invalid_grant("the refresh token was revoked by the IdP");
            }
            let resp = issue(&mut inner, &identity, None, Some(presented));
            if resp.status() == StatusCode::OK {
                inner.refresh_count += 1;
            }
            resp
        }
        other => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            &format!("grant_type {other:?} is not supported"),
        ),
    }
}

/// A token response for `identity`. On a refresh (`rotating` is the presented token), that
/// token is replaced by the new one when refresh tokens are issued.
fn issue(
    inner: &mut Inner,
    identity: &Identity,
    nonce: Option<&str>,
    rotating: Option<&str>,
) -> Response {
    let tamper = inner.tamper.take();
    let id_token = match id_token(inner, identity, nonce, tamper) {
        Ok(t) => t,
        Err(e) => return server_error(&e),
    };
    let access_token = match random_token() {
        Ok(t) => t,
        Err(e) => return server_error(&e),
    };
    let mut body = json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": 3600,
        "id_token": id_token,
        "scope": GRANTED_SCOPE,
    });
    if inner.issue_refresh {
        let refresh = match random_token() {
            Ok(t) => t,
            Err(e) => return server_error(&e),
        };
        if let Some(old) = rotating {
            inner.refresh_tokens.remove(old);
        }
        inner
            .refresh_tokens
            .insert(refresh.clone(), identity.clone());
        body["refresh_token"] = Value::String(refresh);
    }
    json_response(StatusCode::OK, &body)
}

fn id_token(
    inner: &Inner,
    identity: &Identity,
    nonce: Option<&str>,
    tamper: Option<Tamper>,
) -> Result<String, String> {
    let now = now();
    let (iat, exp) = match tamper {
        Some(Tamper::Expired) => (now - 900, now - 600),
        _ => (now, now + ID_TOKEN_TTL),
    };
    let mut claims = json!({
        "iss": if tamper == Some(Tamper::WrongIssuer) { "http://evil.example" } else { inner.issuer.as_str() },
        "aud": if tamper == Some(Tamper::WrongAudience) { "someone-else" } else { inner.client_id.as_str() },
        "sub": identity.sub,
        "email": identity.email,
        "email_verified": true,
        "groups": identity.groups,
        "iat": iat,
        "exp": exp,
    });
    match (tamper, nonce) {
        (Some(Tamper::WrongNonce), _) => claims["nonce"] = json!("not-the-nonce"),
        (_, Some(n)) => claims["nonce"] = json!(n),
        _ => {}
    }
    if tamper == Some(Tamper::Unsigned) {
        let header = json!({"alg": "none", "typ": "JWT", "kid": KID});
        return Ok(format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        ));
    }
    let der = if tamper == Some(Tamper::BadSignature) {
        OTHER_DER
    } else {
        SIGNING_DER
    };
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(KID.to_string());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_rsa_der(der),
    )
    .map_err(|e| format!("signing the id_token: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Self-test of the fake: `cargo test --test it idp::`.

/// RFC 7636 appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

async fn get(url: &str) -> super::Reply {
    super::send(super::request(Method::GET, url, &[], "")).await
}

/// `/authorize` with every parameter right except `overrides`.
async fn authorize_call(
    idp: &FakeIdp,
    redirect_uri: &str,
    overrides: &[(&str, &str)],
) -> super::Reply {
    let mut q: BTreeMap<&str, &str> = [
        ("response_type", "code"),
        ("client_id", "bg-client"),
        ("redirect_uri", redirect_uri),
        ("scope", "openid email offline_access"),
        ("state", "st/ate+1"),
        ("nonce", "n-0nce"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ]
    .into_iter()
    .collect();
    q.extend(overrides.iter().copied());
    let query: Vec<String> = q
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    get(&format!("{}/authorize?{}", idp.issuer(), query.join("&"))).await
}

/// The redirect's target (before `?`) and its query parameters.
fn location(reply: &super::Reply) -> (String, BTreeMap<String, String>) {
    assert_eq!(reply.status, StatusCode::FOUND, "{reply:?}");
    let loc = reply.headers[header::LOCATION].to_str().expect("location");
    let (base, query) = loc.split_once('?').expect("a query");
    (base.to_string(), parse_form(query))
}

/// POST /token with `form`; with `basic`, the client authenticates with HTTP Basic.
async fn token_call(
    idp: &FakeIdp,
    form: &[(&str, &str)],
    basic: Option<(&str, &str)>,
) -> super::Reply {
    let body: Vec<String> = form
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    let auth = basic.map(|(id, secret)| {
        format!(
            "Basic {}",
            STANDARD.encode(format!("{}:{}", encode(id), encode(secret)))
        )
    });
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    if let Some(a) = &auth {
        headers.push(("authorization", a));
    }
    super::send(super::request(
        Method::POST,
        &format!("{}/token", idp.issuer()),
        &headers,
        body.join("&"),
    ))
    .await
}

const REDIRECT: &str = "http://127.0.0.1:1/callback?from=test";

/// A full sign-in: authorize, follow the redirect, redeem the code. The token response.
async fn sign_in(idp: &FakeIdp) -> super::Reply {
    let (_, params) = location(&authorize_call(idp, REDIRECT, &[]).await);
    token_call(
        idp,
        &[
            ("grant_type", "authorization_code"),
            ("code", &params["code"]),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
        ],
        Some(("bg-client", "s3cr:et&")),
    )
    .await
}

fn verify(
    idp: &FakeIdp,
    key: &jsonwebtoken::DecodingKey,
    token: &str,
) -> jsonwebtoken::errors::Result<Value> {
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_issuer(&[idp.issuer()]);
    v.set_audience(&["bg-client"]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.leeway = 0;
    jsonwebtoken::decode::<Value>(token, key, &v).map(|d| d.claims)
}

#[tokio::test]
async fn fake_idp_round_trip() {
    let started = std::time::Instant::now();
    assert_eq!(pkce_challenge(VERIFIER), CHALLENGE);
    let idp = FakeIdp::start("bg-client", "s3cr:et&").await;
    let iss = idp.issuer();

    let disc = get(&format!("{iss}/.well-known/openid-configuration"))
        .await
        .json();
    assert_eq!(disc["issuer"], iss.as_str());
    assert_eq!(disc["token_endpoint"], format!("{iss}/token"));
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(
        get(disc["jwks_uri"].as_str().expect("jwks_uri"))
            .await
            .json(),
    )
    .expect("a JWK set");
    let jwk = jwks.find(KID).expect("the signing key");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("decoding key");

    // Nobody signed in yet: denied, with the state echoed.
    let (base, params) = location(&authorize_call(&idp, REDIRECT, &[]).await);
    assert_eq!(base, "http://127.0.0.1:1/callback");
    assert_eq!(params["error"], "access_denied");
    assert_eq!(params["state"], "st/ate+1");
    assert_eq!(params["from"], "test");

    // Bad requests are not redirected.
    for (k, v, says) in [
        ("client_id", "stranger", "client_id"),
        ("code_challenge_method", "plain", "S256"),
        ("scope", "email", "openid"),
        ("nonce", "", "nonce"),
    ] {
        let r = authorize_call(&idp, REDIRECT, &[(k, v)]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{k}={v}");
        assert!(String::from_utf8_lossy(&r.body).contains(says), "{r:?}");
    }

    idp.sign_in_as(Identity::new(
        "u-1",
        "alice@example.com",
        &["eng", "admins"],
    ));
    let (_, params) = location(&authorize_call(&idp, REDIRECT, &[]).await);
    assert_eq!(params["state"], "st/ate+1");
    let code = params["code"].clone();
    let redeem = |code: String, verifier: &'static str| {
        let idp = idp.clone();
        async move {
            token_call(
                &idp,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", verifier),
                    ("client_id", "bg-client"),
                    ("client_secret", "s3cr:et&"),
                ],
                None,
            )
            .await
        }
    };
    let tokens = redeem(code.clone(), VERIFIER).await;
    assert_eq!(tokens.status, StatusCode::OK, "{tokens:?}");
    let tokens = tokens.json();
    assert_eq!(tokens["token_type"], "Bearer");
    let claims = verify(&idp, &key, tokens["id_token"].as_str().expect("id_token")).expect("valid");
    assert_eq!(claims["sub"], "u-1");
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["groups"], json!(["eng", "admins"]));
    assert_eq!(claims["nonce"], "n-0nce");
    let header = jsonwebtoken::decode_header(tokens["id_token"].as_str().expect("id_token"))
        .expect("header");
    assert_eq!(header.kid.as_deref(), Some(KID));

    // Replay, wrong verifier, wrong client secret.
    assert_eq!(
        redeem(code, VERIFIER).await.json()["error"],
        "invalid_grant"
    );
    let (_, params) = location(&authorize_call(&idp, REDIRECT, &[]).await);
    let r = redeem(
        params["code"].clone(),
        "not-the-verifier-not-the-verifier-000000000",
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_grant");
    assert_eq!(r.json()["error_description"], "PKCE verification failed");
    let r = token_call(
        &idp,
        &[("grant_type", "refresh_token")],
        Some(("bg-client", "nope")),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"], "invalid_client");
    let r = token_call(
        &idp,
        &[("grant_type", "password")],
        Some(("bg-client", "s3cr:et&")),
    )
    .await;
    assert_eq!(r.json()["error"], "unsupported_grant_type");
    assert!(
        idp.token_requests()
            .iter()
            .all(|r| r.get("client_secret").is_none_or(|s| s == "***"))
    );
    assert_eq!(idp.authorize_requests()[0]["code_challenge"], CHALLENGE);

    // Each tamper breaks one token only.
    for t in [
        Tamper::BadSignature,
        Tamper::WrongAudience,
        Tamper::Expired,
        Tamper::WrongIssuer,
        Tamper::Unsigned,
        Tamper::WrongNonce,
    ] {
        idp.tamper_next(t);
        let broken = sign_in(&idp).await.json();
        let result = verify(&idp, &key, broken["id_token"].as_str().expect("id_token"));
        if t == Tamper::WrongNonce {
            assert_eq!(result.expect("signed fine")["nonce"], "not-the-nonce");
        } else {
            assert!(result.is_err(), "{t:?} verified");
        }
        let sound = sign_in(&idp).await.json();
        let claims = verify(&idp, &key, sound["id_token"].as_str().expect("id_token"));
        assert_eq!(claims.expect("sound")["nonce"], "n-0nce", "after {t:?}");
    }

    // Refresh rotates; the old token is spent; a refused subject gets invalid_grant.
    let refresh = |rt: String| {
        let idp = idp.clone();
        async move {
            token_call(
                &idp,
                &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
                Some(("bg-client", "s3cr:et&")),
            )
            .await
        }
    };
    let rt1 = tokens["refresh_token"]
        .as_str()
        .expect("refresh_token")
        .to_string();
    let r = refresh(rt1.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let rt2 = r.json()["refresh_token"]
        .as_str()
        .expect("rotated")
        .to_string();
    assert_ne!(rt1, rt2);
    let claims =
        verify(&idp, &key, r.json()["id_token"].as_str().expect("id_token")).expect("valid");
    assert_eq!(claims["sub"], "u-1");
    assert!(claims.get("nonce").is_none());
    assert_eq!(refresh(rt1).await.json()["error"], "invalid_grant");
    assert_eq!(idp.refresh_count(), 1);
    idp.refuse_refresh("u-1");
    let r = refresh(rt2).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"], "invalid_grant");
    assert_eq!(idp.refresh_count(), 1);

    idp.issue_refresh_tokens(false);
    assert!(sign_in(&idp).await.json().get("refresh_token").is_none());
    idp.deny_sign_ins();
    let (_, params) = location(&authorize_call(&idp, REDIRECT, &[]).await);
    assert_eq!(params["error"], "access_denied");

    // A slow IdP.
    idp.set_delay(Duration::from_millis(100));
    let t = std::time::Instant::now();
    assert_eq!(get(&format!("{iss}/jwks")).await.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(100));

    eprintln!("fake_idp_round_trip took {:?}", started.elapsed());
}
