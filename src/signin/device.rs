//! Device authorizations in progress (RFC 8628) and the browser sign-ins that approve them.
//!
//! In memory ([`Memory`]) for one replica: a sign-in in progress lasts minutes, and a restart
//! just means `/login` again. With `[store] url` in the shared database instead (see
//! [`DeviceFlows`]), so each step may reach any replica. Device codes are 256 random bits, kept as hashes, single use and expiring; user codes
//! are 8 letters from RFC 8628's base-20 alphabet. Polling faster than the interval gets
//! `slow_down` (and the interval grows by 5 s). Everything is bounded: at most
//! [`MAX_PENDING`] flows and [`MAX_PENDING`] browser sign-ins at once. This module never
//! logs a code and never talks to the IdP.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// How long a device code and its user code live.
pub const DEVICE_CODE_TTL: Duration = Duration::from_secs(600);
/// The polling interval given to clients.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// How long the browser may take at the IdP.
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// At most this many device flows (and browser sign-ins) in progress.
pub const MAX_PENDING: usize = 10_000;
/// RFC 8628 §6.1: consonants only, no vowels (no words), no ambiguous letters.
const ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
const USER_CODE_LEN: usize = 8;

/// What a device code's poll finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    Pending,
    SlowDown,
    Denied(String),
    Expired,
    Approved(Box<Approval>),
    /// Not a device code this proxy issued, or one already used.
    Invalid,
}

/// A browser sign-in that succeeded: who approved the code, as the session will hold it.
pub use super::sessions::Grant as Approval;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Pending,
    /// A browser sign-in for it is under way (it cannot be started twice).
    SigningIn,
    Approved(Box<Approval>),
    Denied(String),
}

#[derive(Debug)]
struct Flow {
    user_code: String,
    expires: Instant,
    interval: Duration,
    last_poll: Option<Instant>,
    state: State,
    surface: Option<String>,
}

/// A browser sign-in on its way to the IdP and back, keyed by its `state`.
#[derive(Debug, Clone)]
pub struct Login {
    pub user_code: String,
    pub nonce: String,
    pub verifier: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    /// Device code hash → flow.
    flows: HashMap<[u8; 32], Flow>,
    /// User code → device code hash.
    by_user_code: HashMap<String, [u8; 32]>,
    /// OIDC `state` → login.
    logins: HashMap<String, Login>,
}

impl Inner {
    fn prune(&mut self, now: Instant) {
        let before = self.flows.len();
        self.flows.retain(|_, f| f.expires > now);
        if self.flows.len() != before {
            let flows = &self.flows;
            self.by_user_code.retain(|_, h| flows.contains_key(h));
        }
        self.logins.retain(|_, l| l.expires > now);
    }
}

/// A device authorization just made.
#[derive(Debug)]
pub struct Started {
    pub device_code: String,
    pub user_code: String,
    pub expires_in: u64,
    pub interval: u64,
}

/// What the verification page may do with a user code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeState {
    /// Waiting for a sign-in (or one is under way and may be started again).
    Open,
    /// Already approved or denied.
    Used,
    Unknown,
}

/// All flows in progress, in this process's memory (one replica).
#[derive(Debug, Default)]
pub struct Memory {
    inner: Mutex<Inner>,
}

pub fn random(bytes: usize) -> Result<String, getrandom::Error> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn hash(code: &str) -> [u8; 32] {
    Sha256::digest(code.as_bytes()).into()
}

fn user_code() -> Result<String, getrandom::Error> {
    // 256 is a multiple of 4 but not of 20: reject bytes ≥ 240 so every letter is as likely.
    let mut out = String::with_capacity(USER_CODE_LEN + 1);
    while out.len() < USER_CODE_LEN + 1 {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b)?;
        for byte in b {
            if byte >= 240 {
                continue;
            }
            if out.len() == USER_CODE_LEN / 2 {
                out.push('-');
            }
            out.push(char::from(ALPHABET[usize::from(byte % 20)]));
            if out.len() == USER_CODE_LEN + 1 {
                break;
            }
        }
    }
    Ok(out)
}

/// A user code as typed (any case, with or without the dash or spaces) in its canonical form;
/// `None` when it cannot be one.
pub fn normalize_user_code(typed: &str) -> Option<String> {
    if typed.len() > 64 {
        return None;
    }
    let letters: Vec<u8> = typed
        .bytes()
        .filter(|b| !matches!(b, b'-' | b' ' | b'\t'))
        .map(|b| b.to_ascii_uppercase())
        .collect();
    if letters.len() != USER_CODE_LEN || !letters.iter().all(|b| ALPHABET.contains(b)) {
        return None;
    }
    let (a, b) = letters.split_at(USER_CODE_LEN / 2);
    Some(format!(
        "{}-{}",
        String::from_utf8_lossy(a),
        String::from_utf8_lossy(b)
    ))
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// RFC 8628 §3.2: a new device code and user code. `None` when too many are in progress.
    pub fn start(&self, surface: Option<String>) -> Result<Option<Started>, getrandom::Error> {
        let now = Instant::now();
        let device_code = random(32)?;
        let mut inner = self.lock();
        inner.prune(now);
        if inner.flows.len() >= MAX_PENDING {
            return Ok(None);
        }
        let mut code = user_code()?;
        while inner.by_user_code.contains_key(&code) {
            code = user_code()?;
        }
        let h = hash(&device_code);
        inner.by_user_code.insert(code.clone(), h);
        inner.flows.insert(
            h,
            Flow {
                user_code: code.clone(),
                expires: now + DEVICE_CODE_TTL,
                interval: INTERVAL,
                last_poll: None,
                state: State::Pending,
                surface,
            },
        );
        Ok(Some(Started {
            device_code,
            user_code: code,
            expires_in: DEVICE_CODE_TTL.as_secs(),
            interval: INTERVAL.as_secs(),
        }))
    }

    /// Whether the verification page may start a sign-in for this user code.
    pub fn code_state(&self, user_code: &str) -> CodeState {
        let mut inner = self.lock();
        inner.prune(Instant::now());
        let Some(h) = inner.by_user_code.get(user_code).copied() else {
            return CodeState::Unknown;
        };
        match inner.flows.get(&h).map(|f| &f.state) {
            Some(State::Pending | State::SigningIn) => CodeState::Open,
            Some(_) => CodeState::Used,
            None => CodeState::Unknown,
        }
    }

    /// Starts the browser sign-in for a user code: fresh `state`, nonce and PKCE verifier. A
    /// sign-in already under way for the code (a tab closed at the IdP, another browser) is
    /// replaced: its `state` no longer works. `None` when the code is unknown, expired or used.
    pub fn begin_login(
        &self,
        user_code: &str,
    ) -> Result<Option<(String, Login)>, getrandom::Error> {
        let now = Instant::now();
        let state = random(32)?;
        let login = Login {
            user_code: user_code.to_string(),
            nonce: random(32)?,
            verifier: random(48)?,
            expires: now + LOGIN_TTL,
        };
        let mut inner = self.lock();
        inner.prune(now);
        if inner.logins.len() >= MAX_PENDING {
            return Ok(None);
        }
        let Some(h) = inner.by_user_code.get(user_code).copied() else {
            return Ok(None);
        };
        match inner.flows.get_mut(&h) {
            Some(flow) if matches!(flow.state, State::Pending | State::SigningIn) => {
                flow.state = State::SigningIn;
            }
            _ => return Ok(None),
        }
        inner.logins.retain(|_, l| l.user_code != user_code);
        inner.logins.insert(state.clone(), login.clone());
        Ok(Some((state, login)))
    }

    /// Takes the login a callback's `state` names (single use).
    pub fn take_login(&self, state: &str) -> Option<Login> {
        let mut inner = self.lock();
        inner.prune(Instant::now());
        inner.logins.remove(state)
    }

    /// The surface (`claude_code`) the flow of a user code was started by.
    pub fn surface(&self, user_code: &str) -> Option<String> {
        let inner = self.lock();
        let h = inner.by_user_code.get(user_code)?;
        inner.flows.get(h).and_then(|f| f.surface.clone())
    }

    /// Ends the browser sign-in of a user code: approved, or denied with a message the device
    /// poll returns.
    pub fn finish(&self, user_code: &str, outcome: Result<Approval, String>) {
        let mut inner = self.lock();
        let Some(h) = inner.by_user_code.get(user_code).copied() else {
            return;
        };
        if let Some(flow) = inner.flows.get_mut(&h) {
            flow.state = match outcome {
                Ok(a) => State::Approved(Box::new(a)),
                Err(message) => State::Denied(message),
            };
        }
    }

    /// A browser sign-in given up before it finished (the IdP said no before an identity
    /// was known, or was unreachable): the code may be tried again.
    pub fn reopen(&self, user_code: &str) {
        let mut inner = self.lock();
        let Some(h) = inner.by_user_code.get(user_code).copied() else {
            return;
        };
        if let Some(flow) = inner.flows.get_mut(&h)
            && flow.state == State::SigningIn
        {
            flow.state = State::Pending;
        }
    }

    /// RFC 8628 §3.4/3.5: what polling this device code finds. An approved or denied code is
    /// answered once, then forgotten.
    pub fn poll(&self, device_code: &str) -> Poll {
        let now = Instant::now();
        let h = hash(device_code);
        let mut inner = self.lock();
        let Some(flow) = inner.flows.get_mut(&h) else {
            return Poll::Invalid;
        };
        if flow.expires <= now {
            let code = flow.user_code.clone();
            inner.flows.remove(&h);
            inner.by_user_code.remove(&code);
            return Poll::Expired;
        }
        let too_fast = flow
            .last_poll
            .is_some_and(|t| now.duration_since(t) + Duration::from_millis(500) < flow.interval);
        flow.last_poll = Some(now);
        match &flow.state {
            State::Pending | State::SigningIn if too_fast => {
                flow.interval += Duration::from_secs(5);
                Poll::SlowDown
            }
            State::Pending | State::SigningIn => Poll::Pending,
            State::Approved(_) | State::Denied(_) => {
                let code = flow.user_code.clone();
                let state = inner.flows.remove(&h).map(|f| f.state);
                inner.by_user_code.remove(&code);
                match state {
                    Some(State::Approved(a)) => Poll::Approved(a),
                    Some(State::Denied(m)) => Poll::Denied(m),
                    _ => Poll::Invalid,
                }
            }
        }
    }
}

/// The flows in progress: in memory, or with `[store] url` in the database every replica
/// shares ([`crate::store::device`]), so each step of a sign-in may land on any replica. A
/// store that fails is logged and answered as a flow that is not there (the page says to try
/// again; a device poll hears `authorization_pending` and keeps polling).
#[derive(Debug, Default)]
pub struct DeviceFlows {
    memory: Memory,
    store: Option<std::sync::Arc<crate::store::Lazy>>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn rng<T>(r: Result<T, getrandom::Error>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))
}

fn store_failed(e: &anyhow::Error) {
    tracing::warn!(error = %format!("{e:#}"), "sign-in: the store did not answer");
}

impl DeviceFlows {
    /// Flows in the shared store, over `conn`.
    pub fn on_store(conn: std::sync::Arc<crate::store::Lazy>) -> DeviceFlows {
        DeviceFlows {
            memory: Memory::default(),
            store: Some(conn),
        }
    }

    /// RFC 8628 §3.2: a new device code and user code. `None` when too many are in progress.
    pub async fn start(&self, surface: Option<String>) -> anyhow::Result<Option<Started>> {
        let Some(store) = &self.store else {
            return rng(self.memory.start(surface));
        };
        let device_code = rng(random(32))?;
        let h = hex::encode(hash(&device_code));
        let client = store.get().await?;
        let now = now_ms();
        let times = (now, now + ms(DEVICE_CODE_TTL), ms(INTERVAL));
        let max = i64::try_from(MAX_PENDING).unwrap_or(i64::MAX);
        for _ in 0..8 {
            let code = rng(user_code())?;
            match crate::store::device::start(&client, &h, &code, surface.as_deref(), times, max)
                .await?
            {
                Ok(false) => return Ok(None),
                Ok(true) => {
                    return Ok(Some(Started {
                        device_code,
                        user_code: code,
                        expires_in: DEVICE_CODE_TTL.as_secs(),
                        interval: INTERVAL.as_secs(),
                    }));
                }
                Err(()) => continue,
            }
        }
        anyhow::bail!("no free user code after 8 draws")
    }

    /// Whether the verification page may start a sign-in for this user code.
    pub async fn code_state(&self, user_code: &str) -> CodeState {
        let Some(store) = &self.store else {
            return self.memory.code_state(user_code);
        };
        let found = async {
            crate::store::device::code_state(&*store.get().await?, user_code, now_ms()).await
        };
        found.await.unwrap_or_else(|e| {
            store_failed(&e);
            CodeState::Unknown
        })
    }

    /// See [`Memory::begin_login`].
    pub async fn begin_login(&self, user_code: &str) -> anyhow::Result<Option<(String, Login)>> {
        let Some(store) = &self.store else {
            return rng(self.memory.begin_login(user_code));
        };
        let state = rng(random(32))?;
        let login = Login {
            user_code: user_code.to_string(),
            nonce: rng(random(32))?,
            verifier: rng(random(48))?,
            expires: Instant::now() + LOGIN_TTL,
        };
        let now = now_ms();
        let max = i64::try_from(MAX_PENDING).unwrap_or(i64::MAX);
        let begun = crate::store::device::begin_login(
            &mut *store.get().await?,
            &hex::encode(hash(&state)),
            &login,
            now,
            now + ms(LOGIN_TTL),
            max,
        )
        .await?;
        Ok(begun.then_some((state, login)))
    }

    /// Takes the login a callback's `state` names (single use).
    pub async fn take_login(&self, state: &str) -> Option<Login> {
        let Some(store) = &self.store else {
            return self.memory.take_login(state);
        };
        let taken = async {
            crate::store::device::take_login(
                &*store.get().await?,
                &hex::encode(hash(state)),
                now_ms(),
            )
            .await
        };
        match taken.await {
            Ok(found) => found.map(|(user_code, nonce, verifier)| Login {
                user_code,
                nonce,
                verifier,
                expires: Instant::now() + LOGIN_TTL,
            }),
            Err(e) => {
                store_failed(&e);
                None
            }
        }
    }

    /// The surface (`claude_code`) the flow of a user code was started by.
    pub async fn surface(&self, user_code: &str) -> Option<String> {
        let Some(store) = &self.store else {
            return self.memory.surface(user_code);
        };
        let found = async { crate::store::device::surface(&*store.get().await?, user_code).await };
        found.await.unwrap_or_else(|e| {
            store_failed(&e);
            None
        })
    }

    /// See [`Memory::finish`].
    pub async fn finish(&self, user_code: &str, outcome: Result<Approval, String>) {
        let Some(store) = &self.store else {
            return self.memory.finish(user_code, outcome);
        };
        let done =
            async { crate::store::device::finish(&*store.get().await?, user_code, &outcome).await };
        if let Err(e) = done.await {
            store_failed(&e);
        }
    }

    /// See [`Memory::reopen`].
    pub async fn reopen(&self, user_code: &str) {
        let Some(store) = &self.store else {
            return self.memory.reopen(user_code);
        };
        let done = async { crate::store::device::reopen(&*store.get().await?, user_code).await };
        if let Err(e) = done.await {
            store_failed(&e);
        }
    }

    /// See [`Memory::poll`].
    pub async fn poll(&self, device_code: &str) -> Poll {
        let Some(store) = &self.store else {
            return self.memory.poll(device_code);
        };
        use crate::store::device::Polled;
        let polled = async {
            crate::store::device::poll(
                &mut *store.get().await?,
                &hex::encode(hash(device_code)),
                now_ms(),
                5_000,
            )
            .await
        };
        match polled.await {
            Ok(Polled::Invalid) => Poll::Invalid,
            Ok(Polled::Expired) => Poll::Expired,
            Ok(Polled::Pending) => Poll::Pending,
            Ok(Polled::SlowDown) => Poll::SlowDown,
            Ok(Polled::Denied(m)) => Poll::Denied(m),
            Ok(Polled::Approved(json)) => match serde_json::from_str(&json) {
                Ok(a) => Poll::Approved(Box::new(a)),
                Err(_) => Poll::Invalid,
            },
            Err(e) => {
                store_failed(&e);
                Poll::Pending
            }
        }
    }
}

/// A fixed window per client address, for the unauthenticated sign-in endpoints.
#[derive(Debug, Default)]
pub struct IpLimiter {
    inner: Mutex<HashMap<IpAddr, (u64, u32)>>,
}

impl IpLimiter {
    /// Counts one request from `ip`; false when it is over `per_minute` this minute.
    pub fn allow(&self, ip: IpAddr, per_minute: u32) -> bool {
        let minute = u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0) / 60;
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (m, _)| *m == minute);
        }
        let entry = map.entry(ip).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        entry.1 <= per_minute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval() -> Approval {
        Approval {
            user: "alice".into(),
            subject: "s".into(),
            email: None,
            groups: vec![],
            idp_refresh: None,
            surface: None,
        }
    }

    #[test]
    fn user_codes_are_base20_and_normalize() {
        for _ in 0..200 {
            let c = user_code().unwrap();
            assert_eq!(c.len(), 9);
            assert_eq!(&c[4..5], "-");
            assert!(
                c.bytes()
                    .filter(|b| *b != b'-')
                    .all(|b| ALPHABET.contains(&b))
            );
            assert_eq!(
                normalize_user_code(&c.to_lowercase().replace('-', " ")),
                Some(c)
            );
        }
        assert_eq!(normalize_user_code("AEIO-UBCD"), None);
        assert_eq!(normalize_user_code("BCDF"), None);
        assert_eq!(normalize_user_code(&"B".repeat(100)), None);
    }

    #[test]
    fn device_code_is_single_use_and_login_state_too() {
        let flows = Memory::default();
        let s = flows.start(Some("claude_code".into())).unwrap().unwrap();
        assert!(s.device_code.len() >= 43, "256 bits");
        assert_eq!(flows.poll(&s.device_code), Poll::Pending);
        assert_eq!(
            flows.poll(&s.device_code),
            Poll::SlowDown,
            "polled at once again"
        );
        assert_eq!(flows.code_state(&s.user_code), CodeState::Open);
        let (abandoned, _) = flows.begin_login(&s.user_code).unwrap().unwrap();
        let (state, login) = flows.begin_login(&s.user_code).unwrap().unwrap();
        assert!(
            flows.take_login(&abandoned).is_none(),
            "a new sign-in replaces the old"
        );
        assert_eq!(flows.code_state(&s.user_code), CodeState::Open);
        assert_eq!(flows.take_login(&state).unwrap().nonce, login.nonce);
        assert!(flows.take_login(&state).is_none(), "state is single use");
        flows.finish(&s.user_code, Ok(approval()));
        assert_eq!(flows.code_state(&s.user_code), CodeState::Used);
        assert!(
            flows.begin_login(&s.user_code).unwrap().is_none(),
            "approved codes are done"
        );
        assert!(matches!(flows.poll(&s.device_code), Poll::Approved(_)));
        assert_eq!(
            flows.poll(&s.device_code),
            Poll::Invalid,
            "replayed device code"
        );
        assert_eq!(flows.poll("made-up"), Poll::Invalid);
    }

    #[test]
    fn denial_is_reported_once() {
        let flows = Memory::default();
        let s = flows.start(None).unwrap().unwrap();
        flows.begin_login(&s.user_code).unwrap().unwrap();
        flows.finish(&s.user_code, Err("no user".into()));
        assert_eq!(flows.poll(&s.device_code), Poll::Denied("no user".into()));
        assert_eq!(flows.poll(&s.device_code), Poll::Invalid);
    }

    #[test]
    fn ip_limiter_counts_per_minute() {
        let l = IpLimiter::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..3).all(|_| l.allow(ip, 3)));
        assert!(!l.allow(ip, 3));
        assert!(l.allow("10.0.0.2".parse().unwrap(), 3));
    }
}
