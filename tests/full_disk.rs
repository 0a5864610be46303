//! A full disk under persistence: a small tmpfs (needs root, as CI runs; skipped with a message
//! where mounting is not permitted). Writes, reads and replication go on, the status reports
//! the error, a durable write fails naming the log, what is on disk stays whole, and all
//! recovers once space frees. And a log backend that keeps failing: retried with back-off, not
//! once per write.

#[path = "common/capture.rs"]
mod capture;
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cets::persistence::{DirectoryBackend, PersistOptions};
use cets::testing::ProbeBackend;
use cets::{Error, Table, TableOptions};
use common::*;

type Kv = Table<String, String>;

/// A tmpfs of `size` mounted on a fresh directory (inside the temporary directory it keeps
/// alive), unmounted on drop.
struct Tmpfs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir, base))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .args(["-l"])
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `dir` with a ballast file until it is full.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("ballast");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![1u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

async fn persist_status(t: &Kv) -> cets::persistence::PersistStatus {
    t.status().await.unwrap().persistence.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_writes_and_replication_go_on_and_it_recovers() {
    let _logs = capture::capture();
    let Some(fs) = Tmpfs::mount("1m") else {
        println!("SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run");
        return;
    };
    let dir = fs.0.join("data");
    let nodes = cluster(&["a", "b"]).await;
    let backend = DirectoryBackend::new(&dir);
    let snap = TableOptions::set().persist(PersistOptions::new(
        backend.clone(),
        Duration::from_millis(50),
    ));
    let sync = TableOptions::set()
        .persist(PersistOptions::new(backend, Duration::from_millis(50)).sync_writes(true));
    let a: Kv = nodes[0].0.start("snap", snap).await.unwrap();
    let b: Kv = nodes[1].0.start("snap", TableOptions::set()).await.unwrap();
    let a_sync: Kv = nodes[0].0.start("sync", sync).await.unwrap();
    let b_sync: Kv = nodes[1].0.start("sync", TableOptions::set()).await.unwrap();
    joined(&[&a, &b]).await;
    joined(&[&a_sync, &b_sync]).await;
    a_sync.insert("before".into(), "v".into()).await.unwrap();
    a.insert_many((0..10).map(|i| (format!("s{i}"), "v".into())).collect())
        .await
        .unwrap();
    let base = persist_status(&a).await.snapshots;
    let ta = a.clone();
    eventually(
        WAIT,
        "a snapshot with the records written before the fill",
        || {
            let t = ta.clone();
            async move { persist_status(&t).await.snapshots >= base + 2 }
        },
    )
    .await;

    let ballast = fill(&fs.0);
    // Snapshots of this table need more than is left (the records are 64 KiB).
    let big = "x".repeat(64 * 1024);
    for i in 0..4 {
        a.insert(format!("k{i}"), big.clone()).await.unwrap();
    }
    assert_eq!(b.get(&"k3".to_string()).as_deref(), Some(big.as_str()));
    let ta = a.clone();
    eventually(WAIT, "the snapshot's error in the status", || {
        let t = ta.clone();
        async move {
            persist_status(&t)
                .await
                .last_error
                .is_some_and(|e| e.contains("No space") || e.contains("space"))
        }
    })
    .await;
    // A durable write fails naming the log, and is replicated all the same.
    match a_sync.insert("during".into(), big.clone()).await {
        Err(Error::Persistence { file, reason }) => {
            assert!(file.ends_with(".wal"), "{file}: {reason}");
        }
        other => panic!("expected a persistence error, got {other:?}"),
    }
    assert_eq!(
        b_sync.get(&"during".to_string()).as_deref(),
        Some(big.as_str())
    );
    assert!(persist_status(&a_sync).await.last_error.is_some());
    // Reads and replication went on meanwhile.
    b.insert("from-b".into(), "v".into()).await.unwrap();
    assert_eq!(a.get(&"from-b".to_string()).as_deref(), Some("v"));
    // Nothing else is lost: the directory as the full disk left it (copied elsewhere, the
    // snapshot and the log segments, not a snapshot in progress) restores every record written
    // before the fill and the acknowledged durable write, not the failed one.
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "snap" || x == "wal") {
            std::fs::copy(&path, copy.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let (n, _d) = node("a").await;
    let from = || {
        PersistOptions::new(
            DirectoryBackend::new(copy.path()),
            Duration::from_secs(3600),
        )
    };
    let snap_back: Kv = n
        .start("snap", TableOptions::set().persist(from()))
        .await
        .unwrap();
    let sync_back: Kv = n
        .start(
            "sync",
            TableOptions::set().persist(from().sync_writes(true)),
        )
        .await
        .unwrap();
    assert!((0..10).all(|i| snap_back.contains_key(&format!("s{i}"))));
    assert_eq!(sync_back.get(&"before".to_string()).as_deref(), Some("v"));
    assert!(!sync_back.contains_key(&"during".to_string()));
    std::mem::forget(n);

    std::fs::remove_file(&ballast).unwrap();
    let ta = a.clone();
    eventually(WAIT, "a snapshot after space freed", || {
        let t = ta.clone();
        async move {
            let s = persist_status(&t).await;
            s.last_error.is_none() && s.snapshot_bytes > 4 * 64 * 1024
        }
    })
    .await;
    // The log's appends resume once their back-off (at most 5 s) has run out.
    let ts = a_sync.clone();
    eventually(WAIT, "a durable write accepted after space freed", || {
        let t = ts.clone();
        async move { t.insert("after".into(), "v".into()).await.is_ok() }
    })
    .await;
    let ts = a_sync.clone();
    eventually(
        WAIT,
        "the durable table's error cleared (a log append and a snapshot went through)",
        || {
            let t = ts.clone();
            async move { persist_status(&t).await.last_error.is_none() }
        },
    )
    .await;
    drop(fs);
}

/// The error of a full disk, as a log append of `table` would return it.
fn no_space(table: &str) -> Error {
    Error::Persistence {
        file: format!("{table}.wal"),
        reason: "No space left on device (injected)".into(),
    }
}

/// The most appends a log whose back-off starts at 100 ms and doubles up to 5 s can try in
/// `elapsed`: the first, and one more each time a back-off has run out.
fn most_tries(elapsed: Duration) -> u64 {
    let (mut tries, mut at, mut backoff) = (1, Duration::ZERO, Duration::from_millis(100));
    loop {
        at += backoff;
        if at > elapsed {
            return tries;
        }
        tries += 1;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_log_is_retried_with_back_off_while_writes_and_replication_go_on() {
    let logs = capture::capture();
    let dir = tempfile::tempdir().unwrap();
    let backend = ProbeBackend::new(DirectoryBackend::new(dir.path()));
    let nodes = cluster(&["a", "b"]).await;
    let sync = TableOptions::set()
        .persist(PersistOptions::new(backend.clone(), Duration::from_secs(3600)).sync_writes(true));
    let a: Kv = nodes[0].0.start("flaky", sync).await.unwrap();
    let b: Kv = nodes[1]
        .0
        .start("flaky", TableOptions::set())
        .await
        .unwrap();
    joined(&[&a, &b]).await;
    a.insert("before".into(), "v".into()).await.unwrap();

    backend.fail_appends(Some(no_space));
    let tries_before = backend.appends();
    let t0 = std::time::Instant::now();
    const WRITES: usize = 200;
    for i in 0..WRITES {
        match a.insert(format!("k{i}"), "v".into()).await {
            Err(Error::Persistence { file, reason }) => {
                assert!(
                    file.ends_with(".wal") && reason.contains("No space"),
                    "{file}: {reason}"
                )
            }
            other => panic!("write {i}: expected a persistence error, got {other:?}"),
        }
    }
    let elapsed = t0.elapsed();
    let tries = backend.appends() - tries_before;
    // Each write failed, but the disk was tried only when a back-off had run out.
    assert!(
        tries <= most_tries(elapsed),
        "{tries} appends tried for {WRITES} writes in {elapsed:?}"
    );
    // One warning for the failure, not one per write (the error stayed the same).
    let warned = logs.count("log append failed", &[("error", "persistence: flaky.wal*")]);
    assert_eq!(warned, 1, "warnings of the failing log");
    // Replication and reads went on: every failed write is applied and on the peer.
    assert_eq!(a.get(&"k199".to_string()).as_deref(), Some("v"));
    let tb = b.clone();
    eventually(WAIT, "the failed writes replicated", || {
        let t = tb.clone();
        async move { t.get(&"k199".to_string()).is_some() }
    })
    .await;
    let s = a.status().await.unwrap().persistence.unwrap();
    assert!(
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("No space")),
        "{s:?}"
    );

    // The disk frees: a write goes through once the back-off runs out, and the error clears.
    backend.fail_appends(None);
    let ta = a.clone();
    eventually(
        WAIT,
        "a durable write accepted after the disk freed",
        || {
            let t = ta.clone();
            async move { t.insert("after".into(), "v".into()).await.is_ok() }
        },
    )
    .await;
    let s = a.status().await.unwrap().persistence.unwrap();
    assert_eq!(s.last_error, None, "{s:?}");
    assert!(logs.has("log appends work again", &[]));
}
