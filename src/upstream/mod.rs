//! The way out to AWS: header hygiene, SigV4 signing and the pooled HTTP client.
//!
//! Owns the proxy's AWS identity. Credentials come from aws-config's default chain (or a named
//! profile), held between requests and fetched again before they expire (see `credentials`), so
//! rotation and refresh work. This module must never forward a caller credential: it signs only
//! headers it built.

pub mod credentials;
pub mod headers;
pub mod payload;
pub mod sessions;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::AwsSettings;
use crate::refusal::{Reason, Refusal};
use credentials::CachedCredentials;
use payload::{Chunks, Payload};

/// SigV4 service name for both Bedrock Runtime and the Bedrock control plane.
const SIGNING_SERVICE: &str = "bedrock";

/// Pauses before each retry of a request whose connection could not be made. Only a failed
/// connect is retried: the request never left, so it cannot have reached the model.
const CONNECT_RETRY_BACKOFF: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(900),
];

/// A request ready to be signed and sent.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub method: Method,
    /// Full URL: endpoint for the region + encoded path (+ query).
    pub url: String,
    /// Region to sign for.
    pub region: String,
    /// Headers to forward (already filtered by [`headers::forwardable_request_headers`]).
    pub headers: HeaderMap,
    pub body: Payload,
    /// Sign with these (a user's own session) instead of the proxy's credentials.
    pub credentials: Option<aws_credential_types::Credentials>,
}

/// A request that got no response, and whether Bedrock may have received it anyway.
#[derive(Debug)]
pub struct SendError {
    pub error: Refusal,
    /// False only when the request certainly never left (signing or connect failed).
    pub maybe_sent: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Https = HttpsConnector<HttpConnector>;

/// TCP connect and TLS handshake under one deadline (`timeouts.connect_secs`). A timeout here is
/// a connect failure: the request never left, so it is retried like one.
#[derive(Clone)]
struct Connector {
    inner: Https,
    timeout: Duration,
}

impl tower::Service<http::Uri> for Connector {
    type Response = <Https as tower::Service<http::Uri>>::Response;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "TCP connect and TLS handshake took longer than {} s (timeouts.connect_secs)",
                    limit.as_secs()
                )
                .into()),
            }
        })
    }
}

/// The pooled client and the proxy's AWS credentials.
///
/// Each thread that sends gets a pool of its own ([`Upstream::client`]): a connection's task runs
/// on the runtime that opened it, so a request on a worker (see `workers`) that took another
/// thread's pooled connection would wake that thread twice, for its send and its answer.
#[derive(Clone)]
pub struct Upstream {
    connector: Connector,
    pools: Arc<thread_local::ThreadLocal<Client<Connector, Chunks>>>,
    credentials: CachedCredentials,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

/// The TLS half of every outbound HTTP client of the proxy (Bedrock, the IdP, the OTLP
/// collector): rustls on aws-lc-rs with the webpki roots, `https://` or plain `http://` (tests,
/// loopback). Callers pick the HTTP versions and the TCP connector.
pub fn tls_connector()
-> hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsProtocols1> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .unwrap_or_else(|_| hyper_rustls::HttpsConnectorBuilder::new().with_webpki_roots())
        .https_or_http()
}

/// The AWS SDK configuration every AWS client of bedrock-gate starts from: `aws.region` and the
/// standard credential chain (or `aws.profile`). Loading it calls no AWS service.
pub async fn sdk_config(aws: &AwsSettings) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(aws.region.clone()));
    if let Some(profile) = &aws.profile {
        loader = loader.profile_name(profile);
    }
    loader.load().await
}

impl Upstream {
    /// Builds the client and resolves (without calling) the credential provider.
    pub async fn new(aws: &AwsSettings, connect_timeout: Duration) -> anyhow::Result<Upstream> {
        Self::from_sdk(&sdk_config(aws).await, connect_timeout)
    }

    /// The client, with the proxy's own credentials from an SDK configuration.
    pub fn from_sdk(
        sdk: &aws_config::SdkConfig,
        connect_timeout: Duration,
    ) -> anyhow::Result<Upstream> {
        let credentials = sdk
            .credentials_provider()
            .ok_or_else(|| anyhow::anyhow!("no AWS credential provider could be configured"))?;
        Ok(Self::with_credentials(credentials, connect_timeout))
    }

    /// Builds the client around a given credential provider.
    pub fn with_credentials(
        credentials: SharedCredentialsProvider,
        connect_timeout: Duration,
    ) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = tls_connector()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let connector = Connector {
            inner: https,
            timeout: connect_timeout,
        };
        Upstream {
            connector,
            pools: Arc::default(),
            credentials: CachedCredentials::new(credentials),
        }
    }

    /// This thread's pooled client, made on its first send.
    fn client(&self) -> &Client<Connector, Chunks> {
        self.pools.get_or(|| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(50))
                .pool_max_idle_per_host(64)
                .build(self.connector.clone())
        })
    }

    /// Signs and sends; resolves when response headers arrive (or the first-byte timeout hits).
    /// The body is left streaming. A connect failure is retried (re-signed) up to three times
    /// within the first-byte timeout; nothing that may have reached Bedrock is ever retried.
    pub async fn send(
        &self,
        out: Outbound,
        first_byte_timeout: Duration,
    ) -> Result<Response<Incoming>, SendError> {
        let timed_out = || SendError {
            error: Refusal::new(
                Reason::Timeout,
                format!(
                    "Bedrock did not start answering within {} s (bedrock-gate timeouts.first_byte_secs).",
                    first_byte_timeout.as_secs()
                ),
            ),
            maybe_sent: true,
        };
        let deadline = tokio::time::Instant::now() + first_byte_timeout;
        let mut backoff = CONNECT_RETRY_BACKOFF.iter();
        loop {
            let request = self.sign(out.clone()).await.map_err(|error| SendError {
                error,
                maybe_sent: false,
            })?;
            let e = match tokio::time::timeout_at(deadline, self.client().request(request)).await {
                Err(_) => return Err(timed_out()),
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) => e,
            };
            // A failed connect never carried the request; anything later may have.
            let never_sent = e.is_connect();
            match backoff.next() {
                // Only while a retry can still start before the deadline; otherwise this
                // connect failure is the answer (502, never sent).
                Some(pause) if never_sent && tokio::time::Instant::now() + *pause < deadline => {
                    tracing::warn!(error = %error_chain(&e), retry_in_ms = pause.as_millis() as u64, "could not connect to Bedrock; retrying");
                    tokio::time::sleep(*pause).await;
                }
                _ => {
                    tracing::warn!(error = %error_chain(&e), "upstream request failed");
                    return Err(SendError {
                        error: Refusal::new(
                            Reason::Unreachable,
                            "bedrock-gate could not reach Bedrock; try again. The operator can see the cause in the proxy log.",
                        ),
                        maybe_sent: !never_sent,
                    });
                }
            }
        }
    }

    async fn sign(&self, out: Outbound) -> Result<Request<Chunks>, Refusal> {
        let uri: http::Uri = out
            .url
            .parse()
            .map_err(|_| Refusal::internal("bedrock-gate built an invalid upstream URL."))?;
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(|| Refusal::internal("bedrock-gate built an upstream URL with no host."))?;

        let mut headers = out.headers;
        headers.insert(
            header::HOST,
            HeaderValue::from_str(&host).map_err(|_| Refusal::internal("invalid upstream host"))?,
        );
        if out.method != Method::GET || !out.body.is_empty() {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(out.body.len()));
        }

        let creds = match out.credentials {
            Some(c) => c,
            None => self.credentials.get().await.map_err(|e| {
                tracing::error!(error = %error_chain(&e), "no AWS credentials to sign with");
                Refusal::internal(
                    "bedrock-gate has no AWS credentials to sign with; the operator must fix its AWS credential chain.",
                )
            })?,
        };
        let identity: Identity = creds.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&out.region)
            .name(SIGNING_SERVICE)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| Refusal::internal(format!("signing parameters: {e}")))?
            .into();

        let signable_headers: Vec<(&str, &str)> = headers
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
            .collect();
        let signable = SignableRequest::new(
            out.method.as_str(),
            out.url.as_str(),
            signable_headers.into_iter(),
            SignableBody::Precomputed(out.body.sha256_hex().to_string()),
        )
        .map_err(|e| Refusal::internal(format!("cannot sign request: {e}")))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| Refusal::internal(format!("cannot sign request: {e}")))?
            .into_parts();

        let mut request = Request::builder()
            .method(out.method)
            .uri(uri)
            .body(out.body.into_body())
            .map_err(|e| Refusal::internal(format!("cannot build request: {e}")))?;
        *request.headers_mut() = headers;
        instructions.apply_to_request_http1x(&mut request);
        Ok(request)
    }
}

/// Formats an error with its sources, for the log.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
