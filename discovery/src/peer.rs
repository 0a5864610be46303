//! [`Peer`] and the [`Discovery`] trait.

use std::fmt;
use std::net::SocketAddr;

use crate::Result;

/// One node found by a discovery backend: the address of its endpoint and, when the
/// backend knows it, its node name.
///
/// Peers order by address first, then by name, so a sorted `Vec<Peer>` is stable and easy
/// to compare between two polls.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// The UDP address of the peer's QUIC endpoint.
    pub addr: SocketAddr,
    /// The peer's node name, if the backend knows it.
    pub name: Option<String>,
}

impl Peer {
    /// A peer known only by its address.
    pub fn new(addr: SocketAddr) -> Self {
        Peer { addr, name: None }
    }

    /// A peer with a known node name.
    pub fn named(addr: SocketAddr, name: impl Into<String>) -> Self {
        Peer {
            addr,
            name: Some(name.into()),
        }
    }
}

impl From<SocketAddr> for Peer {
    fn from(addr: SocketAddr) -> Self {
        Peer::new(addr)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{name}@{}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// A source of peer addresses, polled by a node.
///
/// Each call returns the complete current list (not a diff). Implementations should not
/// cache between calls, so that a change in the source is seen by the next poll, and must
/// report failures as [`Err`](crate::Error) rather than panic. The poller decides how often
/// to call and how to back off after errors.
///
/// Implementing a backend of your own:
///
/// ```
/// use cets_discovery::{Discovery, Peer, Result};
///
/// struct Fixed(Vec<Peer>);
///
/// #[async_trait::async_trait]
/// impl Discovery for Fixed {
///     async fn get_nodes(&mut self) -> Result<Vec<Peer>> {
///         Ok(self.0.clone())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait Discovery: Send + 'static {
    /// Returns the peers this backend currently knows, deduplicated and sorted.
    async fn get_nodes(&mut self) -> Result<Vec<Peer>>;
}

#[async_trait::async_trait]
impl<D: Discovery + ?Sized> Discovery for Box<D> {
    async fn get_nodes(&mut self) -> Result<Vec<Peer>> {
        (**self).get_nodes().await
    }
}

/// Sorts and deduplicates a list of peers in place.
pub(crate) fn normalize(peers: &mut Vec<Peer>) {
    peers.sort();
    peers.dedup();
}
