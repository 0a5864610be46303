//! Acknowledged insert throughput (`throughput` section).

use super::*;

/// `callers` tasks insert one record per call for `dur`, caller `i` on `tables[i % len]`.
/// Returns acked inserts per second and what they cost.
pub(crate) async fn insert_throughput(
    tables: &[Tab],
    callers: usize,
    dur: Duration,
    base: u64,
) -> Res<(f64, String)> {
    let done = Arc::new(AtomicU64::new(0));
    let meter = CostMeter::start();
    let t0 = Instant::now();
    let stop_at = t0 + dur;
    let mut tasks = Vec::new();
    for i in 0..callers {
        let t = tables[i % tables.len()].clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let mut j = 0u64;
            while Instant::now() < stop_at {
                // Keys: a 1 M key space per caller, overwritten once exhausted.
                let k = base + ((i as u64) << 20) + (j % (1 << 20));
                t.insert(k, val(k)).await?;
                j += 1;
            }
            done.fetch_add(j, Ordering::Relaxed);
            Res::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let ops = done.load(Ordering::Relaxed) as f64;
    let cost = meter.stop();
    Ok((ops / t0.elapsed().as_secs_f64(), cost.per(ops, "insert")))
}

/// The best of [`TRIES`] runs of [`insert_throughput`].
pub(crate) async fn best_throughput(
    tables: &[Tab],
    callers: usize,
    dur: Duration,
    base: u64,
) -> Res<(f64, String)> {
    let mut best = (0.0, String::new());
    for i in 0..TRIES as u64 {
        let r = insert_throughput(tables, callers, dur, base + (i << 36)).await?;
        if r.0 > best.0 {
            best = r;
        }
    }
    Ok(best)
}

pub(crate) async fn throughput(s: &Settings) -> Res<Vec<Row>> {
    let c = Cluster::start("tput", 3, "tput", speed_config()).await?;
    let one_node = std::slice::from_ref(&c.tables[0]);
    let base = |phase: u64| phase << 40;
    let (r1, u1) = best_throughput(one_node, 1, s.phase, base(1)).await?;
    let (r16, u16) = best_throughput(one_node, 16, s.phase, base(2)).await?;
    let (r256, u256) = best_throughput(one_node, 256, s.phase, base(3)).await?;
    let (spread, uspread) = best_throughput(&c.tables, 256, s.phase, base(4)).await?;
    c.shutdown().await;
    // The same 256 callers on a table without peers: the local path alone.
    let solo_node = start_node("tput-solo", Vec::new(), speed_config()).await?;
    let solo_table: Tab = solo_node.start("tput", TableOptions::set()).await?;
    let (solo, usolo) =
        best_throughput(std::slice::from_ref(&solo_table), 256, s.phase, base(5)).await?;
    drop(solo_table);
    let _ = solo_node.shutdown().await;
    let b = format!("{} (1 caller)", rate(r1));
    Ok(vec![
        Row::new("acked insert throughput, 1 caller, 3 nodes")
            .value(rate(r1))
            .baseline(b.clone())
            .ratio(ratio(1.0))
            .notes(format!(
                "best of {TRIES} runs of {:.1} s each (every throughput row); {u1}; CETS: 16.7 k/s",
                s.phase.as_secs_f64()
            )),
        Row::new("acked insert throughput, 16 callers on one node")
            .value(rate(r16))
            .baseline(b.clone())
            .ratio(ratio(r16 / r1))
            .notes(u16),
        Row::new("acked insert throughput, 256 callers on one node")
            .value(rate(r256))
            .baseline(b.clone())
            .ratio(ratio(r256 / r1))
            .target("≥ 20× and ≥ 300 k/s", r256 / r1 >= 20.0 && r256 >= 300e3)
            .notes(format!("group commit; {u256}")),
        Row::new("acked insert throughput, 256 callers spread over 3 nodes")
            .value(rate(spread))
            .baseline(b.clone())
            .ratio(ratio(spread / r1))
            .target(
                "≥ 20× and ≥ 300 k/s",
                spread / r1 >= 20.0 && spread >= 300e3,
            )
            .notes(format!(
                "{uspread}; CETS: 35 k/s with 192 callers over 3 nodes"
            )),
        Row::new("insert throughput, 256 callers, one node without peers")
            .value(rate(solo))
            .baseline(b)
            .ratio(ratio(solo / r1))
            .notes(format!(
                "for reference: the local path alone (handle → table server → store, no replication); {usolo}"
            )),
    ])
}
