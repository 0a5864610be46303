//! What the table server tells subscribers (`crate::subscription`): the records of the keys a
//! change touches, looked up before and after it, turned into `Change`s. Each place that
//! changes the store calls in here with one line; with no subscriber, that costs one atomic
//! load (`Hub::watching`).

use super::*;
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

/// The records of some keys before a change.
pub(crate) enum Watch<K, V> {
    /// One key of a set or ordered_set (the common write): nothing allocated.
    Key { key: K, before: Option<Rec<V>> },
    /// Keys of a set or ordered_set, each once.
    Keys {
        keys: Vec<K>,
        before: Vec<Option<Rec<V>>>,
    },
    /// Bag keys. A key comes with `None` (all its records) or, for a write of single bag
    /// objects, `Some(object)`: that object only, so that adding one object to a key of many
    /// costs a lookup, not a copy of the key's list.
    Bag {
        keys: Vec<(K, Option<V>)>,
        before: Vec<Vec<Rec<V>>>,
    },
}

/// Each key of `keys` once, in order; a set of the keys seen only when there are two or more.
fn distinct<'a, K: Key + 'a>(mut keys: impl Iterator<Item = &'a K>) -> Vec<K> {
    let Some(first) = keys.next() else {
        return Vec::new();
    };
    let mut out = vec![first.clone()];
    let mut seen: Option<HashSet<&K>> = None;
    for k in keys {
        let seen = seen.get_or_insert_with(|| HashSet::from([first]));
        if seen.insert(k) {
            out.push(k.clone());
        }
    }
    out
}

impl<K: Key, V: Value> Store<K, V> {
    /// Every record of a key (at most one, except in a bag), with its metadata.
    pub(crate) fn records(&self, k: &K) -> Vec<Rec<V>> {
        match self {
            Store::Bag { map, .. } => map
                .read(k, |list| list.iter().cloned().collect())
                .unwrap_or_default(),
            _ => self.record(k).into_iter().collect(),
        }
    }

    /// The record of a key of a set or ordered_set, with its metadata (`None` in a bag).
    pub(crate) fn record(&self, k: &K) -> Option<Rec<V>> {
        match self {
            Store::Set(m) => m.read(k, Rec::clone),
            Store::Ordered(m) => m.get(k).map(|e| e.value().clone()),
            Store::Bag { .. } => None,
        }
    }

    /// The records a watch looks at: the key's, or one object's (`Watch`).
    fn watched(&self, k: &K, object: Option<&V>) -> Vec<Rec<V>> {
        match (self, object) {
            (Store::Bag { map, .. }, Some(v)) => map
                .read(k, |list| {
                    let i = list.find(v, crate::bag::object_hash(v));
                    i.and_then(|i| list.get(i)).cloned()
                })
                .flatten()
                .into_iter()
                .collect(),
            _ => self.records(k),
        }
    }
}

impl<K: Key, V: Value> Server<K, V> {
    /// Applies one write (`apply_unwatched`), and tells subscribers what it changed.
    pub(super) fn apply(&mut self, op: Op<K, V>, writer: OwnerIdx) -> bool {
        let watch = self.watch_op(&op);
        let lasting = self.apply_unwatched(op, writer);
        self.emit(watch, Cause::Write(writer));
        lasting
    }

    /// The records of the keys a write touches, if anyone is subscribed.
    fn watch_op(&self, op: &Op<K, V>) -> Option<Watch<K, V>> {
        if !self.shared.hub.watching() {
            return None;
        }
        if self.shared.kind == TableKind::Bag {
            return match &op.kind {
                OpKind::Insert(recs)
                | OpKind::InsertTtl { records: recs, .. }
                | OpKind::DeleteObject(recs) => {
                    self.watch_objects(recs.iter().map(|(k, v)| (k, v)))
                }
                OpKind::InsertOwned { records, .. } => {
                    self.watch_objects(records.iter().map(|(k, v, _)| (k, v)))
                }
                OpKind::Delete(keys) => self.watch_keys(keys.iter()),
            };
        }
        match &op.kind {
            OpKind::Insert(recs) => self.watch_keys(recs.iter().map(|(k, _)| k)),
            OpKind::InsertTtl { records, .. } => self.watch_keys(records.iter().map(|(k, _)| k)),
            OpKind::InsertOwned { records, .. } => self.watch_keys(records.iter().map(|r| &r.0)),
            OpKind::Delete(keys) => self.watch_keys(keys.iter()),
            OpKind::DeleteObject(objs) => self.watch_keys(objs.iter().map(|(k, _)| k)),
        }
    }

    /// The records of `keys` (each once), if anyone is subscribed: call before changing them,
    /// then `emit` after.
    pub(super) fn watch_keys<'a>(&self, keys: impl Iterator<Item = &'a K>) -> Option<Watch<K, V>>
    where
        K: 'a,
    {
        if !self.shared.hub.watching() {
            return None;
        }
        let store = &self.shared.store;
        if self.shared.kind != TableKind::Bag {
            let mut keys = keys.peekable();
            let key = keys.next()?;
            if keys.peek().is_none() {
                let before = store.record(key);
                let key = key.clone();
                return Some(Watch::Key { key, before });
            }
            let keys = distinct(std::iter::once(key).chain(keys));
            let before = keys.iter().map(|k| store.record(k)).collect();
            return Some(Watch::Keys { keys, before });
        }
        let keys: Vec<(K, Option<V>)> = distinct(keys).into_iter().map(|k| (k, None)).collect();
        let before = keys.iter().map(|(k, _)| store.records(k)).collect();
        Some(Watch::Bag { keys, before })
    }

    /// The bag objects a write touches (each once), if anyone is subscribed.
    fn watch_objects<'a>(
        &self,
        objects: impl Iterator<Item = (&'a K, &'a V)>,
    ) -> Option<Watch<K, V>>
    where
        K: 'a,
        V: 'a,
    {
        if !self.shared.hub.watching() {
            return None;
        }
        let mut seen = HashSet::new();
        let keys: Vec<(K, Option<V>)> = objects
            .filter(|(k, v)| seen.insert((*k, postcard::to_stdvec(v).unwrap_or_default())))
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        let store = &self.shared.store;
        let before = keys
            .iter()
            .map(|(k, v)| store.watched(k, v.as_ref()))
            .collect();
        Some(Watch::Bag { keys, before })
    }

    /// Compares the watched keys' records with what they hold now and logs the differences.
    pub(super) fn emit(&self, watch: Option<Watch<K, V>>, cause: Cause) {
        let Some(watch) = watch else {
            return;
        };
        let node = match &cause {
            Cause::Write(w) => self.owners.get(*w).unwrap_or(&self.me),
            Cause::Expired => &self.me,
            Cause::Join(n) | Cause::Repair(n) => n,
        };
        let store = &self.shared.store;
        // The change of one key of a set or ordered_set, from its record before.
        let one = |k: K, b: Option<Rec<V>>| {
            let a = store.record(&k);
            if let (Some(b), Some(a)) = (&b, &a) {
                if (b.ts, b.owner) == (a.ts, a.owner) {
                    return None;
                }
            }
            change(&cause, k, b.map(|r| r.value), a.map(|r| r.value))
        };
        let (keys, before) = match watch {
            Watch::Key { key, before } => return self.shared.hub.publish(node, one(key, before)),
            Watch::Keys { keys, before } => {
                let changes = keys.into_iter().zip(before).filter_map(|(k, b)| one(k, b));
                return self.shared.hub.publish(node, changes.collect::<Vec<_>>());
            }
            Watch::Bag { keys, before } => (keys, before),
        };
        let mut changes = Vec::new();
        for ((k, object), before) in keys.into_iter().zip(before) {
            let after = store.watched(&k, object.as_ref());
            // Objects compared by their encodings, through sets: a key of many objects
            // costs time in proportion to them, not to their square.
            let enc = |r: &Rec<V>| postcard::to_stdvec(&r.value).unwrap_or_default();
            let (b, a): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (
                before.iter().map(enc).collect(),
                after.iter().map(enc).collect(),
            );
            let (in_b, in_a): (HashSet<&[u8]>, HashSet<&[u8]>) = (
                b.iter().map(Vec::as_slice).collect(),
                a.iter().map(Vec::as_slice).collect(),
            );
            for (r, e) in before.iter().zip(&b) {
                if !in_a.contains(e.as_slice()) {
                    changes.extend(change(&cause, k.clone(), Some(r.value.clone()), None));
                }
            }
            for (r, e) in after.iter().zip(&a) {
                if !in_b.contains(e.as_slice()) {
                    changes.extend(change(&cause, k.clone(), None, Some(r.value.clone())));
                }
            }
        }
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
