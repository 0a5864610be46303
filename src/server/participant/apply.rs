//! `JoinReq::Apply`, step 8 of a join (ALGORITHM.md, section 9.2): stores a chunk of records
//! (by the exchange's rule in an exchange, step 7), and with the last chunk the member list and
//! epoch; then drops the records of the owners the join does not carry (section 16).

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Step 8: stores one chunk of the join within a pause of that join.
    pub(super) fn on_apply(
        &mut self,
        origin: Origin<K, V>,
        join: u64,
        owners: Vec<NodeId>,
        records: Vec<WireRecord<K, V>>,
        members: Option<Vec<NodeId>>,
        merge: Option<Vec<NodeId>>,
    ) {
        if !self.paused_by(join) {
            self.refuse(origin, "not paused by this join");
            return;
        }
        self.join_progress();
        // Records of owners that are not alive here (a node that died during the
        // join) are not stored: nothing would ever remove them.
        let map: Vec<Option<OwnerIdx>> = owners
            .iter()
            .map(|id| self.join_owner_ok(id).then(|| self.owners.intern(id)))
            .collect();
        let mut recs = Vec::with_capacity(records.len());
        let mut newest = 0;
        for r in records {
            let Some(&Some(owner)) = map.get(r.owner as usize) else {
                continue;
            };
            newest = newest.max(r.ts);
            // Node-owned: dumps carry no tombstones, and a record the other side still
            // holds comes back, whoever decides. Cluster-owned: a tombstone (this
            // node's, or the other side's, sent first) refuses an older record.
            if !self.tombstones.is_empty() {
                if !self.beats_local_tombstone(&r.key, r.ts, owner, &r.value) {
                    continue;
                }
                self.tombstones.remove(&r.key);
            }
            if r.ttl != 0 {
                self.shared
                    .record_ttl
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let mut rec = Rec::new(r.value, r.ts, owner);
            rec.ttl = r.ttl;
            recs.push((r.key, rec));
        }
        // The coordinator sent them (from its dumps).
        match self.pause.current().map(|p| p.coordinator.name.clone()) {
            Some(coordinator) => self.clock.observe_from(&coordinator, newest),
            None => {
                let _ = self.clock.observe(newest);
            }
        }
        // For a merge: which stored owners the other side's dump could have included.
        let cluster = self.cluster_owned();
        let dumped: Vec<bool> = match &merge {
            Some(all) => (0..self.owners.slots() as OwnerIdx)
                .map(|i| {
                    self.owners.get(i).is_some_and(|id| {
                        all.contains(id) || (cluster && crate::ownership::is_writer_id(id))
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        if let (Some(all), Some(p)) = (&merge, self.pause.current_mut()) {
            p.carried = all.clone();
        }
        let merge = merge.is_some();
        let watch = self.watch();
        let mut conflicts = 0;
        let owners = &self.owners;
        self.shared
            .store
            .put_many_if(recs, |_, new, cur| match cur {
                None => true,
                // The coordinator decided: store as it is.
                Some(_) if !merge => true,
                // Not a version the join sees (its owner is outside the join): as if
                // absent, as in a central merge, which never receives it.
                Some(c) if !dumped.get(c.owner as usize).copied().unwrap_or(false) => true,
                // The join's rule, as the coordinator would apply it: the larger
                // (timestamp, owner identity, value) wins; equal, it is the same version.
                Some(c) => {
                    let stamp = (new.ts, owners.get(new.owner));
                    let order = stamp
                        .cmp(&(c.ts, owners.get(c.owner)))
                        .then_with(|| value_order(&new.value, &c.value));
                    conflicts += u64::from(order != Ordering::Equal);
                    order == Ordering::Greater
                }
            });
        let by = self.origin_id(&origin).unwrap_or_else(|| self.me.clone());
        self.emit(watch, notify::Cause::Join(by));
        if let Some(p) = self.pause.current_mut() {
            p.applied = true;
        }
        if let Some(members) = members {
            self.set_members(&members, join);
            let by = self.origin_id(&origin).unwrap_or_else(|| self.me.clone());
            let carried = self
                .pause
                .current_mut()
                .map(|p| std::mem::take(&mut p.carried))
                .unwrap_or_default();
            self.drop_outsiders(by, &carried);
            if let Some(p) = self.pause.current_mut() {
                p.applied = false;
            }
        }
        // Applying a large chunk takes time: the lease runs from its end.
        self.join_progress();
        self.reply(origin, JoinRep::Applied { conflicts });
    }

    pub(in crate::server) fn set_members(&mut self, members: &[NodeId], epoch: u64) {
        let mut set = BTreeSet::new();
        for id in members.iter().filter(|id| **id != self.me) {
            match self.owners.lookup(id).filter(|&k| self.peers.has_stream(k)) {
                Some(k) => {
                    set.insert(k);
                }
                None => {
                    tracing::warn!(node = %id, "join named a member this node has no stream to")
                }
            }
        }
        // The join checked the copies of every pair that missed writes (`crate::authority`).
        self.peers.set_members(set);
        self.epoch = epoch;
        self.publish_members();
        tracing::info!(members = ?self.shared.members.read().map(|m| m.iter().map(|n| n.name.clone()).collect::<Vec<_>>()).unwrap_or_default(), epoch, "joined");
        self.complete_pending();
    }

    /// Drops the records of every owner that is neither this node, nor a member, nor `carried`
    /// by the join: at the end of a join, the records of linked nodes outside it that not every
    /// node of the join reaches, or whose writes one of them missed (they may be stale, and not
    /// every node of the join could store them); after a join that stored records and failed
    /// (`carried` empty), those of every node but its members. Every node of a join keeps the
    /// records of the same owners, which the join made equal everywhere; the owner's own side
    /// brings the dropped ones back when it joins (ALGORITHM.md, section 16).
    pub(in crate::server) fn drop_outsiders(&mut self, by: NodeId, carried: &[NodeId]) {
        // Cluster-owned records belong to writer names, never members: they stay.
        if self.cluster_owned() {
            return;
        }
        let kept: BTreeSet<OwnerIdx> = carried
            .iter()
            .filter_map(|id| self.owners.lookup(id))
            .collect();
        let (me, peers) = (self.me_idx, &self.peers);
        let outside = |o: OwnerIdx| o != me && !peers.is_member(o) && !kept.contains(&o);
        // No owner known here is outside: no record is (a scan of a large table costs more
        // than the rest of the join's end).
        if !(0..self.owners.slots() as OwnerIdx).any(|o| self.owners.get(o).is_some() && outside(o))
        {
            return;
        }
        let watch = self.watch();
        let removed = self.shared.store.remove_owned_by(outside, |_, _| {});
        self.emit(watch, notify::Cause::Join(by));
        if !removed.is_empty() {
            tracing::info!(
                dropped = removed.len(),
                "records of nodes outside the table's members dropped"
            );
        }
    }
}
