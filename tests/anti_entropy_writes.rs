//! Anti-entropy of tables that are never at rest (ALGORITHM.md, section 15.4): while every
//! node writes without pause, a difference made behind the protocol's back is found and
//! repaired by the comparison at a cut, and no write in flight is ever "repaired".

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cets::{Node, NodeConfig, Table, TableOptions};
use common::*;

type T = Table<u64, String>;

/// Writer tasks per node.
const WRITERS: u64 = 3;

async fn cluster_with(names: &[&str], interval: Duration) -> Vec<Node> {
    let mut nodes = Vec::new();
    let mut handles = Vec::new();
    for n in names {
        let mut config = NodeConfig::fast_failover();
        config.anti_entropy_interval = Some(interval);
        let (node, h) = node_with(n, "test-cookie", config).await;
        nodes.push(node);
        handles.push(h);
    }
    let addrs: Vec<_> = nodes.iter().map(|n| n.local_addr()).collect();
    for h in &handles {
        h.set(addrs.clone());
    }
    nodes
}

/// Sums over a table's members: (differences found, records repaired, comparisons at a cut,
/// digests compared as they are).
async fn counts(t: &T) -> (u64, u64, u64, u64) {
    let s = t.status().await.unwrap();
    let a = s.anti_entropy.expect("anti-entropy is on");
    a.peers.iter().fold((0, 0, 0, 0), |c, p| {
        (
            c.0 + p.differences,
            c.1 + p.repaired,
            c.2 + p.rounds_at_cut,
            c.3 + p.rounds,
        )
    })
}

async fn total(tables: &[T]) -> (u64, u64, u64, u64) {
    let mut sum = (0, 0, 0, 0);
    for t in tables {
        let c = counts(t).await;
        sum = (sum.0 + c.0, sum.1 + c.1, sum.2 + c.2, sum.3 + c.3);
    }
    sum
}

/// Writers that never pause: on each node, two tasks that overwrite and delete keys of
/// their own (100..) and overwrite keys every node writes (50..60), each write awaited, one
/// after the other. Returns the count of writes done and the tasks.
fn writers(
    tables: &[T],
    stop: &Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        for w in 0..WRITERS {
            let (t, stop, done) = (t.clone(), stop.clone(), done.clone());
            let base = 100 + (i as u64 * WRITERS + w) * 1000;
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let r = match n % 5 {
                        0 => t.delete(&(base + n % 40)).await,
                        1 => t.insert(50 + n % 10, format!("{i}:{w}:{n}")).await,
                        _ => t.insert(base + n % 40, format!("{n}")).await,
                    };
                    r.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    (done, tasks)
}

async fn stop_writers(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until the cluster made at least `n` more comparisons at a cut than `since`.
async fn cut_rounds(tables: &[T], since: u64, n: u64, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        total(tables).await.2 >= since + n
    })
    .await;
}

async fn start(nodes: &[Node]) -> Vec<T> {
    let mut tables = Vec::new();
    for n in nodes {
        tables.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    tables
}

/// Turns the comparison of digests as they are off or on, on every node. Awaited writes
/// leave gaps of a round trip in which the frontiers can meet (section 15.2); with it off,
/// only the comparison at a cut can find anything, so these tests show what it does alone.
async fn compare_at_rest(tables: &[T], on: bool) {
    for t in tables {
        t.testing_compare_at_rest(on).await.unwrap();
    }
}

/// b loses a record of a's, gains one of its own and one of c's, behind the protocol's back,
/// while all three nodes keep writing; the records that nobody writes any more are repaired
/// without the writes ever stopping: a's record is back on b, b's own is copied to a and c,
/// and c's record that c never wrote is dropped from b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_difference_is_repaired_while_every_node_keeps_writing() {
    let nodes = cluster_with(&["a", "b", "c"], Duration::from_millis(200)).await;
    let tables = start(&nodes).await;
    let (a, b, c) = (&tables[0], &tables[1], &tables[2]);
    a.insert(1, "a's".into()).await.unwrap();
    for t in &tables {
        t.sync().await.unwrap();
    }
    compare_at_rest(&tables, false).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (done, tasks) = writers(&tables, &stop);
    let before = total(&tables).await;
    cut_rounds(
        &tables,
        before.2,
        2,
        "two comparisons at a cut under writes",
    )
    .await;

    // b's subscriber hears the repair among the writes, as a repair from a.
    let mut sub = b.subscribe().await.unwrap();
    b.testing_remove_local(1, None).await.unwrap();
    b.testing_put_local(2, "b's own".into(), None)
        .await
        .unwrap();
    b.testing_put_local(3, "c never wrote it".into(), Some("c"))
        .await
        .unwrap();
    let writes_at_injection = done.load(Ordering::Relaxed);
    let repaired = || async {
        tables.iter().all(|t| {
            t.get(&1).as_deref() == Some("a's")
                && t.get(&2).as_deref() == Some("b's own")
                && t.get(&3).is_none()
        })
    };
    eventually(
        Duration::from_secs(60),
        "every replica holds 1 and 2 and not 3 again, under writes",
        repaired,
    )
    .await;
    let writes_at_repair = done.load(Ordering::Relaxed);
    let during = total(&tables).await;
    let restored = cets::Change::Repaired {
        key: 1,
        value: Some("a's".to_string()),
        previous: None,
    };
    let heard = tokio::time::timeout(WAIT, async {
        while let Some(u) = sub.recv().await {
            if let cets::Update::Change(e) = u {
                if e.change == restored {
                    return e.node.name;
                }
            }
        }
        String::new()
    })
    .await
    .expect("b's subscriber hears key 1 come back as a repair");
    assert_eq!(heard, "a", "the repair is named after its peer");
    stop_writers(&stop, tasks).await;
    compare_at_rest(&tables, true).await;
    assert!(
        writes_at_repair > writes_at_injection,
        "the writers kept writing meanwhile"
    );
    assert!(
        during.0 - before.0 >= 3 && during.1 - before.1 >= 3,
        "three differences found and repaired: {before:?} -> {during:?}"
    );
    assert_eq!(during.3, before.3, "no digest was compared as it is");
    eprintln!(
        "repaired under writes: {} writes meanwhile, {} comparisons at a cut",
        writes_at_repair - writes_at_injection,
        during.2 - before.2,
    );
    for n in &nodes {
        n.wait_for_converged(Duration::from_secs(30)).await.unwrap();
    }
    let all = sorted(a.to_vec());
    assert_eq!(sorted(b.to_vec()), all);
    assert_eq!(sorted(c.to_vec()), all);
    shutdown_all(&nodes).await;
}

/// Under writes that never pause (overwrites and deletes, and keys every node writes), many
/// comparisons at a cut find replicas that differ by writes in flight, and none of them is
/// repaired: once the writes stop, every replica is equal and no node counts a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_in_flight_is_repaired_under_continuous_writes() {
    let nodes = cluster_with(&["a", "b", "c"], Duration::from_millis(100)).await;
    let tables = start(&nodes).await;
    compare_at_rest(&tables, false).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (done, tasks) = writers(&tables, &stop);
    cut_rounds(&tables, 0, 20, "twenty comparisons at a cut under writes").await;
    stop_writers(&stop, tasks).await;
    compare_at_rest(&tables, true).await;
    for n in &nodes {
        n.wait_for_converged(Duration::from_secs(30)).await.unwrap();
    }
    let (differences, repaired, at_cut, as_they_are) = total(&tables).await;
    eprintln!(
        "{} writes, {at_cut} comparisons at a cut, {as_they_are} digests compared as they are",
        done.load(Ordering::Relaxed)
    );
    assert_eq!(
        (differences, repaired),
        (0, 0),
        "no write in flight was repaired"
    );
    let all = sorted(tables[0].to_vec());
    for t in &tables[1..] {
        assert_eq!(sorted(t.to_vec()), all);
    }
    shutdown_all(&nodes).await;
}
