//! Node configuration: every knob, its default, and when to change it.
//!
//! Start from [`NodeConfig::default`] (a LAN cluster) and adjust single fields, or use
//! [`NodeConfig::fast_failover`] for tests and latency-sensitive clusters on a reliable network.

use std::time::{Duration, Instant};

/// Tuning of one node. All fields are public; the defaults are documented on each field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// How often an idle connection sends a QUIC PING so that the peer's idle timer does not
    /// fire. Default 1 s. Keep it at most a third of `idle_timeout`, on every node: the idle
    /// timeout in force is the smaller of both sides', and a keep-alive slower than that makes
    /// connections flap.
    pub keep_alive_interval: Duration,
    /// A connection that hears nothing for this long is dead, and so is the node behind it:
    /// every survivor drops that node's records. Default 3 s, so a killed node is detected within
    /// about `idle_timeout + keep_alive_interval` = 4 s. Lower it for faster fail-over on a
    /// reliable network; raise it where pauses (GC, VM migration, congested links) are common.
    pub idle_timeout: Duration,
    /// How long the cookie handshake of a new connection may take. Default 5 s.
    pub handshake_timeout: Duration,
    /// The round-trip time a new connection assumes until it has measured one. QUIC sends the
    /// first packet of a dial again when no answer came within three times this (and doubles
    /// the wait each time), so a first packet that is lost (the peer's port was not open yet,
    /// a busy link) costs that long. Default 50 ms (a resend after 150 ms), for nodes on one
    /// LAN; QUIC's own default for the open Internet is 333 ms (a resend after a second). Set it
    /// near the real round-trip time between your nodes: lower only resends a first packet
    /// that is still on its way (a 1200-byte datagram, no harm done), higher makes a lost one
    /// cost more. At least 1 ms.
    pub initial_rtt: Duration,
    /// Incoming connections that may be in their handshake (QUIC, then the cookie) at once, from
    /// all addresses. Default 256. One more is refused at its first packet, and its node tries
    /// again on its next discovery round. Past half of this, a connection must first prove its
    /// source address with a QUIC retry (one more round trip), so that packets with forged
    /// source addresses cannot hold the slots. A handshake takes milliseconds, so only a flood,
    /// or hundreds of nodes restarting at the same moment, come near it.
    pub max_handshakes: usize,
    /// Connections from one IP address that may run the cookie handshake at once. Default 16.
    /// One more is closed with the `PROTOCOL` code and the reason "too many handshakes from
    /// `<ip>`". Raise it where many nodes share an IP address (behind NAT) and restart together.
    pub max_handshakes_per_ip: usize,
    /// How often the discovery backend is polled. Default 1 s. Polling is cheap (a file read or a
    /// DNS query); new nodes are found within one interval.
    pub discovery_interval: Duration,
    /// After failed discovery polls the interval doubles up to this bound. Default 30 s.
    ///
    /// It also bounds the backoff of one address: after `n` failed dials to an address in a row,
    /// discovery dials it again only `discovery_interval * 2^(n-1)` later, at most this much. A
    /// node that stays down then costs a handshake attempt and a debug log line every 30 s
    /// instead of every round. Reconnection does not wait for it: a node that comes back dials
    /// the nodes it discovers itself, and a lost connection, or `Node::connect`, dials at once.
    /// Lower it where a peer's address may be unreachable from this node alone for a while
    /// (a firewall being opened) and must be retried sooner.
    pub discovery_max_backoff: Duration,
    /// Largest frame accepted from a peer, in bytes. A larger announced length closes the
    /// connection. Default 64 MiB. Frames the node sends are kept below it by splitting batches
    /// and join dumps, so this bounds memory per connection, not the size of a table.
    pub max_frame_size: usize,
    /// Group commit: at most this many queued write calls are sent to the peers as one frame.
    /// Default 4096. Larger batches raise throughput under many concurrent writers; they do not
    /// add latency, because a batch is cut from what is already queued, never waited for.
    pub max_batch_ops: usize,
    /// Group commit: a batch is closed once its encoded size reaches this many bytes.
    /// Default 1 MiB. Must be at least 64 bytes below half of `max_frame_size` (the batch's last
    /// write may take up to that half).
    pub max_batch_bytes: usize,
    /// Capacity of a table's queue of write calls. Callers wait (back-pressure) when it is full.
    /// Default 65 536.
    pub write_queue: usize,
    /// Requested size of the UDP socket's kernel receive buffer. Default 4 MiB: with the Linux
    /// default (208 KiB) bursts on loopback overflow it and QUIC has to retransmit. The kernel
    /// may cap it (`net.core.rmem_max`); a refusal is logged and tolerated.
    pub socket_receive_buffer_size: usize,
    /// Requested size of the UDP socket's kernel send buffer. Default 4 MiB.
    pub socket_send_buffer_size: usize,
    /// How long a table stays paused for a join without hearing from the join's coordinator.
    /// The coordinator renews the lease while it works; if it dies or stalls, the table unpauses
    /// by itself. Default 5 s. A node honours at most 60 s of a peer's lease.
    pub join_lease: Duration,
    /// Retry delay of a failed or refused join; doubled (with jitter) on each failure up to
    /// `join_max_backoff`. Default 100 ms.
    pub join_backoff: Duration,
    /// Upper bound of the join retry delay. Default 5 s.
    pub join_max_backoff: Duration,
    /// Records per chunk when a join streams a table dump or its result. Default 10 000.
    /// Chunks are also cut at a quarter of `max_frame_size` in encoded bytes, whatever the
    /// size of the values.
    pub join_chunk_records: usize,
    /// Bytes of frames one table may have queued for one peer and not yet handed to QUIC.
    /// Default 256 MiB. The table server never waits for a peer; a peer that stops reading
    /// (flow control then holds the queue) makes writes, ticks and join replies pile up, and
    /// the frame that would pass this bound closes the connection to that peer instead (code
    /// `OVERLOAD`, logged as "outbound queue full"): its records are dropped everywhere, and
    /// it joins again once it reconnects. A join's dumps and chunks stream through half of this
    /// queue as the peer reads them, whatever the size of the table; a peer asked for a dump
    /// while its last one still waits for room is closed the same way. At least
    /// `max_frame_size`. Replies to one join request other than a dump are bounded by this too;
    /// a dump may bring about as many records as its source said it held.
    pub max_link_queue_bytes: usize,
    /// Records one source's dump may bring into a join that this node coordinates. Default
    /// 100 000 000. The coordinator holds every dump in memory until it is complete (about
    /// the size of the records, plus some 50 bytes each); a source may bring about as many
    /// records as it said it held when it paused, and never more than this, so a peer that
    /// claims to hold everything cannot make the coordinator's memory grow without bound. A
    /// dump past the bound fails the join (logged with the peer), and the tables are unpaused.
    /// Raise it above the largest table you run; lower it to cap a join's memory.
    pub max_join_records: u64,
    /// Anti-entropy: how often each table compares a digest of its contents with every member
    /// (ALGORITHM.md, section 15). Default 2 s. Replicas that differ for any reason (a write
    /// lost to a bug, a join that went wrong) are found at the next round at which both have
    /// applied the same writes, and repaired by the rule that decides a replicated write; each
    /// repair is logged as a warning and counted in [`crate::TableStatus::anti_entropy`].
    ///
    /// At rest a round costs about 100 bytes per member and table, whatever the size of the
    /// table; keeping the digest costs two hashes of each record stored or removed (a few
    /// percent of insert throughput). A round also runs right after every join and node down.
    /// Shorten it to find differences sooner; lengthen it for thousands of tables. Under a
    /// stream of writes that never pauses, replicas rarely have applied the same writes at the
    /// same moment, so rounds are skipped until the writes pause. `None` turns anti-entropy off:
    /// no digest is kept and no round runs; every node of a cluster should agree on this
    /// (a node with it off ignores the others' digests).
    pub anti_entropy_interval: Option<Duration>,
    /// How far ahead of this node's wall clock a stamp received from a peer may move its
    /// hybrid logical clock. Default 1 s. A stamp further ahead (the peer's clock is wrong) is
    /// not taken by the clock: the write still counts with its stamp, but this node's own later
    /// stamps do not jump ahead with it, so one bad clock cannot make every node's
    /// `expire_after` records live longer. The peer is logged and listed in
    /// `NodeStatus::clock_ahead`. Keep it above the clock offsets your nodes really have (NTP
    /// keeps them in milliseconds); `Duration::MAX` takes every stamp.
    pub max_clock_drift: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            keep_alive_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            initial_rtt: Duration::from_millis(50),
            max_handshakes: 256,
            max_handshakes_per_ip: 16,
            discovery_interval: Duration::from_secs(1),
            discovery_max_backoff: Duration::from_secs(30),
            max_frame_size: 64 * 1024 * 1024,
            max_batch_ops: 4096,
            max_batch_bytes: 1024 * 1024,
            write_queue: 65_536,
            socket_receive_buffer_size: 4 * 1024 * 1024,
            socket_send_buffer_size: 4 * 1024 * 1024,
            join_lease: Duration::from_secs(5),
            join_backoff: Duration::from_millis(100),
            join_max_backoff: Duration::from_secs(5),
            join_chunk_records: 10_000,
            max_link_queue_bytes: 256 * 1024 * 1024,
            max_join_records: 100_000_000,
            anti_entropy_interval: Some(Duration::from_secs(2)),
            max_clock_drift: Duration::from_secs(1),
        }
    }
}

impl NodeConfig {
    /// Fast failure detection (keep-alive 250 ms, idle timeout 1 s), fast discovery (200 ms),
    /// a first packet sent again after 30 ms without answer (`initial_rtt` 10 ms) and
    /// anti-entropy rounds every 500 ms. For tests, and for clusters on one reliable LAN that
    /// want sub-second fail-over.
    pub fn fast_failover() -> Self {
        Self {
            initial_rtt: Duration::from_millis(10),
            keep_alive_interval: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(1),
            discovery_interval: Duration::from_millis(200),
            discovery_max_backoff: Duration::from_secs(2),
            join_lease: Duration::from_secs(2),
            join_backoff: Duration::from_millis(20),
            join_max_backoff: Duration::from_millis(500),
            anti_entropy_interval: Some(Duration::from_millis(500)),
            ..Self::default()
        }
    }

    pub(crate) fn validate(&self) -> crate::Result<()> {
        let bad = |m: &str| Err(crate::Error::Config(m.to_string()));
        if self.idle_timeout.is_zero() || self.keep_alive_interval.is_zero() {
            return bad("idle_timeout and keep_alive_interval must be positive");
        }
        if self.keep_alive_interval >= self.idle_timeout {
            return bad("keep_alive_interval must be shorter than idle_timeout");
        }
        if self.max_frame_size < 1024 {
            return bad("max_frame_size must be at least 1024 bytes");
        }
        // A batch stops once it holds max_batch_bytes, and its last write may take up to half of
        // max_frame_size: both, and the frame's own head, must fit in one frame.
        if self.max_batch_bytes.saturating_add(FRAME_HEAD_ROOM) > self.max_frame_size / 2 {
            return bad(&format!(
                "max_batch_bytes must be at least {FRAME_HEAD_ROOM} bytes below half of max_frame_size"
            ));
        }
        if self.max_batch_ops == 0
            || self.write_queue == 0
            || self.join_chunk_records == 0
            || self.max_join_records == 0
        {
            return bad(
                "max_batch_ops, write_queue, join_chunk_records and max_join_records must be positive",
            );
        }
        if self.max_link_queue_bytes < self.max_frame_size {
            return bad("max_link_queue_bytes must be at least max_frame_size");
        }
        if self.max_handshakes == 0 || self.max_handshakes_per_ip == 0 {
            return bad("max_handshakes and max_handshakes_per_ip must be positive");
        }
        if self.anti_entropy_interval.is_some_and(|d| d.is_zero()) {
            return bad("anti_entropy_interval must be positive (None turns it off)");
        }
        if self.initial_rtt < Duration::from_millis(1) {
            return bad("initial_rtt must be at least 1 ms");
        }
        if self.discovery_interval.is_zero() || self.join_lease.is_zero() {
            return bad("discovery_interval and join_lease must be positive");
        }
        Ok(())
    }
}

/// Bytes a frame needs beyond its writes (message tag, sequence number, count), with a margin.
const FRAME_HEAD_ROOM: usize = 64;

/// The instant `after` from now, or as far as the clock reaches: a duration such as
/// `Duration::MAX` (a natural way to say "forever") must not overflow `Instant`.
pub(crate) fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_queue_must_hold_a_frame() {
        let mut c = NodeConfig::default();
        assert!(c.validate().is_ok());
        c.max_link_queue_bytes = c.max_frame_size - 1;
        assert!(
            matches!(c.validate(), Err(crate::Error::Config(m)) if m.contains("max_link_queue_bytes"))
        );
        c.max_link_queue_bytes = c.max_frame_size;
        assert!(c.validate().is_ok());
    }
}
