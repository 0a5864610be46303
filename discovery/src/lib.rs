//! Node discovery for [cets](https://docs.rs/cets): how a node learns the addresses of the
//! other nodes of its cluster.
//!
//! A node polls a [`Discovery`] backend. Each call to [`Discovery::get_nodes`] returns the
//! complete current list of [`Peer`]s (sorted, without duplicates); the node connects to the
//! new ones and joins its tables with them. Backends never cache between calls, so changes
//! in their source are seen by the next poll, and they report failures as [`Error`]s instead
//! of panicking.
//!
//! Backends:
//!
//! - [`StaticDiscovery`]: a list given in code, changeable at run time through a
//!   [`StaticDiscoveryHandle`] (handy in tests).
//! - [`FileDiscovery`]: a text file with one `host:port` per line, re-read on every poll.
//! - `DnsDiscovery` (cargo feature `dns`, on by default): A/AAAA records of a name with a
//!   fixed port (Kubernetes headless services), or SRV records. Without the feature the crate
//!   does not compile a DNS resolver.
//!
//! Any other source can be plugged in by implementing [`Discovery`]; a
//! `Box<dyn Discovery>` is itself a backend, so a node can take any of them.
//!
//! ```
//! use cets_discovery::{Discovery, FileDiscovery, Peer, StaticDiscovery};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> cets_discovery::Result<()> {
//! let dir = std::env::temp_dir().join(format!("cets-discovery-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("nodes.txt");
//! std::fs::write(&path, "# the cluster\n10.0.0.2:4370\n10.0.0.1:4370  # first node\n").unwrap();
//!
//! let mut backends: Vec<Box<dyn Discovery>> = vec![
//!     Box::new(FileDiscovery::new(&path)),
//!     Box::new(StaticDiscovery::new(["10.0.0.3:4370".parse().unwrap()])),
//! ];
//! let peers = backends[0].get_nodes().await?;
//! assert_eq!(
//!     peers,
//!     vec![
//!         Peer::new("10.0.0.1:4370".parse().unwrap()),
//!         Peer::new("10.0.0.2:4370".parse().unwrap()),
//!     ]
//! );
//! assert_eq!(backends[1].get_nodes().await?.len(), 1);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "dns")]
mod dns;
mod error;
mod file;
mod peer;
mod static_list;

#[cfg(feature = "dns")]
pub use dns::DnsDiscovery;
pub use error::{Error, Result};
pub use file::FileDiscovery;
pub use peer::{Discovery, Peer};
pub use static_list::{StaticDiscovery, StaticDiscoveryHandle};
