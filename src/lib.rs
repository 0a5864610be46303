//! # cets: replicated in-memory tables for Rust clusters
//!
//! Every node that starts a table of a given name holds a full copy of it. Reads are local (one
//! shard's shared lock for one lookup, never a network round trip); writes are applied locally and replicated to every other node of the table over
//! QUIC, and return once every live peer acknowledged them. Nodes find each other through a
//! [`discovery`] backend; when two partitions meet, their tables are merged (conflicts resolved
//! once, the same way on every node), and when a node goes down every survivor drops the
//! records it owned.
//!
//! ```no_run
//! # async fn demo() -> cets::Result<()> {
//! let node = cets::Node::builder("node-a")
//!     .listen("127.0.0.1:4370".parse().unwrap())
//!     .cookie("shared-secret")
//!     .discovery(cets::discovery::FileDiscovery::new("nodes.txt"))
//!     .start()
//!     .await?;
//! let sessions: cets::Table<String, u64> = node.start("sessions", cets::TableOptions::set()).await?;
//! sessions.insert("alice".to_string(), 42).await?;
//! assert_eq!(sessions.get(&"alice".to_string()), Some(42));
//! node.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Where things live: the handle ([`Table`]) sends writes to the table's server task
//! (`server/`; writes in `server/writes.rs`), which applies them, batches them into one frame,
//! and queues it to every member's QUIC stream (`transport/`); the peer's server applies the
//! batch and acknowledges.
//! Joins are in `join/` and described in `ALGORITHM.md`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(unreachable_pub)]

mod authority;
mod bag;
mod callbacks;
mod capture;
pub mod config;
pub mod conflict;
mod convergence;
mod digest;
mod error;
mod frame;
pub mod hlc;
mod insert_new;
mod join;
pub mod membership;
pub mod metrics;
mod node;
mod object_deletes;
mod options;
mod outbox;
pub mod ownership;
pub mod persistence;
mod proto;
mod record_ttl;
mod registry;
mod repeats;
mod server;
mod sharded_map;
mod shared;
mod stable_hash;
pub mod status;
mod store;
mod subscribe;
pub mod subscription;
mod table;
#[cfg(feature = "testing")]
pub mod testing;
mod tombstones;
mod transport;
mod types;

/// Discovery backends (re-export of the `cets-discovery` crate). `DnsDiscovery` is there with the
/// cargo feature `dns` (on by default); `--no-default-features` builds without a DNS resolver.
pub use cets_discovery as discovery;

pub use config::NodeConfig;
pub use conflict::{last_writer_wins, Conflict};
pub use error::{Error, Result};
pub use insert_new::InsertNew;
pub use membership::NodeId;
pub use node::{Node, NodeBuilder, DEFAULT_COOKIE};
pub use options::{NodeDownFn, OwnerFn, TableOptions};
pub use ownership::Ownership;
pub use status::{NodeStatus, TableStatus};
pub use subscription::{Change, Cursor, Event, Subscription, Update};
pub use table::Table;
pub use transport::tls::TlsConfig;
pub use types::{Key, TableKind, Value};
