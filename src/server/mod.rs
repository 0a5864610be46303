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
//!
//! Where each part lives (`impl Server` blocks over the state defined here, and sub-states that
//! own their invariants, each a struct with its own methods and unit tests):
//! - this file: the state, the select loop (`run`) and the routing of each event, control
//!   request and peer message to its handler; nothing else;
//! - sub-states: `peers` (the links to connected peers and the members among them: every
//!   member has a link with an outbound stream, old links' reports are told apart), `commit`
//!   (group commit: batch numbers, batches awaiting acks, completed in order), `pause` (the
//!   participant's pause for a join: one join at a time, ended joins never pause again),
//!   `joins` (the coordinator's requests awaiting replies, the back-off per peer),
//!   `anti_entropy::AntiEntropy`, `claims::Claims`, `persist::PersistState`;
//! - `lifecycle`: building the state from the node's parts, and stopping;
//! - `writes`: client writes, group commit and the `Ops` frame (where an insert is replicated);
//! - `inbound`: a peer's batches, acks and ticks (where a replicated insert arrives);
//! - `links`: the table streams to and from each peer, their reader and writer tasks, the
//!   acks and clock notes sent on them;
//! - `apply`: applying a write, local or replicated (newer wins, tombstones, owners), with the
//!   pure rules in `rules`;
//! - `node_down`: dropping a departed member's records and releasing what named it;
//! - `participant` (one file per join request) and `coordinator`: the two sides of a join
//!   (with `crate::join`);
//! - `anti_entropy`: digest rounds, the comparison, the decision and the repair, and the
//!   comparison at a cut;
//! - `claims` (`insert_new`), `cluster` (cluster-owned tables), `notify` (subscribers),
//!   `persist` and `wal` (snapshots and the write-ahead log), `observe` (metrics), `clock`;
//! - `housekeeping`: the tick (leases, ack timeouts, tombstones, expiry, view checks) and status.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::VarInt;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::config::{deadline_after, NodeConfig};
use crate::frame::{self, FrameReader};
use crate::hlc::HybridClock;
use crate::join::{self, JoinCtx};
use crate::membership::{NodeId, OwnerIdx, Owners};
use crate::metrics::TableMetrics;
use crate::object_deletes::ObjectDeletes;
use crate::options::TableOptions;
use crate::outbox::{outbox, Outbox, Refused};
use crate::proto::{
    close, Chunker, JoinRep, JoinReq, Op, OpKind, PeerMsg, StreamHeader, WireRecord,
};
use crate::registry::{PeerConn, TableEvent};
use crate::repeats::Repeats;
use crate::shared::Shared;
use crate::status::TableStatus;
use crate::store::{same_value, value_order};
use crate::tombstones::{Tombstone, Tombstones};
use crate::types::Rec;
use crate::types::{Key, TableKind, Value};
use crate::{Error, Result};

use commit::{GroupCommit, Pending};
use joins::Joins;
use pause::PauseState;
use peers::{Conn, Link, Peers};

/// How often the server checks leases, ack timeouts, tombstones and due joins.
const TICK: Duration = Duration::from_millis(100);
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

/// A client write (or, with `op: None`, a sync barrier).
pub(crate) struct Write<K, V> {
    pub op: Option<OpKind<K, V>>,
    pub reply: oneshot::Sender<Result<()>>,
    /// An `insert_new` (`claims.rs`): the op is its one record, inserted only if it wins.
    pub claim: Option<Claim<V>>,
}

/// Requests from handles, the node and join coordinators; served even while paused.
pub(crate) enum Control<K, V> {
    Status(oneshot::Sender<TableStatus>),
    /// Send a join request to `to` (may be this node) and stream its replies back.
    JoinRequest(join::JoinRequest<K, V>),
    JoinDone {
        peer: NodeId,
        result: Result<u64>,
        /// A node answered the join's pause `Busy`.
        busy: bool,
    },
    Stop(oneshot::Sender<()>),
    /// Register a subscriber between two changes (`crate::subscription`).
    Subscribe(crate::subscription::SubscribeReq<K, V>),
    /// A change of this replica only (tests of anti-entropy).
    #[cfg(feature = "testing")]
    Testing(TestWrite<K, V>, oneshot::Sender<()>),
    /// A member's `insert_new` was decided here: answer it on its link (`claims.rs`).
    ClaimDone {
        peer: OwnerIdx,
        gen: u64,
        req: u64,
        outcome: crate::proto::ClaimOutcome<V>,
    },
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
        /// Which of the link's outbound streams closed (`Link::writer`): a link can open a new
        /// one before the close of the old one is handled, and that late close must not take
        /// the new stream with it.
        writer: u64,
        reason: String,
        stop_code: Option<u32>,
    },
}

pub(crate) struct Server<K, V> {
    shared: Arc<Shared<K, V>>,
    opts: TableOptions<K, V>,
    config: NodeConfig,
    clock: Arc<HybridClock>,
    me: NodeId,
    me_idx: OwnerIdx,
    owners: Owners,
    /// The links to connected peers and the members among them (`peers.rs`).
    peers: Peers,
    epoch: u64,
    /// Group commit: the batches' sequence and those awaiting acks (`commit.rs`).
    commit: GroupCommit,
    tombstones: Tombstones<K>,
    /// Applied `delete_object`s an older insert may still follow (`crate::object_deletes`).
    object_deletes: ObjectDeletes<K>,
    /// The participant's pause for a join (`pause.rs`).
    pause: PauseState<K, V>,
    /// The joins coordinated here: requests awaiting replies, back-off per peer (`joins.rs`).
    joins: Joins<K, V>,
    ticks: u32,
    /// When `flush_acks` may next tell the members our clock.
    next_clock_note: Instant,
    header: Bytes,
    writes: mpsc::Receiver<Write<K, V>>,
    control: mpsc::UnboundedReceiver<Control<K, V>>,
    control_tx: mpsc::UnboundedSender<Control<K, V>>,
    events: mpsc::UnboundedReceiver<TableEvent>,
    inputs: mpsc::Receiver<Input<K, V>>,
    inputs_tx: mpsc::Sender<Input<K, V>>,
    to_ack: HashMap<OwnerIdx, u64>,
    /// Owner indexes of nodes that went down, released once nothing refers to them.
    gone: HashSet<OwnerIdx>,
    /// Finds keys named twice in one insert (`with_owners`).
    repeats: Repeats,
    /// When expired records are removed next (`TableOptions::expire_after`).
    next_sweep: Instant,
    /// The table's metric handles (`crate::metrics`).
    metrics: TableMetrics,
    /// Snapshots (`TableOptions::persist`).
    persist: persist::PersistState,
    /// Anti-entropy: rounds, what each member applied, what was repaired (`anti_entropy/`).
    ae: anti_entropy::AntiEntropy,
    /// `insert_new` calls forwarded to the leader, or served as the leader (`claims.rs`).
    claims: claims::Claims<K, V>,
    /// This table's own write queue: claims decided here go through it, in turn.
    writes_tx: mpsc::Sender<Write<K, V>>,
}

mod anti_entropy;
#[cfg(feature = "testing")]
pub(crate) use anti_entropy::TestWrite;
mod apply;
mod claims;
mod clock;
mod cluster;
mod commit;
mod coordinator;
mod housekeeping;
mod inbound;
mod join_wake;
mod joins;
mod lifecycle;
mod links;
mod node_down;
mod notify;
mod observe;
mod participant;
mod pause;
mod peers;
mod persist;
mod rules;
mod wal;
mod writes;

pub(crate) use lifecycle::ServerParts;
use participant::Origin;
pub(crate) use persist::Restored;

pub(crate) use claims::Claim;

impl<K: Key, V: Value> Server<K, V> {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = Instant::now();
        loop {
            let can_write = !self.pause.is_paused() && self.commit.in_flight() < MAX_IN_FLIGHT;
            tokio::select! {
                biased;
                Some(ev) = self.events.recv() => self.on_event(ev),
                Some(c) = self.control.recv() => {
                    let started = Instant::now();
                    if self.on_control(c) {
                        return;
                    }
                    if started.elapsed() >= MAX_BURST {
                        // A heavy step of a join (a chunk applied here): the join task it woke
                        // waits on this thread until this task yields, and must renew its lease.
                        tokio::task::yield_now().await;
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
                    if !self.pause.is_paused() && self.commit.in_flight() < MAX_IN_FLIGHT {
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

    /// A node event: a peer connected or went down, its table stream arrived, or it refused
    /// the table.
    fn on_event(&mut self, ev: TableEvent) {
        match ev {
            TableEvent::PeerUp(pc) => {
                self.ensure_link(pc);
            }
            TableEvent::PeerDown(id) => self.peer_down(&id),
            TableEvent::Inbound(pc, reader) => self.on_inbound(pc, reader),
            TableEvent::Refused { peer, reason } => {
                if let Some(key) = self.owners.lookup(&peer) {
                    self.peers.refuse(key, reason);
                }
            }
        }
    }

    /// What a link's reader and writer tasks report; an old link's reports are dropped.
    fn on_input(&mut self, input: Input<K, V>) {
        match input {
            Input::Msg {
                key,
                gen,
                msg,
                size,
                _room,
            } => {
                if self.peers.is_current(key, gen) {
                    self.on_peer_msg(key, msg, size);
                }
            }
            Input::LinkClosed {
                key,
                link,
                writer,
                reason,
                stop_code,
            } => self.on_stream_closed(key, link, writer, stop_code, &reason),
        }
    }

    /// A message of a peer's table stream, to its handler.
    fn on_peer_msg(&mut self, key: OwnerIdx, msg: PeerMsg<K, V>, size: usize) {
        match msg {
            PeerMsg::Ops { seq, ops } => self.on_ops(key, seq, ops),
            PeerMsg::Ack { seq, clock } => self.on_ack(key, seq, clock),
            PeerMsg::Tick { clock, view } => self.on_peer_tick(key, clock, view),
            PeerMsg::Join { req, body } => self.on_join_req(Origin::Peer(key, req), body),
            PeerMsg::JoinReply { req, body } => self.on_join_reply(key, req, body, size),
            PeerMsg::AntiEntropy(m) => self.on_ae(key, m),
            PeerMsg::InsertNew {
                req,
                key: k,
                value,
                retry,
            } => self.on_peer_claim(key, req, k, value, retry),
            PeerMsg::InsertNewReply { req, outcome } => self.on_claim_reply(key, req, outcome),
        }
    }

    /// A request of a handle, the node or a join coordinator; true when the server must stop.
    fn on_control(&mut self, c: Control<K, V>) -> bool {
        match c {
            Control::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Control::JoinRequest(request) => self.on_join_request(request),
            Control::JoinDone { peer, result, busy } => self.on_join_done(peer, result, busy),
            Control::Subscribe(req) => self.on_subscribe(req),
            #[cfg(feature = "testing")]
            Control::Testing(w, done) => {
                self.test_write(w);
                let _ = done.send(());
            }
            Control::ClaimDone {
                peer,
                gen,
                req,
                outcome,
            } => self.on_claim_done(peer, gen, req, outcome),
            Control::Stop(done) => {
                self.stop();
                // A table with persistence answers once its final snapshot is written.
                self.final_snapshot(done);
                return true;
            }
        }
        false
    }
}
