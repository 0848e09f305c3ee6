//! A caller's own SigV4 signature, made with a key pair `keys add --sigv4` issued.
//!
//! Checked in two steps, because a signature covers the body's SHA-256 and identification
//! must not wait for the body: [`Signature::start`] reads the `Authorization` header, the date
//! and the signed headers as they arrived (the access key id already named the user, so every
//! refusal after it has that user's row); [`Signature::verify`] rebuilds the canonical request
//! once the body is read and compares, before anything is forwarded.
//!
//! The canonical request is rebuilt with aws-sigv4 (the signer the AWS SDKs use) from the raw
//! path and query exactly as received, so the double-encoding rule holds on the way in as it
//! does on the way out, and from exactly the headers the caller listed in `SignedHeaders`. The
//! secret is derived from the master key for the one comparison, which is constant-time.
//!
//! This module never logs, never quotes a secret or a signature in a message, and never lets
//! the caller's signature or date reach Bedrock (`upstream` signs its own).

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::request::Parts;
use subtle::ConstantTimeEq as _;

use crate::auth::MasterKey;
use crate::refusal::{Reason, Refusal};

/// The only signing algorithm accepted (SigV4A's `AWS4-ECDSA-P256-SHA256` is not).
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The service name Bedrock's runtime and control plane are signed for.
pub const SERVICE: &str = "bedrock";
/// How far the signing time may be from the proxy's clock, as at AWS.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);
/// More signed headers than this is no real client.
const MAX_SIGNED_HEADERS: usize = 64;
/// Header that carries a session token; issued key pairs have none.
const SESSION_TOKEN: &str = "x-amz-security-token";

/// What ends a refusal of a signature: how to get a key pair that works.
const HOW_TO: &str = "Sign with the AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY that \
                      `bedrock-gate keys add NAME --sigv4` printed, and no AWS_SESSION_TOKEN.";

/// The parts of an `Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…,
/// Signature=…` header.
#[derive(Debug, PartialEq, Eq)]
pub struct Authorization<'a> {
    pub access_key_id: &'a str,
    /// The credential scope's date, `YYYYMMDD`.
    pub date: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    pub signed_headers: Vec<&'a str>,
    pub signature: &'a str,
}

/// Whether an `Authorization` value is a SigV4 one (of any algorithm), so it is refused in
/// SigV4's words rather than as a malformed API key.
pub fn is_sigv4(value: &str) -> bool {
    value.starts_with("AWS4-")
}

fn malformed(what: &str) -> Refusal {
    Refusal::new(
        Reason::BadSignature,
        format!("The Authorization header is not a valid SigV4 signature: {what}. {HOW_TO}"),
    )
}

/// Parses the header, checking each part's shape. Messages never quote the signature.
pub fn parse_authorization(value: &str) -> Result<Authorization<'_>, Refusal> {
    let Some(rest) = value.strip_prefix(ALGORITHM) else {
        return Err(malformed(&format!("only {ALGORITHM} is accepted")));
    };
    if !rest.starts_with(' ') {
        return Err(malformed(&format!("only {ALGORITHM} is accepted")));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        let (name, v) = part
            .split_once('=')
            .ok_or_else(|| malformed("expected Credential=, SignedHeaders= and Signature="))?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            _ => {
                return Err(malformed(
                    "unexpected part (expected Credential, SignedHeaders, Signature)",
                ));
            }
        };
        if slot.replace(v).is_some() {
            return Err(malformed("a part is given twice"));
        }
    }
    let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature) else {
        return Err(malformed(
            "expected Credential=, SignedHeaders= and Signature=",
        ));
    };
    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(malformed(
            "the Credential is not ACCESS_KEY_ID/DATE/REGION/SERVICE/aws4_request",
        ));
    };
    if access_key_id.is_empty()
        || access_key_id.len() > 128
        || !access_key_id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(malformed("the access key id is not one"));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("the credential date is not YYYYMMDD"));
    }
    if !crate::arn::is_region(region) {
        return Err(malformed("the credential region is not an AWS region"));
    }
    if terminator != "aws4_request" {
        return Err(malformed("the Credential does not end in aws4_request"));
    }
    let signed_headers: Vec<&str> = signed.split(';').collect();
    if signed_headers.len() > MAX_SIGNED_HEADERS
        || signed_headers.iter().any(|h| {
            h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
    {
        return Err(malformed(
            "SignedHeaders is not a list of lower-case header names",
        ));
    }
    if !signed_headers.contains(&"host") {
        return Err(malformed("SignedHeaders must include host"));
    }
    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(malformed("the Signature is not 64 lower-case hex digits"));
    }
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

/// A caller's signature, read from the request head and waiting for the body's hash.
#[derive(Debug)]
pub struct Signature {
    access_key_id: String,
    region: String,
    time: SystemTime,
    method: String,
    /// `http://HOST/PATH?QUERY`, the path and query exactly as received.
    url: String,
    /// The signed headers as received, in the caller's order.
    headers: Vec<(String, String)>,
    signature: String,
}

impl Signature {
    /// Checks what can be checked before the body: the service, the session token, the date
    /// against `now`, and that every signed header is there.
    pub fn start(
        parts: &Parts,
        auth: &Authorization<'_>,
        now: SystemTime,
    ) -> Result<Signature, Refusal> {
        if parts.headers.contains_key(SESSION_TOKEN) {
            return Err(Refusal::new(
                Reason::UnknownAccessKey,
                format!(
                    "The request carries a session token (X-Amz-Security-Token); key pairs bedrock-gate issues have none. {HOW_TO}"
                ),
            ));
        }
        if auth.service != SERVICE {
            return Err(malformed(&format!(
                "it is signed for service `{}`; sign for `{SERVICE}`",
                auth.service.chars().take(32).collect::<String>()
            )));
        }
        let stamp = parts
            .headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| malformed("the request has no X-Amz-Date header"))?;
        let time = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
            .map_err(|_| malformed("X-Amz-Date is not YYYYMMDDTHHMMSSZ"))?
            .and_utc();
        if !stamp.starts_with(auth.date) {
            return Err(malformed(
                "the credential date is not the date of X-Amz-Date",
            ));
        }
        let time = SystemTime::from(time);
        check_skew(time, now)?;
        let host = match parts.headers.get(http::header::HOST) {
            Some(v) => v.to_str().ok(),
            None => parts.uri.authority().map(|a| a.as_str()),
        }
        .filter(|h| h.parse::<http::uri::Authority>().is_ok())
        .ok_or_else(|| malformed("the request has no valid Host"))?;
        let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = Vec::with_capacity(auth.signed_headers.len());
        for name in &auth.signed_headers {
            if *name == "host" {
                headers.push(("host".to_string(), host.to_string()));
                continue;
            }
            let mut any = false;
            for value in parts.headers.get_all(*name) {
                let value = value
                    .to_str()
                    .map_err(|_| malformed(&format!("the signed header `{name}` is not text")))?;
                headers.push(((*name).to_string(), value.to_string()));
                any = true;
            }
            if !any {
                return Err(malformed(&format!(
                    "the signed header `{name}` is not in the request"
                )));
            }
        }
        Ok(Signature {
            access_key_id: auth.access_key_id.to_string(),
            region: auth.region.to_string(),
            time,
            method: parts.method.as_str().to_string(),
            url: format!("http://{host}{path_and_query}"),
            headers,
            signature: auth.signature.to_string(),
        })
    }

    /// Rebuilds the signature from the request as received and the body's SHA-256 (lowercase
    /// hex), and compares it with the caller's in constant time.
    pub fn verify(&self, master: Option<&MasterKey>, payload_sha256: &str) -> Result<(), Refusal> {
        let master = master.ok_or_else(|| {
            Refusal::internal("a SigV4 caller was identified without a master key loaded")
        })?;
        let secret = master.secret_for(&self.access_key_id);
        let identity: Identity = Credentials::new(
            &self.access_key_id,
            secret.expose(),
            None,
            None,
            "bedrock-gate-issued",
        )
        .into();
        let mut settings = SigningSettings::default();
        // Sign exactly what the caller listed, nothing more and nothing less.
        settings.excluded_headers = Some(Vec::new());
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(SERVICE)
            .time(self.time)
            .settings(settings)
            .build()
            .map_err(|e| Refusal::internal(format!("verification parameters: {e}")))?
            .into();
        let signable = SignableRequest::new(
            &self.method,
            &self.url,
            self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            SignableBody::Precomputed(payload_sha256.to_string()),
        )
        .map_err(|_| malformed("the request cannot be put in canonical form"))?;
        let (_, expected) = sign(signable, &params)
            .map_err(|_| malformed("the request cannot be put in canonical form"))?
            .into_parts();
        if bool::from(expected.as_bytes().ct_eq(self.signature.as_bytes())) {
            Ok(())
        } else {
            Err(Refusal::new(
                Reason::BadSignature,
                format!(
                    "The request signature we calculated does not match the signature you provided. \
                     Check your AWS Secret Access Key and signing method; a request changed after it \
                     was signed (its body, path, query or a signed header) fails the same way. {HOW_TO}"
                ),
            ))
        }
    }
}

fn amz_date(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

/// Refuses a signing time more than [`MAX_SKEW`] from `now`, in AWS's words.
fn check_skew(time: SystemTime, now: SystemTime) -> Result<(), Refusal> {
    let clock = "Check the clock of the machine that signs (it must be within 15 minutes of this bedrock-gate's).";
    if time + MAX_SKEW < now {
        return Err(Refusal::new(
            Reason::BadSignature,
            format!(
                "Signature expired: {} is now earlier than {} ({} - 15 min.). {clock}",
                amz_date(time),
                amz_date(now - MAX_SKEW),
                amz_date(now)
            ),
        ));
    }
    if time > now + MAX_SKEW {
        return Err(Refusal::new(
            Reason::BadSignature,
            format!(
                "Signature not yet current: {} is still later than {} ({} + 15 min.). {clock}",
                amz_date(time),
                amz_date(now + MAX_SKEW),
                amz_date(now)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: &str = "fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024";

    fn header(cred: &str, signed: &str, sig: &str) -> String {
        format!("{ALGORITHM} Credential={cred}, SignedHeaders={signed}, Signature={sig}")
    }

    #[test]
    fn parses_what_the_sdks_send() {
        let v = header(
            "BGAKAAAAAAAAAAAAAAAA/20261202/us-east-1/bedrock/aws4_request",
            "content-type;host;x-amz-date",
            SIG,
        );
        let a = parse_authorization(&v).unwrap();
        assert_eq!(a.access_key_id, "BGAKAAAAAAAAAAAAAAAA");
        assert_eq!(a.date, "20261202");
        assert_eq!(a.region, "us-east-1");
        assert_eq!(a.service, "bedrock");
        assert_eq!(a.signed_headers, ["content-type", "host", "x-amz-date"]);
        // Without spaces after the commas, as some signers write it.
        let tight = v.replace(", ", ",");
        assert_eq!(parse_authorization(&tight).unwrap(), a);
    }

    #[test]
    fn malformed_headers_are_refused_without_quoting_the_signature() {
        let cred = "BGAKAAAAAAAAAAAAAAAA/20261202/us-east-1/bedrock/aws4_request";
        for bad in [
            "AWS4-ECDSA-P256-SHA256 Credential=x".to_string(),
            ALGORITHM.to_string(),
            header(cred, "content-type;x-amz-date", SIG),
            header(cred, "Host;x-amz-date", SIG),
            header(cred, "host", &SIG[..60]),
            header(cred, "host", &SIG.to_uppercase()),
            header("BGAK/20261202/us-east-1/bedrock", "host", SIG),
            header(
                "BGAK/2026-12-02/us-east-1/bedrock/aws4_request",
                "host",
                SIG,
            ),
            header(
                "BGAK/20261202/us-east-99x/bedrock/aws4_request",
                "host",
                SIG,
            ),
            header("BG AK/20261202/us-east-1/bedrock/aws4_request", "host", SIG),
            format!("{} , Signature={SIG}", header(cred, "host", SIG)),
            format!("{ALGORITHM} Credential={cred}, SignedHeaders=host"),
        ] {
            let e = parse_authorization(&bad).unwrap_err();
            assert_eq!(e.reason, Reason::BadSignature, "{bad}");
            assert!(!e.message.contains(&SIG[..16]), "{}", e.message);
            assert!(e.message.contains("keys add NAME --sigv4"), "{}", e.message);
        }
    }

    #[test]
    fn the_clock_may_be_off_by_fifteen_minutes_and_no_more() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(check_skew(now - MAX_SKEW, now).is_ok());
        assert!(check_skew(now + MAX_SKEW, now).is_ok());
        let e = check_skew(now - MAX_SKEW - Duration::from_secs(1), now).unwrap_err();
        assert!(
            e.message.starts_with("Signature expired: "),
            "{}",
            e.message
        );
        assert!(e.message.contains("clock"), "{}", e.message);
        let e = check_skew(now + MAX_SKEW + Duration::from_secs(1), now).unwrap_err();
        assert!(
            e.message.starts_with("Signature not yet current: "),
            "{}",
            e.message
        );
    }

    /// Signs like an SDK would (aws-sigv4's defaults), then checks the proxy's verification
    /// agrees, and that any change after signing is caught.
    #[test]
    fn verifies_an_sdk_signature_and_catches_changes() {
        let (master, _) = MasterKey::generate().unwrap();
        let id = "BGAKAAAAAAAAAAAAAAAA";
        let secret = master.secret_for(id);
        let now = SystemTime::now();
        let body = br#"{"messages":[]}"#;
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body));
        let path = "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Fabc/converse";
        let identity: Identity = Credentials::new(id, secret.expose(), None, None, "t").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("bedrock")
            .time(now)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let url = format!("http://127.0.0.1:9/{}", &path[1..]);
        let signable = SignableRequest::new(
            "POST",
            &url,
            [
                ("content-type", "application/json"),
                ("host", "127.0.0.1:9"),
            ]
            .into_iter(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut req = http::Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "127.0.0.1:9")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        instructions.apply_to_request_http1x(&mut req);
        let (parts, ()) = req.into_parts();
        let auth_value = parts.headers["authorization"].to_str().unwrap().to_string();
        let auth = parse_authorization(&auth_value).unwrap();
        let sig = Signature::start(&parts, &auth, now).unwrap();
        sig.verify(Some(&master), &hash).unwrap();

        // Another body.
        let other = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"{}"));
        let e = sig.verify(Some(&master), &other).unwrap_err();
        assert_eq!(e.reason, Reason::BadSignature);
        assert!(e.message.contains("does not match"), "{}", e.message);
        // Another master key (so another secret).
        let (wrong, _) = MasterKey::generate().unwrap();
        assert!(sig.verify(Some(&wrong), &hash).is_err());
        // Another path.
        let mut moved = parts.clone();
        moved.uri = path.replace("abc", "abd").parse().unwrap();
        let sig = Signature::start(&moved, &auth, now).unwrap();
        assert!(sig.verify(Some(&master), &hash).is_err());
        // A signed header changed.
        let mut retyped = parts.clone();
        retyped
            .headers
            .insert("content-type", "text/plain".parse().unwrap());
        let sig = Signature::start(&retyped, &auth, now).unwrap();
        assert!(sig.verify(Some(&master), &hash).is_err());
        // A session token.
        let mut token = parts.clone();
        token
            .headers
            .insert("x-amz-security-token", "t".parse().unwrap());
        let e = Signature::start(&token, &auth, now).unwrap_err();
        assert_eq!(e.reason, Reason::UnknownAccessKey);
        // A signed header missing.
        let mut lost = parts;
        lost.headers.remove("content-type");
        let e = Signature::start(&lost, &auth, now).unwrap_err();
        assert!(e.message.contains("`content-type`"), "{}", e.message);
    }
}
