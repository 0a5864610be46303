//! The local copy of a table: concurrent reads without locks, one writer (the table server).
//!
//! - `set`: `papaya::HashMap` (reads never block, incremental resize).
//! - `ordered_set`: `crossbeam_skiplist::SkipMap` (lock-free reads and ordered ranges).
//! - `bag`: `papaya::HashMap` of key to the list of distinct values; the writer replaces a
//!   key's whole list, so a reader sees either the old or the new list, never a half-edited one.
//!
//! Every record carries its write timestamp and owner; readers only ever see the value.

use std::hash::Hash;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_skiplist::SkipMap;
use serde::Serialize;

use crate::membership::OwnerIdx;
use crate::table::TableKind;

/// A stored record's value and metadata.
#[derive(Debug, Clone)]
pub(crate) struct Rec<V> {
    pub value: V,
    pub ts: u64,
    pub owner: OwnerIdx,
}

pub(crate) enum Store<K, V> {
    Set(papaya::HashMap<K, Rec<V>>),
    Ordered(Box<SkipMap<K, Rec<V>>>),
    Bag {
        map: papaya::HashMap<K, Vec<Rec<V>>>,
        objects: AtomicUsize,
    },
}

/// Whether two values are the same object (bags, `delete_object`): equal encodings.
pub(crate) fn same_value<V: Serialize>(a: &V, b: &V) -> bool {
    match (postcard::to_stdvec(a), postcard::to_stdvec(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

impl<K, V> Store<K, V>
where
    K: Hash + Eq + Ord + Clone + Send + Sync + 'static,
    V: Clone + Serialize + Send + Sync + 'static,
{
    pub(crate) fn new(kind: TableKind) -> Self {
        match kind {
            TableKind::Set => Store::Set(papaya::HashMap::new()),
            TableKind::OrderedSet => Store::Ordered(Box::new(SkipMap::new())),
            TableKind::Bag => Store::Bag {
                map: papaya::HashMap::new(),
                objects: AtomicUsize::new(0),
            },
        }
    }

    // ---- reads (any thread) ----

    pub(crate) fn get(&self, k: &K) -> Option<V> {
        match self {
            Store::Set(m) => m.pin().get(k).map(|r| r.value.clone()),
            Store::Ordered(m) => m.get(k).map(|e| e.value().value.clone()),
            Store::Bag { map, .. } => map
                .pin()
                .get(k)
                .and_then(|v| v.first().map(|r| r.value.clone())),
        }
    }

    pub(crate) fn lookup(&self, k: &K) -> Vec<V> {
        match self {
            Store::Bag { map, .. } => map
                .pin()
                .get(k)
                .map(|v| v.iter().map(|r| r.value.clone()).collect())
                .unwrap_or_default(),
            _ => self.get(k).into_iter().collect(),
        }
    }

    pub(crate) fn contains_key(&self, k: &K) -> bool {
        match self {
            Store::Set(m) => m.pin().contains_key(k),
            Store::Ordered(m) => m.contains_key(k),
            Store::Bag { map, .. } => map.pin().contains_key(k),
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

    pub(crate) fn to_vec(&self) -> Vec<(K, V)> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each(|k, r| out.push((k.clone(), r.value.clone())));
        out
    }

    pub(crate) fn range<R: RangeBounds<K>>(&self, range: R) -> Option<Vec<(K, V)>> {
        match self {
            Store::Ordered(m) => Some(
                m.range(range)
                    .map(|e| (e.key().clone(), e.value().value.clone()))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Visits every record (for a bag, every object).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&K, &Rec<V>)) {
        match self {
            Store::Set(m) => m.pin().iter().for_each(|(k, r)| f(k, r)),
            Store::Ordered(m) => m.iter().for_each(|e| f(e.key(), e.value())),
            Store::Bag { map, .. } => {
                for (k, list) in map.pin().iter() {
                    list.iter().for_each(|r| f(k, r));
                }
            }
        }
    }

    // ---- writes (the table server only) ----

    /// Timestamp and owner of a set/ordered_set record.
    pub(crate) fn meta(&self, k: &K) -> Option<(u64, OwnerIdx)> {
        match self {
            Store::Set(m) => m.pin().get(k).map(|r| (r.ts, r.owner)),
            Store::Ordered(m) => m.get(k).map(|e| (e.value().ts, e.value().owner)),
            Store::Bag { .. } => None,
        }
    }

    /// Stores a record: replaces the key's record (set, ordered_set) or adds the object unless
    /// an equal one is stored (bag).
    pub(crate) fn put(&self, k: K, rec: Rec<V>) {
        match self {
            Store::Set(m) => {
                m.pin().insert(k, rec);
            }
            Store::Ordered(m) => {
                m.insert(k, rec);
            }
            Store::Bag { map, objects } => {
                let pinned = map.pin();
                let mut list = pinned.get(&k).cloned().unwrap_or_default();
                if list.iter().any(|r| same_value(&r.value, &rec.value)) {
                    return;
                }
                list.push(rec);
                pinned.insert(k, list);
                objects.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes a key (every object of it, for a bag). Returns whether anything was removed.
    pub(crate) fn remove(&self, k: &K) -> bool {
        match self {
            Store::Set(m) => m.pin().remove(k).is_some(),
            Store::Ordered(m) => m.remove(k).is_some(),
            Store::Bag { map, objects } => match map.pin().remove(k) {
                Some(list) => {
                    objects.fetch_sub(list.len(), Ordering::Relaxed);
                    true
                }
                None => false,
            },
        }
    }

    /// Removes one object: the key's record if its value equals `v`.
    pub(crate) fn remove_object(&self, k: &K, v: &V) -> bool {
        match self {
            Store::Bag { map, objects } => {
                let pinned = map.pin();
                let Some(list) = pinned.get(k) else {
                    return false;
                };
                let kept: Vec<Rec<V>> = list
                    .iter()
                    .filter(|r| !same_value(&r.value, v))
                    .cloned()
                    .collect();
                if kept.len() == list.len() {
                    return false;
                }
                objects.fetch_sub(list.len() - kept.len(), Ordering::Relaxed);
                if kept.is_empty() {
                    pinned.remove(k);
                } else {
                    pinned.insert(k.clone(), kept);
                }
                true
            }
            _ => {
                if self.get(k).is_some_and(|cur| same_value(&cur, v)) {
                    self.remove(k)
                } else {
                    false
                }
            }
        }
    }

    /// Removes every record owned by `owner`; returns them.
    pub(crate) fn remove_owned(&self, owner: OwnerIdx) -> Vec<(K, V)> {
        let mut removed = Vec::new();
        match self {
            Store::Set(m) => m.pin().retain(|k, r| {
                if r.owner == owner {
                    removed.push((k.clone(), r.value.clone()));
                    false
                } else {
                    true
                }
            }),
            Store::Ordered(m) => {
                for e in m.iter() {
                    if e.value().owner == owner {
                        removed.push((e.key().clone(), e.value().value.clone()));
                        e.remove();
                    }
                }
            }
            Store::Bag { map, objects } => {
                let pinned = map.pin();
                let keys: Vec<K> = pinned
                    .iter()
                    .filter(|(_, l)| l.iter().any(|r| r.owner == owner))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    let Some(list) = pinned.get(&k) else { continue };
                    let (gone, kept): (Vec<&Rec<V>>, Vec<&Rec<V>>) =
                        list.iter().partition(|r| r.owner == owner);
                    removed.extend(gone.iter().map(|r| (k.clone(), r.value.clone())));
                    objects.fetch_sub(gone.len(), Ordering::Relaxed);
                    if kept.is_empty() {
                        pinned.remove(&k);
                    } else {
                        let kept: Vec<Rec<V>> = kept.into_iter().cloned().collect();
                        pinned.insert(k, kept);
                    }
                }
            }
        }
        removed
    }
}
