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

/// Frames of at most 64 KiB and an outbound queue of 256 KiB per link: a dump of `BIG`
/// records of about 40 bytes is several times the queue.
fn small_queue() -> NodeConfig {
    let mut c = NodeConfig::fast_failover();
    c.max_frame_size = 64 << 10;
    c.max_batch_bytes = 16 << 10;
    c.max_link_queue_bytes = 256 << 10;
    c.join_chunk_records = 1_000;
    c
}

/// Records on each side of the small-queue joins.
const BIG: u32 = 20_000;

/// Two nodes holding `BIG` records each (a few keys on both sides, with different values)
/// join under `small_queue`: a dump is several times `max_link_queue_bytes`, so it has to
/// stream as the queues drain. The coordinator used to refuse a dump whose replies passed
/// the queue bound, and to retry for ever (10 M + 10 M records never joined with the
/// default 256 MiB).
async fn a_dump_larger_than_the_queue_bound(opts: TableOptions<u32, String>) {
    let (a, _da) = node_with("a", "test-cookie", small_queue()).await;
    let (b, _db) = node_with("b", "test-cookie", small_queue()).await;
    let ta = a.start("t", opts.clone()).await.unwrap();
    let tb = b.start("t", opts).await.unwrap();
    let value = |side: &str, k: u32| format!("{side}-{k:0>30}");
    // Batches of 400 records: one write encodes to at most half a frame.
    for start in (0..BIG).step_by(400) {
        // Keys 0..10 on both sides; the rest on one side each.
        ta.insert_many((start..start + 400).map(|k| (k, value("a", k))).collect())
            .await
            .unwrap();
        let theirs = start + BIG - 10;
        tb.insert_many((theirs..theirs + 400).map(|k| (k, value("b", k))).collect())
            .await
            .unwrap();
    }
    a.connect(b.local_addr());
    let whole = 2 * BIG as usize - 10;
    eventually(
        Duration::from_secs(60),
        "both hold the union, as members of each other",
        || {
            let (ta, tb) = (ta.clone(), tb.clone());
            async move {
                ta.len() == whole && tb.len() == whole && ta.nodes() == ["b"] && tb.nodes() == ["a"]
            }
        },
    )
    .await;
    let (mut va, mut vb) = (ta.to_vec(), tb.to_vec());
    va.sort();
    vb.sort();
    assert_eq!(va.len(), whole);
    assert!(va == vb, "the two tables differ after the join");
    shutdown_all([&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_larger_than_the_queue_bound_streams_in_an_exchange() {
    a_dump_larger_than_the_queue_bound(TableOptions::set()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_larger_than_the_queue_bound_streams_in_a_central_merge() {
    let opts = TableOptions::set()
        .conflict_handler(|_k: &u32, a: &String, b: &String| std::cmp::max(a, b).clone());
    a_dump_larger_than_the_queue_bound(opts).await;
}
