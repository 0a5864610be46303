//! Local get (`get` section): reads per second from several threads, against a `HashMap`
//! behind a lock.

use super::*;

pub(crate) struct ReadStats {
    pub(crate) gets: u64,
    pub(crate) hits: u64,
    pub(crate) elapsed: Duration,
    /// Every batch's time, sorted.
    pub(crate) batches: Vec<Duration>,
    /// Times the reader threads blocked (voluntary context switches).
    pub(crate) blocked: u64,
    /// Times the reader threads were preempted (involuntary context switches).
    pub(crate) preempted: u64,
}

impl ReadStats {
    pub(crate) fn rate(&self) -> f64 {
        self.gets as f64 / self.elapsed.as_secs_f64()
    }
    pub(crate) fn max(&self) -> Duration {
        self.batches.last().copied().unwrap_or_default()
    }
    pub(crate) fn tail(&self) -> String {
        format!(
            "p50 {}, p99.9 {}, max {}",
            us(pct(&self.batches, 0.5)),
            us(pct(&self.batches, 0.999)),
            us(self.max())
        )
    }
}

pub(crate) const READ_BATCH: usize = 1024;

/// `threads` threads call `get` on keys from `seq` for `dur`; every batch of
/// [`READ_BATCH`] gets is timed, and the threads' context switches are counted: a read path
/// that never waits for the writer makes no voluntary switch.
pub(crate) fn read_phase<F>(threads: usize, dur: Duration, seq: &[u64], get: F) -> ReadStats
where
    F: Fn(u64) -> Option<Val> + Sync,
{
    let mask = seq.len() - 1;
    let t0 = Instant::now();
    let mut stats = ReadStats {
        gets: 0,
        hits: 0,
        elapsed: Duration::ZERO,
        batches: Vec::new(),
        blocked: 0,
        preempted: 0,
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|tid| {
                let get = &get;
                scope.spawn(move || {
                    let mut i = tid * (seq.len() / threads.max(1));
                    let mut gets = 0u64;
                    let mut hits = 0u64;
                    // Touched before the clock starts: a page fault in the loop could block
                    // on the process's memory map while another thread changes it.
                    let mut batches = vec![Duration::ZERO; 1 << 17];
                    let mut used = 0;
                    let (v0, n0) = context_switches();
                    let start = Instant::now();
                    while start.elapsed() < dur && used < batches.len() {
                        let b0 = Instant::now();
                        for _ in 0..READ_BATCH {
                            if black_box(get(seq[i & mask])).is_some() {
                                hits += 1;
                            }
                            i += 1;
                        }
                        batches[used] = b0.elapsed();
                        used += 1;
                        gets += READ_BATCH as u64;
                    }
                    let (v1, n1) = context_switches();
                    batches.truncate(used);
                    (gets, hits, batches, v1 - v0, n1 - n0)
                })
            })
            .collect();
        for h in handles {
            let (g, h, b, v, n) = h.join().expect("reader thread");
            stats.gets += g;
            stats.hits += h;
            stats.batches.extend(b);
            stats.blocked += v;
            stats.preempted += n;
        }
    });
    stats.elapsed = t0.elapsed();
    stats.batches.sort();
    stats
}

pub(crate) fn local_get(rt: &tokio::runtime::Runtime, s: &Settings) -> Res<Vec<Row>> {
    let n = s.records;
    let m = n / 1_000_000;
    let (node, t) = rt.block_on(async {
        let node = start_node("get", Vec::new(), speed_config()).await?;
        let t: Tab = node.start("get", TableOptions::set()).await?;
        fill(&t, 0..n, 10_000).await?;
        Res::Ok((node, t))
    })?;
    // 4 M keys drawn uniformly from the table, the same sequence for every phase.
    let seq: Vec<u64> = (0..1u64 << 22).map(|i| splitmix(i) % n).collect();

    let map: HashMap<u64, Val> = (0..n).map(|k| (k, val(k))).collect();
    let base = read_phase(1, s.read_phase, &seq, |k| map.get(&k).copied());
    drop(map);
    let solo = read_phase(1, s.read_phase, &seq, |k| t.get(&k));

    // The writer, on the node's runtime: insert_many of 1000 new keys at a time (the table
    // grows from N to 2N records, through a resize), then it overwrites those keys.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (t, stop, written) = (t.clone(), stop.clone(), written.clone());
        rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let recs: Vec<Rec> = (0..BATCH)
                    .map(|j| {
                        let k = n + (i + j) % n;
                        (k, val(k ^ i))
                    })
                    .collect();
                t.insert_many(recs).await?;
                i += BATCH;
                written.fetch_add(BATCH, Ordering::Relaxed);
            }
            Res::Ok(())
        })
    };
    let w0 = written.load(Ordering::Relaxed);
    let one = read_phase(1, s.read_phase, &seq, |k| t.get(&k));
    let w1 = written.load(Ordering::Relaxed);
    let two = read_phase(2, s.read_phase, &seq, |k| t.get(&k));
    let w2 = written.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    rt.block_on(writer)??;
    let final_len = t.len();
    rt.block_on(async {
        drop(t);
        let _ = node.shutdown().await;
    });

    for (name, st) in [
        ("1 reader", &solo),
        ("1 reader + writer", &one),
        ("2 readers + writer", &two),
    ] {
        if st.hits != st.gets {
            return Err(format!("{name}: {} of {} gets missed", st.gets - st.hits, st.gets).into());
        }
    }
    let b = base.rate();
    let wr1 = (w1 - w0) as f64 / one.elapsed.as_secs_f64();
    let wr2 = (w2 - w1) as f64 / two.elapsed.as_secs_f64();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let blocked = one.blocked + two.blocked;
    Ok(vec![
        Row::new(format!("local get, {m}M records, 1 reader, writer inserting"))
            .value(rate(one.rate()))
            .baseline(format!("{} std HashMap::get", rate(b)))
            .ratio(ratio(one.rate() / b))
            .target(
                "≥ 0.5× and ≥ 5 M/s",
                one.rate() / b >= 0.5 && one.rate() >= 5e6,
            )
            .notes(format!(
                "Table::get of u64 keys in random order; baseline: std HashMap (SipHash) of the same records, 1 thread, no writer; writer: insert_many ×1000 at {}; CETS: 1.65 M/s",
                rate(wr1)
            )),
        Row::new(format!("local get, {m}M records, 2 readers, writer inserting"))
            .value(rate(two.rate()))
            .baseline(format!("{} std HashMap::get", rate(b)))
            .ratio(ratio(two.rate() / b))
            .target("≥ 0.5×", two.rate() / b >= 0.5)
            .notes(format!(
                "both threads together; writer {}; 2 readers + writer + table server on {cores} cores; CETS: 2.5 M/s",
                rate(wr2)
            )),
        Row::new(format!("local get, {m}M records, 1 reader, no writer"))
            .value(rate(solo.rate()))
            .baseline(format!("{} std HashMap::get", rate(b)))
            .ratio(ratio(solo.rate() / b))
            .notes(format!(
                "for reference: the writer's cost to the reader is the gap to the first row; blocked {}×, {}",
                solo.blocked,
                solo.tail()
            )),
        Row::new("local get stalls: reader blocked / slowest batch of 1024 gets (1 reader + writer)")
            .value(format!(
                "blocked {blocked}×; {}; preempted {}×",
                one.tail(),
                one.preempted
            ))
            .baseline(format!(
                "HashMap, no writer: blocked {}×; {}; preempted {}×",
                base.blocked,
                base.tail(),
                base.preempted
            ))
            .ratio(ratio(
                pct(&one.batches, 0.999).as_secs_f64() / pct(&base.batches, 0.999).as_secs_f64(),
            ))
            .target("reads never block on the writer", blocked == 0)
            .notes(format!(
                "blocked = voluntary context switches of the reader threads over both writer phases (a read that waits for a lock makes one); slow batches come with preemptions (involuntary switches), which the HashMap run without writer has too; 2 readers + writer: {}, preempted {}×; the table grew to {final_len} records during the writer phases (a resize)",
                two.tail(),
                two.preempted
            )),
    ])
}
