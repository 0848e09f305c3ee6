//! Fuzzes the SSO sign-in inputs: the typed user code (`signin::device::normalize_user_code`),
//! the identity read from id_token claims (`signin::oidc::identity`), the managed-settings JSON
//! (`front::gateway::canonical_json`, `checksum`, `config::signin::SettingsPolicy::for_user`),
//! gateway routing (`front::gateway::parse`, `owns`) and the config's `normalize_email` and
//! `public_url`. Nothing may panic, and:
//! - a normalised user code is `XXXX-XXXX` in the code alphabet, is exactly the input's letters
//!   (upper-cased, without dashes, spaces and tabs), normalises to itself (also lower-cased or
//!   without its dash), and an input over 64 bytes gives none;
//! - an identity exists exactly when `sub` is a string of 1 to 255 bytes, and is that subject;
//!   its email comes from the configured claim (trimmed, ASCII lower-cased, exactly one `@`),
//!   never when `email_verified` is `false`; its groups come from the groups claim, at most 1000;
//! - canonical JSON is what serde_json writes for the value (compact, keys in order), its keys
//!   are strictly increasing at every level when read back, and it parses back to the same value
//!   and the same text (floats: to a value within rounding, as serde_json's default float parser
//!   is not exact); a checksum is `sha256:` and 64 lowercase hex digits, the same for the
//!   read-back settings; merged settings follow "tables merge key by key, anything else
//!   replaces", layer by layer;
//! - the gateway routes exactly its five method and path pairs (one trailing slash allowed);
//! - an accepted email is lower-case with one `@` and normalises to itself; an accepted
//!   `public_url` starts with a lower-case `https://` or `http://`, has no trailing slash and is
//!   accepted again as it is.
//!
//! Input layout: byte 0 picks the check (`% 5`: user code, identity, settings JSON, gateway route,
//! email and public_url) and `byte 0 / 5` is its option (identity: which claim config; settings:
//! which groups the user is in; route: the method); the rest is the check's input, as lossy
//! UTF-8 where it is text. Identity claims are the rest when it is a JSON object, else records
//! `[key][kind][len][len bytes]` (see `claims_from_records`).

#![no_main]

use std::fmt;
use std::sync::OnceLock;

use bedrock_gate::config::Config;
use bedrock_gate::config::signin::{SettingsPolicy, SignIn, normalize_email, public_url};
use bedrock_gate::front::gateway::{self, Route, canonical_json, checksum};
use bedrock_gate::signin::device::normalize_user_code;
use bedrock_gate::signin::oidc::identity;
use http::Method;
use libfuzzer_sys::fuzz_target;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
const MAX_GROUPS: usize = 1000;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let option = selector / 5;
    match selector % 5 {
        0 => check_user_code(&String::from_utf8_lossy(rest)),
        1 => check_identity(option, rest),
        2 => check_settings(option, rest),
        3 => check_route(option, &String::from_utf8_lossy(rest)),
        _ => {
            let text = String::from_utf8_lossy(rest);
            check_email(&text);
            check_public_url(&text);
        }
    }
});

fn check_user_code(typed: &str) {
    let got = normalize_user_code(typed);
    let letters: Vec<u8> = typed
        .bytes()
        .filter(|b| !matches!(b, b'-' | b' ' | b'\t'))
        .map(|b| b.to_ascii_uppercase())
        .collect();
    let expected = typed.len() <= 64
        && letters.len() == 8
        && letters.iter().all(|b| ALPHABET.contains(b));
    assert_eq!(got.is_some(), expected, "{typed:?} gave {got:?}");
    if typed.len() > 64 {
        assert!(got.is_none());
    }
    let Some(code) = got else {
        return;
    };
    let b = code.as_bytes();
    assert_eq!(b.len(), 9, "{code:?}");
    assert_eq!(b[4], b'-', "{code:?}");
    for (i, c) in b.iter().enumerate() {
        assert!(i == 4 || ALPHABET.contains(c), "{code:?}");
    }
    assert_eq!(code.replace('-', "").as_bytes(), letters.as_slice());
    assert_eq!(normalize_user_code(&code).as_deref(), Some(code.as_str()));
    assert_eq!(
        normalize_user_code(&code.to_ascii_lowercase()).as_deref(),
        Some(code.as_str())
    );
    assert_eq!(
        normalize_user_code(&code.replace('-', "")).as_deref(),
        Some(code.as_str())
    );
}

/// The `[oidc]` tables the identity check reads claims with: the brief's default
/// (`groups_claim = "groups"`), no groups claim with another email claim, and claim names that
/// overlap the standard ones.
fn sign_ins() -> &'static [SignIn] {
    static SIGN_INS: OnceLock<Vec<SignIn>> = OnceLock::new();
    SIGN_INS.get_or_init(|| {
        [
            "groups_claim = \"groups\"",
            "email_claim = \"upn\"",
            "email_claim = \"preferred_username\"\ngroups_claim = \"roles\"",
            "email_claim = \"sub\"\ngroups_claim = \"email\"",
        ]
        .iter()
        .map(|extra| {
            let text = format!(
                "public_url = \"http://127.0.0.1:8787\"\n[oidc]\nissuer = \"https://idp.example\"\nclient_id = \"x\"\n{extra}\n"
            );
            Config::parse(&text)
                .unwrap_or_else(|e| panic!("fuzz config does not parse: {e:?}"))
                .signin
                .expect("the config has [oidc]")
        })
        .collect()
    })
}

/// Claim names the records pick from (index = key byte % 8; 7 = the record's own text).
const CLAIM_NAMES: [&str; 7] = [
    "sub",
    "email",
    "email_verified",
    "groups",
    "upn",
    "roles",
    "preferred_username",
];

/// Claims from records `[key][kind][len][len bytes]` (a short record takes what is left):
/// key `% 8` names the claim (7: the bytes are the name and a string value); kind `% 8`:
/// 0 string, 1 bool (`len` odd), 2 null, 3 number, 4 array of the strings between NUL bytes,
/// 5 the first string repeated (count: first two bytes, BE, up to 4000), 6 an array of mixed
/// values (one per byte), 7 an object.
fn claims_from_records(mut data: &[u8]) -> Map<String, Value> {
    let mut claims = Map::new();
    while let [key, kind, len, rest @ ..] = data {
        let (bytes, tail) = rest.split_at(usize::from(*len).min(rest.len()));
        data = tail;
        let text = String::from_utf8_lossy(bytes).into_owned();
        let name = match CLAIM_NAMES.get(usize::from(key % 8)) {
            Some(n) => (*n).to_string(),
            None => {
                claims.insert(text.clone(), Value::String(text));
                continue;
            }
        };
        let value = match kind % 8 {
            0 => Value::String(text),
            1 => Value::Bool(len % 2 == 1),
            2 => Value::Null,
            3 => {
                let mut n = [0u8; 8];
                n[..bytes.len().min(8)].copy_from_slice(&bytes[..bytes.len().min(8)]);
                if len % 2 == 0 {
                    Value::from(i64::from_be_bytes(n))
                } else {
                    Value::from(f64::from_be_bytes(n))
                }
            }
            4 => Value::Array(
                bytes
                    .split(|b| *b == 0)
                    .map(|s| Value::String(String::from_utf8_lossy(s).into_owned()))
                    .collect(),
            ),
            5 => {
                let count = match bytes {
                    [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])).min(4000),
                    _ => 0,
                };
                let item = String::from_utf8_lossy(bytes.get(2..).unwrap_or_default());
                Value::Array(vec![Value::String(item.into_owned()); count])
            }
            6 => Value::Array(
                bytes
                    .iter()
                    .map(|b| match b % 5 {
                        0 => Value::String(char::from(b'a' + b % 26).to_string()),
                        1 => Value::from(*b),
                        2 => Value::Bool(b % 2 == 0),
                        3 => Value::Null,
                        _ => Value::Array(vec![Value::String("g".into())]),
                    })
                    .collect(),
            ),
            _ => {
                let mut m = Map::new();
                m.insert("value".into(), Value::String(text));
                Value::Object(m)
            }
        };
        claims.insert(name, value);
    }
    claims
}

fn check_identity(option: u8, rest: &[u8]) {
    let sign_ins = sign_ins();
    let settings = &sign_ins[usize::from(option) % sign_ins.len()];
    let claims = match serde_json::from_slice::<Value>(rest) {
        Ok(Value::Object(m)) => m,
        _ => claims_from_records(rest),
    };
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 255);
    let got = identity(settings, &claims);
    let Ok(who) = got else {
        assert!(sub.is_none(), "refused a valid subject {sub:?}: {got:?}");
        return;
    };
    assert_eq!(Some(who.subject.as_str()), sub);
    assert!(!who.subject.is_empty() && who.subject.len() <= 255);

    if let Some(email) = &who.email {
        let raw = claims
            .get(&settings.email_claim)
            .and_then(Value::as_str)
            .expect("an email without an email claim");
        assert_ne!(
            claims.get("email_verified").and_then(Value::as_bool),
            Some(false),
            "an unverified email was used"
        );
        assert_eq!(email, &raw.trim().to_ascii_lowercase());
        assert_good_email(email);
    }

    assert!(who.groups.len() <= MAX_GROUPS, "{} groups", who.groups.len());
    let claim = settings.groups_claim.as_ref().and_then(|c| claims.get(c));
    match claim {
        Some(Value::Array(items)) => {
            let strings: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            assert_eq!(who.groups.len(), strings.len().min(MAX_GROUPS));
            assert!(who.groups.iter().zip(&strings).all(|(g, s)| g == s));
        }
        Some(Value::String(s)) => assert_eq!(who.groups, [s.clone()]),
        _ => assert!(who.groups.is_empty(), "{:?}", who.groups),
    }
}

/// What `normalize_email` promises of an accepted address.
fn assert_good_email(email: &str) {
    assert_eq!(email.matches('@').count(), 1, "{email:?}");
    let (local, domain) = email.split_once('@').unwrap();
    assert!(!local.is_empty() && !domain.is_empty(), "{email:?}");
    assert!(!email.bytes().any(|b| b.is_ascii_uppercase()), "{email:?}");
    assert!(email.len() <= 254, "{email:?}");
    assert!(
        !email.chars().any(|c| c.is_whitespace() || c.is_control()),
        "{email:?}"
    );
}

fn check_settings(option: u8, rest: &[u8]) {
    // Not JSON: the input as one JSON string, for the string escaping.
    let value = serde_json::from_slice::<Value>(rest)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(rest).into_owned()));
    check_canonical(&value);
    if let Value::Object(map) = &value {
        check_checksum(map);
    }
    if let Value::Array(items) = &value {
        check_for_user(option, items);
    }
}

fn check_canonical(value: &Value) {
    let text = canonical_json(value);
    assert_eq!(
        text,
        serde_json::to_string(&sorted(value)).unwrap(),
        "canonical JSON is not the compact, key-sorted serialisation"
    );
    // Key order as written, checked while reading (a `Value` would sort them itself).
    if let Err(e) = serde_json::from_str::<SortedKeys>(&text) {
        assert!(
            has_float(value) && e.to_string().contains("number out of range"),
            "canonical JSON does not read back: {e}: {text}"
        );
        return;
    }
    let back: Value = serde_json::from_str(&text).unwrap();
    if has_float(value) {
        assert!(
            approx_eq(&back, value),
            "canonical JSON reads back as another value: {text}"
        );
        assert_eq!(
            canonical_json(&back),
            serde_json::to_string(&back).unwrap()
        );
    } else {
        assert_eq!(&back, value, "canonical JSON reads back as another value");
        assert_eq!(canonical_json(&back), text, "canonical JSON is not stable");
    }
}

fn check_checksum(settings: &Map<String, Value>) {
    let sum = checksum(settings);
    let hex = sum.strip_prefix("sha256:").expect("checksum prefix");
    assert_eq!(hex.len(), 64, "{sum}");
    assert!(
        hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{sum}"
    );
    assert_eq!(checksum(settings), sum, "checksum is not deterministic");
    let value = Value::Object(settings.clone());
    if !has_float(&value) {
        let back: Map<String, Value> = serde_json::from_str(&canonical_json(&value)).unwrap();
        assert_eq!(checksum(&back), sum, "read-back settings checksum differently");
    }
}

/// The objects of `items` as layers: everyone's, groups `a` and `b`, the user's own; `option`
/// bits 0 and 1 put the user in `a` and `b`, bit 2 drops everyone's layer.
fn check_for_user(option: u8, items: &[Value]) {
    let mut layers = items.iter().filter_map(Value::as_object);
    let mut policy = SettingsPolicy {
        everyone: layers.next().cloned(),
        ..SettingsPolicy::default()
    };
    if option & 4 == 4 {
        policy.everyone = None;
    }
    for group in ["a", "b"] {
        if let Some(layer) = layers.next() {
            policy.groups.insert(group.into(), layer.clone());
        }
    }
    let own = layers.next();
    let mut groups = Vec::new();
    if option & 1 == 1 {
        groups.push("a".to_string());
    }
    if option & 2 == 2 {
        groups.push("b".to_string());
    }
    let applied: Vec<&Map<String, Value>> = policy
        .everyone
        .iter()
        .chain(
            ["a", "b"]
                .iter()
                .filter(|g| groups.iter().any(|x| x == *g))
                .filter_map(|g| policy.groups.get(*g)),
        )
        .chain(own)
        .collect();
    let got = policy.for_user(own, &groups);
    let expected = applied
        .iter()
        .fold(None, |acc: Option<Map<String, Value>>, layer| {
            Some(merged(acc.unwrap_or_default(), layer))
        });
    assert_eq!(got, expected, "merged settings");
    if let Some(settings) = &got {
        check_checksum(settings);
    }
}

/// The rule: tables merge key by key, anything else replaces.
fn merged(mut into: Map<String, Value>, from: &Map<String, Value>) -> Map<String, Value> {
    for (k, v) in from {
        let new = match (into.remove(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => Value::Object(merged(a, b)),
            _ => v.clone(),
        };
        into.insert(k.clone(), new);
    }
    into
}

/// The value with every object's keys inserted in sorted order (the same value whatever the
/// map type; what serde_json then writes is the key-sorted serialisation).
fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), sorted(&m[k]))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(items) => items.iter().any(has_float),
        Value::Object(m) => m.values().any(has_float),
        _ => false,
    }
}

/// Equal, except that floats may differ by serde_json's float parsing error.
fn approx_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || (x - y).abs() <= 1e-14 * x.abs().max(y.abs()) || (x - y).abs() < 1e-300
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| approx_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kx, vx), (ky, vy))| kx == ky && approx_eq(vx, vy))
        }
        _ => a == b,
    }
}

/// Reads any JSON, asserting that every object's keys are strictly increasing as written.
struct SortedKeys;

impl<'de> Deserialize<'de> for SortedKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SortedKeysVisitor)
    }
}

struct SortedKeysVisitor;

impl<'de> Visitor<'de> for SortedKeysVisitor {
    type Value = SortedKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<SortedKeys, E> {
        Ok(SortedKeys)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<SortedKeys, E> {
        Ok(SortedKeys)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<SortedKeys, E> {
        Ok(SortedKeys)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<SortedKeys, E> {
        Ok(SortedKeys)
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<SortedKeys, E> {
        Ok(SortedKeys)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<SortedKeys, E> {
        Ok(SortedKeys)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SortedKeys, A::Error> {
        while seq.next_element::<SortedKeys>()?.is_some() {}
        Ok(SortedKeys)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SortedKeys, A::Error> {
        let mut previous: Option<String> = None;
        while let Some(key) = map.next_key::<String>()? {
            if let Some(p) = &previous {
                assert!(p < &key, "canonical JSON has key {key:?} after {p:?}");
            }
            map.next_value::<SortedKeys>()?;
            previous = Some(key);
        }
        Ok(SortedKeys)
    }
}

const ROUTES: [(&str, &str, Route); 5] = [
    ("GET", "/managed/settings", Route::ManagedSettings),
    ("GET", "/api/oauth/usage", Route::Usage),
    ("POST", "/v1/metrics", Route::Telemetry("metrics")),
    ("POST", "/v1/logs", Route::Telemetry("logs")),
    ("POST", "/v1/traces", Route::Telemetry("traces")),
];

fn check_route(option: u8, path: &str) {
    let method = match option % 4 {
        0 => Method::GET,
        1 => Method::POST,
        2 => Method::PUT,
        _ => Method::DELETE,
    };
    let got = gateway::parse(&method, path);
    let bare = path.strip_suffix('/').unwrap_or(path);
    let expected = ROUTES
        .iter()
        .find(|(m, p, _)| method.as_str() == *m && bare == *p)
        .map(|(_, _, r)| r.clone());
    assert_eq!(got, expected, "{method} {path:?}");
    let owned = gateway::owns(path);
    if matches!(got, Some(Route::ManagedSettings | Route::Usage)) {
        assert!(owned, "{path:?} routes but is not owned");
    }
}

fn check_email(text: &str) {
    let Ok(email) = normalize_email("fuzz", text) else {
        return;
    };
    assert_good_email(&email);
    assert_eq!(email, text.trim().to_ascii_lowercase());
    assert_eq!(
        normalize_email("fuzz", &email).ok().as_deref(),
        Some(email.as_str()),
        "a normalised email does not normalise to itself"
    );
}

fn check_public_url(text: &str) {
    let got = public_url(Some(text));
    let Ok(url) = got else {
        return;
    };
    let url = url.expect("public_url(Some(_)) gave None");
    assert!(!url.ends_with('/'), "{url:?}");
    // Lower-case, as the sign-in code compares it (`starts_with("https://")` sets `Secure`).
    assert!(
        url.starts_with("https://") || url.starts_with("http://"),
        "accepted public_url {url:?} does not start with a lower-case https:// or http://"
    );
    assert_eq!(
        public_url(Some(&url)).ok().flatten().as_deref(),
        Some(url.as_str()),
        "an accepted public_url {text:?} is not accepted as {url:?}"
    );
}
