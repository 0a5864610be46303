//! Nodes connected through cuttable relays: node `i` reaches node `j > i` (by name order)
//! only through `relay(i, j)`, so a test can partition any set of links.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use cets::discovery::{StaticDiscovery, StaticDiscoveryHandle};
use cets::{Node, NodeConfig};

use super::proxy::Proxy;

pub struct Mesh {
    pub nodes: Vec<Node>,
    pub handles: Vec<StaticDiscoveryHandle>,
    pub relays: BTreeMap<(usize, usize), Proxy>,
}

pub async fn start_node(name: &str) -> (Node, StaticDiscoveryHandle) {
    start_node_with(name, NodeConfig::fast_failover()).await
}

pub async fn start_node_with(name: &str, config: NodeConfig) -> (Node, StaticDiscoveryHandle) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let disco = StaticDiscovery::new(Vec::<SocketAddr>::new());
    let h = disco.handle();
    let node = Node::builder(name)
        .listen("127.0.0.1:0".parse().unwrap())
        .cookie("mesh")
        .config(config)
        .discovery(disco)
        .start()
        .await
        .unwrap();
    (node, h)
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
            let (node, h) = start_node_with(n, config.clone()).await;
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
                let p = Proxy::start(mesh.nodes[j].local_addr()).await;
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
            let p = Proxy::start(self.nodes[i].local_addr()).await;
            self.relays.insert((j, i), p);
            self.refresh(j);
        }
        self.refresh(i);
    }

    fn relay(&self, a: usize, b: usize) -> &Proxy {
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
