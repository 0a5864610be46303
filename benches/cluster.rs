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
//! - Positional arguments pick sections: `memory get latency throughput batch join down ae react metrics`
//!   (default: all), e.g. `cargo bench --bench cluster -- latency join`.
//!
//! Two measurements run in a child process (this same binary, re-executed with
//! `CETS_BENCH_CHILD` set): `memory`, so that the counting allocator counts from the first
//! allocation and costs nothing elsewhere, and the node that `down` kills with SIGKILL.

use std::alloc::{GlobalAlloc, Layout, System};
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

#[path = "cluster/anti_entropy.rs"]
mod anti_entropy;
/// The cost of a metrics recorder (the `metrics` section).
#[path = "cluster/metrics.rs"]
mod metrics;
/// Subscriptions and `insert_new` (the `react` section).
#[path = "cluster/react.rs"]
mod react;

// ------------------------------------------------------------------------------------------
// Counting allocator: live bytes, only while COUNTING is set (the `memory` child sets it first
// thing, so every allocation it makes is counted; elsewhere the cost is one relaxed load).

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);

fn count(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        LIVE.fetch_add(delta, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged and only
// adds bookkeeping on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> isize {
    LIVE.load(Ordering::SeqCst)
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// UDP datagrams sent by this host so far (`/proc/net/snmp`, all processes).
fn udp_out() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "OutDatagrams")?;
    values.get(i)?.parse().ok()
}

/// CPU time used by this process so far, all threads (`/proc/self/stat`, 10 ms resolution).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Context switches of every thread of this process so far (`/proc/self/task/*/status`).
/// Threads that exited in between are not counted.
fn process_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|status| {
            status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// What one measured phase cost the machine: CPU time, context switches, UDP datagrams.
#[derive(Default)]
struct Cost {
    cpu: Duration,
    wall: Duration,
    switches: u64,
    udp: u64,
}

struct CostMeter {
    cpu: Duration,
    wall: Instant,
    switches: u64,
    udp: u64,
}

impl CostMeter {
    fn start() -> Self {
        CostMeter {
            cpu: cpu_time(),
            wall: Instant::now(),
            switches: process_switches(),
            udp: udp_out().unwrap_or(0),
        }
    }
    fn stop(&self) -> Cost {
        Cost {
            cpu: cpu_time().saturating_sub(self.cpu),
            wall: self.wall.elapsed(),
            switches: process_switches().saturating_sub(self.switches),
            udp: udp_out().unwrap_or(0).saturating_sub(self.udp),
        }
    }
}

impl Cost {
    fn add(&mut self, o: Cost) {
        self.cpu += o.cpu;
        self.wall += o.wall;
        self.switches += o.switches;
        self.udp += o.udp;
    }

    /// CPU, context switches and datagrams per op, and how many cores were busy.
    fn per(&self, ops: f64, what: &str) -> String {
        let ops = ops.max(1.0);
        format!(
            "per {what} (all nodes): {:.1} µs CPU, {:.1} context switches, {:.2} UDP datagrams; {:.2} cores busy",
            self.cpu.as_secs_f64() * 1e6 / ops,
            self.switches as f64 / ops,
            self.udp as f64 / ops,
            self.cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
        )
    }
}

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

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i]
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

fn rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.1} k/s", r / 1e3)
    }
}

fn ratio(x: f64) -> String {
    format!("{x:.2}×")
}

// ------------------------------------------------------------------------------------------
// The report

#[derive(Clone, Copy, PartialEq)]
enum Verdict {
    Pass,
    Miss,
    Info,
}

struct Row {
    figure: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
    verdict: Verdict,
    notes: String,
}

impl Row {
    fn new(figure: impl Into<String>) -> Self {
        Row {
            figure: figure.into(),
            value: String::new(),
            baseline: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: Verdict::Info,
            notes: String::new(),
        }
    }
    fn value(mut self, v: impl Into<String>) -> Self {
        self.value = v.into();
        self
    }
    fn baseline(mut self, v: impl Into<String>) -> Self {
        self.baseline = v.into();
        self
    }
    fn ratio(mut self, v: impl Into<String>) -> Self {
        self.ratio = v.into();
        self
    }
    fn target(mut self, t: impl Into<String>, pass: bool) -> Self {
        self.target = t.into();
        self.verdict = if pass { Verdict::Pass } else { Verdict::Miss };
        self
    }
    fn notes(mut self, n: impl Into<String>) -> Self {
        self.notes = n.into();
        self
    }
}

fn render(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| figure | cets | baseline (same run) | ratio | target | result | notes |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        let verdict = match r.verdict {
            Verdict::Pass => "pass",
            Verdict::Miss => "**miss**",
            Verdict::Info => "",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.figure, r.value, r.baseline, r.ratio, r.target, verdict, r.notes
        );
    }
    s
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let out = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let rustc = out("rustc", &["-V"]).unwrap_or_else(|| "?".into());
    let commit = out("git", &["rev-parse", "--short", "HEAD"])
        .map(|c| {
            let dirty = out("git", &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{c} + uncommitted changes")
            } else {
                c
            }
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "Machine: {nproc} CPUs (nproc), {cpu}, {mem} RAM, Linux {kernel}; {rustc}; commit {commit}"
    )
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
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
        for node in &nodes {
            tables.push(node.start::<u64, Val>(table, TableOptions::set()).await?);
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
// Raw QUIC baselines: our own rustls configs (ring provider, any server certificate, TLS 1.3)
// and the transport settings cets uses, on sockets with the same 4 MiB buffers.

mod raw {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::{Buf, Bytes, BytesMut};
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::{Rec, Res};

    const NAME: &str = "bench";
    const ALPN: &[u8] = b"cets-bench";

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn transport() -> Res<TransportConfig> {
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(Duration::from_secs(1)));
        t.max_idle_timeout(Some(IdleTimeout::try_from(Duration::from_secs(3))?));
        t.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
        t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
        t.send_window(32 * 1024 * 1024);
        Ok(t)
    }

    /// A QUIC endpoint (server and client) on 127.0.0.1, port chosen by the system.
    pub(super) fn endpoint() -> Res<Endpoint> {
        let certified = rcgen::generate_simple_self_signed(vec![NAME.to_string()])?;
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(cets::testing::any_certificate())
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];

        let transport = Arc::new(transport()?);
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client)?));
        client.transport_config(transport);

        use socket2::{Domain, Protocol, Socket, Type};
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
        let _ = socket.set_send_buffer_size(4 * 1024 * 1024);
        socket.bind(&addr.into())?;
        let mut ep = Endpoint::new(
            EndpointConfig::default(),
            Some(server),
            socket.into(),
            Arc::new(TokioRuntime),
        )?;
        ep.set_default_client_config(client);
        Ok(ep)
    }

    async fn accept(ep: &Endpoint) -> Res<quinn::Connection> {
        let incoming = ep.accept().await.ok_or("endpoint closed")?;
        Ok(incoming.await?)
    }

    /// Round trips of 32 bytes on one long-lived bi stream: `warm` unrecorded, then `n`.
    pub(super) async fn ping(warm: usize, n: usize) -> Res<Vec<Duration>> {
        let server = endpoint()?;
        let client = endpoint()?;
        let addr = server.local_addr()?;
        let echo = tokio::spawn(async move {
            let conn = accept(&server).await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut buf = [0u8; 32];
            while recv.read_exact(&mut buf).await.is_ok() {
                send.write_all(&buf).await?;
            }
            Res::Ok(())
        });
        let conn = client.connect(addr, NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut buf = [7u8; 32];
        let mut samples = Vec::with_capacity(n);
        for i in 0..warm + n {
            let t0 = Instant::now();
            send.write_all(&buf).await?;
            recv.read_exact(&mut buf).await?;
            if i >= warm {
                samples.push(t0.elapsed());
            }
        }
        let _ = send.finish();
        conn.close(VarInt::from_u32(0), b"done");
        let _ = echo.await;
        client.wait_idle().await;
        Ok(samples)
    }

    /// What the sender streams.
    pub(super) enum Source {
        /// Frames encoded before the clock starts (pure transport).
        Frames(Arc<Vec<Bytes>>),
        /// Records encoded into frames of `chunk` while the clock runs.
        Records(Arc<Vec<Rec>>, usize),
    }

    /// Streams `source` over one uni stream to each of `peers` receivers (one connection each,
    /// the same bytes to all) and returns the time until every receiver has it all, with the
    /// bytes each received. With `decode`, receivers split the frames and decode the records.
    pub(super) async fn stream(source: Source, peers: usize, decode: bool) -> Res<(Duration, u64)> {
        let sender = endpoint()?;
        let mut receivers = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..peers {
            let ep = endpoint()?;
            let addr = ep.local_addr()?;
            receivers.push(tokio::spawn(async move {
                let conn = accept(&ep).await?;
                let mut recv = conn.accept_uni().await?;
                let mut bytes = 0u64;
                let mut buf = BytesMut::with_capacity(1 << 20);
                let mut decoded: Vec<Rec> = Vec::new();
                while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                    bytes += chunk.bytes.len() as u64;
                    if !decode {
                        continue;
                    }
                    buf.extend_from_slice(&chunk.bytes);
                    loop {
                        if buf.len() < 4 {
                            break;
                        }
                        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                        if buf.len() < 4 + len {
                            break;
                        }
                        buf.advance(4);
                        let body = buf.split_to(len);
                        let recs: Vec<Rec> = postcard::from_bytes(&body)?;
                        decoded.extend(recs);
                    }
                }
                if decode && !buf.is_empty() {
                    return Err("stream ended inside a frame".into());
                }
                std::hint::black_box(&decoded);
                conn.close(VarInt::from_u32(0), b"done");
                Res::Ok(bytes)
            }));
            conns.push(sender.connect(addr, NAME)?.await?);
        }
        let source = Arc::new(source);
        let t0 = Instant::now();
        let mut writers = Vec::new();
        for conn in conns {
            let source = source.clone();
            writers.push(tokio::spawn(async move {
                let mut send = conn.open_uni().await?;
                match &*source {
                    Source::Frames(frames) => {
                        for f in frames.iter() {
                            send.write_all(f).await?;
                        }
                    }
                    Source::Records(recs, chunk) => {
                        for c in recs.chunks(*chunk) {
                            send.write_all(&super::frame(c)?).await?;
                        }
                    }
                }
                send.finish()?;
                let _ = send.stopped().await;
                Res::Ok(())
            }));
        }
        let mut bytes = 0;
        for r in receivers {
            bytes = r.await??;
        }
        let elapsed = t0.elapsed();
        for w in writers {
            let _ = w.await;
        }
        sender.close(VarInt::from_u32(0), b"done");
        Ok((elapsed, bytes))
    }
}

// ------------------------------------------------------------------------------------------
// Memory (child process)

fn child_memory(n: u64) -> Res<()> {
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
fn memory_child(n: u64) -> Res<(f64, f64, f64)> {
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

fn memory(s: &Settings) -> Res<Vec<Row>> {
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

// ------------------------------------------------------------------------------------------
// Local get

struct ReadStats {
    gets: u64,
    hits: u64,
    elapsed: Duration,
    /// Every batch's time, sorted.
    batches: Vec<Duration>,
    /// Times the reader threads blocked (voluntary context switches).
    blocked: u64,
    /// Times the reader threads were preempted (involuntary context switches).
    preempted: u64,
}

impl ReadStats {
    fn rate(&self) -> f64 {
        self.gets as f64 / self.elapsed.as_secs_f64()
    }
    fn max(&self) -> Duration {
        self.batches.last().copied().unwrap_or_default()
    }
    fn tail(&self) -> String {
        format!(
            "p50 {}, p99.9 {}, max {}",
            us(pct(&self.batches, 0.5)),
            us(pct(&self.batches, 0.999)),
            us(self.max())
        )
    }
}

const READ_BATCH: usize = 1024;

/// The calling thread's (voluntary, involuntary) context switches so far.
fn context_switches() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (
        field("voluntary_ctxt_switches:"),
        field("nonvoluntary_ctxt_switches:"),
    )
}

/// `threads` threads call `get` on keys from `seq` for `dur`; every batch of
/// [`READ_BATCH`] gets is timed, and the threads' context switches are counted: a read path
/// that never waits for the writer makes no voluntary switch.
fn read_phase<F>(threads: usize, dur: Duration, seq: &[u64], get: F) -> ReadStats
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

fn local_get(rt: &tokio::runtime::Runtime, s: &Settings) -> Res<Vec<Row>> {
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

// ------------------------------------------------------------------------------------------
// Acked insert latency

async fn insert_latency(t: &Tab, warm: usize, n: usize, base: u64) -> Res<Vec<Duration>> {
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

async fn latency(s: &Settings) -> Res<Vec<Row>> {
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

// ------------------------------------------------------------------------------------------
// Acked insert throughput

/// `callers` tasks insert one record per call for `dur`, caller `i` on `tables[i % len]`.
/// Returns acked inserts per second and what they cost.
async fn insert_throughput(
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
async fn best_throughput(
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

async fn throughput(s: &Settings) -> Res<Vec<Row>> {
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

// ------------------------------------------------------------------------------------------
// insert_many / delete_many

/// `callers` tasks `insert_many` batches (from the shared counter) for `dur`. Returns records/s
/// and the batches written.
async fn insert_many_phase(
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
async fn delete_many_phase(
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

async fn batches(s: &Settings) -> Res<Vec<Row>> {
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

// ------------------------------------------------------------------------------------------
// Join

async fn join_once(n: u64, tag: usize) -> Res<Duration> {
    let a = start_node(&format!("join{tag}-a"), Vec::new(), speed_config()).await?;
    let b = start_node(&format!("join{tag}-b"), Vec::new(), speed_config()).await?;
    let ta: Tab = a.start("join", TableOptions::set()).await?;
    let tb: Tab = b.start("join", TableOptions::set()).await?;
    fill(&ta, 0..n, 10_000).await?;
    fill(&tb, n..2 * n, 10_000).await?;
    let t0 = Instant::now();
    a.connect(b.local_addr());
    let (ta2, tb2) = (ta.clone(), tb.clone());
    wait_until(
        Duration::from_secs(60),
        "both nodes to hold the union",
        move || ta2.len() as u64 == 2 * n && tb2.len() as u64 == 2 * n,
    )
    .await?;
    let elapsed = t0.elapsed();
    drop((ta, tb));
    let _ = a.shutdown().await;
    let _ = b.shutdown().await;
    Ok(elapsed)
}

async fn join(s: &Settings) -> Res<Vec<Row>> {
    let mut rows = Vec::new();
    for (tag, n) in s.join_sizes().into_iter().enumerate() {
        let records: Arc<Vec<Rec>> = Arc::new((0..2 * n).map(|k| (k, val(k))).collect());
        let mut raws = Vec::new();
        let mut times = Vec::new();
        for i in 0..JOIN_TRIES {
            let source = raw::Source::Records(records.clone(), 10_000);
            raws.push(raw::stream(source, 1, true).await?.0);
            times.push(join_once(n, tag * JOIN_TRIES + i).await?);
        }
        raws.sort();
        times.sort();
        let (raw, cets) = (raws[JOIN_TRIES / 2], times[JOIN_TRIES / 2]);
        let spread = format!("{}..{}", ms(times[0]), ms(times[JOIN_TRIES - 1]));
        let label = if n >= 1_000_000 {
            format!("{}M", n / 1_000_000)
        } else {
            format!("{}k", n / 1000)
        };
        let mut row = Row::new(format!("join, {label} + {label} distinct records, 2 nodes"))
            .value(ms(cets))
            .baseline(format!("{} raw encode+send+decode", ms(raw)))
            .ratio(ratio(cets.as_secs_f64() / raw.as_secs_f64()))
            .notes(format!(
                "median of {JOIN_TRIES} (range {spread}), from node.connect() until both hold {}; includes the QUIC + cookie handshake; raw: all {} records in 10k-record frames over one uni stream; CETS: {}",
                2 * n,
                2 * n,
                match n {
                    100_000 => "0.22 s",
                    1_000_000 => "2.67 s",
                    _ => "—",
                }
            ));
        if n == 1_000_000 {
            row = row.target("≤ 1 s", cets <= Duration::from_secs(1));
        } else {
            row.target = "(1M + 1M ≤ 1 s, full mode)".into();
        }
        rows.push(row);
    }
    Ok(rows)
}

// ------------------------------------------------------------------------------------------
// Node down

fn down_config() -> NodeConfig {
    NodeConfig::fast_failover()
}

/// The node that gets killed: joins the peers in `CETS_BENCH_PEERS`, writes
/// `CETS_BENCH_RECORDS` records, prints `READY`, and waits (until its stdin closes).
fn child_node() -> Res<()> {
    let peers: Vec<SocketAddr> = std::env::var("CETS_BENCH_PEERS")?
        .split(',')
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let n: u64 = std::env::var("CETS_BENCH_RECORDS")?.parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let expected = peers.len();
        let node = start_node("down-victim", peers, down_config()).await?;
        let t: Tab = node.start("down", TableOptions::set()).await?;
        let t2 = t.clone();
        wait_until(Duration::from_secs(30), "the victim to join", move || {
            t2.nodes().len() == expected
        })
        .await?;
        fill(&t, 1 << 40..(1 << 40) + n, 1000).await?;
        println!("READY");
        tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|r| r > 0) {}
        })
        .await?;
        drop(node);
        Res::Ok(())
    })
}

async fn down(s: &Settings) -> Res<Vec<Row>> {
    use tokio::io::AsyncBufReadExt;

    let cfg = down_config();
    let idle = cfg.idle_timeout;
    let n = s.down_records;
    let c = Cluster::start("down", 2, "down", cfg.clone()).await?;
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.local_addr().to_string()).collect();

    // SIGKILL: the victim is this binary in another process.
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env("CETS_BENCH_CHILD", "node")
        .env("CETS_BENCH_PEERS", addrs.join(","))
        .env("CETS_BENCH_RECORDS", n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await? {
            if l.trim() == "READY" {
                return Ok(true);
            }
        }
        std::io::Result::Ok(false)
    })
    .await;
    if !matches!(ready, Ok(Ok(true))) {
        let _ = child.start_kill();
        return Err("the victim process did not get ready".into());
    }
    let ts = c.tables.clone();
    wait_until(
        Duration::from_secs(10),
        "the survivors to hold the victim's records",
        || ts.iter().all(|t| t.len() as u64 == n),
    )
    .await?;
    let t0 = Instant::now();
    child.start_kill()?;
    let mut gone = Vec::new();
    for t in &c.tables {
        let t = t.clone();
        gone.push(tokio::spawn(async move {
            wait_until(
                Duration::from_secs(30),
                "the victim's records to go",
                || t.is_empty(),
            )
            .await?;
            Res::Ok(t0.elapsed())
        }));
    }
    let mut killed = Duration::ZERO;
    for g in gone {
        killed = killed.max(g.await??);
    }
    let _ = child.wait().await;

    // Graceful: an in-process node writes n records, then shuts down.
    let survivors: Vec<SocketAddr> = addrs.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (d, td) = joined_third("down-graceful", survivors.clone(), cfg.clone()).await?;
    fill(&td, 2 << 40..(2 << 40) + n, 1000).await?;
    let ts = c.tables.clone();
    wait_until(
        Duration::from_secs(10),
        "the survivors to hold its records",
        || ts.iter().all(|t| t.len() as u64 == n),
    )
    .await?;
    let t0 = Instant::now();
    d.shutdown().await?;
    let shut = t0.elapsed();
    let ts = c.tables.clone();
    wait_until(
        Duration::from_secs(30),
        "the graceful node's records to go",
        || ts.iter().all(|t| t.is_empty()),
    )
    .await?;
    let graceful = t0.elapsed();
    drop(td);

    // Shutdown while a dial is in flight: discovery also lists an address where a socket takes
    // the dial's packets and never answers.
    let silent = tokio::net::UdpSocket::bind(loopback()).await?;
    let mut peers = survivors;
    peers.push(silent.local_addr()?);
    let (e, te) = joined_third("down-dialing", peers, cfg).await?;
    let mut buf = [0u8; 2048];
    tokio::time::timeout(Duration::from_secs(10), silent.recv_from(&mut buf))
        .await
        .map_err(|_| "no dial reached the silent address")??;
    let t0 = Instant::now();
    e.shutdown().await?;
    let shut_dialing = t0.elapsed();
    drop(te);
    c.shutdown().await;

    let k = n / 1000;
    Ok(vec![
        Row::new(format!("node down (SIGKILL), {k}k records owned by it, 3 nodes"))
            .value(ms(killed))
            .baseline(format!("{} idle timeout", ms(idle)))
            .ratio(ratio(killed.as_secs_f64() / idle.as_secs_f64()))
            .target("≤ timeout + 0.5 s", killed <= idle + Duration::from_millis(500))
            .notes(format!(
                "victim is a separate process killed with SIGKILL; time until both survivors dropped its records; NodeConfig::fast_failover (keep-alive {} ms, idle {} ms)",
                down_config().keep_alive_interval.as_millis(),
                idle.as_millis()
            )),
        Row::new(format!("node down (graceful shutdown), {k}k records, 3 nodes"))
            .value(ms(graceful))
            .notes(format!("in-process node, from shutdown() until both survivors dropped its records; shutdown() itself took {}", ms(shut))),
        Row::new("shutdown() with a dial in flight to a silent address")
            .value(ms(shut_dialing))
            .baseline(format!("{} shutdown() with none", ms(shut)))
            .ratio(ratio(shut_dialing.as_secs_f64() / shut.as_secs_f64()))
            .notes("for reference: a node joined with 2 peers whose discovery also lists an address that never answers; shutdown() waits until its close of each peer connection is sent, not for the unanswered dial (which would drain for seconds)".to_string()),
    ])
}

// ------------------------------------------------------------------------------------------

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
    let wants = |name: &str| picked.is_empty() || picked.contains(&name);
    let s = Settings::new(full);

    let mut command = String::new();
    if std::env::var("CETS_BENCH_FULL").is_ok() && full {
        command.push_str("CETS_BENCH_FULL=1 ");
    }
    command.push_str("cargo bench --bench cluster");
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

/// Replaces the block between the report markers of `BENCHMARKS.md` with `report`.
fn write_doc(report: &str) {
    const BEGIN: &str = "<!-- bench-report:begin -->";
    const END: &str = "<!-- bench-report:end -->";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let doc = match std::fs::read_to_string(&path) {
        Ok(doc) => doc,
        Err(e) => return eprintln!("[cets bench] cannot read {}: {e}", path.display()),
    };
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        return eprintln!("[cets bench] no report markers in {}", path.display());
    };
    if e < b {
        return eprintln!(
            "[cets bench] report markers out of order in {}",
            path.display()
        );
    }
    let new = format!("{}{BEGIN}\n{}\n{}", &doc[..b], report.trim_end(), &doc[e..]);
    match std::fs::write(&path, new) {
        Ok(()) => eprintln!("[cets bench] latest table written to {}", path.display()),
        Err(e) => eprintln!("[cets bench] cannot write {}: {e}", path.display()),
    }
}
