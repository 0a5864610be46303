//! Tombstones of a table server: for each recently deleted key, the stamp of the delete, so that
//! an older write still in flight cannot bring the key back (ALGORITHM.md, section 7.3).
//!
//! A tombstone can be forgotten once every member's clock passed its timestamp: no member can
//! still send an older write. The tombstones are also queued in the order they were made, so
//! forgetting them needs no scan of the map. That order is not timestamp order (own and peers'
//! deletes interleave, and a `delete_object` tombstone carries the deleted version's stamp), so
//! the queue is popped only while its front is old enough, and emptied at once only when its
//! newest timestamp is.

use std::collections::hash_map::{self, HashMap};
use std::collections::VecDeque;
use std::hash::Hash;

use crate::membership::OwnerIdx;
use crate::types::Stamp;

/// A map of tombstones with more slots than this is shrunk once it is at most 1/8 full.
const SHRINK_ABOVE: usize = 16 * 1024;

/// What a tombstone stops: writes stamped before it, and writes with its very stamp unless they
/// would have beaten the version it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tombstone<B = Box<[u8]>> {
    pub ts: u64,
    pub owner: OwnerIdx,
    /// For the tombstone of one removed version (`delete_object`): that version's encoded value.
    /// A write with an equal stamp (another writer that named the same owner in the same clock
    /// tick) beats it if its value orders after this one, as it would have beaten the version
    /// itself, so the nodes where the version was already gone decide as those where it was
    /// still there. `None` (a delete, a record dropped with its owner): it wins every tie.
    pub value: Option<B>,
}

impl Tombstone {
    /// A tombstone that wins every tie.
    pub(crate) fn of(stamp: Stamp) -> Self {
        Self {
            ts: stamp.0,
            owner: stamp.1,
            value: None,
        }
    }
}

/// A tombstone as stored: its value, if any, is borrowed.
pub(crate) type TombstoneRef<'a> = Tombstone<&'a [u8]>;

pub(crate) struct Tombstones<K> {
    map: HashMap<K, Stamp, foldhash::fast::RandomState>,
    /// The values of the tombstones that have one (`delete_object`s), apart, so that the map
    /// of the common ones stays small under a stream of deletes.
    values: HashMap<K, Box<[u8]>, foldhash::fast::RandomState>,
    /// Keys in the order their tombstones were made, with the tombstone's timestamp.
    queue: VecDeque<(u64, K)>,
    /// At least the largest timestamp in `queue`.
    newest: u64,
}

impl<K: Hash + Eq + Clone> Tombstones<K> {
    pub(crate) fn new() -> Self {
        Self {
            map: HashMap::default(),
            values: HashMap::default(),
            queue: VecDeque::new(),
            newest: 0,
        }
    }

    /// The owners the tombstones' stamps name (with repeats).
    pub(crate) fn owners(&self) -> impl Iterator<Item = OwnerIdx> + '_ {
        self.map.values().map(|(_, owner)| *owner)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Tombstones held.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Every tombstone's key and stamp (a join of a cluster-owned table ships them).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, Stamp)> + '_ {
        self.map.iter().map(|(k, s)| (k, *s))
    }

    pub(crate) fn get(&self, k: &K) -> Option<TombstoneRef<'_>> {
        let &(ts, owner) = self.map.get(k)?;
        let value = if self.values.is_empty() {
            None
        } else {
            self.values.get(k).map(|v| &**v)
        };
        Some(Tombstone { ts, owner, value })
    }

    /// Forgets the key's tombstone (a newer record was stored).
    pub(crate) fn remove(&mut self, k: &K) {
        self.map.remove(k);
        if !self.values.is_empty() {
            self.values.remove(k);
        }
    }

    /// Records (or replaces) the key's tombstone.
    pub(crate) fn add(&mut self, k: K, t: Tombstone) {
        self.newest = self.newest.max(t.ts);
        self.queue.push_back((t.ts, k.clone()));
        match t.value {
            Some(v) => {
                self.values.insert(k.clone(), v);
            }
            None if !self.values.is_empty() => {
                self.values.remove(&k);
            }
            None => {}
        }
        self.map.insert(k, (t.ts, t.owner));
    }

    /// Forgets every tombstone with a timestamp at or below `min` that the queue order lets it
    /// reach: all of them when the newest is old enough (the usual case at an ack under a
    /// stream of deletes), otherwise those queued before the first younger one.
    pub(crate) fn forget_up_to(&mut self, min: u64) {
        if self.newest <= min {
            self.queue.clear();
            self.map.clear();
            self.values.clear();
            self.newest = 0;
            self.fit();
            return;
        }
        while self.queue.front().is_some_and(|(ts, _)| *ts <= min) {
            let Some((ts, k)) = self.queue.pop_front() else {
                break;
            };
            // The key may have a newer tombstone queued later, or none any more.
            if let hash_map::Entry::Occupied(e) = self.map.entry(k) {
                if e.get().0 == ts {
                    let (k, _) = e.remove_entry();
                    if !self.values.is_empty() {
                        self.values.remove(&k);
                    }
                }
            }
        }
        if self.queue.is_empty() {
            self.newest = 0;
        }
        self.fit();
    }

    /// Shrinks a map that a burst of deletes left far larger than what it holds now: the
    /// tombstones of a stream of deletes are few at a time, and spread over a large table
    /// each of them costs a cache miss.
    fn fit(&mut self) {
        let (len, cap) = (self.map.len(), self.map.capacity());
        if cap > SHRINK_ABOVE && cap > 8 * len {
            self.map.shrink_to(2 * len);
            self.queue.shrink_to(2 * self.queue.len());
        }
        if self.values.is_empty() && self.values.capacity() > SHRINK_ABOVE {
            self.values = HashMap::default();
        }
    }

    /// Whether any tombstone is queued (for a cheap check before computing `min`).
    pub(crate) fn oldest_queued(&self) -> Option<u64> {
        self.queue.front().map(|(ts, _)| *ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_front_and_back_do_not_forget_a_newer_tombstone_in_between() {
        let mut t = Tombstones::new();
        t.add("x", Tombstone::of((80, 0)));
        t.add("k", Tombstone::of((100, 0))); // this node's delete
        t.add("j", Tombstone::of((90, 1))); // a peer's delete, received later with an older timestamp
        t.forget_up_to(92);
        assert!(t.get(&"x").is_none());
        assert_eq!(
            t.get(&"k"),
            Some(Tombstone {
                ts: 100,
                owner: 0,
                value: None
            }),
            "still needed: a write at 95 may be in flight"
        );
        assert!(
            t.get(&"j").is_some(),
            "kept until the queue reaches it (conservative)"
        );
        t.forget_up_to(100);
        assert!(t.is_empty());
        assert_eq!(t.oldest_queued(), None);
    }

    #[test]
    fn a_replaced_tombstone_is_forgotten_by_its_own_entry() {
        let mut t = Tombstones::new();
        t.add("k", Tombstone::of((10, 0)));
        t.add("z", Tombstone::of((30, 0)));
        t.add("k", Tombstone::of((20, 0)));
        t.forget_up_to(15);
        assert_eq!(t.get(&"k").map(|t| t.ts), Some(20));
        t.remove(&"k");
        t.forget_up_to(25);
        assert!(t.get(&"k").is_none());
        assert!(t.get(&"z").is_some());
    }

    #[test]
    fn a_value_goes_with_its_tombstone() {
        let mut t = Tombstones::new();
        let with = |ts, v: &[u8]| Tombstone {
            ts,
            owner: 0,
            value: Some(v.into()),
        };
        t.add("k", with(10, b"a"));
        t.add("j", with(12, b"b"));
        assert_eq!(t.get(&"k").and_then(|t| t.value), Some(&b"a"[..]));
        t.add("k", Tombstone::of((11, 0)));
        assert_eq!(
            t.get(&"k").map(|t| t.value),
            Some(None),
            "a delete replaced it"
        );
        t.remove(&"j");
        assert!(t.values.is_empty());
        t.add("j", with(13, b"c"));
        t.forget_up_to(12);
        assert_eq!(t.get(&"j").and_then(|t| t.value), Some(&b"c"[..]));
        t.forget_up_to(13);
        assert!(t.is_empty() && t.values.is_empty());
    }
}
