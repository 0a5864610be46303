//! Connections over real QUIC on loopback: one connection per pair, cookie authentication,
//! refusal of incompatible tables, restarts and new incarnations, redial backoff.

mod common;
#[path = "common/raw_peer.rs"]
mod raw_peer;

use std::net::SocketAddr;
use std::time::Duration;

use cets::discovery::StaticDiscovery;
use cets::{Node, NodeConfig, NodeId, Table, TableOptions};
use common::*;
use raw_peer::*;

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

/// A configuration under which QUIC itself never sends a dial's first packet again within a
/// test, nor gives up on it: only the node's own redial can reach a peer whose port was closed
/// when the first packet was sent.
fn no_quic_resend() -> NodeConfig {
    let mut config = NodeConfig::fast_failover();
    config.initial_rtt = Duration::from_secs(30);
    config.idle_timeout = Duration::from_secs(300);
    config.keep_alive_interval = Duration::from_secs(1);
    config.handshake_timeout = Duration::from_secs(300);
    config
}

/// a dials c's address while nothing answers there (the port swallows the packet, as a port
/// not yet open, or a lost packet, would); then c starts there, and does not dial a itself. a's
/// dial stays unanswered, and QUIC would send its first packet again only after three initial
/// RTTs (90 s here; a second with QUIC's default of 333 ms): a dial nobody answered within a
/// discovery interval is replaced at the next discovery round, so a reaches c at once. (Before,
/// discovery skipped the address as "already dialing", and this test timed out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_nobody_answered_is_replaced_at_the_next_discovery_round() {
    let hole = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let c_addr = hole.local_addr().unwrap();
    let (a, a_disco) = node_with("a", COOKIE, no_quic_resend()).await;
    let ta: Table<u32, u32> = a.start("t", TableOptions::set()).await.unwrap();
    a_disco.set(vec![c_addr]);
    let mut buf = [0u8; 2048];
    tokio::time::timeout(WAIT, hole.recv_from(&mut buf))
        .await
        .expect("a's first dial reaches the silent port")
        .unwrap();
    drop(hole);
    let c = Node::builder("c")
        .listen(c_addr)
        .cookie(COOKIE)
        .config(no_quic_resend())
        .discovery(StaticDiscovery::new(Vec::<SocketAddr>::new()))
        .start()
        .await
        .unwrap();
    let tc: Table<u32, u32> = c.start("t", TableOptions::set()).await.unwrap();
    joined(&[&ta, &tc]).await;
    shutdown_all([&a, &c]).await;
}

/// An address where nothing ever answers is dialed less and less often: a dial replaced for
/// want of an answer counts as a failed dial, so each waits twice as long as the one before.
/// Over 60 discovery rounds of 20 ms, with no QUIC resend, the silent port sees dials at rounds
/// 0, 1, 3, 7, 15, 31 (and 63): at most 8, not one per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_that_never_answers_is_dialed_less_and_less_often() {
    let mut config = no_quic_resend();
    config.discovery_interval = Duration::from_millis(20);
    config.discovery_max_backoff = Duration::from_secs(60);
    let (node, disco) = node_with("n1", COOKIE, config).await;
    let hole = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap();
    // Each dial is one QUIC connection attempt: its packets carry the destination connection ID
    // it chose (a long header: flags, version, ID length, ID). An abandoned dial's close is one
    // more packet of the same attempt.
    let attempts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let seen = attempts.clone();
    let silent = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = hole.recv_from(&mut buf).await {
            let len = usize::from(buf[5]);
            if n >= 6 + len {
                seen.lock().unwrap().insert(buf[6..6 + len].to_vec());
            }
        }
    });
    let dials = || attempts.lock().unwrap().len();
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
        "{after_60} dials over 60 discovery rounds of an address that never answers"
    );
    silent.abort();
    node.shutdown().await.unwrap();
}
