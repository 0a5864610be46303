//! Steps 2, 3, 4 and 9 of a join (ALGORITHM.md, section 9.2): the lease the lock holds, the
//! reachability and view checks on what the lock learnt, and the unpause.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::JoinCtx;
use crate::membership::NodeId;
use crate::proto::{JoinReq, PeerMsg};
use crate::types::{Key, Value};

/// The pauses this join holds. They are renewed from the join's own progress (each dump chunk,
/// each applied chunk), never from a timer: a coordinator that stalls loses its lease.
pub(super) struct Lease {
    nodes: Vec<NodeId>,
    join: u64,
    lease_ms: u64,
    every: Duration,
    last: tokio::time::Instant,
}

impl Lease {
    /// The pauses of `nodes` for `join`, renewed at most once per `every`.
    pub(super) fn new(nodes: Vec<NodeId>, join: u64, lease_ms: u64, every: Duration) -> Self {
        Lease {
            nodes,
            join,
            lease_ms,
            every,
            last: tokio::time::Instant::now(),
        }
    }

    pub(super) fn renew<K: Key, V: Value>(&mut self, ctx: &JoinCtx<K, V>) {
        if self.last.elapsed() < self.every {
            return;
        }
        self.last = tokio::time::Instant::now();
        let pause = || JoinReq::Pause {
            join: self.join,
            lease_ms: self.lease_ms,
        };
        // Request number 0 is never awaited (`Server::on_control` numbers from 1): the reply is
        // dropped where it arrives.
        let direct = crate::frame::encode(&PeerMsg::<K, V>::Join {
            req: 0,
            body: pause(),
        });
        for n in &self.nodes {
            // Replies are not awaited: a lost renewal shows up as a refused step later.
            match (ctx.streams.get(n), &direct) {
                (Some(out), Ok(frame)) if !out.is_closed() => {
                    let _ = out.send(frame.clone());
                }
                _ => drop(ctx.request(n, pause())),
            }
        }
    }
}

/// Checks that the two member lists seen under the lock (`l`, `r`) still cover exactly the
/// nodes the join locked (`all`, from the member lists seen before). A node that joined one side
/// meanwhile was not locked; a node that left both sides meanwhile (dropped for not
/// acknowledging, or for a differing view) would be named a member by the join's result without
/// receiving it. Either way the join is retried with fresh member lists.
pub(super) fn same_nodes(
    all: &BTreeSet<NodeId>,
    l: &[NodeId],
    r: &[NodeId],
) -> std::result::Result<(), String> {
    if let Some(n) = l.iter().chain(r).find(|n| !all.contains(n)) {
        return Err(format!("{n} became a member before the lock"));
    }
    if let Some(n) = all.iter().find(|n| !l.contains(n) && !r.contains(n)) {
        return Err(format!("{n} left both member lists before the lock"));
    }
    Ok(())
}

/// A pair of nodes of the join without a table stream between them, if any.
pub(super) fn unreachable_pair(
    all: &BTreeSet<NodeId>,
    reach: &BTreeMap<NodeId, Vec<NodeId>>,
) -> Option<(NodeId, NodeId)> {
    for a in all {
        // A node that did not report what it reaches counts as reaching nobody.
        let seen = reach.get(a).map(Vec::as_slice).unwrap_or_default();
        if let Some(b) = all.iter().find(|b| *b != a && !seen.contains(b)) {
            return Some((a.clone(), b.clone()));
        }
    }
    None
}

/// Unpauses every locked server, best effort (a server that is gone unpauses by its lease).
pub(super) async fn release<K: Key, V: Value>(ctx: &JoinCtx<K, V>, locked: &[NodeId], join: u64) {
    let rxs: Vec<_> = locked
        .iter()
        .map(|n| (n, ctx.request(n, JoinReq::Unpause { join })))
        .collect();
    for (n, mut rx) in rxs {
        let _ = ctx.next(n, &mut rx).await;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::join) fn ids(names: &[&str]) -> Vec<NodeId> {
        names
            .iter()
            .map(|n| NodeId {
                name: (*n).into(),
                incarnation: 1,
            })
            .collect()
    }

    #[test]
    fn a_join_needs_the_locked_nodes_to_be_the_members_seen_under_the_lock() {
        let all: BTreeSet<NodeId> = ids(&["a", "b", "c"]).into_iter().collect();
        assert_eq!(same_nodes(&all, &ids(&["a", "b"]), &ids(&["c"])), Ok(()));
        assert_eq!(
            same_nodes(&all, &ids(&["a", "b", "c"]), &ids(&["b", "c"])),
            Ok(())
        );
        assert_eq!(
            same_nodes(&all, &ids(&["a"]), &ids(&["c"])),
            Err("b#0001 left both member lists before the lock".into())
        );
        assert_eq!(
            same_nodes(&all, &ids(&["a", "b", "d"]), &ids(&["c"])),
            Err("d#0001 became a member before the lock".into())
        );
    }
}
