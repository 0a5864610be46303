//! The local copy of a table: concurrent reads, one writer (the table server).
//!
//! - `set`: a [`ShardedMap`] (shards of staggered sizes, `hashbrown` tables, foldhash): a
//!   read takes one shard's read lock for the few nanoseconds of a lookup and copies the value
//!   out; the only writer (the table server) applies a batch shard by shard, paying the cache
//!   misses and any growth under the read lock and holding the write lock only for in-cache
//!   changes. Records are stored inline (no allocation per record).
//! - `ordered_set`: `crossbeam_skiplist::SkipMap` (lock-free reads and ordered ranges).
//! - `bag`: the same map, of key to its distinct values (`crate::bag::Objects`, found by the
//!   hash of their encodings), edited under the shard lock, so a reader sees either the old or
//!   the new list, never a half-edited one.
//!
//! The designs measured against this one and rejected (lock-free maps, more shards, ...) are
//! in `BENCHMARKS.md`.
//!
//! Every record carries its write timestamp and owner; readers only ever see the value.

use std::hash::Hash;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_skiplist::SkipMap;
use serde::Serialize;

use crate::bag::{object_hash, Objects};
use crate::sharded_map::ShardedMap;
pub(crate) use crate::types::{same_value, value_order, Rec};
use crate::types::{OwnerIdx, TableKind};

type Map<K, T> = ShardedMap<K, T>;

/// Shards of a hash table: enough that two threads rarely want the same one, and enough steps
/// between the smallest and the largest to spread their doublings (see `sharded_map.rs`).
const SHARDS: usize = 64;

fn map<K: Hash + Eq + Clone, T: Clone>() -> Map<K, T> {
    Map::new(SHARDS)
}

pub(crate) enum Store<K, V> {
    Set(Map<K, Rec<V>>),
    Ordered(Box<SkipMap<K, Rec<V>>>),
    Bag {
        map: Map<K, Objects<V>>,
        objects: AtomicUsize,
    },
}

/// What a change of the store reports, record by record: the table's digest and the
/// subscribers' capture follow every change through it (`crate::digest::Hook`). Defined here,
/// below both, so the store depends on neither.
pub(crate) trait Changes<K, V> {
    /// A record was stored (a bag object added).
    fn add(&self, k: &K, r: &Rec<V>);
    /// A record was removed.
    fn sub(&self, k: &K, r: &Rec<V>);
    /// `old` (if any) was replaced by `new` under one key.
    fn replace(&self, k: &K, old: Option<&Rec<V>>, new: &Rec<V>);
    /// A bag object took `new`'s stamp and owner in place of `old`'s: the digest changes, the
    /// table's contents (what subscribers see) do not.
    fn restamp(&self, k: &K, old: Option<&Rec<V>>, new: &Rec<V>);
}

impl<K, V> Store<K, V>
where
    K: Hash + Eq + Ord + Clone + Serialize + Send + Sync + 'static,
    V: Clone + Serialize + Send + Sync + 'static,
{
    pub(crate) fn new(kind: TableKind) -> Self {
        match kind {
            TableKind::Set => Store::Set(map()),
            TableKind::OrderedSet => Store::Ordered(Box::new(SkipMap::new())),
            TableKind::Bag => Store::Bag {
                map: map(),
                objects: AtomicUsize::new(0),
            },
        }
    }

    // ---- reads (any thread) ----
    //
    // `from`: records stamped before it have expired and are not returned (0: none has);
    // neither are records past their own lifetime (`Rec::live`).

    /// The read of a table without expiry: kept apart from `get_live` and small, so that it
    /// inlines into the caller's loop (with the check for expiry in it, `get` ran at 0.8 of its
    /// speed in `cargo bench --bench cluster -- get`).
    pub(crate) fn get(&self, k: &K) -> Option<V> {
        match self {
            Store::Set(m) => m.read(k, |r| r.value.clone()),
            Store::Ordered(m) => m.get(k).map(|e| e.value().value.clone()),
            Store::Bag { map, .. } => map
                .read(k, |v| v.first().map(|r| r.value.clone()))
                .flatten(),
        }
    }

    pub(crate) fn get_live(&self, k: &K, from: u64) -> Option<V> {
        match self {
            Store::Set(m) => m
                .read(k, |r| r.live(from).then(|| r.value.clone()))
                .flatten(),
            Store::Ordered(m) => m
                .get(k)
                .filter(|e| e.value().live(from))
                .map(|e| e.value().value.clone()),
            Store::Bag { map, .. } => map
                .read(k, |v| {
                    v.iter().find(|r| r.live(from)).map(|r| r.value.clone())
                })
                .flatten(),
        }
    }

    pub(crate) fn lookup(&self, k: &K, from: u64) -> Vec<V> {
        match self {
            Store::Bag { map, .. } => map
                .read(k, |v| {
                    v.iter()
                        .filter(|r| r.live(from))
                        .map(|r| r.value.clone())
                        .collect()
                })
                .unwrap_or_default(),
            _ => self.get_live(k, from).into_iter().collect(),
        }
    }

    pub(crate) fn contains_key(&self, k: &K, from: u64) -> bool {
        if from > 0 {
            return match self {
                Store::Set(m) => m.read(k, |r| r.live(from)).unwrap_or(false),
                Store::Ordered(m) => m.get(k).is_some_and(|e| e.value().live(from)),
                Store::Bag { map, .. } => map
                    .read(k, |v| v.iter().any(|r| r.live(from)))
                    .unwrap_or(false),
            };
        }
        match self {
            Store::Set(m) => m.contains_key(k),
            Store::Ordered(m) => m.contains_key(k),
            Store::Bag { map, .. } => map.contains_key(k),
        }
    }

    /// Number of records (for a bag: of distinct objects).
    pub(crate) fn len(&self) -> usize {
        match self {
            Store::Set(m) => m.len(),
            Store::Ordered(m) => m.len(),
            Store::Bag { objects, .. } => objects.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn to_vec(&self, from: u64) -> Vec<(K, V)> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each(|k, r| {
            if r.live(from) {
                out.push((k.clone(), r.value.clone()));
            }
        });
        out
    }

    pub(crate) fn range<R: RangeBounds<K>>(&self, range: R, from: u64) -> Option<Vec<(K, V)>> {
        match self {
            Store::Ordered(m) => Some(
                m.range(range)
                    .filter(|e| e.value().live(from))
                    .map(|e| (e.key().clone(), e.value().value.clone()))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Visits every record (for a bag, every object). `f` must not write to the store.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&K, &Rec<V>)) {
        match self {
            Store::Set(m) => m.for_each(f),
            Store::Ordered(m) => m.iter().for_each(|e| f(e.key(), e.value())),
            Store::Bag { map, .. } => map.for_each(|k, list| list.iter().for_each(|r| f(k, r))),
        }
    }

    /// Every record of a key (at most one, except in a bag), with its metadata.
    pub(crate) fn records(&self, k: &K) -> Vec<Rec<V>> {
        match self {
            Store::Bag { map, .. } => map
                .read(k, |list| list.iter().cloned().collect())
                .unwrap_or_default(),
            Store::Set(m) => m.read(k, Rec::clone).into_iter().collect(),
            Store::Ordered(m) => m.get(k).map(|e| e.value().clone()).into_iter().collect(),
        }
    }

    // ---- writes (the table server only) ----
    //
    // Every method that changes the store takes a `Changes` (the digest's `Hook`) and reports
    // to it each record it stores or removes (`crate::digest::Records` passes it): anti-entropy
    // compares digests, so a change the digest misses is a difference reported between equal
    // replicas.

    /// Timestamp and owner of a set/ordered_set record.
    pub(crate) fn meta(&self, k: &K) -> Option<(u64, OwnerIdx)> {
        match self {
            Store::Set(m) => m.read(k, |r| (r.ts, r.owner)),
            Store::Ordered(m) => m.get(k).map(|e| (e.value().ts, e.value().owner)),
            Store::Bag { .. } => None,
        }
    }

    /// Stores a record: replaces the key's record (set, ordered_set) or adds the object unless
    /// an equal one is stored (bag).
    #[cfg(test)]
    pub(crate) fn put(&self, k: K, rec: Rec<V>, h: &impl Changes<K, V>) {
        // A bag keeps the stored one of two equal objects.
        let bag = matches!(self, Store::Bag { .. });
        self.put_many_if(vec![(k, rec)], |_, _, _| !bag, h);
    }

    /// Bag: adds the object unless an equal one is stored; if one is, `replace(new, stored)`
    /// says whether the new record takes its place (its stamp and owner).
    fn put_object(
        &self,
        k: K,
        rec: Rec<V>,
        replace: impl FnOnce(&Rec<V>, &Rec<V>) -> bool,
        h: &impl Changes<K, V>,
    ) {
        let Store::Bag { map, objects } = self else {
            return;
        };
        let key = k.clone();
        let hash = object_hash(&rec.value);
        let added = map.edit(
            k,
            Some(Objects::default),
            |list| match list.find(&rec.value, hash) {
                Some(i) => {
                    if let Some(cur) = list.get(i).filter(|cur| replace(&rec, cur)) {
                        h.restamp(&key, Some(cur), &rec);
                        list.replace(i, rec);
                    }
                    false
                }
                None => {
                    h.add(&key, &rec);
                    list.push(rec, hash);
                    true
                }
            },
            |list| !list.is_empty(),
        );
        if added == Some(true) {
            objects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// set/ordered_set: stores each record, in order, if `wins(key, new record, stored record)`
    /// holds (`None`: no record); a later record of a key sees the earlier one. `wins` must not
    /// touch the store. On a set the records are grouped by shard (see
    /// `ShardedMap::insert_many_if`). A bag adds each object unless an equal one is stored, and
    /// replaces that one if `wins(key, new, Some(stored))` holds.
    pub(crate) fn put_many_if(
        &self,
        recs: Vec<(K, Rec<V>)>,
        mut wins: impl FnMut(&K, &Rec<V>, Option<&Rec<V>>) -> bool,
        h: &impl Changes<K, V>,
    ) {
        match self {
            Store::Set(m) => m.insert_many_if(recs, |k, new, cur| {
                let won = wins(k, new, cur);
                if won {
                    h.replace(k, cur, new);
                }
                won
            }),
            Store::Ordered(m) => {
                for (k, rec) in recs {
                    let cur = m.get(&k);
                    let won = wins(&k, &rec, cur.as_ref().map(|e| e.value()));
                    if won {
                        h.replace(&k, cur.as_ref().map(|e| e.value()), &rec);
                        m.insert(k, rec);
                    }
                }
            }
            Store::Bag { .. } => {
                for (k, rec) in recs {
                    let won = |new: &Rec<V>, cur: &Rec<V>| wins(&k, new, Some(cur));
                    // `k` is lent to the check and given to the map: the map needs its own.
                    self.put_object(k.clone(), rec, won, h);
                }
            }
        }
    }

    /// set/ordered_set: removes the key's record if `wins(its stamp)` holds. `None`: there was no
    /// record; `Some(removed)` otherwise. `wins` must not touch the store.
    pub(crate) fn remove_if(
        &self,
        k: &K,
        wins: impl FnOnce((u64, OwnerIdx)) -> bool,
        h: &impl Changes<K, V>,
    ) -> Option<bool> {
        match self {
            Store::Set(m) => m.remove_if(k, |r| wins((r.ts, r.owner))).map(|removed| {
                if let Some(r) = &removed {
                    h.sub(k, r);
                }
                removed.is_some()
            }),
            Store::Ordered(m) => {
                let stamp = m.get(k).map(|e| (e.value().ts, e.value().owner))?;
                let won = wins(stamp);
                if won {
                    if let Some(e) = m.remove(k) {
                        h.sub(k, e.value());
                    }
                }
                Some(won)
            }
            Store::Bag { .. } => Some(self.remove(k, h)),
        }
    }

    /// `remove_if` for many keys; on a set grouped by shard (see
    /// `ShardedMap::remove_many_if`). Per key in order: `None` (no record), `Some(removed)`.
    pub(crate) fn remove_many_if(
        &self,
        keys: &[K],
        mut wins: impl FnMut((u64, OwnerIdx)) -> bool,
        h: &impl Changes<K, V>,
    ) -> Vec<Option<bool>> {
        match self {
            Store::Set(m) => m.remove_many_if(keys, |k, r| {
                let won = wins((r.ts, r.owner));
                if won {
                    h.sub(k, r);
                }
                won
            }),
            _ => keys
                .iter()
                .map(|k| self.remove_if(k, &mut wins, h))
                .collect(),
        }
    }

    /// Removes a key (every object of it, for a bag). Returns whether anything was removed.
    pub(crate) fn remove(&self, k: &K, h: &impl Changes<K, V>) -> bool {
        match self {
            Store::Set(m) => m.remove(k).inspect(|r| h.sub(k, r)).is_some(),
            Store::Ordered(m) => m.remove(k).inspect(|e| h.sub(k, e.value())).is_some(),
            Store::Bag { map, objects } => match map.remove(k) {
                Some(list) => {
                    list.iter().for_each(|r| h.sub(k, r));
                    objects.fetch_sub(list.len(), Ordering::Relaxed);
                    true
                }
                None => false,
            },
        }
    }

    /// Removes one object: the key's record if its value equals `v`.
    pub(crate) fn remove_object(&self, k: &K, v: &V, h: &impl Changes<K, V>) -> bool {
        match self {
            Store::Bag { map, objects } => remove_bag_object(map, objects, k, v, |_| true, h),
            _ => {
                if self.get(k).is_some_and(|cur| same_value(&cur, v)) {
                    self.remove(k, h)
                } else {
                    false
                }
            }
        }
    }

    /// Removes the record (set, ordered_set) or object (bag) of `k` if it is stored in exactly
    /// this version: stamp `ts`, `owner` and value `v`. Returns whether it was.
    pub(crate) fn remove_version(
        &self,
        k: &K,
        v: &V,
        ts: u64,
        owner: OwnerIdx,
        h: &impl Changes<K, V>,
    ) -> bool {
        let this = |r: &Rec<V>| r.ts == ts && r.owner == owner && same_value(&r.value, v);
        match self {
            Store::Set(m) => m
                .remove_if(k, |r| this(r))
                .is_some_and(|r| r.inspect(|r| h.sub(k, r)).is_some()),
            Store::Ordered(m) => match m.get(k) {
                Some(e) if this(e.value()) => {
                    h.sub(k, e.value());
                    e.remove();
                    true
                }
                _ => false,
            },
            Store::Bag { map, objects } => remove_bag_object(map, objects, k, v, this, h),
        }
    }

    /// Removes every record owned by `owner`; returns them. `stamped(key, ts)` hears the
    /// timestamp of each record removed from a set or ordered_set.
    pub(crate) fn remove_owned(
        &self,
        owner: OwnerIdx,
        stamped: impl FnMut(&K, u64),
        h: &impl Changes<K, V>,
    ) -> Vec<(K, V)> {
        self.remove_owned_by(|o| o == owner, stamped, h)
    }

    /// `remove_owned` for every owner `of` names, in one pass.
    pub(crate) fn remove_owned_by(
        &self,
        of: impl Fn(OwnerIdx) -> bool,
        mut stamped: impl FnMut(&K, u64),
        h: &impl Changes<K, V>,
    ) -> Vec<(K, V)> {
        let mut removed = Vec::new();
        match self {
            Store::Set(m) => m.retain(|k, r| {
                if of(r.owner) {
                    h.sub(k, r);
                    stamped(k, r.ts);
                    removed.push((k.clone(), r.value.clone()));
                    false
                } else {
                    true
                }
            }),
            Store::Ordered(m) => {
                for e in m.iter() {
                    if of(e.value().owner) {
                        h.sub(e.key(), e.value());
                        stamped(e.key(), e.value().ts);
                        removed.push((e.key().clone(), e.value().value.clone()));
                        e.remove();
                    }
                }
            }
            Store::Bag { map, objects } => {
                map.retain(|k, list| {
                    list.retain(|r| {
                        if of(r.owner) {
                            h.sub(k, r);
                            removed.push((k.clone(), r.value.clone()));
                            false
                        } else {
                            true
                        }
                    });
                    !list.is_empty()
                });
                objects.fetch_sub(removed.len(), Ordering::Relaxed);
            }
        }
        removed
    }
}

/// Removes the object `v` of the bag key `k` if `this` accepts its stored version; the key
/// goes with its last object. Returns whether it was removed.
fn remove_bag_object<K, V>(
    map: &Map<K, Objects<V>>,
    objects: &AtomicUsize,
    k: &K,
    v: &V,
    this: impl Fn(&Rec<V>) -> bool,
    h: &impl Changes<K, V>,
) -> bool
where
    K: Hash + Eq + Ord + Clone + Serialize + Send + Sync + 'static,
    V: Clone + Serialize + Send + Sync + 'static,
{
    let hash = object_hash(v);
    let removed = map
        .edit(
            k.clone(),
            None::<fn() -> Objects<V>>,
            |list| {
                let i = list
                    .find(v, hash)
                    .filter(|&i| list.get(i).is_some_and(&this));
                let r = i.and_then(|i| list.remove(i));
                r.inspect(|r| h.sub(k, r)).is_some()
            },
            |list| !list.is_empty(),
        )
        .unwrap_or(false);
    if removed {
        objects.fetch_sub(1, Ordering::Relaxed);
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    // The one import of the store's tests from above it: they drive the store through
    // `Records`, as the table server does, so every change also goes through the digest's
    // `Changes` (tests/layering.rs leaves test modules out).
    use crate::digest::Records;

    fn rec(value: u32, ts: u64, owner: OwnerIdx) -> Rec<u32> {
        Rec::new(value, ts, owner)
    }

    #[test]
    fn set_put_many_if_respects_the_rule_and_remove_owned_returns_records() {
        for kind in [TableKind::Set, TableKind::OrderedSet] {
            let s: Records<u64, u32> = Records::new(kind, true);
            // Newer timestamp wins; the second record of key 1 is older and loses, the third
            // is newer and wins over the first.
            let newer =
                |_: &u64, new: &Rec<u32>, cur: Option<&Rec<u32>>| cur.is_none_or(|c| new.ts > c.ts);
            s.put_many_if(vec![(1, rec(10, 5, 0)), (1, rec(11, 4, 1))], newer);
            assert_eq!(s.get(&1), Some(10));
            s.put_many_if(vec![(1, rec(12, 6, 1))], newer);
            assert_eq!(s.meta(&1), Some((6, 1)));
        }
        let s: Records<u64, u32> = Records::new(TableKind::Set, true);
        s.put(1, rec(12, 6, 1));
        s.put(2, rec(20, 1, 0));
        assert_eq!(s.remove_if(&3, |_| true), None);
        assert_eq!(s.remove_if(&2, |_| false), Some(false));
        let mut gone = s.remove_owned(1, |_, _| {});
        gone.sort();
        assert_eq!(gone, vec![(1, 12)]);
        assert_eq!(s.to_vec(0), vec![(2, 20)]);
    }

    #[test]
    fn bag_keeps_distinct_values_and_counts_objects() {
        let s: Records<u64, u32> = Records::new(TableKind::Bag, true);
        s.put(1, rec(1, 1, 0));
        s.put(1, rec(1, 2, 1)); // same object: kept once
        s.put(1, rec(2, 3, 1));
        s.put(2, rec(3, 4, 1));
        assert_eq!(s.len(), 3);
        let mut v = s.lookup(&1, 0);
        v.sort();
        assert_eq!(v, vec![1, 2]);
        assert!(s.remove_object(&1, &2));
        assert!(!s.remove_object(&1, &2));
        assert_eq!(s.len(), 2);
        assert_eq!(s.remove_owned(1, |_, _| {}), vec![(2, 3)]);
        assert_eq!(s.len(), 1);
        assert!(s.remove(&1));
        assert!(s.is_empty_for_test());
    }

    #[test]
    fn ordered_set_ranges_in_key_order() {
        let s: Records<u64, u32> = Records::new(TableKind::OrderedSet, true);
        for k in [5u64, 1, 3, 9] {
            s.put(k, rec(k as u32, 1, 0));
        }
        assert_eq!(s.range(2..6, 0), Some(vec![(3, 3), (5, 5)]));
        assert_eq!(s.to_vec(0).first(), Some(&(1, 1)));
        let set: Records<u64, u32> = Records::new(TableKind::Set, true);
        assert_eq!(set.range(.., 0), None);
    }

    impl<K, V> Store<K, V>
    where
        K: Hash + Eq + Ord + Clone + Serialize + Send + Sync + 'static,
        V: Clone + Serialize + Send + Sync + 'static,
    {
        fn is_empty_for_test(&self) -> bool {
            self.len() == 0 && self.to_vec(0).is_empty()
        }
    }

    #[test]
    fn reads_skip_records_stamped_before_from() {
        for kind in [TableKind::Set, TableKind::OrderedSet, TableKind::Bag] {
            let s: Records<u64, u32> = Records::new(kind, true);
            s.put(1, rec(10, 5, 0));
            s.put(2, rec(20, 9, 0));
            s.put(2, rec(21, 3, 0)); // a bag's second object (a set keeps this one)
            assert_eq!(s.get_live(&1, 5), Some(10));
            assert_eq!(s.get_live(&1, 6), None);
            assert!(s.contains_key(&1, 5) && !s.contains_key(&1, 6));
            let mut all = s.to_vec(6);
            all.sort();
            let later = if kind == TableKind::Bag {
                vec![(2, 20)]
            } else {
                vec![]
            };
            assert_eq!(all, later, "{kind:?}");
            assert_eq!(
                s.lookup(&2, 4),
                later.iter().map(|(_, v)| *v).collect::<Vec<_>>()
            );
            assert_eq!(s.len(), if kind == TableKind::Bag { 3 } else { 2 });
        }
        let s: Records<u64, u32> = Records::new(TableKind::OrderedSet, true);
        s.put(1, rec(10, 5, 0));
        s.put(2, rec(20, 9, 0));
        assert_eq!(s.range(.., 6), Some(vec![(2, 20)]));
    }
}
