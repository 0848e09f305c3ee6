//! The config file as written: serde types that mirror the TOML one to one.
//!
//! Every table denies unknown fields so a misspelt key is an error, never a silent default.
//! Nothing here is validated; [`super::Config::from_raw`] does that.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    /// PEM certificate chain; with `tls_key`, the listener speaks HTTPS.
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    /// The URL developers type into Claude Code's `/login` (https; http only on loopback).
    pub public_url: Option<String>,
    /// SSO sign-in through the company's OpenID Connect IdP.
    pub oidc: Option<RawOidc>,
    /// Claude Code managed settings served to every signed-in user (`GET /managed/settings`).
    pub managed_settings: Option<toml::Table>,
    /// Managed settings per IdP group, over `[managed_settings]`.
    #[serde(default)]
    pub group_settings: BTreeMap<String, toml::Table>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    #[serde(default)]
    pub auth: RawAuth,
    /// `[admin]`: who may open the dashboard on `admin_listen`.
    #[serde(default)]
    pub admin: RawAdmin,
    /// `[store]`: PostgreSQL for the ledger instead of the SQLite file.
    pub store: Option<RawStore>,
    #[serde(default)]
    pub aws: RawAws,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub provisioning: RawProvisioning,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default)]
    pub attribution: RawAttribution,
    #[serde(default)]
    pub prices: BTreeMap<String, RawPrice>,
    /// A file of `[prices."MODEL"]` tables (what `prices sync` writes), below `[prices]`.
    pub prices_file: Option<String>,
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
}

/// The prices file: only `[prices."MODEL"]` tables.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricesFile {
    #[serde(default)]
    pub prices: BTreeMap<String, RawPrice>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub url: Option<String>,
    /// File holding the database password (relative to the config).
    pub password_file: Option<String>,
    /// PEM roots to trust for the database server's certificate.
    pub ca_file: Option<String>,
    /// `"open"` or `"closed"`: admission while the store cannot be reached.
    pub on_unavailable: Option<String>,
    /// This replica's stable name in the rows it writes.
    pub replica: Option<String>,
    /// Where rows wait while the store is away (relative to the config).
    pub spool_path: Option<String>,
    /// Seconds a replica may go unseen before the others record its calls in flight.
    pub replica_gone_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// File holding the master key issued SigV4 secrets derive from (relative to the config).
    pub sigv4_master_key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `sha256:<hex>` of the admin token (`Authorization: Bearer`, or the dashboard's sign-in
    /// form).
    pub token_sha256: Option<String>,
    /// IdP groups whose members are admins (signing in through `[oidc]`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Emails of admins (signing in through `[oidc]`).
    #[serde(default)]
    pub emails: Vec<String>,
    /// The URL admins open the dashboard at, when it is not `http://` + the bound address.
    pub public_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvisioning {
    pub tag_key: Option<String>,
    pub name_prefix: Option<String>,
    pub source: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Also activate the keys of `tags` as cost allocation tags.
    pub activate_extra_tags: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: Option<String>,
    pub runtime_endpoint: Option<String>,
    pub control_endpoint: Option<String>,
    pub cost_explorer_endpoint: Option<String>,
    pub pricing_endpoint: Option<String>,
    pub sts_endpoint: Option<String>,
    pub service_quotas_endpoint: Option<String>,
    pub profile: Option<String>,
    /// The role each user's calls are signed with (a session per user).
    pub user_role_arn: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_body_bytes: Option<u64>,
    /// Request body bytes held at once across all requests.
    pub max_inflight_body_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect_secs: Option<u64>,
    pub first_byte_secs: Option<u64>,
    pub request_body_secs: Option<u64>,
    pub stream_idle_secs: Option<u64>,
    pub request_header_secs: Option<u64>,
    pub stream_ping_secs: Option<u64>,
    pub client_write_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAttribution {
    /// The key of a Messages body's `tags` whose value is the call's project.
    pub project_tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    #[serde(default)]
    pub keys: Vec<String>,
    /// Access key ids of the SigV4 key pairs issued to this user (`keys add --sigv4`).
    #[serde(default)]
    pub access_key_ids: Vec<String>,
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// Extra cost-allocation tags on this user's profiles.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: RawUserLimits,
    /// Signed-in identities (the IdP's email claim) that are this user.
    #[serde(default)]
    pub emails: Vec<String>,
    /// Signed-in identities (the IdP's `sub` claim) that are this user.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// This user's managed settings, over the group's and everyone's.
    pub managed_settings: Option<toml::Table>,
    /// Billing options this user may use (`"service-tier"`, `"latency"`, `"guardrail"`).
    #[serde(default)]
    pub allow_headers: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidc {
    pub issuer: Option<String>,
    pub client_id: Option<String>,
    /// File holding the client secret (relative to the config file).
    pub client_secret_file: Option<String>,
    pub email_claim: Option<String>,
    pub groups_claim: Option<String>,
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    pub scopes: Option<Vec<String>>,
    pub session_ttl_secs: Option<u64>,
    pub refresh_ttl_days: Option<u64>,
    pub sign_ins_per_ip_per_minute: Option<u32>,
    /// Longest wait for any one call to the IdP.
    pub timeout_secs: Option<u64>,
    pub auto_users: Option<RawAutoUsers>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAutoUsers {
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: RawUserLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    /// OTLP/HTTP collector base URL; Claude Code's telemetry is forwarded to `{it}/v1/{signal}`.
    pub otlp_endpoint: Option<String>,
    /// Headers the proxy sends to the collector (its own, never the developer's).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUserLimits {
    pub monthly_budget_usd: Option<f64>,
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    pub path: Option<String>,
    /// No longer used (each row is committed before its answer ends); still accepted so
    /// configs that set it load, and a start-up warning says it has no effect.
    pub flush_interval_ms: Option<u64>,
    pub synchronous: Option<String>,
}

/// One model's price: the regional rate, optionally the Global rate (`.global`) and rates of
/// regions that differ (`.regions."eu-central-1"`, each with its own `.global`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_read_per_mtok: f64,
    pub cache_write_per_mtok: f64,
    pub global: Option<RawRate>,
    #[serde(default)]
    pub regions: BTreeMap<String, RawRegionalPrice>,
    /// The rate of calls on the priority service tier.
    pub priority: Option<RawRate>,
    /// The rate of calls on the flex service tier.
    pub flex: Option<RawRate>,
    /// The rate of latency-optimized calls.
    pub latency_optimized: Option<RawRate>,
}

/// Four rates, USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_read_per_mtok: f64,
    pub cache_write_per_mtok: f64,
}

/// A region's own rates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegionalPrice {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_read_per_mtok: f64,
    pub cache_write_per_mtok: f64,
    pub global: Option<RawRate>,
}
