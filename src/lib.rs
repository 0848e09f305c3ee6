//! bedrock-gate: a local HTTP proxy in front of Amazon Bedrock that makes cost attribution
//! enforced, not requested. A caller presents an API key; the proxy finds who they are, swaps
//! the model id for *that caller's* application inference profile ARN, re-signs with SigV4
//! using the proxy's own AWS credentials, and streams the answer back.
//!
//! # Layout
//! The request pipeline (see [`server`]), one module per phase:
//! - [`front`]: the protocols callers speak; decodes a request into a [`call::Call`] and encodes
//!   the answer or a refusal in the caller's protocol ([`front::bedrock`]: Bedrock-native;
//!   [`front::messages`]: the Anthropic Messages API, streams as SSE by [`front::sse`]).
//! - [`identify`]: API key, signed-in bearer or an issued key pair's SigV4 signature → user
//!   (`identify::sigv4` checks a caller's signature against the body before it is forwarded).
//! - [`resolve`]: (user, requested model) → the caller's own profile and the upstream URL. The
//!   model id swap lives here.
//! - [`meter::limits`]: `admit`, the budget and rate-limit check.
//! - [`forward`]: send to Bedrock (signed by [`upstream`]).
//! - [`stream`]: the response body on its way back, metered, cut on silence or shutdown.
//! - [`observe`]: one log line, one ledger row, counters and metrics per request.
//!
//! What the phases share:
//! - [`domain`]: the shared words (front, operation, usage, outcome, budget standing); imports
//!   nothing from the crate.
//! - [`refusal`]: why a request was refused, in no protocol's words.
//! - [`inflight`]: the request body bytes held across all requests, and each one's reservation.
//! - [`premium`]: billing options a call asks for (service tier, latency, guardrails), refused
//!   unless the user may use them, and the rate the rest pays.
//! - [`call`]: what a front decoded a request into.
//! - [`state`]: what every request shares (live config, upstream client, meter, shutdown).
//!
//! Around them:
//! - [`cli`]: clap definitions only.
//! - [`config`]: TOML → raw serde types → validated [`config::Config`] (the routing table).
//! - [`auth`]: API key extraction, SHA-256 hashing, key generation.
//! - [`signin`]: SSO sign-in, the OAuth side of the Claude Code gateway protocol (device flow,
//!   the company's OIDC IdP, bearer sessions stored hashed); the bearer endpoints Claude Code
//!   calls once signed in (managed settings, usage, telemetry) are [`front::gateway`].
//! - [`arn`]: Bedrock ARN and model id parsing and normalisation (geo prefixes).
//! - [`upstream`]: header hygiene, SigV4 signing, the pooled rustls HTTP client. The signature is
//!   made here.
//! - [`listen`]: the accept loop (header timeout, TLS handshake, graceful shutdown).
//! - [`workers`]: the serving threads, one single-threaded runtime per core; a connection and
//!   its requests stay on the one it was handed to.
//! - [`tls`]: the listener's certificate and key.
//! - [`reload`]: live config reload on file change and SIGHUP (validate, then swap whole).
//! - [`logging`]: stderr logs written off the request threads.
//! - [`admin`]: config-editing commands (users, keys) and profile provisioning (plan, apply,
//!   verify) against the Bedrock control plane.
//! - [`dashboard`]: the admin dashboard on `admin_listen` (pages, `/api/` JSON, CSV), read
//!   from the ledger's rollups; never on the main listener.
//! - [`meter`]: usage extraction from streams, the SQLite ledger, prices, budgets and rate
//!   limits, Prometheus metrics, the `usage` report.

pub mod admin;
pub mod arn;
pub mod auth;
pub mod call;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod domain;
pub mod forward;
pub mod front;
pub mod identify;
pub mod inflight;
pub mod listen;
pub mod logging;
pub mod meter;
pub mod observe;
pub mod premium;
pub mod refusal;
pub mod reload;
pub mod resolve;
pub mod server;
pub mod signin;
pub mod state;
pub mod store;
pub mod stream;
pub mod tls;
pub mod upstream;
pub mod workers;
