//! The PostgreSQL store's schema and import, against a real PostgreSQL: `store migrate` from
//! several processes at once, and `store import-sqlite` run twice moving each row once.

use crate::common;

use common::pg::{self, Db};
use common::*;

fn config_with(fake: &FakeBedrock, db: &Db) -> String {
    format!("{}\n{}", db.store_table(), two_user_config(fake, ""))
}

/// [`config_with`], reaching the database through `relay` (which a test may cut).
fn config_via(fake: &FakeBedrock, db: &Db, relay: &pg::Relay) -> String {
    format!(
        "{}\n{}",
        db.store_table_via(relay),
        two_user_config(fake, "")
    )
}

#[tokio::test]
async fn migrate_from_three_processes_at_once_applies_each_version_once() {
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gate.toml");
    std::fs::write(&path, config_with(&fake, &db)).unwrap();
    let path = path.to_str().unwrap().to_string();
    let runs = futures_util::future::join_all((0..3).map(|_| {
        let path = path.clone();
        let dir = dir.path().to_path_buf();
        async move { run(&dir, &["store", "migrate", "-c", &path]).await }
    }))
    .await;
    for r in &runs {
        assert!(r.ok, "{r}");
    }
    let applied = runs
        .iter()
        .filter(|r| r.stdout.contains("applied schema version"))
        .count();
    assert_eq!(applied, 1, "one process applies, the others find it done");
    let client = db.client().await;
    let versions: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let all: Vec<i32> = bedrock_gate::store::pg::MIGRATIONS
        .iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(versions, all);
    assert_eq!(versions, (1..=all.len() as i32).collect::<Vec<_>>());
    // Again: nothing to do.
    let again = run(dir.path(), &["store", "migrate", "-c", &path]).await;
    assert!(again.ok && again.stdout.contains("up to date"), "{again}");
    assert!(!again.stdout.contains("password"));
}

#[tokio::test]
async fn import_sqlite_twice_moves_each_row_once_with_its_rollup() {
    // A real ledger: calls of both users through the fake, then the proxy stopped.
    let fake = FakeBedrock::start().await;
    let mut proxy = Proxy::start(&two_user_config(&fake, "")).await;
    for _ in 0..3 {
        assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    }
    assert_eq!(converse(&proxy, SONNET, BOB_KEY).await.status, 200);
    assert_eq!(converse(&proxy, HAIKU, BOB_KEY).await.status, 403);
    let r = post(
        &proxy,
        &format!("/model/{SONNET}/invoke-with-response-stream"),
        ALICE_KEY,
        INVOKE_BODY,
    )
    .await;
    assert_eq!(r.status, 200);
    ledger_with(&proxy, 6).await;
    assert!(proxy.terminate().success());
    let sqlite = proxy.ledger_path();
    let rows = ledger(&proxy);
    assert_eq!(rows.len(), 6);

    let db = Db::create().await;
    let path = proxy.dir.path().join("store.toml");
    std::fs::write(&path, config_with(&fake, &db)).unwrap();
    let args = [
        "store",
        "import-sqlite",
        sqlite.to_str().unwrap(),
        "-c",
        path.to_str().unwrap(),
    ];
    // Rows a crashed `serve` left in the ledger's spool are not in the file yet: refused.
    let spool = proxy.dir.path().join("bedrock-gate.db-spool");
    assert_eq!(std::fs::metadata(&spool).map_or(0, |m| m.len()), 0);
    std::fs::write(&spool, "{\"Row\":{}}\n").unwrap();
    let refused = run(proxy.dir.path(), &args).await;
    assert!(!refused.ok, "{refused}");
    assert!(
        refused.stderr.contains("bedrock-gate.db-spool")
            && refused.stderr.contains("start it once"),
        "{refused}"
    );
    std::fs::write(&spool, "").unwrap();
    let first = run(proxy.dir.path(), &args).await;
    assert!(first.ok, "{first}");
    assert!(first.stdout.contains("6 were new"), "{first}");
    let second = run(proxy.dir.path(), &args).await;
    assert!(second.ok, "{second}");
    assert!(
        second.stdout.contains("0 were new") && second.stdout.contains("6 already there"),
        "{second}"
    );

    let client = db.client().await;
    let count: i64 = client
        .query_one("SELECT count(*) FROM requests", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 6);
    let distinct: i64 = client
        .query_one("SELECT count(DISTINCT request_id) FROM requests", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 6);
    // The rollup holds what the rows hold, once.
    let sums = client
        .query_one(
            "SELECT sum(requests)::bigint, sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                    sum(errors)::bigint
             FROM usage_daily",
            &[],
        )
        .await
        .unwrap();
    let want_input: i64 = rows.iter().map(|r| r.tokens.0).sum();
    let want_output: i64 = rows.iter().map(|r| r.tokens.1).sum();
    assert_eq!(sums.get::<_, i64>(0), 6);
    assert_eq!(sums.get::<_, i64>(1), want_input);
    assert_eq!(sums.get::<_, i64>(2), want_output);
    assert_eq!(sums.get::<_, i64>(3), 1, "the 403 is an error");
    let per_user: Vec<(String, i64)> = client
        .query(
            r#"SELECT "user", sum(requests)::bigint FROM usage_daily GROUP BY "user" ORDER BY 1"#,
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(per_user, [("alice".to_string(), 4), ("bob".to_string(), 2)]);
}

#[tokio::test]
async fn a_store_url_with_a_password_never_shows_it() {
    let fake = FakeBedrock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gate.toml");
    // Nothing listens on port 9: the connection fails, and the error names the URL.
    std::fs::write(
        &path,
        format!(
            "[store]\nurl = \"postgres://gate:hunter2-secret@127.0.0.1:9/gate?sslmode=disable\"\n{}",
            two_user_config(&fake, "")
        ),
    )
    .unwrap();
    let r = run(
        dir.path(),
        &["store", "migrate", "-c", path.to_str().unwrap()],
    )
    .await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("postgres://gate:*****@127.0.0.1:9"),
        "{r}"
    );
    assert!(
        !r.stderr.contains("hunter2") && !r.stdout.contains("hunter2"),
        "{r}"
    );
}

async fn count(db: &Db, sql: &str) -> i64 {
    db.client().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn serve_on_postgres_records_every_call_once_and_rebuilds_its_counters_after_a_restart() {
    const N: usize = 200;
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let proxy = Proxy::start(&config_with(&fake, &db)).await;
    let url = proxy.url();
    let statuses = concurrently(N, 32, |i| {
        let url = url.clone();
        async move {
            let key = if i % 2 == 0 { ALICE_KEY } else { BOB_KEY };
            send(request(
                http::Method::POST,
                &format!("{url}/model/{SONNET}/converse"),
                &[("authorization", &format!("Bearer {key}"))],
                CONVERSE_BODY,
            ))
            .await
            .status
        }
    })
    .await;
    assert!(statuses.iter().all(|s| *s == 200));
    // Every answer ended once its row was in the spool, synced; it ships in a moment.
    proxy.shipped().await;
    assert_eq!(count(&db, "SELECT count(*) FROM requests").await, N as i64);
    assert_eq!(
        count(&db, "SELECT count(DISTINCT request_id) FROM requests").await,
        N as i64
    );
    assert_eq!(
        count(&db, "SELECT sum(requests)::bigint FROM usage_daily").await,
        N as i64
    );
    assert_eq!(
        count(&db, "SELECT sum(input_tokens)::bigint FROM usage_daily").await,
        9 * N as i64
    );
    assert_eq!(count(&db, "SELECT count(*) FROM sent").await, 0);
    let before = send(request(
        http::Method::GET,
        &format!("{}/usage", proxy.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        "",
    ))
    .await
    .json();
    assert_eq!(before["requests"], N as u64 / 2);

    // `usage` reads the store: every replica's rows, the same report as the SQLite ledger's.
    let report = proxy.usage_by_user().await;
    assert_eq!(report["total"]["requests"], N as u64, "{report}");
    assert_eq!(report["total"]["input_tokens"], 9 * N as u64, "{report}");
    let users: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(users.len(), 2, "{report}");
    assert!(
        users.contains(&"alice") && users.contains(&"bob"),
        "{report}"
    );

    let proxy2 = proxy.restart(&[]).await;
    let after = send(request(
        http::Method::GET,
        &format!("{}/usage", proxy2.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        "",
    ))
    .await
    .json();
    assert_eq!(after["requests"], before["requests"], "{after}");
    // The same sum in another order (the running total, and the rollup's lines, each summed
    // over the shipments that made it): equal up to the last bits of a float.
    let (a, b) = (
        after["cost_usd"].as_f64().unwrap(),
        before["cost_usd"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-12, "{after} vs {before}");
    let health = proxy2.health().await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"]["degraded"], false, "{health}");
}

/// Sends `n` Converse calls of alice through `proxy`, `width` at a time, and takes the database
/// away with `away` once some rows are in, bringing it back with `back` half a second after the
/// proxy says the store is degraded. Checks that every call was answered, that each row is in
/// the database once and rolled up once, that `/healthz` and `/metrics` said so while it was
/// away and are clear again, and that the spool is emptied. Returns the spool's size while away.
async fn load_through_an_outage(
    proxy: &Proxy,
    db: &Db,
    (n, width): (usize, usize),
    away: impl FnOnce(),
    back: impl FnOnce(),
) -> u64 {
    let url = proxy.url();
    let load = tokio::spawn(concurrently(n, width, move |_| {
        let url = url.clone();
        async move {
            send(request(
                http::Method::POST,
                &format!("{url}/model/{SONNET}/converse"),
                &[("authorization", &format!("Bearer {ALICE_KEY}"))],
                CONVERSE_BODY,
            ))
            .await
            .status
        }
    }));
    eventually("some rows reached the database", || async {
        (count(db, "SELECT count(*) FROM requests").await > 10).then_some(())
    })
    .await;
    away();
    let during = eventually("the proxy says the store is degraded", || async {
        let h = proxy.health().await;
        (h["status"] == "degraded").then_some(h)
    })
    .await;
    let spooled = during["store"]["spool_bytes"].as_u64().unwrap();
    assert!(spooled > 0, "{during}");
    let metrics = metrics_text(proxy).await;
    assert!(
        metrics.contains("bedrock_gate_store_degraded 1"),
        "/metrics says so too: {metrics}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    back();
    let statuses = load.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request answered while the database was away: {} not",
        statuses.iter().filter(|s| **s != 200).count()
    );
    let rows = eventually("every row in the database after the replay", || async {
        let rows = count(db, "SELECT count(*) FROM requests").await;
        (rows >= n as i64).then_some(rows)
    })
    .await;
    assert_eq!(rows, n as i64);
    assert_eq!(
        count(db, "SELECT count(DISTINCT request_id) FROM requests").await,
        n as i64
    );
    assert_eq!(
        count(db, "SELECT sum(requests)::bigint FROM usage_daily").await,
        n as i64,
        "each row rolled up once"
    );
    let spool = proxy.dir.path().join("bedrock-gate.spool");
    eventually("the spool is emptied", || async {
        (std::fs::metadata(&spool).map(|m| m.len()).unwrap_or(0) == 0).then_some(())
    })
    .await;
    eventually("/metrics says the store is back", || async {
        let m = metrics_text(proxy).await;
        (m.contains("bedrock_gate_store_degraded 0")
            && m.contains("bedrock_gate_store_spool_bytes 0"))
        .then_some(())
    })
    .await;
    spooled
}

#[tokio::test]
async fn the_database_going_away_mid_load_loses_nothing_and_writes_nothing_twice() {
    // The network to the database cut (every connection dropped, new ones refused) and restored.
    const N: usize = 300;
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let relay = pg::Relay::start(db.addr()).await;
    let config = config_via(&fake, &db, &relay);
    let proxy = Proxy::start(&config).await;
    let spooled =
        load_through_an_outage(&proxy, &db, (N, 16), || relay.cut(), || relay.restore()).await;
    eprintln!(
        "store outage run: sent {N}, all answered 200, rows {N}, spool at its fullest {spooled} bytes"
    );
}

#[tokio::test]
async fn with_on_unavailable_closed_calls_are_refused_cleanly_while_the_database_is_away() {
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let relay = pg::Relay::start(db.addr()).await;
    let config = format!(
        "{}on_unavailable = \"closed\"\n{}",
        db.store_table_via(&relay),
        two_user_config(&fake, "")
    );
    let proxy = Proxy::start(&config).await;
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    proxy.shipped().await;
    relay.cut();
    // The next call's row finds the database gone (it waits in the spool, the answer still
    // ends); from then on the store is degraded.
    assert_eq!(converse(&proxy, SONNET, ALICE_KEY).await.status, 200);
    eventually("the store is degraded", || async {
        let health = proxy.health().await;
        (health["store"]["degraded"] == true).then_some(())
    })
    .await;
    let refused = converse(&proxy, SONNET, ALICE_KEY).await;
    assert_eq!(refused.status, 502, "{:?}", refused.body);
    assert!(
        refused.message().contains("on_unavailable"),
        "{}",
        refused.message()
    );
    assert_eq!(refused.headers["retry-after"], "1");
    let upstream = fake.received().len();
    relay.restore();
    let back = eventually("calls are admitted once the store is back", || async {
        let r = converse(&proxy, SONNET, ALICE_KEY).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(back.status, 200);
    assert_eq!(
        fake.received().len(),
        upstream + 1,
        "refused calls were never sent"
    );
    eventually("every answered call is in the database once", || async {
        let answered = fake.received().len() as i64;
        let rows = count(&db, "SELECT count(*) FROM requests WHERE status = 200").await;
        (rows == answered).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_row_a_crash_left_in_the_spool_is_shipped_before_its_marker_is_taken_for_an_interrupted_call()
 {
    use http_body_util::BodyExt as _;
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let relay = pg::Relay::start(db.addr()).await;
    // A name of its own, as a restarted replica keeps (the default, HOST:PORT, would change
    // with the port the relaunch binds), so the relaunch takes the marker for its own.
    let config = config_via(&fake, &db, &relay)
        .replace("[store]\n", "[store]\nreplica = \"crashed-and-back\"\n");
    let proxy = Proxy::start(&config).await;
    let gate = fake.gate_streams();
    let body = alice_stream_in_flight(&proxy).await;
    // The call's marker is in the store...
    proxy.shipped().await;
    assert_eq!(count(&db, "SELECT count(*) FROM sent").await, 1);
    relay.cut();
    for _ in 1..fake::anthropic_events(&alice_sonnet()).len() {
        gate.send(()).await.unwrap();
    }
    body.collect().await.expect("the stream ends");
    // ...and its row only in the spool when the proxy dies.
    assert!(!proxy.is_shipped());
    let dir = proxy.crash();
    relay.restore();
    let proxy = Proxy::relaunch(dir, &[]).await;
    proxy.shipped().await;
    // Straight from the database: `ledger_query` would block the runtime the relay runs on.
    let rows = db
        .client()
        .await
        .query("SELECT outcome, input_tokens FROM requests", &[])
        .await
        .unwrap();
    let rows: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        rows[0].0, "complete",
        "the real row, not an `interrupted` one"
    );
    assert!(rows[0].1 > 0, "{rows:?}");
    assert_eq!(count(&db, "SELECT count(*) FROM sent").await, 0);
    assert_eq!(
        count(&db, "SELECT sum(requests)::bigint FROM usage_daily").await,
        1
    );
}

#[tokio::test]
async fn a_budget_crossed_on_one_replica_is_refused_by_the_other_within_a_second() {
    // Three Converse calls of the fake cost about $0.000366 at Sonnet 4.5's rate; the budget
    // is $0.0003, so replica A admits three and refuses the fourth, and B, which has served
    // nothing itself, must refuse too once it reads A's spend from the store.
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let config = config_with(&fake, &db).replace(
        "[users.alice.models]",
        "[users.alice.limits]\nmonthly_budget_usd = 0.0003\n[users.alice.models]",
    );
    let a = Proxy::start(&config).await;
    let b = Proxy::start(&config).await;
    for _ in 0..3 {
        assert_eq!(converse(&a, SONNET, ALICE_KEY).await.status, 200);
    }
    let crossed = std::time::Instant::now();
    let on_a = converse(&a, SONNET, ALICE_KEY).await;
    assert_eq!(on_a.status, 429, "{:?}", on_a.body);
    // Within a second of the crossing, B's first call for alice is refused: no call admitted
    // there in the meantime (each would add to the spend checked below).
    tokio::time::sleep(std::time::Duration::from_secs(1).saturating_sub(crossed.elapsed())).await;
    let on_b = converse(&b, SONNET, ALICE_KEY).await;
    assert_eq!(on_b.status, 429, "B admitted a call 1 s after the crossing");
    assert!(
        on_b.message().contains("monthly budget"),
        "{}",
        on_b.message()
    );
    // Bob's budget is his own: untouched on both.
    assert_eq!(converse(&b, SONNET, BOB_KEY).await.status, 200);
    // B's own /usage shows what alice spent on A.
    let usage = send(request(
        http::Method::GET,
        &format!("{}/usage", b.url()),
        &[("authorization", &format!("Bearer {ALICE_KEY}"))],
        "",
    ))
    .await
    .json();
    let spent = usage["cost_usd"].as_f64().unwrap();
    assert!(spent > 0.0003 && spent < 0.0004, "{usage}");
}

#[tokio::test]
async fn the_calls_a_vanished_replica_had_in_flight_are_recorded_by_another_once() {
    // A replica under a name no process will use again (a pod replaced under a new name)
    // died with two calls in flight: their markers are in `sent`, and it was last seen long ago.
    let fake = FakeBedrock::start().await;
    let db = Db::create().await;
    let migrate = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.toml");
        std::fs::write(&path, config_with(&fake, &db)).unwrap();
        run(
            dir.path(),
            &["store", "migrate", "-c", path.to_str().unwrap()],
        )
        .await
    };
    assert!(migrate.ok, "{migrate}");
    let client = db.client().await;
    let now = chrono::Utc::now().timestamp_millis();
    let long_ago = now - 20 * 60 * 1000;
    client
        .execute(
            "INSERT INTO replicas (replica, seen_ms) VALUES ('gone-pod-7f9c', $1)",
            &[&long_ago],
        )
        .await
        .unwrap();
    for id in ["gone-1", "gone-2"] {
        client
            .execute(
                r#"INSERT INTO sent (request_id, ts_ms, "user", operation, model, admitted, replica)
                   VALUES ($1, $2, 'alice', 'Converse', 'm', true, 'gone-pod-7f9c')"#,
                &[&id, &(long_ago + 1)],
            )
            .await
            .unwrap();
    }
    // Two live replicas start; once each has been seen for longer than replica_gone_secs
    // itself, one of them records the calls, once.
    let config = config_with(&fake, &db).replace("[store]\n", "[store]\nreplica_gone_secs = 2\n");
    let a = Proxy::start(&config).await;
    let b = Proxy::start(&config).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM sent").await,
        2,
        "not before the replicas have been seen for replica_gone_secs themselves"
    );
    eventually("the vanished replica's calls are rows", || async {
        (count(&db, "SELECT count(*) FROM sent").await == 0).then_some(())
    })
    .await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM requests WHERE outcome = 'interrupted' AND replica = 'gone-pod-7f9c'"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db,
            "SELECT sum(requests)::bigint FROM usage_daily WHERE replica = 'gone-pod-7f9c'"
        )
        .await,
        2,
        "rolled up once"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM replicas WHERE replica = 'gone-pod-7f9c'"
        )
        .await,
        0,
        "and forgotten"
    );
    // The live replicas are seen.
    assert_eq!(count(&db, "SELECT count(*) FROM replicas").await, 2);
    drop((a, b));
}

#[tokio::test]
async fn postgresql_stopped_mid_load_and_started_again_loses_nothing_and_writes_nothing_twice() {
    // A cluster of this test's own, stopped with pg_ctl as an operator would, then started.
    const N: usize = 200;
    let cluster = pg::Cluster::start().await;
    let db = cluster.database().await;
    let fake = FakeBedrock::start().await;
    let proxy = Proxy::start(&config_with(&fake, &db)).await;
    let spooled = load_through_an_outage(
        &proxy,
        &db,
        (N, 8),
        || cluster.stop(),
        || cluster.start_again(),
    )
    .await;
    eprintln!(
        "postgresql stop/start run: sent {N}, all answered 200, rows {N}, spool {spooled} bytes while stopped"
    );
}
