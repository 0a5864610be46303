//! A node restarts in the same process on the same address: `Node::shutdown` frees the UDP
//! port before it returns, whatever handles of the old node the program still holds.

mod common;

use cets::{Node, NodeConfig, TableOptions};
use common::*;

/// `a` shuts down while the program still holds its `Node` and a `Table` handle, and starts
/// again on the same address at once; it rejoins `b` and gets the table back. (The port used
/// to stay bound as long as any handle lived, and the restart failed with `AddrInUse`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_on_its_address_while_handles_of_the_old_one_live() {
    let nodes = cluster(&["a", "b"]).await;
    let (a, b) = (&nodes[0].0, &nodes[1].0);
    let ta = a.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    let tb = b.start("t", TableOptions::<u32, u32>::set()).await.unwrap();
    joined(&[&ta, &tb]).await;
    tb.insert(1, 10).await.unwrap();
    let addr = a.local_addr();
    a.shutdown().await.unwrap();

    // `a` and `ta` are still alive here.
    let again = Node::builder("a")
        .listen(addr)
        .cookie("test-cookie")
        .config(NodeConfig::fast_failover())
        .discovery(cets::discovery::StaticDiscovery::new(vec![b.local_addr()]))
        .start()
        .await
        .expect("the address is free once shutdown returned");
    assert_eq!(again.local_addr(), addr);
    let ta2 = again
        .start("t", TableOptions::<u32, u32>::set())
        .await
        .unwrap();
    joined(&[&ta2, &tb]).await;
    assert_eq!(ta2.get(&1), Some(10));
    assert_eq!(ta.get(&1), Some(10), "the old handle still reads its copy");
    assert!(
        ta.insert(2, 20).await.is_err(),
        "the old handle's node is down"
    );
    shutdown_all([&again, b]).await;
}
