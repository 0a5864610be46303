//! Bench rows of the features services react and coordinate with (`react` section): insert
//! throughput with a slow subscriber against none, and `insert_new` beside plain inserts.

use super::*;

/// What one caller does per call in [`calls_per_sec`].
#[derive(Clone, Copy, PartialEq)]
enum Call {
    Insert,
    InsertNew,
}

/// `callers` tasks make one call each at a time for `dur`, caller `i` on `tables[i % len]`,
/// every call on a key of its own. Returns calls per second and their latencies.
async fn calls_per_sec(
    tables: &[Tab],
    callers: usize,
    dur: Duration,
    base: u64,
    call: Call,
) -> Res<(f64, Vec<Duration>)> {
    let t0 = Instant::now();
    let stop_at = t0 + dur;
    let mut tasks = Vec::new();
    for i in 0..callers {
        let t = tables[i % tables.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut j = 0u64;
            while Instant::now() < stop_at {
                let k = base + ((i as u64) << 24) + j;
                let c0 = Instant::now();
                match call {
                    Call::Insert => t.insert(k, val(k)).await?,
                    Call::InsertNew => {
                        if !t.insert_new(k, val(k)).await? {
                            return Err("a fresh key was refused".into());
                        }
                    }
                }
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
    let rate = all.len() as f64 / t0.elapsed().as_secs_f64();
    all.sort();
    Ok((rate, all))
}

/// A subscriber that reads one change per millisecond: far behind any write load, so it
/// lags all the time. Counts what it read and how many changes it was told it missed.
fn slow_subscriber(
    mut sub: cets::Subscription<u64, Val>,
    counts: Arc<(AtomicU64, AtomicU64)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(u) = sub.recv().await {
            match u {
                cets::Update::Change(_) => counts.0.fetch_add(1, Ordering::Relaxed),
                cets::Update::Lagged(n) => counts.1.fetch_add(n, Ordering::Relaxed),
            };
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Alternating runs of each side in the subscriber figure.
const REACT_TRIES: u64 = 3;

/// The best of the throughput runs of one side, and its CPU per insert over all its runs.
#[derive(Default)]
struct Side {
    best: f64,
    cpu: Duration,
    calls: f64,
}

impl Side {
    /// Runs 256 callers over `tables` for one phase and keeps the figures.
    async fn run(&mut self, tables: &[Tab], dur: Duration, base: u64) -> Res<()> {
        let meter = CostMeter::start();
        let (r, lat) = calls_per_sec(tables, 256, dur, base, Call::Insert).await?;
        self.cpu += meter.stop().cpu;
        self.calls += lat.len() as f64;
        self.best = self.best.max(r);
        Ok(())
    }

    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.calls.max(1.0)
    }
}

pub(super) async fn react(s: &Settings) -> Res<Vec<Row>> {
    // Two clusters alike: one never subscribed to (a table goes on logging its changes for
    // `LOG_RETENTION` after its last subscriber left, so one cluster cannot be both sides),
    // one with a slow subscriber on its first node for the whole section.
    let c = Cluster::start("react", 3, "react", speed_config()).await?;
    let cs = Cluster::start("react-sub", 3, "react", speed_config()).await?;
    let base = |phase: u64| phase << 44;
    let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let reader = slow_subscriber(cs.tables[0].subscribe().await?, counts.clone());
    let (mut none, mut slow) = (Side::default(), Side::default());
    for round in 0..REACT_TRIES {
        none.run(&c.tables, s.phase, base(1 + 2 * round)).await?;
        slow.run(&cs.tables, s.phase, base(2 + 2 * round)).await?;
    }
    reader.abort();
    let lag = (
        counts.0.load(Ordering::Relaxed),
        counts.1.load(Ordering::Relaxed),
    );
    cs.shutdown().await;
    // insert_new against plain inserts: one caller on a node that is not the leader (the
    // leader is the largest name, react-2), then 256 callers spread over the three nodes.
    let follower = std::slice::from_ref(&c.tables[0]);
    let (_, ins1) = calls_per_sec(follower, 1, s.phase, base(10), Call::Insert).await?;
    let (_, new1) = calls_per_sec(follower, 1, s.phase, base(11), Call::InsertNew).await?;
    let (ins256, _) = calls_per_sec(&c.tables, 256, s.phase, base(12), Call::Insert).await?;
    let (new256, _) = calls_per_sec(&c.tables, 256, s.phase, base(13), Call::InsertNew).await?;
    c.shutdown().await;
    let r = slow.best / none.best;
    let (i50, n50) = (pct(&ins1, 0.5), pct(&new1, 0.5));
    let (i99, n99) = (pct(&ins1, 0.99), pct(&new1, 0.99));
    Ok(vec![
        Row::new("acked insert throughput, 256 callers over 3 nodes, one slow subscriber")
            .value(rate(slow.best))
            .baseline(format!("{} with no subscriber", rate(none.best)))
            .ratio(ratio(r))
            .target("≥ 0.9×", r >= 0.9)
            .notes(format!(
                "best of {REACT_TRIES} runs of {:.1} s each, alternating between two clusters alike (one never subscribed to); CPU per insert (all 3 nodes, all runs) {:.2} µs with, {:.2} µs without ({}); the subscriber (on the first node, which applies every write) reads one change per ms: it read {} and was told it lagged by {}",
                s.phase.as_secs_f64(),
                slow.cpu_us(),
                none.cpu_us(),
                ratio(slow.cpu_us() / none.cpu_us()),
                lag.0,
                lag.1
            )),
        Row::new("insert_new latency p50, 1 caller on a non-leader, 3 nodes")
            .value(us(n50))
            .baseline(format!("{} plain insert p50", us(i50)))
            .ratio(ratio(n50.as_secs_f64() / i50.as_secs_f64()))
            .notes(format!(
                "the call goes to the leader, which inserts and answers once every member acked; p99 {} against {}",
                us(n99),
                us(i99)
            )),
        Row::new("insert_new throughput, 256 callers over 3 nodes")
            .value(rate(new256))
            .baseline(format!("{} plain insert", rate(ins256)))
            .ratio(ratio(new256 / ins256))
            .notes("fresh keys, every call wins; one run each"),
    ])
}
