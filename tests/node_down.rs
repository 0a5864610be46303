//! Node down over real QUIC through cuttable UDP relays on loopback: graceful shutdown, cuts,
//! restarts, records dropped with their owner, and writers that die halfway.
//!
//! Behaviour ported from CETS test cases (names from esl/cets):
//! - `handle_down_is_called`, `node_list_is_correct`: graceful_shutdown_drops_records_and_calls_handle_down_once
//!   (and `replication.rs` for `test_multinode`)
//! - `write_returns_if_remote_server_crashes`: write_returns_when_the_peer_dies_before_acking

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cets::{NodeConfig, Table, TableOptions};
use common::mesh::*;
use common::*;

type T = Table<String, u64>;

type DownsByName = Arc<Mutex<Vec<(String, usize)>>>;

fn opts_with_downs() -> (TableOptions<String, u64>, DownsByName) {
    let downs: DownsByName = Arc::default();
    let d = downs.clone();
    let opts = TableOptions::set().on_node_down(move |node, recs| {
        d.lock().unwrap().push((node.name.clone(), recs.len()));
    });
    (opts, downs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drops_records_and_calls_handle_down_once() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for n in &mesh.nodes {
        let (o, d) = opts_with_downs();
        tables.push(n.start("t", o).await.unwrap());
        downs.push(d);
    }
    members(&tables.iter().collect::<Vec<_>>(), 2).await;
    for (t, p) in tables.iter().zip(["a", "b", "c"]) {
        write_n(t, p, 10).await;
    }
    assert_eq!(tables[0].len(), 30);
    mesh.nodes[2].shutdown().await.unwrap();
    for i in 0..2 {
        let t = tables[i].clone();
        eventually(WAIT, "c's records dropped", || {
            let t = t.clone();
            async move { t.len() == 20 && t.nodes() == vec![["b", "a"][i].to_string()] }
        })
        .await;
        assert!(!t.contains_key(&"c-0".to_string()));
        tables[i].sync().await.unwrap();
        assert_eq!(*downs[i].lock().unwrap(), vec![("c".to_string(), 10)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_node_is_dropped_then_rejoins_with_its_records() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for n in &mesh.nodes {
        let (o, d) = opts_with_downs();
        tables.push(n.start("t", o).await.unwrap());
        downs.push(d);
    }
    let all: Vec<&T> = tables.iter().collect();
    members(&all, 2).await;
    for (t, p) in tables.iter().zip(["a", "b", "c"]) {
        write_n(t, p, 10).await;
    }
    mesh.split(&[0, 1], &[2]);
    // Every side drops what the other side owned, by idle timeout, without any message.
    for (i, want) in [(0, 20), (1, 20), (2, 10)] {
        let t = tables[i].clone();
        eventually(WAIT, "records of the unreachable side dropped", || {
            let t = t.clone();
            async move { t.len() == want }
        })
        .await;
    }
    // A write through each server orders these checks after its on_node_down calls.
    tables[0].sync().await.unwrap();
    tables[2].sync().await.unwrap();
    assert_eq!(*downs[0].lock().unwrap(), vec![("c".to_string(), 10)]);
    let mut seen_by_c = downs[2].lock().unwrap().clone();
    seen_by_c.sort();
    assert_eq!(
        seen_by_c,
        vec![("a".to_string(), 10), ("b".to_string(), 10)]
    );
    // c keeps writing alone; a and b too.
    tables[2].insert("c-new".into(), 1).await.unwrap();
    tables[0].insert("a-new".into(), 1).await.unwrap();
    mesh.heal(&[0, 1], &[2]);
    members(&all, 2).await;
    for t in &tables {
        t.sync().await.unwrap();
    }
    let v = same_everywhere(&all, "the tables").await;
    assert_eq!(v.len(), 32);
    for (i, t) in tables.iter().enumerate() {
        assert_eq!(
            downs[i].lock().unwrap().len(),
            if i == 2 { 2 } else { 1 },
            "on_node_down once per lost node"
        );
        assert!(t.contains_key(&"c-new".to_string()) && t.contains_key(&"a-new".to_string()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_is_a_new_incarnation() {
    let mut mesh = Mesh::start(&["a", "b"]).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    write_n(&tb, "old-b", 5).await;
    let old = mesh.nodes[1].id().clone();
    mesh.nodes[1].shutdown().await.unwrap();
    eventually(WAIT, "old b's records dropped", || {
        let ta = ta.clone();
        async move { ta.is_empty() }
    })
    .await;
    let (nb, hb) = node("b").await;
    assert_ne!(nb.id(), &old);
    mesh.replace(1, nb, hb).await;
    let tb2: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb2], 1).await;
    write_n(&tb2, "new-b", 3).await;
    write_n(&ta, "a", 2).await;
    let v = same_everywhere(&[&ta, &tb2], "the tables").await;
    assert_eq!(v.len(), 5);
    assert!(v.iter().all(|(k, _)| !k.starts_with("old-b")));
}

/// Table options whose owner function gives a key "node/x" to node `node`, whoever wrote it.
fn owned_by_key_prefix() -> TableOptions<String, u64> {
    TableOptions::set().owner(|k: &String, _v: &u64| k.split('/').next().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_returns_when_the_peer_dies_before_acking() {
    let mesh = Mesh::start(&["a", "b"]).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    mesh.split(&[0], &[1]);
    // b cannot ack; the write returns once b is detected down (idle timeout), not never.
    tokio::time::timeout(WAIT, ta.insert("k".into(), 1))
        .await
        .expect("write returned")
        .unwrap();
    assert!(ta.nodes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_function_decides_whose_records_go_with_a_node() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let opts = owned_by_key_prefix;
    let mut tables = Vec::new();
    for n in &mesh.nodes {
        let t: T = n.start("t", opts()).await.unwrap();
        tables.push(t);
    }
    members(&tables.iter().collect::<Vec<_>>(), 2).await;
    tables[0].insert("c/1".into(), 1).await.unwrap(); // written by a, owned by c
    tables[0].insert("a/1".into(), 1).await.unwrap();
    tables[1].insert("b/1".into(), 1).await.unwrap();
    mesh.nodes[2].shutdown().await.unwrap();
    for t in &tables[..2] {
        let t = t.clone();
        eventually(WAIT, "c-owned record dropped", || {
            let t = t.clone();
            async move { t.len() == 2 && !t.contains_key(&"c/1".to_string()) }
        })
        .await;
    }
}

/// A peer's frames can still be queued at a table server when that peer's connection is
/// closed: the server hears the node-down event first (events are handled before peer input),
/// then the frames. They must be dropped quietly, and the table must keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_still_queued_when_their_node_shuts_down_are_dropped_and_the_table_goes_on() {
    // Long idle timeouts and join leases: the busy nodes must not lose their link before a's
    // shutdown (which b hears as the connection's close, not as silence). Not longer than the
    // waits below, though: a loaded runtime may not get a's close out within the shutdown's
    // bound, and b then hears of a's end by the idle timeout (with 60 s, 2 runs of the file in
    // 4 failed: b's write not acknowledged by a within 30 s, a's records not dropped in 30 s).
    let mut config = NodeConfig::fast_failover();
    config.keep_alive_interval = Duration::from_secs(1);
    config.idle_timeout = Duration::from_secs(10);
    config.join_lease = Duration::from_secs(60);
    let mesh = Mesh::start_with(&["a", "b"], config).await;
    let ta: T = mesh.nodes[0].start("t", TableOptions::set()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", TableOptions::set()).await.unwrap();
    members(&[&ta, &tb], 1).await;
    // Many large batches from a: b is busy applying one while the next ones wait in its queue.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let ta = ta.clone();
            tokio::spawn(async move {
                for round in 0..50u64 {
                    let recs = (0..20_000u64)
                        .map(|i| (format!("a-{w}-{round}-{i}"), i))
                        .collect();
                    if ta.insert_many(recs).await.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    // b's own large batches keep its table server busy while a's frames arrive and queue.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b_writer = {
        let (tb, stop) = (tb.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let recs = (0..50_000u64)
                    .map(|i| (format!("b-{round}-{i}"), i))
                    .collect();
                tb.insert_many(recs).await?;
                round += 1;
            }
            // How many records it wrote, each key once.
            Ok::<usize, cets::Error>(round as usize * 50_000)
        })
    };
    // (A batch is applied in order, so the first of a's records b holds is the first of some
    // writer's first batch; polling those keys stays cheap while the table grows.)
    eventually(3 * WAIT, "b receives a's writes", || {
        let tb = tb.clone();
        async move { (0..8).any(|w| tb.contains_key(&format!("a-{w}-0-0"))) }
    })
    .await;
    mesh.nodes[0].shutdown().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let b_records = match b_writer.await.unwrap() {
        Ok(n) => n,
        Err(e) => panic!("b's write failed: {e}"),
    };
    // b holds its own records (distinct keys, every write acknowledged) and a's until it drops
    // them: it holds exactly its own count when none of a's is left. The count is read in
    // constant time; a copy of a table of millions of records every poll is not.
    eventually(3 * WAIT, "a's records dropped on b", || {
        let tb = tb.clone();
        async move { tb.nodes().is_empty() && tb.len() == b_records }
    })
    .await;
    tb.insert("b-1".to_string(), 1).await.unwrap();
    assert_eq!(tb.get(&"b-1".to_string()), Some(1));
}

/// A write names an owner that the receiver has already seen go down (the writer has not, yet):
/// the receiver does not store the record, since nothing would ever remove it there, just as the
/// writer will drop it once it hears of that node's end. Here b loses its link to n while a keeps
/// its own; a's write of a record owned by n reaches b (still a member of a's table) and n.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_owner_is_already_down_on_a_replica_is_not_stored_there() {
    let mesh = Mesh::start(&["a", "b", "n"]).await;
    let opts = owned_by_key_prefix;
    let ta: T = mesh.nodes[0].start("t", opts()).await.unwrap();
    let tb: T = mesh.nodes[1].start("t", opts()).await.unwrap();
    let tn: T = mesh.nodes[2].start("t", opts()).await.unwrap();
    members(&[&ta, &tb, &tn], 2).await;
    mesh.split(&[1], &[2]);
    eventually(WAIT, "b dropped n", || async { tb.nodes() == ["a"] }).await;
    // a still counts b and n as members (its views differ from b's only for a while), so both
    // apply the write before it returns.
    assert_eq!(ta.nodes(), ["b", "n"]);
    ta.insert("n/1".into(), 1).await.unwrap();
    ta.insert("a/1".into(), 1).await.unwrap();
    assert_eq!(ta.nodes(), ["b", "n"], "acked by both");
    assert_eq!(ta.get(&"n/1".into()), Some(1));
    assert_eq!(tn.get(&"n/1".into()), Some(1));
    assert_eq!(tb.get(&"n/1".into()), None, "owner already down at b");
    assert_eq!(tb.get(&"a/1".into()), Some(1));
}

/// A writer that dies before its write reached every member (ALGORITHM.md 8). Here n's
/// overwrite of a's record reaches a and x but not y; when n is gone, a and x drop n's record
/// (and with it a's overwritten version), while y keeps a's version. The survivors applied
/// different lasting writes of n, so their views differ (`Link::lasting`), and the view check
/// has them merge again: every member ends with a's version, as if n's write had never been
/// made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwrite_by_a_node_that_dies_halfway_leaves_the_members_equal() {
    let mesh = Mesh::start(&["a", "n", "x", "y"]).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    tables[0].insert("k".into(), 1).await.unwrap();
    // n's link to y is cut: n's overwrite reaches a and x only, and its call waits for y.
    mesh.split(&[1], &[3]);
    let tn = tables[1].clone();
    let pending = tokio::spawn(async move { tn.insert("k".into(), 2).await });
    eventually(WAIT, "a and x hold n's write", || async {
        tables[0].get(&"k".into()) == Some(2) && tables[2].get(&"k".into()) == Some(2)
    })
    .await;
    // n dies for everyone.
    mesh.split(&[1], &[0, 2]);
    let survivors = [&tables[0], &tables[2], &tables[3]];
    eventually(
        WAIT,
        "a, x and y hold a's version and are members of each other",
        || async {
            survivors
                .iter()
                .all(|t| t.get(&"k".into()) == Some(1) && t.nodes().len() == 2)
        },
    )
    .await;
    pending.abort();
    for t in survivors {
        t.sync().await.unwrap();
    }
    same_everywhere(&survivors, "the tables").await;
}

/// A value of 1 is owned by n; any other by its writer.
fn owned_by_value() -> TableOptions<String, u64> {
    TableOptions::set().owner(|_, v: &u64| if *v == 1 { "n".into() } else { String::new() })
}

/// c writes k = 2 (its own record) while its link to b is cut, so the write reaches a at once
/// and b only later. n then dies; a hears of it late (its link to n was cut first). a, having
/// seen c's write, overwrites k with a record owned by n (stamped after c's). b has seen n go
/// down and drops a's record as an orphan: it holds no version of k yet, so nothing is removed
/// and nothing remembers that k was overwritten. When c's older write reaches b, b stores it.
/// a and c stored a's record over c's and drop it when n is gone: they end without k, b with
/// k = 2, and the members' views are equal again, so no join repairs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_overwrite_ends_the_same_on_every_replica() {
    let mesh = Mesh::start(&["a", "b", "c", "n"]).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", owned_by_value()).await.unwrap());
    }
    for t in &tables {
        eventually(WAIT, "every table has 3 peers", || async {
            t.nodes().len() == 3
        })
        .await;
    }
    let (ta, tb, tc) = (tables[0].clone(), tables[1].clone(), tables[2].clone());
    // c's write reaches a (and n) but waits for the b-c link (QUIC retransmits it once healed).
    mesh.split(&[1], &[2]);
    let c_write = {
        let tc = tc.clone();
        tokio::spawn(async move { tc.insert("k".into(), 2).await })
    };
    eventually(WAIT, "a holds c's write", || async {
        ta.get(&"k".into()) == Some(2)
    })
    .await;
    // n dies; a hears of it only at its idle timeout.
    mesh.split(&[0], &[3]);
    let n = mesh.nodes[3].clone();
    let n_down = tokio::spawn(async move { n.shutdown().await });
    // Gone from b's members is not enough: n stops its table before it closes its
    // connections, and while b's table still has a link to n, n counts as alive there and a's
    // record is stored, not dropped as an orphan (1 run of 20 under load). The link is gone
    // once the table lists n nowhere.
    eventually(WAIT, "b's table has no link to n any more", || async {
        let s = tb.status().await.unwrap();
        let n = |name: &String| name == "n";
        !(s.members.iter().any(|m| m.name == "n")
            || s.not_joined.iter().any(n)
            || s.without_table.iter().any(n)
            || s.refused.iter().any(|(name, _)| n(name)))
    })
    .await;
    assert!(
        ta.nodes().contains(&"n".to_string()),
        "a has not seen n go yet"
    );
    // a's overwrite, owned by n, with a marker record of a's own in the same write.
    let a_write = {
        let ta = ta.clone();
        tokio::spawn(async move {
            ta.insert_many(vec![("k".into(), 1), ("a-marker".into(), 0)])
                .await
        })
    };
    eventually(WAIT, "b applied a's write", || async {
        tb.get(&"a-marker".into()) == Some(0)
    })
    .await;
    assert_eq!(
        tb.get(&"k".into()),
        None,
        "a's record of k is an orphan at b"
    );
    mesh.heal(&[1], &[2]);
    c_write.await.unwrap().unwrap();
    a_write.await.unwrap().unwrap();
    let _ = n_down.await;
    eventually(WAIT, "a saw n go", || async {
        !ta.nodes().contains(&"n".to_string())
    })
    .await;
    tb.sync().await.unwrap();
    tc.sync().await.unwrap();
    ta.sync().await.unwrap();
    let seen: Vec<Option<u64>> = [&ta, &tb, &tc].iter().map(|t| t.get(&"k".into())).collect();
    let nodes: Vec<Vec<String>> = [&ta, &tb, &tc].iter().map(|t| t.nodes()).collect();
    assert!(
        seen.iter().all(|v| *v == seen[0]),
        "a, b, c hold k = {seen:?} (members {nodes:?})"
    );
}

/// A record dropped with its owner leaves a tombstone while a member may still send an older
/// write of its key. Here q's write of k is held back from x and y while w's newer write of k
/// reaches everyone; q's write then reaches x, which refuses it (w's is newer), and w goes down,
/// so every node drops w's record. When q's write reaches y at last, only that tombstone stops
/// it there; without it, y alone would hold k.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_dropped_with_its_owner_lets_no_older_write_back_on_one_node() {
    // The cut links must outlive no idle timeout, even on a busy machine: w goes down by its
    // shutdown, which its peers hear at once.
    let mut config = cets::NodeConfig::fast_failover();
    config.keep_alive_interval = Duration::from_secs(1);
    config.idle_timeout = Duration::from_secs(8);
    let mesh = Mesh::start_with(&["q", "w", "x", "y"], config).await;
    let mut tables: Vec<T> = Vec::new();
    for n in &mesh.nodes {
        tables.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let (tq, tx, ty) = (tables[0].clone(), tables[2].clone(), tables[3].clone());
    mesh.split(&[0], &[2, 3]);
    let q_write = {
        let tq = tq.clone();
        tokio::spawn(async move { tq.insert("k".into(), 1).await })
    };
    eventually(WAIT, "q holds its write", || async {
        tq.get(&"k".into()) == Some(1)
    })
    .await;
    next_millisecond().await;
    tables[1].insert("k".into(), 2).await.unwrap();
    assert_eq!(
        (tx.get(&"k".into()), ty.get(&"k".into())),
        (Some(2), Some(2))
    );
    // A marker behind q's write tells when x has read it.
    let q_marker = {
        let tq = tq.clone();
        tokio::spawn(async move { tq.insert("m".into(), 0).await })
    };
    mesh.heal(&[0], &[2]);
    eventually(WAIT, "x read q's writes", || async {
        tx.get(&"m".into()) == Some(0)
    })
    .await;
    assert_eq!(tx.get(&"k".into()), Some(2), "x refused q's older write");
    mesh.nodes[1].shutdown().await.unwrap();
    members(&[&tq, &tx, &ty], 2).await;
    assert_eq!(
        ty.get(&"m".into()),
        None,
        "q's writes have not reached y yet"
    );
    mesh.heal(&[0], &[3]);
    q_write.await.unwrap().unwrap();
    q_marker.await.unwrap().unwrap();
    for t in [&tq, &tx, &ty] {
        t.sync().await.unwrap();
    }
    let seen: Vec<Option<u64>> = [&tq, &tx, &ty].iter().map(|t| t.get(&"k".into())).collect();
    assert_eq!(seen, vec![None, None, None], "q, x, y hold k = {seen:?}");
}

/// Every node writes and deletes keys of one small key space at once; then d overwrites a's
/// record and deletes b's while its link to c is cut, so those two writes reach a and b only,
/// and d is cut off from everyone. The survivors applied different lasting writes of d, differ
/// in view, and merge again: they end as members of each other with the same records, a's and
/// b's among them, as if d's last writes had never been made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_of_a_writer_cut_off_mid_stream_end_with_the_same_records() {
    use rand::{Rng, SeedableRng};
    let mesh = Mesh::start(&["a", "b", "c", "d"]).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let mut writers = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let t = t.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            for n in 0..200u64 {
                let k = format!("k{}", rng.random_range(0..40));
                if rng.random_range(0..4) == 0 {
                    t.delete(&k).await.unwrap();
                } else {
                    t.insert(k, n).await.unwrap();
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    tables[0].insert("ka".into(), 1).await.unwrap();
    tables[1].insert("kb".into(), 1).await.unwrap();
    mesh.split(&[3], &[2]);
    let td = tables[3].clone();
    let last = tokio::spawn(async move {
        let kb: String = "kb".into();
        let (x, y) = tokio::join!(td.insert("ka".into(), 2), td.delete(&kb));
        (x, y)
    });
    eventually(WAIT, "a and b applied d's last writes", || async {
        tables[..2]
            .iter()
            .all(|t| t.get(&"ka".into()) == Some(2) && t.get(&"kb".into()).is_none())
    })
    .await;
    mesh.split(&[3], &[0, 1]);
    let survivors = [&tables[0], &tables[1], &tables[2]];
    eventually(
        WAIT,
        "the survivors hold the same records as members of each other",
        || async {
            let mut first = survivors[0].to_vec();
            first.sort();
            survivors.iter().all(|t| {
                let mut v = t.to_vec();
                v.sort();
                v == first && t.nodes().len() == 2
            })
        },
    )
    .await;
    for t in survivors {
        assert_eq!(
            (t.get(&"ka".into()), t.get(&"kb".into())),
            (Some(1), Some(1))
        );
    }
    last.abort();
}

/// A dying writer's insert of a record it owns (no "lasting" effect where it lands: the key
/// was absent) makes the one survivor it reached refuse an older, concurrent write of another
/// node; the survivors it did not reach store that older write. Once d is gone, a has dropped
/// d's record and has no k, while b and c keep c's k. Every survivor applied the same lasting
/// batches of d (none), so their views stay equal and nothing merges them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_writers_own_record_that_refused_an_older_write_on_one_survivor_leaves_them_equal()
{
    // The c-a cut must not outlast the idle timeout, even on a busy machine (c's held-back
    // write must reach a on its stream); d goes down by the idle timeout, 3 s after its cuts.
    let mut config = cets::NodeConfig::fast_failover();
    config.keep_alive_interval = Duration::from_millis(500);
    config.idle_timeout = Duration::from_secs(3);
    let mesh = Mesh::start_with(&["a", "b", "c", "d"], config).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let (ta, tb, tc, td) = (
        tables[0].clone(),
        tables[1].clone(),
        tables[2].clone(),
        tables[3].clone(),
    );
    // c's write (with a marker in the same op) is held back from a.
    mesh.split(&[2], &[0]);
    let c_write = {
        let tc = tc.clone();
        tokio::spawn(async move {
            tc.insert_many(vec![("k".into(), 5), ("c-marker".into(), 0)])
                .await
        })
    };
    eventually(WAIT, "b and d hold c's write", || async {
        tb.get(&"k".into()) == Some(5) && td.get(&"k".into()) == Some(5)
    })
    .await;
    next_millisecond().await;
    // d's newer write of its own record reaches a only.
    mesh.split(&[3], &[1, 2]);
    let d_write = {
        let td = td.clone();
        tokio::spawn(async move { td.insert("k".into(), 7).await })
    };
    eventually(WAIT, "a holds d's write", || async {
        ta.get(&"k".into()) == Some(7)
    })
    .await;
    mesh.heal(&[2], &[0]);
    eventually(WAIT, "a read c's older write", || async {
        ta.get(&"c-marker".into()) == Some(0)
    })
    .await;
    assert_eq!(ta.get(&"k".into()), Some(7), "a refused c's older write");
    // d dies for everyone.
    mesh.split(&[3], &[0]);
    survivors_agree_on_k(&[&ta, &tb, &tc]).await;
    c_write.abort();
    d_write.abort();
}

/// A tombstone of a node that is already down refuses an older write on one survivor only: d's
/// delete of k reaches a alone (where k is absent, so only a tombstone records it), d goes down,
/// and then c's older insert of k reaches a, which refuses it, while b (and c) hold it. a had
/// mixed d's departure into its epoch before the refusal, and nothing counted the refusal: the
/// survivors kept equal views and different tables for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_by_the_tombstone_of_a_node_already_down_leaves_the_members_equal() {
    // b and c see d go down by the idle timeout (1 s), a at once: within VIEW_GRACE (2 s), so
    // the survivors' views differ only briefly and no merge follows from that alone. The c-a
    // cut lasts a few round trips, well under the idle timeout (c's held-back write must
    // reach a on its stream).
    let mesh = Mesh::start_with(&["a", "b", "c", "d"], cets::NodeConfig::fast_failover()).await;
    let mut tables: Vec<T> = Vec::new();
    for node in &mesh.nodes {
        tables.push(node.start("t", TableOptions::set()).await.unwrap());
    }
    members(&tables.iter().collect::<Vec<_>>(), 3).await;
    let (ta, tb, tc, td) = (
        tables[0].clone(),
        tables[1].clone(),
        tables[2].clone(),
        tables[3].clone(),
    );
    let k: String = "k".into();
    // c's write of k is held back from a.
    mesh.split(&[0], &[2]);
    let c_write = {
        let tc = tc.clone();
        tokio::spawn(async move { tc.insert("k".into(), 1).await })
    };
    eventually(WAIT, "b and d hold c's write", || async {
        tb.get(&k) == Some(1) && td.get(&k) == Some(1)
    })
    .await;
    next_millisecond().await;
    // d's delete, newer, reaches a only; d applies it after sending it, so its marker insert
    // goes to a after it.
    mesh.split(&[3], &[1, 2]);
    let d_delete = {
        let (td, k) = (td.clone(), k.clone());
        tokio::spawn(async move { td.delete(&k).await })
    };
    eventually(WAIT, "d applied its delete", || async {
        td.get(&k).is_none()
    })
    .await;
    let d_marker = {
        let td = td.clone();
        tokio::spawn(async move { td.insert("d-marker".into(), 9).await })
    };
    eventually(WAIT, "a holds d's marker", || async {
        ta.get(&"d-marker".into()) == Some(9)
    })
    .await;
    assert_eq!(ta.get(&k), None, "c's write has not reached a");
    // d goes down; a hears of it first.
    mesh.nodes[3].shutdown().await.unwrap();
    eventually(WAIT, "a saw d go down", || async {
        !ta.nodes().contains(&"d".to_string())
    })
    .await;
    // c's older write reaches a now, and d's tombstone refuses it there.
    mesh.heal(&[0], &[2]);
    survivors_agree_on_k(&[&ta, &tb, &tc]).await;
    c_write.abort();
    d_delete.abort();
    d_marker.abort();
}

/// Waits until the three survivors are each other's members and hold the same value of "k".
/// That takes d's node-down (the idle timeout after its cut), the view check's grace and a
/// join, each of which a loaded machine stretches: the bound is generous.
async fn survivors_agree_on_k(survivors: &[&T; 3]) {
    let k: String = "k".into();
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        let seen: Vec<Option<u64>> = survivors.iter().map(|t| t.get(&k)).collect();
        let nodes: Vec<Vec<String>> = survivors.iter().map(|t| t.nodes()).collect();
        if seen.iter().all(|v| *v == seen[0]) && nodes.iter().all(|n| n.len() == 2) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "survivors a, b, c hold k = {seen:?} (members {nodes:?})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
