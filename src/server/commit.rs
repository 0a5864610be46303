//! Group commit, the sender's state (ALGORITHM.md, section 6.2): the sequence number of this
//! server's batches and the batches sent but not yet acknowledged by every member they went to.
//!
//! Invariants kept here:
//! - every replicated batch takes the next sequence number (`next_seq`), so a member's
//!   cumulative `Ack { seq }` acknowledges every batch up to it;
//! - the pending batches are in sequence order, and complete in that order (`pop_done`): a
//!   caller never hears its write succeeded before an earlier caller's.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::membership::OwnerIdx;
use crate::Result;

/// A batch sent to the members, waiting for their acknowledgements.
pub(super) struct Pending {
    pub(super) seq: u64,
    /// When the batch was queued to the members (`cets_ack_latency_seconds`).
    pub(super) sent: Instant,
    pub(super) replies: Vec<oneshot::Sender<Result<()>>>,
    pub(super) waiting: Vec<OwnerIdx>,
    pub(super) deadline: Instant,
}

/// The batches of a table server.
pub(super) struct GroupCommit {
    /// The sequence number of the last batch sent.
    seq: u64,
    pending: VecDeque<Pending>,
}

impl GroupCommit {
    pub(super) fn new() -> Self {
        Self {
            seq: 0,
            pending: VecDeque::new(),
        }
    }

    /// The sequence number of the last batch sent (0: none yet).
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// The sequence number of the next batch, taken.
    pub(super) fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Batches sent and not yet complete.
    pub(super) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Whether every batch sent is complete.
    pub(super) fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// A batch just sent (the one numbered last).
    pub(super) fn push(&mut self, p: Pending) {
        self.pending.push_back(p);
    }

    /// The oldest batch, if `done` says it is complete.
    pub(super) fn pop_done(&mut self, done: impl Fn(&Pending) -> bool) -> Option<Pending> {
        if self.pending.front().is_some_and(done) {
            self.pending.pop_front()
        } else {
            None
        }
    }

    /// The oldest batches whose deadline passed before `now`, taken.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<Pending> {
        let mut expired = Vec::new();
        while self.pending.front().is_some_and(|p| now > p.deadline) {
            if let Some(p) = self.pending.pop_front() {
                expired.push(p);
            }
        }
        expired
    }

    /// The members some batch still waits for.
    pub(super) fn waiting(&self) -> impl Iterator<Item = OwnerIdx> + '_ {
        self.pending.iter().flat_map(|p| p.waiting.iter().copied())
    }

    /// The oldest pending batch that `f` selects.
    pub(super) fn oldest_for(&self, f: impl Fn(&Pending) -> bool) -> Option<&Pending> {
        self.pending.iter().find(|p| f(p))
    }

    /// Every pending batch, taken (the server stops).
    pub(super) fn take_all(&mut self) -> Vec<Pending> {
        self.pending.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn batch(seq: u64, waiting: Vec<OwnerIdx>, deadline: Instant) -> Pending {
        Pending {
            seq,
            sent: Instant::now(),
            replies: Vec::new(),
            waiting,
            deadline,
        }
    }

    #[test]
    fn batches_are_numbered_in_turn_and_complete_in_order() {
        let mut c = GroupCommit::new();
        assert_eq!(c.seq(), 0);
        let later = Instant::now() + Duration::from_secs(60);
        for _ in 0..3 {
            let seq = c.next_seq();
            c.push(batch(seq, vec![seq as OwnerIdx], later));
        }
        assert_eq!((c.seq(), c.in_flight()), (3, 3));
        // Batch 2 is acknowledged, batch 1 is not: nothing completes.
        assert!(c.pop_done(|p| p.seq == 2).is_none());
        assert!(c.pop_done(|p| p.seq <= 2).is_some_and(|p| p.seq == 1));
        assert!(c.pop_done(|p| p.seq <= 2).is_some_and(|p| p.seq == 2));
        assert!(c.pop_done(|p| p.seq <= 2).is_none());
        assert_eq!(c.waiting().collect::<Vec<_>>(), vec![3]);
        assert!(c.oldest_for(|p| p.waiting.contains(&3)).is_some());
        assert_eq!(c.take_all().len(), 1);
        assert!(c.is_idle());
        assert_eq!(c.next_seq(), 4, "numbers are never reused");
    }

    #[test]
    fn only_the_oldest_batches_past_their_deadline_expire() {
        let mut c = GroupCommit::new();
        let now = Instant::now();
        let (past, later) = (now, now + Duration::from_secs(60));
        for deadline in [past, later, past] {
            let seq = c.next_seq();
            c.push(batch(seq, Vec::new(), deadline));
        }
        let expired = c.expired(now + Duration::from_millis(1));
        assert_eq!(expired.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(c.in_flight(), 2);
    }
}
