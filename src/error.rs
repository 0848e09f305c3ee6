//! Errors a caller sees, shaped like Bedrock's own.
//!
//! Every refusal the proxy produces itself goes through [`ApiError`], so clients that parse
//! Bedrock errors (the AWS SDKs, Claude Code) get the same shape: a status code, an
//! `x-amzn-ErrorType` header, an `x-amzn-RequestId` header and a JSON body `{"message": ...}`.
//! Messages say what the caller should fix; they never carry internal detail (that goes to the
//! log) and never echo a key.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

/// The AWS error types the proxy emits. Names are the ones the AWS SDKs model, so a client's
/// retry and error classification behave as they would against Bedrock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 403: no key, an unknown key, or a model/profile the caller may not use.
    AccessDenied,
    /// 400 (or 413 for size): malformed input the proxy refuses before it reaches AWS.
    Validation,
    /// 404: a path that is not a Bedrock operation the proxy forwards.
    UnknownOperation,
    /// 429: a budget or rate limit of the caller is reached.
    Throttling,
    /// 502: the upstream could not be reached or failed before answering.
    BadGateway,
    /// 503: the proxy is shutting down and stopped this request.
    ShuttingDown,
    /// 504: the upstream did not answer in time.
    Timeout,
    /// 500: a fault inside the proxy (for example, no AWS credentials to sign with).
    Internal,
}

impl ErrorKind {
    fn aws_type(self) -> &'static str {
        match self {
            ErrorKind::AccessDenied => "AccessDeniedException",
            ErrorKind::Validation => "ValidationException",
            ErrorKind::UnknownOperation => "UnknownOperationException",
            ErrorKind::Throttling => "ThrottlingException",
            ErrorKind::BadGateway | ErrorKind::ShuttingDown => "ServiceUnavailableException",
            ErrorKind::Timeout => "ModelTimeoutException",
            ErrorKind::Internal => "InternalServerException",
        }
    }

    fn default_status(self) -> StatusCode {
        match self {
            ErrorKind::AccessDenied => StatusCode::FORBIDDEN,
            ErrorKind::Validation => StatusCode::BAD_REQUEST,
            ErrorKind::UnknownOperation => StatusCode::NOT_FOUND,
            ErrorKind::Throttling => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A refusal or failure produced by the proxy itself (never an upstream error, which is
/// passed through byte for byte).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?} ({status}): {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            status: kind.default_status(),
            message: message.into(),
        }
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn access_denied(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AccessDenied, message)
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message)
    }

    pub fn unknown_operation(method: &http::Method, path: &str) -> Self {
        let shown: String = path.chars().take(200).collect();
        Self::new(
            ErrorKind::UnknownOperation,
            format!(
                "bedrock-gate does not forward {method} {shown}. It serves the Bedrock Runtime operations \
                 POST /model/{{modelId}}/invoke, /invoke-with-response-stream, /converse, /converse-stream, \
                 /count-tokens and GET /inference-profiles[/{{id}}]."
            ),
        )
    }

    /// The AWS error type name (the `x-amzn-ErrorType` header value).
    pub fn aws_type(&self) -> &'static str {
        self.kind.aws_type()
    }

    /// Builds the response with a request id the caller can quote to the operator.
    pub fn into_response_with_id(self, request_id: &str) -> Response {
        let body = serde_json::json!({ "message": self.message }).to_string();
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            "x-amzn-errortype",
            HeaderValue::from_static(self.kind.aws_type()),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.insert("x-amzn-requestid", v);
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_with_id("")
    }
}
