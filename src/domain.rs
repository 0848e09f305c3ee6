//! The words every phase of a request shares: which front a call came in on, which operation it
//! is, how many tokens its response used, the caller's standing against a budget, and how the
//! request ended.
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
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// The protocol a caller speaks to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Front {
    /// Bedrock's own REST API (`/model/{id}/...`, `/inference-profiles`): Claude Code in
    /// Bedrock mode, the AWS SDKs.
    Bedrock,
    /// The Anthropic Messages API (`/v1/messages`, `/v1/models`): Claude Code in Anthropic
    /// mode, the Anthropic SDKs.
    Anthropic,
}

impl Front {
    /// As the ledger and the access log name it.
    pub fn name(self) -> &'static str {
        match self {
            Front::Bedrock => "bedrock",
            Front::Anthropic => "anthropic",
        }
    }
}

/// What a request asks for, as logs, metrics and the ledger name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Not recognised (yet): a path no front serves, or a request refused before routing.
    Unknown,
    Health,
    /// The caller's own usage this month (`GET /usage`).
    Usage,
    Runtime(RuntimeOp),
    ListInferenceProfiles,
    GetInferenceProfile,
    /// `POST /v1/messages` (InvokeModel upstream).
    Messages,
    /// `POST /v1/messages` with `"stream": true` (InvokeModelWithResponseStream upstream).
    MessagesStream,
    /// `GET /v1/models[/{id}]`: the caller's own models, answered by the proxy.
    ListModels,
    /// `GET /managed/settings`, `GET /api/oauth/usage`, `POST /v1/{metrics,logs,traces}`: the
    /// gateway protocol's own endpoints, answered by the proxy.
    Gateway,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Unknown => "Unknown",
            Op::Health => "Health",
            Op::Usage => "Usage",
            Op::Runtime(op) => op.name(),
            Op::ListInferenceProfiles => "ListInferenceProfiles",
            Op::GetInferenceProfile => "GetInferenceProfile",
            Op::Messages => "Messages",
            Op::MessagesStream => "MessagesStream",
            Op::ListModels => "ListModels",
            Op::Gateway => "Gateway",
        }
    }
}

/// What a call is for, beyond who made it: labels the ledger and the `usage` report group by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels {
    /// A project the caller names (`x-bedrock-gate-project`, or a Messages body's `tags`).
    pub project: Option<String>,
    /// The Claude Code session (`x-claude-code-session-id`).
    pub session: Option<String>,
}

/// How a request ended, as the ledger's `outcome` column and the access log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response reached its natural end (an upstream error response included).
    Complete,
    /// The client went away before the response ended.
    ClientGone,
    /// The upstream connection failed mid-response.
    UpstreamError,
    /// The upstream went silent mid-response for `timeouts.stream_idle_secs`.
    UpstreamIdle,
    /// Cut at the end of the shutdown grace period, or refused because the proxy was stopping.
    Shutdown,
    /// On its way to or from Bedrock when the proxy process died; written at the next start
    /// from the call's sent marker (Bedrock may have run and billed it; its usage is unknown).
    Interrupted,
    /// Refused by the proxy itself; the name is the refusal's (see `Reason::name`).
    Refused(&'static str),
    /// Bedrock answered with an error (a 4xx/5xx, or an exception frame that ended a stream):
    /// its error type.
    UpstreamFailed(&'static str),
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamIdle => "upstream_idle",
            Outcome::Shutdown => "shutdown",
            Outcome::Interrupted => "interrupted",
            Outcome::Refused(name) | Outcome::UpstreamFailed(name) => name,
        }
    }

    /// Whether the call failed upstream (the ledger's and `/metrics`' errors; a refusal by the
    /// proxy, a client gone and a shutdown are not Bedrock's errors).
    pub fn is_upstream_error(self) -> bool {
        matches!(
            self,
            Outcome::UpstreamFailed(_) | Outcome::UpstreamError | Outcome::UpstreamIdle
        )
    }
}

/// Bedrock Runtime's and the control plane's error types, as the ledger names them
/// (`ThrottlingException`, from the `x-amzn-ErrorType` header or an exception frame's
/// `:exception-type`); any other is `UpstreamException`.
pub fn upstream_error_type(raw: &str) -> &'static str {
    // `x-amzn-ErrorType` may carry `:http://internal.amazon.com/...` after the type.
    let name = raw.split(':').next().unwrap_or(raw).trim();
    const KNOWN: &[&str] = &[
        "AccessDeniedException",
        "ConflictException",
        "InternalServerException",
        "ModelErrorException",
        "ModelNotReadyException",
        "ModelStreamErrorException",
        "ModelTimeoutException",
        "ResourceNotFoundException",
        "ServiceQuotaExceededException",
        "ServiceUnavailableException",
        "ThrottlingException",
        "TooManyRequestsException",
        "UnknownOperationException",
        "ValidationException",
    ];
    // Exception frames name them in lowerCamelCase (`throttlingException`).
    KNOWN
        .iter()
        .find(|k| k.eq_ignore_ascii_case(name))
        .copied()
        .unwrap_or("UpstreamException")
}

/// A caller's standing against their monthly budget, at the moment a call was admitted or
/// refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub budget_usd: f64,
    /// Estimated spend so far this month.
    pub spent_usd: f64,
    /// When the budget resets (the start of the next UTC month), Unix seconds.
    pub resets_at: i64,
}

impl Standing {
    /// Spent over budget; 1 or more once the budget is used up (a zero budget is used up).
    pub fn utilization(&self) -> f64 {
        if self.budget_usd > 0.0 {
            self.spent_usd / self.budget_usd
        } else {
            1.0
        }
    }

    pub fn exhausted(&self) -> bool {
        self.spent_usd >= self.budget_usd
    }
}
