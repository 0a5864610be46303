//! Change subscriptions, by where a change comes from (issue 18): the writes of a
//! cluster-owned table, records with their own lifetime (`insert_with_ttl`) that expire, and
//! the changes an anti-entropy repair makes, each reported with its node.

mod common;

use std::time::Duration;

use cets::{Change, Node, NodeConfig, Subscription, Table, TableOptions, Update};
use common::*;

type K = u64;
type V = String;

/// The next change and the name of the node it came from.
async fn change(s: &mut Subscription<K, V>, what: &str) -> (Change<K, V>, String) {
    match tokio::time::timeout(WAIT, s.recv()).await {
        Ok(Some(Update::Change(e))) => (e.change, e.node.name),
        Ok(Some(Update::Lagged(n))) => panic!("lagged by {n} while waiting for {what}"),
        Ok(None) => panic!("subscription ended while waiting for {what}"),
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// `n` changes, sorted by key (changes of different keys may come in any order).
async fn changes(s: &mut Subscription<K, V>, n: usize, what: &str) -> Vec<(Change<K, V>, String)> {
    let mut got = Vec::new();
    for i in 0..n {
        got.push(change(s, &format!("{what} ({i} of {n})")).await);
    }
    got.sort_by_key(|(c, _)| *c.key());
    got
}

fn ins(key: K, value: &str, previous: Option<&str>) -> Change<K, V> {
    Change::Inserted {
        key,
        value: value.into(),
        previous: previous.map(Into::into),
    }
}

fn expired(key: K, value: &str) -> Change<K, V> {
    Change::Expired {
        key,
        value: value.into(),
    }
}

fn repaired(key: K, value: Option<&str>, previous: Option<&str>) -> Change<K, V> {
    Change::Repaired {
        key,
        value: value.map(Into::into),
        previous: previous.map(Into::into),
    }
}

/// In a cluster-owned table each write is reported with the node that wrote it (the record
/// is stored under the writer's name), and a writer that shuts down takes nothing with it:
/// no `OwnerDown`, the next change the subscriber hears is the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_owned_writes_come_with_their_writer_and_outlive_it() {
    let c = cluster(&["a", "b"]).await;
    let opts = || TableOptions::set().cluster_owned();
    let a: Table<K, V> = c[0].0.start("t", opts()).await.unwrap();
    let b: Table<K, V> = c[1].0.start("t", opts()).await.unwrap();
    joined(&[&a, &b]).await;
    let mut sub = a.subscribe().await.unwrap();
    b.insert(1, "b1".into()).await.unwrap();
    a.insert(2, "a2".into()).await.unwrap();
    b.insert(2, "b2".into()).await.unwrap();
    b.delete(&1).await.unwrap();
    assert_eq!(
        change(&mut sub, "b's insert").await,
        (ins(1, "b1", None), "b".into())
    );
    assert_eq!(
        change(&mut sub, "a's insert").await,
        (ins(2, "a2", None), "a".into())
    );
    assert_eq!(
        change(&mut sub, "b's overwrite").await,
        (ins(2, "b2", Some("a2")), "b".into())
    );
    let deleted = Change::Deleted {
        key: 1,
        previous: "b1".into(),
    };
    assert_eq!(change(&mut sub, "b's delete").await, (deleted, "b".into()));
    c[1].0.shutdown().await.unwrap();
    eventually(WAIT, "a alone", || async {
        a.status().await.unwrap().members.is_empty()
    })
    .await;
    a.insert(3, "a3".into()).await.unwrap();
    assert_eq!(
        change(&mut sub, "the write after b's end").await,
        (ins(3, "a3", None), "a".into()),
        "b's end dropped nothing"
    );
    assert_eq!(a.get(&2).as_deref(), Some("b2"));
    c[0].0.shutdown().await.unwrap();
}

/// A record with its own lifetime is reported as inserted by its writer and, on every node,
/// as expired by that node when the sweep removes it; one replaced by a newer plain write
/// never expires. Node-owned and cluster-owned sets, and a bag, whose object expires alone
/// while another object of its key stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_with_their_own_lifetime_are_reported_expired_on_every_node() {
    let short = Duration::from_millis(300);
    for opts in [
        TableOptions::set(),
        TableOptions::set().cluster_owned(),
        TableOptions::bag(),
    ] {
        let bag = opts.kind() == cets::TableKind::Bag;
        let c = cluster(&["a", "b"]).await;
        let a: Table<K, V> = c[0].0.start("t", opts.clone()).await.unwrap();
        let b: Table<K, V> = c[1].0.start("t", opts.clone()).await.unwrap();
        joined(&[&a, &b]).await;
        let mut subs = [a.subscribe().await.unwrap(), b.subscribe().await.unwrap()];
        a.insert_with_ttl(1, "short".into(), short).await.unwrap();
        a.insert(2, "plain".into()).await.unwrap();
        // Key 3, written by b. In a set, a plain write replaces a record with a lifetime it
        // does not reach; in a bag, an object with a short lifetime joins a plain one.
        let mut key_3 = Vec::new();
        if bag {
            b.insert(3, "for good".into()).await.unwrap();
            b.insert_with_ttl(3, "short 3".into(), short).await.unwrap();
            key_3.push(ins(3, "for good", None));
            key_3.push(ins(3, "short 3", None));
        } else {
            let long = Duration::from_secs(600);
            b.insert_with_ttl(3, "long".into(), long).await.unwrap();
            b.insert(3, "for good".into()).await.unwrap();
            key_3.push(ins(3, "long", None));
            key_3.push(ins(3, "for good", Some("long")));
        }
        let what = format!("{:?}", opts.kind());
        for (sub, me) in subs.iter_mut().zip(["a", "b"]) {
            // Sorted by key (stably: a key's changes keep their order, and an expiry comes
            // after the insert it undoes, whatever the machine's speed).
            let mut want = vec![
                (ins(1, "short", None), "a".to_string()),
                (expired(1, "short"), me.to_string()),
                (ins(2, "plain", None), "a".to_string()),
            ];
            want.extend(key_3.iter().map(|c| (c.clone(), "b".to_string())));
            if bag {
                want.push((expired(3, "short 3"), me.to_string()));
            }
            let got = changes(sub, want.len(), &format!("{what} on {me}")).await;
            assert_eq!(got, want, "{what} on {me}: expiries by this node");
        }
        for t in [&a, &b] {
            assert_eq!(t.get(&1), None);
            assert_eq!(t.lookup(&3), vec!["for good".to_string()], "{what}");
        }
        // Nothing else was reported: the next change is the next write.
        a.insert(4, "last".into()).await.unwrap();
        for (sub, me) in subs.iter_mut().zip(["a", "b"]) {
            assert_eq!(
                change(sub, "the last write").await,
                (ins(4, "last", None), "a".into()),
                "{what} on {me}"
            );
        }
        shutdown_all([&c[0].0, &c[1].0]).await;
    }
}

async fn ae_cluster(names: &[&str]) -> Vec<Node> {
    let mut nodes = Vec::new();
    let mut handles = Vec::new();
    for n in names {
        let mut config = NodeConfig::fast_failover();
        config.anti_entropy_interval = Some(Duration::from_millis(200));
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

/// What an anti-entropy repair changes is reported as `Repaired`, with the peer the repair
/// was made with: a record brought back (value, no previous), a record removed (previous, no
/// value) and a record replaced by a newer version (both). In a bag, per object. In a
/// cluster-owned table, where a record one side lacks is copied to it (no owner decides),
/// the record "a never wrote" goes to a instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_is_reported_as_a_repair_with_its_peer() {
    for opts in [
        TableOptions::set(),
        TableOptions::bag(),
        TableOptions::set().cluster_owned(),
    ] {
        let bag = opts.kind() == cets::TableKind::Bag;
        let cluster = opts.ownership_mode() == cets::Ownership::Cluster;
        let nodes = ae_cluster(&["a", "b"]).await;
        let a: Table<K, V> = nodes[0].start("t", opts.clone()).await.unwrap();
        let b: Table<K, V> = nodes[1].start("t", opts.clone()).await.unwrap();
        joined(&[&a, &b]).await;
        a.insert_many(vec![(1, "v1".into()), (2, "v2".into())])
            .await
            .unwrap();
        for n in &nodes {
            n.wait_for_converged(Duration::from_secs(20)).await.unwrap();
        }
        let mut subs = [a.subscribe().await.unwrap(), b.subscribe().await.unwrap()];
        // b loses a's record 1, gains a record of a's that a never wrote (key 5), and holds
        // a newer version of a's key 2 (in a bag: a new object of a's under key 2).
        b.testing_remove_local(1, None).await.unwrap();
        b.testing_put_local(5, "ghost".into(), Some("a"))
            .await
            .unwrap();
        b.testing_put_local(2, "newer".into(), Some("a"))
            .await
            .unwrap();
        let (on_a, on_b) = if bag {
            // a owns the extra object of key 2 and lacks it: b drops it.
            (
                vec![],
                vec![
                    (repaired(1, Some("v1"), None), "a".into()),
                    (repaired(2, None, Some("newer")), "a".into()),
                    (repaired(5, None, Some("ghost")), "a".into()),
                ],
            )
        } else if cluster {
            // The union: b's extra record is copied to a, and the newer version of key 2 wins.
            (
                vec![
                    (repaired(2, Some("newer"), Some("v2")), "b".into()),
                    (repaired(5, Some("ghost"), None), "b".into()),
                ],
                vec![(repaired(1, Some("v1"), None), "a".into())],
            )
        } else {
            // Both hold key 2 in different versions: the newer wins on both.
            (
                vec![(repaired(2, Some("newer"), Some("v2")), "b".into())],
                vec![
                    (repaired(1, Some("v1"), None), "a".into()),
                    (repaired(5, None, Some("ghost")), "a".into()),
                ],
            )
        };
        let what = format!("{:?} {:?}", opts.kind(), opts.ownership_mode());
        assert_eq!(
            changes(&mut subs[1], on_b.len(), &format!("b's repairs, {what}")).await,
            on_b,
            "{what}: on b"
        );
        assert_eq!(
            changes(&mut subs[0], on_a.len(), &format!("a's repairs, {what}")).await,
            on_a,
            "{what}: on a"
        );
        for n in &nodes {
            n.wait_for_converged(Duration::from_secs(20)).await.unwrap();
        }
        assert_eq!(sorted(a.to_vec()), sorted(b.to_vec()));
        // Nothing else was reported.
        a.insert(9, "last".into()).await.unwrap();
        for (sub, me) in subs.iter_mut().zip(["a", "b"]) {
            assert_eq!(
                change(sub, "the last write").await,
                (ins(9, "last", None), "a".into()),
                "{what} on {me}"
            );
        }
        shutdown_all(&nodes).await;
    }
}
