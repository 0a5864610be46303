//! State shared by a table's handles and its server: the store, the member list, the
//! subscribers' log. Below both, so that neither imports the other for it.

use std::sync::{Arc, RwLock};

use crate::digest::Records;
use crate::membership::NodeId;
use crate::types::TableKind;

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
