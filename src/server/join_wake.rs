//! A join refused `Busy` starts again when the pause that refused it ends, not after a timer
//! (ALGORITHM.md, section 20).
//!
//! When nodes start at once, every coordinator runs joins with all its peers together and they
//! pause each other: most are refused `Busy`. Backing off and waiting for the next tick cost
//! formation tens to hundreds of milliseconds per refusal. Instead:
//! - a pause that ends here makes this node's own refused joins due at once (the pause that
//!   refused them may have been this node's);
//! - a participant remembers the peers whose pause it refused and, when its pause ends, sends
//!   each a second reply to that request, `JoinRep::Unpaused`; the coordinator no longer awaits
//!   that request, and takes such a reply as the wake. A node that does not know this ignores
//!   the reply (a reply to a request it no longer awaits), so the wire stays as it was;
//! - the back-off still runs, in case the wake is lost with its link.

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    /// This node's pause ended: the peers it refused hear it, and this node's own refused joins
    /// start again.
    pub(super) fn pause_ended(&mut self) {
        for (key, req) in self.pause.take_refused() {
            if self.peers.get(key).is_some_and(Link::ready) {
                self.send_to(
                    key,
                    &PeerMsg::JoinReply {
                        req,
                        body: JoinRep::Unpaused,
                    },
                );
            }
        }
        self.wake_joins();
    }

    /// A reply to a join request no longer awaited arrived from a peer: `Unpaused` is a pause
    /// that refused one of our joins, ended.
    pub(super) fn late_join_reply(&mut self, free: bool) {
        if free {
            self.wake_joins();
        }
    }

    /// A pause ended somewhere: the joins refused `Busy` are due; they start now.
    fn wake_joins(&mut self) {
        for key in self.joins.wake() {
            self.maybe_join(key);
        }
    }
}
