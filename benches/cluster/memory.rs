//! Memory (`memory` section), measured in a child process that counts its allocations.

use super::*;

pub(crate) fn child_memory(n: u64) -> Res<()> {
    // The std HashMap of the same records first, freed before the table is measured.
    let before = live_bytes();
    let map: HashMap<u64, Val> = (0..n).map(|k| (k, val(k))).collect();
    let map_bytes = live_bytes() - before;
    drop(black_box(map));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (table_bytes, table_rss) = rt.block_on(async {
        let node = start_node("mem", Vec::new(), speed_config()).await?;
        let t: Tab = node.start("mem", TableOptions::set()).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = live_bytes();
        let rss_before = rss_bytes().unwrap_or(0);
        fill(&t, 0..n, 10_000).await?;
        if t.len() as u64 != n {
            return Err(format!("table holds {} records, not {n}", t.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = live_bytes();
        let rss_after = rss_bytes().unwrap_or(0);
        let _keep = (node, t);
        Res::Ok((after - before, rss_after.saturating_sub(rss_before)))
    })?;
    println!("MEM {table_bytes} {table_rss} {map_bytes}");
    Ok(())
}

/// Runs the memory child for `n` records: (table, RSS growth, std HashMap) bytes per record.
pub(crate) fn memory_child(n: u64) -> Res<(f64, f64, f64)> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .env("CETS_BENCH_CHILD", "memory")
        .env("CETS_BENCH_RECORDS", n.to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MEM "))
        .ok_or_else(|| {
            format!(
                "memory child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse::<f64>())
        .collect::<Result<_, _>>()?;
    let n = n as f64;
    match f.as_slice() {
        [table, rss, map] => Ok((table / n, rss / n, map / n)),
        _ => Err(format!("memory child printed {line:?}").into()),
    }
}

pub(crate) fn memory(s: &Settings) -> Res<Vec<Row>> {
    let (per, rss, map) = memory_child(s.records)?;
    // Hash tables double their slots, so bytes per record depend on where the count falls;
    // the same figure at other sizes shows how much.
    let mut sizes = Vec::new();
    for tenths in [6u64, 8, 12, 15, 20] {
        let n = s.records * tenths / 10;
        let (t, _, m) = memory_child(n)?;
        sizes.push((n, t, m));
    }
    sizes.push((s.records, per, map));
    sizes.sort_by_key(|x| x.0);
    let span = |f: fn(&(u64, f64, f64)) -> f64| {
        let v: Vec<f64> = sizes.iter().map(f).collect();
        let min = v.iter().copied().fold(f64::MAX, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        (min, max)
    };
    let (tmin, tmax) = span(|x| x.1);
    let (mmin, mmax) = span(|x| x.2);
    let each: Vec<String> = sizes
        .iter()
        .map(|(n, t, _)| format!("{:.1}M: {t:.0} B", *n as f64 / 1e6))
        .collect();
    Ok(vec![
        Row::new(format!(
            "memory, {}M records (u64 key, 16-byte value), set, one node",
            s.records / 1_000_000
        ))
        .value(format!("{per:.1} B/record"))
        .baseline("24 B payload")
        .ratio(ratio(per / 24.0))
        .target("≤ 80 B/record", per <= 80.0)
        .notes(format!(
            "live heap bytes (counting allocator) after insert_many; RSS growth {rss:.1} B/record; \
             std HashMap of the same records {map:.1} B/record; CETS (ETS) 96 B"
        )),
        Row::new(format!(
            "memory across sizes, {:.1}M to {:.1}M records",
            sizes[0].0 as f64 / 1e6,
            sizes[sizes.len() - 1].0 as f64 / 1e6
        ))
        .value(format!("{tmin:.0} to {tmax:.0} B/record"))
        .baseline(format!("std HashMap {mmin:.0} to {mmax:.0} B/record"))
        .ratio(ratio((tmax / tmin) / (mmax / mmin)))
        .notes(format!(
            "for reference: the ratio compares the spreads (largest / smallest figure) of cets and of the std HashMap; \
             shards of staggered sizes keep cets flat where one table doubles at once; {}",
            each.join(", ")
        )),
    ])
}
