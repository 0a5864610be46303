//! Who a table's records belong to: the node that wrote them (the default, as in CETS) or the
//! cluster (as in Groot), chosen per table with [`crate::TableOptions::ownership`] or
//! [`crate::TableOptions::cluster_owned`]. ALGORITHM.md, section 12, has the rules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::membership::NodeId;

/// Who the records of a table belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Ownership {
    /// A record belongs to the node that wrote it (or to the node
    /// [`crate::TableOptions::owner`] names) and is dropped on every node when that node goes
    /// down or restarts: sessions, presence, locks held by a process. The default.
    #[default]
    Node,
    /// A record belongs to the cluster: it stays when the node that wrote it goes down or
    /// restarts, and only a delete or its expiry removes it: configuration, feature flags,
    /// counters, routing rules, caches. Concurrent writes of a key end with the newer one
    /// (hybrid-logical-clock stamp, then the writer's node name). A delete leaves a tombstone
    /// for [`crate::TableOptions::tombstone_retention`], so a delete made on one side of a
    /// partition wins over the older record the other side kept when the partition heals.
    /// `on_node_down` is never called (nothing is dropped). Set and ordered_set tables only.
    Cluster,
}

/// How long a cluster-owned table keeps the tombstone of a delete by default: one hour.
///
/// A tombstone costs about the size of its key twice (map and queue) plus 40 bytes; a table
/// that deletes 1 000 keys a second holds 3.6 M tombstones at this retention (about 200 MiB
/// with 16-byte keys). A partition that lasts longer than the retention can bring a deleted key
/// back at the heal (ALGORITHM.md, section 12).
pub const DEFAULT_TOMBSTONE_RETENTION: Duration = Duration::from_secs(3600);

/// The identity that stands for a writer in a cluster-owned table's records and tombstones:
/// its name with incarnation 0. Records keep it after the writer's incarnation is gone, and the
/// writer's next incarnation writes under the same one. (A real incarnation is a random `u64`:
/// 0 is never drawn in practice.)
pub(crate) fn writer_id(name: &str) -> NodeId {
    NodeId {
        name: name.to_string(),
        incarnation: 0,
    }
}

/// Whether `id` is a writer identity of a cluster-owned table (see [`writer_id`]).
pub(crate) fn is_writer_id(id: &NodeId) -> bool {
    id.incarnation == 0
}

/// What the ownership mode mixes into the table's stream fingerprint, so that nodes that start
/// one table in different modes refuse each other (0 for [`Ownership::Node`]: fingerprints of
/// node-owned tables are unchanged).
pub(crate) fn fingerprint_mark(o: Ownership) -> u64 {
    match o {
        Ownership::Node => 0,
        Ownership::Cluster => 0x9e37_79b9_7f4a_7c15,
    }
}

/// Refuses the options a cluster-owned table cannot honour: a bag (a join takes the union of
/// a bag's objects, so a deleted object would come back) and an owner function (records have
/// no owner node).
pub(crate) fn check<K, V>(opts: &crate::TableOptions<K, V>) -> crate::Result<()> {
    if opts.ownership != Ownership::Cluster {
        return Ok(());
    }
    if opts.kind == crate::TableKind::Bag {
        return Err(crate::Error::Config(
            "a bag cannot be cluster-owned (set and ordered_set only)".into(),
        ));
    }
    if opts.owner.is_some() {
        return Err(crate::Error::Config(
            "a cluster-owned table has no owner function (its records belong to no node)".into(),
        ));
    }
    Ok(())
}
