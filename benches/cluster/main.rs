//! The cets benchmark suite: `cargo bench --bench cluster`.
//!
//! Prints one markdown table in which every figure stands beside a baseline measured in the
//! same run, their ratio, and its target with pass/miss. The table is also written to
//! `target/bench-report.md` and, by a run of every section (or with `CETS_BENCH_WRITE_DOC=1`),
//! into the latest-table block of `BENCHMARKS.md`. The machines this runs on are shared and noisy: absolute
//! figures drift between runs, ratios within one run hold.
//!
//! - `CETS_BENCH_FULL=1` (or `cargo bench --bench cluster -- --full`) runs the full sizes
//!   (longer phases, a join of 1 M + 1 M records).
//! - Positional arguments pick sections: `memory get latency throughput batch join down ae react
//!   persist persist_pg bigjoin metrics` (default: all but `bigjoin`, which runs only when named or
//!   with `--full`; `persist_pg`, only when named, exists with `--features postgres` and needs
//!   `CETS_TEST_POSTGRES_URL`),
//!   e.g. `cargo bench --bench cluster -- latency join`.
//!
//! Two measurements run in a child process (this same binary, re-executed with
//! `CETS_BENCH_CHILD` set): `memory`, so that the counting allocator counts from the first
//! allocation and costs nothing elsewhere, and the node that `down` kills with SIGKILL.
//!
//! Layout: this file holds the settings, the nodes and the run; `counting.rs` the allocator,
//! `probes.rs` the procfs probes, `report.rs` the rows and the table, `raw.rs` the raw QUIC
//! baseline, and one file per section (`memory.rs`, `get.rs`, `latency.rs`, `throughput.rs`,
//! `batch.rs`, `join.rs`, `down.rs`, `anti_entropy.rs` for `ae`, `react.rs`, `persist.rs`, `persist_pg.rs`, `metrics.rs`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cets::discovery::StaticDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
type Val = [u8; 16];
type Tab = Table<u64, Val>;
type Rec = (u64, Val);

const COOKIE: &str = "cets-bench";

// The measuring kit.
mod counting;
mod probes;
mod raw;
mod report;

// The sections, in the order they run.
mod anti_entropy;
mod batch;
mod big_join;
mod down;
mod get;
mod join;
mod latency;
mod memory;
/// The cost of a metrics recorder (the `metrics` section).
mod metrics;
mod persist;
/// The PostgreSQL backend (the `persist_pg` section, cargo feature `postgres`).
#[cfg(feature = "postgres")]
mod persist_pg;
mod react;
mod throughput;

use batch::*;
use counting::*;
use down::*;
use get::*;
use join::*;
use latency::*;
use memory::*;
use probes::*;
use report::*;
use throughput::*;

// ------------------------------------------------------------------------------------------
// Settings and data

#[derive(Clone, Copy)]
struct Settings {
    full: bool,
    /// Records of the local-get table and of the memory figure.
    records: u64,
    /// Length of each local-get phase.
    read_phase: Duration,
    /// Length of each throughput phase.
    phase: Duration,
    /// Latency samples per round (three rounds, alternating with the ping).
    latency_samples: usize,
    /// Records streamed by the raw-QUIC baseline of `insert_many`.
    raw_records: u64,
    /// Records owned by the node that goes down.
    down_records: u64,
}

impl Settings {
    fn new(full: bool) -> Self {
        Settings {
            full,
            records: 1_000_000,
            read_phase: if full { secs(4.0) } else { secs(2.0) },
            phase: if full { secs(5.0) } else { secs(2.5) },
            latency_samples: if full { 20_000 } else { 5_000 },
            raw_records: if full { 5_000_000 } else { 2_000_000 },
            down_records: 100_000,
        }
    }

    fn join_sizes(&self) -> Vec<u64> {
        if self.full {
            vec![10_000, 100_000, 1_000_000]
        } else {
            vec![10_000, 100_000]
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The 16-byte value stored under a key (derived from it, so receivers can check it).
fn val(k: u64) -> Val {
    (u128::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)).to_le_bytes()
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Throughput phases run this many times; the table shows the best (the run least disturbed
/// by other work on a shared machine), and so do the raw baselines.
const TRIES: usize = 2;

/// Joins (and their raw baseline) run this many times; the table shows the median.
const JOIN_TRIES: usize = 3;

/// Batch `b` of `BATCH` records: keys `b*BATCH ..`, the same for cets and the raw baseline.
const BATCH: u64 = 1000;

fn batch(b: u64) -> Vec<Rec> {
    (b * BATCH..(b + 1) * BATCH).map(|k| (k, val(k))).collect()
}

fn batch_keys(b: u64) -> Vec<u64> {
    (b * BATCH..(b + 1) * BATCH).collect()
}

/// A frame as cets sends it: `u32` LE length, then postcard.
fn frame(records: &[Rec]) -> Res<Bytes> {
    let mut buf = vec![0u8; 4];
    buf = postcard::to_extend(records, buf)?;
    let len = u32::try_from(buf.len() - 4)?;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    Ok(Bytes::from(buf))
}

// ------------------------------------------------------------------------------------------
// Nodes

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The configuration of the nodes of the speed figures: the defaults, with quicker discovery
/// so that clusters form fast.
fn speed_config() -> NodeConfig {
    let mut c = NodeConfig::default();
    c.discovery_interval = Duration::from_millis(100);
    c
}

async fn start_node(name: &str, peers: Vec<SocketAddr>, config: NodeConfig) -> Res<Node> {
    Ok(Node::builder(name)
        .listen(loopback())
        .cookie(COOKIE)
        .config(config)
        .discovery(StaticDiscovery::new(peers))
        .start()
        .await?)
}

/// A node named `name` that discovers `peers`, with its table "down" joined to the two
/// survivors' tables.
async fn joined_third(name: &str, peers: Vec<SocketAddr>, cfg: NodeConfig) -> Res<(Node, Tab)> {
    let node = start_node(name, peers, cfg).await?;
    let t: Tab = node.start("down", TableOptions::set()).await?;
    let t2 = t.clone();
    wait_until(
        Duration::from_secs(30),
        "the third node to join",
        move || t2.nodes().len() == 2,
    )
    .await?;
    Ok((node, t))
}

async fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Res<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Cluster {
    nodes: Vec<Node>,
    tables: Vec<Tab>,
}

impl Cluster {
    /// `n` nodes on loopback that discover each other, each running table `table`, joined.
    async fn start(prefix: &str, n: usize, table: &str, config: NodeConfig) -> Res<Cluster> {
        Self::start_with(prefix, n, table, config, |_| TableOptions::set()).await
    }

    /// As `start`, with node `i`'s table started with `opts(i)`.
    async fn start_with(
        prefix: &str,
        n: usize,
        table: &str,
        config: NodeConfig,
        opts: impl Fn(usize) -> TableOptions<u64, Val>,
    ) -> Res<Cluster> {
        let mut nodes = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let d = StaticDiscovery::new(Vec::<SocketAddr>::new());
            handles.push(d.handle());
            nodes.push(
                Node::builder(format!("{prefix}-{i}"))
                    .listen(loopback())
                    .cookie(COOKIE)
                    .config(config.clone())
                    .discovery(d)
                    .start()
                    .await?,
            );
        }
        let addrs: Vec<SocketAddr> = nodes.iter().map(Node::local_addr).collect();
        for h in &handles {
            h.set(addrs.clone());
        }
        let mut tables = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            tables.push(node.start::<u64, Val>(table, opts(i)).await?);
        }
        let ts = tables.clone();
        wait_until(Duration::from_secs(30), "the cluster to join", || {
            ts.iter().all(|t| t.nodes().len() == n - 1)
        })
        .await?;
        for t in &tables {
            t.sync().await?;
        }
        Ok(Cluster { nodes, tables })
    }

    async fn shutdown(self) {
        for n in &self.nodes {
            let _ = n.shutdown().await;
        }
    }
}

/// Stores records `range` in `t` with `insert_many` batches of `chunk`.
async fn fill(t: &Tab, range: std::ops::Range<u64>, chunk: u64) -> Res<()> {
    let mut k = range.start;
    while k < range.end {
        let end = (k + chunk).min(range.end);
        t.insert_many((k..end).map(|k| (k, val(k))).collect())
            .await?;
        k = end;
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// The run

fn main() {
    match std::env::var("CETS_BENCH_CHILD").as_deref() {
        Ok("memory") => {
            COUNTING.store(true, Ordering::SeqCst);
            let n = std::env::var("CETS_BENCH_RECORDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000);
            if let Err(e) = child_memory(n) {
                eprintln!("memory child: {e}");
                std::process::exit(1);
            }
            return;
        }
        Ok("node") => {
            if let Err(e) = child_node() {
                eprintln!("victim node: {e}");
                std::process::exit(1);
            }
            return;
        }
        _ => {}
    }

    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = std::env::var("CETS_BENCH_FULL").is_ok_and(|v| v == "1" || v == "true")
        || args.iter().any(|a| a == "--full");
    let picked: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str)
        .collect();
    // `bigjoin` takes several GB: only when named, or in a full run of every section.
    let wants = |name: &str| {
        picked.contains(&name)
            || (picked.is_empty() && name != "persist_pg" && (name != "bigjoin" || full))
    };
    let s = Settings::new(full);

    let mut command = String::new();
    if std::env::var("CETS_BENCH_FULL").is_ok() && full {
        command.push_str("CETS_BENCH_FULL=1 ");
    }
    command.push_str("cargo bench --bench cluster");
    if cfg!(feature = "postgres") {
        command.push_str(" --features postgres");
    }
    let extra: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--bench")
        .collect();
    if !extra.is_empty() {
        command.push_str(" -- ");
        command.push_str(&extra.join(" "));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let load_before = loadavg();
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    type Section<'a> = (&'a str, Box<dyn FnOnce() -> Res<Vec<Row>> + 'a>);
    let sections: Vec<Section> = vec![
        ("memory", Box::new(|| memory(&s))),
        ("get", Box::new(|| local_get(&rt, &s))),
        ("latency", Box::new(|| rt.block_on(latency(&s)))),
        ("throughput", Box::new(|| rt.block_on(throughput(&s)))),
        ("batch", Box::new(|| rt.block_on(batches(&s)))),
        ("join", Box::new(|| rt.block_on(join(&s)))),
        ("down", Box::new(|| rt.block_on(down(&s)))),
        (
            "ae",
            Box::new(|| rt.block_on(anti_entropy::anti_entropy(&s))),
        ),
        ("react", Box::new(|| rt.block_on(react::react(&s)))),
        ("persist", Box::new(|| rt.block_on(persist::persist(&s)))),
        #[cfg(feature = "postgres")]
        (
            "persist_pg",
            Box::new(|| rt.block_on(persist_pg::persist_pg(&s))),
        ),
        ("bigjoin", Box::new(|| rt.block_on(big_join::big_join(&s)))),
        // Last: it installs a global recorder that every node started after it records into.
        ("metrics", Box::new(|| rt.block_on(metrics::metrics(&s)))),
    ];
    for (name, run) in sections {
        if !wants(name) {
            continue;
        }
        let t0 = Instant::now();
        eprintln!("[cets bench] {name} ...");
        match run() {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("[cets bench] {name} failed: {e}");
                rows.push(
                    Row::new(format!("{name}: failed"))
                        .value("error")
                        .notes(e.to_string()),
                );
            }
        }
        eprintln!(
            "[cets bench] {name} done in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    let total = started.elapsed();

    let mut report = String::new();
    let _ = writeln!(
        report,
        "### cets benchmarks ({} sizes)\n",
        if full { "full" } else { "default" }
    );
    let _ = writeln!(report, "Command: `{command}` (release build)  ");
    let _ = writeln!(report, "{}  ", machine());
    let _ = writeln!(
        report,
        "Run time: {:.0} s; load average {load_before} before, {} after (other work on the machine shows here). Nodes: in one process on loopback, multi-thread Tokio runtime with {} workers; ratios compare figures of this run.\n",
        total.as_secs_f64(),
        loadavg(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    report.push_str(&render(&rows));
    println!("{report}");

    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| std::path::PathBuf::from("target"));
    let path = target.join("bench-report.md");
    match std::fs::write(&path, &report) {
        Ok(()) => eprintln!("[cets bench] report written to {}", path.display()),
        Err(e) => eprintln!("[cets bench] cannot write {}: {e}", path.display()),
    }
    // A run of every section is the latest table of BENCHMARKS.md; a partial one would drop rows.
    if picked.is_empty() || std::env::var_os("CETS_BENCH_WRITE_DOC").is_some() {
        write_doc(&report);
    }
}
