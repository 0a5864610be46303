//! Metric samples taken on the tick: records held, and per link the bytes queued for the peer
//! and its replication lag (`crate::metrics`).

use super::*;

impl<K: Key, V: Value> Server<K, V> {
    /// Samples the gauges (every tick, so at most ten times a second however busy the table).
    pub(super) fn sample_metrics(&self, now: Instant) {
        self.metrics.records.set(self.shared.store.len() as f64);
        for (key, link) in self.peers.links() {
            let queued = link.out().map_or(0, Outbox::queued);
            link.metrics().queue_bytes.set(queued as f64);
            // The oldest batch this peer was sent and has not acknowledged (batches complete
            // in order, so the first one found is the oldest).
            let lag = self
                .commit
                .oldest_for(|p| link.acked() < p.seq && p.waiting.contains(&key))
                .map_or(Duration::ZERO, |p| now.saturating_duration_since(p.sent));
            link.metrics().lag.set(lag.as_secs_f64());
        }
    }
}
