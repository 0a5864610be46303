//! `JoinReq::Tombstones`, step 8 of a join of a cluster-owned table (ALGORITHM.md, sections 9.2
//! and 12): every source's tombstones, sent before the records they refuse.

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Step 8 (cluster-owned tables): stores the tombstones of a source of the join.
    pub(super) fn on_tombstones(
        &mut self,
        origin: Origin<K, V>,
        join: u64,
        owners: Vec<NodeId>,
        tombstones: Vec<crate::proto::WireTombstone<K>>,
    ) {
        if !self.paused_by(join) {
            self.refuse(origin, "not paused by this join");
            return;
        }
        if !self.cluster_owned() {
            self.refuse(origin, "tombstones sent to a node-owned table");
            return;
        }
        let by = self.origin_id(&origin).unwrap_or_else(|| self.me.clone());
        self.apply_join_tombstones(owners, tombstones, by);
        self.reply(origin, JoinRep::Applied { conflicts: 0 });
    }
}
