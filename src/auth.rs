//! Who is calling: API key extraction, hashing and key generation; and the key pairs for
//! SigV4 callers (`keys add --sigv4`).
//!
//! Keys are only ever held as SHA-256 hashes in the config and in memory; the raw key lives in
//! an [`ApiKey`] for the few instructions between reading the header and hashing it, and its
//! `Debug` prints `*****`. An issued key pair's secret is never stored anywhere: it is
//! HMAC-SHA256 of the access key id under the [`MasterKey`], made again when a signature is
//! checked. This module never logs.

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

/// Reads the caller's key from `Authorization: Bearer` or `x-api-key` (a SigV4 `Authorization`
/// is `identify::sigv4`'s). `how_to` ends every
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

/// The values of the request's cookies called `name`, in order, as sent (not decoded).
pub fn cookies<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v)
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

/// Prefix of every access key id `keys add --sigv4` makes (AWS's own start with `AKIA`/`ASIA`).
pub const ACCESS_KEY_ID_PREFIX: &str = "BGAK";
/// Random characters after the prefix: 16 base32 characters, 80 bits, AWS's length.
const ACCESS_KEY_ID_RANDOM: usize = 16;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// Where the master key can come from instead of `auth.sigv4_master_key_file`.
pub const MASTER_KEY_ENV: &str = "BEDROCK_GATE_SIGV4_MASTER_KEY";
/// Shortest master key accepted, in bytes (after base64 decoding).
const MASTER_KEY_MIN: usize = 32;

/// Whether `s` has the shape of an access key id this proxy issues.
pub fn is_access_key_id(s: &str) -> bool {
    s.strip_prefix(ACCESS_KEY_ID_PREFIX).is_some_and(|rest| {
        rest.len() == ACCESS_KEY_ID_RANDOM && rest.bytes().all(|b| BASE32.contains(&b))
    })
}

/// A new access key id: `BGAK` and 16 base32 characters from the OS's randomness.
pub fn generate_access_key_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; ACCESS_KEY_ID_RANDOM];
    getrandom::fill(&mut bytes)?;
    let mut id = String::from(ACCESS_KEY_ID_PREFIX);
    // 256 is a multiple of 32, so taking each byte modulo 32 is unbiased.
    id.extend(bytes.iter().map(|b| BASE32[usize::from(b % 32)] as char));
    Ok(id)
}

/// The key issued secrets are derived from. Never printed; `Debug` shows `*****`.
#[derive(Clone)]
pub struct MasterKey(hmac::Hmac<Sha256>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(*****)")
    }
}

/// An issued key pair's secret access key. Never printed by `Debug`.
pub struct SecretKey(String);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(*****)")
    }
}

impl SecretKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl MasterKey {
    /// Reads the stored form: base64 of at least 32 bytes (what [`MasterKey::generate`] writes),
    /// surrounding whitespace ignored. The error never quotes the text.
    pub fn parse(text: &str) -> Result<MasterKey, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| {
                "the SigV4 master key is not base64; let `bedrock-gate keys add NAME --sigv4` create one"
                    .to_string()
            })?;
        if bytes.len() < MASTER_KEY_MIN {
            return Err(format!(
                "the SigV4 master key is {} bytes; it needs at least {MASTER_KEY_MIN}",
                bytes.len()
            ));
        }
        MasterKey::from_bytes(&bytes)
    }

    fn from_bytes(bytes: &[u8]) -> Result<MasterKey, String> {
        use hmac::KeyInit as _;
        hmac::Hmac::<Sha256>::new_from_slice(bytes)
            .map(MasterKey)
            .map_err(|_| "the SigV4 master key cannot key an HMAC".to_string())
    }

    /// A new master key (256 bits from the OS) and the text to store it as.
    pub fn generate() -> anyhow::Result<(MasterKey, String)> {
        let mut bytes = [0u8; MASTER_KEY_MIN];
        getrandom::fill(&mut bytes)
            .map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        let key = MasterKey::from_bytes(&bytes).map_err(anyhow::Error::msg)?;
        Ok((key, text))
    }

    /// The secret access key of `access_key_id`: HMAC-SHA256 of the id under this key, as
    /// base64url (43 characters).
    pub fn secret_for(&self, access_key_id: &str) -> SecretKey {
        use hmac::Mac as _;
        let mut mac = self.0.clone();
        mac.update(access_key_id.as_bytes());
        SecretKey(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()),
        )
    }
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
    fn missing_and_empty_keys_are_refused_with_a_hint() {
        for h in [
            headers(&[]),
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
    fn issued_access_key_ids_have_their_shape_and_differ() {
        let a = generate_access_key_id().unwrap();
        let b = generate_access_key_id().unwrap();
        assert!(is_access_key_id(&a), "{a}");
        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
        for bad in [
            "",
            "BGAK",
            "AKIAIOSFODNN7EXAMPLE",
            "BGAKabcdefghijklmnop",
            "BGAK0000000000000000",
        ] {
            assert!(!is_access_key_id(bad), "{bad}");
        }
    }

    #[test]
    fn secrets_derive_from_the_master_key_and_the_id() {
        let (master, text) = MasterKey::generate().unwrap();
        let again = MasterKey::parse(&format!("  {text}\n")).unwrap();
        let id = "BGAKAAAAAAAAAAAAAAAA";
        assert_eq!(
            master.secret_for(id).expose(),
            again.secret_for(id).expose()
        );
        assert_eq!(master.secret_for(id).expose().len(), 43);
        assert_ne!(
            master.secret_for(id).expose(),
            master.secret_for("BGAKAAAAAAAAAAAAAAAB").expose()
        );
        let (other, _) = MasterKey::generate().unwrap();
        assert_ne!(
            master.secret_for(id).expose(),
            other.secret_for(id).expose()
        );
        assert_eq!(format!("{master:?}"), "MasterKey(*****)");
        assert_eq!(format!("{:?}", master.secret_for(id)), "SecretKey(*****)");
    }

    #[test]
    fn a_short_or_garbled_master_key_is_refused_without_echoing_it() {
        let e = MasterKey::parse("c2hvcnQ=").unwrap_err();
        assert!(e.contains("at least 32"), "{e}");
        let e = MasterKey::parse("not base64 at all!").unwrap_err();
        assert!(!e.contains("not base64 at all"), "{e}");
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
