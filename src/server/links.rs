//! Links to peers: one table stream each way per member, its reader and writer tasks, and
//! what the table server sends on them.

use super::*;

/// Between two notes of our clock to the members while we hold tombstones (`flush_acks`).
const CLOCK_NOTE_EVERY: Duration = Duration::from_millis(5);

impl<K: Key, V: Value> Server<K, V> {
    /// The peer's table stream arrived: it runs the table. Its messages are read from now
    /// on, a stream of ours is opened if there is none, and a join is started if one is due.
    pub(super) fn on_inbound(&mut self, pc: PeerConn, reader: FrameReader) {
        let Some(key) = self.ensure_link(pc.clone()) else {
            return;
        };
        let Some(gen) = self.peers.get(key).map(Link::gen) else {
            return;
        };
        self.spawn_reader(pc, key, gen, reader);
        self.peers.inbound(key);
        // The peer runs the table: if our stream to it is gone (or its writer ended and
        // its close is still queued), open another one now.
        if !self.peers.get(key).is_some_and(Link::open) {
            self.open_writer(key);
        }
        self.maybe_join(key);
    }

    /// The outbound stream `writer` of link `gen` closed (`peers::Peers::stream_closed`).
    pub(super) fn on_stream_closed(
        &mut self,
        key: OwnerIdx,
        gen: u64,
        writer: u64,
        stop_code: Option<u32>,
        reason: &str,
    ) {
        match self
            .peers
            .stream_closed(key, gen, writer, stop_code, reason)
        {
            peers::StreamClosed::Stale => {}
            peers::StreamClosed::Reopen => self.open_writer(key),
            peers::StreamClosed::Closed { dropped } => {
                if dropped {
                    self.publish_members();
                }
                self.complete_pending();
            }
        }
    }

    /// The link to a connected peer, created (with its outbound stream) if new. `None` for a
    /// connection already closed: its `PeerDown` may have been handled before this event, and
    /// a link made now would never be removed.
    pub(super) fn ensure_link(&mut self, pc: PeerConn) -> Option<OwnerIdx> {
        if pc.conn.close_reason().is_some() {
            tracing::debug!(peer = %pc.id, "event of a connection already closed ignored");
            return None;
        }
        let key = self.owners.intern(&pc.id);
        if self.peers.has_conn(key, &pc.conn) {
            return Some(key);
        }
        // A previous incarnation (or connection) of the same node is gone.
        for id in self.peers.named(&pc.id.name) {
            self.peer_down(&id);
        }
        let metrics = self.metrics.peer(&pc.id.name);
        self.peers.add(key, pc.id, pc.conn, metrics);
        self.open_writer(key);
        Some(key)
    }

    /// Opens a new table stream to a linked peer (a new writer task), in place of the link's
    /// old one, if any. Every stream a writer opens gets its own id, so that the close of a
    /// replaced one, handled late, is not taken for the new one's.
    pub(super) fn open_writer(&mut self, key: OwnerIdx) {
        let writer = self.peers.next_id();
        let (header, inputs, limit) = (
            self.header.clone(),
            self.inputs_tx.clone(),
            self.config.max_link_queue_bytes,
        );
        let Some(link) = self.peers.get(key) else {
            return;
        };
        let pc = PeerConn {
            id: link.id().clone(),
            conn: link.conn().clone(),
        };
        let gen = link.gen();
        // The writer task runs in the link's span (`spawn_writer` spawns it in the current one).
        let span = link_span(&self.me, &self.shared.name, &pc.id, "out");
        let _in_span = span.enter();
        let conn = pc.conn.clone();
        let out = spawn_writer(pc, header, key, gen, writer, inputs, limit);
        let bulk = BulkLane::spawn(out.clone(), conn);
        self.peers.set_writer(key, writer, out, Some(bulk));
    }

    /// Queues `msg` on the link's bulk lane: encoded by the lane's task (not this table
    /// server) and queued behind the lane's earlier messages once the link's queue has room.
    pub(super) fn send_bulk(&self, key: OwnerIdx, msg: PeerMsg<K, V>) {
        let Some(lane) = self.peers.get(key).and_then(Link::bulk) else {
            return;
        };
        let job: BulkJob = Box::new(move || match frame::encode(&msg) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a message");
                None
            }
        });
        lane.send(job);
    }

    /// Opens a table stream to every peer that runs the table (its stream to us arrived) and
    /// to which we have none, whatever closed the last one: the link is otherwise useless until
    /// the connection ends, and nothing else would repair it.
    pub(super) fn reopen_streams(&mut self) {
        for key in self.peers.without_stream() {
            if let Some(id) = self.peers.id_of(key) {
                tracing::info!(peer = %id, "reopening the table stream to a peer that runs the table");
            }
            self.open_writer(key);
        }
    }

    /// Reads a peer's table stream and hands each message to the table server. A decoded
    /// message can take many times the bytes of its frame (a record of an empty string is 2
    /// bytes on the wire and 32 in memory), so the frames of one stream whose messages the
    /// table server has not handled yet may come to `max_frame_size` bytes at most (a larger
    /// frame, up to the limit, passes alone): the reader then waits, QUIC flow control stops
    /// the peer, and the memory a peer holds here is a bounded multiple of that.
    pub(super) fn spawn_reader(
        &self,
        pc: PeerConn,
        key: OwnerIdx,
        gen: u64,
        mut reader: FrameReader,
    ) {
        let inputs = self.inputs_tx.clone();
        let budget = u32::try_from(self.config.max_frame_size).unwrap_or(u32::MAX);
        let room = Arc::new(Semaphore::new(budget as usize));
        let span = link_span(&self.me, &self.shared.name, &pc.id, "in");
        tokio::spawn(
            async move {
                loop {
                    let body = match reader.next().await {
                        Ok(Some(body)) => body,
                        Ok(None) => return,
                        Err(e @ Error::FrameTooLarge { .. }) => {
                            tracing::warn!(peer = %pc.id, error = %e, "closing the connection");
                            pc.conn.close(VarInt::from_u32(close::PROTOCOL), b"frame too large");
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(peer = %pc.id, error = %e, "table stream ended");
                            return;
                        }
                    };
                    let take = u32::try_from(body.len()).unwrap_or(u32::MAX).clamp(1, budget);
                    let Ok(permit) = room.clone().acquire_many_owned(take).await else {
                        return;
                    };
                    match frame::decode::<PeerMsg<K, V>>(&body) {
                        Ok(msg) => {
                            let input = Input::Msg {
                                key,
                                gen,
                                msg,
                                size: body.len(),
                                _room: permit,
                            };
                            if inputs.send(input).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(peer = %pc.id, error = %e, "undecodable frame; closing the connection");
                            pc.conn.close(VarInt::from_u32(close::PROTOCOL), b"undecodable frame");
                            return;
                        }
                    }
                }
            }
            .instrument(span),
        );
    }

    pub(super) fn publish_members(&self) {
        let ids = self.peers.member_ids();
        *self
            .shared
            .members
            .write()
            .unwrap_or_else(|p| p.into_inner()) = ids;
    }

    pub(super) fn send_to(&self, key: OwnerIdx, msg: &PeerMsg<K, V>) {
        let Some(link) = self.peers.get(key) else {
            return;
        };
        match frame::encode(msg) {
            Ok(f) => {
                link.queue(f);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a message"),
        }
    }

    pub(super) fn flush_acks(&mut self) {
        if self.to_ack.is_empty() {
            return;
        }
        let clock = self.clock.now();
        let acked = std::mem::take(&mut self.to_ack);
        for (&key, &seq) in &acked {
            self.send_to(key, &PeerMsg::Ack { seq, clock });
        }
        // The other members learn our clock too, at most every `CLOCK_NOTE_EVERY`, while we
        // hold tombstones: each member forgets tombstones older than every member's clock,
        // and a delete usually reaches every member, so under a stream of deletes their maps
        // then hold milliseconds of deletes instead of the half second between two ticks.
        let now = Instant::now();
        if self.tombstones.is_empty() || now < self.next_clock_note {
            return;
        }
        self.next_clock_note = now + CLOCK_NOTE_EVERY;
        let msg = PeerMsg::<K, V>::Tick {
            clock,
            view: self.view(),
        };
        if let Ok(f) = frame::encode(&msg) {
            for (key, l) in self.peers.member_links() {
                if l.ready() && !acked.contains_key(&key) {
                    l.queue(f.clone());
                }
            }
        }
    }
}

pub(super) fn ops_frame(seq: u64, count: usize, body: &[u8]) -> Result<Bytes> {
    // Encode the message with no ops, drop the trailing zero length, append the real one.
    let mut head = postcard::to_stdvec(&PeerMsg::<(), ()>::Ops {
        seq,
        ops: Vec::new(),
    })?;
    head.pop();
    let head = postcard::to_extend(&count, head)?;
    let len = head.len() + body.len();
    let len32 = u32::try_from(len).map_err(|_| Error::FrameTooLarge {
        size: len,
        limit: u32::MAX as usize,
    })?;
    let mut buf = Vec::with_capacity(frame::PREFIX + len);
    buf.extend_from_slice(&len32.to_le_bytes());
    buf.extend_from_slice(&head);
    buf.extend_from_slice(body);
    Ok(Bytes::from(buf))
}

/// Opens the table stream to a peer and writes everything queued to it, batching what
/// accumulated while the previous write was in flight into one `write_all_chunks`.
pub(super) fn spawn_writer<K: Key, V: Value>(
    pc: PeerConn,
    header: Bytes,
    key: OwnerIdx,
    gen: u64,
    writer: u64,
    inputs: mpsc::Sender<Input<K, V>>,
    limit: usize,
) -> Outbox {
    let (tx, mut rx) = outbox(limit);
    tokio::spawn(
        async move {
            let result: std::result::Result<(), quinn::WriteError> = async {
                let mut send = pc
                    .conn
                    .open_uni()
                    .await
                    .map_err(quinn::WriteError::ConnectionLost)?;
                send.write_all(&header).await?;
                let mut batch: Vec<Bytes> = Vec::with_capacity(64);
                loop {
                    // Also notice a peer that stops the stream while we have nothing to send
                    // (it runs no such table), so the link is known closed at once.
                    let b = tokio::select! {
                        b = rx.recv() => b,
                        stopped = send.stopped() => {
                            return Err(match stopped {
                                Ok(Some(code)) => quinn::WriteError::Stopped(code),
                                Ok(None) => quinn::WriteError::ClosedStream,
                                Err(quinn::StoppedError::ConnectionLost(e)) => quinn::WriteError::ConnectionLost(e),
                                Err(_) => quinn::WriteError::ClosedStream,
                            });
                        }
                    };
                    let Some(b) = b else { break };
                    batch.push(b);
                    while batch.len() < 256 {
                        match rx.try_recv() {
                            Some(b) => batch.push(b),
                            None => break,
                        }
                    }
                    if rx.overflowed() {
                        // The table server is closing the connection: nothing more is written.
                        return Err(quinn::WriteError::ClosedStream);
                    }
                    let bytes: usize = batch.iter().map(Bytes::len).sum();
                    send.write_all_chunks(&mut batch).await?;
                    rx.written(bytes);
                    batch.clear();
                }
                let _ = send.finish();
                Ok(())
            }
            .await;
            if let Err(e) = result {
                let stop_code = match &e {
                    quinn::WriteError::Stopped(code) => u32::try_from(code.into_inner()).ok(),
                    _ => None,
                };
                let _ = inputs
                    .send(Input::LinkClosed {
                        key,
                        link: gen,
                        writer,
                        reason: e.to_string(),
                        stop_code,
                    })
                    .await;
            }
        }
        .in_current_span(),
    );
    tx
}

/// A message for a link's bulk lane, encoded when the lane's task gets to it.
pub(super) type BulkJob = Box<dyn FnOnce() -> Option<Bytes> + Send>;

/// The bulk lane of a link's queue: a task that encodes what a join sends (its requests, a
/// dump's chunks) and queues each frame once the queue is at most half full
/// (`Outbox::room`), so a join of any size flows at the pace the peer reads and never fills
/// the queue that writes, acks and ticks share. Frames keep their order; what is sent
/// directly on the queue (replies, renewals) may overtake them. The task ends with the lane,
/// or when the queue closes.
pub(super) struct BulkLane {
    tx: mpsc::UnboundedSender<BulkJob>,
    /// Messages sent to the lane and not yet queued (or dropped).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl BulkLane {
    pub(super) fn spawn(out: Outbox, conn: quinn::Connection) -> BulkLane {
        use std::sync::atomic::Ordering::Relaxed;
        let (tx, mut rx) = mpsc::unbounded_channel::<BulkJob>();
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let left = pending.clone();
        tokio::spawn(
            async move {
                while let Some(job) = rx.recv().await {
                    let queued = match job() {
                        Some(frame) if out.room(frame.len()).await => out.send(frame),
                        Some(_) => Err(Refused::Closed),
                        None => Ok(()),
                    };
                    left.fetch_sub(1, Relaxed);
                    match queued {
                        Ok(()) => {}
                        Err(Refused::Overflow { queued }) => {
                            tracing::warn!(
                                queued,
                                "outbound queue full (NodeConfig::max_link_queue_bytes): the peer does not read its table stream; closing the connection"
                            );
                            conn.close(VarInt::from_u32(close::OVERLOAD), b"outbound queue full");
                            return;
                        }
                        Err(Refused::Closed) => return,
                    }
                }
            }
            .in_current_span(),
        );
        BulkLane { tx, pending }
    }

    fn send(&self, job: BulkJob) {
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.tx.send(job).is_err() {
            self.pending
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether messages sent earlier still wait for room in the queue.
    pub(super) fn busy(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

/// The span of a link's reader (`dir = "in"`) or writer (`"out"`) task.
pub(super) fn link_span(
    me: &NodeId,
    table: &str,
    peer: &NodeId,
    dir: &'static str,
) -> tracing::Span {
    tracing::info_span!("cets_link", node = %me.name, table = %table, peer = %peer, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_frame_decodes_as_peer_msg() {
        let ops = vec![
            Op {
                ts: 7,
                kind: OpKind::Insert(vec![(1u64, "a".to_string())]),
            },
            Op {
                ts: 8,
                kind: OpKind::Delete(vec![2u64]),
            },
        ];
        let mut body = Vec::new();
        for op in &ops {
            body = postcard::to_extend(op, body).unwrap();
        }
        for (count, body) in [(2, &body[..]), (0, &[][..])] {
            let f = ops_frame(300, count, body).unwrap();
            match frame::decode::<PeerMsg<u64, String>>(&f[frame::PREFIX..]).unwrap() {
                PeerMsg::Ops { seq, ops } => {
                    assert_eq!(seq, 300);
                    assert_eq!(ops.len(), count);
                }
                _ => panic!("wrong variant"),
            }
        }
    }
}
