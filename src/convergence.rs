//! Waiting until every replica holds the same records, as anti-entropy proves it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::config::deadline_after;
use crate::{Error, Node, Result};

impl Node {
    /// [`Node::wait_for_ready`], then waits until, for every table on this node, anti-entropy
    /// has compared this node's digest with each member's at least once after this call began
    /// (at a moment both had applied the same writes) and every one matched: then every
    /// member holds the same records as this node ([`crate::status::AntiEntropyStatus`]).
    ///
    /// It takes up to about two `NodeConfig::anti_entropy_interval`s, and waits on while
    /// writes never pause (the digests are compared only between them). A table whose
    /// replicas differ is repaired meanwhile. With anti-entropy off it returns with
    /// `wait_for_ready`.
    pub async fn wait_for_converged(&self, timeout: Duration) -> Result<()> {
        let deadline = deadline_after(timeout);
        self.wait_for_ready(timeout).await?;
        // Rounds compared so far, per table and member: only later ones count.
        let mut seen: HashMap<(String, String), u64> = HashMap::new();
        for t in self.status().await.tables {
            for p in t.anti_entropy.iter().flat_map(|a| a.peers.iter()) {
                seen.insert((t.name.clone(), p.node.clone()), p.rounds);
            }
        }
        loop {
            let s = self.status().await;
            let done = s.tables.iter().all(|t| {
                let Some(ae) = &t.anti_entropy else {
                    return true;
                };
                t.members.iter().all(|m| {
                    ae.peers.iter().any(|p| {
                        let before = seen.get(&(t.name.clone(), p.node.clone())).copied();
                        p.node == m.name && p.matches && p.rounds > before.unwrap_or(0)
                    })
                })
            });
            if done {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
