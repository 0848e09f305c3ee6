//! The state every request shares: the live config snapshot, the upstream client, the meter,
//! and what shutdown waits for.
//!
//! Owned here so the accept loop, the reloader and the handler can all reach it without
//! importing each other. It holds state only; it must never decide anything about a request.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::meter::Meter;
use crate::signin::SignInState;
use crate::upstream::Upstream;
use crate::upstream::sessions::Sessions;

/// The config in force, with what identifies it to an operator.
#[derive(Debug)]
pub struct Live {
    pub config: Config,
    /// 1 at start, +1 on every successful reload.
    pub generation: u64,
    /// SHA-256 of the file bytes this config was parsed from.
    pub sha256: String,
}

/// Shared state: the live config snapshot and the upstream client.
pub struct AppState {
    /// Swapped whole on reload; each request takes one snapshot and keeps it to the end, so a
    /// stream in flight finishes on the config it started with.
    pub live: ArcSwap<Live>,
    pub upstream: Upstream,
    /// Each user's own AWS session, when `aws.user_role_arn` is set (read at start).
    pub sessions: Option<Sessions>,
    pub meter: Arc<Meter>,
    /// SSO sign-in: device flows in progress, the IdP client, bearer sessions.
    pub signin: SignInState,
    /// The config file (where sign-up by first sign-in adds users); `None` in tests that
    /// build a config in memory.
    pub config_path: Option<PathBuf>,
    /// A reload may swap in a config with no users (`serve --allow-empty-reload`).
    pub allow_empty_reload: std::sync::atomic::AtomicBool,
    /// Cancelled when the shutdown grace period is over: requests still running stop and are
    /// recorded as `shutdown`.
    pub shutdown: CancellationToken,
    /// Every request not yet recorded holds a token, so shutdown can wait for the last row.
    pub requests: TaskTracker,
    /// Request body bytes held right now, against `limits.max_inflight_body_bytes`.
    pub bodies: Arc<crate::inflight::BodyBudget>,
    /// Admins' sign-ins to the dashboard through the IdP, and their sessions.
    pub admin_sso: crate::dashboard::sso::Sso,
}

impl AppState {
    pub fn new(
        config: Config,
        sha256: String,
        upstream: Upstream,
        sessions: Option<Sessions>,
        meter: Meter,
        signin: SignInState,
        config_path: Option<PathBuf>,
    ) -> Arc<AppState> {
        Arc::new(AppState {
            live: ArcSwap::from_pointee(Live {
                config,
                generation: 1,
                sha256,
            }),
            upstream,
            sessions,
            meter: Arc::new(meter),
            signin,
            config_path,
            allow_empty_reload: std::sync::atomic::AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            requests: TaskTracker::new(),
            bodies: Arc::default(),
            admin_sso: crate::dashboard::sso::Sso::default(),
        })
    }
}
