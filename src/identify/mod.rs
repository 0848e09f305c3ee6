//! Phase `identify`: who is calling. An API key, hashed and looked up in the live config; or a
//! signed-in bearer (`bgs_…`), looked up in the session store and mapped to its user.
//!
//! The raw key or token lives only between reading the header and hashing it. This phase never
//! logs, never echoes a key, and never looks at the body or the path.

use std::sync::Arc;

use http::HeaderMap;

use crate::auth;
use crate::config::{User, Users};
use crate::refusal::Refusal;
use crate::signin::sessions::{ACCESS_PREFIX, Lookup, Session, SessionStore};

/// Who is calling, and through which sign-in when it was one.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: Arc<User>,
    /// The bearer session, for a caller signed in through SSO.
    pub session: Option<Arc<Session>>,
}

/// The message for a sign-in that no longer works; Claude Code asks for `/login` on it.
const SIGN_IN_AGAIN: &str = "Run /login in Claude Code to sign in to this bedrock-gate again.";

/// The user whose key or sign-in the request carries. `how_to` tells a caller who sent none
/// (or a wrong one) how their protocol's clients send it.
pub fn identify(
    headers: &HeaderMap,
    users: &Users,
    sessions: &SessionStore,
    how_to: &str,
) -> Result<Caller, Refusal> {
    let key = auth::extract_key(headers, how_to)?;
    if key.expose().starts_with(ACCESS_PREFIX) {
        return match sessions.lookup(key.expose()) {
            Lookup::Live(session) => match users.by_name(&session.user) {
                Some(user) => Ok(Caller {
                    user: user.clone(),
                    session: Some(session),
                }),
                None => Err(Refusal::unauthenticated(format!(
                    "The signed-in user `{}` is no longer in this bedrock-gate's config. {SIGN_IN_AGAIN}",
                    session.user
                ))),
            },
            Lookup::Expired => Err(Refusal::unauthenticated(format!(
                "Your sign-in has expired. {SIGN_IN_AGAIN}"
            ))),
            Lookup::Unknown => Err(Refusal::unauthenticated(format!(
                "This sign-in is not valid (signed out, or revoked by your bedrock-gate admin). {SIGN_IN_AGAIN}"
            ))),
        };
    }
    users
        .by_key(&key.hash())
        .cloned()
        .map(|user| Caller {
            user,
            session: None,
        })
        .ok_or_else(|| Refusal::unauthenticated(auth::unknown_key_message(how_to)))
}
