//! Shared helpers for the integration tests: nodes on loopback, bounded polling.
#![allow(dead_code)]

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
