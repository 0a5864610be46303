//! Anti-entropy for a table that is never at rest: the comparison at a cut (ALGORITHM.md,
//! section 15.4).
//!
//! A digest is compared as it is (`compare.rs`) only when both sides have applied the
//! same writes, and under writes that never pause that is never. Then the member with the
//! smaller name compares at a cut instead: it sends its buckets (`AeMsg::CutBuckets`), the
//! other lists the entries of the buckets that differ (`AeMsg::CutEntries`) with two stamps,
//! and the first compares the entries but repairs a difference only when
//!
//! - the same difference (the same versions on both sides, or the same absence) was found by
//!   the previous comparison with this member, under the same view, and
//! - the cut has passed that comparison: every write stamped up to the greatest stamp either
//!   side had applied then (`seen`) has been applied on both sides now (`stable`), and every
//!   version involved is stamped below the cut.
//!
//! A write applied on one side before the first look is then applied on both by the second,
//! so a difference that survived it is no write in flight: it is a divergence.

use crate::digest::{self, bucket_of, key_hash, BUCKETS};
use crate::proto::{AeEntry, AeMsg};
use crate::server::*;

/// What the comparison at a cut knows of one member.
#[derive(Default)]
pub(in crate::server) struct Cut {
    id: Option<NodeId>,
    /// When this server last asked the member for a comparison at a cut.
    asked: Option<Instant>,
    /// Comparisons at a cut made with this member (`PeerDigest::rounds_at_cut`).
    pub(super) rounds: u64,
    /// The differences the last comparison found, for the next to confirm.
    pending: Option<Pending>,
    /// When this member's digests started to arrive uncomparable without a break, and when
    /// the last of them came.
    uncomparable: Option<(Instant, Instant)>,
    /// The time this server spent deciding the last comparison at a cut with this member.
    cost: Duration,
}

/// Intervals of digests that could not be compared (writes in flight, without a pause) before
/// the first comparison at a cut: writes that pause now and then let the digests meet at rest,
/// which costs nothing, while a comparison at a cut costs both sides a pass over the table.
const CUT_AFTER: u32 = 5;

/// A comparison at a cut comes at most once per this many times what the last one cost this
/// server (and about as much the member): at most 2% of the table server's time.
const CUT_SHARE: u32 = 50;

/// Differences found once, waiting for a second look past the cut.
struct Pending {
    view: u64,
    /// The greatest stamp either side had applied when they were found.
    seen: u64,
    /// Each difference: the encoding of (key, object, my version, its version).
    diffs: HashSet<Vec<u8>>,
    /// Their buckets, which the member lists first next time.
    buckets: Vec<u32>,
}

/// The two stamps of a comparison at a cut, both sides taken together.
pub(in crate::server) struct CutStamps {
    /// Every write stamped below it has been applied on both sides.
    pub(super) stable: u64,
    /// No write applied on either side is stamped above it.
    pub(super) seen: u64,
}

/// A version as a difference names it: stamp, owner, value hash.
type Version = (u64, Option<NodeId>, u64);

impl<K: Key, V: Value> Server<K, V> {
    /// Every write stamped below this has been applied here: this node's own (stamped by its
    /// clock) and each member's (its stream is ordered and its clock never goes back, so once
    /// its watermark passes a stamp, nothing older is on its way; section 7.3).
    fn ae_stable(&self) -> u64 {
        self.clock.now().min(self.min_watermark())
    }

    /// No write applied here is stamped above this.
    fn ae_seen(&self) -> u64 {
        self.peers.max_member_watermark(self.clock.now())
    }

    /// Comparisons at a cut made with a member (status).
    pub(in crate::server) fn ae_cut_rounds(&self, key: OwnerIdx, id: &NodeId) -> u64 {
        self.ae
            .cuts
            .get(&key)
            .filter(|c| c.id.as_ref() == Some(id))
            .map_or(0, |c| c.rounds)
    }

    fn ae_cut(&mut self, key: OwnerIdx, peer: &NodeId) -> &mut Cut {
        let cut = self.ae.cuts.entry(key).or_default();
        if cut.id.as_ref() != Some(peer) {
            // The index now names another node: start over.
            *cut = Cut {
                id: Some(peer.clone()),
                ..Cut::default()
            };
        }
        cut
    }

    /// A member's digest could not be compared (writes in flight): the smaller-named side
    /// starts a comparison at a cut, at most once per interval.
    pub(in crate::server) fn ae_cut_digest(
        &mut self,
        key: OwnerIdx,
        peer: &NodeId,
        view: u64,
        theirs: (u64, u64),
    ) {
        let Some(interval) = self.ae.interval else {
            return;
        };
        if self.pause.is_paused() || view != self.view() || self.me.name >= peer.name {
            return;
        }
        let now = Instant::now();
        let equal = self.shared.store.digest.root() == theirs;
        let cut = self.ae_cut(key, peer);
        // A run of uncomparable digests ends with one that matches, or with a gap (digests
        // compared at rest in between).
        let first = match cut.uncomparable {
            Some((first, last)) if !equal && now <= last + interval * 2 => first,
            _ => now,
        };
        cut.uncomparable = (!equal).then_some((first, now));
        if equal || now < first + interval * CUT_AFTER {
            return;
        }
        // (At least half an interval: the member's digests come once per interval, give or
        // take.)
        let gap = (interval / 2).max(cut.cost * CUT_SHARE);
        if cut.asked.is_some_and(|t| now < t + gap) {
            return;
        }
        cut.asked = Some(now);
        let prefer = cut
            .pending
            .as_ref()
            .map(|p| p.buckets.clone())
            .unwrap_or_default();
        let msg = AeMsg::CutBuckets {
            view,
            buckets: self.shared.store.digest.buckets(),
            prefer,
        };
        self.ae_send(key, msg);
    }

    /// The other side: lists the entries of the buckets that differ, those the asker named
    /// first, then the others from a random start (so that under writes, which make many
    /// buckets differ for a moment, every bucket gets its turn within the budget).
    pub(in crate::server) fn ae_on_cut_buckets(
        &mut self,
        key: OwnerIdx,
        view: u64,
        buckets: Vec<(u64, u64)>,
        prefer: Vec<u32>,
    ) {
        if self.pause.is_paused() || view != self.view() {
            return;
        }
        let differ = digest::differing(&self.shared.store.digest.buckets(), &buckets);
        let differing: HashSet<u32> = differ.iter().copied().collect();
        let mut first = HashSet::new();
        let mut order: Vec<u32> = prefer
            .into_iter()
            .filter(|b| differing.contains(b) && first.insert(*b))
            .collect();
        let start = rand::random::<u32>() % BUCKETS as u32;
        let mut rest: Vec<u32> = differ.into_iter().filter(|b| !first.contains(b)).collect();
        rest.sort_by_key(|&b| (b + BUCKETS as u32 - start) % BUCKETS as u32);
        order.extend(rest);
        let chosen = self.ae_budget(&order, &buckets);
        if chosen.is_empty() {
            return;
        }
        let (buckets, owners, entries) = self.ae_entries(&chosen, true);
        let msg = AeMsg::CutEntries {
            view,
            stable: self.ae_stable(),
            seen: self.ae_seen(),
            buckets,
            owners,
            entries,
        };
        self.ae_send(key, msg);
    }

    /// The asker: the member's entries, to compare at the cut.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::server) fn ae_on_cut_entries(
        &mut self,
        key: OwnerIdx,
        peer: &NodeId,
        view: u64,
        stamps: CutStamps,
        buckets: Vec<u32>,
        owners: Vec<NodeId>,
        entries: Vec<AeEntry<K>>,
    ) {
        if self.pause.is_paused() || view != self.view() {
            self.ae_cut(key, peer).pending = None;
            return;
        }
        let stamps = CutStamps {
            stable: stamps.stable.min(self.ae_stable()),
            seen: stamps.seen.max(self.ae_seen()),
        };
        self.ae_cut(key, peer).rounds += 1;
        let started = Instant::now();
        self.ae_decide(key, peer, &buckets, &owners, entries, Some((view, stamps)));
        self.ae_cut(key, peer).cost = started.elapsed();
    }

    /// Called by `ae_decide` in a comparison at a cut, with the entries of both sides by unit
    /// (key, or key and object): leaves in the maps only the differences this comparison
    /// confirms (found by the last one too, past the cut), and keeps the others for the next.
    pub(in crate::server) fn ae_cut_filter(
        &mut self,
        key: OwnerIdx,
        (view, stamps): (u64, CutStamps),
        my_owners: &[NodeId],
        their_owners: &[NodeId],
        mine: &mut HashMap<(K, u64), AeEntry<K>>,
        theirs: &mut HashMap<(K, u64), AeEntry<K>>,
    ) {
        let version = |e: &AeEntry<K>, owners: &[NodeId]| -> Version {
            (e.ts, owners.get(e.owner as usize).cloned(), e.value)
        };
        // Every difference now: its encoding and the newest stamp it involves.
        let mut found: HashMap<(K, u64), (Vec<u8>, u64)> = HashMap::new();
        let mut note = |u: &(K, u64), m: Option<Version>, t: Option<Version>| {
            if m == t {
                return;
            }
            let newest = m.iter().chain(&t).map(|v| v.0).max().unwrap_or(0);
            let enc = postcard::to_stdvec(&(u, &m, &t)).unwrap_or_default();
            found.insert(u.clone(), (enc, newest));
        };
        for (u, m) in mine.iter() {
            let t = theirs.get(u).map(|t| version(t, their_owners));
            note(u, Some(version(m, my_owners)), t);
        }
        for (u, t) in theirs.iter() {
            if !mine.contains_key(u) {
                note(u, None, Some(version(t, their_owners)));
            }
        }
        let Some(cut) = self.ae.cuts.get_mut(&key) else {
            return;
        };
        let mut confirmed: HashSet<(K, u64)> = HashSet::new();
        match &cut.pending {
            // The cut has not passed the first look yet: wait, repair nothing.
            Some(p) if p.view == view && stamps.stable <= p.seen => {}
            Some(p) if p.view == view => {
                for (u, (enc, newest)) in &found {
                    if p.diffs.contains(enc) && *newest < stamps.stable {
                        confirmed.insert(u.clone());
                    }
                }
                cut.pending = None;
            }
            _ => cut.pending = None,
        }
        if cut.pending.is_none() {
            let mut buckets: Vec<u32> = Vec::new();
            let mut diffs = HashSet::new();
            for (u, (enc, _)) in &found {
                if !confirmed.contains(u) {
                    diffs.insert(enc.clone());
                    buckets.push(bucket_of(key_hash(&u.0)) as u32);
                }
            }
            buckets.sort_unstable();
            buckets.dedup();
            if !diffs.is_empty() {
                cut.pending = Some(Pending {
                    view,
                    seen: stamps.seen,
                    diffs,
                    buckets,
                });
            }
        }
        // Only confirmed differences go on to the decision.
        let unconfirmed = |u: &(K, u64)| found.contains_key(u) && !confirmed.contains(u);
        mine.retain(|u, _| !unconfirmed(u));
        theirs.retain(|u, _| !unconfirmed(u));
    }
}
