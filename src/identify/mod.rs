//! Phase `identify`: who is calling. An API key, hashed and looked up in the live config; a
//! signed-in bearer (`bgs_…`), looked up in the session store and mapped to its user; or a SigV4
//! signature made with an issued key pair, whose access key id names the user and whose
//! signature [`sigv4`] checks once the body is read.
//!
//! The raw key or token lives only between reading the header and hashing it. This phase never
//! logs, never echoes a key, and never looks at the body; the path only a signature covers.

pub mod sigv4;

use std::sync::Arc;
use std::time::SystemTime;

use http::request::Parts;

use crate::auth;
use crate::config::{User, Users};
use crate::refusal::{Reason, Refusal};
use crate::signin::sessions::{ACCESS_PREFIX, Lookup, Session, SessionStore};

/// Who is calling, and through which sign-in when it was one.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: Arc<User>,
    /// The bearer session, for a caller signed in through SSO.
    pub session: Option<Arc<Session>>,
    /// The caller's SigV4 signature, to verify against the body before anything is forwarded.
    pub signature: Option<Arc<sigv4::Signature>>,
}

/// What identification found: the caller, or a refusal and (when the credential named one) the
/// user it named, so the refusal is recorded against them.
#[derive(Debug)]
pub struct Unidentified {
    pub user: Option<Arc<User>>,
    pub refusal: Refusal,
}

impl From<Refusal> for Unidentified {
    fn from(refusal: Refusal) -> Unidentified {
        Unidentified {
            user: None,
            refusal,
        }
    }
}

/// The message for a sign-in that no longer works; Claude Code asks for `/login` on it.
const SIGN_IN_AGAIN: &str = "Run /login in Claude Code to sign in to this bedrock-gate again.";

/// The sign-in bearer a request carries when this replica does not know it (it may be new on
/// another replica sharing the store).
pub fn unknown_session(parts: &Parts, sessions: &SessionStore) -> Option<String> {
    let key = auth::extract_key(&parts.headers, "").ok()?;
    let token = key.expose();
    (token.starts_with(ACCESS_PREFIX) && sessions.lookup(token) == Lookup::Unknown)
        .then(|| token.to_string())
}

/// The user whose key or sign-in the request carries. `how_to` tells a caller who sent none
/// (or a wrong one) how their protocol's clients send it.
pub fn identify(
    parts: &Parts,
    users: &Users,
    sessions: &SessionStore,
    how_to: &str,
) -> Result<Caller, Unidentified> {
    let headers = &parts.headers;
    if let Some(value) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .filter(|v| sigv4::is_sigv4(v))
    {
        return by_signature(parts, value, users);
    }
    let key = auth::extract_key(headers, how_to)?;
    if key.expose().starts_with(ACCESS_PREFIX) {
        return match sessions.lookup(key.expose()) {
            Lookup::Live(session) => match users.by_name(&session.user) {
                Some(user) => Ok(Caller {
                    user: user.clone(),
                    session: Some(session),
                    signature: None,
                }),
                None => Err(Refusal::unauthenticated(format!(
                    "The signed-in user `{}` is no longer in this bedrock-gate's config. {SIGN_IN_AGAIN}",
                    session.user
                ))
                .into()),
            },
            Lookup::Expired => Err(Refusal::unauthenticated(format!(
                "Your sign-in has expired. {SIGN_IN_AGAIN}"
            ))
            .into()),
            Lookup::Unknown => Err(Refusal::unauthenticated(format!(
                "This sign-in is not valid (signed out, or revoked by your bedrock-gate admin). {SIGN_IN_AGAIN}"
            ))
            .into()),
        };
    }
    users
        .by_key(&key.hash())
        .cloned()
        .map(|user| Caller {
            user,
            session: None,
            signature: None,
        })
        .ok_or_else(|| Refusal::unauthenticated(auth::unknown_key_message(how_to)).into())
}

/// A SigV4 caller: the access key id names the user; the rest of the signature is checked
/// against the request head now and against the body later.
fn by_signature(parts: &Parts, value: &str, users: &Users) -> Result<Caller, Unidentified> {
    let auth = sigv4::parse_authorization(value)?;
    let Some(user) = users.by_access_key(auth.access_key_id) else {
        return Err(Refusal::new(
            Reason::UnknownAccessKey,
            "The security token included in the request is invalid: this bedrock-gate issued no such \
             access key id (revoked or mistyped?). Use the AWS_ACCESS_KEY_ID that \
             `bedrock-gate keys add NAME --sigv4` printed.",
        )
        .into());
    };
    match sigv4::Signature::start(parts, &auth, SystemTime::now()) {
        Ok(signature) => Ok(Caller {
            user: user.clone(),
            session: None,
            signature: Some(Arc::new(signature)),
        }),
        Err(refusal) => Err(Unidentified {
            user: Some(user.clone()),
            refusal,
        }),
    }
}
