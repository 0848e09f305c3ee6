//! Configuration: the TOML file parsed into [`raw`] types, then validated into [`Config`].
//!
//! `serve` and `check` both call [`Config::load`], so a config that passes `check` is exactly
//! one that `serve` accepts. Every error names the key path it is about. This module owns the
//! routing table (who may use which profile); it never touches the network.

pub mod raw;
pub mod signin;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::arn::{BedrockArn, ModelRef, ResourceKind};
use crate::auth::KeyHash;
use crate::meter::ledger::Synchronous;
use crate::meter::prices::{Price, PriceEntry, Prices, Rates, Special, Tier};
use raw::RawConfig;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 20 * 1024 * 1024;
/// Room for a dozen of the largest bodies, or a few hundred of Claude Code's usual ones, at
/// once; a bound on what concurrent uploads can pin.
pub const DEFAULT_MAX_INFLIGHT_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// Larger bodies than this are never sensible for one model call and would let one caller
/// pin a lot of proxy memory.
const MAX_MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;
const DEFAULT_RUNTIME_ENDPOINT: &str = "https://bedrock-runtime.{region}.amazonaws.com";
const DEFAULT_CONTROL_ENDPOINT: &str = "https://bedrock.{region}.amazonaws.com";

/// A config problem, with the dotted key path it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A validated, ready-to-serve configuration. Immutable: a reload builds a new one.
#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listener; `None` when disabled with `admin_listen = ""`.
    pub admin_listen: Option<SocketAddr>,
    /// HTTPS on `listen` when set (`tls_cert` + `tls_key`).
    pub tls: Option<crate::tls::TlsSettings>,
    pub ledger: LedgerSettings,
    pub prices: Prices,
    pub aws: AwsSettings,
    pub max_body_bytes: usize,
    /// `limits.max_inflight_body_bytes`: request body bytes held at once, all requests together.
    pub max_inflight_body_bytes: u64,
    pub timeouts: Timeouts,
    pub provisioning: Provisioning,
    pub attribution: Attribution,
    pub users: Users,
    /// `public_url`: what developers type into Claude Code's `/login`.
    pub public_url: Option<String>,
    /// `[oidc]`: SSO sign-in; `None` turns the sign-in endpoints off.
    pub signin: Option<signin::SignIn>,
    /// What `GET /managed/settings` serves, besides each user's own.
    pub settings: signin::SettingsPolicy,
    pub telemetry: signin::Telemetry,
    /// `[auth]`: the master key of issued SigV4 key pairs.
    pub auth: Auth,
    /// `[admin]`: who may open the dashboard.
    pub admin: Admin,
    /// `[store]`: PostgreSQL; `None` is the SQLite ledger at `ledger.path`.
    pub store: Option<crate::store::Settings>,
    /// `prices_file` as written (relative to the config file), and the SHA-256 of what it held
    /// when read, so a reload notices new prices.
    pub prices_file: Option<(String, String)>,
}

/// Labels a call carries besides its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribution {
    /// The key in a Messages body's `tags` whose value is the call's project.
    pub project_tag: String,
}

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
pub const DEFAULT_LEDGER_PATH: &str = "bedrock-gate.db";

/// Where usage rows are written and how hard each commit is synced.
#[derive(Debug, Clone)]
pub struct LedgerSettings {
    /// As written; a relative path is relative to the config file's directory.
    pub path: String,
    /// `full`: a committed row survives a power loss; `normal`: a crash of the process.
    pub synchronous: Synchronous,
    /// The config still sets `ledger.flush_interval_ms`, which no longer does anything (rows
    /// are committed as they come); `serve` says so once at start.
    pub flush_interval_ignored: bool,
}

impl LedgerSettings {
    /// The database path, resolving a relative one against the config file's directory.
    pub fn resolve(&self, config_path: &Path) -> std::path::PathBuf {
        let p = Path::new(&self.path);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        dir_of(config_path).join(p)
    }
}

/// The directory a file lives in (`.` for a bare file name).
pub fn dir_of(path: &Path) -> std::path::PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    }
}

/// Per-user limits; each is off when unset.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UserLimits {
    pub monthly_budget_usd: Option<f64>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

/// The value that asks `profiles apply` to create a user's profile for a model.
pub const AUTO: &str = "auto";

/// Where provisioned profiles copy their model from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileSource {
    /// The system-defined cross-region profile (`us.`/`eu.`/`apac.` + model id) of `aws.region`.
    CrossRegion,
    /// The system-defined `global.` profile (Bedrock's Global rate).
    Global,
    /// The foundation model in `aws.region`.
    FoundationModel,
}

/// How `profiles apply` names and tags the profiles it creates.
#[derive(Debug, Clone)]
pub struct Provisioning {
    /// Cost-allocation tag whose value is the user's name.
    pub tag_key: String,
    pub name_prefix: String,
    pub source: ProfileSource,
    /// Extra tags on every profile.
    pub tags: BTreeMap<String, String>,
    /// `profiles apply` activates the keys of `tags` as cost allocation tags too.
    pub activate_extra_tags: bool,
}

impl Provisioning {
    /// The tag keys `profiles apply` activates in Billing: the per-user key, and with
    /// `activate_extra_tags` the extra ones.
    pub fn activated_keys(&self) -> Vec<String> {
        let mut keys = vec![self.tag_key.clone()];
        if self.activate_extra_tags {
            keys.extend(self.tags.keys().cloned());
        }
        keys
    }
}

pub(crate) fn check_tags(path: &str, tags: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (k, v) in tags {
        if k.is_empty() || k.len() > 128 || k.starts_with("aws:") {
            return Err(ConfigError::new(
                format!("{path}.{k}"),
                "a tag key has 1 to 128 characters and may not start with `aws:`",
            ));
        }
        if v.len() > 256 {
            return Err(ConfigError::new(
                format!("{path}.{k}"),
                "a tag value has at most 256 characters",
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct AwsSettings {
    /// Region for control-plane calls and for ids that carry no region.
    pub region: String,
    pub runtime_endpoint: EndpointTemplate,
    pub control_endpoint: EndpointTemplate,
    /// Overrides of the SDKs' own endpoints (tests, VPC endpoints); `None`: the SDK's.
    pub cost_explorer_endpoint: Option<EndpointTemplate>,
    pub pricing_endpoint: Option<EndpointTemplate>,
    pub sts_endpoint: Option<EndpointTemplate>,
    pub service_quotas_endpoint: Option<EndpointTemplate>,
    /// Named AWS profile; `None` means the default credential chain.
    pub profile: Option<String>,
    /// With it, each user's calls are signed with a session of this role of their own.
    pub user_role_arn: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP connect plus TLS handshake to Bedrock; past it the connect is retried.
    pub connect: Duration,
    /// From sending the request to receiving response headers. Non-streaming calls only
    /// answer when the whole completion is done, so this is long.
    pub first_byte: Duration,
    /// How long a client may take to send its request body.
    pub request_body: Duration,
    /// Longest gap between two pieces of a response body (stream events); a stream silent
    /// that long is cut. Long, because a model can think for minutes between events.
    pub stream_idle: Duration,
    /// How long a connection may go without starting a request: slow headers, idle keep-alive
    /// (HTTP/1.1 and HTTP/2), and connections that never send one.
    pub request_header: Duration,
    /// How long an SSE stream (Messages front) may go silent before the proxy sends `ping`,
    /// so idle timeouts between client and proxy do not cut a model that thinks for long.
    pub stream_ping: Duration,
    /// How long a write to a client may wait: one that stopped reading is cut after it.
    pub client_write: Duration,
}

/// An endpoint URL in which `{region}` is replaced by the target's region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointTemplate(String);

impl EndpointTemplate {
    fn parse(path: &str, s: &str) -> Result<Self, ConfigError> {
        let trimmed = s.trim_end_matches('/');
        let probe = trimmed.replace("{region}", "us-east-1");
        let uri: http::Uri = probe
            .parse()
            .map_err(|e| ConfigError::new(path, format!("`{s}` is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => {
                return Err(ConfigError::new(
                    path,
                    format!("`{s}` must start with https:// or http://"),
                ));
            }
        }
        if uri.authority().is_none() {
            return Err(ConfigError::new(path, format!("`{s}` has no host")));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(ConfigError::new(
                path,
                format!("`{s}` must be a bare scheme://host[:port] with no path"),
            ));
        }
        Ok(EndpointTemplate(trimmed.to_string()))
    }

    /// The base URL (no trailing slash) for a region.
    pub fn for_region(&self, region: &str) -> String {
        self.0.replace("{region}", region)
    }
}

/// One application inference profile a user may call, and the model it was mapped from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The full ARN as configured; it is what Bedrock receives.
    pub arn: String,
    pub parsed: BedrockArn,
    /// The config key it is mapped from (a base model id such as `anthropic.claude-...`).
    pub model: String,
    /// Which of Bedrock's rates its calls pay: Global when the key says `global.` or
    /// profiles are made from `global.` ones (`provisioning.source = "global"`).
    pub tier: Tier,
}

/// `[store]`, validated; errors never quote the URL (it may hold a password).
fn store_settings(raw: raw::RawStore) -> Result<crate::store::Settings, ConfigError> {
    use crate::store::OnUnavailable;
    let url = raw
        .url
        .ok_or_else(|| ConfigError::new("store.url", "required in [store] (postgres://…)"))?;
    let on_unavailable = match raw.on_unavailable.as_deref() {
        None | Some("open") => OnUnavailable::Open,
        Some("closed") => OnUnavailable::Closed,
        Some(_) => {
            return Err(ConfigError::new(
                "store.on_unavailable",
                "\"open\" (admit on the last known spend) or \"closed\" (refuse)",
            ));
        }
    };
    let mut settings =
        crate::store::Settings::new(url, raw.password_file, raw.ca_file, on_unavailable)
            .map_err(|e| ConfigError::new("store.url", e))?;
    if let Some(r) = raw.replica {
        if r.is_empty() || r.len() > 128 || r.chars().any(char::is_control) {
            return Err(ConfigError::new(
                "store.replica",
                "1 to 128 characters, no control characters",
            ));
        }
        settings.replica = Some(r);
    }
    if let Some(p) = raw.spool_path {
        if p.is_empty() {
            return Err(ConfigError::new("store.spool_path", "empty; name a file"));
        }
        settings.spool_path = p;
    }
    if let Some(secs) = raw.replica_gone_secs {
        if !(2..=7 * 86_400).contains(&secs) {
            return Err(ConfigError::new(
                "store.replica_gone_secs",
                "2 to 604800 seconds (default 900)",
            ));
        }
        settings.replica_gone = std::time::Duration::from_secs(secs);
    }
    Ok(settings)
}

/// `[admin]`: the dashboard's access. Neither a token nor admins to sign in: the dashboard
/// answers 401 to everyone.
#[derive(Debug, Clone, Default)]
pub struct Admin {
    /// `admin.token_sha256`: the hash of the admin token.
    pub token: Option<KeyHash>,
    /// `admin.groups`: IdP groups whose members sign in as admins.
    pub groups: Vec<String>,
    /// `admin.emails`: admins by email (lowercase), signing in through the IdP.
    pub emails: Vec<String>,
    /// `admin.public_url`: the dashboard's origin for the IdP's redirect, when admins reach
    /// it at another address than the one `admin_listen` binds (a port-forward, a proxy).
    pub public_url: Option<String>,
}

impl Admin {
    /// Whether someone the IdP vouches for is an admin.
    pub fn admits(&self, email: Option<&str>, groups: &[String]) -> bool {
        email.is_some_and(|e| self.emails.iter().any(|a| a == e))
            || groups.iter().any(|g| self.groups.contains(g))
    }

    /// Whether admins sign in through the IdP.
    pub fn sso(&self) -> bool {
        !self.groups.is_empty() || !self.emails.is_empty()
    }
}

/// `[auth]`, and the master key it names once read (only when some user has an access key id).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// `auth.sigv4_master_key_file` as written (relative to the config file).
    pub master_key_file: Option<String>,
    pub master_key: Option<crate::auth::MasterKey>,
}

impl Auth {
    /// Reads the master key: `sigv4_master_key_file` (relative to `dir`), else
    /// `BEDROCK_GATE_SIGV4_MASTER_KEY`. Errors never quote the key.
    pub fn load_master_key(&mut self, dir: &Path) -> Result<(), ConfigError> {
        const KEY: &str = "auth.sigv4_master_key_file";
        let text = match &self.master_key_file {
            Some(name) => {
                let path = dir.join(name);
                std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(KEY, format!("cannot read {}: {e}", path.display()))
                })?
            }
            None => std::env::var(crate::auth::MASTER_KEY_ENV).map_err(|_| {
                ConfigError::new(
                    KEY,
                    format!(
                        "users have access_key_ids but there is no master key: name its file here, or set {} \
                         (`bedrock-gate keys add NAME --sigv4` creates one)",
                        crate::auth::MASTER_KEY_ENV
                    ),
                )
            })?,
        };
        let key = crate::auth::MasterKey::parse(&text).map_err(|e| ConfigError::new(KEY, e))?;
        self.master_key = Some(key);
        Ok(())
    }
}

/// A user of the proxy: their name and the profiles they may call.
#[derive(Debug)]
pub struct User {
    pub name: String,
    /// Config key (model id) to profile.
    pub models: BTreeMap<String, Arc<Profile>>,
    /// Models mapped to `"auto"` that `profiles apply` has not provisioned yet.
    pub pending: Vec<String>,
    /// Extra cost-allocation tags for this user's profiles.
    pub tags: BTreeMap<String, String>,
    pub limits: UserLimits,
    /// Signed-in identities that are this user: emails (lowercase) and IdP subjects.
    pub emails: Vec<String>,
    pub subjects: Vec<String>,
    /// This user's own managed settings (over the group's and everyone's).
    pub managed_settings: Option<serde_json::Map<String, serde_json::Value>>,
    /// Billing options beyond the standard rate this user may use (`allow_headers`).
    pub allow: crate::premium::Allowed,
}

impl User {
    /// The caller's own profile with this ARN, if any.
    pub fn profile_by_arn(&self, arn: &str) -> Option<&Arc<Profile>> {
        self.models.values().find(|p| p.arn == arn)
    }

    /// The caller's own profile whose ARN ends in this id, if any.
    pub fn profile_by_id(&self, id: &str) -> Option<&Arc<Profile>> {
        self.models.values().find(|p| p.parsed.resource_id == id)
    }
}

/// The routing table: key hash to user, and profile ARN to its owner.
#[derive(Debug, Default)]
pub struct Users {
    by_key: HashMap<KeyHash, Arc<User>>,
    by_access_key: HashMap<String, Arc<User>>,
    by_name: HashMap<String, Arc<User>>,
    by_email: HashMap<String, Arc<User>>,
    by_subject: HashMap<String, Arc<User>>,
    owners: HashMap<String, String>,
    all: Vec<Arc<User>>,
}

impl Users {
    pub fn by_key(&self, hash: &KeyHash) -> Option<&Arc<User>> {
        self.by_key.get(hash)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<User>> {
        self.by_name.get(name)
    }

    /// The user an issued SigV4 access key id belongs to.
    pub fn by_access_key(&self, id: &str) -> Option<&Arc<User>> {
        self.by_access_key.get(id)
    }

    /// Whether any user has an issued SigV4 key pair (then the master key must be read).
    pub fn has_access_keys(&self) -> bool {
        !self.by_access_key.is_empty()
    }

    /// The user a signed-in identity is: by subject first, then by (lowercase) email.
    pub fn by_identity(&self, subject: &str, email: Option<&str>) -> Option<&Arc<User>> {
        self.by_subject
            .get(subject)
            .or_else(|| email.and_then(|e| self.by_email.get(&e.trim().to_ascii_lowercase())))
    }

    /// Name of the user a profile ARN belongs to.
    pub fn owner_of(&self, arn: &str) -> Option<&str> {
        self.owners.get(arn).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Every user, in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<User>> {
        self.all.iter()
    }
}

/// An optional endpoint override.
fn optional_endpoint(path: &str, s: Option<&str>) -> Result<Option<EndpointTemplate>, ConfigError> {
    s.map(|s| EndpointTemplate::parse(path, s)).transpose()
}

/// `arn:{partition}:iam::{12 digits}:role/{path/}name`.
pub fn is_role_arn(s: &str) -> bool {
    let mut parts = s.splitn(6, ':');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource))
            if partition.starts_with("aws")
                && account.len() == 12
                && account.bytes().all(|b| b.is_ascii_digit())
                && resource
                    .strip_prefix("role/")
                    .is_some_and(|n| !n.is_empty() && n.len() <= 512
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b)))
    )
}

/// Four rates, each zero or more.
fn rate(path: &str, r: [f64; 4]) -> Result<Price, ConfigError> {
    if r.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(ConfigError::new(
            path,
            "prices are USD per million tokens, zero or more",
        ));
    }
    Ok(Price {
        input_per_mtok: r[0],
        output_per_mtok: r[1],
        cache_read_per_mtok: Some(r[2]),
        cache_write_per_mtok: Some(r[3]),
    })
}

fn raw_rate(path: &str, r: &raw::RawRate) -> Result<Price, ConfigError> {
    rate(
        path,
        [
            r.input_per_mtok,
            r.output_per_mtok,
            r.cache_read_per_mtok,
            r.cache_write_per_mtok,
        ],
    )
}

/// A `[prices."MODEL"]` table, validated.
fn price_entry(path: &str, p: &raw::RawPrice) -> Result<PriceEntry, ConfigError> {
    let regional = rate(
        path,
        [
            p.input_per_mtok,
            p.output_per_mtok,
            p.cache_read_per_mtok,
            p.cache_write_per_mtok,
        ],
    )?;
    let global = p
        .global
        .as_ref()
        .map(|g| raw_rate(&format!("{path}.global"), g))
        .transpose()?;
    let mut entry = PriceEntry::new(regional, global);
    for (region, r) in &p.regions {
        let rpath = format!("{path}.regions.\"{region}\"");
        if !crate::arn::is_region(region) {
            return Err(ConfigError::new(
                &rpath,
                format!("`{region}` is not a region"),
            ));
        }
        let regional = rate(
            &rpath,
            [
                r.input_per_mtok,
                r.output_per_mtok,
                r.cache_read_per_mtok,
                r.cache_write_per_mtok,
            ],
        )?;
        let global = r
            .global
            .as_ref()
            .map(|g| raw_rate(&format!("{rpath}.global"), g))
            .transpose()?;
        entry
            .regions
            .insert(region.clone(), Rates { regional, global });
    }
    for (special, raw) in [
        (Special::Priority, &p.priority),
        (Special::Flex, &p.flex),
        (Special::LatencyOptimized, &p.latency_optimized),
    ] {
        if let Some(r) = raw {
            let price = raw_rate(&format!("{path}.{}", special.key()), r)?;
            entry.special.insert(special, price);
        }
    }
    Ok(entry)
}

fn line_of(src: &str, offset: usize) -> usize {
    src.get(..offset).map_or(0, |s| s.matches('\n').count()) + 1
}

/// Whether a key path holds secrets (API keys, the OIDC secret, collector headers): a type
/// error there must not quote the value.
fn is_secret_path(path: &str) -> bool {
    path.split('.').any(|seg| {
        let seg = seg.split('[').next().unwrap_or(seg);
        seg == "keys" || seg.contains("secret") || seg == "headers"
    })
}

/// A parse error's message without the values it quotes where they may be secrets: serde
/// quotes a string it did not expect (`invalid type: string "bgk_…"`), and a key written as a
/// string instead of a list would land in `check`'s output and the reload log. Any `bgk_` key
/// anywhere is masked too.
fn redact_values(path: &str, message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    let secret = is_secret_path(path);
    while let Some(at) = rest.find('"') {
        let (before, quoted) = rest.split_at(at);
        out.push_str(before);
        let Some(end) = quoted[1..].find('"') else {
            out.push_str(quoted);
            rest = "";
            break;
        };
        let value = &quoted[1..=end];
        if secret || value.contains(crate::auth::KEY_PREFIX) {
            out.push_str("\"*****\"");
        } else {
            out.push_str(&quoted[..end + 2]);
        }
        rest = &quoted[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A `limits` table (of a user, or of `[oidc.auto_users]`), validated.
fn user_limits(path: &str, raw: &raw::RawUserLimits) -> Result<UserLimits, ConfigError> {
    Ok(UserLimits {
        monthly_budget_usd: match raw.monthly_budget_usd {
            Some(b) if !b.is_finite() || b < 0.0 => {
                return Err(ConfigError::new(
                    format!("{path}.monthly_budget_usd"),
                    "a budget is zero or more US dollars",
                ));
            }
            other => other,
        },
        requests_per_minute: raw.requests_per_minute,
        tokens_per_minute: raw.tokens_per_minute,
    })
}

pub fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_hashed(path).map(|(config, _)| config)
    }

    /// Reads, parses and validates a config file, and reads the TLS files it names. Returns
    /// it with the SHA-256 of the file's bytes.
    pub fn load_hashed(path: &Path) -> Result<(Config, String), ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| {
            ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let text = String::from_utf8(bytes)
            .map_err(|_| ConfigError::new(path.display().to_string(), "not UTF-8"))?;
        let mut config = Self::parse_at(&text, path)?;
        if let Some(tls) = config.tls.as_mut() {
            tls.load(&dir_of(path))
                .map_err(|e| ConfigError::new(e.setting, e.message))?;
        }
        if let Some(signin) = config.signin.as_mut() {
            signin.load_secret(&dir_of(path))?;
        }
        if config.users.has_access_keys() {
            config.auth.load_master_key(&dir_of(path))?;
        }
        Ok((config, sha256))
    }

    /// Reads the prices file `name` (relative to `dir`): its `[prices."MODEL"]` tables, and the
    /// SHA-256 of its bytes.
    fn read_prices_file(
        dir: &Path,
        name: &str,
    ) -> Result<(BTreeMap<String, raw::RawPrice>, String), ConfigError> {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| {
            ConfigError::new(
                "prices_file",
                format!(
                    "cannot read {}: {e} (write it with `bedrock-gate prices sync`)",
                    path.display()
                ),
            )
        })?;
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let text = String::from_utf8(bytes)
            .map_err(|_| ConfigError::new("prices_file", format!("{name} is not UTF-8")))?;
        let file: raw::RawPricesFile = Self::parse_toml(&text, &format!("prices_file {name}: "))?;
        Ok((file.prices, sha))
    }

    /// Parses and validates config text as the file at `path` would be, reading the prices file
    /// it names (but not the TLS files).
    pub fn parse_at(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = Self::parse_toml(text, "")?;
        let (file_prices, prices_file) = match &raw.prices_file {
            None => (BTreeMap::new(), None),
            Some(name) => {
                let (prices, sha) = Self::read_prices_file(&dir_of(path), name)?;
                (prices, Some((name.clone(), sha)))
            }
        };
        let mut config = Self::from_raw_with(raw, file_prices)?;
        config.prices_file = prices_file;
        Ok(config)
    }

    /// Parses and validates config text (a `prices_file` it names is not read).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::from_raw(Self::parse_toml(text, "")?)
    }

    /// TOML text into a serde type, every error naming the key path (after `prefix`).
    fn parse_toml<T: serde::de::DeserializeOwned>(
        text: &str,
        prefix: &str,
    ) -> Result<T, ConfigError> {
        let with = |e: ConfigError| ConfigError::new(format!("{prefix}{}", e.path), e.message);
        let de = toml::Deserializer::parse(text)
            .map_err(|e| with(Self::toml_error("(file)", text, &e)))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            with(Self::toml_error(&path, text, e.inner()))
        })
    }

    fn toml_error(path: &str, text: &str, e: &toml::de::Error) -> ConfigError {
        let message = match e.span() {
            Some(span) => format!(
                "{} (line {})",
                e.message().trim(),
                line_of(text, span.start)
            ),
            None => e.message().trim().to_string(),
        };
        let path = if path == "." || path.is_empty() {
            "(file)"
        } else {
            path
        };
        ConfigError::new(path, redact_values(path, &message))
    }

    /// Validates raw config into a typed one.
    pub fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        Self::from_raw_with(raw, BTreeMap::new())
    }

    /// [`Config::from_raw`] with the prices of a prices file, which the config's own `[prices]`
    /// override.
    fn from_raw_with(
        raw: RawConfig,
        file_prices: BTreeMap<String, raw::RawPrice>,
    ) -> Result<Config, ConfigError> {
        let listen_text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            ConfigError::new(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8787"),
            )
        })?;

        let region = raw.aws.region.unwrap_or_else(|| "us-east-1".to_string());
        if !crate::arn::is_region(&region) {
            return Err(ConfigError::new(
                "aws.region",
                format!("`{region}` is not a region"),
            ));
        }
        let aws = AwsSettings {
            region,
            runtime_endpoint: EndpointTemplate::parse(
                "aws.runtime_endpoint",
                raw.aws
                    .runtime_endpoint
                    .as_deref()
                    .unwrap_or(DEFAULT_RUNTIME_ENDPOINT),
            )?,
            control_endpoint: EndpointTemplate::parse(
                "aws.control_endpoint",
                raw.aws
                    .control_endpoint
                    .as_deref()
                    .unwrap_or(DEFAULT_CONTROL_ENDPOINT),
            )?,
            cost_explorer_endpoint: optional_endpoint(
                "aws.cost_explorer_endpoint",
                raw.aws.cost_explorer_endpoint.as_deref(),
            )?,
            pricing_endpoint: optional_endpoint(
                "aws.pricing_endpoint",
                raw.aws.pricing_endpoint.as_deref(),
            )?,
            sts_endpoint: optional_endpoint("aws.sts_endpoint", raw.aws.sts_endpoint.as_deref())?,
            service_quotas_endpoint: optional_endpoint(
                "aws.service_quotas_endpoint",
                raw.aws.service_quotas_endpoint.as_deref(),
            )?,
            profile: raw.aws.profile,
            user_role_arn: match raw.aws.user_role_arn {
                None => None,
                Some(arn) if is_role_arn(&arn) => Some(arn),
                Some(arn) => {
                    return Err(ConfigError::new(
                        "aws.user_role_arn",
                        format!(
                            "`{arn}` is not an IAM role ARN like arn:aws:iam::123456789012:role/bedrock-gate-users"
                        ),
                    ));
                }
            },
        };

        let max_body = raw.limits.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body == 0 || max_body > MAX_MAX_BODY_BYTES {
            return Err(ConfigError::new(
                "limits.max_body_bytes",
                format!("must be between 1 and {MAX_MAX_BODY_BYTES}"),
            ));
        }
        let max_inflight = raw
            .limits
            .max_inflight_body_bytes
            .unwrap_or(DEFAULT_MAX_INFLIGHT_BODY_BYTES.max(max_body));
        if max_inflight < max_body {
            return Err(ConfigError::new(
                "limits.max_inflight_body_bytes",
                format!(
                    "must be at least limits.max_body_bytes ({max_body}), or no body of that size could be read"
                ),
            ));
        }
        let secs = |path: &str, v: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(ConfigError::new(path, "must be at least 1 second")),
                n if n > 24 * 3600 => Err(ConfigError::new(path, "must be at most 86400 seconds")),
                n => Ok(Duration::from_secs(n)),
            }
        };
        let timeouts = Timeouts {
            connect: secs("timeouts.connect_secs", raw.timeouts.connect_secs, 10)?,
            first_byte: secs(
                "timeouts.first_byte_secs",
                raw.timeouts.first_byte_secs,
                900,
            )?,
            request_body: secs(
                "timeouts.request_body_secs",
                raw.timeouts.request_body_secs,
                120,
            )?,
            stream_idle: secs(
                "timeouts.stream_idle_secs",
                raw.timeouts.stream_idle_secs,
                300,
            )?,
            request_header: secs(
                "timeouts.request_header_secs",
                raw.timeouts.request_header_secs,
                60,
            )?,
            stream_ping: secs(
                "timeouts.stream_ping_secs",
                raw.timeouts.stream_ping_secs,
                10,
            )?,
            client_write: secs(
                "timeouts.client_write_secs",
                raw.timeouts.client_write_secs,
                60,
            )?,
        };

        let admin_text = raw.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN);
        let admin_listen = if admin_text.is_empty() {
            None
        } else {
            Some(admin_text.parse().map_err(|_| {
                ConfigError::new(
                    "admin_listen",
                    format!(
                        "`{admin_text}` is not an address like 127.0.0.1:9464 (\"\" turns it off)"
                    ),
                )
            })?)
        };
        let tls = match (raw.tls_cert, raw.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) if !cert.is_empty() && !key.is_empty() => {
                Some(crate::tls::TlsSettings::new(cert, key))
            }
            (Some(_), _) => {
                return Err(ConfigError::new(
                    "tls_key",
                    "set both tls_cert and tls_key (PEM files), or neither",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "tls_cert",
                    "set both tls_cert and tls_key (PEM files), or neither",
                ));
            }
        };
        let ledger_path = raw
            .ledger
            .path
            .unwrap_or_else(|| DEFAULT_LEDGER_PATH.to_string());
        if ledger_path.is_empty() {
            return Err(ConfigError::new("ledger.path", "must not be empty"));
        }
        let synchronous = match raw.ledger.synchronous.as_deref() {
            None => Synchronous::default(),
            Some(s) => Synchronous::parse(s).ok_or_else(|| {
                ConfigError::new("ledger.synchronous", "must be \"full\" or \"normal\"")
            })?,
        };
        let ledger = LedgerSettings {
            path: ledger_path,
            synchronous,
            flush_interval_ignored: raw.ledger.flush_interval_ms.is_some(),
        };
        let mut overrides = Vec::new();
        for (model, price) in file_prices {
            if !raw.prices.contains_key(&model) {
                let path = format!("prices_file: prices.\"{model}\"");
                overrides.push((model, price_entry(&path, &price)?));
            }
        }
        for (model, price) in &raw.prices {
            let path = format!("prices.\"{model}\"");
            overrides.push((model.clone(), price_entry(&path, price)?));
        }
        let prices = Prices::with_overrides(overrides);
        let provisioning = Self::provisioning(raw.provisioning)?;
        let users = Self::users(raw.users, provisioning.source)?;
        let project_tag = raw
            .attribution
            .project_tag
            .unwrap_or_else(|| "project".to_string());
        if project_tag.is_empty()
            || project_tag.len() > 128
            || project_tag.chars().any(char::is_control)
        {
            return Err(ConfigError::new(
                "attribution.project_tag",
                "1 to 128 characters, no control characters",
            ));
        }
        let attribution = Attribution { project_tag };
        let public_url = signin::public_url(raw.public_url.as_deref())?;
        let signin = signin::sign_in(raw.oidc, public_url.as_deref(), user_limits)?;
        let mut settings = signin::SettingsPolicy {
            everyone: raw
                .managed_settings
                .as_ref()
                .map(|t| signin::settings_json("managed_settings", t))
                .transpose()?,
            groups: BTreeMap::new(),
        };
        for (group, table) in &raw.group_settings {
            let path = format!("group_settings.{group}");
            settings
                .groups
                .insert(group.clone(), signin::settings_json(&path, table)?);
        }
        let telemetry = signin::telemetry(raw.telemetry)?;
        let store = raw.store.map(store_settings).transpose()?;
        let admin = Admin {
            token: raw
                .admin
                .token_sha256
                .as_deref()
                .map(|t| {
                    KeyHash::from_config(t).map_err(|m| ConfigError::new("admin.token_sha256", m))
                })
                .transpose()?,
            emails: raw
                .admin
                .emails
                .iter()
                .map(|e| signin::normalize_email("admin.emails", e))
                .collect::<Result<_, _>>()?,
            groups: raw.admin.groups,
            public_url: signin::admin_url(raw.admin.public_url.as_deref())?,
        };
        if admin.sso() {
            match &signin {
                None => {
                    return Err(ConfigError::new(
                        if admin.groups.is_empty() {
                            "admin.emails"
                        } else {
                            "admin.groups"
                        },
                        "admins sign in through the IdP: configure [oidc] too",
                    ));
                }
                Some(s) if !admin.groups.is_empty() && s.groups_claim.is_none() => {
                    return Err(ConfigError::new(
                        "admin.groups",
                        "the IdP's groups are read from oidc.groups_claim; set it",
                    ));
                }
                Some(_) => {}
            }
        }
        let auth = Auth {
            master_key_file: raw.auth.sigv4_master_key_file,
            master_key: None,
        };
        if auth.master_key_file.as_deref().is_some_and(str::is_empty) {
            return Err(ConfigError::new(
                "auth.sigv4_master_key_file",
                "empty; name the file, or leave the key out",
            ));
        }
        // A budget can only stop what it can price: every model such a user may call needs one.
        for user in users.iter() {
            if user.limits.monthly_budget_usd.is_none() {
                continue;
            }
            if let Some(model) = user
                .models
                .keys()
                .chain(user.pending.iter())
                .find(|m| !prices.has(m))
            {
                return Err(ConfigError::new(
                    format!("users.{}.limits.monthly_budget_usd", user.name),
                    format!(
                        "user `{}` may call `{model}`, which has no price, so the budget could not count it; \
                         add [prices.\"{}\"]",
                        user.name,
                        crate::arn::strip_geo_prefix(model)
                    ),
                ));
            }
        }
        Ok(Config {
            listen,
            admin_listen,
            tls,
            ledger,
            prices,
            aws,
            max_body_bytes: usize::try_from(max_body).unwrap_or(usize::MAX),
            max_inflight_body_bytes: max_inflight,
            timeouts,
            provisioning,
            attribution,
            users,
            public_url,
            signin,
            settings,
            telemetry,
            auth,
            admin,
            store,
            prices_file: raw.prices_file.map(|name| (name, String::new())),
        })
    }

    fn provisioning(raw: raw::RawProvisioning) -> Result<Provisioning, ConfigError> {
        let tag_key = raw.tag_key.unwrap_or_else(|| "BedrockUser".to_string());
        check_tags(
            "provisioning.tag_key",
            &BTreeMap::from([(tag_key.clone(), String::new())]),
        )
        .map_err(|e| ConfigError::new("provisioning.tag_key", e.message))?;
        let name_prefix = raw.name_prefix.unwrap_or_else(|| "bg".to_string());
        if name_prefix.is_empty()
            || name_prefix.len() > 20
            || !name_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || !name_prefix.as_bytes()[0].is_ascii_alphanumeric()
        {
            return Err(ConfigError::new(
                "provisioning.name_prefix",
                "1 to 20 letters, digits or `-`, starting with a letter or digit",
            ));
        }
        let source = match raw.source.as_deref().unwrap_or("cross-region") {
            "cross-region" => ProfileSource::CrossRegion,
            "global" => ProfileSource::Global,
            "foundation-model" => ProfileSource::FoundationModel,
            other => {
                return Err(ConfigError::new(
                    "provisioning.source",
                    format!(
                        "`{other}`: expected \"cross-region\", \"global\" or \"foundation-model\""
                    ),
                ));
            }
        };
        check_tags("provisioning.tags", &raw.tags)?;
        if raw.tags.contains_key(&tag_key) {
            return Err(ConfigError::new(
                format!("provisioning.tags.{tag_key}"),
                "this is the per-user tag key (provisioning.tag_key); its value is always the user name",
            ));
        }
        Ok(Provisioning {
            tag_key,
            name_prefix,
            source,
            tags: raw.tags,
            activate_extra_tags: raw.activate_extra_tags.unwrap_or(false),
        })
    }

    fn users(
        raw: BTreeMap<String, raw::RawUser>,
        source: ProfileSource,
    ) -> Result<Users, ConfigError> {
        let mut users = Users::default();
        let mut key_owner: HashMap<KeyHash, String> = HashMap::new();
        let mut access_key_owner: HashMap<String, String> = HashMap::new();
        let mut identity_owner: HashMap<String, String> = HashMap::new();
        for (name, user) in raw {
            let base = format!("users.{name}");
            if !is_user_name(&name) {
                return Err(ConfigError::new(
                    &base,
                    "user names use letters, digits, `-`, `_`, `.` and `@` (at most 64)",
                ));
            }
            let keys = user.keys;
            let access_key_ids = user.access_key_ids;
            check_tags(&format!("{base}.tags"), &user.tags)?;
            let limits = user_limits(&format!("{base}.limits"), &user.limits)?;
            let mut emails = Vec::new();
            for (i, e) in user.emails.iter().enumerate() {
                let path = format!("{base}.emails[{i}]");
                let e = signin::normalize_email(&path, e)?;
                if let Some(other) = identity_owner.insert(format!("email:{e}"), name.clone()) {
                    return Err(ConfigError::new(
                        &path,
                        format!(
                            "`{e}` is also listed for user `{other}`; a signed-in identity must be one user"
                        ),
                    ));
                }
                emails.push(e);
            }
            let mut subjects = Vec::new();
            for (i, sub) in user.subjects.iter().enumerate() {
                let path = format!("{base}.subjects[{i}]");
                if sub.is_empty() || sub.len() > 255 || sub.chars().any(char::is_control) {
                    return Err(ConfigError::new(
                        &path,
                        "an IdP subject has 1 to 255 characters",
                    ));
                }
                if let Some(other) = identity_owner.insert(format!("sub:{sub}"), name.clone()) {
                    return Err(ConfigError::new(
                        &path,
                        format!(
                            "this subject is also listed for user `{other}`; a signed-in identity must be one user"
                        ),
                    ));
                }
                subjects.push(sub.clone());
            }
            let managed_settings = user
                .managed_settings
                .as_ref()
                .map(|t| signin::settings_json(&format!("{base}.managed_settings"), t))
                .transpose()?;
            let mut models = BTreeMap::new();
            let mut pending = Vec::new();
            for (model, value) in user.models {
                let path = format!("{base}.models.\"{model}\"");
                match ModelRef::parse(&model) {
                    Ok(ModelRef::Id(_)) => {}
                    Ok(ModelRef::Arn(_)) | Err(_) => {
                        return Err(ConfigError::new(
                            &path,
                            "the key must be a model id such as anthropic.claude-sonnet-4-5-20250929-v1:0",
                        ));
                    }
                }
                if value == AUTO {
                    pending.push(model);
                    continue;
                }
                let parsed = BedrockArn::parse(&value).map_err(|e| {
                    ConfigError::new(&path, format!("`{value}` is not a profile ARN: {e}"))
                })?;
                if parsed.kind != ResourceKind::ApplicationInferenceProfile {
                    return Err(ConfigError::new(
                        &path,
                        format!(
                            "`{value}` is not an application inference profile ARN (…:application-inference-profile/ID)"
                        ),
                    ));
                }
                if let Some(other) = users.owners.get(&value)
                    && other != &name
                {
                    return Err(ConfigError::new(
                        &path,
                        format!(
                            "profile `{value}` is also mapped for user `{other}`; one profile per user keeps their costs apart"
                        ),
                    ));
                }
                users.owners.insert(value.clone(), name.clone());
                let tier = if model.starts_with("global.") || source == ProfileSource::Global {
                    Tier::Global
                } else {
                    Tier::Regional
                };
                models.insert(
                    model.clone(),
                    Arc::new(Profile {
                        arn: value,
                        parsed,
                        model,
                        tier,
                    }),
                );
            }
            let mut allow = crate::premium::Allowed::new();
            for (i, feature) in user.allow_headers.iter().enumerate() {
                let known = crate::premium::Feature::ALL.map(|f| format!("\"{}\"", f.name()));
                let f = crate::premium::Feature::parse(feature).ok_or_else(|| {
                    ConfigError::new(
                        format!("{base}.allow_headers[{i}]"),
                        format!(
                            "`{feature}` is not a billing option; use {}",
                            known.join(", ")
                        ),
                    )
                })?;
                allow.insert(f);
            }
            let user = Arc::new(User {
                name: name.clone(),
                models,
                pending,
                tags: user.tags,
                limits,
                emails,
                subjects,
                managed_settings,
                allow,
            });
            users.by_name.insert(name.clone(), Arc::clone(&user));
            for e in &user.emails {
                users.by_email.insert(e.clone(), Arc::clone(&user));
            }
            for sub in &user.subjects {
                users.by_subject.insert(sub.clone(), Arc::clone(&user));
            }
            for (i, key) in keys.iter().enumerate() {
                let path = format!("{base}.keys[{i}]");
                let hash = KeyHash::from_config(key).map_err(|e| ConfigError::new(&path, e))?;
                if let Some(other) = key_owner.get(&hash) {
                    return Err(ConfigError::new(
                        &path,
                        format!(
                            "this key hash is also listed for user `{other}`; a key must identify one user"
                        ),
                    ));
                }
                key_owner.insert(hash.clone(), name.clone());
                users.by_key.insert(hash, Arc::clone(&user));
            }
            for (i, id) in access_key_ids.iter().enumerate() {
                let path = format!("{base}.access_key_ids[{i}]");
                if !crate::auth::is_access_key_id(id) {
                    return Err(ConfigError::new(
                        &path,
                        "not an access key id this proxy issues (`BGAK` and 16 characters A-Z, 2-7); \
                         run `bedrock-gate keys add NAME --sigv4`",
                    ));
                }
                if let Some(other) = access_key_owner.insert(id.clone(), name.clone()) {
                    return Err(ConfigError::new(
                        &path,
                        format!(
                            "this access key id is also listed for user `{other}`; a key must identify one user"
                        ),
                    ));
                }
                users.by_access_key.insert(id.clone(), Arc::clone(&user));
            }
            users.all.push(user);
        }
        Ok(users)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123";

    fn key(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn err(text: &str) -> ConfigError {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn admins_by_group_or_email_need_the_idp_and_its_groups() {
        let e = err("[admin]\ngroups = [\"platform\"]").to_string();
        assert!(e.contains("admin.groups") && e.contains("[oidc]"), "{e}");
        let e = err("[admin]\nemails = [\"not an email\"]").to_string();
        assert!(e.contains("admin.emails"), "{e}");
        let e = err("[admin]\ntoken_sha256 = \"abc\"").to_string();
        assert!(e.contains("admin.token_sha256"), "{e}");
        let e = err(
            "public_url = \"http://127.0.0.1:8787\"\n[oidc]\nissuer = \"https://idp.example\"\n\
             client_id = \"c\"\n[admin]\ngroups = [\"platform\"]",
        )
        .to_string();
        assert!(e.contains("groups_claim"), "{e}");
        let c = Config::parse(
            "public_url = \"http://127.0.0.1:8787\"\n[oidc]\nissuer = \"https://idp.example\"\n\
             client_id = \"c\"\ngroups_claim = \"groups\"\n[admin]\ngroups = [\"platform\"]\n\
             emails = [\"Erin@Corp.Example\"]",
        )
        .unwrap();
        assert!(c.admin.admits(Some("erin@corp.example"), &[]));
        assert!(c.admin.admits(None, &["platform".to_string()]));
        assert!(
            !c.admin
                .admits(Some("dave@corp.example"), &["dev".to_string()])
        );
    }

    #[test]
    fn example_config_is_valid() {
        let c = Config::parse(include_str!("../../config/bedrock-gate.example.toml")).unwrap();
        assert!(!c.users.is_empty());
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.aws.region, "us-east-1");
        assert_eq!(c.max_body_bytes, 20 * 1024 * 1024);
        assert_eq!(
            c.aws.runtime_endpoint.for_region("eu-west-1"),
            "https://bedrock-runtime.eu-west-1.amazonaws.com"
        );
        assert_eq!(
            c.aws.control_endpoint.for_region("us-west-2"),
            "https://bedrock.us-west-2.amazonaws.com"
        );
    }

    #[test]
    fn ledger_sync_level_and_the_retired_flush_interval() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.ledger.synchronous, Synchronous::Normal);
        assert!(!c.ledger.flush_interval_ignored);
        let c =
            Config::parse("[ledger]\nsynchronous = \"full\"\nflush_interval_ms = 1000").unwrap();
        assert_eq!(c.ledger.synchronous, Synchronous::Full);
        assert!(c.ledger.flush_interval_ignored, "an old config still loads");
        let e = err("[ledger]\nsynchronous = \"off\"");
        assert_eq!(e.path, "ledger.synchronous");
    }

    #[test]
    fn a_key_written_as_a_string_is_never_echoed() {
        for text in [
            "[users.a]\nkeys = \"bgk_secret_value_1\"",
            "[users.a]\nkeys = { k = \"bgk_secret_value_1\" }",
            "[users.a]\nkeys = [[\"bgk_secret_value_1\"]]",
            "[users.a]\ntags = \"bgk_secret_value_1\"",
            "[telemetry]\nheaders = \"collector-secret-1\"",
        ] {
            let e = err(text);
            let shown = e.to_string();
            assert!(
                !shown.contains("secret_value_1") && !shown.contains("collector-secret-1"),
                "{shown}"
            );
            assert!(
                shown.contains("invalid type"),
                "still says what is wrong: {shown}"
            );
        }
        // Values elsewhere are still quoted: they help and are not secret.
        assert!(err("listen = \"nowhere\"").to_string().contains("nowhere"));
    }

    #[test]
    fn misspelt_keys_name_their_path() {
        let e = err("lisen = \"127.0.0.1:1\"");
        assert!(e.message.contains("lisen"), "{e}");
        let e = err("[aws]\nregoin = \"us-east-1\"");
        assert_eq!(e.path, "aws.regoin");
        assert!(
            e.message.contains("regoin") && e.message.contains("line 2"),
            "{e}"
        );
        let e = err(&format!("[users.alice]\nkeyz = [\"{}\"]", key('a')));
        assert_eq!(e.path, "users.alice.keyz");
        let e = err("[limits]\nmax_body_bytes = \"big\"");
        assert_eq!(e.path, "limits.max_body_bytes");
    }

    #[test]
    fn malformed_arn_and_hash_are_rejected_with_path() {
        let e = err(
            "[users.alice.models]\n\"anthropic.claude-x\" = \"arn:aws:bedrock:us-east-1:1:application-inference-profile/x\"",
        );
        assert_eq!(e.path, "users.alice.models.\"anthropic.claude-x\"");
        let e = err(
            "[users.alice.models]\n\"anthropic.claude-x\" = \"arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-x\"",
        );
        assert!(e.message.contains("application inference profile"), "{e}");
        let e = err("[users.alice]\nkeys = [\"plain-text-key\"]");
        assert_eq!(e.path, "users.alice.keys[0]");
    }

    #[test]
    fn a_key_or_profile_in_two_users_is_rejected() {
        let e = err(&format!(
            "[users.alice]\nkeys = [\"{k}\"]\n[users.bob]\nkeys = [\"{k}\"]",
            k = key('a')
        ));
        assert_eq!(e.path, "users.bob.keys[0]");
        assert!(e.message.contains("alice"), "{e}");
        let e = err(&format!(
            "[users.alice.models]\n\"anthropic.a\" = \"{ARN}\"\n[users.bob.models]\n\"anthropic.b\" = \"{ARN}\""
        ));
        assert_eq!(e.path, "users.bob.models.\"anthropic.b\"");
        assert!(e.message.contains("alice"), "{e}");
    }

    #[test]
    fn a_budget_needs_every_mapped_model_priced() {
        let unpriced = format!(
            "[users.a.limits]\nmonthly_budget_usd = 5\n[users.a.models]\n\"anthropic.claude-fable-5\" = \"{ARN}\""
        );
        let e = err(&unpriced);
        assert_eq!(e.path, "users.a.limits.monthly_budget_usd");
        assert!(e.message.contains("anthropic.claude-fable-5"), "{e}");
        let priced = format!(
            "{unpriced}\n[prices.\"anthropic.claude-fable-5\"]\ninput_per_mtok = 1\noutput_per_mtok = 2\ncache_read_per_mtok = 0.1\ncache_write_per_mtok = 1.25\n"
        );
        Config::parse(&priced).unwrap();
        let partial = "[prices.\"x.y\"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n";
        assert!(
            err(partial).message.contains("cache_read_per_mtok"),
            "{}",
            err(partial)
        );
    }

    #[test]
    fn a_prices_file_is_below_the_configs_own_prices_and_names_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("prices.toml"),
            "[prices.\"acme.a\"]\ninput_per_mtok = 1\noutput_per_mtok = 2\ncache_read_per_mtok = 0\ncache_write_per_mtok = 0\n\
             [prices.\"acme.a\".global]\ninput_per_mtok = 0.5\noutput_per_mtok = 1\ncache_read_per_mtok = 0\ncache_write_per_mtok = 0\n\
             [prices.\"acme.b\"]\ninput_per_mtok = 1\noutput_per_mtok = 2\ncache_read_per_mtok = 0\ncache_write_per_mtok = 0\n",
        )
        .unwrap();
        let path = dir.path().join("c.toml");
        let text = "prices_file = \"prices.toml\"\n[prices.\"acme.b\"]\ninput_per_mtok = 7\noutput_per_mtok = 7\ncache_read_per_mtok = 7\ncache_write_per_mtok = 7\n";
        let c = Config::parse_at(text, &path).unwrap();
        let rate = |m: &str, t| c.prices.get(m, "us-east-1", t).unwrap().input_per_mtok;
        assert_eq!(rate("acme.a", Tier::Regional), 1.0);
        assert_eq!(rate("acme.a", Tier::Global), 0.5);
        assert_eq!(rate("acme.b", Tier::Regional), 7.0, "the config's own wins");
        assert!(
            c.prices_file
                .as_ref()
                .is_some_and(|(n, sha)| n == "prices.toml" && sha.len() == 64)
        );
        std::fs::write(
            dir.path().join("prices.toml"),
            "[prices.\"x\"]\ninput_per_mtok = -1\n",
        )
        .unwrap();
        let e = Config::parse_at(text, &path).unwrap_err();
        assert!(e.path.starts_with("prices_file"), "{e}");
        std::fs::remove_file(dir.path().join("prices.toml")).unwrap();
        let e = Config::parse_at(text, &path).unwrap_err();
        assert!(e.message.contains("prices sync"), "{e}");
    }

    #[test]
    fn how_a_profile_was_made_picks_its_rate() {
        let text = |source: &str| {
            format!(
                "[provisioning]\nsource = \"{source}\"\n[users.a.models]\n\"global.anthropic.x\" = \"{ARN}\"\n\"anthropic.y\" = \"{}\"\n",
                ARN.replace("abc123", "def456")
            )
        };
        let tiers = |c: &Config| -> Vec<Tier> {
            c.users
                .iter()
                .next()
                .unwrap()
                .models
                .values()
                .map(|p| p.tier)
                .collect()
        };
        let c = Config::parse(&text("cross-region")).unwrap();
        // In key order: anthropic.y, global.anthropic.x.
        assert_eq!(
            tiers(&c),
            [Tier::Regional, Tier::Global],
            "global. keys pay Global"
        );
        let c = Config::parse(&text("global")).unwrap();
        assert_eq!(tiers(&c), [Tier::Global, Tier::Global]);
    }

    #[test]
    fn the_user_role_must_be_an_iam_role_arn() {
        Config::parse(
            "[aws]\nuser_role_arn = \"arn:aws:iam::123456789012:role/bedrock-gate-users\"",
        )
        .unwrap();
        Config::parse("[aws]\nuser_role_arn = \"arn:aws:iam::123456789012:role/path/to/r\"")
            .unwrap();
        for bad in [
            "arn:aws:iam::123456789012:user/bob",
            "arn:aws:iam::12345:role/r",
            "arn:aws:sts::123456789012:role/r",
            "role/r",
        ] {
            assert_eq!(
                err(&format!("[aws]\nuser_role_arn = \"{bad}\"")).path,
                "aws.user_role_arn",
                "{bad}"
            );
        }
        assert_eq!(
            err("[aws]\nsts_endpoint = \"ftp://x\"").path,
            "aws.sts_endpoint"
        );
    }

    #[test]
    fn endpoints_limits_and_listen_are_checked() {
        assert_eq!(err("listen = \"localhost\"").path, "listen");
        assert_eq!(
            err("[aws]\nruntime_endpoint = \"ftp://x\"").path,
            "aws.runtime_endpoint"
        );
        assert_eq!(
            err("[aws]\ncontrol_endpoint = \"https://x/path\"").path,
            "aws.control_endpoint"
        );
        assert_eq!(err("[aws]\nregion = \"US EAST\"").path, "aws.region");
        assert_eq!(
            err("[limits]\nmax_body_bytes = 0").path,
            "limits.max_body_bytes"
        );
        assert_eq!(
            err("[limits]\nmax_body_bytes = 2048\nmax_inflight_body_bytes = 1024").path,
            "limits.max_inflight_body_bytes"
        );
        assert_eq!(
            err("[users.a]\nallow_headers = [\"priority\"]").path,
            "users.a.allow_headers[0]"
        );
        let big = Config::parse("[limits]\nmax_body_bytes = 268435456").unwrap();
        assert_eq!(big.max_inflight_body_bytes, 268435456);
        assert_eq!(
            err("[timeouts]\nconnect_secs = 0").path,
            "timeouts.connect_secs"
        );
        assert_eq!(err("[users.\"a b\"]").path, "users.a b");
        let c = Config::parse("[aws]\nruntime_endpoint = \"http://127.0.0.1:9/\"").unwrap();
        assert_eq!(c.aws.runtime_endpoint.for_region("x"), "http://127.0.0.1:9");
    }
}
