//! A node whose clock runs far ahead does not drag the others' clocks with it
//! (`NodeConfig::max_clock_drift`).

mod common;

use std::time::Duration;

use cets::{Node, NodeConfig, TableOptions};
use common::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// "fast"'s clock runs a day ahead. Its writes, acks and ticks reach b with stamps a day ahead
/// of b's wall time, beyond `max_clock_drift`: b's clock does not take them, so a record b
/// writes afterwards expires after its lifetime, and b reports "fast" in its status. (b's
/// clock used to jump a day ahead, and every record b wrote after that lived a day longer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamps_from_a_node_a_day_ahead_do_not_move_the_clock_of_a_node_that_receives_them() {
    let config = NodeConfig::fast_failover();
    assert!(config.max_clock_drift < DAY);
    let fast = Node::builder("fast")
        .listen(loopback())
        .cookie("test-cookie")
        .config(config.clone())
        .clock_skew_for_tests(DAY)
        .start()
        .await
        .unwrap();
    let (b, _db) = node_with("b", "test-cookie", config).await;
    let opts = || TableOptions::<String, u32>::set().expire_after(Duration::from_secs(1));
    let tf = fast.start("t", opts()).await.unwrap();
    let tb = b.start("t", opts()).await.unwrap();
    b.connect(fast.local_addr());
    joined(&[&tf, &tb]).await;
    tf.insert("from fast".into(), 1).await.unwrap();
    assert_eq!(tb.get(&"from fast".to_string()), Some(1));
    tb.insert("from b".into(), 2).await.unwrap();
    assert_eq!(tb.get(&"from b".to_string()), Some(2));
    eventually(WAIT, "b's own record expires on b after its second", || {
        let tb = tb.clone();
        async move { tb.get(&"from b".to_string()).is_none() }
    })
    .await;
    let status = b.status().await;
    let (peer, lead) = status
        .clock_ahead
        .iter()
        .find(|(p, _)| p == "fast")
        .expect("b reports fast's clock as ahead");
    assert_eq!(peer, "fast");
    assert!(*lead > DAY - Duration::from_secs(60), "lead {lead:?}");
    assert!(
        fast.status().await.clock_ahead.is_empty(),
        "b's stamps are behind fast's clock, not ahead"
    );
    shutdown_all([&fast, &b]).await;
}
