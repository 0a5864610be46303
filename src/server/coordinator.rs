//! Control requests from the table's handles, and starting a join as its coordinator
//! (ALGORITHM.md, section 9; the coordinator's steps are in `crate::join`).

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Serves one control request; returns true when the server must stop.
    pub(super) fn on_control(&mut self, c: Control<K, V>) -> bool {
        match c {
            Control::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Control::JoinRequest(join::JoinRequest { to, body, replies }) => {
                if to == self.me {
                    self.on_join_req(Origin::Local(replies), body);
                    return false;
                }
                let Some(key) = self
                    .owners
                    .lookup(&to)
                    .filter(|k| self.peers.get(*k).is_some_and(Link::ready))
                else {
                    return false; // dropping `replies` tells the coordinator the node is unreachable
                };
                let dump = matches!(body, JoinReq::Dump { .. });
                let req = self.joins.send(key, replies, dump);
                // Every join request to the peer goes through its link's bulk lane, in order:
                // the chunks to apply flow as the peer reads, however large the join.
                self.send_bulk(key, PeerMsg::Join { req, body });
            }
            Control::JoinDone { peer: id, result } => {
                let base = self.config.join_backoff;
                let max = self.config.join_max_backoff;
                // A join with a node that went down meanwhile has no track left to update.
                let Some(peer) = self
                    .owners
                    .lookup(&id)
                    .filter(|k| self.peers.id_of(*k) == Some(&id))
                else {
                    return false;
                };
                self.joins.done(peer, &id.to_string(), result, (base, max));
            }
            Control::Subscribe(req) => self.on_subscribe(req),
            #[cfg(feature = "testing")]
            Control::Testing(w, done) => {
                self.test_write(w);
                let _ = done.send(());
            }
            Control::ClaimDone {
                peer,
                gen,
                req,
                outcome,
            } => self.on_claim_done(peer, gen, req, outcome),
            Control::Stop(done) => {
                self.stop();
                // A table with persistence answers once its final snapshot is written.
                self.final_snapshot(done);
                return true;
            }
        }
        false
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
                });
            }
            .instrument(span),
        );
    }
}
