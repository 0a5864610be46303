//! The transport over real QUIC on loopback: one connection per pair, cookie authentication,
//! refusal of incompatible tables, robustness against garbage from the network, restarts.
//!
//! The robustness tests speak the wire protocol themselves with a raw quinn client (TLS, the
//! cookie handshake, frames), built here from `src/transport/` and `src/proto.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cets::discovery::{StaticDiscovery, StaticDiscoveryHandle};
use cets::{Node, NodeConfig, NodeId, Table, TableOptions};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type T = Table<u64, String>;

const COOKIE: &str = "test-cookie";

/// Two connected nodes `n1`, `n2` (in this name order) with a joined set table `t` each, and
/// the `on_node_down` calls their tables saw.
struct Pair {
    nodes: Vec<Node>,
    tables: Vec<T>,
    downs: Vec<Downs>,
    _handles: Vec<StaticDiscoveryHandle>,
}

async fn pair_with(config: NodeConfig) -> Pair {
    let mut nodes = Vec::new();
    let mut handles = Vec::new();
    for n in ["n1", "n2"] {
        let (node, h) = node_with(n, COOKIE, config.clone()).await;
        nodes.push(node);
        handles.push(h);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(Node::local_addr).collect();
    for h in &handles {
        h.set(addrs.clone());
    }
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for n in &nodes {
        let d = Downs::default();
        tables.push(n.start("t", d.opts(TableOptions::set())).await.unwrap());
        downs.push(d);
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    Pair {
        nodes,
        tables,
        downs,
        _handles: handles,
    }
}

impl Pair {
    /// Incarnations each node is connected to now.
    async fn links(&self) -> Vec<Vec<NodeId>> {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(
                n.status()
                    .await
                    .connected
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect(),
            );
        }
        out
    }

    /// Writes on each node are on the other one when the write returns; nobody went down.
    async fn still_replicates(&self, tag: u64) {
        for (i, t) in self.tables.iter().enumerate() {
            let k = tag * 10 + i as u64;
            t.insert(k, format!("w{k}")).await.unwrap();
            for u in &self.tables {
                assert_eq!(u.get(&k), Some(format!("w{k}")), "write {k} replicated");
            }
        }
        for d in &self.downs {
            assert_eq!(d.calls(), vec![], "no node went down");
        }
        for (i, t) in self.tables.iter().enumerate() {
            assert_eq!(t.nodes(), vec![["n2", "n1"][i]]);
        }
    }

    async fn shutdown(&self) {
        shutdown_all(&self.nodes).await;
    }

    /// The end of a robustness test: the pair still replicates (writes tagged `tag`), over the
    /// connection it had `before`; then the raw client's endpoint and the nodes are closed.
    async fn ends_unharmed(&self, tag: u64, before: Vec<Vec<NodeId>>, ep: quinn::Endpoint) {
        self.still_replicates(tag).await;
        assert_eq!(
            self.links().await,
            before,
            "the real connection was never replaced"
        );
        ep.close(0u32.into(), b"");
        self.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Simultaneous dial.

/// A port that was free a moment ago (so both nodes can be told each other's address before
/// either starts).
fn free_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_at(name: &str, addr: SocketAddr, peers: Vec<SocketAddr>) -> Node {
    init_tracing();
    Node::builder(name)
        .listen(addr)
        .cookie(COOKIE)
        .config(NodeConfig::fast_failover())
        .discovery(StaticDiscovery::new(peers))
        .start()
        .await
        .expect("node starts")
}

/// Exactly one connection between `a` and `b`, the same one at every sample over `period`
/// (same peer incarnation, no table saw the other go down), while `poke` runs before each
/// sample.
async fn one_stable_connection(
    a: &Node,
    b: &Node,
    ta: &T,
    tb: &T,
    downs: &[Downs],
    period: Duration,
    poke: impl Fn(),
) {
    for (x, y) in [(a, b), (b, a)] {
        let (x, y) = (x.clone(), y.id().clone());
        eventually(WAIT, "connected", || {
            let (x, y) = (x.clone(), y.clone());
            async move { x.status().await.connected.iter().map(|c| &c.0).eq([&y]) }
        })
        .await;
    }
    joined(&[ta, tb]).await;
    always(period, "one connection, never replaced", || {
        poke();
        let (a, b, ta, tb) = (a.clone(), b.clone(), ta.clone(), tb.clone());
        let downs = downs.to_vec();
        async move {
            let sa = a.status().await;
            let sb = b.status().await;
            sa.connected.len() == 1
                && sb.connected.len() == 1
                && sa.connected[0].0 == *b.id()
                && sb.connected[0].0 == *a.id()
                && sa.connected[0].1 == b.local_addr()
                && sb.connected[0].1 == a.local_addr()
                && ta.nodes() == [b.name()]
                && tb.nodes() == [a.name()]
                && downs.iter().all(|d| d.calls().is_empty())
        }
    })
    .await;
    ta.insert(1, "from a".into()).await.unwrap();
    assert_eq!(tb.get(&1).as_deref(), Some("from a"));
    tb.insert(2, "from b".into()).await.unwrap();
    assert_eq!(ta.get(&2).as_deref(), Some("from b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_discovering_each_other_at_once_keep_one_connection() {
    let (pa, pb) = (free_port(), free_port());
    // Both start together, each with the other in its discovery: both dial at once.
    let (a, b) = tokio::join!(start_at("a", pa, vec![pb]), start_at("b", pb, vec![pa]));
    let (da, db) = (Downs::default(), Downs::default());
    let ta: T = a.start("t", da.opts(TableOptions::set())).await.unwrap();
    let tb: T = b.start("t", db.opts(TableOptions::set())).await.unwrap();
    one_stable_connection(&a, &b, &ta, &tb, &[da, db], Duration::from_secs(1), || {}).await;
    shutdown_all([&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_called_on_both_sides_at_once_keeps_one_connection() {
    for round in 0..3 {
        let (a, _ha) = node("a").await;
        let (b, _hb) = node("b").await;
        let (da, db) = (Downs::default(), Downs::default());
        let ta: T = a.start("t", da.opts(TableOptions::set())).await.unwrap();
        let tb: T = b.start("t", db.opts(TableOptions::set())).await.unwrap();
        let (aa, ba) = (a.local_addr(), b.local_addr());
        a.connect(ba);
        b.connect(aa);
        // Keep dialing from both sides while checking that the one connection stays.
        let period = Duration::from_millis(if round == 0 { 1000 } else { 300 });
        let (a2, b2) = (a.clone(), b.clone());
        one_stable_connection(&a, &b, &ta, &tb, &[da, db], period, move || {
            a2.connect(ba);
            b2.connect(aa);
        })
        .await;
        shutdown_all([&a, &b]).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_different_cookies_never_connect() {
    let (x, hx) = node_with("x", "a", NodeConfig::fast_failover()).await;
    let (y, hy) = node_with("y", "b", NodeConfig::fast_failover()).await;
    let tx: T = x.start("t", TableOptions::set()).await.unwrap();
    let ty: T = y.start("t", TableOptions::set()).await.unwrap();
    tx.insert(1, "x".into()).await.unwrap();
    ty.insert(2, "y".into()).await.unwrap();
    hx.set(vec![y.local_addr()]);
    hy.set(vec![x.local_addr()]);
    // Both dial (both discover the other); each is refused, and says why.
    for (n, other) in [(&x, &y), (&y, &x)] {
        let (n, addr) = (n.clone(), other.local_addr());
        eventually(
            WAIT,
            "the peer is reported unavailable for its cookie",
            || {
                let n = n.clone();
                async move {
                    n.status()
                        .await
                        .unavailable
                        .iter()
                        .any(|(a, why)| *a == addr && why.contains("bad cookie"))
                }
            },
        )
        .await;
    }
    let rounds = x.status().await.discovery_rounds;
    always(Duration::from_secs(1), "never connected", || {
        let (x, y, tx, ty) = (x.clone(), y.clone(), tx.clone(), ty.clone());
        async move {
            let (sx, sy) = (x.status().await, y.status().await);
            sx.connected.is_empty()
                && sy.connected.is_empty()
                && !sx.unavailable.is_empty()
                && !sy.unavailable.is_empty()
                && tx.nodes().is_empty()
                && ty.nodes().is_empty()
                && sx.tables.iter().all(|t| t.members.is_empty())
                && sy.tables.iter().all(|t| t.members.is_empty())
        }
    })
    .await;
    // The dials were retried meanwhile (a discovery round every 200 ms).
    assert!(x.status().await.discovery_rounds >= rounds + 3);
    tx.insert(3, "x".into()).await.unwrap();
    assert_eq!(sorted(tx.to_vec()), vec![(1, "x".into()), (3, "x".into())]);
    assert_eq!(ty.to_vec(), vec![(2, "y".to_string())]);
    shutdown_all([&x, &y]).await;
}

// ---------------------------------------------------------------------------------------------
// Incompatible tables.

async fn incompatible<V1: cets::Value, V2: cets::Value>(
    o1: TableOptions<u64, V1>,
    o2: TableOptions<u64, V2>,
    v1: V1,
    v2: V2,
    why: &str,
) {
    let c = cluster(&["x", "y"]).await;
    let (x, y) = (&c[0].0, &c[1].0);
    let tx: Table<u64, V1> = x.start("t", o1).await.unwrap();
    let ty: Table<u64, V2> = y.start("t", o2).await.unwrap();
    // A compatible table on the same nodes: the connection itself works.
    let ox: T = x.start("ok", TableOptions::set()).await.unwrap();
    let oy: T = y.start("ok", TableOptions::set()).await.unwrap();
    joined(&[&ox, &oy]).await;
    // Both sides refuse the other's table, with the reason.
    for (n, other) in [(x, "y"), (y, "x")] {
        let n = n.clone();
        eventually(
            WAIT,
            &format!("{} refuses {other}'s table", n.name()),
            || {
                let n = n.clone();
                async move {
                    let s = n.status().await;
                    let t = s.tables.iter().find(|t| t.name == "t").unwrap();
                    t.refused.iter().any(|(p, r)| {
                        p == other && (r.contains(why) || r.contains("refused by the peer"))
                    })
                }
            },
        )
        .await;
    }
    // A refused peer does not count as a join still due.
    x.wait_for_ready(WAIT).await.unwrap();
    y.wait_for_ready(WAIT).await.unwrap();
    tx.insert(1, v1.clone()).await.unwrap();
    ty.insert(2, v2.clone()).await.unwrap();
    ox.insert(7, "ok".into()).await.unwrap();
    assert_eq!(oy.get(&7).as_deref(), Some("ok"));
    always(Duration::from_millis(800), "no records cross", || {
        let (x, tx, ty) = (x.clone(), tx.clone(), ty.clone());
        async move {
            let s = x.status().await;
            let t = s.tables.iter().find(|t| t.name == "t").unwrap();
            s.connected.len() == 1
                && tx.nodes().is_empty()
                && ty.nodes().is_empty()
                && t.members.is_empty()
                && t.not_joined.is_empty()
                && tx.len() == 1
                && ty.len() == 1
                && tx.get(&2).is_none()
                && ty.get(&1).is_none()
        }
    })
    .await;
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_of_another_kind_is_refused_both_ways() {
    incompatible(
        TableOptions::<u64, String>::set(),
        TableOptions::<u64, String>::bag(),
        "x".to_string(),
        "y".to_string(),
        "kind",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_of_another_value_type_is_refused_both_ways() {
    incompatible(
        TableOptions::<u64, String>::set(),
        TableOptions::<u64, u64>::set(),
        "x".to_string(),
        9u64,
        "types",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Restarts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restarted_under_its_name_is_a_new_incarnation() {
    let names = ["a", "b", "c"];
    let mut c = cluster(&names).await;
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for (n, _) in &c {
        let d = Downs::default();
        tables.push(n.start("t", d.opts(TableOptions::set())).await.unwrap());
        downs.push(d);
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    for (i, t) in tables.iter().enumerate() {
        t.insert_many(
            (0..10)
                .map(|j| (i as u64 * 100 + j, names[i].to_string()))
                .collect(),
        )
        .await
        .unwrap();
    }
    let old = c[2].0.id().clone();
    c[2].0.shutdown().await.unwrap();
    // Graceful: the survivors drop c's records at once.
    for i in 0..2 {
        eventually(WAIT, "c's records dropped", || {
            let t = tables[i].clone();
            async move { t.len() == 20 && t.nodes() == [["b", "a"][i]] }
        })
        .await;
    }

    let (c2, h2) = node("c").await;
    assert_ne!(c2.id().incarnation, old.incarnation);
    let addrs: Vec<SocketAddr> = vec![c[0].0.local_addr(), c[1].0.local_addr(), c2.local_addr()];
    for (_, h) in &c[..2] {
        h.set(addrs.clone());
    }
    h2.set(addrs);
    let d2 = Downs::default();
    let t2: T = c2.start("t", d2.opts(TableOptions::set())).await.unwrap();
    c[2] = (c2.clone(), h2);
    tables[2] = t2.clone();
    joined(&tables.iter().collect::<Vec<_>>()).await;
    for n in &c[..2] {
        let s = n.0.status().await;
        let seen: Vec<&NodeId> = s
            .connected
            .iter()
            .map(|(id, _)| id)
            .filter(|id| id.name == "c")
            .collect();
        assert_eq!(seen, vec![c2.id()], "the new incarnation, only");
    }
    // The new c got a's and b's records, none of the old c's.
    assert_eq!(t2.len(), 20);
    assert!(t2.get(&200).is_none());
    t2.insert(300, "c2".into()).await.unwrap();
    tables[0].insert(301, "a".into()).await.unwrap();
    for t in &tables {
        assert_eq!(t.len(), 22);
        assert_eq!(t.get(&300).as_deref(), Some("c2"));
        assert_eq!(t.get(&301).as_deref(), Some("a"));
    }
    for d in &downs[..2] {
        assert_eq!(d.calls(), vec![(old.clone(), 10)], "old c went down once");
    }
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// A node bound to the IPv6 wildcard (dual stack) sees an IPv4 peer as `[::ffff:a.b.c.d]:p`,
/// while discovery hands it `a.b.c.d:p`. It must still know the two are one address: after the
/// peer restarts, it dials the new incarnation (it used to keep the old address marked as being
/// dialed forever), and `wait_for_ready` settles on its own discovered address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_node_reconnects_to_a_restarted_ipv4_peer() {
    if std::net::UdpSocket::bind("[::]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 socket");
        return;
    }
    init_tracing();
    let b_addr = free_port();
    let b = start_at("b", b_addr, Vec::new()).await;
    let a_wild: SocketAddr = "[::]:0".parse().unwrap();
    let disco = StaticDiscovery::new(vec![b_addr]);
    let a_list = disco.handle();
    let a = Node::builder("a")
        .listen(a_wild)
        .cookie(COOKIE)
        .config(NodeConfig::fast_failover())
        .discovery(disco)
        .start()
        .await
        .expect("a starts on [::]");
    // The nodes file lists every node, a too, by an address other than the one it is bound to.
    let a_v4 = SocketAddr::new([127, 0, 0, 1].into(), a.local_addr().port());
    a_list.set(vec![a_v4, b_addr]);
    let connected_to = |id: NodeId| {
        let a = a.clone();
        move || {
            let (a, id) = (a.clone(), id.clone());
            async move { a.status().await.connected.iter().any(|(c, _)| *c == id) }
        }
    };
    eventually(WAIT, "a connected to b", connected_to(b.id().clone())).await;
    a.wait_for_ready(WAIT).await.expect("a settles");

    // b restarts on the same address; a (the smaller name) must dial the new incarnation.
    let old = b.id().clone();
    b.shutdown().await.unwrap();
    drop(b);
    let mut b2 = None;
    for _ in 0..100 {
        match Node::builder("b")
            .listen(b_addr)
            .cookie(COOKIE)
            .config(NodeConfig::fast_failover())
            .discovery(StaticDiscovery::new(Vec::new()))
            .start()
            .await
        {
            Ok(n) => {
                b2 = Some(n);
                break;
            }
            // The old socket may not be released yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let b2 = b2.expect("b restarts on its address");
    assert_ne!(b2.id(), &old);
    eventually(
        WAIT,
        "a connected to b's new incarnation",
        connected_to(b2.id().clone()),
    )
    .await;
    a.wait_for_ready(WAIT).await.expect("a settles again");
    shutdown_all([&a, &b2]).await;
}

/// The old incarnation is still running (a hung process whose connections have not timed out)
/// when the new one appears: the new one replaces it on every node, deterministically.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_incarnation_replaces_a_live_old_one() {
    let names = ["a", "b", "c"];
    let c = cluster(&names).await;
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for (n, _) in &c {
        let d = Downs::default();
        tables.push(n.start("t", d.opts(TableOptions::set())).await.unwrap());
        downs.push(d);
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    for (i, t) in tables.iter().enumerate() {
        t.insert_many(
            (0..10)
                .map(|j| (i as u64 * 100 + j, names[i].to_string()))
                .collect(),
        )
        .await
        .unwrap();
    }
    let old = c[2].0.clone();
    // The old c dials nobody any more, and a and b only know the new address.
    c[2].1.clear();
    let (c2, h2) = node("c").await;
    let addrs = vec![c[0].0.local_addr(), c[1].0.local_addr(), c2.local_addr()];
    c[0].1.set(addrs.clone());
    c[1].1.set(addrs.clone());
    h2.set(addrs);
    let d2 = Downs::default();
    let t2: T = c2.start("t", d2.opts(TableOptions::set())).await.unwrap();
    joined(&[&tables[0], &tables[1], &t2]).await;
    for i in 0..2 {
        let (n, d, c2) = (c[i].0.clone(), downs[i].clone(), c2.clone());
        let old = old.id().clone();
        eventually(WAIT, "old c replaced and dropped", || {
            let (n, d, c2, old) = (n.clone(), d.clone(), c2.clone(), old.clone());
            async move {
                let s = n.status().await;
                let cs: Vec<&NodeId> = s
                    .connected
                    .iter()
                    .map(|(id, _)| id)
                    .filter(|id| id.name == "c")
                    .collect();
                cs == [c2.id()] && d.calls() == [(old, 10)]
            }
        })
        .await;
    }
    // The old incarnation lost both connections and, alone, dropped a's and b's records.
    let o = old.clone();
    eventually(WAIT, "old c is alone", || {
        let o = o.clone();
        async move { o.status().await.connected.is_empty() }
    })
    .await;
    assert_eq!(sorted(tables[2].to_vec()).len(), 10);
    assert_eq!(tables[2].nodes(), Vec::<String>::new());
    // The cluster works with the new c, which never saw the old c's records.
    assert_eq!(t2.len(), 20);
    t2.insert(300, "c2".into()).await.unwrap();
    tables[1].insert(301, "b".into()).await.unwrap();
    for t in [&tables[0], &tables[1], &t2] {
        assert_eq!(t.len(), 22);
        assert_eq!(t.get(&300).as_deref(), Some("c2"));
        assert!(t.get(&200).is_none());
    }
    let (a, c2c) = (c[0].0.clone(), c2.clone());
    always(
        Duration::from_millis(500),
        "the old c does not come back",
        || {
            let (a, c2c) = (a.clone(), c2c.clone());
            async move {
                let s = a.status().await;
                s.connected
                    .iter()
                    .filter(|(id, _)| id.name == "c")
                    .map(|(id, _)| id)
                    .eq([c2c.id()])
            }
        },
    )
    .await;
    shutdown_all(c.iter().map(|(n, _)| n).chain([&c2])).await;
}

// ---------------------------------------------------------------------------------------------
// Garbage from the network.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_disturb_a_node() {
    let p = pair_with(NodeConfig::fast_failover()).await;
    let before = p.links().await;
    let targets: Vec<SocketAddr> = p.nodes.iter().map(Node::local_addr).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    // Sends garbage until told to stop; returns how many datagrams it sent.
    let blaster = tokio::spawn(async move {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut i = 0usize;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let len = match i % 5 {
                0 => rng.random_range(1..8),
                1 => rng.random_range(8..64),
                2 => rng.random_range(64..1200),
                _ => rng.random_range(1200..1500),
            };
            let mut buf = vec![0u8; len];
            rng.fill(&mut buf[..]);
            if len >= 7 && i.is_multiple_of(2) {
                // Looks like a QUIC long header: Initial, version 1 or an unknown version,
                // with a plausible connection id length.
                buf[0] = 0xc0 | (buf[0] & 0x0f);
                let v: u32 = if i.is_multiple_of(4) { 1 } else { rng.random() };
                buf[1..5].copy_from_slice(&v.to_be_bytes());
                buf[5] = 8;
            } else if len >= 1 && i.is_multiple_of(3) {
                // A short header (1-RTT) packet with a random connection id.
                buf[0] = 0x40 | (buf[0] & 0x3f);
            }
            let _ = sock.send_to(&buf, targets[i % targets.len()]).await;
            if i.is_multiple_of(16) {
                tokio::task::yield_now().await;
            }
            i += 1;
        }
        i
    });
    // Replicate while the garbage arrives.
    let mut tag = 1;
    while tag < 100 {
        p.still_replicates(tag).await;
        tag += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = blaster.await.unwrap();
    assert!(sent >= 300, "only {sent} datagrams sent during the writes");
    p.still_replicates(tag).await;
    assert_eq!(p.links().await, before, "the same connections");
    p.shutdown().await;
}

/// A raw QUIC client that speaks (or breaks) the cets wire protocol.
mod raw {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use cets::{NodeId, TableKind};
    use quinn::crypto::rustls::QuicClientConfig;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::DigitallySignedStruct;
    use serde::{Deserialize, Serialize};

    pub const ALPN: &[u8] = b"cets/1";

    /// Accepts any server certificate (the nodes' are self-signed); checks the signatures.
    #[derive(Debug)]
    struct AnyCert(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// A client-only endpoint on loopback, with keep-alives so that an idle connection is
    /// closed by the node's decision, not by the idle timer.
    pub fn endpoint() -> quinn::Endpoint {
        endpoint_at("127.0.0.1")
    }

    /// A client-only endpoint on the loopback address `ip` (any of 127.0.0.0/8 on Linux).
    pub fn endpoint_at(ip: &str) -> quinn::Endpoint {
        endpoint_with(ip, quinn::TransportConfig::default())
    }

    /// A client endpoint for a peer that leaves a stream unread: it grants the node 64 KiB of
    /// data in flight, which its UDP socket's buffer holds, where the default windows let the
    /// node send over a megabyte at once. Without this, the datagrams the socket drops can
    /// include the node's CONNECTION_CLOSE, and the test sees a stateless reset in its place.
    pub fn unread_endpoint() -> quinn::Endpoint {
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(quinn::VarInt::from_u32(64 << 10));
        transport.receive_window(quinn::VarInt::from_u32(64 << 10));
        endpoint_with("127.0.0.1", transport)
    }

    fn endpoint_with(ip: &str, mut transport: quinn::TransportConfig) -> quinn::Endpoint {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        transport.keep_alive_interval(Some(Duration::from_millis(200)));
        cfg.transport_config(Arc::new(transport));
        let mut ep = quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap();
        ep.set_default_client_config(cfg);
        ep
    }

    pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
        ep.connect(addr, "cets")
            .unwrap()
            .await
            .expect("TLS with the node")
    }

    /// A server-only endpoint on loopback `ip` with a fresh self-signed certificate, speaking
    /// the nodes' ALPN: something a node can dial.
    pub fn server_endpoint(ip: &str) -> quinn::Endpoint {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["cets".into()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let cfg = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        quinn::Endpoint::server(cfg, format!("{ip}:0").parse().unwrap()).unwrap()
    }

    /// `proto::PROTOCOL_VERSION`.
    pub const PROTOCOL_VERSION: u32 = 4;

    /// `proto::Hello`.
    #[derive(Debug, Serialize, Deserialize)]
    pub struct Hello {
        pub magic: [u8; 4],
        pub version: u32,
        pub node: NodeId,
        pub proof: Vec<u8>,
    }

    /// `proto::StreamHeader`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    pub struct StreamHeader {
        pub table: String,
        pub kind: TableKind,
        pub fingerprint: u64,
    }

    /// `node::fingerprint::<K, V>()`: FNV-1a of the type names.
    pub fn fingerprint<K, V>() -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::any::type_name::<K>()
            .bytes()
            .chain([0u8])
            .chain(std::any::type_name::<V>().bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// A frame: `u32` little-endian length, then postcard.
    pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
        let body = postcard::to_stdvec(msg).unwrap();
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&body);
        f
    }

    pub async fn read_frame(recv: &mut quinn::RecvStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        recv.read_exact(&mut body).await.unwrap();
        body
    }

    /// HMAC-SHA256(cookie, role || len(name) || name || incarnation || TLS exporter).
    pub fn proof(cookie: &str, conn: &quinn::Connection, role: u8, node: &NodeId) -> Vec<u8> {
        let mut exporter = [0u8; 32];
        conn.export_keying_material(&mut exporter, b"EXPORTER-cets-cookie-v1", b"")
            .unwrap();
        let mut msg = vec![role];
        msg.extend_from_slice(&(node.name.len() as u64).to_le_bytes());
        msg.extend_from_slice(node.name.as_bytes());
        msg.extend_from_slice(&node.incarnation.to_le_bytes());
        msg.extend_from_slice(&exporter);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, cookie.as_bytes());
        ring::hmac::sign(&key, &msg).as_ref().to_vec()
    }

    pub fn hello(cookie: &str, conn: &quinn::Connection, me: &NodeId) -> Hello {
        Hello {
            magic: *b"CETS",
            version: PROTOCOL_VERSION,
            node: me.clone(),
            proof: proof(cookie, conn, b'D', me),
        }
    }

    /// The dialer's side of the cookie handshake on `conn`: our hello, then the node's, or
    /// `None` on any failure.
    async fn exchange(conn: &quinn::Connection, cookie: &str, me: &NodeId) -> Option<Hello> {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&frame(&hello(cookie, conn, me)))
            .await
            .ok()?;
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.ok()?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        recv.read_exact(&mut body).await.ok()?;
        let _ = send.finish();
        postcard::from_bytes(&body).ok()
    }

    /// The dialer's side of the cookie handshake; checks the node's proof; returns the node.
    pub async fn handshake(conn: &quinn::Connection, cookie: &str, me: &NodeId) -> NodeId {
        let theirs = exchange(conn, cookie, me)
            .await
            .expect("the node answers with its hello");
        assert_eq!(&theirs.magic, b"CETS");
        let expected = proof(cookie, conn, b'A', &theirs.node);
        assert_eq!(theirs.proof, expected, "the node proves the cookie");
        theirs.node
    }

    /// A new connection and the whole handshake as `me`; `false` on any failure instead of a
    /// panic (for polls).
    pub async fn try_handshake(
        ep: &quinn::Endpoint,
        addr: SocketAddr,
        cookie: &str,
        me: &NodeId,
    ) -> bool {
        let attempt = async {
            let conn = ep.connect(addr, "cets").ok()?.await.ok()?;
            let theirs = exchange(&conn, cookie, me).await?;
            let ok = theirs.proof == proof(cookie, &conn, b'A', &theirs.node);
            conn.close(0u32.into(), b"");
            Some(ok)
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), attempt).await,
            Ok(Some(true))
        )
    }

    /// How the node closed the connection (panics if it did not within the wait, or if the
    /// connection ended some other way, e.g. by idle timeout).
    pub async fn closed_by_node(conn: &quinn::Connection) -> quinn::ApplicationClose {
        match tokio::time::timeout(super::WAIT, conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => c,
            Ok(other) => panic!("connection ended otherwise: {other}"),
            Err(_) => panic!("the node did not close the connection"),
        }
    }
}

fn reason(c: &quinn::ApplicationClose) -> String {
    String::from_utf8_lossy(&c.reason).into_owned()
}

const PROTOCOL: u32 = 2;
const VERSION: u32 = 3;
const AUTH: u32 = 1;
const REDIRECT: u32 = 4;
const SELF: u32 = 6;
const OVERLOAD: u32 = 8;

fn code(c: &quinn::ApplicationClose) -> u32 {
    u32::try_from(c.error_code.into_inner()).unwrap()
}

/// Connections that break the protocol before authenticating are closed by the node, and its
/// real connection and replication go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_the_handshake_closes_only_that_connection() {
    let mut config = NodeConfig::fast_failover();
    config.handshake_timeout = Duration::from_secs(1);
    let p = pair_with(config).await;
    let before = p.links().await;
    let ep = raw::endpoint();
    let target = p.nodes[0].local_addr();
    let mut rng = StdRng::seed_from_u64(42);

    // 1. A length prefix far above the hello limit.
    let conn = raw::connect(&ep, target).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut junk = u32::MAX.to_le_bytes().to_vec();
    junk.extend((0..100).map(|_| rng.random::<u8>()));
    send.write_all(&junk).await.unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_ne!(
        reason(&c),
        "handshake timed out",
        "closed for the frame, not by the timer"
    );
    p.still_replicates(1).await;

    // 2. A well-framed hello that does not decode.
    let conn = raw::connect(&ep, target).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(code(&c), VERSION, "{c}");
    assert!(reason(&c).contains("undecodable hello"), "{c}");
    p.still_replicates(2).await;

    // 3. Random bytes, then the end of the stream.
    for size in [1usize, 3, 4, 17, 1000, 5000] {
        let conn = raw::connect(&ep, target).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let junk: Vec<u8> = (0..size).map(|_| rng.random()).collect();
        send.write_all(&junk).await.unwrap();
        let _ = send.finish();
        let c = raw::closed_by_node(&conn).await;
        assert_ne!(reason(&c), "handshake timed out", "{size} bytes: {c}");
    }
    p.still_replicates(3).await;

    // 4. A hello in the right format with a forged proof, and one of another version.
    let me = NodeId {
        name: "a-raw".into(),
        incarnation: 1,
    };
    let conn = raw::connect(&ep, target).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut h = raw::hello("not-the-cookie", &conn, &me);
    send.write_all(&raw::frame(&h)).await.unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (AUTH, "bad cookie from a-raw".into())
    );
    let conn = raw::connect(&ep, target).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    h = raw::hello(COOKIE, &conn, &me);
    h.version = raw::PROTOCOL_VERSION + 1;
    send.write_all(&raw::frame(&h)).await.unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(code(&c), VERSION, "{c}");
    // A hello proven for another TLS session (a replay) is refused too.
    let first = raw::connect(&ep, target).await;
    let replayed = raw::hello(COOKIE, &first, &me);
    let conn = raw::connect(&ep, target).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&raw::frame(&replayed)).await.unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(code(&c), AUTH, "{c}");
    first.close(0u32.into(), b"");
    p.still_replicates(4).await;

    // 5. Silence: the handshake timer closes it.
    let conn = raw::connect(&ep, target).await;
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (PROTOCOL, "handshake timed out".into())
    );
    let conn = raw::connect(&ep, target).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&[200, 0, 0, 0, 1, 2, 3]).await.unwrap(); // half a frame, never finished
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (PROTOCOL, "handshake timed out".into())
    );

    p.ends_unharmed(5, before, ep).await;
}

/// Authenticates as `a-raw` (which sorts before `n1`, so the node keeps the connection).
async fn authenticated(ep: &quinn::Endpoint, node: &Node) -> quinn::Connection {
    let conn = raw::connect(ep, node.local_addr()).await;
    let me = NodeId {
        name: "a-raw".into(),
        incarnation: rand::random(),
    };
    let theirs = raw::handshake(&conn, COOKIE, &me).await;
    assert_eq!(&theirs, node.id());
    conn
}

/// The header of the node's table stream towards us, checked against what we send.
async fn their_header(conn: &quinn::Connection) -> quinn::RecvStream {
    let mut recv = conn.accept_uni().await.unwrap();
    let header: raw::StreamHeader =
        postcard::from_bytes(&raw::read_frame(&mut recv).await).unwrap();
    assert_eq!(
        header,
        our_header("t"),
        "the fingerprint is computed as the node does"
    );
    recv
}

fn our_header(table: &str) -> raw::StreamHeader {
    raw::StreamHeader {
        table: table.into(),
        kind: cets::TableKind::Set,
        fingerprint: raw::fingerprint::<u64, String>(),
    }
}

/// A raw peer's two streams of table `t` to a node, speaking the join protocol.
struct TablePeer {
    ours: quinn::SendStream,
    theirs: quinn::RecvStream,
    req: u64,
}

impl TablePeer {
    /// Opens our stream of `t` next to the node's (`theirs`).
    async fn open(conn: &quinn::Connection, theirs: quinn::RecvStream) -> Self {
        let mut ours = conn.open_uni().await.unwrap();
        ours.write_all(&raw::frame(&our_header("t"))).await.unwrap();
        Self {
            ours,
            theirs,
            req: 0,
        }
    }

    /// Sends a join request; returns the name of the node's (first) reply's variant.
    async fn ask(&mut self, body: wire::JoinReq) -> &'static str {
        self.req += 1;
        let req = self.req;
        let f = raw::frame(&wire::PeerMsg::Join { req, body });
        self.ours.write_all(&f).await.unwrap();
        loop {
            let msg: wire::PeerMsg =
                postcard::from_bytes(&raw::read_frame(&mut self.theirs).await).unwrap();
            match msg {
                wire::PeerMsg::JoinReply { req: r, body } if r == req => return body.name(),
                wire::PeerMsg::Tick { .. } | wire::PeerMsg::JoinReply { .. } => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// Pause and unpause from a join coordinator, spoken by a raw peer: a pause with an absurd lease
/// (`u64::MAX` ms) is answered and ends with its unpause (without one, the node cuts such a
/// lease to `MAX_PAUSE_LEASE`, 60 s: too long to wait for here), and an unpause that overtakes
/// its pause makes the node refuse that pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_pauses_from_a_peer_end_with_their_unpause_even_one_that_came_first() {
    let p = pair_with(NodeConfig::fast_failover()).await;
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &p.nodes[0]).await;
    let theirs = their_header(&conn).await;
    let mut peer = TablePeer::open(&conn, theirs).await;
    let (paused, unpaused, refused) = ("Paused", "Unpaused", "Refused");
    let pause = |join| wire::JoinReq::Pause {
        join,
        lease_ms: u64::MAX,
    };
    assert_eq!(peer.ask(pause(77)).await, paused);
    assert_eq!(
        peer.ask(wire::JoinReq::Unpause { join: 77 }).await,
        unpaused
    );
    // A coordinator that gave up on this node before its pause arrived sends the unpause first:
    // the late pause is refused, so the table is not left paused for the lease.
    assert_eq!(
        peer.ask(wire::JoinReq::Unpause { join: 78 }).await,
        unpaused
    );
    assert_eq!(peer.ask(pause(78)).await, refused);
    p.still_replicates(1).await;
    ep.close(0u32.into(), b"");
    p.shutdown().await;
}

/// A peer may not open table stream after table stream to one table: each may hold a frame of
/// up to `max_frame_size` bytes in memory. The fifth open one closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_to_one_table_close_the_connection() {
    let p = pair_with(NodeConfig::fast_failover()).await;
    let before = p.links().await;
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &p.nodes[0]).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut s = conn.open_uni().await.unwrap();
        s.write_all(&raw::frame(&our_header("t"))).await.unwrap();
        // Half a frame announcing 60 MiB: the node must not reserve it up front either.
        s.write_all(&(60u32 * 1024 * 1024).to_le_bytes())
            .await
            .unwrap();
        s.write_all(&[0; 100]).await.unwrap();
        streams.push(s);
    }
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (PROTOCOL, "too many streams for one table".into())
    );
    p.ends_unharmed(1, before, ep).await;
}

/// An authenticated peer that breaks the protocol on a table stream is disconnected; the
/// node's other connections and its replication go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_from_an_authenticated_peer_close_only_that_connection() {
    let p = pair_with(NodeConfig::fast_failover()).await;
    let before = p.links().await;
    let ep = raw::endpoint();
    let n1 = &p.nodes[0];

    // (0) The protocol as the node speaks it: a write from a non-member is acknowledged, not
    // applied.
    let conn = authenticated(&ep, n1).await;
    let mut theirs = their_header(&conn).await;
    let mut ours = conn.open_uni().await.unwrap();
    ours.write_all(&raw::frame(&our_header("t"))).await.unwrap();
    let ops = wire::PeerMsg::Ops {
        seq: 1,
        ops: vec![wire::Op {
            ts: 1,
            kind: wire::OpKind::Insert(vec![(999, "evil".into())]),
        }],
    };
    ours.write_all(&raw::frame(&ops)).await.unwrap();
    loop {
        let msg: wire::PeerMsg = postcard::from_bytes(&raw::read_frame(&mut theirs).await).unwrap();
        match msg {
            wire::PeerMsg::Ack { seq, .. } => {
                assert_eq!(seq, 1);
                break;
            }
            wire::PeerMsg::Tick { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(p.tables[0].get(&999).is_none(), "not a member: not applied");
    // (i) then an undecodable frame (no such PeerMsg variant).
    ours.write_all(&[1, 0, 0, 0, 0x7f]).await.unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (PROTOCOL, "undecodable frame".into())
    );
    p.still_replicates(1).await;

    // (ii) a frame announcing one byte more than the 64 MiB limit.
    let conn = authenticated(&ep, n1).await;
    let mut ours = conn.open_uni().await.unwrap();
    ours.write_all(&raw::frame(&our_header("t"))).await.unwrap();
    ours.write_all(&(64u32 * 1024 * 1024 + 1).to_le_bytes())
        .await
        .unwrap();
    ours.write_all(&[0; 512]).await.unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!((code(&c), reason(&c)), (PROTOCOL, "frame too large".into()));
    p.still_replicates(2).await;

    // (iii) a stream header that does not decode.
    let conn = authenticated(&ep, n1).await;
    let mut ours = conn.open_uni().await.unwrap();
    ours.write_all(&[2, 0, 0, 0, 0xff, 0xff]).await.unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (PROTOCOL, "bad stream header".into())
    );
    p.still_replicates(3).await;

    // (iv) a name that sorts after the node's: the node answers the hello, closes at once
    // (possibly before we read its hello) and dials back, which fails: this client accepts no
    // connections.
    let conn = raw::connect(&ep, n1.local_addr()).await;
    let me = NodeId {
        name: "z-raw".into(),
        incarnation: 5,
    };
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&raw::frame(&raw::hello(COOKIE, &conn, &me)))
        .await
        .unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(code(&c), REDIRECT, "{c}");
    p.ends_unharmed(4, before, ep).await;
}

/// A stream for a table the node does not run, or runs with other types, is stopped; the
/// connection stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_incompatible_table_stream_is_stopped_not_the_connection() {
    let p = pair_with(NodeConfig::fast_failover()).await;
    let ep = raw::endpoint();
    let n1 = &p.nodes[0];
    let conn = authenticated(&ep, n1).await;
    let _theirs = their_header(&conn).await;

    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&raw::frame(&our_header("nope"))).await.unwrap();
    assert_eq!(
        s.stopped().await.unwrap(),
        Some(1u32.into()),
        "UNKNOWN_TABLE"
    );

    let mut s = conn.open_uni().await.unwrap();
    let mut h = our_header("t");
    h.fingerprint ^= 1;
    s.write_all(&raw::frame(&h)).await.unwrap();
    assert_eq!(
        s.stopped().await.unwrap(),
        Some(2u32.into()),
        "INCOMPATIBLE"
    );
    let n = n1.clone();
    eventually(WAIT, "n1 reports the refused table", || {
        let n = n.clone();
        async move {
            let s = n.status().await;
            s.tables[0].refused.iter().any(|(p, _)| p == "a-raw")
        }
    })
    .await;

    let mut s = conn.open_uni().await.unwrap();
    let mut h = our_header("t");
    h.kind = cets::TableKind::Bag;
    s.write_all(&raw::frame(&h)).await.unwrap();
    assert_eq!(
        s.stopped().await.unwrap(),
        Some(2u32.into()),
        "INCOMPATIBLE"
    );

    assert!(conn.close_reason().is_none(), "the connection stays");
    let s = n1.status().await;
    assert!(s.connected.iter().any(|(id, _)| id.name == "a-raw"), "{s}");
    p.still_replicates(1).await;
    conn.close(0u32.into(), b"bye");
    ep.close(0u32.into(), b"");
    p.shutdown().await;
}

/// The close codes of `proto::close` say what went wrong: `PROTOCOL` for a frame that is too
/// large or a stream that ends inside the hello, with the reason. (Such a connection used to be
/// dropped instead, which QUIC reports as code 0, `SHUTDOWN`, with no reason.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hello_is_closed_with_the_protocol_code_and_a_reason() {
    let (n, _h) = node("n1").await;
    let ep = raw::endpoint();
    let junks: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], // far above the hello limit
        &[10, 0, 0, 0, 1, 2],               // the stream ends inside the frame
        &[1, 2],                            // the stream ends inside the length
    ];
    for junk in junks {
        let conn = raw::connect(&ep, n.local_addr()).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(junk).await.unwrap();
        let _ = send.finish();
        let c = raw::closed_by_node(&conn).await;
        assert_eq!(code(&c), PROTOCOL, "{junk:?}: {c:?}");
        assert!(!c.reason.is_empty(), "{junk:?}: {c:?}");
    }
    // A well-formed, correctly proven hello whose name no node could have.
    let conn = raw::connect(&ep, n.local_addr()).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let long = NodeId {
        name: "x".repeat(300),
        incarnation: 1,
    };
    send.write_all(&raw::frame(&raw::hello(COOKIE, &conn, &long)))
        .await
        .unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (PROTOCOL, "node name of 300 bytes (1 to 255 allowed)".into())
    );
    ep.close(0u32.into(), b"");
    n.shutdown().await.unwrap();
}

/// A stream header is at most 4 KiB (`HEADER_LIMIT`): one announcing 32 MiB is refused as soon
/// as its length arrives. (It used to be read with the table frame limit, 64 MiB: the reader
/// reserved the announced length and waited for the body or the 10 s header timer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_stream_header_is_refused_at_once() {
    let p = pair_with(NodeConfig::fast_failover()).await;
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &p.nodes[0]).await;
    let mut ours = conn.open_uni().await.unwrap();
    ours.write_all(&(32u32 * 1024 * 1024).to_le_bytes())
        .await
        .unwrap();
    ours.write_all(&[0; 8192]).await.unwrap();
    let started = std::time::Instant::now();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&c), reason(&c)),
        (PROTOCOL, "bad stream header".into())
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    p.still_replicates(1).await;
    ep.close(0u32.into(), b"");
    p.shutdown().await;
}

/// A control stream that ends before any hello byte is a protocol error like the others, and
/// should be closed with `PROTOCOL` and a reason; `read_hello` returns a plain transport error
/// for it (`Ok(None)` from the reader), so the connection is only dropped: code 0 (`SHUTDOWN`),
/// no reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_hello_stream_is_closed_with_the_protocol_code_and_a_reason() {
    let (n, _h) = node("n1").await;
    let ep = raw::endpoint();
    let conn = raw::connect(&ep, n.local_addr()).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // Opening a stream sends nothing until a byte or the end is written: write the end.
    send.finish().unwrap();
    let c = raw::closed_by_node(&conn).await;
    assert_eq!(code(&c), PROTOCOL, "{c:?}");
    assert!(!c.reason.is_empty(), "{c:?}");
    ep.close(0u32.into(), b"");
    n.shutdown().await.unwrap();
}

/// Something at a discovered address that closes every connection with the `SELF` code, before
/// any hello, proves nothing: the node keeps dialing it and reports it unavailable. (It used to
/// take the address for its own and never dial it again, so a real node that came up there
/// later was never reached.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_close_without_a_hello_does_not_make_an_address_ours() {
    init_tracing();
    let fake = raw::server_endpoint("127.0.0.1");
    let fake_addr = fake.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = fake.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            if let Ok(conn) = incoming.await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                conn.close(SELF.into(), b"self");
            }
        }
    });
    let own = free_port();
    let a = start_at("a", own, vec![fake_addr, own]).await;
    let dials = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    eventually(WAIT, "dialed again after a SELF close", || async move {
        dials() >= 3
    })
    .await;
    // Readiness settles: the fake address is unavailable, and the node's own address, where
    // it met its own proven hello, is its own (not a failure).
    a.wait_for_ready(WAIT).await.unwrap();
    let s = a.status().await;
    assert!(
        s.unavailable.iter().any(|(u, _)| *u == fake_addr),
        "the fake address is reported unavailable: {s}"
    );
    assert!(
        !s.unavailable.iter().any(|(u, _)| *u == own) && s.connected.is_empty(),
        "the own address is neither a failure nor a peer: {s}"
    );
    a.shutdown().await.unwrap();
    fake.close(0u32.into(), b"");
}

/// Unauthenticated connections are rationed: a few at a time per IP address, a bounded number
/// in all; the pair's own connection is untouched, and freed slots are usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_rationed_per_address_and_in_all() {
    let mut config = NodeConfig::fast_failover();
    config.handshake_timeout = Duration::from_secs(10); // the idle ones hold their slots
    config.max_handshakes = 12;
    config.max_handshakes_per_ip = 4;
    let p = pair_with(config).await;
    let before = p.links().await;
    let target = p.nodes[0].local_addr();

    // Six silent connections from one address: four are let in, two closed at once.
    let from2 = raw::endpoint_at("127.0.0.2");
    let mut idle = Vec::new();
    for _ in 0..6 {
        idle.push(raw::connect(&from2, target).await);
    }
    let too_many = |c: &quinn::Connection| match c.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(a)) => {
            code(&a) == PROTOCOL && reason(&a) == "too many handshakes from 127.0.0.2"
        }
        _ => false,
    };
    eventually(WAIT, "two closed for their address", || {
        let n = idle.iter().filter(|c| too_many(c)).count();
        async move { n == 2 }
    })
    .await;
    assert_eq!(
        idle.iter().filter(|c| c.close_reason().is_none()).count(),
        4,
        "the other four are still open"
    );

    // Eight more from two other addresses fill the twelve slots; past six, each first proved its
    // address with a QUIC retry, which a real client passes without noticing.
    let others = [raw::endpoint_at("127.0.0.3"), raw::endpoint_at("127.0.0.4")];
    for ep in &others {
        for _ in 0..4 {
            idle.push(raw::connect(ep, target).await);
        }
    }
    let from5 = raw::endpoint_at("127.0.0.5");
    let refused = from5.connect(target, "cets").unwrap().await;
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "the thirteenth is refused, not {:?}",
        refused.map(|_| "connected")
    );
    p.still_replicates(1).await;

    // The silent ones go away: their slots, and their address's, are free again.
    for c in &idle {
        c.close(0u32.into(), b"");
    }
    let me = NodeId {
        name: "a-raw".into(),
        incarnation: 7,
    };
    eventually(WAIT, "a handshake from 127.0.0.2 is admitted", || {
        let (from2, me) = (from2.clone(), me.clone());
        async move { raw::try_handshake(&from2, target, COOKIE, &me).await }
    })
    .await;
    for ep in others.iter().chain([&from2, &from5]) {
        ep.close(0u32.into(), b"");
    }
    // The admitted handshake made `a-raw` a connected node until the node hears of the close
    // (or, if that datagram is lost, until the idle timeout).
    eventually(WAIT, "the raw node's connection to be gone", || {
        let (node, me) = (&p.nodes[0], &me);
        async move {
            let connected = node.status().await.connected;
            !connected.iter().any(|(id, _)| id == me)
        }
    })
    .await;
    p.ends_unharmed(2, before, raw::endpoint()).await;
}

/// A join asks each node for its dump once: a second request of the same join is refused
/// instead of queueing another copy of the table for the peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_gets_one_dump_per_node() {
    let p = pair_with(NodeConfig::fast_failover()).await;
    p.tables[0].insert(1, "one".into()).await.unwrap();
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &p.nodes[0]).await;
    let mut peer = TablePeer::open(&conn, their_header(&conn).await).await;
    let (paused, chunk, unpaused, refused) = ("Paused", "Chunk", "Unpaused", "Refused");
    let dump = || wire::JoinReq::Dump {
        join: 9,
        alive: vec![p.nodes[0].id().clone()],
    };
    let pause = wire::JoinReq::Pause {
        join: 9,
        lease_ms: 60_000,
    };
    assert_eq!(peer.ask(pause).await, paused);
    assert_eq!(peer.ask(dump()).await, chunk);
    assert_eq!(peer.ask(dump()).await, refused, "one dump per join");
    assert_eq!(peer.ask(wire::JoinReq::Unpause { join: 9 }).await, unpaused);
    p.still_replicates(1).await;
    ep.close(0u32.into(), b"");
    p.shutdown().await;
}

/// A peer that never reads its table stream while it makes the node queue frames for it (join
/// after join, each asking for the table's dump) is closed with the `OVERLOAD` code once the
/// queue would pass `max_link_queue_bytes`; the node's other connection goes on as before.
/// Without the bound, each round queued another copy of the table, without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_is_closed_when_its_queue_is_full() {
    let mut config = NodeConfig::fast_failover();
    config.max_frame_size = 256 << 10;
    config.max_batch_bytes = 64 << 10;
    config.max_link_queue_bytes = 4 << 20;
    let p = pair_with(config).await;
    // About 2.3 MB of records.
    for chunk in 0..40u64 {
        let recs: Vec<(u64, String)> = (chunk * 500..(chunk + 1) * 500)
            .map(|k| (k, "x".repeat(100)))
            .collect();
        p.tables[0].insert_many(recs).await.unwrap();
    }
    let before = p.links().await;
    let ep = raw::unread_endpoint();
    let conn = authenticated(&ep, &p.nodes[0]).await;
    // The node's stream to us is accepted, and never read.
    let mut peer = TablePeer::open(&conn, their_header(&conn).await).await;
    let alive = vec![p.nodes[0].id().clone()];
    // 40 rounds would queue 92 MB; the bound is hit in the second or third.
    for join in 1..=40 {
        if conn.close_reason().is_some() {
            break;
        }
        let lease_ms = 60_000;
        let alive = alive.clone();
        for body in [
            wire::JoinReq::Pause { join, lease_ms },
            wire::JoinReq::Dump { join, alive },
            wire::JoinReq::Unpause { join },
        ] {
            // A write fails once the node has closed the connection.
            let req = raw::frame(&wire::PeerMsg::Join { req: join, body });
            let _ = peer.ours.write_all(&req).await;
        }
    }
    // Without the bound the node keeps the connection: our endpoint sends keep-alives.
    let closed = raw::closed_by_node(&conn).await;
    assert_eq!(
        (code(&closed), reason(&closed)),
        (OVERLOAD, "outbound queue full".into())
    );
    p.ends_unharmed(2, before, ep).await;
}

// ---------------------------------------------------------------------------------------------
// A raw peer that the node dials, and so coordinates joins with.

/// The whole of `proto::PeerMsg` and its join messages for a `u64 -> String` table, as the
/// raw peers here write and read them (postcard tags enum variants by index, so the order of
/// variants is the crate's).
mod wire {
    use cets::NodeId;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct WireRecord {
        pub key: u64,
        pub value: String,
        pub ts: u64,
        pub owner: u32,
        pub ttl: u32,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum OpKind {
        Insert(Vec<(u64, String)>),
        Delete(Vec<u64>),
        DeleteObject(Vec<(u64, String)>),
        InsertOwned {
            owners: Vec<NodeId>,
            records: Vec<(u64, String, u32)>,
        },
        InsertTtl {
            ttl_ms: u32,
            records: Vec<(u64, String)>,
        },
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub struct Op {
        pub ts: u64,
        pub kind: OpKind,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum JoinReq {
        Info,
        Pause {
            join: u64,
            lease_ms: u64,
        },
        Dump {
            join: u64,
            alive: Vec<NodeId>,
        },
        Apply {
            join: u64,
            owners: Vec<NodeId>,
            records: Vec<WireRecord>,
            members: Option<Vec<NodeId>>,
            merge: Option<Vec<NodeId>>,
        },
        Unpause {
            join: u64,
        },
        Stale {
            join: u64,
            owners: Vec<NodeId>,
            records: Vec<WireRecord>,
        },
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum JoinRep {
        Info {
            members: Vec<NodeId>,
            epoch: u64,
        },
        Paused {
            members: Vec<NodeId>,
            epoch: u64,
            reachable: Vec<NodeId>,
            len: u64,
            missed: Vec<NodeId>,
        },
        Busy {
            by: String,
        },
        Chunk {
            owners: Vec<NodeId>,
            records: Vec<WireRecord>,
            last: bool,
        },
        Applied {
            conflicts: u64,
        },
        Unpaused,
        Refused {
            reason: String,
        },
    }

    impl JoinRep {
        /// The variant's name.
        pub fn name(&self) -> &'static str {
            match self {
                JoinRep::Info { .. } => "Info",
                JoinRep::Paused { .. } => "Paused",
                JoinRep::Busy { .. } => "Busy",
                JoinRep::Chunk { .. } => "Chunk",
                JoinRep::Applied { .. } => "Applied",
                JoinRep::Unpaused => "Unpaused",
                JoinRep::Refused { .. } => "Refused",
            }
        }
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub enum PeerMsg {
        Ops { seq: u64, ops: Vec<Op> },
        Ack { seq: u64, clock: u64 },
        Tick { clock: u64, view: u64 },
        Join { req: u64, body: JoinReq },
        JoinReply { req: u64, body: JoinRep },
    }
}

/// A raw peer named `z-raw` (after every node name here, so the node keeps the connection it
/// dials and coordinates the join): `node` is told its address, dials it, and the acceptor's
/// side of the cookie handshake runs here. Returns the endpoint, the connection, our identity
/// and the two table streams of `t`.
async fn dialed_by(
    node: &Node,
    disco: &StaticDiscoveryHandle,
) -> (quinn::Endpoint, quinn::Connection, NodeId, TablePeer) {
    let fake = raw::server_endpoint("127.0.0.1");
    disco.set(vec![fake.local_addr().unwrap()]);
    let me = NodeId {
        name: "z-raw".into(),
        incarnation: rand::random(),
    };
    let conn = tokio::time::timeout(WAIT, async {
        fake.accept()
            .await
            .expect("the node dials")
            .await
            .expect("TLS")
    })
    .await
    .expect("the node dials within the wait");
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let theirs: raw::Hello = postcard::from_bytes(&raw::read_frame(&mut recv).await).unwrap();
    assert_eq!(&theirs.node, node.id());
    let ours = raw::Hello {
        magic: *b"CETS",
        version: raw::PROTOCOL_VERSION,
        node: me.clone(),
        proof: raw::proof(COOKIE, &conn, b'A', &me),
    };
    send.write_all(&raw::frame(&ours)).await.unwrap();
    let _ = send.finish();
    let peer = TablePeer::open(&conn, their_header(&conn).await).await;
    (fake, conn, me, peer)
}

/// The node's next join request on its table stream to us (ticks skipped).
async fn next_request(theirs: &mut quinn::RecvStream) -> (u64, wire::JoinReq) {
    loop {
        let msg: wire::PeerMsg = postcard::from_bytes(&raw::read_frame(theirs).await).unwrap();
        match msg {
            wire::PeerMsg::Join { req, body } => return (req, body),
            wire::PeerMsg::Tick { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn reply(peer: &mut TablePeer, req: u64, body: wire::JoinRep) {
    let f = raw::frame(&wire::PeerMsg::JoinReply { req, body });
    peer.ours.write_all(&f).await.unwrap();
}

/// A join reply names its request by number only; the node must take it only from the node the
/// request went to. A peer that answers a request sent to another node (numbers are
/// consecutive, easy to guess) used to cancel it: the node dropped the request's reply channel,
/// and its join failed with "node unreachable or gone" although the right node answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_reply_from_another_peer_does_not_cancel_a_request() {
    let (node, disco) = node("n1").await;
    let t: T = node.start("t", TableOptions::set()).await.unwrap();
    // `a-raw`, connected to the node; it never coordinates with it (n1 sorts after a-raw).
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &node).await;
    let mut other = TablePeer::open(&conn, their_header(&conn).await).await;
    // `z-raw`, which the node dials and then joins, as the coordinator.
    let (fake, _zconn, z, mut zpeer) = dialed_by(&node, &disco).await;
    let (req, body) = next_request(&mut zpeer.theirs).await;
    assert!(matches!(body, wire::JoinReq::Info), "{body:?}");
    // a-raw answers z-raw's request; its own request after it is answered once the node has
    // read that reply (one stream, in order).
    let f = raw::frame(&wire::PeerMsg::JoinReply {
        req,
        body: wire::JoinRep::Unpaused,
    });
    other.ours.write_all(&f).await.unwrap();
    assert_eq!(
        other.ask(wire::JoinReq::Info).await,
        "Info",
        "Info answered"
    );
    // Now z-raw answers; the join goes on to the lock.
    let members = vec![z.clone()];
    reply(&mut zpeer, req, wire::JoinRep::Info { members, epoch: 0 }).await;
    let (_, body) = next_request(&mut zpeer.theirs).await;
    assert!(
        matches!(body, wire::JoinReq::Pause { .. }),
        "the join went on with z-raw's answer; got {body:?} (the join failed and started over)"
    );
    drop(t);
    ep.close(0u32.into(), b"");
    fake.close(0u32.into(), b"");
    node.shutdown().await.unwrap();
}

/// A join asks its sources to dump the records of the join's nodes only, not those of another
/// node connected to the coordinator (`a-raw`). Such a node's writes reach none of the join's
/// nodes, so their copies of its records are not its truth, and a node of the join that is not
/// linked to it cannot store them: dumped, they left the merged side "consistent" by its view
/// and different in content (the nemesis: n1 kept n4's deleted record, n3 never had it). Each
/// node drops them at the end of the join instead (ALGORITHM.md, section 16); the dump request
/// named every connected node before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_dumps_the_records_of_its_own_nodes_only() {
    let (node, disco) = node("n1").await;
    let t: T = node.start("t", TableOptions::set()).await.unwrap();
    // `a-raw`: connected to the node, with the table open, and not in the join.
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &node).await;
    let _other = TablePeer::open(&conn, their_header(&conn).await).await;
    // `z-raw`, which the node dials and then joins, as the coordinator.
    let (fake, _zconn, z, mut zpeer) = dialed_by(&node, &disco).await;
    let (req, body) = next_request(&mut zpeer.theirs).await;
    assert!(matches!(body, wire::JoinReq::Info), "{body:?}");
    let members = vec![z.clone()];
    reply(&mut zpeer, req, wire::JoinRep::Info { members, epoch: 0 }).await;
    let (req, body) = next_request(&mut zpeer.theirs).await;
    assert!(matches!(body, wire::JoinReq::Pause { .. }), "{body:?}");
    let paused = wire::JoinRep::Paused {
        members: vec![z.clone()],
        epoch: 0,
        reachable: vec![node.id().clone()],
        len: 0,
        missed: Vec::new(),
    };
    reply(&mut zpeer, req, paused).await;
    let (_, body) = next_request(&mut zpeer.theirs).await;
    let wire::JoinReq::Dump { alive, .. } = body else {
        panic!("expected the dump request, got {body:?}");
    };
    let mut names: Vec<&str> = alive.iter().map(|n| n.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["n1", "z-raw"], "the owners the dump must keep");
    drop(t);
    ep.close(0u32.into(), b"");
    fake.close(0u32.into(), b"");
    node.shutdown().await.unwrap();
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A peer the node joins with answers its `Dump` with chunks that never end, after reporting
/// in its `Paused` reply that it holds nothing. The coordinator keeps a dump until it is
/// complete, and each chunk renewed its lease, so the node's table stayed paused, and its
/// memory grew, for as long as the peer sent. Replies to one request are now bounded by
/// `max_link_queue_bytes` (an honest source queues its whole dump at once, so its dump fits):
/// past it, the node drops the request, the join fails, and the table is unpaused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_that_never_ends_is_not_kept_without_end() {
    let mut config = NodeConfig::fast_failover();
    config.max_frame_size = 1 << 20;
    config.max_batch_bytes = 256 << 10;
    config.max_link_queue_bytes = 8 << 20;
    let (node, disco) = node_with("a", COOKIE, config).await;
    let t: T = node.start("t", TableOptions::set()).await.unwrap();
    t.insert(1, "one".into()).await.unwrap();
    let (fake, zconn, z, mut zpeer) = dialed_by(&node, &disco).await;
    // Lock: answer Info and Pause as a lone node holding no record.
    let dump_req = loop {
        let (req, body) = next_request(&mut zpeer.theirs).await;
        match body {
            wire::JoinReq::Info => {
                let members = vec![z.clone()];
                reply(&mut zpeer, req, wire::JoinRep::Info { members, epoch: 0 }).await;
            }
            wire::JoinReq::Pause { .. } => {
                let rep = wire::JoinRep::Paused {
                    members: vec![z.clone()],
                    epoch: 0,
                    reachable: vec![node.id().clone()],
                    len: 0,
                    missed: Vec::new(),
                };
                reply(&mut zpeer, req, rep).await;
            }
            wire::JoinReq::Dump { .. } => break req,
            other => panic!("unexpected {other:?}"),
        }
    };
    // From here on, what the node sends us is read and counted in the background: an
    // `Unpause` means it gave up on the dump.
    let gave_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = gave_up.clone();
    let mut theirs = zpeer.theirs;
    tokio::spawn(async move {
        let mut len = [0u8; 4];
        while theirs.read_exact(&mut len).await.is_ok() {
            let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
            if theirs.read_exact(&mut body).await.is_err() {
                break;
            }
            if let Ok(wire::PeerMsg::Join {
                body: wire::JoinReq::Unpause { .. },
                ..
            }) = postcard::from_bytes(&body)
            {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let before = rss();
    // 400 chunks of 1000 records of 100 bytes: about 44 MB of dump from a node that said it
    // held nothing.
    let mut sent = 0u64;
    for c in 0..400u64 {
        if gave_up.load(std::sync::atomic::Ordering::SeqCst) || zconn.close_reason().is_some() {
            break;
        }
        let records = (c * 1000..(c + 1) * 1000)
            .map(|k| wire::WireRecord {
                key: k,
                value: "x".repeat(100),
                ts: 1,
                owner: 0,
                ttl: 0,
            })
            .collect();
        let chunk = wire::JoinRep::Chunk {
            owners: vec![z.clone()],
            records,
            last: false,
        };
        let f = raw::frame(&wire::PeerMsg::JoinReply {
            req: dump_req,
            body: chunk,
        });
        sent += f.len() as u64;
        if zpeer.ours.write_all(&f).await.is_err() {
            break;
        }
    }
    // What was sent has arrived and been handled: a write queued behind it waits for the pause.
    let paused = node.status().await.tables[0].paused;
    let write = tokio::time::timeout(Duration::from_millis(500), t.insert(2, "two".into())).await;
    let grown = rss().saturating_sub(before);
    eprintln!(
        "sent {sent} bytes of dump after Paused {{ len: 0 }}; paused: {paused}; a write waits: {}; rss grew by {grown} bytes; gave up: {}",
        write.is_err(),
        gave_up.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(
        gave_up.load(std::sync::atomic::Ordering::SeqCst) || zconn.close_reason().is_some(),
        "the coordinator took {sent} bytes of dump from a source that reported 0 records, and \
         still waits for more with its table paused ({paused}; a write waits: {})",
        write.is_err()
    );
    fake.close(0u32.into(), b"");
    node.shutdown().await.unwrap();
}

/// A peer's frames wait in the node's memory, decoded, until the table server handles them,
/// and decoded they can take many times their size: here a record is 2 bytes on the wire and
/// 32 in memory. While the table server is busy (held here in an `on_node_down` callback), a
/// stream's reader stops once `max_frame_size` bytes of its frames wait, and QUIC flow control
/// then stops the peer: it can write about that plus the stream window (1 + 8 MiB, some 144
/// frames of 64 KiB). Without the bound, the reader took up to 1024 frames of any size first
/// (1 GiB decoded here) before the peer had to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_heap_up_decoded_frames_while_the_table_server_is_busy() {
    let mut config = NodeConfig::fast_failover();
    config.max_frame_size = 1 << 20;
    config.max_batch_bytes = 256 << 10;
    config.max_link_queue_bytes = 8 << 20;
    let (a, ha) = node_with("n1", COOKIE, config.clone()).await;
    let (c, hc) = node_with("n2", COOKIE, config).await;
    ha.set(vec![c.local_addr()]);
    hc.set(vec![a.local_addr()]);
    let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let gate = std::sync::Mutex::new((entered_tx, release_rx));
    let opts = TableOptions::set().on_node_down(move |_, _| {
        let gate = gate.lock().unwrap();
        let _ = gate.0.send(());
        let _ = gate.1.recv();
    });
    let ta: T = a.start("t", opts).await.unwrap();
    let tc: T = c.start("t", TableOptions::set()).await.unwrap();
    joined(&[&ta, &tc]).await;
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &a).await;
    let theirs = their_header(&conn).await;
    let mut peer = TablePeer::open(&conn, theirs).await;
    // c leaves: a's table server runs the callback and stays in it until released.
    c.shutdown().await.unwrap();
    tokio::task::spawn_blocking(move || entered_rx.recv())
        .await
        .unwrap()
        .unwrap();
    // 32 768 records of key 0 and an empty string: 64 KiB on the wire, 1 MiB decoded.
    let ops = wire::PeerMsg::Ops {
        seq: 1,
        ops: vec![wire::Op {
            ts: 1,
            kind: wire::OpKind::Insert(vec![(0, String::new()); 32_768]),
        }],
    };
    let f = raw::frame(&ops);
    let mut written = 0;
    for _ in 0..600 {
        let write = peer.ours.write_all(&f);
        match tokio::time::timeout(Duration::from_millis(300), write).await {
            Ok(r) => {
                r.unwrap();
                written += 1;
            }
            Err(_) => break,
        }
    }
    release_tx.send(()).unwrap();
    eprintln!(
        "{written} frames of {} bytes taken while the table server was busy",
        f.len()
    );
    assert!(
        written < 300,
        "the node took {written} frames of {} bytes ({} MiB decoded) while its table server was busy",
        f.len(),
        written
    );
    ta.sync().await.unwrap();
    ep.close(0u32.into(), b"");
    a.shutdown().await.unwrap();
}

/// A discovered address whose dials fail is dialed less and less often: after `n` failures in a
/// row, only `discovery_interval * 2^(n-1)` later. Over 60 discovery rounds of 20 ms, dials
/// refused at once come at rounds 0, 1, 3, 7, 15, 31 (and 63): at most 7, where the node
/// without the backoff dialed on every round. `Node::connect` dials at once whatever the
/// backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_whose_dials_fail_is_dialed_less_and_less_often() {
    let mut config = NodeConfig::fast_failover();
    config.discovery_interval = Duration::from_millis(20);
    config.discovery_max_backoff = Duration::from_secs(60);
    let (node, disco) = node_with("n1", COOKIE, config).await;
    // A QUIC endpoint that refuses every connection, and counts them.
    let refuser = raw::server_endpoint("127.0.0.1");
    let addr = refuser.local_addr().unwrap();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attempts.clone();
    let server = refuser.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            incoming.refuse();
        }
    });
    let dials = || attempts.load(std::sync::atomic::Ordering::SeqCst);
    disco.set(vec![addr]);
    eventually(WAIT, "the first dial", || async move { dials() >= 1 }).await;
    let from = node.status().await.discovery_rounds;
    eventually(WAIT, "60 more discovery rounds", || {
        let node = &node;
        async move { node.status().await.discovery_rounds >= from + 60 }
    })
    .await;
    let after_60 = dials();
    eprintln!("{after_60} dials over 60 discovery rounds");
    assert!(
        (2..=8).contains(&after_60),
        "{after_60} dials over 60 discovery rounds of an address that refuses them"
    );
    let status = node.status().await;
    assert!(
        status.unavailable.iter().any(|(a, _)| *a == addr),
        "reported unavailable: {:?}",
        status.unavailable
    );
    node.connect(addr);
    eventually(WAIT, "Node::connect dials at once", || async move {
        dials() > after_60
    })
    .await;
    refuser.close(0u32.into(), b"");
    node.shutdown().await.unwrap();
}

impl TablePeer {
    /// Makes the raw peer `me` a member of `node`'s set table `t` the way a join coordinator
    /// does: pause, an apply of nothing naming both nodes as the members, unpause.
    async fn member_of(conn: &quinn::Connection, node: &Node, me: &NodeId) -> Self {
        let mut peer = Self::open(conn, their_header(conn).await).await;
        let join = 4242;
        let pause = wire::JoinReq::Pause {
            join,
            lease_ms: 60_000,
        };
        assert_eq!(peer.ask(pause).await, "Paused");
        let apply = wire::JoinReq::Apply {
            join,
            owners: vec![],
            records: vec![],
            members: Some(vec![me.clone(), node.id().clone()]),
            merge: None,
        };
        assert_eq!(peer.ask(apply).await, "Applied");
        assert_eq!(peer.ask(wire::JoinReq::Unpause { join }).await, "Unpaused");
        peer
    }

    /// Sends one `Ops` frame of one op of `kind` as batch `seq` (stamped `seq`); returns the
    /// time until the node acked it.
    async fn acked_after(&mut self, seq: u64, kind: wire::OpKind) -> Duration {
        let f = raw::frame(&wire::PeerMsg::Ops {
            seq,
            ops: vec![wire::Op { ts: seq, kind }],
        });
        let start = std::time::Instant::now();
        self.ours.write_all(&f).await.unwrap();
        loop {
            // (A frame this copy of the messages cannot decode is an anti-entropy digest.)
            let Ok(msg) =
                postcard::from_bytes::<wire::PeerMsg>(&raw::read_frame(&mut self.theirs).await)
            else {
                continue;
            };
            if matches!(msg, wire::PeerMsg::Ack { seq: s, .. } if s >= seq) {
                return start.elapsed();
            }
        }
    }
}

/// A member's batch that names many owners already down here costs the table server about
/// what the same records of one live owner cost. Each such owner used to be looked up in a
/// list of the down ones: 30 000 of them took 3.4 s against 55 ms for one live owner, and a
/// review helper's 60 000 in one 0.8 MB frame held the table server for 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_naming_many_owners_that_are_down_costs_what_its_records_cost() {
    let (node, _h) = node("n1").await;
    let t: T = node.start("t", TableOptions::set()).await.unwrap();
    let ep = raw::endpoint();
    let conn = authenticated(&ep, &node).await;
    let me = node.status().await.connected[0].0.clone();
    let mut peer = TablePeer::member_of(&conn, &node, &me).await;
    assert_eq!(t.nodes(), vec!["a-raw".to_string()]);
    let n = 30_000u32;
    let owned = |base: u64, owners: Vec<NodeId>| {
        let count = owners.len() as u32;
        wire::OpKind::InsertOwned {
            owners,
            records: (0..n)
                .map(|i| (base + u64::from(i), String::new(), i % count))
                .collect(),
        }
    };
    let live = peer.acked_after(1, owned(0, vec![me.clone()])).await;
    let down: Vec<NodeId> = (0..n)
        .map(|i| NodeId {
            name: format!("d{i}"),
            incarnation: 0,
        })
        .collect();
    let orphans = peer.acked_after(2, owned(u64::from(n), down)).await;
    assert_eq!(
        t.len(),
        n as usize,
        "the records of owners that are down are dropped"
    );
    assert!(
        orphans < live * 20 + Duration::from_millis(500),
        "{n} records of {n} owners that are down took {orphans:?}, of one live owner {live:?}"
    );
    ep.close(0u32.into(), b"");
    node.shutdown().await.unwrap();
}

/// Before its cookie proof is checked, a connection can make the node hold little: it may open
/// no table stream and no second bidirectional stream (each table stream could have held 8 MiB,
/// 32 MiB in all, for `handshake_timeout`). Once authenticated, it opens streams at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_connection_can_open_no_table_stream() {
    let (node, _h) = node("n1").await;
    let ep = raw::endpoint();
    let conn = raw::connect(&ep, node.local_addr()).await;
    let pending = Duration::from_millis(300);
    assert!(
        tokio::time::timeout(pending, conn.open_uni())
            .await
            .is_err(),
        "a table stream was granted before the handshake"
    );
    let (_send, _recv) = conn.open_bi().await.unwrap();
    assert!(
        tokio::time::timeout(pending, conn.open_bi()).await.is_err(),
        "a second bidirectional stream was granted before the handshake"
    );

    let proven = authenticated(&ep, &node).await;
    tokio::time::timeout(WAIT, proven.open_uni())
        .await
        .expect("a table stream once authenticated")
        .unwrap();
    ep.close(0u32.into(), b"");
    node.shutdown().await.unwrap();
}
