//! `JoinReq::Stale`, steps 7 and 8 of a join (ALGORITHM.md, sections 9.2 and 16): removes the
//! copies of records their owner's side no longer holds.

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Steps 7 and 8: removes the stale copies the join names.
    pub(super) fn on_stale(
        &mut self,
        origin: Origin<K, V>,
        join: u64,
        owners: Vec<NodeId>,
        records: Vec<WireRecord<K, V>>,
    ) {
        if !self.paused_by(join) {
            self.refuse(origin, "not paused by this join");
            return;
        }
        let by = self.origin_id(&origin).unwrap_or_else(|| self.me.clone());
        let removed = self.remove_stale(&owners, records, by);
        if removed > 0 {
            tracing::info!(
                removed,
                join,
                "dropped copies of records their owners' side no longer holds"
            );
        }
        self.reply(origin, JoinRep::Applied { conflicts: 0 });
    }

    /// Removes the stale copies a join names (`crate::authority`), each only where it is stored
    /// in that very version. Returns how many were removed.
    fn remove_stale(
        &mut self,
        owners: &[NodeId],
        records: Vec<WireRecord<K, V>>,
        by: NodeId,
    ) -> usize {
        let map: Vec<Option<OwnerIdx>> = owners.iter().map(|id| self.owners.lookup(id)).collect();
        let watch = self.watch();
        let removed = records
            .iter()
            .filter(|r| match map.get(r.owner as usize) {
                Some(&Some(owner)) => self
                    .shared
                    .store
                    .remove_version(&r.key, &r.value, r.ts, owner),
                _ => false,
            })
            .count();
        self.emit(watch, notify::Cause::Join(by));
        removed
    }
}
