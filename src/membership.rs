//! Node identity and record ownership: the identities a table server interns into owner
//! indexes (`Owners`), and the hash of each index that the table's digest reads
//! (`OwnerTable`).
//!
//! A node is its name plus an *incarnation*, a random number drawn at every start. Records are
//! owned by an incarnation, so records written by a node before it restarted are never
//! mistaken for records of the restarted node: when the old incarnation is gone (its
//! connection closed, or the same name connected again with a new incarnation), every survivor
//! drops what it owned.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::stable_hash::WordHasher;

/// The identity of one running node: its configured name and the incarnation of this start.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// The node's name, unique in the cluster.
    pub name: String,
    /// Random per start of the node.
    pub incarnation: u64,
}

impl NodeId {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            incarnation: rand::random(),
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:04x}", self.name, self.incarnation & 0xffff)
    }
}

pub(crate) use crate::types::OwnerIdx;

/// Interns node identities so that each record stores a 4-byte owner. The index of a node
/// that is gone is released once nothing refers to it any more, and reused.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    ids: Vec<Option<NodeId>>,
    index: HashMap<NodeId, OwnerIdx>,
    free: Vec<OwnerIdx>,
    /// The table's digest hashes owners by identity: told of every index given.
    hashes: Option<OwnerHashes>,
}

impl Owners {
    /// Owners that tell `hashes` (the table's digest) the identity of every index they give.
    pub(crate) fn hashed(hashes: OwnerHashes) -> Self {
        Self {
            hashes: Some(hashes),
            ..Self::default()
        }
    }

    pub(crate) fn intern(&mut self, id: &NodeId) -> OwnerIdx {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let reused = self.free.pop().and_then(|i| {
            let slot = self.ids.get_mut(i as usize)?;
            *slot = Some(id.clone());
            Some(i)
        });
        let i = reused.unwrap_or_else(|| {
            self.ids.push(Some(id.clone()));
            (self.ids.len() - 1) as OwnerIdx
        });
        self.index.insert(id.clone(), i);
        if let Some(h) = &self.hashes {
            name_owner(h, i, id);
        }
        i
    }

    /// The identity at `idx`; `None` for an index never given or released.
    pub(crate) fn get(&self, idx: OwnerIdx) -> Option<&NodeId> {
        self.ids.get(idx as usize).and_then(Option::as_ref)
    }

    pub(crate) fn lookup(&self, id: &NodeId) -> Option<OwnerIdx> {
        self.index.get(id).copied()
    }

    /// Indexes handed out so far, released ones included (every index is below this).
    pub(crate) fn slots(&self) -> usize {
        self.ids.len()
    }

    /// Identities interned now.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Forgets the identity at `idx`; the index may be given to another identity later. The
    /// caller makes sure nothing refers to it any more.
    pub(crate) fn release(&mut self, idx: OwnerIdx) {
        if let Some(id) = self.ids.get_mut(idx as usize).and_then(Option::take) {
            self.index.remove(&id);
            self.free.push(idx);
        }
    }
}

/// The hash of a node identity (a record's owner).
pub(crate) fn owner_hash(id: &NodeId) -> u64 {
    let mut h = WordHasher::new(3);
    h.write(id.name.as_bytes());
    h.write(&id.incarnation.to_le_bytes());
    h.finish()
}

/// Owner indexes whose hash a digest keeps in a plain array, read without a lock (a table
/// rarely sees more identities than this; the rest are behind a lock).
pub(crate) const FAST_OWNERS: usize = 256;

/// The hash of each owner index, filled by the table server's `Owners` as it interns
/// identities (an index names one identity for as long as any record names it).
#[derive(Debug)]
pub(crate) struct OwnerTable {
    fast: Box<[AtomicU64]>,
    rest: RwLock<Vec<u64>>,
}

impl Default for OwnerTable {
    fn default() -> Self {
        Self {
            fast: (0..FAST_OWNERS).map(|_| AtomicU64::new(0)).collect(),
            rest: RwLock::default(),
        }
    }
}

impl OwnerTable {
    /// The hash of the identity at `idx` (0 for an index never named).
    #[inline]
    pub(crate) fn get(&self, idx: OwnerIdx) -> u64 {
        let i = idx as usize;
        match self.fast.get(i) {
            Some(h) => h.load(Ordering::Relaxed),
            None => self.rest_of(i),
        }
    }

    #[cold]
    fn rest_of(&self, i: usize) -> u64 {
        let rest = self.rest.read().unwrap_or_else(|p| p.into_inner());
        rest.get(i - FAST_OWNERS).copied().unwrap_or(0)
    }
}

/// The owner hashes of one table's digest (`crate::digest`), shared with its `Owners`.
pub(crate) type OwnerHashes = Arc<OwnerTable>;

/// Records an identity's hash at its index.
pub(crate) fn name_owner(table: &OwnerHashes, idx: OwnerIdx, id: &NodeId) {
    let (i, h) = (idx as usize, owner_hash(id));
    if let Some(slot) = table.fast.get(i) {
        slot.store(h, Ordering::Relaxed);
        return;
    }
    let mut rest = table.rest.write().unwrap_or_else(|p| p.into_inner());
    let j = i - FAST_OWNERS;
    if rest.len() <= j {
        rest.resize(j + 1, 0);
    }
    rest[j] = h;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_indexes_are_reused_and_forgotten() {
        let mut o = Owners::default();
        let (a, b, c) = (NodeId::new("a"), NodeId::new("b"), NodeId::new("c"));
        assert_eq!((o.intern(&a), o.intern(&b), o.intern(&a)), (0, 1, 0));
        o.release(0);
        assert_eq!(
            (o.get(0), o.lookup(&a), o.len(), o.slots()),
            (None, None, 1, 2)
        );
        assert_eq!(o.intern(&c), 0, "reused");
        assert_eq!(o.get(0), Some(&c));
        assert_eq!(o.intern(&a), 2, "a new index for a forgotten identity");
        o.release(7);
        assert_eq!(o.len(), 3);
    }
}
