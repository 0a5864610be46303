//! Replication among several nodes over real QUIC on loopback: every write operation, the
//! acknowledgement that a write returns on, frame limits, ack timeouts.
//!
//! A write returns only once every peer acknowledged it, so every check right after a write
//! reads the other nodes' local copies without polling.

mod common;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use cets::discovery::StaticDiscoveryHandle;
use cets::{Error, Node, Table, TableKind, TableOptions};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_a_set() {
    let c = cluster(&["a", "b", "c"]).await;
    let mut tables: Vec<Table<u64, String>> = Vec::new();
    for (n, _) in &c {
        tables.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    tables[0].insert(1, "one".into()).await.unwrap();
    // insert returns after every peer acked: the read right after sees it.
    for t in &tables {
        assert_eq!(t.get(&1).as_deref(), Some("one"), "on {}", t.name());
    }
    tables[1]
        .insert_many(vec![(2, "two".into()), (3, "three".into())])
        .await
        .unwrap();
    tables[2].delete(&1).await.unwrap();
    for t in &tables {
        assert_eq!(t.get(&1), None);
        assert_eq!(t.len(), 2);
    }
    tables[0].delete_many(vec![2, 3]).await.unwrap();
    for t in &tables {
        assert!(t.is_empty());
    }
    for (n, _) in &c {
        n.shutdown().await.unwrap();
    }
}

type K = u64;
type V = String;

/// What the table should hold: per key, its values in arrival order (one, except for a bag).
struct Model {
    kind: TableKind,
    map: BTreeMap<K, Vec<V>>,
}

enum W {
    Insert(K, &'static str),
    InsertMany(Vec<(K, &'static str)>),
    Delete(K),
    DeleteMany(Vec<K>),
    DeleteObject(K, &'static str),
    DeleteObjects(Vec<(K, &'static str)>),
}

impl Model {
    fn insert(&mut self, k: K, v: &str) {
        let vals = self.map.entry(k).or_default();
        match self.kind {
            TableKind::Bag => {
                if !vals.iter().any(|x| x == v) {
                    vals.push(v.to_string());
                }
            }
            _ => *vals = vec![v.to_string()],
        }
    }

    fn delete_object(&mut self, k: K, v: &str) {
        if let Some(vals) = self.map.get_mut(&k) {
            vals.retain(|x| x != v);
            if vals.is_empty() {
                self.map.remove(&k);
            }
        }
    }

    fn apply(&mut self, w: &W) {
        match w {
            W::Insert(k, v) => self.insert(*k, v),
            W::InsertMany(recs) => recs.iter().for_each(|(k, v)| self.insert(*k, v)),
            W::Delete(k) => {
                self.map.remove(k);
            }
            W::DeleteMany(ks) => ks.iter().for_each(|k| {
                self.map.remove(k);
            }),
            W::DeleteObject(k, v) => self.delete_object(*k, v),
            W::DeleteObjects(objs) => objs.iter().for_each(|(k, v)| self.delete_object(*k, v)),
        }
    }

    fn records(&self) -> Vec<(K, V)> {
        self.map
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (*k, v.clone())))
            .collect()
    }
}

async fn write(t: &Table<K, V>, w: &W) -> cets::Result<()> {
    let own = |recs: &[(K, &str)]| -> Vec<(K, V)> {
        recs.iter().map(|(k, v)| (*k, v.to_string())).collect()
    };
    match w {
        W::Insert(k, v) => t.insert(*k, v.to_string()).await,
        W::InsertMany(recs) => t.insert_many(own(recs)).await,
        W::Delete(k) => t.delete(k).await,
        W::DeleteMany(ks) => t.delete_many(ks.clone()).await,
        W::DeleteObject(k, v) => t.delete_object(k, &v.to_string()).await,
        W::DeleteObjects(objs) => t.delete_objects(own(objs)).await,
    }
}

/// Every read of `t` agrees with the model (`step` names the write for the message).
fn check(t: &Table<K, V>, node: &str, m: &Model, step: &str) {
    let at = format!("on {node} after {step}");
    let expected = m.records();
    assert_eq!(t.len(), expected.len(), "len {at}");
    assert_eq!(t.is_empty(), expected.is_empty(), "is_empty {at}");
    if m.kind == TableKind::OrderedSet {
        // An ordered set lists its records in key order.
        assert_eq!(t.to_vec(), expected, "to_vec {at}");
    } else {
        assert_eq!(sorted(t.to_vec()), expected, "to_vec {at}");
    }
    for k in (0..=12).chain([42, 99]) {
        let want = m.map.get(&k).cloned().unwrap_or_default();
        assert_eq!(t.get(&k), want.first().cloned(), "get({k}) {at}");
        assert_eq!(t.lookup(&k), want, "lookup({k}) {at}");
        assert_eq!(
            t.contains_key(&k),
            !want.is_empty(),
            "contains_key({k}) {at}"
        );
    }
    let in_range = |lo: K, hi: K| -> Vec<(K, V)> {
        expected
            .iter()
            .filter(|(k, _)| (lo..hi).contains(k))
            .cloned()
            .collect()
    };
    match m.kind {
        TableKind::OrderedSet => {
            assert_eq!(t.range(2..6).unwrap(), in_range(2, 6), "range(2..6) {at}");
            assert_eq!(t.range(0..100).unwrap(), expected, "range(0..100) {at}");
            assert_eq!(
                t.range(5..=9).unwrap(),
                in_range(5, 10),
                "range(5..=9) {at}"
            );
            assert_eq!(t.range(..4).unwrap(), in_range(0, 4), "range(..4) {at}");
            assert_eq!(
                t.range(7..).unwrap(),
                in_range(7, K::MAX),
                "range(7..) {at}"
            );
            assert_eq!(t.range(50..60).unwrap(), vec![], "empty range {at}");
        }
        kind => {
            let name = match kind {
                TableKind::Set => "set",
                _ => "bag",
            };
            match t.range(0..100) {
                Err(Error::Unsupported(k)) => assert_eq!(k, name, "range {at}"),
                other => panic!("range on a {name} gave {other:?} {at}"),
            }
        }
    }
}

async fn every_write_op_replicates(opts: TableOptions<K, V>) {
    let kind = opts.kind();
    let names = ["a", "b", "c"];
    let c = cluster(&names).await;
    let mut tables: Vec<Table<K, V>> = Vec::new();
    for (n, _) in &c {
        tables.push(n.start("t", opts.clone()).await.unwrap());
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    for t in &tables {
        assert_eq!(t.kind(), kind);
    }

    use W::*;
    let script = vec![
        Insert(1, "a"),
        Insert(2, "b"),
        // set: replaces; bag: a second value of key 1
        Insert(1, "a2"),
        // set: replaces again; bag: (1, "a") is stored already, so nothing changes
        Insert(1, "a"),
        Insert(1, "a"),
        InsertMany(vec![(3, "c"), (4, "d"), (5, "e"), (6, "f")]),
        InsertMany(vec![(6, "f2"), (7, "g"), (8, "h")]),
        InsertMany(vec![]),
        Delete(2),
        Delete(99), // absent: nothing happens
        DeleteMany(vec![3, 4, 42]),
        DeleteMany(vec![]),
        DeleteObject(1, "zzz"), // no such object
        DeleteObject(1, "a"),   // set: value matches; bag: one of two values
        DeleteObject(6, "f"),   // set: stale value, kept; bag: one of two values
        InsertMany(vec![(9, "i"), (9, "i2"), (10, "j"), (11, "k"), (12, "l")]),
        Insert(10, "j2"),
        DeleteObjects(vec![(10, "j"), (11, "nope"), (12, "l"), (5, "e")]),
        DeleteObjects(vec![]),
        Insert(2, "b"),
        Insert(2, "b2"),
        Delete(2), // bag: every value of the key
        Insert(0, "zero"),
    ];
    let mut model = Model {
        kind,
        map: BTreeMap::new(),
    };
    for (i, w) in script.iter().enumerate() {
        // Rotate the writer so that every node writes towards every other.
        let writer = i % tables.len();
        let step = format!("step {i} on {}", names[writer]);
        if matches!((kind, w), (TableKind::Set | TableKind::OrderedSet, InsertMany(r)) if r.iter().any(|(k, _)| *k == 9))
        {
            // Two records with one key in one insert_many on a set: one of them is kept
            // (which one is not specified, as in ETS), the same on every node.
            write(&tables[writer], w).await.unwrap();
            let kept = tables[0].get(&9).expect("key 9 stored");
            assert!(kept == "i" || kept == "i2", "{step}: kept {kept}");
            model.apply(&InsertMany(vec![(10, "j"), (11, "k"), (12, "l")]));
            model.insert(9, &kept);
        } else {
            write(&tables[writer], w).await.unwrap();
            model.apply(w);
        }
        for (t, n) in tables.iter().zip(names) {
            check(t, n, &model, &step);
        }
    }
    // The script ends with something in the table, so the checks above were not vacuous.
    assert!(model.map.len() >= 4, "{:?}", model.map);
    if kind == TableKind::Bag {
        assert_eq!(model.map[&1], vec!["a2".to_string()]);
        assert_eq!(model.map[&6], vec!["f2".to_string()]);
    } else {
        assert_eq!(model.map.get(&1), None);
        assert_eq!(model.map[&6], vec!["f2".to_string()]);
    }
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_every_write_op_replicates_to_all_nodes() {
    every_write_op_replicates(TableOptions::set()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_set_every_write_op_replicates_to_all_nodes() {
    every_write_op_replicates(TableOptions::ordered_set()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bag_every_write_op_replicates_to_all_nodes() {
    every_write_op_replicates(TableOptions::bag()).await;
}

/// Polls `f` exactly once.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

type Pending<'a> = Pin<Box<dyn Future<Output = cets::Result<()>> + Send + 'a>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_returns_after_every_peer_applied_it_and_sync_is_a_barrier() {
    let c = cluster(&["a", "b", "c"]).await;
    let mut t: Vec<Table<K, V>> = Vec::new();
    for (n, _) in &c {
        t.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined(&t.iter().collect::<Vec<_>>()).await;
    assert_eq!(t[0].nodes(), vec!["b", "c"]);
    assert_eq!(t[1].nodes(), vec!["a", "c"]);
    assert_eq!(t[2].nodes(), vec!["a", "b"]);

    // Each insert is visible on b and c the moment it returns on a: no polling.
    for i in 0..200u64 {
        t[0].insert(i, format!("x{i}")).await.unwrap();
        assert_eq!(t[1].get(&i), Some(format!("x{i}")), "b misses write {i}");
        assert_eq!(t[2].get(&i), Some(format!("x{i}")), "c misses write {i}");
    }

    // sync: queue 300 writes without waiting for them, then the barrier.
    let mut expected: BTreeMap<K, V> = (0..200u64).map(|i| (i, format!("x{i}"))).collect();
    let mut pending: Vec<Pending<'_>> = Vec::new();
    for i in 0..300u64 {
        let mut f: Pending<'_> = if i % 3 == 0 {
            let (t0, k) = (t[0].clone(), i % 200);
            expected.remove(&k);
            Box::pin(tokio::task::unconstrained(
                async move { t0.delete(&k).await },
            ))
        } else {
            expected.insert(1000 + i, format!("y{i}"));
            Box::pin(tokio::task::unconstrained(
                t[0].insert(1000 + i, format!("y{i}")),
            ))
        };
        // One poll queues the write (the queue has room, and `unconstrained` keeps Tokio's
        // co-operative budget from turning the send into a yield); the call then waits for
        // the acks.
        match poll_once(&mut f).await {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => pending.push(f),
        }
    }
    assert!(
        !pending.is_empty(),
        "the writes wait for acks, so some are pending"
    );
    t[0].sync().await.unwrap();
    let expected: Vec<(K, V)> = expected.into_iter().collect();
    assert_eq!(sorted(t[0].to_vec()), expected, "a after sync");
    assert_eq!(sorted(t[1].to_vec()), expected, "b after sync");
    assert_eq!(sorted(t[2].to_vec()), expected, "c after sync");
    // Every write queued before the barrier has completed by the time it returns.
    for (i, mut f) in pending.into_iter().enumerate() {
        match poll_once(&mut f).await {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => panic!("write {i}, queued before sync, still waits after it"),
        }
    }
    // sync on a node with no pending writes returns too, on every node.
    for x in &t {
        x.sync().await.unwrap();
    }
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// Two nodes that do not know each other yet, each running table `t`, with frames limited to
/// 64 KiB (and write batches to 16 KiB).
async fn two_nodes_with_64_kib_frames() -> (
    (Node, StaticDiscoveryHandle, Table<K, V>),
    (Node, StaticDiscoveryHandle, Table<K, V>),
) {
    let mut config = cets::NodeConfig::fast_failover();
    config.max_frame_size = 64 * 1024;
    config.max_batch_bytes = 16 * 1024;
    let (a, ha) = node_with("a", "test-cookie", config.clone()).await;
    let (b, hb) = node_with("b", "test-cookie", config).await;
    let ta: Table<K, V> = a.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<K, V> = b.start("t", TableOptions::set()).await.unwrap();
    ((a, ha, ta), (b, hb, tb))
}

/// `NodeConfig::max_frame_size` promises that the frames a node sends stay below it, join
/// dumps included. (Join dumps and applies used to be split by record count only,
/// `join_chunk_records` = 10 000, so a table of 100 records of 2 KiB travelled as one 200 KiB
/// frame, which the peer refused by closing the connection; the nodes reconnected, joined
/// again and failed again, for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_of_records_larger_than_one_frame_completes() {
    let ((a, ha, ta), (b, hb, tb)) = two_nodes_with_64_kib_frames().await;
    // Written while alone: each write is far below the frame limit.
    for i in 0..100u64 {
        ta.insert(i, "x".repeat(2048)).await.unwrap();
    }
    ha.set(vec![b.local_addr()]);
    hb.set(vec![a.local_addr()]);
    joined(&[&ta, &tb]).await;
    assert_eq!(tb.len(), 100);
    shutdown_all([&a, &b]).await;
}

/// A record too large for any frame cannot travel: a node that stored it while alone could
/// never join (every join sends it, the peer closes the connection, they reconnect and try
/// again). Either the write is refused — as it is when the table has members ("one write may
/// encode to at most half of max_frame_size") — or the join delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_too_large_for_a_frame_is_refused_or_joined() {
    let ((a, ha, ta), (b, hb, tb)) = two_nodes_with_64_kib_frames().await;
    let big = "x".repeat(100 * 1024);
    let alone = ta.insert(1, big.clone()).await;
    ta.insert(2, "small".into()).await.unwrap();
    ha.set(vec![b.local_addr()]);
    hb.set(vec![a.local_addr()]);
    joined(&[&ta, &tb]).await;
    match alone {
        Ok(()) => assert_eq!(tb.get(&1).as_ref(), Some(&big)),
        Err(Error::Config(_)) => assert_eq!(tb.get(&1), None),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(tb.get(&2).as_deref(), Some("small"));
    // With a member, the same write is refused.
    assert!(matches!(ta.insert(3, big).await, Err(Error::Config(_))));
    shutdown_all([&a, &b]).await;
}

/// A value whose encoding fails when it is `Refused(true)`: such a write is refused with a codec
/// error, and must not take the writes batched with it down too.
#[derive(Clone, Debug, PartialEq)]
struct Refused(bool);

impl serde::Serialize for Refused {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 {
            Err(serde::ser::Error::custom("this value cannot be encoded"))
        } else {
            s.serialize_bool(false)
        }
    }
}

impl<'de> serde::Deserialize<'de> for Refused {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Refused(<bool as serde::Deserialize>::deserialize(d)?))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_to_encode_is_refused_alone() {
    let c = cluster(&["a", "b"]).await;
    let ta: Table<u64, Refused> = c[0].0.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<u64, Refused> = c[1].0.start("t", TableOptions::set()).await.unwrap();
    joined(&[&ta, &tb]).await;
    // Concurrent writes, so the table server batches good and bad ones into the same frames.
    let writes: Vec<_> = (0..300u64)
        .map(|i| {
            let t = ta.clone();
            tokio::spawn(async move { (i, t.insert(i, Refused(i % 3 == 1)).await) })
        })
        .collect();
    let mut acked = Vec::new();
    for w in writes {
        let (i, r) = w.await.unwrap();
        match r {
            Ok(()) => acked.push(i),
            Err(e) => {
                assert_eq!(i % 3, 1, "only the bad values are refused: {i}: {e}");
                assert!(matches!(e, Error::Codec(_)), "{e}");
            }
        }
    }
    assert_eq!(acked.len(), 200, "every good write is acknowledged");
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|i| tb.get(i).is_none())
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing on b: {missing:?}"
    );
    assert_eq!(tb.len(), 200);
    assert_eq!(ta.nodes(), ["b"], "the connection survived");
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_meaning_forever_are_accepted() {
    let c = cluster(&["a", "b"]).await;
    let opts = || TableOptions::set().ack_timeout(Duration::MAX);
    let ta: Table<u64, String> = c[0].0.start("t", opts()).await.unwrap();
    let tb: Table<u64, String> = c[1].0.start("t", opts()).await.unwrap();
    joined(&[&ta, &tb]).await;
    c[0].0.wait_for_ready(Duration::MAX).await.unwrap();
    ta.insert(1, "one".into()).await.unwrap();
    assert_eq!(tb.get(&1).as_deref(), Some("one"));
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// A member whose table server is stuck (here in a user callback) while its connection lives
/// acknowledges nothing: the writer's call fails with `AckTimeout` once, the member is dropped,
/// later writes go on without waiting for it, and once it is unstuck a join brings it back with
/// every write it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_acknowledging_is_dropped_and_joined_back() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc, Mutex};
    let c = cluster(&["a", "b", "c"]).await;
    let stuck = Arc::new(AtomicBool::new(false));
    let (release, gate) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let b_opts = {
        let stuck = stuck.clone();
        TableOptions::set().on_node_down(move |_, _| {
            stuck.store(true, Ordering::SeqCst);
            // Blocks b's table server until the test releases it; `block_in_place` hands the
            // runtime thread's other tasks to another thread meanwhile.
            tokio::task::block_in_place(|| {
                let _ = gate.lock().unwrap().recv();
            });
        })
    };
    let ta: Table<u64, String> = c[0]
        .0
        .start(
            "t",
            TableOptions::set().ack_timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let tb: Table<u64, String> = c[1].0.start("t", b_opts).await.unwrap();
    let tc: Table<u64, String> = c[2].0.start("t", TableOptions::set()).await.unwrap();
    joined(&[&ta, &tb, &tc]).await;
    drop(tc);
    c[2].0.shutdown().await.unwrap();
    eventually(WAIT, "b's table server stuck", || {
        let stuck = stuck.clone();
        async move { stuck.load(Ordering::SeqCst) }
    })
    .await;

    match ta.insert(1, "one".into()).await {
        Err(Error::AckTimeout { missing, .. }) => assert_eq!(missing, ["b"]),
        other => panic!("expected an ack timeout from b, got {other:?}"),
    }
    assert!(ta.nodes().is_empty(), "b dropped: {:?}", ta.nodes());
    ta.insert(2, "two".into()).await.unwrap();

    // Dropping the sender opens the gate for good (b's later on_node_down calls pass).
    drop(release);
    eventually(WAIT, "b joined back with both writes", || {
        let (ta, tb) = (ta.clone(), tb.clone());
        async move {
            ta.nodes() == ["b"]
                && tb.nodes() == ["a"]
                && tb.get(&1).as_deref() == Some("one")
                && tb.get(&2).as_deref() == Some("two")
        }
    })
    .await;
    ta.insert(3, "three".into()).await.unwrap();
    assert_eq!(tb.get(&3).as_deref(), Some("three"));
    shutdown_all(c[..2].iter().map(|(n, _)| n)).await;
}

/// A join back-off of `Duration::MAX` ("never retry a failed join") is accepted: the first
/// failed join leaves the table server running, with the peer not joined. (The back-off used to
/// overflow and kill the table server.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_backoff_meaning_never_leaves_the_table_serving() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut config = cets::NodeConfig::fast_failover();
    config.join_backoff = Duration::MAX;
    config.join_max_backoff = Duration::MAX;
    let (a, ha) = node_with("a", "test-cookie", config.clone()).await;
    let (b, hb) = node_with("b", "test-cookie", config).await;
    // a coordinates (smaller name); its first join stalls past the 2 s lease and fails.
    let first = Arc::new(AtomicBool::new(true));
    let stalled = Arc::new(AtomicBool::new(false));
    let done = stalled.clone();
    let opts = TableOptions::<u64, String>::set().join_checkpoint(move |at| {
        let stall = at == "locked" && first.swap(false, Ordering::SeqCst);
        let done = done.clone();
        async move {
            if stall {
                tokio::time::sleep(Duration::from_secs(3)).await;
                done.store(true, Ordering::SeqCst);
            }
        }
    });
    let ta: Table<u64, String> = a.start("t", opts).await.unwrap();
    let _tb: Table<u64, String> = b.start("t", TableOptions::set()).await.unwrap();
    ha.set(vec![a.local_addr(), b.local_addr()]);
    hb.set(vec![a.local_addr(), b.local_addr()]);
    eventually(
        WAIT,
        "the join stalled past its lease, failed, and b stays not joined",
        || {
            let (ta, stalled) = (ta.clone(), stalled.clone());
            async move {
                stalled.load(Ordering::SeqCst)
                    && ta
                        .status()
                        .await
                        .is_ok_and(|s| s.joining.is_empty() && s.not_joined == ["b"])
            }
        },
    )
    .await;
    ta.insert(1, "one".into()).await.unwrap();
    assert_eq!(ta.get(&1).as_deref(), Some("one"));
    shutdown_all([&a, &b]).await;
}

/// A batch holds up to `max_batch_bytes` of writes and then one more, which may take half of
/// `max_frame_size`: the configuration is refused unless both and the frame's head fit in one
/// frame. (A `max_batch_bytes` just below half of the frame size used to be accepted, and a
/// batch at both limits exceeded the peer's frame limit: the peer closed the connection and
/// each side dropped the other's records.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_at_the_configured_limits_fits_in_one_frame() {
    let mut config = cets::NodeConfig::fast_failover();
    config.max_frame_size = 1024;
    config.max_batch_bytes = 511;
    let refused = Node::builder("a").config(config.clone()).start().await;
    assert!(
        matches!(refused, Err(Error::Config(_))),
        "511 of 1024 is refused"
    );
    config.max_batch_bytes = 448; // the largest accepted
    let (a, ha) = node_with("a", "test-cookie", config.clone()).await;
    let (b, hb) = node_with("b", "test-cookie", config).await;
    ha.set(vec![a.local_addr(), b.local_addr()]);
    hb.set(vec![a.local_addr(), b.local_addr()]);
    let downs = Downs::default();
    let ta: Table<u64, String> = a.start("t", TableOptions::set()).await.unwrap();
    let tb: Table<u64, String> = b.start("t", downs.opts(TableOptions::set())).await.unwrap();
    joined(&[&ta, &tb]).await;
    // Ops of 447 bytes (just under max_batch_bytes) and of 512 (half the frame), interleaved.
    let writer = |k: u64, n: usize| {
        let t = ta.clone();
        tokio::spawn(async move {
            for _ in 0..300 {
                t.insert(k, "x".repeat(n)).await.unwrap();
            }
        })
    };
    let (w1, w2) = (writer(1, 433), writer(2, 498));
    w1.await.unwrap();
    w2.await.unwrap();
    assert_eq!(downs.calls(), vec![], "b never saw a go down");
    assert_eq!(tb.nodes(), ["a"]);
    assert_eq!(tb.get(&2).map(|v| v.len()), Some(498));
    shutdown_all([&a, &b]).await;
}

/// `on_node_down` runs on every survivor for a member that goes down, also when that member
/// owned no records there. (When the table stream's close reached the table server before the
/// node's down event, the member was removed silently and the callback never ran: found by
/// stress runs of `a_member_that_stops_acknowledging_is_dropped_and_joined_back`. The race is
/// timing-dependent; 24 tables over 4 rounds made it show in about half the runs before the
/// fix.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_node_down_runs_for_a_lost_member_that_owned_no_records() {
    const TABLES: usize = 24;
    for round in 0..4 {
        let c = cluster(&["a", "b"]).await;
        let (mut tas, mut tbs, mut downs) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..TABLES {
            let name = format!("t{i}");
            let d = Downs::default();
            let ta: Table<u64, u64> = c[0].0.start(&name, TableOptions::set()).await.unwrap();
            let tb: Table<u64, u64> = c[1]
                .0
                .start(&name, d.opts(TableOptions::set()))
                .await
                .unwrap();
            tas.push(ta);
            tbs.push(tb);
            downs.push(d);
        }
        for (ta, tb) in tas.iter().zip(&tbs) {
            joined(&[ta, tb]).await;
            tb.insert(1, 1).await.unwrap(); // only b writes: a owns nothing on b
        }
        drop(tas);
        c[0].0.shutdown().await.unwrap();
        for (i, d) in downs.iter().enumerate() {
            let d = d.clone();
            let what = format!("round {round}, table t{i}: on_node_down(a)");
            eventually(WAIT, &what, || {
                let d = d.clone();
                async move { d.calls().len() == 1 }
            })
            .await;
        }
        for (tb, d) in tbs.iter().zip(&downs) {
            tb.sync().await.unwrap();
            let calls = d.calls();
            assert_eq!(calls.len(), 1, "exactly once: {calls:?}");
            assert_eq!(calls[0].0.name, "a");
            assert_eq!(calls[0].1, 0, "a owned no records");
            assert!(tb.nodes().is_empty());
        }
        c[1].0.shutdown().await.unwrap();
    }
}
