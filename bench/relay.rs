//! The floor beside every phase that sends load: the least a proxy can do. It is a hyper HTTP/1.1
//! server that passes each request to the fake through a pooled hyper client. It swaps in a
//! SigV4-looking Authorization header and does nothing else: no key lookup, no signing, no
//! metering, no log line. It runs in the bench process on its own runtime, and its threads are
//! named `relay-worker` so their CPU time can be read apart from the load generator's.
//!
//! The ratio it reaches in the closed-loop phase is about the best any proxy can do when it
//! shares these cores with the load generator and the fake.

use std::net::SocketAddr;

use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Thread name prefix of the relay's runtime.
pub const THREAD_PREFIX: &str = "relay-worker";

/// Starts the relay in front of `upstream`; returns its address.
pub fn start(upstream: SocketAddr, threads: usize) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("relay addr");
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(THREAD_PREFIX)
                .enable_all()
                .build()
                .expect("relay runtime");
            rt.block_on(accept_loop(listener, upstream));
        })
        .expect("spawn relay thread");
    addr
}

async fn accept_loop(listener: std::net::TcpListener, upstream: SocketAddr) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(http);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| relay(req, client.clone(), upstream));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn relay(
    req: Request<Incoming>,
    client: Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{upstream}{path}")
        .parse::<Uri>()
        .expect("uri");
    parts.headers.remove(http::header::HOST);
    parts.headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static(
            "AWS4-HMAC-SHA256 Credential=AKIDRELAY/20261127/us-east-1/bedrock/aws4_request",
        ),
    );
    client.request(Request::from_parts(parts, body)).await
}
