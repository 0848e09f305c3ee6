//! Metering through the real binary: exact token totals per operation in the ledger, budgets
//! and rate limits, restart safety, the `usage` report and `/metrics`.

use crate::common;

use common::*;
use http::Method;

#[derive(Debug, PartialEq)]
struct Row {
    user: Option<String>,
    operation: String,
    status: i64,
    tokens: (i64, i64, i64, i64),
    cost: Option<f64>,
    complete: bool,
    outcome: String,
    profile: Option<String>,
}

fn rows(proxy: &Proxy) -> Vec<Row> {
    ledger_query(
        proxy,
        "SELECT user, operation, status, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                cost_usd, complete, outcome, profile_arn FROM requests ORDER BY id",
        |r| {
            Ok(Row {
                user: r.get(0)?,
                operation: r.get(1)?,
                status: r.get(2)?,
                tokens: (r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
                cost: r.get(7)?,
                complete: r.get(8)?,
                outcome: r.get(9)?,
                profile: r.get(10)?,
            })
        },
    )
}

#[tokio::test]
async fn exact_token_totals_for_every_operation_including_cache_and_a_cut_stream() {
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "")).await;
    assert_eq!(
        post(
            &proxy,
            &format!("/model/{SONNET}/invoke"),
            ALICE_KEY,
            INVOKE_BODY
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(
            &proxy,
            &format!("/model/{SONNET}/invoke-with-response-stream"),
            ALICE_KEY,
            INVOKE_BODY
        )
        .await
        .status,
        200
    );
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    assert_eq!(
        post(
            &proxy,
            &format!("/model/{SONNET}/converse-stream"),
            ALICE_KEY,
            CONVERSE_BODY
        )
        .await
        .status,
        200
    );

    // A stream the client abandons after the first event: read to its end anyway, since
    // Bedrock bills all of it.
    let gate = fake.gate_streams();
    let body = alice_stream_in_flight(&proxy).await;
    drop(body);
    for _ in 0..16 {
        if gate.send(()).await.is_err() {
            break;
        }
    }
    proxy.wait_for_log("client_gone").await;

    assert!(proxy.terminate().success());
    let got = rows(&proxy);
    let ops: Vec<&str> = got.iter().map(|r| r.operation.as_str()).collect();
    assert_eq!(
        ops,
        [
            "InvokeModel",
            "InvokeModelWithResponseStream",
            "Converse",
            "ConverseStream",
            "InvokeModelWithResponseStream"
        ]
    );
    // (input, output, cache read, cache write) exactly as the fake sent them.
    assert_eq!(got[0].tokens, (11, 7, 4, 3));
    assert_eq!(got[1].tokens, (25, 6, 3, 2));
    assert_eq!(got[2].tokens, (9, 4, 5, 6));
    assert_eq!(got[3].tokens, (9, 5, 1, 2));
    assert_eq!(
        got[4].tokens,
        (25, 6, 3, 2),
        "all of the abandoned stream, as Bedrock billed it"
    );
    assert!(
        got[..4]
            .iter()
            .all(|r| r.complete && r.outcome == "complete" && r.status == 200)
    );
    assert!(got[4].complete);
    assert_eq!(got[4].outcome, "client_gone");
    assert!(
        got.iter()
            .all(|r| r.user.as_deref() == Some("alice") && r.profile == Some(alice_sonnet()))
    );
    // Sonnet 4.5 on a geographic (us.) profile, the regional rate: $3.30 / $16.50 / $0.33 /
    // $4.125 per million.
    let want = (11.0 * 3.3 + 7.0 * 16.5 + 4.0 * 0.33 + 3.0 * 4.125) / 1e6;
    assert!(
        (got[0].cost.unwrap() - want).abs() < 1e-12,
        "{:?}",
        got[0].cost
    );
}

#[tokio::test]
async fn a_thousand_concurrent_requests_make_a_thousand_rows_with_matching_sums() {
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let url = proxy.url();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let url = url.clone();
        tasks.spawn(async move {
            let (key, path) = match i % 4 {
                0 => (ALICE_KEY, format!("/model/{SONNET}/converse")),
                1 => (BOB_KEY, format!("/model/{SONNET}/invoke")),
                2 => (ALICE_KEY, format!("/model/{HAIKU}/converse-stream")),
                _ => (
                    BOB_KEY,
                    format!("/model/{SONNET}/invoke-with-response-stream"),
                ),
            };
            let body = if path.contains("converse") {
                CONVERSE_BODY
            } else {
                INVOKE_BODY
            };
            let auth = format!("Bearer {key}");
            let r = send(request(
                Method::POST,
                &format!("{url}{path}"),
                &[("authorization", &auth)],
                body,
            ))
            .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    assert!(proxy.terminate().success(), "SIGTERM flushes and exits 0");
    let got = rows(&proxy);
    assert_eq!(got.len(), 1000);
    let sum = |f: fn(&Row) -> i64| got.iter().map(f).sum::<i64>();
    // 250 of each: converse (9,4,5,6), invoke (11,7,4,3), converse-stream (9,5,1,2), stream (25,6,3,2)
    assert_eq!(sum(|r| r.tokens.0), 250 * (9 + 11 + 9 + 25));
    assert_eq!(sum(|r| r.tokens.1), 250 * (4 + 7 + 5 + 6));
    assert_eq!(sum(|r| r.tokens.2), 250 * (5 + 4 + 1 + 3));
    assert_eq!(sum(|r| r.tokens.3), 250 * (6 + 3 + 2 + 2));
    assert_eq!(
        got.iter()
            .filter(|r| r.user.as_deref() == Some("bob"))
            .count(),
        500
    );
    assert_eq!(fake.received().len(), 1000);
}

#[tokio::test]
async fn budget_refusal_survives_a_restart_and_lifting_it_applies_live() {
    let fake = FakeBedrock::start().await;
    let config = two_user_config(&fake, "").replace(
        "[users.alice.models]",
        "[users.alice.limits]\nmonthly_budget_usd = 0.00001\n[users.alice.models]",
    );
    let proxy = Proxy::start(&config).await;
    let first = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(first.status, 200);
    let refused = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.error_type(), "ThrottlingException");
    let msg = refused.message();
    assert!(
        msg.contains("monthly budget of $0.00")
            && msg.contains("monthly_budget_usd")
            && msg.contains("resets at"),
        "{msg}"
    );
    assert_eq!(converse(&proxy, SONNET, BOB_KEY).await.status, 200);

    // A restart is not a budget reset: the counter is rebuilt from the ledger.
    let proxy = proxy.restart(&[]).await;
    let still = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(still.status, 429, "budget forgotten across restart");
    let usage = send(request(
        Method::GET,
        &format!("{}/usage", proxy.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        "",
    ))
    .await
    .json();
    assert_eq!(usage["user"], "alice");
    assert_eq!(
        usage["requests"], 3,
        "one served call and two refusals, rebuilt from the ledger"
    );
    assert_eq!(usage["input_tokens"], 9);
    assert_eq!(usage["budget_remaining_usd"], 0.0);

    // Raising the budget in the file takes effect without a restart.
    proxy.edit_config(|t| t.replace("monthly_budget_usd = 0.00001", "monthly_budget_usd = 100"));
    eventually("the raised budget applies", || async {
        let r = converse(&proxy, SONNET, ALICE_KEY).await;
        (r.status == 200).then_some(())
    })
    .await;
    assert!(fake.received().len() >= 3);
}

#[tokio::test]
async fn rate_limits_refuse_with_the_limit_and_can_be_lifted_live() {
    let fake = FakeBedrock::start().await;
    let config = two_user_config(&fake, "").replace(
        "[users.bob.models]",
        "[users.bob.limits]\nrequests_per_minute = 2\n[users.bob.models]",
    );
    let proxy = Proxy::start(&config).await;
    for _ in 0..2 {
        assert_eq!(converse(&proxy, SONNET, BOB_KEY).await.status, 200);
    }
    let r = converse(&proxy, SONNET, BOB_KEY).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_type(), "ThrottlingException");
    assert!(
        r.message().contains("2 requests per minute") && r.message().contains("Retry in"),
        "{}",
        r.message()
    );
    assert_eq!(
        fake.received().len(),
        2,
        "the refusal never reached Bedrock"
    );

    proxy.edit_config(|t| t.replace("requests_per_minute = 2", "requests_per_minute = 100"));
    eventually("the lifted limit applies", || async {
        let r = converse(&proxy, SONNET, BOB_KEY).await;
        (r.status == 200).then_some(())
    })
    .await;

    // Three converse calls of 9+4+5+6 tokens are over a 30 tokens-per-minute limit.
    proxy.edit_config(|t| t.replace("requests_per_minute = 100", "tokens_per_minute = 30"));
    let r = eventually("the token limit applies", || async {
        let r = converse(&proxy, SONNET, BOB_KEY).await;
        (r.status == 429).then_some(r)
    })
    .await;
    assert!(
        r.message().contains("30 tokens per minute")
            && r.message().contains("used in the last minute"),
        "{}",
        r.message()
    );
}

#[tokio::test]
async fn usage_report_in_all_formats_and_metrics_parse() {
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "")).await;
    converse(&proxy, SONNET, ALICE_KEY).await;
    post(
        &proxy,
        &format!("/model/{HAIKU}/invoke"),
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    converse(&proxy, SONNET, BOB_KEY).await;
    post(
        &proxy,
        &format!("/model/us.{OPUS}/converse"),
        BOB_KEY,
        CONVERSE_BODY,
    )
    .await; // refused: unmapped

    let text = metrics_text(&proxy).await;
    parse_prometheus(&text);
    assert!(
        text.contains(
            r#"bedrock_gate_requests_total{user="alice",operation="Converse",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"bedrock_gate_requests_total{user="bob",operation="Converse",status="403"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            r#"bedrock_gate_tokens_total{{user="alice",model="{HAIKU}",kind="input"}} 11"#
        )),
        "{text}"
    );
    assert!(text.contains("bedrock_gate_config_generation 1"), "{text}");
    // The admin listener does not proxy.
    let r = send(request(
        Method::POST,
        &format!("{}/model/{SONNET}/converse", proxy.admin_url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        CONVERSE_BODY,
    ))
    .await;
    assert_eq!(r.status, 404);

    assert!(proxy.terminate().success());
    let run = |format: &str, by: &str| {
        let out = command(proxy.dir.path())
            .args(["usage", "--config"])
            .arg(&proxy.config_path)
            .args([
                "--format",
                format,
                "--by",
                by,
                "--since",
                "2000-01-01",
                "--until",
                "2100-01-01",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run("table", "user");
    assert!(
        table.contains("TOTAL") && table.contains("alice") && table.contains("bob"),
        "{table}"
    );
    let csv = run("csv", "model");
    assert!(csv.starts_with("model,requests,"), "{csv}");
    assert!(
        csv.lines()
            .any(|l| l.starts_with(&format!("{HAIKU},1,11,7,4,3,"))),
        "{csv}"
    );
    let json: serde_json::Value = serde_json::from_str(&run("json", "user")).unwrap();
    assert_eq!(json["total"]["requests"], 4);
    let bob = json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "bob")
        .unwrap();
    assert_eq!(bob["requests"], 2);
    assert_eq!(bob["error_requests"], 1);
    let by_day = run("json", "day");
    assert!(
        by_day.contains(&chrono::Utc::now().format("%Y-%m-%d").to_string()),
        "{by_day}"
    );
}

/// Checks every line is valid Prometheus/OpenMetrics text exposition.
fn parse_prometheus(text: &str) {
    assert!(text.ends_with("# EOF\n"), "no EOF marker");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let kw = rest.split(' ').next().unwrap();
            assert!(
                ["HELP", "TYPE", "UNIT", "EOF"].contains(&kw),
                "bad comment line: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels: {line}");
            for pair in series[name_end + 1..series.len() - 1].split("\",") {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in: {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name: {line}"
                );
                assert!(!v.contains('\n'));
            }
        }
    }
}

#[tokio::test]
async fn bedrock_gate_ledger_points_serve_and_usage_at_another_database() {
    let fake = FakeBedrock::start().await;
    let volume = tempfile::tempdir().unwrap();
    let db = volume.path().join("usage.db");
    let db_text = db.to_str().unwrap();
    let mut proxy = Proxy::start_with_env(
        &sqlite_only(&two_user_config(&fake, "")),
        &[],
        &[("BEDROCK_GATE_LEDGER", db_text)],
    )
    .await;
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    assert!(proxy.terminate().success());
    assert!(
        db.exists(),
        "the ledger went where BEDROCK_GATE_LEDGER said"
    );
    assert!(!proxy.ledger_path().exists(), "and not next to the config");
    let out = command(proxy.dir.path())
        .args(["usage", "--format", "csv", "--ledger", db_text, "--config"])
        .arg(&proxy.config_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(csv.lines().any(|l| l.starts_with("alice,1,")), "{csv}");
}

#[tokio::test]
async fn bedrock_errors_are_recorded_as_errors_not_as_complete() {
    // A 429 answer, a 500 and a stream an exception frame ended: each row names the error, and
    // `usage` and /metrics count them as errors.
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    fake.script(
        &alice_sonnet(),
        fake::Script::Error(429, "ThrottlingException", "slow down"),
    );
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 429);
    fake.script(
        &alice_sonnet(),
        fake::Script::Error(500, "InternalServerException", "boom"),
    );
    let m = messages(
        &proxy,
        ALICE_KEY,
        &messages_body("claude-sonnet-4-5", false),
        &[],
    )
    .await;
    assert_eq!(m.status, 500, "{:?}", m.body);
    fake.script(
        &alice_haiku(),
        fake::Script::MidStreamException("throttlingException", "mid-stream slow down"),
    );
    let s = post(
        &proxy,
        &format!("/model/{HAIKU}/invoke-with-response-stream"),
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(s.status, 200, "the stream started");
    assert_eq!(converse(&proxy, SONNET, BOB_KEY).await.status, 200);

    let rows = ledger_with(&proxy, 4).await;
    let outcomes: Vec<(&str, i64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.user.as_deref().unwrap_or("-"),
                r.status,
                r.outcome.as_str(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            ("alice", 429, "ThrottlingException"),
            ("alice", 500, "InternalServerException"),
            ("alice", 200, "ThrottlingException"),
            ("bob", 200, "complete"),
        ]
    );
    let config = proxy.config_path.to_str().unwrap().to_string();
    let usage = run(
        proxy.dir.path(),
        &["usage", "-c", &config, "--by", "user", "--format", "json"],
    )
    .await;
    assert!(usage.ok, "{}", usage.stderr);
    let v: serde_json::Value = serde_json::from_str(&usage.stdout).unwrap();
    let alice = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "alice")
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    assert_eq!(alice["error_requests"], 3, "{alice}");
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains(
            "bedrock_gate_upstream_errors_total{user=\"alice\",operation=\"InvokeModelWithResponseStream\",kind=\"ThrottlingException\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_flood_of_refusals_does_not_flood_the_ledger() {
    // A rate-limited caller hammering the proxy (with invented model names too) writes at most
    // the cap of refusal rows a minute; the rest are counted on /metrics.
    let fake = FakeBedrock::start().await;
    let config = two_user_config(&fake, "").replace(
        "[users.bob.models]",
        "[users.bob.limits]\nrequests_per_minute = 1\n[users.bob.models]",
    );
    let proxy = Proxy::start(&config).await;
    assert_eq!(converse(&proxy, SONNET, BOB_KEY).await.status, 200);
    let sent = 150;
    for i in 0..sent {
        let model = if i % 2 == 0 {
            SONNET.to_string()
        } else {
            format!("invented.model-{i}")
        };
        let r = converse(&proxy, &model, BOB_KEY).await;
        assert!(r.status == 429 || r.status == 403, "{}", r.status);
    }
    assert_eq!(
        converse(&proxy, SONNET, ALICE_KEY).await.status,
        200,
        "others unaffected"
    );
    let text = metrics_text(&proxy).await;
    let dropped: u64 = text
        .lines()
        .find(|l| l.starts_with("bedrock_gate_refusals_not_recorded_total{user=\"bob\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refusal counter for bob:\n{text}"));
    let rows = ledger_with(&proxy, 2).await;
    let bob = rows
        .iter()
        .filter(|r| r.user.as_deref() == Some("bob"))
        .count() as u64;
    // A minute boundary may fall inside the run: at most two minutes' worth of rows.
    assert!(bob <= 1 + 2 * 60, "{bob} rows for bob");
    assert_eq!(bob - 1 + dropped, sent, "every refusal is a row or a count");
    proxy.wait_for_log("not written to the ledger").await;
}
