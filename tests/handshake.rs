//! The cookie handshake against a raw peer: garbage before and during it, malformed hellos,
//! rationing of handshakes in progress, what an unauthenticated connection may do.

mod common;
#[path = "common/raw_peer.rs"]
mod raw_peer;

use std::net::SocketAddr;
use std::time::Duration;

use cets::{Node, NodeConfig, NodeId};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use raw_peer::*;

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
