//! Step 8 of a central merge (ALGORITHM.md, section 9.2): every group is sent its stale copies
//! to remove, every source's tombstones and its delta in chunks, the member list with the last
//! chunk.

use tokio::sync::mpsc;

use super::decide::Decided;
use super::lock::Lease;
use super::TombstoneChunk;
use super::{Group, JoinCtx};
use crate::authority::Dump;
use crate::membership::NodeId;
use crate::proto::{Chunker, JoinRep, JoinReq};
use crate::types::{Key, Value};
use crate::Result;

/// Sends what `decided` gives each group, then waits for every answer.
pub(super) async fn apply<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    join: u64,
    groups: &[Group],
    everyone: &[NodeId],
    (owners, tombs): (&[NodeId], &[TombstoneChunk<K>]),
    decided: Decided<K, V>,
    lease: &mut Lease,
) -> Result<()> {
    let Decided { deltas, stale, .. } = decided;
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
            vec![(owners.to_vec(), records)],
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
            owners: owners.to_vec(),
            records,
            members: (i + 1 == n).then(|| everyone.to_vec()),
            merge: None,
        };
        let Some((last, others)) = targets.split_last() else {
            continue;
        };
        // Every source's tombstones first, to every node: each removes older records and
        // refuses the older records of the deltas.
        for t in targets {
            for (owners, tombstones) in tombs {
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
    Ok(())
}

/// Sends stale copies (`authority`) to be removed from every node of a group; the replies
/// join `waits`.
pub(super) fn send_stale<K: Key, V: Value>(
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
