//! The PostgreSQL backend (cargo feature `postgres`): snapshots and the write-ahead log of a
//! node's tables in a database that several nodes share, for deployments where a node's disk
//! does not outlive the node (containers).
//!
//! Schema (created at the first connection if missing, under an advisory lock so that nodes
//! starting together do not race; in the connection's `search_path`, so a schema can be chosen
//! with `options=-csearch_path=...` in the connection string):
//!
//! - `cets_snapshots (node, tab, blocks, bytes, saved_at)`: one row per node and table, the
//!   last snapshot's block count and size;
//! - `cets_snapshot_blocks (node, tab, block, data)`: the blocks of that snapshot;
//! - `cets_log (node, tab, seq, data)`: the write-ahead log (`PersistOptions::sync_writes`),
//!   one row per entry, `seq` growing by one per entry.
//!
//! A save replaces the node's snapshot of the table in one transaction (the row in
//! `cets_snapshots` is locked first, then the old blocks deleted and the new ones inserted), so
//! a crash or a lost connection leaves the previous snapshot whole, and the database holds one
//! snapshot per node and table, never more. A log append is one `INSERT` of every entry of a
//! group-commit batch, which returns once PostgreSQL committed it; a log cut is the highest
//! `seq` appended so far and a drop deletes the rows up to it.
//!
//! A start that finds the node's snapshot or log of a table damaged and starts empty
//! (`OnRestoreError::StartEmpty`) renames those rows' table to `<table>.damaged-<unix ms>`
//! (`Persistence::set_aside`): kept for inspection, never read again.
//!
//! Connections: one for snapshots and one for the log, opened when first needed and opened
//! again after a failure, with back-off (100 ms doubling up to 5 s; an operation in the
//! back-off window fails at once with the last connection error). Every operation has a
//! deadline (`PostgresBackend::op_timeout`, 60 s by default): a connection that stops
//! answering is dropped instead of stalling the table's snapshots.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config, NoTls};

use super::Persistence;
use crate::{Error, Result};

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const OP_TIMEOUT: Duration = Duration::from_secs(60);

const SCHEMA: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(7381650214952736731);
CREATE TABLE IF NOT EXISTS cets_snapshots (
    node text NOT NULL,
    tab text NOT NULL,
    blocks integer NOT NULL,
    bytes bigint NOT NULL,
    saved_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node, tab));
CREATE TABLE IF NOT EXISTS cets_snapshot_blocks (
    node text NOT NULL,
    tab text NOT NULL,
    block integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (node, tab, block));
CREATE TABLE IF NOT EXISTS cets_log (
    node text NOT NULL,
    tab text NOT NULL,
    seq bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (node, tab, seq));
COMMIT;
";

/// Snapshots and the write-ahead log of one node's tables in PostgreSQL (cargo feature
/// `postgres`, off by default). Several nodes may share one database: rows are keyed by the
/// node name given here and the table name, so each node restores its own snapshot, and the
/// join merges it with the live members by stamp as with [`super::DirectoryBackend`]. Give
/// each node its own name (the name of its `Node`); two running processes with the same name
/// overwrite each other's snapshots.
///
/// The connection string is libpq's, as a URL (`postgresql://user:secret@db.internal:5432/app`)
/// or key-value pairs (`host=db.internal user=app dbname=app`); several hosts are tried in
/// order. **TLS is not supported**: connections are plain TCP or a Unix socket (`NoTls`), so
/// use a private network, a Unix socket or a TLS-terminating sidecar; `sslmode=require` is
/// refused by [`PostgresBackend::new`] rather than silently ignored (the default, `prefer`,
/// connects without TLS). Without `connect_timeout` in the string, connecting gives up after
/// 10 s. It keeps a write-ahead log, so `PersistOptions::sync_writes` works with it: a write
/// returns once PostgreSQL committed its batch.
///
/// Tables, created at the first connection if missing (in the connection's `search_path`):
/// `cets_snapshots` (per node and table: block count, bytes, `saved_at`),
/// `cets_snapshot_blocks` (the blocks) and `cets_log` (the log's entries, in `seq` order). A
/// save replaces the node's snapshot of the table in one transaction, so the database holds one
/// snapshot per node and table; a log append is one `INSERT` per group-commit batch, and a
/// snapshot deletes the log rows it covers.
///
/// While the database is down or unreachable every call fails with
/// [`Error::PersistenceUnavailable`] naming the database, node and table (the table's status shows it; replication and reads go
/// on), the connection is tried again with back-off (100 ms doubling up to 5 s), and every call
/// has a deadline ([`PostgresBackend::op_timeout`]), so a connection that stops answering is
/// dropped rather than stalling the snapshots.
///
/// A clone shares the connections; one backend may serve every table of a node.
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    node: String,
    /// The database as errors name it (host, port, database; never the password).
    place: String,
    /// `op_timeout` in microseconds: set on any clone, it holds for all of them.
    op_timeout_us: AtomicU64,
    snap: Mutex<Conn>,
    log: Mutex<Conn>,
    logs: std::sync::Mutex<HashMap<String, Arc<Mutex<LogState>>>>,
}

/// One connection, and the back-off of its reconnection.
#[derive(Default)]
struct Conn {
    client: Option<Client>,
    retry_at: Option<Instant>,
    backoff: Duration,
    last_error: String,
}

/// What this process knows of one table's log (`known`: read from the database since the last
/// failure).
#[derive(Default)]
struct LogState {
    known: bool,
    last_seq: i64,
    bytes: u64,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("database", &self.inner.place)
            .field("node", &self.inner.node)
            .finish()
    }
}

/// `d` in whole microseconds (a deadline of centuries at most).
fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A tokio-postgres error with its causes (its own `Display` says only the kind: "db error").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

impl PostgresBackend {
    /// A backend for the node named `node`, connecting with the libpq connection string `url`
    /// (see the type's documentation). Nothing is connected yet: the first snapshot, log append
    /// or restore connects, so a node starts while the database is down (starting a persisted
    /// table then waits for the database up to `PersistOptions::restore_wait`). Errors: [`Error::Config`] for a
    /// string that does not parse or asks for TLS.
    pub fn new(url: &str, node: impl Into<String>) -> Result<Self> {
        let config: Config = url
            .parse()
            .map_err(|e| Error::Config(format!("postgres connection string: {}", describe(&e))))?;
        Self::from_config(config, node)
    }

    /// As [`PostgresBackend::new`], from a parsed [`tokio_postgres::Config`].
    pub fn from_config(mut config: Config, node: impl Into<String>) -> Result<Self> {
        if config.get_ssl_mode() == SslMode::Require {
            return Err(Error::Config(
                "postgres: sslmode=require, but this backend connects without TLS".into(),
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres");
        let place = format!("postgres {host}:{port}/{db}");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                node: node.into(),
                place,
                op_timeout_us: AtomicU64::new(duration_us(OP_TIMEOUT)),
                snap: Mutex::default(),
                log: Mutex::default(),
                logs: Default::default(),
            }),
        })
    }

    /// How long one operation (a snapshot's transaction, a log append, a restore) may take
    /// before it fails and its connection is dropped (default 60 s). It holds for every clone
    /// of this backend, which share the connections.
    pub fn op_timeout(self, d: Duration) -> Self {
        self.inner
            .op_timeout_us
            .store(duration_us(d), Ordering::Relaxed);
        self
    }

    fn deadline(&self) -> Duration {
        Duration::from_micros(self.inner.op_timeout_us.load(Ordering::Relaxed))
    }

    /// The node name the rows are keyed by.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    fn err(&self, table: &str, reason: impl Into<String>) -> Error {
        Error::Persistence {
            file: format!(
                "{}, node {:?}, table {table:?}",
                self.inner.place, self.inner.node
            ),
            reason: reason.into(),
        }
    }

    /// The database cannot be reached for an operation on `table` (nothing is known to be
    /// damaged): [`Error::PersistenceUnavailable`].
    fn unavailable(&self, table: &str, reason: impl Into<String>) -> Error {
        Error::PersistenceUnavailable {
            store: format!(
                "{}, node {:?}, table {table:?}",
                self.inner.place, self.inner.node
            ),
            reason: reason.into(),
        }
    }

    /// The connection `which`, opened (and the schema created) if it is not, unless the
    /// back-off after a failed attempt has not passed.
    async fn conn<'a>(&self, which: &'a Mutex<Conn>, table: &str) -> Result<MutexGuard<'a, Conn>> {
        let mut c = which.lock().await;
        if c.client.as_ref().is_some_and(|cl| !cl.is_closed()) {
            return Ok(c);
        }
        c.client = None;
        let now = Instant::now();
        if let Some(at) = c.retry_at.filter(|at| now < *at) {
            return Err(self.unavailable(
                table,
                format!(
                    "database unavailable (next attempt in {:?}): {}",
                    at - now,
                    c.last_error
                ),
            ));
        }
        match self.open().await {
            Ok(client) => {
                if c.retry_at.is_some() {
                    tracing::info!(database = %self.inner.place, "connected to the database again");
                }
                c.client = Some(client);
                c.retry_at = None;
                c.backoff = Duration::ZERO;
                Ok(c)
            }
            Err(reason) => {
                c.backoff = (c.backoff * 2).max(FIRST_RETRY).min(MAX_RETRY);
                c.retry_at = Some(now + c.backoff);
                c.last_error = reason.clone();
                tracing::warn!(database = %self.inner.place, error = %reason, retry_in = ?c.backoff,
                    "cannot connect to the database");
                Err(self.unavailable(table, reason))
            }
        }
    }

    /// Connects and creates the schema if missing.
    async fn open(&self) -> std::result::Result<Client, String> {
        let (client, connection) = self
            .inner
            .config
            .connect(NoTls)
            .await
            .map_err(|e| describe(&e))?;
        let place = self.inner.place.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(database = %place, error = %describe(&e), "database connection ended");
            }
        });
        let schema = tokio::time::timeout(self.deadline(), client.batch_execute(SCHEMA));
        match schema.await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(e)) => Err(format!("creating the schema: {}", describe(&e))),
            Err(_) => Err(format!(
                "creating the schema: no answer within {:?}",
                self.deadline()
            )),
        }
    }

    /// Runs `op` on the connection `which` within the deadline; a failure that leaves the
    /// connection unusable (closed, timed out) drops it so the next call reconnects.
    async fn run<T>(
        &self,
        which: &Mutex<Conn>,
        table: &str,
        op: impl for<'c> FnOnce(
            &'c mut Client,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::result::Result<T, String>> + Send + 'c>,
        >,
    ) -> Result<T> {
        let mut c = self.conn(which, table).await?;
        let Some(client) = c.client.as_mut() else {
            return Err(self.unavailable(table, "no connection"));
        };
        let out = tokio::time::timeout(self.deadline(), op(client)).await;
        match out {
            Ok(Ok(v)) => Ok(v),
            // The connection ended under the operation (the server stopped or went away):
            // the store is unavailable, not the data damaged.
            Ok(Err(reason)) if c.client.as_ref().is_none_or(|cl| cl.is_closed()) => {
                c.client = None;
                Err(self.unavailable(table, reason))
            }
            Ok(Err(reason)) => Err(self.err(table, reason)),
            Err(_) => {
                c.client = None;
                Err(self.unavailable(table, format!("no answer within {:?}", self.deadline())))
            }
        }
    }

    fn log_state(&self, table: &str) -> Arc<Mutex<LogState>> {
        let mut all = self.inner.logs.lock().unwrap_or_else(|p| p.into_inner());
        all.entry(table.to_string()).or_default().clone()
    }

    /// Reads the table's last `seq` and log size from the database unless known. The `seq`
    /// never goes back within a process: a log that a snapshot emptied reads as `seq` 0, and
    /// a snapshot's mark taken before (`log_cut`) must not cover entries appended after it.
    async fn know_log(&self, table: &str, st: &mut LogState) -> Result<()> {
        if st.known {
            return Ok(());
        }
        let (node, tab) = (self.inner.node.clone(), table.to_string());
        let (last, bytes) = self
            .run(&self.inner.log, table, move |cl| {
                Box::pin(async move {
                    let row = cl
                        .query_one(
                            "SELECT coalesce(max(seq), 0), coalesce(sum(octet_length(data)), 0)::bigint \
                             FROM cets_log WHERE node = $1 AND tab = $2",
                            &[&node, &tab],
                        )
                        .await
                        .map_err(|e| format!("reading the log's size: {}", describe(&e)))?;
                    let col = |e: tokio_postgres::Error| format!("reading the log's size: {}", describe(&e));
                    Ok((row.try_get::<_, i64>(0).map_err(col)?, row.try_get::<_, i64>(1).map_err(col)?))
                })
            })
            .await?;
        st.last_seq = st.last_seq.max(last);
        st.bytes = u64::try_from(bytes).unwrap_or(0);
        st.known = true;
        Ok(())
    }
}

#[async_trait]
impl Persistence for PostgresBackend {
    async fn save(&self, table: &str, blocks: Vec<Vec<u8>>) -> Result<u64> {
        let count = i32::try_from(blocks.len()).map_err(|_| self.err(table, "too many blocks"))?;
        let bytes: u64 = blocks.iter().map(|b| b.len() as u64).sum();
        let stored = i64::try_from(bytes).unwrap_or(i64::MAX);
        let (node, tab) = (self.inner.node.clone(), table.to_string());
        self.run(&self.inner.snap, table, move |cl| {
            Box::pin(async move {
                let e = |what: &str, e: tokio_postgres::Error| format!("{what}: {}", describe(&e));
                let tx = cl.transaction().await.map_err(|x| e("begin", x))?;
                // The row lock taken here orders concurrent saves of one node's table.
                tx.execute(
                    "INSERT INTO cets_snapshots (node, tab, blocks, bytes) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (node, tab) DO UPDATE SET blocks = EXCLUDED.blocks, \
                     bytes = EXCLUDED.bytes, saved_at = now()",
                    &[&node, &tab, &count, &stored],
                )
                .await
                .map_err(|x| e("saving the snapshot's header", x))?;
                tx.execute(
                    "DELETE FROM cets_snapshot_blocks WHERE node = $1 AND tab = $2",
                    &[&node, &tab],
                )
                .await
                .map_err(|x| e("deleting the previous snapshot", x))?;
                let insert = tx
                    .prepare(
                        "INSERT INTO cets_snapshot_blocks (node, tab, block, data) \
                         VALUES ($1, $2, $3, $4)",
                    )
                    .await
                    .map_err(|x| e("preparing the insert", x))?;
                for (i, b) in (0i32..).zip(&blocks) {
                    tx.execute(&insert, &[&node, &tab, &i, &b.as_slice()])
                        .await
                        .map_err(|x| e(&format!("saving block {i} of {count}"), x))?;
                }
                tx.commit().await.map_err(|x| e("commit", x))?;
                Ok(bytes)
            })
        })
        .await
    }

    async fn load(&self, table: &str) -> Result<Option<Vec<Vec<u8>>>> {
        let (node, tab) = (self.inner.node.clone(), table.to_string());
        let loaded = self
            .run(&self.inner.snap, table, move |cl| {
                Box::pin(async move {
                    let e =
                        |what: &str, e: tokio_postgres::Error| format!("{what}: {}", describe(&e));
                    // One transaction, so the header and the blocks are of one snapshot.
                    let tx = cl
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()
                        .await
                        .map_err(|x| e("begin", x))?;
                    let head = tx
                        .query_opt(
                            "SELECT blocks FROM cets_snapshots WHERE node = $1 AND tab = $2",
                            &[&node, &tab],
                        )
                        .await
                        .map_err(|x| e("reading the snapshot's header", x))?;
                    let Some(head) = head else {
                        return Ok(None);
                    };
                    let count: i32 = head
                        .try_get(0)
                        .map_err(|x| e("reading the snapshot's header", x))?;
                    let rows = tx
                        .query(
                            "SELECT block, data FROM cets_snapshot_blocks \
                             WHERE node = $1 AND tab = $2 ORDER BY block",
                            &[&node, &tab],
                        )
                        .await
                        .map_err(|x| e("reading the snapshot's blocks", x))?;
                    tx.commit().await.map_err(|x| e("commit", x))?;
                    Ok(Some((count, rows)))
                })
            })
            .await?;
        let Some((count, rows)) = loaded else {
            return Ok(None);
        };
        let mut blocks = Vec::with_capacity(rows.len());
        for (want, row) in (0i32..).zip(&rows) {
            let col = |e: tokio_postgres::Error| {
                self.err(table, format!("block {want}: {}", describe(&e)))
            };
            let got: i32 = row.try_get(0).map_err(col)?;
            if got != want {
                return Err(self.err(table, format!("block {want} of {count} is missing")));
            }
            blocks.push(row.try_get::<_, Vec<u8>>(1).map_err(col)?);
        }
        if blocks.len() != usize::try_from(count).unwrap_or(0) {
            return Err(self.err(
                table,
                format!("the snapshot has {} of its {count} blocks", blocks.len()),
            ));
        }
        Ok(Some(blocks))
    }

    fn has_log(&self) -> bool {
        true
    }

    async fn log_append(&self, table: &str, entries: Vec<Vec<u8>>) -> Result<u64> {
        let state = self.log_state(table);
        let mut st = state.lock().await;
        self.know_log(table, &mut st).await?;
        let n = i64::try_from(entries.len()).map_err(|_| self.err(table, "too many entries"))?;
        let added: u64 = entries.iter().map(|e| e.len() as u64).sum();
        let (node, tab, base) = (self.inner.node.clone(), table.to_string(), st.last_seq);
        let appended = self
            .run(&self.inner.log, table, move |cl| {
                Box::pin(async move {
                    cl.execute(
                        "INSERT INTO cets_log (node, tab, seq, data) \
                         SELECT $1, $2, $3::bigint + u.i, u.d \
                         FROM unnest($4::bytea[]) WITH ORDINALITY AS u(d, i)",
                        &[&node, &tab, &base, &entries],
                    )
                    .await
                    .map_err(|e| format!("appending to the log: {}", describe(&e)))
                })
            })
            .await;
        match appended {
            Ok(_) => {
                st.last_seq += n;
                st.bytes += added;
                Ok(st.bytes)
            }
            Err(e) => {
                // Whether a lost connection committed the batch is unknown: read it again.
                st.known = false;
                Err(e)
            }
        }
    }

    async fn log_cut(&self, table: &str) -> Result<u64> {
        let state = self.log_state(table);
        let mut st = state.lock().await;
        self.know_log(table, &mut st).await?;
        Ok(u64::try_from(st.last_seq).unwrap_or(0))
    }

    async fn log_drop(&self, table: &str, mark: u64) -> Result<u64> {
        let state = self.log_state(table);
        let mut st = state.lock().await;
        let upto = i64::try_from(mark).unwrap_or(i64::MAX);
        let (node, tab) = (self.inner.node.clone(), table.to_string());
        self.run(&self.inner.log, table, move |cl| {
            Box::pin(async move {
                cl.execute(
                    "DELETE FROM cets_log WHERE node = $1 AND tab = $2 AND seq <= $3",
                    &[&node, &tab, &upto],
                )
                .await
                .map_err(|e| format!("removing the log a snapshot covers: {}", describe(&e)))
            })
        })
        .await?;
        // The size is read again; `last_seq` stays (entries after the mark keep counting up).
        st.known = false;
        self.know_log(table, &mut st).await?;
        Ok(st.bytes)
    }

    /// Moves the node's rows of `table` (snapshot header, blocks and log) to the table name
    /// `<table>.damaged-<unix ms>` in one transaction: kept for inspection, read by no later
    /// start of `table`.
    async fn set_aside(&self, table: &str) -> Result<()> {
        let state = self.log_state(table);
        let mut st = state.lock().await;
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let (node, tab, aside) = (
            self.inner.node.clone(),
            table.to_string(),
            format!("{table}.damaged-{ms}"),
        );
        let moved = self
            .run(&self.inner.snap, table, move |cl| {
                Box::pin(async move {
                    let e =
                        |what: &str, e: tokio_postgres::Error| format!("{what}: {}", describe(&e));
                    let tx = cl.transaction().await.map_err(|x| e("begin", x))?;
                    let mut moved = 0;
                    for rel in ["cets_snapshots", "cets_snapshot_blocks", "cets_log"] {
                        moved += tx
                            .execute(
                                &format!("UPDATE {rel} SET tab = $3 WHERE node = $1 AND tab = $2"),
                                &[&node, &tab, &aside],
                            )
                            .await
                            .map_err(|x| e(&format!("setting {rel} aside"), x))?;
                    }
                    tx.commit().await.map_err(|x| e("commit", x))?;
                    Ok(moved)
                })
            })
            .await?;
        // The log is empty under this name now; `last_seq` stays (it never goes back).
        st.known = false;
        tracing::warn!(database = %self.inner.place, node = %self.inner.node, table, rows = moved,
            "unreadable snapshot and log set aside as {table}.damaged-{ms}");
        Ok(())
    }

    async fn log_load(&self, table: &str) -> Result<Vec<Vec<u8>>> {
        let state = self.log_state(table);
        let mut st = state.lock().await;
        let (node, tab) = (self.inner.node.clone(), table.to_string());
        let rows = self
            .run(&self.inner.log, table, move |cl| {
                Box::pin(async move {
                    cl.query(
                        "SELECT seq, data FROM cets_log WHERE node = $1 AND tab = $2 ORDER BY seq",
                        &[&node, &tab],
                    )
                    .await
                    .map_err(|e| format!("reading the log: {}", describe(&e)))
                })
            })
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        let (mut last, mut bytes) = (0i64, 0u64);
        for row in &rows {
            let col = |e: tokio_postgres::Error| {
                self.err(table, format!("reading the log: {}", describe(&e)))
            };
            last = row.try_get(0).map_err(col)?;
            let data: Vec<u8> = row.try_get(1).map_err(col)?;
            bytes += data.len() as u64;
            out.push(data);
        }
        *st = LogState {
            known: true,
            last_seq: last,
            bytes,
        };
        Ok(out)
    }
}
