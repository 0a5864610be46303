//! Convergence over real QUIC on loopback: concurrent writes from several nodes, with and
//! without an owner function, equal stamps, and bag objects, end identical on every node.

mod common;

use std::future::Future;
use std::time::Duration;

use cets::{Table, TableOptions};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type K = u64;
type V = String;

/// Runs `rounds` rounds of `writes(round)`, concurrent writes that every node acknowledges
/// before they return, and checks after each that every node holds the same value of the key
/// the round returns.
async fn every_round_converges<'a, F, Fut>(tables: &'a [Table<K, V>], rounds: u64, mut writes: F)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = K> + 'a,
{
    for round in 0..rounds {
        let key = writes(round).await;
        let seen: Vec<Option<V>> = tables.iter().map(|t| t.get(&key)).collect();
        assert!(
            seen.iter().all(|v| *v == seen[0]),
            "round {round}: the nodes hold {seen:?}"
        );
    }
}

/// The first two tables write key 1 at once, each its own value; returns the key.
async fn both_write_key_1(tables: &[Table<K, V>], a: V, b: V) -> K {
    let (x, y) = tokio::join!(tables[0].insert(1, a), tables[1].insert(1, b));
    x.unwrap();
    y.unwrap();
    1
}

const BURST_KEYS: u64 = 20;

/// `ops` random writes to the 20 keys, each awaited, from one task.
async fn burst(t: Table<K, V>, seed: u64, ops: usize, with_objects: bool) {
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..ops {
        let k = rng.random_range(0..BURST_KEYS);
        let v = format!("v{}", rng.random_range(0..3));
        let r = match rng.random_range(0..if with_objects { 6 } else { 4 }) {
            0 | 1 => t.insert(k, v).await,
            2 => t.delete(&k).await,
            3 => {
                let k2 = rng.random_range(0..BURST_KEYS);
                if rng.random_bool(0.5) {
                    t.insert_many(vec![(k, v), (k2, format!("s{seed}-{i}"))])
                        .await
                } else {
                    t.delete_many(vec![k, k2]).await
                }
            }
            4 => t.delete_object(&k, &v).await,
            _ => t.delete_objects(vec![(k, v), (k ^ 1, "v0".into())]).await,
        };
        r.unwrap();
    }
}

async fn burst_from_one_node(opts: TableOptions<K, V>) {
    let c = cluster(&["a", "b", "c"]).await;
    let mut tables = Vec::new();
    for (n, _) in &c {
        tables.push(n.start("t", opts.clone()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    // 4 tasks x 500 writes, all on node a, to the same 20 keys.
    let tasks: Vec<_> = (0..4)
        .map(|s| tokio::spawn(burst(tables[0].clone(), s, 500, true)))
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    tables[0].sync().await.unwrap();
    let end = same_everywhere(&tables.iter().collect::<Vec<_>>(), "burst from one node").await;
    assert!(!end.is_empty(), "the burst left something to compare");
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_concurrent_burst_from_one_node_ends_identical_everywhere() {
    burst_from_one_node(TableOptions::set()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_set_concurrent_burst_from_one_node_ends_identical_everywhere() {
    burst_from_one_node(TableOptions::ordered_set()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bag_concurrent_burst_from_one_node_ends_identical_everywhere() {
    burst_from_one_node(TableOptions::bag()).await;
}

/// Two nodes write the same keys at once; last-writer-wins by hybrid clock makes every node
/// end the same. (Not for bags, whose writes apply in arrival order, nor for
/// `delete_object`, which depends on the value each node holds when it arrives.)
async fn burst_from_two_nodes(opts: TableOptions<K, V>) {
    let c = cluster(&["a", "b", "c"]).await;
    let mut tables = Vec::new();
    for (n, _) in &c {
        tables.push(n.start("t", opts.clone()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let mut tasks = Vec::new();
    for s in 0..4u64 {
        let t = tables[(s % 2) as usize].clone();
        tasks.push(tokio::spawn(burst(t, 100 + s, 500, false)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    tables[0].sync().await.unwrap();
    tables[1].sync().await.unwrap();
    let end = same_everywhere(&tables.iter().collect::<Vec<_>>(), "burst from two nodes").await;
    assert!(!end.is_empty(), "the burst left something to compare");
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_concurrent_bursts_from_two_nodes_end_identical_everywhere() {
    burst_from_two_nodes(TableOptions::set()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_set_concurrent_bursts_from_two_nodes_end_identical_everywhere() {
    burst_from_two_nodes(TableOptions::ordered_set()).await;
}

/// Every key owned by one of the three members whoever writes it: two writers' records of a
/// key share an owner, so their stamps tie whenever they share a clock tick.
fn owned_by_key(opts: TableOptions<K, V>) -> TableOptions<K, V> {
    opts.owner(|k: &K, _: &V| ["a", "b", "c"][(*k % 3) as usize].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_with_owners_concurrent_bursts_from_two_nodes_end_identical_everywhere() {
    burst_from_two_nodes(owned_by_key(TableOptions::set())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_set_with_owners_concurrent_bursts_from_two_nodes_end_identical_everywhere() {
    burst_from_two_nodes(owned_by_key(TableOptions::ordered_set())).await;
}

/// `a` replaces the value of key 1 while `b` deletes the old object; `b` stamps its delete
/// after it has seen a clock past `a`'s insert (through `c`), and `a`'s insert reaches `b`
/// last (the a-b link is cut meanwhile). In timestamp order the insert comes first, so the
/// delete_object finds another value and does nothing: every node should end with `v2`.
/// (The delete's tombstone used to carry the delete's own stamp, newer than `a`'s insert, so
/// `b` dropped the insert and ended without the key while `a` and `c` kept `v2`, for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_object_racing_an_insert_of_another_value_converges() {
    let mut config = cets::NodeConfig::fast_failover();
    // The a-b link is cut for a moment: long enough timers that nobody counts as down.
    config.keep_alive_interval = Duration::from_secs(1);
    config.idle_timeout = Duration::from_secs(10);
    let (a, ha) = node_with("a", "test-cookie", config.clone()).await;
    let (b, hb) = node_with("b", "test-cookie", config.clone()).await;
    let (c, _hc) = node_with("c", "test-cookie", config).await;
    // a reaches b only through the relay; b and a both dial c directly.
    let relay = Relay::start(b.local_addr()).await;
    ha.set(vec![relay.addr(), c.local_addr()]);
    hb.set(vec![c.local_addr()]);
    let mut t: Vec<Table<K, V>> = Vec::new();
    for n in [&a, &b, &c] {
        t.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined(&t.iter().collect::<Vec<_>>()).await;
    t[0].insert(1, "v1".into()).await.unwrap();

    relay.cut();
    let ta = t[0].clone();
    let insert = tokio::spawn(async move { ta.insert(1, "v2".into()).await });
    let tc = t[2].clone();
    eventually(WAIT, "c applied a's insert", || {
        let tc = tc.clone();
        async move { tc.get(&1).as_deref() == Some("v2") }
    })
    .await;
    // c's write carries c's clock, which is past a's insert, to b.
    t[2].insert(2, "from c".into()).await.unwrap();
    assert_eq!(t[1].get(&2).as_deref(), Some("from c"));
    assert_eq!(
        t[1].get(&1).as_deref(),
        Some("v1"),
        "a's insert has not reached b"
    );
    let tb = t[1].clone();
    let delete = tokio::spawn(async move { tb.delete_object(&1, &"v1".to_string()).await });
    let tb = t[1].clone();
    eventually(WAIT, "b applied its delete_object", || {
        let tb = tb.clone();
        async move { tb.get(&1).is_none() }
    })
    .await;
    relay.heal();
    insert.await.unwrap().unwrap();
    delete.await.unwrap().unwrap();
    for x in &t {
        x.sync().await.unwrap();
    }
    for (x, n) in t.iter().zip(["a", "b", "c"]) {
        assert_eq!(x.get(&1).as_deref(), Some("v2"), "key 1 on {n}");
    }
    shutdown_all([&a, &b, &c]).await;
}

/// The owner a writer gives a record is what every replica stores. The owner function runs on
/// the writer only, and names a member of the table or nobody: here it names `n`, a node `a`
/// is connected to but that runs no table "t" (and `b` is not even connected to it), so the
/// records stay the writer's. When `n` shuts down, both replicas keep the same records. (Each
/// replica used to run the function itself: `a` gave record 1 to `n`, `b` to `a`; when `n`
/// went down `a` dropped it, `b` kept it, and nothing repaired that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_runs_no_table_leaves_the_record_to_its_writer_on_every_replica() {
    let (a, ha) = node("a").await;
    let (b, hb) = node("b").await;
    let (n, _hn) = node("n").await;
    ha.set(vec![a.local_addr(), b.local_addr(), n.local_addr()]);
    hb.set(vec![a.local_addr(), b.local_addr()]);
    let opts = || TableOptions::<u64, String>::set().owner(|_, v: &String| v.clone());
    let ta: Table<u64, String> = a.start("t", opts()).await.unwrap();
    let tb: Table<u64, String> = b.start("t", opts()).await.unwrap();
    joined(&[&ta, &tb]).await;
    let connected_to_n = || async {
        a.status()
            .await
            .connected
            .iter()
            .any(|(id, _)| id.name == "n")
    };
    eventually(WAIT, "a connected to n", connected_to_n).await;
    ta.insert(1, "n".into()).await.unwrap();
    ta.insert(2, "x".into()).await.unwrap();
    assert_eq!(tb.get(&1).as_deref(), Some("n"), "replicated and acked");

    n.shutdown().await.unwrap();
    eventually(WAIT, "a saw n go", || async { !connected_to_n().await }).await;
    // Node events reach a table server before writes queued after them: once this write is
    // acked, a has handled n's end.
    ta.insert(3, "y".into()).await.unwrap();
    assert_eq!(ta.nodes(), ["b"]);
    assert_eq!(tb.nodes(), ["a"]);
    assert_eq!(sorted(ta.to_vec()), sorted(tb.to_vec()));
    assert_eq!(ta.get(&1).as_deref(), Some("n"), "the writer's record");
    shutdown_all([&a, &b]).await;
}

/// An owner function is evaluated once, on the writer, and every replica stores the owner it
/// chose, even when the function would answer otherwise on another node (here it reads a
/// node-local setting: on `a` it names `n`, on `b` it names `b`). When `n` goes down, both `a`
/// and `b` drop the record. (Before, `b` stored itself as owner and kept the record for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_stores_the_owner_the_writer_chose() {
    let c = cluster(&["a", "b", "n"]).await;
    let opts = |here: &'static str| {
        TableOptions::<u64, String>::set().owner(move |_, v: &String| {
            if v == "of-n" {
                here.to_string()
            } else {
                String::new()
            }
        })
    };
    let ta: Table<u64, String> = c[0].0.start("t", opts("n")).await.unwrap();
    let tb: Table<u64, String> = c[1].0.start("t", opts("b")).await.unwrap();
    let tn: Table<u64, String> = c[2].0.start("t", opts("n")).await.unwrap();
    joined(&[&ta, &tb, &tn]).await;
    ta.insert(1, "of-n".into()).await.unwrap();
    ta.insert(2, "x".into()).await.unwrap();
    for t in [&ta, &tb, &tn] {
        assert_eq!(t.get(&1).as_deref(), Some("of-n"));
    }
    drop(tn);
    c[2].0.shutdown().await.unwrap();
    // a and b stay members of each other, and both drop the record n owned.
    eventually(WAIT, "a and b dropped n and n's record", || async {
        ta.nodes() == ["b"] && tb.nodes() == ["a"] && ta.get(&1).is_none() && tb.get(&1).is_none()
    })
    .await;
    assert_eq!(sorted(ta.to_vec()), sorted(tb.to_vec()));
    assert_eq!(
        ta.get(&2).as_deref(),
        Some("x"),
        "the writer's own record stays"
    );
    shutdown_all([&c[0].0, &c[1].0]).await;
}

/// Two writers that give one owner the same key in the same clock tick stamp their writes
/// alike (`(ts, owner)`): the value breaks the tie, the same way on every node. (Each node used
/// to keep whichever write arrived last, so the writers ended with each other's values.) Ties
/// are common here: after a round, both clocks have seen the same latest stamp, and a write
/// within the same millisecond takes that stamp plus one on both nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_with_equal_stamps_converge_on_every_node() {
    let c = cluster(&["a", "b", "n"]).await;
    let opts = || TableOptions::<u64, String>::set().owner(|_, _| "n".to_string());
    let mut tables = Vec::new();
    for (node, _) in &c {
        tables.push(node.start("t", opts()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let ts = &tables;
    every_round_converges(&tables, 200, |round| {
        both_write_key_1(ts, format!("a{round}"), format!("b{round}"))
    })
    .await;
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// A node restarted again and again costs a survivor's table nothing for good: the index the
/// table gave each gone incarnation (records store a 4-byte owner index) is released once
/// nothing names it, and reused for the next one, whose records then go with it as they
/// should. (Each incarnation ever seen used to keep an entry in every table.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_peer_does_not_grow_a_survivors_owner_table() {
    let (a, ha) = node("a").await;
    let ta: Table<u64, String> = a.start("t", TableOptions::set()).await.unwrap();
    let known = || async {
        let s = a.status().await;
        s.tables.iter().find(|t| t.name == "t").unwrap().known_nodes
    };
    for round in 0..8u64 {
        let (b, hb) = node("b").await;
        ha.set(vec![a.local_addr(), b.local_addr()]);
        hb.set(vec![a.local_addr(), b.local_addr()]);
        let tb: Table<u64, String> = b.start("t", TableOptions::set()).await.unwrap();
        joined(&[&ta, &tb]).await;
        // Records of this incarnation, and a tombstone that names it.
        tb.insert_many(
            (0..10)
                .map(|k| (round * 100 + k, format!("b{round}")))
                .collect(),
        )
        .await
        .unwrap();
        tb.delete(&(round * 100)).await.unwrap();
        ta.insert(1_000_000 + round, "a".into()).await.unwrap();
        assert_eq!(ta.len(), 9 + round as usize + 1, "b's records are here");
        drop(tb);
        b.shutdown().await.unwrap();
        eventually(WAIT, "b's records gone from a", || async {
            ta.nodes().is_empty() && ta.len() == round as usize + 1
        })
        .await;
        // Only a is left (its tombstones are forgotten at once without members), so the next
        // incarnation of b gets the index this one had.
        eventually(WAIT, "b's incarnation forgotten", || async {
            known().await == 1
        })
        .await;
    }
    shutdown_all([&a]).await;
}

/// A bag keeps every distinct object of a key, also within one `insert_many`. With an owner
/// function, the writer turns the insert into an `InsertOwned` and keeps only the last record
/// of each key (`Server::with_owners`), which is right for a set but drops objects of a bag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bag_with_an_owner_function_keeps_every_object_of_one_insert_many() {
    let c = cluster(&["a", "b"]).await;
    let opts = || TableOptions::<u64, String>::bag().owner(|_, _| "a".to_string());
    let ta: Table<u64, String> = c[0].0.start("t", opts()).await.unwrap();
    let tb: Table<u64, String> = c[1].0.start("t", opts()).await.unwrap();
    joined(&[&ta, &tb]).await;
    tb.insert_many(vec![(1, "x".into()), (1, "y".into())])
        .await
        .unwrap();
    // Acked by a: both nodes applied it.
    assert_eq!(
        (sorted(ta.lookup(&1)), sorted(tb.lookup(&1))),
        (
            vec!["x".to_string(), "y".into()],
            vec!["x".to_string(), "y".into()]
        ),
        "a bag stores both objects of one insert_many"
    );
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// Two writers give one owner (`n`) the same key in the same clock tick: equal stamps, ordered
/// by value, so "b.." beats "a..". Node a deletes its own object "a.." right after writing it.
/// A `delete_object` tombstone carries the deleted version's stamp, and a tombstone wins ties,
/// so where the delete ran before b's write arrived, b's write (same stamp, greater value) is
/// refused; where b's write arrived first, it replaced "a.." and the delete found nothing to
/// remove. The nodes end different. Every write is acked by every node before the check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_object_of_the_lesser_of_two_equal_stamp_versions_converges() {
    let c = cluster(&["a", "b", "n"]).await;
    let opts = || TableOptions::<K, V>::set().owner(|_, _| "n".to_string());
    let mut tables: Vec<Table<K, V>> = Vec::new();
    for (node, _) in &c {
        tables.push(node.start("t", opts()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    let ts = &tables;
    every_round_converges(&tables, 300, |round| async move {
        let va = format!("a{round}");
        let ((x, d), y) = tokio::join!(
            async {
                tokio::join!(
                    ts[0].insert(round, va.clone()),
                    ts[0].delete_object(&round, &va)
                )
            },
            ts[1].insert(round, format!("b{round}"))
        );
        x.unwrap();
        d.unwrap();
        y.unwrap();
        round
    })
    .await;
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// A node-local owner function may differ between nodes (`every_replica_stores_the_owner_the_
/// writer_chose`); here one node has none. Its plain `Insert`s name the writer as owner; the
/// other node's `InsertOwned`s name that same node. Equal stamps are then ordered by value
/// only when the arriving write is an `InsertOwned` (`by_value`), and by arrival otherwise,
/// so the two writers can end with each other's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owned_and_a_plain_insert_with_equal_stamps_converge() {
    let c = cluster(&["a", "b", "n"]).await;
    let ta: Table<K, V> = c[0]
        .0
        .start("t", TableOptions::set().owner(|_, _| "b".to_string()))
        .await
        .unwrap();
    let tb: Table<K, V> = c[1].0.start("t", TableOptions::set()).await.unwrap();
    let tn: Table<K, V> = c[2].0.start("t", TableOptions::set()).await.unwrap();
    let tables = [ta, tb, tn];
    joined(&tables.iter().collect::<Vec<_>>()).await;
    // "z.." > "b..": a's value wins a tie wherever ties are ordered by value.
    let ts = &tables;
    every_round_converges(&tables, 300, |round| {
        both_write_key_1(ts, format!("z{round}"), format!("b{round}"))
    })
    .await;
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// Two writers insert the same bag object at once. Each node used to keep the copy that arrived
/// first, with that copy's owner (its writer), so when one writer went down, the nodes that
/// kept its copy dropped the object and the others kept it. Now every node keeps the copy with
/// the greater stamp (ALGORITHM.md 7.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inserts_of_one_bag_object_survive_a_writer_going_down_alike() {
    let c = cluster(&["a", "b", "c"]).await;
    let downs = [Downs::default(), Downs::default(), Downs::default()];
    let mut tables: Vec<Table<K, V>> = Vec::new();
    for ((node, _), d) in c.iter().zip(&downs) {
        tables.push(node.start("t", d.opts(TableOptions::bag())).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    for k in 0..50u64 {
        let (x, y) = tokio::join!(
            tables[0].insert(k, "v".into()),
            tables[1].insert(k, "v".into())
        );
        x.unwrap();
        y.unwrap();
    }
    assert_eq!(sorted(tables[1].to_vec()), sorted(tables[2].to_vec()));
    assert_eq!(tables[1].len(), 50);
    c[0].0.shutdown().await.unwrap();
    for d in &downs[1..] {
        eventually(WAIT, "b and c handled a's node-down", || async {
            d.calls().iter().any(|(id, _)| id.name == "a")
        })
        .await;
    }
    let (b, cc) = (sorted(tables[1].to_vec()), sorted(tables[2].to_vec()));
    assert_eq!(
        (b.len(), cc.len()),
        (b.len(), b.len()),
        "b and c hold different objects after a went down"
    );
    assert_eq!(b, cc);
    shutdown_all([&c[1].0, &c[2].0]).await;
}
