//! Shared helpers for the integration tests: nodes on loopback, bounded polling.
#![allow(dead_code)]

pub mod child;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cets::discovery::{StaticDiscovery, StaticDiscoveryHandle};
use cets::{Node, NodeConfig};

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A node on loopback with fast fail-over settings and a static discovery list it returns.
pub async fn node(name: &str) -> (Node, StaticDiscoveryHandle) {
    node_with(name, "test-cookie", NodeConfig::fast_failover()).await
}

pub async fn node_with(
    name: &str,
    cookie: &str,
    config: NodeConfig,
) -> (Node, StaticDiscoveryHandle) {
    init_tracing();
    let disco = StaticDiscovery::new(Vec::<SocketAddr>::new());
    let handle = disco.handle();
    let node = Node::builder(name)
        .listen(loopback())
        .cookie(cookie)
        .config(config)
        .discovery(disco)
        .start()
        .await
        .expect("node starts");
    (node, handle)
}

/// Starts `names.len()` nodes that all discover each other.
pub async fn cluster(names: &[&str]) -> Vec<(Node, StaticDiscoveryHandle)> {
    let mut nodes = Vec::new();
    for n in names {
        nodes.push(node(n).await);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|(n, _)| n.local_addr()).collect();
    for (_, h) in &nodes {
        h.set(addrs.clone());
    }
    nodes
}

/// Polls `cond` until it holds, or panics after `timeout` with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub const WAIT: Duration = Duration::from_secs(10);

/// A node on loopback with any discovery backend.
pub async fn node_disco(
    name: &str,
    cookie: &str,
    config: NodeConfig,
    discovery: impl cets::discovery::Discovery,
) -> Node {
    init_tracing();
    Node::builder(name)
        .listen(loopback())
        .cookie(cookie)
        .config(config)
        .discovery(discovery)
        .start()
        .await
        .expect("node starts")
}

/// Waits until every table lists every other table's node as a member.
pub async fn joined<K: cets::Key, V: cets::Value>(tables: &[&cets::Table<K, V>]) {
    joined_within(WAIT, tables).await
}

/// `joined`, waiting up to `timeout`.
pub async fn joined_within<K: cets::Key, V: cets::Value>(
    timeout: Duration,
    tables: &[&cets::Table<K, V>],
) {
    let n = tables.len() - 1;
    for t in tables {
        let t = (*t).clone();
        eventually(timeout, "every table sees every other node", || {
            let t = t.clone();
            async move { t.nodes().len() == n }
        })
        .await;
    }
}

/// Checks that `cond` holds at every sample over `period` (a stability check, not a wait):
/// panics with `what` the first time it does not.
pub async fn always<F, Fut>(period: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + period;
    let mut samples = 0u32;
    loop {
        assert!(
            cond().await,
            "stopped holding after {samples} samples: {what}"
        );
        samples += 1;
        if Instant::now() > end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A copy of `v`, sorted.
pub fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// Counts `on_node_down` calls of a table, by node name.
#[derive(Clone, Default)]
pub struct Downs(pub std::sync::Arc<std::sync::Mutex<Vec<(cets::NodeId, usize)>>>);

impl Downs {
    /// Table options of `kind` that record every `on_node_down` call here.
    pub fn opts<K: cets::Key, V: cets::Value>(
        &self,
        opts: cets::TableOptions<K, V>,
    ) -> cets::TableOptions<K, V> {
        let d = self.0.clone();
        opts.on_node_down(move |node, recs| d.lock().unwrap().push((node.clone(), recs.len())))
    }

    pub fn calls(&self) -> Vec<(cets::NodeId, usize)> {
        self.0.lock().unwrap().clone()
    }
}

/// Shuts every node down.
pub async fn shutdown_all<'a>(nodes: impl IntoIterator<Item = &'a Node>) {
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// Asserts that every table holds the same records, and returns them sorted (`what` names the
/// tables in the message).
pub async fn same_everywhere<K, V>(tables: &[&cets::Table<K, V>], what: &str) -> Vec<(K, V)>
where
    K: cets::Key + Ord + std::fmt::Debug,
    V: cets::Value + Ord + std::fmt::Debug,
{
    let first = sorted(tables[0].to_vec());
    for t in &tables[1..] {
        assert_eq!(sorted(t.to_vec()), first, "{what}: tables differ");
    }
    first
}

/// Nodes connected through cuttable relays (`Mesh`), and the helpers of its tests.
pub mod mesh;

/// A UDP relay between one client and a target that a test can cut (both ways or one), make
/// lossy and heal.
pub mod relay;
#[allow(unused_imports)]
pub use relay::Relay;

/// Options of a `Table<String, u64>` whose first join is held at `checkpoint` until released:
/// returns the options, the notification that the join reached it, and the release.
pub fn gate(
    checkpoint: &'static str,
) -> (
    cets::TableOptions<String, u64>,
    std::sync::Arc<tokio::sync::Notify>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    let reached = std::sync::Arc::new(tokio::sync::Notify::new());
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let used = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r1, r2) = (reached.clone(), release.clone());
    let opts = cets::TableOptions::set().join_checkpoint(move |c| {
        let hold = c == checkpoint && used.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
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
