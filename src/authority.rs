//! Owner authority in a join (ALGORITHM.md, section 16): a record owned by a node of the join
//! is taken from that node's side only. A copy of it elsewhere that its owner's side does not
//! hold in that very version is stale: a node that kept it while it was linked to the owner but
//! not its member (a view split, an ack timeout, a cut between two other nodes) missed the
//! owner's later delete or overwrite, and a union would give the old version back to everyone.
//! Stale copies are neither sent nor kept: the join removes them where they are
//! (`JoinReq::Stale`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::bag::encoding;
use crate::membership::NodeId;
use crate::proto::WireRecord;
use crate::store::same_value;
use crate::types::{Key, Value};

/// A source's dump: its chunks, each with the owner list its records index.
pub(crate) type Dump<K, V> = Vec<(Vec<NodeId>, Vec<WireRecord<K, V>>)>;

/// Who missed whose writes, as each locked node reported (`JoinRep::Paused::missed`).
#[derive(Default)]
pub(crate) struct Missed(BTreeMap<NodeId, Vec<NodeId>>);

impl Missed {
    pub(crate) fn note(&mut self, node: &NodeId, missed: Vec<NodeId>) {
        self.0.insert(node.clone(), missed);
    }

    /// Whether writes of `a` or `b` did not reach the other since they last joined, by either's
    /// account: then their copies of each other's records may be stale.
    pub(crate) fn apart(&self, a: &NodeId, b: &NodeId) -> bool {
        let says = |x: &NodeId, y: &NodeId| self.0.get(x).is_some_and(|m| m.contains(y));
        says(a, b) || says(b, a)
    }

    /// Whether some locked node reports `o` (its writes or ours did not get through).
    fn marks(&self, o: &NodeId) -> bool {
        self.0.values().any(|m| m.contains(o))
    }
}

/// The linked nodes outside the join whose records the join carries and keeps: every node of
/// the join (`all`) has a ready link to it (`reach`, from `JoinRep::Paused`), and none reports
/// it in `missed`. Their copies on the join's nodes are then exact, but for what a writer that
/// died halfway changed on some of them only, which the union of the join repairs (ALGORITHM.md,
/// section 8): dropping them instead would leave that repair to the owner's side, which may be
/// the one the dying writer changed. Records of any other node outside the join are dropped
/// at its end (`Server::drop_outsiders`).
pub(crate) fn kept_outsiders(
    all: &BTreeSet<NodeId>,
    reach: &BTreeMap<NodeId, Vec<NodeId>>,
    missed: &Missed,
) -> Vec<NodeId> {
    let mut keep: Option<BTreeSet<&NodeId>> = None;
    for n in all {
        let seen: BTreeSet<&NodeId> = reach.get(n).into_iter().flatten().collect();
        keep = Some(match keep {
            None => seen,
            Some(k) => k.intersection(&seen).copied().collect(),
        });
    }
    keep.unwrap_or_default()
        .into_iter()
        .filter(|o| !all.contains(*o) && !missed.marks(o))
        .cloned()
        .collect()
}

/// Two consistent sides (`sides[i]`: the nodes dump `i` stands for): takes out of each dump the
/// records owned by a node of the other side that the other side's dump does not hold in the
/// same version (stamp, owner and value), and returns them, per dump, with their owner lists.
/// Those go to the dump's own side as `Stale` (they are removed there) and not to the other.
///
/// Costs a pass over each dump's owner indexes; only when a dump holds records of the other
/// side's nodes (a split between linked nodes, not a fresh node or a healed partition, whose
/// copies went with the node-down) does it index the other dump's versions of those keys.
pub(crate) fn strip_stale<K: Key, V: Value>(
    dumps: &mut [Dump<K, V>; 2],
    sides: [&[NodeId]; 2],
    missed: &Missed,
) -> [Dump<K, V>; 2] {
    let mut stale: [Dump<K, V>; 2] = [Vec::new(), Vec::new()];
    for s in 0..2 {
        let other = 1 - s;
        // Keys of records of dump `s` owned by the other side.
        let mut wanted: HashMap<K, Option<(u64, NodeId, V)>> = HashMap::new();
        for (owners, records) in &dumps[s] {
            let foreign: Vec<bool> = owners
                .iter()
                .map(|o| sides[other].contains(o) && sides[s].iter().any(|x| missed.apart(x, o)))
                .collect();
            for r in records {
                if foreign.get(r.owner as usize).copied().unwrap_or(false) {
                    wanted.insert(r.key.clone(), None);
                }
            }
        }
        if wanted.is_empty() {
            continue;
        }
        for (owners, records) in &dumps[other] {
            for r in records {
                if let (Some(slot), Some(owner)) =
                    (wanted.get_mut(&r.key), owners.get(r.owner as usize))
                {
                    *slot = Some((r.ts, owner.clone(), r.value.clone()));
                }
            }
        }
        for (owners, records) in dumps[s].iter_mut() {
            let foreign: Vec<bool> = owners
                .iter()
                .map(|o| sides[other].contains(o) && sides[s].iter().any(|x| missed.apart(x, o)))
                .collect();
            let (mut keep, mut out) = (Vec::with_capacity(records.len()), Vec::new());
            for r in records.drain(..) {
                let held = || {
                    let owner = owners.get(r.owner as usize);
                    wanted
                        .get(&r.key)
                        .and_then(Option::as_ref)
                        .is_some_and(|(ts, o, v)| {
                            *ts == r.ts && Some(o) == owner && same_value(v, &r.value)
                        })
                };
                if foreign.get(r.owner as usize).copied().unwrap_or(false) && !held() {
                    out.push(r);
                } else {
                    keep.push(r);
                }
            }
            *records = keep;
            if !out.is_empty() {
                stale[s].push((owners.clone(), out));
            }
        }
    }
    stale
}

/// A version as `stale_versions` looks it up: source, stamp, owner and the value's encoding.
type Held = (usize, u64, u32, Vec<u8>);

/// Which versions of one key are stale. `versions[i]` is `(source, ts, owner, value)`, `owner`
/// indexing the join's owner list; `auth[owner]` is the source that stands for the owner's
/// side (`None`: the owner is not a node of the join, and no source decides for it). A version
/// is stale when a source other than its owner's holds it, the owner's does not, and the two
/// were not members of each other (`apart(source, owner's source)`): a member of the owner got
/// every write the owner made since the join that made them members, so its copy missed none
/// of them (it can differ only by a writer that died halfway, which the union repairs, section
/// 8).
pub(crate) fn stale_versions<V: Value>(
    versions: &[(usize, u64, u32, &V)],
    auth: &[Option<usize>],
    apart: impl Fn(usize, usize) -> bool,
) -> Vec<bool> {
    // Every version by (source, stamp, owner, encoding), built at the first version that needs
    // it: a bag key has a version per object and source, and comparing each with every other
    // one is quadratic.
    let mut held: Option<HashSet<Held>> = None;
    versions
        .iter()
        .map(|&(src, ts, owner, value)| match auth.get(owner as usize) {
            Some(&Some(a)) if a != src && apart(src, a) => {
                let held = held.get_or_insert_with(|| {
                    versions
                        .iter()
                        .map(|&(s, t, o, v)| (s, t, o, encoding(v)))
                        .collect()
                });
                !held.contains(&(a, ts, owner, encoding(value)))
            }
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            incarnation: 1,
        }
    }

    fn rec(key: &str, value: u64, ts: u64, owner: u32) -> WireRecord<String, u64> {
        WireRecord {
            key: key.into(),
            value,
            ts,
            owner,
            ttl: 0,
        }
    }

    #[test]
    fn a_copy_the_owners_side_does_not_hold_is_stale_and_not_sent() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        // Side 0 is {a}; side 1 is {b, c}. b and c kept a's "k" (a deleted it) and an old
        // version of a's "m" (a overwrote it); both hold a's "n" as a does; c's own "x".
        let mut dumps: [Dump<String, u64>; 2] = [
            vec![(
                vec![a.clone()],
                vec![rec("m", 2, 20, 0), rec("n", 3, 30, 0)],
            )],
            vec![(
                vec![a.clone(), c.clone()],
                vec![
                    rec("k", 1, 10, 0),
                    rec("m", 1, 15, 0),
                    rec("n", 3, 30, 0),
                    rec("x", 9, 5, 1),
                ],
            )],
        ];
        let sides = [&[a.clone()][..], &[b.clone(), c.clone()][..]];
        // b missed a's writes (a reported it).
        let mut missed = Missed::default();
        missed.note(&a, vec![b.clone()]);
        let stale = strip_stale(&mut dumps, sides, &missed);
        assert!(stale[0].is_empty());
        let gone: Vec<&str> = stale[1][0].1.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(gone, ["k", "m"]);
        let sent: Vec<&str> = dumps[1][0].1.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(sent, ["n", "x"]);
        assert_eq!(dumps[0][0].1.len(), 2, "a's own dump is its truth");
        // Had b and c missed none of a's writes, their copies would count like a's.
        let mut again: [Dump<String, u64>; 2] = [Vec::new(), stale[1].clone()];
        let none = strip_stale(&mut again, sides, &Missed::default());
        assert!(none[1].is_empty());
    }

    #[test]
    fn an_outsider_is_kept_if_every_node_reaches_it_and_none_missed_its_writes() {
        let (a, b, c, d) = (id("a"), id("b"), id("c"), id("d"));
        let all: BTreeSet<NodeId> = [a.clone(), c.clone()].into();
        let mut reach = BTreeMap::new();
        reach.insert(a.clone(), vec![b.clone(), c.clone(), d.clone()]);
        reach.insert(c.clone(), vec![a.clone(), b.clone()]);
        // b: reached by both, marked by none; d: not reached by c.
        assert_eq!(
            kept_outsiders(&all, &reach, &Missed::default()),
            vec![b.clone()]
        );
        // c reports b (a new link, or writes that did not get through): b is not kept.
        let mut missed = Missed::default();
        missed.note(&c, vec![b.clone()]);
        assert!(kept_outsiders(&all, &reach, &missed).is_empty());
        // A node that reported nothing reaches nobody.
        reach.remove(&c);
        assert!(kept_outsiders(&all, &reach, &Missed::default()).is_empty());
    }

    #[test]
    fn a_version_counts_only_if_its_owners_source_holds_it() {
        // Owner 0 is stood for by source 0, owner 1 by nobody (outside the join).
        let auth = [Some(0), None];
        let apart = |_, _| true;
        let (one, two) = (1u64, 2u64);
        // Source 1 holds owner 0's version at ts 10, source 0 (the owner's) does not.
        assert_eq!(stale_versions(&[(1, 10, 0, &one)], &auth, apart), [true]);
        // Both hold it: not stale.
        assert_eq!(
            stale_versions(&[(0, 10, 0, &one), (1, 10, 0, &one)], &auth, apart),
            [false, false]
        );
        // The owner's source holds another value with the same stamp: stale.
        assert_eq!(
            stale_versions(&[(0, 10, 0, &two), (1, 10, 0, &one)], &auth, apart),
            [false, true]
        );
        // An owner outside the join: no source decides for it.
        assert_eq!(stale_versions(&[(1, 10, 1, &one)], &auth, apart), [false]);
        // Source 1 was the owner's member: its copy missed none of the owner's writes.
        assert_eq!(
            stale_versions(&[(1, 10, 0, &one)], &auth, |_, _| false),
            [false]
        );
    }
}
