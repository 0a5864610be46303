//! The digest of a table's contents, kept up to date by every change of the local store, for
//! anti-entropy (ALGORITHM.md, section 15; the exchange is in `server/anti_entropy/`).
//!
//! Records fall into [`BUCKETS`] buckets by the hash of their key. Each bucket keeps the
//! wrapping sum of the hashes of its records and their count. A sum does not depend on the
//! order of the changes, and a removal undoes an addition exactly, so two replicas that hold
//! the same records have the same buckets however they got there, and the store keeps them
//! with two additions per record it stores or removes: never a scan.
//!
//! A record's hash covers its key, value, timestamp and owner identity. Every node must compute
//! the same hash for the same record, so the hash of key and value is fixed
//! (`crate::stable_hash`: no random seed, no dependence on the platform's word size or byte
//! order) and reads each value's primitives in place, eight bytes per multiply, without
//! encoding it.
//!
//! Each call that changes the store takes a [`Hook`] and reports to it, through the store's
//! `Changes` trait (`add`, `sub`, `replace`, `restamp`), each record it stores or drops ([`Records`] wraps the store so that
//! every writer goes through it; the same hook captures changes for subscribers,
//! `crate::capture`); the table server reads [`Digest::root`] and [`Digest::buckets`] for the
//! exchange.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::capture::{Capture, Sink};
pub(crate) use crate::membership::OwnerHashes;
use crate::stable_hash::{fold_mul, WordHasher, P0, P1, P2};
pub(crate) use crate::stable_hash::{key_hash, value_hash};
use crate::store::{Changes, Store};
use crate::types::{OwnerIdx, Rec, TableKind};

/// Buckets of a digest: the unit a difference is narrowed to before keys are listed. 1024
/// buckets take 16 KiB per table, and their list (sent only when two replicas differ) 16 KiB
/// on the wire; a table of a million records then has about a thousand records per bucket.
pub(crate) const BUCKETS: usize = 1024;
const BUCKET_BITS: u32 = BUCKETS.trailing_zeros();

/// The bucket of a key's hash.
#[inline]
pub(crate) fn bucket_of(key_hash: u64) -> usize {
    (key_hash >> (64 - BUCKET_BITS)) as usize
}

/// The hash of one record (one object, in a bag), from the hashes of its parts.
#[inline]
pub(crate) fn record_hash(key: u64, value: u64, ts: u64, owner: u64) -> u64 {
    let h = fold_mul(key ^ ts.rotate_left(29) ^ P0, P1 ^ value);
    fold_mul(h ^ owner, P2)
}

/// A summary of a whole bucket list, equal for equal lists: what members compare at rest.
pub(crate) fn root_of(buckets: &[(u64, u64)]) -> u64 {
    let mut h = WordHasher::new(4);
    for (sum, count) in buckets {
        h.write(&sum.to_le_bytes());
        h.write(&count.to_le_bytes());
    }
    h.finish()
}

/// The buckets whose sum or count differ between two lists (every bucket past the end of the
/// shorter one differs).
pub(crate) fn differing(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<u32> {
    (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .map(|i| i as u32)
        .collect()
}

/// One bucket: the sum of its records' hashes and their count, side by side so that a change
/// touches one cache line.
#[derive(Default)]
struct Bucket {
    sum: AtomicU64,
    count: AtomicU64,
}

/// The bucket sums and counts of one table.
pub(crate) struct Digest {
    on: bool,
    buckets: Box<[Bucket]>,
    owners: OwnerHashes,
}

impl Digest {
    /// A digest; `on: false` keeps nothing (anti-entropy is off) and costs nothing.
    pub(crate) fn new(on: bool) -> Self {
        let n = if on { BUCKETS } else { 0 };
        Self {
            on,
            buckets: (0..n).map(|_| Bucket::default()).collect(),
            owners: Arc::default(),
        }
    }

    /// The table of owner hashes, for the table server's `Owners` to fill.
    pub(crate) fn owner_hashes(&self) -> OwnerHashes {
        self.owners.clone()
    }

    /// Every bucket's (sum, count).
    pub(crate) fn buckets(&self) -> Vec<(u64, u64)> {
        self.buckets
            .iter()
            .map(|b| {
                (
                    b.sum.load(Ordering::Relaxed),
                    b.count.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// The summary of every bucket, and the number of records.
    pub(crate) fn root(&self) -> (u64, u64) {
        let b = self.buckets();
        (root_of(&b), b.iter().map(|(_, c)| *c).sum())
    }

    #[inline]
    fn change_bucket(&self, i: usize, h: u64, add: bool) {
        let Some(Bucket { sum, count }) = self.buckets.get(i) else {
            return;
        };
        // The table server is the only writer (`Records`), so a load and a store do: a locked
        // read-modify-write would wait here for the store of the record itself, often a
        // cache miss, to complete. Readers (status, the exchange) see each word whole.
        let (s, c) = (sum.load(Ordering::Relaxed), count.load(Ordering::Relaxed));
        if add {
            sum.store(s.wrapping_add(h), Ordering::Relaxed);
            count.store(c.wrapping_add(1), Ordering::Relaxed);
        } else {
            sum.store(s.wrapping_sub(h), Ordering::Relaxed);
            count.store(c.wrapping_sub(1), Ordering::Relaxed);
        }
    }
}

/// One call that changes the store, as the digest and the subscribers' capture see it.
pub(crate) struct Hook<'a, K, V> {
    /// `None` when anti-entropy is off.
    digest: Option<&'a Digest>,
    /// `None` unless the table server captures changes for subscribers (`crate::capture`).
    sink: Option<Sink<'a, K, V>>,
}

impl<K: Serialize + Clone + 'static, V: Serialize + Clone + 'static> Hook<'_, K, V> {
    #[inline]
    fn change(d: &Digest, kh: u64, h: u64, add: bool) {
        d.change_bucket(bucket_of(kh), h, add);
    }

    /// The hash of a record under a key whose hash is `kh`.
    #[inline]
    fn hash(d: &Digest, kh: u64, r: &Rec<V>) -> u64 {
        record_hash(kh, value_hash(&r.value), r.ts, d.owners.get(r.owner))
    }
}

impl<K: Serialize + Clone + 'static, V: Serialize + Clone + 'static> Changes<K, V>
    for Hook<'_, K, V>
{
    #[inline]
    fn add(&self, k: &K, r: &Rec<V>) {
        if let Some(d) = self.digest {
            let kh = key_hash(k);
            Self::change(d, kh, Self::hash(d, kh, r), true);
        }
        if let Some(s) = &self.sink {
            s.stored(k, None, r);
        }
    }

    #[inline]
    fn sub(&self, k: &K, r: &Rec<V>) {
        if let Some(d) = self.digest {
            let kh = key_hash(k);
            Self::change(d, kh, Self::hash(d, kh, r), false);
        }
        if let Some(s) = &self.sink {
            s.removed(k, r);
        }
    }

    #[inline]
    fn replace(&self, k: &K, old: Option<&Rec<V>>, new: &Rec<V>) {
        self.restamp(k, old, new);
        if let Some(s) = &self.sink {
            s.stored(k, old, new);
        }
    }

    #[inline]
    fn restamp(&self, k: &K, old: Option<&Rec<V>>, new: &Rec<V>) {
        if let Some(d) = self.digest {
            let kh = key_hash(k);
            if let Some(old) = old {
                Self::change(d, kh, Self::hash(d, kh, old), false);
            }
            Self::change(d, kh, Self::hash(d, kh, new), true);
        }
    }
}

/// The local store with its digest: every write to the store goes through here, so the digest
/// follows every change (replicated writes, deletes, expiry sweeps, node-down drops, joins,
/// repairs). Reads go to the store itself.
pub(crate) struct Records<K, V> {
    store: Store<K, V>,
    pub(crate) digest: Digest,
    /// The changes kept for subscribers while the table server captures them.
    pub(crate) capture: Capture<K, V>,
}

impl<K, V> Deref for Records<K, V> {
    type Target = Store<K, V>;

    fn deref(&self) -> &Store<K, V> {
        &self.store
    }
}

impl<K, V> Records<K, V>
where
    K: std::hash::Hash + Eq + Ord + Clone + Serialize + Send + Sync + 'static,
    V: Clone + Serialize + Send + Sync + 'static,
{
    pub(crate) fn new(kind: TableKind, digest: bool) -> Self {
        Self {
            store: Store::new(kind),
            digest: Digest::new(digest),
            capture: Capture::default(),
        }
    }

    /// What one call that changes the store reports to.
    #[inline]
    fn hook(&self) -> Hook<'_, K, V> {
        Hook {
            digest: self.digest.on.then_some(&self.digest),
            sink: self.capture.sink(),
        }
    }

    /// See [`Store::put_many_if`].
    pub(crate) fn put_many_if(
        &self,
        recs: Vec<(K, Rec<V>)>,
        wins: impl FnMut(&K, &Rec<V>, Option<&Rec<V>>) -> bool,
    ) {
        self.store.put_many_if(recs, wins, &self.hook());
    }

    /// See [`Store::remove_if`].
    pub(crate) fn remove_if(
        &self,
        k: &K,
        wins: impl FnOnce((u64, OwnerIdx)) -> bool,
    ) -> Option<bool> {
        self.store.remove_if(k, wins, &self.hook())
    }

    /// See [`Store::remove_many_if`].
    pub(crate) fn remove_many_if(
        &self,
        keys: &[K],
        wins: impl FnMut((u64, OwnerIdx)) -> bool,
    ) -> Vec<Option<bool>> {
        self.store.remove_many_if(keys, wins, &self.hook())
    }

    /// See [`Store::remove`].
    pub(crate) fn remove(&self, k: &K) -> bool {
        self.store.remove(k, &self.hook())
    }

    /// See [`Store::remove_object`].
    pub(crate) fn remove_object(&self, k: &K, v: &V) -> bool {
        self.store.remove_object(k, v, &self.hook())
    }

    /// See [`Store::remove_version`].
    pub(crate) fn remove_version(&self, k: &K, v: &V, ts: u64, owner: OwnerIdx) -> bool {
        self.store.remove_version(k, v, ts, owner, &self.hook())
    }

    /// See [`Store::remove_owned`].
    pub(crate) fn remove_owned(
        &self,
        owner: OwnerIdx,
        stamped: impl FnMut(&K, u64),
    ) -> Vec<(K, V)> {
        self.store.remove_owned(owner, stamped, &self.hook())
    }

    /// See [`Store::remove_owned_by`].
    pub(crate) fn remove_owned_by(
        &self,
        of: impl Fn(OwnerIdx) -> bool,
        stamped: impl FnMut(&K, u64),
    ) -> Vec<(K, V)> {
        self.store.remove_owned_by(of, stamped, &self.hook())
    }

    /// Stores a record as it is (tests that build a store by hand).
    #[cfg(test)]
    pub(crate) fn put(&self, k: K, rec: Rec<V>) {
        self.store.put(k, rec, &self.hook());
    }
}

/// Anti-entropy of one table, in [`crate::TableStatus::anti_entropy`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct AntiEntropyStatus {
    /// The summary of this table's digest: equal on members that hold the same records.
    pub digest: u64,
    /// Records the digest counts (objects, in a bag).
    pub records: u64,
    /// Digest rounds this node started (one every `anti_entropy_interval`, and a few quick
    /// ones after each change of the member list).
    pub rounds: u64,
    /// Bytes of anti-entropy messages this table sent so far (digests, and the narrowing and
    /// repair of differences): at rest about 100 bytes per member and round.
    pub bytes_sent: u64,
    /// Whether the last digest each member sent, compared when both had applied the same
    /// writes, matched this node's: every replica holds the same records. True with no members.
    pub in_sync: bool,
    /// Each member, by name.
    pub peers: Vec<PeerDigest>,
}

/// How one member's digest compares with this node's ([`AntiEntropyStatus::peers`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct PeerDigest {
    /// The member's name.
    pub node: String,
    /// Its digests compared here (those sent when both had applied the same writes).
    pub rounds: u64,
    /// How long ago the last one was compared.
    pub last_round: Option<std::time::Duration>,
    /// Whether the last one matched this node's digest.
    pub matches: bool,
    /// Keys (objects, in a bag) found different between the two, in all rounds so far,
    /// counted on the node that decided them (the one with the smaller name).
    pub differences: u64,
    /// Records this node stored or removed to repair a difference with this member.
    pub repaired: u64,
    /// Comparisons at a cut made with this member: those made while writes were in flight,
    /// when no digest could be compared (ALGORITHM.md, section 15.4). Counted on the node
    /// with the smaller name.
    pub rounds_at_cut: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{name_owner, owner_hash, NodeId, FAST_OWNERS};

    fn rec(value: u32, ts: u64, owner: OwnerIdx) -> Rec<u32> {
        Rec::new(value, ts, owner)
    }

    fn records(kind: TableKind) -> Records<u64, u32> {
        let r = Records::new(kind, true);
        let owners = r.digest.owner_hashes();
        name_owner(
            &owners,
            0,
            &NodeId {
                name: "a".into(),
                incarnation: 1,
            },
        );
        name_owner(
            &owners,
            1,
            &NodeId {
                name: "b".into(),
                incarnation: 2,
            },
        );
        r
    }

    #[test]
    fn the_digest_does_not_depend_on_the_order_of_changes() {
        for kind in [TableKind::Set, TableKind::OrderedSet, TableKind::Bag] {
            let (x, y) = (records(kind), records(kind));
            let all: Vec<(u64, Rec<u32>)> = (0..500)
                .map(|k| (k, rec(k as u32 * 7, 100 + k, (k % 2) as u32)))
                .collect();
            for (k, r) in &all {
                x.put(*k, r.clone());
            }
            for (k, r) in all.iter().rev() {
                y.put(*k, r.clone());
            }
            assert_eq!(x.digest.buckets(), y.digest.buckets(), "{kind:?}");
            assert_eq!(x.digest.root(), y.digest.root());
            assert_eq!(x.digest.root().1, 500);
        }
    }

    #[test]
    fn removing_undoes_adding_whatever_the_path() {
        for kind in [TableKind::Set, TableKind::OrderedSet, TableKind::Bag] {
            let r = records(kind);
            let empty = r.digest.root();
            r.put(1, rec(10, 5, 0));
            let one = r.digest.root();
            r.put(2, rec(20, 6, 1));
            r.put(3, rec(30, 7, 1));
            assert!(r.remove(&2));
            assert_eq!(r.remove_if(&3, |_| true), Some(true));
            assert_eq!(r.digest.root(), one, "{kind:?}");
            // Overwrite (a newer version of key 1), then remove by owner.
            let newer = |_: &u64, n: &Rec<u32>, c: Option<&Rec<u32>>| c.is_none_or(|c| n.ts > c.ts);
            r.put_many_if(vec![(1, rec(11, 9, 1))], newer);
            assert_ne!(r.digest.root(), one);
            r.put_many_if(vec![(4, rec(40, 9, 1)), (5, rec(50, 9, 0))], newer);
            r.remove_many_if(&[5], |_| true);
            let gone = r.remove_owned(1, |_, _| {});
            if kind == TableKind::Bag {
                // The bag kept both objects of key 1; the owner 0 one stays.
                assert_eq!(gone.len(), 2);
                assert_eq!(r.digest.root(), one);
                assert!(r.remove_object(&1, &10));
            } else {
                assert_eq!(gone.len(), 2);
            }
            assert_eq!(r.digest.root(), empty, "{kind:?}");
            assert_eq!(r.digest.buckets(), vec![(0, 0); BUCKETS]);
        }
    }

    #[test]
    fn every_part_of_a_record_counts() {
        let base = record_hash(1, 2, 3, 4);
        assert_ne!(base, record_hash(9, 2, 3, 4));
        assert_ne!(base, record_hash(1, 9, 3, 4));
        assert_ne!(base, record_hash(1, 2, 9, 4));
        assert_ne!(base, record_hash(1, 2, 3, 9));
        let a = records(TableKind::Set);
        let b = records(TableKind::Set);
        a.put(1, rec(10, 5, 0));
        b.put(1, rec(10, 5, 1)); // another owner only
        assert_ne!(a.digest.root(), b.digest.root());
        let d = differing(&a.digest.buckets(), &b.digest.buckets());
        assert_eq!(d, vec![bucket_of(key_hash(&1u64)) as u32]);
    }

    #[test]
    fn owners_past_the_lock_free_slots_hash_as_the_first_ones() {
        let r: Records<u64, u32> = Records::new(TableKind::Set, true);
        let owners = r.digest.owner_hashes();
        let id = |name: &str| NodeId {
            name: name.into(),
            incarnation: 1,
        };
        let far = (FAST_OWNERS + 3) as OwnerIdx;
        name_owner(&owners, far, &id("far"));
        name_owner(&owners, 0, &id("near"));
        assert_eq!(owners.get(far), owner_hash(&id("far")));
        assert_eq!(owners.get(0), owner_hash(&id("near")));
        assert_eq!(owners.get(far + 1), 0);
        r.put(1, rec(10, 5, far));
        let want = record_hash(
            key_hash(&1u64),
            value_hash(&10u32),
            5,
            owner_hash(&id("far")),
        );
        let b = r.digest.buckets();
        assert_eq!(b[bucket_of(key_hash(&1u64))], (want, 1));
    }

    #[test]
    fn a_digest_that_is_off_keeps_nothing() {
        let r: Records<u64, u32> = Records::new(TableKind::Set, false);
        r.put(1, rec(1, 1, 0));
        assert_eq!(r.digest.root(), (root_of(&[]), 0));
        assert!(r.digest.buckets().is_empty());
    }
}
