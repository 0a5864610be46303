//! Joins refused `Busy`: a pause that ends starts them again (ALGORITHM.md, section 20), so
//! nodes that start together form without waiting out back-offs.

#[path = "common/capture.rs"]
mod capture;
mod common;

use std::time::{Duration, Instant};

use capture::capture;
use cets::{NodeConfig, Table, TableOptions};
use common::mesh::{members, Mesh};
use common::{cluster, eventually, gate, WAIT};

type T = Table<String, u64>;

/// A back-off no test waits out.
const HOUR: Duration = Duration::from_secs(3600);

/// b's join with c holds both paused; a's joins with b and with c are refused `Busy` (by b or
/// c, or by a itself while its other join holds it). With a join back-off of an hour, only the
/// end of b's pause can start them again: b and c tell a when they unpause, and a itself wakes
/// its joins when its own pause ends. Before, a waited out the back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_refused_busy_starts_again_when_the_pause_ends_not_after_its_back_off() {
    let logs = capture();
    let mut config = NodeConfig::fast_failover();
    config.join_backoff = HOUR;
    config.join_max_backoff = HOUR;
    let mesh = Mesh::start_with(&["a", "b", "c"], config).await;
    let (opts, reached, release) = gate("locked");
    let tb: T = mesh.nodes[1].start("busy_wake", opts).await.unwrap();
    let tc: T = mesh.nodes[2]
        .start("busy_wake", TableOptions::set())
        .await
        .unwrap();
    reached.notified().await; // b and c paused by b's join, which waits here
    let ta: T = mesh.nodes[0]
        .start("busy_wake", TableOptions::set())
        .await
        .unwrap();
    ta.insert("from-a".into(), 1).await.unwrap();
    // Each of a's two joins fails once (then backs off an hour, without the wake).
    let failed = || {
        logs.count(
            "join finished",
            &[
                ("outcome", "error"),
                ("error", "join of table \"busy_wake\" with *"),
            ],
        )
    };
    eventually(WAIT, "a's joins with b and c refused", || async {
        failed() >= 2
    })
    .await;
    assert!(ta.nodes().is_empty());
    release.notify_one();
    members(&[&ta, &tb, &tc], 2).await;
    eventually(WAIT, "a's record everywhere", || async {
        tb.get(&"from-a".to_string()) == Some(1) && tc.get(&"from-a".to_string()) == Some(1)
    })
    .await;
}

/// Four nodes connected to each other start their table at once: every coordinator's joins
/// pause each other and most are refused `Busy` at first. Prints the time until every node lists
/// the other three (not asserted: a figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_starting_a_table_at_once_form() {
    let _ = capture();
    let nodes = cluster(&["a", "b", "c", "d"]).await;
    let all: Vec<_> = nodes.iter().map(|(n, _)| n.clone()).collect();
    eventually(WAIT, "every node connected to the other three", || {
        let all = all.clone();
        async move {
            for n in &all {
                if n.status().await.connected.len() != 3 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    let start = Instant::now();
    let tables: Vec<T> = futures_join(&all).await;
    let started = start.elapsed();
    let refs: Vec<&T> = tables.iter().collect();
    eventually(WAIT, "every node lists the other three", || async {
        refs.iter().all(|t| t.nodes().len() == 3)
    })
    .await;
    eprintln!(
        "four tables started at once ({started:?} to start them all): formed {:?} after the first start",
        start.elapsed()
    );
}

/// Starts table "formed" on every node at once.
async fn futures_join(nodes: &[cets::Node]) -> Vec<T> {
    let mut tasks = Vec::new();
    for n in nodes {
        let n = n.clone();
        tasks.push(tokio::spawn(async move {
            n.start::<String, u64>("formed", TableOptions::set())
                .await
                .unwrap()
        }));
    }
    let mut tables = Vec::new();
    for t in tasks {
        tables.push(t.await.unwrap());
    }
    tables
}
