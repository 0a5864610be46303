//! Persistence of tables: a backend trait, the built-in directory backend, and (cargo feature
//! `postgres`) a PostgreSQL backend for nodes whose disk does not outlive them.
//!
//! A table started with [`crate::TableOptions::persist`] is snapshotted by its table server every
//! interval: the server copies its records (and, in a cluster-owned table, its tombstones) and
//! hands them to a background task, which encodes them in blocks and gives the blocks to the
//! backend. Writers wait only for the copy, never for the encoding or the disk. A node that starts
//! the table restores the last snapshot before it joins anyone, so the join merges it with the
//! live members by stamp, never over newer data (ALGORITHM.md, section 14).
//!
//! A failing backend is retried with back-off and reported in [`crate::TableStatus::persistence`];
//! replication and reads go on.

mod dir;
mod files;
#[cfg(feature = "postgres")]
mod postgres;
mod snapshot;
mod wal;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use dir::DirectoryBackend;
#[cfg(feature = "postgres")]
pub use postgres::PostgresBackend;
pub(crate) use snapshot::{decode_blocks, SnapBlock, SnapRecord, SnapTombstone};
/// The PostgreSQL client [`PostgresBackend`] uses (cargo feature `postgres`), for
/// [`PostgresBackend::from_config`].
#[cfg(feature = "postgres")]
pub use tokio_postgres;

use crate::Result;

/// Where snapshots of tables go. A backend stores, per table name, the blocks of the table's last
/// snapshot, and returns them as they were saved. Implementations must replace a table's snapshot
/// atomically (a crash during `save` leaves the previous one), and report a damaged store as
/// [`crate::Error::Persistence`] naming what is damaged, never panic. A store that cannot be
/// reached (a database down, a directory this process may not read) is
/// [`crate::Error::PersistenceUnavailable`]: a table's start waits for it
/// ([`PersistOptions::restore_wait`]) instead of treating it as damage.
#[async_trait]
pub trait Persistence: Send + Sync + 'static {
    /// Replaces the snapshot of `table` by `blocks` (each an opaque byte string); returns the
    /// bytes stored.
    async fn save(&self, table: &str, blocks: Vec<Vec<u8>>) -> Result<u64>;
    /// The blocks of the last snapshot of `table`, or `None` if there is none.
    async fn load(&self, table: &str) -> Result<Option<Vec<Vec<u8>>>>;

    /// Whether this backend keeps a write-ahead log (`log_*` below), which
    /// [`PersistOptions::sync_writes`] needs. Default: no.
    fn has_log(&self) -> bool {
        false
    }

    /// Appends `entries` (opaque byte strings, in order) to the log of `table` and returns only
    /// once they are on stable storage (the directory backend: written and fsynced, one fsync
    /// for all of them). Returns the bytes the table's log holds now. A failed append leaves
    /// the log as it was before it. Default: unsupported.
    async fn log_append(&self, table: &str, entries: Vec<Vec<u8>>) -> Result<u64> {
        let _ = entries;
        Err(crate::Error::Persistence {
            file: table.to_string(),
            reason: "this backend keeps no write-ahead log".into(),
        })
    }

    /// Ends the current part of the log of `table`: entries appended after this call go to a
    /// later part. Returns the mark to give [`Persistence::log_drop`] once a snapshot covers
    /// everything appended before the call. Default: 0.
    async fn log_cut(&self, table: &str) -> Result<u64> {
        let _ = table;
        Ok(0)
    }

    /// Removes the parts of the log of `table` up to `mark` (from [`Persistence::log_cut`]): a
    /// snapshot saved since covers them. Returns the bytes the log holds now. Default: nothing
    /// to remove.
    async fn log_drop(&self, table: &str, mark: u64) -> Result<u64> {
        let _ = (table, mark);
        Ok(0)
    }

    /// Every entry of the log of `table`, oldest first (an empty log: none). A damaged log is
    /// [`crate::Error::Persistence`] naming what is damaged. Default: none.
    async fn log_load(&self, table: &str) -> Result<Vec<Vec<u8>>> {
        let _ = table;
        Ok(Vec::new())
    }

    /// What a start replays: [`Persistence::log_load`], and how many torn tails (an append a
    /// crash interrupted, never acknowledged) the backend cut off the log to get there. The
    /// directory backend cuts an incomplete last entry of its newest segment; damage anywhere
    /// else is an error. Default: `log_load` with no torn tail.
    async fn log_recover(&self, table: &str) -> Result<LogContents> {
        Ok(LogContents::new(self.log_load(table).await?))
    }

    /// Called when a start found the snapshot or log of `table` unreadable and starts empty
    /// ([`OnRestoreError::StartEmpty`]), before the table accepts a write: keep what is stored
    /// for inspection where no later start reads it again, so that the writes acknowledged from
    /// now on are what the next start restores. The directory backend renames the snapshot and
    /// every log segment with the suffix `.damaged-<unix ms>`; the PostgreSQL backend moves the
    /// node's rows of the table to the table name `<table>.damaged-<unix ms>`. Default:
    /// nothing (a backend that keeps the default starts empty again at every start until a
    /// snapshot replaces the damaged one).
    async fn set_aside(&self, table: &str) -> Result<()> {
        let _ = table;
        Ok(())
    }
}

/// The log of a table as [`Persistence::log_recover`] found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogContents {
    /// Every entry, oldest first.
    pub entries: Vec<Vec<u8>>,
    /// Torn tails cut off (incomplete last entries a crash left; they were never acknowledged).
    pub torn_tails: u64,
}

impl LogContents {
    /// The entries of a log with no torn tail.
    pub fn new(entries: Vec<Vec<u8>>) -> Self {
        Self {
            entries,
            torn_tails: 0,
        }
    }

    /// Says that `n` torn tails were cut off to read the entries.
    pub fn torn_tails(mut self, n: u64) -> Self {
        self.torn_tails = n;
        self
    }
}

/// What a node does when a table's snapshot or log is damaged at start (corrupt, truncated,
/// not decodable). A store that cannot be reached is not damage: the start waits for it up to
/// [`PersistOptions::restore_wait`], then fails whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRestoreError {
    /// `Node::start` returns the error (naming the file): the operator decides. The default.
    #[default]
    Refuse,
    /// The table starts empty (the error is logged and shown in the status); the damaged state
    /// is set aside ([`Persistence::set_aside`]), the table gets the live members' records by
    /// the join, and the next snapshot is written afresh.
    StartEmpty,
}

/// Default of [`PersistOptions::restore_wait`].
pub const DEFAULT_RESTORE_WAIT: Duration = Duration::from_secs(30);

/// How a table is persisted (see [`crate::TableOptions::persist`]).
#[derive(Clone)]
pub struct PersistOptions {
    pub(crate) backend: Arc<dyn Persistence>,
    pub(crate) every: Duration,
    pub(crate) on_restore_error: OnRestoreError,
    pub(crate) sync_writes: bool,
    pub(crate) restore_wait: Duration,
}

impl std::fmt::Debug for PersistOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistOptions")
            .field("every", &self.every)
            .field("on_restore_error", &self.on_restore_error)
            .field("sync_writes", &self.sync_writes)
            .field("restore_wait", &self.restore_wait)
            .finish()
    }
}

impl PersistOptions {
    /// Snapshots to `backend` every `every` (Mantis uses 60 s; at least 10 ms).
    pub fn new(backend: impl Persistence, every: Duration) -> Self {
        Self {
            backend: Arc::new(backend),
            every: every.max(Duration::from_millis(10)),
            on_restore_error: OnRestoreError::Refuse,
            sync_writes: false,
            restore_wait: DEFAULT_RESTORE_WAIT,
        }
    }

    /// Durability on fsync: every write of this node (insert, insert_many, delete, ...) is also
    /// appended to the backend's write-ahead log, and the call returns only once the log is on
    /// disk (group commit: one fsync per batch of concurrent writes). A crash of every node then
    /// loses no acknowledged write: a start restores the snapshot and replays the log. A write
    /// whose append fails returns [`crate::Error::Persistence`], or
    /// [`crate::Error::PersistenceUnavailable`] while the backend cannot reach its store (it is
    /// applied and replicated all the same). The backend must keep a log ([`Persistence::has_log`]), or
    /// `Node::start_table` refuses the table. Default: off (snapshots only).
    pub fn sync_writes(mut self, on: bool) -> Self {
        self.sync_writes = on;
        self
    }

    /// What to do with a snapshot or log that is damaged at start (default: refuse to start).
    pub fn on_restore_error(mut self, o: OnRestoreError) -> Self {
        self.on_restore_error = o;
        self
    }

    /// How long starting the table waits for a backend that cannot reach its store
    /// ([`crate::Error::PersistenceUnavailable`]: a database that is down or restarting, a
    /// directory this process may not read), trying again with back-off from 100 ms to 2 s.
    /// Past it the start fails with that error, even with [`OnRestoreError::StartEmpty`]:
    /// starting empty would let the next snapshot replace stored data that is intact.
    /// Default [`DEFAULT_RESTORE_WAIT`] (30 s: a database restart or fail-over usually takes
    /// seconds). `Duration::ZERO` tries once. `Node::start` returns only when the restore ends,
    /// so this bounds how long a start can take with the store away.
    pub fn restore_wait(mut self, d: Duration) -> Self {
        self.restore_wait = d;
        self
    }
}

/// The persistence of one table on this node, in [`crate::TableStatus::persistence`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct PersistStatus {
    /// Snapshots written since start.
    pub snapshots: u64,
    /// Bytes of the last snapshot written.
    pub snapshot_bytes: u64,
    /// Time since the last snapshot was written (`None`: none yet).
    pub snapshot_age: Option<Duration>,
    /// Records restored at start (from the snapshot, and the writes replayed from the log).
    pub restored: u64,
    /// Bytes in the write-ahead log (`PersistOptions::sync_writes`), removed as snapshots
    /// cover them.
    pub log_bytes: u64,
    /// Log entries (batches of writes) replayed at start.
    pub log_replayed: u64,
    /// Torn tails cut off the log at start: incomplete last entries of appends a crash
    /// interrupted before their fsync (never acknowledged).
    #[serde(default)]
    pub log_torn_tails: u64,
    /// The last error (a failed snapshot or log append, or a snapshot or log that could not be
    /// restored); cleared by the next successful snapshot.
    pub last_error: Option<String>,
}
