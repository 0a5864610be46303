//! Anti-entropy: replicas made to differ behind the protocol's back (the `testing` feature's
//! local-only writes) are found and repaired within two digest rounds; replicas that do not
//! differ are never "repaired", at rest or under steady concurrent writes.

#[path = "common/capture.rs"]
mod capture;
mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cets::{Node, NodeConfig, Table, TableOptions};
use common::*;

type T = Table<u64, String>;

/// The warning of the node that decides a repair.
const DIFFER: &str =
    "anti-entropy: replicas differ (a write was lost or applied differently); repairing";
/// The warning of each node that changes its store to repair.
const REPAIRED: &str = "anti-entropy: records repaired";

async fn cluster_with(names: &[&str], interval: Duration) -> Vec<Node> {
    let mut nodes = Vec::new();
    let mut handles = Vec::new();
    for n in names {
        let mut config = NodeConfig::fast_failover();
        config.anti_entropy_interval = Some(interval);
        // Rounds are counted: a connection lost to a stalled machine (1 s in `fast_failover`)
        // means a rejoin and a few quick rounds after it (a cluster-owned table showed 7 rounds,
        // once in 15 runs under load).
        config.idle_timeout = Duration::from_secs(3);
        let (node, h) = node_with(n, "test-cookie", config).await;
        nodes.push(node);
        handles.push(h);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.local_addr()).collect();
    for h in &handles {
        h.set(addrs.clone());
    }
    nodes
}

/// Every node's view of one table: (rounds started, digest, differences, repaired).
async fn ae(t: &T) -> (u64, u64, u64, u64) {
    let s = t.status().await.unwrap();
    let a = s.anti_entropy.expect("anti-entropy is on");
    let diffs = a.peers.iter().map(|p| p.differences).sum();
    let repaired = a.peers.iter().map(|p| p.repaired).sum();
    (a.rounds, a.digest, diffs, repaired)
}

fn sorted_vec(t: &T) -> Vec<(u64, String)> {
    sorted(t.to_vec())
}

/// Waits until the quick rounds that follow a join (four, 250 ms apart) are over on every
/// replica, so that the rounds counted from here are the periodic ones: four more rounds
/// started. (`wait_for_converged` returns as soon as the digests agree, often after the
/// first quick round, and the other three counted as repair rounds: 4 or 5 "rounds" for a
/// repair done in the first, in 2 of 20 runs under load.)
async fn quick_rounds_over(replicas: &[T]) {
    let mut from = Vec::new();
    for t in replicas {
        from.push(ae(t).await.0);
    }
    for (t, from) in replicas.iter().zip(from) {
        eventually(WAIT, "four more digest rounds", || async move {
            ae(t).await.0 >= from + 4
        })
        .await;
    }
}

/// Whether every replica holds `want` and all digests are equal (which also compares stamps
/// and owners); if so, the rounds each replica has started.
async fn holds(replicas: &[T], want: &[(u64, String)]) -> Option<Vec<u64>> {
    for t in replicas {
        if sorted_vec(t) != want {
            return None;
        }
    }
    let mut digests = Vec::new();
    let mut rounds = Vec::new();
    for t in replicas {
        let (r, digest, ..) = ae(t).await;
        rounds.push(r);
        digests.push(digest);
    }
    digests.windows(2).all(|w| w[0] == w[1]).then_some(rounds)
}

/// Waits until every replica of each table holds `expected` with equal digests, and asserts
/// that each replica started at most two rounds since `before` when its table was first seen
/// repaired. Every table is checked at each poll, so a table repaired early is counted then,
/// not after the others' waits (its rounds go on meanwhile: counted late, a table repaired in
/// the second round showed three under load).
async fn repaired(tables: &[Vec<T>], expected: &[Vec<(u64, String)>], before: &[Vec<u64>]) {
    let mut took: Vec<Option<Vec<u64>>> = vec![None; tables.len()];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while took.iter().any(Option::is_none) {
        for (i, replicas) in tables.iter().enumerate() {
            if took[i].is_none() {
                took[i] = holds(replicas, &expected[i]).await;
            }
        }
        let missing: Vec<String> = tables
            .iter()
            .zip(&took)
            .filter(|(_, t)| t.is_none())
            .map(|(r, _)| r[0].name().to_string())
            .collect();
        assert!(
            std::time::Instant::now() < deadline,
            "not repaired within 20 s: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (i, rounds) in took.into_iter().enumerate() {
        for (j, r) in rounds.unwrap_or_default().into_iter().enumerate() {
            let took = r - before[i][j];
            assert!(
                took <= 2,
                "{} on node {j}: repaired after {took} digest rounds, not within two",
                tables[i][0].name()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_difference_is_found_and_repaired_within_two_rounds() {
    let logs = capture::capture();
    let nodes = cluster_with(&["a", "b", "c"], Duration::from_secs(1)).await;
    let opts = [
        TableOptions::set(),
        TableOptions::ordered_set(),
        TableOptions::bag(),
    ];
    let mut tables: Vec<Vec<T>> = Vec::new();
    for (i, o) in opts.into_iter().enumerate() {
        let mut replicas = Vec::new();
        for n in &nodes {
            replicas.push(n.start(&format!("t{i}"), o.clone()).await.unwrap());
        }
        tables.push(replicas);
    }
    for replicas in &tables {
        joined(&replicas.iter().collect::<Vec<_>>()).await;
        // Records owned by a (keys 1-6), and one by c (key 10).
        let recs = (1..=6).map(|k| (k, format!("v{k}"))).collect();
        replicas[0].insert_many(recs).await.unwrap();
        replicas[2].insert(10, "c's".into()).await.unwrap();
    }
    for n in &nodes {
        n.wait_for_converged(Duration::from_secs(20)).await.unwrap();
    }
    let all: Vec<T> = tables.iter().flatten().cloned().collect();
    quick_rounds_over(&all).await;
    for replicas in &tables {
        for t in replicas {
            let (_, _, diffs, repaired) = ae(t).await;
            assert_eq!(
                (diffs, repaired),
                (0, 0),
                "{}: nothing to repair yet",
                t.name()
            );
        }
    }
    // A subscriber of c's set hears the repairs as such.
    let mut sub = tables[0][2].subscribe().await.unwrap();
    let mut expected = Vec::new();
    for replicas in &tables {
        let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
        let bag = a.kind() == cets::TableKind::Bag;
        let mut want: BTreeMap<(u64, String), ()> = (1..=6)
            .map(|k| ((k, format!("v{k}")), ()))
            .chain([((10, "c's".to_string()), ())])
            .collect();
        // A record missing on c (the owner, a, holds it): copied back.
        c.testing_remove_local(1, None).await.unwrap();
        // A record only c holds, owned by a, which lacks it: removed.
        c.testing_put_local(20, "a never wrote it".into(), Some("a"))
            .await
            .unwrap();
        // A record only c holds, owned by c: copied to the others.
        c.testing_put_local(21, "c's own".into(), None)
            .await
            .unwrap();
        want.insert((21, "c's own".into()), ());
        // A different (newer) value of key 2 on b: the newer version wins everywhere. In a
        // bag it is the same object with a newer stamp, and an extra object owned by a.
        if bag {
            b.testing_put_local(2, "v2".into(), Some("a"))
                .await
                .unwrap();
            b.testing_put_local(2, "not a's".into(), Some("a"))
                .await
                .unwrap();
        } else {
            b.testing_put_local(2, "changed".into(), Some("a"))
                .await
                .unwrap();
            want.remove(&(2, "v2".into()));
            want.insert((2, "changed".into()), ());
        }
        // A delete that c missed: a and b no longer hold key 3, c does.
        a.testing_remove_local(3, None).await.unwrap();
        b.testing_remove_local(3, None).await.unwrap();
        want.remove(&(3, "v3".into()));
        // In a bag, one object of a key missing on b.
        if bag {
            a.insert(4, "v4 second".into()).await.unwrap();
            want.insert((4, "v4 second".into()), ());
            b.testing_remove_local(4, Some("v4".into())).await.unwrap();
        }
        expected.push(want.into_keys().collect::<Vec<_>>());
    }
    // Rounds count from here, once every difference is made (the bag's insert above is a
    // replicated write); one that started meanwhile may repair some of them, and is not
    // counted.
    let mut before = Vec::new();
    for replicas in &tables {
        let mut r = Vec::new();
        for t in replicas {
            r.push(ae(t).await.0);
        }
        before.push(r);
    }
    repaired(&tables, &expected, &before).await;
    for replicas in &tables {
        let mut diffs = 0;
        let mut fixed = 0;
        for t in replicas {
            let (_, _, d, r) = ae(t).await;
            diffs += d;
            fixed += r;
        }
        assert!(
            diffs >= 5,
            "{}: {diffs} differences reported",
            replicas[0].name()
        );
        assert!(
            fixed >= 5,
            "{}: {fixed} records repaired",
            replicas[0].name()
        );
        // Each repair is logged as a warning naming the table, the peer and the count.
        let table = replicas[0].name();
        let named = [("table", table), ("peer", "*"), ("keys", "*")];
        assert!(logs.has(DIFFER, &named), "{table}: the decision is logged");
        let named = [("table", table), ("peer", "*"), ("records", "*")];
        assert!(logs.has(REPAIRED, &named), "{table}: the repair is logged");
    }
    let restored = cets::Change::Repaired {
        key: 1,
        value: Some("v1".to_string()),
        previous: None,
    };
    let heard = tokio::time::timeout(WAIT, async {
        while let Some(u) = sub.recv().await {
            if let cets::Update::Change(e) = u {
                if e.change == restored {
                    return e.node.name;
                }
            }
        }
        String::new()
    })
    .await
    .expect("c's subscriber hears key 1 come back as a repair");
    assert_eq!(
        heard, "a",
        "the repair is named after the peer it came from"
    );
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_repaired_at_rest_or_under_steady_concurrent_writes() {
    let logs = capture::capture();
    let nodes = cluster_with(&["a", "b", "c"], Duration::from_millis(100)).await;
    let mut sets: Vec<T> = Vec::new();
    let mut bags: Vec<T> = Vec::new();
    for n in &nodes {
        sets.push(n.start("s", TableOptions::set()).await.unwrap());
        bags.push(n.start("g", TableOptions::bag()).await.unwrap());
    }
    joined(&sets.iter().collect::<Vec<_>>()).await;
    joined(&bags.iter().collect::<Vec<_>>()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (i, (s, g)) in sets.iter().zip(&bags).enumerate() {
        let (s, g, stop) = (s.clone(), g.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // The set: every node writes and deletes the same keys (newer wins).
                let k = n % 50;
                if n.is_multiple_of(7) {
                    s.delete(&k).await.unwrap();
                } else {
                    s.insert(k, format!("{i}:{n}")).await.unwrap();
                }
                // The bag: each node its own keys, objects added and deleted.
                let bk = (i as u64) * 1000 + n % 20;
                match n % 5 {
                    0 => g.delete(&bk).await.unwrap(),
                    1 => g.delete_object(&bk, &format!("{}", n - 1)).await.unwrap(),
                    _ => g.insert(bk, format!("{n}")).await.unwrap(),
                }
                if n.is_multiple_of(64) {
                    // Pauses, so that some rounds find both sides with the same writes.
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
            n
        }));
    }
    // Rounds compared while the writers run.
    let compared = |t: T| async move {
        let s = t.status().await.unwrap();
        s.anti_entropy
            .unwrap()
            .peers
            .iter()
            .map(|p| p.rounds)
            .sum::<u64>()
    };
    let start = compared(sets[0].clone()).await;
    eventually(
        Duration::from_secs(30),
        "rounds compared between bursts of writes",
        || {
            let t = sets[0].clone();
            async move { compared(t).await >= start + 10 }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        assert!(w.await.unwrap() > 0);
    }
    // At rest: every digest matches, and stays matching.
    for n in &nodes {
        n.wait_for_converged(Duration::from_secs(20)).await.unwrap();
    }
    // More rounds at rest, then the digests still match.
    let at_rest = compared(sets[0].clone()).await;
    eventually(Duration::from_secs(30), "two more rounds at rest", || {
        let t = sets[0].clone();
        async move { compared(t).await >= at_rest + 2 }
    })
    .await;
    for n in &nodes {
        n.wait_for_converged(Duration::from_secs(20)).await.unwrap();
    }
    for t in sets.iter().chain(&bags) {
        let s = t.status().await.unwrap();
        let a = s.anti_entropy.unwrap();
        assert!(a.in_sync, "{}: {a:?}", t.name());
        for p in &a.peers {
            assert_eq!(
                (p.differences, p.repaired),
                (0, 0),
                "{} with {}: a difference reported between replicas that hold the same writes",
                t.name(),
                p.node
            );
            assert!(p.rounds > 0);
        }
    }
    for table in ["s", "g"] {
        assert!(
            !logs.has(DIFFER, &[("table", table)]),
            "{table}: no repair logged"
        );
        assert!(
            !logs.has(REPAIRED, &[("table", table)]),
            "{table}: no repair logged"
        );
    }
    assert_eq!(sorted_vec(&sets[0]), sorted_vec(&sets[1]));
    assert_eq!(sorted_vec(&sets[0]), sorted_vec(&sets[2]));
    assert_eq!(sorted_vec(&bags[0]), sorted_vec(&bags[2]));
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}

/// A cluster-owned table keeps its deletes' tombstones for its retention: a record one replica
/// lacks is copied to it unless a tombstone newer than the record says it was deleted, and
/// then the replicas holding it drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_owned_table_is_repaired_by_union_less_its_tombstones() {
    let _logs = capture::capture();
    let nodes = cluster_with(&["a", "b", "c"], Duration::from_secs(1)).await;
    let mut r: Vec<T> = Vec::new();
    for n in &nodes {
        r.push(
            n.start("co", TableOptions::set().cluster_owned())
                .await
                .unwrap(),
        );
    }
    joined(&r.iter().collect::<Vec<_>>()).await;
    r[0].insert_many((1..=5).map(|k| (k, format!("v{k}"))).collect())
        .await
        .unwrap();
    for n in &nodes {
        n.wait_for_converged(Duration::from_secs(20)).await.unwrap();
    }
    quick_rounds_over(&r).await;
    // Missing on c: copied back.
    r[2].testing_remove_local(1, None).await.unwrap();
    // A delete c missed (a and b applied it, with their tombstones): c drops the record.
    r[0].testing_delete_local(2).await.unwrap();
    r[1].testing_delete_local(2).await.unwrap();
    // A delete only b applied: the others drop the record too.
    r[1].testing_delete_local(4).await.unwrap();
    // A record only c holds: copied to the others.
    r[2].testing_put_local(6, "c only".into(), None)
        .await
        .unwrap();
    let want: Vec<(u64, String)> = [(1, "v1"), (3, "v3"), (5, "v5"), (6, "c only")]
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    // Rounds count from here, once every difference is made (a round that started meanwhile
    // saw only some of them, and is not counted).
    let before = vec![vec![
        ae(&r[0]).await.0,
        ae(&r[1]).await.0,
        ae(&r[2]).await.0,
    ]];
    repaired(std::slice::from_ref(&r), &[want], &before).await;
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}
