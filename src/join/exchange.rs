//! Steps 6 to 8 of a join between two consistent partitions under last writer wins
//! (ALGORITHM.md, section 9.2, step 7 "Exchange"): each side gets the other side's dump and keeps
//! the later version per key; no union is built in one place.

use super::apply::send_stale;
use super::dump::{check_chunk, check_tombstones, DumpBound};
use super::lock::Lease;
use super::JoinCtx;
use super::TombstoneChunk;
use std::collections::BTreeMap;

use crate::authority::{self, Dump};
use crate::membership::NodeId;
use crate::proto::{JoinRep, JoinReq, WireRecord};
use crate::types::{Key, Value};
use crate::Result;

/// Steps 6 to 8 for two consistent partitions under last writer wins: each source's dump goes
/// to the nodes of the other partition, which keep per key the later of their record and the
/// dumped one (`Apply { merge: Some(all) }`, where a stored record whose owner is not in `all`
/// counts as absent: it was not dumped, as in a central merge). Both sides compare the same
/// `(timestamp, owner)` stamps, so they end identical, as with a central merge, without building
/// the union in one place. Both dumps are complete before anything is applied, so a source that
/// fails halfway leaves nothing behind. The two sides get their chunks in turn, and apply them at
/// once; group 0's last chunk (with the member list) goes before group 1's.
pub(super) async fn exchange<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    peer: &NodeId,
    join: u64,
    groups: [&(NodeId, Vec<NodeId>); 2],
    (everyone, dumped): (&[NodeId], &[NodeId]),
    (missed, sizes): (&authority::Missed, &BTreeMap<NodeId, u64>),
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
        let mut bound = DumpBound::new(ctx, sizes.get(src));
        loop {
            match ctx.next(src, &mut rx[from]).await? {
                JoinRep::Chunk {
                    owners,
                    records,
                    last,
                } => {
                    if let Err(why) = check_chunk(&owners, &records, last, dumped, ctx.cluster)
                        .and_then(|()| bound.take(records.len()))
                    {
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
    // Group `to` gets the other side's dump: its tombstones first (cluster-owned tables), then
    // its records.
    let mut out: [std::vec::IntoIter<_>; 2] = [dump1.into_iter(), dump0.into_iter()];
    for (to, tombs) in [(0usize, tombs1), (1, tombs0)] {
        for (owners, tombstones) in tombs {
            for t in &groups[to].1 {
                let body = JoinReq::Tombstones {
                    join,
                    owners: owners.clone(),
                    tombstones: tombstones.clone(),
                };
                waits.push((t.clone(), to, ctx.request(t, body)));
            }
        }
    }
    let mut send =
        |to: usize, (owners, records): (Vec<NodeId>, Vec<WireRecord<K, V>>), last: bool| {
            let apply = |owners, records| JoinReq::Apply {
                join,
                owners,
                records,
                members: last.then(|| everyone.to_vec()),
                merge: Some(dumped.to_vec()),
            };
            if let Some((final_target, others)) = groups[to].1.split_last() {
                for t in others {
                    let rx = ctx.request(t, apply(owners.clone(), records.clone()));
                    waits.push((t.clone(), to, rx));
                }
                let rx = ctx.request(final_target, apply(owners, records));
                waits.push((final_target.clone(), to, rx));
            }
        };
    // Every chunk but the last of each side, one group's and the other's in turn, so that both
    // sides apply at once (this node's table server applies its own chunks in the order they
    // come, and the other side's go out between them); then group 0's last chunk, which
    // carries the member list, and only then group 1's.
    loop {
        let mut sent = false;
        for (to, chunks) in out.iter_mut().enumerate() {
            if chunks.len() > 1 {
                if let Some(chunk) = chunks.next() {
                    send(to, chunk, false);
                    sent = true;
                }
            }
        }
        if !sent {
            break;
        }
    }
    let [mut last0, mut last1] = out;
    if let Some(chunk) = last0.next() {
        send(0, chunk, true);
    }
    if let Some(f) = &ctx.checkpoint {
        f("between_groups").await;
    }
    if let Some(chunk) = last1.next() {
        send(1, chunk, true);
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
