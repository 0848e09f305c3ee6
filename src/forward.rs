//! Phase `forward`: the call goes to Bedrock, signed (see `upstream`) with the proxy's own
//! credentials, or with the user's own session when `aws.user_role_arn` is set, and the phase
//! returns when Bedrock's response headers arrive; the body is left streaming for the front to
//! encode.
//!
//! Shutdown is checked first, so a request whose body arrived after the grace period is never
//! sent. Before the send, the call's sent marker is committed to the ledger (see `observe` and
//! `meter::ledger`): from the send on, Bedrock may have run (and billed) the call, and a crash
//! from then on leaves it recorded as `interrupted` rather than not at all. This phase never
//! sends a call before its marker is committed (or given up on after the ledger's bounded
//! wait), and never retries anything that may have reached the model.

use std::time::{Duration, Instant};

use hyper::body::Incoming;

use crate::call::Call;
use crate::config::User;
use crate::observe::RequestInfo;
use crate::refusal::{Reason, Refusal};
use crate::resolve::Target;
use crate::state::AppState;
use crate::upstream::Outbound;

/// The refusal of a request that arrives, or finishes arriving, while the proxy stops.
pub fn shutting_down() -> Refusal {
    Refusal::new(
        Reason::ShuttingDown,
        "bedrock-gate is shutting down; retry.",
    )
}

/// Sends `call` to `target`; fills in what the record needs (sent, time to first byte,
/// Bedrock's status and request id).
/// The call's headers and body move into the request; the rest of it stays for the front.
pub async fn forward(
    state: &AppState,
    user: &User,
    call: &mut Call,
    target: Target,
    first_byte: Duration,
    info: &mut RequestInfo,
    started: Instant,
) -> Result<http::Response<Incoming>, Refusal> {
    // With per-user principals, the user's own session signs; never the proxy's identity.
    // (Boxed: its future is large and most proxies never run it; see `server::proxy`.)
    let credentials = match &state.sessions {
        Some(sessions) => Some(Box::pin(sessions.credentials(user)).await?),
        None => None,
    };
    let out = Outbound {
        method: target.method,
        url: target.url,
        region: target.region,
        headers: std::mem::take(&mut call.headers),
        body: std::mem::take(&mut call.body),
        credentials,
    };
    if let Some(marker) = crate::observe::sent_marker(info) {
        let committed = state.meter.ledger.sent(marker).committed();
        tokio::select! {
            biased;
            () = state.shutdown.cancelled() => return Err(shutting_down()),
            _ = committed => {}
        }
    }
    info.sent = true;
    let upstream = tokio::select! {
        biased;
        () = state.shutdown.cancelled() => return Err(shutting_down()),
        r = state.upstream.send(out, first_byte) => match r {
            Ok(resp) => resp,
            Err(e) => {
                info.sent = e.maybe_sent;
                return Err(e.error);
            }
        },
    };
    info.ttfb = Some(started.elapsed());
    info.status = upstream.status().as_u16();
    if info.status >= 400 {
        let raw = upstream
            .headers()
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        info.upstream_error = Some(crate::domain::upstream_error_type(raw));
    }
    info.upstream_request_id = upstream
        .headers()
        .get("x-amzn-requestid")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(128).collect());
    Ok(upstream)
}
