//! The tick: leases, ack timeouts, tombstones, expiry, view checks, and the status report.

use super::*;

/// Ticks between two clock/epoch announcements to members.
const ANNOUNCE_EVERY: u32 = 5;
/// Expired records are removed every quarter of their lifetime, within these bounds.
const SWEEP_MIN: Duration = Duration::from_millis(100);
const SWEEP_MAX: Duration = Duration::from_secs(60);
/// A member whose view differs from ours for this long is dropped from the member list (both
/// sides do it), so that the next join repairs a half-finished one.
const VIEW_GRACE: Duration = Duration::from_secs(2);

impl<K: Key, V: Value> Server<K, V> {
    pub(super) fn on_tick(&mut self) {
        let now = Instant::now();
        self.ticks = self.ticks.wrapping_add(1);
        if self.pause.expired(now) {
            tracing::warn!("join lease expired; unpausing");
            self.unpause();
        }
        let expired = self.commit.expired(now);
        // A member that acknowledged nothing for `ack_timeout` while its connection lives (its
        // table server is stuck, or it stopped reading) is dropped from the member list before
        // the callers hear of it: later writes stop waiting for it, and stop piling up in its
        // queue; the next join merges it back with what it missed.
        let mut dropped = false;
        let mut failures = Vec::new();
        for p in expired {
            let missing = self.peers.behind(&p.waiting, p.seq);
            let names: Vec<String> = missing
                .iter()
                .filter_map(|&k| self.peers.id_of(k))
                .map(|id| id.name.clone())
                .collect();
            for k in missing {
                if self.peers.drop_member(k) {
                    if let Some(id) = self.peers.id_of(k) {
                        tracing::warn!(peer = %id, timeout = ?self.opts.ack_timeout, "member acknowledged nothing in time; dropped until the next join");
                    }
                    dropped = true;
                }
            }
            failures.push((p.replies, names));
        }
        if dropped {
            self.publish_members();
        }
        for (replies, missing) in failures {
            for r in replies {
                let _ = r.send(Err(Error::AckTimeout {
                    table: self.shared.name.clone(),
                    missing: missing.clone(),
                    timeout: self.opts.ack_timeout,
                }));
            }
        }
        self.complete_pending();
        self.sample_metrics(now);
        self.claims_tick(now);
        // Requests whose coordinator gave up (its join ended) wait for no reply any more.
        self.joins.drop_abandoned();
        self.forget_tombstones();
        self.persist_tick(now);
        // Records with a lifetime of their own (`insert_with_ttl`) are swept every second.
        let every = match self.shared.expire_ms {
            Some(ttl_ms) => Some(Duration::from_millis(ttl_ms / 4).clamp(SWEEP_MIN, SWEEP_MAX)),
            None if self.shared.has_record_ttl() => Some(crate::record_ttl::SWEEP_EVERY),
            None => None,
        };
        if let Some(every) = every {
            if now >= self.next_sweep {
                self.sweep_expired();
                let every = if self.shared.has_record_ttl() {
                    every.min(crate::record_ttl::SWEEP_EVERY)
                } else {
                    every
                };
                self.next_sweep = deadline_after(every);
            }
        }
        if self.ticks.is_multiple_of(ANNOUNCE_EVERY) {
            // Scans the tombstones: twice a second is often enough.
            self.release_gone_owners();
            // To every linked peer, not only members: a peer that is a member on one side only
            // learns our epoch this way.
            let msg = PeerMsg::<K, V>::Tick {
                clock: self.clock.now(),
                view: self.view(),
            };
            if let Ok(f) = frame::encode(&msg) {
                self.peers.queue_to_ready(&f);
            }
            self.check_views(now);
        }
        self.reopen_streams();
        self.ae_tick(now);
        for k in self.peers.keys() {
            self.maybe_join(k);
        }
    }

    /// A member that reports another view (epoch and member list) than ours for longer than
    /// [`VIEW_GRACE`] took part in a join that did not finish everywhere. Both sides drop
    /// each other from their member lists; the next join merges them again.
    /// Removes the records that have expired (`TableOptions::expire_after`). Reads stopped
    /// returning them already. Every node removes the same records by the same rule, the
    /// write's stamp, so nothing is sent; and no tombstone is kept, since an older write of the
    /// key that may still arrive has expired too. Records are found under read locks and removed
    /// in one batch, as a delete would.
    pub(super) fn sweep_expired(&mut self) {
        // A record is expired by the table's lifetime (stamped before `from`) or its own.
        let from = self.shared.live_from();
        let store = &self.shared.store;
        let removed = if self.shared.kind == TableKind::Bag {
            let mut objects = Vec::new();
            store.for_each(|k, r| {
                if !r.live(from) {
                    objects.push((k.clone(), r.value.clone()));
                }
            });
            let watch = self.watch();
            let n = objects
                .iter()
                .filter(|(k, v)| store.remove_object(k, v))
                .count();
            self.emit(watch, notify::Cause::Expired);
            n
        } else {
            let mut keys = Vec::new();
            store.for_each(|k, r| {
                if !r.live(from) {
                    keys.push(k.clone());
                }
            });
            let watch = self.watch();
            let n = store
                // Nothing wrote in between: this server is the only writer.
                .remove_many_if(&keys, |_| true)
                .into_iter()
                .filter(|r| *r == Some(true))
                .count();
            self.emit(watch, notify::Cause::Expired);
            n
        };
        if removed > 0 {
            tracing::debug!(removed, "expired records removed");
        }
    }

    pub(super) fn check_views(&mut self, now: Instant) {
        if self.pause.is_paused() {
            return;
        }
        let view = self.view();
        self.peers.split_disagreeing(view, now, VIEW_GRACE);
        self.publish_members();
        self.complete_pending();
    }

    /// A hash of the epoch and the member list including this node: equal on every member of a
    /// consistent table.
    pub(super) fn view(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        mix(&self.epoch.to_le_bytes());
        for id in self.member_ids_with_me() {
            mix(id.name.as_bytes());
            mix(&id.incarnation.to_le_bytes());
        }
        h
    }

    pub(super) fn status(&self) -> TableStatus {
        let view = self.view();
        let name_of = |k: OwnerIdx| self.peers.id_of(k).map(|id| id.name.clone());
        let mut not_joined: Vec<String> = self
            .peers
            .links()
            .filter(|(k, l)| !self.peers.is_member(*k) && !l.lacks_table() && l.refused().is_none())
            .map(|(_, l)| l.id().name.clone())
            .collect();
        not_joined.sort();
        let mut without_table: Vec<String> = self
            .peers
            .links()
            .filter(|(_, l)| l.lacks_table())
            .map(|(_, l)| l.id().name.clone())
            .collect();
        without_table.sort();
        let mut joining: Vec<String> = self.joins.running().filter_map(name_of).collect();
        joining.sort();
        let mut refused: Vec<(String, String)> = self
            .peers
            .links()
            .filter_map(|(_, l)| l.refused().map(|r| (l.id().name.clone(), r.to_string())))
            .collect();
        refused.sort();
        let mut disagreeing: Vec<String> = self
            .peers
            .member_links()
            .filter(|(_, l)| l.view().is_some_and(|v| v != view))
            .map(|(_, l)| l.id().name.clone())
            .collect();
        disagreeing.sort();
        TableStatus {
            name: self.shared.name.clone(),
            kind: self.shared.kind,
            len: self.shared.store.len(),
            members: self
                .shared
                .members
                .read()
                .map(|m| m.clone())
                .unwrap_or_default(),
            not_joined,
            without_table,
            joining,
            refused,
            paused: self.pause.is_paused(),
            conflicts: self.joins.conflicts(),
            epoch: self.epoch,
            disagreeing,
            known_nodes: self.owners.len(),
            tombstones: self.tombstones.len(),
            persistence: self.persist_status(),
            anti_entropy: self.ae_status(),
        }
    }
}
