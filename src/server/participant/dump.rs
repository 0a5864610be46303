//! `JoinReq::Dump`, step 6 of a join (ALGORITHM.md, section 9.2): this node's records of the
//! owners the join carries, chunk by chunk.

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Step 6: sends the dump once per join, within a pause of that join.
    pub(super) fn on_dump(&mut self, origin: Origin<K, V>, join: u64, alive: Vec<NodeId>) {
        if !self.paused_by(join) {
            self.refuse(origin, "not paused by this join");
            return;
        }
        self.join_progress();
        if let Some(p) = self.pause.current_mut() {
            if p.dumped {
                self.refuse(origin, "this join had the dump already");
                return;
            }
            p.dumped = true;
            p.carried = alive.clone();
        }
        // A large table takes a while: on a multi-threaded runtime, the tasks queued
        // behind this one (the join coordinator, woken by each chunk it is sent, the
        // table streams' writers) move to another thread meanwhile, so the join's lease
        // renewals still go out.
        if tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| self.send_dump(origin, &alive));
        } else {
            self.send_dump(origin, &alive);
        }
        // The lease runs from the dump's end.
        self.join_progress();
    }

    pub(in crate::server) fn send_dump(&self, origin: Origin<K, V>, alive: &[NodeId]) {
        if let Origin::Peer(key, _) = origin {
            let Some(link) = self.peers.get(key).filter(|l| l.open()) else {
                // Its queue overflowed (the connection is closing), or its stream is gone.
                return;
            };
            // A dump streams as the peer reads it; one asked for while the last one is still
            // waiting for room means the peer does not read (a join asks each node once, and
            // the next join comes after this one ended): each would queue another copy of the
            // table.
            if link.bulk().is_some_and(links::BulkLane::busy) {
                tracing::warn!(
                    peer = %link.id(),
                    "a dump asked for while the last one still waits for the peer to read it; closing the connection"
                );
                link.conn().close_overloaded();
                return;
            }
        }
        // The dump's owner list: the alive owners only, renumbered (`wire[i]`: the index in
        // that list of owner `i` here).
        let cluster = self.cluster_owned();
        if cluster {
            self.send_tombstones(&origin);
        }
        let mut owners: Vec<NodeId> = Vec::new();
        let wire: Vec<Option<u32>> = (0..self.owners.slots() as OwnerIdx)
            .map(|i| {
                let id = self.owners.get(i).filter(|id| {
                    alive.contains(id) || (cluster && crate::ownership::is_writer_id(id))
                })?;
                owners.push(id.clone());
                Some((owners.len() - 1) as u32)
            })
            .collect();
        let mut chunker = Chunker::new(
            self.config.join_chunk_records,
            self.config.max_frame_size / 4,
        );
        // Expired records stay out: a read returns none of them, and a conflict handler must
        // not make one live again with a new stamp.
        let from = self.shared.live_from();
        // Each chunk goes out as soon as it is full, so the coordinator hears of the dump's
        // progress (and renews its lease) while a large table is still being read, instead of
        // waiting, up to its per-reply timeout, for the whole table to be cut first.
        let send = |records, last| {
            let body = JoinRep::Chunk {
                owners: owners.clone(),
                records,
                last,
            };
            match &origin {
                Origin::Local(tx) => {
                    let _ = tx.send(body);
                }
                // Through the link's bulk lane: encoded by the lane's task, and queued as the
                // link drains, so a dump larger than the link's queue streams.
                Origin::Peer(key, req) => {
                    self.send_bulk(*key, PeerMsg::JoinReply { req: *req, body })
                }
            }
        };
        self.shared.store.for_each(|k, r| {
            if !r.live(from) {
                return;
            }
            if let Some(&Some(owner)) = wire.get(r.owner as usize) {
                chunker.push(WireRecord {
                    key: k.clone(),
                    value: r.value.clone(),
                    ts: r.ts,
                    owner,
                    ttl: r.ttl,
                });
                for records in chunker.take_full() {
                    send(records, false);
                }
            }
        });
        // The last chunk (possibly empty) says the dump is complete.
        let rest = chunker.finish();
        let n = rest.len();
        for (i, records) in rest.into_iter().enumerate() {
            send(records, i + 1 == n);
        }
    }
}
