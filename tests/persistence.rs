//! Persistence (`TableOptions::persist` with a `DirectoryBackend`): snapshots on real disk,
//! restore at start merged with the live cluster by stamp, errors that name the file.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cets::persistence::{DirectoryBackend, OnRestoreError, PersistOptions};
use cets::{Error, Node, Table, TableOptions};
use common::*;

type Kv = Table<String, String>;

const EVERY: Duration = Duration::from_millis(50);

fn opts(dir: &Path, cluster: bool) -> TableOptions<String, String> {
    let o = TableOptions::set().persist(PersistOptions::new(DirectoryBackend::new(dir), EVERY));
    if cluster {
        o.cluster_owned()
    } else {
        o
    }
}

async fn snapshots(t: &Kv) -> u64 {
    t.status()
        .await
        .unwrap()
        .persistence
        .map_or(0, |p| p.snapshots)
}

/// Waits until a snapshot started after this call is written (two more than now: one may have
/// copied the table before the call).
async fn snapshot_taken(t: &Kv) {
    snapshot_taken_within(WAIT, t).await
}

/// As `snapshot_taken`, waiting up to `deadline`.
async fn snapshot_taken_within(deadline: Duration, t: &Kv) {
    let base = snapshots(t).await;
    let t = t.clone();
    eventually(deadline, "a snapshot of the table as it is now", || {
        let t = t.clone();
        async move { snapshots(&t).await >= base + 2 }
    })
    .await;
}

async fn start_all(
    names: &[&str],
    dirs: &[PathBuf],
    table: &str,
    cluster: bool,
) -> Vec<(Node, Kv)> {
    let nodes = common::cluster(names).await;
    let mut out = Vec::new();
    for ((n, _), dir) in nodes.into_iter().zip(dirs) {
        let t: Kv = n.start(table, opts(dir, cluster)).await.unwrap();
        out.push((n, t));
    }
    out
}

fn dirs(root: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| root.join(format!("node-{i}"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_brings_every_snapshotted_record_back_in_both_modes() {
    for cluster in [false, true] {
        let root = tempfile::tempdir().unwrap();
        let dirs = dirs(root.path(), 3);
        let names = ["a", "b", "c"];
        let nodes = start_all(&names, &dirs, "t", cluster).await;
        let tables: Vec<&Kv> = nodes.iter().map(|(_, t)| t).collect();
        joined(&tables).await;
        for (i, (_, t)) in nodes.iter().enumerate() {
            let recs = (0..500)
                .map(|k| (format!("{i}-{k}"), format!("v{i}")))
                .collect();
            t.insert_many(recs).await.unwrap();
        }
        for (_, t) in &nodes {
            snapshot_taken(t).await;
            assert_eq!(t.len(), 1500);
        }
        shutdown_all(nodes.iter().map(|(n, _)| n)).await;
        drop(nodes);

        let nodes = start_all(&names, &dirs, "t", cluster).await;
        for (i, (_, t)) in nodes.iter().enumerate() {
            let st = t.status().await.unwrap().persistence.unwrap();
            // A node-owned table restores the records its own name owned; a cluster-owned
            // table every record.
            let expect = if cluster { 1500 } else { 500 };
            assert_eq!(st.restored, expect, "node {i}, cluster {cluster}");
        }
        let tables: Vec<&Kv> = nodes.iter().map(|(_, t)| t).collect();
        joined(&tables).await;
        for (_, t) in &nodes {
            let t2 = t.clone();
            eventually(WAIT, "every record is back on every node", || {
                let t = t2.clone();
                async move { t.len() == 1500 }
            })
            .await;
            assert_eq!(t.get(&"2-499".to_string()).as_deref(), Some("v2"));
        }
        shutdown_all(nodes.iter().map(|(n, _)| n)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_from_an_old_snapshot_does_not_bring_back_keys_deleted_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let dirs = dirs(root.path(), 2);
    let nodes = start_all(&["a", "b"], &dirs, "t", true).await;
    let (a, b) = (&nodes[0].1, &nodes[1].1);
    joined(&[a, b]).await;
    for k in ["deleted", "kept", "updated"] {
        a.insert(k.into(), "old".into()).await.unwrap();
    }
    snapshot_taken(b).await;
    nodes[1].0.shutdown().await.unwrap();
    // While b is down: a delete and an update on the live side.
    a.delete(&"deleted".into()).await.unwrap();
    a.insert("updated".into(), "new".into()).await.unwrap();

    let (b2, h) = node("b").await;
    let tb: Kv = b2.start("t", opts(&dirs[1], true)).await.unwrap();
    assert_eq!(
        tb.get(&"deleted".to_string()).as_deref(),
        Some("old"),
        "restored from b's snapshot, before the join"
    );
    h.set(vec![nodes[0].0.local_addr()]);
    joined(&[a, &tb]).await;
    let tb2 = tb.clone();
    eventually(WAIT, "b converges to the live cluster", || {
        let t = tb2.clone();
        async move { t.len() == 2 }
    })
    .await;
    for t in [a, &tb] {
        assert_eq!(
            t.get(&"deleted".to_string()),
            None,
            "the delete is newer than the snapshot"
        );
        assert_eq!(t.get(&"updated".to_string()).as_deref(), Some("new"));
        assert_eq!(t.get(&"kept".to_string()).as_deref(), Some("old"));
    }
    shutdown_all([&nodes[0].0, &b2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_an_error_naming_the_file_and_an_option_starts_empty() {
    let root = tempfile::tempdir().unwrap();
    let backend = DirectoryBackend::new(root.path());
    let file = backend.file_of("t");
    std::fs::write(&file, b"CETSSNAP\x01\x00\x00\x00\x02\x00\x00\x00 truncated").unwrap();
    let (n, _) = node("a").await;
    let refused = n
        .start::<String, String>(
            "t",
            TableOptions::set().persist(PersistOptions::new(backend.clone(), EVERY)),
        )
        .await;
    match refused {
        Err(Error::Persistence { file: f, reason }) => {
            assert_eq!(f, file.display().to_string());
            assert!(reason.contains("block 0"), "{reason}");
        }
        other => panic!("expected a persistence error, got {other:?}"),
    }
    let p = PersistOptions::new(backend, EVERY).on_restore_error(OnRestoreError::StartEmpty);
    let t: Kv = n.start("t", TableOptions::set().persist(p)).await.unwrap();
    assert!(t.is_empty());
    let err = t.status().await.unwrap().persistence.unwrap().last_error;
    assert!(err.is_some_and(|e| e.contains(&file.display().to_string())));
    t.insert("k".into(), "v".into()).await.unwrap();
    let t2 = t.clone();
    eventually(WAIT, "the next snapshot replaces the damaged file", || {
        let t = t2.clone();
        async move {
            let p = t.status().await.unwrap().persistence.unwrap();
            p.snapshots > 0 && p.last_error.is_none()
        }
    })
    .await;
    n.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_directory_is_reported_and_replication_goes_on() {
    let root = tempfile::tempdir().unwrap();
    let blocked = root.path().join("not-a-dir");
    let nodes = common::cluster(&["a", "b"]).await;
    let a: Kv = nodes[0].0.start("t", opts(&blocked, false)).await.unwrap();
    // Then a regular file where the directory should be: writing there fails, even as root.
    let _ = std::fs::remove_dir_all(&blocked);
    std::fs::write(&blocked, b"x").unwrap();
    let b: Kv = nodes[1].0.start("t", TableOptions::set()).await.unwrap();
    joined(&[&a, &b]).await;
    let a2 = a.clone();
    eventually(WAIT, "the failed snapshot is in the status", || {
        let t = a2.clone();
        async move {
            let p = t.status().await.unwrap().persistence.unwrap();
            p.last_error.is_some_and(|e| e.contains("not-a-dir"))
        }
    })
    .await;
    a.insert("k".into(), "v".into()).await.unwrap();
    assert_eq!(b.get(&"k".to_string()).as_deref(), Some("v"));
    assert_eq!(a.get(&"k".to_string()).as_deref(), Some("v"));
    shutdown_all(nodes.iter().map(|(n, _)| n)).await;
}

/// Records each node writes: 100 002 by the three.
const PER_NODE: usize = 33_334;
/// The children's deadline for their 100 k records (a debug build beside a CI run).
const CHILD_WAIT: Duration = Duration::from_secs(60);

/// Runs only as a child process of `three_sigkilled_processes_restart_with_every_snapshotted_record`.
/// `CETS_PERSIST_CHILD` = `name;dir;nodes-file;mode`: mode `write` writes `PER_NODE` records (batches of 1000),
/// waits for a snapshot that holds them and says `snapshotted`; mode `verify` waits until the
/// restored and joined table holds every node's records and says `restored <n>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of three_sigkilled_processes_restart_with_every_snapshotted_record"]
async fn persistence_child() {
    let Ok(spec) = std::env::var("CETS_PERSIST_CHILD") else {
        return;
    };
    let parts: Vec<&str> = spec.split(';').collect();
    let (name, dir, nodes, mode) = (parts[0], parts[1], parts[2], parts[3]);
    let n = Node::builder(name)
        .listen(loopback())
        .cookie("persist")
        .config(cets::NodeConfig::fast_failover())
        .discovery(cets::discovery::FileDiscovery::new(nodes))
        .start()
        .await
        .unwrap();
    println!("addr {}", n.local_addr());
    let t: Kv = n.start("t", opts(Path::new(dir), true)).await.unwrap();
    if mode == "write" {
        eventually(WAIT, "three members", || {
            let t = t.clone();
            async move { t.nodes().len() == 2 }
        })
        .await;
        for from in (0..PER_NODE).step_by(1000) {
            let recs = (from..(from + 1000).min(PER_NODE))
                .map(|i| (format!("{name}-{i}"), name.to_string()))
                .collect();
            t.insert_many(recs).await.unwrap();
        }
        t.sync().await.unwrap();
        snapshot_taken_within(CHILD_WAIT, &t).await;
        println!("snapshotted");
    } else {
        eventually(CHILD_WAIT, "every record back", || {
            let t = t.clone();
            async move { t.len() == 3 * PER_NODE }
        })
        .await;
        let restored = t.status().await.unwrap().persistence.unwrap().restored;
        println!("restored {restored}");
    }
    std::future::pending::<()>().await;
}

async fn spawn_children(
    root: &Path,
    mode: &str,
    until: &str,
) -> (Vec<tokio::process::Child>, Vec<String>) {
    let (test, env) = ("persistence_child", "CETS_PERSIST_CHILD");
    let mut children = child::spawn_cluster(root, &["a", "b", "c"], test, env, mode).await;
    let said = child::each_says(&mut children, until).await;
    (children.into_iter().map(|(c, _)| c).collect(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sigkilled_processes_restart_with_every_snapshotted_record() {
    let root = tempfile::tempdir().unwrap();
    let (children, _) = spawn_children(root.path(), "write", "snapshotted").await;
    for mut c in children {
        c.start_kill().unwrap(); // SIGKILL
        c.wait().await.unwrap();
    }
    let (children, said) = spawn_children(root.path(), "verify", "restored").await;
    // Each restored the whole cluster-owned table from its own snapshot.
    assert_eq!(said, vec![format!("restored {}", 3 * PER_NODE); 3]);
    for mut c in children {
        c.start_kill().unwrap();
        c.wait().await.unwrap();
    }
}

/// A record's own lifetime (`insert_with_ttl`) is saved with it: restored from a snapshot or
/// replayed from the log (`sync_writes`, after a crash), in both modes, it still expires,
/// and a longer-lived and a permanent record stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_own_ttl_survives_a_restore_from_the_snapshot_and_from_the_log() {
    for (cluster, log) in [(false, false), (true, false), (false, true), (true, true)] {
        let root = tempfile::tempdir().unwrap();
        let o = || {
            let p = PersistOptions::new(
                DirectoryBackend::new(root.path()),
                Duration::from_secs(3600),
            )
            .sync_writes(log);
            let o = TableOptions::set().persist(p);
            if cluster {
                o.cluster_owned()
            } else {
                o
            }
        };
        let (n, _d) = node("n").await;
        let t: Kv = n.start("t", o()).await.unwrap();
        t.insert_with_ttl("short".into(), "v".into(), Duration::from_secs(2))
            .await
            .unwrap();
        t.insert_with_ttl("long".into(), "v".into(), Duration::from_secs(600))
            .await
            .unwrap();
        t.insert("plain".into(), "v".into()).await.unwrap();
        if log {
            // A crash: no final snapshot, the log is all there is.
            std::mem::forget(n);
        } else {
            // The final snapshot is all there is.
            n.shutdown().await.unwrap();
        }
        let (n, _d) = node("n").await;
        let t: Kv = n.start("t", o()).await.unwrap();
        let what = format!("cluster-owned {cluster}, from the log {log}");
        assert_eq!(t.get(&"long".to_string()).as_deref(), Some("v"), "{what}");
        assert_eq!(t.get(&"plain".to_string()).as_deref(), Some("v"), "{what}");
        let t2 = t.clone();
        eventually(WAIT, "the restored short-lived record expires", || {
            let t = t2.clone();
            async move { !t.contains_key(&"short".to_string()) && t.len() == 2 }
        })
        .await;
        n.shutdown().await.unwrap();
    }
}
