//! The connection manager: one task owns every connection of the node.
//!
//! Rules it enforces:
//! - **One connection per pair.** The connection that counts is the one dialed by the node with
//!   the smaller name. When the larger node dials (its discovery found the smaller one first),
//!   the handshake completes, the smaller node closes that connection with `REDIRECT` and dials
//!   back at once. Both sides apply the same rule to the same facts, so two nodes that dial each
//!   other at the same moment end with exactly one connection and no timing-dependent
//!   tie-break.
//! - **Incarnations.** A canonical connection from a known name with a new incarnation replaces
//!   the old one, which counts as down. A second connection from the same live incarnation is
//!   closed as a duplicate.
//! - **Down.** When the active connection closes (idle timeout, peer shutdown, error), every
//!   table hears `PeerDown` once. Stale closes are told apart by `stable_id`.
//! - **Backoff per address.** After `n` failed dials in a row, discovery dials an address again
//!   only `discovery_interval * 2^(n-1)` later (at most `discovery_max_backoff`). A lost
//!   connection, a dial back to a node that dialed us, and `Node::connect` dial at once.
//! - **A redirected dial waits for the dial-back.** After `REDIRECT` from an address, discovery
//!   does not dial it again until the peer's dial-back arrives, or `handshake_timeout` passed
//!   (the dial-back's own bound): each such dial would only be redirected again.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::admission::{Admission, Admit};
use super::handshake::{self, Authenticated, Credentials};
use crate::config::{deadline_after, NodeConfig};
use crate::frame::{self, FrameReader};
use crate::membership::NodeId;
use crate::metrics::NodeMetrics;
use crate::proto::{close, StreamHeader};
use crate::registry::{PeerConn, Registry, TableEvent};

/// The address as this node keys it: an IPv4-mapped IPv6 address (what a socket bound to
/// `[::]` reports for an IPv4 peer) becomes the IPv4 address, so a peer dialed as `10.0.0.2:p` and
/// seen as `[::ffff:10.0.0.2]:p` is one address.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Table streams a peer may have open to one table at once: one, and a few more while old ones
/// end (a table stopped and started again on the peer).
const STREAMS_PER_TABLE: usize = 4;

/// Largest stream header accepted.
const HEADER_LIMIT: usize = 4096;

/// A snapshot of the manager's view, for the health report.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeersView {
    pub connected: Vec<(NodeId, SocketAddr)>,
    pub unavailable: Vec<(SocketAddr, String)>,
    /// Addresses this node reached itself at (a node bound to `[::]` or `0.0.0.0` learns its
    /// own addresses by dialing them).
    pub own: Vec<SocketAddr>,
}

pub(crate) enum Command {
    /// From discovery: connect to this address unless already connected or dialing, or its
    /// dials failed lately and its backoff has not run out.
    Dial(SocketAddr),
    /// From `Node::connect`: as `Dial`, but now, whatever the backoff.
    DialNow(SocketAddr),
    Authenticated(Authenticated),
    /// A dial failed (the address, why, and which dial: `PeerManager::dialing`).
    DialFailed(SocketAddr, String, u64),
    /// The peer closed our dial (the address, and which dial) because it dials us instead.
    Redirected(SocketAddr, u64),
    Closed {
        name: String,
        stable_id: usize,
        reason: String,
    },
    View(oneshot::Sender<PeersView>),
    /// The addresses discovery returns now: forget failures of addresses it no longer lists.
    Discovered(Vec<SocketAddr>),
    /// A table started: tell it about every connected peer.
    Announce(String),
    /// Close every connection and the endpoint; replies with the peers' connections it closed,
    /// each with the datagrams it had sent before (`Node::shutdown` waits until their close
    /// frames are out).
    Shutdown(oneshot::Sender<Vec<(Connection, u64)>>),
}

struct Active {
    id: NodeId,
    conn: Connection,
}

/// An address whose last dial failed or whose connection was lost.
struct Unavailable {
    /// Why, for the health report.
    reason: String,
    /// Dials that failed in a row (0 after a lost connection).
    failures: u32,
    /// Before this, discovery does not dial the address.
    retry_at: Instant,
}

/// Whether a dial waits for the address's backoff.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backoff {
    Honour,
    Ignore,
    /// The peer is up at this address right now (it dialed us and we sent it `REDIRECT`): dial
    /// at once, replacing a dial to it still in flight unless the peer answered that one, or it
    /// too was sent while the peer was up (an earlier dial-back). Any other may have been sent
    /// while the peer's port was closed (it was restarting), and would reach it only when QUIC
    /// resends its first packet. (Replacing a dial the peer answered would close a connection
    /// the peer may already count as its canonical one.)
    Replace,
}

/// A dial in flight: which one (an older dial's late result must not end a newer one's
/// entry), its task (aborted if a new dial replaces it), and what decides whether a new dial
/// replaces it.
struct InFlight {
    id: u64,
    task: tokio::task::AbortHandle,
    started: Instant,
    /// Without an answer for this long, the dial counts as failed and the next `Dial` of the
    /// address replaces it (`PeerManager::dial`).
    stale_after: Duration,
    /// Set once the QUIC handshake completed: the peer answered, and the dial runs its cookie
    /// handshake to its end (bounded by `handshake_timeout`).
    answered: Arc<AtomicBool>,
    /// A dial-back after `REDIRECT`: sent while the peer was up.
    peer_up: bool,
}

impl InFlight {
    /// Whether the dial is still worth waiting for: the peer answered it, or it is younger
    /// than its `stale_after`.
    fn waiting(&self) -> bool {
        self.answered.load(Ordering::Relaxed) || self.started.elapsed() < self.stale_after
    }
}

/// The wait after `failures` failed dials in a row: the discovery interval, doubled for each
/// failure after the first, at most `discovery_max_backoff`.
fn redial_delay(config: &NodeConfig, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    config
        .discovery_interval
        .saturating_mul(1 << doublings)
        .min(config.discovery_max_backoff)
}

pub(crate) struct PeerManager {
    me: NodeId,
    endpoint: Endpoint,
    auth: Arc<Credentials>,
    config: NodeConfig,
    registry: Arc<Registry>,
    tx: mpsc::UnboundedSender<Command>,
    active: HashMap<String, Active>,
    dialing: HashMap<SocketAddr, InFlight>,
    /// Id of the next dial (`InFlight::id`).
    next_dial: u64,
    self_addrs: HashSet<SocketAddr>,
    unavailable: HashMap<SocketAddr, Unavailable>,
    /// Addresses whose node closed our dial with `REDIRECT` and dials back, since when: not
    /// dialed by discovery meanwhile (`PeerManager::dial`). Only discovered addresses stay.
    redirected: HashMap<SocketAddr, Instant>,
    metrics: NodeMetrics,
}

impl PeerManager {
    /// Starts the manager and the accept loop; returns the command sender.
    pub(crate) fn spawn(
        me: NodeId,
        endpoint: Endpoint,
        auth: Credentials,
        config: NodeConfig,
        registry: Arc<Registry>,
    ) -> mpsc::UnboundedSender<Command> {
        let (tx, rx) = mpsc::unbounded_channel();
        let auth = Arc::new(auth);
        let mut self_addrs = HashSet::new();
        if let Ok(a) = endpoint.local_addr() {
            self_addrs.insert(canonical(a));
        }
        let span = tracing::info_span!("cets_node", node = %me.name);
        let metrics = NodeMetrics::new(&me.name);
        tokio::spawn(
            accept_loop(
                endpoint.clone(),
                me.clone(),
                auth.clone(),
                config.clone(),
                tx.clone(),
            )
            .instrument(span.clone()),
        );
        let manager = PeerManager {
            me,
            endpoint,
            auth,
            config,
            registry,
            tx: tx.clone(),
            active: HashMap::new(),
            dialing: HashMap::new(),
            next_dial: 0,
            self_addrs,
            unavailable: HashMap::new(),
            redirected: HashMap::new(),
            metrics,
        };
        tokio::spawn(manager.run(rx).instrument(span));
        tx
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Dial(addr) => self.dial(canonical(addr), Backoff::Honour),
                Command::DialNow(addr) => self.dial(canonical(addr), Backoff::Ignore),
                Command::Authenticated(a) => self.authenticated(a),
                Command::Redirected(addr, id) => {
                    if self.dial_ended(addr, id) {
                        self.unavailable.remove(&addr);
                        self.redirected(addr);
                    }
                }
                Command::DialFailed(addr, reason, id) => {
                    if self.dial_ended(addr, id) {
                        self.failed(addr, reason);
                    }
                }
                Command::Closed {
                    name,
                    stable_id,
                    reason,
                } => self.closed(&name, stable_id, &reason),
                Command::View(reply) => {
                    let mut connected: Vec<_> = self
                        .active
                        .values()
                        .map(|a| (a.id.clone(), canonical(a.conn.remote_address())))
                        .collect();
                    connected.sort();
                    let mut unavailable: Vec<_> = self
                        .unavailable
                        .iter()
                        .map(|(a, u)| (*a, u.reason.clone()))
                        .collect();
                    unavailable.sort();
                    let mut own: Vec<_> = self.self_addrs.iter().copied().collect();
                    own.sort();
                    let _ = reply.send(PeersView {
                        connected,
                        unavailable,
                        own,
                    });
                }
                Command::Discovered(addrs) => {
                    let addrs: HashSet<SocketAddr> = addrs.into_iter().map(canonical).collect();
                    self.unavailable.retain(|a, _| addrs.contains(a));
                    self.redirected.retain(|a, _| addrs.contains(a));
                    // Own addresses are remembered only while discovery lists them, so the
                    // set is as large as the discovered list at most.
                    let bound = self.endpoint.local_addr().ok().map(canonical);
                    self.self_addrs
                        .retain(|a| addrs.contains(a) || Some(*a) == bound);
                }
                Command::Announce(table) => {
                    for a in self.active.values() {
                        let pc = PeerConn {
                            id: a.id.clone(),
                            conn: a.conn.clone(),
                        };
                        self.registry.send(&table, TableEvent::PeerUp(pc));
                    }
                }
                Command::Shutdown(done) => {
                    let mut closed = Vec::new();
                    for (_, a) in self.active.drain() {
                        if a.conn.close_reason().is_none() {
                            closed.push((a.conn.clone(), a.conn.stats().udp_tx.datagrams));
                        }
                        a.conn
                            .close(VarInt::from_u32(close::SHUTDOWN), b"node shutting down");
                        let id = a.id.clone();
                        self.registry.broadcast(|| TableEvent::PeerDown(id.clone()));
                    }
                    self.endpoint
                        .close(VarInt::from_u32(close::SHUTDOWN), b"node shutting down");
                    let _ = done.send(closed);
                    return;
                }
            }
        }
    }

    /// A dial to `addr` failed: the address waits longer before discovery dials it again.
    fn failed(&mut self, addr: SocketAddr, reason: String) {
        let failures = self
            .unavailable
            .get(&addr)
            .map_or(1, |u| u.failures.saturating_add(1));
        let delay = redial_delay(&self.config, failures);
        tracing::debug!(%addr, %reason, failures, ?delay, "dial failed");
        self.unavailable.insert(
            addr,
            Unavailable {
                reason,
                failures,
                retry_at: deadline_after(delay),
            },
        );
    }

    /// Our dial to `addr` was redirected (closed with `REDIRECT`, or authenticated with us the
    /// larger name): the peer dials back, and discovery leaves the address alone meanwhile.
    fn redirected(&mut self, addr: SocketAddr) {
        tracing::debug!(%addr, "dial redirected; the peer dials back");
        self.redirected.insert(addr, Instant::now());
    }

    /// Dial `id` to `addr` ended: false if a newer dial to `addr` replaced it.
    fn dial_ended(&mut self, addr: SocketAddr, id: u64) -> bool {
        if self.dialing.get(&addr).is_some_and(|d| d.id == id) {
            self.dialing.remove(&addr);
            true
        } else {
            false
        }
    }

    fn dial(&mut self, addr: SocketAddr, backoff: Backoff) {
        if self.self_addrs.contains(&addr) {
            return;
        }
        if self
            .active
            .values()
            .any(|a| canonical(a.conn.remote_address()) == addr && a.conn.close_reason().is_none())
        {
            return;
        }
        match self.dialing.get(&addr) {
            // Kept: a dial the peer answered (its handshake runs), or one sent while the
            // peer was up (an earlier dial-back) that is not stale.
            Some(d)
                if backoff == Backoff::Replace
                    && (d.answered.load(Ordering::Relaxed) || (d.peer_up && d.waiting())) =>
            {
                return
            }
            Some(_) if backoff == Backoff::Replace => {}
            Some(d) if d.waiting() => return,
            // A dial nobody answered: its first packet was lost, or the port was closed when
            // it was sent. Waiting for QUIC to resend it would cost three initial RTTs, doubled
            // at each resend, from when it was sent, however long ago; a new dial costs one
            // first packet. It counts as a failed dial, so the next waits longer.
            Some(d) => {
                let waited = d.stale_after;
                self.failed(addr, format!("no answer to a dial within {waited:?}"));
            }
            None if backoff == Backoff::Honour
                && self
                    .unavailable
                    .get(&addr)
                    .is_some_and(|u| u.retry_at > Instant::now()) =>
            {
                return
            }
            // Redirected: the peer's dial-back is on its way, and a dial now would only be
            // redirected again (it used to be, at every discovery round until the dial-back
            // arrived). Past `handshake_timeout` the dial-back has failed: dial again.
            None if backoff == Backoff::Honour
                && self
                    .redirected
                    .get(&addr)
                    .is_some_and(|t| t.elapsed() < self.config.handshake_timeout) =>
            {
                return
            }
            None => {}
        }
        let failures = self.unavailable.get(&addr).map_or(0, |u| u.failures);
        let stale_after = redial_delay(&self.config, failures.saturating_add(1));
        let answered = Arc::new(AtomicBool::new(false));
        let id = self.next_dial;
        self.next_dial += 1;
        let (endpoint, me, auth, tx) = (
            self.endpoint.clone(),
            self.me.clone(),
            self.auth.clone(),
            self.tx.clone(),
        );
        let timeout = self.config.handshake_timeout;
        let span = tracing::info_span!("cets_dial", node = %self.me.name, peer = %addr);
        tracing::debug!(%addr, "dialing");
        let answered_by_peer = answered.clone();
        let task = tokio::spawn(
            async move {
                let mut dialed: Option<Connection> = None;
                let result = async {
                    let connecting = endpoint
                        .connect(addr, super::tls::SERVER_NAME)
                        .map_err(|e| crate::Error::Transport(e.to_string()))?;
                    let conn = tokio::time::timeout(timeout, connecting)
                        .await
                        .map_err(|_| crate::Error::Timeout(timeout))?
                        .map_err(|e| crate::Error::Transport(e.to_string()))?;
                    dialed = Some(conn.clone());
                    answered_by_peer.store(true, Ordering::Relaxed);
                    handshake::dialer(conn, addr, &me, &auth, timeout).await
                }
                .await;
                // The peer may close before we read its hello: REDIRECT (it dials back) is an
                // answer, not a failure. (SELF is not: this node only takes an address for its
                // own after reading its own proven hello there, in `authenticated`.)
                let closed_with = dialed.as_ref().and_then(|c| match c.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(a)) => {
                        u32::try_from(a.error_code.into_inner()).ok()
                    }
                    _ => None,
                });
                let _ = tx.send(match result {
                    Ok(a) => Command::Authenticated(a),
                    Err(_) if closed_with == Some(close::REDIRECT) => Command::Redirected(addr, id),
                    Err(e) => {
                        if matches!(e, crate::Error::Handshake { .. }) {
                            crate::metrics::refused(&me.name, crate::metrics::refusal_reason(&e));
                            tracing::warn!(%addr, error = %e, "handshake refused");
                        }
                        Command::DialFailed(addr, e.to_string(), id)
                    }
                });
            }
            .instrument(span),
        );
        let replaced = self.dialing.insert(
            addr,
            InFlight {
                id,
                task: task.abort_handle(),
                started: Instant::now(),
                stale_after,
                answered,
                peer_up: backoff == Backoff::Replace,
            },
        );
        if let Some(old) = replaced {
            // Dropping its connection closes it; the peer may have it half open.
            old.task.abort();
            if backoff == Backoff::Replace {
                tracing::debug!(%addr, "a dial in flight replaced: the peer is up there now");
            } else {
                tracing::debug!(%addr, "a dial in flight replaced: no answer");
            }
        }
    }

    fn authenticated(&mut self, a: Authenticated) {
        if let Some(dialed) = a.dialed {
            // The address that was dialed, which `remote_address()` may spell differently.
            self.dialing.remove(&dialed);
            self.unavailable.remove(&dialed);
        }
        let addr = canonical(a.conn.remote_address());
        self.unavailable.remove(&addr);
        self.redirected.remove(&addr);
        let peer = a.peer.clone();
        if peer.name == self.me.name {
            if peer.incarnation == self.me.incarnation {
                match a.dialed {
                    // Our dial reached our own endpoint, which proved the cookie with our own
                    // identity: that address is ours.
                    Some(dialed) => {
                        tracing::debug!(%dialed, "dialed myself; not dialing this address again");
                        self.self_addrs.insert(dialed);
                        self.self_addrs.insert(addr);
                        a.conn.close(VarInt::from_u32(close::SELF), b"self");
                    }
                    // The accepting end of that dial: the dialing end closes it once it has
                    // read this node's hello (closing here first would leave it without the
                    // proof). The timer only covers a dialer that vanished.
                    None => self.close_unless_closed(a.conn, close::SELF, b"self"),
                }
            } else {
                tracing::error!(%addr, name = %peer.name, "another node uses this node's name; refusing it");
                self.metrics.refused("name");
                self.failed(addr, format!("node name {} is used twice", peer.name));
                a.conn.close(
                    VarInt::from_u32(close::DUPLICATE),
                    b"node name already in use",
                );
            }
            return;
        }
        let dialer_is_smaller = if a.dialed.is_some() {
            self.me.name < peer.name
        } else {
            peer.name < self.me.name
        };
        if !dialer_is_smaller {
            if a.dialed.is_none() {
                // The larger node dialed us: close, and dial back so the canonical connection exists.
                a.conn
                    .close(VarInt::from_u32(close::REDIRECT), b"the smaller name dials");
                if self
                    .active
                    .get(&peer.name)
                    .is_none_or(|x| x.conn.close_reason().is_some())
                {
                    self.dial(addr, Backoff::Replace);
                }
            } else {
                // We are the larger node: the peer closes this connection and dials back.
                self.close_unless_closed(a.conn, close::REDIRECT, b"not canonical");
                if self
                    .active
                    .get(&peer.name)
                    .is_none_or(|x| x.conn.close_reason().is_some())
                {
                    self.redirected(addr);
                }
            }
            return;
        }
        if let Some(old) = self.active.get(&peer.name) {
            if old.id == peer && old.conn.close_reason().is_none() {
                tracing::debug!(peer = %peer, "duplicate connection closed");
                a.conn
                    .close(VarInt::from_u32(close::DUPLICATE), b"already connected");
                return;
            }
            let old = self.active.remove(&peer.name).map(|o| (o.id, o.conn));
            if let Some((old_id, old_conn)) = old {
                tracing::info!(old = %old_id, new = %peer, "peer reconnected; old incarnation is gone");
                old_conn.close(VarInt::from_u32(close::REPLACED), b"replaced");
                self.registry
                    .broadcast(|| TableEvent::PeerDown(old_id.clone()));
            }
        }
        tracing::info!(peer = %peer, %addr, "connected");
        let conn = a.conn;
        self.active.insert(
            peer.name.clone(),
            Active {
                id: peer.clone(),
                conn: conn.clone(),
            },
        );
        self.metrics.connections.set(self.active.len() as f64);
        let pc = PeerConn {
            id: peer.clone(),
            conn: conn.clone(),
        };
        // Watch for the end of the connection.
        let tx = self.tx.clone();
        let watched = conn.clone();
        let name = peer.name.clone();
        let span = tracing::info_span!("cets_peer", node = %self.me.name, peer = %peer);
        tokio::spawn(
            async move {
                let reason = watched.closed().await;
                let _ = tx.send(Command::Closed {
                    name,
                    stable_id: watched.stable_id(),
                    reason: reason.to_string(),
                });
            }
            .instrument(span.clone()),
        );
        // Tables hear PeerUp before any stream of the peer reaches them (the registry's
        // channels keep order), so a refusal always finds the peer's link.
        self.registry.broadcast(|| TableEvent::PeerUp(pc.clone()));
        tokio::spawn(
            route_streams(
                pc.clone(),
                self.registry.clone(),
                self.config.max_frame_size,
            )
            .instrument(span),
        );
    }

    /// Leaves a connection to the other end to close, and closes it after `handshake_timeout`
    /// if it has not.
    fn close_unless_closed(&self, conn: Connection, code: u32, reason: &'static [u8]) {
        let wait = self.config.handshake_timeout;
        let span = tracing::info_span!("cets_closing", node = %self.me.name, peer = %conn.remote_address());
        tokio::spawn(
            async move {
                if tokio::time::timeout(wait, conn.closed()).await.is_err() {
                    conn.close(VarInt::from_u32(code), reason);
                }
            }
            .instrument(span),
        );
    }

    fn closed(&mut self, name: &str, stable_id: usize, reason: &str) {
        if self
            .active
            .get(name)
            .is_some_and(|a| a.conn.stable_id() == stable_id)
        {
            if let Some(a) = self.active.remove(name) {
                self.metrics.connections.set(self.active.len() as f64);
                tracing::info!(peer = %a.id, %reason, "connection lost; node is down");
                self.redirected.remove(&canonical(a.conn.remote_address()));
                self.unavailable.insert(
                    canonical(a.conn.remote_address()),
                    Unavailable {
                        reason: reason.to_string(),
                        failures: 0,
                        retry_at: Instant::now(),
                    },
                );
                let id = a.id;
                self.registry.broadcast(|| TableEvent::PeerDown(id.clone()));
            }
        }
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    me: NodeId,
    auth: Arc<Credentials>,
    config: NodeConfig,
    tx: mpsc::UnboundedSender<Command>,
) {
    let admission = Admission::new(config.max_handshakes, config.max_handshakes_per_ip);
    while let Some(incoming) = endpoint.accept().await {
        let addr = incoming.remote_address();
        let mut slot =
            match admission.admit(incoming.remote_address_validated(), incoming.may_retry()) {
                Admit::Yes(slot) => slot,
                Admit::Retry => {
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().refuse();
                    }
                    continue;
                }
                Admit::Refuse => {
                    crate::metrics::refused(&me.name, "busy");
                    tracing::debug!(%addr, "too many handshakes in progress; connection refused");
                    incoming.refuse();
                    continue;
                }
            };
        let (me, auth, tx) = (me.clone(), auth.clone(), tx.clone());
        let timeout = config.handshake_timeout;
        let span = tracing::info_span!("cets_accept", node = %me.name, peer = %addr);
        tokio::spawn(
            async move {
                let conn = match tokio::time::timeout(timeout, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "incoming connection failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "incoming connection timed out");
                        return;
                    }
                };
                // The QUIC handshake proved the address: now it counts against its IP.
                let ip = canonical(conn.remote_address()).ip();
                if !slot.claim_ip(ip) {
                    crate::metrics::refused(&me.name, "per_ip");
                    let reason = format!("too many handshakes from {ip}");
                    tracing::warn!(%addr, "{reason}; connection closed");
                    conn.close(VarInt::from_u32(close::PROTOCOL), reason.as_bytes());
                    return;
                }
                match handshake::acceptor(conn, &me, &auth, timeout).await {
                    Ok(a) => {
                        let _ = tx.send(Command::Authenticated(a));
                    }
                    Err(e) => {
                        crate::metrics::refused(&me.name, crate::metrics::refusal_reason(&e));
                        tracing::warn!(%addr, error = %e, "refused incoming connection")
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Accepts the table streams a peer opens and hands each to its table.
async fn route_streams(peer: PeerConn, registry: Arc<Registry>, limit: usize) {
    // Table name -> this connection's table streams of it that are being read.
    let open: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
    loop {
        let recv = match peer.conn.accept_uni().await {
            Ok(r) => r,
            Err(_) => return,
        };
        let (peer, registry, open_streams) = (peer.clone(), registry.clone(), open.clone());
        tokio::spawn(
            async move {
                // The header is read with a small limit, then the stream gets the full one.
                let mut reader = FrameReader::new(recv, HEADER_LIMIT);
                let read = tokio::time::timeout(std::time::Duration::from_secs(10), reader.next()).await;
                let header = match read {
                    Ok(Ok(Some(body))) => frame::decode::<StreamHeader>(&body),
                    Ok(Ok(None)) => Err(crate::Error::Transport("stream closed before its header".into())),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(crate::Error::Transport("no stream header within 10 s".into())),
                };
                let header = match header {
                    Ok(h) => h,
                    Err(e) => {
                        if peer.conn.close_reason().is_none() {
                            tracing::warn!(peer = %peer.id, error = %e, "bad table stream; closing the connection");
                            peer.conn.close(VarInt::from_u32(close::PROTOCOL), b"bad stream header");
                        }
                        return;
                    }
                };
                // A table stream at a time per table, and a few more while an old one ends (the
                // peer restarted its table): each may buffer a frame of up to `limit` bytes, so
                // a peer that opens many must not multiply that.
                let live = {
                    let mut open = open_streams.lock().unwrap_or_else(|p| p.into_inner());
                    let n = open.entry(header.table.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                let (open, table) = (open_streams.clone(), header.table.clone());
                reader.on_drop(move || {
                    let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(n) = open.get_mut(&table) {
                        *n -= 1;
                        if *n == 0 {
                            open.remove(&table);
                        }
                    }
                });
                if live > STREAMS_PER_TABLE {
                    tracing::warn!(peer = %peer.id, table = %header.table, "too many streams for one table; closing the connection");
                    peer.conn.close(VarInt::from_u32(close::PROTOCOL), b"too many streams for one table");
                    return;
                }
                reader.set_limit(limit);
                registry.route_inbound(peer, header, reader);
            }
            .in_current_span(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redial_delay_doubles_from_the_discovery_interval_up_to_its_bound() {
        let mut config = NodeConfig {
            discovery_interval: Duration::from_secs(1),
            discovery_max_backoff: Duration::from_secs(30),
            ..NodeConfig::default()
        };
        let secs = |n| redial_delay(&config, n).as_secs();
        assert_eq!([secs(1), secs(2), secs(3), secs(5)], [1, 2, 4, 16]);
        assert_eq!([secs(6), secs(40), secs(u32::MAX)], [30, 30, 30]);
        config.discovery_max_backoff = Duration::MAX;
        assert_eq!(
            redial_delay(&config, u32::MAX),
            Duration::from_secs(1 << 31)
        );
    }
}
