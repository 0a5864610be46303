//! Step 7 of a central merge (ALGORITHM.md, section 9.2): per key, the versions no tombstone
//! beats, the stale copies the owner's side does not hold (section 16), and the winner each
//! source lacks: the union of objects for a bag, else one version chosen once by the conflict
//! rule (`resolve`).

use std::collections::HashMap;

use super::{Group, JoinCtx, TombstoneChunk};
use crate::authority;
use crate::conflict::Conflict;
use crate::hlc::HybridClock;
use crate::membership::NodeId;
use crate::proto::WireRecord;
use crate::store::{same_value, value_order};
use crate::types::{Key, TableKind, Value};
use crate::Result;

/// Every version of one key seen in the dumps, with the index of the source that had it; the
/// first one inline, so that a key only one side has costs no allocation.
pub(super) struct Versions<V> {
    pub(super) first: (usize, Version<V>),
    pub(super) rest: Vec<(usize, Version<V>)>,
}

/// A record of the merge, owner as an index into the join's owner list.
#[derive(Clone)]
pub(super) struct Version<V> {
    pub(super) value: V,
    pub(super) ts: u64,
    pub(super) owner: u32,
    pub(super) ttl: u32,
}

/// What the merge decided: per group, the records to send (`deltas`) and the stale copies to
/// remove (`stale`), and the number of keys held in more than one version.
pub(super) struct Decided<K, V> {
    pub(super) deltas: Vec<Vec<WireRecord<K, V>>>,
    pub(super) stale: Vec<Vec<WireRecord<K, V>>>,
    pub(super) conflicts: u64,
}

/// Decides every key of the dumps.
pub(super) fn decide<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    groups: &[Group],
    missed: &authority::Missed,
    owners: &[NodeId],
    mut versions: HashMap<K, Versions<V>, foldhash::fast::RandomState>,
    tombs: &[TombstoneChunk<K>],
) -> Result<Decided<K, V>> {
    // A version a tombstone of any source beats is no version: a conflict handler must not
    // give it a new stamp, which would beat the delete.
    if !tombs.is_empty() {
        drop_deleted(&mut versions, owners, tombs);
    }

    // 7. Merge. A record owned by a node of the join counts only as its owner's group holds it
    // (`authority`): other copies are stale, and removed where they are.
    let auth: Vec<Option<usize>> = owners
        .iter()
        .map(|o| groups.iter().position(|(_, targets)| targets.contains(o)))
        .collect();
    // Groups one of whose nodes missed writes of a node of the other: only their copies of
    // each other's records are checked against the owner's side.
    let apart: Vec<Vec<bool>> = groups
        .iter()
        .map(|(_, g)| {
            groups
                .iter()
                .map(|(_, h)| g.iter().any(|x| h.iter().any(|y| missed.apart(x, y))))
                .collect()
        })
        .collect();
    let mut deltas: Vec<Vec<WireRecord<K, V>>> = vec![Vec::new(); groups.len()];
    let mut stale: Vec<Vec<WireRecord<K, V>>> = vec![Vec::new(); groups.len()];
    let mut conflicts = 0u64;
    for (key, vs) in versions {
        // The common case: a key only one source has. Every other source gets it as it is.
        if vs.rest.is_empty() {
            let (src, v) = vs.first;
            if auth
                .get(v.owner as usize)
                .is_some_and(|a| a.is_some_and(|a| a != src && apart[src][a]))
            {
                stale[src].push(WireRecord {
                    key,
                    value: v.value,
                    ts: v.ts,
                    owner: v.owner,
                    ttl: v.ttl,
                });
                continue;
            }
            let others: Vec<usize> = (0..deltas.len()).filter(|i| *i != src).collect();
            if let Some((&last, rest)) = others.split_last() {
                for &i in rest {
                    deltas[i].push(WireRecord {
                        key: key.clone(),
                        value: v.value.clone(),
                        ts: v.ts,
                        owner: v.owner,
                        ttl: v.ttl,
                    });
                }
                deltas[last].push(WireRecord {
                    key,
                    value: v.value,
                    ts: v.ts,
                    owner: v.owner,
                    ttl: v.ttl,
                });
            }
            continue;
        }
        let all_vs: Vec<(usize, Version<V>)> = std::iter::once(vs.first).chain(vs.rest).collect();
        let flags = authority::stale_versions(
            &all_vs
                .iter()
                .map(|(s, v)| (*s, v.ts, v.owner, &v.value))
                .collect::<Vec<_>>(),
            &auth,
            |a, b| apart[a][b],
        );
        let mut vs = Vec::with_capacity(all_vs.len());
        let mut old = Vec::new();
        for ((src, v), is_stale) in all_vs.into_iter().zip(flags) {
            if is_stale {
                old.push((src, v));
            } else {
                vs.push((src, v));
            }
        }
        // A stale copy is removed where no winner of its key (set) or no object of its value
        // (bag) replaces it.
        let kept: std::collections::HashSet<Vec<u8>> =
            if ctx.kind == TableKind::Bag && !old.is_empty() {
                vs.iter()
                    .map(|(_, w)| crate::bag::encoding(&w.value))
                    .collect()
            } else {
                Default::default()
            };
        for (src, v) in old {
            let replaced = match ctx.kind {
                TableKind::Bag => kept.contains(&crate::bag::encoding(&v.value)),
                _ => !vs.is_empty(),
            };
            if !replaced {
                stale[src].push(WireRecord {
                    key: key.clone(),
                    value: v.value,
                    ts: v.ts,
                    owner: v.owner,
                    ttl: v.ttl,
                });
            }
        }
        if vs.is_empty() {
            continue;
        }
        if ctx.kind == TableKind::Bag {
            // Union of objects, each with the greatest stamp it has anywhere (as replication
            // keeps it, so that a node-down removes the same objects everywhere): every source
            // gets the objects it lacks, or holds under another stamp.
            // (`bag::union`: one encoding per version, not a comparison of every pair.)
            let stamped: Vec<(usize, &V, _)> = vs
                .iter()
                .map(|(s, v)| (*s, &v.value, (v.ts, owners.get(v.owner as usize))))
                .collect();
            let objects = crate::bag::union(&stamped, deltas.len());
            for (src_i, delta) in deltas.iter_mut().enumerate() {
                for (i, held) in &objects {
                    let o = &vs[*i].1;
                    if !held.get(src_i).copied().unwrap_or(false) {
                        delta.push(WireRecord {
                            key: key.clone(),
                            value: o.value.clone(),
                            ts: o.ts,
                            owner: o.owner,
                            ttl: o.ttl,
                        });
                    }
                }
            }
            continue;
        }
        let mut distinct: Vec<&Version<V>> = Vec::new();
        for (_, v) in &vs {
            if !distinct.iter().any(|d| same_version(d, v)) {
                distinct.push(v);
            }
        }
        let winner = if distinct.len() == 1 {
            distinct[0].clone()
        } else {
            conflicts += 1;
            let mut w = distinct[0].clone();
            for v in &distinct[1..] {
                w = resolve(ctx, &key, w, v, owners)?;
            }
            w
        };
        for (src_i, delta) in deltas.iter_mut().enumerate() {
            let has = vs
                .iter()
                .any(|(s, v)| *s == src_i && same_version(v, &winner));
            if !has {
                delta.push(WireRecord {
                    key: key.clone(),
                    value: winner.value.clone(),
                    ts: winner.ts,
                    owner: winner.owner,
                    ttl: winner.ttl,
                });
            }
        }
    }
    Ok(Decided {
        deltas,
        stale,
        conflicts,
    })
}

/// Whether two versions of a key are one: the same stamp and the same value (two writers can
/// give one owner a key in the same clock tick, with different values).
fn same_version<V: Value>(a: &Version<V>, b: &Version<V>) -> bool {
    a.ts == b.ts && a.owner == b.owner && same_value(&a.value, &b.value)
}

/// Removes from the merge every version that a tombstone of one of the dumps beats (stamp
/// not above the tombstone's; a delete wins a tie), and keys left with no version.
fn drop_deleted<K: Key, V: Value>(
    versions: &mut HashMap<K, Versions<V>, foldhash::fast::RandomState>,
    owners: &[NodeId],
    tombs: &[TombstoneChunk<K>],
) {
    let mut dead: HashMap<&K, (u64, &NodeId)> = HashMap::new();
    for (towners, ts) in tombs {
        for t in ts {
            let Some(o) = towners.get(t.owner as usize) else {
                continue;
            };
            let e = dead.entry(&t.key).or_insert((t.ts, o));
            if (t.ts, o) > *e {
                *e = (t.ts, o);
            }
        }
    }
    let mut gone: Vec<K> = Vec::new();
    for (k, vs) in versions.iter_mut() {
        let Some(&(dts, downer)) = dead.get(k) else {
            continue;
        };
        let alive = |v: &Version<V>| match owners.get(v.owner as usize) {
            Some(o) => (v.ts, o) > (dts, downer),
            None => false,
        };
        let mut all: Vec<(usize, Version<V>)> = std::iter::once(vs.first.clone())
            .chain(vs.rest.drain(..))
            .filter(|(_, v)| alive(v))
            .collect();
        if all.is_empty() {
            gone.push(k.clone());
            continue;
        }
        vs.first = all.remove(0);
        vs.rest = all;
    }
    for k in gone {
        versions.remove(&k);
    }
}

/// Picks the winner of two versions of one key.
fn resolve<K: Key, V: Value>(
    ctx: &JoinCtx<K, V>,
    key: &K,
    a: Version<V>,
    b: &Version<V>,
    owners: &[NodeId],
) -> Result<Version<V>> {
    let owner = |v: &Version<V>| owners.get(v.owner as usize).cloned();
    match &ctx.conflict {
        Conflict::LastWriterWins => {
            let order = (b.ts, owner(b))
                .cmp(&(a.ts, owner(&a)))
                .then_with(|| value_order(&b.value, &a.value));
            Ok(if order == std::cmp::Ordering::Greater {
                b.clone()
            } else {
                a
            })
        }
        Conflict::Handler(f) => {
            // A version that expired since its dump is no version: the handler's value would
            // get a new stamp and live again for a whole lifetime.
            let from = ctx.expire_ms.map_or(0, HybridClock::written_since);
            if b.ts < from {
                return Ok(a);
            }
            if a.ts < from {
                return Ok(b.clone());
            }
            // `a` is the version from the side of the smaller node name (dump order).
            // A panic fails this join (logged with the key), which is retried later.
            let value = crate::callbacks::guarded(&ctx.table, "conflict handler", key, || {
                f(key, &a.value, &b.value)
            })?;
            Ok(if same_value(&value, &a.value) {
                a
            } else if same_value(&value, &b.value) {
                b.clone()
            } else {
                Version {
                    value,
                    ts: ctx.clock.now(),
                    owner: a.owner,
                    ttl: a.ttl,
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::join::lock::tests::ids;
    use crate::proto::WireTombstone;

    fn ctx(conflict: Conflict<u64, u64>, expire_ms: Option<u64>) -> JoinCtx<u64, u64> {
        JoinCtx {
            port: Arc::new(|_| {}),
            me: ids(&["a"])[0].clone(),
            kind: TableKind::Set,
            conflict,
            clock: Arc::new(HybridClock::new()),
            lease: Duration::from_secs(1),
            chunk: 100,
            chunk_bytes: 1 << 20,
            max_records: 1_000_000,
            table: "t".into(),
            checkpoint: None,
            expire_ms,
            cluster: false,
            moved: Arc::default(),
            busy: Arc::default(),
            streams: HashMap::new(),
        }
    }

    fn v(value: u64, ts: u64, owner: u32) -> Version<u64> {
        Version {
            value,
            ts,
            owner,
            ttl: 0,
        }
    }

    #[test]
    fn last_writer_wins_keeps_the_greater_stamp_then_owner_then_value() {
        let owners = ids(&["a", "b"]);
        let c = ctx(Conflict::LastWriterWins, None);
        // (a, b, the winner)
        let cases = [
            (v(1, 5, 0), v(2, 6, 0), v(2, 6, 0)), // later timestamp
            (v(1, 6, 0), v(2, 5, 0), v(1, 6, 0)), // earlier timestamp
            (v(1, 5, 0), v(2, 5, 1), v(2, 5, 1)), // tie: greater owner name
            (v(1, 5, 1), v(2, 5, 0), v(1, 5, 1)), // tie: smaller owner name
            (v(1, 5, 0), v(2, 5, 0), v(2, 5, 0)), // same stamp: greater value
            (v(2, 5, 0), v(1, 5, 0), v(2, 5, 0)), // same stamp: smaller value
        ];
        for (i, (a, b, want)) in cases.into_iter().enumerate() {
            let got = resolve(&c, &1, a, &b, &owners).expect("no handler to fail");
            assert!(same_version(&got, &want), "case {i}");
        }
    }

    #[test]
    fn a_handler_keeps_a_version_it_returns_and_stamps_a_new_value_afresh() {
        let owners = ids(&["a", "b"]);
        // The handler returns: the first value, the second, or their sum.
        let pick = |which: u8| {
            ctx(
                Conflict::Handler(Arc::new(move |_, a: &u64, b: &u64| match which {
                    0 => *a,
                    1 => *b,
                    _ => a + b,
                })),
                None,
            )
        };
        let (a, b) = (v(10, 5, 0), v(20, 6, 1));
        let got = resolve(&pick(0), &1, a.clone(), &b, &owners).expect("handler");
        assert!(same_version(&got, &a), "returned a: a with its stamp");
        let got = resolve(&pick(1), &1, a.clone(), &b, &owners).expect("handler");
        assert!(same_version(&got, &b), "returned b: b with its stamp");
        let c = pick(2);
        let before = c.clock.now();
        let got = resolve(&c, &1, a.clone(), &b, &owners).expect("handler");
        assert_eq!(
            (got.value, got.owner),
            (30, a.owner),
            "a new value keeps a's owner"
        );
        assert!(got.ts > before, "and gets a fresh timestamp");
    }

    #[test]
    fn a_version_expired_since_its_dump_loses_without_asking_the_handler() {
        let owners = ids(&["a", "b"]);
        let c = ctx(
            Conflict::Handler(Arc::new(|_, _: &u64, _: &u64| panic!("not asked"))),
            Some(60_000),
        );
        let fresh = c.clock.now();
        let (old, new) = (v(1, 1, 0), v(2, fresh, 1));
        let got = resolve(&c, &1, old.clone(), &new, &owners).expect("no call");
        assert!(same_version(&got, &new));
        let got = resolve(&c, &1, new.clone(), &old, &owners).expect("no call");
        assert!(same_version(&got, &new));
    }

    #[test]
    fn a_tombstone_drops_the_versions_it_beats_and_wins_a_tie() {
        let owners = ids(&["a", "b"]);
        let mut versions: HashMap<u64, Versions<u64>, foldhash::fast::RandomState> =
            HashMap::default();
        let put = |vs: &mut HashMap<u64, Versions<u64>, _>, k: u64, list: Vec<Version<u64>>| {
            let mut it = list.into_iter().enumerate();
            let first = it.next().expect("a version");
            vs.insert(
                k,
                Versions {
                    first,
                    rest: it.collect(),
                },
            );
        };
        put(&mut versions, 1, vec![v(1, 3, 0), v(2, 7, 1)]); // one older, one newer
        put(&mut versions, 2, vec![v(1, 5, 0)]); // the tombstone's very stamp
        put(&mut versions, 3, vec![v(1, 5, 0)]); // no tombstone
        let tomb = |key, ts| WireTombstone { key, ts, owner: 0 };
        let tombs = vec![(ids(&["a"]), vec![tomb(1, 5), tomb(2, 5)])];
        drop_deleted(&mut versions, &owners, &tombs);
        let left = |k: u64| {
            versions.get(&k).map(|vs| {
                std::iter::once(&vs.first)
                    .chain(&vs.rest)
                    .map(|(_, v)| v.ts)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(left(1), Some(vec![7]));
        assert_eq!(left(2), None);
        assert_eq!(left(3), Some(vec![5]));
    }

    #[test]
    fn one_version_is_the_same_stamp_and_the_same_value() {
        assert!(same_version(&v(1, 5, 0), &v(1, 5, 0)));
        assert!(!same_version(&v(1, 5, 0), &v(2, 5, 0)));
        assert!(!same_version(&v(1, 5, 0), &v(1, 6, 0)));
        assert!(!same_version(&v(1, 5, 0), &v(1, 5, 1)));
    }
}
