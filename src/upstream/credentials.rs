//! The proxy's own AWS credentials, kept between requests.
//!
//! aws-config's credential chain does not cache: each `provide_credentials` walks the chain
//! again, which on EC2 is a call to the instance metadata service, on ECS or EKS Pod Identity
//! a call to the container endpoint and with web identity an STS call, throttled at a few per
//! second. The SDK's clients put an identity cache in front of it; the proxy signs by itself,
//! so this is that cache: credentials are fetched once and again only when they are within
//! [`REFRESH_MARGIN`] of their expiry. One fetch at a time: callers that find them stale while
//! another fetches wait for its result.
//!
//! This module never logs or formats a secret; a failed refresh while the credentials held are
//! still valid keeps signing with them, and only expired ones are refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, error};

/// Credentials expiring sooner than this are fetched again before signing: a signature must
/// still be valid when Bedrock receives the request.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// The provider and what it last gave.
#[derive(Clone)]
pub struct CachedCredentials {
    provider: SharedCredentialsProvider,
    held: Arc<ArcSwapOption<Credentials>>,
    fetching: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for CachedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedCredentials").finish_non_exhaustive()
    }
}

/// Whether `c` may still sign at `now` without a refresh.
fn fresh(c: &Credentials, now: SystemTime) -> bool {
    c.expiry().is_none_or(|at| now + REFRESH_MARGIN < at)
}

/// Whether `c` is still valid at all at `now`.
fn valid(c: &Credentials, now: SystemTime) -> bool {
    c.expiry().is_none_or(|at| now < at)
}

impl CachedCredentials {
    pub fn new(provider: SharedCredentialsProvider) -> CachedCredentials {
        CachedCredentials {
            provider,
            held: Arc::default(),
            fetching: Arc::default(),
        }
    }

    /// Credentials to sign with now: the held ones while fresh, else the provider's.
    pub async fn get(&self) -> Result<Credentials, error::CredentialsError> {
        if let Some(c) = self.held.load_full()
            && fresh(&c, SystemTime::now())
        {
            return Ok((*c).clone());
        }
        let _one = self.fetching.lock().await;
        // Whoever held the lock before may have fetched them.
        let held = self.held.load_full();
        if let Some(c) = &held
            && fresh(c, SystemTime::now())
        {
            return Ok((**c).clone());
        }
        match self.provider.provide_credentials().await {
            Ok(c) => {
                self.held.store(Some(Arc::new(c.clone())));
                Ok(c)
            }
            Err(e) => match held {
                Some(c) if valid(&c, SystemTime::now()) => {
                    tracing::warn!(error = %crate::upstream::error_chain(&e), "could not refresh the proxy's AWS credentials; signing with the ones held until they expire");
                    Ok((*c).clone())
                }
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Hands out credentials expiring `lifetime` from now, or fails once `fail` is set.
    #[derive(Debug)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        lifetime: Option<Duration>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl ProvideCredentials for Counting {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let r = if self.fail.load(Ordering::SeqCst) {
                Err(error::CredentialsError::provider_error("endpoint down"))
            } else {
                Ok(Credentials::new(
                    "AKID",
                    "secret",
                    None,
                    self.lifetime.map(|d| SystemTime::now() + d),
                    "test",
                ))
            };
            aws_credential_types::provider::future::ProvideCredentials::ready(r)
        }
    }

    fn cache(
        lifetime: Option<Duration>,
    ) -> (
        CachedCredentials,
        Arc<AtomicUsize>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = Counting {
            calls: calls.clone(),
            lifetime,
            fail: fail.clone(),
        };
        (
            CachedCredentials::new(SharedCredentialsProvider::new(p)),
            calls,
            fail,
        )
    }

    #[tokio::test]
    async fn credentials_without_expiry_are_fetched_once() {
        let (c, calls, _) = cache(None);
        for _ in 0..10 {
            assert_eq!(c.get().await.unwrap().access_key_id(), "AKID");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn credentials_inside_the_margin_are_fetched_again() {
        let (c, calls, _) = cache(Some(REFRESH_MARGIN / 2));
        c.get().await.unwrap();
        c.get().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_valid_ones_and_an_expired_one_fails() {
        let (c, calls, fail) = cache(Some(REFRESH_MARGIN / 2));
        c.get().await.unwrap();
        fail.store(true, Ordering::SeqCst);
        assert_eq!(
            c.get().await.unwrap().access_key_id(),
            "AKID",
            "still valid"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let (c, _, fail) = cache(Some(Duration::ZERO));
        c.get().await.unwrap();
        fail.store(true, Ordering::SeqCst);
        assert!(c.get().await.is_err(), "expired, and no new ones");
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let (c, calls, _) = cache(Some(Duration::from_secs(3600)));
        let all: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.get().await.map(|_| ()) })
            })
            .collect();
        for t in all {
            t.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
