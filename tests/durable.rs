//! Durability on fsync (`PersistOptions::sync_writes`): the write-ahead log of the directory
//! backend, replayed over the last snapshot at start; nodes as separate processes, SIGKILLed.

#[path = "common/capture.rs"]
mod capture;
mod common;

use std::path::Path;
use std::time::Duration;

use cets::persistence::{DirectoryBackend, OnRestoreError, PersistOptions};
use cets::testing::ProbeBackend;
use cets::{Error, Node, Table, TableOptions};
use common::*;
use tokio::io::AsyncBufReadExt;

type Kv = Table<String, String>;

/// Long: the only snapshots in these tests are the ones `Node::shutdown` writes.
const EVERY: Duration = Duration::from_secs(3600);

fn opts(dir: &Path) -> TableOptions<String, String> {
    TableOptions::set()
        .persist(PersistOptions::new(DirectoryBackend::new(dir), EVERY).sync_writes(true))
}

const PER_NODE: usize = 400;
/// Records each node writes in batches in the second phase: 100 002 acknowledged by the three.
const BULK: usize = 33_334;
const NAMES: [&str; 3] = ["a", "b", "c"];

/// The names of the files in `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn wal_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        })
        .count()
    })
}

/// Runs only as a child process of `sigkill_of_every_node_loses_no_acknowledged_write`.
/// `CETS_DURABLE_CHILD` = `name;dir;nodes-file;mode`. `first`: writes keys 0..PER_NODE of its
/// own once it sees the other two, says `written`, waits for `go` on its input, shuts down
/// (the final snapshot) and says `first-done`. `second`: checks they are back,
/// deletes keys 0..50, writes PER_NODE..2*PER_NODE from 64 concurrent callers and BULK more
/// records in batches of 1000, says `acked`
/// and waits to be killed. `verify`: says `verified <n>` once it holds the records of all three
/// nodes as they were acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of sigkill_of_every_node_loses_no_acknowledged_write"]
async fn durable_child() {
    let Ok(spec) = std::env::var("CETS_DURABLE_CHILD") else {
        return;
    };
    let parts: Vec<&str> = spec.split(';').collect();
    let (name, dir, nodes, mode) = (parts[0], parts[1], parts[2], parts[3]);
    let n = Node::builder(name)
        .listen(loopback())
        .cookie("durable")
        .config(cets::NodeConfig::fast_failover())
        .discovery(cets::discovery::FileDiscovery::new(nodes))
        .start()
        .await
        .unwrap();
    println!("addr {}", n.local_addr());
    let t: Kv = n.start("t", opts(Path::new(dir))).await.unwrap();
    let key = |i: usize| format!("{name}-{i}");
    let bulk = |i: usize| format!("{name}-bulk-{i}");
    let all_three = || {
        let t = t.clone();
        eventually(WAIT, "three members", move || {
            let t = t.clone();
            async move { t.nodes().len() == 2 }
        })
    };
    match mode {
        "first" => {
            all_three().await;
            let recs = (0..PER_NODE).map(|i| (key(i), "v1".to_string())).collect();
            t.insert_many(recs).await.unwrap();
            println!("written");
            // No node shuts down before every node's write is acknowledged (`spawn_children`).
            let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            assert_eq!(stdin.next_line().await.unwrap().as_deref(), Some("go"));
            n.shutdown().await.unwrap();
            println!("first-done");
        }
        "second" => {
            // Restored from the final snapshot before any join.
            for i in 0..PER_NODE {
                assert_eq!(t.get(&key(i)).as_deref(), Some("v1"), "{}", key(i));
            }
            all_three().await;
            t.delete_many((0..50).map(key).collect()).await.unwrap();
            let mut tasks = Vec::new();
            for c in 0..64 {
                let t = t.clone();
                let keys: Vec<String> = (PER_NODE + c..2 * PER_NODE).step_by(64).map(key).collect();
                tasks.push(tokio::spawn(async move {
                    for k in keys {
                        t.insert(k, "v2".to_string()).await.unwrap();
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            for batch in (0..BULK).collect::<Vec<_>>().chunks(1000) {
                let recs = batch.iter().map(|i| (bulk(*i), "v3".to_string())).collect();
                t.insert_many(recs).await.unwrap();
            }
            // Overwritten after the snapshot: the log's newer value wins.
            t.insert(key(60), "v2".to_string()).await.unwrap();
            println!("acked");
        }
        _ => {
            for i in 0..2 * PER_NODE {
                let want = match i {
                    0..50 => None,
                    60 => Some("v2"),
                    i if i < PER_NODE => Some("v1"),
                    _ => Some("v2"),
                };
                assert_eq!(t.get(&key(i)).as_deref(), want, "{} restored", key(i));
            }
            for i in 0..BULK {
                assert_eq!(
                    t.get(&bulk(i)).as_deref(),
                    Some("v3"),
                    "{} restored",
                    bulk(i)
                );
            }
            let want = 3 * (2 * PER_NODE - 50 + BULK);
            eventually(WAIT, "every node's records", || {
                let t = t.clone();
                async move { t.len() == want }
            })
            .await;
            let s = t.status().await.unwrap().persistence.unwrap();
            assert!(s.log_replayed > 0, "{s:?}");
            println!("verified {}", t.len());
        }
    }
    std::future::pending::<()>().await;
}

/// Starts the three children in `mode` and waits until each says `until`. In mode `first`,
/// they shut down only once all three have said `written`: a node that shut down as soon as
/// its own write was acknowledged could leave one that had not yet seen three members waiting
/// for a member that is gone.
async fn spawn_children(root: &Path, mode: &str, until: &str) -> Vec<tokio::process::Child> {
    let test = "durable_child";
    let mut children = child::spawn_cluster(root, &NAMES, test, "CETS_DURABLE_CHILD", mode).await;
    if mode == "first" {
        child::each_says(&mut children, "written").await;
        child::tell_each(&mut children, "go").await;
    }
    child::each_says(&mut children, until).await;
    children.into_iter().map(|(c, _)| c).collect()
}

async fn kill_all(children: Vec<tokio::process::Child>) {
    for mut c in children {
        c.start_kill().unwrap(); // SIGKILL
        c.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_every_node_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().unwrap();
    let first = spawn_children(root.path(), "first", "first-done").await;
    kill_all(first).await;
    for name in NAMES {
        // The final snapshot covers the whole log: it was removed.
        assert_eq!(wal_files(&root.path().join(name)), 0, "{name}");
    }
    let second = spawn_children(root.path(), "second", "acked").await;
    kill_all(second).await;
    for name in NAMES {
        assert!(wal_files(&root.path().join(name)) > 0, "{name}");
    }
    // `verified` is said only after each child checked its own keys and the union.
    let third = spawn_children(root.path(), "verify", "verified").await;
    kill_all(third).await;
}

/// The newest segment of a node's log.
fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    segs.sort();
    segs.pop().expect("a log segment")
}

/// Writes `k` (then deletes it), `k2` and `k3` on a node that then vanishes without a final
/// snapshot (neither shut down nor dropped: a drop stops the tables with one), as after a
/// crash: the log is all there is, one entry per write, in one segment.
async fn write_and_crash(dir: &Path) {
    let (n, _d) = node("n").await;
    let t: Kv = n.start("t", opts(dir)).await.unwrap();
    t.insert("k".into(), "v".into()).await.unwrap();
    t.delete(&"k".to_string()).await.unwrap();
    t.insert("k2".into(), "v".into()).await.unwrap();
    t.insert("k3".into(), "v".into()).await.unwrap();
    // Alone, the log task answers the callers; a write is visible once it returns.
    assert_eq!(t.get(&"k3".to_string()).as_deref(), Some("v"));
    let s = t.status().await.unwrap().persistence.unwrap();
    assert!(s.log_bytes > 8, "{s:?}");
    std::mem::forget(n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_replays_the_log_and_a_torn_last_entry_is_cut_with_a_warning() {
    let logs = capture::capture();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n");
    write_and_crash(&dir).await;
    // A crash in the middle of the append of `k3`: its entry lost its last 3 bytes.
    let seg = last_segment(&dir);
    let data = std::fs::read(&seg).unwrap();
    std::fs::write(&seg, &data[..data.len() - 3]).unwrap();
    for start in 0..2 {
        let (n, _d) = node("n").await;
        let t: Kv = n.start("t", opts(&dir)).await.unwrap();
        assert_eq!(t.get(&"k2".to_string()).as_deref(), Some("v"));
        assert_eq!(t.get(&"k".to_string()), None, "a deleted key stays deleted");
        assert_eq!(
            t.get(&"k3".to_string()),
            None,
            "the torn entry is not replayed"
        );
        let s = t.status().await.unwrap().persistence.unwrap();
        // The first start cuts the tail off the file; the second finds the log whole.
        let torn = if start == 0 { 1 } else { 0 };
        assert_eq!(
            (s.restored, s.log_replayed, s.log_torn_tails),
            (1, 3, torn),
            "{s:?}"
        );
        assert_eq!(s.last_error, None, "{s:?}");
        std::mem::forget(n);
    }
    let file = seg.display().to_string();
    assert!(
        logs.has(
            "the log ends in an incomplete entry (an append a crash interrupted, never \
             acknowledged): cut it off",
            &[("file", &file)]
        ),
        "no warning naming {file}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_inside_the_log_is_an_error_naming_the_segment_or_starts_empty_with_it_set_aside(
) {
    let _logs = capture::capture();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n");
    write_and_crash(&dir).await;
    // One byte of the first entry's body (after the magic and its 8-byte header): a complete
    // entry whose checksum fails, before valid ones, is damage, not a crash.
    let seg = last_segment(&dir);
    let mut data = std::fs::read(&seg).unwrap();
    data[8 + 8 + 1] ^= 0x20;
    std::fs::write(&seg, &data).unwrap();
    let (n, _d) = node("n").await;
    match n.start::<String, String>("t", opts(&dir)).await {
        Err(Error::Persistence { file, reason }) => {
            assert_eq!(file, seg.display().to_string());
            assert!(
                reason.contains("entry 0") && reason.contains("checksum"),
                "{reason}"
            );
        }
        other => panic!("expected a persistence error, got {:?}", other.map(|_| ())),
    }
    let o = TableOptions::set().persist(
        PersistOptions::new(DirectoryBackend::new(&dir), EVERY)
            .sync_writes(true)
            .on_restore_error(OnRestoreError::StartEmpty),
    );
    let t: Kv = n.start("t", o.clone()).await.unwrap();
    assert_eq!(t.len(), 0);
    let s = t.status().await.unwrap().persistence.unwrap();
    assert!(
        s.last_error.as_deref().is_some_and(|e| e.contains(".wal")),
        "{s:?}"
    );
    // The damaged segment is set aside, so a write acknowledged after starting empty survives
    // the next crash: that start does not find the same damage and start empty again.
    let aside = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".wal.damaged-")
        })
        .count();
    assert_eq!(aside, 1, "the damaged segment kept for inspection");
    t.insert("after".into(), "v".into()).await.unwrap();
    std::mem::forget(n);
    let (n, _d) = node("n").await;
    let t: Kv = n.start("t", o).await.unwrap();
    assert_eq!(t.get(&"after".to_string()).as_deref(), Some("v"));
    let s = t.status().await.unwrap().persistence.unwrap();
    assert_eq!((s.last_error, s.log_replayed), (None, 1));
    std::mem::forget(n);
}

/// The queue of entries waiting for the log's disk is bounded (64 MB): while the disk holds
/// one append, writes of 1 MB each queue until the bound, and the ones beyond fail at once
/// with an error saying so (applied all the same) instead of growing the queue; once the disk
/// moves, the queued ones are acknowledged and a crash loses none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_beyond_the_bound_of_the_log_queue_fail_at_once_and_the_queued_ones_survive() {
    // Every test of this binary installs the capture first (one global subscriber).
    let _logs = capture::capture();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n");
    let probe = ProbeBackend::new(DirectoryBackend::new(&dir));
    let o =
        TableOptions::set().persist(PersistOptions::new(probe.clone(), EVERY).sync_writes(true));
    let (n, _d) = node("n").await;
    let t: Kv = n.start("t", o).await.unwrap();
    probe.hold_appends(true);
    let t1 = t.clone();
    let first = tokio::spawn(async move { t1.insert("first".into(), "v".into()).await });
    let p = probe.clone();
    eventually(WAIT, "the first append held by the disk", || {
        let p = p.clone();
        async move { p.appends() == 1 }
    })
    .await;
    const BIG: usize = 80;
    let value = "x".repeat(1 << 20);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..BIG {
        let (t, v) = (t.clone(), value.clone());
        set.spawn(async move { (i, t.insert(format!("big{i}"), v).await) });
    }
    // With the disk still held, a write fails at once: the queue is full.
    let (i, r) = tokio::time::timeout(WAIT, set.join_next())
        .await
        .expect("a write beyond the bound answered while the disk holds the log")
        .unwrap()
        .unwrap();
    match r {
        Err(Error::Persistence { reason, .. }) => {
            assert!(reason.contains("queue is full"), "{reason}")
        }
        other => panic!("write {i}: expected the queue to be full, got {other:?}"),
    }
    let mut acked = Vec::new();
    let mut refused = 1;
    probe.hold_appends(false);
    first.await.unwrap().unwrap();
    while let Some(done) = set.join_next().await {
        match done.unwrap() {
            (i, Ok(())) => acked.push(i),
            (_, Err(Error::Persistence { reason, .. })) if reason.contains("queue is full") => {
                refused += 1
            }
            (i, other) => panic!("write {i}: {other:?}"),
        }
    }
    // The server batches concurrent writes: a batch is queued or refused whole.
    assert!(
        !acked.is_empty(),
        "{} acknowledged, {refused} refused",
        acked.len()
    );
    assert_eq!(acked.len() + refused, BIG);
    // Refused writes are applied all the same.
    assert_eq!(t.len(), BIG + 1);
    std::mem::forget(n);
    let (n, _d) = node("n").await;
    let t: Kv = n.start("t", opts(&dir)).await.unwrap();
    for i in acked {
        assert!(
            t.contains_key(&format!("big{i}")),
            "acknowledged write {i} lost"
        );
    }
    assert!(t.contains_key(&"first".to_string()));
    std::mem::forget(n);
}

/// Periodic snapshots compact: each one replaces the last (one `.snap` file) and removes the
/// log segments it covers, so five rounds of writes with snapshots between leave one snapshot
/// and at most the segment being written, not five; the final snapshot of a shutdown leaves
/// the snapshot alone (no log, no temporary file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_replace_the_last_one_and_remove_the_log_segments_they_cover() {
    // Every test of this binary installs the capture first (one global subscriber).
    let _logs = capture::capture();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n");
    let o = TableOptions::set().persist(
        PersistOptions::new(DirectoryBackend::new(&dir), Duration::from_millis(20))
            .sync_writes(true),
    );
    let (n, _d) = node("n").await;
    let t: Kv = n.start("t", o.clone()).await.unwrap();
    let status = |t: Kv| async move { t.status().await.unwrap().persistence.unwrap() };
    for round in 0..5 {
        let recs = (0..200)
            .map(|k| (format!("{round}-{k}"), "v".into()))
            .collect();
        t.insert_many(recs).await.unwrap();
        let base = status(t.clone()).await.snapshots;
        let t2 = t.clone();
        eventually(WAIT, "a snapshot started after the round's writes", || {
            let t = t2.clone();
            async move { status(t).await.snapshots >= base + 2 }
        })
        .await;
        // (A `.snap.tmp` may be the next snapshot, in progress.)
        let names = files(&dir);
        let snaps = names.iter().filter(|n| n.ends_with(".snap")).count();
        assert_eq!(snaps, 1, "round {round}: {names:?}");
        assert!(wal_files(&dir) <= 2, "round {round}: {names:?}");
        // The status shows the snapshot's size and age.
        let st = status(t.clone()).await;
        assert!(
            st.snapshot_bytes > 200 * round && st.snapshot_age.is_some(),
            "{st:?}"
        );
    }
    n.shutdown().await.unwrap();
    assert_eq!(files(&dir), ["t.snap"]);
    let (n, _d) = node("n").await;
    let t: Kv = n.start("t", o).await.unwrap();
    assert_eq!(t.len(), 1000);
    n.shutdown().await.unwrap();
}

/// A cluster-owned table with `sync_writes`: both nodes crash (no final snapshot, the logs
/// are all there is); each replays its own writes, a delete of the other node's record
/// included, and the join gives each the other's: every acknowledged write is back on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_owned_table_gets_every_acknowledged_write_back_after_every_node_crashed() {
    // Every test of this binary installs the capture first (one global subscriber).
    let _logs = capture::capture();
    let root = tempfile::tempdir().unwrap();
    let o = |name: &str| {
        TableOptions::set().cluster_owned().persist(
            PersistOptions::new(DirectoryBackend::new(root.path().join(name)), EVERY)
                .sync_writes(true),
        )
    };
    let nodes = cluster(&["a", "b"]).await;
    let ta: Kv = nodes[0].0.start("cfg", o("a")).await.unwrap();
    let tb: Kv = nodes[1].0.start("cfg", o("b")).await.unwrap();
    joined(&[&ta, &tb]).await;
    for (t, name) in [(&ta, "a"), (&tb, "b")] {
        let recs = (0..100)
            .map(|k| (format!("{name}-{k}"), "v".into()))
            .collect();
        t.insert_many(recs).await.unwrap();
    }
    ta.delete(&"b-0".to_string()).await.unwrap();
    tb.insert("a-1".into(), "by b".into()).await.unwrap();
    // A crash: neither shut down nor dropped (a drop writes a final snapshot).
    std::mem::forget((ta, tb, nodes));
    let nodes = cluster(&["a", "b"]).await;
    let ta: Kv = nodes[0].0.start("cfg", o("a")).await.unwrap();
    let tb: Kv = nodes[1].0.start("cfg", o("b")).await.unwrap();
    joined(&[&ta, &tb]).await;
    for t in [&ta, &tb] {
        let t2 = t.clone();
        eventually(WAIT, "both logs' writes on both nodes", || {
            let t = t2.clone();
            async move { t.len() == 199 && !t.contains_key(&"b-0".to_string()) }
        })
        .await;
        assert_eq!(t.get(&"a-1".to_string()).as_deref(), Some("by b"));
        assert_eq!(t.get(&"b-99".to_string()).as_deref(), Some("v"));
    }
    shutdown_all(nodes.iter().map(|(n, _)| n)).await;
}
