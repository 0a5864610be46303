//! Joins, the participant's side: pause, dump, apply and unpause, as a coordinator asks
//! (ALGORITHM.md, section 9.2; the coordinator is `crate::join`). One file per request, each
//! named after it and citing its step; this file routes a request to its handler and answers.

use super::*;

mod apply;
mod dump;
mod info;
mod pause;
mod stale;
mod tombstones;
mod unpause;

/// Where to send a join reply.
pub(in crate::server) enum Origin<K, V> {
    Local(mpsc::UnboundedSender<JoinRep<K, V>>),
    Peer(OwnerIdx, u64),
}

impl<K: Key, V: Value> Server<K, V> {
    /// A join request of a coordinator (ALGORITHM.md, section 9.2), to its handler.
    pub(super) fn on_join_req(&mut self, origin: Origin<K, V>, body: JoinReq<K, V>) {
        match body {
            JoinReq::Info => self.on_info(origin),
            JoinReq::Pause { join, lease_ms } => self.on_pause(origin, join, lease_ms),
            JoinReq::Dump { join, alive } => self.on_dump(origin, join, alive),
            JoinReq::Apply {
                join,
                owners,
                records,
                members,
                merge,
            } => self.on_apply(origin, join, owners, records, members, merge),
            JoinReq::Tombstones {
                join,
                owners,
                tombstones,
            } => self.on_tombstones(origin, join, owners, tombstones),
            JoinReq::Stale {
                join,
                owners,
                records,
            } => self.on_stale(origin, join, owners, records),
            JoinReq::Unpause { join } => self.on_unpause(origin, join),
        }
    }

    pub(super) fn reply(&self, origin: Origin<K, V>, body: JoinRep<K, V>) {
        match origin {
            Origin::Local(tx) => {
                let _ = tx.send(body);
            }
            Origin::Peer(key, req) => self.send_to(key, &PeerMsg::JoinReply { req, body }),
        }
    }

    pub(super) fn refuse(&self, origin: Origin<K, V>, reason: &str) {
        let reason = reason.to_string();
        self.reply(origin, JoinRep::Refused { reason });
    }

    pub(super) fn origin_id(&self, origin: &Origin<K, V>) -> Option<NodeId> {
        match origin {
            Origin::Local(_) => Some(self.me.clone()),
            Origin::Peer(k, _) => self.peers.id_of(*k).cloned(),
        }
    }
}
