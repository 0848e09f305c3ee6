//! Billing options: what a call can ask Bedrock for that is billed beyond the standard
//! on-demand rate, or on someone else's resource. The priority and flex service tiers and
//! latency-optimized inference have rates of their own; a guardrail is billed per text unit on
//! the guardrail's account and may belong to another team.
//!
//! A front finds what a call asks for ([`Asked`]: the `X-Amzn-Bedrock-*` headers, the
//! Converse body's `serviceTier`, `performanceConfig` and `guardrailConfig`); [`check`] refuses
//! whatever the user may not use (`[users.NAME] allow_headers`) and says which rate the rest
//! pays. Nothing here prices a call (that is `meter::prices`) or reads a body from the network.

use std::collections::BTreeSet;

use http::HeaderMap;

use crate::meter::prices::Special;
use crate::refusal::{Refusal, shown};
use crate::upstream::payload::Payload;

/// A billing option a user may be allowed (`allow_headers`), by the name the config uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// `X-Amzn-Bedrock-Service-Tier` / Converse `serviceTier`: priority and flex.
    ServiceTier,
    /// `X-Amzn-Bedrock-PerformanceConfig-Latency` / Converse `performanceConfig.latency`.
    Latency,
    /// `X-Amzn-Bedrock-GuardrailIdentifier`, `-GuardrailVersion`, `-Trace` / Converse
    /// `guardrailConfig`.
    Guardrail,
}

impl Feature {
    pub const ALL: [Feature; 3] = [Feature::ServiceTier, Feature::Latency, Feature::Guardrail];

    /// The name in `allow_headers`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::ServiceTier => "service-tier",
            Feature::Latency => "latency",
            Feature::Guardrail => "guardrail",
        }
    }

    pub fn parse(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// The billing options a user may use (`[users.NAME] allow_headers`); none by default.
pub type Allowed = BTreeSet<Feature>;

/// One billing option a call asks for, and how it asked (for the refusal's message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Use {
    pub feature: Feature,
    /// The rate it pays; `None`: the standard one (a guardrail's charges are not the model's).
    pub rate: Option<Special>,
    /// "the `X-Amzn-Bedrock-Service-Tier: priority` header", "the Converse field `serviceTier`".
    pub via: String,
}

/// What a call asks for beyond the standard (empty for nearly every call).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asked(pub Vec<Use>);

impl Asked {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The request headers that choose a billing option, as Bedrock spells them.
const SERVICE_TIER: &str = "X-Amzn-Bedrock-Service-Tier";
const LATENCY: &str = "X-Amzn-Bedrock-PerformanceConfig-Latency";
const GUARDRAIL_ID: &str = "X-Amzn-Bedrock-GuardrailIdentifier";
const GUARDRAIL_VERSION: &str = "X-Amzn-Bedrock-GuardrailVersion";
const TRACE: &str = "X-Amzn-Bedrock-Trace";

/// A service tier's rate; `Ok(None)` for the standard one.
fn tier(value: &str, via: &str) -> Result<Option<Special>, Refusal> {
    match value.to_ascii_lowercase().as_str() {
        "default" | "standard" => Ok(None),
        "priority" => Ok(Some(Special::Priority)),
        "flex" => Ok(Some(Special::Flex)),
        _ => Err(Refusal::invalid(format!(
            "{via} is `{}`; bedrock-gate forwards the service tiers `default`, `priority` and `flex`.",
            shown(value)
        ))),
    }
}

/// Latency-optimized inference's rate; `Ok(None)` for standard latency.
fn latency(value: &str, via: &str) -> Result<Option<Special>, Refusal> {
    match value.to_ascii_lowercase().as_str() {
        "standard" => Ok(None),
        "optimized" => Ok(Some(Special::LatencyOptimized)),
        _ => Err(Refusal::invalid(format!(
            "{via} is `{}`; Bedrock's latency settings are `standard` and `optimized`.",
            shown(value)
        ))),
    }
}

/// What the `X-Amzn-Bedrock-*` headers of a runtime call ask for.
pub fn from_headers(headers: &HeaderMap, asked: &mut Asked) -> Result<(), Refusal> {
    // Every value is forwarded, so a second one could carry what the first does not say.
    for name in [
        SERVICE_TIER,
        LATENCY,
        GUARDRAIL_ID,
        GUARDRAIL_VERSION,
        TRACE,
    ] {
        if headers.get_all(name).iter().count() > 1 {
            return Err(Refusal::invalid(format!(
                "The `{name}` header is given more than once; send it once."
            )));
        }
    }
    let text = |name: &str| {
        headers.get(name).map(|v| {
            std::str::from_utf8(v.as_bytes())
                .map(str::trim)
                .map_err(|_| Refusal::invalid(format!("The `{name}` header must be text.")))
        })
    };
    if let Some(v) = text(SERVICE_TIER) {
        let v = v?;
        let via = format!("the `{SERVICE_TIER}: {}` header", shown(v));
        if let Some(rate) = tier(v, &format!("The `{SERVICE_TIER}` header"))? {
            asked.0.push(Use {
                feature: Feature::ServiceTier,
                rate: Some(rate),
                via,
            });
        }
    }
    if let Some(v) = text(LATENCY) {
        let v = v?;
        let via = format!("the `{LATENCY}: {}` header", shown(v));
        if let Some(rate) = latency(v, &format!("The `{LATENCY}` header"))? {
            asked.0.push(Use {
                feature: Feature::Latency,
                rate: Some(rate),
                via,
            });
        }
    }
    for name in [GUARDRAIL_ID, GUARDRAIL_VERSION] {
        if headers.contains_key(name) {
            asked.0.push(Use {
                feature: Feature::Guardrail,
                rate: None,
                via: format!("the `{name}` header"),
            });
        }
    }
    // A trace is the guardrail's trace; turning it off asks for nothing.
    if let Some(v) = text(TRACE)
        && !v?.eq_ignore_ascii_case("DISABLED")
    {
        asked.0.push(Use {
            feature: Feature::Guardrail,
            rate: None,
            via: format!("the `{TRACE}` header"),
        });
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct ConverseOptions {
    #[serde(rename = "serviceTier")]
    service_tier: Option<serde_json::Value>,
    #[serde(rename = "performanceConfig")]
    performance_config: Option<PerformanceConfig>,
    #[serde(rename = "guardrailConfig")]
    guardrail_config: Option<serde::de::IgnoredAny>,
}

#[derive(serde::Deserialize)]
struct PerformanceConfig {
    latency: Option<String>,
}

/// What a Converse (or ConverseStream) body asks for. The body is always parsed as JSON (a
/// scan for the field names would miss an escaped name, or one split across chunks), and one
/// that does not parse, or names a field twice, is refused: what Bedrock would read in it
/// cannot be known, so it is not forwarded.
pub fn from_converse(body: &Payload, asked: &mut Asked) -> Result<(), Refusal> {
    let options = match serde_json::from_slice::<ConverseOptions>(&body.to_bytes()) {
        Ok(o) => o,
        Err(e) => {
            let what = if e.to_string().starts_with("duplicate field") {
                "names a field twice"
            } else {
                "is not a JSON object"
            };
            return Err(Refusal::invalid(format!(
                "The Converse request body {what}; send one JSON object with each field once."
            )));
        }
    };
    if let Some(value) = options.service_tier {
        let text = match &value {
            serde_json::Value::String(s) => Some(s.as_str()),
            serde_json::Value::Object(o) => o.get("type").and_then(|t| t.as_str()),
            _ => None,
        };
        let via = "the Converse field `serviceTier`";
        let rate = match text {
            Some(t) => tier(t, "The Converse field `serviceTier`")?,
            None => {
                return Err(Refusal::invalid(
                    "The Converse field `serviceTier` must be {\"type\": \"default\" | \"priority\" | \"flex\"}.",
                ));
            }
        };
        if let Some(rate) = rate {
            asked.0.push(Use {
                feature: Feature::ServiceTier,
                rate: Some(rate),
                via: format!("{via} (`{}`)", text.unwrap_or_default()),
            });
        }
    }
    if let Some(PerformanceConfig {
        latency: Some(value),
    }) = options.performance_config
    {
        let via = "the Converse field `performanceConfig.latency`";
        if let Some(rate) = latency(&value, "The Converse field `performanceConfig.latency`")? {
            asked.0.push(Use {
                feature: Feature::Latency,
                rate: Some(rate),
                via: format!("{via} (`{}`)", shown(&value)),
            });
        }
    }
    if options.guardrail_config.is_some() {
        asked.0.push(Use {
            feature: Feature::Guardrail,
            rate: None,
            via: "the Converse field `guardrailConfig`".to_string(),
        });
    }
    Ok(())
}

/// Refuses what `user` may not use; otherwise the rate the call pays (`None`: the standard).
pub fn check(user: &str, allowed: &Allowed, asked: &Asked) -> Result<Option<Special>, Refusal> {
    let mut rate: Option<(Special, &str)> = None;
    for u in &asked.0 {
        if !allowed.contains(&u.feature) {
            return Err(Refusal::invalid(format!(
                "{} asks for a billing option user `{user}` may not use (it is billed beyond the \
                 standard rate, or on another team's resource). Leave it out, or ask your \
                 bedrock-gate admin to add `allow_headers = [\"{}\"]` under [users.{user}].",
                capitalised(&u.via),
                u.feature.name()
            )));
        }
        match (rate, u.rate) {
            (Some((r, first)), Some(other)) if r != other => {
                return Err(Refusal::invalid(format!(
                    "{first} and {} ask for two different rates; send one.",
                    u.via
                )));
            }
            (None, Some(r)) => rate = Some((r, &u.via)),
            _ => {}
        }
    }
    Ok(rate.map(|(r, _)| r))
}

/// The refusal of an allowed option whose rate the price table lacks: metering it at the
/// standard rate would undercount it.
pub fn unpriced(asked: &Asked, rate: Special, model: &str) -> Refusal {
    let via = asked
        .0
        .iter()
        .find(|u| u.rate == Some(rate))
        .map_or("The call", |u| u.via.as_str());
    let model = crate::arn::strip_geo_prefix(model);
    Refusal::invalid(format!(
        "{} is billed at its own rate, and bedrock-gate has no such price for `{model}`, so it \
         could not meter the call. Leave it out, or ask your bedrock-gate admin to add \
         [prices.\"{model}\".{}].",
        capitalised(via),
        rate.key()
    ))
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> Result<Asked, Refusal> {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        let mut asked = Asked::default();
        from_headers(&h, &mut asked)?;
        Ok(asked)
    }

    fn converse(body: &str) -> Result<Asked, Refusal> {
        let mut asked = Asked::default();
        from_converse(
            &Payload::from_bytes(Bytes::from(body.to_string())),
            &mut asked,
        )?;
        Ok(asked)
    }

    #[test]
    fn standard_settings_ask_for_nothing() {
        assert!(
            headers(&[
                ("x-amzn-bedrock-service-tier", "default"),
                ("x-amzn-bedrock-performanceconfig-latency", "standard"),
                ("x-amzn-bedrock-trace", "DISABLED"),
                ("content-type", "application/json"),
            ])
            .unwrap()
            .is_empty()
        );
        assert!(converse(r#"{"messages":[]}"#).unwrap().is_empty());
        assert!(
            converse(r#"{"messages":[{"content":[{"text":"say \"serviceTier\""}]}]}"#)
                .unwrap()
                .is_empty()
        );
        assert!(
            converse(
                r#"{"performanceConfig":{"latency":"standard"},"serviceTier":{"type":"default"}}"#
            )
            .unwrap()
            .is_empty()
        );
    }

    #[test]
    fn options_are_found_in_headers_and_bodies() {
        let a = headers(&[("x-amzn-bedrock-service-tier", "Priority")]).unwrap();
        assert_eq!(a.0[0].rate, Some(Special::Priority));
        let a = headers(&[("x-amzn-bedrock-guardrailidentifier", "g")]).unwrap();
        assert_eq!(a.0[0].feature, Feature::Guardrail);
        let a = converse(r#"{"serviceTier":{"type":"flex"},"guardrailConfig":{}}"#).unwrap();
        assert_eq!(a.0.len(), 2);
        assert_eq!(a.0[0].rate, Some(Special::Flex));
        let a = converse(r#"{"performanceConfig":{"latency":"optimized"}}"#).unwrap();
        assert_eq!(a.0[0].rate, Some(Special::LatencyOptimized));
        assert!(headers(&[("x-amzn-bedrock-service-tier", "gold")]).is_err());
        assert!(converse(r#"{"serviceTier":7}"#).is_err());
    }

    #[test]
    fn check_refuses_what_is_not_allowed_and_names_the_rate() {
        let asked = headers(&[
            ("x-amzn-bedrock-service-tier", "priority"),
            ("x-amzn-bedrock-guardrailversion", "1"),
        ])
        .unwrap();
        let e = check("alice", &Allowed::new(), &asked).unwrap_err();
        assert!(
            e.message.contains("allow_headers = [\"service-tier\"]"),
            "{}",
            e.message
        );
        assert!(e.message.contains("[users.alice]"), "{}", e.message);
        let only_tier = Allowed::from([Feature::ServiceTier]);
        let e = check("alice", &only_tier, &asked).unwrap_err();
        assert!(e.message.contains("\"guardrail\""), "{}", e.message);
        let all = Allowed::from(Feature::ALL);
        assert_eq!(
            check("alice", &all, &asked).unwrap(),
            Some(Special::Priority)
        );
        let two = headers(&[
            ("x-amzn-bedrock-service-tier", "priority"),
            ("x-amzn-bedrock-performanceconfig-latency", "optimized"),
        ])
        .unwrap();
        assert!(check("alice", &all, &two).is_err());
    }
}
