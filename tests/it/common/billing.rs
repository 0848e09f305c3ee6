//! A fake of four AWS services on one 127.0.0.1:0 server, for bedrock-gate's cost accounting:
//! Cost Explorer, the Price List Query API and Service Quotas (all awsJson1_1, told apart by
//! `X-Amz-Target`) and STS (awsQuery: a form body, XML answers). Each client points its
//! `endpoint_url` at [`BillingFake::url`].
//!
//! Like [`super::control`], it keeps state in memory, checks every request's SigV4 signature
//! with the independent verifier in [`super::sigv4`] (through a [`Keyring`], so the base test
//! key and keys this STS issued verify) and requires the signing name of the service the
//! request is for. It records every call and takes failures through plain methods. Lists page
//! small (two items; Cost Explorer `page_days` days), so a client that ignores the token loses
//! data; tokens are bound to the query they continue. Cost Explorer treats tags as Billing
//! does: a key is known once costs carry it (or [`BillingFake::see_tag`]), and cost is grouped
//! by a key's values only while the key is Active; otherwise all of it is untagged (`K$`).
//! GetCostAndUsage records its `Filter` but does not apply it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine as _;
use bytes::Bytes;
use chrono::NaiveDate;
use http::HeaderMap;
use http_body_util::BodyExt;
use serde_json::{Map, Value, json};
use sha2::Digest as _;

use super::sigv4::{self, Keyring};

pub const ACCOUNT: &str = "123456789012";
/// Service Quotas: "Inference profiles per account" (application inference profiles).
pub const PROFILE_QUOTA: &str = "L-40EC9882";
/// The Price List service code under which Claude models are priced.
pub const FOUNDATION_MODELS: &str = "AmazonBedrockFoundationModels";
/// Most items on a ListCostAllocationTags or GetProducts page, whatever MaxResults says.
const PAGE: usize = 2;
const COST_METRICS: &[&str] = &[
    "UnblendedCost",
    "BlendedCost",
    "AmortizedCost",
    "NetUnblendedCost",
    "NetAmortizedCost",
];
/// The code validation errors are raised with; [`handle`] words it as each service does.
const INVALID: &str = "ValidationException";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    CostExplorer,
    Pricing,
    Quotas,
    Sts,
    /// Neither awsJson1_1 with a known target prefix nor a form POST.
    Unknown,
}

impl Service {
    /// The SigV4 signing name AWS requires.
    pub fn signing_name(self) -> &'static str {
        match self {
            Service::CostExplorer => "ce",
            Service::Pricing => "pricing",
            Service::Quotas => "servicequotas",
            Service::Sts => "sts",
            Service::Unknown => "",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    UpdateCostAllocationTagsStatus,
    ListCostAllocationTags,
    GetCostAndUsage,
    GetProducts,
    GetServiceQuota,
    AssumeRole,
    /// A known service but an operation the fake does not implement.
    Unknown,
}

impl Op {
    pub fn service(self) -> Service {
        match self {
            Op::UpdateCostAllocationTagsStatus
            | Op::ListCostAllocationTags
            | Op::GetCostAndUsage => Service::CostExplorer,
            Op::GetProducts => Service::Pricing,
            Op::GetServiceQuota => Service::Quotas,
            Op::AssumeRole => Service::Sts,
            Op::Unknown => Service::Unknown,
        }
    }

    /// The IAM action, as an AccessDenied message names it (`ce:GetCostAndUsage`).
    pub fn action(self) -> String {
        format!("{}:{self:?}", self.service().signing_name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagStatus {
    Active,
    Inactive,
    /// Billing has not seen the key.
    Unknown,
}

/// One request the fake received, with what it answered.
#[derive(Debug, Clone)]
pub struct Call {
    pub service: Service,
    pub op: Op,
    pub headers: HeaderMap,
    pub raw: Bytes,
    /// The JSON body; for STS the form, as an object of decoded strings.
    pub body: Value,
    pub signature: Result<sigv4::Verified, String>,
    pub status: u16,
}

/// Credentials the fake STS issued (and put in the keyring).
#[derive(Debug, Clone)]
pub struct Issued {
    pub role_arn: String,
    pub session_name: String,
    pub tags: Vec<(String, String)>,
    pub duration_seconds: u64,
    pub access_key: String,
    pub secret_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
}

#[derive(Debug)]
struct ApiError {
    status: u16,
    code: String,
    message: String,
}

fn err(status: u16, code: &str, message: impl Into<String>) -> ApiError {
    let (code, message) = (code.to_string(), message.into());
    ApiError {
        status,
        code,
        message,
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    err(400, INVALID, message)
}

struct LineItem {
    day: String,
    tags: BTreeMap<String, String>,
    amount: f64,
}

#[derive(Default)]
struct Inner {
    /// Tag keys Billing knows (Active or Inactive).
    tags: BTreeMap<String, TagStatus>,
    costs: Vec<LineItem>,
    estimated: BTreeSet<String>,
    page_days: usize,
    products: BTreeMap<String, Vec<Value>>,
    /// region -> value of [`PROFILE_QUOTA`]; 1000 where unset.
    quotas: BTreeMap<String, f64>,
    lifetime: Option<Duration>,
    sts_down: bool,
    faults: HashMap<Op, (u16, String, String)>,
    issued: Vec<Issued>,
    calls: Vec<Call>,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    keyring: Keyring,
}

#[derive(Clone)]
pub struct BillingFake {
    pub addr: SocketAddr,
    shared: Shared,
}

impl BillingFake {
    /// Starts the fake with a fresh keyring.
    pub async fn start() -> BillingFake {
        Self::start_with_keyring(Keyring::new()).await
    }

    /// Starts the fake verifying with (and issuing STS credentials into) `keyring`.
    pub async fn start_with_keyring(keyring: Keyring) -> BillingFake {
        let products = BTreeMap::from([(FOUNDATION_MODELS.to_string(), Vec::new())]);
        let inner = Inner {
            page_days: 2,
            products,
            ..Inner::default()
        };
        let inner = Arc::new(Mutex::new(inner));
        let shared = Shared { inner, keyring };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake billing");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        BillingFake { addr, shared }
    }

    /// The one endpoint URL of all four services.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The keyring STS registers issued credentials in (give it to `FakeBedrock`).
    pub fn keyring(&self) -> Keyring {
        self.shared.keyring.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().expect("lock")
    }

    // ---- reading state ----

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The requests of one operation.
    pub fn calls_of(&self, op: Op) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.op == op).collect()
    }

    /// How many requests of `op` arrived (SDK retries included).
    pub fn count(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|c| c.op == op).count()
    }

    /// The `Filter` of each GetCostAndUsage request (`None` when it had none).
    pub fn filters(&self) -> Vec<Option<Value>> {
        let calls = self.calls_of(Op::GetCostAndUsage);
        calls
            .iter()
            .map(|c| c.body.get("Filter").cloned())
            .collect()
    }

    /// What Billing says about a cost allocation tag key.
    pub fn tag_status(&self, key: &str) -> TagStatus {
        let status = self.lock().tags.get(key).copied();
        status.unwrap_or(TagStatus::Unknown)
    }

    /// Every set of credentials STS issued, in order.
    pub fn issued(&self) -> Vec<Issued> {
        self.lock().issued.clone()
    }

    /// Panics unless there were requests and each was signed validly, for its service, by
    /// the base test key or credentials this STS issued, and named a known operation.
    pub fn assert_clean(&self) {
        let calls = self.calls();
        assert!(!calls.is_empty(), "the billing fake saw no request");
        for c in &calls {
            let v = c.signature.as_ref();
            let v = v.unwrap_or_else(|e| panic!("{:?} was not signed correctly: {e}", c.op));
            assert_eq!(v.service, c.service.signing_name(), "{c:?}");
            assert_ne!(c.op, Op::Unknown, "unknown operation: {c:?}");
        }
    }

    // ---- changing state behind the client's back ----

    /// Adds a cost line item for `day` (YYYY-MM-DD); its tag keys become known (Inactive).
    pub fn add_cost(&self, day: &str, tags: &[(&str, &str)], amount: f64) {
        NaiveDate::parse_from_str(day, "%Y-%m-%d").expect("day is YYYY-MM-DD");
        let mut inner = self.lock();
        for (k, _) in tags {
            let known = inner.tags.entry((*k).to_string());
            known.or_insert(TagStatus::Inactive);
        }
        let tags = tags.iter().map(|(k, v)| ((*k).into(), (*v).into()));
        let day = day.to_string();
        let tags = tags.collect();
        inner.costs.push(LineItem { day, tags, amount });
    }

    /// Makes Billing know a tag key (Inactive) without any cost carrying it.
    pub fn see_tag(&self, key: &str) {
        let mut inner = self.lock();
        inner.tags.entry(key.into()).or_insert(TagStatus::Inactive);
    }

    /// Sets a tag key's status directly (`Unknown` forgets the key).
    pub fn set_tag_status(&self, key: &str, status: TagStatus) {
        let mut inner = self.lock();
        match status {
            TagStatus::Unknown => inner.tags.remove(key),
            s => inner.tags.insert(key.to_string(), s),
        };
    }

    /// Marks a day's figures as estimated (`"Estimated": true`).
    pub fn set_estimated(&self, day: &str) {
        self.lock().estimated.insert(day.to_string());
    }

    /// Most days of ResultsByTime on one GetCostAndUsage page (default 2).
    pub fn set_page_days(&self, days: usize) {
        assert!(days > 0);
        self.lock().page_days = days;
    }

    /// Replaces the price list of a service code (which then exists).
    pub fn set_products(&self, service_code: &str, items: Vec<Value>) {
        self.lock().products.insert(service_code.into(), items);
    }

    /// The value of [`PROFILE_QUOTA`] in `region` (the SigV4 scope's region; default 1000).
    pub fn set_quota(&self, region: &str, value: f64) {
        self.lock().quotas.insert(region.to_string(), value);
    }

    /// How long issued credentials last, whatever DurationSeconds asked (default: that).
    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lock().lifetime = Some(lifetime);
    }

    /// While down, every STS request answers 503 ServiceUnavailable.
    pub fn set_sts_down(&self, down: bool) {
        self.lock().sts_down = down;
    }

    /// Makes `op` answer AccessDenied(Exception), as for a caller without the IAM permission
    /// (HTTP 400 on awsJson, 403 on STS).
    pub fn deny(&self, op: Op) {
        let (status, code) = match op {
            Op::AssumeRole => (403, "AccessDenied"),
            _ => (400, "AccessDeniedException"),
        };
        let action = op.action();
        let message = format!(
            "User: arn:aws:iam::{ACCOUNT}:user/x is not authorized to perform: {action} because no identity-based policy allows the {action} action"
        );
        self.lock()
            .faults
            .insert(op, (status, code.into(), message));
    }

    /// Makes `op` answer this error (e.g. 400 ThrottlingException) until cleared.
    pub fn fail(&self, op: Op, status: u16, code: &str) {
        let message = format!("injected {code} for {}", op.action());
        let fault = (status, code.to_string(), message);
        self.lock().faults.insert(op, fault);
    }

    /// Removes every injected failure (STS down stays as set).
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }
}

/// The items AWS publishes in [`FOUNDATION_MODELS`] for one Claude model in one region:
/// regional (in-region and geographic cross-region) and global prices, in USD per million
/// tokens in the order input, output, cache read, cache write, plus one batch-tier item that a
/// client pricing on-demand traffic must ignore.
pub fn claude_price_items(
    servicename: &str,
    region: &str,
    regional: [f64; 4],
    global: [f64; 4],
) -> Vec<Value> {
    let prefix = region_prefix(region);
    let kinds = [
        ("InputTokenCount", "Input Tokens"),
        ("OutputTokenCount", "Response Tokens"),
        ("CacheReadInputTokenCount", "Cache Read Input Tokens"),
        ("CacheWriteInputTokenCount", "Cache Write Input Tokens"),
    ];
    let tiers = [
        ("", "Regional CRIS", regional),
        ("_Global", "Global", global),
    ];
    let mut out = Vec::new();
    let mut item = |kind: &str, suffix: &str, label: &str, scope: &str, price: f64| {
        let usagetype = format!("{prefix}-MP:{prefix}_{kind}{suffix}-Units");
        let description =
            format!("AWS Marketplace software usage|{region}|Million {label} {scope}");
        let attributes = json!({
            "servicecode": FOUNDATION_MODELS,
            "servicename": servicename,
            "regionCode": region,
            "locationType": "AWS Region",
            "usagetype": usagetype,
            "operation": "Usage",
        });
        out.push(price_item(attributes, &description, price));
    };
    for (i, (kind, label)) in kinds.iter().enumerate() {
        for (suffix, scope, prices) in &tiers {
            item(kind, suffix, label, scope, prices[i]);
        }
    }
    item(
        "InputTokenCount",
        "_Batch",
        "Input Tokens",
        "Batch",
        regional[0] / 2.0,
    );
    out
}

/// The usage-type prefix AWS uses for a region.
fn region_prefix(region: &str) -> &'static str {
    const PREFIXES: &str = "us-east-1=USE1 us-east-2=USE2 us-west-1=USW1 us-west-2=USW2 \
        ca-central-1=CAN1 eu-west-1=EU eu-west-2=EUW2 eu-west-3=EUW3 eu-central-1=EUC1 \
        eu-central-2=EUC2 eu-north-1=EUN1 eu-south-1=EUS1 eu-south-2=EUS2 ap-south-1=APS3 \
        ap-northeast-1=APN1 ap-northeast-2=APN2 ap-northeast-3=APN3 ap-southeast-1=APS1 \
        ap-southeast-2=APS2 sa-east-1=SAE1";
    let mut pairs = PREFIXES
        .split_whitespace()
        .filter_map(|p| p.split_once('='));
    let found = pairs.find(|(r, _)| *r == region).map(|(_, p)| p);
    found.unwrap_or_else(|| panic!("no usage-type prefix known for region {region}"))
}

/// One Price List item with a single OnDemand price dimension.
fn price_item(attributes: Value, description: &str, price: f64) -> Value {
    let id = format!("{}|{}", attributes["servicename"], attributes["usagetype"]);
    let sku = hex::encode_upper(&sha2::Sha256::digest(id.as_bytes())[..8]);
    let term = format!("{sku}.JRTCKXETXF");
    let rate = format!("{term}.6YS6EN2CT7");
    let dimension = json!({
        "unit": "Units",
        "endRange": "Inf",
        "description": description,
        "appliesTo": [],
        "rateCode": rate,
        "beginRange": "0",
        "pricePerUnit": { "USD": format!("{price:.10}") },
    });
    json!({
        "product": {
            "productFamily": "Bedrock Foundation Model",
            "attributes": attributes,
            "sku": sku,
        },
        "serviceCode": FOUNDATION_MODELS,
        "terms": { "OnDemand": { term.clone(): {
            "priceDimensions": { rate: dimension },
            "sku": sku,
            "effectiveDate": "2025-10-01T00:00:00Z",
            "offerTermCode": "JRTCKXETXF",
            "termAttributes": {},
        }}},
        "version": "20251001000000",
        "publicationDate": "2025-10-01T00:00:00Z",
    })
}

// ---- routing and the wire ----

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn decode(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_encoding::percent_decode_str(&s)
        .decode_utf8_lossy()
        .into_owned()
}

/// An awsQuery body as a JSON object of decoded strings.
fn decode_form(body: &[u8]) -> Value {
    let text = String::from_utf8_lossy(body);
    let pairs = text.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (decode(k), json!(decode(v)))
    });
    Value::Object(pairs.collect())
}

fn route(path: &str, headers: &HeaderMap, body: &Value) -> (Service, Op) {
    let ct = header(headers, "content-type");
    if path != "/" {
        return (Service::Unknown, Op::Unknown);
    }
    if ct.starts_with("application/x-www-form-urlencoded") {
        let known = body["Action"] == "AssumeRole";
        let op = if known { Op::AssumeRole } else { Op::Unknown };
        return (Service::Sts, op);
    }
    if !ct.starts_with("application/x-amz-json-1.1") {
        return (Service::Unknown, Op::Unknown);
    }
    let target = header(headers, "x-amz-target").split_once('.');
    let (prefix, name) = target.unwrap_or(("", ""));
    let service = match prefix {
        "AWSInsightsIndexService" => Service::CostExplorer,
        "AWSPriceListService" => Service::Pricing,
        "ServiceQuotasV20190624" => Service::Quotas,
        _ => Service::Unknown,
    };
    let op = [
        Op::UpdateCostAllocationTagsStatus,
        Op::ListCostAllocationTags,
        Op::GetCostAndUsage,
        Op::GetProducts,
        Op::GetServiceQuota,
    ]
    .into_iter()
    .find(|op| op.service() == service && format!("{op:?}") == name);
    (service, op.unwrap_or(Op::Unknown))
}

fn random(alphabet: &[u8], n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("randomness");
    let pick = |b: &u8| alphabet[usize::from(*b) % alphabet.len()] as char;
    bytes.iter().map(pick).collect()
}

const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const HEX: &[u8] = b"0123456789abcdef";

fn xml_escape(s: &str) -> String {
    let s = s.replace('&', "&amp;").replace('<', "&lt;");
    s.replace('>', "&gt;").replace('"', "&quot;")
}

fn respond(service: Service, status: u16, body: String, error: Option<&str>) -> Response {
    let sts = service == Service::Sts;
    let ct = if sts {
        "text/xml"
    } else {
        "application/x-amz-json-1.1"
    };
    let mut b = Response::builder()
        .status(status)
        .header("content-type", ct);
    b = b.header("x-amzn-requestid", random(HEX, 32));
    if let Some(code) = error.filter(|_| !sts) {
        b = b.header("x-amzn-errortype", code);
    }
    b.body(Body::from(body)).expect("response")
}

fn error_body(service: Service, e: &ApiError) -> String {
    let (code, message) = (&e.code, &e.message);
    if service == Service::Sts {
        let kind = if e.status >= 500 {
            "Receiver"
        } else {
            "Sender"
        };
        let (code, message) = (xml_escape(code), xml_escape(message));
        return format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{}</RequestId></ErrorResponse>",
            random(HEX, 32)
        );
    }
    // The front door (authentication) words `message`; services word `Message`.
    let front_door = e.status == 403 || code.starts_with("MissingAuth");
    let field = if front_door { "message" } else { "Message" };
    json!({ "__type": code, field: message }).to_string()
}

async fn handle(State(shared): State<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let raw = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let (method, path) = (parts.method.as_str(), parts.uri.path());
    let query = parts.uri.query();
    let signature = shared
        .keyring
        .verify(method, path, query, &parts.headers, &raw);
    let form = header(&parts.headers, "content-type").starts_with("application/x-www-form");
    let body = match form {
        true => decode_form(&raw),
        false => serde_json::from_slice(&raw).unwrap_or(Value::Null),
    };
    let (service, op) = match method {
        "POST" => route(path, &parts.headers, &body),
        _ => (Service::Unknown, Op::Unknown),
    };
    let mut inner = shared.inner.lock().expect("lock");
    let result = inner.serve(service, op, &body, &signature, &shared.keyring);
    let (status, response) = match result {
        Ok(text) => (200, respond(service, 200, text, None)),
        Err(mut e) => {
            let sts = service == Service::Sts;
            e.code = match (e.code.split_once('|'), service) {
                (Some((json, query)), _) => if sts { query } else { json }.to_string(),
                (None, Service::Sts) if e.code == INVALID => "ValidationError".into(),
                (None, Service::Pricing) if e.code == INVALID => "InvalidParameterException".into(),
                (None, Service::Quotas) if e.code == INVALID => "IllegalArgumentException".into(),
                _ => e.code,
            };
            let text = error_body(service, &e);
            (e.status, respond(service, e.status, text, Some(&e.code)))
        }
    };
    let (headers, signature) = (parts.headers, signature);
    let call = Call {
        service,
        op,
        headers,
        raw,
        body,
        signature,
        status,
    };
    inner.calls.push(call);
    response
}

// ---- inputs ----

/// A request's members (JSON, or the STS form as strings), checked against what is allowed.
struct Args<'a>(&'a Map<String, Value>);

impl<'a> Args<'a> {
    /// `allowed`: the member names, separated by spaces.
    fn of(body: &'a Value, allowed: &str) -> Result<Args<'a>, ApiError> {
        let Value::Object(map) = body else {
            return Err(err(400, "SerializationException", "not a JSON object"));
        };
        let known = |k: &&String| allowed.split(' ').any(|a| a == k.as_str());
        if let Some(k) = map.keys().find(|k| !known(k)) {
            return Err(invalid(format!("unexpected member `{k}`")));
        }
        Ok(Args(map))
    }

    fn opt(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(v)) => Ok(Some(v.clone())),
            Some(other) => Err(invalid(format!("`{key}` must be a string, got {other}"))),
        }
    }

    fn req(&self, key: &str) -> Result<String, ApiError> {
        self.opt(key)?
            .ok_or_else(|| invalid(format!("`{key}` is required")))
    }

    fn strs(&self, key: &str) -> Result<Vec<String>, ApiError> {
        let Some(v) = self.0.get(key) else {
            return Ok(Vec::new());
        };
        let item = |x: &Value| x.as_str().map(str::to_string);
        let list: Option<Vec<String>> = v.as_array().and_then(|a| a.iter().map(item).collect());
        list.ok_or_else(|| invalid(format!("`{key}` must be a list of strings")))
    }

    fn max_results(&self, limit: u64) -> Result<usize, ApiError> {
        let Some(v) = self.0.get("MaxResults") else {
            return Ok(limit as usize);
        };
        let n = v.as_u64().filter(|n| (1..=limit).contains(n));
        n.map(|n| n as usize)
            .ok_or_else(|| invalid(format!("MaxResults {v} is not 1..{limit}")))
    }

    /// What a page token is bound to: every member but the token and MaxResults.
    fn fingerprint(&self, token: &str) -> String {
        let mut m = self.0.clone();
        m.remove(token);
        m.remove("MaxResults");
        let digest = sha2::Sha256::digest(Value::Object(m).to_string().as_bytes());
        hex::encode(&digest[..6])
    }

    /// An opaque token (base64, with `+`, `/`, `=`) for the page at `offset`.
    fn token(&self, field: &str, offset: usize) -> String {
        let raw = format!("\u{fb}\u{ff}{}:{offset}", self.fingerprint(field));
        base64::engine::general_purpose::STANDARD.encode(raw)
    }

    /// The offset the token in `field` continues from (0 without one).
    fn offset(&self, field: &str) -> Result<usize, ApiError> {
        let Some(t) = self.opt(field)? else {
            return Ok(0);
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&t)
            .unwrap_or_default();
        let text = String::from_utf8(raw).unwrap_or_default();
        let parsed = text
            .strip_prefix("\u{fb}\u{ff}")
            .and_then(|r| r.split_once(':'));
        match parsed {
            Some((fp, n)) if fp == self.fingerprint(field) && n.parse::<usize>().is_ok() => {
                Ok(n.parse().unwrap_or_default())
            }
            _ => Err(err(
                400,
                "InvalidNextTokenException",
                format!("Invalid {field}: {t}"),
            )),
        }
    }
}

/// `all[offset..]` cut to `n` items, and the offset of the next page if there is one.
fn page<T: Clone>(all: &[T], offset: usize, n: usize) -> (Vec<T>, Option<usize>) {
    let end = (offset + n).min(all.len());
    let items = all.get(offset..end).unwrap_or_default().to_vec();
    (items, (end < all.len()).then_some(end))
}

fn date(v: &Value, what: &str) -> Result<NaiveDate, ApiError> {
    let d = v
        .as_str()
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
    d.ok_or_else(|| invalid(format!("TimePeriod.{what} must be a date YYYY-MM-DD")))
}

/// `[\w+=,.@-]` for session names; `[\p{L}\p{Z}\p{N}_.:/=+\-@]` for tags.
fn session_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

fn tag_char(c: char) -> bool {
    c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c)
}

// ---- the operations ----

impl Inner {
    fn serve(
        &mut self,
        service: Service,
        op: Op,
        body: &Value,
        signature: &Result<sigv4::Verified, String>,
        keyring: &Keyring,
    ) -> Result<String, ApiError> {
        if service == Service::Unknown {
            return Err(err(404, "UnknownOperationException", "no such service"));
        }
        if service == Service::Sts && self.sts_down {
            return Err(err(503, "ServiceUnavailable", "Service is unavailable."));
        }
        // Codes are `awsJson|STS` where the two protocols word an error differently.
        let scope = service.signing_name();
        let mismatch = "InvalidSignatureException|SignatureDoesNotMatch";
        match signature {
            Err(e) if e == "no authorization header" => {
                let code = "MissingAuthenticationTokenException|MissingAuthenticationToken";
                return Err(err(403, code, "Missing Authentication Token"));
            }
            Err(e) if e.starts_with(sigv4::UNKNOWN_KEY) => {
                let code = "UnrecognizedClientException|InvalidClientTokenId";
                let message = "The security token included in the request is invalid.";
                return Err(err(403, code, message));
            }
            Err(e) => {
                let message = format!(
                    "The request signature we calculated does not match the signature you provided. (fake: {e})"
                );
                return Err(err(403, mismatch, message));
            }
            Ok(v) if v.service != scope => {
                let message = format!("Credential should be scoped to correct service: '{scope}'.");
                return Err(err(403, mismatch, message));
            }
            Ok(_) => {}
        }
        if op == Op::Unknown {
            let code = "UnknownOperationException|InvalidAction";
            return Err(err(400, code, "Could not find operation"));
        }
        if let Some((status, code, message)) = self.faults.get(&op) {
            return Err(err(*status, code, message.clone()));
        }
        let region = signature.as_ref().map(|v| v.region.as_str()).unwrap_or("");
        let out = match op {
            Op::UpdateCostAllocationTagsStatus => self.update_tags(body),
            Op::ListCostAllocationTags => self.list_tags(body),
            Op::GetCostAndUsage => self.cost_and_usage(body),
            Op::GetProducts => self.products(body),
            Op::GetServiceQuota => self.quota(body, region),
            Op::AssumeRole => return self.assume_role(body, keyring),
            Op::Unknown => unreachable!("refused above"),
        };
        out.map(|v| v.to_string())
    }

    fn update_tags(&mut self, body: &Value) -> Result<Value, ApiError> {
        let args = Args::of(body, "CostAllocationTagsStatus")?;
        let items = args
            .0
            .get("CostAllocationTagsStatus")
            .and_then(Value::as_array);
        let items = items.filter(|i| (1..=20).contains(&i.len()));
        let items = items.ok_or_else(|| invalid("CostAllocationTagsStatus: 1 to 20 entries"))?;
        let mut wanted = Vec::new();
        for item in items {
            let entry = Args::of(item, "TagKey Status")?;
            let key = entry.req("TagKey")?;
            let status = match entry.req("Status")?.as_str() {
                "Active" => TagStatus::Active,
                "Inactive" => TagStatus::Inactive,
                other => return Err(invalid(format!("Status `{other}` is not valid"))),
            };
            if key.is_empty() || key.len() > 1024 {
                return Err(invalid(format!("TagKey `{key}` is not valid")));
            }
            wanted.push((key, status));
        }
        let mut errors = Vec::new();
        for (key, status) in wanted {
            match self.tags.get_mut(&key) {
                Some(s) => *s = status,
                None => errors.push(json!({
                    "TagKey": key,
                    "Code": "TagKeysNotFoundException",
                    "Message": format!("Tag key {key} was not found."),
                })),
            }
        }
        Ok(json!({ "Errors": errors }))
    }

    fn list_tags(&self, body: &Value) -> Result<Value, ApiError> {
        let allowed = "Status TagKeys Type NextToken MaxResults";
        let args = Args::of(body, allowed)?;
        let status = args.opt("Status")?;
        let user_defined = args.opt("Type")?.is_none_or(|t| t == "UserDefined");
        let keys = args.strs("TagKeys")?;
        let max = args.max_results(1000)?;
        let mut all = Vec::new();
        for (key, st) in self.tags.iter().filter(|_| user_defined) {
            let st = if *st == TagStatus::Active {
                "Active"
            } else {
                "Inactive"
            };
            let wanted = keys.is_empty() || keys.contains(key);
            if wanted && status.as_deref().is_none_or(|w| w == st) {
                all.push(json!({ "TagKey": key, "Type": "UserDefined", "Status": st }));
            }
        }
        let (items, next) = page(&all, args.offset("NextToken")?, max.min(PAGE));
        let mut reply = json!({ "CostAllocationTags": items });
        if let Some(n) = next {
            reply["NextToken"] = json!(args.token("NextToken", n));
        }
        Ok(reply)
    }

    fn cost_and_usage(&self, body: &Value) -> Result<Value, ApiError> {
        let allowed = "TimePeriod Granularity Filter Metrics GroupBy NextPageToken BillingViewArn";
        let args = Args::of(body, allowed)?;
        let period = &args.0.get("TimePeriod").cloned().unwrap_or_default();
        let start = date(&period["Start"], "Start")?;
        let end = date(&period["End"], "End")?;
        if start >= end {
            let message = "Start date (and hour) should be before end date (and hour)";
            return Err(invalid(message));
        }
        let granularity = args.opt("Granularity")?;
        if granularity.as_deref() != Some("DAILY") {
            let message = format!("Granularity {granularity:?}: the fake serves DAILY");
            return Err(invalid(message));
        }
        let metrics = args.strs("Metrics")?;
        let unknown = metrics.iter().find(|m| !COST_METRICS.contains(&m.as_str()));
        if let Some(m) = unknown.or(metrics.is_empty().then_some(&String::new())) {
            return Err(invalid(format!(
                "Metrics [{m}] are not cost metrics the fake knows"
            )));
        }
        let groups = args.0.get("GroupBy").and_then(Value::as_array);
        let group = match groups.map(Vec::as_slice) {
            None | Some([]) => None,
            Some([g]) if g["Type"] == "TAG" && g["Key"].is_string() => g["Key"].as_str(),
            Some(other) => {
                let message = format!("GroupBy {other:?}: the fake groups by one TAG");
                return Err(invalid(message));
            }
        };
        let amounts = |total: f64| -> Value {
            let amount = json!({ "Amount": format!("{total:.10}"), "Unit": "USD" });
            let metrics = metrics.iter().map(|m| (m.clone(), amount.clone()));
            Value::Object(metrics.collect())
        };
        let days: Vec<NaiveDate> = start.iter_days().take_while(|d| *d < end).collect();
        let (days, next) = page(&days, args.offset("NextPageToken")?, self.page_days);
        let mut results = Vec::new();
        for d in days {
            let day = d.format("%Y-%m-%d").to_string();
            let items = self.costs.iter().filter(|c| c.day == day);
            let (total, groups) = match group {
                None => (amounts(items.map(|c| c.amount).sum()), json!([])),
                Some(k) => {
                    let active = self.tags.get(k) == Some(&TagStatus::Active);
                    let mut by: BTreeMap<&str, f64> = BTreeMap::new();
                    for c in items {
                        let v = c.tags.get(k).map(String::as_str).filter(|_| active);
                        *by.entry(v.unwrap_or("")).or_default() += c.amount;
                    }
                    let group = |(v, a): (&&str, &f64)| json!({ "Keys": [format!("{k}${v}")], "Metrics": amounts(*a) });
                    (json!({}), Value::Array(by.iter().map(group).collect()))
                }
            };
            let next_day = d.succ_opt().expect("next day").format("%Y-%m-%d");
            results.push(json!({
                "TimePeriod": { "Start": day, "End": next_day.to_string() },
                "Total": total,
                "Groups": groups,
                "Estimated": self.estimated.contains(&day),
            }));
        }
        let defs: Vec<Value> = group
            .iter()
            .map(|k| json!({ "Type": "TAG", "Key": k }))
            .collect();
        let mut reply = json!({
            "GroupDefinitions": defs,
            "ResultsByTime": results,
            "DimensionValueAttributes": [],
        });
        if let Some(n) = next {
            reply["NextPageToken"] = json!(args.token("NextPageToken", n));
        }
        Ok(reply)
    }

    fn products(&self, body: &Value) -> Result<Value, ApiError> {
        let allowed = "ServiceCode Filters FormatVersion NextToken MaxResults";
        let args = Args::of(body, allowed)?;
        let code = args.req("ServiceCode")?;
        if let Some(f) = args.opt("FormatVersion")?.filter(|f| f != "aws_v1") {
            return Err(invalid(format!("FormatVersion {f} is not supported")));
        }
        let max = args.max_results(100)?;
        let mut filters = Vec::new();
        for f in args
            .0
            .get("Filters")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let f = Args::of(f, "Type Field Value")?;
            let kind = f.req("Type")?;
            if kind != "TERM_MATCH" && kind != "EQUALS" {
                return Err(invalid(format!("filter type {kind} is not valid")));
            }
            filters.push((kind, f.req("Field")?, f.req("Value")?));
        }
        let items = self.products.get(&code);
        let not_found = || {
            err(
                400,
                "NotFoundException",
                format!("Service {code} not found"),
            )
        };
        let items = items.ok_or_else(not_found)?;
        let matches = |item: &&Value| {
            filters.iter().all(|(_, field, want)| {
                let product = &item["product"];
                let have = product["attributes"][field.as_str()].as_str();
                have.or_else(|| product[field.as_str()].as_str()) == Some(want.as_str())
            })
        };
        let all: Vec<String> = items.iter().filter(matches).map(Value::to_string).collect();
        let (list, next) = page(&all, args.offset("NextToken")?, max.min(PAGE));
        let mut reply = json!({ "FormatVersion": "aws_v1", "PriceList": list });
        if let Some(n) = next {
            reply["NextToken"] = json!(args.token("NextToken", n));
        }
        Ok(reply)
    }

    fn quota(&self, body: &Value, region: &str) -> Result<Value, ApiError> {
        let args = Args::of(body, "ServiceCode QuotaCode ContextId")?;
        let (service, code) = (args.req("ServiceCode")?, args.req("QuotaCode")?);
        if service != "bedrock" || code != PROFILE_QUOTA {
            return Err(err(
                400,
                "NoSuchResourceException",
                format!(
                    "The request failed because the specified service quota does not exist: {service}/{code}."
                ),
            ));
        }
        Ok(json!({ "Quota": {
            "ServiceCode": "bedrock",
            "ServiceName": "Amazon Bedrock",
            "QuotaArn": format!("arn:aws:servicequotas:{region}:{ACCOUNT}:bedrock/{code}"),
            "QuotaCode": code,
            "QuotaName": "Inference profiles per account",
            "Value": self.quotas.get(region).copied().unwrap_or(1000.0),
            "Unit": "None",
            "Adjustable": true,
            "GlobalQuota": false,
        }}))
    }

    fn assume_role(&mut self, body: &Value, keyring: &Keyring) -> Result<String, ApiError> {
        let form = body.as_object().cloned().unwrap_or_default();
        let args = Args(&form);
        if args.opt("Version")?.as_deref() != Some("2011-06-15") {
            return Err(err(400, "InvalidAction", "Version must be 2011-06-15"));
        }
        let violation = |what: &str, v: &str, rule: &str| {
            invalid(format!(
                "1 validation error detected: Value '{v}' at '{what}' failed to satisfy constraint: Member must {rule}"
            ))
        };
        let role_arn = args.req("RoleArn")?;
        let role = role_arn
            .strip_prefix("arn:aws:iam::")
            .and_then(|r| r.split_once(":role/"));
        let role = role
            .and_then(|(_, r)| r.rsplit('/').next())
            .unwrap_or("")
            .to_string();
        if role.is_empty() || !(20..=2048).contains(&role_arn.len()) {
            return Err(violation("roleArn", &role_arn, "be an IAM role ARN"));
        }
        let session = args.req("RoleSessionName")?;
        if !(2..=64).contains(&session.len()) || !session.chars().all(session_char) {
            let rule = "have length 2..64 and satisfy regular expression pattern: [\\w+=,.@-]*";
            return Err(violation("roleSessionName", &session, rule));
        }
        let duration = args
            .opt("DurationSeconds")?
            .unwrap_or_else(|| "3600".into());
        let seconds = duration.parse().ok().filter(|n| (900..=43200).contains(n));
        let seconds: u64 =
            seconds.ok_or_else(|| violation("durationSeconds", &duration, "be 900..43200"))?;
        let mut tags: Vec<(String, String)> = Vec::new();
        while let Some(key) = args.opt(&format!("Tags.member.{}.Key", tags.len() + 1))? {
            let value = args.opt(&format!("Tags.member.{}.Value", tags.len() + 1))?;
            let value = value.ok_or_else(|| invalid(format!("tag {key} has no Value")))?;
            if !(1..=128).contains(&key.chars().count()) || !key.chars().all(tag_char) {
                return Err(violation("tags.member.key", &key, "have length 1..128"));
            }
            if value.chars().count() > 256 || !value.chars().all(tag_char) {
                return Err(violation("tags.member.value", &value, "have length 0..256"));
            }
            if tags.iter().any(|(k, _)| k.eq_ignore_ascii_case(&key)) {
                let message =
                    "Duplicate tag keys found. Please note that Tag keys are case insensitive.";
                return Err(err(400, "InvalidParameterValue", message));
            }
            tags.push((key, value));
        }
        if tags.len() > 50 {
            return Err(violation(
                "tags",
                "[...]",
                "have length less than or equal to 50",
            ));
        }

        let access_key = format!("ASIA{}", random(UPPER, 16));
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let secret_key = random(alphabet, 40);
        let mut token = [0u8; 120];
        getrandom::fill(&mut token).expect("randomness");
        let token = base64::engine::general_purpose::STANDARD.encode(token);
        let session_token = format!("FwoGZXIvYXdzE{token}");
        let lifetime = self.lifetime.unwrap_or(Duration::from_secs(seconds));
        let expiration = SystemTime::now() + lifetime;
        let epoch = expiration
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970");
        let expires = aws_smithy_types::DateTime::from_secs(epoch.as_secs() as i64)
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .expect("format time");
        keyring.insert(&access_key, &secret_key, Some(&session_token));
        // Session tags use up a share of the packed policy limit.
        let packed = tags.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        let packed = match packed {
            0 => String::new(),
            n => format!(
                "<PackedPolicySize>{}</PackedPolicySize>",
                (n * 100).div_ceil(2048)
            ),
        };
        let (role, name) = (xml_escape(&role), xml_escape(&session));
        let xml = format!(
            "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult>\
             <Credentials><AccessKeyId>{access_key}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey>\
             <SessionToken>{}</SessionToken><Expiration>{expires}</Expiration></Credentials>\
             <AssumedRoleUser><AssumedRoleId>AROA{}:{name}</AssumedRoleId>\
             <Arn>arn:aws:sts::{ACCOUNT}:assumed-role/{role}/{name}</Arn></AssumedRoleUser>{packed}\
             </AssumeRoleResult><ResponseMetadata><RequestId>{}</RequestId></ResponseMetadata>\
             </AssumeRoleResponse>",
            xml_escape(&secret_key),
            xml_escape(&session_token),
            random(UPPER, 17),
            random(HEX, 32),
        );
        self.issued.push(Issued {
            role_arn,
            session_name: session,
            tags,
            duration_seconds: seconds,
            access_key,
            secret_key,
            session_token,
            expiration,
        });
        Ok(xml)
    }
}
