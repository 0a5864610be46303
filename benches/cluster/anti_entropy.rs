//! Anti-entropy rows: its cost at rest with 1 M records (bytes/s and CPU), and insert
//! throughput with it on against off in the same run (`cargo bench --bench cluster -- ae`).

use super::*;

/// The nodes of the speed figures, with anti-entropy at its default interval or off.
fn config(on: bool) -> NodeConfig {
    let mut c = speed_config();
    if !on {
        c.anti_entropy_interval = None;
    }
    c
}

/// Anti-entropy bytes sent so far by every node of the cluster's table.
async fn ae_bytes(c: &Cluster) -> Res<u64> {
    let mut total = 0;
    for t in &c.tables {
        let s = t.status().await?;
        total += s.anti_entropy.map_or(0, |a| a.bytes_sent);
    }
    Ok(total)
}

/// Whether every node's digest matched every member's at the last comparison.
async fn in_sync(c: &Cluster) -> Res<bool> {
    for t in &c.tables {
        let s = t.status().await?;
        if !s.anti_entropy.is_some_and(|a| a.in_sync) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fills the cluster's first table with records `keys`; records/s and CPU µs per record.
async fn timed_fill(c: &Cluster, keys: std::ops::Range<u64>) -> Res<(f64, f64)> {
    let n = (keys.end - keys.start) as f64;
    let meter = CostMeter::start();
    fill(&c.tables[0], keys, 10_000).await?;
    let cost = meter.stop();
    Ok((
        n / cost.wall.as_secs_f64(),
        cost.cpu.as_secs_f64() * 1e6 / n,
    ))
}

/// Runs of each side, alternating, in the throughput figures of this section.
const AE_TRIES: u64 = 3;

/// CPU (cores busy) and anti-entropy bytes/s of the whole process over `dur` of rest.
async fn at_rest(c: &Cluster, dur: Duration) -> Res<(f64, f64)> {
    let bytes0 = ae_bytes(c).await?;
    let meter = CostMeter::start();
    tokio::time::sleep(dur).await;
    let cost = meter.stop();
    let bytes = ae_bytes(c).await? - bytes0;
    let wall = cost.wall.as_secs_f64();
    Ok((cost.cpu.as_secs_f64() / wall, bytes as f64 / wall))
}

pub(super) async fn anti_entropy(s: &Settings) -> Res<Vec<Row>> {
    let records = s.records;
    let rest = if s.full { secs(20.0) } else { secs(10.0) };
    let on = Cluster::start("ae-on", 3, "ae", config(true)).await?;
    let off = Cluster::start("ae-off", 3, "ae", config(false)).await?;
    // Acked inserts, 256 callers over 3 nodes, runs alternating between the two clusters.
    let (mut t_on, mut t_off) = ((0.0, String::new()), (0.0, String::new()));
    for i in 0..AE_TRIES {
        let r = insert_throughput(&on.tables, 256, s.phase, (1 << 40) + (i << 36)).await?;
        if r.0 > t_on.0 {
            t_on = r;
        }
        let r = insert_throughput(&off.tables, 256, s.phase, (1 << 40) + (i << 36)).await?;
        if r.0 > t_off.0 {
            t_off = r;
        }
    }
    // Bulk: insert_many of the whole table, batches of 10 000, in halves, alternating.
    let half = records / 2;
    let mut fill_on = (0.0f64, 0.0f64);
    let mut fill_off = (0.0f64, 0.0f64);
    for part in 0..2 {
        let keys = part * half..(part + 1) * half;
        let r = timed_fill(&off, keys.clone()).await?;
        fill_off = (fill_off.0.max(r.0), fill_off.1 + r.1 / 2.0);
        let r = timed_fill(&on, keys).await?;
        fill_on = (fill_on.0.max(r.0), fill_on.1 + r.1 / 2.0);
    }
    let off_len = off.tables[0].len();
    off.shutdown().await;
    // At rest with the records: digests at the default interval, and what they cost.
    let converged = wait_until_async(Duration::from_secs(60), || in_sync(&on)).await?;
    let (cpu_on, bytes_on) = at_rest(&on, rest).await?;
    let len = on.tables[0].len();
    on.shutdown().await;
    // The same rest with anti-entropy off, for the baseline.
    let off2 = Cluster::start("ae-rest", 3, "ae", config(false)).await?;
    fill(&off2.tables[0], 0..records, 10_000).await?;
    tokio::time::sleep(secs(2.0)).await;
    let (cpu_off, _) = at_rest(&off2, rest).await?;
    off2.shutdown().await;
    let interval = NodeConfig::default()
        .anti_entropy_interval
        .unwrap_or_default()
        .as_secs_f64();
    Ok(vec![
        Row::new("anti-entropy at rest: bytes/s, 3 nodes, over 1 M records")
            .value(format!("{bytes_on:.0} B/s"))
            .notes(format!(
                "all 3 nodes together, digest rounds every {interval:.0} s (the default), {:.1} s of rest; {len} records (off: {off_len}); digests matched {:.1} s after the fill; independent of the number of records",
                rest.as_secs_f64(),
                converged.as_secs_f64()
            )),
        Row::new("anti-entropy at rest: CPU, 3 nodes, over 1 M records")
            .value(format!("{cpu_on:.3} cores"))
            .baseline(format!("{cpu_off:.3} cores (anti-entropy off)"))
            .notes("the whole process (3 nodes), idle; keep-alives, ticks and timers in both"),
        Row::new("acked insert throughput with anti-entropy, 256 callers over 3 nodes")
            .value(rate(t_on.0))
            .baseline(format!("{} (anti-entropy off)", rate(t_off.0)))
            .ratio(ratio(t_on.0 / t_off.0))
            .target("≥ 0.95×", t_on.0 / t_off.0 >= 0.95)
            .notes(format!(
                "best of {AE_TRIES} runs each, alternating; on: {}; off: {}",
                t_on.1, t_off.1
            )),
        Row::new("insert_many with anti-entropy, 1 M records in batches of 10 000")
            .value(rate(fill_on.0))
            .baseline(format!("{} (anti-entropy off)", rate(fill_off.0)))
            .ratio(ratio(fill_on.0 / fill_off.0))
            .target("≥ 0.95×", fill_on.0 / fill_off.0 >= 0.95)
            .notes(format!(
                "the better of two halves each, alternating; CPU per record (all 3 nodes) {:.2} µs on, {:.2} µs off ({}); the digest hashes each record's key and value on each node",
                fill_on.1,
                fill_off.1,
                ratio(fill_on.1 / fill_off.1)
            )),
    ])
}

/// Polls an async condition every 10 ms; how long it took.
async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> Res<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Res<bool>>,
{
    let t0 = Instant::now();
    loop {
        if cond().await? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(format!("digests did not match within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
