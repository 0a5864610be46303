//! The PostgreSQL backend (`cets::persistence::PostgresBackend`, cargo feature `postgres`)
//! against a real server: the URL comes from `CETS_TEST_POSTGRES_URL` (`.ci/postgres` starts
//! one). Without it every test prints `SKIPPED` and passes, unless `CETS_POSTGRES_REQUIRED=1`
//! (as `.ci/run` sets), when it fails. Each test uses tables of its own name, so tests (and
//! earlier runs) sharing the database do not see each other's rows. The test that stops the
//! database while nodes run starts a server of its own with `.ci/postgres` (PostgreSQL's
//! binaries must be installed where the test runs).

mod common;
#[path = "common/postgres_server.rs"]
mod postgres_server;

use std::path::Path;
use std::time::Duration;

use cets::persistence::{tokio_postgres, PersistOptions, Persistence, PostgresBackend};
use cets::{Error, Node, Table, TableOptions};
use common::*;
use postgres_server::{url, OwnServer};

type Kv = Table<String, String>;

/// A table name no other test or run uses.
fn fresh_table() -> String {
    format!("t_{:016x}", rand::random::<u64>())
}

fn backend(url: &str, node: &str) -> PostgresBackend {
    PostgresBackend::new(url, node).unwrap()
}

fn opts(b: PostgresBackend, every: Duration, cluster: bool) -> TableOptions<String, String> {
    let o = TableOptions::set().persist(PersistOptions::new(b, every));
    if cluster {
        o.cluster_owned()
    } else {
        o
    }
}

async fn status(t: &Kv) -> cets::persistence::PersistStatus {
    t.status().await.unwrap().persistence.unwrap()
}

/// Waits until a snapshot started after this call is written (two more than now: one may have
/// copied the table before the call).
async fn snapshot_taken(t: &Kv) {
    let base = status(t).await.snapshots;
    let t = t.clone();
    eventually(WAIT, "a snapshot of the table as it is now", || {
        let t = t.clone();
        async move { status(&t).await.snapshots >= base + 2 }
    })
    .await;
}

/// A plain connection to the server, for checking the rows themselves.
async fn sql(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

async fn rows(c: &tokio_postgres::Client, query: &str, node: &str, table: &str) -> i64 {
    c.query_one(query, &[&node, &table]).await.unwrap().get(0)
}

const LOG_ROWS: &str = "SELECT count(*) FROM cets_log WHERE node = $1 AND tab = $2";
const BLOCK_ROWS: &str = "SELECT count(*) FROM cets_snapshot_blocks WHERE node = $1 AND tab = $2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_logs_round_trip_per_node_and_table_and_a_save_replaces_the_last() {
    let Some(url) = url() else { return };
    let (t, other) = (fresh_table(), fresh_table());
    let (a, b) = (backend(&url, "a"), backend(&url, "b"));
    assert_eq!(a.load(&t).await.unwrap(), None, "nothing saved yet");
    let first = vec![b"one".to_vec(), vec![0u8; 100_000], Vec::new()];
    assert_eq!(a.save(&t, first.clone()).await.unwrap(), 100_003);
    assert_eq!(a.load(&t).await.unwrap(), Some(first));
    assert_eq!(b.load(&t).await.unwrap(), None, "rows are keyed by node");
    assert_eq!(a.load(&other).await.unwrap(), None, "and by table");
    // A save replaces the snapshot: one set of blocks per node and table, never more.
    a.save(&t, vec![b"two".to_vec()]).await.unwrap();
    b.save(&t, vec![b"b's".to_vec()]).await.unwrap();
    assert_eq!(a.load(&t).await.unwrap(), Some(vec![b"two".to_vec()]));
    assert_eq!(b.load(&t).await.unwrap(), Some(vec![b"b's".to_vec()]));
    let c = sql(&url).await;
    assert_eq!(rows(&c, BLOCK_ROWS, "a", &t).await, 1);
    // An empty snapshot is a snapshot (not "none").
    a.save(&t, Vec::new()).await.unwrap();
    assert_eq!(a.load(&t).await.unwrap(), Some(Vec::new()));

    // The log: appends in order, a cut, a drop of what the cut covers, and a new process
    // (another backend) that continues after what is there.
    assert!(a.log_load(&t).await.unwrap().is_empty());
    let e = |s: &str| s.as_bytes().to_vec();
    assert_eq!(a.log_append(&t, vec![e("1"), e("22")]).await.unwrap(), 3);
    let mark = a.log_cut(&t).await.unwrap();
    assert_eq!(a.log_append(&t, vec![e("333")]).await.unwrap(), 6);
    b.log_append(&t, vec![e("b")]).await.unwrap();
    assert_eq!(
        backend(&url, "a").log_load(&t).await.unwrap(),
        vec![e("1"), e("22"), e("333")]
    );
    assert_eq!(a.log_drop(&t, mark).await.unwrap(), 3);
    let again = backend(&url, "a");
    assert_eq!(again.log_load(&t).await.unwrap(), vec![e("333")]);
    again.log_append(&t, vec![e("4444")]).await.unwrap();
    assert_eq!(a.log_load(&t).await.unwrap(), vec![e("333"), e("4444")]);
    assert_eq!(b.log_load(&t).await.unwrap(), vec![e("b")]);

    // A damaged snapshot (a block gone) is an error that names the database, node and table.
    a.save(&t, vec![e("x"), e("y")]).await.unwrap();
    c.execute(
        "DELETE FROM cets_snapshot_blocks WHERE node = 'a' AND tab = $1 AND block = 1",
        &[&t],
    )
    .await
    .unwrap();
    let err = a.load(&t).await.unwrap_err().to_string();
    assert!(
        err.contains("has 1 of its 2 blocks") && err.contains(&t) && err.contains("\"a\""),
        "{err}"
    );
}

/// A failed append makes the backend read the log's last `seq` again. If a snapshot had
/// emptied the log, that reads 0: the entries appended next must still number after the mark
/// of a snapshot cut before, or that snapshot's drop deletes them (acknowledged writes that it
/// does not hold). The append is made to fail by a row planted at its `seq` (as a lost
/// connection leaves an append that did not commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_after_a_failed_one_on_an_emptied_log_survives_the_drop_of_an_earlier_cut() {
    let Some(url) = url() else { return };
    let t = fresh_table();
    let a = backend(&url, "a");
    let e = |s: &str| s.as_bytes().to_vec();
    a.log_append(&t, vec![e("1")]).await.unwrap();
    let first = a.log_cut(&t).await.unwrap();
    a.log_drop(&t, first).await.unwrap();
    // A snapshot starts: its copy of the table holds "1" and nothing after.
    let mark = a.log_cut(&t).await.unwrap();
    let c = sql(&url).await;
    let planted = "INSERT INTO cets_log (node, tab, seq, data) VALUES ('a', $1, $2, '')";
    let next = i64::try_from(mark).unwrap() + 1;
    c.execute(planted, &[&t, &next]).await.unwrap();
    assert!(a.log_append(&t, vec![e("lost")]).await.is_err());
    c.execute("DELETE FROM cets_log WHERE node = 'a' AND tab = $1", &[&t])
        .await
        .unwrap();
    a.log_append(&t, vec![e("2")]).await.unwrap();
    // The snapshot is saved: the log it covers goes, "2" stays.
    a.log_drop(&t, mark).await.unwrap();
    assert_eq!(a.log_load(&t).await.unwrap(), vec![e("2")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_alone_does_not_bring_back_keys_deleted_meanwhile() {
    let Some(url) = url() else { return };
    let t = fresh_table();
    const EVERY: Duration = Duration::from_millis(50);
    let nodes = common::cluster(&["a", "b"]).await;
    let a: Kv = nodes[0]
        .0
        .start(&t, opts(backend(&url, "a"), EVERY, true))
        .await
        .unwrap();
    let b: Kv = nodes[1]
        .0
        .start(&t, opts(backend(&url, "b"), EVERY, true))
        .await
        .unwrap();
    joined(&[&a, &b]).await;
    for k in ["deleted", "kept", "updated"] {
        a.insert(k.into(), "old".into()).await.unwrap();
    }
    snapshot_taken(&b).await;
    nodes[1].0.shutdown().await.unwrap();
    a.delete(&"deleted".into()).await.unwrap();
    a.insert("updated".into(), "new".into()).await.unwrap();

    let (b2, h) = node("b").await;
    let tb: Kv = b2
        .start(&t, opts(backend(&url, "b"), EVERY, true))
        .await
        .unwrap();
    assert_eq!(status(&tb).await.restored, 3);
    assert_eq!(
        tb.get(&"deleted".to_string()).as_deref(),
        Some("old"),
        "restored from b's snapshot in PostgreSQL, before the join"
    );
    h.set(vec![nodes[0].0.local_addr()]);
    joined(&[&a, &tb]).await;
    let tb2 = tb.clone();
    eventually(WAIT, "b converges to the live cluster", || {
        let t = tb2.clone();
        async move { t.len() == 2 && t.get(&"updated".to_string()).as_deref() == Some("new") }
    })
    .await;
    for t in [&a, &tb] {
        assert_eq!(t.get(&"deleted".to_string()), None, "the delete is newer");
        assert_eq!(t.get(&"kept".to_string()).as_deref(), Some("old"));
    }
    shutdown_all([&nodes[0].0, &b2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acknowledged_with_sync_writes_is_restored_from_the_log_without_a_snapshot() {
    let Some(url) = url() else { return };
    let t = fresh_table();
    let durable = |b| {
        TableOptions::set()
            .persist(PersistOptions::new(b, Duration::from_secs(3600)).sync_writes(true))
    };
    let (n1, _) = node("a").await;
    let t1: Kv = n1.start(&t, durable(backend(&url, "a"))).await.unwrap();
    let recs = (0..200)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    t1.insert_many(recs).await.unwrap();
    t1.delete(&"k0".into()).await.unwrap();
    t1.insert("k1".into(), "v2".into()).await.unwrap();
    assert!(status(&t1).await.log_bytes > 0);
    assert_eq!(status(&t1).await.snapshots, 0);
    let c = sql(&url).await;
    assert_eq!(rows(&c, LOG_ROWS, "a", &t).await, 3, "one row per batch");

    // As if `a` had crashed: another process of `a` (not connected to the first) starts the
    // table while the first never wrote a snapshot.
    let (n2, _) = node("a").await;
    let t2: Kv = n2.start(&t, durable(backend(&url, "a"))).await.unwrap();
    let st = status(&t2).await;
    assert_eq!((st.restored, st.log_replayed), (199, 3), "{st:?}");
    assert_eq!(t2.get(&"k0".to_string()), None, "the delete is replayed");
    assert_eq!(t2.get(&"k1".to_string()).as_deref(), Some("v2"));
    // A snapshot (here the final one of `shutdown`) removes the log rows it covers.
    n2.shutdown().await.unwrap();
    assert_eq!(rows(&c, LOG_ROWS, "a", &t).await, 0);
    assert_eq!(rows(&c, BLOCK_ROWS, "a", &t).await, 1);
    n1.shutdown().await.unwrap();
}

const PER_NODE: usize = 300;

/// Runs only as a child process of `every_node_sigkilled_restores_its_records_from_postgres`.
/// `CETS_PG_CHILD` = `name;dir;nodes-file;mode`; the table is named after `dir`'s parent
/// directory (one per run of the parent test). `write`: writes `PER_NODE` records of its own,
/// waits for a snapshot holding them, writes `PER_NODE` more and deletes 10 of the first, all
/// with `sync_writes`, and says `acked`. `verify`: waits until the restored and joined table
/// holds what all three acknowledged and says `restored <n>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of every_node_sigkilled_restores_its_records_from_postgres"]
async fn postgres_child() {
    let Ok(spec) = std::env::var("CETS_PG_CHILD") else {
        return;
    };
    let Some(url) = url() else { return };
    let parts: Vec<&str> = spec.split(';').collect();
    let (name, dir, nodes, mode) = (parts[0], parts[1], parts[2], parts[3]);
    let table = Path::new(dir)
        .parent()
        .and_then(|p| p.file_name())
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap();
    let n = Node::builder(name)
        .listen(loopback())
        .cookie("postgres")
        .config(cets::NodeConfig::fast_failover())
        .discovery(cets::discovery::FileDiscovery::new(nodes))
        .start()
        .await
        .unwrap();
    println!("addr {}", n.local_addr());
    let p = PersistOptions::new(backend(&url, name), Duration::from_millis(200)).sync_writes(true);
    let t: Kv = n
        .start(&table, TableOptions::set().persist(p))
        .await
        .unwrap();
    if mode == "write" {
        eventually(WAIT, "three members", || {
            let t = t.clone();
            async move { t.nodes().len() == 2 }
        })
        .await;
        let batch =
            |r: std::ops::Range<usize>| r.map(|i| (format!("{name}-{i}"), name.to_string()));
        t.insert_many(batch(0..PER_NODE).collect()).await.unwrap();
        snapshot_taken(&t).await;
        t.insert_many(batch(PER_NODE..2 * PER_NODE).collect())
            .await
            .unwrap();
        let gone = (0..10).map(|i| format!("{name}-{i}")).collect();
        t.delete_many(gone).await.unwrap();
        println!("acked");
    } else {
        eventually(WAIT, "every acknowledged record back", || {
            let t = t.clone();
            async move { t.len() == 3 * (2 * PER_NODE - 10) }
        })
        .await;
        for other in ["a", "b", "c"] {
            assert_eq!(
                t.get(&format!("{other}-5")),
                None,
                "deleted before the kill"
            );
            assert_eq!(t.get(&format!("{other}-10")).as_deref(), Some(other));
            assert_eq!(t.get(&format!("{other}-599")).as_deref(), Some(other));
        }
        println!("restored {}", status(&t).await.restored);
    }
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_sigkilled_restores_its_records_from_postgres() {
    let Some(_) = url() else { return };
    let root = tempfile::Builder::new().prefix("t_").tempdir().unwrap();
    let (test, env) = ("postgres_child", "CETS_PG_CHILD");
    let names = ["a", "b", "c"];
    let mut children = child::spawn_cluster(root.path(), &names, test, env, "write").await;
    child::each_says(&mut children, "acked").await;
    for (c, _) in &mut children {
        c.start_kill().unwrap(); // SIGKILL
        c.wait().await.unwrap();
    }
    let mut children = child::spawn_cluster(root.path(), &names, test, env, "verify").await;
    let said = child::each_says(&mut children, "restored").await;
    // A node-owned table: each node restores the records its own name owned, from its own
    // rows (snapshot and log), and gets the others' by the join.
    let expect = format!("restored {}", 2 * PER_NODE - 10);
    assert_eq!(said, vec![expect; 3]);
    for (c, _) in &mut children {
        c.start_kill().unwrap();
        c.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_is_in_the_status_writes_go_on_and_it_recovers() {
    if url().is_none() {
        return;
    }
    // Its own server: stopping the shared one would fail the other tests meanwhile.
    let Some(server) = OwnServer::start_or_skip().await else {
        return;
    };
    let url = server.url.clone();
    let (t, durable_t) = (fresh_table(), fresh_table());
    let a_backend = backend(&url, "a");

    let nodes = common::cluster(&["a", "b"]).await;
    let every = Duration::from_millis(50);
    let a: Kv = nodes[0]
        .0
        .start(&t, opts(a_backend.clone(), every, false))
        .await
        .unwrap();
    let sync = PersistOptions::new(a_backend.clone(), Duration::from_secs(3600)).sync_writes(true);
    let ad: Kv = nodes[0]
        .0
        .start(&durable_t, TableOptions::set().persist(sync))
        .await
        .unwrap();
    let b: Kv = nodes[1].0.start(&t, TableOptions::set()).await.unwrap();
    let bd: Kv = nodes[1]
        .0
        .start(&durable_t, TableOptions::set())
        .await
        .unwrap();
    joined(&[&a, &b]).await;
    joined(&[&ad, &bd]).await;
    a.insert("before".into(), "1".into()).await.unwrap();
    ad.insert("before".into(), "1".into()).await.unwrap();
    snapshot_taken(&a).await;

    server.ctl("pause").await; // pg_ctl stop -m fast
    let a2 = a.clone();
    eventually(WAIT, "the failed snapshot is in the status", || {
        let t = a2.clone();
        async move { status(&t).await.last_error.is_some() }
    })
    .await;
    let err = status(&a).await.last_error.unwrap();
    assert!(err.contains("postgres") && err.contains(&t), "{err}");
    // Writes, replication and reads go on.
    a.insert("during".into(), "2".into()).await.unwrap();
    b.insert("from-b".into(), "3".into()).await.unwrap();
    let a2 = a.clone();
    eventually(WAIT, "b's write reaches a", || {
        let t = a2.clone();
        async move { t.get(&"from-b".to_string()).is_some() }
    })
    .await;
    assert_eq!(b.get(&"during".to_string()).as_deref(), Some("2"));
    // With sync_writes the write says it is not durable, and is applied and replicated.
    match ad.insert("during".into(), "2".into()).await {
        Err(Error::PersistenceUnavailable { store, .. }) => {
            assert!(store.contains(&durable_t), "{store}")
        }
        other => panic!("expected the database unavailable, got {other:?}"),
    }
    assert_eq!(ad.get(&"during".to_string()).as_deref(), Some("2"));
    assert_eq!(bd.get(&"during".to_string()).as_deref(), Some("2"));

    server.ctl("resume").await;
    let a2 = a.clone();
    eventually(Duration::from_secs(30), "a snapshot succeeds again", || {
        let t = a2.clone();
        async move { status(&t).await.last_error.is_none() }
    })
    .await;
    snapshot_taken(&a).await;
    let ad2 = ad.clone();
    eventually(
        Duration::from_secs(30),
        "a durable write succeeds again",
        || {
            let t = ad2.clone();
            async move { t.insert("after".into(), "4".into()).await.is_ok() }
        },
    )
    .await;
    assert_eq!(status(&ad).await.last_error, None);

    // What the database holds now has the writes made while it was down.
    nodes[0].0.shutdown().await.unwrap();
    let (a3, _) = node("a").await;
    let back: Kv = a3
        .start(&t, opts(backend(&url, "a"), every, false))
        .await
        .unwrap();
    assert_eq!(back.get(&"during".to_string()).as_deref(), Some("2"));
    assert_eq!(back.get(&"before".to_string()).as_deref(), Some("1"));
    shutdown_all([&nodes[1].0, &a3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn op_timeout_set_on_a_clone_holds_for_the_backend_it_shares_connections_with() {
    if url().is_none() {
        return;
    }
    let Some(server) = OwnServer::start_or_skip().await else {
        return;
    };
    let b = backend(&server.url, "a");
    let _clone = b.clone().op_timeout(Duration::from_millis(300));
    let t = fresh_table();
    b.save(&t, vec![b"x".to_vec()]).await.unwrap(); // connected
    server.signal_all(libc::SIGSTOP);
    let frozen = b.load(&t).await;
    server.signal_all(libc::SIGCONT);
    match frozen {
        Err(Error::PersistenceUnavailable { reason, .. }) => {
            assert!(reason.contains("no answer within 300ms"), "{reason}")
        }
        other => panic!("expected no answer within the clone's op_timeout, got {other:?}"),
    }
    // Answering again, the next call reconnects.
    assert_eq!(b.load(&t).await.unwrap(), Some(vec![b"x".to_vec()]));
}
