//! The table server: one task per table per node, the only writer of the table's local store.
//!
//! Everything that changes the table goes through here, in one order:
//! - client writes (group commit: whatever is queued becomes one frame, see [`Server::on_writes`]),
//! - replicated batches from peers ([`Server::on_peer_msg`]),
//! - join requests of a coordinator (pause, dump, apply, unpause),
//! - node events (peer up, peer down, streams).
//!
//! Replication: a batch is applied locally, encoded once, and the same bytes are queued to every
//! member's table stream. The callers wait until every member that was sent the batch has
//! acknowledged it (cumulative `Ack{seq}`) or has gone down.
//!
//! Convergence: set and ordered_set records carry a hybrid-logical-clock timestamp and owner; a
//! replicated write is applied only if it is newer than what is stored (or than the key's
//! tombstone), so concurrent writes to one key end the same on every node. Tombstones are
//! forgotten once every member's clock, as seen on its ordered stream, has passed them.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::VarInt;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::config::{deadline_after, NodeConfig};
use crate::hlc::HybridClock;
use crate::join::{self, JoinCtx};
use crate::membership::{NodeId, OwnerIdx, Owners};
use crate::outbox::{outbox, Outbox, Refused};
use crate::proto::{
    close, stop, Chunker, JoinRep, JoinReq, Op, OpKind, PeerMsg, StreamHeader, WireRecord,
};
use crate::registry::{PeerConn, TableEvent};
use crate::repeats::Repeats;
use crate::status::TableStatus;
use crate::store::{same_value, value_order, Rec};
use crate::table::{Key, Shared, TableKind, TableOptions, Value};
use crate::tombstones::{Tombstone, TombstoneRef, Tombstones};
use crate::transport::frame::{self, FrameReader};
use crate::{Error, Result};

/// How often the server checks leases, ack timeouts, tombstones and due joins.
const TICK: Duration = Duration::from_millis(100);
/// Ticks between two clock/epoch announcements to members.
const ANNOUNCE_EVERY: u32 = 5;
/// Expired records are removed every quarter of their lifetime, within these bounds.
const SWEEP_MIN: Duration = Duration::from_millis(100);
const SWEEP_MAX: Duration = Duration::from_secs(60);
/// Batches in flight (sent, not fully acknowledged) before new writes wait in the queue. Two
/// keeps the link busy (one batch travels while the next is cut) and lets the queue grow into
/// large batches under load: measured with `cargo bench --bench cluster -- throughput`, 256
/// callers spread over 3 nodes went from 0.28 M to 0.48 M acked inserts/s against a limit of
/// 1024, with no change to the latency of a lone caller.
const MAX_IN_FLIGHT: usize = 2;

/// A burst of peer input stops after this long, so that node events, local writes, the tick
/// and the runtime's other tasks are not held up by heavy input (each join dump costs about
/// 15 ns per byte of table).
const MAX_BURST: Duration = Duration::from_millis(5);

/// A member whose view differs from ours for this long is dropped from the member list (both
/// sides do it), so that the next join repairs a half-finished one.
const VIEW_GRACE: Duration = Duration::from_secs(2);
/// The longest pause a join coordinator's lease holds this table for without a renewal; a
/// longer lease from a peer is cut to this.
const MAX_PAUSE_LEASE: Duration = Duration::from_secs(60);

/// A client write (or, with `op: None`, a sync barrier).
pub(crate) struct Write<K, V> {
    pub op: Option<OpKind<K, V>>,
    pub reply: oneshot::Sender<Result<()>>,
}

/// Requests from handles, the node and join coordinators; served even while paused.
pub(crate) enum Control<K, V> {
    Status(oneshot::Sender<TableStatus>),
    /// Send a join request to `to` (may be this node) and stream its replies back.
    JoinRequest {
        to: NodeId,
        body: JoinReq<K, V>,
        replies: mpsc::UnboundedSender<JoinRep<K, V>>,
    },
    JoinDone {
        peer: NodeId,
        result: Result<u64>,
    },
    Stop(oneshot::Sender<()>),
}

/// What reader and writer tasks report, tagged with the peer's key and the link's
/// generation: a node that reconnects keeps its key, and a key is reused once its node is gone,
/// so what an old link's tasks still report must not be taken for the current link's.
enum Input<K, V> {
    /// A message from a peer's link (its key and generation), with its frame's size.
    Msg {
        key: OwnerIdx,
        gen: u64,
        msg: PeerMsg<K, V>,
        size: usize,
        /// The stream's room this message takes until it is handled (`spawn_reader`).
        _room: OwnedSemaphorePermit,
    },
    LinkClosed {
        key: OwnerIdx,
        link: u64,
        reason: String,
        stop_code: Option<u32>,
    },
}

/// A join request sent to a peer, waiting for its replies.
struct Awaited<K, V> {
    /// The peer it went to: only its replies count.
    from: OwnerIdx,
    tx: mpsc::UnboundedSender<JoinRep<K, V>>,
    /// Frame bytes of the replies so far (a dump comes in many chunks).
    bytes: usize,
}

/// Where to send a join reply.
enum Origin<K, V> {
    Local(mpsc::UnboundedSender<JoinRep<K, V>>),
    Peer(OwnerIdx, u64),
}

/// One peer node that is connected (and may run this table).
struct Link {
    /// Unique among this table server's links, ever: tags what the link's tasks report.
    gen: u64,
    id: NodeId,
    conn: quinn::Connection,
    out: Option<Outbox>,
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
    /// as a member for `on_node_down` when the `PeerDown` that follows arrives.
    member_until_closed: bool,
    /// The `seq` of the last batch from this member whose writes may outlive it
    /// (`Server::apply`). When it goes down, members that applied different batches of it
    /// differ in more than its records: each mixes this into its epoch (`peer_down`), so those
    /// differ in view too, and the view check has them merge again (ALGORITHM.md, section 8).
    lasting: u64,
}

impl Link {
    fn ready(&self) -> bool {
        self.out.is_some() && self.inbound && self.refused.is_none()
    }

    /// Whether frames queued now can still reach the peer.
    fn open(&self) -> bool {
        self.out.as_ref().is_some_and(|o| !o.is_closed())
    }

    /// Queues a frame on the link's table stream; false if it was not queued. The first frame
    /// that would overflow the queue closes the connection to the peer: it has not read its
    /// stream for too long, and the node-down that follows is how the table forgets it.
    fn queue(&self, frame: Bytes) -> bool {
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
                self.conn
                    .close(VarInt::from_u32(close::OVERLOAD), b"outbound queue full");
                false
            }
            Err(Refused::Closed) => false,
        }
    }
}

/// A write being applied: an insert's records with their owners, or another write.
enum Inserted<K, V> {
    /// The records of an insert, each with its owner.
    Records(Vec<(K, Rec<V>)>),
    Other(OpKind<K, V>),
}

struct Pending {
    seq: u64,
    replies: Vec<oneshot::Sender<Result<()>>>,
    waiting: Vec<OwnerIdx>,
    deadline: Instant,
}

struct Pause {
    join: u64,
    coordinator: NodeId,
    deadline: Instant,
    /// The table's dump was sent for this join: a join asks each node once, and a second
    /// request would queue another copy of the table.
    dumped: bool,
}

#[derive(Default)]
struct JoinTrack {
    running: bool,
    failures: u32,
    next: Option<Instant>,
}

pub(crate) struct Server<K, V> {
    shared: Arc<Shared<K, V>>,
    opts: TableOptions<K, V>,
    config: NodeConfig,
    clock: Arc<HybridClock>,
    me: NodeId,
    me_idx: OwnerIdx,
    owners: Owners,
    links: HashMap<OwnerIdx, Link>,
    members: BTreeSet<OwnerIdx>,
    epoch: u64,
    seq: u64,
    pending: VecDeque<Pending>,
    tombstones: Tombstones<K>,
    paused: Option<Pause>,
    /// Joins whose pause ended (unpaused, lease expired, coordinator gone): a late renewal of
    /// one of them must not pause the table again.
    released: VecDeque<u64>,
    pause_waiters: Vec<Origin<K, V>>,
    join_replies: HashMap<u64, Awaited<K, V>>,
    next_req: u64,
    joins: HashMap<OwnerIdx, JoinTrack>,
    conflicts: u64,
    ticks: u32,
    header: Bytes,
    writes: mpsc::Receiver<Write<K, V>>,
    control: mpsc::UnboundedReceiver<Control<K, V>>,
    control_tx: mpsc::UnboundedSender<Control<K, V>>,
    events: mpsc::UnboundedReceiver<TableEvent>,
    inputs: mpsc::Receiver<Input<K, V>>,
    inputs_tx: mpsc::Sender<Input<K, V>>,
    to_ack: HashMap<OwnerIdx, u64>,
    /// Generation of the next link (`Link::gen`).
    next_link: u64,
    /// Owner indexes of nodes that went down, released once nothing refers to them.
    gone: Vec<OwnerIdx>,
    /// Finds keys named twice in one insert (`with_owners`).
    repeats: Repeats,
    /// When expired records are removed next (`TableOptions::expire_after`).
    next_sweep: Instant,
}

/// Everything a server needs from its node.
pub(crate) struct ServerParts<K, V> {
    pub shared: Arc<Shared<K, V>>,
    pub opts: TableOptions<K, V>,
    pub config: NodeConfig,
    pub clock: Arc<HybridClock>,
    pub me: NodeId,
    pub fingerprint: u64,
    pub writes: mpsc::Receiver<Write<K, V>>,
    pub control: mpsc::UnboundedReceiver<Control<K, V>>,
    pub control_tx: mpsc::UnboundedSender<Control<K, V>>,
    pub events: mpsc::UnboundedReceiver<TableEvent>,
}

/// A `Vec` that postcard appends to by reference, so the bytes before an encode that fails are
/// not lost with it (`to_extend` takes its writer by value and drops it on error).
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

impl<K: Key, V: Value> Server<K, V> {
    pub(crate) fn spawn(parts: ServerParts<K, V>) -> Result<tokio::task::JoinHandle<()>> {
        let header = frame::encode(&StreamHeader {
            table: parts.shared.name.clone(),
            kind: parts.shared.kind,
            fingerprint: parts.fingerprint,
        })?;
        let (inputs_tx, inputs) = mpsc::channel(1024);
        let mut owners = Owners::default();
        let me_idx = owners.intern(&parts.me);
        let span =
            tracing::info_span!("cets_table", node = %parts.me.name, table = %parts.shared.name);
        let server = Server {
            shared: parts.shared,
            opts: parts.opts,
            config: parts.config,
            clock: parts.clock,
            me: parts.me,
            me_idx,
            owners,
            links: HashMap::new(),
            members: BTreeSet::new(),
            epoch: 0,
            seq: 0,
            pending: VecDeque::new(),
            tombstones: Tombstones::new(),
            paused: None,
            released: VecDeque::new(),
            pause_waiters: Vec::new(),
            join_replies: HashMap::new(),
            next_req: 0,
            joins: HashMap::new(),
            conflicts: 0,
            ticks: 0,
            header,
            writes: parts.writes,
            control: parts.control,
            control_tx: parts.control_tx,
            events: parts.events,
            inputs,
            inputs_tx,
            to_ack: HashMap::new(),
            next_link: 0,
            gone: Vec::new(),
            repeats: Repeats::new(),
            next_sweep: Instant::now(),
        };
        Ok(tokio::spawn(server.run().instrument(span)))
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        loop {
            let can_write = self.paused.is_none() && self.pending.len() < MAX_IN_FLIGHT;
            tokio::select! {
                biased;
                Some(ev) = self.events.recv() => self.on_event(ev),
                Some(c) = self.control.recv() => {
                    if self.on_control(c) {
                        return;
                    }
                }
                Some(input) = self.inputs.recv() => {
                    let burst = Instant::now();
                    self.on_input(input);
                    let mut cut = false;
                    for _ in 0..256 {
                        if burst.elapsed() >= MAX_BURST {
                            cut = true;
                            break;
                        }
                        match self.inputs.try_recv() {
                            Ok(i) => self.on_input(i),
                            Err(_) => break,
                        }
                    }
                    self.flush_acks();
                    // Peer input goes first, but a stream of it that never lets up must not shut
                    // out this node's own writers and the tick: each gets a turn after a burst.
                    if self.paused.is_none() && self.pending.len() < MAX_IN_FLIGHT {
                        if let Ok(w) = self.writes.try_recv() {
                            self.on_writes(w);
                        }
                    }
                    if last_tick.elapsed() >= TICK {
                        tick.reset();
                        self.on_tick();
                        last_tick = Instant::now();
                    }
                    if cut {
                        // Heavy input (join dumps): let the runtime's other tasks on this
                        // thread run, whatever is left of this task's budget.
                        tokio::task::yield_now().await;
                    }
                }
                Some(w) = self.writes.recv(), if can_write => self.on_writes(w),
                _ = tick.tick() => {
                    self.on_tick();
                    last_tick = Instant::now();
                }
            }
        }
    }

    fn stop(&mut self) {
        for p in self.pending.drain(..) {
            for r in p.replies {
                let _ = r.send(Err(Error::Shutdown));
            }
        }
        self.writes.close();
        while let Ok(w) = self.writes.try_recv() {
            let _ = w.reply.send(Err(Error::Shutdown));
        }
    }

    // ------------------------------------------------------------------ node events

    fn on_event(&mut self, ev: TableEvent) {
        match ev {
            TableEvent::PeerUp(pc) => {
                self.ensure_link(pc);
            }
            TableEvent::PeerDown(id) => self.peer_down(&id),
            TableEvent::Inbound(pc, reader) => {
                let Some(key) = self.ensure_link(pc.clone()) else {
                    return;
                };
                let Some(gen) = self.links.get(&key).map(|l| l.gen) else {
                    return;
                };
                self.spawn_reader(pc, key, gen, reader);
                if let Some(link) = self.links.get_mut(&key) {
                    link.inbound = true;
                    link.lacks_table = false;
                    if link.out.is_none() {
                        link.out = Some(spawn_writer(
                            PeerConn {
                                id: link.id.clone(),
                                conn: link.conn.clone(),
                            },
                            self.header.clone(),
                            key,
                            gen,
                            self.inputs_tx.clone(),
                            self.config.max_link_queue_bytes,
                        ));
                    }
                }
                self.maybe_join(key);
            }
            TableEvent::Refused { peer, reason } => {
                if let Some(key) = self.owners.lookup(&peer) {
                    if let Some(link) = self.links.get_mut(&key) {
                        link.refused = Some(reason);
                    }
                }
            }
        }
    }

    /// The link to a connected peer, created (with its outbound stream) if new. `None` for a
    /// connection already closed: its `PeerDown` may have been handled before this event, and
    /// a link made now would never be removed.
    fn ensure_link(&mut self, pc: PeerConn) -> Option<OwnerIdx> {
        if pc.conn.close_reason().is_some() {
            tracing::debug!(peer = %pc.id, "event of a connection already closed ignored");
            return None;
        }
        let key = self.owners.intern(&pc.id);
        if let Some(link) = self.links.get(&key) {
            if link.conn.stable_id() == pc.conn.stable_id() {
                return Some(key);
            }
        }
        // A previous incarnation (or connection) of the same node is gone.
        let stale: Vec<NodeId> = self
            .links
            .values()
            .filter(|l| l.id.name == pc.id.name)
            .map(|l| l.id.clone())
            .collect();
        for id in stale {
            self.peer_down(&id);
        }
        let gen = self.next_link;
        self.next_link += 1;
        let out = spawn_writer(
            pc.clone(),
            self.header.clone(),
            key,
            gen,
            self.inputs_tx.clone(),
            self.config.max_link_queue_bytes,
        );
        self.links.insert(
            key,
            Link {
                gen,
                id: pc.id,
                conn: pc.conn,
                out: Some(out),
                inbound: false,
                lacks_table: false,
                refused: None,
                acked: 0,
                watermark: 0,
                view: None,
                disagree_since: None,
                member_until_closed: false,
                lasting: 0,
            },
        );
        Some(key)
    }

    /// Reads a peer's table stream and hands each message to the table server. A decoded
    /// message can take many times the bytes of its frame (a record of an empty string is 2
    /// bytes on the wire and 32 in memory), so the frames of one stream whose messages the
    /// table server has not handled yet may come to `max_frame_size` bytes at most (a larger
    /// frame, up to the limit, passes alone): the reader then waits, QUIC flow control stops
    /// the peer, and the memory a peer holds here is a bounded multiple of that.
    fn spawn_reader(&self, pc: PeerConn, key: OwnerIdx, gen: u64, mut reader: FrameReader) {
        let inputs = self.inputs_tx.clone();
        let budget = u32::try_from(self.config.max_frame_size).unwrap_or(u32::MAX);
        let room = Arc::new(Semaphore::new(budget as usize));
        tokio::spawn(
            async move {
                loop {
                    let body = match reader.next().await {
                        Ok(Some(body)) => body,
                        Ok(None) => return,
                        Err(e @ Error::FrameTooLarge { .. }) => {
                            tracing::warn!(peer = %pc.id, error = %e, "closing the connection");
                            pc.conn.close(VarInt::from_u32(close::PROTOCOL), b"frame too large");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(peer = %pc.id, error = %e, "table stream ended");
                            return;
                        }
                    };
                    let take = u32::try_from(body.len()).unwrap_or(u32::MAX).clamp(1, budget);
                    let Ok(permit) = room.clone().acquire_many_owned(take).await else {
                        return;
                    };
                    match frame::decode::<PeerMsg<K, V>>(&body) {
                        Ok(msg) => {
                            let input = Input::Msg {
                                key,
                                gen,
                                msg,
                                size: body.len(),
                                _room: permit,
                            };
                            if inputs.send(input).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(peer = %pc.id, error = %e, "undecodable frame; closing the connection");
                            pc.conn.close(VarInt::from_u32(close::PROTOCOL), b"undecodable frame");
                            return;
                        }
                    }
                }
            }
            .in_current_span(),
        );
    }

    fn peer_down(&mut self, id: &NodeId) {
        let Some(key) = self.owners.lookup(id) else {
            return;
        };
        let link = self.links.remove(&key);
        let was_link = link.is_some();
        let lasting = link.as_ref().map_or(0, |l| l.lasting);
        // A member whose table stream closed just before (the writer task reported the lost
        // connection before the node's `PeerDown` got here) was a member all the same.
        let was_member = self.members.remove(&key) | link.is_some_and(|l| l.member_until_closed);
        self.join_replies.retain(|_, a| a.from != key);
        self.joins.remove(&key);
        self.pause_waiters
            .retain(|o| !matches!(o, Origin::Peer(k, _) if *k == key));
        if self.paused.as_ref().is_some_and(|p| &p.coordinator == id) {
            tracing::warn!(coordinator = %id, "join coordinator is gone; unpausing");
            self.unpause();
        }
        // Its records go, each leaving a tombstone while a member may still send an older
        // write of the key: on a node where that write arrived first, the dropped record had
        // replaced it, and it must not come back here only (the same holds for `drop_orphans`).
        let since = self.min_watermark();
        let keep_tombstones = !self.members.is_empty();
        let mut recent = Vec::new();
        let removed = self.shared.store.remove_owned(key, |k, ts| {
            if keep_tombstones && ts > since {
                recent.push((k.clone(), ts));
            }
        });
        for (k, ts) in recent {
            if self.newer(&k, ts, key) {
                self.add_tombstone(k, Tombstone::of((ts, key)));
            }
        }
        if was_member {
            // Members that applied the same lasting writes of it keep equal views; those that
            // did not (it died before its last write reached all) now differ, and the view
            // check has them merge their tables again, as a join does. XOR: two nodes that go
            // down at once may be handled in either order.
            self.epoch ^= departure_mark(id, lasting);
            self.publish_members();
        }
        if was_link || was_member || !removed.is_empty() {
            tracing::info!(peer = %id, dropped = removed.len(), "node down");
        }
        if was_member || !removed.is_empty() {
            if let Some(f) = &self.opts.on_node_down {
                f(id, &removed);
            }
        }
        self.complete_pending();
        if key != self.me_idx && !self.gone.contains(&key) {
            self.gone.push(key);
        }
    }

    /// Releases the owner indexes of nodes that went down once nothing refers to them: no link
    /// (the same incarnation may have reconnected), no tombstone, no batch waiting for its ack,
    /// no join. Their records went with the node-down, and none can come back: writes and join
    /// records name only owners alive here. Without this, each incarnation ever seen would
    /// cost every table an entry for good.
    fn release_gone_owners(&mut self) {
        // A node that reconnected under the same incarnation is not gone; if it goes down
        // again, `peer_down` lists it again.
        let links = &self.links;
        self.gone.retain(|k| !links.contains_key(k));
        if self.gone.is_empty() {
            return;
        }
        let mut referred: BTreeSet<OwnerIdx> = self.tombstones.owners().collect();
        referred.extend(self.pending.iter().flat_map(|p| p.waiting.iter().copied()));
        referred.extend(self.to_ack.keys().copied());
        referred.extend(self.join_replies.values().map(|a| a.from));
        let owners = &mut self.owners;
        let joins = &mut self.joins;
        self.gone.retain(|&k| {
            if referred.contains(&k) {
                return true;
            }
            joins.remove(&k);
            owners.release(k);
            false
        });
    }

    /// Ends the current pause; buffered writes go on.
    fn unpause(&mut self) {
        if let Some(p) = self.paused.take() {
            self.remember_released(p.join);
        }
        self.pause_waiters.clear();
    }

    /// Joins whose pause ended (the last 64): a late pause or renewal of one is refused.
    fn remember_released(&mut self, join: u64) {
        if !self.released.contains(&join) {
            self.released.push_back(join);
            if self.released.len() > 64 {
                self.released.pop_front();
            }
        }
    }

    fn publish_members(&self) {
        let mut ids: Vec<NodeId> = self
            .members
            .iter()
            .filter_map(|k| self.links.get(k).map(|l| l.id.clone()))
            .collect();
        ids.sort();
        *self
            .shared
            .members
            .write()
            .unwrap_or_else(|p| p.into_inner()) = ids;
    }

    // ------------------------------------------------------------------ client writes

    /// Group commit: takes `first` and whatever else is queued, applies it, and sends it to
    /// every member as one frame.
    fn on_writes(&mut self, first: Write<K, V>) {
        let replicate = !self.members.is_empty();
        let mut body = Vec::new();
        let mut count = 0usize;
        let mut replies = Vec::new();
        let mut accepted_ops = Vec::new();
        let mut next = Some(first);
        while let Some(Write { op, reply }) = next.take() {
            let mut reply = Some(reply);
            if let Some(kind) = op {
                let op = Op {
                    ts: self.clock.now(),
                    kind: self.with_owners(kind),
                };
                let mut accepted = true;
                let limit = self.config.max_frame_size / 2;
                let refuse = |e: Error, reply: &mut Option<oneshot::Sender<Result<()>>>| {
                    if let Some(r) = reply.take() {
                        let _ = r.send(Err(e));
                    }
                };
                let too_large = || {
                    Error::Config(format!(
                        "one write may encode to at most half of max_frame_size ({limit} bytes); split it"
                    ))
                };
                if replicate {
                    // Appended in place; on any refusal the body is cut back to the writes
                    // before this one (an encode that fails may have written part of it).
                    let before = body.len();
                    let encoded = postcard::to_extend(&op, Append(&mut body)).map(drop);
                    match encoded {
                        Ok(()) if body.len() - before <= limit => count += 1,
                        Ok(()) => {
                            body.truncate(before);
                            accepted = false;
                            refuse(too_large(), &mut reply);
                        }
                        Err(e) => {
                            body.truncate(before);
                            accepted = false;
                            refuse(Error::Codec(e), &mut reply);
                        }
                    }
                } else {
                    // Alone, the write is not sent now, but a later join will send it: a record
                    // that could never cross is refused here too.
                    match postcard::experimental::serialized_size(&op) {
                        Ok(n) if n <= limit => {}
                        Ok(_) => {
                            accepted = false;
                            refuse(too_large(), &mut reply);
                        }
                        Err(e) => {
                            accepted = false;
                            refuse(Error::Codec(e), &mut reply);
                        }
                    }
                }
                if accepted {
                    accepted_ops.push(op);
                }
            }
            if let Some(r) = reply {
                replies.push(r);
            }
            if replies.len() >= self.config.max_batch_ops
                || body.len() >= self.config.max_batch_bytes
            {
                break;
            }
            next = self.writes.try_recv().ok();
        }
        if !replicate {
            self.apply_local(accepted_ops);
            for r in replies {
                let _ = r.send(Ok(()));
            }
            return;
        }
        if replies.is_empty() {
            return;
        }
        self.seq += 1;
        let frame = match ops_frame(self.seq, count, &body) {
            Ok(f) => f,
            Err(e) => {
                // Nothing was applied or sent: the writes fail as a whole.
                let msg = e.to_string();
                for r in replies {
                    let _ = r.send(Err(Error::Transport(msg.clone())));
                }
                return;
            }
        };
        let mut waiting = Vec::with_capacity(self.members.len());
        for key in &self.members {
            if self.links.get(key).is_some_and(|l| l.queue(frame.clone())) {
                waiting.push(*key);
            }
        }
        // Sent first, applied here second: the local apply overlaps the round trip and the
        // peers' own apply. Replies wait for the acks, which this task handles after the
        // apply, so a caller still finds its write on every node when its call returns.
        self.apply_local(accepted_ops);
        self.pending.push_back(Pending {
            seq: self.seq,
            replies,
            waiting,
            deadline: deadline_after(self.opts.ack_timeout),
        });
        self.complete_pending();
    }

    fn apply_local(&mut self, ops: Vec<Op<K, V>>) {
        for op in ops {
            self.apply(op, self.me_idx);
        }
    }

    /// Completes, in order, every batch acknowledged by all its members (or whose missing
    /// members are gone).
    fn complete_pending(&mut self) {
        while let Some(p) = self.pending.front() {
            let done = p.waiting.iter().all(|k| match self.links.get(k) {
                Some(l) => l.acked >= p.seq || !self.members.contains(k),
                None => true,
            });
            if !done {
                break;
            }
            if let Some(p) = self.pending.pop_front() {
                for r in p.replies {
                    let _ = r.send(Ok(()));
                }
            }
        }
        if self.pending.is_empty() && !self.pause_waiters.is_empty() {
            for origin in std::mem::take(&mut self.pause_waiters) {
                let rep = self.paused_reply();
                self.reply(origin, rep);
            }
        }
    }

    // ------------------------------------------------------------------ applying writes

    /// Whether a removal stamped `(ts, owner)` (a delete, a dropped orphan) beats what is
    /// stored for `k` (or its tombstone), in the join's last-writer-wins order: timestamp, then
    /// owner identity. A removal wins a tie with a record, and so with the tombstone of one
    /// removed version, but not with another removal's tombstone (nothing would change).
    fn newer(&self, k: &K, ts: u64, owner: OwnerIdx) -> bool {
        let stamp = (ts, self.owners.get(owner));
        if let Some((cts, cowner)) = self.shared.store.meta(k) {
            return stamp >= (cts, self.owners.get(cowner));
        }
        if self.tombstones.is_empty() {
            return true;
        }
        match self.tombstones.get(k) {
            Some(t) => match stamp.cmp(&(t.ts, self.owners.get(t.owner))) {
                Ordering::Greater => true,
                Ordering::Equal => t.value.is_some(),
                Ordering::Less => false,
            },
            None => true,
        }
    }

    /// The smallest watermark of the members (`u64::MAX` with none): every write a member
    /// still sends is stamped after it.
    fn min_watermark(&self) -> u64 {
        self.members
            .iter()
            .filter_map(|k| self.links.get(k))
            .map(|l| l.watermark)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Forgets the tombstones older than every member's clock (no member: all of them): no
    /// write they must stop is still on its way. Runs at every ack, so the map stays as small
    /// as the writes in flight (and in cache) under a stream of deletes.
    fn forget_tombstones(&mut self) {
        if self.tombstones.oldest_queued().is_none() {
            return;
        }
        let min = self.min_watermark();
        self.tombstones.forget_up_to(min);
    }

    fn add_tombstone(&mut self, k: K, t: Tombstone) {
        self.tombstones.add(k, t);
    }

    /// An insert as it is sent and applied. With an owner function, each record's owner is
    /// decided here, once, for every replica: the node `TableOptions::owner` names if it is
    /// this node or a member of the table, otherwise this node. In a set or ordered_set, a key
    /// written twice in one insert keeps its last record only: receivers order records with
    /// equal stamps by value (they may be two writers'), so the write must not carry two. A bag
    /// keeps every object. Other writes are returned as they are.
    fn with_owners(&mut self, kind: OpKind<K, V>) -> OpKind<K, V> {
        let OpKind::Insert(mut recs) = kind else {
            return kind;
        };
        let dedupe = recs.len() > 1
            && self.shared.kind != TableKind::Bag
            && self.repeats.may_repeat(recs.iter().map(|(k, _)| k));
        let Some(f) = &self.opts.owner else {
            if dedupe {
                last_of_each_key(&mut recs, |(k, _)| k);
            }
            return OpKind::Insert(recs);
        };
        let mut owners: Vec<NodeId> = Vec::new();
        let mut records = Vec::with_capacity(recs.len());
        for (k, v) in recs {
            let name = f(&k, &v);
            let owner = self
                .members
                .iter()
                .filter_map(|m| self.links.get(m))
                .find(|l| l.id.name == name)
                .map_or(&self.me, |l| &l.id);
            let i = match owners.iter().position(|o| o == owner) {
                Some(i) => i,
                None => {
                    owners.push(owner.clone());
                    owners.len() - 1
                }
            };
            // At most one owner per record: the index fits.
            records.push((k, v, i as u32));
        }
        if dedupe {
            last_of_each_key(&mut records, |(k, _, _)| k);
        }
        OpKind::InsertOwned { owners, records }
    }

    /// Records whose owner is down here (the writer did not know it yet): this node ends as
    /// the writer will once it hears of that node's end, without the record. A stored version
    /// of the key that the write would have replaced goes too, as it went on the writer; one
    /// the write does not beat stays. Where the write wins, it leaves a tombstone of its stamp,
    /// as the record it stands for leaves on the writer when dropped with its owner
    /// (`peer_down`): an older write still on its way to this node must not bring the key back
    /// here only.
    fn drop_orphans(&mut self, ts: u64, orphans: Vec<(K, NodeId)>) {
        if self.shared.kind == TableKind::Bag {
            return;
        }
        let keep_tombstones = !self.members.is_empty();
        for (k, owner) in orphans {
            let stamp = (ts, Some(&owner));
            let owners = &self.owners;
            let removed = self
                .shared
                .store
                .remove_if(&k, |(cts, co)| stamp >= (cts, owners.get(co)));
            if !keep_tombstones {
                continue;
            }
            let idx = self.gone_owner(&owner);
            if removed.unwrap_or_else(|| self.newer(&k, ts, idx)) {
                self.add_tombstone(k, Tombstone::of((ts, idx)));
            }
        }
    }

    /// The owner index of a node that is down here, for a tombstone's stamp: it is released
    /// once the tombstone is forgotten (`release_gone_owners`).
    fn gone_owner(&mut self, id: &NodeId) -> OwnerIdx {
        let idx = self.owners.intern(id);
        if idx != self.me_idx && !self.links.contains_key(&idx) && !self.gone.contains(&idx) {
            self.gone.push(idx);
        }
        idx
    }

    /// The index of an owner a writer named, if it is alive here: this node, or a node this
    /// table has a link to (that very incarnation).
    fn live_owner(&self, id: &NodeId) -> Option<OwnerIdx> {
        if *id == self.me {
            return Some(self.me_idx);
        }
        self.links
            .iter()
            .find(|(_, l)| l.id == *id)
            .map(|(k, _)| *k)
    }

    /// Applies one write by `writer`. Returns whether it may have changed something that
    /// outlives the writer, that is more than records it owns (which go when it goes down): it
    /// stored a record of another owner, replaced or removed one, or brought a deleted key
    /// back. Those are the writes survivors must agree on (`Link::lasting`).
    fn apply(&mut self, op: Op<K, V>, writer: OwnerIdx) -> bool {
        let Op { ts, kind } = op;
        // Inserts as records with their owners, and the keys of records whose owner (named by
        // the writer) is already down here.
        let (kind, orphans) = match kind {
            OpKind::Insert(recs) => {
                let recs = recs
                    .into_iter()
                    .map(|(k, v)| {
                        let rec = Rec {
                            value: v,
                            ts,
                            owner: writer,
                        };
                        (k, rec)
                    })
                    .collect();
                (Inserted::Records(recs), Vec::new())
            }
            OpKind::InsertOwned { owners, records } => {
                let live: Vec<Option<OwnerIdx>> =
                    owners.iter().map(|id| self.live_owner(id)).collect();
                let mut recs = Vec::with_capacity(records.len());
                let mut orphans = Vec::new();
                for (k, v, i) in records {
                    match (live.get(i as usize), owners.get(i as usize)) {
                        (Some(&Some(owner)), _) => recs.push((
                            k,
                            Rec {
                                value: v,
                                ts,
                                owner,
                            },
                        )),
                        (_, Some(id)) => orphans.push((k, id.clone())),
                        _ => tracing::debug!("a record naming no owner skipped"),
                    }
                }
                (Inserted::Records(recs), orphans)
            }
            other => (Inserted::Other(other), Vec::new()),
        };
        let mut lasting = !orphans.is_empty();
        if lasting {
            self.drop_orphans(ts, orphans);
        }
        if let Inserted::Records(recs) = &kind {
            lasting |= recs.iter().any(|(_, r)| r.owner != writer);
        }
        let store = &self.shared.store;
        if self.shared.kind == TableKind::Bag {
            match kind {
                // An object stored already keeps the greater stamp of the two: two writers that
                // insert one object at once thus leave it, on every node, to the same owner.
                Inserted::Records(recs) => {
                    let owners = &self.owners;
                    store.put_many_if(recs, |_, new, cur| {
                        let won = cur.is_none_or(|c| {
                            (new.ts, owners.get(new.owner)) > (c.ts, owners.get(c.owner))
                        });
                        lasting |= won && cur.is_some_and(|c| c.owner != writer);
                        won
                    });
                }
                Inserted::Other(OpKind::Insert(_) | OpKind::InsertOwned { .. }) => {}
                Inserted::Other(OpKind::Delete(keys)) => keys.iter().for_each(|k| {
                    lasting |= store.remove(k);
                }),
                Inserted::Other(OpKind::DeleteObject(objs)) => objs.iter().for_each(|(k, v)| {
                    lasting |= store.remove_object(k, v);
                }),
            }
            return lasting;
        }
        let keep_tombstones = !self.members.is_empty();
        match kind {
            // One batch for the whole op (the store applies small ones record by record).
            Inserted::Records(recs) => {
                let (owners, tombstones) = (&self.owners, &self.tombstones);
                let mut untombstoned = Vec::new();
                store.put_many_if(recs, |k, new, cur| {
                    let stamp = (new.ts, owners.get(new.owner));
                    match cur {
                        // Equal stamps come from two writers that named one owner in the same
                        // clock tick (a write carries a key once): ordered by value, the same
                        // on every node. An equal value is the same write again.
                        Some(c) => {
                            let won = match stamp.cmp(&(c.ts, owners.get(c.owner))) {
                                Ordering::Greater => true,
                                Ordering::Less => false,
                                Ordering::Equal => {
                                    value_order(&new.value, &c.value) != Ordering::Less
                                }
                            };
                            lasting |= won && c.owner != writer;
                            won
                        }
                        None if tombstones.is_empty() => true,
                        None => match tombstones.get(k) {
                            Some(t) => {
                                let won = beats_tombstone(stamp, &new.value, t, owners);
                                if won {
                                    untombstoned.push(k.clone());
                                }
                                won
                            }
                            None => true,
                        },
                    }
                });
                lasting |= !untombstoned.is_empty();
                for k in untombstoned {
                    self.tombstones.remove(&k);
                }
            }
            Inserted::Other(OpKind::Insert(_) | OpKind::InsertOwned { .. }) => {}
            Inserted::Other(OpKind::Delete(keys)) => {
                let outcomes = {
                    let stamp = (ts, self.owners.get(writer));
                    let owners = &self.owners;
                    store.remove_many_if(&keys, |(cts, co)| stamp >= (cts, owners.get(co)))
                };
                for (k, removed) in keys.into_iter().zip(outcomes) {
                    lasting |= removed == Some(true);
                    let tombstone = match removed {
                        Some(removed) => removed,
                        // No record: the delete still stops older writes still in flight.
                        None => self.newer(&k, ts, writer),
                    };
                    if tombstone && keep_tombstones {
                        self.add_tombstone(k, Tombstone::of((ts, writer)));
                    }
                }
            }
            Inserted::Other(OpKind::DeleteObject(objs)) => {
                // Removes one version (the stored record, if it has this value). Its tombstone
                // is that version's stamp and value, not the delete's: it stops the deleted
                // version from coming back, but any other write of the key still wins as it
                // would have won against the version (`Tombstone::value`).
                for (k, v) in objs {
                    let version = self.shared.store.get(&k).filter(|cur| same_value(cur, &v));
                    let meta = self.shared.store.meta(&k);
                    if let (Some(_), Some((vts, vowner))) = (version, meta) {
                        if self.newer(&k, ts, writer) {
                            self.shared.store.remove(&k);
                            lasting = true;
                            if keep_tombstones {
                                let value = postcard::to_stdvec(&v).ok().map(Vec::into_boxed_slice);
                                let t = Tombstone {
                                    ts: vts,
                                    owner: vowner,
                                    value,
                                };
                                self.add_tombstone(k, t);
                            }
                        }
                    }
                }
            }
        }
        lasting
    }

    // ------------------------------------------------------------------ peer messages

    /// Whether `gen` is the peer's current link.
    fn is_current(&self, key: OwnerIdx, gen: u64) -> bool {
        self.links.get(&key).is_some_and(|l| l.gen == gen)
    }

    fn on_input(&mut self, input: Input<K, V>) {
        match input {
            Input::Msg {
                key,
                gen,
                msg,
                size,
                _room,
            } => {
                if self.is_current(key, gen) {
                    self.on_peer_msg(key, msg, size);
                }
            }
            Input::LinkClosed {
                key,
                link: gen,
                reason,
                stop_code,
            } => {
                if !self.is_current(key, gen) {
                    return;
                }
                let Some(link) = self.links.get_mut(&key) else {
                    return;
                };
                link.out = None;
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
                        if link.conn.close_reason().is_none() {
                            tracing::warn!(peer = %link.id, %reason, "table stream failed");
                        }
                    }
                }
                if self.members.remove(&key) {
                    tracing::debug!(peer = %link.id, "member removed: its table stream closed");
                    link.member_until_closed = true;
                    self.publish_members();
                }
                self.complete_pending();
            }
        }
    }

    fn on_peer_msg(&mut self, key: OwnerIdx, msg: PeerMsg<K, V>, size: usize) {
        match msg {
            PeerMsg::Ops { seq, ops } => {
                let member = self.members.contains(&key);
                if !member && !ops.is_empty() {
                    // The link can be gone already: frames read before the node went down may
                    // still be queued after the node-down event was handled.
                    match self.links.get(&key) {
                        Some(l) => {
                            tracing::debug!(peer = %l.id, "writes from a non-member acknowledged, not applied")
                        }
                        None => tracing::debug!("writes from a node that is down dropped"),
                    }
                }
                let mut lasting = false;
                for op in ops {
                    self.clock.observe(op.ts);
                    if let Some(l) = self.links.get_mut(&key) {
                        l.watermark = l.watermark.max(op.ts);
                    }
                    if member {
                        lasting |= self.apply(op, key);
                    }
                }
                if lasting {
                    if let Some(l) = self.links.get_mut(&key) {
                        l.lasting = seq;
                    }
                }
                self.to_ack.insert(key, seq);
            }
            PeerMsg::Ack { seq, clock } => {
                self.clock.observe(clock);
                if let Some(l) = self.links.get_mut(&key) {
                    l.acked = l.acked.max(seq);
                    l.watermark = l.watermark.max(clock);
                }
                self.complete_pending();
                self.forget_tombstones();
            }
            PeerMsg::Tick { clock, view } => {
                self.clock.observe(clock);
                if let Some(l) = self.links.get_mut(&key) {
                    l.watermark = l.watermark.max(clock);
                    l.view = Some(view);
                }
            }
            PeerMsg::Join { req, body } => self.on_join_req(Origin::Peer(key, req), body),
            PeerMsg::JoinReply { req, body } => {
                // Only the node the request went to answers it: a reply from another peer
                // (request numbers are easy to guess) must not end that request.
                let Some(awaited) = self.join_replies.get_mut(&req).filter(|a| a.from == key)
                else {
                    return;
                };
                // A dump is queued at once by its source, so an honest one fits in the
                // source's outbound queue: replies to one request past that size are a peer's
                // fault, and holding them (the coordinator keeps a dump until it is complete)
                // would let it grow this node's memory without end.
                awaited.bytes = awaited.bytes.saturating_add(size);
                if awaited.bytes > self.config.max_link_queue_bytes {
                    tracing::warn!(
                        peer = %self.links.get(&key).map_or_else(String::new, |l| l.id.to_string()),
                        bytes = awaited.bytes,
                        "replies to one join request passed max_link_queue_bytes; dropping the request"
                    );
                    let reason = "its reply passed max_link_queue_bytes".to_string();
                    let _ = awaited.tx.send(JoinRep::Refused { reason });
                    self.join_replies.remove(&req);
                    return;
                }
                let last = !matches!(body, JoinRep::Chunk { last: false, .. });
                let _ = awaited.tx.send(body);
                if last {
                    self.join_replies.remove(&req);
                }
            }
        }
    }

    fn send_to(&self, key: OwnerIdx, msg: &PeerMsg<K, V>) {
        let Some(link) = self.links.get(&key) else {
            return;
        };
        match frame::encode(msg) {
            Ok(f) => {
                link.queue(f);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a message"),
        }
    }

    fn flush_acks(&mut self) {
        if self.to_ack.is_empty() {
            return;
        }
        let clock = self.clock.now();
        for (key, seq) in std::mem::take(&mut self.to_ack) {
            self.send_to(key, &PeerMsg::Ack { seq, clock });
        }
    }

    // ------------------------------------------------------------------ joins (participant)

    fn paused_reply(&self) -> JoinRep<K, V> {
        JoinRep::Paused {
            members: self.member_ids_with_me(),
            epoch: self.epoch,
            reachable: self
                .links
                .values()
                .filter(|l| l.ready())
                .map(|l| l.id.clone())
                .collect(),
            len: self.shared.store.len() as u64,
        }
    }

    fn member_ids_with_me(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .members
            .iter()
            .filter_map(|k| self.links.get(k).map(|l| l.id.clone()))
            .collect();
        v.push(self.me.clone());
        v.sort();
        v
    }

    fn reply(&self, origin: Origin<K, V>, body: JoinRep<K, V>) {
        match origin {
            Origin::Local(tx) => {
                let _ = tx.send(body);
            }
            Origin::Peer(key, req) => self.send_to(key, &PeerMsg::JoinReply { req, body }),
        }
    }

    fn origin_id(&self, origin: &Origin<K, V>) -> Option<NodeId> {
        match origin {
            Origin::Local(_) => Some(self.me.clone()),
            Origin::Peer(k, _) => self.links.get(k).map(|l| l.id.clone()),
        }
    }

    fn paused_by(&self, join: u64) -> bool {
        self.paused.as_ref().is_some_and(|p| p.join == join)
    }

    fn on_join_req(&mut self, origin: Origin<K, V>, body: JoinReq<K, V>) {
        match body {
            JoinReq::Info => {
                let rep = JoinRep::Info {
                    members: self.member_ids_with_me(),
                    epoch: self.epoch,
                };
                self.reply(origin, rep);
            }
            JoinReq::Pause { join, lease_ms } => {
                let Some(coordinator) = self.origin_id(&origin) else {
                    return;
                };
                // The coordinator's lease, up to a bound: a peer cannot pause this table for
                // longer than `MAX_PAUSE_LEASE` without renewing.
                let lease = Duration::from_millis(lease_ms).min(MAX_PAUSE_LEASE);
                let deadline = Instant::now() + lease;
                if self.released.contains(&join) {
                    let reason = "this join's pause already ended".to_string();
                    self.reply(origin, JoinRep::Refused { reason });
                    return;
                }
                match &mut self.paused {
                    Some(p) if p.join != join => {
                        let by = p.coordinator.name.clone();
                        self.reply(origin, JoinRep::Busy { by });
                    }
                    Some(p) => {
                        p.deadline = deadline;
                        let rep = self.paused_reply();
                        self.reply(origin, rep);
                    }
                    None => {
                        tracing::debug!(%coordinator, join, "paused for a join");
                        self.paused = Some(Pause {
                            join,
                            coordinator,
                            deadline,
                            dumped: false,
                        });
                        if self.pending.is_empty() {
                            let rep = self.paused_reply();
                            self.reply(origin, rep);
                        } else {
                            self.pause_waiters.push(origin);
                        }
                    }
                }
            }
            JoinReq::Dump { join, alive } => {
                if !self.paused_by(join) {
                    self.reply(
                        origin,
                        JoinRep::Refused {
                            reason: "not paused by this join".into(),
                        },
                    );
                    return;
                }
                if let Some(p) = self.paused.as_mut() {
                    if p.dumped {
                        let reason = "this join had the dump already".to_string();
                        self.reply(origin, JoinRep::Refused { reason });
                        return;
                    }
                    p.dumped = true;
                }
                self.send_dump(origin, &alive);
            }
            JoinReq::Apply {
                join,
                owners,
                records,
                members,
                merge,
            } => {
                if !self.paused_by(join) {
                    self.reply(
                        origin,
                        JoinRep::Refused {
                            reason: "not paused by this join".into(),
                        },
                    );
                    return;
                }
                // Records of owners that are not alive here (a node that died during the
                // join) are not stored: nothing would ever remove them.
                let map: Vec<Option<OwnerIdx>> = owners
                    .iter()
                    .map(|id| {
                        let alive = *id == self.me || self.links.values().any(|l| l.id == *id);
                        alive.then(|| self.owners.intern(id))
                    })
                    .collect();
                let mut recs = Vec::with_capacity(records.len());
                let mut newest = 0;
                for r in records {
                    let Some(&Some(owner)) = map.get(r.owner as usize) else {
                        continue;
                    };
                    newest = newest.max(r.ts);
                    // Dumps carry no tombstones: a record the other side still holds comes
                    // back, whoever decides.
                    if !self.tombstones.is_empty() {
                        self.tombstones.remove(&r.key);
                    }
                    let rec = Rec {
                        value: r.value,
                        ts: r.ts,
                        owner,
                    };
                    recs.push((r.key, rec));
                }
                self.clock.observe(newest);
                // For a merge: which stored owners the other side's dump could have included.
                let dumped: Vec<bool> = match &merge {
                    Some(all) => (0..self.owners.slots() as OwnerIdx)
                        .map(|i| self.owners.get(i).is_some_and(|id| all.contains(id)))
                        .collect(),
                    None => Vec::new(),
                };
                let merge = merge.is_some();
                let mut conflicts = 0;
                let owners = &self.owners;
                self.shared
                    .store
                    .put_many_if(recs, |_, new, cur| match cur {
                        None => true,
                        // The coordinator decided: store as it is.
                        Some(_) if !merge => true,
                        // Not a version the join sees (its owner is outside the join): as if
                        // absent, as in a central merge, which never receives it.
                        Some(c) if !dumped.get(c.owner as usize).copied().unwrap_or(false) => true,
                        // The join's rule, as the coordinator would apply it: the larger
                        // (timestamp, owner identity, value) wins; equal, it is the same version.
                        Some(c) => {
                            let stamp = (new.ts, owners.get(new.owner));
                            let order = stamp
                                .cmp(&(c.ts, owners.get(c.owner)))
                                .then_with(|| value_order(&new.value, &c.value));
                            conflicts += u64::from(order != Ordering::Equal);
                            order == Ordering::Greater
                        }
                    });
                if let Some(members) = members {
                    self.set_members(&members, join);
                }
                self.reply(origin, JoinRep::Applied { conflicts });
            }
            JoinReq::Unpause { join } => {
                if self.paused_by(join) {
                    tracing::debug!(join, "unpaused");
                    self.unpause();
                } else {
                    // The coordinator gave up before our pause (its request still queued here,
                    // or our answer late): a pause of this join arriving now is refused.
                    self.remember_released(join);
                }
                self.reply(origin, JoinRep::Unpaused);
            }
        }
    }

    fn send_dump(&self, origin: Origin<K, V>, alive: &[NodeId]) {
        if let Origin::Peer(key, _) = origin {
            if !self.links.get(&key).is_some_and(Link::open) {
                // Its queue overflowed (the connection is closing), or its stream is gone.
                return;
            }
        }
        // The dump's owner list: the alive owners only, renumbered (`wire[i]`: the index in
        // that list of owner `i` here).
        let mut owners: Vec<NodeId> = Vec::new();
        let wire: Vec<Option<u32>> = (0..self.owners.slots() as OwnerIdx)
            .map(|i| {
                let id = self.owners.get(i).filter(|id| alive.contains(id))?;
                owners.push(id.clone());
                Some((owners.len() - 1) as u32)
            })
            .collect();
        let mut chunker = Chunker::new(
            self.config.join_chunk_records,
            self.config.max_frame_size / 4,
        );
        self.shared.store.for_each(|k, r| {
            if let Some(&Some(owner)) = wire.get(r.owner as usize) {
                chunker.push(WireRecord {
                    key: k.clone(),
                    value: r.value.clone(),
                    ts: r.ts,
                    owner,
                });
            }
        });
        let chunks = chunker.finish();
        let n = chunks.len();
        for (i, records) in chunks.into_iter().enumerate() {
            let body = JoinRep::Chunk {
                owners: owners.clone(),
                records,
                last: i + 1 == n,
            };
            match &origin {
                Origin::Local(tx) => {
                    let _ = tx.send(body);
                }
                Origin::Peer(key, req) => {
                    self.send_to(*key, &PeerMsg::JoinReply { req: *req, body })
                }
            }
        }
    }

    fn set_members(&mut self, members: &[NodeId], epoch: u64) {
        let mut set = BTreeSet::new();
        for id in members.iter().filter(|id| **id != self.me) {
            match self
                .owners
                .lookup(id)
                .filter(|k| self.links.get(k).is_some_and(|l| l.out.is_some()))
            {
                Some(k) => {
                    set.insert(k);
                }
                None => {
                    tracing::warn!(node = %id, "join named a member this node has no stream to")
                }
            }
        }
        self.members = set;
        self.epoch = epoch;
        for l in self.links.values_mut() {
            l.disagree_since = None;
        }
        self.publish_members();
        tracing::info!(members = ?self.shared.members.read().map(|m| m.iter().map(|n| n.name.clone()).collect::<Vec<_>>()).unwrap_or_default(), epoch, "joined");
        self.complete_pending();
    }

    // ------------------------------------------------------------------ joins (coordinator)

    /// Serves one control request; returns true when the server must stop.
    fn on_control(&mut self, c: Control<K, V>) -> bool {
        match c {
            Control::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Control::JoinRequest { to, body, replies } => {
                if to == self.me {
                    self.on_join_req(Origin::Local(replies), body);
                    return false;
                }
                let Some(key) = self
                    .owners
                    .lookup(&to)
                    .filter(|k| self.links.get(k).is_some_and(Link::ready))
                else {
                    return false; // dropping `replies` tells the coordinator the node is unreachable
                };
                self.next_req += 1;
                let req = self.next_req;
                let awaited = Awaited {
                    from: key,
                    tx: replies,
                    bytes: 0,
                };
                self.join_replies.insert(req, awaited);
                self.send_to(key, &PeerMsg::Join { req, body });
            }
            Control::JoinDone { peer: id, result } => {
                let base = self.config.join_backoff;
                let max = self.config.join_max_backoff;
                // A join with a node that went down meanwhile has no track left to update.
                let Some(peer) = self
                    .owners
                    .lookup(&id)
                    .filter(|k| self.links.get(k).is_some_and(|l| l.id == id))
                else {
                    return false;
                };
                let name = id.to_string();
                let track = self.joins.entry(peer).or_default();
                track.running = false;
                match result {
                    Ok(conflicts) => {
                        track.failures = 0;
                        track.next = None;
                        self.conflicts += conflicts;
                    }
                    Err(e) => {
                        track.failures = track.failures.saturating_add(1);
                        let exp = base.saturating_mul(1u32 << track.failures.min(16)).min(max);
                        let jitter = rand::random_range(0.5..1.5);
                        // Saturating: a back-off of `Duration::MAX` means "do not retry".
                        let wait =
                            Duration::try_from_secs_f64(exp.as_secs_f64() * jitter).unwrap_or(exp);
                        track.next = Some(crate::config::deadline_after(wait));
                        if track.failures >= 3 {
                            tracing::warn!(peer = %name, error = %e, failures = track.failures, "join failed; retrying");
                        } else {
                            tracing::debug!(peer = %name, error = %e, "join failed; retrying");
                        }
                    }
                }
            }
            Control::Stop(done) => {
                self.stop();
                let _ = done.send(());
                return true;
            }
        }
        false
    }

    /// Starts a join with `key` if it is due: both sides run the table, it is not a member, and
    /// this node has the smaller name (so two nodes never both coordinate the same pair).
    fn maybe_join(&mut self, key: OwnerIdx) {
        let Some(link) = self.links.get(&key) else {
            return;
        };
        if !link.ready() || self.members.contains(&key) || self.me.name >= link.id.name {
            return;
        }
        let track = self.joins.entry(key).or_default();
        if track.running || track.next.is_some_and(|t| Instant::now() < t) {
            return;
        }
        track.running = true;
        let peer = link.id.clone();
        let done_with = peer.clone();
        let ctx = JoinCtx {
            control: self.control_tx.clone(),
            me: self.me.clone(),
            kind: self.shared.kind,
            conflict: self.opts.conflict.clone(),
            clock: self.clock.clone(),
            lease: self.config.join_lease,
            chunk: self.config.join_chunk_records,
            chunk_bytes: self.config.max_frame_size / 4,
            table: self.shared.name.clone(),
            checkpoint: self.opts.join_checkpoint.clone(),
        };
        let control = self.control_tx.clone();
        tokio::spawn(
            async move {
                let result = join::run(ctx, peer).await;
                let _ = control.send(Control::JoinDone {
                    peer: done_with,
                    result,
                });
            }
            .in_current_span(),
        );
    }

    // ------------------------------------------------------------------ housekeeping

    fn on_tick(&mut self) {
        let now = Instant::now();
        self.ticks = self.ticks.wrapping_add(1);
        if self.paused.as_ref().is_some_and(|p| now > p.deadline) {
            tracing::warn!("join lease expired; unpausing");
            self.unpause();
        }
        let mut expired = Vec::new();
        while self.pending.front().is_some_and(|p| now > p.deadline) {
            if let Some(p) = self.pending.pop_front() {
                expired.push(p);
            }
        }
        // A member that acknowledged nothing for `ack_timeout` while its connection lives (its
        // table server is stuck, or it stopped reading) is dropped from the member list before
        // the callers hear of it: later writes stop waiting for it, and stop piling up in its
        // queue; the next join merges it back with what it missed.
        let mut dropped = false;
        let mut failures = Vec::new();
        for p in expired {
            let missing: Vec<OwnerIdx> = p
                .waiting
                .iter()
                .copied()
                .filter(|k| self.links.get(k).is_some_and(|l| l.acked < p.seq))
                .collect();
            let names: Vec<String> = missing
                .iter()
                .filter_map(|k| self.links.get(k))
                .map(|l| l.id.name.clone())
                .collect();
            for k in missing {
                if self.members.remove(&k) {
                    if let Some(l) = self.links.get(&k) {
                        tracing::warn!(peer = %l.id, timeout = ?self.opts.ack_timeout, "member acknowledged nothing in time; dropped until the next join");
                    }
                    dropped = true;
                }
            }
            failures.push((p.replies, names));
        }
        if dropped {
            self.publish_members();
        }
        for (replies, missing) in failures {
            for r in replies {
                let _ = r.send(Err(Error::AckTimeout {
                    table: self.shared.name.clone(),
                    missing: missing.clone(),
                    timeout: self.opts.ack_timeout,
                }));
            }
        }
        self.complete_pending();
        // Requests whose coordinator gave up (its join ended) wait for no reply any more.
        self.join_replies.retain(|_, a| !a.tx.is_closed());
        self.forget_tombstones();
        if let Some(ttl_ms) = self.shared.expire_ms {
            if now >= self.next_sweep {
                self.sweep_expired(ttl_ms);
                let every = Duration::from_millis(ttl_ms / 4).clamp(SWEEP_MIN, SWEEP_MAX);
                self.next_sweep = deadline_after(every);
            }
        }
        if self.ticks.is_multiple_of(ANNOUNCE_EVERY) {
            // Scans the tombstones: twice a second is often enough.
            self.release_gone_owners();
            // To every linked peer, not only members: a peer that is a member on one side only
            // learns our epoch this way.
            let msg = PeerMsg::<K, V>::Tick {
                clock: self.clock.now(),
                view: self.view(),
            };
            if let Ok(f) = frame::encode(&msg) {
                for l in self.links.values().filter(|l| l.ready()) {
                    l.queue(f.clone());
                }
            }
            self.check_views(now);
        }
        let keys: Vec<OwnerIdx> = self.links.keys().copied().collect();
        for k in keys {
            self.maybe_join(k);
        }
    }

    /// A member that reports another view (epoch and member list) than ours for longer than
    /// [`VIEW_GRACE`] took part in a join that did not finish everywhere. Both sides drop
    /// each other from their member lists; the next join merges them again.
    /// Removes the records that have expired (`TableOptions::expire_after`). Reads stopped
    /// returning them already. Every node removes the same records by the same rule, the
    /// write's stamp, so nothing is sent; and no tombstone is kept, since an older write of the
    /// key that may still arrive has expired too. Records are found under read locks and removed
    /// in one batch, as a delete would.
    fn sweep_expired(&mut self, ttl_ms: u64) {
        let before = HybridClock::written_since(ttl_ms);
        let store = &self.shared.store;
        let removed = if self.shared.kind == TableKind::Bag {
            let mut objects = Vec::new();
            store.for_each(|k, r| {
                if r.ts < before {
                    objects.push((k.clone(), r.value.clone()));
                }
            });
            objects
                .iter()
                .filter(|(k, v)| store.remove_object(k, v))
                .count()
        } else {
            let mut keys = Vec::new();
            store.for_each(|k, r| {
                if r.ts < before {
                    keys.push(k.clone());
                }
            });
            store
                .remove_many_if(&keys, |(ts, _)| ts < before)
                .into_iter()
                .filter(|r| *r == Some(true))
                .count()
        };
        if removed > 0 {
            tracing::debug!(removed, "expired records removed");
        }
    }

    fn check_views(&mut self, now: Instant) {
        if self.paused.is_some() {
            return;
        }
        let mut split = Vec::new();
        let view = self.view();
        for k in &self.members {
            let Some(l) = self.links.get_mut(k) else {
                continue;
            };
            match l.view {
                Some(v) if v != view => {
                    let since = *l.disagree_since.get_or_insert(now);
                    if now.duration_since(since) > VIEW_GRACE {
                        split.push(*k);
                    }
                }
                _ => l.disagree_since = None,
            }
        }
        for k in split {
            if let Some(l) = self.links.get_mut(&k) {
                tracing::warn!(peer = %l.id, "member lists disagree (half-finished join); leaving it to a new join");
                l.disagree_since = None;
                l.view = None;
            }
            self.members.remove(&k);
        }
        self.publish_members();
        self.complete_pending();
    }

    /// A hash of the epoch and the member list including this node: equal on every member of a
    /// consistent table.
    fn view(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut mix = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        mix(&self.epoch.to_le_bytes());
        for id in self.member_ids_with_me() {
            mix(id.name.as_bytes());
            mix(&id.incarnation.to_le_bytes());
        }
        h
    }

    fn status(&self) -> TableStatus {
        let view = self.view();
        let name_of = |k: &OwnerIdx| self.links.get(k).map(|l| l.id.name.clone());
        let mut not_joined: Vec<String> = self
            .links
            .iter()
            .filter(|(k, l)| !self.members.contains(k) && !l.lacks_table && l.refused.is_none())
            .map(|(_, l)| l.id.name.clone())
            .collect();
        not_joined.sort();
        let mut without_table: Vec<String> = self
            .links
            .values()
            .filter(|l| l.lacks_table)
            .map(|l| l.id.name.clone())
            .collect();
        without_table.sort();
        let mut joining: Vec<String> = self
            .joins
            .iter()
            .filter(|(_, t)| t.running)
            .filter_map(|(k, _)| name_of(k))
            .collect();
        joining.sort();
        let mut refused: Vec<(String, String)> = self
            .links
            .values()
            .filter_map(|l| l.refused.as_ref().map(|r| (l.id.name.clone(), r.clone())))
            .collect();
        refused.sort();
        let mut disagreeing: Vec<String> = self
            .members
            .iter()
            .filter_map(|k| self.links.get(k))
            .filter(|l| l.view.is_some_and(|v| v != view))
            .map(|l| l.id.name.clone())
            .collect();
        disagreeing.sort();
        TableStatus {
            name: self.shared.name.clone(),
            kind: self.shared.kind,
            len: self.shared.store.len(),
            members: self
                .shared
                .members
                .read()
                .map(|m| m.clone())
                .unwrap_or_default(),
            not_joined,
            without_table,
            joining,
            refused,
            paused: self.paused.is_some(),
            conflicts: self.conflicts,
            epoch: self.epoch,
            disagreeing,
            known_nodes: self.owners.len(),
        }
    }
}

/// The frame of `PeerMsg::Ops { seq, ops }` whose `count` ops are already encoded in `body`,
/// so each op is encoded once, however many peers receive it.
/// What a member's departure mixes into the epoch: its identity and the last of its batches
/// that this node applied with a lasting effect (`Link::lasting`).
fn departure_mark(id: &NodeId, lasting: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let (incarnation, lasting) = (id.incarnation.to_le_bytes(), lasting.to_le_bytes());
    for b in id
        .name
        .as_bytes()
        .iter()
        .chain(&incarnation)
        .chain(&lasting)
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Whether a record stamped `stamp` with `value` beats the key's tombstone `t`: it is newer, or
/// has the stamp of the version `t` stands for and would have beaten that version by value. A
/// tombstone of a delete wins every tie.
fn beats_tombstone<V: Serialize>(
    stamp: (u64, Option<&NodeId>),
    value: &V,
    t: TombstoneRef<'_>,
    owners: &Owners,
) -> bool {
    match stamp.cmp(&(t.ts, owners.get(t.owner))) {
        Ordering::Greater => true,
        Ordering::Less => false,
        Ordering::Equal => t.value.is_some_and(|deleted| {
            postcard::to_stdvec(value).is_ok_and(|v| v.as_slice() > deleted)
        }),
    }
}

/// Keeps the last of the records of each key, in their order (one write's records, before
/// stamping: see `Server::with_owners`).
fn last_of_each_key<T, K: Hash + Eq>(records: &mut Vec<T>, key: impl Fn(&T) -> &K) {
    let mut last: HashMap<&K, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(records.len(), Default::default());
    for (i, r) in records.iter().enumerate() {
        last.insert(key(r), i);
    }
    if last.len() == records.len() {
        return;
    }
    let keep: Vec<bool> = records
        .iter()
        .enumerate()
        .map(|(i, r)| last.get(key(r)) == Some(&i))
        .collect();
    drop(last);
    let mut keep = keep.into_iter();
    records.retain(|_| keep.next().unwrap_or(true));
}

fn ops_frame(seq: u64, count: usize, body: &[u8]) -> Result<Bytes> {
    // Encode the message with no ops, drop the trailing zero length, append the real one.
    let mut head = postcard::to_stdvec(&PeerMsg::<(), ()>::Ops {
        seq,
        ops: Vec::new(),
    })?;
    head.pop();
    let head = postcard::to_extend(&count, head)?;
    let len = head.len() + body.len();
    let len32 = u32::try_from(len).map_err(|_| Error::FrameTooLarge {
        size: len,
        limit: u32::MAX as usize,
    })?;
    let mut buf = Vec::with_capacity(frame::PREFIX + len);
    buf.extend_from_slice(&len32.to_le_bytes());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(body);
    Ok(Bytes::from(buf))
}

/// Opens the table stream to a peer and writes everything queued to it, batching what
/// accumulated while the previous write was in flight into one `write_all_chunks`.
fn spawn_writer<K: Key, V: Value>(
    pc: PeerConn,
    header: Bytes,
    key: OwnerIdx,
    gen: u64,
    inputs: mpsc::Sender<Input<K, V>>,
    limit: usize,
) -> Outbox {
    let (tx, mut rx) = outbox(limit);
    tokio::spawn(
        async move {
            let result: std::result::Result<(), quinn::WriteError> = async {
                let mut send = pc
                    .conn
                    .open_uni()
                    .await
                    .map_err(quinn::WriteError::ConnectionLost)?;
                send.write_all(&header).await?;
                let mut batch: Vec<Bytes> = Vec::with_capacity(64);
                loop {
                    // Also notice a peer that stops the stream while we have nothing to send
                    // (it runs no such table), so the link is known closed at once.
                    let b = tokio::select! {
                        b = rx.recv() => b,
                        stopped = send.stopped() => {
                            return Err(match stopped {
                                Ok(Some(code)) => quinn::WriteError::Stopped(code),
                                Ok(None) => quinn::WriteError::ClosedStream,
                                Err(quinn::StoppedError::ConnectionLost(e)) => quinn::WriteError::ConnectionLost(e),
                                Err(_) => quinn::WriteError::ClosedStream,
                            });
                        }
                    };
                    let Some(b) = b else { break };
                    batch.push(b);
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Some(b) => batch.push(b),
                            None => break,
                        }
                    }
                    if rx.overflowed() {
                        // The table server is closing the connection: nothing more is written.
                        return Err(quinn::WriteError::ClosedStream);
                    }
                    let bytes: usize = batch.iter().map(Bytes::len).sum();
                    send.write_all_chunks(&mut batch).await?;
                    rx.written(bytes);
                    batch.clear();
                }
                let _ = send.finish();
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let stop_code = match &e {
                    quinn::WriteError::Stopped(code) => u32::try_from(code.into_inner()).ok(),
                    _ => None,
                };
                let _ = inputs
                    .send(Input::LinkClosed {
                        key,
                        link: gen,
                        reason: e.to_string(),
                        stop_code,
                    })
                    .await;
            }
        }
        .in_current_span(),
    );
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_frame_decodes_as_peer_msg() {
        let ops = vec![
            Op {
                ts: 7,
                kind: OpKind::Insert(vec![(1u64, "a".to_string())]),
            },
            Op {
                ts: 8,
                kind: OpKind::Delete(vec![2u64]),
            },
        ];
        let mut body = Vec::new();
        for op in &ops {
            body = postcard::to_extend(op, body).unwrap();
        }
        for (count, body) in [(2, &body[..]), (0, &[][..])] {
            let f = ops_frame(300, count, body).unwrap();
            match frame::decode::<PeerMsg<u64, String>>(&f[frame::PREFIX..]).unwrap() {
                PeerMsg::Ops { seq, ops } => {
                    assert_eq!(seq, 300);
                    assert_eq!(ops.len(), count);
                }
                _ => panic!("wrong variant"),
            }
        }
    }
}
