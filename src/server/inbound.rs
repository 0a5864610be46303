//! What a peer's ordered table stream brings besides joins, anti-entropy and claims: its write
//! batches (applied if it is a member, acknowledged either way), its acks of ours, and its
//! ticks (clock and view).

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    /// A batch `seq` of the peer's writes: applied if the peer is a member, acknowledged
    /// either way (the ack goes with the next `flush_acks`).
    pub(super) fn on_ops(&mut self, key: OwnerIdx, seq: u64, ops: Vec<Op<K, V>>) {
        let member = self.peers.is_member(key);
        if !member && !ops.is_empty() {
            // The link can be gone already: frames read before the node went down may
            // still be queued after the node-down event was handled.
            match self.peers.id_of(key) {
                Some(id) => {
                    tracing::debug!(peer = %id, "writes from a non-member acknowledged, not applied")
                }
                None => tracing::debug!("writes from a node that is down dropped"),
            }
            self.peers.heard_from_outsider(key);
        }
        let mut lasting = false;
        for op in ops {
            self.observe(key, op.ts);
            self.peers.heard_clock(key, op.ts);
            if member {
                lasting |= self.apply(op, key);
            }
        }
        if lasting {
            self.peers.lasting(key, seq);
        }
        if member {
            self.ae_heard(key, seq);
        }
        self.to_ack.insert(key, seq);
    }

    /// The peer acknowledged our batches up to `seq`: the batches every member acknowledged
    /// complete, and the tombstones older than every member's clock go.
    pub(super) fn on_ack(&mut self, key: OwnerIdx, seq: u64, clock: u64) {
        self.observe(key, clock);
        self.peers.acked(key, seq, clock);
        self.complete_pending();
        self.forget_tombstones();
    }

    /// The peer's clock and view (`housekeeping.rs` announces ours).
    pub(super) fn on_peer_tick(&mut self, key: OwnerIdx, clock: u64, view: u64) {
        self.observe(key, clock);
        self.peers.ticked(key, clock, view);
    }
}
