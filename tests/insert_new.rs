//! `insert_new` and `insert_new_or_get` on nodes over real QUIC on loopback: one winner per key
//! among concurrent calls on connected members, agreed by every node; a leader that goes down;
//! a partition, where each side may win and the heal keeps one record.

mod common;

use std::collections::HashMap;

use cets::{InsertNew, Table, TableOptions};
use common::*;

type K = u64;
type V = String;

/// Every node calls `insert_new` on every one of 1000 keys at once (3000 calls in flight);
/// each key has exactly one winner, every node holds the winner's value, and every loser of
/// `insert_new_or_get` was told that value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_race_on_1000_keys_and_each_key_has_exactly_one_winner() {
    let c = cluster(&["a", "b", "c"]).await;
    let mut tables: Vec<Table<K, V>> = Vec::new();
    for (n, _) in &c {
        tables.push(n.start("names", TableOptions::set()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let mut calls = tokio::task::JoinSet::new();
    for k in 0..1000u64 {
        for (i, t) in tables.iter().enumerate() {
            let t = t.clone();
            let name = ["a", "b", "c"][i];
            calls.spawn(async move {
                let got = t.insert_new_or_get(k, name.to_string()).await.unwrap();
                (k, name, got)
            });
        }
    }
    let mut winners: HashMap<K, Vec<&str>> = HashMap::new();
    let mut told: Vec<(K, V)> = Vec::new();
    while let Some(r) = calls.join_next().await {
        let (k, name, got) = r.unwrap();
        match got {
            InsertNew::Inserted => winners.entry(k).or_default().push(name),
            InsertNew::Exists(v) => told.push((k, v)),
        }
    }
    assert_eq!(told.len(), 2000);
    for k in 0..1000u64 {
        let w = winners.get(&k).cloned().unwrap_or_default();
        assert_eq!(w.len(), 1, "key {k}: winners {w:?}");
        let want = Some(w[0].to_string());
        for t in &tables {
            assert_eq!(t.get(&k), want, "key {k}");
        }
    }
    for (k, v) in told {
        assert_eq!(v, winners[&k][0], "key {k}: a loser was told another value");
    }
    // Nobody else wins a taken key later, from any node.
    for t in &tables {
        assert!(!t.insert_new(7, "late".into()).await.unwrap());
    }
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// A taken key refuses `insert_new` from every node and reports its value; a plain insert
/// overwrites it; once deleted (or never stored in a bag's key) it is free again. The record
/// belongs to the caller's node: it goes when that node goes, not when the leader does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_key_is_refused_everywhere_until_deleted_and_belongs_to_the_caller() {
    for opts in [
        TableOptions::set(),
        TableOptions::ordered_set(),
        TableOptions::bag(),
    ] {
        let c = cluster(&["a", "b", "c"]).await;
        let mut t: Vec<Table<K, V>> = Vec::new();
        for (n, _) in &c {
            t.push(n.start("names", opts.clone()).await.unwrap());
        }
        joined(&t.iter().collect::<Vec<_>>()).await;
        // a is not the leader (c is): its call goes to c.
        assert!(t[0].insert_new(1, "a1".into()).await.unwrap());
        assert_eq!(t[1].get(&1), Some("a1".into()));
        assert!(!t[2].insert_new(1, "c1".into()).await.unwrap());
        assert_eq!(
            t[1].insert_new_or_get(1, "b1".into()).await.unwrap(),
            InsertNew::Exists("a1".into())
        );
        t[1].insert(1, "plain".into()).await.unwrap(); // a plain insert is not checked
        assert_eq!(
            t[2].insert_new_or_get(1, "c1".into()).await.unwrap(),
            InsertNew::Exists(if opts.kind() == cets::TableKind::Bag {
                "a1".into() // a bag keeps both objects; the first is reported
            } else {
                "plain".into()
            })
        );
        t[0].delete(&1).await.unwrap();
        assert!(t[2].insert_new(1, "c2".into()).await.unwrap());
        // b's record stays when the leader c goes, and goes with b.
        assert!(t[1].insert_new(2, "b2".into()).await.unwrap());
        c[2].0.shutdown().await.unwrap();
        eventually(WAIT, "c's record of 1 dropped", || async {
            t[0].get(&1).is_none()
        })
        .await;
        assert_eq!(t[0].get(&2), Some("b2".into()));
        c[1].0.shutdown().await.unwrap();
        eventually(WAIT, "b's record of 2 dropped", || async {
            t[0].get(&2).is_none()
        })
        .await;
        c[0].0.shutdown().await.unwrap();
    }
}

/// Calls in flight when the leader shuts down go to the next leader: no key has two winners,
/// the survivors hold the same records, and calls made after it went are decided by the new
/// leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_when_the_leader_goes_down_move_to_the_next_leader() {
    let c = cluster(&["a", "b", "c"]).await;
    let mut t: Vec<Table<K, V>> = Vec::new();
    for (n, _) in &c {
        t.push(n.start("names", TableOptions::set()).await.unwrap());
    }
    joined(&t.iter().collect::<Vec<_>>()).await;
    let n = 2000u64;
    let down_at = std::sync::Arc::new(std::sync::OnceLock::new());
    let mut calls = tokio::task::JoinSet::new();
    for k in 0..n {
        for (i, table) in t.iter().take(2).enumerate() {
            let (table, down_at) = (table.clone(), down_at.clone());
            calls.spawn(async move {
                let got = table.insert_new(k, format!("{i}")).await;
                let after = down_at.get().is_some();
                (k, i, got, after)
            });
        }
    }
    // The leader (c, the largest name) goes while the calls run.
    eventually(WAIT, "some calls decided", || async { !t[0].is_empty() }).await;
    down_at.set(()).unwrap();
    c[2].0.shutdown().await.unwrap();
    let mut winners: HashMap<K, Vec<usize>> = HashMap::new();
    let mut in_flight = 0;
    while let Some(r) = calls.join_next().await {
        let (k, i, got, after) = r.unwrap();
        in_flight += usize::from(after);
        if got.expect("the call moved to the next leader") {
            winners.entry(k).or_default().push(i);
        }
    }
    assert!(in_flight > 0, "no call was in flight when the leader went");
    for k in 0..n {
        let w = winners.get(&k).cloned().unwrap_or_default();
        assert_eq!(w.len(), 1, "key {k}: winners {w:?}");
    }
    eventually(WAIT, "a and b hold the same records", || async {
        sorted(t[0].to_vec()) == sorted(t[1].to_vec())
    })
    .await;
    for (k, w) in &winners {
        assert_eq!(t[0].get(k), Some(format!("{}", w[0])), "key {k}");
    }
    // b leads now.
    assert!(t[0].insert_new(n, "a".into()).await.unwrap());
    assert!(!t[1].insert_new(n, "b".into()).await.unwrap());
    shutdown_all([&c[0].0, &c[1].0]).await;
}

/// Across a partition each side has its own leader, so both may take the same key; when the
/// partition heals, the join keeps one record on every node by the conflict rule (last
/// writer wins: the later claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_a_partition_both_sides_may_win_and_the_heal_keeps_the_later() {
    // a reaches b only through a relay that the test cuts and heals; b dials nobody.
    let (na, ha) = node("a").await;
    let (nb, _hb) = node("b").await;
    let relay = Relay::start(nb.local_addr()).await;
    ha.set(vec![relay.addr()]);
    let a: Table<K, V> = na.start("names", TableOptions::set()).await.unwrap();
    let b: Table<K, V> = nb.start("names", TableOptions::set()).await.unwrap();
    joined(&[&a, &b]).await;
    relay.cut();
    eventually(WAIT, "both sides alone", || async {
        a.nodes().is_empty() && b.nodes().is_empty()
    })
    .await;
    assert!(a.insert_new(1, "a".into()).await.unwrap());
    // b's claim is stamped later (the clocks read milliseconds): it wins the join.
    let t0 = std::time::Instant::now();
    eventually(WAIT, "the clock moved on", || async {
        t0.elapsed() >= std::time::Duration::from_millis(2)
    })
    .await;
    assert!(b.insert_new(1, "b".into()).await.unwrap());
    relay.heal();
    joined(&[&a, &b]).await;
    eventually(WAIT, "both hold b's record", || async {
        a.get(&1) == Some("b".into()) && b.get(&1) == Some("b".into())
    })
    .await;
    assert!(!a.insert_new(1, "again".into()).await.unwrap());
    shutdown_all([&na, &nb]).await;
}

/// In a cluster-owned table the three nodes race the same way, and a granted record stays
/// when the node that claimed it and the leader go down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_owned_tables_have_one_winner_and_keep_it_when_nodes_go() {
    let c = cluster(&["a", "b", "c"]).await;
    let mut tables: Vec<Table<K, V>> = Vec::new();
    for (n, _) in &c {
        let opts = TableOptions::set().cluster_owned();
        tables.push(n.start("names", opts).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let mut calls = tokio::task::JoinSet::new();
    for k in 0..200u64 {
        for (i, t) in tables.iter().enumerate() {
            let t = t.clone();
            calls.spawn(async move { (k, i, t.insert_new(k, format!("{i}")).await.unwrap()) });
        }
    }
    let mut winners: HashMap<K, Vec<usize>> = HashMap::new();
    while let Some(r) = calls.join_next().await {
        let (k, i, won) = r.unwrap();
        if won {
            winners.entry(k).or_default().push(i);
        }
    }
    for k in 0..200u64 {
        let w = &winners[&k];
        assert_eq!(w.len(), 1, "key {k}: winners {w:?}");
        for t in &tables {
            assert_eq!(t.get(&k), Some(format!("{}", w[0])), "key {k}");
        }
    }
    // b and the leader c go: a keeps every record, and decides alone now.
    c[1].0.shutdown().await.unwrap();
    c[2].0.shutdown().await.unwrap();
    eventually(WAIT, "a alone", || async { tables[0].nodes().is_empty() }).await;
    assert_eq!(tables[0].len(), 200);
    assert!(!tables[0].insert_new(5, "late".into()).await.unwrap());
    c[0].0.shutdown().await.unwrap();
}
