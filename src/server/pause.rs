//! The participant's pause (ALGORITHM.md, sections 9.2 step 2 and 9.3): which join holds this
//! table, until when, and the pause requests waiting for the pending batches.
//!
//! Invariants kept here:
//! - at most one join holds the pause, and a pause request of another join is answered `Busy`;
//! - a join whose pause ended (the last [`RELEASED_KEPT`]) never pauses the table again, so a
//!   late renewal or a pause request queued behind the unpause is refused;
//! - the waiting pause requests belong to the current pause: ending it drops them;
//! - the peers whose pause requests were refused `Busy` are remembered, one request each (so as
//!   many as there are links), until the pause ends and they are told (`server::join_wake`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Origin;
use crate::membership::NodeId;

/// How many ended joins are remembered.
const RELEASED_KEPT: usize = 64;

/// The join holding the pause.
pub(super) struct Pause {
    pub(super) join: u64,
    pub(super) coordinator: NodeId,
    pub(super) deadline: Instant,
    /// The lease the coordinator asked for (bounded): every step of its join that arrives
    /// here (a dump request, an applied chunk) renews it (`PauseState::renew`).
    pub(super) lease: Duration,
    /// The table's dump was sent for this join: a join asks each node once, and a second
    /// request would queue another copy of the table.
    pub(super) dumped: bool,
    /// Records of this join were stored here, and its member list has not arrived yet: if the
    /// join ends now, those of nodes that did not become members are dropped (`drop_outsiders`).
    pub(super) applied: bool,
    /// The owners whose records this join carries (its dump request's `alive`, an exchange's
    /// merge list): the join's nodes and the linked nodes outside it that it keeps
    /// (`crate::authority::kept_outsiders`). Their records stay when the join ends.
    pub(super) carried: Vec<NodeId>,
}

/// What a pause request found.
pub(super) enum Begin {
    /// This join's pause already ended: refused.
    Released,
    /// Another join holds the pause, coordinated by the node of this name.
    Busy(String),
    /// This join held the pause already: its lease is renewed.
    Renewed,
    /// The table is now paused for this join.
    Paused,
}

/// The pause of a table server and what it remembers of ended ones.
pub(super) struct PauseState<K, V> {
    current: Option<Pause>,
    /// Joins whose pause ended (unpaused, lease expired, coordinator gone).
    released: VecDeque<u64>,
    /// Pause requests answered once the pending batches are acknowledged.
    waiters: Vec<Origin<K, V>>,
    /// Peers (and their requests) refused `Busy` by the current pause: told when it ends.
    refused: Vec<(crate::membership::OwnerIdx, u64)>,
}

impl<K, V> PauseState<K, V> {
    pub(super) fn new() -> Self {
        Self {
            current: None,
            released: VecDeque::new(),
            waiters: Vec::new(),
            refused: Vec::new(),
        }
    }

    pub(super) fn is_paused(&self) -> bool {
        self.current.is_some()
    }

    pub(super) fn current(&self) -> Option<&Pause> {
        self.current.as_ref()
    }

    pub(super) fn current_mut(&mut self) -> Option<&mut Pause> {
        self.current.as_mut()
    }

    /// Whether `join` holds the pause.
    pub(super) fn by(&self, join: u64) -> bool {
        self.current.as_ref().is_some_and(|p| p.join == join)
    }

    /// Whether the node `id` coordinates the join holding the pause.
    pub(super) fn coordinated_by(&self, id: &NodeId) -> bool {
        self.current.as_ref().is_some_and(|p| &p.coordinator == id)
    }

    /// Whether the pause's lease ran out before `now`.
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|p| now > p.deadline)
    }

    /// A step of the join holding the pause arrived: its lease runs again from now.
    pub(super) fn renew(&mut self) {
        if let Some(p) = self.current.as_mut() {
            p.deadline = Instant::now() + p.lease;
        }
    }

    /// A pause request of `join` from `coordinator` with this lease.
    pub(super) fn begin(&mut self, join: u64, coordinator: NodeId, lease: Duration) -> Begin {
        let deadline = Instant::now() + lease;
        if self.released.contains(&join) {
            return Begin::Released;
        }
        match &mut self.current {
            Some(p) if p.join != join => Begin::Busy(p.coordinator.name.clone()),
            Some(p) => {
                p.deadline = deadline;
                p.lease = lease;
                Begin::Renewed
            }
            None => {
                tracing::debug!(%coordinator, join, "paused for a join");
                self.current = Some(Pause {
                    join,
                    coordinator,
                    deadline,
                    lease,
                    dumped: false,
                    applied: false,
                    carried: Vec::new(),
                });
                Begin::Paused
            }
        }
    }

    /// Answers this pause request once the pending batches are acknowledged.
    pub(super) fn wait(&mut self, origin: Origin<K, V>) {
        self.waiters.push(origin);
    }

    /// The pause requests waiting, taken.
    pub(super) fn take_waiters(&mut self) -> Vec<Origin<K, V>> {
        std::mem::take(&mut self.waiters)
    }

    pub(super) fn has_waiters(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// Forgets the pause requests that came from the peer `key` (it went down).
    pub(super) fn forget_waiters_of(&mut self, key: crate::membership::OwnerIdx) {
        self.waiters
            .retain(|o| !matches!(o, Origin::Peer(k, _) if *k == key));
        self.refused.retain(|(k, _)| *k != key);
    }

    /// The pause request `req` of the peer `key` was refused `Busy`: the peer hears when the
    /// pause ends. Only its latest request is kept.
    pub(super) fn note_refused(&mut self, key: crate::membership::OwnerIdx, req: u64) {
        self.refused.retain(|(k, _)| *k != key);
        self.refused.push((key, req));
    }

    /// The peers refused `Busy` (with their requests), taken.
    pub(super) fn take_refused(&mut self) -> Vec<(crate::membership::OwnerIdx, u64)> {
        std::mem::take(&mut self.refused)
    }

    /// Ends the pause, if any, and returns it; its join is remembered as released and the
    /// waiting requests are dropped.
    pub(super) fn end(&mut self) -> Option<Pause> {
        let p = self.current.take();
        if let Some(p) = &p {
            self.remember_released(p.join);
        }
        self.waiters.clear();
        p
    }

    /// Joins whose pause ended (the last [`RELEASED_KEPT`]): a late pause or renewal of one is
    /// refused.
    pub(super) fn remember_released(&mut self, join: u64) {
        if !self.released.contains(&join) {
            self.released.push_back(join);
            if self.released.len() > RELEASED_KEPT {
                self.released.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            incarnation: 1,
        }
    }

    const LEASE: Duration = Duration::from_secs(5);

    #[test]
    fn one_join_holds_the_pause_and_an_ended_one_never_pauses_again() {
        let mut s: PauseState<u64, u64> = PauseState::new();
        assert!(matches!(s.begin(1, node("a"), LEASE), Begin::Paused));
        assert!(s.is_paused() && s.by(1) && !s.by(2));
        assert!(s.coordinated_by(&node("a")) && !s.coordinated_by(&node("b")));
        assert!(matches!(s.begin(1, node("a"), LEASE), Begin::Renewed));
        assert!(matches!(s.begin(2, node("b"), LEASE), Begin::Busy(by) if by == "a"));
        s.wait(Origin::Peer(7, 1));
        assert!(s.has_waiters());
        let ended = s.end();
        assert!(ended.is_some_and(|p| p.join == 1));
        assert!(!s.is_paused() && !s.has_waiters());
        assert!(matches!(s.begin(1, node("a"), LEASE), Begin::Released));
        assert!(matches!(s.begin(2, node("b"), LEASE), Begin::Paused));
    }

    #[test]
    fn an_unpause_that_came_first_refuses_the_pause_and_the_memory_is_bounded() {
        let mut s: PauseState<u64, u64> = PauseState::new();
        s.remember_released(9);
        assert!(matches!(s.begin(9, node("a"), LEASE), Begin::Released));
        for j in 100..100 + RELEASED_KEPT as u64 {
            s.remember_released(j);
        }
        assert_eq!(s.released.len(), RELEASED_KEPT);
        assert!(matches!(s.begin(9, node("a"), LEASE), Begin::Paused));
    }

    #[test]
    fn the_lease_expires_unless_renewed_and_waiters_of_a_gone_peer_are_forgotten() {
        let mut s: PauseState<u64, u64> = PauseState::new();
        assert!(!s.expired(Instant::now()));
        assert!(matches!(s.begin(1, node("a"), LEASE), Begin::Paused));
        assert!(!s.expired(Instant::now()));
        assert!(s.expired(Instant::now() + 2 * LEASE));
        s.renew();
        assert!(s.current().is_some_and(|p| p.deadline > Instant::now()));
        s.wait(Origin::Peer(3, 1));
        s.wait(Origin::Peer(4, 1));
        s.note_refused(3, 5);
        s.note_refused(4, 6);
        s.note_refused(4, 7);
        s.forget_waiters_of(3);
        let left = s.take_waiters();
        assert!(matches!(left.as_slice(), [Origin::Peer(4, 1)]));
        assert_eq!(
            s.take_refused(),
            vec![(4, 7)],
            "one request per peer, the latest"
        );
        assert!(s.take_refused().is_empty());
    }
}
