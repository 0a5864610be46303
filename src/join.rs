//! The join coordinator: merges the partition of this node's table with a peer's partition.
//!
//! The protocol is written down in `ALGORITHM.md` at the root of the repository (section 9);
//! the step numbers below and in this file's comments are its steps:
//! 1. Info: ask both sides for their member lists; equal lists mean already joined;
//! 2. Lock: pause every server of both partitions, one at a time in node order, as a lease that
//!    this task renews while it works (a busy server makes the whole join back off);
//! 3. Reachability: every locked node must reach every other;
//! 4. Views: the lists seen under the lock must still name exactly the locked nodes;
//! 5. Sources: one server per partition dumps, or every server if a partition is not consistent;
//! 6. Dump: the sources send their records, without records of owners that are not alive;
//! 7. Exchange or merge: two consistent sides under last writer wins send each dump to the other
//!    side, and every receiver keeps the later version per key (`exchange`); otherwise the
//!    conflict rule picks one winner per key, once, and each node is sent what it lacks;
//! 8. Apply: each node stores the records and, with the last chunk, the full member list;
//! 9. Unpause everyone (also on failure), so buffered writes go on to the new members.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::authority::{self, Dump};
use crate::conflict::Conflict;
use crate::hlc::HybridClock;
use crate::membership::NodeId;
use crate::ownership::is_writer_id;
use crate::proto::{Chunker, JoinRep, JoinReq, PeerMsg, WireRecord, WireTombstone};
use crate::server::Control;
use crate::store::{same_value, value_order};
use crate::table::{Key, TableKind, Value};
use crate::{Error, Result};

/// What the coordinator needs from its table server.
pub(crate) struct JoinCtx<K, V> {
    pub control: mpsc::UnboundedSender<Control<K, V>>,
    pub me: NodeId,
    pub kind: TableKind,
    pub conflict: Conflict<K, V>,
    pub clock: Arc<HybridClock>,
    pub lease: Duration,
    pub chunk: usize,
    pub chunk_bytes: usize,
    pub table: String,
    pub checkpoint: Option<crate::table::JoinCheckpointFn>,
    /// The table's record lifetime in milliseconds (`TableOptions::expire_after`), if any.
    pub expire_ms: Option<u64>,
    /// The table is cluster-owned: dumps carry tombstones and writer names as owners.
    pub cluster: bool,
    /// Records sent in `Apply` requests so far (`cets_join_records_total`).
    pub moved: Arc<AtomicU64>,
    /// The table streams to the peers (when the join started), for the lease's renewals: they
    /// go out from here, not through this node's table server, which may be busy for longer
    /// than the lease with the join's own work (its dump, the chunks it applies).
    pub streams: HashMap<NodeId, crate::outbox::Outbox>,
}

/// Every version of one key seen in the dumps, with the index of the source that had it; the
/// first one inline, so that a key only one side has costs no allocation.
struct Versions<V> {
    first: (usize, Version<V>),
    rest: Vec<(usize, Version<V>)>,
}

/// A record of the merge, owner as an index into the join's owner list.
#[derive(Clone)]
struct Version<V> {
    value: V,
    ts: u64,
    owner: u32,
    ttl: u32,
}

impl<K: Key, V: Value> JoinCtx<K, V> {
    fn fail(&self, peer: &NodeId, reason: impl Into<String>) -> Error {
        Error::Join {
            table: self.table.clone(),
            peer: peer.to_string(),
            reason: reason.into(),
        }
    }

    fn request(&self, to: &NodeId, body: JoinReq<K, V>) -> mpsc::UnboundedReceiver<JoinRep<K, V>> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let JoinReq::Apply { records, .. } = &body {
            self.moved
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        let _ = self.control.send(Control::JoinRequest {
            to: to.clone(),
            body,
            replies: tx,
        });
        rx
    }

    async fn next(
        &self,
        to: &NodeId,
        rx: &mut mpsc::UnboundedReceiver<JoinRep<K, V>>,
    ) -> Result<JoinRep<K, V>> {
        match tokio::time::timeout(self.lease, rx.recv()).await {
            Ok(Some(rep)) => Ok(rep),
            Ok(None) => Err(self.fail(to, "node unreachable or gone")),
            Err(_) => Err(self.fail(to, "no answer within the lease")),
        }
    }

    async fn ask(&self, to: &NodeId, body: JoinReq<K, V>) -> Result<JoinRep<K, V>> {
        let mut rx = self.request(to, body);
        self.next(to, &mut rx).await
    }
}

/// Runs one join of this node's table with `peer`'s. Returns the number of conflicting keys.
pub(crate) async fn run<K: Key, V: Value>(ctx: JoinCtx<K, V>, peer: NodeId) -> Result<u64> {
    // 1. Info.
    let local = match ctx.ask(&ctx.me, JoinReq::Info).await? {
        JoinRep::Info { members, .. } => members,
        _ => return Err(ctx.fail(&ctx.me, "unexpected reply to Info")),
    };
    let remote = match ctx.ask(&peer, JoinReq::Info).await? {
        JoinRep::Info { members, .. } => members,
        _ => return Err(ctx.fail(&peer, "unexpected reply to Info")),
    };
    if local == remote {
        return Ok(0);
    }
    let all: BTreeSet<NodeId> = local.iter().chain(remote.iter()).cloned().collect();
    let join: u64 = rand::random();
    let lease_ms = ctx.lease.as_millis() as u64;

    // 2. Lock, in the global order.
    let mut locked: Vec<NodeId> = Vec::new();
    let mut views: BTreeMap<NodeId, (Vec<NodeId>, u64)> = BTreeMap::new();
    let mut reach: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
    let mut sizes: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut missed = authority::Missed::default();
    for n in &all {
        match ctx.ask(n, JoinReq::Pause { join, lease_ms }).await {
            Ok(JoinRep::Paused {
                members,
                epoch,
                reachable,
                len,
                missed: m,
            }) => {
                missed.note(n, m);
                sizes.insert(n.clone(), len);
                locked.push(n.clone());
                views.insert(n.clone(), (members, epoch));
                reach.insert(n.clone(), reachable);
            }
            Ok(JoinRep::Busy { by }) => {
                release(&ctx, &locked, join).await;
                return Err(ctx.fail(n, format!("busy with a join coordinated by {by}")));
            }
            // `n` may still pause after we give up on it (its answer waits for its pending
            // writes): it hears the unpause too, and refuses a pause of this join after it.
            Ok(_) => {
                locked.push(n.clone());
                release(&ctx, &locked, join).await;
                return Err(ctx.fail(n, "unexpected reply to Pause"));
            }
            Err(e) => {
                locked.push(n.clone());
                release(&ctx, &locked, join).await;
                return Err(e);
            }
        }
    }
    let mut lease = Lease {
        nodes: locked.clone(),
        join,
        lease_ms,
        every: ctx.lease / 3,
        last: tokio::time::Instant::now(),
    };
    if let Some(f) = &ctx.checkpoint {
        f("locked").await;
    }
    // 3. Reachability.
    let result = match unreachable_pair(&all, &reach) {
        Some((a, b)) => Err(ctx.fail(&peer, format!("{a} cannot reach {b}; not joining"))),
        None => {
            let keep = authority::kept_outsiders(&all, &reach, &missed);
            let facts = Facts {
                views: &views,
                sizes: &sizes,
                missed: &missed,
                keep: &keep,
            };
            merge(&ctx, &peer, join, &all, facts, &mut lease).await
        }
    };
    // 9. Unpause.
    release(&ctx, &locked, join).await;
    result
}

/// The pauses this join holds. They are renewed from the join's own progress (each dump chunk,
/// each applied chunk), never from a timer: a coordinator that stalls loses its lease.
struct Lease {
    nodes: Vec<NodeId>,
    join: u64,
    lease_ms: u64,
    every: Duration,
    last: tokio::time::Instant,
}

impl Lease {
    fn renew<K: Key, V: Value>(&mut self, ctx: &JoinCtx<K, V>) {
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
        let direct = crate::transport::frame::encode(&PeerMsg::<K, V>::Join {
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
fn same_nodes(
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
fn unreachable_pair(
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
async fn release<K: Key, V: Value>(ctx: &JoinCtx<K, V>, locked: &[NodeId], join: u64) {
    let rxs: Vec<_> = locked
        .iter()
        .map(|n| (n, ctx.request(n, JoinReq::Unpause { join })))
        .collect();
    for (n, mut rx) in rxs {
        let _ = ctx.next(n, &mut rx).await;
    }
}

/// What the lock learnt from each node.
struct Facts<'a> {
    views: &'a BTreeMap<NodeId, (Vec<NodeId>, u64)>,
    sizes: &'a BTreeMap<NodeId, u64>,
    missed: &'a authority::Missed,
    /// Linked nodes outside the join whose records it carries (`authority::kept_outsiders`).
    keep: &'a [NodeId],
}

async fn merge<K: Key, V: Value>(
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
    let (Some((l, le)), Some((r, re))) = (side(&ctx.me), side(peer)) else {
        return Err(ctx.fail(peer, "lost a view"));
    };
    if let Err(why) = same_nodes(all, &l, &r) {
        return Err(ctx.fail(peer, format!("{why}; retrying")));
    }
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
    // 5. Sources. Each source's dump stands for a group of target nodes. A node learns which
    // outsiders' records the join keeps from its dump request or from the merge list of an
    // exchange; a node that gets neither (the non-dumping node of a central merge of two
    // consistent sides) would drop them, so with such outsiders every node dumps.
    let groups: Vec<(NodeId, Vec<NodeId>)> = if disjoint
        && consistent(&l, le)
        && consistent(&r, re)
        && (keep.is_empty() || exchangeable)
    {
        vec![(ctx.me.clone(), l), (peer.clone(), r)]
    } else {
        tracing::info!("partitions are not internally consistent; merging every node's dump");
        everyone
            .iter()
            .map(|n| (n.clone(), vec![n.clone()]))
            .collect()
    };

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
        return exchange(ctx, peer, join, [a, b], (&everyone, &dumped), missed, lease).await;
    }

    // 6. Dumps.
    let mut owners: Vec<NodeId> = Vec::new();
    let mut owner_idx: HashMap<NodeId, u32> = HashMap::new();
    // Sized once from what the sources said they hold (capped: the figure comes from the network).
    let expected: u64 = groups.iter().filter_map(|(src, _)| sizes.get(src)).sum();
    let mut versions: HashMap<K, Versions<V>, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(expected.min(1 << 21) as usize, Default::default());
    let mut tombs: Vec<TombstoneChunk<K>> = Vec::new();
    for (src_i, (src, _)) in groups.iter().enumerate() {
        let mut rx = ctx.request(
            src,
            JoinReq::Dump {
                join,
                alive: dumped.clone(),
            },
        );
        loop {
            match ctx.next(src, &mut rx).await? {
                JoinRep::Chunk {
                    owners: chunk_owners,
                    records,
                    last,
                } => {
                    if let Err(why) =
                        check_chunk(&chunk_owners, &records, last, &dumped, ctx.cluster)
                    {
                        return Err(ctx.fail(src, why));
                    }
                    let map: Vec<u32> = chunk_owners
                        .into_iter()
                        .map(|id| {
                            *owner_idx.entry(id.clone()).or_insert_with(|| {
                                owners.push(id);
                                (owners.len() - 1) as u32
                            })
                        })
                        .collect();
                    for rec in records {
                        ctx.clock.observe_from(&src.name, rec.ts);
                        let Some(&owner) = map.get(rec.owner as usize) else {
                            continue;
                        };
                        let v = (
                            src_i,
                            Version {
                                value: rec.value,
                                ts: rec.ts,
                                owner,
                                ttl: rec.ttl,
                            },
                        );
                        match versions.entry(rec.key) {
                            std::collections::hash_map::Entry::Occupied(mut e) => {
                                e.get_mut().rest.push(v)
                            }
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(Versions {
                                    first: v,
                                    rest: Vec::new(),
                                });
                            }
                        }
                    }
                    lease.renew(ctx);
                    if last {
                        break;
                    }
                }
                JoinRep::Tombstones { owners, tombstones } => {
                    check_tombstones(ctx, &owners, &tombstones).map_err(|w| ctx.fail(src, w))?;
                    tombs.push((owners, tombstones));
                    lease.renew(ctx);
                }
                JoinRep::Refused { reason } => return Err(ctx.fail(src, reason)),
                _ => return Err(ctx.fail(src, "unexpected reply to Dump")),
            }
        }
    }
    // A version a tombstone of any source beats is no version: a conflict handler must not
    // give it a new stamp, which would beat the delete.
    if !tombs.is_empty() {
        drop_deleted(&mut versions, &owners, &tombs);
    }

    // 7. Merge. A record owned by a node of the join counts only as its owner's group holds it
    // (`authority`): other copies are stale, and removed where they are.
    let auth: Vec<Option<usize>> = owners
        .iter()
        .map(|o| groups.iter().position(|(_, targets)| targets.contains(o)))
        .collect();
    // Groups one of whose nodes missed writes of a node of the other: only their copies of
    // each other's records are checked against the owner's side.
    let apart: Vec<Vec<bool>> = groups
        .iter()
        .map(|(_, g)| {
            groups
                .iter()
                .map(|(_, h)| g.iter().any(|x| h.iter().any(|y| missed.apart(x, y))))
                .collect()
        })
        .collect();
    let mut deltas: Vec<Vec<WireRecord<K, V>>> = vec![Vec::new(); groups.len()];
    let mut stale: Vec<Vec<WireRecord<K, V>>> = vec![Vec::new(); groups.len()];
    let mut conflicts = 0u64;
    for (key, vs) in versions {
        // The common case: a key only one source has. Every other source gets it as it is.
        if vs.rest.is_empty() {
            let (src, v) = vs.first;
            if auth
                .get(v.owner as usize)
                .is_some_and(|a| a.is_some_and(|a| a != src && apart[src][a]))
            {
                stale[src].push(WireRecord {
                    key,
                    value: v.value,
                    ts: v.ts,
                    owner: v.owner,
                    ttl: v.ttl,
                });
                continue;
            }
            let others: Vec<usize> = (0..deltas.len()).filter(|i| *i != src).collect();
            if let Some((&last, rest)) = others.split_last() {
                for &i in rest {
                    deltas[i].push(WireRecord {
                        key: key.clone(),
                        value: v.value.clone(),
                        ts: v.ts,
                        owner: v.owner,
                        ttl: v.ttl,
                    });
                }
                deltas[last].push(WireRecord {
                    key,
                    value: v.value,
                    ts: v.ts,
                    owner: v.owner,
                    ttl: v.ttl,
                });
            }
            continue;
        }
        let all_vs: Vec<(usize, Version<V>)> = std::iter::once(vs.first).chain(vs.rest).collect();
        let flags = authority::stale_versions(
            &all_vs
                .iter()
                .map(|(s, v)| (*s, v.ts, v.owner, &v.value))
                .collect::<Vec<_>>(),
            &auth,
            |a, b| apart[a][b],
        );
        let mut vs = Vec::with_capacity(all_vs.len());
        let mut old = Vec::new();
        for ((src, v), is_stale) in all_vs.into_iter().zip(flags) {
            if is_stale {
                old.push((src, v));
            } else {
                vs.push((src, v));
            }
        }
        // A stale copy is removed where no winner of its key (set) or no object of its value
        // (bag) replaces it.
        let kept: std::collections::HashSet<Vec<u8>> =
            if ctx.kind == TableKind::Bag && !old.is_empty() {
                vs.iter()
                    .map(|(_, w)| crate::bag::encoding(&w.value))
                    .collect()
            } else {
                Default::default()
            };
        for (src, v) in old {
            let replaced = match ctx.kind {
                TableKind::Bag => kept.contains(&crate::bag::encoding(&v.value)),
                _ => !vs.is_empty(),
            };
            if !replaced {
                stale[src].push(WireRecord {
                    key: key.clone(),
                    value: v.value,
                    ts: v.ts,
                    owner: v.owner,
                    ttl: v.ttl,
                });
            }
        }
        if vs.is_empty() {
            continue;
        }
        if ctx.kind == TableKind::Bag {
            // Union of objects, each with the greatest stamp it has anywhere (as replication
            // keeps it, so that a node-down removes the same objects everywhere): every source
            // gets the objects it lacks, or holds under another stamp.
            // (`bag::union`: one encoding per version, not a comparison of every pair.)
            let stamped: Vec<(usize, &V, _)> = vs
                .iter()
                .map(|(s, v)| (*s, &v.value, (v.ts, owners.get(v.owner as usize))))
                .collect();
            let objects = crate::bag::union(&stamped, deltas.len());
            for (src_i, delta) in deltas.iter_mut().enumerate() {
                for (i, held) in &objects {
                    let o = &vs[*i].1;
                    if !held.get(src_i).copied().unwrap_or(false) {
                        delta.push(WireRecord {
                            key: key.clone(),
                            value: o.value.clone(),
                            ts: o.ts,
                            owner: o.owner,
                            ttl: o.ttl,
                        });
                    }
                }
            }
            continue;
        }
        let mut distinct: Vec<&Version<V>> = Vec::new();
        for (_, v) in &vs {
            if !distinct.iter().any(|d| same_version(d, v)) {
                distinct.push(v);
            }
        }
        let winner = if distinct.len() == 1 {
            distinct[0].clone()
        } else {
            conflicts += 1;
            let mut w = distinct[0].clone();
            for v in &distinct[1..] {
                w = resolve(ctx, &key, w, v, &owners)?;
            }
            w
        };
        for (src_i, delta) in deltas.iter_mut().enumerate() {
            let has = vs
                .iter()
                .any(|(s, v)| *s == src_i && same_version(v, &winner));
            if !has {
                delta.push(WireRecord {
                    key: key.clone(),
                    value: winner.value.clone(),
                    ts: winner.ts,
                    owner: winner.owner,
                    ttl: winner.ttl,
                });
            }
        }
    }

    if let Some(f) = &ctx.checkpoint {
        f("before_apply").await;
    }
    // 8. Apply everywhere, the member list with the last chunk. The groups are sent one after
    // the other (then all run at once): a coordinator that dies in between leaves a
    // half-finished join, which the view check detects and a new join repairs.
    let mut waits = Vec::new();
    for ((_, targets), records) in groups.iter().zip(stale) {
        send_stale(
            ctx,
            join,
            targets,
            vec![(owners.clone(), records)],
            &mut waits,
        );
    }
    for (g, ((_, targets), delta)) in groups.iter().zip(deltas).enumerate() {
        if g > 0 {
            if let Some(f) = &ctx.checkpoint {
                f("between_groups").await;
            }
        }
        let mut chunker = Chunker::new(ctx.chunk, ctx.chunk_bytes);
        delta.into_iter().for_each(|r| chunker.push(r));
        let mut chunks = chunker.finish();
        let n = chunks.len();
        let apply = |i: usize, records| JoinReq::Apply {
            join,
            owners: owners.clone(),
            records,
            members: (i + 1 == n).then(|| everyone.clone()),
            merge: None,
        };
        let Some((last, others)) = targets.split_last() else {
            continue;
        };
        // Every source's tombstones first, to every node: each removes older records and
        // refuses the older records of the deltas.
        for t in targets {
            for (owners, tombstones) in &tombs {
                let body = JoinReq::Tombstones {
                    join,
                    owners: owners.clone(),
                    tombstones: tombstones.clone(),
                };
                waits.push((t.clone(), ctx.request(t, body)));
            }
        }
        for t in others {
            for (i, records) in chunks.iter().enumerate() {
                waits.push((t.clone(), ctx.request(t, apply(i, records.clone()))));
            }
        }
        for (i, records) in chunks.drain(..).enumerate() {
            waits.push((last.clone(), ctx.request(last, apply(i, records))));
        }
    }
    for (t, mut rx) in waits {
        lease.renew(ctx);
        match ctx.next(&t, &mut rx).await? {
            JoinRep::Applied { .. } => {}
            JoinRep::Refused { reason } => return Err(ctx.fail(&t, reason)),
            _ => return Err(ctx.fail(&t, "unexpected reply to Apply")),
        }
    }
    tracing::info!(peer = %peer, nodes = everyone.len(), conflicts, "join done");
    Ok(conflicts)
}

/// Sends stale copies (`authority`) to be removed from every node of a group; the replies
/// join `waits`.
fn send_stale<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    join: u64,
    targets: &[NodeId],
    dump: Dump<K, V>,
    waits: &mut Vec<(NodeId, mpsc::UnboundedReceiver<JoinRep<K, V>>)>,
) {
    for (owners, records) in dump {
        if records.is_empty() {
            continue;
        }
        let mut chunker = Chunker::new(ctx.chunk, ctx.chunk_bytes);
        records.into_iter().for_each(|r| chunker.push(r));
        for records in chunker.finish() {
            for t in targets {
                let body = JoinReq::Stale {
                    join,
                    owners: owners.clone(),
                    records: records.clone(),
                };
                waits.push((t.clone(), ctx.request(t, body)));
            }
        }
    }
}

/// Steps 6 to 8 for two consistent partitions under last writer wins: each source's dump goes
/// to the nodes of the other partition, which keep per key the later of their record and the
/// dumped one (`Apply { merge: Some(all) }`, where a stored record whose owner is not in `all`
/// counts as absent: it was not dumped, as in a central merge). Both sides compare the same
/// `(timestamp, owner)` stamps, so they end identical, as with a central merge, without building
/// the union in one place. Both dumps are complete before anything is applied, so a source that
/// fails halfway leaves nothing behind; group 0's targets get group 1's dump first, then group 1's
/// targets get group 0's, as the central merge sends its groups.
async fn exchange<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    peer: &NodeId,
    join: u64,
    groups: [&(NodeId, Vec<NodeId>); 2],
    (everyone, dumped): (&[NodeId], &[NodeId]),
    missed: &authority::Missed,
    lease: &mut Lease,
) -> Result<u64> {
    // Both sources dump at once; the chunks wait in their channels until read.
    let request = |src: &NodeId| {
        ctx.request(
            src,
            JoinReq::Dump {
                join,
                alive: dumped.to_vec(),
            },
        )
    };
    // The other source first: this node's table server, when it is the first source, cuts its
    // own dump before it forwards anything after it, and the two dumps should run at once.
    let rx1 = request(&groups[1].0);
    let mut rx = [request(&groups[0].0), rx1];
    let mut dumps: [Dump<K, V>; 2] = [Vec::new(), Vec::new()];
    let mut tombs: [Vec<TombstoneChunk<K>>; 2] = [Vec::new(), Vec::new()];
    for (from, dump) in dumps.iter_mut().enumerate() {
        let src = &groups[from].0;
        loop {
            match ctx.next(src, &mut rx[from]).await? {
                JoinRep::Chunk {
                    owners,
                    records,
                    last,
                } => {
                    if let Err(why) = check_chunk(&owners, &records, last, dumped, ctx.cluster) {
                        return Err(ctx.fail(src, why));
                    }
                    dump.push((owners, records));
                    lease.renew(ctx);
                    if last {
                        break;
                    }
                }
                JoinRep::Tombstones { owners, tombstones } => {
                    check_tombstones(ctx, &owners, &tombstones).map_err(|w| ctx.fail(src, w))?;
                    tombs[from].push((owners, tombstones));
                    lease.renew(ctx);
                }
                JoinRep::Refused { reason } => return Err(ctx.fail(src, reason)),
                _ => return Err(ctx.fail(src, "unexpected reply to Dump")),
            }
        }
    }
    if let Some(f) = &ctx.checkpoint {
        f("before_apply").await;
    }
    // Copies of one side's records that side does not hold are sent to neither side: they
    // are removed where they are, before the other side's records arrive (`authority`).
    let stale = authority::strip_stale(&mut dumps, [&groups[0].1, &groups[1].1], missed);
    let mut removals = Vec::new();
    for (g, dump) in stale.into_iter().enumerate() {
        send_stale(ctx, join, &groups[g].1, dump, &mut removals);
    }
    let [dump0, dump1] = dumps;
    let [tombs0, tombs1] = tombs;
    let mut waits: Vec<_> = removals.into_iter().map(|(t, rx)| (t, 1, rx)).collect();
    for (to, dump, tombs) in [(0usize, dump1, tombs1), (1, dump0, tombs0)] {
        if to == 1 {
            if let Some(f) = &ctx.checkpoint {
                f("between_groups").await;
            }
        }
        let targets = &groups[to].1;
        // The other side's tombstones before its records (cluster-owned tables).
        for (owners, tombstones) in tombs {
            for t in targets {
                let body = JoinReq::Tombstones {
                    join,
                    owners: owners.clone(),
                    tombstones: tombstones.clone(),
                };
                waits.push((t.clone(), to, ctx.request(t, body)));
            }
        }
        let n = dump.len();
        for (i, (owners, records)) in dump.into_iter().enumerate() {
            let apply = |owners, records| JoinReq::Apply {
                join,
                owners,
                records,
                members: (i + 1 == n).then(|| everyone.to_vec()),
                merge: Some(dumped.to_vec()),
            };
            if let Some((final_target, others)) = targets.split_last() {
                for t in others {
                    let rx = ctx.request(t, apply(owners.clone(), records.clone()));
                    waits.push((t.clone(), to, rx));
                }
                let rx = ctx.request(final_target, apply(owners, records));
                waits.push((final_target.clone(), to, rx));
            }
        }
    }
    // Every target of a group sees the same conflicts: count them at one.
    let counter = groups[0].1.first();
    let mut conflicts = 0;
    for (t, g, mut rx) in waits {
        lease.renew(ctx);
        match ctx.next(&t, &mut rx).await? {
            JoinRep::Applied { conflicts: n } => {
                if g == 0 && counter == Some(&t) {
                    conflicts += n;
                }
            }
            JoinRep::Refused { reason } => return Err(ctx.fail(&t, reason)),
            _ => return Err(ctx.fail(&t, "unexpected reply to Apply")),
        }
    }
    tracing::info!(peer = %peer, nodes = everyone.len(), conflicts, "join done (exchange)");
    Ok(conflicts)
}

/// Whether two versions of a key are one: the same stamp and the same value (two writers can
/// give one owner a key in the same clock tick, with different values).
fn same_version<V: Value>(a: &Version<V>, b: &Version<V>) -> bool {
    a.ts == b.ts && a.owner == b.owner && same_value(&a.value, &b.value)
}

/// What a dump chunk must be. Records, unless it is the last: each chunk renews the join's
/// lease, so empty ones could keep the tables paused for as long as a source sends them. Owners
/// among those the dump was asked for only (the join's nodes; `send_dump` names no other), as
/// the coordinator keeps every name it is given. (The bytes of one dump are bounded where replies
/// arrive, by `max_link_queue_bytes`: `Server::on_peer_msg`.)
fn check_chunk<K, V>(
    owners: &[NodeId],
    records: &[WireRecord<K, V>],
    last: bool,
    everyone: &[NodeId],
    cluster: bool,
) -> std::result::Result<(), &'static str> {
    if records.is_empty() && !last {
        return Err("an empty dump chunk that is not the last");
    }
    let named = |o: &NodeId| everyone.contains(o) || (cluster && is_writer_id(o));
    if owners.iter().any(|o| !named(o)) {
        return Err("a dump chunk names an owner outside the join");
    }
    Ok(())
}

/// A chunk of a source's tombstones: its owner list and the tombstones that index it.
type TombstoneChunk<K> = (Vec<NodeId>, Vec<WireTombstone<K>>);

/// What a tombstone chunk must be: of a cluster-owned table, not empty, naming writer names only.
fn check_tombstones<K, V>(
    ctx: &JoinCtx<K, V>,
    owners: &[NodeId],
    tombstones: &[WireTombstone<K>],
) -> std::result::Result<(), &'static str> {
    if !ctx.cluster {
        return Err("tombstones in the dump of a node-owned table");
    }
    if tombstones.is_empty() {
        return Err("an empty tombstone chunk");
    }
    if owners.iter().any(|o| !is_writer_id(o)) {
        return Err("a tombstone chunk names an owner that is not a writer name");
    }
    Ok(())
}

/// Removes from the merge every version that a tombstone of one of the dumps beats (stamp
/// not above the tombstone's; a delete wins a tie), and keys left with no version.
fn drop_deleted<K: Key, V: Value>(
    versions: &mut HashMap<K, Versions<V>, foldhash::fast::RandomState>,
    owners: &[NodeId],
    tombs: &[TombstoneChunk<K>],
) {
    let mut dead: HashMap<&K, (u64, &NodeId)> = HashMap::new();
    for (towners, ts) in tombs {
        for t in ts {
            let Some(o) = towners.get(t.owner as usize) else {
                continue;
            };
            let e = dead.entry(&t.key).or_insert((t.ts, o));
            if (t.ts, o) > *e {
                *e = (t.ts, o);
            }
        }
    }
    let mut gone: Vec<K> = Vec::new();
    for (k, vs) in versions.iter_mut() {
        let Some(&(dts, downer)) = dead.get(k) else {
            continue;
        };
        let alive = |v: &Version<V>| match owners.get(v.owner as usize) {
            Some(o) => (v.ts, o) > (dts, downer),
            None => false,
        };
        let mut all: Vec<(usize, Version<V>)> = std::iter::once(vs.first.clone())
            .chain(vs.rest.drain(..))
            .filter(|(_, v)| alive(v))
            .collect();
        if all.is_empty() {
            gone.push(k.clone());
            continue;
        }
        vs.first = all.remove(0);
        vs.rest = all;
    }
    for k in gone {
        versions.remove(&k);
    }
}

/// Picks the winner of two versions of one key.
fn resolve<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    key: &K,
    a: Version<V>,
    b: &Version<V>,
    owners: &[NodeId],
) -> Result<Version<V>> {
    let owner = |v: &Version<V>| owners.get(v.owner as usize).cloned();
    match &ctx.conflict {
        Conflict::LastWriterWins => {
            let order = (b.ts, owner(b))
                .cmp(&(a.ts, owner(&a)))
                .then_with(|| value_order(&b.value, &a.value));
            Ok(if order == std::cmp::Ordering::Greater {
                b.clone()
            } else {
                a
            })
        }
        Conflict::Handler(f) => {
            // A version that expired since its dump is no version: the handler's value would
            // get a new stamp and live again for a whole lifetime.
            let from = ctx.expire_ms.map_or(0, HybridClock::written_since);
            if b.ts < from {
                return Ok(a);
            }
            if a.ts < from {
                return Ok(b.clone());
            }
            // `a` is the version from the side of the smaller node name (dump order).
            // A panic fails this join (logged with the key), which is retried later.
            let value = crate::callbacks::guarded(&ctx.table, "conflict handler", key, || {
                f(key, &a.value, &b.value)
            })?;
            Ok(if same_value(&value, &a.value) {
                a
            } else if same_value(&value, &b.value) {
                b.clone()
            } else {
                Version {
                    value,
                    ts: ctx.clock.now(),
                    owner: a.owner,
                    ttl: a.ttl,
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<NodeId> {
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

    #[test]
    fn a_dump_chunk_brings_records_unless_last_and_names_owners_of_the_join() {
        let everyone = ids(&["a", "b"]);
        let rec = || WireRecord {
            key: 1u64,
            value: 2u64,
            ts: 3,
            owner: 0,
            ttl: 0,
        };
        assert!(check_chunk(&ids(&["a"]), &[rec()], false, &everyone, false).is_ok());
        assert!(check_chunk::<u64, u64>(&[], &[], true, &everyone, false).is_ok());
        assert!(check_chunk::<u64, u64>(&ids(&["a"]), &[], false, &everyone, false).is_err());
        assert!(check_chunk(&ids(&["a", "z"]), &[rec()], true, &everyone, false).is_err());
    }
}
