//! The cost of metrics (`cargo bench --bench cluster -- metrics`): insert throughput with a
//! Prometheus recorder installed against none, in the same run.
//!
//! cets registers its metric handles when a table starts, with the recorder installed at that
//! moment: the cluster started before the recorder records nothing, the one started after it
//! records everything, and the phases alternate between the two. The recorder is global and
//! stays installed, so this section runs last.

use super::*;

/// Alternating runs of each side.
const METRICS_TRIES: u64 = 3;

pub(super) async fn metrics(s: &Settings) -> Res<Vec<Row>> {
    let plain = Cluster::start("metrics-off", 3, "metrics", speed_config()).await?;
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("installing the recorder: {e}"))?;
    let metered = Cluster::start("metrics-on", 3, "metrics", speed_config()).await?;
    let (mut on, mut off) = ((0.0f64, Duration::ZERO, 0.0), (0.0f64, Duration::ZERO, 0.0));
    let mut bulk = (0.0f64, 0.0f64);
    for i in 0..METRICS_TRIES {
        let base = (1 << 40) + (i << 36);
        for (side, c) in [(&mut off, &plain), (&mut on, &metered)] {
            let meter = CostMeter::start();
            let (r, _) = insert_throughput(&c.tables, 256, s.phase, base).await?;
            side.0 = side.0.max(r);
            side.1 += meter.stop().cpu;
            side.2 += r * s.phase.as_secs_f64();
        }
        // Upkeep, as an exporter does on its own schedule (it drains the histograms).
        handle.run_upkeep();
        // Batches: insert_many of 1000 records, 8 callers.
        let keys = (i << 32)..(i << 32) + 200_000;
        for (best, c) in [(&mut bulk.1, &plain), (&mut bulk.0, &metered)] {
            let t0 = Instant::now();
            bulk_fill(&c.tables, keys.clone()).await?;
            *best = best.max(200_000.0 / t0.elapsed().as_secs_f64());
        }
        handle.run_upkeep();
    }
    let text = handle.render();
    let series = text
        .lines()
        .filter(|l| l.starts_with("cets_") && l.contains("metrics-on"))
        .count();
    let leaked = text.lines().any(|l| l.contains("metrics-off"));
    plain.shutdown().await;
    metered.shutdown().await;
    if series == 0 || leaked {
        return Err(format!(
            "the recorder saw {series} series of the metered cluster (and the plain one: {leaked})"
        )
        .into());
    }
    let cpu = |side: &(f64, Duration, f64)| side.1.as_secs_f64() * 1e6 / side.2.max(1.0);
    let r = on.0 / off.0;
    let rb = bulk.0 / bulk.1;
    Ok(vec![
        Row::new("acked insert throughput with a metrics recorder, 256 callers over 3 nodes")
            .value(rate(on.0))
            .baseline(format!("{} (no recorder)", rate(off.0)))
            .ratio(ratio(r))
            .target("≥ 0.95×", r >= 0.95)
            .notes(format!(
                "best of {METRICS_TRIES} runs each, alternating; metrics_exporter_prometheus's recorder (no HTTP listener), upkeep after each pair of runs; CPU per insert (all 3 nodes, all runs) {:.2} µs with, {:.2} µs without; {series} cets_ lines rendered",
                cpu(&on),
                cpu(&off)
            )),
        Row::new("insert_many ×1000 with a metrics recorder, 8 callers, 3 nodes")
            .value(rate(bulk.0))
            .baseline(format!("{} (no recorder)", rate(bulk.1)))
            .ratio(ratio(rb))
            .target("≥ 0.95×", rb >= 0.95)
            .notes(format!(
                "best of {METRICS_TRIES} runs of 200 000 records each, alternating"
            )),
    ])
}

/// `keys` in `insert_many` batches of 1000, 8 callers over the cluster's tables.
async fn bulk_fill(tables: &[Tab], keys: std::ops::Range<u64>) -> Res<()> {
    let callers = 8u64;
    let per = (keys.end - keys.start) / callers;
    let mut tasks = Vec::new();
    for i in 0..callers {
        let t = tables[i as usize % tables.len()].clone();
        let start = keys.start + i * per;
        tasks.push(tokio::spawn(async move {
            fill(&t, start..start + per, 1000).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}
