//! `insert_new` (ALGORITHM.md, section 17): the table's leader, the member with the largest
//! node identity, checks and inserts, one claim after another; other members forward their
//! claims to it over the table stream and retry with the next leader if it goes down.

use super::*;
use crate::proto::ClaimOutcome;

/// How long a claim that the leader refused (it does not see itself as the leader yet: views
/// differ while a node-down or a join spreads) waits before it is sent again.
const CLAIM_RETRY: Duration = Duration::from_millis(50);
/// Claims of peers this leader handles at once; more are refused as overloaded (each holds a
/// task until its write is acknowledged).
const MAX_PEER_CLAIMS: usize = 16_384;

/// A write that goes on (`gate_claim`): its op and its caller's reply.
type Gated<K, V> = (Option<OpKind<K, V>>, oneshot::Sender<Result<()>>);

/// An `insert_new` on its way through the table server.
pub(crate) struct Claim<V> {
    /// The node whose caller made the claim (`None`: this node's).
    pub requester: Option<NodeId>,
    /// A retry after the leader that had it went away: a record the requester owns with this
    /// very value is its own claim, granted before the leader fell.
    pub retry: bool,
    /// Where the decision goes (the write's `reply` says when it is acknowledged).
    pub outcome: oneshot::Sender<ClaimOutcome<V>>,
}

/// A claim of this node forwarded to the leader, waiting for its answer.
struct Forwarded<K, V> {
    to: OwnerIdx,
    key: K,
    value: V,
    reply: oneshot::Sender<Result<()>>,
    outcome: oneshot::Sender<ClaimOutcome<V>>,
    /// When to route it again (it was refused by a node that is not the leader yet).
    again_at: Option<Instant>,
    retry: bool,
    deadline: Instant,
}

/// The claims state of a table server.
pub(crate) struct Claims<K, V> {
    next_req: u64,
    forwarded: HashMap<u64, Forwarded<K, V>>,
    /// Claims of peers being served here.
    serving: usize,
}

impl<K, V> Default for Claims<K, V> {
    fn default() -> Self {
        Self {
            next_req: 0,
            forwarded: HashMap::new(),
            serving: 0,
        }
    }
}

impl<K: Key, V: Value> Server<K, V> {
    /// The table's leader as this node sees it: the largest identity among this node and its
    /// members.
    fn leader(&self) -> OwnerIdx {
        self.peers
            .member_links()
            .map(|(k, l)| (l.id(), k))
            .chain(std::iter::once((&self.me, self.me_idx)))
            .max_by(|a, b| a.0.cmp(b.0))
            .map_or(self.me_idx, |(_, k)| k)
    }

    /// A write in `on_writes`: one without a claim goes on as it is. One with a claim, on the
    /// leader, has its key checked (against the store and the claims earlier in this batch,
    /// which are applied only when the batch is cut) and returns the insert to make if it
    /// wins; elsewhere, a local claim is forwarded to the leader and a peer's is refused.
    pub(super) fn gate_claim(
        &mut self,
        op: Option<OpKind<K, V>>,
        reply: oneshot::Sender<Result<()>>,
        claim: Option<Claim<V>>,
        claimed: &mut HashMap<K, V>,
    ) -> Option<Gated<K, V>> {
        let Some(claim) = claim else {
            return Some((op, reply));
        };
        let Some(OpKind::Insert(mut recs)) = op else {
            let _ = reply.send(Err(Error::Config("a claim is one record".into())));
            return None;
        };
        let (Some((key, value)), true) = (recs.pop(), recs.is_empty()) else {
            let _ = reply.send(Err(Error::Config("a claim is one record".into())));
            return None;
        };
        let leader = self.leader();
        if leader != self.me_idx {
            match claim.requester {
                None => self.forward_claim(key, value, reply, claim.outcome, claim.retry),
                Some(_) => {
                    let _ = claim.outcome.send(ClaimOutcome::NotLeader);
                    let _ = reply.send(Ok(()));
                }
            }
            return None;
        }
        let requester = match &claim.requester {
            None => Some(self.me_idx),
            Some(id) => self.live_owner(id),
        };
        let existing = match claimed.get(&key) {
            Some(v) => Some((v.clone(), None)),
            None => self.live_record(&key),
        };
        if let Some((existing, owner)) = existing {
            // (A cluster-owned table stores a claim under the leader's name: the value tells.)
            let own = claim.retry
                && owner.is_some()
                && (owner == requester || self.cluster_owned())
                && same_value(&existing, &value);
            let _ = claim.outcome.send(if own {
                ClaimOutcome::Inserted
            } else {
                ClaimOutcome::Exists(existing)
            });
            let _ = reply.send(Ok(()));
            return None;
        }
        claimed.insert(key.clone(), value.clone());
        let _ = claim.outcome.send(ClaimOutcome::Inserted);
        // The record is the caller's, as if its node had written it (it goes when that node
        // goes, not when the leader does), unless an owner function decides. A cluster-owned
        // table stores it under the leader's name, as any write of the leader.
        let op = match (&claim.requester, &self.opts.owner) {
            (Some(id), None) if !self.cluster_owned() => OpKind::InsertOwned {
                owners: vec![id.clone()],
                records: vec![(key, value, 0)],
            },
            _ => OpKind::Insert(vec![(key, value)]),
        };
        Some((Some(op), reply))
    }

    /// The key's live value (the first object, in a bag) and its owner.
    fn live_record(&self, key: &K) -> Option<(V, Option<OwnerIdx>)> {
        let from = self.shared.live_from();
        self.shared
            .store
            .records(key)
            .into_iter()
            .find(|r| r.ts >= from)
            .map(|r| (r.value, Some(r.owner)))
    }

    fn forward_claim(
        &mut self,
        key: K,
        value: V,
        reply: oneshot::Sender<Result<()>>,
        outcome: oneshot::Sender<ClaimOutcome<V>>,
        retry: bool,
    ) {
        self.claims.next_req += 1;
        let req = self.claims.next_req;
        let deadline = deadline_after(self.opts.ack_timeout);
        let f = Forwarded {
            to: self.me_idx,
            key,
            value,
            reply,
            outcome,
            again_at: None,
            retry,
            deadline,
        };
        self.route_claim(req, f);
    }

    /// Sends a forwarded claim to the leader as this node sees it now; if that is this node,
    /// through this node's own write queue.
    fn route_claim(&mut self, req: u64, mut f: Forwarded<K, V>) {
        let leader = self.leader();
        if leader == self.me_idx {
            let write = Write {
                op: Some(OpKind::Insert(vec![(f.key, f.value)])),
                reply: f.reply,
                claim: Some(Claim {
                    requester: None,
                    retry: f.retry,
                    outcome: f.outcome,
                }),
            };
            self.enqueue_own(write);
            return;
        }
        f.to = leader;
        f.again_at = None;
        let msg = PeerMsg::InsertNew {
            req,
            key: f.key.clone(),
            value: f.value.clone(),
            retry: f.retry,
        };
        self.send_to(leader, &msg);
        self.claims.forwarded.insert(req, f);
    }

    /// Puts a write in this table's own queue, behind the writes of its handles.
    fn enqueue_own(&self, write: Write<K, V>) {
        match self.writes_tx.try_send(write) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(w)) => {
                let tx = self.writes_tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = tx.send(w).await {
                        let _ = e.0.reply.send(Err(Error::Shutdown));
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(w)) => {
                let _ = w.reply.send(Err(Error::Shutdown));
            }
        }
    }

    /// A member's claim (`PeerMsg::InsertNew`): decided in this node's write queue, in turn
    /// with its own claims; the answer goes back once the insert is acknowledged.
    pub(super) fn on_peer_claim(
        &mut self,
        from: OwnerIdx,
        req: u64,
        key: K,
        value: V,
        retry: bool,
    ) {
        let Some((id, gen)) = self
            .peers
            .get(from)
            .filter(|_| self.peers.is_member(from))
            .map(|l| (l.id().clone(), l.gen()))
        else {
            // Not a member: it will retry once joined.
            self.send_to(
                from,
                &PeerMsg::InsertNewReply {
                    req,
                    outcome: ClaimOutcome::NotLeader,
                },
            );
            return;
        };
        if self.claims.serving >= MAX_PEER_CLAIMS {
            let outcome = ClaimOutcome::Failed("the leader has too many claims in flight".into());
            self.send_to(from, &PeerMsg::InsertNewReply { req, outcome });
            return;
        }
        self.claims.serving += 1;
        let (reply, replied) = oneshot::channel();
        let (outcome, decided) = oneshot::channel();
        let write = Write {
            op: Some(OpKind::Insert(vec![(key, value)])),
            reply,
            claim: Some(Claim {
                requester: Some(id),
                retry,
                outcome,
            }),
        };
        let (tx, control) = (self.writes_tx.clone(), self.control_tx.clone());
        tokio::spawn(
            async move {
                let outcome = if tx.send(write).await.is_err() {
                    ClaimOutcome::Failed("the leader's table stopped".into())
                } else {
                    match (replied.await, decided.await) {
                        (Ok(Ok(())), Ok(o)) => o,
                        (Ok(Err(e)), _) => ClaimOutcome::Failed(e.to_string()),
                        _ => ClaimOutcome::Failed("the leader's table stopped".into()),
                    }
                };
                let _ = control.send(Control::ClaimDone {
                    peer: from,
                    gen,
                    req,
                    outcome,
                });
            }
            .in_current_span(),
        );
    }

    /// A peer's claim is decided (and, if it won, acknowledged): its answer goes back.
    pub(super) fn on_claim_done(
        &mut self,
        peer: OwnerIdx,
        gen: u64,
        req: u64,
        outcome: ClaimOutcome<V>,
    ) {
        self.claims.serving = self.claims.serving.saturating_sub(1);
        if self.peers.is_current(peer, gen) {
            self.send_to(peer, &PeerMsg::InsertNewReply { req, outcome });
        }
    }

    /// The leader's answer to one of this node's claims.
    pub(super) fn on_claim_reply(&mut self, from: OwnerIdx, req: u64, outcome: ClaimOutcome<V>) {
        let Some(f) = self.claims.forwarded.get_mut(&req).filter(|f| f.to == from) else {
            return;
        };
        if let ClaimOutcome::NotLeader = outcome {
            f.again_at = Some(Instant::now() + CLAIM_RETRY);
            return;
        }
        let Some(f) = self.claims.forwarded.remove(&req) else {
            return;
        };
        match outcome {
            ClaimOutcome::Failed(reason) => {
                let _ = f.reply.send(Err(Error::InsertNew {
                    table: self.shared.name.clone(),
                    reason,
                }));
            }
            o => {
                let _ = f.outcome.send(o);
                let _ = f.reply.send(Ok(()));
            }
        }
    }

    /// The claims forwarded to a node that went down go to the next leader, as retries.
    pub(super) fn claims_leader_gone(&mut self, gone: OwnerIdx) {
        let reqs: Vec<u64> = self
            .claims
            .forwarded
            .iter()
            .filter(|(_, f)| f.to == gone)
            .map(|(r, _)| *r)
            .collect();
        if !reqs.is_empty() {
            tracing::debug!(
                claims = reqs.len(),
                "the leader went down; its claims go to the next"
            );
        }
        for req in reqs {
            if let Some(mut f) = self.claims.forwarded.remove(&req) {
                f.retry = true;
                self.route_claim(req, f);
            }
        }
    }

    /// On the tick: claims refused by a node that was not the leader yet go out again; claims
    /// past their deadline fail.
    pub(super) fn claims_tick(&mut self, now: Instant) {
        if self.claims.forwarded.is_empty() {
            return;
        }
        let expired: Vec<u64> = self
            .claims
            .forwarded
            .iter()
            .filter(|(_, f)| now > f.deadline)
            .map(|(r, _)| *r)
            .collect();
        for req in expired {
            if let Some(f) = self.claims.forwarded.remove(&req) {
                let _ = f.reply.send(Err(Error::InsertNew {
                    table: self.shared.name.clone(),
                    reason: format!(
                        "no leader answered within ack_timeout ({:?})",
                        self.opts.ack_timeout
                    ),
                }));
            }
        }
        let due: Vec<u64> = self
            .claims
            .forwarded
            .iter()
            .filter(|(_, f)| f.again_at.is_some_and(|t| now >= t))
            .map(|(r, _)| *r)
            .collect();
        for req in due {
            if let Some(f) = self.claims.forwarded.remove(&req) {
                self.route_claim(req, f);
            }
        }
    }
}
