//! Acknowledged insert latency (`latency` section).

use super::*;

pub(crate) async fn insert_latency(
    t: &Tab,
    warm: usize,
    n: usize,
    base: u64,
) -> Res<Vec<Duration>> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..(warm + n) as u64 {
        let k = base + i;
        let t0 = Instant::now();
        t.insert(k, val(k)).await?;
        if i as usize >= warm {
            samples.push(t0.elapsed());
        }
    }
    Ok(samples)
}

pub(crate) async fn latency(s: &Settings) -> Res<Vec<Row>> {
    let c = Cluster::start("lat", 3, "lat", speed_config()).await?;
    let n = s.latency_samples;
    let mut ping = Vec::new();
    let mut ins = Vec::new();
    let (mut ping_cost, mut ins_cost) = (Cost::default(), Cost::default());
    for round in 0..3u64 {
        let m = CostMeter::start();
        ping.extend(raw::ping(500, n).await?);
        ping_cost.add(m.stop());
        let m = CostMeter::start();
        ins.extend(insert_latency(&c.tables[0], 500, n, round << 32).await?);
        ins_cost.add(m.stop());
    }
    let ops = (3 * (n + 500)) as f64;
    let (ping_cost, ins_cost) = (ping_cost.per(ops, "ping"), ins_cost.per(ops, "insert"));
    c.shutdown().await;
    ping.sort();
    ins.sort();
    let (p50, p99) = (pct(&ins, 0.5), pct(&ins, 0.99));
    let (q50, q99) = (pct(&ping, 0.5), pct(&ping, 0.99));
    let r50 = p50.as_secs_f64() / q50.as_secs_f64();
    Ok(vec![
        Row::new("acked insert latency p50, 1 caller, 3 nodes")
            .value(us(p50))
            .baseline(format!("{} raw QUIC ping p50", us(q50)))
            .ratio(ratio(r50))
            .target("≤ 1.5× ping", r50 <= 1.5)
            .notes(format!(
                "{} samples each, 3 alternating rounds; ping = 32 B echo on one long-lived bi stream between two raw quinn endpoints in this process; {ins_cost}; ping {ping_cost}; CETS: 52 µs",
                3 * n
            )),
        Row::new("acked insert latency p99, 1 caller, 3 nodes")
            .value(us(p99))
            .baseline(format!("{} raw QUIC ping p99", us(q99)))
            .ratio(ratio(p99.as_secs_f64() / q99.as_secs_f64()))
            .notes("CETS: 112 µs"),
    ])
}
