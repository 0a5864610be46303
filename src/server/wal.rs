//! Durability on fsync (`PersistOptions::sync_writes`, ALGORITHM.md section 14): the table
//! server hands each batch of its own writes, encoded, to a log task and gives the callers'
//! replies to a waiter that answers once both the members' acks and the fsync are in (a node
//! alone in the table hands the callers to the log task, which answers them after the
//! fsync). The log task appends whatever has queued meanwhile with one call (group commit: one
//! fsync per batch of batches). The server never waits for the disk; reads never touch it. A
//! failed append pauses the appends for a back-off (100 ms, doubling up to 5 s): groups queued
//! meanwhile fail at once with the same error, and one warning is logged per new error.
//!
//! The queue to the log task is bounded by bytes (`MAX_QUEUED_BYTES`): the server never waits
//! for the disk, so a batch that would take the queue past the bound fails at once with
//! `Error::Persistence` (applied and replicated all the same, as after a failed append). Callers
//! that await their writes never reach it (the queue holds at most one entry per batch whose
//! callers still wait); callers that give up on their writes (a timeout) and write again, or a
//! flood of callers, would otherwise queue entries faster than a slow disk takes them.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use super::*;
use crate::persistence::PersistOptions;

/// Entries appended with one fsync at most (a bound on one append's memory).
const MAX_GROUP: usize = 4096;

/// Bytes of entries queued for the log task (sent, not yet appended) at most. An entry on
/// its own is always queued, whatever its size (a batch's size is bounded by the server).
const MAX_QUEUED_BYTES: u64 = 64 << 20;

pub(super) enum LogMsg {
    /// A batch of writes, encoded, and whom to tell once it is on disk.
    Entry(Vec<u8>, OnDisk),
    /// Ends the log's current part (a snapshot is being copied): the mark for `log_drop`.
    Cut(oneshot::Sender<Result<u64>>),
}

/// Whom the log task tells that an entry is on disk.
pub(super) enum OnDisk {
    /// A waiter that also waits for the members' acks (`log_writes`).
    Waiter(oneshot::Sender<Result<()>>),
    /// The callers themselves: a batch that waits for no ack (no other member), applied
    /// before it was sent here, is answered as soon as it is on disk.
    Callers(Callers),
}

/// The callers of one batch.
type Callers = Vec<oneshot::Sender<Result<()>>>;

impl OnDisk {
    fn answer(self, table: &str, r: &Result<()>) {
        let one = |tx: oneshot::Sender<Result<()>>| {
            let _ = tx.send(match r {
                Ok(()) => Ok(()),
                Err(e) => Err(copy_error(table, e)),
            });
        };
        match self {
            OnDisk::Waiter(tx) => one(tx),
            OnDisk::Callers(txs) => txs.into_iter().for_each(one),
        }
    }
}

/// The server's side of the log task.
pub(super) struct Wal {
    tx: mpsc::UnboundedSender<LogMsg>,
    /// Bytes of the entries sent to the log task and not yet appended (`MAX_QUEUED_BYTES`).
    queued: Arc<AtomicU64>,
    /// Bytes in the log, as the backend last said.
    pub bytes: Arc<AtomicU64>,
    /// The last failed append (cleared by the next successful one).
    pub error: Arc<std::sync::Mutex<Option<String>>>,
    /// The entry of a batch that waits for no ack, with its callers: sent by `release_log` once
    /// the batch is applied, so no caller is answered before its write is visible here.
    held: Option<(Vec<u8>, Callers)>,
}

impl Wal {
    pub(super) fn start(p: PersistOptions, table: String, bytes: u64) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let wal = Self {
            tx,
            queued: Arc::default(),
            bytes: Arc::new(AtomicU64::new(bytes)),
            error: Arc::default(),
            held: None,
        };
        let task = LogTask {
            p,
            table,
            queued: wal.queued.clone(),
            bytes: wal.bytes.clone(),
            error: wal.error.clone(),
        };
        tokio::spawn(task.run(rx).in_current_span());
        wal
    }

    /// Queues `entry` for the log task, or answers `reply` at once with an error if the queue
    /// holds `MAX_QUEUED_BYTES` already.
    fn send(&self, table: &str, entry: Vec<u8>, reply: OnDisk) {
        let n = entry.len() as u64;
        let queued = self.queued.fetch_add(n, AtomicOrdering::AcqRel);
        if queued > 0 && queued + n > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(n, AtomicOrdering::AcqRel);
            let e = Error::Persistence {
                file: table.to_string(),
                reason: format!(
                    "the write-ahead log's queue is full ({:.1} MB wait for the disk): this \
                     write is applied and replicated but not logged",
                    queued as f64 / 1e6
                ),
            };
            tracing::debug!(error = %e, "log queue full");
            *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            reply.answer(table, &Err(e));
            return;
        }
        if let Err(mpsc::error::SendError(LogMsg::Entry(_, reply))) =
            self.tx.send(LogMsg::Entry(entry, reply))
        {
            self.queued.fetch_sub(n, AtomicOrdering::AcqRel);
            let e = Error::Persistence {
                file: table.to_string(),
                reason: "the log task ended".into(),
            };
            reply.answer(table, &Err(e));
        }
    }

    /// Asks for a cut; the receiver gets the mark once every entry sent before is appended.
    pub(super) fn cut(&self) -> Option<oneshot::Receiver<Result<u64>>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(LogMsg::Cut(tx)).ok().map(|()| rx)
    }
}

/// A persistence error as every caller of one batch gets it (`Error` is not `Clone`).
pub(super) fn copy_error(table: &str, e: &Error) -> Error {
    match e {
        Error::Persistence { file, reason } => Error::Persistence {
            file: file.clone(),
            reason: reason.clone(),
        },
        Error::PersistenceUnavailable { store, reason } => Error::PersistenceUnavailable {
            store: store.clone(),
            reason: reason.clone(),
        },
        other => Error::Persistence {
            file: table.to_string(),
            reason: other.to_string(),
        },
    }
}

/// First pause of the appends after a failed one; doubled per failure up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A log whose appends fail (a full disk, a directory gone read-only): until `retry_at`, groups
/// fail at once with the last error instead of touching the disk again.
struct Failing {
    /// The last error, as the callers get it (`copy_error`).
    error: Error,
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    /// Appends tried and failed since `since`.
    failures: u64,
}

impl Failing {
    /// The state after the first failed append, at `now`.
    fn first(table: &str, e: &Error, now: Instant) -> Self {
        Self {
            error: copy_error(table, e),
            since: now,
            retry_at: now + FIRST_BACKOFF,
            backoff: FIRST_BACKOFF,
            failures: 1,
        }
    }

    /// Counts another failed append, at `now`, and doubles the back-off; whether its error
    /// differs from the last one. Both are compared as the callers get them, so an error that
    /// is not `Error::Persistence` (wrapped by `copy_error`) is the same error when it repeats.
    fn again(&mut self, table: &str, e: &Error, now: Instant) -> bool {
        let e = copy_error(table, e);
        let new = e.to_string() != self.error.to_string();
        self.error = e;
        self.failures += 1;
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        self.retry_at = now + self.backoff;
        new
    }
}

/// The entries one append writes, and whom to tell.
struct Group {
    entries: Vec<Vec<u8>>,
    replies: Vec<OnDisk>,
}

impl Group {
    /// Adds an entry; a cut is kept in `next` for after this group (returns false).
    fn add(&mut self, m: LogMsg, next: &mut Option<LogMsg>) -> bool {
        match m {
            LogMsg::Entry(e, r) => {
                self.entries.push(e);
                self.replies.push(r);
                true
            }
            cut => {
                *next = Some(cut);
                false
            }
        }
    }
}

/// The log task: appends the entries the table server sends, a group at a time.
struct LogTask {
    p: PersistOptions,
    table: String,
    /// `Wal::queued`: lowered by each group's bytes once the group is answered.
    queued: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl LogTask {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<LogMsg>) {
        let table = self.table.as_str();
        let mut next: Option<LogMsg> = None;
        let mut failing: Option<Failing> = None;
        loop {
            let first = match next.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => return,
                },
            };
            let (entry, reply) = match first {
                LogMsg::Cut(reply) => {
                    let _ = reply.send(self.p.backend.log_cut(table).await);
                    continue;
                }
                LogMsg::Entry(e, r) => (e, r),
            };
            let mut g = Group {
                entries: vec![entry],
                replies: vec![reply],
            };
            while g.entries.len() < MAX_GROUP {
                let Ok(m) = rx.try_recv() else { break };
                if !g.add(m, &mut next) {
                    break;
                }
            }
            let Group { entries, replies } = g;
            let size: u64 = entries.iter().map(|e| e.len() as u64).sum();
            let result = self.append(entries, replies.len(), &mut failing).await;
            self.queued.fetch_sub(size, AtomicOrdering::AcqRel);
            for r in replies {
                r.answer(table, &result);
            }
        }
    }

    /// Appends one group of entries (`batches` of them), unless a back-off after a failure
    /// runs: then the group fails without touching the disk, so a failing disk costs neither
    /// a spin of retries nor a log line per write.
    async fn append(
        &self,
        entries: Vec<Vec<u8>>,
        batches: usize,
        failing: &mut Option<Failing>,
    ) -> Result<()> {
        let table = self.table.as_str();
        if let Some(f) = failing.as_ref().filter(|f| Instant::now() < f.retry_at) {
            tracing::debug!(batches, "log appends paused after a failure");
            return Err(copy_error(table, &f.error));
        }
        let appended = self.p.backend.log_append(table, entries).await;
        let mut last = self.error.lock().unwrap_or_else(|p| p.into_inner());
        match appended {
            Ok(b) => {
                self.bytes.store(b, AtomicOrdering::Relaxed);
                *last = None;
                drop(last);
                if let Some(f) = failing.take() {
                    tracing::info!(
                        failures = f.failures,
                        after = ?f.since.elapsed(),
                        "log appends work again"
                    );
                }
                Ok(())
            }
            Err(e) => {
                *last = Some(e.to_string());
                drop(last);
                let now = Instant::now();
                match failing {
                    Some(f) => {
                        if f.again(table, &e, now) {
                            tracing::warn!(error = %e, retry_in = ?f.backoff, "log append failed");
                        } else {
                            tracing::debug!(error = %e, retry_in = ?f.backoff, "log append failed again");
                        }
                    }
                    None => {
                        tracing::warn!(
                            error = %e,
                            batches,
                            retry_in = ?FIRST_BACKOFF,
                            "log append failed"
                        );
                        *failing = Some(Failing::first(table, &e, now));
                    }
                }
                Err(e)
            }
        }
    }
}

/// A log entry (a postcard-encoded sequence of ops) from `count` encoded ops back to back: the
/// sequence's length, then the ops, as `postcard::to_stdvec` of the ops would encode them.
fn log_entry(count: usize, body: &[u8]) -> postcard::Result<Vec<u8>> {
    let mut entry = postcard::to_stdvec(&count)?;
    entry.extend_from_slice(body);
    Ok(entry)
}

impl<K: Key, V: Value> Server<K, V> {
    /// With `sync_writes`: sends the batch `ops` (this node's writes, about to be applied) to
    /// the log, and returns replies that answer the callers once their batch is acknowledged
    /// and on disk; with no other member, none: the log task answers the callers once the
    /// entry, sent by `release_log` after the apply, is on disk. Without: `replies` as they are.
    /// `encoded` is the batch's frame body when it was encoded for the peers (the ops'
    /// encodings back to back, `count` of them): the log entry is built from it instead of
    /// encoding the ops again.
    pub(super) fn log_writes(
        &mut self,
        ops: &[Op<K, V>],
        encoded: Option<(usize, &[u8])>,
        replies: Vec<oneshot::Sender<Result<()>>>,
    ) -> Vec<oneshot::Sender<Result<()>>> {
        let Some(wal) = &self.persist.wal else {
            return replies;
        };
        if ops.is_empty() {
            return replies;
        }
        let table = self.shared.name.clone();
        let entry = match encoded {
            Some((count, body)) => log_entry(count, body),
            None => postcard::to_stdvec(ops),
        };
        if !self.peers.has_members() {
            // No acks to wait for: the log task answers the callers itself (`release_log`).
            match entry {
                Ok(entry) => {
                    if let Some(wal) = &mut self.persist.wal {
                        wal.held = Some((entry, replies));
                    }
                }
                Err(e) => {
                    let e = Error::Codec(e);
                    for r in replies {
                        let _ = r.send(Err(copy_error(&table, &e)));
                    }
                }
            }
            return Vec::new();
        }
        let (on_disk, logged) = oneshot::channel();
        match entry {
            Ok(entry) => wal.send(&table, entry, OnDisk::Waiter(on_disk)),
            Err(e) => {
                let _ = on_disk.send(Err(Error::Codec(e)));
            }
        }
        let mut gated = Vec::with_capacity(replies.len());
        let mut pairs = Vec::with_capacity(replies.len());
        for r in replies {
            let (tx, rx) = oneshot::channel();
            gated.push(tx);
            pairs.push((r, rx));
        }
        tokio::spawn(
            async move {
                let logged = logged.await.unwrap_or_else(|_| {
                    Err(Error::Persistence {
                        file: table.clone(),
                        reason: "the log task ended".into(),
                    })
                });
                for (r, rx) in pairs {
                    let Ok(acked) = rx.await else { continue };
                    let out = match (acked, &logged) {
                        (Err(e), _) => Err(e),
                        (Ok(()), Err(e)) => Err(copy_error(&table, e)),
                        (Ok(()), Ok(())) => Ok(()),
                    };
                    let _ = r.send(out);
                }
            }
            .in_current_span(),
        );
        gated
    }

    /// Sends the entry `log_writes` held back (a batch that waits for no ack) now that the
    /// batch is applied: its callers are answered once it is on disk.
    pub(super) fn release_log(&mut self) {
        if let Some(wal) = &mut self.persist.wal {
            if let Some((entry, callers)) = wal.held.take() {
                wal.send(&self.shared.name, entry, OnDisk::Callers(callers));
            }
        }
    }

    /// Replays the log at start (after the snapshot's records are in): each batch as this
    /// node's write, in the order it was applied, so a key deleted after the snapshot is
    /// deleted again; the merge by stamp keeps whatever is newer. Records the log names under
    /// an earlier incarnation of this node's name become this incarnation's; records of other
    /// owners (an owner function) are not restored. Returns the newest stamp replayed.
    pub(super) fn replay(&mut self, log: Vec<Vec<Op<K, V>>>) -> u64 {
        let mut newest = 0;
        for ops in log {
            for mut op in ops {
                if let OpKind::InsertOwned { owners, .. } = &mut op.kind {
                    for o in owners.iter_mut().filter(|o| o.name == self.me.name) {
                        *o = self.me.clone();
                    }
                }
                newest = newest.max(op.ts);
                self.apply(op, self.me_idx);
            }
        }
        newest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repeated error that is not `Error::Persistence` (wrapped for the callers) is the same
    /// error: one warning, not one per retry; a different one is new. The back-off doubles up
    /// to its bound either way.
    #[test]
    fn a_repeated_failure_is_new_only_when_its_error_changes() {
        let io = |m: &str| Error::Io(std::io::Error::other(m.to_string()));
        let now = Instant::now();
        let mut f = Failing::first("t", &io("disk gone"), now);
        assert_eq!(f.retry_at, now + FIRST_BACKOFF);
        assert!(!f.again("t", &io("disk gone"), now), "the same i/o error");
        assert!(!f.again("t", &io("disk gone"), now), "the same i/o error");
        assert!(f.again("t", &io("read-only"), now), "another i/o error");
        let full = || Error::Persistence {
            file: "t.1.wal".into(),
            reason: "no space".into(),
        };
        assert!(f.again("t", &full(), now), "another kind of error");
        assert!(!f.again("t", &full(), now), "the same persistence error");
        assert_eq!(f.failures, 6);
        assert_eq!(f.backoff, Duration::from_millis(3200));
        f.again("t", &full(), now);
        assert_eq!((f.backoff, f.retry_at), (MAX_BACKOFF, now + MAX_BACKOFF));
    }

    #[test]
    fn a_log_entry_from_a_frame_body_is_the_encoding_of_its_ops() {
        for n in [1usize, 3, 200] {
            let ops: Vec<Op<String, u32>> = (0..n)
                .map(|i| Op {
                    ts: i as u64,
                    kind: OpKind::Insert(vec![(format!("k{i}"), i as u32)]),
                })
                .collect();
            let mut body = Vec::new();
            for op in &ops {
                body.extend(postcard::to_stdvec(op).unwrap());
            }
            assert_eq!(
                log_entry(ops.len(), &body).unwrap(),
                postcard::to_stdvec(&ops).unwrap(),
                "{n} ops"
            );
        }
    }
}
