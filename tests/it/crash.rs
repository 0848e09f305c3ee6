//! A crash under load: `kill -9` while a few hundred calls a second go through, then a restart
//! on the same ledger. Every call a client got a whole answer to has its complete row with its
//! tokens, every call the fake Bedrock saw has a row, no request has two, and the calls in
//! flight at the crash are recorded as `interrupted`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;

use crate::common;
use crate::common::fake::Script;
use common::*;

/// What one client call saw.
#[derive(Debug, Clone)]
enum Seen {
    /// No response headers (connection refused or cut before them).
    Nothing,
    /// Headers with the proxy's request id; `whole` when the body was read to its end.
    Answer {
        id: String,
        streaming: bool,
        whole: bool,
    },
}

async fn call(client: HttpClient, url: String, streaming: bool, whole: Arc<AtomicUsize>) -> Seen {
    let req = request(
        Method::POST,
        &format!("{url}/v1/messages"),
        &[
            ("x-api-key", ALICE_KEY),
            ("content-type", "application/json"),
            ("anthropic-version", "2023-06-01"),
        ],
        messages_body("claude-sonnet-4-5", streaming),
    );
    let Ok(resp) = client.request(req).await else {
        return Seen::Nothing;
    };
    let id = resp
        .headers()
        .get("request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let ok = resp.status() == 200;
    let read = resp.into_body().collect().await.is_ok() && ok;
    if read {
        whole.fetch_add(1, Ordering::Relaxed);
    }
    Seen::Answer {
        id,
        streaming,
        whole: read,
    }
}

/// A call to a model whose Bedrock never answers: certainly in flight at the crash.
async fn hanging_call(client: HttpClient, url: String) -> Seen {
    let req = request(
        Method::POST,
        &format!("{url}/v1/messages"),
        &[
            ("x-api-key", ALICE_KEY),
            ("anthropic-version", "2023-06-01"),
        ],
        messages_body("claude-haiku-4-5", false),
    );
    match client.request(req).await {
        Ok(_) => panic!("a call to the hanging model was answered"),
        Err(_) => Seen::Nothing,
    }
}

#[derive(Debug)]
struct Row {
    request_id: String,
    model: Option<String>,
    outcome: String,
    complete: bool,
    tokens: (i64, i64, i64, i64),
}

fn rows(proxy: &Proxy) -> Vec<Row> {
    ledger_query(
        proxy,
        "SELECT request_id, base_model, outcome, complete, input_tokens, output_tokens,
                cache_read_tokens, cache_write_tokens
         FROM requests ORDER BY id",
        |r| {
            Ok(Row {
                request_id: r.get(0)?,
                model: r.get(1)?,
                outcome: r.get(2)?,
                complete: r.get(3)?,
                tokens: (r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?),
            })
        },
    )
}

fn total(t: (i64, i64, i64, i64)) -> i64 {
    t.0 + t.1 + t.2 + t.3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_answered_call_and_records_the_interrupted_ones() {
    let fake = FakeBedrock::start().await;
    fake.script(&alice_haiku(), Script::Hang);
    let proxy = Proxy::start(&two_user_config(&fake, "")).await;
    let client = client();

    // One call of each kind first: what Bedrock serves for it, as the ledger records it.
    let mut served = HashMap::new();
    for streaming in [false, true] {
        let Seen::Answer { id, whole, .. } =
            call(client.clone(), proxy.url(), streaming, Arc::default()).await
        else {
            panic!("warm-up call got no answer");
        };
        assert!(whole, "warm-up call (streaming {streaming}) answered whole");
        let row = eventually("the warm-up row", || async {
            rows(&proxy).into_iter().find(|r| r.request_id == id)
        })
        .await;
        assert_eq!(row.outcome, "complete");
        assert!(total(row.tokens) > 0, "{row:?}");
        served.insert(streaming, row.tokens);
    }
    let warm = rows(&proxy).len();
    let warm_received = fake.received().len();

    // Open loop: a call every 2.5 ms (400 a second, half of them streams) until the crash; the
    // proxy is killed once 300 calls were answered (under a second on a quiet machine), a
    // moment after the hanging calls went out.
    const HANGING: usize = 5;
    const BEFORE_CRASH: usize = 300;
    let url = proxy.url();
    let stop = Arc::new(AtomicBool::new(false));
    let whole = Arc::new(AtomicUsize::new(0));
    let load = {
        let (client, url, stop, whole) = (client.clone(), url.clone(), stop.clone(), whole.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(2_500));
            let started = Instant::now();
            let mut calls = Vec::new();
            let mut i = 0usize;
            while started.elapsed() < Duration::from_secs(10) && !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let c = call(client.clone(), url.clone(), i % 2 == 1, whole.clone());
                calls.push(tokio::spawn(c));
                i += 1;
            }
            calls
        })
    };
    eventually("calls answered under load", || async {
        (whole.load(Ordering::Relaxed) >= BEFORE_CRASH).then_some(())
    })
    .await;
    let hanging: Vec<_> = (0..HANGING)
        .map(|_| tokio::spawn(hanging_call(client.clone(), url.clone())))
        .collect();
    eventually("the hanging calls reach Bedrock", || async {
        let n = fake
            .received()
            .iter()
            .filter(|r| r.model == alice_haiku())
            .count();
        (n == HANGING).then_some(())
    })
    .await;
    let proxy = proxy.kill9(&[]).await;
    // A few more calls meet the dead port, then the load stops.
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen = Vec::new();
    for c in load.await.unwrap() {
        seen.push(c.await.unwrap());
    }
    for h in hanging {
        h.await.unwrap();
    }
    let sent = seen.len() + HANGING;
    let mut answered = HashMap::new();
    let mut headers_only = 0;
    for s in &seen {
        match s {
            Seen::Answer {
                id,
                streaming,
                whole: true,
            } => {
                assert!(
                    answered.insert(id.clone(), *streaming).is_none(),
                    "request id {id} twice"
                );
            }
            Seen::Answer { .. } => headers_only += 1,
            Seen::Nothing => {}
        }
    }
    let received = fake.received().len() - warm_received;

    // The restart has turned what was in flight into rows; all are committed by now.
    let all = rows(&proxy);
    let mut ids = HashSet::new();
    for r in &all {
        assert!(ids.insert(&r.request_id), "two rows for {}", r.request_id);
    }
    let rows = &all[warm..];
    let by_id: HashMap<&str, &Row> = rows.iter().map(|r| (r.request_id.as_str(), r)).collect();
    let mut outcomes = BTreeMap::new();
    for r in rows {
        *outcomes.entry(r.outcome.as_str()).or_insert(0usize) += 1;
    }
    let interrupted: Vec<&&Row> = by_id
        .values()
        .filter(|r| r.outcome == "interrupted")
        .collect();
    let complete_rows = outcomes.get("complete").copied().unwrap_or(0);
    let mut tokens_served = 0;
    let mut tokens_recorded = 0;
    for (id, streaming) in &answered {
        tokens_served += total(served[streaming]);
        tokens_recorded += by_id.get(id.as_str()).map_or(0, |r| total(r.tokens));
    }
    println!(
        "crash run: sent {sent}, Bedrock received {received}, answered whole {}, headers only {headers_only}, \
         ledger rows {} ({outcomes:?}), tokens served {tokens_served} / recorded {tokens_recorded}",
        answered.len(),
        rows.len(),
    );

    assert!(answered.len() >= BEFORE_CRASH);
    // Every call a client read a whole answer to is in the ledger, complete, with its tokens.
    let lost: Vec<&String> = answered
        .keys()
        .filter(|id| {
            by_id
                .get(id.as_str())
                .is_none_or(|r| r.outcome != "complete")
        })
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered calls have no complete row",
        lost.len(),
        answered.len()
    );
    for (id, streaming) in &answered {
        let r = by_id[id.as_str()];
        assert!(r.complete, "{r:?}");
        assert_eq!(r.tokens, served[streaming], "{r:?}");
    }
    assert_eq!(tokens_recorded, tokens_served);
    // Every call Bedrock saw has a row: complete, or interrupted by the crash. A call is
    // written down before it is sent, so a crash between the two leaves an interrupted row for
    // a call Bedrock never saw: never more of those than calls the clients were not answered.
    assert_eq!(
        complete_rows + interrupted.len(),
        rows.len(),
        "no other outcome: {outcomes:?}"
    );
    assert!(
        rows.len() >= received,
        "{} rows for {received} calls Bedrock received: {outcomes:?}",
        rows.len()
    );
    assert!(rows.len() - received <= sent - answered.len());
    // A complete row the client did not see end was committed just before the crash cut its
    // last bytes: at most the calls that had their headers.
    assert!(
        complete_rows - answered.len() <= headers_only,
        "{complete_rows} complete rows, {} answered, {headers_only} cut after their headers",
        answered.len()
    );
    let hung = interrupted
        .iter()
        .filter(|r| r.model.as_deref() == Some(HAIKU))
        .count();
    assert_eq!(hung, HANGING, "the hanging calls are interrupted");
    for r in &interrupted {
        assert!(!r.complete && total(r.tokens) == 0, "{r:?}");
    }
    proxy.wait_for_log("recorded as `interrupted`").await;
}
