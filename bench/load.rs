//! The load generator: open loop at a fixed rate with latency correction, and closed loop over a
//! fixed number of connections for maximum throughput. The same code drives the fake directly
//! and through the proxy; only the [`Target`] differs.
//!
//! Open loop: request `i` is *intended* to start at `start + i / rate`, and every latency is
//! measured from that intended time, not from when the request actually left. A stall (in the
//! generator, the proxy or the kernel) therefore shows up as latency of every request it delayed
//! instead of silently thinning the sample (coordinated omission). A dispatcher thread sleeps
//! until each intended time and spawns the request on the generator runtime; how late it was
//! is recorded too, so a reader can tell a late generator from a slow server.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::runtime::Handle;

use crate::sys::{CpuDelta, Probe};

/// One kind of request to one server.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Origin-form path (already percent-encoded as a client would send it).
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Length of a complete response body; anything else is a truncated response.
    pub expect_len: usize,
}

impl Target {
    fn request(&self, absolute: bool) -> Request<Full<Bytes>> {
        let uri: Uri = if absolute {
            format!("http://{}{}", self.addr, self.path)
        } else {
            self.path.clone()
        }
        .parse()
        .expect("uri");
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers.clone();
        if !absolute {
            let host = HeaderValue::from_str(&self.addr.to_string()).expect("host");
            req.headers_mut().insert(http::header::HOST, host);
        }
        req
    }
}

/// A new latency histogram: 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Times of one successful exchange, measured from its intended start.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// First byte of the response body.
    ttfb: Duration,
    /// End of the response body.
    ttlb: Duration,
}

/// Latencies and errors of a run (or of its measured window).
#[derive(Debug)]
pub struct Recorded {
    /// Time to first body byte, µs.
    pub ttfb: Histogram<u64>,
    /// Time to the end of the body (the latency of a unary call), µs.
    pub ttlb: Histogram<u64>,
    pub ok: u64,
    /// Error kind → count (non-2xx status, transport, truncated body, timeout).
    pub errors: BTreeMap<String, u64>,
}

impl Recorded {
    fn new() -> Recorded {
        Recorded {
            ttfb: histogram(),
            ttlb: histogram(),
            ok: 0,
            errors: BTreeMap::new(),
        }
    }

    fn add(&mut self, outcome: Result<Sample, String>) {
        match outcome {
            Ok(s) => {
                self.ok += 1;
                self.ttfb.saturating_record(micros(s.ttfb));
                self.ttlb.saturating_record(micros(s.ttlb));
            }
            Err(kind) => *self.errors.entry(kind).or_default() += 1,
        }
    }

    fn merge(&mut self, other: Recorded) {
        self.ok += other.ok;
        self.ttfb.add(other.ttfb).expect("merge histogram");
        self.ttlb.add(other.ttlb).expect("merge histogram");
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn total(&self) -> u64 {
        self.ok + self.error_count()
    }

    /// Time to the first byte when `first_byte`, else to the last.
    pub fn latency(&self, first_byte: bool) -> &Histogram<u64> {
        if first_byte { &self.ttfb } else { &self.ttlb }
    }
}

/// Reads a response to its end; times are from `since`.
async fn read_response(
    resp: Response<Incoming>,
    since: Instant,
    expect_len: usize,
) -> Result<Sample, String> {
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first = None;
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "body read failed".to_string())?;
        if let Some(data) = frame.data_ref() {
            if first.is_none() && !data.is_empty() {
                first = Some(Instant::now());
            }
            len += data.len();
        }
    }
    let end = Instant::now();
    if !status.is_success() {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    if len != expect_len {
        return Err("truncated body".into());
    }
    Ok(Sample {
        ttfb: first.unwrap_or(end) - since,
        ttlb: end - since,
    })
}

type Pooled = Client<HttpConnector, Full<Bytes>>;

/// A keep-alive HTTP/1.1 pool with no cap: a request that finds no idle connection opens a new
/// one instead of queueing behind another request.
fn pooled_client() -> Pooled {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(Duration::from_secs(120))
        .build(http)
}

async fn pooled_exchange(
    client: Pooled,
    target: Arc<Target>,
    intended: Instant,
    timeout: Duration,
) -> Result<Sample, String> {
    let exchange = async {
        let resp = client.request(target.request(true)).await.map_err(|e| {
            if e.is_connect() {
                "connect failed"
            } else {
                "transport error"
            }
            .to_string()
        })?;
        read_response(resp, intended, target.expect_len).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err("timeout".into()))
}

/// A fixed-rate schedule.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Requests per second.
    pub rate: u64,
    /// Sent but not recorded, to open connections and warm caches.
    pub warmup: Duration,
    pub measure: Duration,
    /// Per request, from its intended start.
    pub timeout: Duration,
}

/// An open-loop run's measured window.
#[derive(Debug)]
pub struct OpenRun {
    pub recorded: Recorded,
    /// How late the dispatcher sent each measured request, µs.
    pub dispatch_lag: Histogram<u64>,
    /// CPU from the first measured request to the last response.
    pub cpu: CpuDelta,
    /// Requests sent in the whole run (warm-up included).
    pub sent_total: u64,
    /// Measured requests per second of dispatch time: the generator kept up if this is the
    /// schedule's rate.
    pub achieved_rate: f64,
}

/// Sends `schedule.rate` requests per second to `target`; the caller's thread is the dispatcher.
pub fn open_loop(rt: &Handle, target: &Arc<Target>, schedule: Schedule, probe: &Probe) -> OpenRun {
    let client = pooled_client();
    let interval_ns = 1_000_000_000 / schedule.rate.max(1);
    let count = |d: Duration| u64::try_from(d.as_nanos() / u128::from(interval_ns)).unwrap_or(0);
    let warmup_n = count(schedule.warmup);
    let total_n = warmup_n + count(schedule.measure);
    let start = Instant::now() + Duration::from_millis(10);
    let mut lag = histogram();
    let mut handles = Vec::with_capacity(usize::try_from(total_n).unwrap_or(0));
    let mut before = None;
    let mut first_dispatch = None;
    for i in 0..total_n {
        let intended = start + Duration::from_nanos(i * interval_ns);
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let measured = i >= warmup_n;
        if measured {
            if before.is_none() {
                before = Some(probe.snapshot());
                first_dispatch = Some(Instant::now());
            }
            lag.saturating_record(micros(Instant::now().saturating_duration_since(intended)));
        }
        let h = rt.spawn(pooled_exchange(
            client.clone(),
            target.clone(),
            intended,
            schedule.timeout,
        ));
        handles.push((h, measured));
    }
    // One interval after the last dispatch is when the next would have gone.
    let dispatch_span =
        first_dispatch.map_or(Duration::ZERO, |t| t.elapsed()) + Duration::from_nanos(interval_ns);
    let recorded = rt.block_on(async {
        let mut r = Recorded::new();
        for (h, measured) in handles {
            let outcome = h.await.unwrap_or_else(|_| Err("task panicked".into()));
            if measured {
                r.add(outcome);
            }
        }
        r
    });
    let after = probe.snapshot();
    let before = before.unwrap_or(after);
    drop(client);
    OpenRun {
        achieved_rate: recorded.total() as f64 / dispatch_span.as_secs_f64(),
        recorded,
        dispatch_lag: lag,
        cpu: probe.delta(&before, &after),
        sent_total: total_n,
    }
}

/// A closed-loop run's measured window.
#[derive(Debug)]
pub struct ClosedRun {
    pub recorded: Recorded,
    pub window: Duration,
    pub cpu: CpuDelta,
    /// Requests sent in the whole run (warm-up included).
    pub sent_total: u64,
}

impl ClosedRun {
    pub fn throughput(&self) -> f64 {
        self.recorded.ok as f64 / self.window.as_secs_f64()
    }
}

/// `connections` workers, each with its own keep-alive connection, send back to back for
/// `warmup + measure`; exchanges that end inside the measured window count.
pub fn closed_loop(
    rt: &Handle,
    target: &Arc<Target>,
    connections: usize,
    warmup: Duration,
    measure: Duration,
    probe: &Probe,
) -> ClosedRun {
    let start = Instant::now();
    let from = start + warmup;
    let until = from + measure;
    let workers: Vec<_> = (0..connections)
        .map(|_| rt.spawn(closed_worker(target.clone(), from, until)))
        .collect();
    std::thread::sleep(from.saturating_duration_since(Instant::now()));
    let before = probe.snapshot();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    let after = probe.snapshot();
    let (recorded, sent_total) = rt.block_on(async {
        let mut r = Recorded::new();
        let mut sent = 0;
        for w in workers {
            let (rec, n) = w.await.expect("worker");
            r.merge(rec);
            sent += n;
        }
        (r, sent)
    });
    ClosedRun {
        recorded,
        window: measure,
        cpu: probe.delta(&before, &after),
        sent_total,
    }
}

async fn closed_worker(target: Arc<Target>, from: Instant, until: Instant) -> (Recorded, u64) {
    let mut rec = Recorded::new();
    let mut sent = 0;
    'connect: while Instant::now() < until {
        let Ok(stream) = tokio::net::TcpStream::connect(target.addr).await else {
            rec.add(Err("connect failed".into()));
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            rec.add(Err("handshake failed".into()));
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < until {
            let t0 = Instant::now();
            let outcome = async {
                sender
                    .ready()
                    .await
                    .map_err(|_| "transport error".to_string())?;
                let resp = sender
                    .send_request(target.request(false))
                    .await
                    .map_err(|_| "transport error".to_string())?;
                read_response(resp, t0, target.expect_len).await
            };
            let outcome = tokio::time::timeout(Duration::from_secs(10), outcome)
                .await
                .unwrap_or_else(|_| Err("timeout".into()));
            sent += 1;
            let failed = outcome.is_err();
            let end = Instant::now();
            if end >= from && end <= until {
                rec.add(outcome);
            }
            if failed {
                continue 'connect;
            }
        }
    }
    (rec, sent)
}
