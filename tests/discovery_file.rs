//! Nodes that find each other through a nodes file (`FileDiscovery`), over real QUIC.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use cets::discovery::{FileDiscovery, StaticDiscovery};
use cets::{Node, NodeConfig, Table, TableOptions};
use common::*;

type T = Table<String, u64>;

fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    // One write call, so a poll never reads half a line.
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// Starts `names` on one nodes file that lists them all (with a comment and a blank line, as
/// an operator would write it), and a table on each; waits until the tables are joined.
async fn file_cluster(path: &Path, names: &[&str]) -> (Vec<Node>, Vec<T>) {
    let mut nodes = Vec::new();
    for n in names {
        let d = FileDiscovery::new(path);
        nodes.push(node_disco(n, "file-cookie", NodeConfig::fast_failover(), d).await);
    }
    // The ports are known only now; the nodes re-read the file on every poll.
    let mut text = String::from("# the cluster\n\n");
    for (i, n) in nodes.iter().enumerate() {
        text.push_str(&format!("{}   # node {}\n", n.local_addr(), names[i]));
    }
    std::fs::write(path, text).unwrap();
    let mut tables: Vec<T> = Vec::new();
    for n in &nodes {
        tables.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    (nodes, tables)
}

async fn check_new_node_catches_up_and_replicates(d: &Node, td: &T, nodes: &[Node], tables: &[T]) {
    let all: Vec<&T> = tables.iter().chain([td]).collect();
    joined(&all).await;
    let expected = sorted(tables[0].to_vec());
    assert_eq!(expected.len(), 300);
    // The join copied everything before d became a member.
    assert_eq!(sorted(td.to_vec()), expected, "d holds every record");
    // A write on d reaches every other node by the time it returns.
    td.insert("from-d".into(), 7).await.unwrap();
    td.delete(&"a-0".to_string()).await.unwrap();
    for t in &all {
        assert_eq!(t.get(&"from-d".to_string()), Some(7));
        assert_eq!(t.get(&"a-0".to_string()), None);
        assert_eq!(t.len(), 300);
    }
    // And writes of the old nodes reach d.
    tables[1].insert("from-b".into(), 8).await.unwrap();
    assert_eq!(td.get(&"from-b".to_string()), Some(8));
    let s = d.status().await;
    let mut peers: Vec<&str> = s.connected.iter().map(|(id, _)| id.name.as_str()).collect();
    peers.sort();
    let mut names: Vec<&str> = nodes.iter().map(|n| n.name()).collect();
    names.sort();
    assert_eq!(peers, names);
}

/// Waits until the node's last discovery poll returned `n` addresses, without error.
async fn discovers(node: &Node, n: usize) {
    eventually(
        WAIT,
        &format!("{} discovers {n} addresses", node.name()),
        || {
            let node = node.clone();
            async move {
                let s = node.status().await;
                s.discovered.len() == n && s.discovery_error.is_none()
            }
        },
    )
    .await;
}

async fn write_records(tables: &[T]) {
    for (i, t) in tables.iter().enumerate() {
        let recs = (0..100)
            .map(|j| (format!("{}-{j}", ["a", "b", "c"][i]), j))
            .collect();
        t.insert_many(recs).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_added_to_the_nodes_file_gets_every_record_and_replicates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nodes.txt");
    std::fs::write(&path, "").unwrap();
    let (nodes, tables) = file_cluster(&path, &["a", "b", "c"]).await;
    write_records(&tables).await;
    for n in &nodes {
        discovers(n, 3).await;
    }

    // d reads the same file; its own address is appended once it is bound.
    let d = node_disco(
        "d",
        "file-cookie",
        NodeConfig::fast_failover(),
        FileDiscovery::new(&path),
    )
    .await;
    let td: T = d.start("t", TableOptions::set()).await.unwrap();
    append(&path, &d.local_addr().to_string());
    check_new_node_catches_up_and_replicates(&d, &td, &nodes, &tables).await;
    for n in nodes.iter().chain([&d]) {
        discovers(n, 4).await;
    }
    shutdown_all(nodes.iter().chain([&d])).await;
}

/// d has no discovery of its own: only the old nodes reading the edited file can find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_of_the_nodes_file_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nodes.txt");
    std::fs::write(&path, "").unwrap();
    let (nodes, tables) = file_cluster(&path, &["a", "b", "c"]).await;
    write_records(&tables).await;
    let d = node_disco(
        "d",
        "file-cookie",
        NodeConfig::fast_failover(),
        StaticDiscovery::new(Vec::<SocketAddr>::new()),
    )
    .await;
    // Not listed yet: nobody connects to d.
    let td: T = d.start("t", TableOptions::set()).await.unwrap();
    always(
        std::time::Duration::from_millis(600),
        "d stays alone while unlisted",
        || {
            let d = d.clone();
            async move { d.status().await.connected.is_empty() }
        },
    )
    .await;
    assert!(td.is_empty());
    append(&path, &format!("{}  # added later", d.local_addr()));
    check_new_node_catches_up_and_replicates(&d, &td, &nodes, &tables).await;
    shutdown_all(nodes.iter().chain([&d])).await;
}
