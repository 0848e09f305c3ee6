//! Why the proxy said no (or could not get an answer), in no protocol's words.
//!
//! Every phase that can stop a request (identify, reading the body, resolve, admit, forward)
//! returns a [`Refusal`]; the front the request came in on turns it into its own protocol's error
//! (AWS-shaped on the Bedrock-native front). This module never builds a response and never knows
//! a status code. Messages say what the caller should fix; they never carry internal detail (that
//! goes to the log) and never echo a key.

use crate::domain::Standing;

/// The kinds of refusal. Fronts map each to a status and an error type of their protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No key, a malformed key, or a key nobody has.
    Unauthenticated,
    /// A SigV4 signature made with an access key id nobody has (or with a session token).
    UnknownAccessKey,
    /// A SigV4 signature that does not check out: wrong secret, stale date, altered request.
    BadSignature,
    /// Identified, but the model or profile is not theirs: unmapped, another user's, or not
    /// provisioned yet.
    ModelNotAllowed,
    /// Identified, but nobody may do this (listing the account's application profiles).
    Forbidden,
    /// Malformed input the proxy refuses before it reaches AWS.
    Invalid,
    /// A body over `limits.max_body_bytes`.
    TooLarge,
    /// A body that did not arrive within `timeouts.request_body_secs`.
    BodyTimeout,
    /// A path that is no operation of the front it was sent to.
    UnknownOperation,
    /// The caller's monthly budget is used up.
    OverBudget,
    /// A per-minute rate limit of the caller is reached.
    RateLimited,
    /// Bedrock could not be reached, or failed before answering.
    Unreachable,
    /// Bedrock did not start answering in time.
    Timeout,
    /// The proxy is shutting down and stopped this request.
    ShuttingDown,
    /// The proxy holds as many request bodies as `limits.max_inflight_body_bytes` lets it.
    Overloaded,
    /// The user's own AWS session (`aws.user_role_arn`) could not be had from STS.
    SessionUnavailable,
    /// A fault inside the proxy (for example, no AWS credentials to sign with).
    Internal,
}

impl Reason {
    /// The name the ledger and the access log give this refusal: the AWS error type Bedrock
    /// would use for it (so one report reads every front the same way).
    pub fn name(self) -> &'static str {
        match self {
            Reason::Unauthenticated | Reason::ModelNotAllowed | Reason::Forbidden => {
                "AccessDeniedException"
            }
            Reason::UnknownAccessKey => "UnrecognizedClientException",
            Reason::BadSignature => "InvalidSignatureException",
            Reason::Invalid | Reason::TooLarge | Reason::BodyTimeout => "ValidationException",
            Reason::UnknownOperation => "UnknownOperationException",
            Reason::OverBudget | Reason::RateLimited => "ThrottlingException",
            Reason::Unreachable
            | Reason::ShuttingDown
            | Reason::SessionUnavailable
            | Reason::Overloaded => "ServiceUnavailableException",
            Reason::Timeout => "ModelTimeoutException",
            Reason::Internal => "InternalServerException",
        }
    }
}

/// A refusal, with what the caller needs to act on it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{reason:?}: {message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    /// Seconds until the same call can succeed (rate limits, a budget's reset).
    pub retry_after: Option<u64>,
    /// The caller's standing against their budget, on an [`Reason::OverBudget`] refusal.
    pub standing: Option<Standing>,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
            retry_after: None,
            standing: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Refusal {
        Self::new(Reason::Invalid, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Refusal {
        Self::new(Reason::Unauthenticated, message)
    }

    pub fn not_allowed(message: impl Into<String>) -> Refusal {
        Self::new(Reason::ModelNotAllowed, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Refusal {
        Self::new(Reason::Forbidden, message)
    }

    pub fn internal(message: impl Into<String>) -> Refusal {
        Self::new(Reason::Internal, message)
    }

    pub fn with_retry_after(mut self, secs: u64) -> Refusal {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_standing(mut self, standing: Standing) -> Refusal {
        self.standing = Some(standing);
        self
    }
}

/// Truncates caller-supplied text before a message echoes it.
pub fn shown(s: &str) -> String {
    s.chars().take(200).collect()
}
