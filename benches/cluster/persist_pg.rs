//! Bench rows of the PostgreSQL backend (`persist_pg` section; cargo feature `postgres`, and
//! `CETS_TEST_POSTGRES_URL` naming a server, e.g. one `.ci/postgres start DIR` started):
//! a snapshot of 1 M records and its restore at start, each beside the directory backend's,
//! and acknowledged inserts/s with `sync_writes` (one commit per group-commit batch) with 256
//! callers beside the non-durable insert. Its rows are removed from the database at the end.

use cets::persistence::{tokio_postgres, DirectoryBackend, PersistOptions, PostgresBackend};

use super::persist::{insert_rate, TmpDir};
use super::*;

async fn snapshots(t: &Tab) -> Res<u64> {
    Ok(t.status().await?.persistence.map_or(0, |p| p.snapshots))
}

/// The median of three back-to-back snapshots of `t` (started with a 10 ms interval).
async fn snapshot_time(t: &Tab) -> Res<Duration> {
    let first = snapshots(t).await?;
    let (mut last, mut t0) = (first, Instant::now());
    let mut durations = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while durations.len() < 3 {
        if Instant::now() > deadline {
            return Err("three snapshots did not finish in 300 s".into());
        }
        let now = snapshots(t).await?;
        if now > last {
            if last > first {
                durations.push(t0.elapsed());
            }
            last = now;
            t0 = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    durations.sort();
    Ok(durations[1])
}

/// Fills a table persisted by `p` with `n` records, times its snapshot, shuts the node down
/// (final snapshot) and times the restore of a new node of the same name.
async fn snapshot_and_restore(
    name: &str,
    table: &str,
    p: impl Fn(Duration) -> PersistOptions,
    n: u64,
) -> Res<(Duration, u64, Duration, u64)> {
    let node = start_node(name, Vec::new(), speed_config()).await?;
    let t: Tab = node
        .start(
            table,
            TableOptions::set().persist(p(Duration::from_millis(10))),
        )
        .await?;
    fill(&t, 0..n, 10_000).await?;
    let snap = snapshot_time(&t).await?;
    let bytes = t
        .status()
        .await?
        .persistence
        .map_or(0, |s| s.snapshot_bytes);
    node.shutdown().await?;
    drop(t);
    let node = start_node(name, Vec::new(), speed_config()).await?;
    let t0 = Instant::now();
    let back: Tab = node
        .start(
            table,
            TableOptions::set().persist(p(Duration::from_secs(3600))),
        )
        .await?;
    let restore = t0.elapsed();
    let got = back.len() as u64;
    node.shutdown().await?;
    Ok((snap, bytes, restore, got))
}

pub(super) async fn persist_pg(s: &Settings) -> Res<Vec<Row>> {
    let url = std::env::var("CETS_TEST_POSTGRES_URL").map_err(|_| {
        "set CETS_TEST_POSTGRES_URL to a PostgreSQL server (.ci/postgres start DIR)"
    })?;
    let n = s.records;
    let dir = TmpDir::new("persist-pg")?;
    let table = format!("bench_{}", std::process::id());
    let mut rows = Vec::new();

    let node_name = "persist-pg-0";
    let pg = PostgresBackend::new(&url, node_name)?;
    let (pg_snap, pg_bytes, pg_restore, pg_got) = snapshot_and_restore(
        node_name,
        &table,
        |every| PersistOptions::new(pg.clone(), every),
        n,
    )
    .await?;
    let d = dir.0.join("snap");
    let (dir_snap, _, dir_restore, _) = snapshot_and_restore(
        node_name,
        &table,
        |every| PersistOptions::new(DirectoryBackend::new(&d), every),
        n,
    )
    .await?;
    rows.push(
        Row::new("snapshot of 1 M records to PostgreSQL (PostgresBackend), 1 node")
            .value(ms(pg_snap))
            .baseline(format!("{} to a directory", ms(dir_snap)))
            .ratio(ratio(pg_snap.as_secs_f64() / dir_snap.as_secs_f64()))
            .notes(format!(
                "median of 3 back to back; {:.1} MB in one transaction (old blocks deleted, one INSERT per block of 10 000 records); the server on this machine",
                pg_bytes as f64 / 1e6
            )),
    );
    rows.push(
        Row::new("restore of 1 M records from PostgreSQL at start (Node::start of the table)")
            .value(ms(pg_restore))
            .baseline(format!("{} from a directory", ms(dir_restore)))
            .ratio(ratio(pg_restore.as_secs_f64() / dir_restore.as_secs_f64()))
            .notes(format!(
                "one read-only transaction for the blocks, then decode; {pg_got} records back"
            )),
    );

    // Durability: 256 callers on one node, against the same node's plain table.
    let node = start_node("persist-pg-1", Vec::new(), speed_config()).await?;
    let plain: Tab = node.start("plain", TableOptions::set()).await?;
    let durable: Tab = node
        .start(
            &table,
            TableOptions::set().persist(
                PersistOptions::new(
                    PostgresBackend::new(&url, "persist-pg-1")?,
                    Duration::from_secs(30),
                )
                .sync_writes(true),
            ),
        )
        .await?;
    let (pr, plat) = insert_rate(&plain, 256, s.phase, 1 << 41).await?;
    let (dr, dlat) = insert_rate(&durable, 256, s.phase, 1 << 41).await?;
    node.shutdown().await?;
    rows.push(
        Row::new("acked inserts/s with sync_writes to PostgreSQL, 256 callers, 1 node")
            .value(rate(dr))
            .baseline(format!("{} without persistence", rate(pr)))
            .ratio(ratio(dr / pr))
            .notes(format!(
                "one INSERT (one commit) per group-commit batch; p50 {} against {}, p99 {} against {}",
                us(pct(&dlat, 0.5)),
                us(pct(&plat, 0.5)),
                us(pct(&dlat, 0.99)),
                us(pct(&plat, 0.99)),
            )),
    );

    // The bench's rows go.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    for t in ["cets_snapshots", "cets_snapshot_blocks", "cets_log"] {
        client
            .execute(&format!("DELETE FROM {t} WHERE tab = $1"), &[&table])
            .await?;
    }
    Ok(rows)
}
