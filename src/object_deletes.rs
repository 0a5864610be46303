//! The `delete_object`s a table server applied recently, kept while a member may still send an
//! older insert of the object they delete (ALGORITHM.md, section 7.2 and 7.4).
//!
//! `delete_object(k, v)` removes the version of `k` whose value is `v`, wherever it is stored
//! when the delete arrives. Writes of different nodes travel on different streams, so the
//! delete can reach a node before the insert it deletes; without a trace of it, that insert,
//! arriving later, would stay on that node only. So each applied `delete_object` is kept here
//! with its stamp and the encoded value, and an insert of that value stamped before it is
//! deleted as it arrives, on every node alike: the outcome is the one of the writes applied in
//! stamp order. Entries go as tombstones go: once every member's clock passed their stamp, no
//! member can still send an older insert.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use crate::membership::NodeId;

/// One applied `delete_object`: its stamp and the object's encoded value.
struct Pending {
    ts: u64,
    writer: NodeId,
    value: Box<[u8]>,
}

pub(crate) struct ObjectDeletes<K> {
    map: HashMap<K, Vec<Pending>, foldhash::fast::RandomState>,
    /// Keys in the order their entries were made, with the entry's timestamp.
    queue: VecDeque<(u64, K)>,
}

impl<K: Hash + Eq + Clone> ObjectDeletes<K> {
    pub(crate) fn new() -> Self {
        Self {
            map: HashMap::default(),
            queue: VecDeque::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Entries held (each `delete_object` of a key once).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.values().map(Vec::len).sum()
    }

    /// Notes a `delete_object` of `value` (encoded) under `key`, stamped `(ts, writer)`.
    pub(crate) fn add(&mut self, key: K, ts: u64, writer: &NodeId, value: Box<[u8]>) {
        let entries = self.map.entry(key.clone()).or_default();
        if entries
            .iter()
            .any(|p| p.ts == ts && p.writer == *writer && p.value == value)
        {
            return;
        }
        entries.push(Pending {
            ts,
            writer: writer.clone(),
            value,
        });
        self.queue.push_back((ts, key));
    }

    /// Whether a `delete_object` of this key and value (encoded) stamped at or after
    /// `(ts, owner)` was applied here: then a record of that version is deleted as it arrives
    /// (a delete wins a tie with a record, as `delete` does).
    pub(crate) fn deletes(&self, key: &K, ts: u64, owner: Option<&NodeId>, value: &[u8]) -> bool {
        self.map.get(key).is_some_and(|entries| {
            entries
                .iter()
                .any(|p| (p.ts, Some(&p.writer)) >= (ts, owner) && *p.value == *value)
        })
    }

    /// Whether some entry of `key` exists (cheap check before encoding a value).
    pub(crate) fn has(&self, key: &K) -> bool {
        !self.map.is_empty() && self.map.contains_key(key)
    }

    /// Forgets the entries stamped at or before `min` (every member's clock passed them), in the
    /// order they were made; a younger entry at the front stops the pops, which only keeps some
    /// entries longer.
    pub(crate) fn forget_up_to(&mut self, min: u64) {
        while self.queue.front().is_some_and(|(ts, _)| *ts <= min) {
            let Some((_, key)) = self.queue.pop_front() else {
                break;
            };
            if let Some(entries) = self.map.get_mut(&key) {
                entries.retain(|p| p.ts > min);
                if entries.is_empty() {
                    self.map.remove(&key);
                }
            }
        }
        if self.map.is_empty() {
            self.queue.clear();
            if self.queue.capacity() > 1024 {
                self.queue.shrink_to_fit();
            }
            if self.map.capacity() > 1024 {
                self.map.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            incarnation: 1,
        }
    }

    #[test]
    fn an_insert_of_the_object_stamped_before_the_delete_is_deleted_and_no_other() {
        let (a, b) = (id("a"), id("b"));
        let mut d = ObjectDeletes::new();
        d.add("k", 10, &b, Box::from(&b"v"[..]));
        assert!(d.has(&"k") && !d.has(&"x"));
        assert!(d.deletes(&"k", 9, Some(&a), b"v"));
        // A tie: the delete wins, as a delete does.
        assert!(d.deletes(&"k", 10, Some(&b), b"v"));
        assert!(!d.deletes(&"k", 11, Some(&a), b"v"), "a newer insert stays");
        assert!(!d.deletes(&"k", 9, Some(&a), b"w"), "another value stays");
        assert!(!d.deletes(&"x", 9, Some(&a), b"v"));
        d.add("k", 10, &b, Box::from(&b"v"[..]));
        assert_eq!(d.len(), 1, "the same delete twice is one entry");
    }

    #[test]
    fn entries_go_once_every_member_clock_passed_them() {
        let b = id("b");
        let mut d = ObjectDeletes::new();
        d.add("k", 10, &b, Box::from(&b"v"[..]));
        d.add("k", 20, &b, Box::from(&b"w"[..]));
        d.add("m", 15, &b, Box::from(&b"v"[..]));
        d.forget_up_to(12);
        assert_eq!(d.len(), 2);
        assert!(!d.deletes(&"k", 9, Some(&b), b"v"));
        assert!(d.deletes(&"k", 19, Some(&b), b"w"));
        d.forget_up_to(u64::MAX);
        assert!(d.is_empty());
    }
}
