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

/// Waits until `t` lists exactly `want` as its members.
async fn members_are(t: &T, want: &[&str], what: &str) {
    let t = t.clone();
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(WAIT, what, || {
        let (t, want) = (t.clone(), want.clone());
        async move { sorted(t.nodes()) == want }
    })
    .await;
}

/// The compound case of ALGORITHM.md section 16 ("What it does not cover"): N (b) holds a
/// stale copy of O's (a's) record, which O deleted while N was linked but no member; R (c)
/// had the delete. R leaves O's partition without either writing, and N and R join each
/// other, carrying O (both linked to it, neither marks it): R takes N's stale copy. Then N goes
/// down before it joins O, and R joins O. Before section 22, nothing marked anything between
/// R and O, so R's copy came back to O, d and c (identical everywhere, so anti-entropy cannot
/// see it: an acknowledged delete undone; 3 of 3 runs). Now R marks O when the join with N
/// changes O's records on R, and O's side decides at their join.
///
/// d anchors O's partition: cut from N and R, it keeps O out of their join. Delays on O's
/// links to N and R make O's joins with them slower than its join with d, so the partitions
/// fall as described every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compound_case_a_stale_copy_spread_by_a_node_that_goes_down() {
    let mesh = Mesh::start(&["a", "b", "c", "d"]).await;
    let mut t: Vec<T> = Vec::new();
    for n in &mesh.nodes {
        t.push(n.start("t", TableOptions::set()).await.unwrap());
    }
    joined_within(WAIT, &[&t[0], &t[1], &t[2], &t[3]]).await;
    let k = "own-a".to_string();
    t[0].insert(k.clone(), 1).await.unwrap();
    assert!(t.iter().all(|t| t.get(&k) == Some(1)));
    let slow = Duration::from_millis(200);

    // N = b is cut from c and d, and a reaches it slowly: a's partition is {a, c, d}.
    mesh.relays[&(0, 1)].set_delay(slow, Duration::ZERO);
    mesh.split(&[1], &[2, 3]);
    members_are(&t[0], &["c", "d"], "a with c and d").await;
    members_are(&t[1], &[], "b alone").await;
    // a deletes its record; b, linked to a but no member, misses it.
    t[0].delete(&k).await.unwrap();
    assert_eq!(t[1].get(&k), Some(1), "b holds the stale copy");
    assert!([&t[0], &t[2], &t[3]].iter().all(|t| t.get(&k).is_none()));

    // R = c leaves a's partition (cut from d; a reaches it slowly, so a joins d again first).
    mesh.relays[&(0, 2)].set_delay(slow, Duration::ZERO);
    mesh.split(&[2], &[3]);
    members_are(&t[0], &["d"], "a with d only").await;
    members_are(&t[2], &[], "c alone").await;
    // b and c can reach each other again: they join, carrying a.
    mesh.heal(&[1], &[2]);
    members_are(&t[1], &["c"], "b with c").await;
    members_are(&t[2], &["b"], "c with b").await;
    let spread = t[2].get(&k);
    eprintln!("after b's join with c, c holds a's deleted record: {spread:?}");

    // N goes down before it joins a; then c joins a and d.
    mesh.nodes[1].shutdown().await.unwrap();
    mesh.relays[&(0, 2)].set_delay(Duration::ZERO, Duration::ZERO);
    mesh.heal(&[2], &[3]);
    members_are(&t[0], &["c", "d"], "a with c and d again").await;
    let all = [&t[0], &t[2], &t[3]];
    eventually(WAIT, "a, c and d hold the same records", || async {
        let v: Vec<Vec<(String, u64)>> = all.iter().map(|t| sorted(t.to_vec())).collect();
        v.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    for (n, t) in ["a", "c", "d"].iter().zip(all) {
        assert_eq!(
            t.get(&k),
            None,
            "{n} holds a's deleted record (c held it after its join with b: {spread:?})"
        );
    }
}
