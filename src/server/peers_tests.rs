//! The invariants of `Peers` (see `peers.rs`), without a socket: the connection is a fake and
//! each outbound stream is a bare queue whose receiver the test holds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;
use crate::metrics::TableMetrics;
use crate::outbox::{outbox, OutboxReceiver};

fn node(name: &str) -> NodeId {
    NodeId {
        name: name.to_string(),
        incarnation: 1,
    }
}

#[derive(Clone, Default)]
struct FakeConn {
    id: usize,
    closed: Arc<AtomicBool>,
}

impl Conn for FakeConn {
    fn stable_id(&self) -> usize {
        self.id
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn close_overloaded(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// Peers and the receivers of the streams the test opened (a stream whose receiver is dropped
/// is closed).
struct Fixture {
    peers: Peers<FakeConn>,
    streams: Vec<OutboxReceiver>,
    gens: HashMap<OwnerIdx, u64>,
    writers: HashMap<OwnerIdx, u64>,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            peers: Peers::new(),
            streams: Vec::new(),
            gens: HashMap::new(),
            writers: HashMap::new(),
        }
    }

    /// Links node `key` (named `n<key>`), without a stream.
    fn link(&mut self, key: OwnerIdx) -> FakeConn {
        let conn = FakeConn {
            id: key as usize,
            ..FakeConn::default()
        };
        let name = format!("n{key}");
        let metrics = TableMetrics::new("me", "t").peer(&name);
        let gen = self.peers.add(key, node(&name), conn.clone(), metrics);
        self.gens.insert(key, gen);
        conn
    }

    /// Opens an outbound stream to `key` holding at most `limit` bytes.
    fn stream(&mut self, key: OwnerIdx, limit: usize) {
        let writer = self.peers.next_id();
        let (out, rx) = outbox(limit);
        self.peers.set_writer(key, writer, out, None);
        self.streams.push(rx);
        self.writers.insert(key, writer);
    }

    /// A linked node with a stream both ways.
    fn ready(&mut self, key: OwnerIdx) -> FakeConn {
        let conn = self.link(key);
        self.peers.inbound(key);
        self.stream(key, 1 << 20);
        conn
    }

    fn close(&mut self, key: OwnerIdx, stop: Option<u32>) -> StreamClosed {
        let (gen, writer) = (self.gens[&key], self.writers[&key]);
        self.peers.stream_closed(key, gen, writer, stop, "test")
    }

    fn members(&self) -> Vec<OwnerIdx> {
        self.peers.member_keys().collect()
    }
}

#[test]
fn a_join_makes_members_only_of_links_with_a_stream() {
    let mut f = Fixture::new();
    f.link(1); // no stream
    f.ready(2);
    f.ready(3);
    // 4 has no link.
    f.peers.set_members([1, 2, 3, 4]);
    assert_eq!(f.members(), vec![2, 3]);
    assert!(!f.peers.is_member(1) && !f.peers.is_member(4));
    assert_eq!(f.peers.member_ids(), vec![node("n2"), node("n3")]);
    // A later join replaces the members, it does not add to them.
    f.peers.set_members([3]);
    assert_eq!(f.members(), vec![3]);
}

#[test]
fn a_node_down_ends_its_membership_with_its_link() {
    let mut f = Fixture::new();
    f.ready(1);
    f.ready(2);
    f.peers.set_members([1, 2]);
    f.peers.lasting(1, 7);
    assert!(f.peers.add_refusal(1, 5));
    let d = f.peers.remove(1);
    assert_eq!(
        d,
        Departure {
            was_link: true,
            was_member: true,
            lasting: 7,
            refusals: 5
        }
    );
    assert!(!f.peers.is_linked(1) && !f.peers.is_member(1));
    assert_eq!(f.members(), vec![2]);
    // Gone twice: nothing left.
    assert_eq!(f.peers.remove(1), Departure::default());
    // A refusal by a gone owner is the caller's to note.
    assert!(!f.peers.add_refusal(1, 5));
}

#[test]
fn a_closed_stream_ends_membership_and_still_counts_at_node_down() {
    let mut f = Fixture::new();
    f.ready(1);
    f.ready(2);
    f.peers.set_members([1, 2]);
    assert_eq!(f.close(1, None), StreamClosed::Closed { dropped: true });
    assert_eq!(f.members(), vec![2]);
    assert!(f.peers.is_linked(1) && !f.peers.has_stream(1));
    // No stream, no membership: a join leaves it out until a new stream opens.
    f.peers.set_members([1, 2]);
    assert_eq!(f.members(), vec![2]);
    assert_eq!(f.peers.without_stream(), vec![1]);
    // The node-down that follows counts it a member.
    assert!(f.peers.remove(1).was_member);
    // The close of a non-member's stream drops nothing.
    f.peers.set_members([]);
    assert_eq!(f.close(2, None), StreamClosed::Closed { dropped: false });
    assert!(!f.peers.remove(2).was_member);
}

#[test]
fn what_an_old_link_or_a_replaced_stream_reports_changes_nothing() {
    let mut f = Fixture::new();
    f.ready(1);
    let (old_gen, old_writer) = (f.gens[&1], f.writers[&1]);
    // The stream is replaced: the close of the old one is stale.
    f.stream(1, 1 << 20);
    f.peers.set_members([1]);
    assert_ne!(f.writers[&1], old_writer);
    assert_eq!(
        f.peers.stream_closed(1, old_gen, old_writer, None, "late"),
        StreamClosed::Stale
    );
    // The node reconnects under the same key: the old link's reports are stale.
    f.peers.remove(1);
    f.ready(1);
    f.peers.set_members([1]);
    assert!(!f.peers.is_current(1, old_gen));
    assert!(f.peers.is_current(1, f.gens[&1]));
    assert_eq!(
        f.peers
            .stream_closed(1, old_gen, f.writers[&1], None, "late"),
        StreamClosed::Stale
    );
    assert!(f.peers.is_member(1) && f.peers.has_stream(1));
    // Generations and writer ids are never reused.
    let mut ids = vec![old_gen, old_writer, f.gens[&1], f.writers[&1]];
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4);
}

#[test]
fn a_stop_from_before_the_peer_ran_the_table_asks_for_a_new_stream() {
    let mut f = Fixture::new();
    f.link(1);
    f.stream(1, 1 << 20); // opened before the peer's stream arrived
    f.peers.inbound(1);
    assert_eq!(f.close(1, Some(stop::UNKNOWN_TABLE)), StreamClosed::Reopen);
    assert!(!f.peers.get(1).is_some_and(|l| l.lacks_table()));
    // Opened after the peer's stream arrived: the peer means it.
    f.stream(1, 1 << 20);
    assert_eq!(
        f.close(1, Some(stop::UNKNOWN_TABLE)),
        StreamClosed::Closed { dropped: false }
    );
    assert!(f.peers.get(1).is_some_and(|l| l.lacks_table()));
    assert!(f.peers.without_stream().is_empty());
    // Its stream arriving again says it runs the table now.
    f.peers.inbound(1);
    assert_eq!(f.peers.without_stream(), vec![1]);
}

#[test]
fn an_incompatible_stop_refuses_the_link() {
    let mut f = Fixture::new();
    f.ready(1);
    f.close(1, Some(stop::INCOMPATIBLE));
    let l = f.peers.get(1).expect("linked");
    assert!(l.refused().is_some() && !l.ready());
    assert!(f.peers.without_stream().is_empty());
}

#[test]
fn missed_writes_are_cleared_only_by_a_join_that_makes_the_link_a_member() {
    let mut f = Fixture::new();
    f.ready(1);
    f.ready(2);
    f.ready(3);
    let missed = |f: &Fixture| -> Vec<OwnerIdx> {
        let mut v: Vec<OwnerIdx> = f
            .peers
            .links()
            .filter(|(_, l)| l.missed())
            .map(|(k, _)| k)
            .collect();
        v.sort_unstable();
        v
    };
    assert_eq!(missed(&f), vec![1, 2, 3], "a new link has missed writes");
    f.peers.set_members([1, 2]);
    assert_eq!(missed(&f), vec![3]);
    // A batch that reached 1 only: 2 missed it.
    f.peers.note_missed(&[1]);
    assert_eq!(missed(&f), vec![2, 3]);
    f.peers.set_members([1, 2, 3]);
    assert_eq!(missed(&f), Vec::<OwnerIdx>::new());
    // Writes from a non-member.
    f.peers.drop_member(3);
    f.peers.heard_from_outsider(3);
    assert_eq!(missed(&f), vec![3]);
    // A node without the table, or that refused it, misses nothing of it.
    f.peers.set_members([1, 2, 3]);
    f.close(2, Some(stop::UNKNOWN_TABLE));
    f.close(3, Some(stop::INCOMPATIBLE));
    f.peers.note_missed(&[]);
    assert_eq!(missed(&f), vec![1]);
}

#[test]
fn acks_and_clocks_never_go_back() {
    let mut f = Fixture::new();
    f.ready(1);
    f.ready(2);
    f.peers.set_members([1, 2]);
    f.peers.acked(1, 5, 100);
    f.peers.acked(1, 3, 90); // reordered
    f.peers.ticked(1, 80, 9);
    f.peers.heard_clock(1, 70);
    let l = f.peers.get(1).expect("linked");
    assert_eq!((l.acked(), l.watermark(), l.view()), (5, 100, Some(9)));
    assert!(f.peers.acked_or_gone(1, 5) && !f.peers.acked_or_gone(1, 6));
    assert_eq!(f.peers.behind(&[1, 2, 9], 5), vec![2]);
    // A non-member, or an unlinked node, holds up no batch.
    assert!(!f.peers.acked_or_gone(2, 1));
    f.peers.drop_member(2);
    assert!(f.peers.acked_or_gone(2, 1) && f.peers.acked_or_gone(9, 1));
}

#[test]
fn watermarks_are_taken_over_the_members_only() {
    let mut f = Fixture::new();
    assert_eq!(f.peers.min_member_watermark(), u64::MAX);
    f.ready(1);
    f.ready(2);
    f.ready(3);
    f.peers.heard_clock(1, 10);
    f.peers.heard_clock(2, 20);
    f.peers.heard_clock(3, 5);
    f.peers.set_members([1, 2]);
    assert_eq!(f.peers.min_member_watermark(), 10);
    assert_eq!(f.peers.max_member_watermark(0), 20);
    assert_eq!(f.peers.max_member_watermark(30), 30);
}

#[test]
fn a_member_whose_view_differs_past_the_grace_is_split_off() {
    let mut f = Fixture::new();
    f.ready(1);
    f.ready(2);
    f.peers.set_members([1, 2]);
    let grace = Duration::from_secs(2);
    let t0 = Instant::now();
    f.peers.ticked(1, 1, 7); // agrees
    f.peers.ticked(2, 1, 8); // differs
    assert!(f.peers.split_disagreeing(7, t0, grace).is_empty());
    // Agreeing again in between resets its grace.
    f.peers.ticked(2, 1, 7);
    assert!(f.peers.split_disagreeing(7, t0 + grace, grace).is_empty());
    f.peers.ticked(2, 1, 8);
    let t1 = t0 + grace;
    assert!(f.peers.split_disagreeing(7, t1, grace).is_empty());
    let split = f.peers.split_disagreeing(7, t1 + grace * 2, grace);
    assert_eq!(split, vec![2]);
    assert_eq!(f.members(), vec![1]);
    assert_eq!(f.peers.get(2).and_then(Link::view), None);
    // A join clears what is left of a disagreement.
    f.peers.ticked(1, 1, 8);
    assert!(f.peers.split_disagreeing(7, t1, grace).is_empty());
    f.peers.set_members([1, 2]);
    assert!(f
        .peers
        .split_disagreeing(7, t1 + grace / 2, grace)
        .is_empty());
}

#[test]
fn a_member_whose_queue_overflows_is_not_waited_for_and_its_connection_closes() {
    let mut f = Fixture::new();
    f.ready(1);
    let small = f.link(2);
    f.peers.inbound(2);
    f.stream(2, 10);
    f.peers.set_members([1, 2]);
    let frame = Bytes::from_static(&[0; 8]);
    assert_eq!(f.peers.queue_to_members(&frame), vec![1, 2]);
    assert!(!small.is_closed());
    assert_eq!(f.peers.queue_to_members(&frame), vec![1]);
    assert!(small.is_closed(), "the overflow closes the connection");
    assert!(!f.peers.get(2).is_some_and(Link::open));
    assert!(f.peers.get(1).is_some_and(Link::open));
}

#[test]
fn links_are_found_by_node_name_and_connection() {
    let mut f = Fixture::new();
    let conn = f.ready(1);
    f.ready(2);
    assert_eq!(f.peers.key_of(&node("n1")), Some(1));
    assert_eq!(f.peers.key_named("n2"), Some(2));
    assert_eq!(f.peers.named("n1"), vec![node("n1")]);
    assert!(f.peers.has_conn(1, &conn) && !f.peers.has_conn(2, &conn));
    let mut keys = f.peers.keys();
    keys.sort_unstable();
    assert_eq!(keys, vec![1, 2]);
}
