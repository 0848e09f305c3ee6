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
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// Extra cost-allocation tags on this user's profiles.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: RawUserLimits,
}

#[derive(Debug, Default, Deserialize)]
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
    pub flush_interval_ms: Option<u64>,
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
