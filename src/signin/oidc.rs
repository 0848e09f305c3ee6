//! The company IdP, as an OpenID Connect relying party: discovery, the authorization URL
//! (code flow with PKCE and a nonce), the code exchange, the refresh grant, and id_token
//! verification against the IdP's JWKS (signature, issuer, audience, expiry, nonce).
//!
//! Every call has a deadline (`oidc.timeout_secs`) and a size limit, so a slow or broken IdP
//! costs a sign-in, never the proxy. This module never logs a token or the client secret, and
//! never accepts an id_token it did not verify.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::signin::SignIn;

/// Largest IdP answer read.
const MAX_ANSWER: usize = 1024 * 1024;
/// Discovery and keys are fetched again after this long (and keys at once on an unknown kid).
const CACHE_TTL: Duration = Duration::from_secs(3600);
/// The keys are not fetched again for an unknown kid more often than this.
const JWKS_MIN_REFETCH: Duration = Duration::from_secs(30);

/// Why the IdP could not help.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    /// Down, slow, or answering nonsense: try again later.
    #[error("the sign-in provider could not be reached: {0}")]
    Unavailable(String),
    /// It answered, and the answer says no (or cannot be trusted).
    #[error("{0}")]
    Refused(String),
}

/// The parts of the IdP's discovery document bedrock-gate uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Discovery {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub jwks_uri: String,
}

/// A token endpoint answer.
#[derive(Debug, Deserialize)]
pub struct Tokens {
    pub id_token: Option<String>,
    pub refresh_token: Option<String>,
}

/// The client, with discovery and keys cached.
pub struct Idp {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    discovery: Mutex<Option<(Instant, String, Discovery)>>,
    keys: Mutex<Option<(Instant, String, JwkSet)>>,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp").finish_non_exhaustive()
    }
}

impl Default for Idp {
    fn default() -> Self {
        Self::new()
    }
}

/// PKCE: a verifier and its S256 challenge.
pub fn pkce_challenge(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

impl Idp {
    pub fn new() -> Idp {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = crate::upstream::tls_connector()
            .enable_http1()
            .wrap_connector(http);
        Idp {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https),
            discovery: Mutex::new(None),
            keys: Mutex::new(None),
        }
    }

    /// One HTTP exchange with the IdP within `timeout`, reading at most [`MAX_ANSWER`].
    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), IdpError> {
        let what = format!("{} {}", request.method(), request.uri().path());
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                IdpError::Unavailable(format!("{what}: {}", crate::upstream::error_chain(&e)))
            })?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| IdpError::Unavailable(format!("{what}: reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| {
            IdpError::Unavailable(format!(
                "{what}: no answer within {} s (oidc.timeout_secs)",
                timeout.as_secs()
            ))
        })?
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, IdpError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(url)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| IdpError::Unavailable(format!("bad URL `{url}`: {e}")))?;
        let (status, body) = self.send(request, timeout).await?;
        if !status.is_success() {
            return Err(IdpError::Unavailable(format!(
                "GET {url} answered {status}"
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| IdpError::Unavailable(format!("GET {url}: not the expected JSON: {e}")))
    }

    /// The IdP's discovery document (cached); its `issuer` must be the configured one.
    pub async fn discovery(&self, settings: &SignIn) -> Result<Discovery, IdpError> {
        if let Some((at, issuer, d)) = &*self.discovery.lock().unwrap_or_else(|p| p.into_inner())
            && at.elapsed() < CACHE_TTL
            && *issuer == settings.issuer
        {
            return Ok(d.clone());
        }
        let url = format!("{}/.well-known/openid-configuration", settings.issuer);
        let d: Discovery = self.get_json(&url, settings.timeout).await?;
        if d.issuer.trim_end_matches('/') != settings.issuer.trim_end_matches('/') {
            return Err(IdpError::Unavailable(format!(
                "the discovery document at {url} names issuer `{}`, not the configured oidc.issuer",
                crate::refusal::shown(&d.issuer)
            )));
        }
        *self.discovery.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), settings.issuer.clone(), d.clone()));
        Ok(d)
    }

    /// Where the browser goes to sign in.
    pub fn authorize_url(
        d: &Discovery,
        settings: &SignIn,
        state: &str,
        nonce: &str,
        verifier: &str,
    ) -> String {
        let scope = settings.scopes.join(" ");
        let query = form(&[
            ("response_type", "code"),
            ("client_id", &settings.client_id),
            ("redirect_uri", &settings.redirect_uri()),
            ("scope", &scope),
            ("state", state),
            ("nonce", nonce),
            ("code_challenge", &pkce_challenge(verifier)),
            ("code_challenge_method", "S256"),
        ]);
        let sep = if d.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        format!("{}{sep}{query}", d.authorization_endpoint)
    }

    /// A token endpoint call with client_secret_basic (RFC 6749 §2.3.1).
    async fn token_call(
        &self,
        settings: &SignIn,
        d: &Discovery,
        params: &[(&str, &str)],
    ) -> Result<Tokens, IdpError> {
        let secret = settings.client_secret.as_ref().map_or("", |s| s.expose());
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(&settings.client_id),
            enc(secret)
        ));
        let mut value = http::HeaderValue::from_str(&format!("Basic {basic}")).map_err(|_| {
            IdpError::Unavailable("the client id or secret is not header-safe".into())
        })?;
        value.set_sensitive(true);
        let request = Request::builder()
            .method(Method::POST)
            .uri(&d.token_endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json")
            .header(header::AUTHORIZATION, value)
            .body(Full::new(Bytes::from(form(params))))
            .map_err(|e| IdpError::Unavailable(format!("bad token endpoint: {e}")))?;
        let (status, body) = self.send(request, settings.timeout).await?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|e| {
                IdpError::Unavailable(format!(
                    "the token endpoint's answer is not token JSON: {e}"
                ))
            });
        }
        #[derive(Deserialize)]
        struct OAuthError {
            error: String,
            error_description: Option<String>,
        }
        match serde_json::from_slice::<OAuthError>(&body) {
            Ok(e) if status.is_client_error() => Err(IdpError::Refused(format!(
                "the sign-in provider refused: {}{}",
                crate::refusal::shown(&e.error),
                e.error_description
                    .map(|d| format!(" ({})", crate::refusal::shown(&d)))
                    .unwrap_or_default()
            ))),
            _ => Err(IdpError::Unavailable(format!(
                "the token endpoint answered {status}"
            ))),
        }
    }

    /// Exchanges the authorization code (with the PKCE verifier).
    pub async fn exchange_code(
        &self,
        settings: &SignIn,
        code: &str,
        verifier: &str,
    ) -> Result<Tokens, IdpError> {
        let d = self.discovery(settings).await?;
        let redirect = settings.redirect_uri();
        self.token_call(
            settings,
            &d,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &redirect),
                ("code_verifier", verifier),
                ("client_id", &settings.client_id),
            ],
        )
        .await
    }

    /// The end of a browser sign-in: exchanges `code` (with the PKCE `verifier`), verifies the
    /// id_token against `nonce` and reads who it names; with the IdP's refresh token, if any.
    pub async fn sign_in(
        &self,
        settings: &SignIn,
        code: &str,
        verifier: &str,
        nonce: &str,
    ) -> Result<(Identity, Option<String>), IdpError> {
        let tokens = self.exchange_code(settings, code, verifier).await?;
        let id_token = tokens
            .id_token
            .ok_or_else(|| IdpError::Refused("the sign-in provider sent no id_token".into()))?;
        let claims = self.verify(settings, &id_token, Some(nonce)).await?;
        Ok((identity(settings, &claims)?, tokens.refresh_token))
    }

    /// The refresh grant: the IdP still vouches for the identity, or refuses it.
    pub async fn refresh(
        &self,
        settings: &SignIn,
        refresh_token: &str,
    ) -> Result<Tokens, IdpError> {
        let d = self.discovery(settings).await?;
        self.token_call(
            settings,
            &d,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("client_id", &settings.client_id),
            ],
        )
        .await
    }

    /// The key set, fetched again when `refetch` and the cache is not brand new.
    async fn keys(
        &self,
        d: &Discovery,
        refetch: bool,
        timeout: Duration,
    ) -> Result<JwkSet, IdpError> {
        if let Some((at, uri, keys)) = &*self.keys.lock().unwrap_or_else(|p| p.into_inner())
            && *uri == d.jwks_uri
            && at.elapsed() < CACHE_TTL
            && !(refetch && at.elapsed() >= JWKS_MIN_REFETCH)
        {
            return Ok(keys.clone());
        }
        let keys: JwkSet = self.get_json(&d.jwks_uri, timeout).await?;
        *self.keys.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), d.jwks_uri.clone(), keys.clone()));
        Ok(keys)
    }

    /// Verifies an id_token: signed by one of the IdP's keys, issued by it, for this client,
    /// not expired, and carrying `nonce` when one is expected. Returns its claims.
    pub async fn verify(
        &self,
        settings: &SignIn,
        id_token: &str,
        nonce: Option<&str>,
    ) -> Result<Map<String, Value>, IdpError> {
        let d = self.discovery(settings).await?;
        let header = jsonwebtoken::decode_header(id_token)
            .map_err(|e| IdpError::Refused(format!("the id_token is malformed: {e}")))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(IdpError::Refused(format!(
                "the id_token is signed with {:?}; only asymmetric keys from the IdP's JWKS are accepted",
                header.alg
            )));
        }
        let mut keys = self.keys(&d, false, settings.timeout).await?;
        let find = |keys: &JwkSet| match &header.kid {
            Some(kid) => keys.find(kid).cloned(),
            None if keys.keys.len() == 1 => keys.keys.first().cloned(),
            None => None,
        };
        let jwk = match find(&keys) {
            Some(k) => k,
            None => {
                keys = self.keys(&d, true, settings.timeout).await?;
                find(&keys).ok_or_else(|| {
                    IdpError::Refused(
                        "the id_token is signed with a key the IdP does not publish".into(),
                    )
                })?
            }
        };
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| IdpError::Refused(format!("the IdP's key cannot be used: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&settings.client_id]);
        validation.set_issuer(&[d.issuer.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 60;
        let data = jsonwebtoken::decode::<Map<String, Value>>(id_token, &key, &validation)
            .map_err(|e| IdpError::Refused(format!("the id_token does not verify: {e}")))?;
        let claims = data.claims;
        if let Some(expected) = nonce {
            match claims.get("nonce").and_then(Value::as_str) {
                Some(n) if constant_time_eq(n.as_bytes(), expected.as_bytes()) => {}
                _ => {
                    return Err(IdpError::Refused(
                        "the id_token's nonce is not the one this sign-in sent (a replayed or mixed-up sign-in)".into(),
                    ));
                }
            }
        }
        Ok(claims)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who an id_token names, read with the configured claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub subject: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
}

/// Reads the identity from verified claims. An email the IdP says is unverified is not used.
pub fn identity(settings: &SignIn, claims: &Map<String, Value>) -> Result<Identity, IdpError> {
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or_else(|| IdpError::Refused("the id_token has no subject".into()))?
        .to_string();
    let unverified = claims.get("email_verified").and_then(Value::as_bool) == Some(false);
    let email = claims
        .get(&settings.email_claim)
        .and_then(Value::as_str)
        .filter(|_| !unverified)
        .and_then(|e| crate::config::signin::normalize_email("", e).ok());
    let groups = match settings.groups_claim.as_ref().and_then(|c| claims.get(c)) {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .take(1000)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    Ok(Identity {
        subject,
        email,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc_7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
