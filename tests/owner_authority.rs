//! A record's owner decides what becomes of it: a copy held by a node that missed the owner's
//! later writes (it was connected, but not a member) does not come back in a join
//! (ALGORITHM.md, section 16). Issue 20: an acknowledged delete came back on every replica.

mod common;

use std::time::Duration;

use cets::{Table, TableOptions};
use common::mesh::Mesh;
use common::{eventually, joined_within, sorted};

type T = Table<String, u64>;

/// The wait of every poll here (longer than `common::WAIT`: the partition takes a view check).
const WAIT: Duration = Duration::from_secs(20);

/// a, b and c; the link between b and c is cut, so no partition can hold both, and one of
/// them stays connected to a without being its member, holding a's record. a deletes it
/// (acknowledged). After the heal, the join must not give the deleted record back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_by_the_owner_is_not_undone_by_a_copy_that_missed_it() {
    let mesh = Mesh::start(&["a", "b", "c"]).await;
    let mut t: Vec<T> = Vec::new();
    for n in &mesh.nodes {
        t.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined_within(WAIT, &[&t[0], &t[1], &t[2]]).await;
    let k = "own-a".to_string();
    t[0].insert(k.clone(), 1).await.unwrap();
    assert!(t.iter().all(|t| t.get(&k) == Some(1)));

    mesh.split(&[1], &[2]);
    // b and c lose each other; a keeps its links to both, but can be a member of only one
    // partition. Wait until a node holds a's record while a does not list it.
    let (a, b, c) = (t[0].clone(), t[1].clone(), t[2].clone());
    eventually(WAIT, "a node linked to a but outside a's partition", || {
        let (a, b, c) = (a.clone(), b.clone(), c.clone());
        async move {
            let members = a.nodes();
            members.len() <= 1
                && [("b", &b), ("c", &c)].iter().any(|(n, t)| {
                    !members.iter().any(|m| m == n) && !t.nodes().iter().any(|m| m == "a")
                })
        }
    })
    .await;
    let outside: Vec<&str> = ["b", "c"]
        .into_iter()
        .filter(|n| !a.nodes().iter().any(|m| m == n))
        .collect();
    t[0].delete(&k).await.unwrap();
    assert_eq!(t[0].get(&k), None);
    let stale = [("b", &b), ("c", &c)]
        .iter()
        .filter(|(_, t)| t.get(&k).is_some())
        .count();

    mesh.heal(&[1], &[2]);
    joined_within(WAIT, &[&t[0], &t[1], &t[2]]).await;
    eventually(WAIT, "the members hold the same records", || {
        let t = t.clone();
        async move {
            let v: Vec<Vec<(String, u64)>> = t.iter().map(|t| sorted(t.to_vec())).collect();
            v.windows(2).all(|w| w[0] == w[1])
        }
    })
    .await;
    for (n, t) in ["a", "b", "c"].iter().zip(&t) {
        assert_eq!(
            t.get(&k),
            None,
            "{n} holds a's deleted record after the heal ({outside:?} outside a's partition, {stale} held a stale copy)"
        );
    }
}
