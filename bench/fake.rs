//! The fake Bedrock Runtime the benchmark measures against: a plain hyper HTTP/1.1 server on
//! 127.0.0.1:0, on its own thread and runtime, so it is the same server for the direct and the
//! proxied run. It must never be the bottleneck: every body is built once and `Bytes`-cloned per
//! response, and signatures are not verified (only an `AWS4-HMAC-SHA256` Authorization header is
//! required, which tells a proxied request from a caller's key that leaked through).
//!
//! What it answers is chosen by the profile ARN in the path (the proxy rewrites the model id to
//! the caller's profile and forwards no custom header): a profile whose name ends in `slow`
//! streams one event per second; anything else answers at once.
//!
//! It also answers `POST /v1/messages` as the Anthropic API would (an `x-api-key` instead of a
//! signature): the same message as InvokeModel's, or with `"stream":true` the same events as
//! SSE, paced like the event stream. That is the direct baseline of the Messages phases: the
//! proxy's answer to the same request has exactly these bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// The fast stream sends its first event at once and the rest after this pause, so time to
/// first byte and time to last byte are different measurements (a proxy that held the first
/// frame back would show here).
pub const STREAM_GAP: Duration = Duration::from_millis(5);

/// What the fake has answered, for the sanity checks after each phase.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    /// Requests without a SigV4-looking Authorization header (a proxy bug, or a bench bug).
    pub unsigned: AtomicU64,
    /// Request body bytes read.
    pub bytes_in: AtomicU64,
}

/// Response bodies, built once.
struct Bodies {
    converse: Bytes,
    invoke: Bytes,
    /// The fast InvokeModelWithResponseStream answer, one event-stream frame per element.
    stream: Vec<Bytes>,
    /// The slow answer: one frame per second.
    slow: Vec<Bytes>,
    unknown: Bytes,
    unsigned: Bytes,
    /// The fast stream's events as the Anthropic API's SSE, one piece per event.
    sse: Vec<Bytes>,
}

/// A running fake; it lives until the benchmark process exits.
pub struct Fake {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    bodies: Arc<Bodies>,
}

impl Fake {
    /// Starts the fake on its own thread with a runtime of `threads` workers. `slow_secs` is how
    /// long a slow stream lasts (one event per second, the first at once).
    pub fn start(threads: usize, slow_secs: u64) -> Fake {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("fake addr");
        let counters = Arc::new(Counters::default());
        let bodies = Arc::new(Bodies::new(slow_secs));
        let (c, b) = (counters.clone(), bodies.clone());
        std::thread::Builder::new()
            .name("fake-bedrock".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("fake-worker")
                    .enable_all()
                    .build()
                    .expect("fake runtime");
                rt.block_on(accept_loop(listener, b, c));
            })
            .expect("spawn fake thread");
        Fake {
            addr,
            counters,
            bodies,
        }
    }

    /// Length of the response body for `op` in the given mode, to detect truncated answers.
    pub fn body_len(&self, op: &str, slow: bool) -> usize {
        let b = &self.bodies;
        match (op, slow) {
            ("converse", _) => b.converse.len(),
            ("invoke", _) => b.invoke.len(),
            ("invoke-with-response-stream", false) => b.stream.iter().map(Bytes::len).sum(),
            ("invoke-with-response-stream", true) => b.slow.iter().map(Bytes::len).sum(),
            ("messages", _) => b.invoke.len(),
            ("messages-sse", _) => b.sse.iter().map(Bytes::len).sum(),
            _ => b.unknown.len(),
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    bodies: Arc<Bodies>,
    counters: Arc<Counters>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of file descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let bodies = bodies.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, bodies.clone(), counters.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

async fn handle(
    req: Request<Incoming>,
    bodies: Arc<Bodies>,
    counters: Arc<Counters>,
) -> Result<Response<Body>, Infallible> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    // The Anthropic API's own callers send a key, not a signature.
    let anthropic = req.uri().path() == "/v1/messages";
    let signed = if anthropic {
        req.headers().contains_key("x-api-key")
    } else {
        req.headers()
            .get(http::header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes().starts_with(b"AWS4-HMAC-SHA256 "))
    };
    let (parts, body) = req.into_parts();
    // Read the whole body as Bedrock does before it answers; the connection is reused after.
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Ok(reply(400, "application/json", bodies.unknown.clone())),
    };
    counters
        .bytes_in
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    if !signed {
        counters.unsigned.fetch_add(1, Ordering::Relaxed);
        let mut r = reply(403, "application/json", bodies.unsigned.clone());
        r.headers_mut().insert(
            "x-amzn-errortype",
            http::HeaderValue::from_static("MissingAuthenticationTokenException"),
        );
        return Ok(r);
    }
    let path = parts.uri.path();
    if anthropic {
        let stream = body.windows(13).any(|w| w == b"\"stream\":true");
        return Ok(if stream {
            paced(bodies.sse.clone(), Pace::GapAfterFirst, "text/event-stream")
        } else {
            reply(200, "application/json", bodies.invoke.clone())
        });
    }
    let Some((model, op)) = path
        .strip_prefix("/model/")
        .and_then(|rest| rest.rsplit_once('/'))
    else {
        return Ok(reply(404, "application/json", bodies.unknown.clone()));
    };
    // The profile name is the last segment of the (percent-encoded) ARN.
    let slow = model.ends_with("slow");
    Ok(match op {
        "converse" => reply(200, "application/json", bodies.converse.clone()),
        "invoke" => {
            let mut r = reply(200, "application/json", bodies.invoke.clone());
            let h = r.headers_mut();
            h.insert(
                "x-amzn-bedrock-input-token-count",
                http::HeaderValue::from_static("1834"),
            );
            h.insert(
                "x-amzn-bedrock-output-token-count",
                http::HeaderValue::from_static("96"),
            );
            r
        }
        "invoke-with-response-stream" if slow => event_stream(bodies.slow.clone(), Pace::PerSecond),
        "invoke-with-response-stream" => event_stream(bodies.stream.clone(), Pace::GapAfterFirst),
        _ => reply(200, "application/json", bodies.unknown.clone()),
    })
}

fn reply(status: u16, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).boxed());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        "x-amzn-requestid",
        http::HeaderValue::from_static("5f1e0f0c-3b6a-4e0a-9c57-bench0000001"),
    );
    r
}

#[derive(Clone, Copy)]
enum Pace {
    /// First frame at once, the rest after [`STREAM_GAP`].
    GapAfterFirst,
    /// One frame per second, the first at once.
    PerSecond,
}

fn event_stream(frames: Vec<Bytes>, pace: Pace) -> Response<Body> {
    paced(frames, pace, "application/vnd.amazon.eventstream")
}

/// A streamed body of `frames`, each sent whole, at `pace`.
fn paced(frames: Vec<Bytes>, pace: Pace, content_type: &'static str) -> Response<Body> {
    let start = tokio::time::Instant::now();
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let frame = frames.get(i).cloned();
        async move {
            let frame = frame?;
            match pace {
                Pace::GapAfterFirst if i == 1 => tokio::time::sleep(STREAM_GAP).await,
                Pace::PerSecond if i > 0 => {
                    tokio::time::sleep_until(start + Duration::from_secs(i as u64)).await;
                }
                _ => {}
            }
            Some((Ok::<_, Infallible>(Frame::data(frame)), i + 1))
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    h.insert(
        "x-amzn-requestid",
        http::HeaderValue::from_static("5f1e0f0c-3b6a-4e0a-9c57-bench0000002"),
    );
    r
}

impl Bodies {
    fn new(slow_secs: u64) -> Bodies {
        let converse = serde_json::json!({
            "output": {"message": {"role": "assistant", "content": [{"text":
                "I looked at `src/server.rs`. The handler reads the body under the configured limit, \
                 signs it, and streams the answer back while the meter reads usage alongside. \
                 Nothing here needs to change for this request."}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": 1834, "outputTokens": 96, "totalTokens": 1930,
                      "cacheReadInputTokens": 0, "cacheWriteInputTokens": 0},
            "metrics": {"latencyMs": 412}
        });
        let invoke = serde_json::json!({
            "id": "msg_bdrk_01BenchBenchBenchBench", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": "The handler reads the body, signs it and streams the answer back."}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 1834, "output_tokens": 96}
        });
        // message_start, content_block_start, deltas, content_block_stop, message_delta,
        // message_stop: 5 events around the deltas.
        let fast = anthropic_events(5);
        let slow_events = usize::try_from(slow_secs)
            .unwrap_or(30)
            .saturating_sub(4)
            .max(1);
        Bodies {
            converse: Bytes::from(converse.to_string()),
            invoke: Bytes::from(invoke.to_string()),
            stream: fast.iter().map(chunk_frame).collect(),
            sse: fast.iter().map(sse_event).collect(),
            slow: anthropic_events(slow_events)
                .iter()
                .map(chunk_frame)
                .collect(),
            unknown: Bytes::from_static(
                br#"{"Output":{"__type":"com.amazon.coral.service#UnknownOperationException"}}"#,
            ),
            unsigned: Bytes::from_static(
                br#"{"message":"fake Bedrock: request is not SigV4-signed"}"#,
            ),
        }
    }
}

/// An Anthropic Messages stream with `deltas` text deltas, as Bedrock's
/// InvokeModelWithResponseStream carries it (usage in message_start and message_delta, and
/// `amazon-bedrock-invocationMetrics` on message_stop).
fn anthropic_events(deltas: usize) -> Vec<serde_json::Value> {
    let mut events = vec![
        serde_json::json!({"type": "message_start", "message": {
            "id": "msg_bdrk_01BenchStream", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 1834, "output_tokens": 1, "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        }}),
        serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ];
    let words = [
        "The handler ",
        "reads the body, ",
        "signs it ",
        "and streams ",
        "the answer back. ",
    ];
    for i in 0..deltas {
        events.push(
            serde_json::json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": words[i % words.len()]}}),
        );
    }
    events.push(serde_json::json!({"type": "content_block_stop", "index": 0}));
    events.push(serde_json::json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 96}}));
    events.push(serde_json::json!({"type": "message_stop", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 1834, "outputTokenCount": 96, "invocationLatency": 2412, "firstByteLatency": 388
    }}));
    events
}

/// One event as the Anthropic API streams it: `event: <type>` and the JSON on one `data:` line.
fn sse_event(event: &serde_json::Value) -> Bytes {
    let kind = event["type"].as_str().unwrap_or("unknown");
    Bytes::from(format!("event: {kind}\ndata: {event}\n\n"))
}

/// One `chunk` event: headers as Bedrock sends them, payload `{"bytes": base64(event), "p": pad}`.
fn chunk_frame(event: &serde_json::Value) -> Bytes {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let b64 = base64::engine::general_purpose::STANDARD.encode(event.to_string());
    let payload =
        serde_json::json!({"bytes": b64, "p": "abcdefghijklmnopqrstuvwxyzABCDEF"}).to_string();
    let msg = Message::new(payload.into_bytes())
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String("chunk".into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ))
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ));
    let mut buf = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&msg, &mut buf).expect("encode frame");
    Bytes::from(buf)
}
