//! A join of two large tables (`cargo bench --bench cluster -- bigjoin`): 10 M + 10 M records
//! by default, `CETS_BENCH_JOIN_RECORDS=n` for n + n; `CETS_BENCH_JOIN_AE=0` turns anti-entropy
//! off on both nodes (a second baseline: the join without its digest upkeep). It needs several GB of memory, so it runs
//! only when named, or in a run of every section with `--full`.
//!
//! Two nodes in this process fill their tables (distinct keys, `u64` and a 16-byte value) and
//! are then connected; the figure is the time from `Node::connect` until both hold the union
//! as members of each other. The notes give the process's peak resident memory, which is what
//! the size of a run is bounded by.

use super::*;

/// Records on each side: `CETS_BENCH_JOIN_RECORDS`, or 10 M.
fn records() -> u64 {
    std::env::var("CETS_BENCH_JOIN_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000)
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(super) async fn big_join(_s: &Settings) -> Res<Vec<Row>> {
    let n = records();
    // The baseline, first (its records are freed before the nodes fill): the same records
    // encoded, sent over one QUIC stream in 10k-record frames and decoded, as in `join`.
    let raw = {
        let recs: Arc<Vec<Rec>> = Arc::new((0..2 * n).map(|k| (k, val(k))).collect());
        raw::stream(raw::Source::Records(recs, 10_000), 1, true)
            .await?
            .0
    };
    let ae = std::env::var("CETS_BENCH_JOIN_AE").map_or(true, |v| v != "0");
    let config = || {
        let mut c = speed_config();
        if !ae {
            c.anti_entropy_interval = None;
        }
        c
    };
    let a = start_node("bigjoin-a", Vec::new(), config()).await?;
    let b = start_node("bigjoin-b", Vec::new(), config()).await?;
    let ta: Tab = a.start("bigjoin", TableOptions::set()).await?;
    let tb: Tab = b.start("bigjoin", TableOptions::set()).await?;
    let filled = Instant::now();
    fill(&ta, 0..n, 100_000).await?;
    fill(&tb, n..2 * n, 100_000).await?;
    let fill_time = filled.elapsed();
    let before = rss_bytes().unwrap_or(0);
    let t0 = Instant::now();
    a.connect(b.local_addr());
    let (ta2, tb2) = (ta.clone(), tb.clone());
    wait_until(
        Duration::from_secs(300),
        "both nodes to hold the union as members of each other",
        move || {
            let whole = 2 * n as usize;
            ta2.len() == whole
                && tb2.len() == whole
                && ta2.nodes().len() == 1
                && tb2.nodes().len() == 1
        },
    )
    .await?;
    let took = t0.elapsed();
    let after = rss_bytes().unwrap_or(0);
    let peak = peak_rss().unwrap_or(0);
    drop((ta, tb));
    let _ = a.shutdown().await;
    let _ = b.shutdown().await;
    let label = if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else {
        format!("{n}")
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut row = Row::new(format!("join, {label} + {label} distinct records, 2 nodes"))
        .value(format!("{:.2} s", took.as_secs_f64()))
        .baseline(format!("{:.2} s raw encode+send+decode", raw.as_secs_f64()))
        .ratio(ratio(took.as_secs_f64() / raw.as_secs_f64()))
        .notes(format!(
            "one run{}, from node.connect() until both hold {} records as members of each other; default max_link_queue_bytes (256 MiB: the dumps stream through it); filled in {:.1} s beforehand; resident memory {:.1} GiB before the join, {:.1} GiB after, peak {:.1} GiB (this process: both nodes)",
            if ae { "" } else { ", anti-entropy off" },
            2 * n,
            fill_time.as_secs_f64(),
            gib(before),
            gib(after),
            gib(peak)
        ));
    if n == 10_000_000 {
        row = row.target("≤ 5 s", took <= Duration::from_secs(5));
    } else {
        row.target = "(10M + 10M ≤ 5 s)".into();
    }
    Ok(vec![row])
}
