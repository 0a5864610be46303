//! A bag key with many objects costs each object a hash probe, not a comparison with every
//! object the key holds: in a write (local or replicated), a delete_object, a join's union of
//! the key, a subscriber's change report and an anti-entropy repair.

mod common;

use std::time::{Duration, Instant};

use cets::{Change, NodeConfig, Subscription, Table, TableOptions, Update};
use common::*;

type T = Table<u32, u32>;

/// Reads `n` changes; returns how many were of each kind (inserted, joined, deleted,
/// repaired). A lag fails the test (the buffer holds them all).
async fn read(sub: &mut Subscription<u32, u32>, n: usize, what: &str) -> [usize; 4] {
    let mut counts = [0; 4];
    for _ in 0..n {
        let u = tokio::time::timeout(Duration::from_secs(60), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .unwrap_or_else(|| panic!("subscription ended waiting for {what}"));
        match u {
            Update::Change(e) => match e.change {
                Change::Inserted { .. } => counts[0] += 1,
                Change::Joined { .. } => counts[1] += 1,
                Change::Deleted { .. } => counts[2] += 1,
                Change::Repaired { .. } => counts[3] += 1,
                c => panic!("unexpected {c:?} while waiting for {what}"),
            },
            Update::Lagged(n) => panic!("lagged by {n} while waiting for {what}"),
        }
    }
    counts
}

fn sorted_key(t: &T) -> Vec<u32> {
    sorted(t.lookup(&1))
}

/// Two nodes that each hold 12 000 objects under key 1 (6 000 of them the same values) meet
/// and join: both hold the union of 18 000, and b's subscriber hears the 6 000 it lacked.
/// Then a writes 20 000 more objects under the key in one `insert_many` while the
/// subscriber watches, deletes one object, and b loses one object behind the protocol's back,
/// which anti-entropy puts back. Each step used to compare every object with every other one
/// of the key (12 000 objects held a table server 38 s); the times are printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bag_key_with_many_objects_costs_linear_time_everywhere() {
    let mut config = NodeConfig::fast_failover();
    config.anti_entropy_interval = Some(Duration::from_millis(200));
    let (a, ha) = node_with("a", "test-cookie", config.clone()).await;
    let (b, hb) = node_with("b", "test-cookie", config).await;
    let opts = || TableOptions::<u32, u32>::bag().subscription_buffer(100_000);
    let ta: T = a.start("t", opts()).await.unwrap();
    let tb: T = b.start("t", opts()).await.unwrap();
    let started = Instant::now();
    ta.insert_many((0..12_000).map(|v| (1, v)).collect())
        .await
        .unwrap();
    tb.insert_many((6_000..18_000).map(|v| (1, v)).collect())
        .await
        .unwrap();
    eprintln!(
        "2 x 12 000 objects under one key stored in {:?}",
        started.elapsed()
    );
    let mut sub = tb.subscribe().await.unwrap();

    // The join: the union of the key on both.
    let started = Instant::now();
    let addrs = vec![a.local_addr(), b.local_addr()];
    ha.set(addrs.clone());
    hb.set(addrs);
    joined(&[&ta, &tb]).await;
    let all: Vec<u32> = (0..18_000).collect();
    eventually(
        Duration::from_secs(60),
        "both hold the 18 000 objects",
        || async { sorted_key(&ta) == all && sorted_key(&tb) == all },
    )
    .await;
    eprintln!(
        "joined with 18 000 objects under one key in {:?}",
        started.elapsed()
    );
    assert_eq!(
        read(&mut sub, 6_000, "the joined objects").await,
        [0, 6_000, 0, 0]
    );

    // One insert_many of 20 000 more, replicated, watched by b's subscriber.
    let started = Instant::now();
    ta.insert_many((18_000..38_000).map(|v| (1, v)).collect())
        .await
        .unwrap();
    eprintln!(
        "20 000 more objects under one key stored and replicated in {:?}",
        started.elapsed()
    );
    assert_eq!(
        read(&mut sub, 20_000, "the new objects").await,
        [20_000, 0, 0, 0]
    );
    // A repeat is no change; a delete_object is one.
    ta.insert_many(vec![(1, 5), (1, 37_999)]).await.unwrap();
    ta.delete_object(&1, &7).await.unwrap();
    assert_eq!(read(&mut sub, 1, "the deleted object").await, [0, 0, 1, 0]);
    let all: Vec<u32> = (0..38_000).filter(|&v| v != 7).collect();
    for t in [&ta, &tb] {
        assert_eq!(sorted_key(t), all);
    }

    // b loses one object behind the protocol's back; anti-entropy puts it back.
    let started = Instant::now();
    tb.testing_remove_local(1, Some(20_000)).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "b holds object 20 000 again",
        || async { tb.lookup(&1).contains(&20_000) },
    )
    .await;
    eprintln!(
        "repaired one object of 37 999 under one key in {:?}",
        started.elapsed()
    );
    assert_eq!(read(&mut sub, 1, "the repair").await, [0, 0, 0, 1]);
    assert_eq!(sorted_key(&tb), all);
    shutdown_all([&a, &b]).await;
}
