//! Anti-entropy, the comparison (ALGORITHM.md, section 15.3): a member's digest against this
//! server's, then its buckets against these, then the entries of the buckets that differ.

use super::{MAX_ENTRIES, QUICK_ROUND};
use crate::digest::{self, bucket_of, key_hash, value_hash};
use crate::proto::{AeEntry, AeMsg, Frontier};
use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// A member's digest: compared if it describes the same writes as this server holds, else
    /// compared at a cut (`cut.rs`); the smaller name narrows a difference down by sending its
    /// buckets.
    pub(super) fn ae_on_digest(
        &mut self,
        key: OwnerIdx,
        peer: &NodeId,
        view: u64,
        frontier: Frontier,
        theirs: (u64, u64),
    ) {
        if !self.comparable(view, &frontier) || !self.ae.at_rest {
            // Writes in flight: compare at a cut instead (`cut.rs`).
            self.ae_cut_digest(key, peer, view, theirs);
            return;
        }
        let mine = self.shared.store.digest.root();
        let matches = mine == theirs;
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
        tracing::debug!(peer = %peer, "anti-entropy: digests differ; narrowing down");
        let msg = AeMsg::Buckets {
            view,
            frontier,
            buckets: self.shared.store.digest.buckets(),
        };
        self.ae_send(key, msg);
    }

    /// A member's buckets: this side answers the entries of the buckets that differ, as many as
    /// one round lists.
    pub(super) fn ae_on_buckets(
        &mut self,
        key: OwnerIdx,
        view: u64,
        frontier: Frontier,
        buckets: Vec<(u64, u64)>,
    ) {
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
    pub(in crate::server) fn ae_budget(&self, buckets: &[u32], theirs: &[(u64, u64)]) -> Vec<u32> {
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
    pub(in crate::server) fn ae_entries(
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
}
