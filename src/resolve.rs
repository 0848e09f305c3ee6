//! Phase `resolve`: the model id swap. (caller, requested model) → the caller's own
//! application inference profile, and where and how the call goes upstream.
//!
//! Every spelling of a mapped model resolves here, the same for every front: the plain id, any
//! geo prefix, a foundation-model or system-profile ARN, the caller's own profile ARN or id, and
//! Anthropic's own names (`claude-sonnet-4-5-20250929`, the undated alias `claude-sonnet-4-5`).
//! It refuses anything it cannot attribute to the caller's own profile; it never reaches the
//! network and never looks at a body.

use std::sync::Arc;

use http::Method;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::arn::{
    BedrockArn, ModelRef, ResourceKind, anthropic_family, anthropic_name, strip_geo_prefix,
};
use crate::call::{Call, Wanted};
use crate::config::{Config, Profile, User, Users};
use crate::domain::{Front, RuntimeOp};
use crate::refusal::{Refusal, shown};

/// Everything but RFC 3986 unreserved characters is encoded, so an ARN (`:` and `/`) is one
/// path segment upstream.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes a model or profile id as a single path segment.
pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Where a call goes: the caller's profile (for model calls) and the upstream request line.
#[derive(Debug, Clone)]
pub struct Target {
    /// The caller's own profile, for runtime calls.
    pub profile: Option<Arc<Profile>>,
    pub method: Method,
    /// Full URL: the endpoint of the region, the encoded path and query.
    pub url: String,
    /// The region to sign for.
    pub region: String,
}

/// Resolves a decoded call for this caller against the live config.
pub fn target(user: &User, config: &Config, call: &Call) -> Result<Target, Refusal> {
    let model = call.model.as_deref().unwrap_or_default();
    match &call.wanted {
        Wanted::Runtime(op) => {
            let profile = profile_for(user, &config.users, model, call.front)?;
            if call.front == Front::Anthropic && anthropic_name(&profile.model).is_none() {
                return Err(Refusal::invalid(format!(
                    "Model `{}` is `{}` for you, which is not an Anthropic model; the Messages API \
                     serves Claude models only. Call it on the Bedrock routes (POST /model/{{id}}/converse).",
                    shown(model),
                    profile.model
                )));
            }
            let region = profile.parsed.region.clone();
            // CountTokens is free and takes a foundation model id, not a profile.
            let upstream_id = match op {
                RuntimeOp::CountTokens => strip_geo_prefix(&profile.model).to_string(),
                _ => profile.arn.clone(),
            };
            let url = format!(
                "{}/model/{}/{}",
                config.aws.runtime_endpoint.for_region(&region),
                encode_segment(&upstream_id),
                op.suffix()
            );
            Ok(Target {
                profile: Some(profile),
                method: Method::POST,
                url,
                region,
            })
        }
        Wanted::ListProfiles { query } => {
            let region = config.aws.region.clone();
            let url = format!(
                "{}/inference-profiles?{query}",
                config.aws.control_endpoint.for_region(&region)
            );
            Ok(Target {
                profile: None,
                method: Method::GET,
                url,
                region,
            })
        }
        Wanted::GetProfile => {
            let lookup = profile_lookup(user, &config.users, model)?;
            let region = lookup.region.unwrap_or_else(|| config.aws.region.clone());
            let url = format!(
                "{}/inference-profiles/{}",
                config.aws.control_endpoint.for_region(&region),
                encode_segment(&lookup.id)
            );
            Ok(Target {
                profile: None,
                method: Method::GET,
                url,
                region,
            })
        }
    }
}

/// Finds the caller's profile for a base model id, accepting config keys written with a
/// geo prefix too.
fn by_base_model<'u>(user: &'u User, base: &str) -> Option<&'u Arc<Profile>> {
    user.models.get(base).or_else(|| {
        user.models
            .iter()
            .find(|(k, _)| strip_geo_prefix(k) == base)
            .map(|(_, p)| p)
    })
}

/// The config key an Anthropic-style name picks among `keys`: the exact name
/// (`claude-sonnet-4-5-20250929`), or for an undated alias (`claude-sonnet-4-5`,
/// `claude-sonnet-4-5-latest`, `anthropic.claude-sonnet-4-5`) the newest model of that family.
fn by_anthropic_name<'k>(keys: impl Iterator<Item = &'k str>, requested: &str) -> Option<&'k str> {
    let wanted = anthropic_name(requested)
        .or_else(|| requested.starts_with("claude-").then_some(requested))?;
    let wanted = wanted.strip_suffix("-latest").unwrap_or(wanted);
    let mut newest: Option<(&str, Option<&str>)> = None;
    for key in keys {
        let Some(name) = anthropic_name(key) else {
            continue;
        };
        if name == wanted {
            return Some(key);
        }
        let (family, date) = anthropic_family(name);
        if family == wanted && newest.is_none_or(|(_, d)| date > d) {
            newest = Some((key, date));
        }
    }
    newest.map(|(key, _)| key)
}

fn no_profile(user: &User, requested: &str, base: &str, front: Front) -> Refusal {
    let pending = user.pending.iter().map(String::as_str);
    if user.pending.iter().any(|k| strip_geo_prefix(k) == base)
        || by_anthropic_name(pending, requested).is_some()
    {
        return Refusal::not_allowed(format!(
            "User `{}`'s inference profile for model `{}` is not provisioned yet. \
             Ask your bedrock-gate admin to run `bedrock-gate profiles apply`.",
            user.name,
            shown(requested)
        ));
    }
    let mapped: Vec<&str> = match front {
        Front::Bedrock => user.models.keys().map(String::as_str).collect(),
        // In the names the caller's client uses.
        Front::Anthropic => user
            .models
            .keys()
            .filter_map(|k| anthropic_name(k))
            .collect(),
    };
    let mapped = if mapped.is_empty() {
        "none".to_string()
    } else {
        mapped.join(", ")
    };
    Refusal::not_allowed(format!(
        "User `{}` has no inference profile for model `{}`. Ask your bedrock-gate admin to map it. \
         Models mapped for you: {mapped}.",
        user.name,
        shown(requested)
    ))
}

fn not_yours(user: &User, users: &Users, arn: &str) -> Refusal {
    if users.owner_of(arn).is_some() {
        Refusal::not_allowed(format!(
            "Inference profile `{}` belongs to another user; user `{}` may only call their own profiles.",
            shown(arn),
            user.name
        ))
    } else {
        Refusal::not_allowed(format!(
            "Inference profile `{}` is not mapped for user `{}` in bedrock-gate.",
            shown(arn),
            user.name
        ))
    }
}

/// Resolves the model a caller asked for to the caller's own profile. `front` words the
/// refusal in the model names its clients use.
pub fn profile_for(
    user: &User,
    users: &Users,
    requested: &str,
    front: Front,
) -> Result<Arc<Profile>, Refusal> {
    let parsed = ModelRef::parse(requested).map_err(|e| {
        Refusal::invalid(format!(
            "The model id `{}` is not valid: {e}.",
            shown(requested)
        ))
    })?;
    let base = match &parsed {
        ModelRef::Arn(arn) => strip_geo_prefix(&arn.resource_id),
        ModelRef::Id(id) => strip_geo_prefix(id),
    };
    let found = match &parsed {
        ModelRef::Arn(arn) => match arn.kind {
            ResourceKind::ApplicationInferenceProfile => {
                return user
                    .profile_by_arn(requested)
                    .cloned()
                    .ok_or_else(|| not_yours(user, users, requested));
            }
            ResourceKind::FoundationModel => by_base_model(user, &arn.resource_id),
            ResourceKind::InferenceProfile => {
                by_base_model(user, strip_geo_prefix(&arn.resource_id))
            }
        },
        ModelRef::Id(id) => user
            .models
            .get(id)
            .or_else(|| user.profile_by_id(id))
            .or_else(|| by_base_model(user, strip_geo_prefix(id)))
            .or_else(|| {
                by_anthropic_name(user.models.keys().map(String::as_str), id)
                    .and_then(|key| user.models.get(key))
            }),
    };
    found
        .cloned()
        .ok_or_else(|| no_profile(user, requested, base, front))
}

/// Where a GetInferenceProfile call may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileLookup {
    /// The id or ARN to put in the upstream path.
    pub id: String,
    /// The region whose control plane answers.
    pub region: Option<String>,
}

/// Allows GetInferenceProfile for system profiles and the caller's own profiles only.
pub fn profile_lookup(
    user: &User,
    users: &Users,
    requested: &str,
) -> Result<ProfileLookup, Refusal> {
    let parsed = ModelRef::parse(requested).map_err(|e| {
        Refusal::invalid(format!(
            "The inference profile id `{}` is not valid: {e}.",
            shown(requested)
        ))
    })?;
    match parsed {
        ModelRef::Arn(BedrockArn {
            kind: ResourceKind::ApplicationInferenceProfile,
            region,
            ..
        }) => match user.profile_by_arn(requested) {
            Some(_) => Ok(ProfileLookup {
                id: requested.to_string(),
                region: Some(region),
            }),
            None => Err(not_yours(user, users, requested)),
        },
        ModelRef::Arn(BedrockArn {
            kind: ResourceKind::InferenceProfile,
            region,
            resource_id,
            ..
        }) => match crate::arn::system_profile_geo(&resource_id) {
            Some(geo) if crate::arn::geo_holds_region(geo, &region) => Ok(ProfileLookup {
                id: requested.to_string(),
                region: Some(region),
            }),
            Some(_) => Err(Refusal::invalid(format!(
                "`{}`: a `{}` system profile does not live in {region}.",
                shown(requested),
                resource_id.split('.').next().unwrap_or_default()
            ))),
            None => Err(Refusal::not_allowed(format!(
                "`{}` is not a system-defined profile (a geo prefix such as `us.` and a model id).",
                shown(requested)
            ))),
        },
        ModelRef::Arn(_) => Err(Refusal::invalid(format!(
            "`{}` is a foundation model, not an inference profile.",
            shown(requested)
        ))),
        ModelRef::Id(id) => {
            if let Some(p) = user.profile_by_id(&id) {
                return Ok(ProfileLookup {
                    id,
                    region: Some(p.parsed.region.clone()),
                });
            }
            if crate::arn::system_profile_geo(&id).is_some() {
                return Ok(ProfileLookup { id, region: None });
            }
            Err(Refusal::not_allowed(format!(
                "Inference profile `{}` is neither a system-defined profile nor one of user `{}`'s profiles.",
                shown(&id),
                user.name
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::refusal::Reason;

    const A1: &str = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/aaa111";
    const A2: &str = "arn:aws:bedrock:us-west-2:123456789012:application-inference-profile/aaa222";
    const B1: &str = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/bbb111";
    const A3: &str = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/aaa333";
    const SONNET: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";
    const HAIKU: &str = "anthropic.claude-haiku-4-5-20251001-v1:0";
    const OPUS: &str = "anthropic.claude-opus-4-5-20251101-v1:0";

    fn config() -> Config {
        Config::parse(&format!(
            r#"
[users.alice]
keys = ["sha256:{ka}"]
[users.alice.models]
"{SONNET}" = "{A1}"
"us.{HAIKU}" = "{A2}"
"{OPUS}" = "auto"
[users.bob]
keys = ["sha256:{kb}"]
[users.bob.models]
"{SONNET}" = "{B1}"
"#,
            ka = "a".repeat(64),
            kb = "b".repeat(64),
        ))
        .unwrap()
    }

    fn alice(c: &Config) -> Arc<User> {
        c.users
            .by_key(
                &crate::auth::KeyHash::from_config(&format!("sha256:{}", "a".repeat(64))).unwrap(),
            )
            .unwrap()
            .clone()
    }

    #[test]
    fn resolves_every_spelling_of_a_mapped_model() {
        let c = config();
        let a = alice(&c);
        for requested in [
            SONNET.to_string(),
            format!("us.{SONNET}"),
            format!("global.{SONNET}"),
            format!("arn:aws:bedrock:us-east-1::foundation-model/{SONNET}"),
            format!("arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.{SONNET}"),
            A1.to_string(),
            "aaa111".to_string(),
        ] {
            assert_eq!(
                profile_for(&a, &c.users, &requested, Front::Bedrock)
                    .unwrap()
                    .arn,
                A1,
                "{requested}"
            );
        }
        // A config key written with a geo prefix matches the base id and other prefixes.
        let e = profile_for(&a, &c.users, &format!("us.{OPUS}"), Front::Bedrock).unwrap_err();
        assert!(e.message.contains("not provisioned yet"), "{}", e.message);
        assert_eq!(
            profile_for(&a, &c.users, HAIKU, Front::Bedrock)
                .unwrap()
                .arn,
            A2
        );
        assert_eq!(
            profile_for(&a, &c.users, &format!("eu.{HAIKU}"), Front::Bedrock)
                .unwrap()
                .arn,
            A2
        );
    }

    #[test]
    fn anthropic_names_and_aliases_resolve_to_the_newest_mapped_model() {
        let newer = "anthropic.claude-sonnet-4-5-20260101-v1:0";
        let c = Config::parse(&format!(
            r#"
[users.alice]
keys = ["sha256:{ka}"]
[users.alice.models]
"{SONNET}" = "{A1}"
"{newer}" = "{A3}"
"us.{HAIKU}" = "{A2}"
"anthropic.claude-opus-5-5" = "auto"
"#,
            ka = "a".repeat(64),
        ))
        .unwrap();
        let a = alice(&c);
        let arn = |requested: &str| {
            profile_for(&a, &c.users, requested, Front::Anthropic)
                .map(|p| p.arn.clone())
                .map_err(|e| e.message)
        };
        assert_eq!(arn("claude-sonnet-4-5-20250929"), Ok(A1.to_string()));
        assert_eq!(arn("claude-sonnet-4-5-20260101"), Ok(A3.to_string()));
        for alias in [
            "claude-sonnet-4-5",
            "claude-sonnet-4-5-latest",
            "anthropic.claude-sonnet-4-5",
            "us.anthropic.claude-sonnet-4-5",
        ] {
            assert_eq!(
                arn(alias),
                Ok(A3.to_string()),
                "{alias}: the newest of the family"
            );
        }
        assert_eq!(arn("claude-haiku-4-5"), Ok(A2.to_string()));
        assert_eq!(arn(SONNET), Ok(A1.to_string()), "Bedrock spellings too");
        // `claude-sonnet-4` is another family than `claude-sonnet-4-5`.
        let e = arn("claude-sonnet-4").unwrap_err();
        assert!(
            e.contains("claude-sonnet-4-5-20250929") && e.contains("claude-haiku-4-5-20251001"),
            "lists what is mapped, in Anthropic names: {e}"
        );
        assert!(!e.contains("anthropic."), "{e}");
        let e = arn("claude-opus-5-5").unwrap_err();
        assert!(e.contains("not provisioned yet"), "{e}");
    }

    #[test]
    fn refuses_other_users_profiles_and_unmapped_models() {
        let c = config();
        let a = alice(&c);
        let e = profile_for(&a, &c.users, B1, Front::Bedrock).unwrap_err();
        assert_eq!(e.reason, Reason::ModelNotAllowed);
        assert!(
            e.message.contains("belongs to another user"),
            "{}",
            e.message
        );
        let e = profile_for(
            &a,
            &c.users,
            "anthropic.claude-opus-4-1-20250805-v1:0",
            Front::Bedrock,
        )
        .unwrap_err();
        assert_eq!(e.reason, Reason::ModelNotAllowed);
        assert!(
            e.message
                .contains("anthropic.claude-opus-4-1-20250805-v1:0")
        );
        assert!(
            e.message.contains(SONNET),
            "lists what is mapped: {}",
            e.message
        );
        assert_eq!(
            profile_for(&a, &c.users, "bbb111", Front::Bedrock)
                .unwrap_err()
                .reason,
            Reason::ModelNotAllowed
        );
    }

    #[test]
    fn profile_lookups_allow_system_and_own_profiles_only() {
        let c = config();
        let a = alice(&c);
        assert_eq!(
            profile_lookup(&a, &c.users, A2).unwrap(),
            ProfileLookup {
                id: A2.into(),
                region: Some("us-west-2".into())
            }
        );
        assert_eq!(
            profile_lookup(&a, &c.users, &format!("us.{SONNET}"))
                .unwrap()
                .region,
            None
        );
        assert_eq!(
            profile_lookup(&a, &c.users, B1).unwrap_err().reason,
            Reason::ModelNotAllowed
        );
        assert_eq!(
            profile_lookup(&a, &c.users, "bbb111").unwrap_err().reason,
            Reason::ModelNotAllowed
        );
    }

    #[test]
    fn encodes_arn_as_one_segment() {
        assert_eq!(
            encode_segment(A1),
            "arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Faaa111"
        );
    }
}
