//! Per-user AWS identities. With `aws.user_role_arn`, each user's calls are signed with
//! temporary credentials of their own, from STS `AssumeRole` on that role with a session named
//! after the user and tagged `{provisioning.tag_key}=user` (plus the user's own tags), so the
//! bill's IAM-principal dimension names the user even for a call no profile carries.
//!
//! Sessions are cached per user and renewed before they expire (when less than a quarter of
//! their life, at most five minutes, is left), with one AssumeRole in flight per user however
//! many calls wait for it. A user call is never signed with the proxy's own identity: when STS
//! fails and the user has no session that is still valid, the call is refused. This module
//! never logs credentials.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;

use crate::config::{AwsSettings, User};
use crate::refusal::{Reason, Refusal};

/// How long a session is asked for.
const SESSION_SECS: i32 = 3600;
/// Renew a session once less than this much of it is left (or a quarter of its life).
const RENEW_MARGIN: Duration = Duration::from_secs(300);

/// One user's session and the lock that keeps their AssumeRole calls to one at a time.
#[derive(Default)]
struct UserSession {
    current: Mutex<Option<Session>>,
    renewing: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Session {
    credentials: Credentials,
    /// Renew from this moment on.
    renew_at: SystemTime,
    expires: SystemTime,
}

/// The cache of every user's session for one role.
pub struct Sessions {
    sts: aws_sdk_sts::Client,
    role_arn: String,
    tag_key: String,
    users: Mutex<HashMap<String, Arc<UserSession>>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("role_arn", &self.role_arn)
            .finish_non_exhaustive()
    }
}

/// The session name STS takes for a user: `[\w+=,.@-]{2,64}`. User names are already made of
/// those characters and at most 64 long; a one-letter name is padded.
pub fn session_name(user: &str) -> String {
    let mut name: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    while name.len() < 2 {
        name.push('_');
    }
    name
}

impl Sessions {
    /// A cache for `role_arn`, assuming it through STS with the proxy's own credentials.
    pub fn new(
        sdk: &aws_config::SdkConfig,
        aws: &AwsSettings,
        role_arn: String,
        tag_key: String,
    ) -> Sessions {
        let mut conf = aws_sdk_sts::config::Builder::from(sdk);
        if let Some(endpoint) = &aws.sts_endpoint {
            conf = conf.endpoint_url(endpoint.for_region(&aws.region));
        }
        Sessions {
            sts: aws_sdk_sts::Client::from_conf(conf.build()),
            role_arn,
            tag_key,
            users: Mutex::new(HashMap::new()),
        }
    }

    fn user(&self, name: &str) -> Arc<UserSession> {
        let mut users = match self.users.lock() {
            Ok(u) => u,
            Err(poisoned) => poisoned.into_inner(),
        };
        users.entry(name.to_string()).or_default().clone()
    }

    fn cached(session: &UserSession) -> Option<Session> {
        match session.current.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The credentials to sign `user`'s call with.
    pub async fn credentials(&self, user: &User) -> Result<Credentials, Refusal> {
        let slot = self.user(&user.name);
        let now = SystemTime::now();
        if let Some(s) = Self::cached(&slot)
            && now < s.renew_at
        {
            return Ok(s.credentials);
        }
        let _renewing = slot.renewing.lock().await;
        // Someone else may have renewed it while this call waited.
        let now = SystemTime::now();
        let cached = Self::cached(&slot);
        if let Some(s) = &cached
            && now < s.renew_at
        {
            return Ok(s.credentials.clone());
        }
        match self.assume(user).await {
            Ok(session) => {
                let credentials = session.credentials.clone();
                match slot.current.lock() {
                    Ok(mut c) => *c = Some(session),
                    Err(poisoned) => *poisoned.into_inner() = Some(session),
                }
                Ok(credentials)
            }
            Err(e) => match cached {
                // Renewal failed but the session has time left: use it, try again next call.
                Some(s) if now < s.expires => {
                    tracing::warn!(user = %user.name, error = %e, "renewing the user's session failed; using the current one");
                    Ok(s.credentials)
                }
                _ => {
                    tracing::error!(user = %user.name, role = %self.role_arn, error = %e, "STS AssumeRole failed");
                    Err(Refusal::new(
                        Reason::SessionUnavailable,
                        format!(
                            "bedrock-gate could not get AWS credentials for user `{}` (STS AssumeRole on {}); \
                             it never falls back to its own. Retry; the operator can see why in the proxy log.",
                            user.name, self.role_arn
                        ),
                    ))
                }
            },
        }
    }

    async fn assume(&self, user: &User) -> Result<Session, String> {
        let mut tags: BTreeMap<&str, &str> = user
            .tags
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        tags.insert(&self.tag_key, &user.name);
        let mut request = self
            .sts
            .assume_role()
            .role_arn(&self.role_arn)
            .role_session_name(session_name(&user.name))
            .duration_seconds(SESSION_SECS);
        for (k, v) in tags {
            request = request.tags(
                aws_sdk_sts::types::Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .map_err(|e| format!("tag {k}: {e}"))?,
            );
        }
        let out = request.send().await.map_err(|e| {
            use aws_sdk_sts::error::ProvideErrorMetadata as _;
            match (e.code(), e.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                _ => crate::upstream::error_chain(&e),
            }
        })?;
        let c = out
            .credentials()
            .ok_or("STS answered AssumeRole without credentials")?;
        let expires = SystemTime::try_from(*c.expiration())
            .map_err(|_| "STS gave an expiry out of range".to_string())?;
        let now = SystemTime::now();
        let life = expires.duration_since(now).unwrap_or_default();
        let margin = RENEW_MARGIN.min(life / 4);
        let credentials = Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_string()),
            Some(expires),
            "bedrock-gate user session",
        );
        tracing::info!(user = %user.name, expires_in_secs = life.as_secs(), "assumed the user role");
        Ok(Session {
            credentials,
            renew_at: expires.checked_sub(margin).unwrap_or(now),
            expires,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_follow_the_sts_rule() {
        assert_eq!(session_name("alice"), "alice");
        assert_eq!(session_name("carol@example.com"), "carol@example.com");
        assert_eq!(session_name("a"), "a_");
        assert_eq!(session_name(&"x".repeat(80)).len(), 64);
        assert_eq!(session_name("é"), "__");
    }
}
