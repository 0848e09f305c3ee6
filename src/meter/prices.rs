//! Model prices (USD per million tokens) and cost estimation.
//!
//! A shipped default table covers current Claude models at their published on-demand list
//! prices; `[prices."MODEL"]` in the config overrides or adds entries. A model with no price,
//! or cache tokens with no cache price, is metered in tokens and flagged as unpriced: the
//! proxy never guesses a price.

use std::collections::HashMap;

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

/// Published on-demand list prices (USD/MTok; cache write = 5-minute cache). Check them
/// against your AWS pricing page: regional endpoints and negotiated rates differ.
pub const DEFAULT_PRICES: &[(&str, Price)] = &[
    (
        "anthropic.claude-opus-4-5-20251101-v1:0",
        p(5.0, 25.0, 0.50, 6.25),
    ),
    (
        "anthropic.claude-opus-4-1-20250805-v1:0",
        p(15.0, 75.0, 1.50, 18.75),
    ),
    (
        "anthropic.claude-opus-4-20250514-v1:0",
        p(15.0, 75.0, 1.50, 18.75),
    ),
    (
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        p(3.0, 15.0, 0.30, 3.75),
    ),
    (
        "anthropic.claude-sonnet-4-20250514-v1:0",
        p(3.0, 15.0, 0.30, 3.75),
    ),
    (
        "anthropic.claude-3-7-sonnet-20250219-v1:0",
        p(3.0, 15.0, 0.30, 3.75),
    ),
    (
        "anthropic.claude-haiku-4-5-20251001-v1:0",
        p(1.0, 5.0, 0.10, 1.25),
    ),
    (
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        p(0.80, 4.0, 0.08, 1.0),
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

/// The price table in force: defaults overlaid with the config's `[prices]`.
#[derive(Debug, Clone, Default)]
pub struct Prices(HashMap<String, Price>);

impl Prices {
    pub fn with_overrides(overrides: impl IntoIterator<Item = (String, Price)>) -> Prices {
        let mut map: HashMap<String, Price> = DEFAULT_PRICES
            .iter()
            .map(|(m, p)| (m.to_string(), *p))
            .collect();
        map.extend(overrides);
        Prices(map)
    }

    pub fn get(&self, model: &str) -> Option<&Price> {
        self.0.get(strip_geo_prefix(model))
    }

    /// Estimated cost in USD, or `None` when some tokens have no price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        self.get(model)?.cost(usage)
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

    #[test]
    fn default_sonnet_cost_with_cache_tokens() {
        let prices = Prices::with_overrides([]);
        let c = prices
            .cost(
                "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                &usage(1_000_000, 100_000, 200_000, 10_000),
            )
            .unwrap();
        // 3.00 + 1.50 + 0.06 + 0.0375
        assert!((c - 4.5975).abs() < 1e-9, "{c}");
    }

    #[test]
    fn unknown_models_and_unpriced_cache_tokens_are_not_guessed() {
        let prices = Prices::with_overrides([(
            "acme.model".to_string(),
            Price {
                input_per_mtok: 1.0,
                output_per_mtok: 2.0,
                cache_read_per_mtok: None,
                cache_write_per_mtok: None,
            },
        )]);
        assert_eq!(
            prices.cost("anthropic.claude-opus-5-5", &usage(1, 1, 0, 0)),
            None
        );
        assert_eq!(
            prices.cost("acme.model", &usage(1_000_000, 0, 0, 0)),
            Some(1.0)
        );
        assert_eq!(prices.cost("acme.model", &usage(1, 0, 5, 0)), None);
    }

    #[test]
    fn config_overrides_a_default() {
        let cheap = p(0.0, 0.0, 0.0, 0.0);
        let prices = Prices::with_overrides([(
            "anthropic.claude-haiku-4-5-20251001-v1:0".to_string(),
            cheap,
        )]);
        assert_eq!(
            prices.cost(
                "anthropic.claude-haiku-4-5-20251001-v1:0",
                &usage(9, 9, 9, 9)
            ),
            Some(0.0)
        );
    }
}
