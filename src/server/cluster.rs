//! Cluster-owned tables (`Ownership::Cluster`, ALGORITHM.md section 12): records are stored
//! under their writer's name (incarnation 0), never under a live incarnation, so no node-down
//! drops them; tombstones live for the table's retention and travel with join dumps.

use super::*;
use crate::ownership::{self, Ownership};
use crate::proto::WireTombstone;

impl<K: Key, V: Value> Server<K, V> {
    pub(super) fn cluster_owned(&self) -> bool {
        self.opts.ownership == Ownership::Cluster
    }

    /// The owner index a write of `writer` (a live incarnation) is stored and stamped under in
    /// a cluster-owned table: the writer's name with incarnation 0. Interned once per name.
    pub(super) fn cluster_writer(&mut self, writer: OwnerIdx) -> OwnerIdx {
        let Some(id) = self.owners.get(writer) else {
            return writer;
        };
        if ownership::is_writer_id(id) {
            return writer;
        }
        let w = ownership::writer_id(&id.name);
        self.owners.intern(&w)
    }

    /// Tombstones stamped at or before this are older than the table's retention.
    pub(super) fn retention_floor(&self) -> u64 {
        let ms = u64::try_from(self.opts.tombstone_retention.as_millis()).unwrap_or(u64::MAX);
        HybridClock::written_since(ms).saturating_sub(1)
    }

    /// Whether a join may store records or tombstones of `id` here: a live incarnation, or in
    /// a cluster-owned table a writer name.
    pub(super) fn join_owner_ok(&self, id: &NodeId) -> bool {
        *id == self.me
            || self.peers.key_of(id).is_some()
            || (self.cluster_owned() && ownership::is_writer_id(id))
    }

    /// Sends this node's tombstones younger than the retention to a join coordinator, in
    /// chunks (before the dump's records). Nothing if there are none.
    pub(super) fn send_tombstones(&self, origin: &Origin<K, V>) {
        let floor = self.retention_floor();
        let mut owners: Vec<NodeId> = Vec::new();
        let mut wire: HashMap<OwnerIdx, u32> = HashMap::new();
        let (max_records, max_bytes) = (
            self.config.join_chunk_records,
            self.config.max_frame_size / 4,
        );
        let mut chunks: Vec<(Vec<NodeId>, Vec<WireTombstone<K>>)> = Vec::new();
        let mut chunk: Vec<WireTombstone<K>> = Vec::new();
        let mut bytes = 0usize;
        for (k, (ts, owner)) in self.tombstones.iter() {
            if ts <= floor {
                continue;
            }
            let Some(id) = self.owners.get(owner) else {
                continue;
            };
            let size = postcard::experimental::serialized_size(k).unwrap_or(max_bytes) + 16;
            if !chunk.is_empty() && (chunk.len() >= max_records || bytes + size > max_bytes) {
                chunks.push((std::mem::take(&mut owners), std::mem::take(&mut chunk)));
                wire.clear();
                bytes = 0;
            }
            let i = *wire.entry(owner).or_insert_with(|| {
                owners.push(id.clone());
                (owners.len() - 1) as u32
            });
            bytes += size;
            chunk.push(WireTombstone {
                key: k.clone(),
                ts,
                owner: i,
            });
        }
        if !chunk.is_empty() {
            chunks.push((owners, chunk));
        }
        for (owners, tombstones) in chunks {
            let body = JoinRep::Tombstones { owners, tombstones };
            match origin {
                Origin::Local(tx) => {
                    let _ = tx.send(body);
                }
                // Ahead of the dump's records, on the same lane (`send_dump`).
                Origin::Peer(key, req) => {
                    self.send_bulk(*key, PeerMsg::JoinReply { req: *req, body })
                }
            }
        }
    }

    /// Stores the other partition's tombstones (a join of a cluster-owned table): each one
    /// newer than the key's record removes it, and stays to refuse older records of the key.
    pub(super) fn apply_join_tombstones(
        &mut self,
        owners: Vec<NodeId>,
        tombstones: Vec<WireTombstone<K>>,
        by: NodeId,
    ) {
        let watch = self.watch();
        let map: Vec<Option<OwnerIdx>> = owners
            .iter()
            .map(|id| ownership::is_writer_id(id).then(|| self.owners.intern(id)))
            .collect();
        let floor = self.retention_floor();
        for t in tombstones {
            let Some(&Some(owner)) = map.get(t.owner as usize) else {
                continue;
            };
            self.clock.observe(t.ts);
            if t.ts <= floor || !self.newer(&t.key, t.ts, owner) {
                continue;
            }
            let stamp = (t.ts, self.owners.get(owner));
            let owners = &self.owners;
            self.shared
                .store
                .remove_if(&t.key, |(cts, co)| stamp >= (cts, owners.get(co)));
            self.add_tombstone(t.key, Tombstone::of((t.ts, owner)));
        }
        self.emit(watch, super::notify::Cause::Join(by));
    }

    /// Whether a record a join brings (stamp `ts`, owner `owner`) beats the key's tombstone
    /// here; true without one. In a node-owned table every record does (dumps carry no
    /// tombstones there: a record the other side holds comes back).
    pub(super) fn beats_local_tombstone(&self, k: &K, ts: u64, owner: OwnerIdx, value: &V) -> bool {
        if !self.cluster_owned() {
            return true;
        }
        match self.tombstones.get(k) {
            Some(t) => rules::beats_tombstone((ts, self.owners.get(owner)), value, t, &self.owners),
            None => true,
        }
    }
}
