//! How to start a table ([`TableOptions`]) and the callbacks it takes. Below both the handle
//! (`table.rs`) and the table server, which reads them when it starts.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::conflict::Conflict;
use crate::join::JoinCheckpointFn;
use crate::membership::NodeId;
use crate::types::TableKind;

/// Called with the node that went down and the records it owned, once they are dropped.
pub type NodeDownFn<K, V> = Arc<dyn Fn(&NodeId, &[(K, V)]) + Send + Sync>;
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

    /// An ordered table: one value per key, [`Table::range`](crate::Table::range) in key order.
    pub fn ordered_set() -> Self {
        Self::of(TableKind::OrderedSet)
    }

    /// A bag: any number of distinct values per key ([`Table::lookup`](crate::Table::lookup) returns them all).
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
    /// [`Error::Callback`](crate::Error::Callback) and nothing of it is stored.
    pub fn owner<F>(mut self, f: F) -> Self
    where
        F: Fn(&K, &V) -> String + Send + Sync + 'static,
    {
        self.owner = Some(Arc::new(f));
        self
    }

    /// Testing hook: a join coordinated by this node awaits `f(checkpoint)` at
    /// `"locked"` (every server paused, nothing dumped yet) and `"before_apply"` (merge done,
    /// nothing sent) and `"between_groups"` (the first partition was sent its records and the
    /// new member list; the other not the member list, nor any record in a central merge, but
    /// every chunk except its last in an exchange). Tests use it to stall or kill a coordinator
    /// at a precise step.
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
    /// [`Error::AckTimeout`](crate::Error::AckTimeout) (the write stays applied). Default 30 s. The members that did not
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
    /// expired records still count in [`Table::len`](crate::Table::len) and take memory, so a `ttl` of minutes
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

impl<K, V> TableOptions<K, V> {
    /// How many changes the table keeps on each node for its subscribers (default
    /// [`DEFAULT_SUBSCRIPTION_BUFFER`](crate::subscription::DEFAULT_SUBSCRIPTION_BUFFER)). A subscriber that falls further behind gets
    /// [`Update::Lagged`](crate::subscription::Update::Lagged); a cursor resumes only while the log holds the change after it.
    /// The log takes memory only while someone is subscribed.
    pub fn subscription_buffer(mut self, changes: usize) -> Self {
        self.subscription_buffer = changes.max(1);
        self
    }
}
