//! Hybrid logical clock: timestamps that follow wall time but never go backwards and always
//! order a write after every write its node has seen.
//!
//! A timestamp is a `u64`: the upper 48 bits are milliseconds since the Unix epoch, the lower
//! 16 bits a logical counter. Every record carries the timestamp of the write that produced it;
//! replicas keep the record with the larger `(timestamp, owner)` pair, so concurrent writes to
//! one key converge on every node (last writer wins).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const LOGICAL_BITS: u32 = 16;

/// A node-wide hybrid logical clock. Cheap to share (`Arc`), lock-free.
#[derive(Debug, Default)]
pub struct HybridClock {
    last: AtomicU64,
}

fn wall() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms << LOGICAL_BITS
}

impl HybridClock {
    /// A clock starting at the current wall time.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new timestamp, larger than every timestamp this clock returned or observed.
    pub fn now(&self) -> u64 {
        let wall = wall();
        let mut cur = self.last.load(Ordering::Relaxed);
        loop {
            // Saturating: a peer's stamp near `u64::MAX` (a bug, or a hostile peer) must not
            // wrap the clock back to zero; the clock then stays there and ties go by owner.
            let next = if wall > cur {
                wall
            } else {
                cur.saturating_add(1)
            };
            match self
                .last
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Moves the clock past a timestamp received from another node.
    pub fn observe(&self, remote: u64) {
        self.last.fetch_max(remote, Ordering::AcqRel);
    }

    /// Milliseconds since the Unix epoch of a timestamp.
    pub fn millis(ts: u64) -> u64 {
        ts >> LOGICAL_BITS
    }

    /// The smallest timestamp of a write made less than `age_ms` milliseconds ago by this
    /// node's wall clock: records stamped before it have expired in a table whose records live
    /// `age_ms` (`TableOptions::expire_after`).
    pub(crate) fn written_since(age_ms: u64) -> u64 {
        // A write of millisecond `now - age_ms` is `age_ms` old: expired already.
        ((wall() >> LOGICAL_BITS).saturating_sub(age_ms) + 1) << LOGICAL_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_expires_when_its_age_reaches_the_lifetime() {
        let now_ms = HybridClock::millis(wall());
        let from = HybridClock::written_since(1000);
        let written_at = |ms: u64| ms << LOGICAL_BITS;
        assert!(written_at(now_ms - 1000) < from, "1000 ms old: expired");
        // (The clock may tick between the two reads: 10 ms of room.)
        assert!(written_at(now_ms - 990) >= from, "990 ms old: live");
    }

    #[test]
    fn monotonic_and_after_observed() {
        let c = HybridClock::new();
        let a = c.now();
        let b = c.now();
        assert!(b > a);
        c.observe(b + (1000 << LOGICAL_BITS));
        assert!(c.now() > b + (1000 << LOGICAL_BITS));
    }

    #[test]
    fn a_stamp_at_the_end_of_time_does_not_wrap_the_clock() {
        let c = HybridClock::new();
        c.observe(u64::MAX);
        assert_eq!(c.now(), u64::MAX);
        assert_eq!(c.now(), u64::MAX);
    }
}
