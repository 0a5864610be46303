//! Steps 4 and 5 of a join (ALGORITHM.md, section 9.2) on what the lock learnt: the views, the
//! sources; then steps 6 to 8, either as an exchange of two dumps (`exchange.rs`) or as a
//! central merge in three phases: the dumps (`dump.rs`), the decision per key (`decide.rs`) and
//! the apply (`apply.rs`).

use std::collections::{BTreeMap, BTreeSet};

use super::lock::{same_nodes, Lease};
use super::{apply, decide, dump, exchange, Facts, Group, JoinCtx};
use crate::conflict::Conflict;
use crate::membership::NodeId;
use crate::types::{Key, TableKind, Value};
use crate::Result;

/// Steps 4 to 8 under the lock. Returns the number of conflicting keys.
pub(super) async fn merge<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    peer: &NodeId,
    join: u64,
    all: &BTreeSet<NodeId>,
    facts: Facts<'_>,
    lease: &mut Lease,
) -> Result<u64> {
    let Facts {
        views,
        sizes,
        missed,
        keep,
    } = facts;
    let everyone: Vec<NodeId> = all.iter().cloned().collect();
    // 4. Views. Already joined while we waited for the locks?
    if views.values().all(|(m, _)| *m == everyone) {
        return Ok(0);
    }
    let side = |n: &NodeId| views.get(n).map(|(m, e)| (m.clone(), *e));
    let (Some(l), Some(r)) = (side(&ctx.me), side(peer)) else {
        return Err(ctx.fail(peer, "lost a view"));
    };
    if let Err(why) = same_nodes(all, &l.0, &r.0) {
        return Err(ctx.fail(peer, format!("{why}; retrying")));
    }
    // 5. Sources.
    let groups = sources(ctx, peer, &everyone, views, keep, l, r);

    // The dumps carry the records of the join's nodes, and of the linked nodes outside it that
    // every node of the join reaches and none missed writes of (`keep`): the union repairs what
    // a writer that died halfway changed on some of them only (ALGORITHM.md, section 8). The
    // records of any other node outside the join may be stale (its writes reached none of them)
    // or not storable everywhere (a node not linked to it skips them): each node drops them
    // when the join ends (`Server::drop_outsiders`), and the first join with their owner brings
    // them back from its own side (section 16).
    let mut dumped = everyone.clone();
    dumped.extend(keep.iter().cloned());
    // Last writer wins between two consistent partitions needs no central decision: each
    // side keeps the later version of a key, and both compare the same stamps.
    if let ([a, b], Conflict::LastWriterWins, false) =
        (groups.as_slice(), &ctx.conflict, ctx.kind == TableKind::Bag)
    {
        let nodes = (everyone.as_slice(), dumped.as_slice());
        let facts = (missed, sizes);
        return exchange::exchange(ctx, peer, join, [a, b], nodes, facts, lease).await;
    }

    // 6. Dumps.
    let dumps = dump::collect(ctx, join, &groups, &dumped, sizes, lease).await?;
    // 7. Merge.
    let decided = decide::decide(
        ctx,
        &groups,
        missed,
        &dumps.owners,
        dumps.versions,
        &dumps.tombs,
    )?;
    let conflicts = decided.conflicts;
    // 8. Apply.
    apply::apply(
        ctx,
        join,
        &groups,
        &everyone,
        (&dumps.owners, &dumps.tombs),
        decided,
        lease,
    )
    .await?;
    tracing::info!(peer = %peer, nodes = everyone.len(), conflicts, "join done");
    Ok(conflicts)
}

/// Step 5: the sources, each with the nodes its dump stands for. A side is consistent if every
/// node on its member list (`l`, `r`: the lists and epochs of this node and the peer under the
/// lock) reports that same list and epoch; two consistent disjoint sides need one dump each,
/// otherwise every node dumps and stands for itself.
fn sources<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    peer: &NodeId,
    everyone: &[NodeId],
    views: &BTreeMap<NodeId, (Vec<NodeId>, u64)>,
    keep: &[NodeId],
    (l, le): (Vec<NodeId>, u64),
    (r, re): (Vec<NodeId>, u64),
) -> Vec<Group> {
    let consistent = |members: &[NodeId], epoch: u64| {
        members.iter().all(|n| {
            views
                .get(n)
                .is_some_and(|(m, e)| m == members && *e == epoch)
        })
    };
    let disjoint = l.iter().all(|n| !r.contains(n));
    let exchangeable =
        matches!(ctx.conflict, Conflict::LastWriterWins) && ctx.kind != TableKind::Bag;
    // A node learns which outsiders' records the join keeps from its dump request or from the
    // merge list of an exchange; a node that gets neither (the non-dumping node of a central
    // merge of two consistent sides) would drop them, so with such outsiders every node dumps.
    if disjoint && consistent(&l, le) && consistent(&r, re) && (keep.is_empty() || exchangeable) {
        vec![(ctx.me.clone(), l), (peer.clone(), r)]
    } else {
        tracing::info!("partitions are not internally consistent; merging every node's dump");
        everyone
            .iter()
            .map(|n| (n.clone(), vec![n.clone()]))
            .collect()
    }
}
