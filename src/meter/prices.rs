//! Model prices (USD per million tokens) and cost estimation.
//!
//! Bedrock prices one Claude model differently by how the call is routed: a profile made from a
//! `global.` cross-region profile pays the Global rate; one made from a foundation model or a
//! geographic (`us.`, `eu.`, `apac.`) profile pays the regional rate, which for recent Claude
//! models is about 10 % more. A price entry therefore has a regional rate, an optional Global
//! rate, and optional per-region rates for regions that differ. A shipped default table covers
//! the models Claude Code uses by default; `bedrock-gate prices sync` writes the AWS Price List's
//! rates to a prices file, and `[prices."MODEL"]` in the config overrides both. A model with no
//! price, or cache tokens with no cache price, is metered in tokens and flagged as unpriced: the
//! proxy never guesses a price.

use std::collections::{BTreeMap, HashMap};

use crate::arn::strip_geo_prefix;
use crate::domain::Usage;

/// USD per million tokens of each kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub cache_read_per_mtok: Option<f64>,
    pub cache_write_per_mtok: Option<f64>,
}

const fn p(input: f64, output: f64, cache_read: f64, cache_write: f64) -> Price {
    Price {
        input_per_mtok: input,
        output_per_mtok: output,
        cache_read_per_mtok: Some(cache_read),
        cache_write_per_mtok: Some(cache_write),
    }
}

/// Which of Bedrock's rates a profile pays, from how it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Tier {
    /// Made from a foundation model or a geographic (`us.`, `eu.`, `apac.`) profile.
    #[default]
    Regional,
    /// Made from a `global.` cross-region profile.
    Global,
}

/// One model's rates in one place: the regional rate and, where it differs, the Global one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub regional: Price,
    /// `None`: Global profiles pay the regional rate too.
    pub global: Option<Price>,
}

impl Rates {
    pub fn for_tier(&self, tier: Tier) -> Price {
        match tier {
            Tier::Regional => self.regional,
            Tier::Global => self.global.unwrap_or(self.regional),
        }
    }
}

/// A rate a call asks for beyond the standard on-demand one (see `premium`), with a price of
/// its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Special {
    /// The priority service tier.
    Priority,
    /// The flex service tier.
    Flex,
    /// Latency-optimized inference.
    LatencyOptimized,
}

impl Special {
    /// The key of its table under `[prices."MODEL"]`.
    pub fn key(self) -> &'static str {
        match self {
            Special::Priority => "priority",
            Special::Flex => "flex",
            Special::LatencyOptimized => "latency_optimized",
        }
    }
}

/// A model's price entry: its rates, the regions whose rates differ, and the rates of the
/// billing options it has a price for.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceEntry {
    pub rates: Rates,
    pub regions: BTreeMap<String, Rates>,
    /// One rate per option, whatever the region or profile kind; an option with none is
    /// refused, never priced at the standard rate.
    pub special: BTreeMap<Special, Price>,
}

impl PriceEntry {
    pub fn new(regional: Price, global: Option<Price>) -> PriceEntry {
        PriceEntry {
            rates: Rates { regional, global },
            regions: BTreeMap::new(),
            special: BTreeMap::new(),
        }
    }
}

/// Shipped on-demand rates, (model, regional, Global), cache write being the 5-minute cache.
/// The Global rate is Anthropic's list price; from the Claude 4.5 models on, Bedrock charges
/// about 10 % more on regional and geographic profiles, as its pricing page says, and the
/// older models have one rate. Opus 5.5 is from a reading of the Price List
/// (`AmazonBedrockFoundationModels`) in November 2026. These are estimates to start with:
/// `bedrock-gate prices sync` replaces them with what your account's Price List says, for the
/// regions you use.
pub const DEFAULT_PRICES: &[(&str, Price, Option<Price>)] = &[
    // Claude Code's default opus tier.
    (
        "anthropic.claude-opus-5-5",
        p(4.40, 22.0, 0.44, 5.50),
        Some(p(4.0, 20.0, 0.40, 5.0)),
    ),
    (
        "anthropic.claude-opus-4-5-20251101-v1:0",
        p(5.50, 27.50, 0.55, 6.875),
        Some(p(5.0, 25.0, 0.50, 6.25)),
    ),
    (
        "anthropic.claude-opus-4-1-20250805-v1:0",
        p(15.0, 75.0, 1.50, 18.75),
        None,
    ),
    (
        "anthropic.claude-opus-4-20250514-v1:0",
        p(15.0, 75.0, 1.50, 18.75),
        None,
    ),
    // Claude Code's default sonnet tier.
    (
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        p(3.30, 16.50, 0.33, 4.125),
        Some(p(3.0, 15.0, 0.30, 3.75)),
    ),
    (
        "anthropic.claude-sonnet-4-20250514-v1:0",
        p(3.0, 15.0, 0.30, 3.75),
        None,
    ),
    (
        "anthropic.claude-3-7-sonnet-20250219-v1:0",
        p(3.0, 15.0, 0.30, 3.75),
        None,
    ),
    // Claude Code's default haiku tier.
    (
        "anthropic.claude-haiku-4-5-20251001-v1:0",
        p(1.10, 5.50, 0.11, 1.375),
        Some(p(1.0, 5.0, 0.10, 1.25)),
    ),
    (
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        p(0.80, 4.0, 0.08, 1.0),
        None,
    ),
];

impl Price {
    /// Estimated cost in USD, or `None` when some tokens have no price.
    pub fn cost(&self, usage: &Usage) -> Option<f64> {
        let part = |tokens: u64, per: Option<f64>| -> Option<f64> {
            match (tokens, per) {
                (0, _) => Some(0.0),
                (n, Some(per)) => Some(n as f64 * per / 1_000_000.0),
                (_, None) => None,
            }
        };
        Some(
            part(usage.input_tokens, Some(self.input_per_mtok))?
                + part(usage.output_tokens, Some(self.output_per_mtok))?
                + part(usage.cache_read_tokens, self.cache_read_per_mtok)?
                + part(usage.cache_write_tokens, self.cache_write_per_mtok)?,
        )
    }
}

/// The price table in force: defaults, overlaid with the prices file, overlaid with the
/// config's `[prices]` (each entry replaces the one below it whole).
#[derive(Debug, Clone, Default)]
pub struct Prices(HashMap<String, PriceEntry>);

impl Prices {
    pub fn with_overrides(overrides: impl IntoIterator<Item = (String, PriceEntry)>) -> Prices {
        let mut map: HashMap<String, PriceEntry> = DEFAULT_PRICES
            .iter()
            .map(|(m, regional, global)| (m.to_string(), PriceEntry::new(*regional, *global)))
            .collect();
        map.extend(overrides);
        Prices(map)
    }

    /// Whether the model has a price at all.
    pub fn has(&self, model: &str) -> bool {
        self.0.contains_key(strip_geo_prefix(model))
    }

    /// The rate a call to `model` pays in `region` from a profile of `tier`.
    pub fn get(&self, model: &str, region: &str, tier: Tier) -> Option<Price> {
        let entry = self.0.get(strip_geo_prefix(model))?;
        let rates = entry.regions.get(region).unwrap_or(&entry.rates);
        Some(rates.for_tier(tier))
    }

    /// The rate of a call to `model` with a billing option, if the table has one.
    pub fn special(&self, model: &str, special: Special) -> Option<Price> {
        self.0
            .get(strip_geo_prefix(model))?
            .special
            .get(&special)
            .copied()
    }

    /// Estimated cost in USD, or `None` when some tokens have no price.
    pub fn cost(&self, model: &str, region: &str, tier: Tier, usage: &Usage) -> Option<f64> {
        self.get(model, region, tier)?.cost(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(i: u64, o: u64, r: u64, w: u64) -> Usage {
        Usage {
            input_tokens: i,
            output_tokens: o,
            cache_read_tokens: r,
            cache_write_tokens: w,
        }
    }

    const SONNET: &str = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";

    #[test]
    fn default_sonnet_cost_with_cache_tokens_regional_and_global() {
        let prices = Prices::with_overrides([]);
        let u = usage(1_000_000, 100_000, 200_000, 10_000);
        let regional = prices
            .cost(SONNET, "us-east-1", Tier::Regional, &u)
            .unwrap();
        // 3.30 + 1.65 + 0.066 + 0.04125
        assert!((regional - 5.05725).abs() < 1e-9, "{regional}");
        let global = prices.cost(SONNET, "us-east-1", Tier::Global, &u).unwrap();
        // 3.00 + 1.50 + 0.06 + 0.0375
        assert!((global - 4.5975).abs() < 1e-9, "{global}");
    }

    #[test]
    fn claude_codes_default_models_are_priced() {
        let prices = Prices::with_overrides([]);
        for model in [
            "anthropic.claude-opus-5-5",
            "anthropic.claude-sonnet-4-5-20250929-v1:0",
            "anthropic.claude-haiku-4-5-20251001-v1:0",
        ] {
            assert!(prices.has(model), "{model}");
        }
    }

    #[test]
    fn a_model_without_a_global_rate_pays_its_regional_rate_on_a_global_profile() {
        let prices = Prices::with_overrides([]);
        let opus41 = "anthropic.claude-opus-4-1-20250805-v1:0";
        assert_eq!(
            prices.get(opus41, "us-east-1", Tier::Global),
            prices.get(opus41, "us-east-1", Tier::Regional)
        );
    }

    #[test]
    fn a_region_with_its_own_rates_uses_them() {
        let mut entry = PriceEntry::new(p(1.0, 2.0, 0.1, 1.25), None);
        entry.regions.insert(
            "eu-central-1".into(),
            Rates {
                regional: p(1.5, 3.0, 0.15, 1.5),
                global: None,
            },
        );
        let prices = Prices::with_overrides([("acme.model".to_string(), entry)]);
        let u = usage(1_000_000, 0, 0, 0);
        assert_eq!(
            prices.cost("acme.model", "us-east-1", Tier::Regional, &u),
            Some(1.0)
        );
        assert_eq!(
            prices.cost("acme.model", "eu-central-1", Tier::Regional, &u),
            Some(1.5)
        );
    }

    #[test]
    fn unknown_models_and_unpriced_cache_tokens_are_not_guessed() {
        let prices = Prices::with_overrides([(
            "acme.model".to_string(),
            PriceEntry::new(
                Price {
                    input_per_mtok: 1.0,
                    output_per_mtok: 2.0,
                    cache_read_per_mtok: None,
                    cache_write_per_mtok: None,
                },
                None,
            ),
        )]);
        let r = |model: &str, u: &Usage| prices.cost(model, "us-east-1", Tier::Regional, u);
        assert_eq!(r("anthropic.claude-opus-9-9", &usage(1, 1, 0, 0)), None);
        assert_eq!(r("acme.model", &usage(1_000_000, 0, 0, 0)), Some(1.0));
        assert_eq!(r("acme.model", &usage(1, 0, 5, 0)), None);
    }

    #[test]
    fn a_billing_option_has_its_own_rate_or_none() {
        let mut entry = PriceEntry::new(p(1.0, 2.0, 0.1, 1.25), None);
        entry
            .special
            .insert(Special::Priority, p(2.0, 4.0, 0.2, 2.5));
        let prices = Prices::with_overrides([("acme.model".to_string(), entry)]);
        assert_eq!(
            prices.special("us.acme.model", Special::Priority),
            Some(p(2.0, 4.0, 0.2, 2.5))
        );
        assert_eq!(
            prices.special("acme.model", Special::LatencyOptimized),
            None
        );
        assert_eq!(prices.special(SONNET, Special::Priority), None);
    }

    #[test]
    fn config_overrides_a_default() {
        let cheap = PriceEntry::new(p(0.0, 0.0, 0.0, 0.0), None);
        let prices = Prices::with_overrides([(
            "anthropic.claude-haiku-4-5-20251001-v1:0".to_string(),
            cheap,
        )]);
        assert_eq!(
            prices.cost(
                "anthropic.claude-haiku-4-5-20251001-v1:0",
                "us-east-1",
                Tier::Global,
                &usage(9, 9, 9, 9)
            ),
            Some(0.0)
        );
    }
}
