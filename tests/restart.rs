//! A node restarts in the same process on the same address: `Node::shutdown` frees the UDP
//! port before it returns, whatever handles of the old node the program still holds.

#[path = "common/capture.rs"]
mod capture;
mod common;

use std::time::Instant;

use cets::{Node, NodeConfig, TableOptions};
use common::*;

/// `a` shuts down while the program still holds its `Node` and a `Table` handle, and starts
/// again on the same address at once; it rejoins `b` and gets the table back. (The port used
/// to stay bound as long as any handle lived, and the restart failed with `AddrInUse`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_on_its_address_while_handles_of_the_old_one_live() {
    // The binary's log subscriber, installed first whichever test runs first.
    capture::capture();
    let nodes = cluster(&["a", "b"]).await;
    let (a, b) = (&nodes[0].0, &nodes[1].0);
    let ta = a.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    let tb = b.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    joined(&[&ta, &tb]).await;
    tb.insert(1, 10).await.unwrap();
    let addr = a.local_addr();
    a.shutdown().await.unwrap();

    // `a` and `ta` are still alive here.
    let again = Node::builder("a")
        .listen(addr)
        .cookie("test-cookie")
        .config(NodeConfig::fast_failover())
        .discovery(cets::discovery::StaticDiscovery::new(vec![b.local_addr()]))
        .start()
        .await
        .expect("the address is free once shutdown returned");
    assert_eq!(again.local_addr(), addr);
    let ta2 = again
        .start("t", TableOptions::<u32, u32>::set())
        .await
        .unwrap();
    joined(&[&ta2, &tb]).await;
    assert_eq!(ta2.get(&1), Some(10));
    assert_eq!(ta.get(&1), Some(10), "the old handle still reads its copy");
    assert!(
        ta.insert(2, 20).await.is_err(),
        "the old handle's node is down"
    );
    shutdown_all([&again, b]).await;
}

/// a dials c's address while c is down (the port is closed: here, a socket that answers
/// nothing, and has received the dial's first packet), and that dial is still in flight when c
/// starts there. c dials a, and a, the
/// smaller name, closes that connection with `REDIRECT` and dials c back: the new dial
/// replaces the one in flight at once. (It used to be skipped as "already dialing", and a
/// waited until QUIC resent the old dial's first packet, 1.0 to 1.9 s after c's start.) The
/// time from c's start until both list each other as members is printed, not asserted.
///
/// The two other ways a reaches c are kept out of the way: QUIC's resend of the first packet
/// (initial RTT 30 s) and the replacement of a dial nobody answered (a's discovery polls once
/// a minute); either would otherwise reach c first about as often as not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_from_a_restarted_node_replaces_the_dial_still_in_flight_to_it() {
    let logs = capture::capture();
    let hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    hole.set_nonblocking(true).unwrap();
    let c_addr = hole.local_addr().unwrap();
    let mut config = NodeConfig::fast_failover();
    config.initial_rtt = std::time::Duration::from_secs(30);
    config.idle_timeout = std::time::Duration::from_secs(300);
    config.keep_alive_interval = std::time::Duration::from_secs(1);
    config.handshake_timeout = std::time::Duration::from_secs(300);
    config.discovery_interval = std::time::Duration::from_secs(60);
    config.discovery_max_backoff = std::time::Duration::from_secs(60);
    let (a, _a_disco) = node_with("a", "test-cookie", config).await;
    let ta = a.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    a.connect(c_addr);
    let addr = c_addr.to_string();
    // The first packet is in the silent socket (the "dialing" log comes before it is sent,
    // and a packet sent after c's start would reach c itself).
    let hole = tokio::net::UdpSocket::from_std(hole).unwrap();
    let mut buf = [0u8; 2048];
    tokio::time::timeout(WAIT, hole.recv_from(&mut buf))
        .await
        .expect("a's first dial reaches the silent port")
        .unwrap();
    drop(hole);
    let started = Instant::now();
    let c = Node::builder("c")
        .listen(c_addr)
        .cookie("test-cookie")
        .config(NodeConfig::fast_failover())
        .discovery(cets::discovery::StaticDiscovery::new(vec![a.local_addr()]))
        .start()
        .await
        .unwrap();
    let up = started.elapsed();
    let tc = c.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    joined(&[&ta, &tc]).await;
    eprintln!(
        "c was a member on a and a on c {:?} after c's start ({up:?} of it in Node::start)",
        started.elapsed()
    );
    assert!(
        logs.has(
            "a dial in flight replaced: the peer is up there now",
            &[("addr", &addr)]
        ),
        "a's dial-back after REDIRECT replaced its dial in flight"
    );
    shutdown_all([&a, &c]).await;
}

/// b, the larger name, dials a; a closes that dial with `REDIRECT` and dials b back. Every
/// packet between them waits 150 ms each way (a relay; a reaches b through the relay's other
/// side, the address it saw b's dial come from), so the dial-back takes one to two round trips
/// after b heard the `REDIRECT`, longer than b's discovery interval. b waits for it instead of dialing a again at every discovery
/// round (each such dial was only redirected again, a full handshake for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_node_waits_for_the_dial_back_instead_of_dialing_again() {
    let logs = capture::capture();
    let mut config = NodeConfig::fast_failover();
    // Shorter than what the dial-back takes after the `REDIRECT` (a round trip or two), so
    // at least one discovery round falls in between.
    config.discovery_interval = std::time::Duration::from_millis(150);
    let (a, _a_disco) = node_with("a", "test-cookie", config.clone()).await;
    let (b, b_disco) = node_with("b", "test-cookie", config).await;
    let relay = Relay::start(a.local_addr()).await;
    let delay = std::time::Duration::from_millis(150);
    relay.set_delay(delay, std::time::Duration::ZERO);
    let ta = a.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    let tb = b.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    let addr = relay.addr().to_string();
    b_disco.set(vec![relay.addr()]);
    joined(&[&ta, &tb]).await;
    let redirected: &[(&str, &str)] = &[("addr", &addr)];
    let redials = logs
        .count_after(
            ("dial redirected; the peer dials back", redirected),
            "dialing",
            &[("addr", &addr)],
        )
        .expect("b's dial was redirected");
    assert_eq!(
        redials, 0,
        "b dialed a again {redials} times while a's dial-back was on its way"
    );
    shutdown_all([&a, &b]).await;
}
