//! Bench rows of persistence (`persist` section): a snapshot of 1 M records and insert p99
//! during it against without, the restore of 1 M records at start, and durability on fsync
//! (`PersistOptions::sync_writes`) with 256 callers beside the non-durable insert and the
//! disk's raw fsync rate. Files go to a directory under the system's temporary directory.

use cets::persistence::{DirectoryBackend, PersistOptions};
use cets::testing::ProbeBackend;

use super::*;

/// A temporary directory of this run, removed on drop.
pub(super) struct TmpDir(pub(super) std::path::PathBuf);

impl TmpDir {
    pub(super) fn new(tag: &str) -> Res<Self> {
        let p = std::env::temp_dir().join(format!(
            "cets-bench-{tag}-{}-{}",
            std::process::id(),
            splitmix(cpu_time().as_nanos() as u64)
        ));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn persisted(dir: &std::path::Path, every: Duration, sync: bool) -> TableOptions<u64, Val> {
    TableOptions::set()
        .persist(PersistOptions::new(DirectoryBackend::new(dir), every).sync_writes(sync))
}

async fn snapshots(t: &Tab) -> Res<u64> {
    Ok(t.status().await?.persistence.map_or(0, |p| p.snapshots))
}

/// Writes of 16 bytes, each followed by an fsync of its file, for `dur`: the disk's own rate.
fn raw_fsync_rate(dir: &std::path::Path, dur: Duration) -> Res<f64> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join("raw-fsync"))?;
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < dur {
        f.write_all(&[7u8; 16])?;
        f.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// `callers` tasks insert fresh keys one call at a time for `dur`; calls/s and latencies.
pub(super) async fn insert_rate(
    t: &Tab,
    callers: usize,
    dur: Duration,
    base: u64,
) -> Res<(f64, Vec<Duration>)> {
    let t0 = Instant::now();
    let stop_at = t0 + dur;
    let mut tasks = Vec::new();
    for i in 0..callers {
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut j = 0u64;
            while Instant::now() < stop_at {
                let k = base + ((i as u64) << 24) + j;
                let c0 = Instant::now();
                t.insert(k, val(k)).await?;
                lat.push(c0.elapsed());
                j += 1;
            }
            Res::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let r = all.len() as f64 / t0.elapsed().as_secs_f64();
    all.sort();
    Ok((r, all))
}

pub(super) async fn persist(s: &Settings) -> Res<Vec<Row>> {
    let n = s.records;
    let dir = TmpDir::new("persist")?;
    let mut rows = Vec::new();

    // Snapshot: one node, 1 M records, snapshots back to back (every 10 ms, the minimum).
    let node = start_node("persist-0", Vec::new(), speed_config()).await?;
    let plain: Tab = node.start("plain", TableOptions::set()).await?;
    let snap_dir = dir.0.join("snap");
    let snapped: Tab = node
        .start(
            "snapped",
            persisted(&snap_dir, Duration::from_millis(10), false),
        )
        .await?;
    fill(&plain, 0..n, 10_000).await?;
    fill(&snapped, 0..n, 10_000).await?;
    // The duration of one snapshot: from one finished snapshot to the next (back to back).
    let first = snapshots(&snapped).await?;
    let mut t0 = Instant::now();
    let mut durations = Vec::new();
    let mut last = first;
    let deadline = Instant::now() + Duration::from_secs(120);
    while durations.len() < 3 {
        if Instant::now() > deadline {
            return Err("three snapshots of 1 M records did not finish in 120 s".into());
        }
        let now = snapshots(&snapped).await?;
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
    let snap = durations[1];
    let bytes = snapped
        .status()
        .await?
        .persistence
        .map_or(0, |p| p.snapshot_bytes);
    let samples = s.latency_samples;
    let without = insert_latency(&plain, 200, samples, 1 << 40).await?;
    let during = insert_latency(&snapped, 200, samples, 1 << 40).await?;
    let (mut without, mut during) = (without, during);
    without.sort();
    during.sort();
    let (w99, d99) = (pct(&without, 0.99), pct(&during, 0.99));
    let r = d99.as_secs_f64() / w99.as_secs_f64();
    rows.push(
        Row::new("insert p99 during snapshots of 1 M records, 1 node")
            .value(us(d99))
            .baseline(format!("{} without persistence", us(w99)))
            .ratio(ratio(r))
            .target("≤ 2×", r <= 2.0)
            .notes(format!(
                "one snapshot (copy in the table server, encode and write + fsync in a task) takes {} (median of 3 back to back) for {:.1} MB; snapshots run back to back during the {} sequential inserts; p50 {} against {}",
                ms(snap),
                bytes as f64 / 1e6,
                samples,
                us(pct(&during, 0.5)),
                us(pct(&without, 0.5))
            )),
    );
    drop(snapped);
    // Shutdown writes the final snapshot of both; the restore reads it.
    node.shutdown().await?;
    drop(plain);
    let node = start_node("persist-0", Vec::new(), speed_config()).await?;
    let t0 = Instant::now();
    let restored: Tab = node
        .start(
            "snapped",
            persisted(&snap_dir, Duration::from_secs(3600), false),
        )
        .await?;
    let took = t0.elapsed();
    let got = restored.len() as u64;
    rows.push(
        Row::new("restore of 1 M records at start (Node::start of the table)")
            .value(ms(took))
            .target("≤ 1 s", took <= Duration::from_secs(1) && got >= n)
            .notes(format!(
                "read, checksum and decode of the snapshot, then the records into the store; {got} records back"
            )),
    );
    node.shutdown().await?;
    drop(restored);

    // Durability on fsync: 256 callers on one node, against the same node's plain table.
    let node = start_node("persist-1", Vec::new(), speed_config()).await?;
    let plain: Tab = node.start("plain", TableOptions::set()).await?;
    // Counts the log appends (one fsync each).
    let counted = ProbeBackend::new(DirectoryBackend::new(dir.0.join("wal")));
    let appends = counted.clone();
    let durable: Tab = node
        .start(
            "durable",
            TableOptions::set()
                .persist(PersistOptions::new(counted, Duration::from_secs(30)).sync_writes(true)),
        )
        .await?;
    let raw = raw_fsync_rate(&dir.0, Duration::from_secs(1))?;
    let (pr, plat) = insert_rate(&plain, 256, s.phase, 1 << 41).await?;
    let a0 = appends.appends();
    let t0 = Instant::now();
    let (dr, dlat) = insert_rate(&durable, 256, s.phase, 1 << 41).await?;
    let fsyncs = (appends.appends() - a0) as f64 / t0.elapsed().as_secs_f64();
    let log = durable
        .status()
        .await?
        .persistence
        .map_or(0, |p| p.log_bytes);
    node.shutdown().await?;
    rows.push(
        Row::new("acked inserts/s with sync_writes (fsync before the reply), 256 callers, 1 node")
            .value(rate(dr))
            .baseline(format!("{} without persistence", rate(pr)))
            .ratio(ratio(dr / pr))
            .target("≥ 100 k/s", dr >= 100_000.0)
            .notes(format!(
                "group commit: {:.0} log fsyncs/s, {:.0} writes per fsync, against the disk's raw {:.0} fsyncs/s (16-byte write + fdatasync, one caller, measured just before); p50 {} against {}, p99 {} against {}; log {:.1} MB after the run",
                fsyncs,
                dr / fsyncs.max(1.0),
                raw,
                us(pct(&dlat, 0.5)),
                us(pct(&plat, 0.5)),
                us(pct(&dlat, 0.99)),
                us(pct(&plat, 0.99)),
                log as f64 / 1e6
            )),
    );

    // The same with three nodes: the 256 callers on one node, each write acknowledged by the
    // other two and in the writer's log (each node logs its own writes only).
    let plain = Cluster::start("persist-3p", 3, "plain", speed_config()).await?;
    let (pr3, plat3) = insert_rate(&plain.tables[0], 256, s.phase, 1 << 41).await?;
    plain.shutdown().await;
    let probes: Vec<ProbeBackend<DirectoryBackend>> = (0..3)
        .map(|i| ProbeBackend::new(DirectoryBackend::new(dir.0.join(format!("wal3-{i}")))))
        .collect();
    let durable = Cluster::start_with("persist-3d", 3, "durable", speed_config(), |i| {
        TableOptions::set().persist(
            PersistOptions::new(probes[i].clone(), Duration::from_secs(30)).sync_writes(true),
        )
    })
    .await?;
    let a0 = probes[0].appends();
    let t0 = Instant::now();
    let (dr3, dlat3) = insert_rate(&durable.tables[0], 256, s.phase, 1 << 41).await?;
    let fsyncs3 = (probes[0].appends() - a0) as f64 / t0.elapsed().as_secs_f64();
    durable.shutdown().await;
    rows.push(
        Row::new("acked inserts/s with sync_writes (fsync before the reply), 256 callers, 3 nodes")
            .value(rate(dr3))
            .baseline(format!("{} without persistence", rate(pr3)))
            .ratio(ratio(dr3 / pr3))
            .notes(format!(
                "callers on one node; its log: {:.0} fsyncs/s, {:.0} writes per fsync (raw {:.0} fsyncs/s, as above); p50 {} against {}, p99 {} against {}",
                fsyncs3,
                dr3 / fsyncs3.max(1.0),
                raw,
                us(pct(&dlat3, 0.5)),
                us(pct(&plat3, 0.5)),
                us(pct(&dlat3, 0.99)),
                us(pct(&plat3, 0.99)),
            )),
    );
    Ok(rows)
}
