//! A join that takes many times its lease completes: the join's own progress keeps the lease
//! alive, and renewals do not wait behind the join's work.

mod common;

use std::time::{Duration, Instant};

use cets::{NodeConfig, TableOptions};
use common::*;

/// Records on each side.
const N: u32 = 100_000;

/// `fast_failover` with the lease shrunk (rather than the tables grown): the join of two
/// tables of `N` records takes many leases in a debug build.
fn config() -> NodeConfig {
    let mut c = NodeConfig::fast_failover();
    c.join_lease = Duration::from_millis(300);
    c.join_chunk_records = 1_000;
    c
}

/// Two nodes with `N` records each join. The coordinator used to queue every chunk to apply
/// before it awaited a reply, so its renewals travelled behind them (and behind its own
/// table server's work: its dump, the chunks it applied itself); a participant that needed
/// longer than the lease to get there unpaused part way and refused the rest, and the join
/// failed the same way on every retry. Now each dump request and applied chunk renews the
/// participant's lease, renewals go straight to the peers' streams, and dumps go out chunk
/// by chunk.
// Two table servers busy at once, each on a thread, while quinn's tasks still get threads: in
// production each node is a process with a runtime of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_that_take_many_leases_to_merge_join() {
    let (a, _da) = node_with("a", "test-cookie", config()).await;
    let (b, _db) = node_with("b", "test-cookie", config()).await;
    let ta = a.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    let tb = b.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    for start in (0..N).step_by(10_000) {
        let end = (start + 10_000).min(N);
        ta.insert_many((start..end).map(|k| (k, k)).collect())
            .await
            .unwrap();
        tb.insert_many((N + start..N + end).map(|k| (k, k)).collect())
            .await
            .unwrap();
    }
    let started = Instant::now();
    a.connect(b.local_addr());
    eventually(
        Duration::from_secs(30),
        "both hold the union, as members of each other",
        || {
            let (ta, tb) = (ta.clone(), tb.clone());
            async move {
                ta.len() == 2 * N as usize
                    && tb.len() == 2 * N as usize
                    && ta.nodes() == ["b"]
                    && tb.nodes() == ["a"]
            }
        },
    )
    .await;
    eprintln!(
        "{N} + {N} records joined in {:?} with a {:?} lease",
        started.elapsed(),
        config().join_lease
    );
    assert_eq!(ta.get(&(2 * N - 1)), Some(2 * N - 1));
    assert_eq!(tb.get(&0), Some(0));
    shutdown_all([&a, &b]).await;
}
