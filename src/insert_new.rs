//! `insert_new` and `insert_new_or_get`: insert a key only if no node holds it, with one winner
//! among concurrent calls on connected members (ALGORITHM.md, section 17).

use tokio::sync::oneshot;

use crate::proto::{ClaimOutcome, OpKind};
use crate::server::{Claim, Write};
use crate::table::Table;
use crate::types::{Key, Value};
use crate::{Error, Result};

/// What [`Table::insert_new_or_get`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertNew<V> {
    /// The key was free: this call's record is stored on every member.
    Inserted,
    /// The key was taken (by an earlier call, or by a concurrent one that won): the value it
    /// holds on the table's leader. Nothing was written.
    Exists(V),
}

impl<V> InsertNew<V> {
    /// Whether this call inserted the record.
    pub fn inserted(&self) -> bool {
        matches!(self, InsertNew::Inserted)
    }
}

impl<K: Key, V: Value> Table<K, V> {
    /// Inserts the record only if the key holds nothing (no value, for a bag); returns whether
    /// it did. Among concurrent calls for one key on the connected members of the table,
    /// exactly one returns `true` and every member stores its value: the table's leader (the
    /// member with the largest node name) checks and inserts, one call after another, and the
    /// other members send their calls to it. A call whose leader goes down is retried with the
    /// next one; one that finds no leader within `ack_timeout` fails with
    /// [`Error::InsertNew`]. The record belongs to this node (or to the owner function's
    /// choice), as with [`Table::insert`].
    ///
    /// Limits: two sides of a partition each have a leader, so each may grant the same key;
    /// when they join, the conflict rule (last writer wins, or the conflict handler) keeps one
    /// record on every node. A plain [`Table::insert`] of the key is not checked: it
    /// overwrites, as in CETS.
    pub async fn insert_new(&self, key: K, value: V) -> Result<bool> {
        Ok(self.insert_new_or_get(key, value).await?.inserted())
    }

    /// [`Table::insert_new`] that, when the key is taken, returns the value that holds it (the
    /// value that won, among concurrent calls).
    pub async fn insert_new_or_get(&self, key: K, value: V) -> Result<InsertNew<V>> {
        let (reply, acked) = oneshot::channel();
        let (outcome, decided) = oneshot::channel();
        let write = Write {
            op: Some(OpKind::Insert(vec![(key, value)])),
            reply,
            claim: Some(Claim {
                requester: None,
                retry: false,
                outcome,
            }),
        };
        self.writes.send(write).await.map_err(|_| Error::Shutdown)?;
        acked.await.map_err(|_| Error::Shutdown)??;
        match decided.await {
            Ok(ClaimOutcome::Inserted) => Ok(InsertNew::Inserted),
            Ok(ClaimOutcome::Exists(v)) => Ok(InsertNew::Exists(v)),
            Ok(ClaimOutcome::NotLeader | ClaimOutcome::Failed(_)) | Err(_) => {
                Err(Error::InsertNew {
                    table: self.shared.name.clone(),
                    reason: "the claim ended without a decision".into(),
                })
            }
        }
    }
}
