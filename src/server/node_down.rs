//! A member goes down: its records are dropped on every survivor, and what it leaves behind
//! (owner indexes, tombstones) is released once nothing names it.

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    pub(super) fn peer_down(&mut self, id: &NodeId) {
        let Some(key) = self.owners.lookup(id) else {
            return;
        };
        let peers::Departure {
            was_link,
            was_member,
            lasting,
            refusals,
        } = self.peers.remove(key);
        self.joins.forget(key);
        self.pause.forget_waiters_of(key);
        if self.pause.coordinated_by(id) {
            tracing::warn!(coordinator = %id, "join coordinator is gone; unpausing");
            self.unpause();
        }
        // Its records go, each leaving a tombstone while a member may still send an older
        // write of the key: on a node where that write arrived first, the dropped record had
        // replaced it, and it must not come back here only (the same holds for `drop_orphans`).
        // A cluster-owned table keeps them all: none is stored under an incarnation.
        let since = self.min_watermark();
        let keep_tombstones = self.peers.has_members();
        let mut recent = Vec::new();
        let removed = if self.cluster_owned() {
            Vec::new()
        } else {
            self.shared.store.remove_owned(key, |k, ts| {
                if keep_tombstones && ts > since {
                    recent.push((k.clone(), ts));
                }
            })
        };
        self.emit_owner_down(id, &removed);
        for (k, ts) in recent {
            if self.newer(&k, ts, key) {
                self.add_tombstone(k, Tombstone::of((ts, key)));
            }
        }
        if was_member || lasting != 0 || refusals != 0 {
            // Members that applied the same lasting writes of it keep equal views; those that
            // did not (it died before its last write reached all) now differ, and the view
            // check has them merge their tables again, as a join does. XOR: two nodes that go
            // down at once may be handled in either order. A node the view check dropped from
            // the members before it went down (its records were kept) counts too if it left
            // a trace here: its records are dropped now.
            self.epoch ^= departure_mark(id, lasting, refusals);
            self.publish_members();
        }
        self.metrics.node_down_drops.increment(removed.len() as u64);
        if was_link || was_member || !removed.is_empty() {
            tracing::info!(peer = %id, dropped = removed.len(), "node down");
        }
        // Never for a cluster-owned table: nothing was dropped.
        if (was_member || !removed.is_empty()) && !self.cluster_owned() {
            if let Some(f) = &self.opts.on_node_down {
                // A panic is logged there; the node-down goes on.
                let _ = crate::callbacks::guarded(&self.shared.name, "on_node_down", id, || {
                    f(id, &removed)
                });
            }
        }
        self.complete_pending();
        self.claims_leader_gone(key);
        if key != self.me_idx {
            self.gone.insert(key);
        }
    }

    /// Releases the owner indexes of nodes that went down once nothing refers to them: no link
    /// (the same incarnation may have reconnected), no tombstone, no batch waiting for its ack,
    /// no join. Their records went with the node-down, and none can come back: writes and join
    /// records name only owners alive here. Without this, each incarnation ever seen would
    /// cost every table an entry for good.
    pub(super) fn release_gone_owners(&mut self) {
        // A node that reconnected under the same incarnation is not gone; if it goes down
        // again, `peer_down` lists it again.
        let peers = &self.peers;
        self.gone.retain(|&k| !peers.is_linked(k));
        if self.gone.is_empty() {
            return;
        }
        let mut referred: BTreeSet<OwnerIdx> = self.tombstones.owners().collect();
        referred.extend(self.commit.waiting());
        referred.extend(self.to_ack.keys().copied());
        referred.extend(self.joins.awaited_from());
        let owners = &mut self.owners;
        let joins = &mut self.joins;
        self.gone.retain(|&k| {
            if referred.contains(&k) {
                return true;
            }
            joins.forget_track(k);
            owners.release(k);
            false
        });
    }
}

/// The frame of `PeerMsg::Ops { seq, ops }` whose `count` ops are already encoded in `body`,
/// so each op is encoded once, however many peers receive it.
/// What a member's departure mixes into the epoch: its identity, the last of its batches that
/// this node applied with a lasting effect (`Link::lasting`), and the writes of others that its
/// records and tombstones refused here (`Link::refusals`).
fn departure_mark(id: &NodeId, lasting: u64, refusals: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (incarnation, lasting) = (id.incarnation.to_le_bytes(), lasting.to_le_bytes());
    let refusals = refusals.to_le_bytes();
    for b in id
        .name
        .as_bytes()
        .iter()
        .chain(&incarnation)
        .chain(&lasting)
        .chain(&refusals)
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
