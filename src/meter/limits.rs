//! Per-user accounting for budgets and rate limits.
//!
//! Holds this month's totals and a sliding one-minute window per user, in memory, behind one
//! short std mutex (no await while held). Counters are rebuilt from the ledger at start, so a
//! restart is not a budget reset. Limits themselves come from the live config on every call,
//! so a changed limit applies to the next request.
//!
//! On a shared store it also holds what the other replicas spent this month and counted per
//! second in the last minute, as the store poll last read them ([`Accounts::set_others`],
//! [`Accounts::set_others_window`]), and hands the poll this replica's changed seconds
//! ([`Accounts::take_window_changes`]); admission counts both, so a limit is the user's across
//! replicas. It never reaches the store itself: a request never waits on a round trip.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use chrono::{DateTime, Datelike, TimeZone, Utc};

use crate::call::Call;
use crate::config::{User, UserLimits};
use crate::domain::{Standing, Usage};
use crate::meter::ledger::Totals;
use crate::refusal::{Reason, Refusal};

/// The rate window's length in seconds.
pub const WINDOW_SECS: i64 = 60;

/// A replica that counted a user in one of the last this many seconds is admitting their
/// calls now, as far as the projection of its unseen admissions goes.
const ACTIVE_SECS: i64 = 3;

/// The others' window is projected forward (see `Account::projected`) only while it is this
/// fresh; a store that stopped answering leaves admission on what was last read.
const FRESH_MS: i64 = 2_000;

/// A calendar month in UTC. Ordered by time (year, then month).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Month {
    pub year: i32,
    pub month: u32,
}

impl Month {
    pub fn of(t: DateTime<Utc>) -> Month {
        Month {
            year: t.year(),
            month: t.month(),
        }
    }

    pub fn start(self) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(self.year, self.month, 1, 0, 0, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    pub fn next(self) -> Month {
        if self.month == 12 {
            Month {
                year: self.year + 1,
                month: 1,
            }
        } else {
            Month {
                year: self.year,
                month: self.month + 1,
            }
        }
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// One second of a rate window.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    sec: i64,
    requests: u64,
    tokens: u64,
    /// Changed since it was last handed to the store (see [`Accounts::take_window_changes`]).
    dirty: bool,
}

impl Bucket {
    const EMPTY: Bucket = Bucket {
        sec: i64::MIN,
        requests: 0,
        tokens: 0,
        dirty: false,
    };
}

/// This replica's requests and tokens per second over the last minute.
#[derive(Debug, Clone)]
struct Window {
    /// Indexed by second mod 60.
    buckets: [Bucket; WINDOW_SECS as usize],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            buckets: [Bucket::EMPTY; WINDOW_SECS as usize],
        }
    }
}

impl Window {
    /// Counts `requests` and `tokens` in second `sec`.
    fn add(&mut self, sec: i64, requests: u64, tokens: u64) {
        if requests == 0 && tokens == 0 {
            return;
        }
        let b = &mut self.buckets[sec.rem_euclid(WINDOW_SECS) as usize];
        if b.sec != sec {
            *b = Bucket {
                sec,
                ..Bucket::EMPTY
            };
        }
        b.requests = b.requests.saturating_add(requests);
        b.tokens = b.tokens.saturating_add(tokens);
        b.dirty = true;
    }

    fn live(&self, now: i64) -> impl Iterator<Item = &Bucket> {
        self.buckets
            .iter()
            .filter(move |b| b.sec > now - WINDOW_SECS && b.sec <= now)
    }
}

/// The other replicas' requests and tokens per second over the last minute, summed over
/// replicas, as last read from the store: (second, requests, tokens). Replaced whole at each
/// read; between reads its seconds leave the window as time passes.
#[derive(Debug, Clone, Default)]
struct Others {
    seconds: Vec<(i64, u64, u64)>,
}

impl Others {
    /// A second of another replica's clock a little ahead of ours still counts: those requests
    /// were made.
    fn live(&self, now: i64) -> impl Iterator<Item = &(i64, u64, u64)> {
        self.seconds.iter().filter(move |s| s.0 > now - WINDOW_SECS)
    }
}

/// A second of a window as the store holds it: what one replica counted for `user` in `sec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSecond {
    pub user: String,
    /// Unix seconds.
    pub sec: i64,
    /// Requests admitted in that second.
    pub requests: u64,
    /// Tokens of requests that finished in that second.
    pub tokens: u64,
}

#[derive(Debug, Clone)]
struct Account {
    month: Month,
    totals: Totals,
    /// What the other replicas on the same store spent this month, as last read from it.
    others: Totals,
    window: Window,
    /// The other replicas' last minute, as last read from the store.
    others_window: Others,
    /// Some second of `window` changed since the store was last handed the changes.
    window_dirty: bool,
    /// Requests and tokens this replica ever counted in `window`, and their values when the
    /// others' window was last read and the time before: (requests, tokens) at `[before, last]`.
    counted: (u64, u64),
    synced: [(u64, u64); 2],
    /// Other replicas that counted this user in the last [`ACTIVE_SECS`] when last read.
    others_active: u64,
}

impl Account {
    fn new(month: Month) -> Account {
        Account {
            month,
            totals: Totals::default(),
            others: Totals::default(),
            window: Window::default(),
            others_window: Others::default(),
            window_dirty: false,
            counted: (0, 0),
            synced: [(0, 0); 2],
            others_active: 0,
        }
    }

    /// Counts in this replica's window.
    fn count(&mut self, sec: i64, requests: u64, tokens: u64) {
        self.window.add(sec, requests, tokens);
        self.window_dirty |= requests > 0 || tokens > 0;
        self.counted.0 = self.counted.0.saturating_add(requests);
        self.counted.1 = self.counted.1.saturating_add(tokens);
    }

    /// What the active other replicas have likely admitted that the store has not shown us
    /// yet: as much each as this replica counted since the read before last. The others'
    /// figures are up to a poll old when read (each writes once a poll) and older still by
    /// now; with load spread over the replicas, each does about what this one does. Without
    /// it, every replica admits the whole remaining headroom of each poll, and a burst
    /// overshoots a limit by about (replicas - 1) polls' worth of its rate.
    fn projected(&self) -> (u64, u64) {
        let since =
            |now: u64, then: u64| now.saturating_sub(then).saturating_mul(self.others_active);
        (
            since(self.counted.0, self.synced[0].0),
            since(self.counted.1, self.synced[0].1),
        )
    }

    /// Requests and tokens in the minute up to `now`: this replica's and the others'.
    fn window_sums(&self, now: i64) -> (u64, u64) {
        let own = self.window.live(now).map(|b| (b.requests, b.tokens));
        let others = self.others_window.live(now).map(|s| (s.1, s.2));
        own.chain(others).fold((0u64, 0u64), |(r, t), (br, bt)| {
            (r.saturating_add(br), t.saturating_add(bt))
        })
    }

    /// Seconds until the oldest second, this replica's or another's, that holds what `pick`
    /// looks at (requests, tokens) leaves the window.
    fn retry_after(&self, now: i64, pick: impl Fn(u64, u64) -> bool) -> i64 {
        let own = self.window.live(now).map(|b| (b.sec, b.requests, b.tokens));
        let others = self.others_window.live(now).copied();
        own.chain(others)
            .filter(|&(_, r, t)| pick(r, t))
            .map(|(sec, _, _)| sec.saturating_add(WINDOW_SECS).saturating_sub(now))
            .min()
            .unwrap_or(1)
            .max(1)
    }

    /// This replica's totals and the other replicas' together.
    fn all(&self) -> Totals {
        let (a, b) = (&self.totals, &self.others);
        Totals {
            requests: a.requests.saturating_add(b.requests),
            usage: crate::domain::Usage {
                input_tokens: a.usage.input_tokens.saturating_add(b.usage.input_tokens),
                output_tokens: a.usage.output_tokens.saturating_add(b.usage.output_tokens),
                cache_read_tokens: a
                    .usage
                    .cache_read_tokens
                    .saturating_add(b.usage.cache_read_tokens),
                cache_write_tokens: a
                    .usage
                    .cache_write_tokens
                    .saturating_add(b.usage.cache_write_tokens),
            },
            cost_usd: a.cost_usd + b.cost_usd,
            unpriced: a.unpriced.saturating_add(b.unpriced),
        }
    }

    /// Starts a new month's totals; never goes back (a late-finishing request from an
    /// earlier month must not wipe the current one).
    fn roll(&mut self, now: Month) {
        if now > self.month {
            self.month = now;
            self.totals = Totals::default();
            self.others = Totals::default();
        }
    }
}

/// All users' counters.
#[derive(Debug, Default)]
pub struct Accounts {
    inner: Mutex<HashMap<String, Account>>,
    /// The second before which every other replica's second read from the store has left the
    /// window (0: none was ever read), so an idle poll knows it has nothing to refresh without
    /// walking every account.
    others_until: AtomicI64,
    /// When the others' window was last read (unix ms; 0: never).
    synced_at_ms: AtomicI64,
    /// The store poll found nothing to trade and sleeps until the next tick; the first change
    /// of a window wakes it (see [`Accounts::window_changed`]), so a replica that was idle
    /// learns of the others' use a round trip after its first call rather than a poll later.
    idle: AtomicBool,
    wake: tokio::sync::Notify,
}

impl Accounts {
    /// Rebuilds counters from ledger rows: this month's totals per user, and
    /// (user, start ms, tokens) of each request in the last minute.
    pub fn rebuild(
        month: Month,
        totals: Vec<(String, Totals)>,
        recent: Vec<(String, i64, u64)>,
    ) -> Accounts {
        let mut map: HashMap<String, Account> = HashMap::new();
        for (user, t) in totals {
            let a = map.entry(user).or_insert_with(|| Account::new(month));
            a.totals = t;
        }
        for (user, ts_ms, toks) in recent {
            let a = map.entry(user).or_insert_with(|| Account::new(month));
            // Marked changed, so the store gets this replica's window as rebuilt.
            a.count(ts_ms.div_euclid(1000), 1, toks);
        }
        for a in map.values_mut() {
            // Calls from before the start are not a burst of this one to project.
            a.synced = [a.counted; 2];
        }
        Accounts {
            inner: Mutex::new(map),
            ..Accounts::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        match self.inner.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn with<R>(&self, user: &str, now: DateTime<Utc>, f: impl FnOnce(&mut Account) -> R) -> R {
        let mut map = self.lock();
        let month = Month::of(now);
        let a = map
            .entry(user.to_string())
            .or_insert_with(|| Account::new(month));
        a.roll(month);
        f(a)
    }

    /// Phase `admit`: a metered call (a model call) must be within the caller's budget and
    /// rate limits, and is then counted in the rate window; free calls (CountTokens, profile
    /// reads) always pass and count nothing.
    pub fn admit_call(
        &self,
        user: &User,
        call: &Call,
        now: DateTime<Utc>,
    ) -> Result<Admission, Refusal> {
        if !call.is_metered() {
            return Ok(Admission::default());
        }
        let standing = self.admit(&user.name, &user.limits, now)?;
        Ok(Admission {
            counted: true,
            standing,
        })
    }

    /// Checks the user's limits and, if the request may go, counts it in the rate window.
    /// Returns the user's standing against their budget, if they have one.
    pub fn admit(
        &self,
        user: &str,
        limits: &UserLimits,
        now: DateTime<Utc>,
    ) -> Result<Option<Standing>, Refusal> {
        let sec = now.timestamp();
        let fresh = now.timestamp_millis() - self.synced_at_ms.load(Ordering::Relaxed) <= FRESH_MS;
        let admitted = self.with(user, now, |a| {
            let resets = a.month.next().start();
            let spent = a.totals.cost_usd + a.others.cost_usd;
            let standing = limits.monthly_budget_usd.map(|budget| Standing {
                budget_usd: budget,
                spent_usd: spent,
                resets_at: resets.timestamp(),
            });
            if let Some(standing) = standing
                && standing.exhausted()
            {
                let budget = standing.budget_usd;
                let retry_after = u64::try_from(resets.timestamp() - sec).unwrap_or(0).max(1);
                return Err(Refusal::new(Reason::OverBudget, format!(
                    "User `{user}` has used the monthly budget of ${budget:.2} (users.{user}.limits.monthly_budget_usd): \
                     ${:.2} spent in {}. It resets at {}; until then your bedrock-gate admin can raise it.",
                    spent,
                    a.month,
                    resets.format("%Y-%m-%dT%H:%M:%SZ")
                ))
                .with_retry_after(retry_after)
                .with_standing(standing));
            }
            // Every replica's last minute, so a limit holds for the user, not per replica; and
            // what the others have likely admitted since the store last showed them.
            let (reqs, toks) = a.window_sums(sec);
            let (unseen_reqs, unseen_toks) = if fresh { a.projected() } else { (0, 0) };
            if let Some(rpm) = limits.requests_per_minute
                && reqs.saturating_add(unseen_reqs) >= rpm
            {
                // Over on what is known: until its oldest second leaves. Over only on the
                // projection: until the next read shows what the others did.
                let after = if reqs >= rpm {
                    a.retry_after(sec, |r, _| r > 0)
                } else {
                    1
                };
                return Err(rate_limited(
                    format!(
                        "User `{user}` is over the rate limit of {rpm} requests per minute \
                         (users.{user}.limits.requests_per_minute). Retry in {after} s."
                    ),
                    after,
                ));
            }
            if let Some(tpm) = limits.tokens_per_minute
                && toks.saturating_add(unseen_toks) >= tpm
            {
                let after = if toks >= tpm {
                    a.retry_after(sec, |_, t| t > 0)
                } else {
                    1
                };
                return Err(rate_limited(
                    format!(
                        "User `{user}` is over the rate limit of {tpm} tokens per minute \
                         (users.{user}.limits.tokens_per_minute): {toks} used in the last minute. Retry in {after} s."
                    ),
                    after,
                ));
            }
            a.count(sec, 1, 0);
            Ok(standing)
        });
        if admitted.is_ok() {
            self.window_touched();
        }
        admitted
    }

    /// Adds a finished request's usage and cost. Month totals follow the request's start (as
    /// the ledger and the restart rebuild do); its tokens enter the rate window now, when they
    /// were spent.
    pub fn complete(
        &self,
        user: &str,
        usage: &Usage,
        cost: Option<f64>,
        started: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        self.with(user, now, |a| {
            a.count(now.timestamp(), 0, usage.total());
            if Month::of(started) != a.month {
                // Started in an earlier month: that month's total lives in the ledger only.
                return;
            }
            let t = &mut a.totals;
            t.requests = t.requests.saturating_add(1);
            t.usage.input_tokens = t.usage.input_tokens.saturating_add(usage.input_tokens);
            t.usage.output_tokens = t.usage.output_tokens.saturating_add(usage.output_tokens);
            t.usage.cache_read_tokens = t
                .usage
                .cache_read_tokens
                .saturating_add(usage.cache_read_tokens);
            t.usage.cache_write_tokens = t
                .usage
                .cache_write_tokens
                .saturating_add(usage.cache_write_tokens);
            match cost {
                Some(c) => t.cost_usd += c,
                None if usage.total() > 0 => t.unpriced = t.unpriced.saturating_add(1),
                None => {}
            }
        });
        if usage.total() > 0 {
            self.window_touched();
        }
    }

    /// This month's totals for a user.
    pub fn month_totals(&self, user: &str, now: DateTime<Utc>) -> (Month, Totals) {
        self.with(user, now, |a| (a.month, a.all()))
    }

    /// Sets what the other replicas on the store spent in `month`, per user (a user not listed
    /// spent nothing there). Read from the store about twice a second, so a budget crossed on
    /// one replica is refused by all within a second.
    pub fn set_others(&self, month: Month, others: Vec<(String, Totals)>) {
        let mut map = self.lock();
        let mut others: HashMap<String, Totals> = others.into_iter().collect();
        for (user, a) in map.iter_mut() {
            a.roll(month);
            if a.month == month {
                a.others = others.remove(user).unwrap_or_default();
            }
        }
        for (user, t) in others {
            let mut a = Account::new(month);
            a.others = t;
            map.insert(user, a);
        }
    }
}

impl Accounts {
    /// This replica's seconds in the window that changed since the last call, for the store;
    /// each is handed over once per change, with its figures so far (they only grow). One the
    /// store did not take is the caller's to offer again.
    pub fn take_window_changes(&self, now: DateTime<Utc>) -> Vec<WindowSecond> {
        let now = now.timestamp();
        let mut map = self.lock();
        let mut out = Vec::new();
        for (user, a) in map.iter_mut().filter(|(_, a)| a.window_dirty) {
            a.window_dirty = false;
            for b in a.window.buckets.iter_mut().filter(|b| b.dirty) {
                b.dirty = false;
                if b.sec > now - WINDOW_SECS && b.sec <= now {
                    out.push(WindowSecond {
                        user: user.clone(),
                        sec: b.sec,
                        requests: b.requests,
                        tokens: b.tokens,
                    });
                }
            }
        }
        // Under the lock, as counting is: a change made after this call finds the flag set.
        self.idle.store(out.is_empty(), Ordering::Relaxed);
        drop(map);
        out
    }

    /// Replaces what the other replicas counted in the minute up to `now`, per user and second
    /// (summed over replicas; a user not listed has nothing there), as just read from the
    /// store. Admission counts it with this replica's own window; between reads its seconds
    /// leave the window as time passes, so a store that stops answering is forgotten within a
    /// minute rather than held against the users.
    pub fn set_others_window(&self, now: DateTime<Utc>, seconds: Vec<(String, WindowSecond)>) {
        let sec_now = now.timestamp();
        let mut per_user: HashMap<String, OthersRead> = HashMap::new();
        let mut until = 0i64;
        for (replica, s) in seconds {
            // A second from a clock far ahead would hold the user back until that time comes.
            if s.sec <= sec_now - WINDOW_SECS || s.sec > sec_now.saturating_add(WINDOW_SECS) {
                continue;
            }
            until = until.max(s.sec.saturating_add(WINDOW_SECS));
            let read = per_user.entry(s.user).or_default();
            if s.sec > sec_now - ACTIVE_SECS {
                read.active.insert(replica);
            }
            let e = read.seconds.entry(s.sec).or_default();
            e.0 = e.0.saturating_add(s.requests);
            e.1 = e.1.saturating_add(s.tokens);
        }
        let mut map = self.lock();
        let month = Month::of(now);
        for user in per_user.keys() {
            if !map.contains_key(user) {
                map.insert(user.clone(), Account::new(month));
            }
        }
        for (user, a) in map.iter_mut() {
            a.synced = [a.synced[1], a.counted];
            match per_user.remove(user) {
                Some(read) => {
                    a.others_active = read.active.len() as u64;
                    a.others_window.seconds = read
                        .seconds
                        .into_iter()
                        .map(|(s, (r, t))| (s, r, t))
                        .collect();
                }
                None => {
                    a.others_active = 0;
                    if !a.others_window.seconds.is_empty() {
                        a.others_window = Others::default();
                    }
                }
            }
        }
        self.others_until.store(until, Ordering::Relaxed);
        self.synced_at_ms
            .store(now.timestamp_millis(), Ordering::Relaxed);
    }

    /// Whether some user has another replica's second still in the window at `now`. While none
    /// has and nothing changed here, a poll of the store has no window to tell or refresh.
    pub fn has_others_window(&self, now: DateTime<Utc>) -> bool {
        now.timestamp() < self.others_until.load(Ordering::Relaxed)
    }

    /// Wakes the store poll if it sleeps idle: a window just changed.
    fn window_touched(&self) {
        if self.idle.load(Ordering::Relaxed) && self.idle.swap(false, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// Completes when a window changed while the store poll was idle (see
    /// [`Accounts::take_window_changes`]); the poll waits on it beside its tick.
    pub async fn window_changed(&self) {
        self.wake.notified().await;
    }
}

/// One user's part of a read of the others' window.
#[derive(Default)]
struct OthersRead {
    /// (requests, tokens) per second, summed over replicas.
    seconds: std::collections::BTreeMap<i64, (u64, u64)>,
    /// The replicas among them that counted the user in the last [`ACTIVE_SECS`].
    active: std::collections::HashSet<String>,
}

fn rate_limited(message: String, retry_after: i64) -> Refusal {
    Refusal::new(Reason::RateLimited, message)
        .with_retry_after(u64::try_from(retry_after).unwrap_or(1).max(1))
}

/// What the `admit` phase found.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Admission {
    /// The call was counted in the caller's rate window (it is a metered model call).
    pub counted: bool,
    /// The caller's standing against their monthly budget, when they have one.
    pub standing: Option<Standing>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn usage(n: u64) -> Usage {
        Usage {
            input_tokens: n,
            ..Usage::default()
        }
    }

    #[test]
    fn budget_refuses_once_spent_and_resets_next_month() {
        let a = Accounts::default();
        let limits = UserLimits {
            monthly_budget_usd: Some(1.0),
            ..UserLimits::default()
        };
        let t = at("2026-11-27T10:00:00Z");
        a.admit("alice", &limits, t).unwrap();
        a.complete("alice", &usage(10), Some(1.25), t, t);
        let e = a.admit("alice", &limits, t).unwrap_err();
        assert_eq!(e.reason, Reason::OverBudget);
        let standing = e.standing.unwrap();
        assert!((standing.spent_usd - 1.25).abs() < 1e-12 && standing.exhausted());
        assert_eq!(
            standing.resets_at,
            at("2026-12-01T00:00:00Z").timestamp(),
            "the budget resets with the month"
        );
        assert_eq!(e.retry_after, Some(3 * 86_400 + 14 * 3_600));
        assert!(
            e.message.contains("$1.00") && e.message.contains("$1.25"),
            "{}",
            e.message
        );
        assert!(e.message.contains("2026-12-01T00:00:00Z"), "{}", e.message);
        assert!(
            a.admit("alice", &limits, at("2026-12-01T00:00:01Z"))
                .is_ok()
        );
        assert!(a.admit("bob", &limits, t).is_ok(), "per user");
    }

    #[test]
    fn requests_per_minute_slide() {
        let a = Accounts::default();
        let limits = UserLimits {
            requests_per_minute: Some(2),
            ..UserLimits::default()
        };
        a.admit("u", &limits, at("2026-11-27T10:00:00Z")).unwrap();
        a.admit("u", &limits, at("2026-11-27T10:00:30Z")).unwrap();
        let e = a
            .admit("u", &limits, at("2026-11-27T10:00:59Z"))
            .unwrap_err();
        assert!(
            e.message.contains("2 requests per minute") && e.message.contains("Retry in 1 s"),
            "{}",
            e.message
        );
        a.admit("u", &limits, at("2026-11-27T10:01:00Z")).unwrap();
    }

    #[test]
    fn tokens_per_minute_count_finished_requests() {
        let a = Accounts::default();
        let limits = UserLimits {
            tokens_per_minute: Some(100),
            ..UserLimits::default()
        };
        let t = at("2026-11-27T10:00:00Z");
        a.admit("u", &limits, t).unwrap();
        a.complete("u", &usage(150), None, t, t);
        let e = a.admit("u", &limits, t).unwrap_err();
        assert!(e.message.contains("150 used"), "{}", e.message);
        let (_, totals) = a.month_totals("u", t);
        assert_eq!(totals.unpriced, 1);
    }

    #[test]
    fn a_long_stream_counts_its_tokens_when_it_ends_and_its_cost_in_its_own_month() {
        let a = Accounts::default();
        let limits = UserLimits {
            tokens_per_minute: Some(1000),
            monthly_budget_usd: Some(1.0),
            ..UserLimits::default()
        };
        let start = at("2026-11-30T23:58:00Z");
        let end = at("2026-12-01T00:01:30Z");
        a.admit("u", &limits, at("2026-12-01T00:00:10Z")).unwrap();
        a.complete(
            "u",
            &usage(10),
            Some(0.5),
            at("2026-12-01T00:00:10Z"),
            at("2026-12-01T00:00:20Z"),
        );
        // A stream that started in November and ran past midnight.
        a.complete("u", &usage(5000), Some(9.0), start, end);
        let e = a
            .admit("u", &limits, at("2026-12-01T00:01:31Z"))
            .unwrap_err();
        assert!(e.message.contains("tokens per minute"), "{}", e.message);
        let (month, totals) = a.month_totals("u", end);
        assert_eq!(month.to_string(), "2026-12");
        assert_eq!(totals.requests, 1, "December keeps its own total");
        assert!((totals.cost_usd - 0.5).abs() < 1e-12);
    }

    fn rpm(n: u64) -> UserLimits {
        UserLimits {
            requests_per_minute: Some(n),
            ..UserLimits::default()
        }
    }

    fn second(
        replica: &str,
        user: &str,
        sec: i64,
        requests: u64,
        tokens: u64,
    ) -> (String, WindowSecond) {
        (
            replica.to_string(),
            WindowSecond {
                user: user.to_string(),
                sec,
                requests,
                tokens,
            },
        )
    }

    #[test]
    fn the_other_replicas_seconds_count_and_slide_out_with_time() {
        let a = Accounts::default();
        let t = at("2026-11-27T10:00:30Z");
        let s = t.timestamp();
        // Long enough ago that no replica is active: no projection, just the counts.
        a.set_others_window(
            t,
            vec![
                second("b", "u", s - 20, 2, 0),
                second("c", "u", s - 20, 1, 0),
                second("b", "u", s - 10, 1, 0),
                second("b", "v", s - 10, 9, 0),
            ],
        );
        assert!(a.has_others_window(t));
        a.admit("u", &rpm(5), t).unwrap();
        let e = a.admit("u", &rpm(5), t).unwrap_err();
        assert_eq!(e.reason, Reason::RateLimited);
        // The others' oldest second (s - 20, three requests) leaves first.
        assert_eq!(e.retry_after, Some(40), "{}", e.message);
        assert!(a.admit("u", &rpm(5), at("2026-11-27T10:01:10Z")).is_ok());
        // All of it has left by a minute after the newest second, without another read.
        assert!(!a.has_others_window(at("2026-11-27T10:01:20Z")));
        assert!(a.has_others_window(at("2026-11-27T10:01:19Z")));
        let later = at("2026-11-27T10:01:21Z");
        for _ in 0..2 {
            a.admit("v", &rpm(2), later).unwrap();
        }
        assert!(a.admit("v", &rpm(2), later).is_err());
    }

    #[test]
    fn a_read_replaces_the_others_window_and_a_user_not_in_it_has_none() {
        let a = Accounts::default();
        let t = at("2026-11-27T10:00:30Z");
        let s = t.timestamp();
        a.set_others_window(t, vec![second("b", "u", s - 30, 5, 0)]);
        assert!(a.admit("u", &rpm(5), t).is_err());
        a.set_others_window(t, vec![second("b", "u", s - 30, 4, 0)]);
        assert!(a.admit("u", &rpm(5), t).is_ok(), "replaced, not added");
        a.set_others_window(t, vec![]);
        assert!(!a.has_others_window(t));
        for _ in 0..4 {
            a.admit("u", &rpm(5), t).unwrap();
        }
        assert!(a.admit("u", &rpm(5), t).is_err(), "five of its own now");
    }

    #[test]
    fn tokens_per_minute_count_the_others_tokens() {
        let a = Accounts::default();
        let t = at("2026-11-27T10:00:30Z");
        let tpm = UserLimits {
            tokens_per_minute: Some(100),
            ..UserLimits::default()
        };
        a.set_others_window(t, vec![second("b", "u", t.timestamp() - 30, 0, 80)]);
        a.admit("u", &tpm, t).unwrap();
        a.complete("u", &usage(30), None, t, t);
        let e = a.admit("u", &tpm, t).unwrap_err();
        assert!(e.message.contains("110 used"), "{}", e.message);
        assert_eq!(e.retry_after, Some(30));
    }

    #[test]
    fn changed_seconds_are_handed_over_once_per_change_with_their_figures_so_far() {
        let a = Accounts::default();
        let t = at("2026-11-27T10:00:30Z");
        let s = t.timestamp();
        assert!(a.take_window_changes(t).is_empty());
        a.admit("u", &UserLimits::default(), t).unwrap();
        a.admit("u", &UserLimits::default(), t).unwrap();
        a.complete("u", &usage(7), None, t, t);
        let want = |requests, tokens| WindowSecond {
            user: "u".into(),
            sec: s,
            requests,
            tokens,
        };
        assert_eq!(a.take_window_changes(t), [want(2, 7)]);
        assert!(a.take_window_changes(t).is_empty(), "once");
        a.admit("u", &UserLimits::default(), t).unwrap();
        assert_eq!(a.take_window_changes(t), [want(3, 7)], "the second's total");
        // A change to a second that has left the window is not worth writing.
        a.admit("u", &UserLimits::default(), t).unwrap();
        assert!(a.take_window_changes(at("2026-11-27T10:01:30Z")).is_empty());
        // A call that used no tokens changes nothing.
        a.complete("u", &Usage::default(), None, t, t);
        assert!(a.take_window_changes(t).is_empty());
    }

    #[test]
    fn a_rebuilt_window_is_handed_over_so_the_store_gets_it_afresh() {
        let now = at("2026-11-27T10:00:30Z");
        let a = Accounts::rebuild(
            Month::of(now),
            vec![],
            vec![("u".into(), now.timestamp_millis() - 10_000, 7)],
        );
        let changes = a.take_window_changes(now);
        assert_eq!(
            changes,
            [WindowSecond {
                user: "u".into(),
                sec: now.timestamp() - 10,
                requests: 1,
                tokens: 7,
            }]
        );
        // Calls from before the start are not projected onto an active replica.
        a.set_others_window(now, vec![second("b", "u", now.timestamp() - 1, 1, 0)]);
        assert!(a.admit("u", &rpm(3), now).is_ok());
        assert!(a.admit("u", &rpm(3), now).is_err());
    }

    #[test]
    fn while_others_are_active_their_unseen_admissions_are_projected_from_ours() {
        let a = Accounts::default();
        let t = at("2026-11-27T10:00:30Z");
        let s = t.timestamp();
        let limits = rpm(10);
        // Replica b counted the user a second ago: it is admitting their calls too.
        a.set_others_window(t, vec![second("b", "u", s - 1, 2, 0)]);
        a.set_others_window(t, vec![second("b", "u", s - 1, 2, 0)]);
        // 2 known of b's + 4 of ours + 4 projected for b: the limit.
        for _ in 0..4 {
            a.admit("u", &limits, t).unwrap();
        }
        let e = a.admit("u", &limits, t).unwrap_err();
        assert_eq!(
            e.retry_after,
            Some(1),
            "over only on the projection: until the next read"
        );
        // The next read shows b did nothing more: the projection still counts our calls since
        // the read before it; after another, only those since.
        a.set_others_window(t, vec![second("b", "u", s - 1, 2, 0)]);
        assert!(a.admit("u", &limits, t).is_err());
        a.set_others_window(t, vec![second("b", "u", s - 1, 2, 0)]);
        // 2 known + 4 + k ours + k projected: two more fit.
        a.admit("u", &limits, t).unwrap();
        a.admit("u", &limits, t).unwrap();
        assert_eq!(a.admit("u", &limits, t).unwrap_err().retry_after, Some(1));
        // b stopped: its seconds still count, nothing is projected for it.
        let t = at("2026-11-27T10:00:32Z");
        a.set_others_window(t, vec![second("b", "u", s - 1, 2, 0)]);
        for _ in 0..2 {
            a.admit("u", &limits, t).unwrap();
        }
        let e = a.admit("u", &limits, t).unwrap_err();
        assert_eq!(e.retry_after, Some(57), "over on the counts: {e:?}");
    }

    #[test]
    fn a_stale_read_is_not_projected_and_an_idle_replica_is_not_either() {
        let t = at("2026-11-27T10:00:30Z");
        let s = t.timestamp();
        let limits = rpm(10);
        // The store stopped answering: the last read stays, without a projection.
        let a = Accounts::default();
        a.set_others_window(t, vec![second("b", "u", s - 1, 2, 0)]);
        let later = at("2026-11-27T10:00:33Z");
        for _ in 0..8 {
            a.admit("u", &limits, later).unwrap();
        }
        assert!(a.admit("u", &limits, later).is_err());
        // A replica whose last second is older than ACTIVE_SECS admits nothing now.
        let a = Accounts::default();
        a.set_others_window(t, vec![second("b", "u", s - ACTIVE_SECS, 2, 0)]);
        for _ in 0..8 {
            a.admit("u", &limits, t).unwrap();
        }
        assert!(a.admit("u", &limits, t).is_err());
    }

    #[test]
    fn odd_seconds_from_the_store_never_panic() {
        let a = Accounts::default();
        let t = at("2026-11-27T10:00:30Z");
        let s = t.timestamp();
        a.set_others_window(
            t,
            vec![
                second("b", "u", i64::MAX, u64::MAX, u64::MAX),
                second("b", "u", i64::MIN, u64::MAX, u64::MAX),
                second("c", "u", s + 5, u64::MAX, u64::MAX),
                second("d", "u", s + 5, u64::MAX, u64::MAX),
            ],
        );
        let e = a.admit("u", &rpm(u64::MAX), t).unwrap_err();
        assert_eq!(
            e.retry_after,
            Some(65),
            "a second a little ahead still counts"
        );
        let tpm = UserLimits {
            tokens_per_minute: Some(1),
            ..UserLimits::default()
        };
        assert!(a.admit("u", &tpm, t).is_err());
        // The far-future second was dropped: nothing is left once the rest has gone.
        assert!(!a.has_others_window(at("2026-11-27T10:01:35Z")));
    }

    #[test]
    fn rebuilt_counters_keep_budget_and_window() {
        let now = at("2026-11-27T10:00:30Z");
        let a = Accounts::rebuild(
            Month::of(now),
            vec![(
                "u".into(),
                Totals {
                    requests: 3,
                    usage: usage(5),
                    cost_usd: 9.0,
                    unpriced: 0,
                },
            )],
            vec![("u".into(), now.timestamp_millis() - 10_000, 7)],
        );
        let budget = UserLimits {
            monthly_budget_usd: Some(9.0),
            ..UserLimits::default()
        };
        assert!(a.admit("u", &budget, now).is_err());
        let rpm = UserLimits {
            requests_per_minute: Some(1),
            ..UserLimits::default()
        };
        assert!(a.admit("u", &rpm, now).is_err());
        assert_eq!(Month::of(now).to_string(), "2026-11");
    }
}
