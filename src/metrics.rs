//! Metrics: what the library records, through the [`metrics`] facade crate.
//!
//! cets records into whatever recorder the application installed (Prometheus, StatsD, ... see
//! the `metrics` crate's exporters; `examples/prometheus.rs` serves them over HTTP). With no
//! recorder installed, recording costs next to nothing. Handles are registered when a node or
//! table starts, with the recorder installed at that moment: install the recorder first.
//! [`describe`] gives every metric its description and unit; [`crate::NodeBuilder::start`]
//! calls it.
//!
//! Metrics are recorded per batch, per tick or per event, never per record. Every table metric
//! carries the labels `table` and `node` (this node's name); per-peer ones add `peer` (the
//! peer's name).
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `cets_records` | gauge | table, node | records held here (sampled every 100 ms) |
//! | `cets_writes_total` | counter | table, node | client writes (calls of insert, delete, ...) this node's table server applied |
//! | `cets_batch_writes` | histogram | table, node | client writes per replicated batch (group commit) |
//! | `cets_batch_bytes` | histogram | table, node | encoded bytes per replicated batch |
//! | `cets_ack_latency_seconds` | histogram | table, node | from sending a batch to the acknowledgement of the last member that was sent it |
//! | `cets_outbound_queue_bytes` | gauge | table, node, peer | bytes queued for the peer's table stream and not yet handed to QUIC (sampled every 100 ms) |
//! | `cets_replication_lag_seconds` | gauge | table, node, peer | age of the oldest batch sent to the peer that it has not acknowledged; 0 when it acknowledged everything (sampled every 100 ms) |
//! | `cets_joins_total` | counter | table, node, outcome | joins this node coordinated; `outcome` is `ok` or `error` |
//! | `cets_join_duration_seconds` | histogram | table, node, outcome | duration of the joins this node coordinated |
//! | `cets_join_records_total` | counter | table, node | records the joins this node coordinated sent to the nodes of the join (a record sent to two nodes counts twice) |
//! | `cets_conflicts_total` | counter | table, node | conflicting keys resolved by the joins this node coordinated |
//! | `cets_node_down_drops_total` | counter | table, node | records dropped here because their owner went down |
//! | `cets_repairs_total` | counter | table, node | records repaired here by anti-entropy |
//! | `cets_connections` | gauge | node | peer nodes connected now |
//! | `cets_handshakes_refused_total` | counter | node, reason | handshakes refused or failed; `reason` is one of [`REFUSAL_REASONS`] |
//! | `cets_discovery_errors_total` | counter | node | discovery polls that failed |
//!
//! When a peer's link goes, its two per-peer gauges are set to 0 (a recorder keeps a series
//! once it has seen it).

use std::time::Duration;

use ::metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

/// Gauge: records held here. Labels `table`, `node`.
pub const RECORDS: &str = "cets_records";
/// Counter: client writes this node's table server applied. Labels `table`, `node`.
pub const WRITES: &str = "cets_writes_total";
/// Histogram: client writes per replicated batch. Labels `table`, `node`.
pub const BATCH_WRITES: &str = "cets_batch_writes";
/// Histogram: encoded bytes per replicated batch. Labels `table`, `node`.
pub const BATCH_BYTES: &str = "cets_batch_bytes";
/// Histogram: seconds from sending a batch to its last acknowledgement. Labels `table`, `node`.
pub const ACK_LATENCY: &str = "cets_ack_latency_seconds";
/// Gauge: bytes queued for a peer's table stream. Labels `table`, `node`, `peer`.
pub const OUTBOUND_QUEUE_BYTES: &str = "cets_outbound_queue_bytes";
/// Gauge: age in seconds of the oldest batch a peer has not acknowledged. Labels `table`,
/// `node`, `peer`.
pub const REPLICATION_LAG: &str = "cets_replication_lag_seconds";
/// Counter: joins this node coordinated. Labels `table`, `node`, `outcome` (`ok`, `error`).
pub const JOINS: &str = "cets_joins_total";
/// Histogram: seconds a join this node coordinated took. Labels `table`, `node`, `outcome`.
pub const JOIN_DURATION: &str = "cets_join_duration_seconds";
/// Counter: records sent by joins this node coordinated. Labels `table`, `node`.
pub const JOIN_RECORDS: &str = "cets_join_records_total";
/// Counter: conflicting keys resolved by joins this node coordinated. Labels `table`, `node`.
pub const CONFLICTS: &str = "cets_conflicts_total";
/// Counter: records dropped because their owner went down. Labels `table`, `node`.
pub const NODE_DOWN_DROPS: &str = "cets_node_down_drops_total";
/// Counter: records repaired by anti-entropy. Labels `table`, `node`.
pub const REPAIRS: &str = "cets_repairs_total";
/// Gauge: peer nodes connected now. Label `node`.
pub const CONNECTIONS: &str = "cets_connections";
/// Counter: handshakes refused or failed. Labels `node`, `reason` (see [`REFUSAL_REASONS`]).
pub const HANDSHAKES_REFUSED: &str = "cets_handshakes_refused_total";
/// Counter: failed discovery polls. Label `node`.
pub const DISCOVERY_ERRORS: &str = "cets_discovery_errors_total";

/// The values of the `reason` label of [`HANDSHAKES_REFUSED`]:
/// - `busy`: too many handshakes in progress, the connection was refused before QUIC's;
/// - `per_ip`: too many handshakes in progress from the peer's IP address;
/// - `auth`: a wrong cookie, or a certificate that does not name the node;
/// - `version`: another protocol version;
/// - `name`: a node name that is already in use here, or not 1 to 255 bytes long;
/// - `timeout`: no handshake within `NodeConfig::handshake_timeout`;
/// - `other`: a malformed handshake or a connection lost during it.
pub const REFUSAL_REASONS: [&str; 7] = [
    "busy", "per_ip", "auth", "version", "name", "timeout", "other",
];

/// Gives every metric above its description and unit, in the recorder installed now. Called by
/// [`crate::NodeBuilder::start`]; call it yourself if you install a recorder later.
pub fn describe() {
    describe_gauge!(
        RECORDS,
        Unit::Count,
        "Records held by this node's copy of the table."
    );
    describe_counter!(
        WRITES,
        Unit::Count,
        "Client writes (insert, delete, ... calls) this node's table server applied."
    );
    describe_histogram!(
        BATCH_WRITES,
        Unit::Count,
        "Client writes per replicated batch."
    );
    describe_histogram!(
        BATCH_BYTES,
        Unit::Bytes,
        "Encoded bytes per replicated batch."
    );
    describe_histogram!(
        ACK_LATENCY,
        Unit::Seconds,
        "From sending a batch to the acknowledgement of the last member it was sent to."
    );
    describe_gauge!(
        OUTBOUND_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes queued for a peer's table stream, not yet handed to QUIC."
    );
    describe_gauge!(
        REPLICATION_LAG,
        Unit::Seconds,
        "Age of the oldest batch sent to the peer that it has not acknowledged (0: none)."
    );
    describe_counter!(
        JOINS,
        Unit::Count,
        "Joins this node coordinated, by outcome."
    );
    describe_histogram!(
        JOIN_DURATION,
        Unit::Seconds,
        "Duration of the joins this node coordinated, by outcome."
    );
    describe_counter!(
        JOIN_RECORDS,
        Unit::Count,
        "Records sent to the nodes of the joins this node coordinated."
    );
    describe_counter!(
        CONFLICTS,
        Unit::Count,
        "Conflicting keys resolved by the joins this node coordinated."
    );
    describe_counter!(
        NODE_DOWN_DROPS,
        Unit::Count,
        "Records dropped because their owner node went down."
    );
    describe_counter!(REPAIRS, Unit::Count, "Records repaired by anti-entropy.");
    describe_gauge!(CONNECTIONS, Unit::Count, "Peer nodes connected now.");
    describe_counter!(
        HANDSHAKES_REFUSED,
        Unit::Count,
        "Handshakes refused or failed, by reason."
    );
    describe_counter!(
        DISCOVERY_ERRORS,
        Unit::Count,
        "Discovery polls that failed."
    );
}

/// The handles of one table on one node, registered once when its server starts.
pub(crate) struct TableMetrics {
    table: String,
    node: String,
    pub(crate) records: Gauge,
    pub(crate) writes: Counter,
    pub(crate) batch_writes: Histogram,
    pub(crate) batch_bytes: Histogram,
    pub(crate) ack_latency: Histogram,
    pub(crate) conflicts: Counter,
    pub(crate) node_down_drops: Counter,
    /// Anti-entropy increments this by the records it repaired (see also [`repaired`]).
    pub(crate) repairs: Counter,
}

impl TableMetrics {
    pub(crate) fn new(node: &str, table: &str) -> Self {
        let labels = [("table", table.to_string()), ("node", node.to_string())];
        TableMetrics {
            table: table.to_string(),
            node: node.to_string(),
            records: gauge!(RECORDS, &labels),
            writes: counter!(WRITES, &labels),
            batch_writes: histogram!(BATCH_WRITES, &labels),
            batch_bytes: histogram!(BATCH_BYTES, &labels),
            ack_latency: histogram!(ACK_LATENCY, &labels),
            conflicts: counter!(CONFLICTS, &labels),
            node_down_drops: counter!(NODE_DOWN_DROPS, &labels),
            repairs: counter!(REPAIRS, &labels),
        }
    }

    /// The handles of one peer's link.
    pub(crate) fn peer(&self, peer: &str) -> PeerMetrics {
        let labels = [
            ("table", self.table.clone()),
            ("node", self.node.clone()),
            ("peer", peer.to_string()),
        ];
        PeerMetrics {
            queue_bytes: gauge!(OUTBOUND_QUEUE_BYTES, &labels),
            lag: gauge!(REPLICATION_LAG, &labels),
        }
    }

    /// The handles a join coordinator records its outcome with (one join at a time per peer;
    /// a join is rare, so they are looked up when it starts).
    pub(crate) fn join(&self) -> JoinMetrics {
        let labels = |outcome: &'static str| {
            [
                ("table", self.table.clone()),
                ("node", self.node.clone()),
                ("outcome", outcome.to_string()),
            ]
        };
        let (ok, err) = (labels("ok"), labels("error"));
        let both = [("table", self.table.clone()), ("node", self.node.clone())];
        JoinMetrics {
            ok: counter!(JOINS, &ok),
            failed: counter!(JOINS, &err),
            ok_duration: histogram!(JOIN_DURATION, &ok),
            failed_duration: histogram!(JOIN_DURATION, &err),
            records: counter!(JOIN_RECORDS, &both),
            conflicts: self.conflicts.clone(),
        }
    }
}

/// The handles of one peer's link of one table.
pub(crate) struct PeerMetrics {
    pub(crate) queue_bytes: Gauge,
    pub(crate) lag: Gauge,
}

impl PeerMetrics {
    /// The link is gone: its series read 0 from now on.
    pub(crate) fn clear(&self) {
        self.queue_bytes.set(0.0);
        self.lag.set(0.0);
    }
}

/// The handles a join coordinator records with.
pub(crate) struct JoinMetrics {
    ok: Counter,
    failed: Counter,
    ok_duration: Histogram,
    failed_duration: Histogram,
    records: Counter,
    conflicts: Counter,
}

impl JoinMetrics {
    /// A join ended: `Ok(conflicts)` or an error, after `took`, having sent `records`.
    pub(crate) fn finished(&self, ok: Option<u64>, took: Duration, records: u64) {
        self.records.increment(records);
        match ok {
            Some(conflicts) => {
                self.ok.increment(1);
                self.ok_duration.record(took);
                self.conflicts.increment(conflicts);
            }
            None => {
                self.failed.increment(1);
                self.failed_duration.record(took);
            }
        }
    }
}

/// Records that anti-entropy repaired `records` records of `table` on `node`, for code that
/// holds no [`TableMetrics`] (the table server increments `TableMetrics::repairs`).
#[allow(dead_code)] // the hook for anti-entropy
pub(crate) fn repaired(node: &str, table: &str, records: u64) {
    let labels = [("table", table.to_string()), ("node", node.to_string())];
    counter!(REPAIRS, &labels).increment(records);
}

/// The span a repair of `table` on `node` with `peer` runs in; log its outcome (ok or error,
/// records repaired, duration) inside it when it ends.
pub(crate) fn repair_span(node: &str, table: &str, peer: &str) -> tracing::Span {
    tracing::info_span!("cets_repair", node = %node, table = %table, peer = %peer)
}

/// The handles of one node.
pub(crate) struct NodeMetrics {
    node: String,
    pub(crate) connections: Gauge,
    pub(crate) discovery_errors: Counter,
}

impl NodeMetrics {
    pub(crate) fn new(node: &str) -> Self {
        let labels = [("node", node.to_string())];
        NodeMetrics {
            node: node.to_string(),
            connections: gauge!(CONNECTIONS, &labels),
            discovery_errors: counter!(DISCOVERY_ERRORS, &labels),
        }
    }

    /// Counts a refused handshake (rare: looked up when it happens).
    pub(crate) fn refused(&self, reason: &'static str) {
        refused(&self.node, reason);
    }
}

/// Counts a refused handshake of `node` for `reason` (one of [`REFUSAL_REASONS`]).
pub(crate) fn refused(node: &str, reason: &'static str) {
    let labels = [("node", node.to_string()), ("reason", reason.to_string())];
    counter!(HANDSHAKES_REFUSED, &labels).increment(1);
}

/// The `reason` label of a handshake that failed with `e`.
pub(crate) fn refusal_reason(e: &crate::Error) -> &'static str {
    match e {
        crate::Error::Timeout(_) => "timeout",
        crate::Error::Handshake { reason, .. } => {
            if reason.contains("cookie") || reason.contains("certificate") {
                "auth"
            } else if reason.contains("protocol version") {
                "version"
            } else if reason.contains("node name") {
                "name"
            } else {
                "other"
            }
        }
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_from_the_documented_set() {
        let hs = |reason: &str| crate::Error::Handshake {
            peer: "x".into(),
            reason: reason.into(),
        };
        let cases = [
            (hs("bad cookie from b"), "auth"),
            (hs("the certificate of b does not name it: no SAN"), "auth"),
            (hs("protocol version 9 is not 3"), "version"),
            (hs("node name of 0 bytes (1 to 255 allowed)"), "name"),
            (hs("control stream closed during handshake"), "other"),
            (crate::Error::Timeout(Duration::from_secs(1)), "timeout"),
            (crate::Error::Transport("reset".into()), "other"),
        ];
        for (e, want) in cases {
            assert_eq!(refusal_reason(&e), want, "{e}");
            assert!(REFUSAL_REASONS.contains(&want));
        }
    }
}
