//! Deciding between two records with the same key when two partitions join.
//!
//! The join resolves each conflicting key once, on the coordinating node, and sends the winner
//! to every node, so every node ends with the same record whatever the handler does.
//!
//! - [`Conflict::LastWriterWins`] (the default): the record with the larger hybrid-logical-clock
//!   timestamp wins; on equal timestamps the owner with the larger `(name, incarnation)` wins.
//!   CETS without a handler swaps the two values and leaves the cluster inconsistent; cets
//!   never does.
//! - [`Conflict::Handler`]: `f(key, a, b) -> winner`, where `a` comes from the partition of the
//!   node with the smaller name. If the winner equals `a` or `b` (same encoding) that record
//!   keeps its metadata; a new value is stamped with a fresh timestamp and `a`'s owner.

use std::sync::Arc;

/// A user conflict handler: `(key, a, b) -> winner`.
pub type ConflictFn<K, V> = Arc<dyn Fn(&K, &V, &V) -> V + Send + Sync>;

/// How a join decides between two records with the same key.
pub enum Conflict<K, V> {
    /// Keep the record written last (hybrid logical clock; owner breaks ties).
    LastWriterWins,
    /// Call a function with the key and both values; its result is stored everywhere.
    Handler(ConflictFn<K, V>),
}

impl<K, V> Clone for Conflict<K, V> {
    fn clone(&self) -> Self {
        match self {
            Conflict::LastWriterWins => Conflict::LastWriterWins,
            Conflict::Handler(f) => Conflict::Handler(f.clone()),
        }
    }
}

impl<K, V> std::fmt::Debug for Conflict<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::LastWriterWins => f.write_str("LastWriterWins"),
            Conflict::Handler(_) => f.write_str("Handler(..)"),
        }
    }
}

/// The built-in last-writer-wins rule.
pub fn last_writer_wins<K, V>() -> Conflict<K, V> {
    Conflict::LastWriterWins
}
