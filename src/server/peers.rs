//! The peers of a table server: one link per connected node that may run the table, and the
//! members among them (the nodes this table replicates its writes to and applies theirs from).
//!
//! [`Peers`] owns both, and keeps these invariants between them, each checked by a unit test
//! below (no socket: the connection is a [`Conn`], faked in the tests):
//!
//! 1. **Every member has a link.** A join makes members only of linked nodes
//!    ([`Peers::set_members`]), and the removal of a link ([`Peers::remove`], the node went
//!    down) ends its membership with it.
//! 2. **Every member's link has an outbound table stream** (`Link::out`), so a batch queued to
//!    every member reaches each one's queue. A join makes members only of links with a stream,
//!    and the close of a member's stream ([`Peers::stream_closed`]) ends its membership and
//!    marks the link `member_until_closed`, so that the node-down that usually follows still
//!    counts it a member ([`Departure::was_member`]). The one exception lasts within one
//!    event: a stream stopped before the peer ran the table is replaced at once
//!    ([`StreamClosed::Reopen`]).
//! 3. **What old tasks report is told apart.** Link generations and writer ids come from one
//!    counter ([`Peers::next_id`]) and are never reused: a report tagged with another
//!    generation than the key's current link ([`Peers::is_current`]), or with another writer
//!    than the link's current one, changes nothing.
//! 4. **`missed` says whether a join must check a pair's copies.** A new link has missed
//!    writes (nothing says which of its writes reached this node before); writes sent to some
//!    members only, or received from a non-member, mark the others ([`Peers::note_missed`],
//!    [`Peers::heard_from_outsider`]); only a join that makes the link a member clears it.
//! 5. **A link's `acked` and `watermark` never go back**: acks and clocks are cumulative, and
//!    a late or reordered one cannot undo a later one. A batch is complete for a peer once it
//!    acknowledged it or is no member any more ([`Peers::acked_or_gone`]).
//!
//! The tasks behind a link's streams (reader, writer, bulk lane) are in `links.rs`.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::VarInt;

use crate::membership::{NodeId, OwnerIdx};
use crate::metrics::PeerMetrics;
use crate::outbox::{Outbox, Refused};
use crate::proto::{close, stop};

use super::links::BulkLane;

/// What the peers need of a connection: real ones are QUIC connections, the unit tests' are
/// fakes, so the invariants are tested without a socket.
pub(super) trait Conn: Clone {
    /// The connection's identity (a reconnect of the same node has another).
    fn stable_id(&self) -> usize;
    /// Whether the connection is closed (or closing).
    fn is_closed(&self) -> bool;
    /// Closes the connection because its queue overflowed (`close::OVERLOAD`).
    fn close_overloaded(&self);
}

impl Conn for quinn::Connection {
    fn stable_id(&self) -> usize {
        quinn::Connection::stable_id(self)
    }

    fn is_closed(&self) -> bool {
        self.close_reason().is_some()
    }

    fn close_overloaded(&self) {
        self.close(VarInt::from_u32(close::OVERLOAD), b"outbound queue full");
    }
}

/// One peer node that is connected (and may run this table).
pub(super) struct Link<C = quinn::Connection> {
    /// Unique among this table server's links, ever: tags what the link's tasks report.
    gen: u64,
    id: NodeId,
    conn: C,
    out: Option<Outbox>,
    /// The bulk lane of `out` (`links::BulkLane`): join requests and dump chunks, encoded and
    /// queued by a task of their own as the queue drains.
    bulk: Option<BulkLane>,
    /// The id of the writer task behind `out` (from the same counter as `gen`).
    writer: u64,
    /// Whether the peer's stream had arrived when that writer opened our stream: if not, a
    /// stop of it ("no such table") may predate the peer's table and says nothing about now.
    writer_after_inbound: bool,
    /// The peer opened its stream of this table to us (so it runs a compatible table).
    inbound: bool,
    /// The peer told us it runs no table of this name.
    lacks_table: bool,
    refused: Option<String>,
    acked: u64,
    watermark: u64,
    /// The peer's last announced view (hash of its epoch and member list).
    view: Option<u64>,
    disagree_since: Option<Instant>,
    /// The member was removed because this link's table stream closed: its node still counts
    /// as a member for `Server::peer_down` when the `PeerDown` that follows arrives.
    member_until_closed: bool,
    /// The `seq` of the last batch from this member whose writes may outlive it
    /// (`Server::apply`). When it goes down, members that applied different batches of it
    /// differ in more than its records: each mixes this into its epoch (`peer_down`), so those
    /// differ in view too, and the view check has them merge again (ALGORITHM.md, section 8).
    lasting: u64,
    /// The sum of the marks of the writes of other nodes that a record or tombstone of this
    /// member refused here (`Server::note_refusals`); mixed into the epoch with `lasting`.
    refusals: u64,
    /// The link's metric handles (queue bytes, replication lag).
    metrics: PeerMetrics,
    /// Writes of one of us did not reach the other since the last join that made us members:
    /// ours went out while it was no member (or its queue refused them), or its came while it
    /// was none here (acknowledged, not applied). Its copies of our records, or ours of its,
    /// may miss a delete or an overwrite, and the next join checks them against the owner's
    /// side (`crate::authority`; reported in `JoinRep::Paused`).
    missed: bool,
}

impl<C: Conn> Link<C> {
    /// The link's generation (`Peers::is_current`).
    pub(super) fn gen(&self) -> u64 {
        self.gen
    }

    /// The peer's node.
    pub(super) fn id(&self) -> &NodeId {
        &self.id
    }

    /// The connection to the peer.
    pub(super) fn conn(&self) -> &C {
        &self.conn
    }

    /// The queue of the outbound table stream, if one is open.
    pub(super) fn out(&self) -> Option<&Outbox> {
        self.out.as_ref()
    }

    /// The bulk lane of the outbound stream, if one is open.
    pub(super) fn bulk(&self) -> Option<&BulkLane> {
        self.bulk.as_ref()
    }

    /// The last batch the peer acknowledged.
    pub(super) fn acked(&self) -> u64 {
        self.acked
    }

    /// The peer's clock, as last seen on its ordered stream.
    #[cfg(test)]
    pub(super) fn watermark(&self) -> u64 {
        self.watermark
    }

    /// The peer's last announced view.
    pub(super) fn view(&self) -> Option<u64> {
        self.view
    }

    /// The peer told us it runs no table of this name.
    pub(super) fn lacks_table(&self) -> bool {
        self.lacks_table
    }

    /// Why the table was refused on this link, if it was.
    pub(super) fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Writes of one side did not reach the other since the last join (invariant 4).
    pub(super) fn missed(&self) -> bool {
        self.missed
    }

    /// The link's metric handles.
    pub(super) fn metrics(&self) -> &PeerMetrics {
        &self.metrics
    }

    /// Both streams are up and neither side refused the table: the peer can join.
    pub(super) fn ready(&self) -> bool {
        self.out.is_some() && self.inbound && self.refused.is_none()
    }

    /// Whether frames queued now can still reach the peer.
    pub(super) fn open(&self) -> bool {
        self.out.as_ref().is_some_and(|o| !o.is_closed())
    }

    /// Queues a frame on the link's table stream; false if it was not queued. The first frame
    /// that would overflow the queue closes the connection to the peer: it has not read its
    /// stream for too long, and the node-down that follows is how the table forgets it.
    pub(super) fn queue(&self, frame: Bytes) -> bool {
        let Some(out) = &self.out else {
            return false;
        };
        match out.send(frame) {
            Ok(()) => true,
            Err(Refused::Overflow { queued }) => {
                tracing::warn!(
                    peer = %self.id,
                    queued,
                    "outbound queue full (NodeConfig::max_link_queue_bytes): the peer does not read its table stream; closing the connection"
                );
                self.conn.close_overloaded();
                false
            }
            Err(Refused::Closed) => false,
        }
    }
}

/// What the close of a link's outbound stream did (`Peers::stream_closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamClosed {
    /// Reported by an old link or a replaced stream: nothing changed.
    Stale,
    /// The peer stopped a stream opened before its own arrived, so before it ran the table; it
    /// runs it now: the caller opens another stream at once.
    Reopen,
    /// The stream is gone; `dropped`: its node was a member, and is none any more.
    Closed { dropped: bool },
}

/// What a link's removal leaves to its node's departure (`Peers::remove`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Departure {
    /// The node had a link.
    pub was_link: bool,
    /// The node was a member, or was one until its stream closed just before.
    pub was_member: bool,
    /// `Link::lasting`.
    pub lasting: u64,
    /// `Link::refusals`.
    pub refusals: u64,
}

/// The links to the connected peers and the members among them (see the module's invariants).
pub(super) struct Peers<C = quinn::Connection> {
    links: HashMap<OwnerIdx, Link<C>>,
    members: BTreeSet<OwnerIdx>,
    /// The next link generation or writer id.
    next_id: u64,
}

impl<C: Conn> Peers<C> {
    pub(super) fn new() -> Self {
        Peers {
            links: HashMap::new(),
            members: BTreeSet::new(),
            next_id: 0,
        }
    }

    /// A fresh link generation or writer id (invariant 3).
    pub(super) fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // Links.

    /// The link of `key`, if its node is connected.
    pub(super) fn get(&self, key: OwnerIdx) -> Option<&Link<C>> {
        self.links.get(&key)
    }

    /// Whether `key`'s node is linked.
    pub(super) fn is_linked(&self, key: OwnerIdx) -> bool {
        self.links.contains_key(&key)
    }

    /// Whether `gen` is the generation of `key`'s current link.
    pub(super) fn is_current(&self, key: OwnerIdx, gen: u64) -> bool {
        self.links.get(&key).is_some_and(|l| l.gen == gen)
    }

    /// Every link, in no particular order.
    pub(super) fn links(&self) -> impl Iterator<Item = (OwnerIdx, &Link<C>)> {
        self.links.iter().map(|(k, l)| (*k, l))
    }

    /// The keys of every link.
    pub(super) fn keys(&self) -> Vec<OwnerIdx> {
        self.links.keys().copied().collect()
    }

    /// The key of the link to `id` (that very incarnation).
    pub(super) fn key_of(&self, id: &NodeId) -> Option<OwnerIdx> {
        self.links
            .iter()
            .find(|(_, l)| l.id == *id)
            .map(|(k, _)| *k)
    }

    /// The key of the link to a node of this name (any incarnation).
    #[cfg(any(test, feature = "testing"))]
    pub(super) fn key_named(&self, name: &str) -> Option<OwnerIdx> {
        self.links
            .iter()
            .find(|(_, l)| l.id.name == name)
            .map(|(k, _)| *k)
    }

    /// The node of `key`'s link.
    pub(super) fn id_of(&self, key: OwnerIdx) -> Option<&NodeId> {
        self.links.get(&key).map(|l| &l.id)
    }

    /// The nodes linked under this name: a node has one name, so all but one incarnation or
    /// connection of it are gone.
    pub(super) fn named(&self, name: &str) -> Vec<NodeId> {
        self.links
            .values()
            .filter(|l| l.id.name == name)
            .map(|l| l.id.clone())
            .collect()
    }

    /// Whether `key`'s link is over this very connection.
    pub(super) fn has_conn(&self, key: OwnerIdx, conn: &C) -> bool {
        self.links
            .get(&key)
            .is_some_and(|l| l.conn.stable_id() == conn.stable_id())
    }

    /// Links a connected node, with no stream yet and no membership; returns its generation.
    /// A new link has missed writes (invariant 4): nothing says which of its writes reached
    /// this node (or ours it) before, so a join checks its copies (ALGORITHM.md, section 16).
    pub(super) fn add(&mut self, key: OwnerIdx, id: NodeId, conn: C, metrics: PeerMetrics) -> u64 {
        let gen = self.next_id();
        self.links.insert(
            key,
            Link {
                gen,
                id,
                conn,
                out: None,
                bulk: None,
                writer: 0,
                writer_after_inbound: false,
                inbound: false,
                lacks_table: false,
                refused: None,
                acked: 0,
                watermark: 0,
                view: None,
                disagree_since: None,
                member_until_closed: false,
                lasting: 0,
                refusals: 0,
                metrics,
                missed: true,
            },
        );
        gen
    }

    /// Gives `key`'s link a new outbound stream, written by the task `writer` (an id from
    /// `next_id`), in place of its old one.
    pub(super) fn set_writer(
        &mut self,
        key: OwnerIdx,
        writer: u64,
        out: Outbox,
        bulk: Option<BulkLane>,
    ) {
        if let Some(l) = self.links.get_mut(&key) {
            l.writer = writer;
            l.writer_after_inbound = l.inbound;
            l.bulk = bulk;
            l.out = Some(out);
        }
    }

    /// The peer's stream of this table arrived: it runs the table.
    pub(super) fn inbound(&mut self, key: OwnerIdx) {
        if let Some(l) = self.links.get_mut(&key) {
            l.inbound = true;
            l.lacks_table = false;
        }
    }

    /// The node refused our table (`TableEvent::Refused`).
    pub(super) fn refuse(&mut self, key: OwnerIdx, reason: String) {
        if let Some(l) = self.links.get_mut(&key) {
            l.refused = Some(reason);
        }
    }

    /// The outbound stream `writer` of the link `gen` of `key` closed, stopped by the peer
    /// with `stop_code` if it was (invariants 2 and 3).
    pub(super) fn stream_closed(
        &mut self,
        key: OwnerIdx,
        gen: u64,
        writer: u64,
        stop_code: Option<u32>,
        reason: &str,
    ) -> StreamClosed {
        let Some(link) = self.links.get_mut(&key).filter(|l| l.gen == gen) else {
            return StreamClosed::Stale;
        };
        if link.writer != writer {
            // An older stream of this link, already replaced.
            return StreamClosed::Stale;
        }
        link.out = None;
        link.bulk = None;
        if stop_code == Some(stop::UNKNOWN_TABLE) && link.inbound && !link.writer_after_inbound {
            // Handled late, behind the peer's new stream, this stop would otherwise leave the
            // link without an outbound stream for good.
            tracing::debug!(peer = %link.id, "stream stopped before the peer ran the table; opening another");
            return StreamClosed::Reopen;
        }
        match stop_code {
            Some(stop::UNKNOWN_TABLE) => {
                tracing::debug!(peer = %link.id, "peer runs no such table");
                link.lacks_table = true;
            }
            Some(stop::INCOMPATIBLE) => {
                tracing::error!(peer = %link.id, "peer refused our table as incompatible");
                link.refused =
                    Some("refused by the peer: kind, types or expire_after differ".into());
            }
            _ => {
                if !link.conn.is_closed() {
                    tracing::warn!(peer = %link.id, %reason, "table stream failed");
                }
            }
        }
        let dropped = self.members.remove(&key);
        if dropped {
            tracing::debug!(peer = %link.id, "member removed: its table stream closed");
            link.member_until_closed = true;
        }
        StreamClosed::Closed { dropped }
    }

    /// Removes `key`'s link and membership: its node went down (invariant 1).
    pub(super) fn remove(&mut self, key: OwnerIdx) -> Departure {
        let link = self.links.remove(&key);
        if let Some(l) = &link {
            l.metrics.clear();
        }
        let member = self.members.remove(&key);
        match link {
            None => Departure {
                was_member: member,
                ..Departure::default()
            },
            Some(l) => Departure {
                was_link: true,
                // A member whose table stream closed just before (the writer task reported
                // the lost connection before the node's `PeerDown` got here) was a member all
                // the same.
                was_member: member | l.member_until_closed,
                lasting: l.lasting,
                refusals: l.refusals,
            },
        }
    }

    /// The links to reopen a stream on: the peer runs the table (its stream to us arrived),
    /// we have none to it, and the connection lives. The link is otherwise useless until the
    /// connection ends, and nothing else would repair it.
    pub(super) fn without_stream(&self) -> Vec<OwnerIdx> {
        self.links
            .iter()
            .filter(|(_, l)| {
                l.out.is_none()
                    && l.inbound
                    && !l.lacks_table
                    && l.refused.is_none()
                    && !l.conn.is_closed()
            })
            .map(|(k, _)| *k)
            .collect()
    }

    // Members.

    /// Whether `key` is a member.
    pub(super) fn is_member(&self, key: OwnerIdx) -> bool {
        self.members.contains(&key)
    }

    /// Whether the table has members besides this node.
    pub(super) fn has_members(&self) -> bool {
        !self.members.is_empty()
    }

    /// The members' keys, in order.
    #[cfg(test)]
    pub(super) fn member_keys(&self) -> impl Iterator<Item = OwnerIdx> + '_ {
        self.members.iter().copied()
    }

    /// The members with their links, in key order.
    pub(super) fn member_links(&self) -> impl Iterator<Item = (OwnerIdx, &Link<C>)> {
        self.members
            .iter()
            .filter_map(|k| self.links.get(k).map(|l| (*k, l)))
    }

    /// The members' nodes, sorted.
    pub(super) fn member_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.member_links().map(|(_, l)| l.id.clone()).collect();
        ids.sort();
        ids
    }

    /// Makes exactly `keys` the members, as a join decided, with the join's epoch: a key with
    /// no link or no stream is left out (invariants 1 and 2). The join checked the copies of
    /// every pair that missed writes (invariant 4); the members' views are compared afresh.
    pub(super) fn set_members(&mut self, keys: impl IntoIterator<Item = OwnerIdx>) {
        let links = &self.links;
        self.members = keys
            .into_iter()
            .filter(|k| links.get(k).is_some_and(|l| l.out.is_some()))
            .collect();
        for k in &self.members {
            if let Some(l) = self.links.get_mut(k) {
                l.missed = false;
            }
        }
        for l in self.links.values_mut() {
            l.disagree_since = None;
        }
    }

    /// Whether `key`'s link has an outbound stream (so a join can make it a member).
    pub(super) fn has_stream(&self, key: OwnerIdx) -> bool {
        self.links.get(&key).is_some_and(|l| l.out.is_some())
    }

    /// Ends `key`'s membership; whether it was a member.
    pub(super) fn drop_member(&mut self, key: OwnerIdx) -> bool {
        self.members.remove(&key)
    }

    /// The members whose announced view has differed from `view` for longer than `grace`,
    /// removed from the members (their views are forgotten). A member announcing our view
    /// again is agreeing again.
    pub(super) fn split_disagreeing(
        &mut self,
        view: u64,
        now: Instant,
        grace: Duration,
    ) -> Vec<OwnerIdx> {
        let mut split = Vec::new();
        for k in &self.members {
            let Some(l) = self.links.get_mut(k) else {
                continue;
            };
            match l.view {
                Some(v) if v != view => {
                    let since = *l.disagree_since.get_or_insert(now);
                    if now.duration_since(since) > grace {
                        split.push(*k);
                    }
                }
                _ => l.disagree_since = None,
            }
        }
        for k in &split {
            if let Some(l) = self.links.get_mut(k) {
                tracing::warn!(peer = %l.id, "member lists disagree (half-finished join); leaving it to a new join");
                l.disagree_since = None;
                l.view = None;
            }
            self.members.remove(k);
        }
        split
    }

    // What the peers said.

    /// The peer's clock, seen on its ordered stream (invariant 5).
    pub(super) fn heard_clock(&mut self, key: OwnerIdx, clock: u64) {
        if let Some(l) = self.links.get_mut(&key) {
            l.watermark = l.watermark.max(clock);
        }
    }

    /// The peer acknowledged every batch up to `seq`, at its `clock` (invariant 5).
    pub(super) fn acked(&mut self, key: OwnerIdx, seq: u64, clock: u64) {
        if let Some(l) = self.links.get_mut(&key) {
            l.acked = l.acked.max(seq);
            l.watermark = l.watermark.max(clock);
        }
    }

    /// The peer announced its clock and view.
    pub(super) fn ticked(&mut self, key: OwnerIdx, clock: u64, view: u64) {
        if let Some(l) = self.links.get_mut(&key) {
            l.watermark = l.watermark.max(clock);
            l.view = Some(view);
        }
    }

    /// The member's batch `seq` had a lasting effect here (`Link::lasting`).
    pub(super) fn lasting(&mut self, key: OwnerIdx, seq: u64) {
        if let Some(l) = self.links.get_mut(&key) {
            l.lasting = seq;
        }
    }

    /// A write of another node that a record or tombstone of `owner` refused here, by its mark;
    /// false if `owner` has no link (it is gone: the caller marks the epoch itself).
    pub(super) fn add_refusal(&mut self, owner: OwnerIdx, mark: u64) -> bool {
        match self.links.get_mut(&owner) {
            Some(l) => {
                l.refusals = l.refusals.wrapping_add(mark);
                true
            }
            None => false,
        }
    }

    /// Writes came from `key` while it was no member: acknowledged, not applied (invariant 4).
    pub(super) fn heard_from_outsider(&mut self, key: OwnerIdx) {
        if let Some(l) = self.links.get_mut(&key) {
            l.missed = true;
        }
    }

    /// A batch of our writes went to the members in `sent` only: every other linked node that
    /// runs the table missed it (invariant 4).
    pub(super) fn note_missed(&mut self, sent: &[OwnerIdx]) {
        for (k, l) in self.links.iter_mut() {
            if !sent.contains(k) && !l.lacks_table && l.refused.is_none() {
                l.missed = true;
            }
        }
    }

    // Derived.

    /// Whether batch `seq` needs no more of `key`: it acknowledged it, or it is no member or
    /// no link any more (invariant 5).
    pub(super) fn acked_or_gone(&self, key: OwnerIdx, seq: u64) -> bool {
        match self.links.get(&key) {
            Some(l) => l.acked >= seq || !self.members.contains(&key),
            None => true,
        }
    }

    /// Those of `keys` that are linked and have not acknowledged batch `seq`.
    pub(super) fn behind(&self, keys: &[OwnerIdx], seq: u64) -> Vec<OwnerIdx> {
        keys.iter()
            .copied()
            .filter(|k| self.links.get(k).is_some_and(|l| l.acked < seq))
            .collect()
    }

    /// The oldest clock among the members' (`u64::MAX` with no member).
    pub(super) fn min_member_watermark(&self) -> u64 {
        self.member_links()
            .map(|(_, l)| l.watermark)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The newest clock among the members' and `floor`.
    pub(super) fn max_member_watermark(&self, floor: u64) -> u64 {
        self.member_links()
            .map(|(_, l)| l.watermark)
            .fold(floor, u64::max)
    }

    // Sending.

    /// Queues `frame` to every member; returns those whose queue took it.
    pub(super) fn queue_to_members(&self, frame: &Bytes) -> Vec<OwnerIdx> {
        let mut sent = Vec::with_capacity(self.members.len());
        for (k, l) in self.member_links() {
            if l.queue(frame.clone()) {
                sent.push(k);
            }
        }
        sent
    }

    /// Queues `frame` to every ready link, member or not.
    pub(super) fn queue_to_ready(&self, frame: &Bytes) {
        for l in self.links.values().filter(|l| l.ready()) {
            l.queue(frame.clone());
        }
    }
}

#[cfg(test)]
#[path = "peers_tests.rs"]
mod tests;
