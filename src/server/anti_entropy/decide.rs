//! Anti-entropy, the decision (ALGORITHM.md, section 15.3): per differing key (per object in a
//! bag), which side's version stays, what this side removes and what it sends and asks for.

use super::repair::WireOut;
use crate::digest::{self, bucket_of, key_hash};
use crate::proto::{AeEntry, AeMsg};
use crate::server::*;

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
            let my_owner = my_owners.get(m.owner as usize);
            match their_map.get(u) {
                Some(t) => {
                    let their_owner = their_owners.get(t.owner as usize);
                    if t.ts == m.ts && t.value == m.value && their_owner == my_owner {
                        continue;
                    }
                    differences += 1;
                    if let Some(rec) = self.ae_record(&m.key, m.value) {
                        out.push(m.key.clone(), rec, &self.owners);
                    }
                    want.push((t.key.clone(), t.value));
                }
                None => {
                    if my_owner == Some(peer) {
                        let owner = self.owners.lookup(peer);
                        if let Some(owner) = owner {
                            differences += 1;
                            remove_here.push((m.key.clone(), m.ts, owner, m.value));
                        }
                    } else if my_owner == Some(&self.me) || cluster {
                        // (A cluster-owned record has no live owner: the union, less what a
                        // tombstone there refuses, which comes back as a removal.)
                        differences += 1;
                        if let Some(rec) = self.ae_record(&m.key, m.value) {
                            out.push(m.key.clone(), rec, &self.owners);
                        }
                    }
                }
            }
        }
        let mut wire_owners: Vec<NodeId> = out.owners.clone();
        for (u, t) in &their_map {
            if mine_map.contains_key(u) {
                continue;
            }
            let Some(owner) = their_owners.get(t.owner as usize) else {
                continue;
            };
            let deleted_here = !bag && self.tombstone_beats(&t.key, t.ts, owner);
            if *owner == self.me || deleted_here {
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
            } else if owner == peer || cluster {
                differences += 1;
                want.push((t.key.clone(), t.value));
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
