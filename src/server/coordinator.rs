//! Joins, the coordinator's side in the table server: starting a join when one is due, and
//! carrying the coordinator's requests and their replies (ALGORITHM.md, section 9; the
//! coordinator's steps are in `crate::join`, its bookkeeping in `joins.rs`).

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    /// A join coordinator's request to `to`: served here if `to` is this node, otherwise sent
    /// on the peer's bulk lane, its replies streamed back to `replies` as they arrive.
    pub(super) fn on_join_request(&mut self, request: join::JoinRequest<K, V>) {
        let join::JoinRequest { to, body, replies } = request;
        if to == self.me {
            self.on_join_req(Origin::Local(replies), body);
            return;
        }
        let Some(key) = self
            .owners
            .lookup(&to)
            .filter(|k| self.peers.get(*k).is_some_and(Link::ready))
        else {
            return; // dropping `replies` tells the coordinator the node is unreachable
        };
        let dump = matches!(body, JoinReq::Dump { .. });
        let req = self.joins.send(key, replies, dump);
        // Every join request to the peer goes through its link's bulk lane, in order:
        // the chunks to apply flow as the peer reads, however large the join.
        self.send_bulk(key, PeerMsg::Join { req, body });
    }

    /// A peer's reply to one of the requests sent for a join coordinated here.
    pub(super) fn on_join_reply(
        &mut self,
        key: OwnerIdx,
        req: u64,
        body: JoinRep<K, V>,
        size: usize,
    ) {
        let max = self.config.max_link_queue_bytes;
        let free = matches!(body, JoinRep::Unpaused);
        match self.joins.reply(key, req, body, size, max) {
            joins::Reply::Overflow(bytes) => tracing::warn!(
                peer = %self.peers.id_of(key).map_or_else(String::new, ToString::to_string),
                bytes,
                "replies to one join request passed max_link_queue_bytes; dropping the request"
            ),
            joins::Reply::Ignored => self.late_join_reply(free),
            joins::Reply::Delivered => {}
        }
    }

    /// A join coordinated here with `id` ended (`busy`: refused `Busy` by a pause): its
    /// back-off is updated.
    pub(super) fn on_join_done(&mut self, id: NodeId, result: Result<u64>, busy: bool) {
        let base = self.config.join_backoff;
        let max = self.config.join_max_backoff;
        // A join with a node that went down meanwhile has no track left to update.
        let Some(peer) = self
            .owners
            .lookup(&id)
            .filter(|k| self.peers.id_of(*k) == Some(&id))
        else {
            return;
        };
        self.joins
            .done(peer, &id.to_string(), result, busy, (base, max));
        // Refused by a pause that has ended since: again at once.
        self.maybe_join(peer);
    }

    /// Starts a join with `key` if it is due: both sides run the table, it is not a member, and
    /// this node has the smaller name (so two nodes never both coordinate the same pair).
    pub(super) fn maybe_join(&mut self, key: OwnerIdx) {
        let Some(link) = self.peers.get(key) else {
            return;
        };
        if !link.ready() || self.peers.is_member(key) || self.me.name >= link.id().name {
            return;
        }
        if !self.joins.start(key) {
            return;
        }
        let peer = link.id().clone();
        let done_with = peer.clone();
        let control = self.control_tx.clone();
        let ctx = JoinCtx {
            port: Arc::new(move |r| {
                let _ = control.send(Control::JoinRequest(r));
            }),
            me: self.me.clone(),
            kind: self.shared.kind,
            conflict: self.opts.conflict.clone(),
            clock: self.clock.clone(),
            lease: self.config.join_lease,
            chunk: self.config.join_chunk_records,
            chunk_bytes: self.config.max_frame_size / 4,
            max_records: self.config.max_join_records,
            table: self.shared.name.clone(),
            checkpoint: self.opts.join_checkpoint.clone(),
            expire_ms: self.shared.expire_ms,
            cluster: self.cluster_owned(),
            moved: Arc::default(),
            busy: Arc::default(),
            streams: self
                .peers
                .links()
                .filter(|(_, l)| l.ready())
                .filter_map(|(_, l)| Some((l.id().clone(), l.out()?.clone())))
                .collect(),
        };
        let control = self.control_tx.clone();
        let table = self.shared.name.clone();
        let moved = ctx.moved.clone();
        let busy = ctx.busy.clone();
        let metrics = self.metrics.join();
        let span = tracing::info_span!("cets_join", node = %self.me.name, table = %self.shared.name, peer = %peer);
        tokio::spawn(
            async move {
                let started = Instant::now();
                // The join runs in a task of its own, so that whatever panics in it (the
                // conflict handler is caught closer, with its key) still ends it here with a
                // `JoinDone`: without one the pair stays marked as joining, never to join again.
                let (peer_name, run) = (peer.to_string(), join::run(ctx, peer).in_current_span());
                let result = match tokio::spawn(run).await {
                    Ok(result) => result,
                    Err(e) => {
                        let reason = match e.try_into_panic() {
                            Ok(p) => crate::callbacks::panic_message(p.as_ref()),
                            Err(e) => e.to_string(),
                        };
                        tracing::error!(peer = %peer_name, %reason, "join task panicked");
                        Err(Error::Join {
                            table,
                            peer: peer_name,
                            reason: format!("the join task panicked: {reason}"),
                        })
                    }
                };
                let took = started.elapsed();
                let records = moved.load(std::sync::atomic::Ordering::Relaxed);
                metrics.finished(result.as_ref().ok().copied(), took, records);
                match &result {
                    Ok(conflicts) => {
                        tracing::info!(outcome = "ok", conflicts, records, ?took, "join finished")
                    }
                    Err(e) => {
                        tracing::debug!(outcome = "error", error = %e, records, ?took, "join finished")
                    }
                }
                let _ = control.send(Control::JoinDone {
                    peer: done_with,
                    result,
                    busy: busy.load(std::sync::atomic::Ordering::Relaxed),
                });
            }
            .instrument(span),
        );
    }
}
