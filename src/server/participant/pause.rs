//! `JoinReq::Pause`, step 2 of a join (ALGORITHM.md, sections 9.2 and 9.3): the pause is a
//! lease of the coordinator's, renewed by the same request and by the join's own progress.

use crate::server::*;

/// The longest pause a join coordinator's lease holds this table for without a renewal; a
/// longer lease from a peer is cut to this.
const MAX_PAUSE_LEASE: Duration = Duration::from_secs(60);

impl<K: Key, V: Value> Server<K, V> {
    /// Step 2: pauses for `join` (or renews its lease), answering once the pending batches are
    /// acknowledged; `Busy` while another join holds the pause.
    pub(super) fn on_pause(&mut self, origin: Origin<K, V>, join: u64, lease_ms: u64) {
        let Some(coordinator) = self.origin_id(&origin) else {
            return;
        };
        // The coordinator's lease, up to a bound: a peer cannot pause this table for
        // longer than `MAX_PAUSE_LEASE` without renewing.
        let lease = Duration::from_millis(lease_ms).min(MAX_PAUSE_LEASE);
        match self.pause.begin(join, coordinator, lease) {
            pause::Begin::Released => self.refuse(origin, "this join's pause already ended"),
            pause::Begin::Busy(by) => {
                if let Origin::Peer(key, req) = origin {
                    self.pause.note_refused(key, req);
                }
                self.reply(origin, JoinRep::Busy { by });
            }
            pause::Begin::Renewed => {
                let rep = self.paused_reply();
                self.reply(origin, rep);
            }
            pause::Begin::Paused => {
                if self.commit.is_idle() {
                    let rep = self.paused_reply();
                    self.reply(origin, rep);
                } else {
                    self.pause.wait(origin);
                }
            }
        }
    }

    pub(in crate::server) fn paused_reply(&self) -> JoinRep<K, V> {
        JoinRep::Paused {
            members: self.member_ids_with_me(),
            epoch: self.epoch,
            reachable: self
                .peers
                .links()
                .filter(|(_, l)| l.ready())
                .map(|(_, l)| l.id().clone())
                .collect(),
            len: self.shared.store.len() as u64,
            missed: self
                .peers
                .links()
                .filter(|(_, l)| l.missed())
                .map(|(_, l)| l.id().clone())
                .collect(),
        }
    }

    /// A step of the join that holds the pause arrived (a dump request, a chunk to apply): the
    /// coordinator is alive and working, so its lease is renewed. Its own renewals may be
    /// queued behind the chunks it sent before them, and while this node takes longer than
    /// the lease to receive and apply those, they would arrive too late (8 M + 8 M records
    /// never joined under `fast_failover`'s 2 s lease: the participant unpaused part way and
    /// refused the rest).
    pub(in crate::server) fn join_progress(&mut self) {
        self.pause.renew();
    }

    pub(in crate::server) fn paused_by(&self, join: u64) -> bool {
        self.pause.by(join)
    }
}
