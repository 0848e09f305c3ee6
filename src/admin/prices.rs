//! `prices sync`: every mapped model's on-demand rates from the AWS Price List Query API, for
//! the regions the config's profiles live in, written to the prices file the config includes.
//!
//! Claude models are listed under service code `AmazonBedrockFoundationModels` and named by
//! `servicename` ("Claude Sonnet 4.5 (Amazon Bedrock Edition)"), priced per million tokens, with
//! a regional and a `_Global` usage type of each kind; first-party models are under
//! `AmazonBedrock`, named in their usage types, priced per 1,000 tokens. Batch, flex, priority,
//! provisioned, long-context and one-hour-cache rates are not on-demand rates and are skipped. A
//! model the Price List does not price completely is reported, never guessed. This module writes
//! only the prices file (and `prices_file` into the config when it was missing).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use aws_sdk_pricing::types::{Filter, FilterType};
use serde_json::Value;

use crate::admin::billing::billed_service;
use crate::admin::doc::{ConfigDoc, write_atomic};
use crate::arn::{anthropic_name, strip_geo_prefix};
use crate::config::{Config, dir_of};

/// The Price List API answers in us-east-1.
const PRICING_REGION: &str = "us-east-1";
/// The prices file `sync` writes when the config names none.
const DEFAULT_PRICES_FILE: &str = "prices.toml";

/// The kinds of token a rate is for, in the order of a price's four fields.
const KINDS: [&str; 4] = [
    "input_per_mtok",
    "output_per_mtok",
    "cache_read_per_mtok",
    "cache_write_per_mtok",
];

/// A model's four rates, each found or not.
type Four = [Option<f64>; 4];

/// What the Price List says of one model in one region.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    pub regional: Four,
    pub global: Four,
}

/// Which rate a Price List item is: (kind index, Global?), or `None` for anything that is not an
/// on-demand token rate.
pub fn classify(usagetype: &str) -> Option<(usize, bool)> {
    let ut = usagetype.to_ascii_lowercase();
    const NOT_ON_DEMAND: &[&str] = &[
        "batch",
        "flex",
        "priority",
        "reserved",
        "provisioned",
        "longcontext",
        "long_context",
        "long-context",
        "crossgeo",
        "latency",
        "1h",
        "custom",
    ];
    if NOT_ON_DEMAND.iter().any(|s| ut.contains(s)) {
        return None;
    }
    let has = |words: &[&str]| words.iter().any(|w| ut.contains(w));
    let kind = if has(&["cacheread", "cache_read", "cache-read"]) {
        2
    } else if has(&["cachewrite", "cache_write", "cache-write"]) {
        3
    } else if has(&["output", "response"]) {
        1
    } else if has(&["input"]) {
        0
    } else {
        return None;
    };
    Some((kind, ut.contains("global")))
}

/// The USD price per million tokens a price dimension states, from its unit and description
/// (`Units` with "Million … Tokens", `1K tokens`, `1M tokens`); `None` when it cannot tell.
pub fn per_million(unit: &str, description: &str, usd: f64) -> Option<f64> {
    let unit = unit.to_ascii_lowercase();
    let desc = description.to_ascii_lowercase();
    if unit.contains("1k") || desc.contains("per 1k") || desc.contains("1,000") {
        Some(usd * 1000.0)
    } else if unit.contains("1m") || desc.contains("million") {
        Some(usd)
    } else {
        None
    }
}

/// Reads one Price List item (a JSON document): its usage type and first on-demand price.
fn item_rate(item: &Value) -> Option<(usize, bool, f64)> {
    let usagetype = item["product"]["attributes"]["usagetype"].as_str()?;
    let (kind, global) = classify(usagetype)?;
    let terms = item["terms"]["OnDemand"].as_object()?;
    let dim = terms
        .values()
        .filter_map(|t| t["priceDimensions"].as_object())
        .flat_map(|d| d.values())
        .next()?;
    let usd: f64 = dim["pricePerUnit"]["USD"].as_str()?.parse().ok()?;
    let rate = per_million(
        dim["unit"].as_str().unwrap_or(""),
        dim["description"].as_str().unwrap_or(""),
        usd,
    )?;
    Some((kind, global, rate))
}

/// The rates in a set of Price List items (the first of each kind wins).
pub fn read_items<'a>(items: impl IntoIterator<Item = &'a Value>) -> Found {
    let mut found = Found::default();
    for item in items {
        if let Some((kind, global, rate)) = item_rate(item) {
            let slot = if global {
                &mut found.global[kind]
            } else {
                &mut found.regional[kind]
            };
            slot.get_or_insert(rate);
        }
    }
    found
}

/// A first-party model's id as it appears in its usage types: no version suffix.
fn usage_type_id(model: &str) -> String {
    let base = strip_geo_prefix(model);
    let base = base.split(':').next().unwrap_or(base);
    match base.rsplit_once("-v") {
        Some((id, v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => id.to_string(),
        _ => base.to_string(),
    }
}

async fn get_products(
    client: &aws_sdk_pricing::Client,
    service_code: &str,
    filters: &[(&str, &str)],
) -> anyhow::Result<Vec<Value>> {
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut request = client
            .get_products()
            .service_code(service_code)
            .format_version("aws_v1")
            .max_results(100)
            .set_next_token(token.take());
        for (field, value) in filters {
            request = request.filters(
                Filter::builder()
                    .r#type(FilterType::TermMatch)
                    .field(*field)
                    .value(*value)
                    .build()
                    .context("price list filter")?,
            );
        }
        let page = request.send().await.map_err(|e| {
            use aws_sdk_pricing::error::ProvideErrorMetadata as _;
            let said = format!(
                "{}: {}",
                e.code().unwrap_or("error"),
                e.message().unwrap_or("no message")
            );
            if e.code().is_some_and(|c| c.contains("AccessDenied")) {
                anyhow::anyhow!(
                    "the Price List refused GetProducts ({said}); the credentials need `pricing:GetProducts`"
                )
            } else {
                anyhow::anyhow!("Price List GetProducts {service_code}: {said}")
            }
        })?;
        for raw in page.price_list() {
            // Each item is a JSON document in a string; one that is not is skipped.
            if let Ok(v) = serde_json::from_str::<Value>(raw) {
                items.push(v);
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => return Ok(items),
        }
    }
}

/// What the Price List has for `model` in `region`.
async fn lookup(
    client: &aws_sdk_pricing::Client,
    model: &str,
    region: &str,
) -> anyhow::Result<Found> {
    if anthropic_name(model).is_some() {
        let service = billed_service(model);
        let items = get_products(
            client,
            "AmazonBedrockFoundationModels",
            &[("servicename", &service), ("regionCode", region)],
        )
        .await?;
        return Ok(read_items(&items));
    }
    let id = usage_type_id(model);
    let items = get_products(client, "AmazonBedrock", &[("regionCode", region)]).await?;
    Ok(read_items(items.iter().filter(|item| {
        item["product"]["attributes"]["usagetype"]
            .as_str()
            .is_some_and(|ut| ut.contains(&id))
    })))
}

fn complete(four: &Four) -> Option<[f64; 4]> {
    Some([four[0]?, four[1]?, four[2]?, four[3]?])
}

fn table(out: &mut String, header: &str, rates: &[f64; 4]) {
    let _ = writeln!(out, "[{header}]");
    for (name, rate) in KINDS.iter().zip(rates) {
        // `{:?}` keeps a whole number a TOML float (`3.0`, not `3`).
        let _ = writeln!(out, "{name} = {rate:?}");
    }
}

/// The prices file for what was found: `model → region → rates`. The regional rate of
/// `home` (or of the first region) is the model's rate; regions whose rates differ get their
/// own tables. Returns the text and the models left out, with why.
pub fn render(
    found: &BTreeMap<String, BTreeMap<String, Found>>,
    home: &str,
    date: &str,
) -> (String, Vec<(String, String)>) {
    let mut out = format!(
        "# Written by `bedrock-gate prices sync` on {date} from the AWS Price List; rewritten by\n\
         # every sync. USD per million tokens. A model's rate prices calls through profiles made from\n\
         # a foundation model or a geographic (us./eu./apac.) profile; `.global` prices profiles made\n\
         # from a global. profile. `[prices]` in the config overrides an entry here.\n"
    );
    let mut skipped = Vec::new();
    for (model, regions) in found {
        let mut usable: BTreeMap<&str, ([f64; 4], Option<[f64; 4]>)> = BTreeMap::new();
        for (region, f) in regions {
            match complete(&f.regional) {
                Some(regional) => {
                    usable.insert(region, (regional, complete(&f.global)));
                }
                None => {
                    let missing: Vec<&str> = KINDS
                        .iter()
                        .zip(&f.regional)
                        .filter(|(_, v)| v.is_none())
                        .map(|(k, _)| *k)
                        .collect();
                    skipped.push((
                        model.clone(),
                        format!(
                            "no on-demand {} in the Price List for {region}",
                            missing.join(", ")
                        ),
                    ));
                }
            }
        }
        let Some((base_region, base)) = usable
            .get_key_value(home)
            .or_else(|| usable.iter().next())
            .map(|(r, v)| (*r, *v))
        else {
            continue;
        };
        out.push('\n');
        table(&mut out, &format!("prices.\"{model}\""), &base.0);
        if let Some(global) = base.1 {
            table(&mut out, &format!("prices.\"{model}\".global"), &global);
        }
        for (region, rates) in &usable {
            if *region == base_region || *rates == base {
                continue;
            }
            table(
                &mut out,
                &format!("prices.\"{model}\".regions.\"{region}\""),
                &rates.0,
            );
            if let Some(global) = rates.1 {
                table(
                    &mut out,
                    &format!("prices.\"{model}\".regions.\"{region}\".global"),
                    &global,
                );
            }
        }
    }
    (out, skipped)
}

/// Every mapped model (base id) and the regions its profiles live in (`aws.region` for one not
/// provisioned yet).
fn models_and_regions(config: &Config) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for user in config.users.iter() {
        for (model, profile) in &user.models {
            out.entry(strip_geo_prefix(model).to_string())
                .or_default()
                .insert(profile.parsed.region.clone());
        }
        for model in &user.pending {
            out.entry(strip_geo_prefix(model).to_string())
                .or_default()
                .insert(config.aws.region.clone());
        }
    }
    out
}

/// `bedrock-gate prices sync -c PATH`.
pub async fn sync(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let sdk = crate::upstream::sdk_config(&config.aws).await;
    let mut conf = aws_sdk_pricing::config::Builder::from(&sdk)
        .region(aws_config::Region::new(PRICING_REGION));
    if let Some(endpoint) = &config.aws.pricing_endpoint {
        conf = conf.endpoint_url(endpoint.for_region(PRICING_REGION));
    }
    let client = aws_sdk_pricing::Client::from_conf(conf.build());
    let mut found: BTreeMap<String, BTreeMap<String, Found>> = BTreeMap::new();
    for (model, regions) in models_and_regions(&config) {
        for region in regions {
            let f = lookup(&client, &model, &region).await?;
            found.entry(model.clone()).or_default().insert(region, f);
        }
    }
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let (text, skipped) = render(&found, &config.aws.region, &date);
    let name = config
        .prices_file
        .as_ref()
        .map_or(DEFAULT_PRICES_FILE.to_string(), |(n, _)| n.clone());
    let file = dir_of(path).join(&name);
    write_atomic(&file, text.as_bytes())?;
    if config.prices_file.is_none() {
        let mut doc = ConfigDoc::open(path)?;
        doc.set_prices_file(&name)?;
        doc.save()?;
        println!("prices sync: the config now includes prices_file = \"{name}\"");
    }
    let written = found.len()
        - skipped
            .iter()
            .map(|(m, _)| m)
            .collect::<BTreeSet<_>>()
            .len();
    println!(
        "prices sync: wrote {} ({} model(s) priced from the Price List)",
        file.display(),
        written.min(found.len())
    );
    for (model, why) in &skipped {
        println!("NOT PRICED  {model}: {why}; price it in [prices.\"{model}\"] by hand");
    }
    // A running proxy reloads the file like the config.
    Ok(if skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(usagetype: &str, unit: &str, description: &str, usd: &str) -> Value {
        serde_json::json!({
            "product": {"attributes": {"usagetype": usagetype}},
            "terms": {"OnDemand": {"T": {"priceDimensions": {"D": {
                "unit": unit, "description": description, "pricePerUnit": {"USD": usd}
            }}}}}
        })
    }

    #[test]
    fn claude_items_read_as_regional_and_global_rates_per_million() {
        let items = [
            item(
                "USE1-MP:USE1_InputTokenCount-Units",
                "Units",
                "AWS Marketplace software usage|us-east-1|Million Input Tokens Regional CRIS",
                "3.3000000000",
            ),
            item(
                "USE1-MP:USE1_InputTokenCount_Global-Units",
                "Units",
                "AWS Marketplace software usage|us-east-1|Million Input Tokens Global",
                "3.0000000000",
            ),
            item(
                "USE1-MP:USE1_OutputTokenCount-Units",
                "Units",
                "AWS Marketplace software usage|us-east-1|Million Response Tokens Regional CRIS",
                "16.5",
            ),
            item(
                "USE1-MP:USE1_CacheReadInputTokenCount-Units",
                "Units",
                "Million Cache Read Input Tokens",
                "0.33",
            ),
            item(
                "USE1-MP:USE1_CacheWriteInputTokenCount-Units",
                "Units",
                "Million Cache Write Input Tokens",
                "4.125",
            ),
            item(
                "USE1-MP:USE1_Batch_InputTokenCount-Units",
                "Units",
                "Million Input Tokens Batch",
                "1.65",
            ),
            item(
                "USE1-MP:USE1_CacheWrite1h_InputTokenCount-Units",
                "Units",
                "Million 1h Cache Write",
                "6.6",
            ),
            item(
                "USE1-MP:USE1_input_tokens_standard-Units",
                "Units",
                "Million Input Tokens Standard",
                "9.9",
            ),
        ];
        let f = read_items(&items);
        assert_eq!(f.regional, [Some(3.3), Some(16.5), Some(0.33), Some(4.125)]);
        assert_eq!(f.global[0], Some(3.0));
        assert_eq!(f.global[1], None);
    }

    #[test]
    fn units_per_thousand_become_per_million() {
        assert_eq!(
            per_million("1K tokens", "$0.0005 per 1K input tokens", 0.0005),
            Some(0.5)
        );
        assert_eq!(per_million("Units", "Million Input Tokens", 3.0), Some(3.0));
        assert_eq!(per_million("Hrs", "per hour", 3.0), None);
        assert_eq!(
            classify("USE1-meta.llama3-2-1b-instruct-input-tokens"),
            Some((0, false))
        );
        assert_eq!(
            classify("USE1-Nova2.0Lite-output-tokens-cross-region-global"),
            Some((1, true))
        );
        assert_eq!(
            classify("USE1-qwen.qwen3-coder-next-input-tokens-flex"),
            None
        );
        assert_eq!(
            usage_type_id("us.meta.llama3-2-1b-instruct-v1:0"),
            "meta.llama3-2-1b-instruct"
        );
    }

    #[test]
    fn rendered_prices_parse_as_the_config_reads_them() {
        let full = |r: [f64; 4]| r.map(Some);
        let mut found: BTreeMap<String, BTreeMap<String, Found>> = BTreeMap::new();
        found
            .entry("anthropic.claude-sonnet-4-5-20250929-v1:0".into())
            .or_default()
            .extend([
                (
                    "us-east-1".to_string(),
                    Found {
                        regional: full([3.3, 16.5, 0.33, 4.125]),
                        global: full([3.0, 15.0, 0.3, 3.75]),
                    },
                ),
                (
                    "eu-central-1".to_string(),
                    Found {
                        regional: full([3.6, 18.0, 0.36, 4.5]),
                        global: full([3.0, 15.0, 0.3, 3.75]),
                    },
                ),
            ]);
        found
            .entry("meta.llama3-2-1b-instruct-v1:0".into())
            .or_default()
            .insert(
                "us-east-1".into(),
                Found {
                    regional: [Some(0.1), Some(0.1), None, None],
                    global: [None; 4],
                },
            );
        let (text, skipped) = render(&found, "us-east-1", "2026-12-01");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].1.contains("cache_read_per_mtok"), "{skipped:?}");
        let config = Config::parse(&format!("{text}\n")).unwrap();
        use crate::meter::prices::Tier;
        let sonnet = "anthropic.claude-sonnet-4-5-20250929-v1:0";
        let get = |region: &str, tier| {
            config
                .prices
                .get(sonnet, region, tier)
                .unwrap()
                .input_per_mtok
        };
        assert_eq!(get("us-east-1", Tier::Regional), 3.3);
        assert_eq!(get("us-east-1", Tier::Global), 3.0);
        assert_eq!(get("eu-central-1", Tier::Regional), 3.6);
        assert_eq!(
            get("eu-west-1", Tier::Regional),
            3.3,
            "a region not listed has the model's rate"
        );
    }
    /// A GetProducts answer in the Price List's own shape (tests/it/fixtures), read end to end:
    /// the documents inside `PriceList` strings, batch, long-context and 1-hour-cache items
    /// skipped, regional and Global apart.
    #[test]
    fn a_get_products_answer_for_sonnet_reads_as_its_published_rates() {
        let answer: Value = serde_json::from_str(include_str!(
            "../../tests/it/fixtures/pricing-get-products-claude-sonnet-4-5-us-east-1.json"
        ))
        .unwrap();
        let items: Vec<Value> = answer["PriceList"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| serde_json::from_str(s.as_str().unwrap()).unwrap())
            .collect();
        let found = read_items(&items);
        assert_eq!(
            found.regional,
            [Some(3.3), Some(16.5), Some(0.33), Some(4.125)]
        );
        assert_eq!(found.global, [Some(3.0), Some(15.0), Some(0.3), Some(3.75)]);
    }
}
