//! Bedrock ARNs and model ids: parsing and normalisation, with no I/O.
//!
//! Owns the one place that knows how a model id can be spelled (foundation model id, system
//! cross-region profile id with a geo prefix, or an ARN of a foundation model, a system profile
//! or an application inference profile) and how to reduce each to the base model id; and how
//! Anthropic's own names (`claude-sonnet-4-5-20250929`, `claude-sonnet-4-5`) relate to
//! Bedrock's (`anthropic.claude-sonnet-4-5-20250929-v1:0`).

/// Geo prefixes of system-defined cross-region inference profiles (`us.anthropic...`).
const GEO_PREFIXES: &[&str] = &["us", "us-gov", "eu", "apac", "global", "jp", "au", "ca"];

/// What a Bedrock ARN points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceKind {
    FoundationModel,
    /// A system-defined (cross-region) inference profile.
    InferenceProfile,
    ApplicationInferenceProfile,
}

/// A parsed `arn:{partition}:bedrock:{region}:{account}:{kind}/{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockArn {
    pub partition: String,
    pub region: String,
    /// Empty for foundation models, which have no account.
    pub account: String,
    pub kind: ResourceKind,
    pub resource_id: String,
}

/// An AWS region's shape, `^[a-z]{2}(-[a-z]+)+-\d+$` (`us-east-1`, `us-gov-west-1`): checked
/// before a region reaches an endpoint URL or a signature.
pub fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    s.len() <= 32
        && parts.len() >= 3
        && parts[0].len() == 2
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts
            .last()
            .is_some_and(|p| !p.is_empty() && p.len() <= 2 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The geo prefix of a system-defined profile id (`us.anthropic.claude-…` → `us`), when the
/// rest is a model id (`provider.model`).
pub fn system_profile_geo(id: &str) -> Option<&str> {
    let rest = strip_geo_prefix(id);
    if rest == id || !rest.contains('.') || !is_model_id(rest) {
        return None;
    }
    id.split_once('.').map(|(geo, _)| geo)
}

/// Whether a system profile of `geo` can live in `region` (a `us.` profile in `us-*`, …;
/// `global.` anywhere).
pub fn geo_holds_region(geo: &str, region: &str) -> bool {
    match geo {
        "global" => true,
        "us" => region.starts_with("us-") && !region.starts_with("us-gov-"),
        "us-gov" => region.starts_with("us-gov-"),
        "eu" => region.starts_with("eu-"),
        "apac" | "jp" | "au" => region.starts_with("ap-"),
        "ca" => region.starts_with("ca-"),
        _ => false,
    }
}

/// Characters Bedrock allows in model ids: letters, digits, `.`, `-`, `_`, `:`.
fn is_model_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

impl BedrockArn {
    /// Parses a Bedrock ARN, or says why it is not one.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(6, ':');
        let (Some("arn"), Some(partition), Some(service), Some(region), Some(account), Some(rest)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err("expected arn:aws:bedrock:{region}:{account}:{type}/{id}".into());
        };
        if !partition.starts_with("aws") {
            return Err(format!("unknown partition `{partition}`"));
        }
        if service != "bedrock" {
            return Err(format!("service is `{service}`, expected `bedrock`"));
        }
        if !is_region(region) {
            return Err(format!("`{region}` is not a region"));
        }
        let Some((kind, id)) = rest.split_once('/') else {
            return Err("missing `/` between resource type and id".into());
        };
        let kind = match kind {
            "foundation-model" => ResourceKind::FoundationModel,
            "inference-profile" => ResourceKind::InferenceProfile,
            "application-inference-profile" => ResourceKind::ApplicationInferenceProfile,
            other => return Err(format!("resource type `{other}` is not a model or profile")),
        };
        let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
        match kind {
            ResourceKind::FoundationModel if !(account.is_empty() || account_ok) => {
                return Err(format!("`{account}` is not a 12-digit account id"));
            }
            ResourceKind::InferenceProfile | ResourceKind::ApplicationInferenceProfile
                if !account_ok =>
            {
                return Err(format!("`{account}` is not a 12-digit account id"));
            }
            _ => {}
        }
        let id_ok = match kind {
            ResourceKind::ApplicationInferenceProfile => {
                !id.is_empty()
                    && id.len() <= 64
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            }
            _ => is_model_id(id),
        };
        if !id_ok {
            return Err(format!("`{id}` is not a valid resource id"));
        }
        Ok(BedrockArn {
            partition: partition.to_string(),
            region: region.to_string(),
            account: account.to_string(),
            kind,
            resource_id: id.to_string(),
        })
    }
}

/// Strips a cross-region geo prefix: `us.anthropic.claude-x` becomes `anthropic.claude-x`.
/// Ids without a known prefix come back unchanged.
pub fn strip_geo_prefix(id: &str) -> &str {
    if let Some((prefix, rest)) = id.split_once('.')
        && GEO_PREFIXES.contains(&prefix)
        && rest.contains('.')
    {
        return rest;
    }
    id
}

/// How a requested model id names its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A plain id: a foundation model id, a system profile id, or the id part of an
    /// application inference profile ARN.
    Id(String),
    /// An ARN. For foundation models and system profiles the base model id is derived.
    Arn(BedrockArn),
}

impl ModelRef {
    /// Parses a decoded model id from a request path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("arn:") {
            return BedrockArn::parse(s).map(ModelRef::Arn);
        }
        if !is_model_id(s) {
            return Err("a model id has only letters, digits, `.`, `-`, `_` and `:`".into());
        }
        Ok(ModelRef::Id(s.to_string()))
    }
}

/// Anthropic's name for a Bedrock Anthropic model id: `anthropic.claude-sonnet-4-5-20250929-v1:0`
/// (with or without a geo prefix) is `claude-sonnet-4-5-20250929`; `anthropic.claude-opus-5-5`
/// is `claude-opus-5-5`. `None` for models of other providers.
pub fn anthropic_name(bedrock_id: &str) -> Option<&str> {
    let id = strip_geo_prefix(bedrock_id).strip_prefix("anthropic.")?;
    // The Bedrock version suffix: `-v1:0`, `-v2:0`, or a bare `-v1`.
    let without_version = match id.rsplit_once("-v") {
        Some((name, version))
            if !version.is_empty()
                && version
                    .split(':')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) =>
        {
            name
        }
        _ => id,
    };
    without_version
        .starts_with("claude")
        .then_some(without_version)
}

/// An Anthropic model name split into its family and release date: `claude-sonnet-4-5-20250929`
/// is (`claude-sonnet-4-5`, `Some("20250929")`); an undated name is its own family.
pub fn anthropic_family(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('-') {
        Some((family, date)) if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) => {
            (family, Some(date))
        }
        _ => (name, None),
    }
}

/// A display name for an Anthropic model name: `claude-sonnet-4-5-20250929` is
/// "Claude Sonnet 4.5", `claude-3-5-haiku-20241022` is "Claude 3.5 Haiku".
pub fn anthropic_display_name(name: &str) -> String {
    let (family, _) = anthropic_family(name);
    let mut words: Vec<String> = Vec::new();
    let mut number: Vec<&str> = Vec::new();
    let flush = |number: &mut Vec<&str>, words: &mut Vec<String>| {
        if !number.is_empty() {
            words.push(number.join("."));
            number.clear();
        }
    };
    for part in family.split('-').filter(|p| !p.is_empty()) {
        if part.bytes().all(|b| b.is_ascii_digit()) {
            number.push(part);
            continue;
        }
        flush(&mut number, &mut words);
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            words.push(first.to_uppercase().chain(chars).collect());
        }
    }
    flush(&mut number, &mut words);
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_application_profile_arn() {
        let arn = BedrockArn::parse(
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123",
        )
        .unwrap();
        assert_eq!(arn.region, "us-east-1");
        assert_eq!(arn.account, "123456789012");
        assert_eq!(arn.kind, ResourceKind::ApplicationInferenceProfile);
        assert_eq!(arn.resource_id, "abc123");
    }

    #[test]
    fn parses_foundation_model_arn_without_account() {
        let arn = BedrockArn::parse(
            "arn:aws:bedrock:us-west-2::foundation-model/anthropic.claude-sonnet-4-5-20250929-v1:0",
        )
        .unwrap();
        assert_eq!(arn.kind, ResourceKind::FoundationModel);
        assert_eq!(arn.resource_id, "anthropic.claude-sonnet-4-5-20250929-v1:0");
    }

    #[test]
    fn rejects_malformed_arns() {
        for bad in [
            "arn:aws:bedrock:us-east-1:123:application-inference-profile/abc",
            "arn:aws:s3:us-east-1:123456789012:application-inference-profile/abc",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/ABC",
            "arn:aws:bedrock:US_EAST:123456789012:application-inference-profile/abc",
            "arn:aws:bedrock:us-east-1:123456789012:agent/abc",
            "arn:aws:bedrock",
            "",
        ] {
            assert!(BedrockArn::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn regions_have_the_aws_shape() {
        for ok in [
            "us-east-1",
            "us-gov-west-1",
            "ap-southeast-4",
            "eu-central-2",
            "cn-north-1",
        ] {
            assert!(is_region(ok), "{ok}");
        }
        for bad in [
            "",
            "us",
            "us-east",
            "useast1",
            "us-east-1-evil",
            "US-EAST-1",
            "us-east-1.evil.com",
            "u-east-1",
            "us--1",
            "us-east-123",
        ] {
            assert!(!is_region(bad), "{bad}");
        }
    }

    #[test]
    fn system_profile_ids_are_a_geo_and_a_model_id() {
        assert_eq!(
            system_profile_geo("us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
            Some("us")
        );
        assert_eq!(system_profile_geo("global.anthropic.x"), Some("global"));
        assert_eq!(system_profile_geo("us.nothing"), None);
        assert_eq!(system_profile_geo("anthropic.claude"), None);
        assert_eq!(system_profile_geo("xx.anthropic.claude"), None);
        assert!(geo_holds_region("us", "us-west-2"));
        assert!(!geo_holds_region("us", "eu-west-1"));
        assert!(!geo_holds_region("us", "us-gov-west-1"));
        assert!(geo_holds_region("apac", "ap-northeast-1"));
    }

    #[test]
    fn strips_known_geo_prefixes_only() {
        assert_eq!(
            strip_geo_prefix("us.anthropic.claude-haiku-4-5-20251001-v1:0"),
            "anthropic.claude-haiku-4-5-20251001-v1:0"
        );
        assert_eq!(strip_geo_prefix("global.anthropic.x"), "anthropic.x");
        assert_eq!(strip_geo_prefix("apac.anthropic.x"), "anthropic.x");
        assert_eq!(strip_geo_prefix("anthropic.claude"), "anthropic.claude");
        assert_eq!(strip_geo_prefix("us.claude"), "us.claude");
        assert_eq!(
            strip_geo_prefix("xx.anthropic.claude"),
            "xx.anthropic.claude"
        );
    }

    #[test]
    fn anthropic_names_of_bedrock_ids() {
        for (bedrock, name) in [
            (
                "anthropic.claude-sonnet-4-5-20250929-v1:0",
                Some("claude-sonnet-4-5-20250929"),
            ),
            (
                "us.anthropic.claude-haiku-4-5-20251001-v1:0",
                Some("claude-haiku-4-5-20251001"),
            ),
            ("anthropic.claude-opus-5-5", Some("claude-opus-5-5")),
            (
                "anthropic.claude-3-5-haiku-20241022-v1",
                Some("claude-3-5-haiku-20241022"),
            ),
            (
                "anthropic.claude-opus-4-1-20250805-v2:0",
                Some("claude-opus-4-1-20250805"),
            ),
            ("amazon.nova-pro-v1:0", None),
            ("anthropic.titan-x", None),
            ("claude-sonnet-4-5", None),
        ] {
            assert_eq!(anthropic_name(bedrock), name, "{bedrock}");
        }
    }

    #[test]
    fn anthropic_families_and_display_names() {
        assert_eq!(
            anthropic_family("claude-sonnet-4-5-20250929"),
            ("claude-sonnet-4-5", Some("20250929"))
        );
        assert_eq!(
            anthropic_family("claude-opus-5-5"),
            ("claude-opus-5-5", None)
        );
        assert_eq!(
            anthropic_family("claude-sonnet-4"),
            ("claude-sonnet-4", None)
        );
        assert_eq!(
            anthropic_display_name("claude-sonnet-4-5-20250929"),
            "Claude Sonnet 4.5"
        );
        assert_eq!(
            anthropic_display_name("claude-3-5-haiku-20241022"),
            "Claude 3.5 Haiku"
        );
        assert_eq!(anthropic_display_name("claude-opus-5-5"), "Claude Opus 5.5");
    }

    #[test]
    fn model_ref_rejects_odd_characters() {
        assert!(ModelRef::parse("anthropic.claude v1").is_err());
        assert!(ModelRef::parse("../etc").is_err());
        assert!(ModelRef::parse("").is_err());
        assert!(ModelRef::parse("anthropic.claude-3:0").is_ok());
    }
}
