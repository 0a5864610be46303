//! Anti-entropy: members compare digests of what they hold and repair what differs
//! (ALGORITHM.md, section 15; the digest itself is in `crate::digest`).
//!
//! Every `anti_entropy_interval`, and in a few quick rounds after the view changes (a join, a
//! node down, a heal), a server sends each member `Digest { view, frontier, root, count }`.
//! The receiver compares only if it is not paused and its own view and frontier are equal to
//! the sender's: then both hold the result of the same writes, and any difference is one that
//! replication will never mend, not a write still in flight. If the roots differ, the member
//! with the smaller name narrows the difference down: its bucket list goes to the other, which
//! answers with the entries (key, stamp, owner, value hash) of the buckets that differ; the
//! smaller-named member decides each differing key and sends the repair, and the other answers
//! with the records it was asked for. Every step re-checks the views and frontiers, so a write
//! that arrives meanwhile cancels the round instead of being "repaired". A member whose
//! digests are never comparable (writes that never pause) is compared at a cut instead
//! (`ae_cut.rs`).
//!
//! The decision, per key (per object in a bag):
//! - both hold it in different versions: each sends its version, and each side stores the
//!   other's by the rule of a replicated write (newer stamp, then owner, then value), so both
//!   keep the winner;
//! - one side only holds it: the record's owner decides. If the owner is the side that holds
//!   it, the record is copied; if the owner is the side that lacks it (it deleted the record,
//!   or never had it), the other drops that version. A record owned by a third member is left
//!   to the comparisons of each side with that owner. A tombstone still held for the key that
//!   is newer than the record also drops it.

use super::*;
use crate::digest::{self, bucket_of, key_hash, value_hash};
use crate::proto::{AeEntry, AeMsg, Frontier};
use crate::store::Store;

/// Quick rounds after a change of the view, this far apart (or `anti_entropy_interval`, if
/// shorter): the members change their views at slightly different moments.
const QUICK_ROUND: Duration = Duration::from_millis(250);
const QUICK_ROUNDS: u32 = 4;
/// Records (objects) whose entries one round lists at most, on either side: about 3 MB on the
/// wire and in memory. A larger difference is repaired over several rounds, bucket by bucket.
const MAX_ENTRIES: u64 = 100_000;

/// What anti-entropy knows of one member.
#[derive(Debug, Clone)]
pub(super) struct PeerAe {
    id: NodeId,
    /// The `seq` of the member's last write batch this server processed (from its batches, or
    /// announced in its anti-entropy messages, which travel behind them).
    heard: u64,
    compared: u64,
    last: Option<Instant>,
    matches: bool,
    differences: u64,
    repaired: u64,
    /// When this server last asked the member for the entries of differing buckets.
    narrowing: Option<Instant>,
}

/// The anti-entropy state of a table server.
pub(super) struct AntiEntropy {
    pub(super) interval: Option<Duration>,
    next_round: Instant,
    quick: u32,
    last_view: u64,
    rounds: u64,
    /// Bytes of anti-entropy frames queued to members.
    bytes: u64,
    peers: HashMap<OwnerIdx, PeerAe>,
    /// Comparisons at a cut, by member (`ae_cut.rs`).
    pub(super) cuts: HashMap<OwnerIdx, super::ae_cut::Cut>,
    /// Whether digests are compared as they are; only tests turn it off
    /// (`Table::testing_compare_at_rest`).
    at_rest: bool,
}

impl AntiEntropy {
    pub(super) fn new(interval: Option<Duration>) -> Self {
        Self {
            interval,
            next_round: Instant::now(),
            quick: 0,
            last_view: 0,
            rounds: 0,
            bytes: 0,
            peers: HashMap::new(),
            cuts: HashMap::new(),
            at_rest: true,
        }
    }
}

impl<K: Key, V: Value> Server<K, V> {
    fn ae_peer(&mut self, key: OwnerIdx) -> Option<&mut PeerAe> {
        let id = &self.links.get(&key)?.id;
        let p = self.ae.peers.entry(key).or_insert_with(|| PeerAe {
            id: id.clone(),
            heard: 0,
            compared: 0,
            last: None,
            matches: false,
            differences: 0,
            repaired: 0,
            narrowing: None,
        });
        if p.id != *id {
            // The index now names another node: start over.
            *p = PeerAe {
                id: id.clone(),
                heard: 0,
                compared: 0,
                last: None,
                matches: false,
                differences: 0,
                repaired: 0,
                narrowing: None,
            };
        }
        Some(p)
    }

    /// A write batch `seq` of member `key` was applied.
    pub(super) fn ae_heard(&mut self, key: OwnerIdx, seq: u64) {
        if self.ae.interval.is_none() {
            return;
        }
        if let Some(p) = self.ae_peer(key) {
            p.heard = p.heard.max(seq);
        }
    }

    /// This server's frontier: its own last batch and the last batch of each member it applied.
    fn frontier(&self) -> Frontier {
        let mut f: Frontier = vec![(self.me.clone(), self.seq)];
        for k in &self.members {
            if let Some(l) = self.links.get(k) {
                let heard = self
                    .ae
                    .peers
                    .get(k)
                    .filter(|p| p.id == l.id)
                    .map_or(0, |p| p.heard);
                f.push((l.id.clone(), heard));
            }
        }
        f.sort();
        f
    }

    /// Whether a message sent with this view and frontier describes the same writes as this
    /// server holds now: only then is a difference a divergence.
    fn comparable(&self, view: u64, frontier: &Frontier) -> bool {
        self.paused.is_none() && view == self.view() && *frontier == self.frontier()
    }

    /// Called at every tick: starts a round when one is due.
    pub(super) fn ae_tick(&mut self, now: Instant) {
        let Some(interval) = self.ae.interval else {
            return;
        };
        let view = self.view();
        if view != self.ae.last_view {
            self.ae.last_view = view;
            self.ae.quick = QUICK_ROUNDS;
            self.ae.next_round = now;
        }
        if now < self.ae.next_round || self.paused.is_some() {
            return;
        }
        let gap = if self.ae.quick > 0 {
            self.ae.quick -= 1;
            QUICK_ROUND.min(interval)
        } else {
            interval
        };
        self.ae.next_round = now + gap;
        let links = &self.links;
        self.ae
            .peers
            .retain(|k, p| links.get(k).is_some_and(|l| l.id == p.id));
        self.ae.cuts.retain(|k, _| links.contains_key(k));
        if self.members.is_empty() {
            return;
        }
        self.ae.rounds += 1;
        let (root, count) = self.shared.store.digest.root();
        let msg = PeerMsg::<K, V>::AntiEntropy(AeMsg::Digest {
            view,
            frontier: self.frontier(),
            root,
            count,
        });
        if let Ok(f) = frame::encode(&msg) {
            for k in &self.members {
                if let Some(l) = self.links.get(k).filter(|l| l.ready()) {
                    if l.queue(f.clone()) {
                        self.ae.bytes += f.len() as u64;
                    }
                }
            }
        }
    }

    /// Queues an anti-entropy message to a member, and counts its bytes.
    pub(super) fn ae_send(&mut self, key: OwnerIdx, msg: AeMsg<K, V>) {
        let Some(link) = self.links.get(&key) else {
            return;
        };
        match frame::encode(&PeerMsg::AntiEntropy(msg)) {
            // A frame past the peer's limit would close the connection: a table whose
            // `max_frame_size` cannot carry the 16 KiB of buckets is not narrowed down.
            Ok(f) if f.len() > self.config.max_frame_size => {
                tracing::debug!(
                    bytes = f.len(),
                    "anti-entropy message over max_frame_size; not sent"
                );
            }
            Ok(f) => {
                let n = f.len() as u64;
                if link.queue(f) {
                    self.ae.bytes += n;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an anti-entropy message"),
        }
    }

    pub(super) fn on_ae(&mut self, key: OwnerIdx, msg: AeMsg<K, V>) {
        if self.ae.interval.is_none() || !self.members.contains(&key) {
            return;
        }
        let Some(peer) = self.links.get(&key).map(|l| l.id.clone()) else {
            return;
        };
        // Its own last batch, as it announces it: everything before it was sent ahead.
        if let AeMsg::Digest { frontier, .. }
        | AeMsg::Buckets { frontier, .. }
        | AeMsg::Entries { frontier, .. } = &msg
        {
            if let Some(&(_, seq)) = frontier.iter().find(|(id, _)| *id == peer) {
                self.ae_heard(key, seq);
            }
        }
        match msg {
            AeMsg::Digest {
                view,
                frontier,
                root,
                count,
            } => {
                if !self.comparable(view, &frontier) || !self.ae.at_rest {
                    // Writes in flight: compare at a cut instead (`ae_cut.rs`).
                    self.ae_cut_digest(key, &peer, view, (root, count));
                    return;
                }
                let mine = self.shared.store.digest.root();
                let matches = mine == (root, count);
                let narrow = !matches && self.me.name < peer.name;
                let now = Instant::now();
                let interval = self.ae.interval.unwrap_or(QUICK_ROUND);
                let Some(p) = self.ae_peer(key) else {
                    return;
                };
                p.compared += 1;
                p.last = Some(now);
                p.matches = matches;
                if !narrow || p.narrowing.is_some_and(|t| now < t + interval) {
                    return;
                }
                p.narrowing = Some(now);
                tracing::debug!(%peer, "anti-entropy: digests differ; narrowing down");
                let msg = AeMsg::Buckets {
                    view,
                    frontier,
                    buckets: self.shared.store.digest.buckets(),
                };
                self.ae_send(key, msg);
            }
            AeMsg::Buckets {
                view,
                frontier,
                buckets,
            } => {
                if !self.comparable(view, &frontier) {
                    return;
                }
                let differ = digest::differing(&self.shared.store.digest.buckets(), &buckets);
                let chosen = self.ae_budget(&differ, &buckets);
                if chosen.is_empty() {
                    return;
                }
                let (buckets, owners, entries) = self.ae_entries(&chosen, true);
                let msg = AeMsg::Entries {
                    view,
                    frontier,
                    buckets,
                    owners,
                    entries,
                };
                self.ae_send(key, msg);
            }
            AeMsg::Entries {
                view,
                frontier,
                buckets,
                owners,
                entries,
            } => {
                if let Some(p) = self.ae_peer(key) {
                    p.narrowing = None;
                }
                if self.comparable(view, &frontier) {
                    self.ae_decide(key, &peer, &buckets, &owners, entries, None);
                }
            }
            AeMsg::CutBuckets {
                view,
                buckets,
                prefer,
            } => self.ae_on_cut_buckets(key, view, buckets, prefer),
            AeMsg::CutEntries {
                view,
                stable,
                seen,
                buckets,
                owners,
                entries,
            } => {
                let stamps = super::ae_cut::CutStamps { stable, seen };
                self.ae_on_cut_entries(key, &peer, view, stamps, buckets, owners, entries);
            }
            AeMsg::Repair {
                owners,
                records,
                remove,
                want,
                answer,
            } => {
                let span =
                    crate::metrics::repair_span(&self.me.name, &self.shared.name, &peer.name);
                let _in_span = span.enter();
                let keys = records.iter().map(|r| &r.key);
                let watch = self.watch_keys(keys.chain(remove.iter().map(|e| &e.key)));
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
                    tracing::warn!(table = %self.shared.name, %peer, records = changed, "anti-entropy: records repaired");
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
        }
    }

    /// The oldest stamp anti-entropy compares: records in the second half of their lifetime
    /// are left out, since the nodes sweep them at different moments.
    fn ae_horizon(&self) -> u64 {
        match self.shared.expire_ms {
            None => 0,
            Some(ttl) => HybridClock::written_since(ttl / 2),
        }
    }

    /// The first of `buckets` (valid ones, at least one) that hold at most [`MAX_ENTRIES`]
    /// records here and, by `theirs` (their (sum, count) list, if known), there.
    pub(super) fn ae_budget(&self, buckets: &[u32], theirs: &[(u64, u64)]) -> Vec<u32> {
        let mine = self.shared.store.digest.buckets();
        let mut total = 0u64;
        let mut out = Vec::new();
        for &b in buckets {
            let Some(&(_, here)) = mine.get(b as usize) else {
                continue;
            };
            let there = theirs.get(b as usize).map_or(0, |&(_, c)| c);
            let n = here.max(there);
            if !out.is_empty() && total.saturating_add(n) > MAX_ENTRIES {
                break;
            }
            total = total.saturating_add(n);
            out.push(b);
        }
        out
    }

    /// The entries of the records in `buckets`, with the buckets they cover and their
    /// owners. With `cap`, whole buckets only, in order, as many as fit in a quarter of
    /// `max_frame_size` (at least one).
    pub(super) fn ae_entries(
        &self,
        buckets: &[u32],
        cap: bool,
    ) -> (Vec<u32>, Vec<NodeId>, Vec<AeEntry<K>>) {
        let mut wanted = vec![false; digest::BUCKETS];
        for &b in buckets {
            if let Some(w) = wanted.get_mut(b as usize) {
                *w = true;
            }
        }
        let horizon = self.ae_horizon();
        let mut by_bucket: HashMap<u32, Vec<AeEntry<K>>> = HashMap::new();
        let mut wire: HashMap<OwnerIdx, u32> = HashMap::new();
        let mut owners: Vec<NodeId> = Vec::new();
        let bag = self.shared.kind == TableKind::Bag;
        let mut last_key: Option<(K, u64)> = None;
        self.shared.store.for_each(|k, r| {
            // (A record's own lifetime, `insert_with_ttl`, is left out the same way.)
            if r.ts < horizon
                || (r.ttl != 0 && r.ts < HybridClock::written_since(u64::from(r.ttl) / 2))
            {
                return;
            }
            // A bag's objects of one key come together: hash the key once for them.
            let kh = match &last_key {
                Some((lk, h)) if lk == k => *h,
                _ if !bag => key_hash(k),
                _ => {
                    let h = key_hash(k);
                    last_key = Some((k.clone(), h));
                    h
                }
            };
            let b = bucket_of(kh) as u32;
            if !wanted.get(b as usize).copied().unwrap_or(false) {
                return;
            }
            let Some(id) = self.owners.get(r.owner) else {
                return;
            };
            let owner = *wire.entry(r.owner).or_insert_with(|| {
                owners.push(id.clone());
                (owners.len() - 1) as u32
            });
            by_bucket.entry(b).or_default().push(AeEntry {
                key: k.clone(),
                ts: r.ts,
                owner,
                value: value_hash(&r.value),
            });
        });
        let max_bytes = self.config.max_frame_size / 4;
        let mut covered = Vec::new();
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for &b in buckets {
            let list = by_bucket.remove(&b).unwrap_or_default();
            let size: usize = list
                .iter()
                .map(|e| postcard::experimental::serialized_size(e).unwrap_or(0))
                .sum();
            if cap && !covered.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            covered.push(b);
            entries.extend(list);
        }
        (covered, owners, entries)
    }

    /// Decides every differing key of `buckets` from the peer's entries and ours, repairs our
    /// side and sends the peer its repair.
    /// `cut`: a comparison at a cut (`ae_cut.rs`), which repairs only confirmed differences.
    pub(super) fn ae_decide(
        &mut self,
        key: OwnerIdx,
        peer: &NodeId,
        buckets: &[u32],
        their_owners: &[NodeId],
        theirs: Vec<AeEntry<K>>,
        cut: Option<(u64, super::ae_cut::CutStamps)>,
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
        let watch = self.watch_keys(remove_here.iter().map(|(k, ..)| k));
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

    /// Whether the key's tombstone here is newer than a record stamped `(ts, owner)`.
    fn tombstone_beats(&self, k: &K, ts: u64, owner: &NodeId) -> bool {
        self.tombstones
            .get(k)
            .is_some_and(|t| (t.ts, self.owners.get(t.owner)) > (ts, Some(owner)))
    }

    /// The stored record of a key (of the object with value hash `vh`, in a bag).
    fn ae_record(&self, k: &K, vh: u64) -> Option<Rec<V>> {
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
    fn ae_remove_version(&self, k: &K, ts: u64, owner: OwnerIdx, vh: u64) -> bool {
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
                        let won = super::rules::beats_tombstone(stamp, &new.value, t, owners);
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

    /// The anti-entropy part of the status report.
    pub(super) fn ae_status(&self) -> Option<digest::AntiEntropyStatus> {
        self.ae.interval?;
        let (root, records) = self.shared.store.digest.root();
        let mut peers: Vec<digest::PeerDigest> = self
            .members
            .iter()
            .filter_map(|k| {
                let l = self.links.get(k)?;
                let p = self.ae.peers.get(k).filter(|p| p.id == l.id);
                Some(digest::PeerDigest {
                    node: l.id.name.clone(),
                    rounds: p.map_or(0, |p| p.compared),
                    last_round: p.and_then(|p| p.last).map(|t| t.elapsed()),
                    matches: p.is_some_and(|p| p.matches),
                    differences: p.map_or(0, |p| p.differences),
                    repaired: p.map_or(0, |p| p.repaired),
                    rounds_at_cut: self.ae_cut_rounds(*k, &l.id),
                })
            })
            .collect();
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        Some(digest::AntiEntropyStatus {
            digest: root,
            records,
            rounds: self.ae.rounds,
            bytes_sent: self.ae.bytes,
            in_sync: peers.iter().all(|p| p.matches),
            peers,
        })
    }
}

/// Records on their way to a peer, with their owners as a list.
struct WireOut<K, V> {
    owners: Vec<NodeId>,
    records: Vec<WireRecord<K, V>>,
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
    fn push(&mut self, key: K, rec: Rec<V>, owners: &Owners) {
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

#[cfg(feature = "testing")]
impl<K: Key, V: Value> Server<K, V> {
    /// A change of this replica only (`crate::testing`).
    pub(super) fn test_write(&mut self, w: crate::testing::TestWrite<K, V>) {
        use crate::testing::TestWrite;
        match w {
            TestWrite::Put { key, value, owner } => {
                let owner = match owner {
                    None => Some(self.me_idx),
                    Some(name) => self
                        .links
                        .iter()
                        .find(|(_, l)| l.id.name == name)
                        .map(|(k, _)| *k)
                        .or((name == self.me.name).then_some(self.me_idx)),
                };
                if let Some(owner) = owner {
                    let owner = if self.cluster_owned() {
                        self.cluster_writer(owner)
                    } else {
                        owner
                    };
                    let rec = Rec {
                        value,
                        ts: self.clock.now(),
                        owner,
                        ttl: 0,
                    };
                    self.shared
                        .store
                        .put_many_if(vec![(key, rec)], |_, _, _| true);
                }
            }
            TestWrite::Remove { key, value: None } => {
                self.shared.store.remove(&key);
            }
            TestWrite::Remove {
                key,
                value: Some(v),
            } => {
                self.shared.store.remove_object(&key, &v);
            }
            TestWrite::CompareAtRest(on) => self.ae.at_rest = on,
            TestWrite::Delete { key } => {
                let op = Op {
                    ts: self.clock.now(),
                    kind: OpKind::Delete(vec![key]),
                };
                self.apply(op, self.me_idx);
            }
        }
    }
}
