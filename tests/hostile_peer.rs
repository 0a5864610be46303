//! An authenticated peer that misbehaves, speaking the wire protocol itself: bad frames and
//! streams, join messages out of turn, endless dumps, a peer that does not read. Each test
//! checks that only that peer is affected.

mod common;
#[path = "common/raw_peer.rs"]
mod raw_peer;

use std::time::Duration;

use cets::{NodeConfig, NodeId, TableOptions};
use common::*;
use raw_peer::*;

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
/// after join, each asking for the table's dump) is closed with the `OVERLOAD` code once a dump
/// is asked for while the last one still waits for room in the queue (a dump streams as the
/// peer reads); the node's other connection goes on as before. Without the bound, each round
/// queued another copy of the table, without end.
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

/// A peer the node joins with answers its `Dump` with chunks that never end, after reporting
/// in its `Paused` reply that it holds nothing. The coordinator keeps a dump until it is
/// complete, and each chunk renews its lease, so without a bound the node's table would stay
/// paused, and its memory grow, for as long as the peer sends. A dump brings at most about as
/// many records as its source said it held when it paused (a dump streams, whatever its size in
/// bytes): past that, the node drops the request, the join fails, and the table is unpaused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_that_never_ends_is_not_kept_without_end() {
    endless_dump(0, NodeConfig::fast_failover()).await;
}

/// The same endless dump from a peer that said, when it paused, that it holds `u64::MAX`
/// records: what it claims is no bound, so the node's own is (`max_join_records`, here 50 000
/// of the 400 000 records the peer sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_from_a_source_that_claims_to_hold_everything_stops_at_max_join_records() {
    let mut config = NodeConfig::fast_failover();
    config.max_join_records = 50_000;
    endless_dump(u64::MAX, config).await;
}

/// Joins a raw peer that reports `len` records when paused, then answers the dump request
/// with 400 000 records that never end, and checks that the node gave up on them.
async fn endless_dump(len: u64, mut config: NodeConfig) {
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
                    len,
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
        "sent {sent} bytes of dump after Paused {{ len: {len} }}; paused: {paused}; a write waits: {}; rss grew by {grown} bytes; gave up: {}",
        write.is_err(),
        gave_up.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(
        gave_up.load(std::sync::atomic::Ordering::SeqCst) || zconn.close_reason().is_some(),
        "the coordinator took {sent} bytes of dump from a source that reported {len} records, and \
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
