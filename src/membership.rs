//! Node identity and record ownership.
//!
//! A node is its name plus an *incarnation*, a random number drawn at every start. Records are
//! owned by an incarnation, so records written by a node before it restarted are never
//! mistaken for records of the restarted node: when the old incarnation is gone (its
//! connection closed, or the same name connected again with a new incarnation), every survivor
//! drops what it owned.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};

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

/// Compact index of a [`NodeId`] within one table server (records store the index).
pub(crate) type OwnerIdx = u32;

/// Interns node identities so that each record stores a 4-byte owner. The index of a node
/// that is gone is released once nothing refers to it any more, and reused.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    ids: Vec<Option<NodeId>>,
    index: HashMap<NodeId, OwnerIdx>,
    free: Vec<OwnerIdx>,
    /// The table's digest hashes owners by identity: told of every index given.
    hashes: Option<crate::digest::OwnerHashes>,
}

impl Owners {
    /// Owners that tell `hashes` (the table's digest) the identity of every index they give.
    pub(crate) fn hashed(hashes: crate::digest::OwnerHashes) -> Self {
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
            crate::digest::name_owner(h, i, id);
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
