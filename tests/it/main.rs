//! Every integration test in one binary, so the helpers in `common` compile once.
//!
//! Most modules are black-box tests of the real `bedrock-gate` binary (started on port 0 with a
//! temp config) against fakes of AWS on 127.0.0.1:0; `parsers_prop` calls the library directly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a failed test"
)]

mod common;

mod access_keys;
mod accounting;
mod anthropic_sdk;
mod billing;
mod billing_fakes;
mod claude_code;
mod cli;
mod crash;
mod dashboard;
mod faults;
mod fronts;
mod hangup;
mod hardening;
mod iam;
mod messages;
mod metering;
mod parsers_prop;
mod provision;
mod proxy;
mod reload;
mod replicas;
mod sdk;
mod signin;
mod sigv4_verifier;
mod store;
mod streaming;
mod tls;
