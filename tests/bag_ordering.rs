//! A `delete_object` that reaches a node before the insert it deletes (ALGORITHM.md, sections
//! 7.2 and 7.4): writes of two nodes travel on two streams, so a third node can apply b's
//! `delete_object` of a's record before a's insert of it. Every replica must end as if it had
//! applied the two in stamp order: without the record.

mod common;

use std::time::Duration;

use cets::{NodeConfig, Table, TableOptions};
use common::mesh::{members, Mesh};
use common::{eventually, WAIT};

type T = Table<String, u64>;

/// a inserts k=1 (with a marker in the same write) while its link to c is cut; b, which has
/// it, deletes the object k=1, which reaches a and c at once; then the link heals and c reads
/// a's insert, after the delete. a, b and c must all end without k=1, c with the marker.
async fn an_insert_overtaken_by_its_delete_object_stays_deleted(opts: TableOptions<String, u64>) {
    // The a-c cut must not outlast the idle timeout, even on a busy machine: a's insert must
    // reach c on its stream once the link heals.
    let mut config = NodeConfig::fast_failover();
    config.keep_alive_interval = Duration::from_millis(500);
    config.idle_timeout = Duration::from_secs(10);
    let mesh = Mesh::start_with(&["a", "b", "c"], config).await;
    let mut t: Vec<T> = Vec::new();
    for n in &mesh.nodes {
        t.push(n.start("t", opts.clone()).await.unwrap());
    }
    members(&[&t[0], &t[1], &t[2]], 2).await;
    let (k, marker) = ("k".to_string(), "marker".to_string());
    mesh.split(&[0], &[2]);
    let insert = {
        let ta = t[0].clone();
        let recs = vec![(k.clone(), 1), (marker.clone(), 0)];
        tokio::spawn(async move { ta.insert_many(recs).await })
    };
    eventually(WAIT, "b holds a's insert", || async {
        t[1].lookup(&k) == [1]
    })
    .await;
    // Acknowledged by a and by c, which has not read a's insert yet.
    t[1].delete_object(&k, &1).await.unwrap();
    assert!(t[2].lookup(&marker).is_empty(), "c read a's insert first");
    mesh.heal(&[0], &[2]);
    insert.await.unwrap().unwrap();
    eventually(WAIT, "c read a's insert", || async {
        t[2].lookup(&marker) == [0]
    })
    .await;
    for (name, table) in ["a", "b", "c"].iter().zip(&t) {
        assert!(
            table.lookup(&k).is_empty(),
            "{name} holds the deleted object: {:?}",
            table.lookup(&k)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bag_object_deleted_before_its_insert_arrives_stays_deleted_everywhere() {
    an_insert_overtaken_by_its_delete_object_stays_deleted(TableOptions::bag()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_record_deleted_before_its_insert_arrives_stays_deleted_everywhere() {
    an_insert_overtaken_by_its_delete_object_stays_deleted(TableOptions::set()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_set_record_deleted_before_its_insert_arrives_stays_deleted_everywhere() {
    an_insert_overtaken_by_its_delete_object_stays_deleted(TableOptions::ordered_set()).await;
}
