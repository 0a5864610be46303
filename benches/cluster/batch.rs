//! `insert_many` and `delete_many` (`batch` section), beside the raw QUIC baseline.

use super::*;

/// `callers` tasks `insert_many` batches (from the shared counter) for `dur`. Returns records/s
/// and the batches written.
pub(crate) async fn insert_many_phase(
    t: &Tab,
    callers: usize,
    dur: Duration,
    next: &Arc<AtomicU64>,
) -> Res<(f64, Vec<u64>, String)> {
    let done = Arc::new(Mutex::new(Vec::new()));
    let meter = CostMeter::start();
    let t0 = Instant::now();
    let stop_at = t0 + dur;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (t, next, done) = (t.clone(), next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while Instant::now() < stop_at {
                let b = next.fetch_add(1, Ordering::Relaxed);
                t.insert_many(batch(b)).await?;
                mine.push(b);
            }
            done.lock().map_err(|_| "poisoned")?.extend(mine);
            Res::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = t0.elapsed();
    let cost = meter.stop();
    let batches = std::mem::take(&mut *done.lock().map_err(|_| "poisoned")?);
    let records = batches.len() as f64 * BATCH as f64;
    Ok((
        records / elapsed.as_secs_f64(),
        batches,
        cost.per(records, "record"),
    ))
}

/// `callers` tasks `delete_many` the given batches (at most for `cap`). Returns records/s and
/// what they cost.
pub(crate) async fn delete_many_phase(
    t: &Tab,
    callers: usize,
    cap: Duration,
    batches: Vec<u64>,
) -> Res<(f64, String)> {
    let batches = Arc::new(batches);
    let meter = CostMeter::start();
    let idx = Arc::new(AtomicUsize::new(0));
    let deleted = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let stop_at = t0 + cap;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (t, batches, idx, deleted) = (t.clone(), batches.clone(), idx.clone(), deleted.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let i = idx.fetch_add(1, Ordering::Relaxed);
                let Some(&b) = batches.get(i) else { break };
                t.delete_many(batch_keys(b)).await?;
                deleted.fetch_add(BATCH, Ordering::Relaxed);
            }
            Res::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let records = deleted.load(Ordering::Relaxed) as f64;
    let cost = meter.stop();
    Ok((
        records / t0.elapsed().as_secs_f64(),
        cost.per(records, "record"),
    ))
}

pub(crate) async fn batches(s: &Settings) -> Res<Vec<Row>> {
    // The raw baseline first: the same records, postcard-encoded in frames of 1000 before the
    // clock starts, streamed over one uni stream (to one peer, and to two as cets does).
    let frames: Arc<Vec<Bytes>> = Arc::new(
        (0..s.raw_records / BATCH)
            .map(|b| frame(&batch(b)))
            .collect::<Res<_>>()?,
    );
    let recs = s.raw_records as f64;
    let (mut d1, mut d2, mut bytes) = (Duration::MAX, Duration::MAX, 0);
    // The CPU the raw stream to two peers takes per record (sender and receivers).
    let mut raw2_cpu = f64::MAX;
    for _ in 0..TRIES {
        let (d, b) = raw::stream(raw::Source::Frames(frames.clone()), 1, false).await?;
        (d1, bytes) = (d1.min(d), b);
        let meter = CostMeter::start();
        let (d, _) = raw::stream(raw::Source::Frames(frames.clone()), 2, false).await?;
        d2 = d2.min(d);
        raw2_cpu = raw2_cpu.min(meter.stop().cpu.as_secs_f64() / recs);
    }
    let raw1 = recs / d1.as_secs_f64();
    let raw2 = recs / d2.as_secs_f64();
    let mib = bytes as f64 / d1.as_secs_f64() / (1024.0 * 1024.0);

    let c = Cluster::start("batch", 3, "batch", speed_config()).await?;
    let t = &c.tables[0];
    let next = Arc::new(AtomicU64::new(1 << 20));
    let mut rows = Vec::new();
    let mut ins = Vec::new();
    for callers in [1usize, 8] {
        let mut best_ins = (0.0, String::new());
        let mut best_del = (0.0, String::new());
        for _ in 0..TRIES {
            let (r, done, rc) = insert_many_phase(t, callers, s.phase, &next).await?;
            for other in &c.tables[1..] {
                other.sync().await?;
            }
            let (d, dc) = delete_many_phase(t, callers, s.phase * 2, done).await?;
            for other in &c.tables[1..] {
                other.sync().await?;
            }
            if r > best_ins.0 {
                best_ins = (r, rc);
            }
            if d > best_del.0 {
                best_del = (d, dc);
            }
        }
        ins.push((callers, best_ins.0, best_ins.1, best_del.0, best_del.1));
    }
    c.shutdown().await;
    // The same insert_many on a table without peers: the local apply alone.
    let solo_node = start_node("batch-solo", Vec::new(), speed_config()).await?;
    let solo_table: Tab = solo_node.start("batch", TableOptions::set()).await?;
    let mut solo = (0.0, String::new());
    for _ in 0..TRIES {
        let (r, _, cost) = insert_many_phase(&solo_table, 1, s.phase, &next).await?;
        if r > solo.0 {
            solo = (r, cost);
        }
    }
    let (solo, solo_cost) = solo;
    drop(solo_table);
    let _ = solo_node.shutdown().await;
    // The least CPU a map insert of these records takes: a hashbrown map with foldhash, sized
    // for all of them and with its pages touched before the clock starts (no growth, no page
    // faults), one thread, the records built beforehand.
    let mut insert_cpu = f64::MAX;
    for _ in 0..TRIES {
        let batches: Vec<Vec<Rec>> = (0..s.raw_records / BATCH)
            .map(|b| batch((1 << 20) + b))
            .collect();
        let mut map: hashbrown::HashMap<u64, Val, foldhash::fast::RandomState> =
            hashbrown::HashMap::with_capacity_and_hasher(
                s.raw_records as usize,
                Default::default(),
            );
        // The same records in, then out: every page the timed inserts write is mapped, and
        // the same keys land in the same slots again.
        for b in &batches {
            map.extend(b.iter().copied());
        }
        map.clear();
        let t0 = Instant::now();
        for b in batches {
            map.extend(b);
        }
        insert_cpu = insert_cpu.min(t0.elapsed().as_secs_f64() / recs);
        black_box(map.len());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // Each replicated record is inserted by three nodes and crosses two streams: on all the
    // cores, with nothing else (no encoding, decoding, acks or growth), at most this many per
    // second.
    let ceiling = cores / (3.0 * insert_cpu + raw2_cpu);
    for (callers, r, rc, _, _) in &ins {
        let (callers, r) = (*callers, *r);
        rows.push(
            Row::new(format!("insert_many ×1000, {callers} caller{}, 3 nodes", if callers > 1 { "s" } else { "" }))
                .value(rate(r))
                .baseline(format!("{} raw QUIC stream", rate(raw1)))
                .ratio(ratio(r / raw1))
                .target("≥ 1.5 M/s and ≥ 0.6× raw", r >= 1.5e6 && r / raw1 >= 0.6)
                .notes(format!(
                    "records/s replicated to 2 peers, best of {TRIES} runs (raw too); {rc}; raw = same records pre-encoded in 1000-record frames ({} B/record), one uni stream to 1 peer at {mib:.0} MiB/s; to 2 peers at once {} ({} of it); CETS: {}",
                    bytes / s.raw_records,
                    rate(raw2),
                    ratio(r / raw2),
                    if callers == 1 { "0.48 M/s" } else { "0.74 M/s" }
                )),
        );
    }
    rows.push(
        Row::new("insert_many ×1000, 1 caller, one node without peers")
            .value(rate(solo))
            .baseline(format!("{} raw QUIC stream", rate(raw1)))
            .ratio(ratio(solo / raw1))
            .notes(format!(
                "for reference: applying to the local store alone, the ceiling of the replicated rows on this machine; {solo_cost}"
            )),
    );
    rows.push(
        Row::new("insert_many ceiling: the CPU of 3 map inserts and 2 raw streams per record, on all cores")
            .value(rate(ceiling))
            .baseline(format!("{} raw QUIC stream", rate(raw1)))
            .ratio(ratio(ceiling / raw1))
            .notes(format!(
                "for reference: {cores} cores ÷ (3 × {:.0} ns, an insert of one of the same records into a presized, prefaulted hashbrown map (foldhash), + {:.0} ns, the CPU per record of the raw stream to 2 peers), the least CPU a record replicated to 2 peers costs, with encoding, decoding, acks and growth free (best of {TRIES} each): no 3-node table can apply more here; 0.6× raw is {}",
                insert_cpu * 1e9,
                raw2_cpu * 1e9,
                rate(0.6 * raw1)
            )),
    );
    for (callers, r, _, d, dc) in &ins {
        let (callers, r, d) = (*callers, *r, *d);
        rows.push(
            Row::new(format!(
                "delete_many ×1000, {callers} caller{}, 3 nodes",
                if callers > 1 { "s" } else { "" }
            ))
            .value(rate(d))
            .baseline(format!("{} insert_many", rate(r)))
            .ratio(ratio(d / r))
            .target("≥ 0.8× insert_many", d / r >= 0.8)
            .notes(format!(
                "deletes the keys the insert_many row wrote; {dc}; CETS: 0.74-0.92 M/s"
            )),
        );
    }
    Ok(rows)
}
