//! Cluster-owned tables (`TableOptions::cluster_owned`): records outlive the node that wrote
//! them, deletes outlive a partition for the tombstone retention, joins merge by newer wins.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cets::discovery::StaticDiscovery;
use cets::{Error, Node, NodeConfig, Ownership, Table, TableOptions};
use common::mesh::Mesh;
use common::*;

type Kv = Table<String, String>;

fn kv(t: &Kv, k: &str) -> Option<String> {
    t.get(&k.to_string())
}

/// Lets the wall clock pass the millisecond of the last write. Two partitioned nodes share no
/// clock: a write made after another in real time but within the same millisecond may carry a
/// smaller stamp (its node's logical counter is lower) and lose, as newer-wins says it should.
/// This orders stamps; it synchronises nothing.
async fn next_millisecond() {
    tokio::time::sleep(Duration::from_millis(3)).await;
}

async fn wait_alone(t: &Kv) {
    let t = t.clone();
    eventually(WAIT, "the partition is seen (no members)", || {
        let t = t.clone();
        async move { t.nodes().is_empty() }
    })
    .await;
}

async fn same_everywhere(tables: &[&Kv], what: &str) {
    let ts: Vec<Kv> = tables.iter().map(|t| (*t).clone()).collect();
    eventually(WAIT, what, || {
        let ts = ts.clone();
        async move {
            let first = sorted(ts[0].to_vec());
            ts.iter().all(|t| sorted(t.to_vec()) == first)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stay_when_their_writer_shuts_down_and_come_back_to_its_next_start() {
    let nodes = cluster(&["a", "b", "c"]).await;
    let downs = Downs::default();
    let mut tables = Vec::new();
    for (n, _) in &nodes {
        let opts = downs.opts(TableOptions::set().cluster_owned());
        tables.push(n.start("cfg", opts).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let recs = (0..100)
        .map(|i| (format!("c-{i}"), "c".to_string()))
        .collect();
    tables[2].insert_many(recs).await.unwrap();
    nodes[2].0.shutdown().await.unwrap();
    for t in &tables[..2] {
        let t2 = t.clone();
        eventually(WAIT, "c is no member any more", || {
            let t = t2.clone();
            async move { t.nodes().len() == 1 }
        })
        .await;
        t.sync().await.unwrap();
        assert_eq!(t.len(), 100, "nothing of c was dropped");
        assert_eq!(kv(t, "c-7").as_deref(), Some("c"));
    }
    assert!(downs.calls().is_empty(), "on_node_down is never called");

    // c's next incarnation starts empty and gets everything back through the join; it can
    // overwrite what its previous incarnation wrote.
    let (c2, h) = node("c").await;
    h.set(vec![nodes[0].0.local_addr(), nodes[1].0.local_addr()]);
    let t2: Kv = c2
        .start("cfg", TableOptions::set().cluster_owned())
        .await
        .unwrap();
    joined(&[&tables[0], &tables[1], &t2]).await;
    same_everywhere(&[&tables[0], &tables[1], &t2], "c2 has c's records").await;
    assert_eq!(t2.len(), 100);
    t2.insert("c-7".into(), "c2".into()).await.unwrap();
    assert_eq!(kv(&tables[0], "c-7").as_deref(), Some("c2"));
    shutdown_all([&nodes[0].0, &nodes[1].0, &c2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_during_a_partition_stays_deleted_after_the_heal_and_newer_writes_win() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let mut tables: Vec<Kv> = Vec::new();
    for n in &mesh.nodes {
        tables.push(
            n.start("cfg", TableOptions::set().cluster_owned())
                .await
                .unwrap(),
        );
    }
    let (a, b) = (tables[0].clone(), tables[1].clone());
    joined(&[&a, &b]).await;
    for k in ["gone", "kept", "raced", "b-wins"] {
        a.insert(k.into(), "v0".into()).await.unwrap();
    }
    mesh.split(&[0], &[1]);
    wait_alone(&a).await;
    wait_alone(&b).await;
    assert_eq!(b.len(), 4, "b keeps a's records through the partition");
    // a deletes; b writes a key a deletes later; both write one key, b last.
    a.delete(&"gone".into()).await.unwrap();
    b.insert("raced".into(), "b".into()).await.unwrap();
    next_millisecond().await;
    a.delete(&"raced".into()).await.unwrap();
    a.insert("b-wins".into(), "a".into()).await.unwrap();
    next_millisecond().await;
    b.insert("b-wins".into(), "b".into()).await.unwrap();
    b.insert("new".into(), "b".into()).await.unwrap();
    assert_eq!(a.status().await.unwrap().tombstones, 2);
    mesh.heal(&[0], &[1]);
    joined(&[&a, &b]).await;
    same_everywhere(&[&a, &b], "both sides hold the same records").await;
    for t in [&a, &b] {
        assert_eq!(
            kv(t, "gone"),
            None,
            "the delete made during the partition wins"
        );
        assert_eq!(
            kv(t, "raced"),
            None,
            "the later delete wins over b's earlier write"
        );
        assert_eq!(kv(t, "b-wins").as_deref(), Some("b"), "newer write wins");
        assert_eq!(kv(t, "kept").as_deref(), Some("v0"));
        assert_eq!(kv(t, "new").as_deref(), Some("b"));
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.status().await.unwrap().tombstones,
            2,
            "tombstones kept for the retention on both sides"
        );
    }
    shutdown_all(&mesh.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_retention_a_deleted_key_comes_back_from_the_other_side() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let opts = || {
        TableOptions::set()
            .cluster_owned()
            .tombstone_retention(Duration::from_millis(300))
    };
    let a: Kv = mesh.nodes[0].start("cfg", opts()).await.unwrap();
    let b: Kv = mesh.nodes[1].start("cfg", opts()).await.unwrap();
    joined(&[&a, &b]).await;
    a.insert("k".into(), "v".into()).await.unwrap();
    mesh.split(&[0], &[1]);
    wait_alone(&a).await;
    wait_alone(&b).await;
    a.delete(&"k".into()).await.unwrap();
    assert_eq!(a.status().await.unwrap().tombstones, 1);
    let a2 = a.clone();
    eventually(WAIT, "a forgets its tombstone after the retention", || {
        let a = a2.clone();
        async move { a.status().await.unwrap().tombstones == 0 }
    })
    .await;
    mesh.heal(&[0], &[1]);
    joined(&[&a, &b]).await;
    same_everywhere(&[&a, &b], "both sides hold the same records").await;
    assert_eq!(
        kv(&a, "k").as_deref(),
        Some("v"),
        "documented: past the retention, the other side's older record comes back"
    );
    shutdown_all(&mesh.nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_three_nodes_converge() {
    let nodes = cluster(&["a", "b", "c"]).await;
    let mut tables: Vec<Kv> = Vec::new();
    for (n, _) in &nodes {
        tables.push(
            n.start("cfg", TableOptions::ordered_set().cluster_owned())
                .await
                .unwrap(),
        );
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let mut tasks = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..50 {
                let k = format!("k{}", round % 10);
                if round % 7 == 3 {
                    t.delete(&k).await.unwrap();
                } else {
                    t.insert(k, format!("{i}-{round}")).await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for t in &tables {
        t.sync().await.unwrap();
    }
    let refs: Vec<&Kv> = tables.iter().collect();
    same_everywhere(&refs, "every node ends with the same records").await;
    shutdown_all(nodes.iter().map(|(n, _)| n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_ownership_is_refused_and_bags_cannot_be_cluster_owned() {
    let nodes = cluster(&["a", "b"]).await;
    let a: Kv = nodes[0]
        .0
        .start("t", TableOptions::set().cluster_owned())
        .await
        .unwrap();
    let b: Kv = nodes[1]
        .0
        .start("t", TableOptions::set().ownership(Ownership::Node))
        .await
        .unwrap();
    eventually(WAIT, "the node-owned table is refused", || {
        let a = a.clone();
        async move { !a.status().await.unwrap().refused.is_empty() }
    })
    .await;
    assert!(a.nodes().is_empty() && b.nodes().is_empty());
    let bag = nodes[0]
        .0
        .start::<String, String>("bag", TableOptions::bag().cluster_owned())
        .await;
    assert!(matches!(bag, Err(Error::Config(m)) if m.contains("bag")));
    shutdown_all(nodes.iter().map(|(n, _)| n)).await;
}

const CHILD_RECORDS: usize = 200;

async fn process_node(name: &str, peers: Vec<SocketAddr>) -> Node {
    Node::builder(name)
        .listen(loopback())
        .cookie("cluster-owned")
        .config(NodeConfig::fast_failover())
        .discovery(StaticDiscovery::new(peers))
        .start()
        .await
        .unwrap()
}

/// Runs only as the child process of `a_sigkilled_writers_records_stay_on_the_survivors`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of a_sigkilled_writers_records_stay_on_the_survivors"]
async fn cluster_owned_child() {
    let Ok(peers) = std::env::var("CETS_CLUSTER_CHILD") else {
        return;
    };
    let peers: Vec<SocketAddr> = peers.split(',').map(|s| s.parse().unwrap()).collect();
    let n = process_node("c", peers).await;
    let t: Kv = n
        .start("cfg", TableOptions::set().cluster_owned())
        .await
        .unwrap();
    n.wait_for_ready(Duration::from_secs(10)).await.unwrap();
    let recs = (0..CHILD_RECORDS)
        .map(|i| (format!("c-{i}"), "c".to_string()))
        .collect();
    t.insert_many(recs).await.unwrap();
    println!("inserted");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_writers_records_stay_on_the_survivors() {
    let a = process_node("a", vec![]).await;
    let b = process_node("b", vec![a.local_addr()]).await;
    let ta: Kv = a
        .start("cfg", TableOptions::set().cluster_owned())
        .await
        .unwrap();
    let tb: Kv = b
        .start("cfg", TableOptions::set().cluster_owned())
        .await
        .unwrap();
    joined(&[&ta, &tb]).await;
    let peers = [a.local_addr(), b.local_addr()];
    let list: Vec<String> = peers.iter().map(|a| a.to_string()).collect();
    let mut child = child::spawn_ready(
        "cluster_owned_child",
        ("CETS_CLUSTER_CHILD", list.join(",")),
        "inserted",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(ta.len(), CHILD_RECORDS);
    assert_eq!(tb.len(), CHILD_RECORDS);
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    for t in [&ta, &tb] {
        let t2 = t.clone();
        eventually(WAIT, "the killed node is no member any more", || {
            let t = t2.clone();
            async move { t.nodes().len() == 1 }
        })
        .await;
        t.sync().await.unwrap();
        assert_eq!(t.len(), CHILD_RECORDS, "the killed writer's records stay");
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_conflict_handler_a_delete_still_wins_over_the_older_versions() {
    let mesh = Mesh::start(&["a", "b"]).await;
    // The handler would make a new version of two conflicting ones: it must not see versions
    // a tombstone beats (the merge drops them first).
    let opts = || {
        TableOptions::set()
            .cluster_owned()
            .conflict_handler(|_k: &String, x: &String, y: &String| format!("{x}+{y}"))
    };
    let a: Kv = mesh.nodes[0].start("cfg", opts()).await.unwrap();
    let b: Kv = mesh.nodes[1].start("cfg", opts()).await.unwrap();
    joined(&[&a, &b]).await;
    a.insert("gone".into(), "v0".into()).await.unwrap();
    mesh.split(&[0], &[1]);
    wait_alone(&a).await;
    wait_alone(&b).await;
    b.insert("gone".into(), "b".into()).await.unwrap();
    a.insert("both".into(), "a".into()).await.unwrap();
    b.insert("both".into(), "b".into()).await.unwrap();
    next_millisecond().await;
    a.delete(&"gone".into()).await.unwrap();
    mesh.heal(&[0], &[1]);
    joined(&[&a, &b]).await;
    same_everywhere(&[&a, &b], "both sides hold the same records").await;
    for t in [&a, &b] {
        assert_eq!(
            kv(t, "gone"),
            None,
            "the delete is newer than both versions"
        );
        assert_eq!(kv(t, "both").as_deref(), Some("a+b"), "the handler merged");
    }
    shutdown_all(&mesh.nodes).await;
}

/// `insert_with_ttl`: the lifetime travels with the record to every node and through a join;
/// a newer write decides (another ttl renews it, a plain insert makes it permanent); the sweep
/// removes expired records everywhere. In a cluster-owned table, as the brief's caches need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_own_ttl_expires_everywhere_and_a_newer_write_decides() {
    let nodes = cluster(&["a", "b"]).await;
    let opts = || TableOptions::set().cluster_owned();
    let a: Kv = nodes[0].0.start("cache", opts()).await.unwrap();
    let b: Kv = nodes[1].0.start("cache", opts()).await.unwrap();
    joined(&[&a, &b]).await;
    let short = Duration::from_millis(400);
    a.insert_with_ttl("short".into(), "v".into(), short)
        .await
        .unwrap();
    a.insert_with_ttl("renewed".into(), "v1".into(), short)
        .await
        .unwrap();
    a.insert_with_ttl("made-permanent".into(), "v1".into(), short)
        .await
        .unwrap();
    a.insert("plain".into(), "v".into()).await.unwrap();
    // Newer writes of two keys, from the other node: a longer ttl, and none.
    b.insert_with_ttl("renewed".into(), "v2".into(), Duration::from_secs(600))
        .await
        .unwrap();
    b.insert("made-permanent".into(), "v2".into())
        .await
        .unwrap();
    assert_eq!(
        kv(&b, "short").as_deref(),
        Some("v"),
        "replicated with its ttl"
    );
    for t in [&a, &b] {
        let t2 = t.clone();
        eventually(WAIT, "the short record expired and was swept", || {
            let t = t2.clone();
            async move { kv(&t, "short").is_none() && t.len() == 3 }
        })
        .await;
        assert_eq!(kv(t, "renewed").as_deref(), Some("v2"));
        assert_eq!(kv(t, "made-permanent").as_deref(), Some("v2"));
        assert_eq!(kv(t, "plain").as_deref(), Some("v"));
        assert!(!t.contains_key(&"short".to_string()));
    }
    // A node that joins later gets the lifetimes with the records.
    let (c, h) = node("c").await;
    h.set(vec![nodes[0].0.local_addr(), nodes[1].0.local_addr()]);
    let tc: Kv = c.start("cache", opts()).await.unwrap();
    a.insert_with_ttl("late".into(), "v".into(), Duration::from_secs(4))
        .await
        .unwrap();
    joined(&[&a, &b, &tc]).await;
    same_everywhere(&[&a, &b, &tc], "c holds the records").await;
    assert_eq!(
        kv(&tc, "late").as_deref(),
        Some("v"),
        "joined within its ttl"
    );
    let tc2 = tc.clone();
    eventually(WAIT, "c's copy of the late record expires too", || {
        let t = tc2.clone();
        async move { kv(&t, "late").is_none() && t.len() == 3 }
    })
    .await;
    let bad = a
        .insert_with_ttl("k".into(), "v".into(), Duration::ZERO)
        .await;
    assert!(matches!(bad, Err(Error::Config(_))));
    shutdown_all([&nodes[0].0, &nodes[1].0, &c]).await;
}
