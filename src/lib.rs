//! bedrock-gate: a local HTTP proxy in front of Amazon Bedrock that makes cost attribution
//! enforced, not requested. A caller presents an API key; the proxy finds who they are, swaps
//! the model id in the Bedrock Runtime path for *that caller's* application inference profile
//! ARN, re-signs with SigV4 using the proxy's own AWS credentials, and streams the answer back
//! untouched.
//!
//! # Layout
//! - [`domain`]: the shared words (Bedrock Runtime operations, token usage); imports nothing.
//! - [`cli`]: clap definitions only.
//! - [`config`]: TOML → raw serde types → validated [`config::Config`] (the routing table).
//! - [`auth`]: API key extraction, SHA-256 hashing, key generation.
//! - [`arn`]: Bedrock ARN and model id parsing and normalisation (geo prefixes).
//! - [`route`]: Bedrock path parsing and (caller, model) → the caller's profile. The model id
//!   swap lives here.
//! - [`upstream`]: header hygiene, SigV4 signing, the pooled rustls HTTP client.
//! - [`server`]: router, the proxy handler, body limits, response streaming, `serve`, the
//!   admin (metrics) listener.
//! - [`state`]: what every request shares (live config, upstream client, meter, shutdown).
//! - [`reload`]: live config reload on file change and SIGHUP (validate, then swap whole).
//! - [`admin`]: config-editing commands (users, keys) and profile provisioning (plan, apply,
//!   verify) against the Bedrock control plane.
//! - [`meter`]: usage extraction from streams, the SQLite ledger, prices, budgets and rate
//!   limits, Prometheus metrics, the `usage` report.
//! - [`error`]: AWS-shaped errors (`x-amzn-ErrorType` + `{"message"}`) the proxy produces.

pub mod admin;
pub mod arn;
pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod listen;
pub mod logging;
pub mod meter;
pub mod reload;
pub mod route;
pub mod server;
pub mod state;
pub mod tls;
pub mod upstream;
