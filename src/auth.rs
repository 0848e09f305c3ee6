//! Who is calling: API key extraction, hashing and key generation.
//!
//! Keys are only ever held as SHA-256 hashes in the config and in memory; the raw key lives in
//! an [`ApiKey`] for the few instructions between reading the header and hashing it, and its
//! `Debug` prints `*****`. This module never logs.

use std::fmt;

use base64::Engine as _;
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::refusal::Refusal;

/// Prefix of every key `keygen` makes, so secret scanners can recognise a leaked one.
pub const KEY_PREFIX: &str = "bgk_";
/// Longer "keys" are not keys; refuse them before hashing.
const MAX_KEY_LEN: usize = 512;

/// A raw API key as presented by a caller. Never printed.
pub struct ApiKey(String);

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(*****)")
    }
}

impl ApiKey {
    pub fn hash(&self) -> KeyHash {
        KeyHash::of_key(&self.0)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// SHA-256 of an API key: what the config stores and what lookups compare.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyHash([u8; 32]);

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self)
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl KeyHash {
    pub fn of_key(key: &str) -> KeyHash {
        KeyHash(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses the config form `sha256:<64 hex digits>`.
    pub fn from_config(s: &str) -> Result<KeyHash, String> {
        let Some(hex_part) = s.strip_prefix("sha256:") else {
            return Err(
                "a key is stored as `sha256:<hex>`; run `bedrock-gate keygen` to make one".into(),
            );
        };
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out)
            .map_err(|_| "expected 64 hex digits after `sha256:`".to_string())?;
        Ok(KeyHash(out))
    }
}

/// A freshly generated key and the config line that stores it.
pub struct NewKey {
    pub key: ApiKey,
    pub hash: KeyHash,
}

/// Generates a random key: `bgk_` and 43 base64url characters (256 bits from the OS).
pub fn generate_key() -> Result<NewKey, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = KeyHash::of_key(&key);
    Ok(NewKey {
        key: ApiKey(key),
        hash,
    })
}

/// Reads the caller's key from `Authorization: Bearer` or `x-api-key`. `how_to` ends every
/// refusal: how a client of the caller's protocol sends the key.
pub fn extract_key(headers: &HeaderMap, how_to: &str) -> Result<ApiKey, Refusal> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let text = value.to_str().map_err(|_| {
            Refusal::unauthenticated(format!(
                "The Authorization header is not valid text. {how_to}"
            ))
        })?;
        let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            return check_key(rest.trim(), how_to);
        }
        if scheme.starts_with("AWS4-") {
            return Err(Refusal::unauthenticated(format!(
                "bedrock-gate does not accept AWS SigV4 credentials; it signs requests itself. {how_to}"
            )));
        }
        return Err(Refusal::unauthenticated(format!(
            "Unsupported Authorization scheme. {how_to}"
        )));
    }
    if let Some(value) = headers.get("x-api-key") {
        let text = value.to_str().map_err(|_| {
            Refusal::unauthenticated(format!("The x-api-key header is not valid text. {how_to}"))
        })?;
        return check_key(text.trim(), how_to);
    }
    Err(Refusal::unauthenticated(format!(
        "No API key in the request. {how_to}"
    )))
}

fn check_key(key: &str, how_to: &str) -> Result<ApiKey, Refusal> {
    if key.is_empty() {
        return Err(Refusal::unauthenticated(format!(
            "The API key is empty. {how_to}"
        )));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Refusal::unauthenticated(format!(
            "The API key is too long to be one. {how_to}"
        )));
    }
    Ok(ApiKey(key.to_string()))
}

/// The message for a key that is well formed but not in the config.
pub fn unknown_key_message(how_to: &str) -> String {
    format!("The API key is not known to this bedrock-gate (revoked or mistyped?). {how_to}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const HOW_TO: &str = "Set AWS_BEARER_TOKEN_BEDROCK.";

    fn extract_key(h: &HeaderMap) -> Result<ApiKey, Refusal> {
        super::extract_key(h, HOW_TO)
    }

    #[test]
    fn bearer_and_x_api_key_are_accepted() {
        let k = extract_key(&headers(&[("authorization", "Bearer abc")])).unwrap();
        assert_eq!(k.expose(), "abc");
        let k = extract_key(&headers(&[("authorization", "bearer  abc ")])).unwrap();
        assert_eq!(k.expose(), "abc");
        let k = extract_key(&headers(&[("x-api-key", "xyz")])).unwrap();
        assert_eq!(k.expose(), "xyz");
    }

    #[test]
    fn missing_sigv4_and_empty_keys_are_refused_with_a_hint() {
        for h in [
            headers(&[]),
            headers(&[("authorization", "AWS4-HMAC-SHA256 Credential=AKID/...")]),
            headers(&[("authorization", "Bearer ")]),
            headers(&[("authorization", "Basic Zm9vOmJhcg==")]),
        ] {
            let e = extract_key(&h).unwrap_err();
            assert_eq!(e.reason, crate::refusal::Reason::Unauthenticated);
            assert!(
                e.message.contains("AWS_BEARER_TOKEN_BEDROCK"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = ApiKey("secret-value".into());
        assert_eq!(format!("{k:?}"), "ApiKey(*****)");
    }

    #[test]
    fn generated_keys_are_prefixed_and_hash_roundtrips() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert!(a.key.expose().starts_with(KEY_PREFIX));
        assert_eq!(a.key.expose().len(), KEY_PREFIX.len() + 43);
        assert_ne!(a.key.expose(), b.key.expose());
        let parsed = KeyHash::from_config(&a.hash.to_string()).unwrap();
        assert_eq!(parsed, a.key.hash());
    }

    #[test]
    fn config_hash_format_is_checked() {
        assert!(KeyHash::from_config("abc").is_err());
        assert!(KeyHash::from_config("sha256:zz").is_err());
        assert!(KeyHash::from_config(&format!("sha256:{}", "a".repeat(64))).is_ok());
    }
}
