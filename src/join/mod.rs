//! The join coordinator: merges the partition of this node's table with a peer's partition.
//!
//! The protocol is written down in `ALGORITHM.md` at the root of the repository (section 9.2);
//! the step numbers here and in the comments of these files are its steps:
//! 1. Info: ask both sides for their member lists; equal lists mean already joined (`run`);
//! 2. Lock: pause every server of both partitions, one at a time in node order, as a lease that
//!    this task renews while it works (a busy server makes the whole join back off) (`run`,
//!    `lock::Lease`);
//! 3. Reachability: every locked node must reach every other (`lock::unreachable_pair`);
//! 4. Views: the lists seen under the lock must still name exactly the locked nodes
//!    (`merge::merge`, `lock::same_nodes`);
//! 5. Sources: one server per partition dumps, or every server if a partition is not consistent
//!    (`merge::sources`);
//! 6. Dump: the sources send their records, without records of owners that are not alive
//!    (`dump.rs`);
//! 7. Exchange or merge: two consistent sides under last writer wins send each dump to the other
//!    side, and every receiver keeps the later version per key (`exchange.rs`); otherwise the
//!    conflict rule picks one winner per key, once, and each node is sent what it lacks
//!    (`decide.rs`);
//! 8. Apply: each node stores the records and, with the last chunk, the full member list
//!    (`apply.rs`);
//! 9. Unpause everyone (also on failure), so buffered writes go on (`lock::release`).
//!
//! The participant's side of each step is `crate::server::participant`, one file per request.

mod apply;
mod decide;
mod dump;
mod exchange;
mod lock;
mod merge;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::authority;
use crate::conflict::Conflict;
use crate::hlc::HybridClock;
use crate::membership::NodeId;
use crate::proto::{JoinRep, JoinReq};
use crate::types::{Key, TableKind, Value};
use crate::{Error, Result};

use lock::{release, unreachable_pair, Lease};

/// A test hook awaited by a join coordinator at named checkpoints (see
/// `TableOptions::join_checkpoint`).
pub(crate) type JoinCheckpointFn = Arc<
    dyn Fn(&'static str) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// A chunk of a source's tombstones: its owner list and the tombstones that index it (read
/// by `dump`, decided on by `decide`, applied by `apply`).
type TombstoneChunk<K> = (Vec<NodeId>, Vec<crate::proto::WireTombstone<K>>);

/// A request of the coordinator for its table server to send to `to` (this node or a peer);
/// the server streams the replies back on `replies`.
pub(crate) struct JoinRequest<K, V> {
    pub to: NodeId,
    pub body: JoinReq<K, V>,
    pub replies: mpsc::UnboundedSender<JoinRep<K, V>>,
}

/// How the coordinator hands its requests to its table server (which wraps them in its control
/// messages): the join knows nothing of the server.
pub(crate) type JoinPort<K, V> = Arc<dyn Fn(JoinRequest<K, V>) + Send + Sync>;

/// What the coordinator needs from its table server.
pub(crate) struct JoinCtx<K, V> {
    pub port: JoinPort<K, V>,
    pub me: NodeId,
    pub kind: TableKind,
    pub conflict: Conflict<K, V>,
    pub clock: Arc<HybridClock>,
    pub lease: Duration,
    pub chunk: usize,
    pub chunk_bytes: usize,
    /// Records one source's dump may bring at most (`NodeConfig::max_join_records`).
    pub max_records: u64,
    pub table: String,
    pub checkpoint: Option<JoinCheckpointFn>,
    /// The table's record lifetime in milliseconds (`TableOptions::expire_after`), if any.
    pub expire_ms: Option<u64>,
    /// The table is cluster-owned: dumps carry tombstones and writer names as owners.
    pub cluster: bool,
    /// Records sent in `Apply` requests so far (`cets_join_records_total`).
    pub moved: Arc<AtomicU64>,
    /// Set when a node answered the pause `Busy`: the table server then retries this join as
    /// soon as a pause ends instead of after its back-off (`server::join_wake`).
    pub busy: Arc<AtomicBool>,
    /// The table streams to the peers (when the join started), for the lease's renewals: they
    /// go out from here, not through this node's table server, which may be busy for longer
    /// than the lease with the join's own work (its dump, the chunks it applies).
    pub streams: HashMap<NodeId, crate::outbox::Outbox>,
}

impl<K: Key, V: Value> JoinCtx<K, V> {
    fn fail(&self, peer: &NodeId, reason: impl Into<String>) -> Error {
        Error::Join {
            table: self.table.clone(),
            peer: peer.to_string(),
            reason: reason.into(),
        }
    }

    fn request(&self, to: &NodeId, body: JoinReq<K, V>) -> mpsc::UnboundedReceiver<JoinRep<K, V>> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let JoinReq::Apply { records, .. } = &body {
            self.moved
                .fetch_add(records.len() as u64, Ordering::Relaxed);
        }
        (self.port)(JoinRequest {
            to: to.clone(),
            body,
            replies: tx,
        });
        rx
    }

    async fn next(
        &self,
        to: &NodeId,
        rx: &mut mpsc::UnboundedReceiver<JoinRep<K, V>>,
    ) -> Result<JoinRep<K, V>> {
        match tokio::time::timeout(self.lease, rx.recv()).await {
            Ok(Some(rep)) => Ok(rep),
            Ok(None) => Err(self.fail(to, "node unreachable or gone")),
            Err(_) => Err(self.fail(to, "no answer within the lease")),
        }
    }

    async fn ask(&self, to: &NodeId, body: JoinReq<K, V>) -> Result<JoinRep<K, V>> {
        let mut rx = self.request(to, body);
        self.next(to, &mut rx).await
    }
}

/// Runs one join of this node's table with `peer`'s. Returns the number of conflicting keys.
pub(crate) async fn run<K: Key, V: Value>(ctx: JoinCtx<K, V>, peer: NodeId) -> Result<u64> {
    // 1. Info.
    let local = match ctx.ask(&ctx.me, JoinReq::Info).await? {
        JoinRep::Info { members, .. } => members,
        _ => return Err(ctx.fail(&ctx.me, "unexpected reply to Info")),
    };
    let remote = match ctx.ask(&peer, JoinReq::Info).await? {
        JoinRep::Info { members, .. } => members,
        _ => return Err(ctx.fail(&peer, "unexpected reply to Info")),
    };
    if local == remote {
        return Ok(0);
    }
    let all: BTreeSet<NodeId> = local.iter().chain(remote.iter()).cloned().collect();
    let join: u64 = rand::random();
    let lease_ms = ctx.lease.as_millis() as u64;

    // 2. Lock, in the global order.
    let mut locked: Vec<NodeId> = Vec::new();
    let mut views: BTreeMap<NodeId, (Vec<NodeId>, u64)> = BTreeMap::new();
    let mut reach: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
    let mut sizes: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut missed = authority::Missed::default();
    for n in &all {
        match ctx.ask(n, JoinReq::Pause { join, lease_ms }).await {
            Ok(JoinRep::Paused {
                members,
                epoch,
                reachable,
                len,
                missed: m,
            }) => {
                missed.note(n, m);
                sizes.insert(n.clone(), len);
                locked.push(n.clone());
                views.insert(n.clone(), (members, epoch));
                reach.insert(n.clone(), reachable);
            }
            Ok(JoinRep::Busy { by }) => {
                ctx.busy.store(true, Ordering::Relaxed);
                release(&ctx, &locked, join).await;
                return Err(ctx.fail(n, format!("busy with a join coordinated by {by}")));
            }
            // `n` may still pause after we give up on it (its answer waits for its pending
            // writes): it hears the unpause too, and refuses a pause of this join after it.
            Ok(_) => {
                locked.push(n.clone());
                release(&ctx, &locked, join).await;
                return Err(ctx.fail(n, "unexpected reply to Pause"));
            }
            Err(e) => {
                locked.push(n.clone());
                release(&ctx, &locked, join).await;
                return Err(e);
            }
        }
    }
    let mut lease = Lease::new(locked.clone(), join, lease_ms, ctx.lease / 3);
    if let Some(f) = &ctx.checkpoint {
        f("locked").await;
    }
    // 3. Reachability.
    let result = match unreachable_pair(&all, &reach) {
        Some((a, b)) => Err(ctx.fail(&peer, format!("{a} cannot reach {b}; not joining"))),
        None => {
            let keep = authority::kept_outsiders(&all, &reach, &missed);
            let facts = Facts {
                views: &views,
                sizes: &sizes,
                missed: &missed,
                keep: &keep,
            };
            merge::merge(&ctx, &peer, join, &all, facts, &mut lease).await
        }
    };
    // 9. Unpause.
    release(&ctx, &locked, join).await;
    result
}

/// What the lock learnt from each node.
struct Facts<'a> {
    views: &'a BTreeMap<NodeId, (Vec<NodeId>, u64)>,
    sizes: &'a BTreeMap<NodeId, u64>,
    missed: &'a authority::Missed,
    /// Linked nodes outside the join whose records it carries (`authority::kept_outsiders`).
    keep: &'a [NodeId],
}

/// A source of the join and the nodes its dump stands for.
type Group = (NodeId, Vec<NodeId>);
