//! The sign-in settings, validated: `public_url`, `[oidc]` (with `[oidc.auto_users]`), the
//! managed settings served to signed-in Claude Code sessions, and `[telemetry]`.
//!
//! Reads the OIDC client secret (from `client_secret_file` or `BEDROCK_GATE_OIDC_CLIENT_SECRET`)
//! when the config is loaded; the secret is never printed (`Debug` shows `*****`) and never
//! part of a [`ConfigError`]. Nothing here touches the network.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::raw::{RawAutoUsers, RawOidc, RawTelemetry};
use super::{ConfigError, UserLimits};

/// Where the client secret comes from when the file names none.
pub const CLIENT_SECRET_ENV: &str = "BEDROCK_GATE_OIDC_CLIENT_SECRET";

/// A secret from a file or the environment. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(*****)")
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// `[oidc]`: who may sign in, and how bearer sessions live.
#[derive(Debug, Clone)]
pub struct SignIn {
    /// `public_url` without a trailing slash: the origin of every sign-in URL.
    pub public_url: String,
    /// The IdP's issuer; discovery is at `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// Read by [`SignIn::load_secret`] when the file is loaded (`None` until then).
    pub client_secret: Option<Secret>,
    client_secret_file: Option<String>,
    pub email_claim: String,
    pub groups_claim: Option<String>,
    /// Empty: any identity that maps to a user may sign in.
    pub allowed_groups: Vec<String>,
    pub scopes: Vec<String>,
    /// Lifetime of a bearer; a refresh goes back to the IdP.
    pub session_ttl: Duration,
    /// A refresh token unused this long expires.
    pub refresh_ttl: Duration,
    pub sign_ins_per_ip_per_minute: u32,
    /// Longest wait for any one IdP call (discovery, keys, code exchange, refresh).
    pub timeout: Duration,
    pub auto_users: Option<AutoUsers>,
}

/// `[oidc.auto_users]`: what a first sign-in with no user entry gets.
#[derive(Debug, Clone)]
pub struct AutoUsers {
    pub models: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub limits: UserLimits,
}

/// `[telemetry]`: where Claude Code's OTLP export goes after the proxy answered it.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    /// Base URL; signals go to `{otlp_endpoint}/v1/{metrics,logs,traces}`.
    pub otlp_endpoint: Option<String>,
    /// The proxy's own headers to the collector. Values are never logged.
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

/// `[managed_settings]` and `[group_settings.NAME]` (per-user settings live on the user).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettingsPolicy {
    pub everyone: Option<Map<String, Value>>,
    pub groups: BTreeMap<String, Map<String, Value>>,
}

impl SettingsPolicy {
    /// The settings of a user in `groups`: everyone's, then each group's in name order, then
    /// the user's own, merged table by table. `None` when no layer applies (no policy).
    pub fn for_user(
        &self,
        own: Option<&Map<String, Value>>,
        groups: &[String],
    ) -> Option<Map<String, Value>> {
        let layers = self
            .everyone
            .iter()
            .chain(
                self.groups
                    .iter()
                    .filter(|(g, _)| groups.contains(g))
                    .map(|(_, s)| s),
            )
            .chain(own);
        let mut out: Option<Map<String, Value>> = None;
        for layer in layers {
            merge(out.get_or_insert_with(Map::new), layer);
        }
        out
    }
}

/// Tables merge key by key; anything else replaces.
fn merge(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A TOML table of Claude Code settings as JSON.
pub fn settings_json(path: &str, table: &toml::Table) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::to_value(table) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ConfigError::new(
            path,
            "must be a table of Claude Code settings (see code.claude.com/docs/en/settings)",
        )),
    }
}

/// Whether a host is this machine (where plain http is allowed).
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An absolute http(s) URL; https unless the host is loopback. Returns it without a trailing
/// slash. `bare`: no path allowed.
fn url(path: &str, s: &str, bare: bool) -> Result<String, ConfigError> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| ConfigError::new(path, format!("`{s}` is not a URL: {e}")))?;
    let Some(host) = uri.host() else {
        return Err(ConfigError::new(
            path,
            format!("`{s}` must be an absolute URL like https://host:port"),
        ));
    };
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback_host(host) => {}
        Some("http") => {
            return Err(ConfigError::new(
                path,
                format!("`{s}` must use https:// (plain http:// only on loopback)"),
            ));
        }
        _ => {
            return Err(ConfigError::new(
                path,
                format!("`{s}` must start with https://"),
            ));
        }
    }
    if uri.query().is_some() || s.contains('#') {
        return Err(ConfigError::new(
            path,
            format!("`{s}` must have no query or fragment"),
        ));
    }
    if bare && !matches!(uri.path(), "" | "/") {
        return Err(ConfigError::new(
            path,
            format!(
                "`{s}` must be scheme://host[:port] with no path: bedrock-gate serves the sign-in endpoints at the root"
            ),
        ));
    }
    if bare {
        // The origin as browsers send it (`Origin`), in lower case: the scheme decides the
        // cookie's `Secure`, and the same-origin check compares with what browsers send.
        let authority = uri
            .authority()
            .map_or(String::new(), |a| a.as_str().to_ascii_lowercase());
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        return Ok(format!("{scheme}://{authority}"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

/// `public_url`, validated, as an origin in lower case.
pub fn public_url(raw: Option<&str>) -> Result<Option<String>, ConfigError> {
    raw.map(|s| url("public_url", s, true)).transpose()
}

/// `admin.public_url`, validated as `public_url` is (https, or http on loopback).
pub fn admin_url(raw: Option<&str>) -> Result<Option<String>, ConfigError> {
    raw.map(|s| url("admin.public_url", s, true)).transpose()
}

/// `[oidc]`, validated (the secret is read later, by [`SignIn::load_secret`]).
pub fn sign_in(
    raw: Option<RawOidc>,
    public_url: Option<&str>,
    limits: impl Fn(&str, &super::raw::RawUserLimits) -> Result<UserLimits, ConfigError>,
) -> Result<Option<SignIn>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let Some(public_url) = public_url else {
        return Err(ConfigError::new(
            "public_url",
            "[oidc] needs public_url: the https URL developers type into Claude Code's /login",
        ));
    };
    let issuer = match raw.issuer.as_deref() {
        Some(s) => url("oidc.issuer", s, false)?,
        None => {
            return Err(ConfigError::new(
                "oidc.issuer",
                "the IdP's issuer URL is required (discovery is at {issuer}/.well-known/openid-configuration)",
            ));
        }
    };
    let client_id = match raw.client_id {
        Some(id) if !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control) => id,
        _ => {
            return Err(ConfigError::new(
                "oidc.client_id",
                "the client id of bedrock-gate's app registration at the IdP is required",
            ));
        }
    };
    let claim = |path: &str, v: Option<String>, default: Option<&str>| match v {
        Some(c) if c.is_empty() || c.len() > 128 => Err(ConfigError::new(
            path,
            "a claim name has 1 to 128 characters",
        )),
        Some(c) => Ok(Some(c)),
        None => Ok(default.map(str::to_string)),
    };
    let email_claim = claim("oidc.email_claim", raw.email_claim, Some("email"))?
        .unwrap_or_else(|| "email".to_string());
    let groups_claim = claim("oidc.groups_claim", raw.groups_claim, None)?;
    if !raw.allowed_groups.is_empty() && groups_claim.is_none() {
        return Err(ConfigError::new(
            "oidc.allowed_groups",
            "needs oidc.groups_claim: the id_token claim that lists the user's groups",
        ));
    }
    let scopes = raw.scopes.unwrap_or_else(|| {
        ["openid", "email", "profile", "offline_access"]
            .map(String::from)
            .to_vec()
    });
    if !scopes.iter().any(|s| s == "openid")
        || scopes
            .iter()
            .any(|s| s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic() && b != b'"'))
    {
        return Err(ConfigError::new(
            "oidc.scopes",
            "a list of scope names that includes \"openid\"",
        ));
    }
    let session_ttl = match raw.session_ttl_secs.unwrap_or(3600) {
        n @ 60..=86_400 => Duration::from_secs(n),
        _ => {
            return Err(ConfigError::new(
                "oidc.session_ttl_secs",
                "between 60 and 86400 seconds",
            ));
        }
    };
    let refresh_ttl = match raw.refresh_ttl_days.unwrap_or(30) {
        n @ 1..=365 => Duration::from_secs(n * 86_400),
        _ => {
            return Err(ConfigError::new(
                "oidc.refresh_ttl_days",
                "between 1 and 365 days",
            ));
        }
    };
    let sign_ins_per_ip_per_minute = match raw.sign_ins_per_ip_per_minute.unwrap_or(10) {
        0 => {
            return Err(ConfigError::new(
                "oidc.sign_ins_per_ip_per_minute",
                "at least 1",
            ));
        }
        n => n,
    };
    let timeout = match raw.timeout_secs.unwrap_or(10) {
        n @ 1..=60 => Duration::from_secs(n),
        _ => {
            return Err(ConfigError::new(
                "oidc.timeout_secs",
                "between 1 and 60 seconds",
            ));
        }
    };
    let auto_users = raw.auto_users.map(|a| auto_users(a, &limits)).transpose()?;
    Ok(Some(SignIn {
        public_url: public_url.to_string(),
        issuer,
        client_id,
        client_secret: None,
        client_secret_file: raw.client_secret_file,
        email_claim,
        groups_claim,
        allowed_groups: raw.allowed_groups,
        scopes,
        session_ttl,
        refresh_ttl,
        sign_ins_per_ip_per_minute,
        timeout,
        auto_users,
    }))
}

fn auto_users(
    raw: RawAutoUsers,
    limits: impl Fn(&str, &super::raw::RawUserLimits) -> Result<UserLimits, ConfigError>,
) -> Result<AutoUsers, ConfigError> {
    if raw.models.is_empty() {
        return Err(ConfigError::new(
            "oidc.auto_users.models",
            "list the model ids a new user gets a profile for, e.g. [\"anthropic.claude-sonnet-4-5-20250929-v1:0\"]",
        ));
    }
    for (i, m) in raw.models.iter().enumerate() {
        if !matches!(
            crate::arn::ModelRef::parse(m),
            Ok(crate::arn::ModelRef::Id(_))
        ) {
            return Err(ConfigError::new(
                format!("oidc.auto_users.models[{i}]"),
                format!(
                    "`{m}` is not a model id such as anthropic.claude-sonnet-4-5-20250929-v1:0"
                ),
            ));
        }
    }
    super::check_tags("oidc.auto_users.tags", &raw.tags)?;
    Ok(AutoUsers {
        models: raw.models,
        tags: raw.tags,
        limits: limits("oidc.auto_users.limits", &raw.limits)?,
    })
}

impl SignIn {
    /// Reads the client secret: `client_secret_file` (relative to `dir`), else
    /// `BEDROCK_GATE_OIDC_CLIENT_SECRET`.
    pub fn load_secret(&mut self, dir: &Path) -> Result<(), ConfigError> {
        let secret = match &self.client_secret_file {
            Some(name) => {
                let path = dir.join(name);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError::new(
                        "oidc.client_secret_file",
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                text.trim().to_string()
            }
            None => std::env::var(CLIENT_SECRET_ENV).unwrap_or_default(),
        };
        if secret.is_empty() {
            return Err(ConfigError::new(
                "oidc.client_secret_file",
                format!(
                    "no client secret: name a file holding it, or set {CLIENT_SECRET_ENV} (never put it in the config itself)"
                ),
            ));
        }
        self.client_secret = Some(Secret(secret));
        Ok(())
    }

    /// Where the IdP sends the browser back.
    pub fn redirect_uri(&self) -> String {
        format!("{}/oauth/callback", self.public_url)
    }
}

/// `[telemetry]`, validated.
pub fn telemetry(raw: RawTelemetry) -> Result<Telemetry, ConfigError> {
    let otlp_endpoint = raw
        .otlp_endpoint
        .map(|s| {
            let uri: http::Uri = s.parse().map_err(|e| {
                ConfigError::new("telemetry.otlp_endpoint", format!("`{s}` is not a URL: {e}"))
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(ConfigError::new(
                    "telemetry.otlp_endpoint",
                    format!("`{s}` must be an http(s) URL of an OTLP/HTTP collector, like http://collector:4318"),
                ));
            }
            Ok(s.trim_end_matches('/').to_string())
        })
        .transpose()?;
    let mut headers = Vec::new();
    for (k, v) in raw.headers {
        let path = format!("telemetry.headers.{k}");
        let name = http::HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| ConfigError::new(&path, "not a valid header name"))?;
        let mut value = http::HeaderValue::from_str(&v)
            .map_err(|_| ConfigError::new(&path, "not a valid header value"))?;
        value.set_sensitive(true);
        headers.push((name, value));
    }
    Ok(Telemetry {
        otlp_endpoint,
        headers,
    })
}

/// A signed-in email as the config and lookups compare it.
pub fn normalize_email(path: &str, s: &str) -> Result<String, ConfigError> {
    let e = s.trim().to_ascii_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty() && !d.contains('@'))
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(e)
    } else {
        Err(ConfigError::new(
            path,
            format!("`{}` is not an email address", crate::refusal::shown(s)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn settings_merge_everyone_then_groups_then_user() {
        let policy = SettingsPolicy {
            everyone: Some(map(json!({"env": {"A": "1", "B": "1"}, "model": "sonnet"}))),
            groups: BTreeMap::from([
                ("ops".to_string(), map(json!({"env": {"B": "ops"}}))),
                ("x".to_string(), map(json!({"model": "never"}))),
            ]),
        };
        let own = map(json!({"model": "opus"}));
        let s = policy.for_user(Some(&own), &["ops".to_string()]).unwrap();
        assert_eq!(
            Value::Object(s),
            json!({"env": {"A": "1", "B": "ops"}, "model": "opus"})
        );
        assert!(SettingsPolicy::default().for_user(None, &[]).is_none());
        let only_own = SettingsPolicy::default().for_user(Some(&own), &[]).unwrap();
        assert_eq!(Value::Object(only_own), json!({"model": "opus"}));
    }

    #[test]
    fn public_url_is_https_or_loopback() {
        assert_eq!(
            public_url(Some("https://gw.corp.example:8787/")).unwrap(),
            Some("https://gw.corp.example:8787".to_string())
        );
        assert!(public_url(Some("http://127.0.0.1:8787")).is_ok());
        // As a browser's Origin header spells it (found by the signin fuzz target).
        assert_eq!(
            public_url(Some("HTTPS://GW.Corp.Example:8787")).unwrap(),
            Some("https://gw.corp.example:8787".to_string())
        );
        assert!(public_url(Some("http://localhost:8787")).is_ok());
        assert!(public_url(Some("http://[::1]:8787")).is_ok());
        for bad in [
            "http://gw.corp.example",
            "ftp://x",
            "gw.corp.example",
            "https://gw/sub",
            "https://gw/?a=1",
        ] {
            assert!(public_url(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn emails_are_lowercased_and_checked() {
        assert_eq!(
            normalize_email("p", " Alice@Corp.Example ").unwrap(),
            "alice@corp.example"
        );
        for bad in ["alice", "@corp", "a@", "a b@c", "a@b@c"] {
            assert!(normalize_email("p", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_is_never_printed() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "Secret(*****)");
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::Config;

    fn err(text: &str) -> crate::config::ConfigError {
        Config::parse(text).unwrap_err()
    }

    const OK: &str = "public_url = \"http://127.0.0.1:8787\"\n[oidc]\nissuer = \"https://idp.example\"\nclient_id = \"gw\"\n";

    #[test]
    fn a_minimal_oidc_table_is_valid_with_defaults() {
        let c = Config::parse(OK).unwrap();
        let s = c.signin.unwrap();
        assert_eq!(s.email_claim, "email");
        assert_eq!(s.session_ttl.as_secs(), 3600);
        assert_eq!(s.sign_ins_per_ip_per_minute, 10);
        assert_eq!(s.redirect_uri(), "http://127.0.0.1:8787/oauth/callback");
        assert!(s.client_secret.is_none(), "read at load, not parse");
    }

    #[test]
    fn oidc_mistakes_name_their_key() {
        assert_eq!(
            err("[oidc]\nissuer = \"https://i\"\nclient_id = \"x\"").path,
            "public_url"
        );
        assert_eq!(
            err("public_url = \"http://127.0.0.1:1\"\n[oidc]\nclient_id = \"x\"").path,
            "oidc.issuer"
        );
        assert_eq!(
            err(&format!("{OK}allowed_groups = [\"eng\"]")).path,
            "oidc.allowed_groups"
        );
        assert_eq!(
            err(&format!("{OK}session_ttl_secs = 5")).path,
            "oidc.session_ttl_secs"
        );
        assert_eq!(
            err(&format!("{OK}scopes = [\"email\"]")).path,
            "oidc.scopes"
        );
        assert_eq!(
            err(&format!("{OK}[oidc.auto_users]\nmodels = []")).path,
            "oidc.auto_users.models"
        );
        assert_eq!(
            err(&format!("{OK}client_secret = \"x\"")).path,
            "oidc.client_secret"
        );
    }

    #[test]
    fn an_identity_belongs_to_one_user() {
        let e = err(
            "[users.a]\nemails = [\"x@corp.example\"]\n[users.b]\nemails = [\"X@Corp.Example\"]",
        );
        assert_eq!(e.path, "users.b.emails[0]");
        assert!(e.message.contains("user `a`"), "{e}");
        let c =
            Config::parse("[users.a]\nemails = [\"X@Corp.Example\"]\nsubjects = [\"s1\"]").unwrap();
        assert_eq!(
            c.users
                .by_identity("nope", Some("x@corp.example"))
                .unwrap()
                .name,
            "a"
        );
        assert_eq!(c.users.by_identity("s1", None).unwrap().name, "a");
        assert!(c.users.by_identity("s2", Some("y@corp.example")).is_none());
    }

    #[test]
    fn the_secret_comes_from_the_file_never_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "  hunter2\n").unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, format!("{OK}client_secret_file = \"s\"\n")).unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.signin.unwrap().client_secret.unwrap().expose(), "hunter2");
        std::fs::write(&path, format!("{OK}client_secret_file = \"missing\"\n")).unwrap();
        let e = Config::load(&path).unwrap_err();
        assert_eq!(e.path, "oidc.client_secret_file");
    }
}
