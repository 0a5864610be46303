//! Wire messages. Every message travels as one frame (see [`crate::frame`]).
//!
//! A connection between two nodes carries:
//! - one bidirectional *control* stream, opened by the dialer, on which both sides send a
//!   [`Hello`] (the cookie handshake);
//! - per table and direction, one unidirectional *table* stream, opened by the sending node's
//!   table server. Its first frame is a [`StreamHeader`]; every further frame is a
//!   [`PeerMsg`] from the sending server to the receiving one, in order. Acknowledgements of
//!   writes travel back on the receiver's own table stream, behind any write it sent earlier,
//!   which is what lets a cumulative ack double as a flush marker.

// The wire types are public under the cargo feature `testing` (`cets::testing::wire`, for the
// tests that speak the protocol themselves), and crate-internal otherwise.
#![cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
#![cfg_attr(feature = "testing", allow(missing_docs))]

use serde::{Deserialize, Serialize};

use crate::membership::NodeId;
use crate::types::TableKind;

/// Version of the wire protocol. Nodes with different versions refuse each other. Besides the
/// messages, it covers how a record's digest is computed (`crate::stable_hash`): nodes that
/// would compute different digests of the same records must not compare them. 5: keys and
/// values are hashed in a fixed-width layout instead of through their postcard encodings.
pub const PROTOCOL_VERSION: u32 = 5;
/// First bytes of every [`Hello`].
pub const MAGIC: [u8; 4] = *b"CETS";

/// The handshake message, sent once by each side of a new connection.
#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u32,
    pub node: NodeId,
    /// HMAC-SHA256(cookie, role || name || incarnation || TLS exporter secret).
    pub proof: Vec<u8>,
}

/// First frame of a table stream: which table, and what it holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamHeader {
    pub table: String,
    pub kind: TableKind,
    /// Hash of the key and value type names.
    pub fingerprint: u64,
}

/// One replicated write, as it travels between table servers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op<K, V> {
    /// Hybrid logical clock timestamp of the write.
    pub ts: u64,
    pub kind: OpKind<K, V>,
}

/// What a replicated write does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OpKind<K, V> {
    /// Records owned by the writer.
    Insert(Vec<(K, V)>),
    Delete(Vec<K>),
    DeleteObject(Vec<(K, V)>),
    /// Records of a table with an owner function, as the writer decided their owners:
    /// `records[i].2` indexes `owners`. Receivers store these owners, never their own opinion.
    InsertOwned {
        owners: Vec<NodeId>,
        records: Vec<(K, V, u32)>,
    },
    /// Records owned by the writer that expire `ttl_ms` after the write's stamp
    /// (`Table::insert_with_ttl`).
    InsertTtl {
        ttl_ms: u32,
        records: Vec<(K, V)>,
    },
}

/// A record with its metadata, as shipped by a join. `owner` indexes a list of owners sent
/// alongside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRecord<K, V> {
    pub key: K,
    pub value: V,
    pub ts: u64,
    pub owner: u32,
    /// The record's own lifetime in milliseconds (`Rec::ttl`); 0: none.
    pub ttl: u32,
}

/// A message from one table server to the same table's server on another node.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerMsg<K, V> {
    /// A batch of writes (group commit). `seq` grows by one per batch.
    Ops { seq: u64, ops: Vec<Op<K, V>> },
    /// Every `Ops` batch up to `seq` that the receiver sent has been applied here.
    Ack { seq: u64, clock: u64 },
    /// Sent periodically to members: advances the receiver's view of the sender's clock (lets
    /// it forget tombstones) and tells it the sender's view: a hash of its epoch and member list
    /// (detects half-finished joins and one-sided membership).
    Tick { clock: u64, view: u64 },
    /// A request of a join coordinator.
    Join { req: u64, body: JoinReq<K, V> },
    /// The answer to a join request.
    JoinReply { req: u64, body: JoinRep<K, V> },
    /// Anti-entropy: digests of the table's contents and their repair.
    AntiEntropy(AeMsg<K, V>),
    /// An `insert_new` call of the sender, for the table's leader to decide (ALGORITHM.md,
    /// section 17). `retry`: the leader it went to first went down.
    InsertNew {
        req: u64,
        key: K,
        value: V,
        retry: bool,
    },
    /// The leader's answer to an `InsertNew`, sent once a granted record is acknowledged.
    InsertNewReply { req: u64, outcome: ClaimOutcome<V> },
}

/// What the leader decided about an `insert_new` call.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClaimOutcome<V> {
    /// The key was free; the record is stored (and, on the wire, acknowledged by every member).
    Inserted,
    /// The key holds this value; nothing was written.
    Exists(V),
    /// The receiver is not the leader in its view: ask again (the views differ for a moment).
    NotLeader,
    /// The claim could not be decided (the leader's table stopped, its write timed out).
    Failed(String),
}

/// What a table server has applied, as anti-entropy compares it: for itself and each member,
/// the `seq` of that node's last write batch it has applied (its own: the last it sent),
/// sorted by node. Two servers whose frontiers and views are equal hold the result of the
/// same writes.
pub type Frontier = Vec<(NodeId, u64)>;

/// Anti-entropy messages (ALGORITHM.md, section 15). Each carries the sender's view and
/// frontier when it was sent; the receiver acts on it only if both equal its own now.
#[derive(Debug, Serialize, Deserialize)]
pub enum AeMsg<K, V> {
    /// Every round, to every member: the summary of the digest and the number of records.
    Digest {
        view: u64,
        frontier: Frontier,
        root: u64,
        count: u64,
    },
    /// The digests differ: here are my buckets, (sum, count) each.
    Buckets {
        view: u64,
        frontier: Frontier,
        buckets: Vec<(u64, u64)>,
    },
    /// The records of the buckets that differ (all of them, bucket by bucket), as stamps and
    /// value hashes; `owner` indexes `owners`.
    Entries {
        view: u64,
        frontier: Frontier,
        buckets: Vec<u32>,
        owners: Vec<NodeId>,
        entries: Vec<AeEntry<K>>,
    },
    /// The repair: store `records` by the rule of a replicated write, remove the versions in
    /// `remove` if still held, and (if `answer`) send back the records named in `want`.
    Repair {
        owners: Vec<NodeId>,
        records: Vec<WireRecord<K, V>>,
        remove: Vec<AeEntry<K>>,
        want: Vec<(K, u64)>,
        answer: bool,
    },
    /// No digest was comparable (writes in flight): the asker's buckets, for a comparison at
    /// a cut (ALGORITHM.md, section 15.4); `prefer`: buckets to list first.
    CutBuckets {
        view: u64,
        buckets: Vec<(u64, u64)>,
        prefer: Vec<u32>,
    },
    /// The entries of the buckets that differ, with the lister's stamps: every write stamped
    /// below `stable` is applied here, and none applied here is stamped above `seen`.
    CutEntries {
        view: u64,
        stable: u64,
        seen: u64,
        buckets: Vec<u32>,
        owners: Vec<NodeId>,
        entries: Vec<AeEntry<K>>,
    },
}

/// One record (one object, in a bag) as anti-entropy lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AeEntry<K> {
    pub key: K,
    pub ts: u64,
    pub owner: u32,
    /// The stable hash of the value (`crate::digest::value_hash`).
    pub value: u64,
}

/// Join requests (see `ALGORITHM.md`).
#[derive(Debug, Serialize, Deserialize)]
pub enum JoinReq<K, V> {
    /// Who are your members, and are you paused?
    Info,
    /// Pause for this join, as a lease; answered once every earlier write of the server is
    /// acknowledged by its members. Sent again to renew the lease.
    Pause { join: u64, lease_ms: u64 },
    /// Stream your records, minus those owned by nodes not in `alive`.
    Dump { join: u64, alive: Vec<NodeId> },
    /// Store these records; on the last chunk, `members` is the table's new member list.
    /// `merge: None`: the coordinator already decided, store them as they are.
    /// `merge: Some(all)`: they are the other partition's dump; keep, per key, the later of the
    /// stored record and this one by last writer wins, a stored record whose owner is not in
    /// `all` counting as absent (dumps leave such records out).
    Apply {
        join: u64,
        owners: Vec<NodeId>,
        records: Vec<WireRecord<K, V>>,
        members: Option<Vec<NodeId>>,
        merge: Option<Vec<NodeId>>,
    },
    /// The join is over (done or abandoned): unpause.
    Unpause { join: u64 },
    /// Cluster-owned tables: the other partition's tombstones, sent before its records. Each
    /// removes an older stored record and stays, so that an older record of the key, from any
    /// side, is refused (ALGORITHM.md, section 12).
    Tombstones {
        join: u64,
        owners: Vec<NodeId>,
        tombstones: Vec<WireTombstone<K>>,
    },
    /// Remove these records where stored in this very version (stamp, owner, value): copies of
    /// a join node's records that its side does not hold (`crate::authority`). Answered with
    /// `Applied`. Sent before the join's `Apply` chunks.
    Stale {
        join: u64,
        owners: Vec<NodeId>,
        records: Vec<WireRecord<K, V>>,
    },
}

/// Join replies.
#[derive(Debug, Serialize, Deserialize)]
pub enum JoinRep<K, V> {
    Info {
        members: Vec<NodeId>,
        epoch: u64,
    },
    /// Paused; with the pauser's member list, epoch, and the nodes it has a table stream with
    /// both ways (the coordinator refuses to join nodes that cannot all reach each other).
    Paused {
        members: Vec<NodeId>,
        epoch: u64,
        reachable: Vec<NodeId>,
        /// Records held (lets the coordinator size its merge once).
        len: u64,
        /// Linked nodes whose writes this one missed, or that missed its writes, since the
        /// join that made them members (`crate::authority`).
        missed: Vec<NodeId>,
    },
    Busy {
        by: String,
    },
    Chunk {
        owners: Vec<NodeId>,
        records: Vec<WireRecord<K, V>>,
        last: bool,
    },
    /// The chunk is stored; `conflicts`: keys of a `merge` chunk that held another version.
    Applied {
        conflicts: u64,
    },
    Unpaused,
    Refused {
        reason: String,
    },
    /// Cluster-owned tables: a chunk of the source's tombstones younger than its retention,
    /// sent before the dump's records (`owner` indexes `owners`).
    Tombstones {
        owners: Vec<NodeId>,
        tombstones: Vec<WireTombstone<K>>,
    },
}

/// The tombstone of a deleted key, as shipped by a join of a cluster-owned table: the delete's
/// stamp. `owner` indexes a list of owners sent alongside.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireTombstone<K> {
    pub key: K,
    pub ts: u64,
    pub owner: u32,
}

/// Connection close codes (QUIC application error codes).
pub mod close {
    /// The node is shutting down.
    pub const SHUTDOWN: u32 = 0;
    /// The cookie proof was wrong.
    pub const AUTH: u32 = 1;
    /// A frame could not be decoded, was too large, or broke the protocol.
    pub const PROTOCOL: u32 = 2;
    /// Another protocol version.
    pub const VERSION: u32 = 3;
    /// The other side dials: only the node with the smaller name keeps a connection it dialed.
    pub const REDIRECT: u32 = 4;
    /// A live connection to this node already exists.
    pub const DUPLICATE: u32 = 5;
    /// The node dialed itself.
    pub const SELF: u32 = 6;
    /// A node with this name connected again under a new incarnation.
    pub const REPLACED: u32 = 7;
    /// The peer did not read a table stream while frames for it piled up past
    /// `NodeConfig::max_link_queue_bytes`.
    pub const OVERLOAD: u32 = 8;
}

/// Stream stop codes.
pub mod stop {
    /// The receiving node runs no table of that name.
    pub const UNKNOWN_TABLE: u32 = 1;
    /// The receiving node's table has another kind or other types.
    pub const INCOMPATIBLE: u32 = 2;
}

/// Cuts a stream of records into chunks of at most `max_records` records and about
/// `max_bytes` encoded bytes (a chunk always takes at least one record), so that a join never
/// builds a frame above the peer's limit, whatever the size of the values.
pub(crate) struct Chunker<K, V> {
    max_records: usize,
    max_bytes: usize,
    bytes: usize,
    chunks: Vec<Vec<WireRecord<K, V>>>,
}

impl<K: Serialize, V: Serialize> Chunker<K, V> {
    pub(crate) fn new(max_records: usize, max_bytes: usize) -> Self {
        Self {
            max_records,
            max_bytes,
            bytes: 0,
            chunks: vec![Vec::new()],
        }
    }

    pub(crate) fn push(&mut self, rec: WireRecord<K, V>) {
        let size = postcard::experimental::serialized_size(&rec).unwrap_or(self.max_bytes);
        let full = self.chunks.last().is_some_and(|c| {
            !c.is_empty() && (c.len() >= self.max_records || self.bytes + size > self.max_bytes)
        });
        if full {
            self.chunks.push(Vec::new());
            self.bytes = 0;
        }
        self.bytes += size;
        if let Some(c) = self.chunks.last_mut() {
            c.push(rec);
        }
    }

    /// The chunks; at least one (possibly empty).
    pub(crate) fn finish(self) -> Vec<Vec<WireRecord<K, V>>> {
        self.chunks
    }

    /// The chunks that are full (every one but the one still filling), taken out: a dump can
    /// send them while it goes on. Each holds records.
    pub(crate) fn take_full(&mut self) -> std::vec::Drain<'_, Vec<WireRecord<K, V>>> {
        let full = self.chunks.len().saturating_sub(1);
        self.chunks.drain(..full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: u64, bytes: usize) -> WireRecord<u64, Vec<u8>> {
        WireRecord {
            key,
            value: vec![7; bytes],
            ts: 1,
            owner: 0,
            ttl: 0,
        }
    }

    #[test]
    fn chunks_are_cut_by_count_and_by_size_and_never_empty() {
        let mut c = Chunker::new(3, 1 << 20);
        (0..7).for_each(|k| c.push(rec(k, 1)));
        assert_eq!(
            c.finish().iter().map(Vec::len).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        let mut c = Chunker::new(100, 2500);
        (0..5).for_each(|k| c.push(rec(k, 1000)));
        assert_eq!(
            c.finish().iter().map(Vec::len).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        // A record above the byte budget still travels, alone.
        let mut c = Chunker::new(100, 10);
        c.push(rec(1, 50));
        c.push(rec(2, 50));
        assert_eq!(
            c.finish().iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1, 1]
        );
        let c: Chunker<u64, Vec<u8>> = Chunker::new(3, 10);
        assert_eq!(c.finish().len(), 1);
    }
}
