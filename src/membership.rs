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

/// Interns node identities so that each record stores a 4-byte owner.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    ids: Vec<NodeId>,
    index: HashMap<NodeId, OwnerIdx>,
}

impl Owners {
    pub(crate) fn intern(&mut self, id: &NodeId) -> OwnerIdx {
        if let Some(&i) = self.index.get(id) {
            return i;
        }
        let i = self.ids.len() as OwnerIdx;
        self.ids.push(id.clone());
        self.index.insert(id.clone(), i);
        i
    }

    pub(crate) fn get(&self, idx: OwnerIdx) -> Option<&NodeId> {
        self.ids.get(idx as usize)
    }

    pub(crate) fn lookup(&self, id: &NodeId) -> Option<OwnerIdx> {
        self.index.get(id).copied()
    }
}
