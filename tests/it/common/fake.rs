//! A fake Bedrock (runtime and control plane) on 127.0.0.1:0. It verifies the SigV4 signature
//! of every request, records what it received, and answers with real Bedrock shapes, including
//! real event streams. Tests script failures per upstream model id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::mpsc;

use super::sigv4;

pub const TEXT: &str = "Hello from the fake Bedrock";

/// What the fake received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub raw_path: String,
    pub query: Option<String>,
    /// Percent-decoded model or profile id from the path.
    pub model: String,
    /// The operation suffix (`invoke`, `converse`, ...) or `inference-profiles`.
    pub op: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub signature: Result<sigv4::Verified, String>,
}

/// A scripted answer for one upstream model id.
#[derive(Debug, Clone)]
pub enum Script {
    /// Status, `x-amzn-ErrorType`, message.
    Error(u16, &'static str, &'static str),
    /// A stream that sends one chunk, then an exception frame of this type.
    MidStreamException(&'static str, &'static str),
    /// A stream that sends the first event, then breaks the connection (upstream reset).
    CutAfterFirst,
    /// Never answers (the response headers never come).
    Hang,
    /// Status 200 with a JSON body that is not an event stream (Bedrock does this for paths it
    /// does not know).
    Json200(&'static str),
    /// A stream that sends the first event, then goes silent with the connection open.
    StallAfterFirst,
    /// A stream that sends the first event, then ends the body cleanly: a cut answer that
    /// looks whole on the wire.
    EndAfterFirst,
    /// Each request draws one of: the normal answer (half of them), a 500, a 429, a
    /// mid-stream exception, a reset after the first event, or a hang. Deterministic: the
    /// n-th request always draws the same.
    Chaos,
    /// A stream of this many 32 KiB text deltas (then the usual end), sent as fast as the
    /// connection takes them: megabytes that fill any socket buffer.
    Large(usize),
    /// The normal answer, after this many milliseconds (the response headers wait too).
    Slow(u64),
    /// The normal stream, with this many milliseconds before each event after the first: an
    /// answer that takes a while, as a model's does.
    Dribble(u64),
}

/// What [`Script::Chaos`] drew for the n-th request. Exceptions inside an event stream only
/// exist for streaming operations; others draw a 503 instead.
fn chaos_draw(n: u64, streaming: bool) -> Option<Script> {
    // SplitMix64: well mixed, so neighbouring requests draw independently.
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    match z % 100 {
        0..50 => None,
        50..62 => Some(Script::Error(
            500,
            "InternalServerException",
            "fake: internal error",
        )),
        62..74 => Some(Script::Error(
            429,
            "ThrottlingException",
            "fake: too many requests",
        )),
        74..86 if streaming => Some(Script::MidStreamException(
            "modelStreamErrorException",
            "fake: model stream error",
        )),
        74..86 => Some(Script::Error(
            503,
            "ServiceUnavailableException",
            "fake: unavailable",
        )),
        86..97 => Some(Script::CutAfterFirst),
        _ => Some(Script::Hang),
    }
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    scripts: HashMap<String, Script>,
    /// When set, streaming responses send event N+1 only after a message on this channel.
    gate: Option<mpsc::Receiver<()>>,
    /// Streaming responses whose body was dropped before its last event (the connection to
    /// the fake went away).
    streams_cut: Arc<std::sync::atomic::AtomicUsize>,
    /// When set, signatures are checked with it instead of [`sigv4::verify`].
    keyring: Option<sigv4::Keyring>,
}

#[derive(Clone)]
pub struct FakeBedrock {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// TCP connections accepted so far.
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeBedrock {
    pub async fn start() -> FakeBedrock {
        Self::start_on("127.0.0.1:0").await
    }

    /// Starts on a given address (to come up on a port a proxy is already retrying).
    pub async fn start_on(addr: &str) -> FakeBedrock {
        Self::launch(addr, None).await
    }

    /// Like [`FakeBedrock::start`], but verifies signatures with `keyring` (see
    /// [`sigv4::Keyring::verify`]): requests signed with credentials the fake STS issued verify,
    /// and [`Received::signature`] names the access key that signed each one.
    pub async fn start_with_keyring(keyring: sigv4::Keyring) -> FakeBedrock {
        Self::launch("127.0.0.1:0", Some(keyring)).await
    }

    async fn launch(addr: &str, keyring: Option<sigv4::Keyring>) -> FakeBedrock {
        let inner = Arc::new(Mutex::new(Inner {
            keyring,
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fake");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = connections.clone();
        let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeBedrock {
            addr,
            inner,
            connections,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many TCP connections the fake has accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().expect("lock").received.clone()
    }

    pub fn script(&self, model: &str, script: Script) {
        self.inner
            .lock()
            .expect("lock")
            .scripts
            .insert(model.to_string(), script);
    }

    /// How many streaming responses lost their reader before the last event.
    pub fn streams_cut(&self) -> usize {
        self.inner
            .lock()
            .expect("lock")
            .streams_cut
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes the next streaming response wait for a message on the returned sender before
    /// each event after the first.
    pub fn gate_streams(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel(1);
        self.inner.lock().expect("lock").gate = Some(rx);
        tx
    }
}

fn split_path(path: &str) -> (String, String) {
    if let Some(rest) = path.strip_prefix("/model/")
        && let Some((model, op)) = rest.rsplit_once('/')
    {
        return (decode(model), op.to_string());
    }
    if let Some(id) = path.strip_prefix("/inference-profiles/") {
        return (decode(id), "get-inference-profile".into());
    }
    (String::new(), path.trim_start_matches('/').to_string())
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

async fn handle(State(inner): State<Arc<Mutex<Inner>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let raw_path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let keyring = inner.lock().expect("lock").keyring.clone();
    let signature = match keyring {
        Some(k) => k.verify(
            parts.method.as_str(),
            &raw_path,
            query.as_deref(),
            &parts.headers,
            &body,
        ),
        None => sigv4::verify(
            parts.method.as_str(),
            &raw_path,
            query.as_deref(),
            &parts.headers,
            &body,
        ),
    };
    let (model, op) = split_path(&raw_path);
    let (script, gate, cut) = {
        let mut inner = inner.lock().expect("lock");
        inner.received.push(Received {
            method: parts.method.to_string(),
            raw_path: raw_path.clone(),
            query: query.clone(),
            model: model.clone(),
            op: op.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
            signature: signature.clone(),
        });
        let gate = if op.ends_with("stream") {
            inner.gate.take()
        } else {
            None
        };
        (
            inner.scripts.get(&model).cloned(),
            gate,
            inner.streams_cut.clone(),
        )
    };
    if let Err(e) = &signature {
        return error(403, "InvalidSignatureException", &format!("fake: {e}"));
    }
    let script = match script {
        Some(Script::Chaos) => {
            let n = inner.lock().expect("lock").received.len() as u64;
            chaos_draw(n, op.ends_with("stream"))
        }
        other => other,
    };
    match script {
        Some(Script::Chaos) => unreachable!("drawn above"),
        Some(Script::StallAfterFirst) => {
            let first = anthropic_stream_events(&model).remove(0);
            let stream = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(first)])
                .chain(futures_util::stream::pending());
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/vnd.amazon.eventstream")
                .body(Body::from_stream(stream))
                .expect("response");
        }
        Some(Script::Large(n)) => {
            let mut events = anthropic_stream_events(&model);
            let tail = events.split_off(2);
            let text = "y".repeat(32 * 1024);
            for _ in 0..n {
                events.push(chunk_event(
                    &serde_json::json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text}}),
                ));
            }
            events.extend(tail);
            return event_stream(events, None, cut);
        }
        Some(Script::EndAfterFirst) => {
            let first = anthropic_stream_events(&model).remove(0);
            return event_stream(vec![first], None, cut);
        }
        Some(Script::Error(status, kind, message)) => return error(status, kind, message),
        Some(Script::Json200(body)) => return json(200, body.to_string()),
        Some(Script::Hang) => std::future::pending::<()>().await,
        Some(Script::Slow(ms)) => tokio::time::sleep(std::time::Duration::from_millis(ms)).await,
        Some(Script::Dribble(ms)) if op == "invoke-with-response-stream" => {
            let mut guard = CutGuard {
                done: false,
                counter: cut,
            };
            let events = anthropic_stream_events(&model);
            let last = events.len() - 1;
            let stream = futures_util::stream::iter(events.into_iter().enumerate()).then(
                move |(i, event)| {
                    if i == last {
                        guard.finished();
                    }
                    async move {
                        if i > 0 {
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                        }
                        Ok::<Bytes, std::io::Error>(event)
                    }
                },
            );
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/vnd.amazon.eventstream")
                .body(Body::from_stream(stream))
                .expect("response");
        }
        Some(Script::Dribble(_)) => {}
        Some(Script::CutAfterFirst) => {
            let first = anthropic_stream_events(&model).remove(0);
            // The pause lets the first event go out before the reset, as on a real network;
            // without it hyper may see the error before writing anything.
            let stream = futures_util::stream::iter([Ok::<Bytes, std::io::Error>(first)]).chain(
                futures_util::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    Err(std::io::Error::other("fake upstream reset"))
                }),
            );
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/vnd.amazon.eventstream")
                .body(Body::from_stream(stream))
                .expect("response");
        }
        Some(Script::MidStreamException(kind, message)) => {
            let first = chunk_event(
                &serde_json::json!({"type": "message_start", "message": message_start_body(&model)}),
            );
            let exc = exception_event(kind, message);
            return event_stream(vec![first, exc], None, cut);
        }
        None => {}
    }
    match op.as_str() {
        "invoke" => {
            let reply = serde_json::json!({
                "id": "msg_fake_1", "type": "message", "role": "assistant", "model": "claude-fake",
                "content": [{"type": "text", "text": TEXT}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 11, "output_tokens": 7}
            });
            let mut resp = json(200, reply.to_string());
            let h = resp.headers_mut();
            h.insert("x-amzn-bedrock-input-token-count", "11".parse().expect("hv"));
            h.insert("x-amzn-bedrock-output-token-count", "7".parse().expect("hv"));
            h.insert("x-amzn-bedrock-cache-read-input-token-count", "4".parse().expect("hv"));
            h.insert("x-amzn-bedrock-cache-write-input-token-count", "3".parse().expect("hv"));
            h.insert("x-amzn-requestid", "fake-request-id".parse().expect("hv"));
            // What a proxy in front of the Anthropic API might pass on; never a caller's.
            h.insert("anthropic-ratelimit-unified-status", "upstream".parse().expect("hv"));
            resp
        }
        "invoke-with-response-stream" => event_stream(anthropic_stream_events(&model), gate, cut),
        "converse" => json(
            200,
            serde_json::json!({
                "output": {"message": {"role": "assistant", "content": [{"text": TEXT}]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": 9, "outputTokens": 4, "totalTokens": 13, "cacheReadInputTokens": 5, "cacheWriteInputTokens": 6},
                "metrics": {"latencyMs": 5}
            })
            .to_string(),
        ),
        "converse-stream" => event_stream(converse_stream_events(), gate, cut),
        "count-tokens" => json(200, r#"{"inputTokens":42}"#.to_string()),
        "inference-profiles" => json(
            200,
            serde_json::json!({"inferenceProfileSummaries": [{
                "inferenceProfileName": "US Anthropic Claude Sonnet 4.5",
                "inferenceProfileId": "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                "inferenceProfileArn": "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                "models": [{"modelArn": "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-sonnet-4-5-20250929-v1:0"}],
                "status": "ACTIVE", "type": "SYSTEM_DEFINED"
            }]})
            .to_string(),
        ),
        "get-inference-profile" => {
            let underlying = "anthropic.claude-sonnet-4-5-20250929-v1:0";
            json(
                200,
                serde_json::json!({
                    "inferenceProfileName": "fake",
                    "inferenceProfileArn": model,
                    "inferenceProfileId": model.rsplit('/').next().unwrap_or(""),
                    "models": [{"modelArn": format!("arn:aws:bedrock:us-east-1::foundation-model/{underlying}")}],
                    "status": "ACTIVE",
                    "type": if model.contains("application-inference-profile") { "APPLICATION" } else { "SYSTEM_DEFINED" }
                })
                .to_string(),
            )
        }
        _ => json(200, r#"{"Output":{"__type":"com.amazon.coral.service#UnknownOperationException"}}"#.to_string()),
    }
}

fn json(status: u16, body: String) -> Response {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("response")
}

fn error(status: u16, kind: &str, message: &str) -> Response {
    let mut resp = json(
        status,
        serde_json::json!({ "message": message }).to_string(),
    );
    resp.headers_mut().insert(
        "x-amzn-errortype",
        format!("{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/")
            .parse()
            .expect("hv"),
    );
    resp
}

fn message_start_body(model: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "msg_fake_stream", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}
    })
}

/// An Anthropic Messages stream as Bedrock's InvokeModelWithResponseStream sends it.
pub fn anthropic_events(model: &str) -> Vec<serde_json::Value> {
    let words = ["Hello ", "from ", "the ", "fake ", "Bedrock"];
    let mut events = vec![
        serde_json::json!({"type": "message_start", "message": message_start_body(model)}),
        serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ];
    for w in words {
        events.push(serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}}));
    }
    events.push(serde_json::json!({"type": "content_block_stop", "index": 0}));
    events.push(serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 6}}));
    events.push(serde_json::json!({"type": "message_stop", "amazon-bedrock-invocationMetrics": {
        "inputTokenCount": 25, "outputTokenCount": 6, "invocationLatency": 100, "firstByteLatency": 50,
        "cacheReadInputTokenCount": 3, "cacheWriteInputTokenCount": 2
    }}));
    events
}

fn anthropic_stream_events(model: &str) -> Vec<Bytes> {
    anthropic_events(model).iter().map(chunk_event).collect()
}

fn frame(headers: Vec<(&'static str, String)>, payload: Vec<u8>) -> Bytes {
    use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
    let mut msg = Message::new(payload);
    for (k, v) in headers {
        msg = msg.add_header(Header::new(k, HeaderValue::String(v.into())));
    }
    let mut buf = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&msg, &mut buf).expect("encode frame");
    Bytes::from(buf)
}

/// A `chunk` event wrapping one provider JSON event, with Bedrock's padding field.
pub fn chunk_event(event: &serde_json::Value) -> Bytes {
    let bytes = base64::engine::general_purpose::STANDARD.encode(event.to_string());
    let payload = serde_json::json!({"bytes": bytes, "p": "abcdefghijkl"}).to_string();
    frame(
        vec![
            (":event-type", "chunk".into()),
            (":content-type", "application/json".into()),
            (":message-type", "event".into()),
        ],
        payload.into_bytes(),
    )
}

fn typed_event(event_type: &str, payload: serde_json::Value) -> Bytes {
    frame(
        vec![
            (":event-type", event_type.to_string()),
            (":content-type", "application/json".into()),
            (":message-type", "event".into()),
        ],
        payload.to_string().into_bytes(),
    )
}

pub fn exception_event(kind: &str, message: &str) -> Bytes {
    frame(
        vec![
            (":exception-type", kind.to_string()),
            (":content-type", "application/json".into()),
            (":message-type", "exception".into()),
        ],
        serde_json::json!({ "message": message })
            .to_string()
            .into_bytes(),
    )
}

fn converse_stream_events() -> Vec<Bytes> {
    let mut v = vec![typed_event(
        "messageStart",
        serde_json::json!({"role": "assistant", "p": "ab"}),
    )];
    for w in ["Hello ", "from ", "the ", "fake ", "Bedrock"] {
        v.push(typed_event(
            "contentBlockDelta",
            serde_json::json!({"contentBlockIndex": 0, "delta": {"text": w}}),
        ));
    }
    v.push(typed_event(
        "contentBlockStop",
        serde_json::json!({"contentBlockIndex": 0}),
    ));
    v.push(typed_event(
        "messageStop",
        serde_json::json!({"stopReason": "end_turn"}),
    ));
    v.push(typed_event(
        "metadata",
        serde_json::json!({"usage": {"inputTokens": 9, "outputTokens": 5, "totalTokens": 14, "cacheReadInputTokens": 1, "cacheWriteInputTokens": 2}, "metrics": {"latencyMs": 7}}),
    ));
    v
}

/// Counts a stream dropped before its last event.
struct CutGuard {
    done: bool,
    counter: Arc<std::sync::atomic::AtomicUsize>,
}

impl CutGuard {
    fn finished(&mut self) {
        self.done = true;
    }
}

impl Drop for CutGuard {
    fn drop(&mut self) {
        if !self.done {
            self.counter
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn event_stream(
    events: Vec<Bytes>,
    gate: Option<mpsc::Receiver<()>>,
    cut: Arc<std::sync::atomic::AtomicUsize>,
) -> Response {
    let guard = CutGuard {
        done: false,
        counter: cut,
    };
    let stream = futures_util::stream::unfold(
        (events.into_iter(), gate, true, guard),
        |(mut it, mut gate, first, mut guard)| async move {
            let Some(next) = it.next() else {
                guard.finished();
                return None;
            };
            if !first && let Some(g) = gate.as_mut() {
                // Wait until the test client says it has the previous event.
                g.recv().await?;
            }
            Some((Ok::<Bytes, std::io::Error>(next), (it, gate, false, guard)))
        },
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/vnd.amazon.eventstream")
        .header("x-amzn-requestid", "fake-stream-request-id")
        .header("anthropic-ratelimit-unified-status", "upstream")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// Decodes every complete event-stream message in `buf`, leaving a partial one in place.
pub fn decode_messages(
    decoder: &mut aws_smithy_eventstream::frame::MessageFrameDecoder,
    buf: &mut BytesMut,
) -> Vec<aws_smithy_types::event_stream::Message> {
    use aws_smithy_eventstream::frame::DecodedFrame;
    let mut out = Vec::new();
    loop {
        match decoder.decode_frame(&mut *buf).expect("valid event stream") {
            DecodedFrame::Complete(m) => out.push(m),
            DecodedFrame::Incomplete => return out,
        }
    }
}

/// The string value of an event-stream header.
pub fn header_str(m: &aws_smithy_types::event_stream::Message, name: &str) -> Option<String> {
    m.headers()
        .iter()
        .find(|h| h.name().as_str() == name)
        .and_then(|h| h.value().as_string().ok())
        .map(|s| s.as_str().to_string())
}
