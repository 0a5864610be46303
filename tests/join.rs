//! Joins of partitions over real QUIC through cuttable UDP relays on loopback: merges and
//! their conflicts, writes during a join, joins that stall or fail halfway, reachability,
//! readiness.
//!
//! Behaviour ported from CETS test cases (names from esl/cets):
//! - `join_works_with_existing_data_with_conflicts_and_defined_conflict_handler_and_more_keys`,
//!   `join_done_already_while_waiting_for_lock_so_do_nothing` (four coordinators race; one
//!   joins, the others find the work done): partition_2_plus_2_heals_identically_with_one_handler_call_per_conflict
//! - `events_are_applied_in_the_correct_order_after_unpause`,
//!   `remote_ops_are_not_sent_before_last_server_got_dump`: writes_during_a_join_are_applied_once_in_order_after_unpause
//! - `join_fails_before_send_dump`: joiner_killed_before_sending_records_leaves_nobody_paused,
//!   stalled_joiner_releases_the_others_by_lease_and_the_next_join_succeeds
//! - `test_disco_handles_bad_node`: wait_for_ready_returns_after_the_tables_are_copied_and_handles_a_bad_node
//! - `status_conflict_nodes`: node_reachable_by_only_some_members_is_reported_and_not_half_joined,
//!   half_finished_join_is_detected_and_repaired

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cets::{Table, TableOptions};
use common::mesh::*;
use common::*;

type T = Table<String, u64>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_2_plus_2_heals_identically_with_one_handler_call_per_conflict() {
    let mesh = Mesh::start(&["a", "b", "c", "d"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tables = Vec::new();
    for n in &mesh.nodes {
        let c = calls.clone();
        let opts = TableOptions::set().conflict_handler(move |_k: &String, a: &u64, b: &u64| {
            c.fetch_add(1, Ordering::SeqCst);
            *a.max(b)
        });
        tables.push(n.start("t", opts).await.unwrap());
    }
    let all: Vec<&T> = tables.iter().collect();
    members(&all, 3).await;
    mesh.split(&[0, 1], &[2, 3]);
    members(&all, 1).await;
    // Both sides write the same 10 keys with different values, and keys of their own.
    for i in 0..10u64 {
        tables[0].insert(format!("k{i}"), 100 + i).await.unwrap();
        tables[3].insert(format!("k{i}"), 200 + i).await.unwrap();
    }
    write_n(&tables[1], "left", 5).await;
    write_n(&tables[2], "right", 5).await;
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    mesh.heal(&[0, 1], &[2, 3]);
    members(&all, 3).await;
    for t in &tables {
        t.sync().await.unwrap();
    }
    let v = same_everywhere(&all, "the tables").await;
    assert_eq!(v.len(), 20);
    for i in 0..10u64 {
        assert_eq!(
            tables[1].get(&format!("k{i}")),
            Some(200 + i),
            "handler picked max"
        );
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        10,
        "handler called once per conflicting key"
    );
    let mut total = 0;
    for n in &mesh.nodes {
        total += n.status().await.conflicts();
    }
    assert_eq!(total, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_handler_conflicts_converge_to_the_last_writer() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    mesh.split(&[0], &[1]);
    members(&[&ta, &tb], 0).await;
    ta.insert("k".into(), 1).await.unwrap();
    next_millisecond().await;
    tb.insert("k".into(), 2).await.unwrap(); // written later: wins
    mesh.heal(&[0], &[1]);
    members(&[&ta, &tb], 1).await;
    let v = same_everywhere(&[&ta, &tb], "the tables").await;
    assert_eq!(v, vec![("k".to_string(), 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_2_plus_2_without_handler_heals_to_the_last_writers() {
    let mesh = Mesh::start(&["a", "b", "c", "d"]).await;
    let mut tables = Vec::new();
    for n in &mesh.nodes {
        tables.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    let all: Vec<&T> = tables.iter().collect();
    members(&all, 3).await;
    write_n(&tables[0], "before", 4).await;
    mesh.split(&[0, 1], &[2, 3]);
    members(&all, 1).await;
    // k0..k9 written on the left, then on the right, then k5..k9 on the left again: each
    // side wins half of the conflicts. Keys of their own on both sides, and keys both sides
    // hold in the same version (written before the split): not conflicts.
    for i in 0..10u64 {
        tables[0].insert(format!("k{i}"), 100 + i).await.unwrap();
    }
    next_millisecond().await;
    for i in 0..10u64 {
        tables[3].insert(format!("k{i}"), 200 + i).await.unwrap();
    }
    next_millisecond().await;
    for i in 5..10u64 {
        tables[1].insert(format!("k{i}"), 300 + i).await.unwrap();
    }
    write_n(&tables[1], "left", 5).await;
    write_n(&tables[2], "right", 5).await;
    mesh.heal(&[0, 1], &[2, 3]);
    members(&all, 3).await;
    for t in &tables {
        t.sync().await.unwrap();
    }
    let v = same_everywhere(&all, "the tables").await;
    assert_eq!(v.len(), 4 + 10 + 5 + 5);
    for i in 0..10u64 {
        let want = if i < 5 { 200 + i } else { 300 + i };
        assert_eq!(tables[0].get(&format!("k{i}")), Some(want), "k{i}");
    }
    let mut total = 0;
    for n in &mesh.nodes {
        total += n.status().await.conflicts();
    }
    assert_eq!(total, 10, "one conflict per key held in two versions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_owned_by_a_node_outside_the_join_does_not_split_the_sides() {
    // c is connected to a and b but runs no table "t"; the owner function names it for the
    // records whose value is at least 100. (Written when each replica ran the function and c
    // could own such records: dumps leave records of owners outside the join out, so the side
    // holding such a version must not keep it against the other side's version.) Now the writer
    // decides, and c is no member, so a owns its own write, and it wins the merge as the later.
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let opts = || {
        TableOptions::set()
            .owner(|_k: &String, v: &u64| if *v >= 100 { "c" } else { "" }.to_string())
    };
    let ta: T = mesh.nodes[0].start("t", opts()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", opts()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    mesh.split(&[0], &[1]);
    members(&[&ta, &tb], 0).await;
    tb.insert("k".into(), 5).await.unwrap();
    next_millisecond().await;
    ta.insert("k".into(), 100).await.unwrap(); // later, but owned by c
    write_n(&ta, "a", 2).await;
    write_n(&tb, "b", 2).await;
    mesh.heal(&[0], &[1]);
    members(&[&ta, &tb], 1).await;
    for t in [&ta, &tb] {
        t.sync().await.unwrap();
    }
    let v = same_everywhere(&[&ta, &tb], "the tables").await;
    assert_eq!(v.len(), 5, "{v:?}");
    assert_eq!(ta.get(&"k".into()), Some(100), "the later write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_a_join_are_applied_once_in_order_after_unpause() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let (opts, reached, release) = gate("locked");
    let ta: T = mesh.nodes[0].start("t", opts).await.unwrap();
    ta.insert("x".into(), 1).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    tb.insert("y".into(), 1).await.unwrap();
    reached.notified().await; // both servers paused, nothing exchanged yet
    let mut writers = Vec::new();
    for (t, k) in [(ta.clone(), "x"), (tb.clone(), "y")] {
        writers.push(tokio::spawn(async move {
            t.delete(&k.to_string()).await.unwrap();
            t.insert(k.to_string(), 2).await.unwrap();
            t.insert(format!("{k}-during"), 7).await.unwrap();
        }));
    }
    // The writes wait for the unpause: for a while, nothing changes locally and no write returns.
    let until = Instant::now() + Duration::from_millis(200);
    while Instant::now() < until {
        assert_eq!(ta.get(&"x".to_string()), Some(1));
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "a write returned while paused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    release.notify_one();
    for w in writers {
        w.await.unwrap();
    }
    members(&[&ta, &tb], 1).await;
    ta.sync().await.unwrap();
    tb.sync().await.unwrap();
    let v = same_everywhere(&[&ta, &tb], "the tables").await;
    assert_eq!(
        v,
        vec![
            ("x".into(), 2),
            ("x-during".into(), 7),
            ("y".into(), 2),
            ("y-during".into(), 7)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_joiner_releases_the_others_by_lease_and_the_next_join_succeeds() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let (opts, reached, release) = gate("locked");
    let ta: T = mesh.nodes[0].start("t", opts).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    reached.notified().await;
    assert!(tb.status().await.unwrap().paused);
    // The coordinator hangs; b's lease runs out and b serves writes again.
    eventually(WAIT, "b unpaused by lease", || {
        let tb = tb.clone();
        async move { !tb.status().await.unwrap().paused }
    })
    .await;
    tb.insert("during".into(), 1).await.unwrap();
    release.notify_one();
    members(&[&ta, &tb], 1).await;
    tb.sync().await.unwrap();
    assert_eq!(ta.get(&"during".to_string()), Some(1));
    same_everywhere(&[&ta, &tb], "the tables").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiner_killed_before_sending_records_leaves_nobody_paused() {
    let mut mesh = Mesh::start(&["a", "b", "c"]).await;
    let (opts, reached, _release) = gate("before_apply");
    // b and c form a cluster first; a joins them and dies in the middle.
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    let tc: T = mesh.nodes[2].start("t", TableOptions::set()).await.unwrap();
    members(&[&tb, &tc], 1).await;
    write_n(&tb, "b", 3).await;
    let ta: T = mesh.nodes[0].start("t", opts).await.unwrap();
    write_n(&ta, "a", 3).await;
    reached.notified().await;
    assert!(tb.status().await.unwrap().paused && tc.status().await.unwrap().paused);
    mesh.nodes[0].shutdown().await.unwrap();
    drop(ta);
    for t in [&tb, &tc] {
        let t = t.clone();
        eventually(WAIT, "unpaused after the coordinator died", || {
            let t = t.clone();
            async move { !t.status().await.unwrap().paused }
        })
        .await;
    }
    tc.insert("after".into(), 1).await.unwrap();
    assert_eq!(same_everywhere(&[&tb, &tc], "the tables").await.len(), 4);
    // A new a joins fine.
    let (na, ha) = node("a").await;
    mesh.replace(0, na, ha).await;
    let ta2: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta2, &tb, &tc], 2).await;
    assert_eq!(
        same_everywhere(&[&ta2, &tb, &tc], "the tables").await.len(),
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reachable_by_only_some_members_is_reported_and_not_half_joined() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    mesh.split(&[0], &[2]); // a and c cannot talk; b talks to both
    let mut tables = Vec::new();
    for n in &mesh.nodes {
        let t: T = n.start("t", TableOptions::set()).await.unwrap();
        tables.push(t);
    }
    // b joins one of them first; the third cannot be joined to that pair, since a and c cannot
    // reach each other: it stays outside, and b reports it.
    members(&[&tables[1]], 1).await;
    let outside = if tables[1].nodes() == vec!["a".to_string()] {
        "c"
    } else {
        "a"
    };
    let out_table = if outside == "a" {
        &tables[0]
    } else {
        &tables[2]
    };
    let b = mesh.nodes[1].clone();
    eventually(WAIT, "b reports the third node as not joined", || {
        let b = b.clone();
        async move {
            let s = b.status().await;
            s.tables[0].not_joined == vec![outside.to_string()] && !s.partially_joined().is_empty()
        }
    })
    .await;
    let a = mesh.nodes[0].clone();
    eventually(WAIT, "a reports its relay to c unavailable", || {
        let a = a.clone();
        async move { a.status().await.unavailable.len() == 1 }
    })
    .await;
    assert!(out_table.nodes().is_empty());
    assert_eq!(tables[1].nodes().len(), 1);
    let text = mesh.nodes[1].status().await.to_string();
    assert!(
        text.contains(&format!("not joined yet: {outside}")),
        "{text}"
    );
    // Healing the link lets the join of all three happen.
    mesh.heal(&[0], &[2]);
    members(&tables.iter().collect::<Vec<_>>(), 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_ready_returns_after_the_tables_are_copied_and_handles_a_bad_node() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    write_n(&ta, "a", 100).await;
    // A new node whose discovery lists both nodes and an address nobody listens on.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let list = vec![
        mesh.nodes[0].local_addr(),
        mesh.nodes[1].local_addr(),
        dead.local_addr().unwrap(),
    ];
    drop(dead);
    let c = cets::Node::builder("c")
        .listen("127.0.0.1:0".parse().unwrap())
        .cookie("test-cookie")
        .config(cets::NodeConfig::fast_failover())
        .discovery(cets::discovery::StaticDiscovery::new(list))
        .start()
        .await
        .unwrap();
    let tc: T = c.start("t", TableOptions::set()).await.unwrap();
    c.wait_for_ready(WAIT).await.unwrap();
    assert_eq!(tc.len(), 100, "ready means the table was copied");
    let s = c.status().await;
    assert_eq!(s.connected.len(), 2);
    assert_eq!(s.unavailable.len(), 1, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_finished_join_is_detected_and_repaired() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reached = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let hooked = || {
        let (armed, reached, release) = (armed.clone(), reached.clone(), release.clone());
        TableOptions::set().join_checkpoint(move |c| {
            let hold = c == "between_groups" && armed.swap(false, Ordering::SeqCst);
            let (reached, release) = (reached.clone(), release.clone());
            async move {
                if hold {
                    reached.notify_one();
                    release.notified().await;
                }
            }
        })
    };
    let ta: T = mesh.nodes[0].start("t", hooked()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", hooked()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    write_n(&ta, "a", 3).await;
    armed.store(true, Ordering::SeqCst);
    let tc: T = mesh.nodes[2].start("t", TableOptions::set()).await.unwrap();
    write_n(&tc, "c", 3).await;
    // The coordinator stalls after {a, b} got the new member list and before c did.
    reached.notified().await;
    let a = mesh.nodes[0].clone();
    eventually(WAIT, "a sees that c disagrees on the member list", || {
        let a = a.clone();
        async move { a.status().await.tables[0].disagreeing == vec!["c".to_string()] }
    })
    .await;
    // Repaired without the stalled coordinator: c is dropped and joined again.
    let all = [&ta, &tb, &tc];
    eventually(WAIT, "all three joined with the same records", || async {
        all.iter().all(|t| t.nodes().len() == 2) && all.iter().all(|t| t.len() == 6)
    })
    .await;
    release.notify_one();
    for t in all {
        t.sync().await.unwrap();
    }
    assert_eq!(same_everywhere(&all, "the tables").await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bags_merge_as_the_union_of_both_partitions() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let ta: Table<String, u64> = mesh.nodes[0]
        .start("bag", TableOptions::bag())
        .await
        .unwrap();
    let tb: Table<String, u64> = mesh.nodes[1]
        .start("bag", TableOptions::bag())
        .await
        .unwrap();
    members(&[&ta, &tb], 1).await;
    ta.insert("k".into(), 1).await.unwrap();
    mesh.split(&[0], &[1]);
    members(&[&ta, &tb], 0).await;
    ta.insert("k".into(), 2).await.unwrap();
    tb.insert("k".into(), 3).await.unwrap();
    tb.insert("k".into(), 2).await.unwrap();
    mesh.heal(&[0], &[1]);
    members(&[&ta, &tb], 1).await;
    for t in [&ta, &tb] {
        let mut v = t.lookup(&"k".to_string());
        v.sort();
        // 1 was a's (kept by a, dropped by b at the split, sent back by the join).
        assert_eq!(v, vec![1, 2, 3], "on {}", t.name());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_of_different_tables_run_in_parallel() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let (opts, reached, release) = gate("locked");
    let slow_a: T = mesh.nodes[0].start("slow", opts).await.unwrap();
    let slow_b: T = mesh.nodes[1]
        .start("slow", TableOptions::set())
        .await
        .unwrap();
    reached.notified().await; // the join of "slow" holds both servers of "slow" paused
    let fast_a: T = mesh.nodes[0]
        .start("fast", TableOptions::set())
        .await
        .unwrap();
    let fast_b: T = mesh.nodes[1]
        .start("fast", TableOptions::set())
        .await
        .unwrap();
    members(&[&fast_a, &fast_b], 1).await;
    fast_a.insert("k".into(), 1).await.unwrap();
    assert_eq!(fast_b.get(&"k".to_string()), Some(1));
    assert!(slow_b.status().await.unwrap().paused);
    release.notify_one();
    members(&[&slow_a, &slow_b], 1).await;
}

/// A bag object inserted on both sides of a partition is held, after the merge, under one
/// owner everywhere (the greater stamp, as replication keeps it): a node-down then removes it
/// from every node or from none. The merge used to give each side the objects it lacked by
/// value only, so each side kept its own writer as owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bag_object_written_on_both_sides_of_a_partition_has_one_owner_after_the_merge() {
    let mesh = Mesh::start(&["a", "b", "c", "d"]).await;
    let mut tables: Vec<T> = Vec::new();
    for n in &mesh.nodes {
        tables.push(n.start("t", TableOptions::bag()).await.unwrap());
    }
    let all: Vec<&T> = tables.iter().collect();
    members(&all, 3).await;
    mesh.split(&[0, 2], &[1, 3]);
    members(&all, 1).await;
    // a's side holds the object under a, b's side under b.
    tables[0].insert("k".into(), 7).await.unwrap();
    tables[1].insert("k".into(), 7).await.unwrap();
    mesh.heal(&[0, 2], &[1, 3]);
    members(&all, 3).await;
    for t in &tables {
        t.sync().await.unwrap();
    }
    mesh.nodes[0].shutdown().await.unwrap();
    let rest = [&tables[1], &tables[2], &tables[3]];
    members(&rest, 2).await;
    let held: Vec<Vec<u64>> = rest.iter().map(|t| t.lookup(&"k".into())).collect();
    assert!(
        held.iter().all(|h| *h == held[0]),
        "b, c, d hold {held:?} after a went down"
    );
}
