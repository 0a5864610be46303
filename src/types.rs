//! The types every layer needs: what a key maps to ([`TableKind`]), the bounds of keys and
//! values ([`Key`], [`Value`]), an owner's index ([`OwnerIdx`]), a stored record ([`Rec`]), a
//! write's stamp ([`Stamp`]), and how two values compare ([`same_value`], [`value_order`]).
//!
//! Below the public handle (`table.rs`), the table server (`server/`), the store, the wire
//! messages and the join coordinator, all of which take them from here; it imports none of them.

use std::fmt;
use std::hash::Hash;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// What a key maps to, as in ETS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TableKind {
    /// One value per key (hash table).
    Set,
    /// One value per key, keys kept in order (`range` works).
    OrderedSet,
    /// Any number of distinct values per key.
    Bag,
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::Set => "set",
            TableKind::OrderedSet => "ordered_set",
            TableKind::Bag => "bag",
        })
    }
}

/// The bounds every key type satisfies.
pub trait Key:
    Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync + fmt::Debug + 'static
{
}
impl<
        T: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync + fmt::Debug + 'static,
    > Key for T
{
}
/// The bounds every value type satisfies.
pub trait Value: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> Value for T {}

/// Compact index of a node identity within one table server (records store the index;
/// `crate::membership::Owners` gives them out).
pub(crate) type OwnerIdx = u32;

/// The order of two values by their encodings: the last tie-break between two versions of a
/// key with equal stamps (two writers that gave one owner the same key in the same clock
/// tick), the same on every node. Values that fail to encode compare equal.
pub(crate) fn value_order<V: Serialize>(a: &V, b: &V) -> std::cmp::Ordering {
    match (postcard::to_stdvec(a), postcard::to_stdvec(b)) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => std::cmp::Ordering::Equal,
    }
}

/// Whether two values are the same object (bags, `delete_object`): equal encodings.
pub(crate) fn same_value<V: Serialize>(a: &V, b: &V) -> bool {
    match (postcard::to_stdvec(a), postcard::to_stdvec(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// A stored record's value and metadata.
#[derive(Debug, Clone)]
pub(crate) struct Rec<V> {
    pub value: V,
    pub ts: u64,
    pub owner: OwnerIdx,
    /// The record's own lifetime in milliseconds from `ts` (`Table::insert_with_ttl`); 0: none.
    /// It fits in the padding after `owner`, so it costs no memory.
    pub ttl: u32,
}

impl<V> Rec<V> {
    /// A record without a lifetime of its own.
    pub(crate) fn new(value: V, ts: u64, owner: OwnerIdx) -> Self {
        Self {
            value,
            ts,
            owner,
            ttl: 0,
        }
    }

    /// Whether a read returns it: stamped at or after `from` (the table's expiry), and within
    /// its own lifetime, if it has one.
    #[inline]
    pub(crate) fn live(&self, from: u64) -> bool {
        self.ts >= from && (self.ttl == 0 || self.outlives_own_ttl())
    }

    #[inline(never)]
    fn outlives_own_ttl(&self) -> bool {
        self.ts >= crate::hlc::HybridClock::written_since(u64::from(self.ttl))
    }
}

/// A write's stamp: its timestamp and the writer's owner index (a delete's, in a tombstone).
pub(crate) type Stamp = (u64, OwnerIdx);
