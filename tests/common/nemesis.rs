//! A nemesis for one table on five in-process nodes: every link goes through its own cuttable
//! relay (`relay.rs`), rounds of random faults (two halves, one node cut off, one pair cut, one
//! way of a link cut, packet loss, delay with jitter) and restarts of a node under its name, while every node
//! writes throughout, one awaited call at a time: its own keys (`own-<node>-<n>`, written by
//! that node only: insert, insert_many, delete) and shared keys that every node writes.
//!
//! Every call is logged with its outcome. After the final heal, `check` asserts:
//! (a) every member holds the same records (`to_vec`) within `CONVERGE`;
//! (b) each own key of a running incarnation holds what its last acknowledged call left, or
//!     what a later call that failed (and so may or may not have happened) left; a shared key
//!     whose last call was an acknowledged insert, started after every other call on that key
//!     had ended, holds that insert's value;
//! (c) no record written by an incarnation that is gone remains.
//!
//! Values name their writer: `incarnation << 32 | sequence`, incarnations numbered in start
//! order. The seed fixes the fault schedule and every writer's choices; the timing of a run on
//! a busy machine does not repeat, so a seed that failed once may pass the next time.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cets::{NodeConfig, Table, TableOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common::mesh::Mesh;
use crate::common::node as start_node;
use crate::common::relay::{Relay, Way};

pub type T = Table<String, u64>;

const NAMES: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];
const TABLE: &str = "nemesis";
/// How long the members get after the final heal to hold the same records.
pub const CONVERGE: Duration = Duration::from_secs(60);

/// What one run does.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub rounds: usize,
    /// Each round lasts a random time in this range (milliseconds).
    pub round_ms: (u64, u64),
    /// Own keys per node, shared keys.
    pub own_keys: usize,
    pub shared_keys: usize,
    /// Chance that a round starts with the restart of a random node.
    pub restart_chance: f64,
    /// A delay every link adds to each packet, each way, throughout the run (under every fault
    /// and until the members converge): base and jitter (a random share of it, so packets
    /// also overtake each other).
    pub delay: Option<(Duration, Duration)>,
}

impl Plan {
    pub fn new(seed: u64, rounds: usize) -> Plan {
        Plan {
            seed,
            rounds,
            round_ms: (300, 3000),
            own_keys: 30,
            shared_keys: 8,
            restart_chance: 0.25,
            delay: None,
        }
    }
}

/// What a run did, for the figures.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub rounds: usize,
    pub restarts: usize,
    pub calls: usize,
    pub acked: usize,
    pub failed: usize,
    pub converged_in: Duration,
    pub records: usize,
}

#[derive(Debug, Clone)]
pub enum Fault {
    None,
    Halves(Vec<usize>, Vec<usize>),
    Isolate(usize),
    Pair(usize, usize),
    /// Packets from the first node to the second are dropped; the other way passes.
    OneWay(usize, usize),
    /// Every link drops this share of its packets.
    Loss(f64),
    /// Every link delays each packet, each way, by the first number of milliseconds plus a
    /// random share of the second.
    Delay(u64, u64),
}

#[derive(Debug, Clone)]
enum Call {
    Put(Vec<(String, u64)>),
    Del(String),
}

#[derive(Debug, Clone)]
struct Logged {
    inc: usize,
    call: Call,
    start: Instant,
    end: Instant,
    ok: bool,
    err: Option<String>,
}

struct Incarnation {
    node: usize,
    alive: bool,
}

struct Writer {
    inc: usize,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

struct Run {
    plan: Plan,
    mesh: Mesh,
    tables: Vec<T>,
    writers: Vec<Option<Writer>>,
    incs: Vec<Incarnation>,
    log: Arc<Mutex<Vec<Logged>>>,
    epoch: Instant,
    schedule: String,
    report: Report,
}

fn opts() -> TableOptions<String, u64> {
    TableOptions::set().ack_timeout(Duration::from_secs(5))
}

pub fn own_key(node: usize, n: usize) -> String {
    format!("own-{node}-{n}")
}

fn shared_key(n: usize) -> String {
    format!("shared-{n}")
}

/// The incarnation that wrote `value`.
fn writer_of(value: u64) -> usize {
    (value >> 32) as usize
}

/// Runs the plan; `Err` holds the seed, the schedule and every violation.
pub async fn run(plan: Plan) -> Result<Report, String> {
    let mesh = Mesh::start_with(&NAMES, NodeConfig::fast_failover()).await;
    let mut tables = Vec::new();
    for n in &mesh.nodes {
        tables.push(n.start::<String, u64>(TABLE, opts()).await.unwrap());
    }
    let mut run = Run {
        plan,
        mesh,
        tables,
        writers: Vec::new(),
        incs: Vec::new(),
        log: Arc::new(Mutex::new(Vec::new())),
        epoch: Instant::now(),
        schedule: String::new(),
        report: Report::default(),
    };
    for i in 0..NAMES.len() {
        let w = run.spawn_writer(i);
        run.writers.push(Some(w));
    }
    let result = run.go().await;
    for n in &run.mesh.nodes {
        let _ = n.shutdown().await;
    }
    result.map_err(|e| {
        format!(
            "nemesis seed {} ({} rounds) failed; replay with CETS_NEMESIS_SEED={} CETS_NEMESIS_ROUNDS={}\n{}\nschedule:\n{}",
            run.plan.seed, run.plan.rounds, run.plan.seed, run.plan.rounds, e, run.schedule
        )
    })
}

impl Run {
    fn ms(&self) -> u128 {
        self.epoch.elapsed().as_millis()
    }

    fn spawn_writer(&mut self, node: usize) -> Writer {
        let inc = self.incs.len();
        self.incs.push(Incarnation { node, alive: true });
        let stop = Arc::new(AtomicBool::new(false));
        let table = self.tables[node].clone();
        let seed = self.plan.seed ^ (inc as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let task = tokio::spawn(write_loop(
            table,
            node,
            inc,
            self.plan.clone(),
            seed,
            stop.clone(),
            self.log.clone(),
        ));
        Writer { inc, stop, task }
    }

    async fn stop_writer(&mut self, node: usize) {
        if let Some(w) = self.writers[node].take() {
            w.stop.store(true, Ordering::Relaxed);
            // A call waiting for an ack ends by the ack timeout at the latest.
            let _ = tokio::time::timeout(Duration::from_secs(30), w.task).await;
            let _ = w.inc;
        }
    }

    async fn restart(&mut self, node: usize) {
        let old = self.writers[node].as_ref().map(|w| w.inc);
        if let Some(w) = &self.writers[node] {
            w.stop.store(true, Ordering::Relaxed);
        }
        // Shutdown fails the calls in flight, so the writer ends at once.
        self.mesh.nodes[node].shutdown().await.unwrap();
        self.stop_writer(node).await;
        if let Some(inc) = old {
            self.incs[inc].alive = false;
        }
        let (n, h) = start_node(NAMES[node]).await;
        self.mesh.replace(node, n, h).await;
        self.tables[node] = self.mesh.nodes[node]
            .start::<String, u64>(TABLE, opts())
            .await
            .unwrap();
        let w = self.spawn_writer(node);
        self.writers[node] = Some(w);
        self.report.restarts += 1;
    }

    /// Heals every link, back to the plan's delay.
    fn heal_all(&self) {
        for r in self.mesh.relays.values() {
            r.heal();
            if let Some((base, jitter)) = self.plan.delay {
                r.set_delay(base, jitter);
            }
        }
    }

    fn relay(&self, a: usize, b: usize) -> &Relay {
        &self.mesh.relays[&(a.min(b), a.max(b))]
    }

    fn apply(&self, f: &Fault) {
        match f {
            Fault::None => {}
            Fault::Halves(l, r) => self.mesh.split(l, r),
            Fault::Isolate(i) => {
                for j in 0..NAMES.len() {
                    if j != *i {
                        self.relay(*i, j).cut();
                    }
                }
            }
            Fault::Pair(a, b) => self.relay(*a, *b).cut(),
            Fault::OneWay(from, to) => {
                // The smaller index is the relay's client.
                let way = if from < to { Way::Up } else { Way::Down };
                self.relay(*from, *to).cut_way(way);
            }
            Fault::Loss(p) => {
                for r in self.mesh.relays.values() {
                    r.set_loss(*p);
                }
            }
            Fault::Delay(base, jitter) => {
                for r in self.mesh.relays.values() {
                    r.set_delay(Duration::from_millis(*base), Duration::from_millis(*jitter));
                }
            }
        }
    }

    async fn go(&mut self) -> Result<Report, String> {
        let mut rng = StdRng::seed_from_u64(self.plan.seed);
        let n = NAMES.len();
        for round in 0..self.plan.rounds {
            let restart = rng
                .random_bool(self.plan.restart_chance)
                .then(|| rng.random_range(0..n));
            let fault = match rng.random_range(0..13) {
                0 | 1 => Fault::None,
                2..=4 => {
                    let mut nodes: Vec<usize> = (0..n).collect();
                    for i in (1..n).rev() {
                        nodes.swap(i, rng.random_range(0..=i));
                    }
                    let cut = rng.random_range(1..n);
                    let (l, r) = nodes.split_at(cut);
                    Fault::Halves(l.to_vec(), r.to_vec())
                }
                5 | 6 => Fault::Isolate(rng.random_range(0..n)),
                7 | 8 => {
                    let a = rng.random_range(0..n);
                    let b = (a + rng.random_range(1..n)) % n;
                    Fault::Pair(a, b)
                }
                9 | 10 => {
                    let a = rng.random_range(0..n);
                    let b = (a + rng.random_range(1..n)) % n;
                    Fault::OneWay(a, b)
                }
                11 => Fault::Loss(rng.random_range(0.05..0.3)),
                _ => Fault::Delay(rng.random_range(20..=50), rng.random_range(0..=20)),
            };
            let ms = rng.random_range(self.plan.round_ms.0..=self.plan.round_ms.1);
            let _ = writeln!(
                self.schedule,
                "  round {round} at {} ms: {fault:?} for {ms} ms{}",
                self.ms(),
                restart.map_or(String::new(), |i| format!(", restart of {}", NAMES[i]))
            );
            self.heal_all();
            if let Some(i) = restart {
                self.restart(i).await;
                // The new node's relays start without the plan's delay.
                self.heal_all();
            }
            self.apply(&fault);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.heal_all();
        let _ = writeln!(self.schedule, "  healed at {} ms", self.ms());
        self.report.rounds = self.plan.rounds;
        // The writers go on for a while over the healed network, then stop.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in 0..n {
            self.stop_writer(i).await;
        }
        let _ = writeln!(self.schedule, "  writers stopped at {} ms", self.ms());
        let healed = Instant::now();
        let deadline = healed + CONVERGE;
        loop {
            if self.converged() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "(a) the members differ {CONVERGE:?} after the heal:\n{}",
                    self.differences()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.report.converged_in = healed.elapsed();
        let _ = writeln!(
            self.schedule,
            "  converged at {} ms ({:?} after the writers stopped)",
            self.ms(),
            self.report.converged_in
        );
        self.check()
    }

    fn converged(&self) -> bool {
        let n = NAMES.len();
        if self.tables.iter().any(|t| t.nodes().len() != n - 1) {
            return false;
        }
        let first = sorted(self.tables[0].to_vec());
        self.tables[1..].iter().all(|t| sorted(t.to_vec()) == first)
    }

    fn differences(&self) -> String {
        let mut out = String::new();
        let all: Vec<BTreeMap<String, u64>> = self
            .tables
            .iter()
            .map(|t| t.to_vec().into_iter().collect())
            .collect();
        for (i, t) in self.tables.iter().enumerate() {
            let _ = writeln!(
                out,
                "  {}: {} records, members {:?}",
                NAMES[i],
                t.len(),
                t.nodes()
            );
        }
        let mut keys: Vec<&String> = all.iter().flat_map(|m| m.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let vs: Vec<Option<u64>> = all.iter().map(|m| m.get(k).copied()).collect();
            if vs.windows(2).any(|w| w[0] != w[1]) {
                let _ = writeln!(out, "  {k}: {vs:?}");
            }
        }
        out
    }

    /// (b) and (c) on the converged table.
    fn check(&mut self) -> Result<Report, String> {
        let table: BTreeMap<String, u64> = self.tables[0].to_vec().into_iter().collect();
        let log = self.log.lock().unwrap().clone();
        self.report.calls = log.len();
        self.report.acked = log.iter().filter(|l| l.ok).count();
        self.report.failed = log.len() - self.report.acked;
        self.report.records = table.len();
        let mut errors = Vec::new();
        // (c) Nothing of an incarnation that is gone.
        for (k, v) in &table {
            let inc = writer_of(*v);
            if !self.incs.get(inc).is_some_and(|i| i.alive) {
                errors.push(format!(
                    "(c) {k} = {v} was written by incarnation {inc} ({}), which is gone",
                    self.incs.get(inc).map_or("?", |i| NAMES[i.node])
                ));
            }
        }
        // Calls per key, in the order they were made.
        let mut by_key: HashMap<String, Vec<(usize, Option<u64>)>> = HashMap::new();
        for (i, l) in log.iter().enumerate() {
            match &l.call {
                Call::Put(recs) => {
                    for (k, v) in recs {
                        by_key.entry(k.clone()).or_default().push((i, Some(*v)));
                    }
                }
                Call::Del(k) => by_key.entry(k.clone()).or_default().push((i, None)),
            }
        }
        // (b) Own keys of running incarnations.
        for (inc, incarnation) in self.incs.iter().enumerate() {
            if !incarnation.alive {
                continue;
            }
            for n in 0..self.plan.own_keys {
                let k = own_key(incarnation.node, n);
                let calls: Vec<(usize, Option<u64>)> = by_key
                    .get(&k)
                    .map(|c| {
                        c.iter()
                            .copied()
                            .filter(|(i, _)| log[*i].inc == inc)
                            .collect()
                    })
                    .unwrap_or_default();
                let last_ok = calls.iter().rposition(|(i, _)| log[*i].ok);
                let mut allowed: Vec<Option<u64>> = Vec::new();
                match last_ok {
                    Some(p) => allowed.push(calls[p].1),
                    None => allowed.push(None),
                }
                let after = last_ok.map_or(0, |p| p + 1);
                allowed.extend(calls[after..].iter().map(|(_, r)| *r));
                let got = table.get(&k).copied();
                if !allowed.contains(&got) {
                    errors.push(format!(
                        "(b) {k} = {got:?}, allowed {allowed:?}; calls on it by {} (incarnation {inc}):\n{}",
                        NAMES[incarnation.node],
                        self.history(&log, &calls)
                    ));
                }
            }
        }
        // (b) Shared keys: an acknowledged insert that started after every other call on the
        // key had ended is the newest write of it, by any clock.
        for n in 0..self.plan.shared_keys {
            let k = shared_key(n);
            let Some(calls) = by_key.get(&k) else {
                continue;
            };
            let Some(&(last, value)) = calls.iter().max_by_key(|(i, _)| log[*i].start) else {
                continue;
            };
            let l = &log[last];
            let others_end = calls
                .iter()
                .filter(|(i, _)| *i != last)
                .map(|(i, _)| log[*i].end)
                .max();
            let alone = others_end.is_none_or(|e| l.start > e + Duration::from_millis(5));
            if l.ok && alone && self.incs[l.inc].alive {
                if let Some(v) = value {
                    if table.get(&k) != Some(&v) {
                        errors.push(format!(
                            "(b) {k} = {:?}, but the last call on it, acknowledged, wrote {v}:\n{}",
                            table.get(&k),
                            self.history(&log, calls)
                        ));
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(self.report.clone())
        } else {
            Err(errors.join("\n"))
        }
    }

    fn history(&self, log: &[Logged], calls: &[(usize, Option<u64>)]) -> String {
        let mut out = String::new();
        for (i, r) in calls.iter().rev().take(8).rev() {
            let l = &log[*i];
            let _ = writeln!(
                out,
                "    {:>6}..{:>6} ms {} inc {} {} -> {}",
                l.start.duration_since(self.epoch).as_millis(),
                l.end.duration_since(self.epoch).as_millis(),
                NAMES[self.incs[l.inc].node],
                l.inc,
                match r {
                    Some(v) => format!("put {v}"),
                    None => "delete".to_string(),
                },
                if l.ok {
                    "ok".to_string()
                } else {
                    format!("failed: {}", l.err.clone().unwrap_or_default())
                }
            );
        }
        out
    }
}

fn sorted(mut v: Vec<(String, u64)>) -> Vec<(String, u64)> {
    v.sort();
    v
}

async fn write_loop(
    table: T,
    node: usize,
    inc: usize,
    plan: Plan,
    seed: u64,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Logged>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seq: u64 = 0;
    let mut value = || {
        seq += 1;
        ((inc as u64) << 32) | seq
    };
    while !stop.load(Ordering::Relaxed) {
        let call = match rng.random_range(0..100) {
            0..35 => Call::Put(vec![(
                own_key(node, rng.random_range(0..plan.own_keys)),
                value(),
            )]),
            35..50 => {
                let mut keys: Vec<usize> = (0..rng.random_range(2..5))
                    .map(|_| rng.random_range(0..plan.own_keys))
                    .collect();
                keys.sort();
                keys.dedup();
                Call::Put(
                    keys.into_iter()
                        .map(|n| (own_key(node, n), value()))
                        .collect(),
                )
            }
            50..70 => Call::Del(own_key(node, rng.random_range(0..plan.own_keys))),
            70..90 => Call::Put(vec![(
                shared_key(rng.random_range(0..plan.shared_keys)),
                value(),
            )]),
            _ => Call::Del(shared_key(rng.random_range(0..plan.shared_keys))),
        };
        let start = Instant::now();
        let result = match &call {
            Call::Put(recs) if recs.len() == 1 => table.insert(recs[0].0.clone(), recs[0].1).await,
            Call::Put(recs) => table.insert_many(recs.clone()).await,
            Call::Del(k) => table.delete(k).await,
        };
        let end = Instant::now();
        let stopped = matches!(result, Err(cets::Error::Shutdown));
        log.lock().unwrap().push(Logged {
            inc,
            call,
            start,
            end,
            ok: result.is_ok(),
            err: result.err().map(|e| e.to_string()),
        });
        if stopped {
            return;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1..6))).await;
    }
}

/// The seeds and rounds to run: `CETS_NEMESIS_SEED` replays one seed, `CETS_NEMESIS_ROUNDS`
/// sets the rounds per seed, `CETS_NEMESIS_SEEDS` the number of seeds drawn from `base`.
pub fn plans(default_seeds: usize, default_rounds: usize, base: u64) -> Vec<Plan> {
    let rounds = std::env::var("CETS_NEMESIS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default_rounds);
    if let Some(seed) = std::env::var("CETS_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![Plan::new(seed, rounds)];
    }
    let seeds = std::env::var("CETS_NEMESIS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_seeds);
    (0..seeds as u64)
        .map(|i| Plan::new(base.wrapping_add(i), rounds))
        .collect()
}
