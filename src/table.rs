//! The table handle users hold, the table kinds and the start options.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::conflict::Conflict;
use crate::digest::Records;
use crate::membership::NodeId;
use crate::proto::OpKind;
use crate::server::{Control, Write};
use crate::{Error, Result};

/// What a key maps to, as in ETS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TableKind {
    /// One value per key (hash table).
    Set,
    /// One value per key, keys kept in order (`range` works).
    OrderedSet,
    /// Any number of distinct values per key.
    Bag,
}

impl fmt::Display for TableKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TableKind::Set => "set",
            TableKind::OrderedSet => "ordered_set",
            TableKind::Bag => "bag",
        })
    }
}

/// The bounds every key type satisfies.
pub trait Key:
    Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync + fmt::Debug + 'static
{
}
impl<
        T: Serialize + DeserializeOwned + Clone + Eq + Hash + Ord + Send + Sync + fmt::Debug + 'static,
    > Key for T
{
}
/// The bounds every value type satisfies.
pub trait Value: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static> Value for T {}

/// Called with the node that went down and the records it owned, once they are dropped.
pub type NodeDownFn<K, V> = Arc<dyn Fn(&NodeId, &[(K, V)]) + Send + Sync>;
/// A test hook awaited by a join coordinator at named checkpoints (see
/// [`TableOptions::join_checkpoint`]).
pub(crate) type JoinCheckpointFn = Arc<
    dyn Fn(&'static str) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;
/// Names the node that owns a record (see [`TableOptions::owner`]).
pub type OwnerFn<K, V> = Arc<dyn Fn(&K, &V) -> String + Send + Sync>;

/// How to start a table: its kind and behaviour. Start from [`TableOptions::set`],
/// [`TableOptions::ordered_set`] or [`TableOptions::bag`].
pub struct TableOptions<K, V> {
    pub(crate) kind: TableKind,
    pub(crate) conflict: Conflict<K, V>,
    pub(crate) on_node_down: Option<NodeDownFn<K, V>>,
    pub(crate) owner: Option<OwnerFn<K, V>>,
    pub(crate) ack_timeout: Duration,
    pub(crate) join_checkpoint: Option<JoinCheckpointFn>,
    pub(crate) expire_after: Option<Duration>,
    pub(crate) subscription_buffer: usize,
    pub(crate) ownership: crate::Ownership,
    pub(crate) tombstone_retention: Duration,
    pub(crate) persist: Option<crate::persistence::PersistOptions>,
}

impl<K, V> Clone for TableOptions<K, V> {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            conflict: self.conflict.clone(),
            on_node_down: self.on_node_down.clone(),
            owner: self.owner.clone(),
            ack_timeout: self.ack_timeout,
            join_checkpoint: self.join_checkpoint.clone(),
            expire_after: self.expire_after,
            subscription_buffer: self.subscription_buffer,
            ownership: self.ownership,
            tombstone_retention: self.tombstone_retention,
            persist: self.persist.clone(),
        }
    }
}

impl<K, V> fmt::Debug for TableOptions<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableOptions")
            .field("kind", &self.kind)
            .field("conflict", &self.conflict)
            .field("on_node_down", &self.on_node_down.is_some())
            .field("owner", &self.owner.is_some())
            .field("ack_timeout", &self.ack_timeout)
            .field("expire_after", &self.expire_after)
            .field("ownership", &self.ownership)
            .field("tombstone_retention", &self.tombstone_retention)
            .finish()
    }
}

impl<K, V> TableOptions<K, V> {
    fn of(kind: TableKind) -> Self {
        Self {
            kind,
            conflict: Conflict::LastWriterWins,
            on_node_down: None,
            owner: None,
            ack_timeout: Duration::from_secs(30),
            join_checkpoint: None,
            expire_after: None,
            subscription_buffer: crate::subscription::DEFAULT_SUBSCRIPTION_BUFFER,
            ownership: crate::Ownership::Node,
            tombstone_retention: crate::ownership::DEFAULT_TOMBSTONE_RETENTION,
            persist: None,
        }
    }

    /// A hash table: one value per key.
    pub fn set() -> Self {
        Self::of(TableKind::Set)
    }

    /// An ordered table: one value per key, [`Table::range`] in key order.
    pub fn ordered_set() -> Self {
        Self::of(TableKind::OrderedSet)
    }

    /// A bag: any number of distinct values per key ([`Table::lookup`] returns them all).
    /// Writes to a bag are applied in arrival order; a join takes the union of both sides.
    pub fn bag() -> Self {
        Self::of(TableKind::Bag)
    }

    /// The table's kind.
    pub fn kind(&self) -> TableKind {
        self.kind
    }

    /// Decides, during a join, between two records with the same key (not used by bags).
    /// The handler runs once per conflicting key on the coordinating node; its result is stored
    /// on every node. Keep it pure and fast. If it panics, that join fails (logged with the
    /// key) and is retried later.
    pub fn conflict_handler<F>(mut self, f: F) -> Self
    where
        F: Fn(&K, &V, &V) -> V + Send + Sync + 'static,
    {
        self.conflict = Conflict::Handler(Arc::new(f));
        self
    }

    /// Resolves join conflicts by last writer wins (the default).
    pub fn last_writer_wins(mut self) -> Self {
        self.conflict = Conflict::LastWriterWins;
        self
    }

    /// Called on every surviving node when a node goes down, with the records it owned, after
    /// they were dropped. Runs inside the table's server: do not await writes to this table
    /// from it (spawn a task instead). A panic in it is caught and logged.
    pub fn on_node_down<F>(mut self, f: F) -> Self
    where
        F: Fn(&NodeId, &[(K, V)]) + Send + Sync + 'static,
    {
        self.on_node_down = Some(Arc::new(f));
        self
    }

    /// Names the node that owns a record (default: the node that wrote it). A record is
    /// dropped everywhere when its owner goes down.
    ///
    /// `f` runs once per record, on the node that writes it, and the owner it picks travels
    /// with the write, so every replica stores the same owner. The name must be the writing
    /// node's or that of a member of this table (a node running it and joined with this one);
    /// any other name leaves the record owned by the writer. A replica that has already seen
    /// the named owner go down when the write arrives does not store the record, as the writer
    /// will drop it once it sees the same. If `f` panics, the write fails with
    /// [`Error::Callback`] and nothing of it is stored.
    pub fn owner<F>(mut self, f: F) -> Self
    where
        F: Fn(&K, &V) -> String + Send + Sync + 'static,
    {
        self.owner = Some(Arc::new(f));
        self
    }

    /// Testing hook: a join coordinated by this node awaits `f(checkpoint)` at
    /// `"locked"` (every server paused, nothing dumped yet) and `"before_apply"` (merge done,
    /// nothing sent) and `"between_groups"` (the first partition has its records and the new
    /// member list, the other has not). Tests use it to stall or kill a coordinator at a precise step.
    #[doc(hidden)]
    pub fn join_checkpoint<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn(&'static str) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.join_checkpoint = Some(Arc::new(move |c| Box::pin(f(c))));
        self
    }

    /// How long a write waits for the peers' acknowledgements before it returns
    /// [`Error::AckTimeout`] (the write stays applied). Default 30 s. The members that did not
    /// acknowledge in time are dropped from the table's member list, so later writes do not wait
    /// for them; the next join merges them back with what they missed. `Duration::MAX` waits
    /// as long as their connections live.
    pub fn ack_timeout(mut self, d: Duration) -> Self {
        self.ack_timeout = d;
        self
    }

    /// Makes every record expire `ttl` after it was written, for caches and other data that
    /// must not outlive its use. Reads stop returning a record as soon as its age (by this
    /// node's clock, from the write's timestamp) reaches `ttl`; the table server removes it a
    /// little later, within a quarter of `ttl` (at least 100 ms, at most 1 min), with no
    /// message on the wire: each node drops the same records by the same rule. Writing a key
    /// again renews it; a bag's objects expire one by one. Default: records never expire.
    ///
    /// Tuning: the precision is the clock skew between the nodes (a record written on a node
    /// whose clock runs ahead lives that much longer everywhere). Until the sweep removes them,
    /// expired records still count in [`Table::len`] and take memory, so a `ttl` of minutes
    /// holds up to a quarter more than the live set. Every node of a table must give the same
    /// `ttl` (to the millisecond): nodes that differ refuse each other's table, as for
    /// different types. A `ttl` under 1 ms is refused by [`crate::Node::start`]; one of more
    /// than a thousand years means never.
    pub fn expire_after(mut self, ttl: Duration) -> Self {
        self.expire_after = Some(ttl);
        self
    }

    /// Who the records belong to (default [`crate::Ownership::Node`]). Every node of a table
    /// must choose the same: nodes that differ refuse each other's table.
    pub fn ownership(mut self, ownership: crate::Ownership) -> Self {
        self.ownership = ownership;
        self
    }

    /// Records belong to the cluster, not to the node that wrote them: short for
    /// `ownership(Ownership::Cluster)` (see [`crate::Ownership::Cluster`]).
    pub fn cluster_owned(self) -> Self {
        self.ownership(crate::Ownership::Cluster)
    }

    /// Snapshots the table as `p` says, and restores the last snapshot when the table starts
    /// (see [`crate::persistence`]): a node-owned table restores the records this node's name
    /// owned (they become the new incarnation's), a cluster-owned table every record and the
    /// tombstones younger than its retention. The join that follows merges them with the live
    /// members by stamp.
    pub fn persist(mut self, p: crate::persistence::PersistOptions) -> Self {
        self.persist = Some(p);
        self
    }

    /// The table's ownership mode.
    pub fn ownership_mode(&self) -> crate::Ownership {
        self.ownership
    }

    /// How long a cluster-owned table keeps the tombstone of a delete (default
    /// [`crate::ownership::DEFAULT_TOMBSTONE_RETENTION`], one hour): a key deleted on one side
    /// of a partition that heals within it stays deleted; past it, the other side's older
    /// record comes back. No effect on node-owned tables, which forget a tombstone as soon as
    /// every member's clock passed it.
    pub fn tombstone_retention(mut self, retention: Duration) -> Self {
        self.tombstone_retention = retention;
        self
    }
}

/// State shared by the handles and the table's server.
pub(crate) struct Shared<K, V> {
    pub name: String,
    pub kind: TableKind,
    pub store: Records<K, V>,
    /// Published by the server whenever membership changes.
    pub members: RwLock<Vec<NodeId>>,
    /// How long records live, in milliseconds (`TableOptions::expire_after`).
    pub expire_ms: Option<u64>,
    /// The change log of subscribers (`crate::subscription`).
    pub hub: Arc<crate::subscription::Hub<K, V>>,
    /// Set for good once a record with a lifetime of its own was stored here
    /// (`Table::insert_with_ttl`): reads check each record's lifetime from then on.
    pub record_ttl: std::sync::atomic::AtomicBool,
}

impl<K, V> Shared<K, V> {
    /// The oldest write stamp a read may return: 0, or in a table whose records expire, the
    /// stamp of a write made `expire_ms` ago.
    #[inline]
    pub(crate) fn live_from(&self) -> u64 {
        match self.expire_ms {
            // 1, not 0: a read must look at each record's own lifetime (`Store::contains_key`
            // skips that for 0). Every stamp is at least 1.
            None if self.has_record_ttl() => 1,
            None => 0,
            Some(ms) => expired_before(ms),
        }
    }

    /// Whether records with a lifetime of their own may be stored.
    #[inline]
    pub(crate) fn has_record_ttl(&self) -> bool {
        self.record_ttl.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Out of line: reading the clock in every read made reads too large to inline, with or
/// without expiry (measured: `get` at 0.8 of its speed).
#[inline(never)]
fn expired_before(ttl_ms: u64) -> u64 {
    crate::hlc::HybridClock::written_since(ttl_ms)
}

/// A handle to one replicated table on this node. Cheap to clone; every clone is the same table.
///
/// Reads (`get`, `lookup`, `len`, `to_vec`, `range`…) are local and never wait on the network or
/// on writers. Writes return once applied here and acknowledged by every peer that was a member
/// of the table when the write was sent (a peer that goes down releases the wait).
pub struct Table<K, V> {
    pub(crate) shared: Arc<Shared<K, V>>,
    pub(crate) writes: mpsc::Sender<Write<K, V>>,
    pub(crate) control: mpsc::UnboundedSender<Control<K, V>>,
    pub(crate) _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            writes: self.writes.clone(),
            control: self.control.clone(),
            _types: PhantomData,
        }
    }
}

impl<K, V> fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.shared.name)
            .field("kind", &self.shared.kind)
            .finish()
    }
}

impl<K: crate::table::Key, V: crate::table::Value> Table<K, V> {
    async fn write(&self, op: Option<OpKind<K, V>>) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.writes
            .send(Write {
                op,
                reply,
                claim: None,
            })
            .await
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Inserts or replaces a record (adds a value, for a bag).
    pub async fn insert(&self, key: K, value: V) -> Result<()> {
        self.write(Some(OpKind::Insert(vec![(key, value)]))).await
    }

    /// Inserts or replaces a record that expires `ttl` after this write, on every node, whatever
    /// the table's [`TableOptions::expire_after`] (the earlier of the two applies). The lifetime
    /// travels with the record, so a newer write of the key decides: another
    /// `insert_with_ttl` renews it, a plain `insert` makes it live as the table's records do.
    /// A join and a restore keep it. `ttl` must be from 1 ms to `u32::MAX` ms (49.7 days);
    /// otherwise [`Error::Config`]. Reads skip the record once its age (by this node's clock,
    /// from the write's stamp) reaches `ttl`; the table server removes it within a second.
    pub async fn insert_with_ttl(&self, key: K, value: V, ttl: Duration) -> Result<()> {
        let ttl_ms = crate::record_ttl::millis(ttl)?;
        self.write(Some(OpKind::InsertTtl {
            ttl_ms,
            records: vec![(key, value)],
        }))
        .await
    }

    /// Inserts many records as one replicated write.
    pub async fn insert_many(&self, records: Vec<(K, V)>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.write(Some(OpKind::Insert(records))).await
    }

    /// Deletes a key (all its values, for a bag).
    pub async fn delete(&self, key: &K) -> Result<()> {
        self.write(Some(OpKind::Delete(vec![key.clone()]))).await
    }

    /// Deletes many keys as one replicated write.
    pub async fn delete_many(&self, keys: Vec<K>) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.write(Some(OpKind::Delete(keys))).await
    }

    /// Deletes one object: the record `(key, value)` if it is stored (one value of a bag key).
    pub async fn delete_object(&self, key: &K, value: &V) -> Result<()> {
        self.write(Some(OpKind::DeleteObject(vec![(
            key.clone(),
            value.clone(),
        )])))
        .await
    }

    /// Deletes many objects as one replicated write.
    pub async fn delete_objects(&self, objects: Vec<(K, V)>) -> Result<()> {
        if objects.is_empty() {
            return Ok(());
        }
        self.write(Some(OpKind::DeleteObject(objects))).await
    }

    /// Barrier: returns once every write issued on this node before it is applied on every
    /// member of the table.
    pub async fn sync(&self) -> Result<()> {
        self.write(None).await
    }

    /// The value of a key (the first value, for a bag). Local: one lookup under a shard's
    /// shared lock (`set`, `bag`) or lock-free (`ordered_set`); the table server holds a
    /// shard's write lock only for changes already in cache.
    #[inline]
    pub fn get(&self, key: &K) -> Option<V> {
        if self.shared.expire_ms.is_none() && !self.shared.has_record_ttl() {
            return self.shared.store.get(key);
        }
        self.get_expiring(key)
    }

    /// `get` in a table whose records expire: out of line, so that the read of a table without
    /// expiry stays small enough to inline into the caller's loop.
    #[inline(never)]
    fn get_expiring(&self, key: &K) -> Option<V> {
        self.shared.store.get_live(key, self.shared.live_from())
    }

    /// Every value of a key (at most one, except for a bag). Local.
    pub fn lookup(&self, key: &K) -> Vec<V> {
        self.shared.store.lookup(key, self.shared.live_from())
    }

    /// Whether the key is stored. Local.
    pub fn contains_key(&self, key: &K) -> bool {
        self.shared.store.contains_key(key, self.shared.live_from())
    }

    /// Number of records (for a bag, of values). Local. In a table whose records expire, it
    /// counts expired records until the table server has removed them
    /// ([`TableOptions::expire_after`]).
    pub fn len(&self) -> usize {
        self.shared.store.len()
    }

    /// Whether the table holds no record. Local.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every record (in key order for an ordered set). Local.
    pub fn to_vec(&self) -> Vec<(K, V)> {
        self.shared.store.to_vec(self.shared.live_from())
    }

    /// Records whose key is in `range`, in key order. Only for `ordered_set` tables; other
    /// kinds return [`Error::Unsupported`].
    pub fn range<R: RangeBounds<K>>(&self, range: R) -> Result<Vec<(K, V)>> {
        self.shared
            .store
            .range(range, self.shared.live_from())
            .ok_or(Error::Unsupported(match self.shared.kind {
                TableKind::Set => "set",
                TableKind::Bag => "bag",
                TableKind::OrderedSet => "ordered_set",
            }))
    }

    /// The other nodes this table replicates to, by name, sorted.
    pub fn nodes(&self) -> Vec<String> {
        self.shared
            .members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The table's kind.
    pub fn kind(&self) -> TableKind {
        self.shared.kind
    }

    /// The table's health: members, joins, conflicts, refused peers.
    pub async fn status(&self) -> Result<crate::status::TableStatus> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Status(tx))
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)
    }
}
