//! The bill's side, through the real binary and the real SDK crates against
//! [`BillingFake`] (Cost Explorer, Price List, STS on 127.0.0.1, every request SigV4-checked):
//! `reconcile` against a ledger the proxy wrote, `prices sync` feeding the next request's cost,
//! and per-user STS sessions signing every user call (`aws.user_role_arn`). Tag activation and
//! the quota are in `provision`, next to the profiles they are about.

use crate::common;

use std::time::Duration;

use common::billing::{BillingFake, FOUNDATION_MODELS, Op, TagStatus, claude_price_items};
use common::*;
use serde_json::Value;

const ROLE: &str = "arn:aws:iam::123456789012:role/bedrock-gate-users";

/// Runs the binary with `args` and `-c` the proxy's config, in its directory.
async fn admin(proxy: &Proxy, args: &[&str]) -> Run {
    let config = proxy.config_path.to_str().unwrap();
    run(proxy.dir.path(), &[args, &["-c", config]].concat()).await
}

/// The ledger's cost per (UTC day, user), as `reconcile` must read it.
fn ledger_costs(proxy: &Proxy) -> Vec<(String, String, f64)> {
    ledger_query(
        proxy,
        "SELECT strftime('%Y-%m-%d', ts_ms / 1000, 'unixepoch'), user, total(cost_usd)
         FROM requests WHERE user IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// Each ledger row's (user, base model, cost).
fn row_costs(proxy: &Proxy) -> Vec<(String, String, Option<f64>)> {
    ledger_query(
        proxy,
        "SELECT user, base_model, cost_usd FROM requests ORDER BY id",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// The fake's Converse usage (9 in, 4 out, 5 cache read, 6 cache write) at these rates.
fn converse_cost(rates: [f64; 4]) -> f64 {
    (9.0 * rates[0] + 4.0 * rates[1] + 5.0 * rates[2] + 6.0 * rates[3]) / 1e6
}

fn day_before(day: &str, n: u64) -> String {
    let d = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
    (d - chrono::Days::new(n)).format("%Y-%m-%d").to_string()
}

/// A proxy on the two-user config with Cost Explorer at the fake, after alice made three
/// Converse calls and bob one; returns it and the ledger's (day, user, cost).
async fn metered() -> (FakeBedrock, BillingFake, Proxy, Vec<(String, String, f64)>) {
    let fake = FakeBedrock::start().await;
    let billing = BillingFake::start().await;
    // Rates high enough that the fake's few tokens cost dollars, so a 50 % difference is
    // also more than the cent below which reconcile never fails.
    let extra = format!(
        "cost_explorer_endpoint = \"{}\"\n{}{}",
        billing.url(),
        expensive(SONNET),
        expensive(HAIKU)
    );
    let proxy = Proxy::start(&two_user_config(&fake, &extra)).await;
    for (model, key) in [
        (SONNET, ALICE_KEY),
        (HAIKU, ALICE_KEY),
        (SONNET, ALICE_KEY),
        (SONNET, BOB_KEY),
    ] {
        assert_eq!(converse(&proxy, model, key).await.status, 200);
    }
    ledger_with(&proxy, 4).await;
    let costs = ledger_costs(&proxy);
    assert!(
        costs.iter().all(|(_, _, c)| *c > 0.0),
        "every call was priced: {costs:?}"
    );
    (fake, billing, proxy, costs)
}

fn expensive(model: &str) -> String {
    format!(
        "[prices.\"{model}\"]\ninput_per_mtok = 100000.0\noutput_per_mtok = 200000.0\n\
         cache_read_per_mtok = 10000.0\ncache_write_per_mtok = 50000.0\n"
    )
}

fn json_rows(run: &Run) -> Vec<Value> {
    let v: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("reconcile --format json is not JSON ({e}):\n{run}"));
    v["rows"].as_array().unwrap().clone()
}

fn find<'a>(rows: &'a [Value], day: &str, user: Option<&str>) -> &'a Value {
    rows.iter()
        .find(|r| r["day"] == day && r["user"].as_str() == user)
        .unwrap_or_else(|| panic!("no row {day} {user:?}: {rows:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_passes_an_equal_bill_and_fails_a_final_day_half_off() {
    let (_fake, billing, proxy, costs) = metered().await;
    billing.set_tag_status("BedrockUser", TagStatus::Active);
    for (day, user, usd) in &costs {
        billing.add_cost(day, &[("BedrockUser", user)], *usd);
    }
    // Bedrock cost no profile carried: shown as untagged, never given to a user.
    let first = costs.first().unwrap().0.clone();
    let last = costs.last().unwrap().0.clone();
    billing.add_cost(&first, &[], 0.25);
    let range = ["--since", first.as_str(), "--until", last.as_str()];

    let run = admin(&proxy, &[&["reconcile"], &range[..]].concat()).await;
    assert!(run.ok, "a bill equal to the ledger passes: {run}");
    assert!(run.stdout.contains("(untagged)"), "{run}");
    assert!(!run.stdout.contains("DIFFERS"), "{run}");
    assert!(run.stdout.contains("untagged $0.2500"), "{run}");

    let json = admin(
        &proxy,
        &[&["reconcile", "--format", "json"], &range[..]].concat(),
    )
    .await;
    assert!(json.ok, "{json}");
    let rows = json_rows(&json);
    for (day, user, usd) in &costs {
        let r = find(&rows, day, Some(user));
        assert!(
            (r["ledger_usd"].as_f64().unwrap() - usd).abs() < 1e-12,
            "{r}"
        );
        assert!(
            (r["billed_usd"].as_f64().unwrap() - usd).abs() < 1e-9,
            "{r}"
        );
        assert_eq!(r["estimated"], false, "{r}");
    }
    let untagged = find(&rows, &first, None);
    assert!((untagged["billed_usd"].as_f64().unwrap() - 0.25).abs() < 1e-9);
    assert_eq!(untagged["ledger_usd"], 0.0);

    // The bill finds half as much again for alice on a final day: 50 % of the ledger.
    let (day, _, alice) = costs.iter().find(|(_, u, _)| u == "alice").unwrap();
    assert!(*alice > 1.0, "{alice}");
    let extra = alice * 0.5;
    billing.add_cost(day, &[("BedrockUser", "alice")], extra);
    let run = admin(&proxy, &[&["reconcile"], &range[..]].concat()).await;
    assert!(!run.ok, "50 % off on a final day fails: {run}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains(" alice ") && l.contains(day.as_str()))
        .unwrap_or_else(|| panic!("no alice row:\n{run}"));
    assert!(line.contains("DIFFERS"), "{line}");
    assert!(run.stderr.contains("differ from the bill"), "{run}");
    let bob = run.stdout.lines().find(|l| l.contains(" bob ")).unwrap();
    assert!(bob.ends_with("ok"), "bob still agrees: {bob}");

    // The dashboard's profiles page shows that last run: when, that it failed, the totals.
    const ADMIN: &str = "bgadmin_billing_0123456789abcdefghijklmnopqrstuvwxy";
    proxy.edit_config(|c| format!("{c}\n[admin]\ntoken_sha256 = \"{}\"\n", hash(ADMIN)));
    let shown = eventually("the dashboard shows the last reconcile", || async {
        let r = proxy.admin_get("/api/profiles", ADMIN).await;
        (r.status == 200).then(|| r.json())
    })
    .await;
    assert_eq!(shown["reconcile"]["ok"], false, "{shown}");
    let result = &shown["reconcile_result"];
    assert_eq!(result["since"], first, "{shown}");
    assert_eq!(result["days_over"], 1, "{shown}");
    let ledger: f64 = costs.iter().map(|(_, _, c)| c).sum();
    let total = &result["total"];
    assert!(
        (total["ledger_usd"].as_f64().unwrap() - ledger).abs() < 1e-9,
        "{total}"
    );
    assert!(
        (total["billed_usd"].as_f64().unwrap() - (ledger + extra + 0.25)).abs() < 1e-6,
        "{total}"
    );

    // A looser tolerance lets it through.
    let loose = admin(
        &proxy,
        &[&["reconcile", "--tolerance", "90"], &range[..]].concat(),
    )
    .await;
    assert!(loose.ok, "{loose}");

    // The same difference on a day Cost Explorer still estimates is no failure.
    billing.set_estimated(day);
    let run = admin(
        &proxy,
        &[&["reconcile", "--format", "json"], &range[..]].concat(),
    )
    .await;
    assert!(run.ok, "estimated days never fail: {run}");
    let rows = json_rows(&run);
    let r = find(&rows, day, Some("alice"));
    assert_eq!(r["estimated"], true, "{r}");
    assert!(
        (r["diff_usd"].as_f64().unwrap() - extra).abs() < 1e-9,
        "{r}"
    );

    // What was asked: daily UnblendedCost grouped by the cost tag, for the mapped models'
    // services only.
    let call = billing.calls_of(Op::GetCostAndUsage).remove(0);
    assert_eq!(call.body["Granularity"], "DAILY", "{}", call.body);
    assert_eq!(call.body["Metrics"], serde_json::json!(["UnblendedCost"]));
    assert_eq!(
        call.body["GroupBy"],
        serde_json::json!([{"Type": "TAG", "Key": "BedrockUser"}])
    );
    let filter = billing.filters().remove(0).expect("a SERVICE filter");
    assert_eq!(filter["Dimensions"]["Key"], "SERVICE", "{filter}");
    let services = filter["Dimensions"]["Values"].as_array().unwrap();
    for s in [
        "Claude Sonnet 4.5 (Amazon Bedrock Edition)",
        "Claude Haiku 4.5 (Amazon Bedrock Edition)",
    ] {
        assert!(services.iter().any(|v| v == s), "{s} in {filter}");
    }
    billing.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_reads_every_page_of_a_month() {
    let (_fake, billing, proxy, costs) = metered().await;
    billing.set_tag_status("BedrockUser", TagStatus::Active);
    billing.set_page_days(1);
    let last = costs.last().unwrap().0.clone();
    let since = day_before(&last, 30);
    for (day, user, usd) in &costs {
        billing.add_cost(day, &[("BedrockUser", user)], *usd);
    }
    // Untagged cost on the first page's day and one in the middle.
    billing.add_cost(&since, &[], 1.0);
    billing.add_cost(&day_before(&last, 15), &[("BedrockUser", "")], 2.0);

    let run = admin(
        &proxy,
        &[
            "reconcile",
            "--format",
            "json",
            "--since",
            &since,
            "--until",
            &last,
        ],
    )
    .await;
    assert!(run.ok, "{run}");
    let pages = billing.count(Op::GetCostAndUsage);
    assert!(pages >= 31, "one day per page, 31 days: {pages} request(s)");
    let rows = json_rows(&run);
    for (day, user, usd) in &costs {
        let r = find(&rows, day, Some(user));
        assert!(
            (r["billed_usd"].as_f64().unwrap() - usd).abs() < 1e-9,
            "the last page was read: {r}"
        );
    }
    let v: Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert!(
        (v["total"]["untagged_usd"].as_f64().unwrap() - 3.0).abs() < 1e-9,
        "{}",
        v["total"]
    );
    // Page tokens continue the same query (the fake refuses one from another).
    billing.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_without_permission_names_it() {
    let (_fake, billing, proxy, costs) = metered().await;
    billing.deny(Op::GetCostAndUsage);
    let day = &costs[0].0;
    let run = admin(&proxy, &["reconcile", "--since", day, "--until", day]).await;
    assert!(!run.ok, "{run}");
    assert!(run.stderr.contains("ce:GetCostAndUsage"), "{run}");
    assert!(run.stderr.contains("Billing access"), "{run}");
    assert!(
        !run.stderr.contains(sigv4::SECRET_KEY),
        "no secret in errors"
    );

    let run = admin(&proxy, &["reconcile", "--since", "2026-13-01"]).await;
    assert!(!run.ok && run.stderr.contains("--since"), "{run}");
}

/// The Price List as AWS publishes Sonnet 4.5 in us-east-1 (the fixture: regional 3.3/16.5,
/// Global 3/15), plus Haiku 4.5 at rates no default table has.
const HAIKU_REGIONAL: [f64; 4] = [1.2, 6.0, 0.12, 1.5];
const HAIKU_GLOBAL: [f64; 4] = [1.1, 5.5, 0.11, 1.375];
const SONNET_REGIONAL: [f64; 4] = [3.3, 16.5, 0.33, 4.125];
const SONNET_GLOBAL: [f64; 4] = [3.0, 15.0, 0.3, 3.75];

fn price_list(billing: &BillingFake) {
    let answer: Value = serde_json::from_str(include_str!(
        "fixtures/pricing-get-products-claude-sonnet-4-5-us-east-1.json"
    ))
    .unwrap();
    let mut items: Vec<Value> = answer["PriceList"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| serde_json::from_str(s.as_str().unwrap()).unwrap())
        .collect();
    for region in ["us-east-1", "us-west-2"] {
        items.extend(claude_price_items(
            "Claude Haiku 4.5 (Amazon Bedrock Edition)",
            region,
            HAIKU_REGIONAL,
            HAIKU_GLOBAL,
        ));
    }
    billing.set_products(FOUNDATION_MODELS, items);
}

/// Alice on Sonnet (a regional profile) and Haiku; bob on Sonnet through a profile made from
/// the `global.` system profile, which pays the Global rate.
fn priced_config(fake: &FakeBedrock, billing: &BillingFake, extra_alice: &str) -> String {
    format!(
        r#"
[aws]
region = "us-east-1"
runtime_endpoint = "{url}"
pricing_endpoint = "{billing}"
[users.alice]
keys = ["{ka}"]
[users.alice.models]
"{SONNET}" = "{a_sonnet}"
"{HAIKU}" = "{a_haiku}"
{extra_alice}
[users.bob]
keys = ["{kb}"]
[users.bob.models]
"global.{SONNET}" = "{b_sonnet}"
"#,
        url = fake.url(),
        billing = billing.url(),
        ka = hash(ALICE_KEY),
        kb = hash(BOB_KEY),
        a_sonnet = alice_sonnet(),
        a_haiku = alice_haiku(),
        b_sonnet = bob_sonnet(),
    )
}

async fn generation(proxy: &Proxy) -> u64 {
    proxy.health().await["config_generation"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn prices_sync_writes_the_rates_the_next_request_pays_regional_and_global() {
    let fake = FakeBedrock::start().await;
    let billing = BillingFake::start().await;
    price_list(&billing);
    let proxy = Proxy::start(&priced_config(&fake, &billing, "")).await;
    // Before: the shipped table (Haiku 4.5 regional 1.10/5.50/0.11/1.375).
    assert_eq!(converse(&proxy, HAIKU, ALICE_KEY).await.status, 200);

    let run = admin(&proxy, &["prices", "sync"]).await;
    assert!(run.ok, "{run}");
    assert!(
        run.stdout
            .contains("the config now includes prices_file = \"prices.toml\""),
        "{run}"
    );
    let file = std::fs::read_to_string(proxy.dir.path().join("prices.toml")).unwrap();
    let toml: toml::Table = toml::from_str(&file).unwrap();
    let rates = |t: &toml::Value| -> [f64; 4] {
        [
            "input_per_mtok",
            "output_per_mtok",
            "cache_read_per_mtok",
            "cache_write_per_mtok",
        ]
        .map(|k| t[k].as_float().unwrap_or_else(|| panic!("{k} in {t}")))
    };
    let sonnet = &toml["prices"][SONNET];
    assert_eq!(rates(sonnet), SONNET_REGIONAL, "{file}");
    assert_eq!(rates(&sonnet["global"]), SONNET_GLOBAL, "{file}");
    let haiku = &toml["prices"][HAIKU];
    assert_eq!(rates(haiku), HAIKU_REGIONAL, "{file}");
    assert_eq!(rates(&haiku["global"]), HAIKU_GLOBAL, "{file}");
    assert!(
        haiku.get("regions").is_none(),
        "us-west-2 has the same rates, so no region table: {file}"
    );
    let config = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert!(config.contains("prices_file = \"prices.toml\""), "{config}");
    // The query named each model's Marketplace service in each region it is used in.
    let queries: Vec<Value> = billing
        .calls_of(Op::GetProducts)
        .iter()
        .map(|c| c.body["Filters"].clone())
        .collect();
    let asked = |service: &str, region: &str| {
        queries.iter().any(|f| {
            let f = f.as_array().unwrap();
            f.iter()
                .any(|x| x["Field"] == "servicename" && x["Value"] == service)
                && f.iter()
                    .any(|x| x["Field"] == "regionCode" && x["Value"] == region)
        })
    };
    assert!(asked(
        "Claude Haiku 4.5 (Amazon Bedrock Edition)",
        "us-west-2"
    ));
    assert!(asked(
        "Claude Sonnet 4.5 (Amazon Bedrock Edition)",
        "us-east-1"
    ));

    // The running proxy picks the file up like the config; the next request pays it.
    eventually("the synced prices go live", || async {
        (generation(&proxy).await >= 2).then_some(())
    })
    .await;
    for (model, key) in [(HAIKU, ALICE_KEY), (SONNET, ALICE_KEY), (SONNET, BOB_KEY)] {
        assert_eq!(converse(&proxy, model, key).await.status, 200);
    }
    ledger_with(&proxy, 4).await;
    let rows = row_costs(&proxy);
    assert_eq!(rows.len(), 4, "{rows:?}");
    let close = |got: Option<f64>, want: f64| {
        let got = got.expect("priced");
        assert!((got - want).abs() < 1e-12, "cost {got}, want {want}");
    };
    close(rows[0].2, converse_cost([1.10, 5.50, 0.11, 1.375]));
    close(rows[1].2, converse_cost(HAIKU_REGIONAL));
    close(rows[2].2, converse_cost(SONNET_REGIONAL));
    assert_eq!(rows[3].0, "bob");
    close(rows[3].2, converse_cost(SONNET_GLOBAL));
    billing.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn prices_sync_reports_a_model_the_price_list_lacks_and_guesses_nothing() {
    let fake = FakeBedrock::start().await;
    let billing = BillingFake::start().await;
    price_list(&billing);
    let unknown = "anthropic.claude-nonexistent-v1:0";
    let extra = format!(
        "\"{unknown}\" = \"{}\"",
        arn("us-east-1", "alicenonexistent1")
    );
    let proxy = Proxy::start(&priced_config(&fake, &billing, &extra)).await;

    let run = admin(&proxy, &["prices", "sync"]).await;
    assert!(!run.ok, "an unpriced model fails the sync: {run}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("NOT PRICED"))
        .unwrap_or_else(|| panic!("not reported:\n{run}"));
    assert!(line.contains(unknown), "{line}");
    assert!(line.contains(&format!("[prices.\"{unknown}\"]")), "{line}");
    let file = std::fs::read_to_string(proxy.dir.path().join("prices.toml")).unwrap();
    assert!(!file.contains("nonexistent"), "never guessed: {file}");
    assert!(file.contains(HAIKU), "the others are still written: {file}");

    // A caller denied pricing:GetProducts is told which permission.
    billing.deny(Op::GetProducts);
    let run = admin(&proxy, &["prices", "sync"]).await;
    assert!(
        !run.ok && run.stderr.contains("pricing:GetProducts"),
        "{run}"
    );
}

/// Two users' calls through a proxy with `aws.user_role_arn`, Bedrock and STS both checking
/// signatures against what STS issued.
async fn with_role(extra: &str) -> (FakeBedrock, BillingFake, Proxy) {
    let billing = BillingFake::start().await;
    let fake = FakeBedrock::start_with_keyring(billing.keyring()).await;
    let extra = format!(
        "user_role_arn = \"{ROLE}\"\nsts_endpoint = \"{}\"\n{extra}",
        billing.url()
    );
    let proxy = Proxy::start(&two_user_config(&fake, &extra)).await;
    (fake, billing, proxy)
}

/// The access key that signed each request Bedrock received, failing on a bad signature.
fn signers(fake: &FakeBedrock) -> Vec<String> {
    fake.received()
        .iter()
        .map(|r| match &r.signature {
            Ok(v) => v.access_key.clone(),
            Err(e) => panic!("{} {} was not signed validly: {e}", r.method, r.raw_path),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_user_is_signed_by_a_session_of_their_own_assumed_once() {
    let (fake, billing, proxy) = with_role("").await;
    let proxy = std::sync::Arc::new(proxy);
    // Twelve calls each, six at a time, from a cold cache: one AssumeRole per user.
    let statuses = concurrently(24, 12, |i| {
        let proxy = proxy.clone();
        async move {
            let key = if i % 2 == 0 { ALICE_KEY } else { BOB_KEY };
            converse(&proxy, SONNET, key).await.status.as_u16()
        }
    })
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Messages and streaming take the same path to their signature.
    let r = messages(
        &proxy,
        ALICE_KEY,
        &messages_body("claude-sonnet-4-5", true),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);

    assert_eq!(billing.count(Op::AssumeRole), 2, "{:?}", billing.issued());
    let issued = billing.issued();
    let of = |user: &str| {
        issued
            .iter()
            .find(|i| i.session_name == user)
            .unwrap_or_else(|| panic!("no session for {user}: {issued:?}"))
    };
    let (alice, bob) = (of("alice"), of("bob"));
    for (i, user) in [(alice, "alice"), (bob, "bob")] {
        assert_eq!(i.role_arn, ROLE);
        assert!(
            i.tags.contains(&("BedrockUser".into(), user.into())),
            "session tags {:?}",
            i.tags
        );
    }
    let seen = signers(&fake);
    assert_eq!(seen.len(), 25);
    assert!(
        !seen.iter().any(|k| k == sigv4::ACCESS_KEY),
        "a user call signed with the proxy's own key: {seen:?}"
    );
    let by_profile = |profile: &str| -> Vec<String> {
        fake.received()
            .iter()
            .filter(|r| r.model == profile)
            .map(|r| r.signature.as_ref().unwrap().access_key.clone())
            .collect()
    };
    let a = by_profile(&alice_sonnet());
    let b = by_profile(&bob_sonnet());
    assert_eq!((a.len(), b.len()), (13, 12));
    assert!(a.iter().all(|k| *k == alice.access_key), "{a:?}");
    assert!(b.iter().all(|k| *k == bob.access_key), "{b:?}");
    assert_ne!(alice.access_key, bob.access_key);
    // The proxy signed STS with its own identity, and said nothing secret.
    billing.assert_clean();
    let logs = proxy.settled_logs().await;
    for secret in [&alice.secret_key, &alice.session_token, &bob.secret_key] {
        assert!(!logs.contains(secret.as_str()), "a credential in the log");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_renewed_before_it_expires_without_a_failed_call() {
    let (fake, billing, proxy) = with_role("").await;
    // STS hands out four-second sessions: renewed once less than a second is left.
    billing.set_lifetime(Duration::from_secs(4));
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    let first = billing.issued()[0].clone();
    let mut statuses = Vec::new();
    // Keep calling for six seconds, past the first session's end; AWS refuses a key once
    // it has expired, so the fake forgets it then.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        if std::time::SystemTime::now() >= first.expiration {
            billing.keyring().remove(&first.access_key);
        }
        statuses.push(converse(&proxy, SONNET, ALICE_KEY).await.status.as_u16());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "no call failed across the renewal: {statuses:?}"
    );
    let issued = billing.issued();
    assert!(
        (2..=4).contains(&issued.len()),
        "renewed, not per call: {} AssumeRole(s) for {} calls",
        issued.len(),
        statuses.len() + 1
    );
    let seen = signers(&fake);
    assert!(
        seen.iter().any(|k| *k != first.access_key),
        "a new session signed"
    );
    assert!(!seen.iter().any(|k| k == sigv4::ACCESS_KEY));
}

#[tokio::test(flavor = "multi_thread")]
async fn sts_down_refuses_the_call_and_never_signs_it_as_the_proxy() {
    let (fake, billing, proxy) = with_role("").await;
    billing.set_sts_down(true);

    let r = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.error_type(), "ServiceUnavailableException");
    assert!(r.message().contains(ROLE), "{}", r.message());
    assert!(r.message().contains("alice"), "{}", r.message());

    let m = messages(
        &proxy,
        BOB_KEY,
        &messages_body("claude-sonnet-4-5", false),
        &[],
    )
    .await;
    assert_eq!(m.status, 503);
    let (kind, message) = m.anthropic_error();
    assert_eq!(kind, "api_error");
    assert!(message.contains(ROLE), "{message}");

    assert!(
        fake.received().is_empty(),
        "nothing reached Bedrock: {:?}",
        fake.received().len()
    );
    // The ledger says why.
    let rows = ledger_with(&proxy, 2).await;
    assert!(rows.iter().all(|r| r.status == 503), "{rows:?}");

    // STS back: the next call goes through on a session.
    billing.set_sts_down(false);
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    let seen = signers(&fake);
    assert_eq!(seen.len(), 1);
    assert_ne!(seen[0], sigv4::ACCESS_KEY);

    // Denied by IAM is the same refusal (the operator reads the cause in the log).
    billing.deny(Op::AssumeRole);
    let r = converse(&proxy, SONNET, BOB_KEY).await;
    assert_eq!(r.status, 503);
    let logs = proxy.wait_for_log("error=AccessDenied").await;
    assert!(logs.contains("STS AssumeRole failed user=bob"), "{logs}");
    assert_eq!(fake.received().len(), 1);
}
