//! A table stream to a peer is opened again whenever the link has none and the peer runs the
//! table, whatever order the table server learns of the two in.

#[path = "common/capture.rs"]
mod capture;
mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use cets::TableOptions;
use common::*;

/// Numbered gates a callback can be held at, from the test: `hold(n)` blocks the calling
/// thread until the test calls `release(n)`. Dropping the gates releases every one, so a
/// failing test does not leave a table server blocked.
#[derive(Clone, Default)]
struct Gates(Arc<(Mutex<(u32, u32)>, Condvar)>);

impl Gates {
    fn hold(&self, n: u32) {
        // The caller (a table server) keeps its thread; `block_in_place` hands the thread's
        // queue of tasks (the writer task it just spawned, for one) to another thread.
        tokio::task::block_in_place(|| self.wait(n));
    }

    fn wait(&self, n: u32) {
        let (lock, cv) = &*self.0;
        let mut g = lock.lock().unwrap();
        g.0 = g.0.max(n);
        cv.notify_all();
        while g.1 < n {
            let (next, timeout) = cv.wait_timeout(g, Duration::from_secs(60)).unwrap();
            g = next;
            if timeout.timed_out() {
                return;
            }
        }
    }

    fn entered(&self) -> u32 {
        self.0 .0.lock().unwrap().0
    }

    fn release(&self, n: u32) {
        let (lock, cv) = &*self.0;
        lock.lock().unwrap().1 = n;
        cv.notify_all();
    }
}

struct ReleaseOnDrop(Gates);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release(u32::MAX);
    }
}

/// a opens its stream of `t` to b before b runs `t`, and b stops it. a's table server is busy
/// (here: held in `on_node_down`) while the stop comes back and while b, having started `t`,
/// opens its own stream: when a's server runs again it handles the new stream before the
/// stale stop. It must still end with a stream to b. (It used to keep the dead stream's queue
/// on the new stream's arrival, then clear it on the stop, for good: a reported b
/// `without_table`, b reported a `not_joined`, and writes on a never reached b.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_stopped_before_the_peer_ran_the_table_is_opened_again() {
    let logs = capture::capture();
    let nodes = cluster(&["a", "c", "d"]).await;
    let (a, c, d) = (&nodes[0].0, &nodes[1].0, &nodes[2].0);
    let (b, _b_disco) = node("b").await;
    let gates = Gates::default();
    let _release = ReleaseOnDrop(gates.clone());
    let held = gates.clone();
    let ta = a
        .start(
            "t",
            TableOptions::<u32, u32>::set().on_node_down(move |id, _| match id.name.as_str() {
                "c" => held.hold(1),
                "d" => held.hold(2),
                _ => {}
            }),
        )
        .await
        .unwrap();
    let tc = c.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    let td = d.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    joined(&[&ta, &tc, &td]).await;

    // a's table server is held while it handles c's departure.
    c.shutdown().await.unwrap();
    eventually(WAIT, "a's table server holds in on_node_down(c)", || {
        let g = gates.clone();
        async move { g.entered() >= 1 }
    })
    .await;
    // Meanwhile a connects to b (its table server has b's PeerUp queued), then d leaves (its
    // PeerDown queued after it: one task, the connection manager, sends both).
    a.connect(b.local_addr());
    eventually(WAIT, "a connected to b", || {
        let logs = logs.clone();
        async move { logs.has("connected", &[("peer", "b#*")]) }
    })
    .await;
    d.shutdown().await.unwrap();
    eventually(WAIT, "a saw d go down", || {
        let logs = logs.clone();
        async move { logs.has("connection lost; node is down", &[("peer", "d#*")]) }
    })
    .await;
    // a's server opens its stream to b, then holds in on_node_down(d) before it can hear
    // anything back.
    gates.release(1);
    eventually(WAIT, "a's table server holds in on_node_down(d)", || {
        let g = gates.clone();
        async move { g.entered() >= 2 }
    })
    .await;
    eventually(WAIT, "b stopped a's stream of t (b runs no t yet)", || {
        let logs = logs.clone();
        async move {
            logs.has(
                "peer runs a table we do not",
                &[("peer", "a#*"), ("table", "t")],
            )
        }
    })
    .await;
    let tb = b.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    eventually(
        WAIT,
        "b's stream of t reached a's table server's queue",
        || {
            let logs = logs.clone();
            async move {
                logs.has(
                    "table stream routed to its table server",
                    &[("peer", "b#*"), ("table", "t")],
                )
            }
        },
    )
    .await;
    gates.release(2);

    joined(&[&ta, &tb]).await;
    ta.insert(1, 10).await.unwrap();
    assert_eq!(tb.get(&1), Some(10), "a write on a reached b");
    tb.insert(2, 20).await.unwrap();
    assert_eq!(ta.get(&2), Some(20), "a write on b reached a");
    shutdown_all([a, &b]).await;
}
