//! The health report: what an operator reads first. Both reports serialise with serde (to
//! JSON, say, for an HTTP endpoint) and deserialise back.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use crate::digest::{AntiEntropyStatus, PeerDigest};
use crate::membership::NodeId;
use crate::types::TableKind;

/// The state of one table on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TableStatus {
    /// Table name.
    pub name: String,
    /// Table kind.
    pub kind: TableKind,
    /// Records held here.
    pub len: usize,
    /// Nodes this table replicates to (sorted by name).
    pub members: Vec<NodeId>,
    /// Connected nodes running this table that are not members yet (a join is due or running).
    pub not_joined: Vec<String>,
    /// Connected nodes that run no table of this name.
    pub without_table: Vec<String>,
    /// Nodes with which a join is running now, coordinated by this node.
    pub joining: Vec<String>,
    /// Nodes whose table of this name was refused, with the reason (kind, types or
    /// `expire_after` differ).
    pub refused: Vec<(String, String)>,
    /// Whether the table is paused by a join right now.
    pub paused: bool,
    /// Conflicting keys resolved by joins this node coordinated.
    pub conflicts: u64,
    /// Membership epoch: the id of the last join that set the member list.
    pub epoch: u64,
    /// Members whose own member list differs from this node's, as last reported by them
    /// (a partially joined table; repaired automatically).
    pub disagreeing: Vec<String>,
    /// Node identities (name and incarnation) this table keeps an index for: this node, the
    /// connected ones, and ones gone within about half a second (or while a tombstone or an
    /// unacknowledged write still names them). Stays near the number of nodes however often
    /// they restart.
    pub known_nodes: usize,
    /// Tombstones held: recent deletes that stop older writes still on their way, and in a
    /// cluster-owned table the deletes younger than its tombstone retention.
    pub tombstones: usize,
    /// Snapshots and restore, for a table started with `TableOptions::persist`.
    pub persistence: Option<crate::persistence::PersistStatus>,
    /// Anti-entropy (`NodeConfig::anti_entropy_interval`): this table's digest and how each
    /// member's compares with it. `None` when anti-entropy is off.
    pub anti_entropy: Option<AntiEntropyStatus>,
}

/// The node's health report, from [`crate::Node::status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct NodeStatus {
    /// This node.
    pub node: NodeId,
    /// The address the node listens on.
    pub local_addr: SocketAddr,
    /// Addresses the last successful discovery poll returned.
    pub discovered: Vec<SocketAddr>,
    /// Nodes connected now, with their address.
    pub connected: Vec<(NodeId, SocketAddr)>,
    /// Discovered addresses without a connection, with the reason of the last failure.
    pub unavailable: Vec<(SocketAddr, String)>,
    /// Discovery polls tried so far.
    pub discovery_rounds: u64,
    /// The error of the last discovery poll, if it failed.
    pub discovery_error: Option<String>,
    /// Every table on this node.
    pub tables: Vec<TableStatus>,
    /// Peers whose stamps ran more than `NodeConfig::max_clock_drift` ahead of this node's
    /// wall clock in the last minute, with the largest lead seen: their clocks are wrong, and
    /// their stamps did not move this node's clock.
    pub clock_ahead: Vec<(String, std::time::Duration)>,
}

impl NodeStatus {
    /// Total conflicts resolved by joins this node coordinated, over all tables.
    pub fn conflicts(&self) -> u64 {
        self.tables.iter().map(|t| t.conflicts).sum()
    }

    /// Tables whose members do not agree on the member list, or that still await a join.
    pub fn partially_joined(&self) -> Vec<String> {
        self.tables
            .iter()
            .filter(|t| !t.disagreeing.is_empty() || !t.not_joined.is_empty())
            .map(|t| t.name.clone())
            .collect()
    }
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "node {} listening on {}", self.node, self.local_addr)?;
        let disc = match &self.discovery_error {
            Some(e) => format!("error: {e}"),
            None => "ok".to_string(),
        };
        writeln!(
            f,
            "discovery: {} rounds, last {disc}, {} addresses",
            self.discovery_rounds,
            self.discovered.len()
        )?;
        writeln!(f, "connected ({}):", self.connected.len())?;
        for (id, addr) in &self.connected {
            writeln!(f, "  {id} at {addr}")?;
        }
        if !self.unavailable.is_empty() {
            writeln!(f, "unavailable ({}):", self.unavailable.len())?;
            for (addr, why) in &self.unavailable {
                writeln!(f, "  {addr}: {why}")?;
            }
        }
        for (peer, lead) in &self.clock_ahead {
            writeln!(
                f,
                "clock of {peer} runs {lead:?} ahead (over max_clock_drift)"
            )?;
        }
        writeln!(f, "tables ({}):", self.tables.len())?;
        for t in &self.tables {
            let members: Vec<&str> = t.members.iter().map(|m| m.name.as_str()).collect();
            write!(
                f,
                "  {} ({}), {} records, members [{}]",
                t.name,
                t.kind,
                t.len,
                members.join(", ")
            )?;
            if t.paused {
                write!(f, ", paused")?;
            }
            if t.conflicts > 0 {
                write!(f, ", {} conflicts resolved", t.conflicts)?;
            }
            writeln!(f)?;
            if !t.not_joined.is_empty() {
                writeln!(f, "    not joined yet: {}", t.not_joined.join(", "))?;
            }
            if !t.disagreeing.is_empty() {
                writeln!(
                    f,
                    "    member lists disagree with: {}",
                    t.disagreeing.join(", ")
                )?;
            }
            for (n, why) in &t.refused {
                writeln!(f, "    refused {n}: {why}")?;
            }
            if let Some(a) = &t.anti_entropy {
                let behind: Vec<&str> = a
                    .peers
                    .iter()
                    .filter(|p| !p.matches)
                    .map(|p| p.node.as_str())
                    .collect();
                if !behind.is_empty() {
                    writeln!(f, "    digest not (yet) matched by: {}", behind.join(", "))?;
                }
                let repaired: u64 = a.peers.iter().map(|p| p.repaired).sum();
                if repaired > 0 {
                    writeln!(f, "    {repaired} records repaired by anti-entropy")?;
                }
            }
        }
        Ok(())
    }
}
