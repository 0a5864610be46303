//! A node in a separate process, killed with SIGKILL: no goodbye, no CONNECTION_CLOSE. The
//! survivors detect it by idle timeout, drop its records and call `on_node_down` once; when
//! it comes back, its records return through the join.
//!
//! The child process is this test binary itself, re-run with `CETS_CHILD` set (see
//! `child_node`), so no other binary needs to be built.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cets::discovery::StaticDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};

type Kv = Table<String, String>;
const RECORDS: usize = 200;

async fn node(name: &str, peers: Vec<SocketAddr>) -> Node {
    Node::builder(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .cookie("kill")
        .config(NodeConfig::fast_failover())
        .discovery(StaticDiscovery::new(peers))
        .start()
        .await
        .unwrap()
}

/// Runs only as the child process: a node named `c` that writes `RECORDS` records, reports
/// `inserted`, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of sigkilled_node_is_dropped_and_returns; not a test by itself"]
async fn child_node() {
    let Ok(peers) = std::env::var("CETS_CHILD") else {
        return;
    };
    let peers: Vec<SocketAddr> = peers.split(',').map(|s| s.parse().unwrap()).collect();
    let n = node("c", peers).await;
    let t: Kv = n.start("kv", TableOptions::set()).await.unwrap();
    n.wait_for_ready(Duration::from_secs(10)).await.unwrap();
    let recs = (0..RECORDS)
        .map(|i| (format!("c-{i}"), "c".to_string()))
        .collect();
    t.insert_many(recs).await.unwrap();
    println!("inserted");
    std::future::pending::<()>().await;
}

async fn spawn_child(peers: &[SocketAddr]) -> tokio::process::Child {
    let list: Vec<String> = peers.iter().map(|a| a.to_string()).collect();
    common::child::spawn_ready(
        "child_node",
        ("CETS_CHILD", list.join(",")),
        "inserted",
        Duration::from_secs(20),
    )
    .await
}

async fn wait_len(t: &Kv, n: usize) -> Duration {
    let start = Instant::now();
    while t.len() != n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} records, expected {n}",
            t.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_node_is_dropped_and_returns() {
    let a = node("a", vec![]).await;
    let b = node("b", vec![a.local_addr()]).await;
    let downs: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let opts = || {
        let d = downs.clone();
        TableOptions::set().on_node_down(move |n, recs: &[(String, String)]| {
            d.lock().unwrap().push((n.name.clone(), recs.len()));
        })
    };
    let ta: Kv = a.start("kv", opts()).await.unwrap();
    let tb: Kv = b.start("kv", opts()).await.unwrap();
    ta.insert("a-0".into(), "a".into()).await.unwrap();
    let peers = [a.local_addr(), b.local_addr()];

    let mut child = spawn_child(&peers).await;
    assert_eq!(ta.len(), RECORDS + 1);
    assert_eq!(tb.len(), RECORDS + 1);
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let took = wait_len(&ta, 1).await;
    wait_len(&tb, 1).await;
    ta.sync().await.unwrap();
    tb.sync().await.unwrap();
    let mut seen = downs.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![("c".to_string(), RECORDS), ("c".to_string(), RECORDS)],
        "once per node"
    );
    eprintln!("records of the killed node gone after {took:?} (idle timeout 1 s)");

    // It comes back (a new incarnation): its records return through the join.
    let mut child = spawn_child(&peers).await;
    assert_eq!(ta.len(), RECORDS + 1);
    assert_eq!(tb.len(), RECORDS + 1);
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
