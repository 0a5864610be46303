//! `JoinReq::Reserve`, step 8 of a join (ALGORITHM.md, section 9.2): before the `Apply` chunks,
//! the coordinator says how many records they bring, and the store makes room for them at once
//! (each shard grown once, to its size, rather than doubled as the chunks arrive).

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Makes room in the store for `records` more records, within a pause of that join. The
    /// count comes from a peer: it is capped at this node's `max_join_records` (what one
    /// source's dump may bring, and an exchange sends each node one), so a peer cannot make
    /// it allocate without bound.
    pub(super) fn on_reserve(&mut self, origin: Origin<K, V>, join: u64, records: u64) {
        if !self.paused_by(join) {
            self.refuse(origin, "not paused by this join");
            return;
        }
        let n = usize::try_from(records.min(self.config.max_join_records)).unwrap_or(0);
        self.shared.store.reserve(n);
        // Growing a large table takes time: the lease runs from its end.
        self.join_progress();
        self.reply(origin, JoinRep::Applied { conflicts: 0 });
    }
}
