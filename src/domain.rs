//! The words every phase of a request shares: which Bedrock Runtime operation is called and
//! how many tokens a response used.
//!
//! A leaf: it imports nothing from the crate, so any module may use it without an import
//! circle. It holds plain data and the names that go with it; it must never do I/O or hold
//! policy (who may call what, what a token costs).

/// The Bedrock Runtime operations the proxy forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeOp {
    Invoke,
    InvokeStream,
    Converse,
    ConverseStream,
    CountTokens,
}

impl RuntimeOp {
    /// The operation named by the path suffix after `/model/{id}/`.
    pub fn from_suffix(s: &str) -> Option<Self> {
        Some(match s {
            "invoke" => RuntimeOp::Invoke,
            "invoke-with-response-stream" => RuntimeOp::InvokeStream,
            "converse" => RuntimeOp::Converse,
            "converse-stream" => RuntimeOp::ConverseStream,
            "count-tokens" => RuntimeOp::CountTokens,
            _ => return None,
        })
    }

    /// The path suffix after `/model/{id}/`.
    pub fn suffix(self) -> &'static str {
        match self {
            RuntimeOp::Invoke => "invoke",
            RuntimeOp::InvokeStream => "invoke-with-response-stream",
            RuntimeOp::Converse => "converse",
            RuntimeOp::ConverseStream => "converse-stream",
            RuntimeOp::CountTokens => "count-tokens",
        }
    }

    /// The AWS operation name, as logs and metrics show it.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeOp::Invoke => "InvokeModel",
            RuntimeOp::InvokeStream => "InvokeModelWithResponseStream",
            RuntimeOp::Converse => "Converse",
            RuntimeOp::ConverseStream => "ConverseStream",
            RuntimeOp::CountTokens => "CountTokens",
        }
    }
}

/// Tokens one response consumed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

impl Usage {
    /// Tokens of every kind together (what a tokens-per-minute limit counts).
    pub fn total(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_tokens)
    }
}
