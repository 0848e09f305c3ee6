//! Per-user accounting for budgets and rate limits.
//!
//! Holds this month's totals and a sliding one-minute window per user, in memory, behind one
//! short std mutex (no await while held). Counters are rebuilt from the ledger at start, so a
//! restart is not a budget reset. Limits themselves come from the live config on every call,
//! so a changed limit applies to the next request.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Datelike, TimeZone, Utc};

use crate::call::Call;
use crate::config::{User, UserLimits};
use crate::domain::{Standing, Usage};
use crate::meter::ledger::Totals;
use crate::refusal::{Reason, Refusal};

const WINDOW_SECS: i64 = 60;

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

/// Requests and tokens per second over the last minute.
#[derive(Debug, Clone)]
struct Window {
    /// (second, requests, tokens), indexed by second mod 60.
    buckets: [(i64, u64, u64); WINDOW_SECS as usize],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            buckets: [(i64::MIN, 0, 0); WINDOW_SECS as usize],
        }
    }
}

impl Window {
    fn slot(&mut self, sec: i64) -> &mut (i64, u64, u64) {
        let b = &mut self.buckets[sec.rem_euclid(WINDOW_SECS) as usize];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    fn live(&self, now: i64) -> impl Iterator<Item = &(i64, u64, u64)> {
        self.buckets
            .iter()
            .filter(move |b| b.0 > now - WINDOW_SECS && b.0 <= now)
    }

    fn sums(&self, now: i64) -> (u64, u64) {
        self.live(now).fold((0u64, 0u64), |(r, t), b| {
            (r.saturating_add(b.1), t.saturating_add(b.2))
        })
    }

    /// Seconds until the oldest second that holds `pick` leaves the window.
    fn retry_after(&self, now: i64, pick: impl Fn(&(i64, u64, u64)) -> bool) -> i64 {
        self.live(now)
            .filter(|b| pick(b))
            .map(|b| b.0 + WINDOW_SECS - now)
            .min()
            .unwrap_or(1)
            .max(1)
    }
}

#[derive(Debug, Clone)]
struct Account {
    month: Month,
    totals: Totals,
    /// What the other replicas on the same store spent this month, as last read from it.
    others: Totals,
    window: Window,
}

impl Account {
    fn new(month: Month) -> Account {
        Account {
            month,
            totals: Totals::default(),
            others: Totals::default(),
            window: Window::default(),
        }
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
            let slot = a.window.slot(ts_ms.div_euclid(1000));
            slot.1 = slot.1.saturating_add(1);
            slot.2 = slot.2.saturating_add(toks);
        }
        Accounts {
            inner: Mutex::new(map),
        }
    }

    fn with<R>(&self, user: &str, now: DateTime<Utc>, f: impl FnOnce(&mut Account) -> R) -> R {
        let mut map = match self.inner.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
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
        self.with(user, now, |a| {
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
            let (reqs, toks) = a.window.sums(sec);
            if let Some(rpm) = limits.requests_per_minute
                && reqs >= rpm
            {
                let after = a.window.retry_after(sec, |b| b.1 > 0);
                return Err(rate_limited(
                    format!(
                        "User `{user}` is over the rate limit of {rpm} requests per minute \
                         (users.{user}.limits.requests_per_minute). Retry in {after} s."
                    ),
                    after,
                ));
            }
            if let Some(tpm) = limits.tokens_per_minute
                && toks >= tpm
            {
                let after = a.window.retry_after(sec, |b| b.2 > 0);
                return Err(rate_limited(
                    format!(
                        "User `{user}` is over the rate limit of {tpm} tokens per minute \
                         (users.{user}.limits.tokens_per_minute): {toks} used in the last minute. Retry in {after} s."
                    ),
                    after,
                ));
            }
            let slot = a.window.slot(sec);
            slot.1 = slot.1.saturating_add(1);
            Ok(standing)
        })
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
            let slot = a.window.slot(now.timestamp());
            slot.2 = slot.2.saturating_add(usage.total());
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
        })
    }

    /// This month's totals for a user.
    pub fn month_totals(&self, user: &str, now: DateTime<Utc>) -> (Month, Totals) {
        self.with(user, now, |a| (a.month, a.all()))
    }

    /// Sets what the other replicas on the store spent in `month`, per user (a user not listed
    /// spent nothing there). Read from the store about twice a second, so a budget crossed on
    /// one replica is refused by all within a second.
    pub fn set_others(&self, month: Month, others: Vec<(String, Totals)>) {
        let mut map = match self.inner.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
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
