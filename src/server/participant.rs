//! Joins, the participant's side: pause, dump, apply and unpause, as a coordinator asks
//! (ALGORITHM.md, section 9).

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    pub(super) fn paused_reply(&self) -> JoinRep<K, V> {
        JoinRep::Paused {
            members: self.member_ids_with_me(),
            epoch: self.epoch,
            reachable: self
                .links
                .values()
                .filter(|l| l.ready())
                .map(|l| l.id.clone())
                .collect(),
            len: self.shared.store.len() as u64,
            missed: self
                .links
                .values()
                .filter(|l| l.missed)
                .map(|l| l.id.clone())
                .collect(),
        }
    }

    pub(super) fn member_ids_with_me(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .members
            .iter()
            .filter_map(|k| self.links.get(k).map(|l| l.id.clone()))
            .collect();
        v.push(self.me.clone());
        v.sort();
        v
    }

    pub(super) fn reply(&self, origin: Origin<K, V>, body: JoinRep<K, V>) {
        match origin {
            Origin::Local(tx) => {
                let _ = tx.send(body);
            }
            Origin::Peer(key, req) => self.send_to(key, &PeerMsg::JoinReply { req, body }),
        }
    }

    fn refuse(&self, origin: Origin<K, V>, reason: &str) {
        let reason = reason.to_string();
        self.reply(origin, JoinRep::Refused { reason });
    }

    pub(super) fn origin_id(&self, origin: &Origin<K, V>) -> Option<NodeId> {
        match origin {
            Origin::Local(_) => Some(self.me.clone()),
            Origin::Peer(k, _) => self.links.get(k).map(|l| l.id.clone()),
        }
    }

    /// A step of the join that holds the pause arrived (a dump request, a chunk to apply): the
    /// coordinator is alive and working, so its lease is renewed. Its own renewals may be
    /// queued behind the chunks it sent before them, and while this node takes longer than
    /// the lease to receive and apply those, they would arrive too late (8 M + 8 M records
    /// never joined under `fast_failover`'s 2 s lease: the participant unpaused part way and
    /// refused the rest).
    pub(super) fn join_progress(&mut self) {
        if let Some(p) = self.paused.as_mut() {
            p.deadline = Instant::now() + p.lease;
        }
    }

    pub(super) fn paused_by(&self, join: u64) -> bool {
        self.paused.as_ref().is_some_and(|p| p.join == join)
    }

    pub(super) fn on_join_req(&mut self, origin: Origin<K, V>, body: JoinReq<K, V>) {
        match body {
            JoinReq::Info => {
                let rep = JoinRep::Info {
                    members: self.member_ids_with_me(),
                    epoch: self.epoch,
                };
                self.reply(origin, rep);
            }
            JoinReq::Pause { join, lease_ms } => {
                let Some(coordinator) = self.origin_id(&origin) else {
                    return;
                };
                // The coordinator's lease, up to a bound: a peer cannot pause this table for
                // longer than `MAX_PAUSE_LEASE` without renewing.
                let lease = Duration::from_millis(lease_ms).min(MAX_PAUSE_LEASE);
                let deadline = Instant::now() + lease;
                if self.released.contains(&join) {
                    self.refuse(origin, "this join's pause already ended");
                    return;
                }
                match &mut self.paused {
                    Some(p) if p.join != join => {
                        let by = p.coordinator.name.clone();
                        self.reply(origin, JoinRep::Busy { by });
                    }
                    Some(p) => {
                        p.deadline = deadline;
                        p.lease = lease;
                        let rep = self.paused_reply();
                        self.reply(origin, rep);
                    }
                    None => {
                        tracing::debug!(%coordinator, join, "paused for a join");
                        self.paused = Some(Pause {
                            join,
                            coordinator,
                            deadline,
                            lease,
                            dumped: false,
                            applied: false,
                            carried: Vec::new(),
                        });
                        if self.pending.is_empty() {
                            let rep = self.paused_reply();
                            self.reply(origin, rep);
                        } else {
                            self.pause_waiters.push(origin);
                        }
                    }
                }
            }
            JoinReq::Dump { join, alive } => {
                if !self.paused_by(join) {
                    self.refuse(origin, "not paused by this join");
                    return;
                }
                self.join_progress();
                if let Some(p) = self.paused.as_mut() {
                    if p.dumped {
                        self.refuse(origin, "this join had the dump already");
                        return;
                    }
                    p.dumped = true;
                    p.carried = alive.clone();
                }
                // A large table takes a while: on a multi-threaded runtime, the tasks queued
                // behind this one (the join coordinator, woken by each chunk it is sent, the
                // table streams' writers) move to another thread meanwhile, so the join's lease
                // renewals still go out.
                if tokio::runtime::Handle::current().runtime_flavor()
                    == tokio::runtime::RuntimeFlavor::MultiThread
                {
                    tokio::task::block_in_place(|| self.send_dump(origin, &alive));
                } else {
                    self.send_dump(origin, &alive);
                }
                // The lease runs from the dump's end.
                self.join_progress();
            }
            JoinReq::Apply {
                join,
                owners,
                records,
                members,
                merge,
            } => {
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
                match self.paused.as_ref().map(|p| p.coordinator.name.clone()) {
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
                if let (Some(all), Some(p)) = (&merge, self.paused.as_mut()) {
                    p.carried = all.clone();
                }
                let merge = merge.is_some();
                let watch = self.watch_keys(recs.iter().map(|(k, _)| k));
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
                if let Some(p) = self.paused.as_mut() {
                    p.applied = true;
                }
                if let Some(members) = members {
                    self.set_members(&members, join);
                    let by = self.origin_id(&origin).unwrap_or_else(|| self.me.clone());
                    let carried = self
                        .paused
                        .as_mut()
                        .map(|p| std::mem::take(&mut p.carried))
                        .unwrap_or_default();
                    self.drop_outsiders(by, &carried);
                    if let Some(p) = self.paused.as_mut() {
                        p.applied = false;
                    }
                }
                // Applying a large chunk takes time: the lease runs from its end.
                self.join_progress();
                self.reply(origin, JoinRep::Applied { conflicts });
            }
            JoinReq::Tombstones {
                join,
                owners,
                tombstones,
            } => {
                if !self.paused_by(join) {
                    self.refuse(origin, "not paused by this join");
                    return;
                }
                if !self.cluster_owned() {
                    self.refuse(origin, "tombstones sent to a node-owned table");
                    return;
                }
                let by = self.origin_id(&origin).unwrap_or_else(|| self.me.clone());
                self.apply_join_tombstones(owners, tombstones, by);
                self.reply(origin, JoinRep::Applied { conflicts: 0 });
            }
            JoinReq::Stale {
                join,
                owners,
                records,
            } => {
                if !self.paused_by(join) {
                    self.refuse(origin, "not paused by this join");
                    return;
                }
                let by = self.origin_id(&origin).unwrap_or_else(|| self.me.clone());
                let removed = self.remove_stale(&owners, records, by);
                if removed > 0 {
                    tracing::info!(
                        removed,
                        join,
                        "dropped copies of records their owners' side no longer holds"
                    );
                }
                self.reply(origin, JoinRep::Applied { conflicts: 0 });
            }
            JoinReq::Unpause { join } => {
                if self.paused_by(join) {
                    tracing::debug!(join, "unpaused");
                    self.unpause();
                } else {
                    // The coordinator gave up before our pause (its request still queued here,
                    // or our answer late): a pause of this join arriving now is refused.
                    self.remember_released(join);
                }
                self.reply(origin, JoinRep::Unpaused);
            }
        }
    }

    pub(super) fn send_dump(&self, origin: Origin<K, V>, alive: &[NodeId]) {
        if let Origin::Peer(key, _) = origin {
            if !self.links.get(&key).is_some_and(Link::open) {
                // Its queue overflowed (the connection is closing), or its stream is gone.
                return;
            }
        }
        // The dump's owner list: the alive owners only, renumbered (`wire[i]`: the index in
        // that list of owner `i` here).
        let cluster = self.cluster_owned();
        if cluster {
            self.send_tombstones(&origin);
        }
        let mut owners: Vec<NodeId> = Vec::new();
        let wire: Vec<Option<u32>> = (0..self.owners.slots() as OwnerIdx)
            .map(|i| {
                let id = self.owners.get(i).filter(|id| {
                    alive.contains(id) || (cluster && crate::ownership::is_writer_id(id))
                })?;
                owners.push(id.clone());
                Some((owners.len() - 1) as u32)
            })
            .collect();
        let mut chunker = Chunker::new(
            self.config.join_chunk_records,
            self.config.max_frame_size / 4,
        );
        // Expired records stay out: a read returns none of them, and a conflict handler must
        // not make one live again with a new stamp.
        let from = self.shared.live_from();
        // Each chunk goes out as soon as it is full, so the coordinator hears of the dump's
        // progress (and renews its lease) while a large table is still being read, instead of
        // waiting, up to its per-reply timeout, for the whole table to be cut first.
        let send = |records, last| {
            let body = JoinRep::Chunk {
                owners: owners.clone(),
                records,
                last,
            };
            match &origin {
                Origin::Local(tx) => {
                    let _ = tx.send(body);
                }
                Origin::Peer(key, req) => {
                    self.send_to(*key, &PeerMsg::JoinReply { req: *req, body })
                }
            }
        };
        self.shared.store.for_each(|k, r| {
            if !r.live(from) {
                return;
            }
            if let Some(&Some(owner)) = wire.get(r.owner as usize) {
                chunker.push(WireRecord {
                    key: k.clone(),
                    value: r.value.clone(),
                    ts: r.ts,
                    owner,
                    ttl: r.ttl,
                });
                for records in chunker.take_full() {
                    send(records, false);
                }
            }
        });
        // The last chunk (possibly empty) says the dump is complete.
        let rest = chunker.finish();
        let n = rest.len();
        for (i, records) in rest.into_iter().enumerate() {
            send(records, i + 1 == n);
        }
    }

    pub(super) fn set_members(&mut self, members: &[NodeId], epoch: u64) {
        let mut set = BTreeSet::new();
        for id in members.iter().filter(|id| **id != self.me) {
            match self
                .owners
                .lookup(id)
                .filter(|k| self.links.get(k).is_some_and(|l| l.out.is_some()))
            {
                Some(k) => {
                    set.insert(k);
                }
                None => {
                    tracing::warn!(node = %id, "join named a member this node has no stream to")
                }
            }
        }
        // The join checked the copies of every pair that missed writes (`crate::authority`).
        for k in &set {
            if let Some(l) = self.links.get_mut(k) {
                l.missed = false;
            }
        }
        self.members = set;
        self.epoch = epoch;
        for l in self.links.values_mut() {
            l.disagree_since = None;
        }
        self.publish_members();
        tracing::info!(members = ?self.shared.members.read().map(|m| m.iter().map(|n| n.name.clone()).collect::<Vec<_>>()).unwrap_or_default(), epoch, "joined");
        self.complete_pending();
    }

    /// Ends the current pause; buffered writes go on.
    pub(super) fn unpause(&mut self) {
        if let Some(p) = self.paused.take() {
            self.remember_released(p.join);
            if p.applied {
                // The join stored records here and ended before its member list came: the
                // other nodes of its side may not have stored them, so none of another
                // node's records stay.
                self.drop_outsiders(p.coordinator.clone(), &[]);
            }
        }
        self.pause_waiters.clear();
    }

    /// Joins whose pause ended (the last 64): a late pause or renewal of one is refused.
    pub(super) fn remember_released(&mut self, join: u64) {
        if !self.released.contains(&join) {
            self.released.push_back(join);
            if self.released.len() > 64 {
                self.released.pop_front();
            }
        }
    }
}

impl<K: Key, V: Value> Server<K, V> {
    /// Removes the stale copies a join names (`crate::authority`), each only where it is stored
    /// in that very version. Returns how many were removed.
    fn remove_stale(
        &mut self,
        owners: &[NodeId],
        records: Vec<WireRecord<K, V>>,
        by: NodeId,
    ) -> usize {
        let map: Vec<Option<OwnerIdx>> = owners.iter().map(|id| self.owners.lookup(id)).collect();
        let watch = self.watch_keys(records.iter().map(|r| &r.key));
        let removed = records
            .iter()
            .filter(|r| match map.get(r.owner as usize) {
                Some(&Some(owner)) => self
                    .shared
                    .store
                    .remove_version(&r.key, &r.value, r.ts, owner),
                _ => false,
            })
            .count();
        self.emit(watch, notify::Cause::Join(by));
        removed
    }
}

impl<K: Key, V: Value> Server<K, V> {
    /// Drops the records of every owner that is neither this node, nor a member, nor `carried`
    /// by the join: at the end of a join, the records of linked nodes outside it that not every
    /// node of the join reaches, or whose writes one of them missed (they may be stale, and not
    /// every node of the join could store them); after a join that stored records and failed
    /// (`carried` empty), those of every node but its members. Every node of a join keeps the
    /// records of the same owners, which the join made equal everywhere; the owner's own side
    /// brings the dropped ones back when it joins (ALGORITHM.md, section 16).
    pub(super) fn drop_outsiders(&mut self, by: NodeId, carried: &[NodeId]) {
        // Cluster-owned records belong to writer names, never members: they stay.
        if self.cluster_owned() {
            return;
        }
        let kept: BTreeSet<OwnerIdx> = carried
            .iter()
            .filter_map(|id| self.owners.lookup(id))
            .collect();
        let (me, members) = (self.me_idx, &self.members);
        let outside = |o: OwnerIdx| o != me && !members.contains(&o) && !kept.contains(&o);
        let watch = if self.shared.hub.watching() {
            let mut keys = Vec::new();
            self.shared.store.for_each(|k, r| {
                if outside(r.owner) {
                    keys.push(k.clone());
                }
            });
            self.watch_keys(keys.iter())
        } else {
            None
        };
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

impl<K: Key, V: Value> Server<K, V> {
    /// A batch of our writes went to the members in `sent` only: every other linked node that
    /// runs the table missed it (`Link::missed`).
    pub(super) fn note_missed(&mut self, sent: &[OwnerIdx]) {
        for (k, l) in self.links.iter_mut() {
            if !sent.contains(k) && !l.lacks_table && l.refused.is_none() {
                l.missed = true;
            }
        }
    }
}
