//! Snapshots of the table to its persistence backend, and the restore at start
//! (`TableOptions::persist`, ALGORITHM.md section 14). The server only copies the records; a
//! background task encodes them and waits for the backend.

use tokio::sync::oneshot::error::TryRecvError;

use super::*;
use crate::ownership::writer_id;
use crate::persistence::{PersistStatus, SnapBlock, SnapRecord, SnapTombstone};

/// Records per snapshot block.
const BLOCK_RECORDS: usize = 10_000;
/// First retry delay after a failed snapshot; doubled up to the snapshot interval.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How long `Node::shutdown` waits for a table's final snapshot.
const FINAL_SNAPSHOT_WITHIN: Duration = Duration::from_secs(10);

/// What a table restores at start (`node.rs` loads and decodes it before the table exists).
pub(crate) struct Restored<K, V> {
    /// The blocks of the last snapshot.
    pub blocks: Vec<SnapBlock<K, V>>,
    /// The write-ahead log's entries, oldest first: each a batch of this node's writes.
    pub log: Vec<Vec<Op<K, V>>>,
    /// Torn tails the backend cut off the log (`PersistStatus::log_torn_tails`).
    pub torn_tails: u64,
    /// The error that made the node start empty instead, if any.
    pub error: Option<String>,
}

impl<K, V> Default for Restored<K, V> {
    fn default() -> Self {
        Self {
            blocks: Vec::new(),
            log: Vec::new(),
            torn_tails: 0,
            error: None,
        }
    }
}

#[derive(Default)]
pub(super) struct PersistState {
    next: Option<Instant>,
    backoff: Duration,
    running: Option<oneshot::Receiver<Result<u64>>>,
    status: PersistStatus,
    last_at: Option<Instant>,
    /// The write-ahead log (`PersistOptions::sync_writes`).
    pub(super) wal: Option<super::wal::Wal>,
}

impl<K: Key, V: Value> Server<K, V> {
    /// Puts the records of a snapshot into the store (before the server runs): a node-owned
    /// table those its own name owned, as this incarnation's; a cluster-owned table every record
    /// under its writer's name, and the tombstones younger than the retention. Expired records
    /// stay out. Returns the number of records restored.
    /// Then replays the write-ahead log (`replay`), and starts the log task.
    pub(super) fn restore(&mut self, restored: Restored<K, V>) {
        let Restored {
            blocks,
            log,
            torn_tails,
            error,
        } = restored;
        self.persist.status.last_error = error;
        self.persist.status.log_torn_tails = torn_tails;
        let cluster = self.cluster_owned();
        let (floor, from) = (self.retention_floor(), self.shared.live_from());
        let mut recs = Vec::new();
        let mut newest = 0;
        for b in blocks {
            for r in b.records {
                let owner = if cluster {
                    self.owners.intern(&writer_id(&r.owner))
                } else if r.owner == self.me.name {
                    self.me_idx
                } else {
                    continue;
                };
                let mut rec = Rec::new(r.value, r.ts, owner);
                rec.ttl = r.ttl;
                if !rec.live(from) {
                    continue;
                }
                if rec.ttl != 0 {
                    self.shared
                        .record_ttl
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                newest = newest.max(r.ts);
                recs.push((r.key, rec));
            }
            if cluster {
                for t in b.tombstones {
                    if t.ts > floor {
                        newest = newest.max(t.ts);
                        let owner = self.owners.intern(&writer_id(&t.owner));
                        self.add_tombstone(t.key, Tombstone::of((t.ts, owner)));
                    }
                }
            }
        }
        let snapshot = recs.len() as u64;
        self.shared
            .store
            .put_many_if(recs, |_, new, cur| cur.is_none_or(|c| new.ts > c.ts));
        let entries = log.len() as u64;
        newest = newest.max(self.replay(log));
        self.clock.observe(newest);
        let n = self.shared.store.len() as u64;
        self.persist.status.restored = n;
        self.persist.status.log_replayed = entries;
        if n > 0 || entries > 0 {
            tracing::info!(
                records = n,
                snapshot,
                log_entries = entries,
                "restored from the last snapshot and the log"
            );
        }
        if let Some(p) = self.opts.persist.clone().filter(|p| p.sync_writes) {
            self.persist.wal = Some(super::wal::Wal::start(p, self.shared.name.clone(), 0));
        }
    }

    /// On the tick: collects a finished snapshot, and starts the next one when it is due.
    pub(super) fn persist_tick(&mut self, now: Instant) {
        let Some(p) = self.opts.persist.clone() else {
            return;
        };
        if let Some(rx) = &mut self.persist.running {
            let done = match rx.try_recv() {
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Closed) => Err(Error::Persistence {
                    file: self.shared.name.clone(),
                    reason: "the snapshot task ended without a result".into(),
                }),
                Ok(r) => r,
            };
            self.persist.running = None;
            match done {
                Ok(bytes) => {
                    let s = &mut self.persist.status;
                    s.snapshots += 1;
                    s.snapshot_bytes = bytes;
                    s.last_error = None;
                    self.persist.last_at = Some(now);
                    self.persist.backoff = Duration::ZERO;
                }
                Err(e) => {
                    // (Not `clamp`: it panics when the interval is below the first delay.)
                    let b = (self.persist.backoff * 2)
                        .max(FIRST_BACKOFF)
                        .min(p.every.max(FIRST_BACKOFF));
                    self.persist.backoff = b;
                    tracing::warn!(error = %e, retry_in = ?b, "snapshot failed");
                    self.persist.status.last_error = Some(e.to_string());
                    self.persist.next = Some(now + b);
                }
            }
        }
        let next = *self.persist.next.get_or_insert(now + p.every);
        if now < next {
            return;
        }
        self.persist.next = Some(now + p.every);
        let rx = self.start_snapshot(p, None);
        self.persist.running = Some(rx);
    }

    /// At stop (`Node::shutdown`): a last snapshot, after the one being written if any; `done`
    /// is answered when it is saved, failed (logged) or `FINAL_SNAPSHOT_WITHIN` has passed.
    pub(super) fn final_snapshot(&mut self, done: oneshot::Sender<()>) {
        let Some(p) = self.opts.persist.clone() else {
            let _ = done.send(());
            return;
        };
        let running = self.persist.running.take();
        let rx = self.start_snapshot(p, running);
        tokio::spawn(
            async move {
                match tokio::time::timeout(FINAL_SNAPSHOT_WITHIN, rx).await {
                    Ok(Ok(Ok(bytes))) => tracing::info!(bytes, "final snapshot written"),
                    Ok(Ok(Err(e))) => tracing::error!(error = %e, "final snapshot failed"),
                    Ok(Err(_)) => tracing::error!("final snapshot task ended without a result"),
                    Err(_) => {
                        tracing::error!(within = ?FINAL_SNAPSHOT_WITHIN, "final snapshot timed out")
                    }
                }
                let _ = done.send(());
            }
            .in_current_span(),
        );
    }

    /// Copies the records (and a log cut) and spawns the task that saves them, once `before`
    /// (a snapshot still being written) is done.
    fn start_snapshot(
        &mut self,
        p: crate::persistence::PersistOptions,
        before: Option<oneshot::Receiver<Result<u64>>>,
    ) -> oneshot::Receiver<Result<u64>> {
        // The copy is all the server does; encoding and I/O happen in the task. The log is cut
        // here too: every entry sent before was applied before the copy, so the snapshot covers
        // the log up to the cut.
        let cut = self.persist.wal.as_ref().and_then(|w| w.cut());
        let log_bytes = self.persist.wal.as_ref().map(|w| w.bytes.clone());
        let from = self.shared.live_from();
        let owners = &self.owners;
        let mut records = Vec::with_capacity(self.shared.store.len());
        self.shared.store.for_each(|k, r| {
            if !r.live(from) {
                return;
            }
            if let Some(id) = owners.get(r.owner) {
                records.push(SnapRecord {
                    key: k.clone(),
                    value: r.value.clone(),
                    ts: r.ts,
                    owner: id.name.clone(),
                    ttl: r.ttl,
                });
            }
        });
        let mut tombstones = Vec::new();
        if self.cluster_owned() {
            let floor = self.retention_floor();
            for (k, (ts, owner)) in self.tombstones.iter() {
                if let Some(id) = owners.get(owner).filter(|_| ts > floor) {
                    tombstones.push(SnapTombstone {
                        key: k.clone(),
                        ts,
                        owner: id.name.clone(),
                    });
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        let table = self.shared.name.clone();
        tokio::spawn(
            async move {
                if let Some(before) = before {
                    let _ = before.await;
                }
                let saved = write_snapshot(&p, &table, records, tombstones).await;
                if saved.is_ok() {
                    drop_covered_log(&p, &table, cut, log_bytes).await;
                }
                let _ = tx.send(saved);
            }
            .in_current_span(),
        );
        rx
    }

    pub(super) fn persist_status(&self) -> Option<PersistStatus> {
        self.opts.persist.as_ref()?;
        let mut s = self.persist.status.clone();
        s.snapshot_age = self.persist.last_at.map(|t| t.elapsed());
        if let Some(w) = &self.persist.wal {
            s.log_bytes = w.bytes.load(std::sync::atomic::Ordering::Relaxed);
            let log_error = w.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(e) = log_error {
                s.last_error = Some(e);
            }
        }
        Some(s)
    }
}

async fn write_snapshot<K: Key, V: Value>(
    p: &crate::persistence::PersistOptions,
    table: &str,
    records: Vec<SnapRecord<K, V>>,
    tombstones: Vec<SnapTombstone<K>>,
) -> Result<u64> {
    let mut blocks = Vec::with_capacity(records.len() / BLOCK_RECORDS + 2);
    let mut records = records.into_iter().peekable();
    let mut tombstones = Some(tombstones);
    while records.peek().is_some() || tombstones.is_some() {
        let block = SnapBlock {
            records: records.by_ref().take(BLOCK_RECORDS).collect(),
            tombstones: tombstones.take().unwrap_or_default(),
        };
        blocks.push(postcard::to_stdvec(&block)?);
    }
    p.backend.save(table, blocks).await
}

/// After a snapshot is saved: removes the log's parts up to the cut taken with its copy.
async fn drop_covered_log(
    p: &crate::persistence::PersistOptions,
    table: &str,
    cut: Option<oneshot::Receiver<Result<u64>>>,
    log_bytes: Option<Arc<std::sync::atomic::AtomicU64>>,
) {
    let Some(cut) = cut else { return };
    let mark = match cut.await {
        Ok(Ok(mark)) => mark,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "log cut failed; the log stays until the next snapshot");
            return;
        }
        Err(_) => return,
    };
    match p.backend.log_drop(table, mark).await {
        Ok(bytes) => {
            if let Some(b) = log_bytes {
                b.store(bytes, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Err(e) => tracing::warn!(error = %e, "removing the log a snapshot covers failed"),
    }
}
