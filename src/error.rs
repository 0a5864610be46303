//! The one error type of the crate.

use std::time::Duration;

/// Everything that can go wrong in cets.
///
/// Errors that come from the network never reach the caller of a table operation directly:
/// a bad frame or a failed handshake closes one connection and is logged. What a caller sees
/// is whether its own request could be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A builder or option was given a value that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Binding or configuring the UDP socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Building the TLS configuration failed.
    #[error("tls setup failed: {0}")]
    Tls(String),
    /// Encoding or decoding a wire message failed.
    #[error("wire codec error: {0}")]
    Codec(#[from] postcard::Error),
    /// A frame announced a length above the configured limit.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Announced frame size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The peer did not prove knowledge of the cookie, or spoke another protocol version.
    #[error("handshake with {peer} failed: {reason}")]
    Handshake {
        /// Address or name of the peer.
        peer: String,
        /// Why it failed.
        reason: String,
    },
    /// A QUIC connection or stream failed.
    #[error("transport error: {0}")]
    Transport(String),
    /// A table with this name is already running on this node.
    #[error("table {0:?} is already started on this node")]
    TableExists(String),
    /// The operation does not exist for this kind of table (e.g. `range` on a `set`).
    #[error("operation not supported by a {0} table")]
    Unsupported(&'static str),
    /// A write was applied locally but not every peer acknowledged it in time.
    #[error("write on table {table:?} not acknowledged by {missing:?} within {timeout:?}")]
    AckTimeout {
        /// The table name.
        table: String,
        /// Nodes that did not acknowledge.
        missing: Vec<String>,
        /// The configured `ack_timeout`.
        timeout: Duration,
    },
    /// A join of two partitions could not be completed (it is retried automatically).
    #[error("join of table {table:?} with {peer} failed: {reason}")]
    Join {
        /// The table name.
        table: String,
        /// The node joined with.
        peer: String,
        /// Why it failed.
        reason: String,
    },
    /// The table's server or the node has stopped.
    #[error("the node or table has shut down")]
    Shutdown,
    /// The discovery backend failed.
    #[error("discovery: {0}")]
    Discovery(#[from] cets_discovery::Error),
    /// A subscription cannot resume after this cursor: the table's change log on this node no
    /// longer holds every change since (take a snapshot: `Table::subscribe_with_snapshot`).
    #[error("table {table:?} no longer holds the changes after this cursor; take a snapshot")]
    CursorExpired {
        /// The table name.
        table: String,
    },
    /// An `insert_new` could not be decided: no leader answered within `ack_timeout`, or the
    /// leader's table stopped or could not replicate the record.
    #[error("insert_new on table {table:?} failed: {reason}")]
    InsertNew {
        /// The table name.
        table: String,
        /// Why.
        reason: String,
    },
    /// Waiting for something took longer than the caller allowed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A persistence backend failed, or a snapshot could not be read: `file` names the file
    /// (or the store) concerned.
    #[error("persistence: {file}: {reason}")]
    Persistence {
        /// The file, directory or store concerned.
        file: String,
        /// What went wrong.
        reason: String,
    },
    /// A persistence backend cannot reach its store (the database is down or does not answer,
    /// the directory cannot be read for lack of permission): nothing is known to be damaged, and
    /// the same call may succeed later. A table's start waits for the store up to
    /// `PersistOptions::restore_wait` and then fails with this error, whatever
    /// `PersistOptions::on_restore_error` says: starting empty would let the next snapshot
    /// replace data that is intact.
    #[error("persistence unavailable: {store}: {reason}")]
    PersistenceUnavailable {
        /// The store concerned (database, node and table; or the file).
        store: String,
        /// Why it cannot be reached.
        reason: String,
    },
    /// A user callback (conflict handler, `on_node_down`, owner function) panicked. Only the
    /// write or join that called it fails; the table goes on.
    #[error("the {callback} of table {table:?} panicked: {reason}")]
    Callback {
        /// The table name.
        table: String,
        /// Which callback: "conflict handler", "on_node_down" or "owner function".
        callback: &'static str,
        /// The panic's message, and the key or node it was called for.
        reason: String,
    },
}

/// Result with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
