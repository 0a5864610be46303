//! A full-cluster restart that brings the data back: three nodes on loopback keep a
//! cluster-owned table snapshotted to a directory each, all three stop, and three new nodes
//! with the same names and directories restore it.
//!
//! ```text
//! cargo run --release --example restart
//! ```

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cets::discovery::StaticDiscovery;
use cets::persistence::{DirectoryBackend, PersistOptions};
use cets::{Node, NodeConfig, Table, TableOptions};

type Config = Table<String, String>;
type Res<T = ()> = Result<T, Box<dyn Error>>;

const WAIT: Duration = Duration::from_secs(15);
const NAMES: [&str; 3] = ["a", "b", "c"];

async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) -> Res {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for: {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Three nodes that know each other's addresses, each with the table persisted in its directory.
async fn start_cluster(root: &Path, ports: &[u16]) -> Res<Vec<(Node, Config)>> {
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
        .collect();
    let mut out = Vec::new();
    for (name, addr) in NAMES.iter().zip(&addrs) {
        let node = Node::builder(*name)
            .listen(*addr)
            .cookie("restart-demo")
            .config(NodeConfig::fast_failover())
            .discovery(StaticDiscovery::new(addrs.clone()))
            .start()
            .await?;
        let dir: PathBuf = root.join(name);
        let persist = PersistOptions::new(DirectoryBackend::new(dir), Duration::from_millis(200));
        let opts = TableOptions::set().cluster_owned().persist(persist);
        let t: Config = node.start("config", opts).await?;
        out.push((node, t));
    }
    Ok(out)
}

async fn run() -> Res {
    let root = std::env::temp_dir().join(format!("cets-restart-{}", std::process::id()));
    // Free ports for this run (the second cluster listens on the same ones).
    let mut ports = Vec::new();
    for _ in NAMES {
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        ports.push(s.local_addr()?.port());
    }
    let nodes = start_cluster(&root, &ports).await?;
    for (n, t) in &nodes {
        let recs = (0..1000)
            .map(|i| {
                (
                    format!("{}-{i}", n.name()),
                    format!("written by {}", n.name()),
                )
            })
            .collect();
        t.insert_many(recs).await?;
    }
    let t = nodes[0].1.clone();
    until("3000 records on a", async || t.len() == 3000).await?;
    for (n, t) in &nodes {
        let before = t.status().await?.persistence.map_or(0, |p| p.snapshots);
        let t = t.clone();
        until("a snapshot with every record", async || {
            t.status()
                .await
                .ok()
                .and_then(|s| s.persistence)
                .map_or(0, |p| p.snapshots)
                >= before + 2
        })
        .await?;
        println!(
            "{}: {} records snapshotted to {}",
            n.name(),
            t.len(),
            root.join(n.name()).display()
        );
    }
    for (n, _) in &nodes {
        n.shutdown().await?;
    }
    println!("all three nodes stopped");
    drop(nodes);

    let started = Instant::now();
    let nodes = start_cluster(&root, &ports).await?;
    for (n, t) in &nodes {
        let restored = t.status().await?.persistence.map_or(0, |p| p.restored);
        println!(
            "{} restarted: {restored} records restored from disk",
            n.name()
        );
    }
    let t = nodes[2].1.clone();
    until("every record on c", async || t.len() == 3000).await?;
    println!(
        "cluster back with {} records in {:.0} ms; a-7 = {:?}",
        t.len(),
        started.elapsed().as_secs_f64() * 1000.0,
        t.get(&"a-7".to_string())
    );
    for (n, _) in &nodes {
        n.shutdown().await?;
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("restart demo FAILED: {e}");
        std::process::exit(1);
    }
}
