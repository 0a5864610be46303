//! Client writes: group commit. Queued writes are applied here and encoded once into one
//! `Ops` frame that every member's link queues; the callers wait for the members' acks.

use super::links::ops_frame;
use super::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Group commit: takes `first` and whatever else is queued, applies it, and sends it to
    /// every member as one frame.
    pub(super) fn on_writes(&mut self, first: Write<K, V>) {
        let replicate = self.peers.has_members();
        let mut body = Vec::new();
        let mut count = 0usize;
        let mut replies = Vec::new();
        let mut accepted_ops = Vec::new();
        let mut next = Some(first);
        let mut claimed = HashMap::new();
        while let Some(Write { op, reply, claim }) = next.take() {
            let Some((op, reply)) = self.gate_claim(op, reply, claim, &mut claimed) else {
                next = self.writes.try_recv().ok();
                continue;
            };
            let mut reply = Some(reply);
            if let Some(kind) = op {
                let refuse = |e: Error, reply: &mut Option<oneshot::Sender<Result<()>>>| {
                    if let Some(r) = reply.take() {
                        let _ = r.send(Err(e));
                    }
                };
                let kind = match self.with_owners(kind) {
                    Ok(kind) => kind,
                    Err(e) => {
                        // The owner function panicked: this write fails, nothing of it is
                        // applied or sent, and the batch goes on.
                        refuse(e, &mut reply);
                        next = self.writes.try_recv().ok();
                        continue;
                    }
                };
                let op = Op {
                    ts: self.clock.now(),
                    kind,
                };
                let mut accepted = true;
                let limit = self.config.max_frame_size / 2;
                let too_large = || {
                    Error::Config(format!(
                        "one write may encode to at most half of max_frame_size ({limit} bytes); split it"
                    ))
                };
                if replicate {
                    // Appended in place; on any refusal the body is cut back to the writes
                    // before this one (an encode that fails may have written part of it).
                    let before = body.len();
                    let encoded = postcard::to_extend(&op, Append(&mut body)).map(drop);
                    match encoded {
                        Ok(()) if body.len() - before <= limit => count += 1,
                        Ok(()) => {
                            body.truncate(before);
                            accepted = false;
                            refuse(too_large(), &mut reply);
                        }
                        Err(e) => {
                            body.truncate(before);
                            accepted = false;
                            refuse(Error::Codec(e), &mut reply);
                        }
                    }
                } else {
                    // Alone, the write is not sent now, but a later join will send it: a record
                    // that could never cross is refused here too.
                    match postcard::experimental::serialized_size(&op) {
                        Ok(n) if n <= limit => {}
                        Ok(_) => {
                            accepted = false;
                            refuse(too_large(), &mut reply);
                        }
                        Err(e) => {
                            accepted = false;
                            refuse(Error::Codec(e), &mut reply);
                        }
                    }
                }
                if accepted {
                    accepted_ops.push(op);
                }
            }
            if let Some(r) = reply {
                replies.push(r);
            }
            if replies.len() >= self.config.max_batch_ops
                || body.len() >= self.config.max_batch_bytes
            {
                break;
            }
            next = self.writes.try_recv().ok();
        }
        self.metrics.writes.increment(accepted_ops.len() as u64);
        let wrote = !accepted_ops.is_empty();
        // With `sync_writes`, the callers also wait for the write-ahead log (`wal.rs`).
        debug_assert!(!replicate || count == accepted_ops.len());
        let encoded = replicate.then_some((count, body.as_slice()));
        let replies = self.log_writes(&accepted_ops, encoded, replies);
        if !replicate {
            self.apply_local(accepted_ops);
            self.release_log();
            if wrote {
                self.peers.note_missed(&[]);
            }
            for r in replies {
                let _ = r.send(Ok(()));
            }
            return;
        }
        if replies.is_empty() {
            return;
        }
        let seq = self.commit.next_seq();
        let frame = match ops_frame(seq, count, &body) {
            Ok(f) => f,
            Err(e) => {
                // Nothing was applied or sent: the writes fail as a whole.
                let msg = e.to_string();
                for r in replies {
                    let _ = r.send(Err(Error::Transport(msg.clone())));
                }
                return;
            }
        };
        self.metrics.batch_writes.record(count as f64);
        self.metrics.batch_bytes.record(frame.len() as f64);
        let waiting = self.peers.queue_to_members(&frame);
        // Sent first, applied here second: the local apply overlaps the round trip and the
        // peers' own apply. Replies wait for the acks, which this task handles after the
        // apply, so a caller still finds its write on every node when its call returns.
        self.apply_local(accepted_ops);
        if wrote {
            self.peers.note_missed(&waiting);
        }
        self.commit.push(Pending {
            seq,
            sent: Instant::now(),
            replies,
            waiting,
            deadline: deadline_after(self.opts.ack_timeout),
        });
        self.complete_pending();
    }

    pub(super) fn apply_local(&mut self, ops: Vec<Op<K, V>>) {
        for op in ops {
            self.apply(op, self.me_idx);
        }
    }

    /// Completes, in order, every batch acknowledged by all its members (or whose missing
    /// members are gone).
    pub(super) fn complete_pending(&mut self) {
        let peers = &self.peers;
        let done = |p: &Pending| p.waiting.iter().all(|&k| peers.acked_or_gone(k, p.seq));
        while let Some(p) = self.commit.pop_done(done) {
            if !p.waiting.is_empty() {
                self.metrics.ack_latency.record(p.sent.elapsed());
            }
            for r in p.replies {
                let _ = r.send(Ok(()));
            }
        }
        if self.commit.is_idle() && self.pause.has_waiters() {
            for origin in self.pause.take_waiters() {
                let rep = self.paused_reply();
                self.reply(origin, rep);
            }
        }
    }

    /// An insert as it is sent and applied. With an owner function, each record's owner is
    /// decided here, once, for every replica: the node `TableOptions::owner` names if it is
    /// this node or a member of the table, otherwise this node. In a set or ordered_set, a key
    /// written twice in one insert keeps its last record only: receivers order records with
    /// equal stamps by value (they may be two writers'), so the write must not carry two. A bag
    /// keeps every object. Other writes are returned as they are. A panic of the owner
    /// function fails the whole write (`Error::Callback`).
    pub(super) fn with_owners(&mut self, kind: OpKind<K, V>) -> Result<OpKind<K, V>> {
        let OpKind::Insert(mut recs) = kind else {
            return Ok(kind);
        };
        let dedupe = recs.len() > 1
            && self.shared.kind != TableKind::Bag
            && self.repeats.may_repeat(recs.iter().map(|(k, _)| k));
        let Some(f) = &self.opts.owner else {
            if dedupe {
                last_of_each_key(&mut recs, |(k, _)| k);
            }
            return Ok(OpKind::Insert(recs));
        };
        let mut owners: Vec<NodeId> = Vec::new();
        let mut records = Vec::with_capacity(recs.len());
        for (k, v) in recs {
            let name =
                crate::callbacks::guarded(&self.shared.name, "owner function", &k, || f(&k, &v))?;
            let owner = self
                .peers
                .member_links()
                .map(|(_, l)| l.id())
                .find(|id| id.name == name)
                .unwrap_or(&self.me);
            let i = match owners.iter().position(|o| o == owner) {
                Some(i) => i,
                None => {
                    owners.push(owner.clone());
                    owners.len() - 1
                }
            };
            // At most one owner per record: the index fits.
            records.push((k, v, i as u32));
        }
        if dedupe {
            last_of_each_key(&mut records, |(k, _, _)| k);
        }
        Ok(OpKind::InsertOwned { owners, records })
    }
}

/// Keeps the last of the records of each key, in their order (one write's records, before
/// stamping: see `Server::with_owners`).
fn last_of_each_key<T, K: Hash + Eq>(records: &mut Vec<T>, key: impl Fn(&T) -> &K) {
    let mut last: HashMap<&K, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(records.len(), Default::default());
    for (i, r) in records.iter().enumerate() {
        last.insert(key(r), i);
    }
    if last.len() == records.len() {
        return;
    }
    let keep: Vec<bool> = records
        .iter()
        .enumerate()
        .map(|(i, r)| last.get(key(r)) == Some(&i))
        .collect();
    drop(last);
    let mut keep = keep.into_iter();
    records.retain(|_| keep.next().unwrap_or(true));
}

/// A `Vec` that postcard appends to by reference, so the bytes before an encode that fails are
/// not lost with it (`to_extend` takes its writer by value and drops it on error).
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}
