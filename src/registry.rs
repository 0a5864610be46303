//! The node's registry of running tables, and the events the node sends to table servers.
//!
//! The registry is type-erased: the transport routes streams by table name without knowing
//! the key and value types; each table server decodes its own frames.

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::sync::mpsc;

use crate::frame::FrameReader;
use crate::membership::NodeId;
use crate::proto::{stop, StreamHeader};
use crate::types::TableKind;
use crate::{Error, Result};

/// An authenticated connection to a peer node.
#[derive(Clone, Debug)]
pub(crate) struct PeerConn {
    pub id: NodeId,
    pub conn: quinn::Connection,
}

/// What the node tells a table server.
pub(crate) enum TableEvent {
    /// A peer node is connected: open a table stream to it.
    PeerUp(PeerConn),
    /// A peer node is gone (connection lost, shut down, or replaced by a new incarnation).
    PeerDown(NodeId),
    /// The peer opened its table stream towards us (header already checked).
    Inbound(PeerConn, FrameReader),
    /// The peer's table has another kind or types; nothing of it is applied.
    Refused { peer: NodeId, reason: String },
}

pub(crate) struct TableEntry {
    pub kind: TableKind,
    pub fingerprint: u64,
    pub events: mpsc::UnboundedSender<TableEvent>,
}

/// Tables running on this node, by name.
#[derive(Default)]
pub(crate) struct Registry {
    tables: RwLock<HashMap<String, TableEntry>>,
}

impl Registry {
    pub(crate) fn insert(&self, name: &str, entry: TableEntry) -> Result<()> {
        let mut tables = self.tables.write().unwrap_or_else(|p| p.into_inner());
        if tables.get(name).is_some_and(|t| !t.events.is_closed()) {
            return Err(Error::TableExists(name.to_string()));
        }
        tables.insert(name.to_string(), entry);
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) {
        self.tables
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// Sends an event to every table.
    pub(crate) fn broadcast(&self, make: impl Fn() -> TableEvent) {
        for entry in self
            .tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let _ = entry.events.send(make());
        }
    }

    /// Sends an event to one table, if it runs here.
    pub(crate) fn send(&self, name: &str, event: TableEvent) {
        if let Some(entry) = self
            .tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            let _ = entry.events.send(event);
        }
    }

    /// Hands a peer's table stream to the table it names, or refuses it.
    pub(crate) fn route_inbound(
        &self,
        peer: PeerConn,
        header: StreamHeader,
        mut reader: FrameReader,
    ) {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = tables.get(&header.table) else {
            tracing::debug!(peer = %peer.id, table = %header.table, "peer runs a table we do not");
            reader.stop(stop::UNKNOWN_TABLE);
            return;
        };
        let mismatch = if entry.kind != header.kind {
            Some(format!("kind {} here, {} there", entry.kind, header.kind))
        } else if entry.fingerprint != header.fingerprint {
            Some("key or value types, or expire_after, differ".to_string())
        } else {
            None
        };
        match mismatch {
            Some(reason) => {
                tracing::error!(peer = %peer.id, table = %header.table, %reason,
                    "refusing incompatible table; no records cross");
                reader.stop(stop::INCOMPATIBLE);
                let _ = entry.events.send(TableEvent::Refused {
                    peer: peer.id,
                    reason,
                });
            }
            None => {
                tracing::debug!(peer = %peer.id, table = %header.table, "table stream routed to its table server");
                let _ = entry.events.send(TableEvent::Inbound(peer, reader));
            }
        }
    }
}
