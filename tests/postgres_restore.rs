//! Starting a persisted table on PostgreSQL when the restore cannot use what is stored.
//! While the server is down the start waits for the database (`PersistOptions::restore_wait`)
//! and restores what it holds, and past the wait it fails with
//! `Error::PersistenceUnavailable`: it never takes an unreachable database for a damaged one
//! (with `OnRestoreError::StartEmpty` that would start the table empty and let its next
//! snapshot replace the one stored); that test runs a server of its own (`.ci/postgres`), which
//! it stops and starts again. A snapshot that is damaged, with `StartEmpty`, is set aside, so
//! the writes acknowledged after starting empty are what the next start restores. Skipped as
//! tests/postgres.rs is.

#[path = "common/capture.rs"]
mod capture;
mod common;
#[path = "common/postgres_server.rs"]
mod postgres_server;

use std::time::Duration;

use cets::persistence::{tokio_postgres, OnRestoreError, PersistOptions, PostgresBackend};
use cets::{Error, Table, TableOptions};
use common::*;
use postgres_server::{url, OwnServer};

type Kv = Table<String, String>;

const WAITING: &str = "persistence unavailable at start; waiting for it";

fn opts(url: &str, wait: Duration) -> TableOptions<String, String> {
    let backend = PostgresBackend::new(url, "a").unwrap();
    TableOptions::set().persist(
        PersistOptions::new(backend, Duration::from_millis(50))
            .on_restore_error(OnRestoreError::StartEmpty)
            .restore_wait(wait),
    )
}

/// Durable writes and no snapshot but the first: what a start restores is in the log.
fn durable(url: &str, every: Duration) -> TableOptions<String, String> {
    let backend = PostgresBackend::new(url, "a").unwrap();
    TableOptions::set().persist(
        PersistOptions::new(backend, every)
            .sync_writes(true)
            .on_restore_error(OnRestoreError::StartEmpty),
    )
}

async fn snapshots(t: &Kv) -> u64 {
    t.status().await.unwrap().persistence.unwrap().snapshots
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_while_the_database_is_down_waits_for_it_and_never_starts_empty() {
    let logs = capture::capture();
    if url().is_none() {
        return;
    }
    let Some(server) = OwnServer::start_or_skip().await else {
        return;
    };
    let t = format!("t_{:016x}", rand::random::<u64>());

    let (a, _) = node("a").await;
    let first: Kv = a
        .start(&t, opts(&server.url, Duration::ZERO))
        .await
        .unwrap();
    first.insert("kept".into(), "1".into()).await.unwrap();
    let f = first.clone();
    eventually(WAIT, "a snapshot holds the record", || {
        let f = f.clone();
        async move {
            let p = f.status().await.unwrap().persistence.unwrap();
            p.snapshots >= 2 && p.last_error.is_none()
        }
    })
    .await;
    a.shutdown().await.unwrap();
    server.ctl("pause").await; // pg_ctl stop -m fast

    // Past the wait the start fails, naming the database and the table.
    let (a, _) = node("a").await;
    match a
        .start::<String, String>(&t, opts(&server.url, Duration::from_millis(300)))
        .await
    {
        Err(Error::PersistenceUnavailable { store, .. }) => {
            assert!(store.contains("postgres") && store.contains(&t), "{store}")
        }
        Err(other) => panic!("expected the database unavailable, got {other}"),
        Ok(_) => panic!("the table started while its database was down"),
    }

    // Within the wait the start waits, and restores once the database is back.
    let before = logs.count(WAITING, &[]);
    let starting = {
        let (a, t, url) = (a.clone(), t.clone(), server.url.clone());
        tokio::spawn(async move {
            a.start::<String, String>(&t, opts(&url, Duration::from_secs(60)))
                .await
        })
    };
    eventually(WAIT, "the start found the database down and waits", || {
        let n = logs.count(WAITING, &[]);
        async move { n > before }
    })
    .await;
    server.ctl("resume").await;
    let back = starting.await.unwrap().unwrap();
    assert_eq!(back.get(&"kept".to_string()).as_deref(), Some("1"));
    let p = back.status().await.unwrap().persistence.unwrap();
    assert_eq!(p.last_error, None, "a restore that waited is no error");
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_set_aside_so_writes_acknowledged_after_starting_empty_are_restored()
{
    let _logs = capture::capture();
    let Some(url) = url() else {
        return;
    };
    let t = format!("t_{:016x}", rand::random::<u64>());
    let (a, _) = node("a").await;
    let first: Kv = a
        .start(&t, durable(&url, Duration::from_millis(50)))
        .await
        .unwrap();
    first.insert("old".into(), "1".into()).await.unwrap();
    let f = first.clone();
    eventually(WAIT, "a snapshot is written", || {
        let f = f.clone();
        async move { snapshots(&f).await >= 2 }
    })
    .await;
    a.shutdown().await.unwrap();

    // Damage the stored snapshot: its first block no longer decodes.
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let damaged = db
        .execute(
            "UPDATE cets_snapshot_blocks SET data = '\\xdeadbeef'::bytea \
             WHERE node = 'a' AND tab = $1 AND block = 0",
            &[&t],
        )
        .await
        .unwrap();
    assert_eq!(damaged, 1);

    // Starts empty (the snapshot does not decode); a durable write is acknowledged. The node
    // is left running, as a crashed one would be (a shutdown writes a final snapshot, which
    // would replace the damaged one), and snapshots once an hour.
    let (crashed, _) = node("a").await;
    let second: Kv = crashed
        .start(&t, durable(&url, Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(second.get(&"old".to_string()), None, "started empty");
    let p = second.status().await.unwrap().persistence.unwrap();
    assert!(p.last_error.is_some(), "the damage is in the status");
    second.insert("new".into(), "2".into()).await.unwrap();

    // The next start (another process's, in effect) restores the write acknowledged after
    // starting empty.
    let (a, _) = node("a").await;
    let third: Kv = a
        .start(&t, durable(&url, Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(third.get(&"new".to_string()).as_deref(), Some("2"));
    let p = third.status().await.unwrap().persistence.unwrap();
    assert_eq!(p.last_error, None, "nothing damaged is read again");
    // The damaged rows are kept for inspection under another name.
    let aside: i64 = db
        .query_one(
            "SELECT count(*) FROM cets_snapshot_blocks WHERE node = 'a' AND tab LIKE $1",
            &[&format!("{t}.damaged-%")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(aside >= 1, "the damaged snapshot kept");
    a.shutdown().await.unwrap();
    crashed.shutdown().await.unwrap();
}
