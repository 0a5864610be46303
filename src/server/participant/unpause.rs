//! `JoinReq::Unpause`, step 9 of a join (ALGORITHM.md, section 9.2): ends the pause, whether the
//! join succeeded or failed; buffered writes go on.

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Step 9: unpauses if this join holds the pause, else refuses a later pause of it.
    pub(super) fn on_unpause(&mut self, origin: Origin<K, V>, join: u64) {
        if self.paused_by(join) {
            tracing::debug!(join, "unpaused");
            self.unpause();
        } else {
            // The coordinator gave up before our pause (its request still queued here,
            // or our answer late): a pause of this join arriving now is refused.
            self.pause.remember_released(join);
        }
        self.reply(origin, JoinRep::Unpaused);
    }

    /// Ends the current pause; buffered writes go on, and the joins it refused may start.
    pub(in crate::server) fn unpause(&mut self) {
        if let Some(p) = self.pause.end() {
            if p.applied {
                // The join stored records here and ended before its member list came: the
                // other nodes of its side may not have stored them, so none of another
                // node's records stay.
                self.drop_outsiders(p.coordinator.clone(), &[]);
            }
            self.pause_ended();
        }
    }
}
