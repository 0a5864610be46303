//! Records that expire (`TableOptions::expire_after`), on several nodes over real QUIC on
//! loopback. Waiting for the clock is what these tests are about: where a test sleeps, it lets
//! a record age; what it waits for otherwise, it polls for with a bound.

mod common;

use std::time::{Duration, Instant};

use cets::{Error, Table, TableOptions};
use common::*;

type K = u64;
type V = String;

/// Every table's value of `k`.
fn values(tables: &[Table<K, V>], k: K) -> Vec<Option<V>> {
    tables.iter().map(|t| t.get(&k)).collect()
}

/// A record written on one node is read everywhere until it expires, then on no node, and the
/// sweep removes it from every store. A key written again lives on from its new write. Sets and
/// ordered sets alike (the ordered set through `range` too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_expire_on_every_node_and_a_new_write_renews_them() {
    for opts in [TableOptions::set(), TableOptions::ordered_set()] {
        let ttl = Duration::from_secs(2);
        let c = cluster(&["a", "b", "c"]).await;
        let mut tables: Vec<Table<K, V>> = Vec::new();
        for (n, _) in &c {
            tables.push(n.start("t", opts.clone().expire_after(ttl)).await.unwrap());
        }
        joined(&tables.iter().collect::<Vec<_>>()).await;
        let start = Instant::now();
        tables[0].insert(1, "once".into()).await.unwrap();
        tables[1].insert(2, "renewed".into()).await.unwrap();
        assert_eq!(values(&tables, 1), vec![Some("once".to_string()); 3]);
        // Past half its life, key 2 is written again.
        tokio::time::sleep_until((start + ttl * 6 / 10).into()).await;
        tables[2].insert(2, "renewed".into()).await.unwrap();
        eventually(WAIT, "key 1 expired on every node", || async {
            values(&tables, 1) == vec![None; 3]
        })
        .await;
        // Key 2's first write is older than the ttl now; its second is not. Stamps count whole
        // milliseconds, so a record taken at `start` may carry a stamp up to 1 ms before it and
        // expire that much before `start + ttl`.
        assert!(
            start.elapsed() + Duration::from_millis(2) > ttl,
            "key 1 expired {:?} after its write, before its ttl of {ttl:?}",
            start.elapsed()
        );
        assert_eq!(values(&tables, 2), vec![Some("renewed".to_string()); 3]);
        if opts.kind() == cets::TableKind::OrderedSet {
            for t in &tables {
                assert_eq!(t.range(..).unwrap(), vec![(2, "renewed".to_string())]);
            }
        }
        eventually(WAIT, "key 2 expired and both were swept", || async {
            tables.iter().all(|t| t.is_empty()) && values(&tables, 2) == vec![None; 3]
        })
        .await;
        shutdown_all(c.iter().map(|(n, _)| n)).await;
    }
}

/// A bag's objects expire one by one, each from its own write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bag_object_expires_alone() {
    let ttl = Duration::from_secs(1);
    let c = cluster(&["a", "b"]).await;
    let mut tables: Vec<Table<K, V>> = Vec::new();
    for (n, _) in &c {
        tables.push(
            n.start("t", TableOptions::bag().expire_after(ttl))
                .await
                .unwrap(),
        );
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let start = Instant::now();
    tables[0].insert(1, "old".into()).await.unwrap();
    tokio::time::sleep_until((start + ttl / 2).into()).await;
    tables[1].insert(1, "new".into()).await.unwrap();
    eventually(WAIT, "only the older object expired", || async {
        tables
            .iter()
            .all(|t| t.lookup(&1) == vec!["new".to_string()])
    })
    .await;
    eventually(WAIT, "both expired and were swept", || async {
        tables
            .iter()
            .all(|t| t.lookup(&1).is_empty() && !t.contains_key(&1) && t.is_empty())
    })
    .await;
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// Nodes whose records would live differently do not share the table: each refuses the other's,
/// as for different types, and no record crosses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_expiry_refuse_each_others_table() {
    let c = cluster(&["a", "b"]).await;
    let ta: Table<K, V> = c[0]
        .0
        .start(
            "t",
            TableOptions::set().expire_after(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let tb: Table<K, V> = c[1].0.start("t", TableOptions::set()).await.unwrap();
    for t in [&ta, &tb] {
        eventually(WAIT, "the other node's table refused", || async {
            t.status().await.is_ok_and(|s| {
                s.refused
                    .iter()
                    .any(|(_, why)| why.contains("expire_after"))
            })
        })
        .await;
    }
    ta.insert(1, "x".into()).await.unwrap();
    tb.sync().await.unwrap();
    assert_eq!(tb.get(&1), None);
    assert!(ta.nodes().is_empty() && tb.nodes().is_empty());
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// A lifetime under a millisecond cannot be kept: the table does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_under_a_millisecond_is_refused() {
    let (n, _) = node("a").await;
    let r = n
        .start::<K, V>(
            "t",
            TableOptions::set().expire_after(Duration::from_micros(999)),
        )
        .await;
    assert!(matches!(r, Err(Error::Config(_))), "{r:?}");
    // The name stays free.
    let t: Table<K, V> = n
        .start("t", TableOptions::set().expire_after(Duration::MAX))
        .await
        .unwrap();
    t.insert(1, "kept".into()).await.unwrap();
    assert_eq!(t.get(&1), Some("kept".to_string()));
    n.shutdown().await.unwrap();
}

/// Two nodes that each hold an expired (not yet swept) version of a key join: the conflict
/// handler merges the two expired versions into a new value, which the coordinator stamps now,
/// so a record that every node had stopped returning is read again on both, for a whole new
/// `ttl` (ALGORITHM.md 7.6: "a conflict handler is never called with a version that expired
/// since its dump").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_does_not_bring_back_expired_records_through_the_conflict_handler() {
    let ttl = Duration::from_secs(2);
    let (na, _ha) = node("a").await;
    let (nb, _hb) = node("b").await;
    let opts = || {
        TableOptions::set()
            .expire_after(ttl)
            .conflict_handler(|_: &K, a: &V, b: &V| format!("{a}+{b}"))
    };
    // Not connected yet: two separate partitions. Written right after the tables start, so
    // they expire well before a sweep (every ttl/4 from the start) takes them.
    let ta: Table<K, V> = na.start("t", opts()).await.unwrap();
    let tb: Table<K, V> = nb.start("t", opts()).await.unwrap();
    ta.insert(1, "a".into()).await.unwrap();
    tb.insert(1, "b".into()).await.unwrap();
    eventually(WAIT, "both versions expired", || async {
        ta.get(&1).is_none() && tb.get(&1).is_none()
    })
    .await;
    let unswept = (ta.len(), tb.len());
    na.connect(nb.local_addr());
    joined(&[&ta, &tb]).await;
    tb.sync().await.unwrap();
    ta.sync().await.unwrap();
    assert_eq!(
        (ta.get(&1), tb.get(&1)),
        (None, None),
        "expired records read again after the join (stored before it: {unswept:?})"
    );
    shutdown_all([&na, &nb]).await;
}

/// Lifetimes that differ by one millisecond must be refused too ("to the millisecond"): the
/// fingerprint mixes in `ms | 1`, so 1000 ms and 1001 ms (any even ttl and the next one) give
/// the same fingerprint and the two nodes share the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_whose_expiry_differs_by_one_millisecond_refuse_each_others_table() {
    let c = cluster(&["a", "b"]).await;
    let ta: Table<K, V> = c[0]
        .0
        .start(
            "t",
            TableOptions::set().expire_after(Duration::from_millis(1000)),
        )
        .await
        .unwrap();
    let tb: Table<K, V> = c[1]
        .0
        .start(
            "t",
            TableOptions::set().expire_after(Duration::from_millis(1001)),
        )
        .await
        .unwrap();
    let refused = |t: &Table<K, V>| {
        let t = t.clone();
        async move {
            t.status().await.is_ok_and(|s| {
                s.refused
                    .iter()
                    .any(|(_, why)| why.contains("expire_after"))
            })
        }
    };
    eventually(WAIT, "refused or joined", || async {
        (refused(&ta).await && refused(&tb).await)
            || (ta.nodes().len() == 1 && tb.nodes().len() == 1)
    })
    .await;
    assert!(
        refused(&ta).await && refused(&tb).await,
        "a (1000 ms) and b (1001 ms) share the table: members {:?} and {:?}",
        ta.nodes(),
        tb.nodes()
    );
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}
