//! Stamps from peers and this node's clock (`NodeConfig::max_clock_drift`).

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Moves the node's clock past a stamp from the peer of link `key`, unless the stamp is
    /// too far ahead of this node's wall time: then the peer is logged and reported
    /// (`HybridClock::observe_from`), and the clock stays.
    pub(super) fn observe(&self, key: OwnerIdx, ts: u64) {
        if !self.clock.observe(ts) {
            let peer = self
                .owners
                .get(key)
                .map_or_else(String::new, |id| id.name.clone());
            self.clock.observe_from(&peer, ts);
        }
    }
}
