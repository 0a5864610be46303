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

#[derive(Default)]
pub(super) struct PersistState {
    next: Option<Instant>,
    backoff: Duration,
    running: Option<oneshot::Receiver<Result<u64>>>,
    status: PersistStatus,
    last_at: Option<Instant>,
}

impl<K: Key, V: Value> Server<K, V> {
    /// Puts the records of a snapshot into the store (before the server runs): a node-owned
    /// table those its own name owned, as this incarnation's; a cluster-owned table every record
    /// under its writer's name, and the tombstones younger than the retention. Expired records
    /// stay out. Returns the number of records restored.
    pub(super) fn restore(&mut self, blocks: Vec<SnapBlock<K, V>>, error: Option<String>) {
        self.persist.status.last_error = error;
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
        self.clock.observe(newest);
        let n = recs.len() as u64;
        self.shared
            .store
            .put_many_if(recs, |_, new, cur| cur.is_none_or(|c| new.ts > c.ts));
        self.persist.status.restored = n;
        if n > 0 {
            tracing::info!(records = n, "restored from the last snapshot");
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
        // The copy is all the server does; encoding and I/O happen in the task.
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
        self.persist.running = Some(rx);
        let table = self.shared.name.clone();
        tokio::spawn(
            async move {
                let _ = tx.send(write_snapshot(&p, &table, records, tombstones).await);
            }
            .in_current_span(),
        );
    }

    pub(super) fn persist_status(&self) -> Option<PersistStatus> {
        self.opts.persist.as_ref()?;
        let mut s = self.persist.status.clone();
        s.snapshot_age = self.persist.last_at.map(|t| t.elapsed());
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
