//! Anti-entropy, the decision (ALGORITHM.md, section 15.3): per differing key (per object in a
//! bag), which side's version stays, what this side removes and what it sends and asks for.

use super::repair::WireOut;
use crate::digest::{self, bucket_of, key_hash};
use crate::proto::{AeEntry, AeMsg};
use crate::server::*;

/// What anti-entropy does about one unit (a key, or an object of a bag) of a differing bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repair {
    /// Nothing: the same version on both sides, or a record of a third member, left to the
    /// comparisons of each side with its owner.
    Nothing,
    /// Both hold it in different versions: each sends its own, and each side stores the
    /// other's by the rule of a replicated write, so both keep the winner.
    Exchange,
    /// Only this side holds it, and owns it (or the table is cluster-owned): it is copied.
    Send,
    /// Only this side holds it, owned by the peer, which deleted it or never had it: this side
    /// drops that version.
    RemoveHere,
    /// Only the peer holds it, and owns it (or the table is cluster-owned): this side asks.
    Want,
    /// Only the peer holds it, owned by this side, or deleted here by a newer tombstone: the
    /// peer drops that version.
    RemoveThere,
}

/// A version as the decision sees it: its timestamp, its owner's identity (if known) and its
/// value's hash.
pub(super) type Seen<'a> = (u64, Option<&'a NodeId>, u64);

/// The decision for one unit, held here (`mine`) and there (`theirs`) in these versions, from
/// the member `me` comparing with `peer` (ALGORITHM.md, section 15.3); `deleted_here`: a
/// tombstone here is newer than the peer's version. A cluster-owned record has no live owner:
/// the union is kept, less what a tombstone refuses (which comes back as a removal).
pub(super) fn repair_decision(
    mine: Option<Seen<'_>>,
    theirs: Option<Seen<'_>>,
    me: &NodeId,
    peer: &NodeId,
    cluster: bool,
    deleted_here: bool,
) -> Repair {
    match (mine, theirs) {
        (Some(m), Some(t)) if m == t => Repair::Nothing,
        (Some(_), Some(_)) => Repair::Exchange,
        (Some((_, owner, _)), None) if owner == Some(peer) => Repair::RemoveHere,
        (Some((_, owner, _)), None) if owner == Some(me) || cluster => Repair::Send,
        (None, Some((_, Some(owner), _))) if owner == me || deleted_here => Repair::RemoveThere,
        (None, Some((_, Some(owner), _))) if owner == peer || cluster => Repair::Want,
        _ => Repair::Nothing,
    }
}

impl<K: Key, V: Value> Server<K, V> {
    /// Decides every differing key of `buckets` from the peer's entries and ours, repairs our
    /// side and sends the peer its repair.
    /// `cut`: a comparison at a cut (`cut.rs`), which repairs only confirmed differences.
    pub(in crate::server) fn ae_decide(
        &mut self,
        key: OwnerIdx,
        peer: &NodeId,
        buckets: &[u32],
        their_owners: &[NodeId],
        theirs: Vec<AeEntry<K>>,
        cut: Option<(u64, super::cut::CutStamps)>,
    ) {
        let bag = self.shared.kind == TableKind::Bag;
        let cluster = self.cluster_owned();
        // One unit per key, or per object in a bag.
        let unit = |e: &AeEntry<K>| (e.key.clone(), if bag { e.value } else { 0 });
        // As many of the buckets as this side can list in one round: a peer's list must not
        // make it hold the whole table.
        let kept = self.ae_budget(buckets, &[]);
        let all = kept.len() == buckets.len();
        let mut keep = vec![false; digest::BUCKETS];
        for &b in &kept {
            if let Some(k) = keep.get_mut(b as usize) {
                *k = true;
            }
        }
        let (_, my_owners, mine) = self.ae_entries(&kept, false);
        let mut their_map: HashMap<(K, u64), AeEntry<K>> = HashMap::new();
        for e in theirs {
            if all
                || keep
                    .get(bucket_of(key_hash(&e.key)))
                    .copied()
                    .unwrap_or(false)
            {
                their_map.insert(unit(&e), e);
            }
        }
        let mut mine_map: HashMap<(K, u64), AeEntry<K>> = HashMap::new();
        for e in mine {
            mine_map.insert(unit(&e), e);
        }
        if let Some(cut) = cut {
            let (mine, theirs) = (&mut mine_map, &mut their_map);
            self.ae_cut_filter(key, cut, &my_owners, their_owners, mine, theirs);
        }
        let mut out = WireOut::default();
        let mut remove_there: Vec<AeEntry<K>> = Vec::new();
        let mut remove_here: Vec<(K, u64, OwnerIdx, u64)> = Vec::new();
        let mut want: Vec<(K, u64)> = Vec::new();
        let mut differences = 0u64;
        for (u, m) in &mine_map {
            let t = their_map.get(u);
            let seen_there = t.map(|t| (t.ts, their_owners.get(t.owner as usize), t.value));
            let seen_here = (m.ts, my_owners.get(m.owner as usize), m.value);
            match repair_decision(Some(seen_here), seen_there, &self.me, peer, cluster, false) {
                Repair::Exchange => {
                    differences += 1;
                    if let Some(rec) = self.ae_record(&m.key, m.value) {
                        out.push(m.key.clone(), rec, &self.owners);
                    }
                    if let Some(t) = t {
                        want.push((t.key.clone(), t.value));
                    }
                }
                Repair::RemoveHere => {
                    if let Some(owner) = self.owners.lookup(peer) {
                        differences += 1;
                        remove_here.push((m.key.clone(), m.ts, owner, m.value));
                    }
                }
                Repair::Send => {
                    differences += 1;
                    if let Some(rec) = self.ae_record(&m.key, m.value) {
                        out.push(m.key.clone(), rec, &self.owners);
                    }
                }
                // (Only for what the peer alone holds.)
                Repair::Nothing | Repair::Want | Repair::RemoveThere => {}
            }
        }
        let mut wire_owners: Vec<NodeId> = out.owners.clone();
        for (u, t) in &their_map {
            if mine_map.contains_key(u) {
                continue;
            }
            let owner = their_owners.get(t.owner as usize);
            let deleted_here = !bag && owner.is_some_and(|o| self.tombstone_beats(&t.key, t.ts, o));
            let seen_there = Some((t.ts, owner, t.value));
            match repair_decision(None, seen_there, &self.me, peer, cluster, deleted_here) {
                Repair::RemoveThere => {
                    let Some(owner) = owner else {
                        continue;
                    };
                    differences += 1;
                    let i = match wire_owners.iter().position(|o| o == owner) {
                        Some(i) => i,
                        None => {
                            wire_owners.push(owner.clone());
                            wire_owners.len() - 1
                        }
                    };
                    remove_there.push(AeEntry {
                        owner: i as u32,
                        ..t.clone()
                    });
                }
                Repair::Want => {
                    differences += 1;
                    want.push((t.key.clone(), t.value));
                }
                Repair::Nothing | Repair::Exchange | Repair::RemoveHere | Repair::Send => {}
            }
        }
        if differences == 0 {
            return;
        }
        let span = crate::metrics::repair_span(&self.me.name, &self.shared.name, &peer.name);
        let _in_span = span.enter();
        tracing::warn!(
            table = %self.shared.name,
            %peer,
            keys = differences,
            "anti-entropy: replicas differ (a write was lost or applied differently); repairing"
        );
        let mut changed = 0u64;
        let watch = self.watch();
        for (k, ts, owner, vh) in remove_here {
            changed += u64::from(self.ae_remove_version(&k, ts, owner, vh));
        }
        self.emit(watch, notify::Cause::Repair(peer.clone()));
        self.metrics.repairs.increment(changed);
        if let Some(p) = self.ae_peer(key) {
            p.differences += differences;
            p.repaired += changed;
        }
        let msg = AeMsg::Repair {
            owners: wire_owners,
            records: out.records,
            remove: remove_there,
            want,
            answer: true,
        };
        self.ae_send(key, msg);
    }
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

    #[test]
    fn the_owner_decides_a_unit_one_side_lacks_and_both_versions_travel_otherwise() {
        let (me, peer, third) = (id("a"), id("b"), id("c"));
        let (m, p, t) = (Some(&me), Some(&peer), Some(&third));
        use Repair::*;
        // (here, there, cluster-owned, deleted here, decision)
        type Case<'a> = (Option<Seen<'a>>, Option<Seen<'a>>, bool, bool, Repair);
        let cases: Vec<Case> = vec![
            (Some((5, m, 1)), Some((5, m, 1)), false, false, Nothing), // the same version
            (Some((5, m, 1)), Some((6, m, 1)), false, false, Exchange), // another stamp
            (Some((5, m, 1)), Some((5, p, 1)), false, false, Exchange), // another owner
            (Some((5, m, 1)), Some((5, m, 2)), false, false, Exchange), // another value
            (Some((5, m, 1)), None, false, false, Send),               // mine, it lacks it
            (Some((5, p, 1)), None, false, false, RemoveHere),         // its, it dropped it
            (Some((5, t, 1)), None, false, false, Nothing),            // a third member's
            (Some((5, t, 1)), None, true, false, Send),                // cluster-owned: union
            (Some((5, None, 1)), None, false, false, Nothing),         // owner unknown here
            (None, Some((5, p, 1)), false, false, Want),               // its, I lack it
            (None, Some((5, m, 1)), false, false, RemoveThere),        // mine, I dropped it
            (None, Some((5, p, 1)), false, true, RemoveThere),         // a newer delete here
            (None, Some((5, t, 1)), false, false, Nothing),            // a third member's
            (None, Some((5, t, 1)), true, false, Want),                // cluster-owned: union
            (None, Some((5, t, 1)), true, true, RemoveThere),          // ... less the deleted
            (None, Some((5, None, 1)), true, true, Nothing),           // owner unknown there
            (None, None, false, false, Nothing),
        ];
        for (i, (here, there, cluster, deleted, want)) in cases.into_iter().enumerate() {
            let got = repair_decision(here, there, &me, &peer, cluster, deleted);
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn both_sides_decide_alike() {
        // Each side runs the decision from its own point of view: what one sends, the other
        // wants; what one removes here, the other is told to remove there.
        let (a, b) = (id("a"), id("b"));
        for owner in [Some(&a), Some(&b)] {
            for held_by_a in [true, false] {
                let seen: Seen = (5, owner, 1);
                let (at_a, at_b) = if held_by_a {
                    (Some(seen), None)
                } else {
                    (None, Some(seen))
                };
                let from_a = repair_decision(at_a, at_b, &a, &b, false, false);
                let from_b = repair_decision(at_b, at_a, &b, &a, false, false);
                let mirrored = match from_a {
                    Repair::Send => Repair::Want,
                    Repair::Want => Repair::Send,
                    Repair::RemoveHere => Repair::RemoveThere,
                    Repair::RemoveThere => Repair::RemoveHere,
                    r => r,
                };
                assert_eq!(from_b, mirrored, "owner {owner:?}, held by a: {held_by_a}");
            }
        }
    }
}
