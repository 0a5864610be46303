//! The newer-wins rule (ALGORITHM.md, "Convergence") as pure functions of stamps and values,
//! so that each case is unit-tested without a server or a socket. `apply.rs`, `cluster.rs`
//! (joins) and `anti_entropy/` (repairs) decide with these and nothing else.
//!
//! A stamp is `(timestamp, owner identity)`; it orders versions of a key the same on every
//! node. `None` as the identity (an owner index no longer interned) sorts first.

use std::cmp::Ordering;

use serde::Serialize;

use crate::membership::{NodeId, Owners};
use crate::store::value_order;
use crate::tombstones::TombstoneRef;

/// A version's place in the newer-wins order: timestamp, then owner identity.
pub(super) type Stamp<'a> = (u64, Option<&'a NodeId>);

/// Whether an insert stamped `new` with `new_value` replaces the stored version `cur` with
/// `cur_value`: the greater stamp wins; equal stamps (two writers that named one owner in the
/// same clock tick) are ordered by the values' encodings, and an equal value is the same write
/// again, which is applied (it changes nothing).
pub(super) fn insert_beats_record<V: Serialize>(
    new: Stamp<'_>,
    new_value: &V,
    cur: Stamp<'_>,
    cur_value: &V,
) -> bool {
    match new.cmp(&cur) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => value_order(new_value, cur_value) != Ordering::Less,
    }
}

/// Whether one object of a bag, stored already, takes the stamp `new` instead of `cur`: the
/// greater stamp stays, so two writers that insert one object at once leave it to the same
/// owner on every node.
pub(super) fn bag_object_beats(new: Stamp<'_>, cur: Stamp<'_>) -> bool {
    new > cur
}

/// What a key's tombstone stands for, as far as the rule is concerned.
#[derive(Debug, Clone, Copy)]
pub(super) struct TombstoneStamp<'a> {
    /// The stamp of the delete, or of the one removed version (`delete_object`).
    pub(super) stamp: Stamp<'a>,
    /// Whether it stands for one removed version (it carries that version's value) rather
    /// than a delete of the key.
    pub(super) of_version: bool,
}

/// Whether a removal stamped `stamp` (a delete, a dropped orphan) beats what the key holds:
/// the stored version's stamp, or else its tombstone. A removal wins a tie with a record, and
/// so with the tombstone of one removed version, but not with another removal's tombstone
/// (nothing would change). With neither, it wins: its tombstone stops older writes in flight.
pub(super) fn removal_beats(
    stamp: Stamp<'_>,
    stored: Option<Stamp<'_>>,
    tombstone: Option<TombstoneStamp<'_>>,
) -> bool {
    if let Some(cur) = stored {
        return stamp >= cur;
    }
    match tombstone {
        Some(t) => match stamp.cmp(&t.stamp) {
            Ordering::Greater => true,
            Ordering::Equal => t.of_version,
            Ordering::Less => false,
        },
        None => true,
    }
}

/// Whether a record stamped `stamp` with `value` beats the key's tombstone `t`: it is newer, or
/// has the stamp of the version `t` stands for and would have beaten that version by value. A
/// tombstone of a delete wins every tie.
pub(super) fn beats_tombstone<V: Serialize>(
    stamp: Stamp<'_>,
    value: &V,
    t: TombstoneRef<'_>,
    owners: &Owners,
) -> bool {
    beats_tombstone_stamp(stamp, value, (t.ts, owners.get(t.owner)), t.value)
}

/// [`beats_tombstone`] on the tombstone's stamp and the encoding of the version it stands for
/// (`None` for a delete).
fn beats_tombstone_stamp<V: Serialize>(
    stamp: Stamp<'_>,
    value: &V,
    tombstone: Stamp<'_>,
    deleted: Option<&[u8]>,
) -> bool {
    match stamp.cmp(&tombstone) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => deleted.is_some_and(|deleted| {
            postcard::to_stdvec(value).is_ok_and(|v| v.as_slice() > deleted)
        }),
    }
}

/// A refused write of one key, the same on every node: FNV-1a of the encoded key, the stamp and
/// the writer's identity.
pub(super) fn refusal_mark<K: Serialize>(k: &K, ts: u64, writer: Option<&NodeId>) -> u64 {
    let key = postcard::to_stdvec(k).unwrap_or_default();
    let (name, incarnation) = writer.map_or((&[][..], 0), |w| (w.name.as_bytes(), w.incarnation));
    key.iter()
        .chain(&ts.to_le_bytes())
        .chain(name)
        .chain(&incarnation.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
