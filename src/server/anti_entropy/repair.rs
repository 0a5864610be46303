//! Anti-entropy, the repair (ALGORITHM.md, section 15.3): storing a member's records by the rule
//! of a replicated write, removing the versions it decided against, answering what it asked for.

use crate::digest::value_hash;
use crate::proto::{AeEntry, AeMsg};
use crate::server::*;
use crate::store::Store;

impl<K: Key, V: Value> Server<K, V> {
    /// A member's repair: its records stored by the rule of a replicated write, the versions it
    /// decided to remove removed; answered with the records it wants and the versions a
    /// tombstone here refused.
    pub(super) fn ae_on_repair(
        &mut self,
        key: OwnerIdx,
        peer: &NodeId,
        owners: Vec<NodeId>,
        records: Vec<WireRecord<K, V>>,
        remove: Vec<AeEntry<K>>,
        (want, answer): (Vec<(K, u64)>, bool),
    ) {
        let span = crate::metrics::repair_span(&self.me.name, &self.shared.name, &peer.name);
        let _in_span = span.enter();
        let watch = self.watch();
        let (mut changed, (refused_owners, refused)) = self.ae_store(&owners, records);
        for e in remove {
            let owner = owners
                .get(e.owner as usize)
                .and_then(|id| self.owners.lookup(id));
            if let Some(owner) = owner {
                changed += u64::from(self.ae_remove_version(&e.key, e.ts, owner, e.value));
            }
        }
        self.emit(watch, notify::Cause::Repair(peer.clone()));
        if changed > 0 {
            tracing::warn!(table = %self.shared.name, peer = %peer, records = changed, "anti-entropy: records repaired");
            self.metrics.repairs.increment(changed);
            if let Some(p) = self.ae_peer(key) {
                p.repaired += changed;
            }
        }
        // The records asked for, and the versions a tombstone here refused (the
        // sender drops them). A message without `answer` is not answered, so this
        // ends after at most two more messages.
        let mut out = WireOut::default();
        if answer {
            for (k, vh) in want {
                if let Some(rec) = self.ae_record(&k, vh) {
                    out.push(k, rec, &self.owners);
                }
            }
        }
        if !out.records.is_empty() || !refused.is_empty() {
            let mut ids = out.owners;
            let remove = refused
                .into_iter()
                .filter_map(|e| {
                    let id = refused_owners.get(e.owner as usize)?;
                    let i = match ids.iter().position(|o| o == id) {
                        Some(i) => i,
                        None => {
                            ids.push(id.clone());
                            ids.len() - 1
                        }
                    };
                    Some(AeEntry {
                        owner: i as u32,
                        ..e
                    })
                })
                .collect();
            let msg = AeMsg::Repair {
                owners: ids,
                records: out.records,
                remove,
                want: Vec::new(),
                answer: false,
            };
            self.ae_send(key, msg);
        }
    }

    /// Whether the key's tombstone here is newer than a record stamped `(ts, owner)`.
    pub(super) fn tombstone_beats(&self, k: &K, ts: u64, owner: &NodeId) -> bool {
        self.tombstones
            .get(k)
            .is_some_and(|t| (t.ts, self.owners.get(t.owner)) > (ts, Some(owner)))
    }

    /// The stored record of a key (of the object with value hash `vh`, in a bag).
    pub(super) fn ae_record(&self, k: &K, vh: u64) -> Option<Rec<V>> {
        match &*self.shared.store {
            Store::Bag { map, .. } => map
                .read(k, |list| {
                    list.find_hash(vh).and_then(|i| list.get(i)).cloned()
                })
                .flatten(),
            _ => self.shared.store.records(k).into_iter().next(),
        }
    }

    /// Removes the version of a key stamped `(ts, owner)` (the object with value hash `vh`,
    /// in a bag) if it is still stored; whether it was.
    pub(super) fn ae_remove_version(&self, k: &K, ts: u64, owner: OwnerIdx, vh: u64) -> bool {
        match self.ae_record(k, vh) {
            Some(r) if r.ts == ts && r.owner == owner => {
                if self.shared.kind == TableKind::Bag {
                    self.shared.store.remove_object(k, &r.value)
                } else {
                    self.shared.store.remove_if(k, |s| s == (ts, owner)) == Some(true)
                }
            }
            _ => false,
        }
    }

    /// Stores repair records by the rule of a replicated write; returns how many changed the
    /// store. Records whose owner is not alive here are skipped, as a join does.
    fn ae_store(
        &mut self,
        owners: &[NodeId],
        records: Vec<WireRecord<K, V>>,
    ) -> (u64, (Vec<NodeId>, Vec<AeEntry<K>>)) {
        // Owners alive here (in a cluster-owned table, writer names too), as a join takes them.
        let map: Vec<Option<OwnerIdx>> = owners
            .iter()
            .map(|id| self.join_owner_ok(id).then(|| self.owners.intern(id)))
            .collect();
        let bag = self.shared.kind == TableKind::Bag;
        let mut recs = Vec::with_capacity(records.len());
        let mut changed = 0u64;
        for r in records {
            let Some(&Some(owner)) = map.get(r.owner as usize) else {
                continue;
            };
            self.clock.observe(r.ts);
            if bag {
                // A bag adds an object it lacks without asking: count it here.
                let vh = value_hash(&r.value);
                if self.ae_record(&r.key, vh).is_none() {
                    changed += 1;
                }
            }
            let rec = Rec {
                value: r.value,
                ts: r.ts,
                owner,
                ttl: r.ttl,
            };
            recs.push((r.key, rec));
        }
        let (owners, tombstones) = (&self.owners, &self.tombstones);
        let mut untombstoned = Vec::new();
        // Records a tombstone here refused: the sender drops them (`AeMsg::Repair::remove`).
        let mut refused = Vec::new();
        self.shared.store.put_many_if(recs, |k, new, cur| {
            let stamp = (new.ts, owners.get(new.owner));
            let won = match cur {
                Some(c) => match stamp.cmp(&(c.ts, owners.get(c.owner))) {
                    Ordering::Greater => true,
                    Ordering::Less => false,
                    Ordering::Equal => {
                        !bag && value_order(&new.value, &c.value) == Ordering::Greater
                    }
                },
                None => match tombstones.get(k) {
                    Some(t) if !bag => {
                        let won =
                            crate::server::rules::beats_tombstone(stamp, &new.value, t, owners);
                        if won {
                            untombstoned.push(k.clone());
                        } else {
                            refused.push((k.clone(), new.ts, new.owner, value_hash(&new.value)));
                        }
                        won
                    }
                    _ => true,
                },
            };
            if won && !(bag && cur.is_none()) {
                changed += 1;
            }
            won
        });
        for k in untombstoned {
            self.tombstones.remove(&k);
        }
        let mut ids: Vec<NodeId> = Vec::new();
        let refused = refused
            .into_iter()
            .filter_map(|(key, ts, owner, value)| {
                let id = self.owners.get(owner)?;
                let i = match ids.iter().position(|o| o == id) {
                    Some(i) => i,
                    None => {
                        ids.push(id.clone());
                        ids.len() - 1
                    }
                };
                Some(AeEntry {
                    key,
                    ts,
                    owner: i as u32,
                    value,
                })
            })
            .collect();
        (changed, (ids, refused))
    }
}

/// Records on their way to a peer, with their owners as a list.
pub(super) struct WireOut<K, V> {
    pub(super) owners: Vec<NodeId>,
    pub(super) records: Vec<WireRecord<K, V>>,
}

impl<K, V> Default for WireOut<K, V> {
    fn default() -> Self {
        Self {
            owners: Vec::new(),
            records: Vec::new(),
        }
    }
}

impl<K, V> WireOut<K, V> {
    pub(super) fn push(&mut self, key: K, rec: Rec<V>, owners: &Owners) {
        let Some(id) = owners.get(rec.owner) else {
            return;
        };
        let i = match self.owners.iter().position(|o| o == id) {
            Some(i) => i,
            None => {
                self.owners.push(id.clone());
                self.owners.len() - 1
            }
        };
        self.records.push(WireRecord {
            key,
            value: rec.value,
            ts: rec.ts,
            owner: i as u32,
            ttl: rec.ttl,
        });
    }
}
