//! Nodes connected through cuttable relays: node `i` reaches node `j > i` (by name order)
//! only through `relay(i, j)`, so a test can partition any set of links; and the helpers of the
//! tests that use it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use cets::discovery::StaticDiscoveryHandle;
use cets::{Node, NodeConfig, Table};

use super::{eventually, node_with, Relay, WAIT};

pub struct Mesh {
    pub nodes: Vec<Node>,
    pub handles: Vec<StaticDiscoveryHandle>,
    pub relays: BTreeMap<(usize, usize), Relay>,
}

impl Mesh {
    /// Names must be given in increasing order.
    pub async fn start(names: &[&str]) -> Mesh {
        Self::start_with(names, NodeConfig::fast_failover()).await
    }

    /// `start` with another configuration for every node.
    pub async fn start_with(names: &[&str], config: NodeConfig) -> Mesh {
        assert!(
            names.windows(2).all(|w| w[0] < w[1]),
            "names must be sorted"
        );
        let mut nodes = Vec::new();
        let mut handles = Vec::new();
        for n in names {
            let (node, h) = node_with(n, "test-cookie", config.clone()).await;
            nodes.push(node);
            handles.push(h);
        }
        let mut mesh = Mesh {
            nodes,
            handles,
            relays: BTreeMap::new(),
        };
        for i in 0..names.len() {
            for j in i + 1..names.len() {
                let p = Relay::start(mesh.nodes[j].local_addr()).await;
                mesh.relays.insert((i, j), p);
            }
        }
        for i in 0..names.len() {
            mesh.refresh(i);
        }
        mesh
    }

    /// Re-points node `i`'s discovery at the relays to every larger node.
    pub fn refresh(&self, i: usize) {
        let addrs: Vec<SocketAddr> = self
            .relays
            .iter()
            .filter(|((a, _), _)| *a == i)
            .map(|(_, p)| p.addr())
            .collect();
        self.handles[i].set(addrs);
    }

    /// Replaces node `i` (e.g. after it was shut down) by `node`, with new relays towards it.
    pub async fn replace(&mut self, i: usize, node: Node, handle: StaticDiscoveryHandle) {
        self.nodes[i] = node;
        self.handles[i] = handle;
        for j in 0..i {
            let p = Relay::start(self.nodes[i].local_addr()).await;
            self.relays.insert((j, i), p);
            self.refresh(j);
        }
        self.refresh(i);
    }

    fn relay(&self, a: usize, b: usize) -> &Relay {
        &self.relays[&(a.min(b), a.max(b))]
    }

    /// Cuts every link between a node of `left` and a node of `right`.
    pub fn split(&self, left: &[usize], right: &[usize]) {
        for &a in left {
            for &b in right {
                self.relay(a, b).cut();
            }
        }
    }

    /// Heals every link between `left` and `right`.
    pub fn heal(&self, left: &[usize], right: &[usize]) {
        for &a in left {
            for &b in right {
                self.relay(a, b).heal();
            }
        }
    }
}

/// Waits until every table lists exactly the given number of peers.
pub async fn members(tables: &[&Table<String, u64>], n: usize) {
    for t in tables {
        let t = (*t).clone();
        eventually(WAIT, &format!("{} has {n} peers", t.name()), || {
            let t = t.clone();
            async move { t.nodes().len() == n }
        })
        .await;
    }
}

/// Writes `n` records `prefix-i` = `i` in one `insert_many`.
pub async fn write_n(t: &Table<String, u64>, prefix: &str, n: u64) {
    let recs = (0..n).map(|i| (format!("{prefix}-{i}"), i)).collect();
    t.insert_many(recs).await.unwrap();
}

/// Waits until the wall clock's millisecond changed: last writer wins compares hybrid clocks,
/// whose physical part has millisecond resolution, so two partitioned nodes only order their
/// writes by time when a millisecond passed between them (otherwise the owner decides).
pub async fn next_millisecond() {
    let ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    };
    let start = ms();
    eventually(
        WAIT,
        "the wall clock moved on a millisecond",
        || async move { ms() > start },
    )
    .await;
}
