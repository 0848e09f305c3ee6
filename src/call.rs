//! A [`Call`]: what a front decoded a request into, in no protocol's terms. It is the typed
//! input of the phases every front shares (`resolve`, `admit`, `forward`).
//!
//! Plain data: nothing here reads, refuses or sends.

use http::HeaderMap;

use crate::domain::{Front, Labels, Op, RuntimeOp};
use crate::premium::Asked;
use crate::upstream::payload::Payload;

/// What the caller asks of Bedrock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// A Bedrock Runtime operation, on the caller's own profile for [`Call::model`].
    Runtime(RuntimeOp),
    /// ListInferenceProfiles with this query (already narrowed to system profiles).
    ListProfiles { query: String },
    /// GetInferenceProfile of [`Call::model`].
    GetProfile,
}

/// One decoded request.
#[derive(Debug, Clone)]
pub struct Call {
    pub front: Front,
    /// As logs, metrics and the ledger name it.
    pub op: Op,
    pub wanted: Wanted,
    /// The model or profile as the caller named it (percent-decoded).
    pub model: Option<String>,
    /// The request headers Bedrock may see (the front filtered them).
    pub headers: HeaderMap,
    /// The body to send, as the front made it (hashed while it arrived).
    pub body: Payload,
    /// Project and session, for the ledger.
    pub labels: Labels,
    /// Billing options beyond the standard rate the call asks for (see `premium`).
    pub asked: Asked,
}

impl Call {
    /// Whether the call counts against budgets and rate limits: model calls do;
    /// CountTokens and profile reads are free.
    pub fn is_metered(&self) -> bool {
        matches!(self.wanted, Wanted::Runtime(op) if op != RuntimeOp::CountTokens)
    }
}
