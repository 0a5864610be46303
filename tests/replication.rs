//! Replication among several nodes over real QUIC on loopback.

mod common;

use cets::{Table, TableOptions};
use common::*;

async fn joined<K: cets::Key, V: cets::Value>(tables: &[&Table<K, V>]) {
    let n = tables.len() - 1;
    for t in tables {
        let t = (*t).clone();
        eventually(WAIT, "every table sees every other node", || {
            let t = t.clone();
            async move { t.nodes().len() == n }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_a_set() {
    let c = cluster(&["a", "b", "c"]).await;
    let mut tables: Vec<Table<u64, String>> = Vec::new();
    for (n, _) in &c {
        tables.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    tables[0].insert(1, "one".into()).await.unwrap();
    // insert returns after every peer acked: the read right after sees it.
    for t in &tables {
        assert_eq!(t.get(&1).as_deref(), Some("one"), "on {}", t.name());
    }
    tables[1]
        .insert_many(vec![(2, "two".into()), (3, "three".into())])
        .await
        .unwrap();
    tables[2].delete(&1).await.unwrap();
    for t in &tables {
        assert_eq!(t.get(&1), None);
        assert_eq!(t.len(), 2);
    }
    tables[0].delete_many(vec![2, 3]).await.unwrap();
    for t in &tables {
        assert!(t.is_empty());
    }
    for (n, _) in &c {
        n.shutdown().await.unwrap();
    }
}
