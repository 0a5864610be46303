//! Change subscriptions (`Table::subscribe`, `subscribe_with_snapshot`, `subscribe_from`) on
//! nodes over real QUIC on loopback.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use cets::{Change, Error, Subscription, Table, TableKind, TableOptions, Update};
use common::*;

type K = u64;
type V = String;

/// The next item, or a panic naming what was awaited.
async fn next(s: &mut Subscription<K, V>, what: &str) -> Update<K, V> {
    match tokio::time::timeout(WAIT, s.recv()).await {
        Ok(Some(u)) => u,
        Ok(None) => panic!("subscription ended while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The next change and the name of the node it came from.
async fn change(s: &mut Subscription<K, V>, what: &str) -> (Change<K, V>, String) {
    match next(s, what).await {
        Update::Change(e) => (e.change, e.node.name),
        Update::Lagged(n) => panic!("lagged by {n} while waiting for {what}"),
    }
}

fn ins(key: K, value: &str, previous: Option<&str>) -> Change<K, V> {
    Change::Inserted {
        key,
        value: value.into(),
        previous: previous.map(Into::into),
    }
}

fn del(key: K, previous: &str) -> Change<K, V> {
    Change::Deleted {
        key,
        previous: previous.into(),
    }
}

/// Local and replicated inserts, overwrites and deletes reach a subscriber in apply order,
/// each with the node it came from; a set and an ordered set alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_and_remote_writes_and_deletes_arrive_in_order_with_their_node() {
    for opts in [TableOptions::set(), TableOptions::ordered_set()] {
        let c = cluster(&["a", "b"]).await;
        let a: Table<K, V> = c[0].0.start("t", opts.clone()).await.unwrap();
        let b: Table<K, V> = c[1].0.start("t", opts.clone()).await.unwrap();
        joined(&[&a, &b]).await;
        let mut sub = b.subscribe().await.unwrap();
        a.insert(1, "x".into()).await.unwrap();
        b.insert(2, "y".into()).await.unwrap();
        a.insert(1, "z".into()).await.unwrap();
        a.delete(&1).await.unwrap();
        b.delete(&3).await.unwrap(); // nothing stored: no change
        b.insert(2, "w".into()).await.unwrap();
        let want = [
            (ins(1, "x", None), "a"),
            (ins(2, "y", None), "b"),
            (ins(1, "z", Some("x")), "a"),
            (del(1, "z"), "a"),
            (ins(2, "w", Some("y")), "b"),
        ];
        for (i, (ch, node)) in want.into_iter().enumerate() {
            assert_eq!(
                change(&mut sub, &format!("change {i}")).await,
                (ch, node.to_string())
            );
        }
        shutdown_all(c.iter().map(|(n, _)| n)).await;
    }
}

/// In a bag each object is a change of its own: adding one, deleting one, deleting a key with
/// two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bag_objects_are_inserted_and_deleted_one_by_one() {
    let c = cluster(&["a", "b"]).await;
    let a: Table<K, V> = c[0].0.start("t", TableOptions::bag()).await.unwrap();
    let b: Table<K, V> = c[1].0.start("t", TableOptions::bag()).await.unwrap();
    joined(&[&a, &b]).await;
    let mut sub = a.subscribe().await.unwrap();
    a.insert(1, "x".into()).await.unwrap();
    b.insert(1, "y".into()).await.unwrap();
    a.insert(1, "x".into()).await.unwrap(); // stored already: no change
    b.delete_object(&1, &"x".to_string()).await.unwrap();
    a.insert(1, "z".into()).await.unwrap();
    a.delete(&1).await.unwrap();
    assert_eq!(change(&mut sub, "x").await, (ins(1, "x", None), "a".into()));
    assert_eq!(change(&mut sub, "y").await, (ins(1, "y", None), "b".into()));
    assert_eq!(change(&mut sub, "x gone").await, (del(1, "x"), "b".into()));
    assert_eq!(change(&mut sub, "z").await, (ins(1, "z", None), "a".into()));
    let mut last = vec![
        change(&mut sub, "delete 1").await.0,
        change(&mut sub, "delete 2").await.0,
    ];
    last.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(last, vec![del(1, "y"), del(1, "z")]);
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// Expired records are reported when the sweep removes them, by this node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_reported() {
    let (n, _h) = node("a").await;
    let t: Table<K, V> = n
        .start(
            "t",
            TableOptions::set().expire_after(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let mut sub = t.subscribe().await.unwrap();
    t.insert(1, "x".into()).await.unwrap();
    assert_eq!(change(&mut sub, "insert").await.0, ins(1, "x", None));
    let expired = Change::Expired {
        key: 1,
        value: "x".into(),
    };
    assert_eq!(change(&mut sub, "expiry").await, (expired, "a".into()));
    assert!(t.is_empty());
    n.shutdown().await.unwrap();
}

/// The records of a node that goes down are reported as dropped with their owner, on a set
/// and on a bag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_node_that_goes_down_are_reported_with_that_node() {
    for opts in [TableOptions::set(), TableOptions::bag()] {
        let c = cluster(&["a", "b"]).await;
        let a: Table<K, V> = c[0].0.start("t", opts.clone()).await.unwrap();
        let b: Table<K, V> = c[1].0.start("t", opts.clone()).await.unwrap();
        joined(&[&a, &b]).await;
        a.insert(0, "mine".into()).await.unwrap();
        b.insert_many(vec![(1, "p".into()), (2, "q".into())])
            .await
            .unwrap();
        let mut sub = a.subscribe().await.unwrap();
        c[1].0.shutdown().await.unwrap();
        let mut got = Vec::new();
        for i in 0..2 {
            got.push(change(&mut sub, &format!("drop {i}")).await);
        }
        got.sort_by_key(|(c, _)| *c.key());
        let down = |key, v: &str| {
            let value = v.to_string();
            (Change::OwnerDown { key, value }, "b".to_string())
        };
        assert_eq!(got, vec![down(1, "p"), down(2, "q")], "{:?}", opts.kind());
        assert_eq!(a.to_vec(), vec![(0, "mine".to_string())]);
        c[0].0.shutdown().await.unwrap();
    }
}

/// A join reports the records it brings, and replaces, as `Joined`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_reports_the_records_it_brings() {
    let (na, ha) = node("a").await;
    let (nb, _hb) = node("b").await;
    let a: Table<K, V> = na.start("t", TableOptions::set()).await.unwrap();
    let b: Table<K, V> = nb.start("t", TableOptions::set()).await.unwrap();
    a.insert(1, "a1".into()).await.unwrap();
    a.insert(2, "old".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await; // b's write of 2 is later: it wins
    b.insert(2, "new".into()).await.unwrap();
    b.insert(3, "b3".into()).await.unwrap();
    let mut sub = a.subscribe().await.unwrap();
    ha.set(vec![nb.local_addr()]);
    joined(&[&a, &b]).await;
    let mut got = Vec::new();
    for i in 0..2 {
        got.push(change(&mut sub, &format!("joined {i}")).await.0);
    }
    got.sort_by_key(|c| *c.key());
    let joined = |key, value: &str, previous: Option<&str>| Change::Joined {
        key,
        value: value.into(),
        previous: previous.map(Into::into),
    };
    assert_eq!(
        got,
        vec![joined(2, "new", Some("old")), joined(3, "b3", None)]
    );
    shutdown_all([&na, &nb]).await;
}

/// A subscriber that does not read while thousands of writes go on gets `Lagged` with the
/// exact number it missed, then the rest; the writes never waited for it. Its cursor from
/// before the loss is refused; a cursor the log still holds resumes with what followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_gets_lagged_and_never_holds_the_writers() {
    let (n, _h) = node("a").await;
    let t: Table<K, V> = n
        .start("t", TableOptions::set().subscription_buffer(100))
        .await
        .unwrap();
    let mut slow = t.subscribe().await.unwrap();
    let start = slow.cursor();
    for i in 0..1000u64 {
        t.insert(i, i.to_string()).await.unwrap();
    }
    assert_eq!(t.len(), 1000);
    assert_eq!(next(&mut slow, "lagged").await, Update::Lagged(900));
    let mut keys = Vec::new();
    let mut mid = None;
    for i in 0..100 {
        let (c, _) = change(&mut slow, "a kept change").await;
        keys.push(*c.key());
        if i == 49 {
            mid = Some(slow.cursor());
        }
    }
    assert_eq!(keys, (900..1000).collect::<Vec<_>>());
    assert!(matches!(
        t.subscribe_from(start).await,
        Err(Error::CursorExpired { .. })
    ));
    let mut resumed = t.subscribe_from(mid.unwrap()).await.unwrap();
    assert_eq!(change(&mut resumed, "after mid").await.0.key(), &950);
    n.shutdown().await.unwrap();
}

/// A consumer that dropped its subscription resumes from its cursor with exactly the changes
/// it did not read, local and replicated; a cursor of another table start is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscriber_resumes_from_its_cursor_without_gap_or_duplicate() {
    let c = cluster(&["a", "b"]).await;
    let a: Table<K, V> = c[0].0.start("t", TableOptions::set()).await.unwrap();
    let b: Table<K, V> = c[1].0.start("t", TableOptions::set()).await.unwrap();
    joined(&[&a, &b]).await;
    let mut sub = a.subscribe().await.unwrap();
    a.insert(1, "1".into()).await.unwrap();
    b.insert(2, "2".into()).await.unwrap();
    change(&mut sub, "first").await;
    let cursor = sub.cursor();
    drop(sub);
    a.insert(3, "3".into()).await.unwrap();
    b.delete(&1).await.unwrap();
    let mut again = a.subscribe_from(cursor).await.unwrap();
    assert_eq!(
        change(&mut again, "2").await,
        (ins(2, "2", None), "b".into())
    );
    assert_eq!(
        change(&mut again, "3").await,
        (ins(3, "3", None), "a".into())
    );
    assert_eq!(change(&mut again, "del").await, (del(1, "1"), "b".into()));
    a.insert(4, "4".into()).await.unwrap();
    assert_eq!(change(&mut again, "4").await.0, ins(4, "4", None));
    // The same cursor on another table (another log) is refused.
    let other: Table<K, V> = c[0].0.start("u", TableOptions::set()).await.unwrap();
    assert!(matches!(
        other.subscribe_from(cursor).await,
        Err(Error::CursorExpired { .. })
    ));
    shutdown_all(c.iter().map(|(n, _)| n)).await;
}

/// A cache started from `subscribe_with_snapshot` while two nodes write the same keys without
/// pause ends equal to the table, and every change fits it exactly: an insert's `previous` is
/// the value the cache holds, a delete removes a value it holds (no change missing between
/// the snapshot and the stream, none in both). Each kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_stream_have_no_gap_and_no_duplicate_under_concurrent_writes() {
    for opts in [
        TableOptions::set(),
        TableOptions::ordered_set(),
        TableOptions::bag(),
    ] {
        let kind = opts.kind();
        let c = cluster(&["a", "b"]).await;
        let a: Table<K, V> = c[0].0.start("t", opts.clone()).await.unwrap();
        let b: Table<K, V> = c[1].0.start("t", opts.clone()).await.unwrap();
        joined(&[&a, &b]).await;
        let writer = |t: Table<K, V>, tag: &'static str| {
            tokio::spawn(async move {
                for i in 0..600u64 {
                    let k = i % 40;
                    if i % 7 == 3 {
                        t.delete(&k).await.unwrap();
                    } else {
                        t.insert(k, format!("{tag}{i}")).await.unwrap();
                    }
                }
            })
        };
        let wa = writer(a.clone(), "a");
        let wb = writer(b.clone(), "b");
        // Let the writers get going, then start the cache in the middle of their writes.
        eventually(WAIT, "writes under way", || async { a.len() > 5 }).await;
        let (snapshot, mut sub) = a.subscribe_with_snapshot().await.unwrap();
        let mut cache: HashMap<K, Vec<V>> = HashMap::new();
        for (k, v) in snapshot {
            cache.entry(k).or_default().push(v);
        }
        // Once both writers are done, a last insert marks the end of the stream to read.
        let last = a.clone();
        tokio::spawn(async move {
            wa.await.unwrap();
            wb.await.unwrap();
            last.insert(1000, "end".into()).await.unwrap();
        });
        let mut applied = 0;
        loop {
            let u = next(&mut sub, "the next change").await;
            let Update::Change(e) = u else {
                panic!("unexpected {u:?}");
            };
            if *e.change.key() == 1000 {
                break;
            }
            applied += 1;
            let vals = cache.entry(*e.change.key()).or_default();
            match e.change {
                Change::Inserted {
                    value, previous, ..
                } => {
                    match (kind, previous) {
                        (TableKind::Bag, None) => assert!(!vals.contains(&value)),
                        (_, Some(p)) => assert_eq!(vals, &vec![p], "{kind:?}"),
                        (_, None) => assert!(vals.is_empty(), "{kind:?}: {vals:?}"),
                    }
                    if kind != TableKind::Bag {
                        vals.clear();
                    }
                    vals.push(value);
                }
                Change::Deleted { previous, .. } => {
                    let i = vals.iter().position(|v| *v == previous);
                    assert!(i.is_some(), "{kind:?}: deleted {previous} not in {vals:?}");
                    vals.remove(i.unwrap());
                }
                // An insert racing a delete of its key from the other node can leave a bag's
                // replicas different (ALGORITHM.md, Limits), and anti-entropy repairs that
                // while the writes go on (section 15.4): one object at a time.
                Change::Repaired {
                    value, previous, ..
                } if kind == TableKind::Bag => {
                    if let Some(p) = previous {
                        let i = vals.iter().position(|v| *v == p);
                        assert!(i.is_some(), "{kind:?}: repaired {p} not in {vals:?}");
                        vals.remove(i.unwrap());
                    }
                    if let Some(v) = value {
                        assert!(!vals.contains(&v), "{kind:?}: repaired {v} in {vals:?}");
                        vals.push(v);
                    }
                }
                other => panic!("{kind:?}: unexpected {other:?}"),
            }
        }
        assert!(applied > 0);
        let mut want: HashMap<K, Vec<V>> = HashMap::new();
        for (k, v) in a.to_vec().into_iter().filter(|(k, _)| *k != 1000) {
            want.entry(k).or_default().push(v);
        }
        cache.retain(|_, v| !v.is_empty());
        for v in cache.values_mut().chain(want.values_mut()) {
            v.sort();
        }
        assert_eq!(cache, want, "{kind:?}");
        shutdown_all(c.iter().map(|(n, _)| n)).await;
    }
}

/// A subscription ends when its table's node shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_with_its_node() {
    let (n, _h) = node("a").await;
    let t: Table<K, V> = n.start("t", TableOptions::set()).await.unwrap();
    let mut sub = t.subscribe().await.unwrap();
    t.insert(1, "x".into()).await.unwrap();
    n.shutdown().await.unwrap();
    assert!(matches!(sub.recv().await, Some(Update::Change(_))));
    assert_eq!(tokio::time::timeout(WAIT, sub.recv()).await.unwrap(), None);
}
