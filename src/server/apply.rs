//! Applying a write, local or replicated: newer wins (timestamp, then owner, then value),
//! tombstones, owners and orphans.

use super::rules;
use super::*;

/// A write being applied: an insert's records with their owners, or another write.
enum Inserted<K, V> {
    /// The records of an insert, each with its owner.
    Records(Vec<(K, Rec<V>)>),
    Other(OpKind<K, V>),
}

impl<K: Key, V: Value> Server<K, V> {
    /// Whether a removal stamped `(ts, owner)` (a delete, a dropped orphan) beats what is
    /// stored for `k` (or its tombstone), in the join's last-writer-wins order: timestamp, then
    /// owner identity. A removal wins a tie with a record, and so with the tombstone of one
    /// removed version, but not with another removal's tombstone (nothing would change).
    pub(super) fn newer(&self, k: &K, ts: u64, owner: OwnerIdx) -> bool {
        let owners = &self.owners;
        let stored = self
            .shared
            .store
            .meta(k)
            .map(|(cts, cowner)| (cts, owners.get(cowner)));
        let tombstone = if stored.is_some() || self.tombstones.is_empty() {
            None
        } else {
            self.tombstones.get(k).map(|t| rules::TombstoneStamp {
                stamp: (t.ts, owners.get(t.owner)),
                of_version: t.value.is_some(),
            })
        };
        rules::removal_beats((ts, owners.get(owner)), stored, tombstone)
    }

    /// The smallest watermark of the members (`u64::MAX` with none): every write a member
    /// still sends is stamped after it.
    pub(super) fn min_watermark(&self) -> u64 {
        self.peers.min_member_watermark()
    }

    /// Forgets the tombstones older than every member's clock (no member: all of them): no
    /// write they must stop is still on its way. Runs at every ack, so the map stays as small
    /// as the writes in flight (and in cache) under a stream of deletes.
    pub(super) fn forget_tombstones(&mut self) {
        if !self.object_deletes.is_empty() {
            let min = self.min_watermark();
            self.object_deletes.forget_up_to(min);
        }
        if self.tombstones.oldest_queued().is_none() {
            return;
        }
        let mut min = self.min_watermark();
        if self.cluster_owned() {
            // Kept for the retention, so that a join after a partition ships them.
            min = min.min(self.retention_floor());
        }
        self.tombstones.forget_up_to(min);
    }

    pub(super) fn add_tombstone(&mut self, k: K, t: Tombstone) {
        self.tombstones.add(k, t);
    }

    /// The tombstone of one removed version of `k` (stamp `ts`, `owner`, value `v`): it stops
    /// that version from coming back, while any other write of the key wins as it would have
    /// won against the version (`Tombstone::value`).
    fn add_version_tombstone(&mut self, k: K, v: &V, ts: u64, owner: OwnerIdx) {
        let value = postcard::to_stdvec(v).ok().map(Vec::into_boxed_slice);
        self.add_tombstone(k, Tombstone { ts, owner, value });
    }

    /// Records whose owner is down here (the writer did not know it yet): this node ends as
    /// the writer will once it hears of that node's end, without the record. A stored version
    /// of the key that the write would have replaced goes too, as it went on the writer; one
    /// the write does not beat stays. Where the write wins, it leaves a tombstone of its stamp,
    /// as the record it stands for leaves on the writer when dropped with its owner
    /// (`peer_down`): an older write still on its way to this node must not bring the key back
    /// here only.
    pub(super) fn drop_orphans(&mut self, ts: u64, orphans: Vec<(K, NodeId)>) {
        if self.shared.kind == TableKind::Bag {
            return;
        }
        let keep_tombstones = self.peers.has_members();
        for (k, owner) in orphans {
            let stamp = (ts, Some(&owner));
            let owners = &self.owners;
            let removed = self
                .shared
                .store
                .remove_if(&k, |(cts, co)| stamp >= (cts, owners.get(co)));
            if !keep_tombstones {
                continue;
            }
            let idx = self.gone_owner(&owner);
            if removed.unwrap_or_else(|| self.newer(&k, ts, idx)) {
                self.add_tombstone(k, Tombstone::of((ts, idx)));
            }
        }
    }

    /// The owner index of a node that is down here, for a tombstone's stamp: it is released
    /// once the tombstone is forgotten (`release_gone_owners`).
    pub(super) fn gone_owner(&mut self, id: &NodeId) -> OwnerIdx {
        let idx = self.owners.intern(id);
        if idx != self.me_idx && !self.peers.is_linked(idx) {
            self.gone.insert(idx);
        }
        idx
    }

    /// The index of an owner a writer named, if it is alive here: this node, or a node this
    /// table has a link to (that very incarnation).
    pub(super) fn live_owner(&self, id: &NodeId) -> Option<OwnerIdx> {
        if *id == self.me {
            return Some(self.me_idx);
        }
        self.peers.key_of(id)
    }

    /// Applies one write by `writer`. Returns whether it may have changed something that
    /// outlives the writer, that is more than records it owns (which go when it goes down): it
    /// stored a record of another owner, replaced or removed one, or brought a deleted key
    /// back. Those are the writes survivors must agree on (`Link::lasting`).
    pub(super) fn apply_unwatched(&mut self, op: Op<K, V>, writer: OwnerIdx) -> bool {
        let Op { ts, kind } = op;
        // A cluster-owned table stores and stamps a write under its writer's name.
        let cluster = self.cluster_owned();
        let writer = if cluster {
            self.cluster_writer(writer)
        } else {
            writer
        };
        // Inserts as records with their owners, and the keys of records whose owner (named by
        // the writer) is already down here.
        let (kind, orphans) = match kind {
            OpKind::Insert(recs) => {
                let recs = recs
                    .into_iter()
                    .map(|(k, v)| {
                        let rec = Rec::new(v, ts, writer);
                        (k, rec)
                    })
                    .collect();
                (Inserted::Records(recs), Vec::new())
            }
            OpKind::InsertTtl { ttl_ms, records } => {
                self.shared
                    .record_ttl
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let recs = records
                    .into_iter()
                    .map(|(k, v)| {
                        let mut rec = Rec::new(v, ts, writer);
                        rec.ttl = ttl_ms;
                        (k, rec)
                    })
                    .collect();
                (Inserted::Records(recs), Vec::new())
            }
            OpKind::InsertOwned { owners, records } => {
                let live: Vec<Option<OwnerIdx>> =
                    owners.iter().map(|id| self.live_owner(id)).collect();
                let mut recs = Vec::with_capacity(records.len());
                let mut orphans = Vec::new();
                for (k, v, i) in records {
                    match (live.get(i as usize), owners.get(i as usize)) {
                        (Some(&Some(owner)), _) => recs.push((k, Rec::new(v, ts, owner))),
                        (_, Some(id)) => orphans.push((k, id.clone())),
                        _ => tracing::debug!("a record naming no owner skipped"),
                    }
                }
                (Inserted::Records(recs), orphans)
            }
            other => (Inserted::Other(other), Vec::new()),
        };
        // Writes refused here by a record or tombstone of another node (`note_refusals`).
        let mut refused: Vec<(OwnerIdx, K)> = Vec::new();
        let mut lasting = !orphans.is_empty();
        if lasting {
            self.drop_orphans(ts, orphans);
        }
        if let Inserted::Records(recs) = &kind {
            lasting |= recs.iter().any(|(_, r)| r.owner != writer);
        }
        let store = &self.shared.store;
        if self.shared.kind == TableKind::Bag {
            match kind {
                // An object stored already keeps the greater stamp of the two: two writers that
                // insert one object at once thus leave it, on every node, to the same owner.
                Inserted::Records(mut recs) => {
                    let owners = &self.owners;
                    // Objects a `delete_object` that arrived first deletes are not stored: a
                    // copy of the object stored here is either newer than that delete (it
                    // stays, and would keep its greater stamp) or was removed by it.
                    if !self.object_deletes.is_empty() {
                        let deletes = &self.object_deletes;
                        recs.retain(|(k, new)| !overtaken(deletes, owners, k, new));
                    }
                    store.put_many_if(recs, |k, new, cur| {
                        let won = cur.is_none_or(|c| {
                            rules::bag_object_beats(
                                (new.ts, owners.get(new.owner)),
                                (c.ts, owners.get(c.owner)),
                            )
                        });
                        lasting |= won && cur.is_some_and(|c| c.owner != writer);
                        if let Some(c) = cur.filter(|_| !won) {
                            refused.push((c.owner, k.clone()));
                        }
                        won
                    });
                }
                Inserted::Other(
                    OpKind::Insert(_) | OpKind::InsertOwned { .. } | OpKind::InsertTtl { .. },
                ) => {}
                Inserted::Other(OpKind::Delete(keys)) => keys.iter().for_each(|k| {
                    lasting |= store.remove(k);
                }),
                Inserted::Other(OpKind::DeleteObject(objs)) => {
                    for (k, v) in objs {
                        lasting |= self.shared.store.remove_object(&k, &v);
                        if self.peers.has_members() {
                            self.note_object_delete(k, ts, writer, &v);
                        }
                    }
                }
            }
            self.note_refusals(ts, writer, refused);
            return lasting;
        }
        // A cluster-owned table keeps them alone too: a later join ships them.
        let keep_tombstones = self.peers.has_members() || cluster;
        match kind {
            // One batch for the whole op (the store applies small ones record by record).
            Inserted::Records(recs) => {
                let (owners, tombstones) = (&self.owners, &self.tombstones);
                let deletes = &self.object_deletes;
                let mut untombstoned = Vec::new();
                let mut doomed = Vec::new();
                store.put_many_if(recs, |k, new, cur| {
                    let stamp = (new.ts, owners.get(new.owner));
                    let won = match cur {
                        // Equal stamps come from two writers that named one owner in the same
                        // clock tick (a write carries a key once): ordered by value, the same
                        // on every node. An equal value is the same write again.
                        Some(c) => {
                            let won = rules::insert_beats_record(
                                stamp,
                                &new.value,
                                (c.ts, owners.get(c.owner)),
                                &c.value,
                            );
                            lasting |= won && c.owner != writer;
                            if !won {
                                refused.push((c.owner, k.clone()));
                            }
                            won
                        }
                        None if tombstones.is_empty() => true,
                        None => match tombstones.get(k) {
                            Some(t) => {
                                let deleter = t.owner;
                                let won = rules::beats_tombstone(stamp, &new.value, t, owners);
                                if won {
                                    untombstoned.push(k.clone());
                                } else {
                                    refused.push((deleter, k.clone()));
                                }
                                won
                            }
                            None => true,
                        },
                    };
                    if won && overtaken(deletes, owners, k, new) {
                        doomed.push((k.clone(), new.value.clone(), new.ts, new.owner));
                    }
                    won
                });
                lasting |= !untombstoned.is_empty();
                for k in untombstoned {
                    self.tombstones.remove(&k);
                }
                // Versions a `delete_object` that arrived first deletes: removed as it would
                // have removed them, leaving the tombstone of the version.
                for (k, v, vts, vowner) in doomed {
                    if self.shared.store.remove_version(&k, &v, vts, vowner) {
                        lasting = true;
                        if keep_tombstones {
                            self.add_version_tombstone(k, &v, vts, vowner);
                        }
                    }
                }
            }
            Inserted::Other(
                OpKind::Insert(_) | OpKind::InsertOwned { .. } | OpKind::InsertTtl { .. },
            ) => {}
            Inserted::Other(OpKind::Delete(keys)) => {
                let outcomes = {
                    let stamp = (ts, self.owners.get(writer));
                    let owners = &self.owners;
                    store.remove_many_if(&keys, |(cts, co)| stamp >= (cts, owners.get(co)))
                };
                for (k, removed) in keys.into_iter().zip(outcomes) {
                    lasting |= removed == Some(true);
                    let tombstone = match removed {
                        Some(removed) => removed,
                        // No record: the delete still stops older writes still in flight.
                        None => self.newer(&k, ts, writer),
                    };
                    // (A refused delete needs no note: with or without the record that refused
                    // it, the key ends absent.)
                    if tombstone && keep_tombstones {
                        self.add_tombstone(k, Tombstone::of((ts, writer)));
                    }
                }
            }
            Inserted::Other(OpKind::DeleteObject(objs)) => {
                // Removes one version (the stored record, if it has this value). Its tombstone
                // is that version's stamp and value, not the delete's: it stops the deleted
                // version from coming back, but any other write of the key still wins as it
                // would have won against the version (`Tombstone::value`).
                for (k, v) in objs {
                    let version = self.shared.store.get(&k).filter(|cur| same_value(cur, &v));
                    let meta = self.shared.store.meta(&k);
                    if let (Some(_), Some((vts, vowner))) = (version, meta) {
                        if self.newer(&k, ts, writer) {
                            self.shared.store.remove(&k);
                            lasting = true;
                            if keep_tombstones {
                                self.add_version_tombstone(k.clone(), &v, vts, vowner);
                            }
                        }
                    }
                    if self.peers.has_members() {
                        self.note_object_delete(k, ts, writer, &v);
                    }
                }
            }
        }
        if cluster {
            // Nothing of the writer goes with it: every write lasts, and a refusal by a record
            // that stays refuses the same everywhere.
            return true;
        }
        self.note_refusals(ts, writer, refused);
        lasting
    }

    /// Writes of `writer` stamped `ts` that a record or tombstone of another node refused here.
    /// When that node goes down, its records go, and so the reason this node holds none of
    /// those writes while a survivor that never had the record may hold them: each refusal is
    /// added to the node's link (`Link::refusals`), which its departure mixes into the epoch,
    /// so survivors that refused different writes differ in view and merge again. A refusal by
    /// a tombstone of a node that is already down (its departure was mixed in before this write
    /// arrived) goes into the epoch at once: a survivor that refused the same write mixes the
    /// same mark, one that stored it does not.
    fn note_refusals(&mut self, ts: u64, writer: OwnerIdx, refused: Vec<(OwnerIdx, K)>) {
        let mut after_departure = false;
        for (owner, k) in refused {
            if owner == self.me_idx || owner == writer {
                continue;
            }
            let mark = rules::refusal_mark(&k, ts, self.owners.get(writer));
            if !self.peers.add_refusal(owner, mark) {
                self.epoch ^= mark;
                after_departure = true;
            }
        }
        if after_departure {
            self.publish_members();
        }
    }
}

/// Whether a `delete_object` applied here before this record arrived deletes it: same key and
/// value, stamped at or after the record (`crate::object_deletes`).
fn overtaken<K: Key, V: Value>(
    deletes: &ObjectDeletes<K>,
    owners: &Owners,
    k: &K,
    new: &Rec<V>,
) -> bool {
    deletes.has(k)
        && postcard::to_stdvec(&new.value)
            .is_ok_and(|v| deletes.deletes(k, new.ts, owners.get(new.owner), &v))
}

impl<K: Key, V: Value> Server<K, V> {
    /// Keeps an applied `delete_object` of `v` under `k` while a member may still send an
    /// older insert of that object (ALGORITHM.md, section 7.2).
    fn note_object_delete(&mut self, k: K, ts: u64, writer: OwnerIdx, v: &V) {
        let (Some(id), Ok(value)) = (self.owners.get(writer), postcard::to_stdvec(v)) else {
            return;
        };
        let id = id.clone();
        self.object_deletes
            .add(k, ts, &id, value.into_boxed_slice());
    }
}
