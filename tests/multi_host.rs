//! A multi-host check: four nodes as separate processes, each in its own network namespace,
//! each on a subnet of its own behind a veth pair to a router in a fifth namespace (nothing is
//! added to the host's own network). The router sends every packet between two nodes through a
//! userspace relay on a TUN device (`common/tun_relay.rs`, a child process in the router's
//! namespace), which can delay them: this kernel has no netem. Every node writes; then,
//! checking each time that all four hold the same records (`to_vec`, reported by each process):
//!
//! - loss: every namespace drops a share of the packets it receives (`iptables -m statistic`);
//! - a partition of one namespace (iptables DROP both ways) and its heal;
//! - a SIGKILL and restart of one node process under the same name and address: the time from
//!   the new process's start until every node lists it as a member (and it lists them) is
//!   printed; the target is 100 ms, reported, not asserted;
//! - delay: the relay holds every packet 20 ms plus up to 30 ms more (so packets overtake each
//!   other), each way, with loss on every receiver, while every node writes throughout (a
//!   background writer in each process) through a partition of one namespace and its heal:
//!   every write of every node is then held identically by all four.
//!
//! Before all that, the four processes start at once, and the time from the last one's start
//! until every node lists the other three as members is printed (QUIC loses some of the very
//! first packets between namespaces whose nodes are starting; see `NodeConfig::initial_rtt`).
//!
//! The child process is this test binary itself, run inside a namespace with `ip netns exec`
//! and driven by a line protocol on its stdin/stdout (see `netns_child`). Names carry the test
//! process's id, so parallel runs do not clash; a guard deletes the namespaces on exit, also on
//! panic. Where `ip netns` is not permitted (not root, no CAP_NET_ADMIN, no `ip` or `iptables`,
//! no TUN device)
//! the test prints why and passes, unless `CETS_NETNS_REQUIRED` is set (`.ci/run` sets it where
//! its own probe succeeds). With `CETS_NETNS_LOGDIR=<dir>` each node process writes its log
//! there (filter `CETS_NETNS_LOG`, default `cets=debug`).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cets::discovery::StaticDiscovery;
use cets::{Node, NodeConfig, Table, TableOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

#[path = "common/tun_relay.rs"]
mod tun_relay;

type Kv = Table<String, String>;
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const PORT: u16 = 7400;
/// Share of packets each namespace drops in the loss phase.
const LOSS: &str = "0.15";
/// Delay of every packet between two nodes in the delay phase, each way, plus a random share of
/// `JITTER`.
const DELAY: Duration = Duration::from_millis(20);
const JITTER: Duration = Duration::from_millis(30);
/// Pace of a node's background writer in the delay phase.
const WRITE_EVERY: Duration = Duration::from_millis(10);
/// Generous: what the test waits for takes well under a second on an idle machine.
const DEADLINE: Duration = Duration::from_secs(20);

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

/// Node `i`'s address: each node has a subnet of its own, so that every packet between two
/// nodes is routed through the router namespace and its delaying relay.
fn addr(i: usize) -> SocketAddr {
    format!("10.77.{}.2:{PORT}", i + 1).parse().unwrap()
}

/// The router's address on node `i`'s subnet.
fn gateway(i: usize) -> String {
    format!("10.77.{}.1", i + 1)
}

/// Runs only as a child process, inside a namespace: one node, driven by lines on stdin.
/// Environment `CETS_NETNS_CHILD` = `name|listen|peer,peer,...`. Prints `started <unix µs>`
/// first, `ready` once its table runs. Commands, each answered by one line:
/// `put K V` -> `ok` or `err ...`; `dump` -> `dump k=v;k=v...` (sorted);
/// `nodes` -> `nodes a,b,...`; `await a,b` -> `member <unix µs>` once the table lists all of
/// them (or `timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of nodes_in_namespaces_converge; not a test by itself"]
async fn netns_child() {
    let started = now_us();
    let Ok(spec) = std::env::var("CETS_NETNS_CHILD") else {
        return;
    };
    println!("started {started}");
    let parts: Vec<&str> = spec.split('|').collect();
    // For diagnosis: each process logs to `<dir>/<name>-<start µs>.log`.
    if let Ok(dir) = std::env::var("CETS_NETNS_LOGDIR") {
        let f = std::fs::File::create(format!("{dir}/{}-{started}.log", parts[0])).unwrap();
        let filter = std::env::var("CETS_NETNS_LOG").unwrap_or_else(|_| "cets=debug".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::sync::Mutex::new(f))
            .with_ansi(false)
            .try_init();
    }
    let peers: Vec<SocketAddr> = parts[2].split(',').map(|s| s.parse().unwrap()).collect();
    let node = Node::builder(parts[0])
        .listen(parts[1].parse().unwrap())
        .cookie("netns")
        .config(NodeConfig::fast_failover())
        .discovery(StaticDiscovery::new(peers))
        .start()
        .await
        .unwrap();
    let t: Kv = node
        .start(
            "kv",
            TableOptions::set().ack_timeout(Duration::from_secs(3)),
        )
        .await
        .unwrap();
    println!("ready");
    // The background writer (`writes` / `stop`): how many keys it wrote, and its task.
    let written = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer: Option<tokio::task::JoinHandle<usize>> = None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["put", k, v] => match t.insert(k.to_string(), v.to_string()).await {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("err {e}"),
            },
            ["dump"] => {
                let mut all = t.to_vec();
                all.sort();
                let recs: Vec<String> = all.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("dump {}", recs.join(";"))
            }
            ["nodes"] => format!("nodes {}", t.nodes().join(",")),
            ["writes", prefix] => {
                let (t, prefix) = (t.clone(), prefix.to_string());
                let (written, stop) = (written.clone(), stop.clone());
                written.store(0, Ordering::SeqCst);
                stop.store(false, Ordering::SeqCst);
                // One awaited write after another; an error (an ack timeout while a link is
                // down) still leaves the write applied here, so it counts. Paced (a node cut
                // off writes without waiting for anyone): at most one write per WRITE_EVERY.
                writer = Some(tokio::spawn(async move {
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let _ = t.insert(format!("{prefix}-{n}"), prefix.clone()).await;
                        n += 1;
                        written.store(n, Ordering::SeqCst);
                        tokio::time::sleep(WRITE_EVERY).await;
                    }
                    n
                }));
                "writing".to_string()
            }
            ["written"] => format!("written {}", written.load(Ordering::SeqCst)),
            ["stop"] => {
                stop.store(true, Ordering::SeqCst);
                match writer.take() {
                    Some(w) => format!("wrote {}", w.await.unwrap_or(0)),
                    None => "err no writer".to_string(),
                }
            }
            ["await", names] => {
                let want: Vec<&str> = names.split(',').collect();
                let start = Instant::now();
                loop {
                    let have = t.nodes();
                    if want.iter().all(|w| have.iter().any(|h| h == w)) {
                        break format!("member {}", now_us());
                    }
                    if start.elapsed() > DEADLINE {
                        break "timeout".to_string();
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            }
            _ => format!("err unknown command {line:?}"),
        };
        println!("{reply}");
    }
}

/// Runs only as a child process, in the router namespace: the relay that delays every packet
/// between two nodes (`tun_relay`).
#[test]
#[ignore = "child process of nodes_in_namespaces_converge (its delaying relay); not a test by itself"]
fn netns_relay() {
    if std::env::var_os("CETS_NETNS_RELAY").is_none() {
        return;
    }
    let tun = tun_relay::open_tun("tun0").unwrap();
    tun_relay::run(tun);
}

/// Runs `cmd args` and fails the test if it fails.
fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output();
    let out = out.unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Four namespaces with a node address each, routed through a fifth; all deleted on drop.
struct Net {
    prefix: String,
}

impl Net {
    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    fn router_ns(&self) -> String {
        format!("{}rt", self.prefix)
    }

    fn in_ns(&self, ns: &str, cmd: &[&str]) {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(cmd);
        run("ip", &args);
    }

    /// Builds the network, or says why it cannot here.
    fn create() -> Result<Net, String> {
        for tool in ["ip", "iptables"] {
            let found = Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if found.is_err() {
                return Err(format!("`{tool}` is not installed"));
            }
        }
        let net = Net {
            prefix: format!("cets{}", std::process::id()),
        };
        // The probe: the first namespace. Its failure means no permission here.
        let out = Command::new("ip")
            .args(["netns", "add", &net.router_ns()])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "`ip netns add` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let rt = net.router_ns();
        // A router: forwards, and checks no reverse path (packets come back from the TUN
        // device with the nodes' source addresses).
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            net.in_ns(&rt, &["sysctl", "-q", "-w", key]);
        }
        // Whatever does not come from the relay's TUN device is routed into it; what the relay
        // writes back is routed to the destination's veth.
        let tun = Command::new("ip")
            .args([
                "netns", "exec", &rt, "ip", "tuntap", "add", "dev", "tun0", "mode", "tun",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !tun.status.success() {
            return Err(format!(
                "`ip tuntap add` failed (the delaying relay needs /dev/net/tun): {}",
                String::from_utf8_lossy(&tun.stderr).trim()
            ));
        }
        net.in_ns(&rt, &["ip", "link", "set", "tun0", "up"]);
        net.in_ns(
            &rt,
            &[
                "ip", "route", "add", "default", "dev", "tun0", "table", "100",
            ],
        );
        net.in_ns(
            &rt,
            &[
                "ip", "rule", "add", "iif", "tun0", "lookup", "main", "pref", "100",
            ],
        );
        net.in_ns(&rt, &["ip", "rule", "add", "lookup", "100", "pref", "200"]);
        for i in 0..NAMES.len() {
            let ns = net.ns(i);
            run("ip", &["netns", "add", &ns]);
            let outer = format!("v{i}");
            // Both ends are made in the router's namespace, then one moves to the node's.
            net.in_ns(
                &rt,
                &[
                    "ip", "link", "add", &outer, "type", "veth", "peer", "name", "eth0",
                ],
            );
            net.in_ns(&rt, &["ip", "link", "set", "eth0", "netns", &ns]);
            let gw = format!("{}/24", gateway(i));
            net.in_ns(&rt, &["ip", "addr", "add", &gw, "dev", &outer]);
            net.in_ns(&rt, &["ip", "link", "set", &outer, "up"]);
            let ip = format!("{}/24", addr(i).ip());
            net.in_ns(&ns, &["ip", "addr", "add", &ip, "dev", "eth0"]);
            net.in_ns(&ns, &["ip", "link", "set", "eth0", "up"]);
            net.in_ns(&ns, &["ip", "link", "set", "lo", "up"]);
            net.in_ns(&ns, &["ip", "route", "add", "default", "via", &gateway(i)]);
        }
        Ok(net)
    }

    fn iptables(&self, i: usize, rule: &[&str]) {
        let mut cmd = vec!["iptables"];
        cmd.extend_from_slice(rule);
        self.in_ns(&self.ns(i), &cmd);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces, and a veth goes with either end.
        for ns in (0..NAMES.len())
            .map(|i| self.ns(i))
            .chain([self.router_ns()])
        {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A node process and its line protocol.
struct Proc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    started_us: u128,
}

impl Proc {
    async fn spawn(net: &Net, i: usize) -> Proc {
        let mut p = Proc::launch(net, i);
        p.wait_ready().await;
        p
    }

    /// Starts the process; `wait_ready` then reads its first two lines.
    fn launch(net: &Net, i: usize) -> Proc {
        let peers: Vec<String> = (0..NAMES.len())
            .filter(|&j| j != i)
            .map(|j| addr(j).to_string())
            .collect();
        let spec = format!("{}|{}|{}", NAMES[i], addr(i), peers.join(","));
        Proc::run_in(&net.ns(i), "netns_child", ("CETS_NETNS_CHILD", &spec))
    }

    /// Runs this test binary's ignored test `test` in the namespace `ns`, with `env` set.
    fn run_in(ns: &str, test: &str, env: (&str, &str)) -> Proc {
        let exe = std::env::current_exe().unwrap();
        let mut child = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args([
                "--ignored",
                "--exact",
                test,
                "--nocapture",
                "--test-threads=1",
            ])
            .env(env.0, env.1)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Proc {
            child,
            stdin,
            lines,
            started_us: 0,
        }
    }

    /// The delaying relay of the router namespace, once it runs.
    async fn relay(net: &Net) -> Proc {
        let mut relay = Proc::run_in(&net.router_ns(), "netns_relay", ("CETS_NETNS_RELAY", "1"));
        relay.expect("relay ready").await;
        relay
    }

    /// Sets the relay's delay of every packet: `base` plus a random share of `jitter`.
    async fn set_delay(&mut self, base: Duration, jitter: Duration) {
        let cmd = format!("delay {} {}", base.as_micros(), jitter.as_micros());
        self.ask(&cmd, "delay ok").await;
    }

    async fn wait_ready(&mut self) {
        let started = self.expect("started").await;
        self.started_us = started.trim().parse().unwrap();
        self.expect("ready").await;
    }

    /// When (unix µs) this node listed all of `names` as members of its table.
    async fn member_at(&mut self, names: &[&str]) -> u128 {
        let cmd = format!("await {}", names.join(","));
        self.ask(&cmd, "member").await.parse().unwrap()
    }

    /// The rest of the next line that starts with `word` (other lines, such as the test
    /// harness's, are skipped).
    async fn expect(&mut self, word: &str) -> String {
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                // The harness's "test netns_child ... " shares the first line.
                let line = line.rsplit(" ... ").next().unwrap_or_default().to_string();
                if let Some(rest) = line.strip_prefix(word) {
                    return rest.trim_start().to_string();
                }
                if line.starts_with("err") || line == "timeout" {
                    panic!("node answered {line:?} while {word:?} was expected");
                }
            }
            panic!("node exited before {word:?}");
        };
        tokio::time::timeout(DEADLINE + Duration::from_secs(5), read)
            .await
            .unwrap_or_else(|_| panic!("no {word:?} from the node"))
    }

    async fn ask(&mut self, cmd: &str, word: &str) -> String {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        self.expect(word).await
    }

    /// A write; `err` (an ack timeout while a link is down) is allowed: the write stays applied.
    async fn put(&mut self, k: &str, v: &str) {
        self.stdin
            .write_all(format!("put {k} {v}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
        let reply = async {
            loop {
                let line = self.lines.next_line().await.unwrap();
                match line {
                    Some(line) if line == "ok" || line.starts_with("err") => return,
                    Some(_) => {}
                    None => panic!("node exited before answering put {k}"),
                }
            }
        };
        tokio::time::timeout(DEADLINE + Duration::from_secs(5), reply)
            .await
            .unwrap_or_else(|_| panic!("no answer to put {k} from the node"));
    }

    async fn nodes(&mut self) -> Vec<String> {
        let s = self.ask("nodes", "nodes").await;
        s.split(',')
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect()
    }
}

/// Waits until every node holds the same records and lists the other three as members;
/// returns the records and how long it took.
async fn converge(procs: &mut [Proc], what: &str) -> (String, Duration) {
    let start = Instant::now();
    let others = procs.len() - 1;
    loop {
        let mut dumps = Vec::new();
        let mut full = true;
        for p in procs.iter_mut() {
            dumps.push(p.ask("dump", "dump").await);
            full &= p.nodes().await.len() == others;
        }
        if full && dumps.iter().all(|d| *d == dumps[0]) {
            return (dumps.swap_remove(0), start.elapsed());
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: not identical after {DEADLINE:?}: {dumps:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn write_round(procs: &mut [Proc], round: &str, n: usize) {
    for (i, p) in procs.iter_mut().enumerate() {
        for j in 0..n {
            p.put(&format!("{}-{round}-{j}", NAMES[i]), round).await;
        }
    }
}

fn count(dump: &str) -> usize {
    dump.split(';').filter(|r| !r.is_empty()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_in_namespaces_converge() {
    let net = match Net::create() {
        Ok(net) => net,
        Err(why) => {
            assert!(
                std::env::var_os("CETS_NETNS_REQUIRED").is_none(),
                "CETS_NETNS_REQUIRED is set but network namespaces do not work: {why}"
            );
            eprintln!("SKIPPED nodes_in_namespaces_converge: {why} (needs root or CAP_NET_ADMIN, ip, iptables, /dev/net/tun)");
            return;
        }
    };
    // All four processes start at once; measured: from the last one's start until every node
    // lists the other three as members.
    // The relay runs first: every packet between two nodes passes through it (without delay
    // until the last phase).
    let mut relay = Proc::relay(&net).await;
    let mut procs: Vec<Proc> = (0..NAMES.len()).map(|i| Proc::launch(&net, i)).collect();
    for p in procs.iter_mut() {
        p.wait_ready().await;
    }
    let mut formed = 0;
    for (i, p) in procs.iter_mut().enumerate() {
        let others: Vec<&str> = NAMES.iter().copied().filter(|n| *n != NAMES[i]).collect();
        formed = formed.max(p.member_at(&others).await);
    }
    let first = procs.iter().map(|p| p.started_us).min().unwrap();
    let last = procs.iter().map(|p| p.started_us).max().unwrap();
    eprintln!(
        "formed: every node a member everywhere {:.1} ms after the last process started ({:.1} ms after the first)",
        formed.saturating_sub(last) as f64 / 1000.0,
        formed.saturating_sub(first) as f64 / 1000.0
    );

    // Every node writes; all four hold the same 4 x 20 records.
    write_round(&mut procs, "r0", 20).await;
    let (dump, took) = converge(&mut procs, "first writes").await;
    assert_eq!(count(&dump), 80);
    eprintln!("first writes: identical {took:?} after the last write");

    // Loss: every namespace drops LOSS of the packets it receives, while all write.
    for i in 0..NAMES.len() {
        net.iptables(i, &loss_rule());
    }
    write_round(&mut procs, "loss", 20).await;
    let (dump, took) = converge(&mut procs, "under loss").await;
    assert_eq!(count(&dump), 160);
    eprintln!("{LOSS} loss on every receiver: identical {took:?} after the last write");
    for i in 0..NAMES.len() {
        net.iptables(i, &["-F"]);
    }

    // A partition of c's namespace, both ways: both sides notice, all write, then the heal.
    let c = 2;
    net.iptables(c, &["-A", "INPUT", "-i", "eth0", "-j", "DROP"]);
    net.iptables(c, &["-A", "OUTPUT", "-o", "eth0", "-j", "DROP"]);
    until_apart(&mut procs, c).await;
    write_round(&mut procs, "part", 10).await;
    net.iptables(c, &["-F"]);
    let (dump, took) = converge(&mut procs, "after the heal").await;
    assert_eq!(count(&dump), 200);
    eprintln!("partition of c healed: identical {took:?} after the heal");

    // Restart: d is SIGKILLed; once the others dropped it, a new process starts under the
    // same name and address. Measured: its start until every node lists it and it lists all.
    let d = 3;
    procs[d].child.start_kill().unwrap();
    procs[d].child.wait().await.unwrap();
    let start = Instant::now();
    loop {
        let mut gone = true;
        for p in procs[..d].iter_mut() {
            gone &= !p.nodes().await.contains(&"d".to_string());
        }
        if gone {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the killed node was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    procs[d] = Proc::spawn(&net, d).await;
    let mut last = procs[d].member_at(&["a", "b", "c"]).await;
    for p in procs[..d].iter_mut() {
        last = last.max(p.member_at(&["d"]).await);
    }
    let member_ms = (last - procs[d].started_us) as f64 / 1000.0;
    eprintln!("restarted d: a member everywhere {member_ms:.1} ms after its process started (target 100 ms)");
    // The killed incarnation's records are gone everywhere; the new one writes and all agree.
    write_round(&mut procs, "after", 5).await;
    let (dump, took) = converge(&mut procs, "after the restart").await;
    assert_eq!(count(&dump), 200 - 50 + 20);
    assert!(
        !dump.contains("d-r0-"),
        "records of the killed incarnation remain"
    );
    eprintln!("after the restart: identical {took:?} after the last write");

    // Delay: the relay holds every packet between two nodes DELAY plus up to JITTER (so
    // packets also overtake each other), every receiver drops LOSS, and every node writes
    // throughout, through a partition of b and its heal.
    relay.set_delay(DELAY, JITTER).await;
    // The relay does delay: a write is acknowledged after its frame reached the peers and
    // their acks came back, two crossings of the relay.
    let sent = Instant::now();
    procs[0].put("delayed", "1").await;
    let acked = sent.elapsed();
    assert!(
        acked >= 2 * DELAY,
        "a write was acknowledged after {acked:?}"
    );
    for i in 0..NAMES.len() {
        net.iptables(i, &loss_rule());
    }
    for (i, p) in procs.iter_mut().enumerate() {
        p.ask(&format!("writes {}-dl", NAMES[i]), "writing").await;
    }
    wrote_more(&mut procs, "before the partition").await;
    let b = 1;
    net.iptables(b, &["-A", "INPUT", "-i", "eth0", "-j", "DROP"]);
    net.iptables(b, &["-A", "OUTPUT", "-o", "eth0", "-j", "DROP"]);
    until_apart(&mut procs, b).await;
    wrote_more(&mut procs, "during the partition").await;
    net.iptables(b, &["-F"]);
    net.iptables(b, &loss_rule());
    let healed = Instant::now();
    let start = Instant::now();
    loop {
        let mut joined = true;
        for p in procs.iter_mut() {
            joined &= p.nodes().await.len() == NAMES.len() - 1;
        }
        if joined {
            break;
        }
        // Twice the usual deadline: b's dials failed during the partition and back off (up
        // to 2 s), and the join takes several delayed round trips, each lossy (1 to 6 s here).
        assert!(
            start.elapsed() < 2 * DEADLINE,
            "b did not join again under delay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let joined = healed.elapsed();
    wrote_more(&mut procs, "after the heal").await;
    let mut wrote = Vec::new();
    for p in procs.iter_mut() {
        wrote.push(p.ask("stop", "wrote").await.parse::<usize>().unwrap());
    }
    let (dump, took) = converge(&mut procs, "under delay, loss, a partition and its heal").await;
    // Every write of every node is there, acknowledged or not (an unacknowledged one stayed
    // applied on its node, and the heal's join carried it).
    assert_eq!(count(&dump), 171 + wrote.iter().sum::<usize>());
    for (i, n) in wrote.iter().enumerate() {
        for j in 0..*n {
            let rec = format!("{}-dl-{j}={}-dl", NAMES[i], NAMES[i]);
            assert!(dump.split(';').any(|r| r == rec), "{rec} is missing");
        }
    }
    eprintln!(
        "{DELAY:?} + up to {JITTER:?} each way, {LOSS} loss, b partitioned and healed, writes {wrote:?} (one acknowledged after {acked:?}): \
         b a member everywhere {joined:?} after the heal, identical {took:?} after the last write"
    );
    relay.set_delay(Duration::ZERO, Duration::ZERO).await;
    drop(procs);
    drop(relay);
    drop(net);
}

/// The rule that drops LOSS of the packets a namespace receives.
fn loss_rule() -> Vec<&'static str> {
    vec![
        "-A",
        "INPUT",
        "-m",
        "statistic",
        "--mode",
        "random",
        "--probability",
        LOSS,
        "-j",
        "DROP",
    ]
}

/// Waits until node `x` lists no member and no other node lists `x`.
async fn until_apart(procs: &mut [Proc], x: usize) {
    let start = Instant::now();
    loop {
        let mut apart = procs[x].nodes().await.is_empty();
        for (i, p) in procs.iter_mut().enumerate() {
            if i != x {
                apart &= !p.nodes().await.contains(&NAMES[x].to_string());
            }
        }
        if apart {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the partition of {} was not noticed",
            NAMES[x]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every node's background writer wrote a few more keys.
async fn wrote_more(procs: &mut [Proc], when: &str) {
    let mut from = Vec::new();
    for p in procs.iter_mut() {
        from.push(p.ask("written", "written").await.parse::<usize>().unwrap());
    }
    let start = Instant::now();
    for (p, from) in procs.iter_mut().zip(from) {
        loop {
            let n: usize = p.ask("written", "written").await.parse().unwrap();
            if n >= from + 3 {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "a node wrote {} keys, not 3, {when}",
                n - from
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
