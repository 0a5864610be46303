//! What the table server tells subscribers (`crate::subscription`): the records a change
//! stored and removed, as the store's write path reports them (`crate::capture`), turned into
//! `Change`s by their cause. Each place that changes the store calls `watch` before and `emit`
//! after; with no subscriber, that costs one atomic load (`Hub::watching`).

use super::*;
use crate::capture::Step;
use crate::subscription::{Change, Start, SubscribeReq, Subscription};

/// Why the records of some keys changed.
pub(crate) enum Cause {
    /// A write (insert, delete) by this member (an owner index).
    Write(OwnerIdx),
    /// The expiry sweep.
    Expired,
    /// A join this node coordinated or took part in (the coordinator).
    Join(NodeId),
    /// A repair with this peer (anti-entropy).
    Repair(NodeId),
}

/// A capture of the store's changes under way (`Server::watch`), for `Server::emit`.
pub(crate) struct Watch(());

impl<K: Key, V: Value> Server<K, V> {
    /// Applies one write (`apply_unwatched`), and tells subscribers what it changed.
    pub(super) fn apply(&mut self, op: Op<K, V>, writer: OwnerIdx) -> bool {
        let watch = self.watch();
        let lasting = self.apply_unwatched(op, writer);
        self.emit(watch, Cause::Write(writer));
        lasting
    }

    /// Starts capturing the changes of the store, if anyone is subscribed: call before
    /// changing it, then `emit` after. The store's write path reports each record it stores
    /// (with the one it replaces) and removes (`crate::capture`), so nothing is looked up
    /// here. `None` with no subscriber, or within another capture (which reports the changes).
    pub(super) fn watch(&self) -> Option<Watch> {
        (self.shared.hub.watching() && self.shared.store.capture.start()).then_some(Watch(()))
    }

    /// Logs the changes captured since `watch`, as caused by `cause`.
    pub(super) fn emit(&self, watch: Option<Watch>, cause: Cause) {
        if watch.is_none() {
            return;
        }
        let steps = self.shared.store.capture.take();
        let node = match &cause {
            Cause::Write(w) => self.owners.get(*w).unwrap_or(&self.me),
            Cause::Expired => &self.me,
            Cause::Join(n) | Cause::Repair(n) => n,
        };
        let changes = steps.into_iter().filter_map(|step| match step {
            Step::Stored {
                key,
                previous,
                value,
            } => change(&cause, key, previous, Some(value)),
            Step::Removed { key, previous } => change(&cause, key, Some(previous), None),
        });
        self.shared.hub.publish(node, changes);
    }

    /// The records of a node that went down were dropped.
    pub(super) fn emit_owner_down(&self, id: &NodeId, removed: &[(K, V)]) {
        if removed.is_empty() || !self.shared.hub.watching() {
            return;
        }
        let changes = removed.iter().map(|(key, value)| {
            let (key, value) = (key.clone(), value.clone());
            Change::OwnerDown { key, value }
        });
        self.shared.hub.publish(id, changes);
    }

    /// Registers a subscriber here, between two changes (`Table::subscribe*`).
    pub(super) fn on_subscribe(&mut self, req: SubscribeReq<K, V>) {
        let (after, snapshot) = match req.from {
            Start::Now => (None, false),
            Start::Snapshot => (None, true),
            Start::After(c) => (Some(c), false),
        };
        let result = match self.shared.hub.join(after) {
            Ok(pos) => {
                let sub = Subscription::new(self.shared.hub.clone(), pos);
                let records = if snapshot {
                    self.shared.store.to_vec(self.shared.live_from())
                } else {
                    Vec::new()
                };
                Ok((records, sub))
            }
            Err(()) => Err(Error::CursorExpired {
                table: self.shared.name.clone(),
            }),
        };
        // A requester that gave up drops the subscription, which unregisters it.
        let _ = req.reply.send(result);
    }
}

/// The change from `previous` to `value` of one key (or bag object), by its cause.
fn change<K, V>(
    cause: &Cause,
    key: K,
    previous: Option<V>,
    value: Option<V>,
) -> Option<Change<K, V>> {
    Some(match (cause, previous, value) {
        (_, None, None) => return None,
        (Cause::Repair(_), previous, value) => Change::Repaired {
            key,
            value,
            previous,
        },
        (Cause::Join(_), previous, Some(value)) => Change::Joined {
            key,
            value,
            previous,
        },
        (Cause::Expired, Some(value), None) => Change::Expired { key, value },
        (_, Some(previous), None) => Change::Deleted { key, previous },
        (_, previous, Some(value)) => Change::Inserted {
            key,
            value,
            previous,
        },
    })
}
