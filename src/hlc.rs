//! Hybrid logical clock: timestamps that follow wall time but never go backwards and always
//! order a write after every write its node has seen.
//!
//! A timestamp is a `u64`: the upper 48 bits are milliseconds since the Unix epoch, the lower
//! 16 bits a logical counter. Every record carries the timestamp of the write that produced it;
//! replicas keep the record with the larger `(timestamp, owner)` pair, so concurrent writes to
//! one key converge on every node (last writer wins).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const LOGICAL_BITS: u32 = 16;

/// How long a peer whose stamps ran too far ahead stays in the report after its last one.
const AHEAD_KEPT: Duration = Duration::from_secs(60);
/// Between two warnings about the same peer's clock.
const AHEAD_WARN_EVERY: Duration = Duration::from_secs(10);

/// A node-wide hybrid logical clock. Cheap to share (`Arc`), lock-free on its hot paths.
#[derive(Debug)]
pub struct HybridClock {
    last: AtomicU64,
    /// How far ahead of this node's wall time a received stamp may move the clock, in
    /// milliseconds (`NodeConfig::max_clock_drift`; `u64::MAX`: no bound).
    max_drift_ms: u64,
    /// Test hook: this clock's wall time runs this many milliseconds ahead of the system's.
    skew_ms: u64,
    /// Peers whose stamps were refused, by name: the largest lead seen (ms), when the last
    /// one came, and when it was last logged.
    ahead: Mutex<HashMap<String, Ahead>>,
}

#[derive(Debug)]
struct Ahead {
    lead_ms: u64,
    seen: Instant,
    warned: Instant,
}

impl Default for HybridClock {
    fn default() -> Self {
        Self::with_max_drift(Duration::MAX)
    }
}

/// The system's wall time in milliseconds since the Unix epoch.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The largest wall time this process has read for expiry, in milliseconds.
static EXPIRY_WALL_MS: AtomicU64 = AtomicU64::new(0);

/// `read`, or `high` if that is later, and `high` raised to it: a wall clock that never goes
/// back.
fn never_back(read: u64, high: &AtomicU64) -> u64 {
    high.fetch_max(read, Ordering::Relaxed).max(read)
}

impl HybridClock {
    /// A clock starting at the current wall time, taking every stamp it observes.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock that does not take a stamp more than `max_drift` ahead of its wall time
    /// ([`HybridClock::observe`]; `NodeConfig::max_clock_drift`).
    pub fn with_max_drift(max_drift: Duration) -> Self {
        Self {
            last: AtomicU64::new(0),
            max_drift_ms: u64::try_from(max_drift.as_millis()).unwrap_or(u64::MAX),
            skew_ms: 0,
            ahead: Mutex::new(HashMap::new()),
        }
    }

    /// Test hook: this clock's wall time runs `ahead` of the system's.
    pub(crate) fn skewed(mut self, ahead: Duration) -> Self {
        self.skew_ms = u64::try_from(ahead.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// This clock's wall time in milliseconds.
    fn wall_ms(&self) -> u64 {
        wall_ms().saturating_add(self.skew_ms)
    }

    /// A new timestamp, larger than every timestamp this clock returned or observed.
    pub fn now(&self) -> u64 {
        let wall = self.wall_ms() << LOGICAL_BITS;
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

    /// Moves the clock past a timestamp received from another node, unless that stamp is
    /// more than the clock's maximum drift ahead of its wall time: returns whether it did.
    ///
    /// Without the bound, one node whose clock runs a day ahead would carry that day to every
    /// node it writes to (each clock keeps the largest stamp it saw), and every record written
    /// anywhere afterwards would live a day longer than its `expire_after`. A refused stamp
    /// still orders the write that carries it; it only does not move this clock. (Like
    /// CockroachDB's maximum clock offset, which refuses such a peer.)
    pub fn observe(&self, remote: u64) -> bool {
        let limit = self
            .wall_ms()
            .saturating_add(self.max_drift_ms)
            .saturating_add(1);
        if Self::millis(remote) >= limit {
            return false;
        }
        self.last.fetch_max(remote, Ordering::AcqRel);
        true
    }

    /// Observes a stamp from `peer`; one the clock refuses ([`HybridClock::observe`]) is
    /// logged (at most every 10 s per peer) and reported (`NodeStatus::clock_ahead`).
    pub(crate) fn observe_from(&self, peer: &str, remote: u64) {
        if self.observe(remote) {
            return;
        }
        let lead_ms = Self::millis(remote).saturating_sub(self.wall_ms());
        let now = Instant::now();
        let mut ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        ahead.retain(|_, a| now.duration_since(a.seen) < AHEAD_KEPT);
        let entry = ahead.entry(peer.to_string()).or_insert_with(|| Ahead {
            lead_ms,
            seen: now,
            warned: now.checked_sub(AHEAD_WARN_EVERY).unwrap_or(now),
        });
        entry.lead_ms = entry.lead_ms.max(lead_ms);
        entry.seen = now;
        if now.duration_since(entry.warned) >= AHEAD_WARN_EVERY || entry.warned == now {
            entry.warned = now;
            tracing::warn!(
                %peer,
                lead_ms,
                max_drift_ms = self.max_drift_ms,
                "a peer's clock runs ahead of ours by more than max_clock_drift; its stamps do not move our clock"
            );
        }
    }

    /// Peers whose stamps ran more than the maximum drift ahead in the last minute, with the
    /// largest lead seen, by name.
    pub(crate) fn ahead(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let ahead = self.ahead.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, Duration)> = ahead
            .iter()
            .filter(|(_, a)| now.duration_since(a.seen) < AHEAD_KEPT)
            .map(|(p, a)| (p.clone(), Duration::from_millis(a.lead_ms)))
            .collect();
        v.sort();
        v
    }

    /// Milliseconds since the Unix epoch of a timestamp.
    pub fn millis(ts: u64) -> u64 {
        ts >> LOGICAL_BITS
    }

    /// The smallest timestamp of a write made less than `age_ms` milliseconds ago by this
    /// node's wall clock: records stamped before it have expired in a table whose records live
    /// `age_ms` (`TableOptions::expire_after`).
    ///
    /// The wall time it reads never goes back within the process: a record found expired
    /// stays expired when the system clock is stepped back (NTP, an operator), instead of
    /// being read again until the sweep removes it.
    pub(crate) fn written_since(age_ms: u64) -> u64 {
        let now_ms = never_back(wall_ms(), &EXPIRY_WALL_MS);
        // A write of millisecond `now - age_ms` is `age_ms` old: expired already.
        (now_ms.saturating_sub(age_ms) + 1) << LOGICAL_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_expires_when_its_age_reaches_the_lifetime() {
        let now_ms = wall_ms();
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
    fn a_stamp_too_far_ahead_does_not_move_the_clock() {
        let c = HybridClock::with_max_drift(Duration::from_secs(1));
        let now_ms = HybridClock::millis(c.now());
        assert!(
            c.observe((now_ms + 500) << LOGICAL_BITS),
            "within the bound"
        );
        assert!(c.now() > (now_ms + 500) << LOGICAL_BITS);
        let day = (now_ms + 86_400_000) << LOGICAL_BITS;
        assert!(!c.observe(day), "a day ahead");
        assert!(c.now() < day);
        c.observe_from("fast", day);
        let ahead = c.ahead();
        assert_eq!(ahead.len(), 1);
        assert_eq!(ahead[0].0, "fast");
        assert!(ahead[0].1 > Duration::from_secs(86_000));
    }

    #[test]
    fn the_expiry_clock_never_goes_back() {
        let high = AtomicU64::new(0);
        assert_eq!(never_back(1_000, &high), 1_000);
        assert_eq!(never_back(400, &high), 1_000, "a step back is not taken");
        assert_eq!(never_back(1_200, &high), 1_200);
    }

    #[test]
    fn a_stamp_at_the_end_of_time_does_not_wrap_the_clock() {
        let c = HybridClock::new();
        assert!(c.observe(u64::MAX));
        assert_eq!(c.now(), u64::MAX);
        assert_eq!(c.now(), u64::MAX);
    }
}
