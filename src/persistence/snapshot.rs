//! The content of a snapshot: blocks of postcard-encoded records and tombstones, with the
//! owner's node name (records restore under this node's new incarnation, or in a cluster-owned
//! table under their writer's name).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One record as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapRecord<K, V> {
    pub key: K,
    pub value: V,
    pub ts: u64,
    /// The owner's node name (a cluster-owned table: the writer's name).
    pub owner: String,
    /// `Rec::ttl`.
    pub ttl: u32,
}

/// One tombstone of a cluster-owned table as saved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SnapTombstone<K> {
    pub key: K,
    pub ts: u64,
    pub owner: String,
}

/// One block of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapBlock<K, V> {
    pub records: Vec<SnapRecord<K, V>>,
    pub tombstones: Vec<SnapTombstone<K>>,
}

/// Decodes the blocks of a snapshot; `what` names it in errors.
pub(crate) fn decode_blocks<K, V>(what: &str, blocks: &[Vec<u8>]) -> Result<Vec<SnapBlock<K, V>>>
where
    K: serde::de::DeserializeOwned,
    V: serde::de::DeserializeOwned,
{
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            postcard::from_bytes(b).map_err(|e| Error::Persistence {
                file: what.to_string(),
                reason: format!("block {i} does not decode as this table's records: {e}"),
            })
        })
        .collect()
}
