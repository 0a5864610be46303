//! The join coordinator's bookkeeping on its table server (ALGORITHM.md, sections 9.1 and 9.2):
//! the requests a coordinator sent to peers, waiting for their replies, and per peer whether a
//! join with it runs and when the next may start.
//!
//! Invariants kept here:
//! - at most one join runs with a peer, and after a failure the next waits
//!   `join_backoff · 2^failures` (capped at `join_max_backoff`, times a random factor between a
//!   half and one and a half);
//! - a reply counts only from the peer its request went to, and the replies to one request
//!   other than a dump come to at most `max_link_queue_bytes` (past that the request is
//!   refused and forgotten); a request whose coordinator gave up is forgotten at its next
//!   reply;
//! - request numbers start at 1: request 0 is never awaited (the lease's renewals use it);
//! - a join refused `Busy` by a pause waits for the end of a pause (a wake, `wake`), not for
//!   its back-off: a wake since it started, or the next one, makes it due at once; the back-off
//!   still runs in case no wake comes (ALGORITHM.md, section 20).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::membership::OwnerIdx;
use crate::proto::JoinRep;
use crate::Error;

/// A join request sent to a peer, waiting for its replies.
struct Awaited<K, V> {
    /// The peer it went to: only its replies count.
    from: OwnerIdx,
    tx: mpsc::UnboundedSender<JoinRep<K, V>>,
    /// Frame bytes of the replies so far (a dump comes in many chunks).
    bytes: usize,
    /// A `Dump` request: its replies are bounded by the coordinator (`crate::join`), in
    /// records, not here in bytes.
    dump: bool,
}

/// Joins with one peer coordinated here.
#[derive(Default)]
struct JoinTrack {
    running: bool,
    failures: u32,
    next: Option<Instant>,
    /// The last attempt was refused `Busy`: the next wake makes it due at once.
    blocked: bool,
    /// `Joins::wakes` when the running attempt started.
    wakes_at_start: u64,
}

/// What became of a reply to a join request.
pub(super) enum Reply {
    /// Not awaited from this peer: dropped.
    Ignored,
    /// Passed on to the coordinator.
    Delivered,
    /// The replies to its request passed the bound (this many bytes): the request is refused.
    Overflow(usize),
}

/// The coordinator's side of the joins of a table server.
pub(super) struct Joins<K, V> {
    awaited: HashMap<u64, Awaited<K, V>>,
    next_req: u64,
    tracks: HashMap<OwnerIdx, JoinTrack>,
    /// Conflicting keys found by the joins coordinated here (`TableStatus::conflicts`).
    conflicts: u64,
    /// Pauses seen to end (`wake`), here or at a node that had refused a join of ours.
    wakes: u64,
}

impl<K, V> Joins<K, V> {
    pub(super) fn new() -> Self {
        Self {
            awaited: HashMap::new(),
            next_req: 0,
            tracks: HashMap::new(),
            conflicts: 0,
            wakes: 0,
        }
    }

    pub(super) fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// Numbers a request to the peer `from` whose replies go to `tx` (`dump`: a `Dump`
    /// request).
    pub(super) fn send(
        &mut self,
        from: OwnerIdx,
        tx: mpsc::UnboundedSender<JoinRep<K, V>>,
        dump: bool,
    ) -> u64 {
        self.next_req += 1;
        let req = self.next_req;
        let bytes = 0;
        self.awaited.insert(
            req,
            Awaited {
                from,
                tx,
                bytes,
                dump,
            },
        );
        req
    }

    /// A reply of `from` to request `req`, in a frame of `size` bytes; `max` bounds the bytes
    /// of the replies to one request.
    pub(super) fn reply(
        &mut self,
        from: OwnerIdx,
        req: u64,
        body: JoinRep<K, V>,
        size: usize,
        max: usize,
    ) -> Reply {
        // Only the node the request went to answers it: a reply from another peer (request
        // numbers are easy to guess) must not end that request.
        let Some(awaited) = self.awaited.get_mut(&req).filter(|a| a.from == from) else {
            return Reply::Ignored;
        };
        // Replies to one request other than a dump come to at most the peer's outbound queue;
        // more is a peer's fault, and holding them would let it grow this node's memory without
        // end. A dump streams as the source's queue drains, and is bounded by the coordinator in
        // records (`crate::join`): once the coordinator gave up on it, the rest is dropped here.
        awaited.bytes = awaited.bytes.saturating_add(size);
        if awaited.tx.is_closed() {
            self.awaited.remove(&req);
            return Reply::Ignored;
        }
        if !awaited.dump && awaited.bytes > max {
            let bytes = awaited.bytes;
            let reason = "its reply passed max_link_queue_bytes".to_string();
            let _ = awaited.tx.send(JoinRep::Refused { reason });
            self.awaited.remove(&req);
            return Reply::Overflow(bytes);
        }
        let last = !matches!(
            body,
            JoinRep::Chunk { last: false, .. } | JoinRep::Tombstones { .. }
        );
        let _ = awaited.tx.send(body);
        if last {
            self.awaited.remove(&req);
        }
        Reply::Delivered
    }

    /// Requests whose coordinator gave up (its join ended) wait for no reply any more.
    pub(super) fn drop_abandoned(&mut self) {
        self.awaited.retain(|_, a| !a.tx.is_closed());
    }

    /// The peer `key` went down: nothing is awaited from it, and its back-off starts over.
    pub(super) fn forget(&mut self, key: OwnerIdx) {
        self.awaited.retain(|_, a| a.from != key);
        self.tracks.remove(&key);
    }

    /// The peers some request waits for.
    pub(super) fn awaited_from(&self) -> impl Iterator<Item = OwnerIdx> + '_ {
        self.awaited.values().map(|a| a.from)
    }

    /// The peers a join coordinated here runs with.
    pub(super) fn running(&self) -> impl Iterator<Item = OwnerIdx> + '_ {
        self.tracks
            .iter()
            .filter(|(_, t)| t.running)
            .map(|(k, _)| *k)
    }

    /// Forgets the back-off of `key` (its owner index is released).
    pub(super) fn forget_track(&mut self, key: OwnerIdx) {
        self.tracks.remove(&key);
    }

    /// Marks a join with `key` as running if none runs and its back-off has passed; whether it
    /// did.
    pub(super) fn start(&mut self, key: OwnerIdx) -> bool {
        let track = self.tracks.entry(key).or_default();
        if track.running || track.next.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        track.running = true;
        track.wakes_at_start = self.wakes;
        true
    }

    /// A pause ended (here, or at a node that refused a join of ours): the joins refused
    /// `Busy` are due at once; returns their peers. A join running now that is refused `Busy`
    /// later is due at once too (`done`): the pause that refused it may have ended already.
    pub(super) fn wake(&mut self) -> Vec<OwnerIdx> {
        self.wakes += 1;
        let mut due = Vec::new();
        for (key, t) in self.tracks.iter_mut() {
            if t.blocked && !t.running {
                t.blocked = false;
                t.next = None;
                due.push(*key);
            }
        }
        due
    }

    /// The join with `key` (named `name` in the logs) ended with `result`: its conflicts are
    /// counted, or the next attempt backs off from `base` up to `max`; one refused `Busy`
    /// (`busy`) waits for the next wake instead, or none if a wake came since it started.
    pub(super) fn done(
        &mut self,
        key: OwnerIdx,
        name: &str,
        result: Result<u64, Error>,
        busy: bool,
        (base, max): (Duration, Duration),
    ) {
        let track = self.tracks.entry(key).or_default();
        track.running = false;
        track.blocked = false;
        match result {
            Ok(conflicts) => {
                track.failures = 0;
                track.next = None;
                self.conflicts += conflicts;
            }
            Err(e) if busy && self.wakes > track.wakes_at_start => {
                track.failures = track.failures.saturating_add(1);
                track.next = None;
                tracing::debug!(peer = %name, error = %e, "join refused by a pause that has ended since; retrying at once");
            }
            Err(e) => {
                track.failures = track.failures.saturating_add(1);
                let exp = base.saturating_mul(1u32 << track.failures.min(16)).min(max);
                let jitter = rand::random_range(0.5..1.5);
                // Saturating: a back-off of `Duration::MAX` means "do not retry".
                let wait = Duration::try_from_secs_f64(exp.as_secs_f64() * jitter).unwrap_or(exp);
                track.next = Some(crate::config::deadline_after(wait));
                track.blocked = busy;
                if track.failures >= 3 {
                    tracing::warn!(peer = %name, error = %e, failures = track.failures, "join failed; retrying");
                } else {
                    tracing::debug!(peer = %name, error = %e, "join failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(last: bool) -> JoinRep<u64, u64> {
        JoinRep::Chunk {
            owners: Vec::new(),
            records: Vec::new(),
            last,
        }
    }

    #[test]
    fn replies_count_only_from_the_peer_asked_and_end_with_the_last() {
        let mut j: Joins<u64, u64> = Joins::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let req = j.send(5, tx, false);
        assert_eq!(req, 1, "request 0 is never awaited");
        assert!(matches!(
            j.reply(6, req, chunk(false), 10, 100),
            Reply::Ignored
        ));
        assert!(matches!(
            j.reply(5, req, chunk(false), 10, 100),
            Reply::Delivered
        ));
        assert!(matches!(
            j.reply(5, req, chunk(true), 10, 100),
            Reply::Delivered
        ));
        assert!(matches!(
            j.reply(5, req, chunk(true), 10, 100),
            Reply::Ignored
        ));
        assert!(matches!(
            rx.try_recv(),
            Ok(JoinRep::Chunk { last: false, .. })
        ));
        assert!(matches!(
            rx.try_recv(),
            Ok(JoinRep::Chunk { last: true, .. })
        ));
        assert_eq!(j.awaited_from().count(), 0);
    }

    #[test]
    fn replies_past_the_bound_refuse_the_request() {
        let mut j: Joins<u64, u64> = Joins::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let req = j.send(5, tx, false);
        assert!(matches!(
            j.reply(5, req, chunk(false), 60, 100),
            Reply::Delivered
        ));
        assert!(matches!(
            j.reply(5, req, chunk(false), 60, 100),
            Reply::Overflow(120)
        ));
        assert!(matches!(rx.try_recv(), Ok(JoinRep::Chunk { .. })));
        assert!(matches!(rx.try_recv(), Ok(JoinRep::Refused { .. })));
        assert_eq!(j.awaited_from().count(), 0);
    }

    #[test]
    fn a_dump_is_not_bounded_in_bytes_here_and_a_dropped_coordinator_ends_it() {
        let mut j: Joins<u64, u64> = Joins::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let req = j.send(5, tx, true);
        assert!(matches!(
            j.reply(5, req, chunk(false), 600, 100),
            Reply::Delivered
        ));
        assert!(matches!(
            j.reply(5, req, chunk(false), 600, 100),
            Reply::Delivered
        ));
        drop(rx);
        assert!(matches!(
            j.reply(5, req, chunk(false), 1, 100),
            Reply::Ignored
        ));
        assert_eq!(j.awaited_from().count(), 0);
    }

    #[test]
    fn one_join_per_peer_and_a_failure_backs_off() {
        let mut j: Joins<u64, u64> = Joins::new();
        assert!(j.start(5));
        assert!(!j.start(5), "a join with 5 runs");
        assert_eq!(j.running().collect::<Vec<_>>(), vec![5]);
        j.done(5, "b", Ok(3), false, (Duration::ZERO, Duration::ZERO));
        assert_eq!(j.conflicts(), 3);
        assert!(j.start(5));
        let hour = Duration::from_secs(3600);
        j.done(5, "b", Err(Error::Shutdown), false, (hour, hour));
        assert!(!j.start(5), "backing off");
        j.forget(5);
        assert!(j.start(5), "a peer that went down starts over");
    }

    #[test]
    fn a_join_refused_busy_is_due_at_the_next_wake_or_at_once_after_one() {
        let mut j: Joins<u64, u64> = Joins::new();
        let hour = Duration::from_secs(3600);
        let busy = || Err(Error::Shutdown);
        // Refused busy, no wake since it started: waits for one.
        assert!(j.start(5));
        j.done(5, "b", busy(), true, (hour, hour));
        assert!(!j.start(5), "backing off until a wake");
        // Another failure is no reason to wake: 6 backs off its hour.
        assert!(j.start(6));
        j.done(6, "c", busy(), false, (hour, hour));
        assert_eq!(j.wake(), vec![5]);
        assert!(!j.start(6), "only a join refused busy wakes");
        assert!(j.start(5), "woken");
        // A wake while it runs: refused busy afterwards, it is due at once.
        j.wake();
        j.done(5, "b", busy(), true, (hour, hour));
        assert!(j.start(5), "the pause that refused it ended already");
        // But not for a wake that came before it started.
        j.done(5, "b", busy(), true, (hour, hour));
        assert!(!j.start(5));
        assert_eq!(j.wake(), vec![5]);
        assert!(j.wake().is_empty(), "woken once");
    }

    #[test]
    fn abandoned_requests_and_a_gone_peer_are_forgotten() {
        let mut j: Joins<u64, u64> = Joins::new();
        let (tx, rx) = mpsc::unbounded_channel();
        j.send(5, tx, false);
        let (tx2, _rx2) = mpsc::unbounded_channel();
        j.send(6, tx2, false);
        drop(rx);
        j.drop_abandoned();
        assert_eq!(j.awaited_from().collect::<Vec<_>>(), vec![6]);
        j.forget(6);
        assert_eq!(j.awaited_from().count(), 0);
    }
}
