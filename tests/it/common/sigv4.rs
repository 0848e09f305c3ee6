//! An independent SigV4 verifier for the fake Bedrock, written from the AWS spec rather than
//! with aws-sigv4, so a proxy that signs a different path, query or header set than it sends
//! (or encodes the canonical URI wrongly) fails here the way it would fail at AWS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};

pub const ACCESS_KEY: &str = "AKIDBEDROCKGATETEST";
pub const SECRET_KEY: &str = "bedrock-gate-test-secret-key";

#[derive(Debug, Clone)]
pub struct Verified {
    pub access_key: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
}

fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("hmac key");
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// Verifies the SigV4 `Authorization` header of a received request against the test secret.
pub fn verify(
    method: &str,
    raw_path: &str,
    raw_query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Verified, String> {
    verify_with(SECRET_KEY, method, raw_path, raw_query, headers, body)
}

/// [`verify`] with a given secret key.
pub fn verify_with(
    secret: &str,
    method: &str,
    raw_path: &str,
    raw_query: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Verified, String> {
    let auth = headers
        .get("authorization")
        .ok_or("no authorization header")?
        .to_str()
        .map_err(|_| "authorization not text")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let (credential, signed, signature) = (
        credential.ok_or("no Credential")?,
        signed.ok_or("no SignedHeaders")?,
        signature.ok_or("no Signature")?,
    );
    let cparts: Vec<&str> = credential.split('/').collect();
    let [access_key, date, region, service, "aws4_request"] = cparts[..] else {
        return Err(format!("bad credential scope {credential}"));
    };
    let amz_date = headers
        .get("x-amz-date")
        .ok_or("no x-amz-date")?
        .to_str()
        .map_err(|_| "x-amz-date not text")?;
    if !amz_date.starts_with(date) {
        return Err("x-amz-date does not match the credential date".into());
    }

    // Canonical URI: each segment of the path as sent, URI-encoded once more (all services but S3).
    let canonical_uri = raw_path
        .split('/')
        .map(|seg| uri_encode(seg, false))
        .collect::<Vec<_>>()
        .join("/");
    let canonical_query = match raw_query {
        None | Some("") => String::new(),
        Some(q) => {
            let mut pairs: Vec<(String, String)> = q
                .split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (
                        uri_encode(&percent_decode(k), false),
                        uri_encode(&percent_decode(v), false),
                    )
                })
                .collect();
            pairs.sort();
            pairs
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        }
    };
    let signed_headers: Vec<String> = signed.split(';').map(str::to_string).collect();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err("host is not signed".into());
    }
    let mut canonical_headers = String::new();
    for name in &signed_headers {
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| {
                v.to_str()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(format!("signed header {name} is missing"));
        }
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let payload_hash = hex::encode(Sha256::digest(body));
    let canonical_request = format!(
        "{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed}\n{payload_hash}"
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{service}/aws4_request\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date);
    let k_region = hmac(&k_date, region);
    let k_service = hmac(&k_region, service);
    let k_signing = hmac(&k_service, "aws4_request");
    let expected = hex::encode(hmac(&k_signing, &string_to_sign));
    if expected != signature {
        return Err(format!(
            "signature mismatch; canonical request was:\n{canonical_request}"
        ));
    }
    Ok(Verified {
        access_key: access_key.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers,
    })
}

/// How [`Keyring::verify`]'s error starts when the access key is neither in the keyring nor
/// [`ACCESS_KEY`] (AWS answers UnrecognizedClientException / InvalidClientTokenId).
pub const UNKNOWN_KEY: &str = "unknown access key";

/// The access key in the `Credential=` of a request's `Authorization` header.
pub fn access_key_of(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    let cred = auth.split("Credential=").nth(1)?;
    Some(cred.split('/').next()?.to_string())
}

/// Credentials a fake accepts besides [`ACCESS_KEY`]/[`SECRET_KEY`]: access key -> (secret,
/// session token). Shared (clones see the same entries): the fake STS adds what it issues, so a
/// fake Bedrock holding a clone verifies requests signed with those credentials.
#[derive(Debug, Clone, Default)]
pub struct Keyring(pub Arc<Mutex<Keys>>);

/// access key -> (secret, session token)
pub type Keys = HashMap<String, (String, Option<String>)>;

impl Keyring {
    pub fn new() -> Keyring {
        Keyring::default()
    }

    pub fn insert(&self, access_key: &str, secret: &str, session_token: Option<&str>) {
        self.0.lock().expect("lock").insert(
            access_key.to_string(),
            (secret.to_string(), session_token.map(str::to_string)),
        );
    }

    /// Forgets an access key (revoked or expired credentials); returns whether it was there.
    pub fn remove(&self, access_key: &str) -> bool {
        self.0.lock().expect("lock").remove(access_key).is_some()
    }

    pub fn get(&self, access_key: &str) -> Option<(String, Option<String>)> {
        self.0.lock().expect("lock").get(access_key).cloned()
    }

    /// Verifies with the secret of the request's access key. Credentials with a session token
    /// also need a signed `x-amz-security-token` header carrying exactly that token. An access
    /// key not in the keyring must be [`ACCESS_KEY`] (signed with [`SECRET_KEY`], no token).
    pub fn verify(
        &self,
        method: &str,
        raw_path: &str,
        raw_query: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Verified, String> {
        let Some(key) = access_key_of(headers) else {
            // No usable Credential: let the verifier say what is wrong.
            return verify(method, raw_path, raw_query, headers, body);
        };
        let sent = headers
            .get("x-amz-security-token")
            .map(|v| v.to_str().unwrap_or("").to_string());
        let (secret, token) = match self.get(&key) {
            Some(entry) => entry,
            None if key == ACCESS_KEY => (SECRET_KEY.to_string(), None),
            None => return Err(format!("{UNKNOWN_KEY} {key}")),
        };
        let v = verify_with(&secret, method, raw_path, raw_query, headers, body)?;
        match (token, sent) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(format!("{key} has no session token, but one was sent"));
            }
            (Some(_), None) => {
                return Err(format!("{key} needs its x-amz-security-token header"));
            }
            (Some(t), Some(s)) if t != s => {
                return Err(format!(
                    "x-amz-security-token is not the one issued with {key}"
                ));
            }
            (Some(_), Some(_)) => {
                if !v.signed_headers.iter().any(|h| h == "x-amz-security-token") {
                    return Err("x-amz-security-token is not signed".into());
                }
            }
        }
        Ok(v)
    }
}
