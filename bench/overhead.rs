#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark harness: a panic is a failed run"
)]
//! What bedrock-gate adds on top of Bedrock: the same load generator talks to a fake Bedrock
//! directly and through the proxy, in one run, and the table shows both side by side.
//! `cargo bench --bench overhead` (`BENCH_QUICK=1` for a short run); see bench/README.md.
//!
//! # Layout
//! - `overhead.rs`: the phases, their order, and the table rows each one produces.
//! - `fake.rs`: the fake Bedrock Runtime (hyper, own thread and runtime, pre-built bodies).
//! - `load.rs`: open-loop (latency-corrected) and closed-loop load generation.
//! - `proxy.rs`: the `bedrock-gate` child process and its config.
//! - `pg.rs`: a PostgreSQL database per store phase, and the cluster's CPU time.
//! - `relay.rs`: a minimal in-process relay, the floor beside every phase that sends load.
//! - `sys.rs`: CPU and memory from /proc.
//! - `report.rs`: the markdown table.

mod fake;
mod load;
mod pg;
mod proxy;
mod relay;
mod report;
mod sys;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, header};

use fake::Fake;
use load::{Schedule, Target};
use proxy::Proxy;
use report::{Row, Verdict, added_ms, cpu_per, mb, ms};
use sys::Probe;

const SONNET: &str = "anthropic.claude-sonnet-4-5-20250929-v1:0";
const HAIKU: &str = "anthropic.claude-haiku-4-5-20251001-v1:0";
/// The fake answers at once on this profile...
const FAST_PROFILE: &str =
    "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/bench";
/// ...and streams one event per second on this one.
const SLOW_PROFILE: &str =
    "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/slow";

/// Above this much CPU used by other processes in a measured window, the run is flagged as noisy.
const QUIET_CORES: f64 = 0.2;

/// How long and how hard each phase runs.
struct Plan {
    quick: bool,
    small: Schedule,
    big: Schedule,
    big_body: usize,
    stream: Schedule,
    /// Messages API, JSON and SSE alike: at the rate a few developers make, and under load.
    messages: [Schedule; 2],
    closed_warmup: Duration,
    closed_measure: Duration,
    connections: usize,
    slow_streams: u64,
    slow_secs: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let secs = Duration::from_secs;
        let (warmup, measure) = if quick {
            (secs(1), secs(3))
        } else {
            (secs(2), secs(20))
        };
        let timeout = secs(10);
        Plan {
            quick,
            small: Schedule {
                rate: 1000,
                warmup,
                measure,
                timeout,
            },
            big: Schedule {
                rate: 100,
                warmup,
                measure: if quick { measure } else { secs(15) },
                timeout,
            },
            big_body: 500 * 1024,
            stream: Schedule {
                rate: 200,
                warmup,
                measure,
                timeout,
            },
            messages: [20, 1000].map(|rate| Schedule {
                rate,
                warmup,
                measure,
                timeout,
            }),
            closed_warmup: warmup,
            closed_measure: if quick { measure } else { secs(10) },
            connections: 64,
            slow_streams: if quick { 100 } else { 1000 },
            slow_secs: if quick { 5 } else { 30 },
        }
    }
}

/// Everything a phase needs.
struct Bench {
    plan: Plan,
    rt: tokio::runtime::Runtime,
    fake: Fake,
    proxy: Proxy,
    probe: Probe,
    rows: Vec<Row>,
    notes: Vec<String>,
    /// Requests sent through the proxy, warm-up included (each must become one ledger row).
    through_sent: u64,
    /// The most CPU other processes used during any measured window, in cores.
    max_other: f64,
    /// The SQLite ledger `ledger_scale` measured, kept for `ledger_scale_pg` to import.
    scale: Option<ScaleLedger>,
    /// The minimal relay in front of the fake, started by the first phase that needs it.
    relay: Option<std::net::SocketAddr>,
}

/// Whose threads a phase's CPU rows count.
#[derive(Clone, Copy)]
enum Whose {
    /// bedrock-gate, the child process.
    Proxy,
    /// The minimal relay's runtime in this process.
    Relay,
}

/// A month's ledger of [`scale_rows`] rows, and what `usage` printed from it.
struct ScaleLedger {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    /// The `now` its rows were written up to ([`ScaleMonth::new`]).
    now: chrono::DateTime<chrono::Utc>,
    /// `usage` for the month (by user) on SQLite.
    usage_out: String,
}

fn main() {
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    // For development and profiling: a comma-separated subset of the phases.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |phase: &str| only.is_empty() || only.split(',').any(|p| p.trim() == phase);
    let plan = Plan::new(quick);
    let (nproc, cpu_model, load) = sys::machine();
    eprintln!("overhead: {nproc} CPUs ({cpu_model}), load average {load}; quick = {quick}");

    let fake = Fake::start(2, plan.slow_secs);
    let proxy = Proxy::start(fake.addr, &[(SONNET, FAST_PROFILE), (HAIKU, SLOW_PROFILE)]);
    eprintln!(
        "overhead: bedrock-gate pid {} on {}",
        proxy.pid(),
        proxy.addr
    );
    let probe = Probe::new(Some(proxy.pid()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load-worker")
        .enable_all()
        .build()
        .expect("load runtime");
    let mut bench = Bench {
        plan,
        rt,
        fake,
        proxy,
        probe,
        rows: Vec::new(),
        notes: Vec::new(),
        through_sent: 0,
        max_other: 0.0,
        scale: None,
        relay: None,
    };
    let started = Instant::now();

    if run("idle") {
        bench.idle_rss();
    }
    // Slow streams first: the proxy's peak RSS (VmHWM) is then that of start-up plus 1,000
    // streams, not of an earlier phase's 500 KB bodies.
    if run("slow") {
        bench.slow_streams();
    }
    if run("small") {
        bench.small_bodies();
    }
    if run("big") {
        bench.big_bodies();
    }
    if run("stream") {
        bench.streaming();
    }
    if run("messages") {
        bench.messages();
    }
    if run("max") {
        bench.max_throughput();
    }
    // The rates developers make: a few requests a second, with the do-nothing relay beside
    // each, so this machine's floor for one extra hop is in the same run.
    if run("low") {
        bench.low_rates();
    }
    // The same load through a bedrock-gate on SQLite and one on PostgreSQL (skipped, and
    // said so, without BEDROCK_GATE_PG_URL).
    if run("store_pg") {
        bench.store_pg();
    }
    if run("store_pg_max") {
        bench.store_pg_max();
    }
    // Not part of the default run: they write a 10 M-row ledger (a few GB, a few minutes).
    let named = |phase: &str| only.split(',').any(|p| p.trim() == phase);
    if named("ledger_scale") {
        bench.ledger_scale();
    }
    if named("ledger_scale_pg") {
        bench.ledger_scale_pg();
    }
    bench.shutdown();

    bench.notes.push(if bench.max_other < QUIET_CORES {
        format!(
            "machine quiet: other processes used at most {:.2} cores during any measured window",
            bench.max_other
        )
    } else {
        format!(
            "**machine NOT quiet**: other processes used up to {:.2} cores during a measured window; \
             rerun when the machine is idle",
            bench.max_other
        )
    });
    let elapsed = started.elapsed();
    let table = report::table(&bench.rows);
    let failed = bench
        .rows
        .iter()
        .filter(|r| r.verdict == Verdict::Fail)
        .count();
    println!("{table}");
    for n in &bench.notes {
        println!("- {n}");
    }
    eprintln!(
        "overhead: done in {:.0} s; {failed} target(s) missed",
        elapsed.as_secs_f64()
    );
    if !bench.plan.quick && only.is_empty() {
        let (_, _, load_after) = sys::machine();
        let mut md = String::new();
        let _ = writeln!(md, "# bedrock-gate overhead benchmark: results\n");
        let _ = writeln!(
            md,
            "Machine: {nproc} CPUs, {cpu_model}. Date: {} UTC. Load average before / after: {load} / {load_after}. \
             Run time {:.0} s. Command: `cargo bench --bench overhead`. Tree: `{}`.\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M"),
            elapsed.as_secs_f64(),
            tree_version(),
        );
        let _ = writeln!(md, "{table}");
        for n in &bench.notes {
            let _ = writeln!(md, "- {n}");
        }
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/RESULTS.md");
        // The run replaces the table at the top; the sections under it (`## …`: runs of single
        // phases, before-and-after comparisons) are kept as they were.
        if let Some(kept) = std::fs::read_to_string(path)
            .ok()
            .and_then(|old| old.find("\n## ").map(|at| old[at..].to_string()))
        {
            md.push_str(&kept);
        }
        std::fs::write(path, md).expect("write bench/RESULTS.md");
        eprintln!("overhead: wrote {path}");
    }
}

/// Headers of a SigV4-signed request as an AWS SDK sends it to Bedrock (the fake checks only the
/// scheme; the values have the real lengths).
fn signed_headers(accept: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ACCEPT, HeaderValue::from_static(accept));
    h.insert("x-amz-date", HeaderValue::from_static("20261127T120000Z"));
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_static(
            "AWS4-HMAC-SHA256 Credential=AKIDBENCHEXAMPLE/20261127/us-east-1/bedrock/aws4_request, \
             SignedHeaders=accept;content-length;content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        ),
    );
    h
}

/// Headers of a caller with a bedrock-gate key (`AWS_BEARER_TOKEN_BEDROCK`).
fn keyed_headers(accept: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ACCEPT, HeaderValue::from_static(accept));
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", proxy::KEY)).expect("header"),
    );
    h
}

/// ASCII text that needs no JSON escaping, `n` bytes long.
fn filler(n: usize, seed: usize) -> String {
    const LINES: [&str; 4] = [
        "fn handle(state: &AppState, request: Request) -> Result<Response, ApiError> { let route = route::parse(&parts.method, parts.uri.path())?; } ",
        "The test failed with: assertion `left == right` failed at tests/proxy.rs:212:5, left: 403, right: 200. ",
        "let upstream = state.upstream.send(out, config.timeouts.first_byte).await.map_err(|e| e.error)?; ",
        "src/meter/usage.rs: reads usage from headers, JSON bodies and event streams as they pass by. ",
    ];
    let mut s = String::with_capacity(n + 200);
    let mut i = seed;
    while s.len() < n {
        s.push_str(LINES[i % LINES.len()]);
        i += 1;
    }
    s.truncate(n);
    s
}

/// A JSON body of exactly `size` bytes: `make` builds it around `turns` texts, which are padded
/// to fill the size.
fn sized_body(size: usize, turns: usize, make: impl Fn(&[String]) -> serde_json::Value) -> Bytes {
    let empty = make(&vec![String::new(); turns]).to_string().len();
    let budget = size.saturating_sub(empty);
    let texts: Vec<String> = (0..turns)
        .map(|i| {
            let extra = if i + 1 == turns { budget % turns } else { 0 };
            filler(budget / turns + extra, i)
        })
        .collect();
    Bytes::from(make(&texts).to_string())
}

/// A Converse request of `size` bytes: a system prompt and alternating turns (16 KB each, as a
/// coding agent's long context), ending with the user's.
fn converse_body(size: usize) -> Bytes {
    let turns = (size / 16_384).max(1) | 1;
    sized_body(size, turns, |texts| {
        let messages: Vec<_> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                serde_json::json!({"role": role, "content": [{"text": t}]})
            })
            .collect();
        serde_json::json!({
            "system": [{"text": "You are a coding assistant working in the user's repository."}],
            "messages": messages,
            "inferenceConfig": {"maxTokens": 4096, "temperature": 0.2}
        })
    })
}

/// An Anthropic Messages API request of `size` bytes, as the Anthropic SDK sends it.
fn messages_api_body(size: usize, stream: bool) -> Bytes {
    sized_body(size, 1, |texts| {
        serde_json::json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "system": "You are a coding assistant working in the user's repository.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": texts[0]}]}],
            "stream": stream
        })
    })
}

/// Headers of an Anthropic SDK caller (`x-api-key`), to the fake or to the proxy.
fn anthropic_headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    h.insert("anthropic-version", HeaderValue::from_static("2023-06-01"));
    h.insert("x-api-key", HeaderValue::from_str(key).expect("header"));
    h
}

/// An Anthropic Messages request (InvokeModelWithResponseStream) of `size` bytes.
fn anthropic_body(size: usize) -> Bytes {
    sized_body(size, 1, |texts| {
        serde_json::json!({
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 4096,
            "system": "You are a coding assistant working in the user's repository.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": texts[0]}]}]
        })
    })
}

impl Bench {
    /// The fake, called as an SDK calls Bedrock: the profile ARN in the path, SigV4 headers.
    fn direct(&self, profile: &str, op: &str, body: Bytes, accept: &'static str) -> Arc<Target> {
        Arc::new(Target {
            addr: self.fake.addr,
            path: format!(
                "/model/{}/{op}",
                bedrock_gate::resolve::encode_segment(profile)
            ),
            headers: signed_headers(accept),
            body,
            expect_len: self.fake.body_len(op, profile == SLOW_PROFILE),
        })
    }

    /// The proxy, called as an SDK calls it: the model id in the path (`:` as `%3A`), a key.
    fn through(&self, model: &str, op: &str, body: Bytes, accept: &'static str) -> Arc<Target> {
        self.through_at(self.proxy.addr, model, op, body, accept)
    }

    /// As [`Bench::through`], to the bedrock-gate at `addr`.
    fn through_at(
        &self,
        addr: std::net::SocketAddr,
        model: &str,
        op: &str,
        body: Bytes,
        accept: &'static str,
    ) -> Arc<Target> {
        Arc::new(Target {
            addr,
            path: format!(
                "/model/{}/{op}",
                bedrock_gate::resolve::encode_segment(model)
            ),
            headers: keyed_headers(accept),
            body,
            expect_len: self.fake.body_len(op, model == HAIKU),
        })
    }

    /// `POST /v1/messages` to the fake (as to the Anthropic API) or to the proxy, JSON or SSE.
    fn messages_target(&self, through: bool, stream: bool, body: Bytes) -> Arc<Target> {
        let (addr, key) = if through {
            (self.proxy.addr, proxy::KEY)
        } else {
            (self.fake.addr, "sk-ant-bench-direct")
        };
        Arc::new(Target {
            addr,
            path: "/v1/messages".into(),
            headers: anthropic_headers(key),
            body,
            expect_len: self
                .fake
                .body_len(if stream { "messages-sse" } else { "messages" }, false),
        })
    }

    /// `target` with the minimal relay as its address: the same request with one do-nothing
    /// hop on the way to the fake.
    fn via_relay(&mut self, target: &Arc<Target>) -> Arc<Target> {
        let fake = self.fake.addr;
        let addr = *self.relay.get_or_insert_with(|| relay::start(fake, 2));
        Arc::new(Target {
            addr,
            ..(**target).clone()
        })
    }

    fn open(&mut self, label: &str, target: &Arc<Target>, schedule: Schedule) -> load::OpenRun {
        let probe = self.probe;
        self.open_probed(label, target, schedule, &probe)
    }

    /// As [`Bench::open`], with the CPU of the proxy (and database) `probe` names.
    fn open_probed(
        &mut self,
        label: &str,
        target: &Arc<Target>,
        schedule: Schedule,
        probe: &Probe,
    ) -> load::OpenRun {
        eprintln!(
            "overhead: {label}: {} req/s for {} s (+{} s warm-up)",
            schedule.rate,
            schedule.measure.as_secs(),
            schedule.warmup.as_secs()
        );
        let run = load::open_loop(self.rt.handle(), target, schedule, probe);
        if target.addr == self.proxy.addr {
            self.through_sent += run.sent_total;
        }
        let other = self.noise(run.cpu.other_cores());
        self.notes.push(format!(
            "{label}: {} measured requests, {:.1} req/s achieved, dispatch lag p99 {} / max {}, \
             proxy CPU {:.2} s{}, other processes {:.2} cores{}",
            run.recorded.total(),
            run.achieved_rate,
            ms(run.dispatch_lag.value_at_quantile(0.99)),
            ms(run.dispatch_lag.max()),
            run.cpu.proxy.as_secs_f64(),
            db_note(probe, &run.cpu),
            other,
            errors_note(&run.recorded),
        ));
        run
    }

    /// Remembers how busy the rest of the machine was; returns `cores` for the note.
    fn noise(&mut self, cores: f64) -> f64 {
        self.max_other = self.max_other.max(cores);
        cores
    }

    fn idle_rss(&mut self) {
        // Let start-up work (credential provider, ledger open, config watcher) settle.
        std::thread::sleep(Duration::from_secs(1));
        let (rss, _) = sys::memory(self.proxy.pid()).expect("proxy /proc status");
        self.rows.push(
            Row::new("idle", "proxy RSS after start-up")
                .through(mb(rss))
                .target("< 30 MB", Verdict::of(rss < 30_000_000)),
        );
        if let Some((anon, file)) = sys::resident_split(self.proxy.pid()) {
            self.rows.push(
                Row::new(
                    "idle",
                    "of which allocated (RssAnon) / the executable's pages (RssFile)",
                )
                .through(format!("{} / {}", mb(anon), mb(file))),
            );
        }
    }

    fn slow_streams(&mut self) {
        let n = self.plan.slow_streams;
        let secs = self.plan.slow_secs;
        let phase = format!("{n} slow streams (1 event/s, {secs} s)");
        let target = self.through(
            HAIKU,
            "invoke-with-response-stream",
            anthropic_body(2048),
            "application/vnd.amazon.eventstream",
        );
        // Started at 500 per second; all are open together for most of their life.
        let ramp_rate = 500;
        let schedule = Schedule {
            rate: ramp_rate,
            warmup: Duration::ZERO,
            measure: Duration::from_millis(n * 1000 / ramp_rate),
            timeout: Duration::from_secs(secs + 30),
        };
        let pid = self.proxy.pid();
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Some((rss, _)) = sys::memory(pid) {
                        peak = peak.max(rss);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                peak
            })
        };
        let run = self.open(&format!("slow streams through ({n})"), &target, schedule);
        stop.store(true, Ordering::Relaxed);
        let sampled_peak = sampler.join().expect("sampler");
        let (_, hwm) = sys::memory(pid).expect("proxy /proc status");
        let r = &run.recorded;
        self.rows.push(
            Row::new(&phase, "streams completed")
                .through(format!("{} / {n}", r.ok))
                .target(format!("all {n}"), Verdict::of(r.ok == n)),
        );
        self.rows.push(
            Row::new(&phase, "proxy peak RSS (VmHWM)")
                .through(format!("{} (sampled {})", mb(hwm), mb(sampled_peak)))
                .target("< 150 MB", Verdict::of(hwm < 150_000_000)),
        );
        self.rows
            .push(Row::new(&phase, "time to last byte p50 / max").through(p50_and_max(&r.ttlb)));
        self.rows.push(
            Row::new(&phase, "proxy CPU per stream").through(cpu_per(run.cpu.proxy, r.total())),
        );
        // The same streams through the minimal relay, after the proxy's (so they do not share
        // its measured window): the floor of what holding them open costs.
        let direct = self.direct(
            SLOW_PROFILE,
            "invoke-with-response-stream",
            anthropic_body(2048),
            "application/vnd.amazon.eventstream",
        );
        let relayed = self.via_relay(&direct);
        let rr = self.open(
            &format!("slow streams via the minimal relay ({n})"),
            &relayed,
            schedule,
        );
        let rec = &rr.recorded;
        self.rows.push(
            Row::new(&phase, "streams completed: the minimal relay (the floor)")
                .through(format!("{} / {n}", rec.ok)),
        );
        self.rows.push(
            Row::new(
                &phase,
                "time to last byte p50 / max: the minimal relay (the floor)",
            )
            .through(p50_and_max(&rec.ttlb)),
        );
        self.rows.push(
            Row::new(&phase, "relay CPU per stream (the floor)")
                .through(cpu_per(rr.cpu.relay, rec.total())),
        );
    }

    fn small_bodies(&mut self) {
        let body = converse_body(2048);
        let phase = format!("Converse {} B @ {} req/s", body.len(), self.plan.small.rate);
        let d = self.direct(FAST_PROFILE, "converse", body.clone(), "application/json");
        let t = self.through(SONNET, "converse", body, "application/json");
        let schedule = self.plan.small;
        let r = self.via_relay(&d);
        let dr = self.open("small direct", &d, schedule);
        let tr = self.open("small through", &t, schedule);
        let rr = self.open("small via the minimal relay", &r, schedule);
        self.rows.extend(report::latency_rows(
            &phase,
            "latency",
            &dr.recorded.ttlb,
            &tr.recorded.ttlb,
            Some(1000),
            true,
        ));
        self.relay_latency_rows(&phase, "latency", &dr.recorded.ttlb, &rr.recorded.ttlb);
        self.error_and_cpu_rows(&phase, &dr, &tr);
        self.relay_cost_rows(&phase, &rr);
    }

    fn big_bodies(&mut self) {
        let body = converse_body(self.plan.big_body);
        let phase = format!(
            "Converse {} KB @ {} req/s",
            body.len() / 1024,
            self.plan.big.rate
        );
        let d = self.direct(FAST_PROFILE, "converse", body.clone(), "application/json");
        let t = self.through(SONNET, "converse", body, "application/json");
        let schedule = self.plan.big;
        let r = self.via_relay(&d);
        let dr = self.open("500 KB direct", &d, schedule);
        let tr = self.open("500 KB through", &t, schedule);
        let rr = self.open("500 KB via the minimal relay", &r, schedule);
        self.rows.extend(report::latency_rows(
            &phase,
            "latency",
            &dr.recorded.ttlb,
            &tr.recorded.ttlb,
            Some(2000),
            true,
        ));
        self.relay_latency_rows(&phase, "latency", &dr.recorded.ttlb, &rr.recorded.ttlb);
        self.error_and_cpu_rows(&phase, &dr, &tr);
        self.relay_cost_rows(&phase, &rr);
    }

    fn streaming(&mut self) {
        let body = anthropic_body(2048);
        let phase = format!("stream {} B @ {} req/s", body.len(), self.plan.stream.rate);
        let accept = "application/vnd.amazon.eventstream";
        let d = self.direct(
            FAST_PROFILE,
            "invoke-with-response-stream",
            body.clone(),
            accept,
        );
        let t = self.through(SONNET, "invoke-with-response-stream", body, accept);
        let schedule = self.plan.stream;
        let r = self.via_relay(&d);
        let dr = self.open("stream direct", &d, schedule);
        let tr = self.open("stream through", &t, schedule);
        let rr = self.open("stream via the minimal relay", &r, schedule);
        self.rows.extend(report::latency_rows(
            &phase,
            "TTFB",
            &dr.recorded.ttfb,
            &tr.recorded.ttfb,
            Some(1000),
            true,
        ));
        self.relay_latency_rows(&phase, "TTFB", &dr.recorded.ttfb, &rr.recorded.ttfb);
        self.rows.extend(report::latency_rows(
            &phase,
            "TTLB",
            &dr.recorded.ttlb,
            &tr.recorded.ttlb,
            None,
            false,
        ));
        self.relay_latency_rows(&phase, "TTLB", &dr.recorded.ttlb, &rr.recorded.ttlb);
        self.error_and_cpu_rows(&phase, &dr, &tr);
        self.relay_cost_rows(&phase, &rr);
    }

    /// The Messages API: JSON answers (latency to the last byte) and SSE streams (time to the
    /// first event), each at a developer's rate and under load.
    fn messages(&mut self) {
        for schedule in self.plan.messages {
            let rate = schedule.rate;
            for stream in [false, true] {
                let body = messages_api_body(2048, stream);
                let (kind, what, target_ms) = if stream {
                    ("SSE", "time to first event", (rate <= 20).then_some(500))
                } else {
                    ("JSON", "latency", (rate >= 1000).then_some(500))
                };
                let phase = format!("Messages {kind} {} B @ {rate} req/s", body.len());
                let d = self.messages_target(false, stream, body.clone());
                let t = self.messages_target(true, stream, body);
                let r = self.via_relay(&d);
                let dr = self.open(&format!("messages {kind} @ {rate} direct"), &d, schedule);
                let tr = self.open(&format!("messages {kind} @ {rate} through"), &t, schedule);
                let rr = self.open(
                    &format!("messages {kind} @ {rate} via the minimal relay"),
                    &r,
                    schedule,
                );
                let (dh, th, rh) = (
                    dr.recorded.latency(stream),
                    tr.recorded.latency(stream),
                    rr.recorded.latency(stream),
                );
                self.rows
                    .extend(report::latency_rows(&phase, what, dh, th, target_ms, true));
                self.relay_latency_rows(&phase, what, dh, rh);
                self.error_and_cpu_rows(&phase, &dr, &tr);
                self.relay_cost_rows(&phase, &rr);
            }
        }
    }

    /// Converse 2 KB at 20 req/s, invoke-with-response-stream at 10 req/s (time to first byte)
    /// and Messages SSE at 10 req/s (time to first event): direct, through bedrock-gate, and
    /// through the minimal relay (the direct request with one do-nothing hop), open loop.
    fn low_rates(&mut self) {
        let quick = self.plan.quick;
        let schedule = |rate: u64| Schedule {
            rate,
            warmup: if quick {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(3)
            },
            measure: if quick {
                Duration::from_secs(5)
            } else {
                Duration::from_secs(30)
            },
            timeout: Duration::from_secs(10),
        };
        let converse = converse_body(2048);
        let stream = anthropic_body(2048);
        let accept = "application/vnd.amazon.eventstream";
        // (phase, direct, through, req/s, time to first byte?, issue 15's added-p99 target)
        type Case = (String, Arc<Target>, Arc<Target>, u64, bool, Option<u64>);
        let cases: [Case; 3] = [
            (
                format!("low rate: Converse {} B @ 20 req/s", converse.len()),
                self.direct(
                    FAST_PROFILE,
                    "converse",
                    converse.clone(),
                    "application/json",
                ),
                self.through(SONNET, "converse", converse, "application/json"),
                20,
                false,
                Some(350),
            ),
            (
                format!("low rate: stream {} B @ 10 req/s", stream.len()),
                self.direct(
                    FAST_PROFILE,
                    "invoke-with-response-stream",
                    stream.clone(),
                    accept,
                ),
                self.through(SONNET, "invoke-with-response-stream", stream, accept),
                10,
                true,
                Some(400),
            ),
            (
                "low rate: Messages SSE 2048 B @ 10 req/s".to_string(),
                self.messages_target(false, true, messages_api_body(2048, true)),
                self.messages_target(true, true, messages_api_body(2048, true)),
                10,
                true,
                None,
            ),
        ];
        for (phase, d, t, rate, first_byte, target_us) in cases {
            let r = self.via_relay(&d);
            let s = schedule(rate);
            let dr = self.open(&format!("{phase} direct"), &d, s);
            let tr = self.open(&format!("{phase} through"), &t, s);
            let rr = self.open(&format!("{phase} via the minimal relay"), &r, s);
            let (dh, th, rh) = (
                dr.recorded.latency(first_byte),
                tr.recorded.latency(first_byte),
                rr.recorded.latency(first_byte),
            );
            let what = if first_byte { "TTFB" } else { "latency" };
            self.rows
                .extend(report::latency_rows(&phase, what, dh, th, target_us, false));
            self.relay_latency_rows(&phase, what, dh, rh);
            self.error_and_cpu_rows(&phase, &dr, &tr);
            self.relay_cost_rows(&phase, &rr);
        }
    }

    /// The p50 and p99 of `what` through the minimal relay beside the direct ones: this
    /// machine's floor for one extra hop, in the same run as the proxy's figures.
    fn relay_latency_rows(
        &mut self,
        phase: &str,
        what: &str,
        direct: &hdrhistogram::Histogram<u64>,
        relay: &hdrhistogram::Histogram<u64>,
    ) {
        for mut row in report::latency_rows(phase, what, direct, relay, None, false) {
            row.metric.push_str(": the minimal relay (the floor)");
            self.rows.push(row);
        }
    }

    /// What the minimal relay's threads spent per request of `rr`, beside the proxy's.
    fn relay_cost_rows(&mut self, phase: &str, rr: &load::OpenRun) {
        self.cost_rows(phase, rr, Whose::Relay);
        if rr.recorded.error_count() > 0 {
            self.notes.push(format!(
                "{phase}: the minimal relay's run had errors{}",
                errors_note(&rr.recorded)
            ));
        }
    }

    fn error_and_cpu_rows(&mut self, phase: &str, d: &load::OpenRun, t: &load::OpenRun) {
        let (de, te) = (d.recorded.error_count(), t.recorded.error_count());
        self.rows.push(
            Row::new(phase, "errors")
                .direct(format!("{de} / {}", d.recorded.total()))
                .through(format!("{te} / {}", t.recorded.total()))
                .target("0", Verdict::of(de == 0 && te == 0)),
        );
        self.cost_rows(phase, t, Whose::Proxy);
    }

    /// The CPU time and context switches per request of `run` that the proxy's or the relay's
    /// threads spent. A context switch is a thread put to sleep or woken: the hand-offs the
    /// low rates are about, counted rather than inferred.
    fn cost_rows(&mut self, phase: &str, run: &load::OpenRun, whose: Whose) {
        let (who, floor, cpu, switches) = match whose {
            Whose::Proxy => ("proxy", "", run.cpu.proxy, run.cpu.proxy_switches),
            Whose::Relay => (
                "relay",
                " (the floor)",
                run.cpu.relay,
                run.cpu.relay_switches,
            ),
        };
        let n = run.recorded.total();
        self.rows.push(
            Row::new(phase, &format!("{who} CPU per request{floor}")).through(cpu_per(cpu, n)),
        );
        self.rows.push(
            Row::new(phase, &format!("{who} context switches per request{floor}"))
                .through(format!("{:.1}", switches as f64 / n.max(1) as f64)),
        );
    }

    fn max_throughput(&mut self) {
        let body = converse_body(2048);
        let conns = self.plan.connections;
        let phase = format!(
            "closed loop, {conns} connections, Converse {} B",
            body.len()
        );
        let d = self.direct(FAST_PROFILE, "converse", body.clone(), "application/json");
        let t = self.through(SONNET, "converse", body.clone(), "application/json");
        // The same requests as through the proxy, to a relay that does nothing but relay.
        let r = self.via_relay(&self.through(SONNET, "converse", body, "application/json"));
        let (warmup, measure) = (self.plan.closed_warmup, self.plan.closed_measure);
        let mut runs = Vec::new();
        for (label, target) in [
            ("max direct", &d),
            ("max through", &t),
            ("max via minimal relay", &r),
        ] {
            eprintln!(
                "overhead: {label}: {conns} connections for {} s (+{} s warm-up)",
                measure.as_secs(),
                warmup.as_secs()
            );
            let run = load::closed_loop(
                self.rt.handle(),
                target,
                conns,
                warmup,
                measure,
                &self.probe,
            );
            if target.addr == self.proxy.addr {
                self.through_sent += run.sent_total;
            }
            let other = self.noise(run.cpu.other_cores());
            self.notes.push(format!(
                "{label}: {} requests in {} s, proxy CPU {:.2} s, this process {:.2} s \
                 (relay threads {:.2} s), other processes {:.2} cores{}",
                run.recorded.total(),
                run.window.as_secs(),
                run.cpu.proxy.as_secs_f64(),
                run.cpu.own.as_secs_f64(),
                run.cpu.relay.as_secs_f64(),
                other,
                errors_note(&run.recorded),
            ));
            runs.push(run);
        }
        let (dr, tr, rr) = (&runs[0], &runs[1], &runs[2]);
        let ratio = tr.throughput() / dr.throughput().max(1e-9);
        self.rows.push(
            Row::new(&phase, "throughput")
                .direct(format!("{:.0} req/s", dr.throughput()))
                .through(format!("{:.0} req/s", tr.throughput()))
                .added(format!("×{ratio:.2}"))
                .target("≥ ×0.50 of direct", Verdict::of(ratio >= 0.5)),
        );
        let (d50, t50) = (
            dr.recorded.ttlb.value_at_quantile(0.5),
            tr.recorded.ttlb.value_at_quantile(0.5),
        );
        let (d99, t99) = (
            dr.recorded.ttlb.value_at_quantile(0.99),
            tr.recorded.ttlb.value_at_quantile(0.99),
        );
        self.rows.push(
            Row::new(&phase, "latency p50 / p99")
                .direct(format!("{} / {}", ms(d50), ms(d99)))
                .through(format!("{} / {}", ms(t50), ms(t99)))
                .added(format!("{} / {}", added_ms(t50, d50), added_ms(t99, d99))),
        );
        let (de, te) = (dr.recorded.error_count(), tr.recorded.error_count());
        self.rows.push(
            Row::new(&phase, "errors")
                .direct(format!("{de} / {}", dr.recorded.total()))
                .through(format!("{te} / {}", tr.recorded.total()))
                .target("0", Verdict::of(de == 0 && te == 0)),
        );
        // Everything shares the same cores, so through / direct is at best
        // (generator + fake) / (generator + fake + proxy) CPU per request.
        self.rows.push(
            Row::new(&phase, "CPU per request, load generator + fake")
                .direct(cpu_per(dr.cpu.own, dr.recorded.total()))
                .through(cpu_per(tr.cpu.own, tr.recorded.total())),
        );
        self.rows.push(
            Row::new(&phase, "proxy CPU per request")
                .through(cpu_per(tr.cpu.proxy, tr.recorded.total())),
        );
        // The reference: the same run with a relay that does nothing but relay in place of
        // bedrock-gate. It bounds the ratio any proxy can reach on these shared cores.
        let relay_ratio = rr.throughput() / dr.throughput().max(1e-9);
        self.rows.push(
            Row::new(&phase, "reference: throughput via a minimal hyper relay")
                .direct(format!("{:.0} req/s", dr.throughput()))
                .through(format!("{:.0} req/s", rr.throughput()))
                .added(format!("×{relay_ratio:.2}")),
        );
        self.rows.push(
            Row::new(&phase, "reference: CPU per request, minimal relay")
                .through(cpu_per(rr.cpu.relay, rr.recorded.total())),
        );
        if rr.recorded.error_count() > 0 {
            self.notes.push(format!(
                "minimal relay run had errors{}",
                errors_note(&rr.recorded)
            ));
        }
    }

    /// A team's month: a ledger with [`scale_rows`] rows in the current month, written with the
    /// version 4 schema (no rollups), as a ledger from before them is. Measures the first
    /// `serve` on it (which upgrades it: the rollup migration), a second start (ready on a
    /// version 5 ledger), and `usage` for the whole month by user, day and session. Before the
    /// upgrade, one `usage` shows what reading the rows costs.
    fn ledger_scale(&mut self) {
        let rows = scale_rows();
        let phase = format!("ledger_scale ({} this month)", rows_label(rows));
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target"))
            .expect("tempdir under target/");
        let ledger = dir.path().join("ledger.db");
        let now = chrono::Utc::now();
        let (first, last, built) = build_v4_ledger(&ledger, now, rows);
        let size = std::fs::metadata(&ledger).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "overhead: ledger_scale: {rows} rows written in {:.1} s ({})",
            built.as_secs_f64(),
            mb(size)
        );
        let models: Vec<(&str, &str)> = vec![(SONNET, FAST_PROFILE)];

        // Reading the rows, as every build before the rollups did.
        let config_dir = tempfile::tempdir().expect("tempdir");
        let config = config_dir.path().join("bedrock-gate.toml");
        std::fs::write(&config, proxy::config(self.fake.addr, &models, &ledger))
            .expect("write config");
        let usage = |by: Option<&str>| -> (Duration, String) {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bedrock-gate"));
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("HOME", config_dir.path())
                .args(["usage", "--config"])
                .arg(&config)
                .args(["--since", &first, "--until", &last]);
            if let Some(by) = by {
                cmd.args(["--by", by]);
            }
            let t = Instant::now();
            let out = cmd.output().expect("run bedrock-gate usage");
            let took = t.elapsed();
            assert!(
                out.status.success(),
                "usage failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (took, String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let (before, before_out) = usage(None);

        // First start: the v4 -> v5 migration rolls the rows up, then counters are rebuilt.
        let setup = proxy::Setup {
            ledger: Some(ledger.clone()),
            ..proxy::Setup::default()
        };
        let (mut proxy, first_start) = self.start_and_probe(&models, &setup);
        let log = proxy.stderr();
        proxy.terminate();
        let migrated = log.contains("rolling its rows up");
        // Second start: a version 5 ledger, counters from the rollups; with the dashboard.
        let setup = proxy::Setup {
            admin: true,
            ..setup
        };
        let (mut proxy, ready) = self.start_and_probe(&models, &setup);
        let mut runs: Vec<(String, Duration)> = Vec::new();
        let mut after_out = String::new();
        for by in [None, Some("user"), Some("day"), Some("session")] {
            // Best of three: the first run pays for reading the file into the page cache.
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let (took, out) = usage(by);
                best = best.min(took);
                if by.is_none() {
                    after_out = out;
                }
            }
            runs.push((
                by.map_or("default (by user)".into(), |b| format!("--by {b}")),
                best,
            ));
        }
        let pages = dashboard_times(proxy.admin.expect("the admin listener"));
        proxy.terminate();
        let lines: i64 = rusqlite::Connection::open_with_flags(
            &ledger,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|c| c.query_row("SELECT count(*) FROM usage_daily", [], |r| r.get(0)))
        .unwrap_or(-1);

        let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
        self.rows.push(
            Row::new(
                &phase,
                "first `serve` on the v4 ledger → /healthz (v4→v5 migration included)",
            )
            .through(secs(first_start))
            .target("once per ledger", Verdict::of(migrated)),
        );
        self.rows.push(
            Row::new(&phase, "v4→v5 migration (first start − second start)")
                .through(secs(first_start.saturating_sub(ready))),
        );
        self.rows.push(
            Row::new(&phase, "`serve` start → /healthz answers")
                .through(secs(ready))
                .target("< 1 s", Verdict::of(ready < Duration::from_secs(1))),
        );
        self.rows.push(
            Row::new(
                &phase,
                "`usage` for the month, from the rows (before the migration)",
            )
            .through(secs(before)),
        );
        for (what, took) in &runs {
            self.rows.push(
                Row::new(&phase, &format!("`usage` for the month, {what}"))
                    .through(secs(*took))
                    .target("< 0.5 s", Verdict::of(*took < Duration::from_millis(500))),
            );
        }
        self.dashboard_rows(&phase, &pages);
        let same = before_out == after_out;
        self.rows.push(
            Row::new(&phase, "`usage` output from rollups = from the rows")
                .through(if same { "identical" } else { "differs" })
                .target("byte-for-byte", Verdict::of(same)),
        );
        self.notes.push(format!(
            "ledger_scale: {rows} rows ({SCALE_USERS} users, {} models, {SCALE_SESSIONS} \
             sessions, {first} to {last}) written in {:.0} s with the version 4 schema, {}; \
             {lines} usage_daily lines after the migration; `usage` run with `--since {first} \
             --until {last}`",
            SCALE_MODELS.len(),
            built.as_secs_f64(),
            mb(size)
        ));
        if !same {
            eprintln!("before:\n{before_out}\nafter:\n{after_out}");
        }
        self.scale = Some(ScaleLedger {
            _dir: dir,
            path: ledger,
            now,
            usage_out: after_out,
        });
    }

    /// The dashboard's answers on the scale ledger, one row each: best and worst of the runs,
    /// against the issue's < 200 ms.
    fn dashboard_rows(&mut self, phase: &str, pages: &[(String, Duration, Duration, bool)]) {
        for (path, best, worst, ok) in pages {
            self.rows.push(
                Row::new(
                    phase,
                    &format!("dashboard `{path}`, best / worst of {DASHBOARD_RUNS}"),
                )
                .through(format!(
                    "{:.1} / {:.1} ms{}",
                    best.as_secs_f64() * 1e3,
                    worst.as_secs_f64() * 1e3,
                    if *ok { "" } else { " (not 200)" }
                ))
                .target(
                    "< 200 ms, 200",
                    Verdict::of(*ok && *worst < Duration::from_millis(200)),
                ),
            );
        }
    }

    /// Starts `serve` as `setup` says and returns it with the time from spawn until `/healthz`
    /// answered 200.
    fn start_and_probe(&self, models: &[(&str, &str)], setup: &proxy::Setup) -> (Proxy, Duration) {
        let t = Instant::now();
        let proxy = Proxy::start_with(self.fake.addr, models, setup);
        loop {
            if healthz(proxy.addr) {
                return (proxy, t.elapsed());
            }
            assert!(
                t.elapsed() < Duration::from_secs(600),
                "serve never answered /healthz"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM, a clean exit, and one ledger row per request sent through.
    fn shutdown(&mut self) {
        let (_, hwm) = sys::memory(self.proxy.pid()).unwrap_or_default();
        let status = self.proxy.terminate();
        let clean = status.is_some_and(|s| s.success());
        // Every request is one row; `complete` says the meter saw the usage of the whole answer
        // (so the fake's Converse JSON and event streams were read as real ones).
        let rows: Option<(i64, i64)> = rusqlite::Connection::open_with_flags(
            self.proxy.ledger_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|c| {
            c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(complete), 0) FROM requests",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .ok();
        let log = self.proxy.stderr();
        let access = log
            .lines()
            .filter(|l| l.contains("bedrock_gate::access"))
            .count();
        let problems: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        self.rows.push(
            Row::new("shutdown", "SIGTERM → exit status")
                .through(status.map_or("did not exit".into(), |s| s.to_string()))
                .target("0", Verdict::of(clean)),
        );
        let sent = i64::try_from(self.through_sent).unwrap_or(i64::MAX);
        let rows_ok = rows.is_some_and(|(n, complete)| n == sent && complete == sent);
        self.rows.push(
            Row::new("shutdown", "ledger rows (complete) / requests sent through")
                .through(rows.map_or("unreadable".into(), |(n, complete)| {
                    format!("{n} ({complete}) / {sent}")
                }))
                .target("all, all complete", Verdict::of(rows_ok)),
        );
        self.notes.push(format!(
            "proxy: VmHWM over the whole run {}, {access} access-log lines, {} WARN/ERROR lines{}; \
             fake Bedrock saw {} requests, {} unsigned",
            mb(hwm),
            problems.len(),
            problems
                .first()
                .map_or(String::new(), |l| format!(" (first: `{}`)", l.trim())),
            self.fake.counters.requests.load(Ordering::Relaxed),
            self.fake.counters.unsigned.load(Ordering::Relaxed),
        ));
    }
}

/// A bedrock-gate on the SQLite ledger and one on a PostgreSQL store, started fresh side by
/// side for a store phase, each with its ledger file in a directory of its own (as the Docker
/// image has it), so neither one's writes wake its config watcher.
struct StorePair {
    db: pg::Db,
    sqlite: Proxy,
    pg: Proxy,
    postmaster: Option<u32>,
    /// How each ledger syncs a commit, for the notes.
    sync: String,
}

impl StorePair {
    /// SIGTERM to both; then (SQLite rows, complete) and (PostgreSQL rows, complete).
    fn finish(mut self) -> (StoreRows, pg::Db) {
        let sqlite_exit = self.sqlite.terminate();
        let pg_exit = self.pg.terminate();
        let sqlite = rusqlite::Connection::open_with_flags(
            self.sqlite.ledger_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|c| {
            c.query_row(
                "SELECT COUNT(*), COALESCE(SUM(complete), 0) FROM requests",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .unwrap_or((-1, -1));
        let problems = |p: &Proxy| {
            let log = p.stderr();
            let lines: Vec<String> = log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .map(|l| l.trim().to_string())
                .collect();
            (lines.len(), lines.into_iter().next())
        };
        let rows = StoreRows {
            sqlite,
            pg: self.db.rows(),
            clean: sqlite_exit.is_some_and(|s| s.success()) && pg_exit.is_some_and(|s| s.success()),
            problems: (problems(&self.sqlite), problems(&self.pg)),
        };
        (rows, self.db)
    }
}

/// What the ledgers of a [`StorePair`] hold once both proxies stopped.
struct StoreRows {
    sqlite: (i64, i64),
    pg: (i64, i64),
    clean: bool,
    /// WARN/ERROR log lines of (SQLite, PostgreSQL), and the first of each.
    problems: ((usize, Option<String>), (usize, Option<String>)),
}

/// The notes' mention of the database's CPU and of the disk, in the store phases (whose
/// probes count the database).
fn db_note(probe: &Probe, cpu: &sys::CpuDelta) -> String {
    if probe.db_pid.is_some() {
        format!(
            ", PostgreSQL CPU {:.2} s, disk stalled {:.0} % of the window (PSI io full)",
            cpu.db.as_secs_f64(),
            cpu.io_stalled() * 100.0
        )
    } else {
        String::new()
    }
}

impl Bench {
    /// Notes that a store phase did not run, and why.
    fn skip_pg(&mut self, phase: &str) {
        eprintln!("overhead: {phase}: skipped: {}", pg::HOW_TO_ENABLE);
        self.notes
            .push(format!("{phase}: skipped: {}", pg::HOW_TO_ENABLE));
    }

    fn store_pair(&self, cluster: &str, prefix: &str) -> StorePair {
        let db = pg::Db::create(cluster, prefix);
        let models = [(SONNET, FAST_PROFILE)];
        let sqlite = Proxy::start_with(
            self.fake.addr,
            &models,
            &proxy::Setup {
                ledger_in_subdir: true,
                ..proxy::Setup::default()
            },
        );
        let pg = Proxy::start_with(
            self.fake.addr,
            &models,
            &proxy::Setup {
                ledger_in_subdir: true,
                store_url: Some(db.url.clone()),
                ..proxy::Setup::default()
            },
        );
        let postmaster = db.postmaster_pid();
        let sync: String = db.query_one("SHOW synchronous_commit", |r| r.get(0));
        let sync = format!(
            "SQLite ledger.synchronous = {}, PostgreSQL synchronous_commit = {sync}",
            std::env::var("BENCH_LEDGER_SYNCHRONOUS")
                .unwrap_or_else(|_| "normal (the default)".into())
        );
        eprintln!("overhead: store: {sync}");
        eprintln!(
            "overhead: store: bedrock-gate on SQLite pid {} on {}, on PostgreSQL ({}) pid {} on {}; postmaster {:?}",
            sqlite.pid(),
            sqlite.addr,
            db.name,
            pg.pid(),
            pg.addr,
            postmaster
        );
        StorePair {
            db,
            sqlite,
            pg,
            postmaster,
            sync,
        }
    }

    /// The rows every store phase ends with: each request one row in its ledger, all
    /// complete, both proxies exit 0.
    fn store_rows(&mut self, phase: &str, rows: &StoreRows, sent: (u64, u64)) {
        let ok = |(n, complete): (i64, i64), sent: u64| {
            let sent = i64::try_from(sent).unwrap_or(i64::MAX);
            n == sent && complete == sent
        };
        self.rows.push(
            Row::new(
                phase,
                "ledger rows (complete) / requests sent: SQLite | PostgreSQL",
            )
            .direct(format!(
                "{} ({}) / {}",
                rows.sqlite.0, rows.sqlite.1, sent.0
            ))
            .through(format!("{} ({}) / {}", rows.pg.0, rows.pg.1, sent.1))
            .target(
                "all, all complete; exit 0",
                Verdict::of(ok(rows.sqlite, sent.0) && ok(rows.pg, sent.1) && rows.clean),
            ),
        );
        let ((sn, sf), (pn, pf)) = &rows.problems;
        if *sn + *pn > 0 {
            let first = |f: &Option<String>| {
                f.as_ref()
                    .map_or(String::new(), |l| format!(" (first: `{l}`)"))
            };
            self.notes.push(format!(
                "{phase}: WARN/ERROR log lines: SQLite {sn}{}, PostgreSQL {pn}{}",
                first(sf),
                first(pf)
            ));
        }
    }

    /// The 1,000 req/s Converse load of `small`, direct, through a bedrock-gate on SQLite and
    /// through one on PostgreSQL, in that order: what the store adds to a request's latency.
    fn store_pg(&mut self) {
        let Some(cluster) = pg::cluster_url() else {
            self.skip_pg("store_pg");
            return;
        };
        let pair = self.store_pair(&cluster, "bench_store");
        self.notes.push(format!("store_pg: {}", pair.sync));
        let body = converse_body(2048);
        let schedule = self.plan.small;
        let phase = format!(
            "store: Converse {} B @ {} req/s, SQLite vs PostgreSQL",
            body.len(),
            schedule.rate
        );
        let accept = "application/json";
        let d = self.direct(FAST_PROFILE, "converse", body.clone(), accept);
        let ts = self.through_at(pair.sqlite.addr, SONNET, "converse", body.clone(), accept);
        let tp = self.through_at(pair.pg.addr, SONNET, "converse", body, accept);
        let sqlite_probe = Probe::with_db(pair.sqlite.pid(), pair.postmaster);
        let pg_probe = Probe::with_db(pair.pg.pid(), pair.postmaster);
        let dr = self.open_probed("store direct", &d, schedule, &sqlite_probe);
        let sr = self.open_probed("store via SQLite", &ts, schedule, &sqlite_probe);
        let commits = pair.db.commits();
        let pr = self.open_probed("store via PostgreSQL", &tp, schedule, &pg_probe);
        let sent = (sr.sent_total, pr.sent_total);
        let (rows, db) = pair.finish();
        // The statistics are current once the proxy's connections have closed.
        let commits = db.commits() - commits;

        for (what, r) in [("via SQLite", &sr), ("via PostgreSQL", &pr)] {
            self.rows.extend(report::latency_rows(
                &phase,
                &format!("latency {what}"),
                &dr.recorded.ttlb,
                &r.recorded.ttlb,
                None,
                true,
            ));
        }
        let (s, p) = (&sr.recorded.ttlb, &pr.recorded.ttlb);
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let (sq, pq) = (s.value_at_quantile(q), p.value_at_quantile(q));
            let mut row = Row::new(
                &phase,
                &format!("added {name}: PostgreSQL − SQLite (SQLite | PostgreSQL)"),
            )
            .direct(ms(sq))
            .through(ms(pq))
            .added(added_ms(pq, sq));
            if name == "p99" {
                row = row.target("≤ +0.300 ms", Verdict::of(pq <= sq + 300));
            }
            self.rows.push(row);
        }
        let errs =
            |r: &load::OpenRun| format!("{} / {}", r.recorded.error_count(), r.recorded.total());
        let no_errors = [&dr, &sr, &pr]
            .iter()
            .all(|r| r.recorded.error_count() == 0);
        self.rows.push(
            Row::new(&phase, "errors: direct | SQLite | PostgreSQL")
                .direct(errs(&dr))
                .through(format!("{} | {}", errs(&sr), errs(&pr)))
                .target("0", Verdict::of(no_errors)),
        );
        self.rows.push(
            Row::new(&phase, "proxy CPU per request (SQLite | PostgreSQL)")
                .direct(cpu_per(sr.cpu.proxy, sr.recorded.total()))
                .through(cpu_per(pr.cpu.proxy, pr.recorded.total())),
        );
        self.rows.push(
            Row::new(&phase, "PostgreSQL server CPU per request")
                .through(cpu_per(pr.cpu.db, pr.recorded.total())),
        );
        self.rows.push(
            Row::new(
                &phase,
                "database transactions per request sent (PostgreSQL)",
            )
            .through(format!(
                "{:.2}",
                commits as f64 / pr.sent_total.max(1) as f64
            )),
        );
        self.store_rows(&phase, &rows, sent);
        self.notes.push(format!(
            "{phase}: {commits} transactions in the database for {} requests (warm-up included): \
             the writer's group commits (a call's sent marker and its row) plus the twice-a-second \
             read of the other replicas' spend",
            pr.sent_total
        ));
    }

    /// The closed loop of `max`, direct, through a bedrock-gate on SQLite and through one on
    /// PostgreSQL: how many requests a second one replica and one database carry.
    fn store_pg_max(&mut self) {
        let Some(cluster) = pg::cluster_url() else {
            self.skip_pg("store_pg_max");
            return;
        };
        let pair = self.store_pair(&cluster, "bench_store_max");
        self.notes.push(format!("store_pg_max: {}", pair.sync));
        let body = converse_body(2048);
        let conns = self.plan.connections;
        let phase = format!(
            "store: closed loop, {conns} connections, Converse {} B, SQLite vs PostgreSQL",
            body.len()
        );
        let accept = "application/json";
        let d = self.direct(FAST_PROFILE, "converse", body.clone(), accept);
        let ts = self.through_at(pair.sqlite.addr, SONNET, "converse", body.clone(), accept);
        let tp = self.through_at(pair.pg.addr, SONNET, "converse", body, accept);
        let (warmup, measure) = (self.plan.closed_warmup, self.plan.closed_measure);
        let mut runs = Vec::new();
        let mut commits = 0;
        for (label, target, pid) in [
            ("store max direct", &d, pair.sqlite.pid()),
            ("store max via SQLite", &ts, pair.sqlite.pid()),
            ("store max via PostgreSQL", &tp, pair.pg.pid()),
        ] {
            let probe = Probe::with_db(pid, pair.postmaster);
            eprintln!(
                "overhead: {label}: {conns} connections for {} s (+{} s warm-up)",
                measure.as_secs(),
                warmup.as_secs()
            );
            if target.addr == pair.pg.addr {
                commits = pair.db.commits();
            }
            let run = load::closed_loop(self.rt.handle(), target, conns, warmup, measure, &probe);
            let other = self.noise(run.cpu.other_cores());
            self.notes.push(format!(
                "{label}: {} requests in {} s, proxy CPU {:.2} s, this process {:.2} s{}, \
                 other processes {:.2} cores{}",
                run.recorded.total(),
                run.window.as_secs(),
                run.cpu.proxy.as_secs_f64(),
                run.cpu.own.as_secs_f64(),
                db_note(&probe, &run.cpu),
                other,
                errors_note(&run.recorded),
            ));
            runs.push(run);
        }
        let (dr, sr, pr) = (&runs[0], &runs[1], &runs[2]);
        let sent = (sr.sent_total, pr.sent_total);
        let (rows, db) = pair.finish();
        let commits = db.commits() - commits;
        drop(db);
        let ratio = pr.throughput() / sr.throughput().max(1e-9);
        self.rows.push(
            Row::new(&phase, "throughput (SQLite | PostgreSQL); direct")
                .direct(format!("{:.0} req/s", sr.throughput()))
                .through(format!("{:.0} req/s", pr.throughput()))
                .added(format!("×{ratio:.2}"))
                .target(
                    format!("direct {:.0} req/s", dr.throughput()),
                    Verdict::None,
                ),
        );
        let lat = |r: &load::ClosedRun| {
            format!(
                "{} / {}",
                ms(r.recorded.ttlb.value_at_quantile(0.5)),
                ms(r.recorded.ttlb.value_at_quantile(0.99))
            )
        };
        self.rows.push(
            Row::new(&phase, "latency p50 / p99 (SQLite | PostgreSQL)")
                .direct(lat(sr))
                .through(lat(pr)),
        );
        let errs =
            |r: &load::ClosedRun| format!("{} / {}", r.recorded.error_count(), r.recorded.total());
        let no_errors = runs.iter().all(|r| r.recorded.error_count() == 0);
        self.rows.push(
            Row::new(&phase, "errors (SQLite | PostgreSQL); direct")
                .direct(errs(sr))
                .through(errs(pr))
                .target(format!("0; direct {}", errs(dr)), Verdict::of(no_errors)),
        );
        self.rows.push(
            Row::new(&phase, "proxy CPU per request (SQLite | PostgreSQL)")
                .direct(cpu_per(sr.cpu.proxy, sr.recorded.total()))
                .through(cpu_per(pr.cpu.proxy, pr.recorded.total())),
        );
        self.rows.push(
            Row::new(&phase, "PostgreSQL server CPU per request")
                .through(cpu_per(pr.cpu.db, pr.recorded.total())),
        );
        self.rows.push(
            Row::new(&phase, "requests per database transaction (group commit)").through(format!(
                "{:.1}",
                pr.sent_total as f64 / commits.max(1) as f64
            )),
        );
        self.store_rows(&phase, &rows, sent);
    }

    /// `ledger_scale` on PostgreSQL: the month's rows in an empty database, then `serve`
    /// started on it twice and `usage` for the month run against it. The rows get there by
    /// `store import-sqlite` of the SQLite ledger (timed; the default, the way a ledger
    /// migrates), or with `BENCH_SCALE_PG_LOAD=copy` by COPY straight into `requests` plus
    /// their rollup (for a month too big to import in the time at hand). The SQLite ledger is
    /// the one `ledger_scale` just measured when both run, else a new one built the same way
    /// (not needed for `copy`: then the output of `usage` is compared only when `ledger_scale`
    /// ran too).
    fn ledger_scale_pg(&mut self) {
        let Some(cluster) = pg::cluster_url() else {
            self.skip_pg("ledger_scale_pg");
            return;
        };
        let copy = std::env::var("BENCH_SCALE_PG_LOAD").is_ok_and(|v| v == "copy");
        let rows = scale_rows();
        let phase = format!("ledger_scale_pg ({} this month)", rows_label(rows));
        let models: Vec<(&str, &str)> = vec![(SONNET, FAST_PROFILE)];
        let exe = env!("CARGO_BIN_EXE_bedrock-gate");
        let hermetic = |home: &std::path::Path| {
            let mut cmd = std::process::Command::new(exe);
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("HOME", home);
            cmd
        };
        let scale = match (self.scale.take(), copy) {
            (Some(s), _) => Some(s),
            (None, true) => None,
            (None, false) => {
                let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target"))
                    .expect("tempdir under target/");
                let path = dir.path().join("ledger.db");
                let now = chrono::Utc::now();
                let (first, last, built) = build_v4_ledger(&path, now, rows);
                eprintln!(
                    "overhead: ledger_scale_pg: {rows} SQLite rows written in {:.1} s",
                    built.as_secs_f64()
                );
                // What `usage` says on SQLite (from the rows of this version 4 ledger), to
                // compare with PostgreSQL's.
                let config_dir = tempfile::tempdir().expect("tempdir");
                let config = config_dir.path().join("bedrock-gate.toml");
                std::fs::write(&config, proxy::config(self.fake.addr, &models, &path))
                    .expect("write config");
                let out = hermetic(config_dir.path())
                    .args(["usage", "--config"])
                    .arg(&config)
                    .args(["--since", &first, "--until", &last])
                    .output()
                    .expect("run usage");
                assert!(out.status.success(), "usage on SQLite failed");
                Some(ScaleLedger {
                    _dir: dir,
                    path,
                    now,
                    usage_out: String::from_utf8_lossy(&out.stdout).into_owned(),
                })
            }
        };
        let month = ScaleMonth::new(
            scale.as_ref().map_or_else(chrono::Utc::now, |s| s.now),
            rows,
        );
        let (first, last) = month.days();
        let db = pg::Db::create(&cluster, "bench_scale");
        let config_dir = tempfile::tempdir().expect("tempdir");
        let config = config_dir.path().join("bedrock-gate.toml");
        // `ledger.path` holds only the sign-in sessions on a store.
        let sessions = config_dir.path().join("sessions.db");
        std::fs::write(
            &config,
            proxy::config_with(self.fake.addr, &models, &sessions, Some(&db.url)),
        )
        .expect("write config");
        let run_cli = |args: &[&std::ffi::OsStr]| -> String {
            let out = hermetic(config_dir.path())
                .args(args)
                .arg("--config")
                .arg(&config)
                .output()
                .expect("run bedrock-gate");
            assert!(
                out.status.success(),
                "bedrock-gate {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };

        let t = Instant::now();
        let (load_what, said) = match (&scale, copy) {
            (Some(s), false) => {
                eprintln!(
                    "overhead: ledger_scale_pg: store import-sqlite into {}",
                    db.name
                );
                let said = run_cli(&[
                    "store".as_ref(),
                    "import-sqlite".as_ref(),
                    s.path.as_os_str(),
                ]);
                (
                    "`store import-sqlite` of the SQLite ledger into an empty database",
                    said,
                )
            }
            _ => {
                eprintln!(
                    "overhead: ledger_scale_pg: store migrate, COPY into {}",
                    db.name
                );
                let said = run_cli(&["store".as_ref(), "migrate".as_ref()]);
                let lines = pg::block_on(copy_scale_month(&db.url, &month, rows));
                (
                    "`store migrate`, then COPY of the rows and their rollup into the empty database, then ANALYZE",
                    format!("{said}; {lines} usage_daily lines written"),
                )
            }
        };
        let loaded = t.elapsed();
        eprintln!(
            "overhead: ledger_scale_pg: {said} ({:.1} s)",
            loaded.as_secs_f64()
        );
        let size = db.size_bytes();
        let (in_pg, _) = db.rows();

        let setup = proxy::Setup {
            ledger: Some(sessions.clone()),
            store_url: Some(db.url.clone()),
            admin: true,
            ..proxy::Setup::default()
        };
        let (mut proxy, first_start) = self.start_and_probe(&models, &setup);
        proxy.terminate();
        let (mut proxy, ready) = self.start_and_probe(&models, &setup);
        let usage = |by: Option<&str>| -> (Duration, String) {
            let mut cmd = hermetic(config_dir.path());
            cmd.args(["usage", "--config"])
                .arg(&config)
                .args(["--since", &first, "--until", &last]);
            if let Some(by) = by {
                cmd.args(["--by", by]);
            }
            let t = Instant::now();
            let out = cmd.output().expect("run bedrock-gate usage");
            let took = t.elapsed();
            assert!(
                out.status.success(),
                "usage failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (took, String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let mut runs: Vec<(String, Duration)> = Vec::new();
        let mut pg_out = String::new();
        for by in [None, Some("user"), Some("day"), Some("session")] {
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let (took, out) = usage(by);
                best = best.min(took);
                if by.is_none() {
                    pg_out = out;
                }
            }
            runs.push((
                by.map_or("default (by user)".into(), |b| format!("--by {b}")),
                best,
            ));
        }
        let pages = dashboard_times(proxy.admin.expect("the admin listener"));
        let exit = proxy.terminate();
        let lines: i64 = db.query_one("SELECT count(*) FROM usage_daily", |r| r.get(0));
        drop(db);

        let secs = |d: Duration| format!("{:.3} s", d.as_secs_f64());
        let all = i64::try_from(rows).unwrap_or(i64::MAX) == in_pg;
        self.rows.push(
            Row::new(&phase, load_what)
                .through(format!(
                    "{} ({:.0} rows/s)",
                    secs(loaded),
                    rows as f64 / loaded.as_secs_f64().max(1e-9)
                ))
                .target(format!("all {rows} rows"), Verdict::of(all)),
        );
        self.rows
            .push(Row::new(&phase, "first `serve` on it → /healthz").through(secs(first_start)));
        self.rows.push(
            Row::new(&phase, "`serve` start → /healthz answers")
                .through(secs(ready))
                .target("< 1 s", Verdict::of(ready < Duration::from_secs(1))),
        );
        for (what, took) in &runs {
            self.rows.push(
                Row::new(&phase, &format!("`usage` for the month, {what}"))
                    .through(secs(*took))
                    .target("< 0.5 s", Verdict::of(*took < Duration::from_millis(500))),
            );
        }
        self.dashboard_rows(&phase, &pages);
        match &scale {
            Some(s) => {
                let same = pg_out == s.usage_out;
                self.rows.push(
                    Row::new(&phase, "`usage` output on PostgreSQL = on SQLite")
                        .through(compare_lines(&s.usage_out, &pg_out))
                        .target("byte-for-byte", Verdict::of(same)),
                );
                if !same {
                    eprintln!("SQLite:\n{}\nPostgreSQL:\n{pg_out}", s.usage_out);
                }
            }
            None => self.rows.push(
                Row::new(&phase, "`usage` output on PostgreSQL = on SQLite")
                    .through("not compared (no SQLite ledger in this run)"),
            ),
        }
        self.rows.push(
            Row::new(&phase, "SIGTERM → exit status")
                .through(exit.map_or("did not exit".into(), |s| s.to_string()))
                .target("0", Verdict::of(exit.is_some_and(|s| s.success()))),
        );
        self.notes.push(format!(
            "ledger_scale_pg: {rows} rows ({first} to {last}); the database {} after loading, \
             {lines} usage_daily lines; `usage` best of 3, while the second `serve` ran; \
             loading said: {said}",
            mb(size),
        ));
    }
}

/// Writes `month`'s `rows` straight into the store's `requests` with a binary COPY, and their
/// daily rollup into `usage_daily` as `store::pg::insert_in` computes it (the ledger's own
/// `day_of` and `classify`), under the replica name `store import-sqlite` writes (`import`);
/// then ANALYZE, as autovacuum would within a minute. The schema must be there. Returns the
/// number of rollup lines.
async fn copy_scale_month(url: &str, month: &ScaleMonth, rows: u64) -> u64 {
    use bedrock_gate::meter::ledger::{classify, day_of};
    use tokio_postgres::binary_copy::BinaryCopyInWriter;
    use tokio_postgres::types::Type;
    const REPLICA: &str = "import";
    let client = pg::connect(url).await;
    let sink = client
        .copy_in(
            r#"COPY requests (ts_ms, "user", operation, model, base_model, profile_arn, status,
                   input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
                   latency_ms, ttfb_ms, request_id, upstream_request_id, complete, admitted,
                   outcome, front, project, session, replica) FROM STDIN BINARY"#,
        )
        .await
        .expect("COPY requests");
    let (i8, text, i4) = (Type::INT8, Type::TEXT, Type::INT4);
    let types = [
        i8.clone(),
        text.clone(),
        text.clone(),
        text.clone(),
        text.clone(),
        text.clone(),
        i4,
        i8.clone(),
        i8.clone(),
        i8.clone(),
        i8.clone(),
        Type::FLOAT8,
        i8.clone(),
        i8,
        text.clone(),
        text.clone(),
        Type::BOOL,
        Type::BOOL,
        text.clone(),
        text.clone(),
        text.clone(),
        text.clone(),
        text,
    ];
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    // (day, user, model, profile, project, session, front) → requests, input, output,
    // cache read, cost, unpriced, incomplete, errors.
    type Sums = (i64, i64, i64, i64, f64, i64, i64, i64);
    let mut days: std::collections::BTreeMap<[String; 7], Sums> = Default::default();
    let none: Option<&str> = None;
    for i in 0..rows {
        let r = month.row(i);
        writer
            .as_mut()
            .write(&[
                &r.ts,
                &r.user,
                &"Converse",
                &r.model,
                &r.model,
                &r.profile,
                &r.status,
                &r.input,
                &r.output,
                &r.cache_read,
                &0i64,
                &r.cost,
                &r.latency,
                &Some(r.ttfb),
                &r.request_id,
                &none,
                &r.complete,
                &true,
                &r.outcome,
                &r.front,
                &r.project,
                &r.session,
                &REPLICA,
            ])
            .await
            .expect("COPY a row");
        let tokens = u64::try_from(r.input + r.output + r.cache_read).unwrap_or(0);
        let class = classify(
            u16::try_from(r.status).unwrap_or(0),
            r.complete,
            r.outcome,
            tokens,
            r.cost,
        );
        let s = days
            .entry([
                day_of(r.ts),
                r.user.to_string(),
                r.model.to_string(),
                r.profile,
                r.project,
                r.session,
                r.front.to_string(),
            ])
            .or_default();
        s.0 += 1;
        s.1 += r.input;
        s.2 += r.output;
        s.3 += r.cache_read;
        s.4 += r.cost.unwrap_or(0.0);
        s.5 += i64::from(class.unpriced);
        s.6 += i64::from(class.incomplete);
        s.7 += i64::from(class.error);
    }
    writer.as_mut().finish().await.expect("finish COPY");
    let key = |i: usize| days.keys().map(|k| k[i].clone()).collect::<Vec<_>>();
    let sum = |f: &dyn Fn(&Sums) -> i64| days.values().map(f).collect::<Vec<i64>>();
    let costs: Vec<f64> = days.values().map(|s| s.4).collect();
    client
        .execute(
            r#"INSERT INTO usage_daily (day, "user", model, profile, project, session, front, replica,
                   requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                   cost_usd, unpriced, incomplete, errors)
               SELECT d, u, m, p, pr, s, f, $8::text, rq, i, o, cr, 0, c, up, inc, e
               FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                   $7::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[],
                   $13::float8[], $14::bigint[], $15::bigint[], $16::bigint[])
                   AS t(d, u, m, p, pr, s, f, rq, i, o, cr, c, up, inc, e)"#,
            &[
                &key(0),
                &key(1),
                &key(2),
                &key(3),
                &key(4),
                &key(5),
                &key(6),
                &REPLICA,
                &sum(&|s| s.0),
                &sum(&|s| s.1),
                &sum(&|s| s.2),
                &sum(&|s| s.3),
                &costs,
                &sum(&|s| s.5),
                &sum(&|s| s.6),
                &sum(&|s| s.7),
            ],
        )
        .await
        .expect("write the rollup");
    client
        .batch_execute("ANALYZE requests; ANALYZE usage_daily")
        .await
        .expect("ANALYZE");
    days.len() as u64
}

/// Rows the `ledger_scale` phases write into the current month, unless `BENCH_SCALE_ROWS` says
/// otherwise (see [`scale_rows`]).
const SCALE_ROWS: u64 = 10_000_000;

/// `BENCH_SCALE_ROWS` (`_` allowed as a separator: `1_000_000`), else [`SCALE_ROWS`].
fn scale_rows() -> u64 {
    std::env::var("BENCH_SCALE_ROWS")
        .ok()
        .and_then(|v| v.replace('_', "").trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(SCALE_ROWS)
}

/// `10 M rows`, `2.5 M rows`, `50000 rows`.
fn rows_label(rows: u64) -> String {
    if rows % 1_000_000 == 0 {
        format!("{} M rows", rows / 1_000_000)
    } else if rows >= 100_000 {
        format!("{:.1} M rows", rows as f64 / 1e6)
    } else {
        format!("{rows} rows")
    }
}
const SCALE_USERS: u64 = 200;
const SCALE_SESSIONS: u64 = 20_000;
/// (model, USD per million input tokens, per million output tokens); `None`: unpriced.
const SCALE_MODELS: [(&str, Option<(f64, f64)>); 5] = [
    (
        "anthropic.claude-sonnet-4-5-20250929-v1:0",
        Some((3.0, 15.0)),
    ),
    ("anthropic.claude-haiku-4-5-20251001-v1:0", Some((1.0, 5.0))),
    (
        "anthropic.claude-opus-4-1-20250805-v1:0",
        Some((15.0, 75.0)),
    ),
    ("amazon.nova-pro-v1:0", Some((0.8, 3.2))),
    ("mistral.new-model-v1:0", None),
];

/// Writes `rows` rows spread evenly from the start of `now`'s month to `now` into a new
/// ledger with the version 4 schema, in one transaction of prepared inserts, in time order (as
/// the writer does). Not beyond `now`: a row can't be from the future, and the start-up reads
/// the last minute's rows, from a minute ago on. Each session belongs to one user and one day;
/// a user's calls go to a few models. Returns the month's first day, today, and how long it
/// took.
fn build_v4_ledger(
    path: &std::path::Path,
    now: chrono::DateTime<chrono::Utc>,
    rows: u64,
) -> (String, String, Duration) {
    let t = Instant::now();
    let month = ScaleMonth::new(now, rows);
    let mut conn = rusqlite::Connection::open(path).expect("open ledger");
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;
         CREATE TABLE requests (
            id INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, user TEXT, operation TEXT NOT NULL,
            model TEXT, base_model TEXT, profile_arn TEXT, status INTEGER NOT NULL,
            input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
            cache_read_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL, cost_usd REAL,
            latency_ms INTEGER NOT NULL, ttfb_ms INTEGER, request_id TEXT NOT NULL,
            upstream_request_id TEXT, complete INTEGER NOT NULL, admitted INTEGER NOT NULL,
            outcome TEXT NOT NULL, front TEXT, project TEXT, session TEXT);
         CREATE INDEX requests_ts ON requests (ts_ms);
         CREATE INDEX requests_user_ts ON requests (user, ts_ms);
         CREATE TABLE sent (request_id TEXT PRIMARY KEY, ts_ms INTEGER NOT NULL,
            user TEXT NOT NULL, front TEXT, project TEXT, session TEXT, operation TEXT NOT NULL,
            model TEXT, base_model TEXT, profile_arn TEXT, admitted INTEGER NOT NULL) WITHOUT ROWID;
         PRAGMA user_version = 4;",
    )
    .expect("v4 schema");
    let tx = conn.transaction().expect("begin");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO requests (ts_ms, user, operation, model, base_model, profile_arn,
                    status, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                    cost_usd, latency_ms, ttfb_ms, request_id, upstream_request_id, complete,
                    admitted, outcome, front, project, session)
                 VALUES (?1, ?2, 'Converse', ?3, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13,
                    NULL, ?14, 1, ?15, ?16, ?17, ?18)",
            )
            .expect("prepare");
        for i in 0..rows {
            let r = month.row(i);
            insert
                .execute(rusqlite::params![
                    r.ts,
                    r.user,
                    r.model,
                    r.profile,
                    r.status,
                    r.input,
                    r.output,
                    r.cache_read,
                    0,
                    r.cost,
                    r.latency,
                    r.ttfb,
                    r.request_id,
                    r.complete,
                    r.outcome,
                    r.front,
                    r.project,
                    r.session,
                ])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
        .expect("checkpoint");
    let (first, last) = month.days();
    (first, last, t.elapsed())
}

/// The month the scale phases write: rows spread evenly from the first of `now`'s month to
/// `now`, the same rows for the same `now` and count, whichever ledger they go to.
struct ScaleMonth {
    start: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
    month_ms: i64,
    total: i64,
    sessions_per_day: u64,
    users: Vec<String>,
}

/// One row of a [`ScaleMonth`] (operation `Converse`, base model = model, no cache writes,
/// admitted).
struct ScaleRow<'a> {
    ts: i64,
    user: &'a str,
    model: &'static str,
    profile: String,
    status: i32,
    input: i64,
    output: i64,
    cache_read: i64,
    cost: Option<f64>,
    latency: i64,
    ttfb: i64,
    request_id: String,
    complete: bool,
    outcome: &'static str,
    front: &'static str,
    project: String,
    session: String,
}

impl ScaleMonth {
    fn new(now: chrono::DateTime<chrono::Utc>, rows: u64) -> ScaleMonth {
        use chrono::{Datelike as _, TimeZone as _};
        let start = chrono::Utc
            .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
            .single()
            .expect("month start");
        let month_ms = (now - start).num_milliseconds().max(1);
        let days = u64::try_from(month_ms / 86_400_000 + 1).expect("days");
        ScaleMonth {
            start,
            now,
            month_ms,
            total: i64::try_from(rows).expect("rows"),
            sessions_per_day: SCALE_SESSIONS / days,
            users: (0..SCALE_USERS).map(|u| format!("dev{u:03}")).collect(),
        }
    }

    /// The month's first day and today, `YYYY-MM-DD`.
    fn days(&self) -> (String, String) {
        (
            self.start.format("%Y-%m-%d").to_string(),
            self.now.format("%Y-%m-%d").to_string(),
        )
    }

    fn row(&self, i: u64) -> ScaleRow<'_> {
        // A cheap, well-spread pseudo-random number per row.
        let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        let start_ms = self.start.timestamp_millis();
        let ts = start_ms + i64::try_from(i).expect("i") * self.month_ms / self.total;
        let day = u64::try_from((ts - start_ms) / 86_400_000).expect("day");
        let session = day * self.sessions_per_day + h % self.sessions_per_day;
        let user = &self.users[usize::try_from(session % SCALE_USERS).expect("user")];
        let (model, price) =
            SCALE_MODELS[usize::try_from((session + (h >> 20) % 3) % 5).expect("m")];
        let input = 500 + (h >> 8) % 20_000;
        let output = 50 + (h >> 24) % 2_000;
        let cache_read = if h % 3 == 0 { (h >> 32) % 50_000 } else { 0 };
        let (status, complete, outcome) = match h % 200 {
            0 => (429, false, "ThrottlingException"),
            1 | 2 => (200, false, "client_gone"),
            3 => (200, false, "upstream_idle"),
            _ => (200, true, "complete"),
        };
        let (input, output, cache_read) = if status == 200 {
            (input, output, cache_read)
        } else {
            (0, 0, 0)
        };
        let cost = price.map(|(pi, po)| {
            (input as f64 * pi + output as f64 * po + cache_read as f64 * pi / 10.0) / 1e6
        });
        let i64_ = |v: u64| i64::try_from(v).expect("fits");
        ScaleRow {
            ts,
            user,
            model,
            profile: format!(
                "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/{user}-{}",
                &model[..6]
            ),
            status,
            input: i64_(input),
            output: i64_(output),
            cache_read: i64_(cache_read),
            cost,
            latency: i64_(200 + h % 5_000),
            ttfb: i64_(100 + h % 900),
            request_id: format!("{i:016x}"),
            complete,
            outcome,
            front: if session % 4 == 0 {
                "bedrock"
            } else {
                "anthropic"
            },
            project: format!("project-{}", session % SCALE_USERS % 10),
            session: format!("session-{session:05}"),
        }
    }
}

/// `identical`, or how many lines of `b` differ from `a` and the first that does.
fn compare_lines(a: &str, b: &str) -> String {
    if a == b {
        return "identical".into();
    }
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let differing: Vec<(&str, &str)> = la
        .iter()
        .zip(&lb)
        .filter(|(x, y)| x != y)
        .map(|(x, y)| (*x, *y))
        .collect();
    let first = differing.first().map_or(String::new(), |(x, y)| {
        let squeeze = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
        format!("; first: `{}` vs `{}`", squeeze(x), squeeze(y))
    });
    format!(
        "differs: {} of {} lines{}{first}",
        differing.len(),
        la.len(),
        if la.len() == lb.len() {
            ""
        } else {
            " (and in length)"
        }
    )
}

/// Whether `GET /healthz` on `addr` answers 200 (plain HTTP/1.1, one connection).
/// Runs of each dashboard request in [`dashboard_times`].
const DASHBOARD_RUNS: u32 = 5;

/// Times every dashboard page and API answer on the admin listener `admin` ([`DASHBOARD_RUNS`]
/// each, after one untimed warm-up): (path, best, worst, all 200).
fn dashboard_times(admin: std::net::SocketAddr) -> Vec<(String, Duration, Duration, bool)> {
    use std::io::{Read as _, Write as _};
    let get = |path: &str| -> (Duration, bool) {
        let t = Instant::now();
        let Ok(mut s) = std::net::TcpStream::connect(admin) else {
            return (t.elapsed(), false);
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            proxy::ADMIN_TOKEN
        );
        if s.write_all(req.as_bytes()).is_err() {
            return (t.elapsed(), false);
        }
        let mut body = Vec::new();
        let _ = s.read_to_end(&mut body);
        (t.elapsed(), body.starts_with(b"HTTP/1.1 200"))
    };
    let user = format!("/users/dev{:03}", 0);
    let api_user = format!("/api/users/dev{:03}", 0);
    [
        "/",
        "/users",
        user.as_str(),
        "/api/overview",
        "/api/users",
        "/api/users.csv",
        api_user.as_str(),
    ]
    .iter()
    .map(|path| {
        let _ = get(path);
        let (mut best, mut worst, mut ok) = (Duration::MAX, Duration::ZERO, true);
        for _ in 0..DASHBOARD_RUNS {
            let (took, fine) = get(path);
            best = best.min(took);
            worst = worst.max(took);
            ok &= fine;
        }
        ((*path).to_string(), best, worst, ok)
    })
    .collect()
}

fn healthz(addr: std::net::SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

/// The commit the proxy was built from (`-dirty` when the work tree had changes).
fn tree_version() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_string())
}

/// `p50 / max` of `h`, in milliseconds.
fn p50_and_max(h: &hdrhistogram::Histogram<u64>) -> String {
    format!("{} / {}", ms(h.value_at_quantile(0.5)), ms(h.max()))
}

fn errors_note(r: &load::Recorded) -> String {
    if r.errors.is_empty() {
        return String::new();
    }
    let kinds: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("; errors: {}", kinds.join(", "))
}
