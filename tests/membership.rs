//! Membership that heals itself: node down, restart, partitions and their merge, joins that
//! fail halfway, status. Nodes talk real QUIC through cuttable UDP relays on loopback.
//!
//! Behaviour ported from CETS test cases (names from esl/cets):
//! - `handle_down_is_called`, `node_list_is_correct`: graceful_shutdown_drops_records_and_calls_handle_down_once
//!   (and `replication.rs` for `test_multinode`)
//! - `join_works_with_existing_data_with_conflicts_and_defined_conflict_handler_and_more_keys`,
//!   `join_done_already_while_waiting_for_lock_so_do_nothing` (four coordinators race; one
//!   joins, the others find the work done): partition_2_plus_2_heals_identically_with_one_handler_call_per_conflict
//! - `events_are_applied_in_the_correct_order_after_unpause`,
//!   `remote_ops_are_not_sent_before_last_server_got_dump`: writes_during_a_join_are_applied_once_in_order_after_unpause
//! - `join_fails_before_send_dump`: joiner_killed_before_sending_records_leaves_nobody_paused,
//!   stalled_joiner_releases_the_others_by_lease_and_the_next_join_succeeds
//! - `write_returns_if_remote_server_crashes`: write_returns_when_the_peer_dies_before_acking
//! - `test_disco_handles_bad_node`: wait_for_ready_returns_after_the_tables_are_copied_and_handles_a_bad_node
//! - `status_conflict_nodes`: node_reachable_by_only_some_members_is_reported_and_not_half_joined,
//!   half_finished_join_is_detected_and_repaired

#[path = "support/mesh.rs"]
mod mesh;
#[path = "support/proxy.rs"]
mod proxy;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cets::{Table, TableOptions};
use mesh::{start_node, Mesh};

const WAIT: Duration = Duration::from_secs(10);

async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type T = Table<String, u64>;

/// Waits until every table lists exactly the given number of peers.
async fn members(tables: &[&T], n: usize) {
    for t in tables {
        let t = (*t).clone();
        eventually(&format!("{} has {n} peers", t.name()), || {
            let t = t.clone();
            async move { t.nodes().len() == n }
        })
        .await;
    }
}

async fn same_everywhere(tables: &[&T]) -> Vec<(String, u64)> {
    let mut first = tables[0].to_vec();
    first.sort();
    for t in &tables[1..] {
        let mut v = t.to_vec();
        v.sort();
        assert_eq!(v, first, "tables differ");
    }
    first
}

type Downs = Arc<Mutex<Vec<(String, usize)>>>;

fn opts_with_downs() -> (TableOptions<String, u64>, Downs) {
    let downs: Downs = Arc::default();
    let d = downs.clone();
    let opts = TableOptions::set().on_node_down(move |node, recs| {
        d.lock().unwrap().push((node.name.clone(), recs.len()));
    });
    (opts, downs)
}

async fn write_n(t: &T, prefix: &str, n: u64) {
    let recs = (0..n).map(|i| (format!("{prefix}-{i}"), i)).collect();
    t.insert_many(recs).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drops_records_and_calls_handle_down_once() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for n in &mesh.nodes {
        let (o, d) = opts_with_downs();
        tables.push(n.start("t", o).await.unwrap());
        downs.push(d);
    }
    members(&tables.iter().collect::<Vec<_>>(), 2).await;
    for (t, p) in tables.iter().zip(["a", "b", "c"]) {
        write_n(t, p, 10).await;
    }
    assert_eq!(tables[0].len(), 30);
    mesh.nodes[2].shutdown().await.unwrap();
    for i in 0..2 {
        let t = tables[i].clone();
        eventually("c's records dropped", || {
            let t = t.clone();
            async move { t.len() == 20 && t.nodes() == vec![["b", "a"][i].to_string()] }
        })
        .await;
        assert!(!t.contains_key(&"c-0".to_string()));
        tables[i].sync().await.unwrap();
        assert_eq!(*downs[i].lock().unwrap(), vec![("c".to_string(), 10)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_node_is_dropped_then_rejoins_with_its_records() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for n in &mesh.nodes {
        let (o, d) = opts_with_downs();
        tables.push(n.start("t", o).await.unwrap());
        downs.push(d);
    }
    let all: Vec<&T> = tables.iter().collect();
    members(&all, 2).await;
    for (t, p) in tables.iter().zip(["a", "b", "c"]) {
        write_n(t, p, 10).await;
    }
    mesh.split(&[0, 1], &[2]);
    // Every side drops what the other side owned, by idle timeout, without any message.
    for (i, want) in [(0, 20), (1, 20), (2, 10)] {
        let t = tables[i].clone();
        eventually("records of the unreachable side dropped", || {
            let t = t.clone();
            async move { t.len() == want }
        })
        .await;
    }
    // A write through each server orders these checks after its on_node_down calls.
    tables[0].sync().await.unwrap();
    tables[2].sync().await.unwrap();
    assert_eq!(*downs[0].lock().unwrap(), vec![("c".to_string(), 10)]);
    let mut seen_by_c = downs[2].lock().unwrap().clone();
    seen_by_c.sort();
    assert_eq!(
        seen_by_c,
        vec![("a".to_string(), 10), ("b".to_string(), 10)]
    );
    // c keeps writing alone; a and b too.
    tables[2].insert("c-new".into(), 1).await.unwrap();
    tables[0].insert("a-new".into(), 1).await.unwrap();
    mesh.heal(&[0, 1], &[2]);
    members(&all, 2).await;
    for t in &tables {
        t.sync().await.unwrap();
    }
    let v = same_everywhere(&all).await;
    assert_eq!(v.len(), 32);
    for (i, t) in tables.iter().enumerate() {
        assert_eq!(
            downs[i].lock().unwrap().len(),
            if i == 2 { 2 } else { 1 },
            "on_node_down once per lost node"
        );
        assert!(t.contains_key(&"c-new".to_string()) && t.contains_key(&"a-new".to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_is_a_new_incarnation() {
    let mut mesh = Mesh::start(&["a", "b"]).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    write_n(&tb, "old-b", 5).await;
    let old = mesh.nodes[1].id().clone();
    mesh.nodes[1].shutdown().await.unwrap();
    eventually("old b's records dropped", || {
        let ta = ta.clone();
        async move { ta.is_empty() }
    })
    .await;
    let (nb, hb) = start_node("b").await;
    assert_ne!(nb.id(), &old);
    mesh.replace(1, nb, hb).await;
    let tb2: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb2], 1).await;
    write_n(&tb2, "new-b", 3).await;
    write_n(&ta, "a", 2).await;
    let v = same_everywhere(&[&ta, &tb2]).await;
    assert_eq!(v.len(), 5);
    assert!(v.iter().all(|(k, _)| !k.starts_with("old-b")));
}

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
    let v = same_everywhere(&all).await;
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

/// Waits until the wall clock's millisecond changed: last writer wins compares hybrid clocks,
/// whose physical part has millisecond resolution, so two partitioned nodes only order their
/// writes by time when a millisecond passed between them (otherwise the owner decides).
async fn next_millisecond() {
    let ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    };
    let start = ms();
    eventually("the wall clock moved on a millisecond", || async move {
        ms() > start
    })
    .await;
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
    let v = same_everywhere(&[&ta, &tb]).await;
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
    let v = same_everywhere(&all).await;
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
    let v = same_everywhere(&[&ta, &tb]).await;
    assert_eq!(v.len(), 5, "{v:?}");
    assert_eq!(ta.get(&"k".into()), Some(100), "the later write");
}

/// Table options whose owner function gives a key "node/x" to node `node`, whoever wrote it.
fn owned_by_key_prefix() -> TableOptions<String, u64> {
    TableOptions::set().owner(|k: &String, _v: &u64| k.split('/').next().unwrap_or("").to_string())
}

/// A hook that holds the first join of a table at `checkpoint` until released.
fn gate(
    checkpoint: &'static str,
) -> (
    TableOptions<String, u64>,
    Arc<tokio::sync::Notify>,
    Arc<tokio::sync::Notify>,
) {
    let reached = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let used = Arc::new(AtomicUsize::new(0));
    let (r1, r2) = (reached.clone(), release.clone());
    let opts = TableOptions::set().join_checkpoint(move |c| {
        let hold = c == checkpoint && used.fetch_add(1, Ordering::SeqCst) == 0;
        let (reached, release) = (r1.clone(), r2.clone());
        async move {
            if hold {
                reached.notify_one();
                release.notified().await;
            }
        }
    });
    (opts, reached, release)
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
    let v = same_everywhere(&[&ta, &tb]).await;
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
    eventually("b unpaused by lease", || {
        let tb = tb.clone();
        async move { !tb.status().await.unwrap().paused }
    })
    .await;
    tb.insert("during".into(), 1).await.unwrap();
    release.notify_one();
    members(&[&ta, &tb], 1).await;
    tb.sync().await.unwrap();
    assert_eq!(ta.get(&"during".to_string()), Some(1));
    same_everywhere(&[&ta, &tb]).await;
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
        eventually("unpaused after the coordinator died", || {
            let t = t.clone();
            async move { !t.status().await.unwrap().paused }
        })
        .await;
    }
    tc.insert("after".into(), 1).await.unwrap();
    assert_eq!(same_everywhere(&[&tb, &tc]).await.len(), 4);
    // A new a joins fine.
    let (na, ha) = start_node("a").await;
    mesh.replace(0, na, ha).await;
    let ta2: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta2, &tb, &tc], 2).await;
    assert_eq!(same_everywhere(&[&ta2, &tb, &tc]).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_returns_when_the_peer_dies_before_acking() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    mesh.split(&[0], &[1]);
    // b cannot ack; the write returns once b is detected down (idle timeout), not never.
    tokio::time::timeout(WAIT, ta.insert("k".into(), 1))
        .await
        .expect("write returned")
        .unwrap();
    assert!(ta.nodes().is_empty());
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
    eventually("b reports the third node as not joined", || {
        let b = b.clone();
        async move {
            let s = b.status().await;
            s.tables[0].not_joined == vec![outside.to_string()] && !s.partially_joined().is_empty()
        }
    })
    .await;
    let a = mesh.nodes[0].clone();
    eventually("a reports its relay to c unavailable", || {
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
        .cookie("mesh")
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
    eventually("a sees that c disagrees on the member list", || {
        let a = a.clone();
        async move { a.status().await.tables[0].disagreeing == vec!["c".to_string()] }
    })
    .await;
    // Repaired without the stalled coordinator: c is dropped and joined again.
    let all = [&ta, &tb, &tc];
    eventually("all three joined with the same records", || async {
        all.iter().all(|t| t.nodes().len() == 2) && all.iter().all(|t| t.len() == 6)
    })
    .await;
    release.notify_one();
    for t in all {
        t.sync().await.unwrap();
    }
    assert_eq!(same_everywhere(&all).await.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_function_decides_whose_records_go_with_a_node() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let opts = owned_by_key_prefix;
    let mut tables = Vec::new();
    for n in &mesh.nodes {
        let t: T = n.start("t", opts()).await.unwrap();
        tables.push(t);
    }
    members(&tables.iter().collect::<Vec<_>>(), 2).await;
    tables[0].insert("c/1".into(), 1).await.unwrap(); // written by a, owned by c
    tables[0].insert("a/1".into(), 1).await.unwrap();
    tables[1].insert("b/1".into(), 1).await.unwrap();
    mesh.nodes[2].shutdown().await.unwrap();
    for t in &tables[..2] {
        let t = t.clone();
        eventually("c-owned record dropped", || {
            let t = t.clone();
            async move { t.len() == 2 && !t.contains_key(&"c/1".to_string()) }
        })
        .await;
    }
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

/// A peer's frames can still be queued at a table server when that peer's connection is
/// closed: the server hears the node-down event first (events are handled before peer input),
/// then the frames. They must be dropped quietly, and the table must keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_still_queued_when_their_node_shuts_down_are_dropped_and_the_table_goes_on() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    // Many large batches from a: b is busy applying one while the next ones wait in its queue.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let ta = ta.clone();
            tokio::spawn(async move {
                for round in 0..50u64 {
                    let recs = (0..20_000u64)
                        .map(|i| (format!("a-{w}-{round}-{i}"), i))
                        .collect();
                    if ta.insert_many(recs).await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    // b's own large batches keep its table server busy while a's frames arrive and queue.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b_writer = {
        let (tb, stop) = (tb.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let recs = (0..50_000u64)
                    .map(|i| (format!("b-{round}-{i}"), i))
                    .collect();
                if tb.insert_many(recs).await.is_err() {
                    return false;
                }
                round += 1;
            }
            true
        })
    };
    eventually("b receives a's writes", || {
        let tb = tb.clone();
        async move { tb.to_vec().iter().any(|(k, _)| k.starts_with("a-")) }
    })
    .await;
    mesh.nodes[0].shutdown().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(b_writer.await.unwrap(), "b's table server stopped");
    eventually("a's records dropped on b", || {
        let tb = tb.clone();
        async move {
            tb.nodes().is_empty() && !tb.to_vec().iter().any(|(k, _)| k.starts_with("a-"))
        }
    })
    .await;
    tb.insert("b-1".to_string(), 1).await.unwrap();
    assert_eq!(tb.get(&"b-1".to_string()), Some(1));
}

/// A write names an owner that the receiver has already seen go down (the writer has not, yet):
/// the receiver does not store the record, since nothing would ever remove it there, just as the
/// writer will drop it once it hears of that node's end. Here b loses its link to n while a keeps
/// its own; a's write of a record owned by n reaches b (still a member of a's table) and n.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_owner_is_already_down_on_a_replica_is_not_stored_there() {
    let mesh = Mesh::start(&["a", "b", "n"]).await;
    let opts = owned_by_key_prefix;
    let ta: T = mesh.nodes[0].start("t", opts()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", opts()).await.unwrap();
    let tn: T = mesh.nodes[2].start("t", opts()).await.unwrap();
    members(&[&ta, &tb, &tn], 2).await;
    mesh.split(&[1], &[2]);
    eventually("b dropped n", || async { tb.nodes() == ["a"] }).await;
    // a still counts b and n as members (its views differ from b's only for a while), so both
    // apply the write before it returns.
    assert_eq!(ta.nodes(), ["b", "n"]);
    ta.insert("n/1".into(), 1).await.unwrap();
    ta.insert("a/1".into(), 1).await.unwrap();
    assert_eq!(ta.nodes(), ["b", "n"], "acked by both");
    assert_eq!(ta.get(&"n/1".into()), Some(1));
    assert_eq!(tn.get(&"n/1".into()), Some(1));
    assert_eq!(tb.get(&"n/1".into()), None, "owner already down at b");
    assert_eq!(tb.get(&"a/1".into()), Some(1));
}

/// A writer that dies before its write reached every member (ALGORITHM.md 8). Here n's
/// overwrite of a's record reaches a and x but not y; when n is gone, a and x drop n's record
/// (and with it a's overwritten version), while y keeps a's version. The survivors applied
/// different lasting writes of n, so their views differ (`Link::lasting`), and the view check
/// has them merge again: every member ends with a's version, as if n's write had never been
/// made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwrite_by_a_node_that_dies_halfway_leaves_the_members_equal() {
    let mesh = Mesh::start(&["a", "n", "x", "y"]).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    tables[0].insert("k".into(), 1).await.unwrap();
    // n's link to y is cut: n's overwrite reaches a and x only, and its call waits for y.
    mesh.split(&[1], &[3]);
    let tn = tables[1].clone();
    let pending = tokio::spawn(async move { tn.insert("k".into(), 2).await });
    eventually("a and x hold n's write", || async {
        tables[0].get(&"k".into()) == Some(2) && tables[2].get(&"k".into()) == Some(2)
    })
    .await;
    // n dies for everyone.
    mesh.split(&[1], &[0, 2]);
    let survivors = [&tables[0], &tables[2], &tables[3]];
    eventually(
        "a, x and y hold a's version and are members of each other",
        || async {
            survivors
                .iter()
                .all(|t| t.get(&"k".into()) == Some(1) && t.nodes().len() == 2)
        },
    )
    .await;
    pending.abort();
    for t in survivors {
        t.sync().await.unwrap();
    }
    same_everywhere(&survivors).await;
}

/// A value of 1 is owned by n; any other by its writer.
fn owned_by_value() -> TableOptions<String, u64> {
    TableOptions::set().owner(|_, v: &u64| if *v == 1 { "n".into() } else { String::new() })
}

/// c writes k = 2 (its own record) while its link to b is cut, so the write reaches a at once
/// and b only later. n then dies; a hears of it late (its link to n was cut first). a, having
/// seen c's write, overwrites k with a record owned by n (stamped after c's). b has seen n go
/// down and drops a's record as an orphan: it holds no version of k yet, so nothing is removed
/// and nothing remembers that k was overwritten. When c's older write reaches b, b stores it.
/// a and c stored a's record over c's and drop it when n is gone: they end without k, b with
/// k = 2, and the members' views are equal again, so no join repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_overwrite_ends_the_same_on_every_replica() {
    let mesh = Mesh::start(&["a", "b", "c", "n"]).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", owned_by_value()).await.unwrap());
    }
    for t in &tables {
        eventually("every table has 3 peers", || async { t.nodes().len() == 3 }).await;
    }
    let (ta, tb, tc) = (tables[0].clone(), tables[1].clone(), tables[2].clone());
    // c's write reaches a (and n) but waits for the b-c link (QUIC retransmits it once healed).
    mesh.split(&[1], &[2]);
    let c_write = {
        let tc = tc.clone();
        tokio::spawn(async move { tc.insert("k".into(), 2).await })
    };
    eventually("a holds c's write", || async {
        ta.get(&"k".into()) == Some(2)
    })
    .await;
    // n dies; a hears of it only at its idle timeout.
    mesh.split(&[0], &[3]);
    let n = mesh.nodes[3].clone();
    let n_down = tokio::spawn(async move { n.shutdown().await });
    eventually("b saw n go", || async {
        !tb.nodes().contains(&"n".to_string())
    })
    .await;
    assert!(
        ta.nodes().contains(&"n".to_string()),
        "a has not seen n go yet"
    );
    // a's overwrite, owned by n, with a marker record of a's own in the same write.
    let a_write = {
        let ta = ta.clone();
        tokio::spawn(async move {
            ta.insert_many(vec![("k".into(), 1), ("a-marker".into(), 0)])
                .await
        })
    };
    eventually("b applied a's write", || async {
        tb.get(&"a-marker".into()) == Some(0)
    })
    .await;
    assert_eq!(
        tb.get(&"k".into()),
        None,
        "a's record of k is an orphan at b"
    );
    mesh.heal(&[1], &[2]);
    c_write.await.unwrap().unwrap();
    a_write.await.unwrap().unwrap();
    let _ = n_down.await;
    eventually("a saw n go", || async {
        !ta.nodes().contains(&"n".to_string())
    })
    .await;
    tb.sync().await.unwrap();
    tc.sync().await.unwrap();
    ta.sync().await.unwrap();
    let seen: Vec<Option<u64>> = [&ta, &tb, &tc].iter().map(|t| t.get(&"k".into())).collect();
    let nodes: Vec<Vec<String>> = [&ta, &tb, &tc].iter().map(|t| t.nodes()).collect();
    assert!(
        seen.iter().all(|v| *v == seen[0]),
        "a, b, c hold k = {seen:?} (members {nodes:?})"
    );
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

/// A record dropped with its owner leaves a tombstone while a member may still send an older
/// write of its key. Here q's write of k is held back from x and y while w's newer write of k
/// reaches everyone; q's write then reaches x, which refuses it (w's is newer), and w goes down,
/// so every node drops w's record. When q's write reaches y at last, only that tombstone stops
/// it there; without it, y alone would hold k.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_dropped_with_its_owner_lets_no_older_write_back_on_one_node() {
    // The cut links must outlive no idle timeout, even on a busy machine: w goes down by its
    // shutdown, which its peers hear at once.
    let mut config = cets::NodeConfig::fast_failover();
    config.keep_alive_interval = Duration::from_secs(1);
    config.idle_timeout = Duration::from_secs(8);
    let mesh = Mesh::start_with(&["q", "w", "x", "y"], config).await;
    let mut tables: Vec<T> = Vec::new();
    for n in &mesh.nodes {
        tables.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let (tq, tx, ty) = (tables[0].clone(), tables[2].clone(), tables[3].clone());
    mesh.split(&[0], &[2, 3]);
    let q_write = {
        let tq = tq.clone();
        tokio::spawn(async move { tq.insert("k".into(), 1).await })
    };
    eventually("q holds its write", || async {
        tq.get(&"k".into()) == Some(1)
    })
    .await;
    next_millisecond().await;
    tables[1].insert("k".into(), 2).await.unwrap();
    assert_eq!(
        (tx.get(&"k".into()), ty.get(&"k".into())),
        (Some(2), Some(2))
    );
    // A marker behind q's write tells when x has read it.
    let q_marker = {
        let tq = tq.clone();
        tokio::spawn(async move { tq.insert("m".into(), 0).await })
    };
    mesh.heal(&[0], &[2]);
    eventually("x read q's writes", || async {
        tx.get(&"m".into()) == Some(0)
    })
    .await;
    assert_eq!(tx.get(&"k".into()), Some(2), "x refused q's older write");
    mesh.nodes[1].shutdown().await.unwrap();
    members(&[&tq, &tx, &ty], 2).await;
    assert_eq!(
        ty.get(&"m".into()),
        None,
        "q's writes have not reached y yet"
    );
    mesh.heal(&[0], &[3]);
    q_write.await.unwrap().unwrap();
    q_marker.await.unwrap().unwrap();
    for t in [&tq, &tx, &ty] {
        t.sync().await.unwrap();
    }
    let seen: Vec<Option<u64>> = [&tq, &tx, &ty].iter().map(|t| t.get(&"k".into())).collect();
    assert_eq!(seen, vec![None, None, None], "q, x, y hold k = {seen:?}");
}

/// Every node writes and deletes keys of one small key space at once; then d overwrites a's
/// record and deletes b's while its link to c is cut, so those two writes reach a and b only,
/// and d is cut off from everyone. The survivors applied different lasting writes of d, differ
/// in view, and merge again: they end as members of each other with the same records, a's and
/// b's among them, as if d's last writes had never been made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_of_a_writer_cut_off_mid_stream_end_with_the_same_records() {
    use rand::{Rng, SeedableRng};
    let mesh = Mesh::start(&["a", "b", "c", "d"]).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let mut writers = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let t = t.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            for n in 0..200u64 {
                let k = format!("k{}", rng.random_range(0..40));
                if rng.random_range(0..4) == 0 {
                    t.delete(&k).await.unwrap();
                } else {
                    t.insert(k, n).await.unwrap();
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    tables[0].insert("ka".into(), 1).await.unwrap();
    tables[1].insert("kb".into(), 1).await.unwrap();
    mesh.split(&[3], &[2]);
    let td = tables[3].clone();
    let last = tokio::spawn(async move {
        let kb: String = "kb".into();
        let (x, y) = tokio::join!(td.insert("ka".into(), 2), td.delete(&kb));
        (x, y)
    });
    eventually("a and b applied d's last writes", || async {
        tables[..2]
            .iter()
            .all(|t| t.get(&"ka".into()) == Some(2) && t.get(&"kb".into()).is_none())
    })
    .await;
    mesh.split(&[3], &[0, 1]);
    let survivors = [&tables[0], &tables[1], &tables[2]];
    eventually(
        "the survivors hold the same records as members of each other",
        || async {
            let mut first = survivors[0].to_vec();
            first.sort();
            survivors.iter().all(|t| {
                let mut v = t.to_vec();
                v.sort();
                v == first && t.nodes().len() == 2
            })
        },
    )
    .await;
    for t in survivors {
        assert_eq!(
            (t.get(&"ka".into()), t.get(&"kb".into())),
            (Some(1), Some(1))
        );
    }
    last.abort();
}

/// A dying writer's insert of a record it owns (no "lasting" effect where it lands: the key
/// was absent) makes the one survivor it reached refuse an older, concurrent write of another
/// node; the survivors it did not reach store that older write. Once d is gone, a has dropped
/// d's record and has no k, while b and c keep c's k. Every survivor applied the same lasting
/// batches of d (none), so their views stay equal and nothing merges them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_writers_own_record_that_refused_an_older_write_on_one_survivor_leaves_them_equal()
{
    // The c-a cut must not outlast the idle timeout, even on a busy machine (c's held-back
    // write must reach a on its stream); d goes down by the idle timeout, 3 s after its cuts.
    let mut config = cets::NodeConfig::fast_failover();
    config.keep_alive_interval = Duration::from_millis(500);
    config.idle_timeout = Duration::from_secs(3);
    let mesh = Mesh::start_with(&["a", "b", "c", "d"], config).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let (ta, tb, tc, td) = (
        tables[0].clone(),
        tables[1].clone(),
        tables[2].clone(),
        tables[3].clone(),
    );
    // c's write (with a marker in the same op) is held back from a.
    mesh.split(&[2], &[0]);
    let c_write = {
        let tc = tc.clone();
        tokio::spawn(async move {
            tc.insert_many(vec![("k".into(), 5), ("c-marker".into(), 0)])
                .await
        })
    };
    eventually("b and d hold c's write", || async {
        tb.get(&"k".into()) == Some(5) && td.get(&"k".into()) == Some(5)
    })
    .await;
    next_millisecond().await;
    // d's newer write of its own record reaches a only.
    mesh.split(&[3], &[1, 2]);
    let d_write = {
        let td = td.clone();
        tokio::spawn(async move { td.insert("k".into(), 7).await })
    };
    eventually("a holds d's write", || async {
        ta.get(&"k".into()) == Some(7)
    })
    .await;
    mesh.heal(&[2], &[0]);
    eventually("a read c's older write", || async {
        ta.get(&"c-marker".into()) == Some(0)
    })
    .await;
    assert_eq!(ta.get(&"k".into()), Some(7), "a refused c's older write");
    // d dies for everyone.
    mesh.split(&[3], &[0]);
    survivors_agree_on_k(&[&ta, &tb, &tc]).await;
    c_write.abort();
    d_write.abort();
}

/// A tombstone of a node that is already down refuses an older write on one survivor only: d's
/// delete of k reaches a alone (where k is absent, so only a tombstone records it), d goes down,
/// and then c's older insert of k reaches a, which refuses it, while b (and c) hold it. a had
/// mixed d's departure into its epoch before the refusal, and nothing counted the refusal: the
/// survivors kept equal views and different tables for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_the_tombstone_of_a_node_already_down_leaves_the_members_equal() {
    // b and c see d go down by the idle timeout (1 s), a at once: within VIEW_GRACE (2 s), so
    // the survivors' views differ only briefly and no merge follows from that alone. The c-a
    // cut lasts a few round trips, well under the idle timeout (c's held-back write must
    // reach a on its stream).
    let mesh = Mesh::start_with(&["a", "b", "c", "d"], cets::NodeConfig::fast_failover()).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let (ta, tb, tc, td) = (
        tables[0].clone(),
        tables[1].clone(),
        tables[2].clone(),
        tables[3].clone(),
    );
    let k: String = "k".into();
    // c's write of k is held back from a.
    mesh.split(&[0], &[2]);
    let c_write = {
        let tc = tc.clone();
        tokio::spawn(async move { tc.insert("k".into(), 1).await })
    };
    eventually("b and d hold c's write", || async {
        tb.get(&k) == Some(1) && td.get(&k) == Some(1)
    })
    .await;
    next_millisecond().await;
    // d's delete, newer, reaches a only; d applies it after sending it, so its marker insert
    // goes to a after it.
    mesh.split(&[3], &[1, 2]);
    let d_delete = {
        let (td, k) = (td.clone(), k.clone());
        tokio::spawn(async move { td.delete(&k).await })
    };
    eventually("d applied its delete", || async { td.get(&k).is_none() }).await;
    let d_marker = {
        let td = td.clone();
        tokio::spawn(async move { td.insert("d-marker".into(), 9).await })
    };
    eventually("a holds d's marker", || async {
        ta.get(&"d-marker".into()) == Some(9)
    })
    .await;
    assert_eq!(ta.get(&k), None, "c's write has not reached a");
    // d goes down; a hears of it first.
    mesh.nodes[3].shutdown().await.unwrap();
    eventually("a saw d go down", || async {
        !ta.nodes().contains(&"d".to_string())
    })
    .await;
    // c's older write reaches a now, and d's tombstone refuses it there.
    mesh.heal(&[0], &[2]);
    survivors_agree_on_k(&[&ta, &tb, &tc]).await;
    c_write.abort();
    d_delete.abort();
    d_marker.abort();
}

/// Waits until the three survivors are each other's members and hold the same value of "k".
async fn survivors_agree_on_k(survivors: &[&T; 3]) {
    let k: String = "k".into();
    let deadline = Instant::now() + WAIT;
    loop {
        let seen: Vec<Option<u64>> = survivors.iter().map(|t| t.get(&k)).collect();
        let nodes: Vec<Vec<String>> = survivors.iter().map(|t| t.nodes()).collect();
        if seen.iter().all(|v| *v == seen[0]) && nodes.iter().all(|n| n.len() == 2) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "survivors a, b, c hold k = {seen:?} (members {nodes:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
