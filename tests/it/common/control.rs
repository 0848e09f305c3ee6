//! A fake Bedrock control plane on 127.0.0.1:0 for the `profiles` commands.
//!
//! It keeps inference profiles and their tags in memory and speaks the restJson1 shapes that
//! aws-sdk-bedrock sends and parses: CreateInferenceProfile, ListInferenceProfiles (paged, at
//! most two items a page whatever `maxResults` says, so a client that ignores `nextToken` misses
//! profiles), GetInferenceProfile, TagResource, UntagResource and ListTagsForResource. It checks
//! the SigV4 signature of every request with the independent verifier in [`super::sigv4`] and
//! validates inputs the way Bedrock documents them (name, description, token and tag patterns),
//! so a client that would be refused by AWS is refused here. Tests change state behind the
//! client's back and inject failures through plain methods, never through HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};

use super::sigv4;

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

/// Foundation models the fake knows in every region.
pub const FOUNDATION_MODELS: &[&str] = &[
    "anthropic.claude-sonnet-4-5-20250929-v1:0",
    "anthropic.claude-haiku-4-5-20251001-v1:0",
    "anthropic.claude-opus-4-1-20250805-v1:0",
    "meta.llama3-2-1b-instruct-v1:0",
];

/// Most items the fake puts on one ListInferenceProfiles page.
const PAGE: usize = 2;

/// Leading bytes of every page token. They encode as `++//`, like real tokens full of
/// characters that must be percent-encoded in a query string and in the signature.
const TOKEN_MAGIC: [u8; 3] = [0xfb, 0xef, 0xff];

/// A control-plane operation, as routed by method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    CreateInferenceProfile,
    ListInferenceProfiles,
    GetInferenceProfile,
    TagResource,
    UntagResource,
    ListTagsForResource,
    /// Anything else; always an error, and a test failure in [`FakeControl::assert_clean`].
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SystemDefined,
    Application,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::SystemDefined => "SYSTEM_DEFINED",
            Kind::Application => "APPLICATION",
        }
    }
}

/// An inference profile as the fake stores it.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub arn: String,
    pub id: String,
    pub kind: Kind,
    pub description: Option<String>,
    /// Foundation-model ARNs the profile routes to.
    pub models: Vec<String>,
    /// The `modelSource.copyFrom` it was created with (application profiles only).
    pub copy_from: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub created_at: String,
}

/// One request the fake received, with what it answered.
#[derive(Debug, Clone)]
pub struct Call {
    pub op: Op,
    pub method: String,
    pub raw_path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub signature: Result<sigv4::Verified, String>,
    pub status: u16,
}

impl Call {
    /// The request body as JSON (`null` when there is none).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// A scripted failure. It fires for requests of `op` that match every filter that is set.
#[derive(Debug, Clone)]
pub struct Fault {
    pub op: Op,
    /// Only the Nth request of `op` (1-based, counting every attempt including SDK retries).
    pub nth: Option<usize>,
    /// Only requests about this target: the profile name for CreateInferenceProfile, the
    /// resource ARN for the tag operations, the decoded identifier for GetInferenceProfile.
    pub target: Option<String>,
    pub status: u16,
    pub code: &'static str,
    /// Carry the request out first, then answer with the error: a response lost on the way.
    pub after_effect: bool,
}

impl Fault {
    /// Every request of `op` fails with 500 InternalServerException, before any effect.
    pub fn internal(op: Op) -> Fault {
        Fault {
            op,
            nth: None,
            target: None,
            status: 500,
            code: "InternalServerException",
            after_effect: false,
        }
    }

    pub fn nth(mut self, n: usize) -> Fault {
        self.nth = Some(n);
        self
    }

    pub fn target(mut self, target: &str) -> Fault {
        self.target = Some(target.to_string());
        self
    }

    pub fn error(mut self, status: u16, code: &'static str) -> Fault {
        self.status = status;
        self.code = code;
        self
    }

    pub fn after_effect(mut self) -> Fault {
        self.after_effect = true;
        self
    }
}

#[derive(Debug)]
struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
}

fn err(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
    }
}

fn validation(message: impl Into<String>) -> ApiError {
    err(400, "ValidationException", message)
}

#[derive(Default)]
struct Inner {
    /// System profiles first (seeded), then application profiles in creation order.
    profiles: Vec<Profile>,
    /// clientRequestToken -> ARN of the profile that request created.
    tokens: BTreeMap<String, String>,
    calls: Vec<Call>,
    faults: Vec<Fault>,
}

#[derive(Clone)]
pub struct FakeControl {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
}

pub fn foundation_model_arn(region: &str, id: &str) -> String {
    format!("arn:aws:bedrock:{region}::foundation-model/{id}")
}

/// The ARN of a system-defined profile as the us-east-1 control plane lists it.
pub fn system_profile_arn(id: &str) -> String {
    format!("arn:aws:bedrock:{REGION}:{ACCOUNT}:inference-profile/{id}")
}

fn system(id: &str, name: &str, arn_region: &str, regions: &[&str]) -> Profile {
    let base = id.split_once('.').map_or(id, |(_, b)| b);
    Profile {
        name: name.to_string(),
        arn: format!("arn:aws:bedrock:{arn_region}:{ACCOUNT}:inference-profile/{id}"),
        id: id.to_string(),
        kind: Kind::SystemDefined,
        description: Some(format!(
            "Routes requests to {name} in {}.",
            regions.join(", ")
        )),
        models: regions
            .iter()
            .map(|r| foundation_model_arn(r, base))
            .collect(),
        copy_from: None,
        tags: BTreeMap::new(),
        created_at: "2025-09-29T00:00:00+00:00".to_string(),
    }
}

/// System profiles in list order. The `us.` ones come last, so a client only finds them by
/// following `nextToken` through several pages.
fn seed() -> Vec<Profile> {
    let us = ["us-east-1", "us-east-2", "us-west-2"];
    let eu = ["eu-central-1", "eu-west-1", "eu-west-3"];
    vec![
        system(
            "eu.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "EU Anthropic Claude Sonnet 4.5",
            "eu-central-1",
            &eu,
        ),
        system(
            "eu.anthropic.claude-haiku-4-5-20251001-v1:0",
            "EU Anthropic Claude Haiku 4.5",
            "eu-central-1",
            &eu,
        ),
        system(
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "Global Anthropic Claude Sonnet 4.5",
            REGION,
            &["us-east-1", "us-west-2", "eu-west-1", "ap-northeast-1"],
        ),
        system(
            "apac.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "APAC Anthropic Claude Sonnet 4.5",
            "ap-northeast-1",
            &["ap-northeast-1", "ap-southeast-2"],
        ),
        system(
            "us.meta.llama3-2-1b-instruct-v1:0",
            "US Meta Llama 3.2 1B Instruct",
            REGION,
            &us,
        ),
        system(
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "US Anthropic Claude Sonnet 4.5",
            REGION,
            &us,
        ),
        system(
            "us.anthropic.claude-haiku-4-5-20251001-v1:0",
            "US Anthropic Claude Haiku 4.5",
            REGION,
            &us,
        ),
        system(
            "us.anthropic.claude-opus-4-1-20250805-v1:0",
            "US Anthropic Claude Opus 4.1",
            REGION,
            &us,
        ),
    ]
}

impl FakeControl {
    pub async fn start() -> FakeControl {
        let inner = Arc::new(Mutex::new(Inner {
            profiles: seed(),
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake control plane");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeControl { addr, inner }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("lock")
    }

    // ---- reading state ----

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn calls_of(&self, op: Op) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.op == op)
            .cloned()
            .collect()
    }

    pub fn count(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|c| c.op == op).count()
    }

    /// Calls that change state (create and tag operations).
    pub fn writes(&self) -> usize {
        self.count(Op::CreateInferenceProfile)
            + self.count(Op::TagResource)
            + self.count(Op::UntagResource)
    }

    /// Application profiles, in creation order.
    pub fn applications(&self) -> Vec<Profile> {
        self.lock()
            .profiles
            .iter()
            .filter(|p| p.kind == Kind::Application)
            .cloned()
            .collect()
    }

    pub fn named(&self, name: &str) -> Vec<Profile> {
        self.lock()
            .profiles
            .iter()
            .filter(|p| p.kind == Kind::Application && p.name == name)
            .cloned()
            .collect()
    }

    /// The one application profile with this name; panics if there are none or several.
    pub fn the(&self, name: &str) -> Profile {
        let mut found = self.named(name);
        assert_eq!(found.len(), 1, "profiles named {name}: {found:#?}");
        found.remove(0)
    }

    pub fn tags(&self, arn: &str) -> BTreeMap<String, String> {
        self.lock()
            .profiles
            .iter()
            .find(|p| p.arn == arn)
            .map(|p| p.tags.clone())
            .unwrap_or_else(|| panic!("no profile {arn}"))
    }

    // ---- changing state behind the client's back ----

    /// Adds an application profile as if someone (an earlier run) had created it.
    pub fn add_application(&self, name: &str, copy_from: &str, tags: &[(&str, &str)]) -> Profile {
        let mut inner = self.lock();
        let models = inner.models_of_source(copy_from).expect("known copyFrom");
        let p = application(
            name,
            None,
            copy_from,
            models,
            tags.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        inner.profiles.push(p.clone());
        p
    }

    /// Deletes a profile; returns whether it existed.
    pub fn delete(&self, arn: &str) -> bool {
        let mut inner = self.lock();
        let before = inner.profiles.len();
        inner.profiles.retain(|p| p.arn != arn);
        before != inner.profiles.len()
    }

    /// Removes one tag from a profile; returns whether it was there.
    pub fn remove_tag(&self, arn: &str, key: &str) -> bool {
        let mut inner = self.lock();
        let p = inner
            .profiles
            .iter_mut()
            .find(|p| p.arn == arn)
            .unwrap_or_else(|| panic!("no profile {arn}"));
        p.tags.remove(key).is_some()
    }

    pub fn set_tag(&self, arn: &str, key: &str, value: &str) {
        let mut inner = self.lock();
        let p = inner
            .profiles
            .iter_mut()
            .find(|p| p.arn == arn)
            .unwrap_or_else(|| panic!("no profile {arn}"));
        p.tags.insert(key.to_string(), value.to_string());
    }

    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// Panics unless the fake saw at least one request and every request carried a valid
    /// SigV4 signature by the proxy's access key, for service `bedrock` in [`REGION`], and
    /// named an operation the fake knows.
    pub fn assert_clean(&self) {
        let calls = self.calls();
        assert!(!calls.is_empty(), "the fake control plane saw no request");
        for c in &calls {
            let v = c.signature.as_ref().unwrap_or_else(|e| {
                panic!("{} {} was not signed correctly: {e}", c.method, c.raw_path)
            });
            assert_eq!(v.access_key, sigv4::ACCESS_KEY, "{c:?}");
            assert_eq!(v.service, "bedrock", "{c:?}");
            assert_eq!(v.region, REGION, "{c:?}");
            assert_ne!(c.op, Op::Unknown, "unknown operation: {c:?}");
        }
    }
}

fn random_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("randomness");
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn now() -> String {
    use aws_smithy_types::date_time::{DateTime, Format};
    let t = DateTime::from(std::time::SystemTime::now())
        .fmt(Format::DateTime)
        .expect("format time");
    // Bedrock writes an explicit offset, which the SDK parses as `date-time` with offset.
    match t.strip_suffix('Z') {
        Some(t) => format!("{t}+00:00"),
        None => t,
    }
}

fn application(
    name: &str,
    description: Option<String>,
    copy_from: &str,
    models: Vec<String>,
    tags: BTreeMap<String, String>,
) -> Profile {
    let id = random_id();
    Profile {
        name: name.to_string(),
        arn: format!("arn:aws:bedrock:{REGION}:{ACCOUNT}:application-inference-profile/{id}"),
        id,
        kind: Kind::Application,
        description,
        models,
        copy_from: Some(copy_from.to_string()),
        tags,
        created_at: now(),
    }
}

fn summary(p: &Profile) -> Value {
    let mut v = json!({
        "inferenceProfileName": p.name,
        "inferenceProfileArn": p.arn,
        "inferenceProfileId": p.id,
        "models": p.models.iter().map(|m| json!({ "modelArn": m })).collect::<Vec<_>>(),
        "status": "ACTIVE",
        "type": p.kind.as_str(),
        "createdAt": p.created_at,
        "updatedAt": p.created_at,
    });
    if let Some(d) = &p.description {
        v["description"] = json!(d);
    }
    v
}

// ---- input validation, after the patterns in the Bedrock API reference ----

/// `^([0-9a-zA-Z{extra}][ _-]?)+$`: word characters, each separator followed by a word
/// character or the end.
fn words_with_single_separators(s: &str, extra: &[char]) -> bool {
    let mut prev_sep = true;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || extra.contains(&c) {
            prev_sep = false;
        } else if matches!(c, ' ' | '_' | '-') && !prev_sep {
            prev_sep = true;
        } else {
            return false;
        }
    }
    !s.is_empty()
}

/// `^[a-zA-Z0-9](-*[a-zA-Z0-9])*$`
fn is_idempotency_token(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// `^[a-zA-Z0-9\s._:/=+@-]*$`
fn is_tag_text(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || c.is_ascii_whitespace() || "._:/=+@-".contains(c))
}

fn object(body: &[u8], allowed: &[&str]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        err(
            400,
            "SerializationException",
            format!("body is not JSON: {e}"),
        )
    })?;
    let Value::Object(map) = v else {
        return Err(err(
            400,
            "SerializationException",
            "body is not a JSON object",
        ));
    };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(validation(format!("unexpected member `{k}`")));
    }
    Ok(map)
}

fn opt_str(map: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(validation(format!("`{key}` must be a string, got {other}"))),
    }
}

fn req_str(map: &Map<String, Value>, key: &str) -> Result<String, ApiError> {
    opt_str(map, key)?.ok_or_else(|| validation(format!("`{key}` is required")))
}

fn tag_list(map: &Map<String, Value>, key: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(v) = map.get(key) else {
        return Ok(BTreeMap::new());
    };
    let items = v
        .as_array()
        .ok_or_else(|| validation(format!("`{key}` must be a list")))?;
    if items.len() > 200 {
        return Err(err(400, "TooManyTagsException", "at most 200 tags"));
    }
    let mut out = BTreeMap::new();
    for item in items {
        let Some(obj) = item.as_object() else {
            return Err(validation(format!("`{key}` items must be objects")));
        };
        if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "key" | "value")) {
            return Err(validation(format!("unexpected tag member `{k}`")));
        }
        let k = req_str(obj, "key")?;
        let v = req_str(obj, "value")?;
        if k.is_empty() || k.len() > 128 || !is_tag_text(&k) {
            return Err(validation(format!("tag key `{k}` is not valid")));
        }
        if v.len() > 256 || !is_tag_text(&v) {
            return Err(validation(format!("tag value `{v}` of `{k}` is not valid")));
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(validation(format!("tag key `{k}` appears twice")));
        }
    }
    Ok(out)
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn route(method: &Method, path: &str) -> Op {
    match (method.as_str(), path) {
        ("POST", "/inference-profiles") => Op::CreateInferenceProfile,
        ("GET", "/inference-profiles") => Op::ListInferenceProfiles,
        ("POST", "/tagResource") => Op::TagResource,
        ("POST", "/untagResource") => Op::UntagResource,
        ("POST", "/listTagsForResource") => Op::ListTagsForResource,
        ("GET", p) => match p.strip_prefix("/inference-profiles/") {
            // The identifier is one path segment: an ARN must arrive with `/` encoded.
            Some(id) if !id.is_empty() && !id.contains('/') => Op::GetInferenceProfile,
            _ => Op::Unknown,
        },
        _ => Op::Unknown,
    }
}

/// What a fault's `target` is compared with.
fn target_of(op: Op, path: &str, body: &[u8]) -> Option<String> {
    let field = |k: &str| {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get(k).and_then(Value::as_str).map(str::to_string))
    };
    match op {
        Op::CreateInferenceProfile => field("inferenceProfileName"),
        Op::TagResource | Op::UntagResource | Op::ListTagsForResource => field("resourceARN"),
        Op::GetInferenceProfile => path.strip_prefix("/inference-profiles/").map(decode),
        Op::ListInferenceProfiles | Op::Unknown => None,
    }
}

struct Req<'a> {
    op: Op,
    path: &'a str,
    query: Option<&'a str>,
    headers: &'a HeaderMap,
    body: &'a [u8],
    signature: &'a Result<sigv4::Verified, String>,
}

impl Inner {
    fn serve(&mut self, req: &Req<'_>) -> Result<(u16, Value), ApiError> {
        match req.signature {
            Err(e) => {
                return Err(err(
                    403,
                    "InvalidSignatureException",
                    format!("fake control plane: {e}"),
                ));
            }
            Ok(v) if v.access_key != sigv4::ACCESS_KEY => {
                return Err(err(
                    403,
                    "UnrecognizedClientException",
                    "The security token included in the request is invalid.",
                ));
            }
            Ok(v) if v.service != "bedrock" || v.region != REGION => {
                return Err(err(
                    403,
                    "InvalidSignatureException",
                    format!(
                        "Credential should be scoped to a valid region and service bedrock, not {}/{}",
                        v.region, v.service
                    ),
                ));
            }
            Ok(_) => {}
        }
        if req.op == Op::Unknown {
            return Err(err(
                404,
                "UnknownOperationException",
                format!("no operation at {}", req.path),
            ));
        }
        if matches!(
            req.op,
            Op::CreateInferenceProfile
                | Op::TagResource
                | Op::UntagResource
                | Op::ListTagsForResource
        ) {
            let ct = req
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !ct.starts_with("application/json") {
                return Err(err(
                    400,
                    "SerializationException",
                    format!("content-type `{ct}` is not application/json"),
                ));
            }
        }

        // This request is the nth of its operation (the calls list does not hold it yet).
        let nth = 1 + self.calls.iter().filter(|c| c.op == req.op).count();
        let target = target_of(req.op, req.path, req.body);
        let fault = self
            .faults
            .iter()
            .find(|f| {
                f.op == req.op
                    && f.nth.is_none_or(|n| n == nth)
                    && f.target.as_ref().is_none_or(|t| Some(t) == target.as_ref())
            })
            .cloned();
        let fail = |f: &Fault| {
            err(
                f.status,
                f.code,
                format!("injected failure of {:?} request #{nth}", req.op),
            )
        };
        if let Some(f) = &fault
            && !f.after_effect
        {
            return Err(fail(f));
        }
        let out = match req.op {
            Op::CreateInferenceProfile => self.create(req.body),
            Op::ListInferenceProfiles => self.list(req.query),
            Op::GetInferenceProfile => self.get(req.path),
            Op::TagResource => self.tag(req.body),
            Op::UntagResource => self.untag(req.body),
            Op::ListTagsForResource => self.list_tags(req.body),
            Op::Unknown => unreachable!("refused above"),
        }?;
        match &fault {
            Some(f) => Err(fail(f)),
            None => Ok(out),
        }
    }

    fn models_of_source(&self, copy_from: &str) -> Result<Vec<String>, ApiError> {
        if let Some(p) = self
            .profiles
            .iter()
            .find(|p| p.arn == copy_from && p.kind == Kind::SystemDefined)
        {
            return Ok(p.models.clone());
        }
        if let Some(id) =
            copy_from.strip_prefix(&format!("arn:aws:bedrock:{REGION}::foundation-model/"))
            && FOUNDATION_MODELS.contains(&id)
        {
            return Ok(vec![copy_from.to_string()]);
        }
        Err(validation(format!(
            "The provided model source {copy_from} is not a foundation model or system-defined inference profile in {REGION}."
        )))
    }

    fn create(&mut self, body: &[u8]) -> Result<(u16, Value), ApiError> {
        let map = object(
            body,
            &[
                "inferenceProfileName",
                "description",
                "clientRequestToken",
                "modelSource",
                "tags",
            ],
        )?;
        let name = req_str(&map, "inferenceProfileName")?;
        if name.len() > 64 || !words_with_single_separators(&name, &[]) {
            return Err(validation(format!(
                "1 validation error detected: Value '{name}' at 'inferenceProfileName' failed to satisfy constraint: Member must satisfy regular expression pattern: ^([0-9a-zA-Z][ _-]?)+$"
            )));
        }
        let description = opt_str(&map, "description")?;
        if let Some(d) = &description
            && (d.len() > 200 || !words_with_single_separators(d, &[':', '.']))
        {
            return Err(validation(format!(
                "1 validation error detected: Value '{d}' at 'description' failed to satisfy constraint: Member must satisfy regular expression pattern: ^([0-9a-zA-Z:.][ _-]?)+$"
            )));
        }
        let token = opt_str(&map, "clientRequestToken")?;
        if let Some(t) = &token
            && (t.len() > 256 || !is_idempotency_token(t))
        {
            return Err(validation(format!(
                "Value '{t}' at 'clientRequestToken' failed to satisfy constraint"
            )));
        }
        let source = map
            .get("modelSource")
            .and_then(Value::as_object)
            .ok_or_else(|| validation("`modelSource` is required"))?;
        if source.len() != 1 {
            return Err(validation(
                "`modelSource` is a union: exactly one member must be set",
            ));
        }
        let copy_from = req_str(source, "copyFrom")?;
        let tags = tag_list(&map, "tags")?;

        if let Some(t) = &token
            && let Some(arn) = self.tokens.get(t)
            && let Some(p) = self.profiles.iter().find(|p| &p.arn == arn)
        {
            // A retried request: Bedrock ignores it and answers as the first time.
            if p.name != name || p.copy_from.as_deref() != Some(copy_from.as_str()) {
                return Err(validation(format!(
                    "clientRequestToken {t} was already used with different parameters"
                )));
            }
            return Ok((
                201,
                json!({ "inferenceProfileArn": p.arn, "status": "ACTIVE" }),
            ));
        }
        if self
            .profiles
            .iter()
            .any(|p| p.kind == Kind::Application && p.name == name)
        {
            return Err(err(
                400,
                "ConflictException",
                format!("An inference profile named {name} already exists."),
            ));
        }
        let models = self.models_of_source(&copy_from)?;
        let p = application(&name, description, &copy_from, models, tags);
        if let Some(t) = token {
            self.tokens.insert(t, p.arn.clone());
        }
        let reply = json!({ "inferenceProfileArn": p.arn, "status": "ACTIVE" });
        self.profiles.push(p);
        Ok((201, reply))
    }

    fn list(&self, query: Option<&str>) -> Result<(u16, Value), ApiError> {
        let mut kind = Kind::SystemDefined;
        let mut max = 1000usize;
        let mut offset = 0usize;
        let mut token = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v);
            match k {
                "type" => {
                    kind = match v.as_str() {
                        "SYSTEM_DEFINED" => Kind::SystemDefined,
                        "APPLICATION" => Kind::Application,
                        other => return Err(validation(format!("type `{other}` is not valid"))),
                    }
                }
                "maxResults" => {
                    max = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=1000).contains(n))
                        .ok_or_else(|| validation(format!("maxResults `{v}` is not 1..1000")))?;
                }
                "nextToken" => token = Some(v),
                other => return Err(validation(format!("unexpected query parameter `{other}`"))),
            }
        }
        if let Some(t) = token {
            // Tokens are opaque base64 (with `+`, `/`, `=`) and bound to the query they came from.
            let bad = || validation(format!("invalid pagination token {t}"));
            let raw = base64::engine::general_purpose::STANDARD
                .decode(&t)
                .map_err(|_| bad())?;
            let v: Value = raw
                .strip_prefix(TOKEN_MAGIC.as_slice())
                .and_then(|json| serde_json::from_slice(json).ok())
                .ok_or_else(bad)?;
            if v["type"] != kind.as_str() {
                return Err(bad());
            }
            offset = v["offset"]
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(bad)?;
        }
        let all: Vec<&Profile> = self.profiles.iter().filter(|p| p.kind == kind).collect();
        let end = (offset + max.min(PAGE)).min(all.len());
        let page: Vec<Value> = all
            .get(offset..end)
            .unwrap_or_default()
            .iter()
            .map(|p| summary(p))
            .collect();
        let mut reply = json!({ "inferenceProfileSummaries": page });
        if end < all.len() {
            let mut t = TOKEN_MAGIC.to_vec();
            t.extend(
                json!({ "type": kind.as_str(), "offset": end })
                    .to_string()
                    .bytes(),
            );
            reply["nextToken"] = json!(base64::engine::general_purpose::STANDARD.encode(t));
        }
        Ok((200, reply))
    }

    fn find(&self, identifier: &str) -> Option<&Profile> {
        self.profiles
            .iter()
            .find(|p| p.arn == identifier || p.id == identifier)
    }

    fn get(&self, path: &str) -> Result<(u16, Value), ApiError> {
        let id = decode(path.strip_prefix("/inference-profiles/").unwrap_or(""));
        let bare = id
            .strip_prefix("arn:aws:bedrock:")
            .and_then(|rest| rest.split_once('/'))
            .map_or(id.as_str(), |(_, tail)| tail);
        if bare.is_empty()
            || !bare
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-:.".contains(c))
        {
            return Err(validation(format!(
                "inferenceProfileIdentifier `{id}` is not valid"
            )));
        }
        let p = self.find(&id).ok_or_else(|| {
            err(
                404,
                "ResourceNotFoundException",
                format!("Inference profile {id} not found."),
            )
        })?;
        Ok((200, summary(p)))
    }

    fn tag_target(&mut self, map: &Map<String, Value>) -> Result<&mut Profile, ApiError> {
        let arn = req_str(map, "resourceARN")?;
        if arn.len() < 20 {
            return Err(validation(format!("resourceARN `{arn}` is too short")));
        }
        self.profiles
            .iter_mut()
            .find(|p| p.arn == arn && p.kind == Kind::Application)
            .ok_or_else(|| {
                err(
                    404,
                    "ResourceNotFoundException",
                    format!("Resource {arn} not found."),
                )
            })
    }

    fn tag(&mut self, body: &[u8]) -> Result<(u16, Value), ApiError> {
        let map = object(body, &["resourceARN", "tags"])?;
        if !map.contains_key("tags") {
            return Err(validation("`tags` is required"));
        }
        let tags = tag_list(&map, "tags")?;
        let p = self.tag_target(&map)?;
        p.tags.extend(tags);
        if p.tags.len() > 200 {
            return Err(err(400, "TooManyTagsException", "at most 200 tags"));
        }
        Ok((200, json!({})))
    }

    fn untag(&mut self, body: &[u8]) -> Result<(u16, Value), ApiError> {
        let map = object(body, &["resourceARN", "tagKeys"])?;
        let keys: Vec<String> = map
            .get("tagKeys")
            .and_then(Value::as_array)
            .ok_or_else(|| validation("`tagKeys` is required"))?
            .iter()
            .map(|k| k.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| validation("`tagKeys` must be strings"))?;
        let p = self.tag_target(&map)?;
        for k in keys {
            p.tags.remove(&k);
        }
        Ok((200, json!({})))
    }

    fn list_tags(&mut self, body: &[u8]) -> Result<(u16, Value), ApiError> {
        let map = object(body, &["resourceARN"])?;
        let p = self.tag_target(&map)?;
        let tags: Vec<Value> = p
            .tags
            .iter()
            .map(|(k, v)| json!({ "key": k, "value": v }))
            .collect();
        Ok((200, json!({ "tags": tags })))
    }
}

fn respond(status: u16, body: &Value, error_type: Option<&str>) -> Response {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-requestid", random_id());
    if let Some(t) = error_type {
        // Bedrock appends a namespace after a colon; the SDK must strip it.
        b = b.header(
            "x-amzn-errortype",
            format!("{t}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
        );
    }
    b.body(Body::from(body.to_string())).expect("response")
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let raw_path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let signature = sigv4::verify(
        parts.method.as_str(),
        &raw_path,
        query.as_deref(),
        &parts.headers,
        &body,
    );
    let op = route(&parts.method, &raw_path);
    let mut inner = inner.lock().expect("lock");
    let result = inner.serve(&Req {
        op,
        path: &raw_path,
        query: query.as_deref(),
        headers: &parts.headers,
        body: &body,
        signature: &signature,
    });
    let (status, response) = match result {
        Ok((status, value)) => (status, respond(status, &value, None)),
        Err(e) => (
            e.status,
            respond(e.status, &json!({ "message": e.message }), Some(e.code)),
        ),
    };
    inner.calls.push(Call {
        op,
        method: parts.method.to_string(),
        raw_path,
        query,
        headers: parts.headers,
        body,
        signature,
        status,
    });
    response
}
