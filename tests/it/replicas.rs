//! Several `serve` replicas on one PostgreSQL store: a per-minute rate limit holds for the
//! user across them (not once per replica), and every call through any of them is in the
//! database once, with the tokens the fake served.

use std::time::{Duration, Instant};

use crate::common;

use common::pg::Db;
use common::*;

/// The two-user config on `db`, with `limits` (TOML lines) for alice.
fn config(fake: &FakeBedrock, db: &Db, limits: &str) -> String {
    let users = two_user_config(fake, "").replace(
        "[users.alice.models]",
        &format!("[users.alice.limits]\n{limits}\n[users.alice.models]"),
    );
    format!("{}\n{users}", db.store_table())
}

/// `n` replicas of `config` (which starts with the `[store]` table), each named in it: the
/// default name is the host and the `listen` port, the same `HOST:0` for every test proxy.
async fn replicas(n: usize, config: &str) -> Vec<Proxy> {
    let configs: Vec<String> = (0..n)
        .map(|i| config.replacen("[store]\n", &format!("[store]\nreplica = \"r{i}\"\n"), 1))
        .collect();
    assert!(configs.iter().all(|c| c.contains("replica = ")));
    futures_util::future::join_all(configs.iter().map(|c| Proxy::start(c))).await
}

async fn count(db: &Db, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Alice's `requests_per_minute = 60` through `n` replicas, round-robin: a burst of 150
/// Converse calls over about two seconds (faster than the store poll, so each replica admits
/// on a view of the others that is up to a poll old). Returns (admitted, refused).
async fn burst_through(n: usize) -> (usize, usize) {
    const LIMIT: usize = 60;
    const BURST: usize = 150;
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let proxies = replicas(n, &config(&fake, &db, "requests_per_minute = 60")).await;
    let urls: Vec<String> = proxies.iter().map(Proxy::url).collect();
    let started = Instant::now();
    let mut calls = Vec::with_capacity(BURST);
    for i in 0..BURST {
        let url = urls[i % n].clone();
        calls.push(tokio::spawn(async move {
            send(request(
                http::Method::POST,
                &format!("{url}/model/{SONNET}/converse"),
                &[("authorization", &format!("Bearer {ALICE_KEY}"))],
                CONVERSE_BODY,
            ))
            .await
        }));
        // 75 calls a second in all.
        tokio::time::sleep(Duration::from_millis(13)).await;
    }
    let mut admitted = 0;
    let mut refused = 0;
    for call in calls {
        let r = call.await.unwrap();
        match r.status.as_u16() {
            200 => admitted += 1,
            429 => {
                assert!(
                    r.message().contains("60 requests per minute"),
                    "{}",
                    r.message()
                );
                let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=60).contains(&after), "retry-after {after}");
                refused += 1;
            }
            s => panic!("unexpected status {s}: {:?}", r.body),
        }
    }
    let took = started.elapsed();
    eprintln!(
        "{n} replicas, requests_per_minute = {LIMIT}: {admitted} of {BURST} admitted over {took:?}, {refused} refused"
    );
    assert_eq!(admitted + refused, BURST);
    assert_eq!(
        fake.received().len(),
        admitted,
        "only admitted calls went up"
    );
    (admitted, refused)
}

/// Within 10 % of the limit, for the user in total. Each replica alone would admit up to 60 of
/// its share (75 of 150 with two, 50 with three): 120 or 150 admitted without sharing.
fn assert_within_ten_percent(admitted: usize) {
    assert!(
        (54..=66).contains(&admitted),
        "{admitted} admitted; the limit is 60 per minute across the replicas"
    );
}

#[tokio::test]
async fn a_shared_requests_per_minute_holds_within_ten_percent_over_two_replicas() {
    let (admitted, _) = burst_through(2).await;
    assert_within_ten_percent(admitted);
}

#[tokio::test]
async fn a_shared_requests_per_minute_holds_within_ten_percent_over_three_replicas() {
    let (admitted, _) = burst_through(3).await;
    assert_within_ten_percent(admitted);
}

#[tokio::test]
async fn tokens_per_minute_used_up_on_one_replica_are_refused_by_the_other_within_a_second() {
    // A Converse call of the fake is 9 + 4 + 5 + 6 = 24 tokens: the fifth call crosses 100, so
    // replica B alone would serve five more.
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let config = config(&fake, &db, "tokens_per_minute = 100");
    let [a, b]: [Proxy; 2] = replicas(2, &config).await.try_into().ok().unwrap();
    for _ in 0..5 {
        assert_eq!(converse(&a, SONNET, ALICE_KEY).await.status, 200);
    }
    let crossed = Instant::now();
    let on_a = converse(&a, SONNET, ALICE_KEY).await;
    assert_eq!(on_a.status, 429, "{:?}", on_a.body);
    // A writes its window to the store within a poll; B, idle until now, reads it as soon as
    // it counts a call of its own.
    eventually("A's tokens are in the store's rate window", || async {
        let n = count(
            &db,
            r#"SELECT coalesce(sum(tokens), 0)::bigint FROM rate_window WHERE "user" = 'alice'"#,
        )
        .await;
        (n >= 120).then_some(())
    })
    .await;
    let on_b = eventually("replica B refuses too", || async {
        let r = converse(&b, SONNET, ALICE_KEY).await;
        (r.status == 429).then_some(r)
    })
    .await;
    let took = crossed.elapsed();
    let served_by_b = fake.received().len() - 5;
    eprintln!("B refused {took:?} after A crossed, having served {served_by_b}");
    assert!(
        took < Duration::from_millis(1500),
        "B refused {took:?} after the crossing"
    );
    assert!(
        served_by_b <= 2,
        "B served {served_by_b} calls of a user already over the limit"
    );
    assert!(
        on_b.message().contains("tokens per minute") && on_b.message().contains("used"),
        "{}",
        on_b.message()
    );
    // Bob has no limit, and alice's use is hers: untouched.
    assert_eq!(converse(&b, SONNET, BOB_KEY).await.status, 200);
}

#[tokio::test]
async fn a_thousand_concurrent_calls_over_three_replicas_are_each_in_the_database_once() {
    const N: usize = 1_000;
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let proxies = replicas(
        3,
        &format!("{}\n{}", db.store_table(), two_user_config(&fake, "")),
    )
    .await;
    let urls: Vec<String> = proxies.iter().map(Proxy::url).collect();
    let statuses = concurrently(N, 48, |i| {
        let url = urls[i % urls.len()].clone();
        async move {
            let key = if i % 2 == 0 { ALICE_KEY } else { BOB_KEY };
            // Converse and InvokeModel report different tokens (body and headers).
            let op = if i % 3 == 0 { "invoke" } else { "converse" };
            let body = if op == "invoke" {
                INVOKE_BODY
            } else {
                CONVERSE_BODY
            };
            send(request(
                http::Method::POST,
                &format!("{url}/model/{SONNET}/{op}"),
                &[("authorization", &format!("Bearer {key}"))],
                body,
            ))
            .await
            .status
        }
    })
    .await;
    assert!(statuses.iter().all(|s| *s == 200));
    // Every answer ended once its row was in its replica's spool; the spools ship in a moment.
    for proxy in &proxies {
        proxy.shipped().await;
    }
    let served = fake.received();
    assert_eq!(served.len(), N);
    let per = |op: &str| served.iter().filter(|r| r.op == op).count() as i64;
    let (converse, invoke) = (per("converse"), per("invoke"));
    assert_eq!(converse + invoke, N as i64);
    // What the fake reports per call: Converse in its body, InvokeModel in its headers.
    let want = (
        9 * converse + 11 * invoke,
        4 * converse + 7 * invoke,
        5 * converse + 4 * invoke,
        6 * converse + 3 * invoke,
    );
    assert_eq!(count(&db, "SELECT count(*) FROM requests").await, N as i64);
    assert_eq!(
        count(&db, "SELECT count(DISTINCT request_id) FROM requests").await,
        N as i64
    );
    assert_eq!(
        count(&db, "SELECT count(DISTINCT replica) FROM requests").await,
        3,
        "each replica writes under its own name"
    );
    for table in ["requests", "usage_daily"] {
        let sums = db
            .client()
            .await
            .query_one(
                &format!(
                    "SELECT sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                            sum(cache_read_tokens)::bigint, sum(cache_write_tokens)::bigint
                     FROM {table}"
                ),
                &[],
            )
            .await
            .unwrap();
        let got: (i64, i64, i64, i64) = (sums.get(0), sums.get(1), sums.get(2), sums.get(3));
        assert_eq!(got, want, "token sums in {table}");
    }
    assert_eq!(
        count(&db, "SELECT sum(requests)::bigint FROM usage_daily").await,
        N as i64
    );
    assert_eq!(count(&db, "SELECT count(*) FROM sent").await, 0);
}
