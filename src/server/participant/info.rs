//! `JoinReq::Info`, step 1 of a join (ALGORITHM.md, section 9.2): this node's member list and
//! epoch.

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Step 1: answers the member list, this node included, and the epoch.
    pub(super) fn on_info(&self, origin: Origin<K, V>) {
        let rep = JoinRep::Info {
            members: self.member_ids_with_me(),
            epoch: self.epoch,
        };
        self.reply(origin, rep);
    }

    pub(in crate::server) fn member_ids_with_me(&self) -> Vec<NodeId> {
        let mut v = self.peers.member_ids();
        v.push(self.me.clone());
        v.sort();
        v
    }
}
