//! [`StaticDiscovery`]: a fixed list of peers, changeable at run time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::peer::normalize;
use crate::{Discovery, Peer, Result};

/// A discovery backend that returns a list given in code.
///
/// The list can be changed while the node runs through a [`StaticDiscoveryHandle`], which
/// is handy in tests: start a node with an empty list, then add the addresses of the other
/// nodes once they are bound.
///
/// ```
/// # async fn demo() -> cets_discovery::Result<()> {
/// use cets_discovery::{Discovery, StaticDiscovery};
///
/// let mut disco = StaticDiscovery::new(["127.0.0.1:4370".parse().unwrap()]);
/// let handle = disco.handle();
/// handle.add("127.0.0.1:4371".parse().unwrap());
/// assert_eq!(disco.get_nodes().await?.len(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct StaticDiscovery {
    peers: Arc<Mutex<Vec<Peer>>>,
}

impl StaticDiscovery {
    /// A backend returning these addresses (peers without names).
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        Self::from_peers(addrs.into_iter().map(Peer::new))
    }

    /// A backend returning these peers (which may carry names).
    pub fn from_peers(peers: impl IntoIterator<Item = Peer>) -> Self {
        let mut peers: Vec<Peer> = peers.into_iter().collect();
        normalize(&mut peers);
        StaticDiscovery {
            peers: Arc::new(Mutex::new(peers)),
        }
    }

    /// A handle that changes the list this backend returns, from any task or thread.
    pub fn handle(&self) -> StaticDiscoveryHandle {
        StaticDiscoveryHandle {
            peers: Arc::clone(&self.peers),
        }
    }
}

#[async_trait::async_trait]
impl Discovery for StaticDiscovery {
    async fn get_nodes(&mut self) -> Result<Vec<Peer>> {
        Ok(lock(&self.peers).clone())
    }
}

/// Changes the list returned by a [`StaticDiscovery`]; the next
/// [`get_nodes`](Discovery::get_nodes) call sees the change.
///
/// Cheap to clone; every clone refers to the same list.
#[derive(Debug, Clone)]
pub struct StaticDiscoveryHandle {
    peers: Arc<Mutex<Vec<Peer>>>,
}

impl StaticDiscoveryHandle {
    /// Replaces the whole list with these addresses.
    pub fn set(&self, addrs: Vec<SocketAddr>) {
        self.set_peers(addrs.into_iter().map(Peer::new).collect());
    }

    /// Replaces the whole list with these peers.
    pub fn set_peers(&self, mut peers: Vec<Peer>) {
        normalize(&mut peers);
        *lock(&self.peers) = peers;
    }

    /// Adds an address (a no-op if a peer without a name already has it).
    pub fn add(&self, addr: SocketAddr) {
        self.add_peer(Peer::new(addr));
    }

    /// Adds a peer (a no-op if the same peer is already listed).
    pub fn add_peer(&self, peer: Peer) {
        let mut peers = lock(&self.peers);
        if let Err(pos) = peers.binary_search(&peer) {
            peers.insert(pos, peer);
        }
    }

    /// Removes every peer with this address, named or not. Returns whether any was removed.
    pub fn remove(&self, addr: SocketAddr) -> bool {
        let mut peers = lock(&self.peers);
        let before = peers.len();
        peers.retain(|p| p.addr != addr);
        peers.len() != before
    }

    /// Removes every peer.
    pub fn clear(&self) {
        lock(&self.peers).clear();
    }

    /// The current list, sorted.
    pub fn peers(&self) -> Vec<Peer> {
        lock(&self.peers).clone()
    }
}

/// Locks the list; a panic in another holder cannot leave it inconsistent (every update
/// is a single assignment or insert), so a poisoned lock is simply taken over.
fn lock(peers: &Mutex<Vec<Peer>>) -> MutexGuard<'_, Vec<Peer>> {
    peers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn new_sorts_and_dedups() {
        let mut d = StaticDiscovery::new([a("127.0.0.2:1"), a("127.0.0.1:1"), a("127.0.0.2:1")]);
        let got = d.get_nodes().await.unwrap();
        assert_eq!(
            got,
            vec![Peer::new(a("127.0.0.1:1")), Peer::new(a("127.0.0.2:1"))]
        );
    }

    #[tokio::test]
    async fn handle_updates_are_seen() {
        let mut d = StaticDiscovery::new([]);
        let h = d.handle();
        assert!(d.get_nodes().await.unwrap().is_empty());

        h.add(a("10.0.0.2:4370"));
        h.add(a("10.0.0.1:4370"));
        h.add(a("10.0.0.1:4370"));
        assert_eq!(
            d.get_nodes().await.unwrap(),
            vec![Peer::new(a("10.0.0.1:4370")), Peer::new(a("10.0.0.2:4370"))]
        );

        assert!(h.remove(a("10.0.0.1:4370")));
        assert!(!h.remove(a("10.0.0.1:4370")));
        assert_eq!(
            d.get_nodes().await.unwrap(),
            vec![Peer::new(a("10.0.0.2:4370"))]
        );

        h.set(vec![a("[::1]:5"), a("127.0.0.1:5")]);
        assert_eq!(
            d.get_nodes().await.unwrap(),
            vec![Peer::new(a("127.0.0.1:5")), Peer::new(a("[::1]:5"))]
        );

        h.add_peer(Peer::named(a("127.0.0.1:6"), "n6"));
        assert_eq!(h.peers().len(), 3);
        h.clear();
        assert!(d.get_nodes().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn handle_works_from_another_task_and_through_a_box() {
        let d = StaticDiscovery::new([]);
        let h = d.handle();
        let mut boxed: Box<dyn Discovery> = Box::new(d);
        tokio::spawn(async move { h.set(vec![a("127.0.0.1:9")]) })
            .await
            .unwrap();
        assert_eq!(
            boxed.get_nodes().await.unwrap(),
            vec![Peer::new(a("127.0.0.1:9"))]
        );
    }
}
