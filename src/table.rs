//! The table handle users hold. The table kinds and key/value bounds are in `types.rs`, the
//! start options in `options.rs`, the state the handle shares with the server in `shared.rs`.

use std::fmt;
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::proto::OpKind;
use crate::server::{Control, Write};
pub(crate) use crate::shared::Shared;
pub(crate) use crate::types::{Key, TableKind, Value};
use crate::{Error, Result};

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
    /// the table's [`TableOptions::expire_after`](crate::TableOptions::expire_after) (the earlier of the two applies). The lifetime
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
    /// ([`TableOptions::expire_after`](crate::TableOptions::expire_after)).
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
