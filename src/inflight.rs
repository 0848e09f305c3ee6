//! The bytes of request bodies the proxy holds at once, across all requests
//! (`limits.max_inflight_body_bytes`).
//!
//! Every body is buffered whole (SigV4 signs its hash), so without a bound many concurrent
//! uploads just under `limits.max_body_bytes` (CountTokens and profile reads skip the rate
//! limits) pin N × that in memory. A request reserves its `Content-Length` before a byte of the
//! body is read, or grows its reservation chunk by chunk when it sent none; a request that
//! does not fit is refused with 503 unread. The reservation travels with the body
//! ([`crate::upstream::payload::Payload`]) and ends when the last copy of it is dropped, after
//! it was sent upstream.
//!
//! Nothing here reads a body or builds a response.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::refusal::{Reason, Refusal};

/// How many body bytes are reserved right now.
#[derive(Debug, Default)]
pub struct BodyBudget {
    used: AtomicU64,
}

impl BodyBudget {
    /// Bytes reserved by requests in flight.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64, limit: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= limit)
            })
            .is_ok()
    }
}

/// One request's share of the budget, given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyBudget>,
    bytes: u64,
    limit: u64,
}

impl Reservation {
    /// Reserves `bytes` (the body's declared length; 0 when unknown) of `limit`, or refuses.
    pub fn new(budget: &Arc<BodyBudget>, bytes: u64, limit: u64) -> Result<Reservation, Refusal> {
        if !budget.take(bytes, limit) {
            return Err(busy(limit));
        }
        Ok(Reservation {
            budget: budget.clone(),
            bytes,
            limit,
        })
    }

    /// Makes the reservation cover `total` bytes (a body without a length, growing as it
    /// arrives), or refuses.
    pub fn cover(&mut self, total: u64) -> Result<(), Refusal> {
        if total <= self.bytes {
            return Ok(());
        }
        let more = total - self.bytes;
        if !self.budget.take(more, self.limit) {
            return Err(busy(self.limit));
        }
        self.bytes = total;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Seconds a refused upload is told to wait: bodies in flight are gone within a call or two.
const RETRY_AFTER_SECS: u64 = 1;

fn busy(limit: u64) -> Refusal {
    Refusal::new(
        Reason::Overloaded,
        format!(
            "bedrock-gate is holding as many request bodies as it may at once ({limit} bytes across \
             all requests, limits.max_inflight_body_bytes); retry in a moment."
        ),
    )
    .with_retry_after(RETRY_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_limit_and_give_back_on_drop() {
        let budget = Arc::new(BodyBudget::default());
        let a = Reservation::new(&budget, 60, 100).unwrap();
        assert_eq!(
            Reservation::new(&budget, 50, 100).unwrap_err().reason,
            Reason::Overloaded
        );
        let mut b = Reservation::new(&budget, 0, 100).unwrap();
        b.cover(40).unwrap();
        assert!(b.cover(41).is_err());
        assert_eq!(budget.used(), 100);
        drop(a);
        b.cover(90).unwrap();
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
