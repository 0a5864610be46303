//! Step 6 of a join (ALGORITHM.md, section 9.2): the sources' dumps, checked chunk by chunk
//! (`check_chunk`, `check_tombstones`) and, for a central merge, gathered per key (`collect`).

use std::collections::{BTreeMap, HashMap};

use super::decide::{Version, Versions};
use super::lock::Lease;
use super::{Group, JoinCtx, TombstoneChunk};
use crate::membership::NodeId;
use crate::ownership::is_writer_id;
use crate::proto::{JoinRep, JoinReq, WireRecord, WireTombstone};
use crate::types::{Key, Value};
use crate::Result;

/// What the dumps of a central merge brought.
pub(super) struct Dumps<K, V> {
    /// The owners the versions index.
    pub(super) owners: Vec<NodeId>,
    /// Every version of every key, with the source that holds it.
    pub(super) versions: HashMap<K, Versions<V>, foldhash::fast::RandomState>,
    /// Every source's tombstones (cluster-owned tables).
    pub(super) tombs: Vec<TombstoneChunk<K>>,
}

/// Asks every source of `groups` for its dump of the records of `dumped`, one after the other,
/// and gathers the versions per key, renewing the lease with each chunk.
pub(super) async fn collect<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    join: u64,
    groups: &[Group],
    dumped: &[NodeId],
    sizes: &BTreeMap<NodeId, u64>,
    lease: &mut Lease,
) -> Result<Dumps<K, V>> {
    let mut owners: Vec<NodeId> = Vec::new();
    let mut owner_idx: HashMap<NodeId, u32> = HashMap::new();
    // Sized once from what the sources said they hold (capped: the figure comes from the network).
    let expected = expected_records(groups, sizes);
    let mut versions: HashMap<K, Versions<V>, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(expected.min(1 << 21) as usize, Default::default());
    let mut tombs: Vec<TombstoneChunk<K>> = Vec::new();
    for (src_i, (src, _)) in groups.iter().enumerate() {
        let mut bound = DumpBound::new(ctx, sizes.get(src));
        let mut rx = ctx.request(
            src,
            JoinReq::Dump {
                join,
                alive: dumped.to_vec(),
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
                        check_chunk(&chunk_owners, &records, last, dumped, ctx.cluster)
                            .and_then(|()| bound.take(records.len()))
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
    Ok(Dumps {
        owners,
        versions,
        tombs,
    })
}

/// The records the sources of `groups` said they hold, in all. The figures come from the
/// network: the sum saturates rather than overflows.
fn expected_records(groups: &[Group], sizes: &BTreeMap<NodeId, u64>) -> u64 {
    groups
        .iter()
        .filter_map(|(src, _)| sizes.get(src))
        .fold(0u64, |all, n| all.saturating_add(*n))
}

/// The records a source's dump may bring: as many as it said it held when it paused
/// (`JoinRep::Paused::len`), with room for writes of its side's members that were still
/// arriving (the nodes of its side locked after it wait for theirs to be acknowledged), and
/// never more than `NodeConfig::max_join_records`. The coordinator holds a dump until it is
/// complete, so this bounds what a peer can make it hold, whatever it claims to hold; the bytes on the wire are not bounded, as a dump streams at the pace its source's
/// queue drains (the link's bulk lane, ALGORITHM.md section 19).
pub(super) struct DumpBound {
    left: u64,
}

impl DumpBound {
    pub(super) fn new<K, V>(ctx: &JoinCtx<K, V>, held: Option<&u64>) -> Self {
        Self::with(held.copied().unwrap_or(0), ctx.chunk, ctx.max_records)
    }

    /// The bound for a source that said it held `held` records, with chunks of `chunk`
    /// records, under the node's `max_records`.
    fn with(held: u64, chunk: usize, max_records: u64) -> Self {
        let room = (held / 2).saturating_add(4 * chunk as u64 + 65_536);
        DumpBound {
            left: held.saturating_add(room).min(max_records),
        }
    }

    pub(super) fn take(&mut self, records: usize) -> std::result::Result<(), &'static str> {
        match self.left.checked_sub(records as u64) {
            Some(left) => {
                self.left = left;
                Ok(())
            }
            None => Err("a dump larger than its source said it held, or than max_join_records"),
        }
    }
}

/// What a dump chunk must be. Records, unless it is the last: each chunk renews the join's
/// lease, so empty ones could keep the tables paused for as long as a source sends them. Owners
/// among those the dump was asked for only (the join's nodes; `send_dump` names no other), as
/// the coordinator keeps every name it is given. (The records of one dump are bounded by
/// `DumpBound`.)
pub(super) fn check_chunk<K, V>(
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

/// What a tombstone chunk must be: of a cluster-owned table, not empty, naming writer names only.
pub(super) fn check_tombstones<K, V>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::join::lock::tests::ids;

    #[test]
    fn the_sizes_sources_report_add_up_without_overflow() {
        let [a, b] = [ids(&["a"]), ids(&["b"])].map(|v| v[0].clone());
        let groups = vec![(a.clone(), vec![a.clone()]), (b.clone(), vec![b.clone()])];
        let sizes = BTreeMap::from([(a, 3), (b.clone(), 4)]);
        assert_eq!(expected_records(&groups, &sizes), 7);
        let hostile = BTreeMap::from([(b, u64::MAX), (groups[0].0.clone(), 1)]);
        assert_eq!(expected_records(&groups, &hostile), u64::MAX);
    }

    #[test]
    fn a_dump_brings_what_its_source_said_it_held_and_never_more_than_the_node_bound() {
        let taken = |mut bound: DumpBound, chunk: usize| {
            let mut n = 0u64;
            while bound.take(chunk).is_ok() {
                n += chunk as u64;
            }
            n
        };
        // Room for writes still arriving: half of what it held, and some chunks.
        assert_eq!(taken(DumpBound::with(0, 100, u64::MAX), 1), 65_936);
        assert_eq!(
            taken(DumpBound::with(1_000_000, 100, u64::MAX), 1000),
            1_565_000
        );
        // A source that claims to hold everything gets the node's bound, not its claim.
        assert_eq!(taken(DumpBound::with(u64::MAX, 100, 5_000), 1000), 5_000);
        assert_eq!(taken(DumpBound::with(u64::MAX / 2 + 7, 1 << 20, 10), 1), 10);
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
