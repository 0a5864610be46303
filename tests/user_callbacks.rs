//! A user callback that panics (conflict handler, `on_node_down`, owner function) fails only
//! the join or the write that called it: the table goes on, and a failed join is retried.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use cets::{Error, TableOptions};
use common::*;

/// The conflict handler panics while `panicky` is set. The join fails (it used to kill the join
/// task, which never reported its end: the pair stayed marked as joining and never joined
/// again, even once the handler was fixed) and is retried until the handler returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_conflict_handler_fails_that_join_and_the_next_one_succeeds() {
    let panicky = Arc::new(AtomicBool::new(true));
    let calls = Arc::new(AtomicUsize::new(0));
    let opts = || {
        let (panicky, calls) = (panicky.clone(), calls.clone());
        TableOptions::<u32, u32>::set().conflict_handler(move |k, a, b| {
            calls.fetch_add(1, Ordering::Relaxed);
            if panicky.load(Ordering::Relaxed) {
                panic!("test handler refuses key {k}");
            }
            *a.max(b)
        })
    };
    let (a, _da) = node("a").await;
    let (b, _db) = node("b").await;
    let ta = a.start("t", opts()).await.unwrap();
    let tb = b.start("t", opts()).await.unwrap();
    ta.insert(1, 10).await.unwrap();
    tb.insert(1, 20).await.unwrap();
    a.connect(b.local_addr());
    // A join after the first one whose handler panicked: the pair is not stuck as joining.
    eventually(
        WAIT,
        "the conflict handler called (and panicking) in two joins",
        || {
            let calls = calls.clone();
            async move { calls.load(Ordering::Relaxed) >= 2 }
        },
    )
    .await;
    assert!(
        ta.nodes().is_empty(),
        "no join succeeded while the handler panics"
    );
    assert_eq!(ta.get(&1), Some(10));
    assert_eq!(tb.get(&1), Some(20));
    let s = ta.status().await.unwrap();
    assert_eq!(s.not_joined, ["b"], "{s:?}");
    panicky.store(false, Ordering::Relaxed);
    joined(&[&ta, &tb]).await;
    assert_eq!(ta.get(&1), Some(20));
    assert_eq!(tb.get(&1), Some(20));
    shutdown_all([&a, &b]).await;
}

/// `on_node_down` panics on a: the node-down still completes and a's table goes on serving
/// (the panic used to end a's table server: every later call failed with `Shutdown`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_on_node_down_leaves_the_table_running() {
    let nodes = cluster(&["a", "b", "c"]).await;
    let (a, b, c) = (&nodes[0].0, &nodes[1].0, &nodes[2].0);
    let ta = a
        .start(
            "t",
            TableOptions::<u32, u32>::set()
                .on_node_down(|id, _| panic!("test on_node_down for {id}")),
        )
        .await
        .unwrap();
    let tb = b.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    let tc = c.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    joined(&[&ta, &tb, &tc]).await;
    tc.insert(3, 30).await.unwrap();
    c.shutdown().await.unwrap();
    eventually(WAIT, "a and b dropped c", || {
        let (ta, tb) = (ta.clone(), tb.clone());
        async move { ta.nodes() == ["b"] && tb.nodes() == ["a"] && ta.get(&3).is_none() }
    })
    .await;
    ta.insert(1, 10)
        .await
        .expect("a's table still takes writes");
    assert_eq!(tb.get(&1), Some(10));
    tb.insert(2, 20).await.unwrap();
    assert_eq!(ta.get(&2), Some(20));
    assert_eq!(ta.status().await.unwrap().members.len(), 1);
    shutdown_all([a, b]).await;
}

/// The owner function panics for one key: that write fails with `Error::Callback` naming
/// the key, nothing of it is stored anywhere, and other writes go on (the panic used to end
/// the table server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_owner_function_fails_that_write_only() {
    let nodes = cluster(&["a", "b"]).await;
    let (a, b) = (&nodes[0].0, &nodes[1].0);
    let opts = || {
        TableOptions::<u32, u32>::set().owner(|k, _| {
            if *k == 13 {
                panic!("test owner function refuses 13");
            }
            "b".to_string()
        })
    };
    let ta = a.start("t", opts()).await.unwrap();
    let tb = b.start("t", opts()).await.unwrap();
    joined(&[&ta, &tb]).await;
    let err = ta.insert_many(vec![(12, 1), (13, 2)]).await.unwrap_err();
    match &err {
        Error::Callback {
            table,
            callback,
            reason,
        } => {
            assert_eq!(table, "t");
            assert_eq!(*callback, "owner function");
            assert!(reason.contains("13"), "{reason}");
        }
        other => panic!("expected Error::Callback, got {other:?}"),
    }
    ta.insert(14, 3).await.expect("later writes go on");
    tb.sync().await.unwrap();
    for t in [&ta, &tb] {
        assert_eq!(
            sorted(t.to_vec()),
            vec![(14, 3)],
            "the failed write left nothing"
        );
    }
    shutdown_all([a, b]).await;
}
