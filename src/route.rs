//! Where a request goes: Bedrock path parsing and (caller, requested model) → target.
//!
//! This is the module that swaps the model id. It decides from the path alone (never the body)
//! which operation is called, and from the caller's own profile map which profile ARN is used.
//! It refuses anything it cannot attribute; it never reaches the network.

use std::sync::Arc;

use http::Method;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::arn::{BedrockArn, ModelRef, ResourceKind, strip_geo_prefix};
use crate::config::{Profile, User, Users};
use crate::domain::RuntimeOp;
use crate::error::ApiError;

/// Longest path accepted; ARNs are short, anything longer is not a Bedrock call.
const MAX_PATH_LEN: usize = 2048;

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

/// A recognised request, with ids percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    /// `GET /usage`: the caller's own usage this month.
    Usage,
    Runtime {
        op: RuntimeOp,
        model: String,
    },
    ListProfiles,
    GetProfile {
        id: String,
    },
}

impl Route {
    /// The AWS operation name for logs.
    pub fn operation(&self) -> &'static str {
        match self {
            Route::Health => "Health",
            Route::Usage => "Usage",
            Route::Runtime { op, .. } => op.name(),
            Route::ListProfiles => "ListInferenceProfiles",
            Route::GetProfile { .. } => "GetInferenceProfile",
        }
    }
}

fn decode_id(raw: &str, what: &str) -> Result<String, ApiError> {
    let decoded = percent_decode_str(raw).decode_utf8().map_err(|_| {
        ApiError::validation(format!(
            "The {what} in the path is not valid UTF-8 after percent-decoding."
        ))
    })?;
    if decoded.is_empty() {
        return Err(ApiError::validation(format!(
            "The {what} in the path is empty."
        )));
    }
    Ok(decoded.into_owned())
}

/// Parses method and raw (still percent-encoded) path into a [`Route`].
pub fn parse(method: &Method, path: &str) -> Result<Route, ApiError> {
    if path.len() > MAX_PATH_LEN {
        return Err(ApiError::validation(format!(
            "The request path is longer than {MAX_PATH_LEN} bytes."
        )));
    }
    if path == "/healthz" && method == Method::GET {
        return Ok(Route::Health);
    }
    if path == "/usage" && method == Method::GET {
        return Ok(Route::Usage);
    }
    if let Some(rest) = path.strip_prefix("/model/") {
        // The operation is the last segment; everything before it is the model id, which some
        // clients send with a raw `/` (an ARN) and others with `%2F`.
        if let Some((raw_model, suffix)) = rest.rsplit_once('/')
            && let Some(op) = RuntimeOp::from_suffix(suffix)
            && method == Method::POST
        {
            let model = decode_id(raw_model, "model id")?;
            ModelRef::parse(&model).map_err(|e| {
                ApiError::validation(format!(
                    "The model id `{}` is not valid: {e}.",
                    shown(&model)
                ))
            })?;
            return Ok(Route::Runtime { op, model });
        }
    }
    if method == Method::GET {
        if path == "/inference-profiles" || path == "/inference-profiles/" {
            return Ok(Route::ListProfiles);
        }
        if let Some(raw_id) = path.strip_prefix("/inference-profiles/")
            && !raw_id.contains('/')
        {
            let id = decode_id(raw_id, "inference profile id")?;
            ModelRef::parse(&id).map_err(|e| {
                ApiError::validation(format!(
                    "The inference profile id `{}` is not valid: {e}.",
                    shown(&id)
                ))
            })?;
            return Ok(Route::GetProfile { id });
        }
    }
    Err(ApiError::unknown_operation(method, path))
}

/// Truncates caller-supplied text before it is echoed in a message.
fn shown(s: &str) -> String {
    s.chars().take(200).collect()
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

fn no_profile(user: &User, requested: &str, base: &str) -> ApiError {
    if user.pending.iter().any(|k| strip_geo_prefix(k) == base) {
        return ApiError::access_denied(format!(
            "User `{}`'s inference profile for model `{}` is not provisioned yet. \
             Ask your bedrock-gate admin to run `bedrock-gate profiles apply`.",
            user.name,
            shown(requested)
        ));
    }
    let mapped: Vec<&str> = user.models.keys().map(String::as_str).collect();
    let mapped = if mapped.is_empty() {
        "none".to_string()
    } else {
        mapped.join(", ")
    };
    ApiError::access_denied(format!(
        "User `{}` has no inference profile for model `{}`. Ask your bedrock-gate admin to map it. \
         Models mapped for you: {mapped}.",
        user.name,
        shown(requested)
    ))
}

fn not_yours(user: &User, users: &Users, arn: &str) -> ApiError {
    if users.owner_of(arn).is_some() {
        ApiError::access_denied(format!(
            "Inference profile `{}` belongs to another user; user `{}` may only call their own profiles.",
            shown(arn),
            user.name
        ))
    } else {
        ApiError::access_denied(format!(
            "Inference profile `{}` is not mapped for user `{}` in bedrock-gate.",
            shown(arn),
            user.name
        ))
    }
}

/// Resolves the model id a caller asked for to the caller's own profile.
pub fn resolve_runtime(
    user: &User,
    users: &Users,
    requested: &str,
) -> Result<Arc<Profile>, ApiError> {
    let parsed = ModelRef::parse(requested).map_err(|e| {
        ApiError::validation(format!(
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
            .or_else(|| by_base_model(user, strip_geo_prefix(id))),
    };
    found
        .cloned()
        .ok_or_else(|| no_profile(user, requested, base))
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
pub fn resolve_profile_lookup(
    user: &User,
    users: &Users,
    requested: &str,
) -> Result<ProfileLookup, ApiError> {
    let parsed = ModelRef::parse(requested).map_err(|e| {
        ApiError::validation(format!(
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
            ..
        }) => Ok(ProfileLookup {
            id: requested.to_string(),
            region: Some(region),
        }),
        ModelRef::Arn(_) => Err(ApiError::validation(format!(
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
            if strip_geo_prefix(&id) != id {
                return Ok(ProfileLookup { id, region: None });
            }
            Err(ApiError::access_denied(format!(
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

    const A1: &str = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/aaa111";
    const A2: &str = "arn:aws:bedrock:us-west-2:123456789012:application-inference-profile/aaa222";
    const B1: &str = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/bbb111";
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
    fn parses_runtime_paths_with_raw_and_encoded_arns() {
        let enc = "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Faaa111/invoke";
        let claude = "/model/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile%2Faaa111/invoke-with-response-stream";
        let raw = "/model/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/aaa111/converse";
        for (p, op) in [
            (enc, RuntimeOp::Invoke),
            (claude, RuntimeOp::InvokeStream),
            (raw, RuntimeOp::Converse),
        ] {
            assert_eq!(
                parse(&Method::POST, p).unwrap(),
                Route::Runtime {
                    op,
                    model: A1.to_string()
                }
            );
        }
        assert_eq!(
            parse(
                &Method::POST,
                "/model/us.anthropic.claude-x-v1%3A0/count-tokens"
            )
            .unwrap(),
            Route::Runtime {
                op: RuntimeOp::CountTokens,
                model: "us.anthropic.claude-x-v1:0".into()
            }
        );
    }

    #[test]
    fn unknown_and_malformed_paths_are_refused() {
        assert_eq!(
            parse(&Method::GET, "/model/x/invoke").unwrap_err().status,
            404
        );
        assert_eq!(
            parse(&Method::POST, "/model/x/explode").unwrap_err().status,
            404
        );
        assert_eq!(
            parse(&Method::POST, "/foundation-models")
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            parse(&Method::POST, "/model//invoke").unwrap_err().status,
            400
        );
        assert_eq!(
            parse(&Method::POST, "/model/%FF%FE/invoke")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse(&Method::POST, "/model/a%20b/invoke")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse(
                &Method::POST,
                &format!("/model/{}/invoke", "a".repeat(3000))
            )
            .unwrap_err()
            .status,
            400
        );
    }

    #[test]
    fn profile_paths() {
        assert_eq!(
            parse(&Method::GET, "/inference-profiles").unwrap(),
            Route::ListProfiles
        );
        assert_eq!(
            parse(&Method::GET, "/inference-profiles/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Faaa111").unwrap(),
            Route::GetProfile { id: A1.into() }
        );
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
                resolve_runtime(&a, &c.users, &requested).unwrap().arn,
                A1,
                "{requested}"
            );
        }
        // A config key written with a geo prefix matches the base id and other prefixes.
        let e = resolve_runtime(&a, &c.users, &format!("us.{OPUS}")).unwrap_err();
        assert!(e.message.contains("not provisioned yet"), "{}", e.message);
        assert_eq!(resolve_runtime(&a, &c.users, HAIKU).unwrap().arn, A2);
        assert_eq!(
            resolve_runtime(&a, &c.users, &format!("eu.{HAIKU}"))
                .unwrap()
                .arn,
            A2
        );
    }

    #[test]
    fn refuses_other_users_profiles_and_unmapped_models() {
        let c = config();
        let a = alice(&c);
        let e = resolve_runtime(&a, &c.users, B1).unwrap_err();
        assert_eq!(e.status, 403);
        assert!(
            e.message.contains("belongs to another user"),
            "{}",
            e.message
        );
        let e =
            resolve_runtime(&a, &c.users, "anthropic.claude-opus-4-1-20250805-v1:0").unwrap_err();
        assert_eq!(e.status, 403);
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
            resolve_runtime(&a, &c.users, "bbb111").unwrap_err().status,
            403
        );
    }

    #[test]
    fn profile_lookups_allow_system_and_own_profiles_only() {
        let c = config();
        let a = alice(&c);
        assert_eq!(
            resolve_profile_lookup(&a, &c.users, A2).unwrap(),
            ProfileLookup {
                id: A2.into(),
                region: Some("us-west-2".into())
            }
        );
        assert_eq!(
            resolve_profile_lookup(&a, &c.users, &format!("us.{SONNET}"))
                .unwrap()
                .region,
            None
        );
        assert_eq!(
            resolve_profile_lookup(&a, &c.users, B1).unwrap_err().status,
            403
        );
        assert_eq!(
            resolve_profile_lookup(&a, &c.users, "bbb111")
                .unwrap_err()
                .status,
            403
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
