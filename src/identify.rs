//! Phase `identify`: who is calling. The caller's key, hashed, looked up in the live config.
//!
//! The raw key lives only between reading the header and hashing it. This phase never logs,
//! never echoes a key, and never looks at the body or the path.

use std::sync::Arc;

use http::HeaderMap;

use crate::auth;
use crate::config::{User, Users};
use crate::refusal::Refusal;

/// The user whose key the request carries. `how_to` tells a caller who sent none (or a wrong
/// one) how their protocol's clients send it.
pub fn identify(headers: &HeaderMap, users: &Users, how_to: &str) -> Result<Arc<User>, Refusal> {
    let key = auth::extract_key(headers, how_to)?;
    users
        .by_key(&key.hash())
        .cloned()
        .ok_or_else(|| Refusal::unauthenticated(auth::unknown_key_message(how_to)))
}
