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
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvisioning {
    pub tag_key: Option<String>,
    pub name_prefix: Option<String>,
    pub source: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: Option<String>,
    pub runtime_endpoint: Option<String>,
    pub control_endpoint: Option<String>,
    pub profile: Option<String>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_read_per_mtok: f64,
    pub cache_write_per_mtok: f64,
}
