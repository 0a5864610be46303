//! The node: one per process. Owns the QUIC endpoint, the connection manager, discovery, the
//! hybrid logical clock and the registry of tables.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::config::{deadline_after, NodeConfig};
use crate::digest::Records;
use crate::discovery::{Discovery, StaticDiscovery};
use crate::hlc::HybridClock;
use crate::membership::NodeId;
use crate::options::TableOptions;
use crate::registry::{Registry, TableEntry};
use crate::server::{Control, Server, ServerParts};
use crate::shared::Shared;
use crate::status::{NodeStatus, TableStatus};
use crate::table::Table;
use crate::transport::handshake::Credentials;
use crate::transport::peers::{canonical, Command, PeerManager, PeersView};
use crate::types::{Key, Value};
use crate::{Error, Result};

/// The cookie used when none is configured. Fine on a laptop; set your own in production.
pub const DEFAULT_COOKIE: &str = "cets-default-cookie";

/// Configures and starts a [`Node`]. Made by [`Node::builder`].
pub struct NodeBuilder {
    name: String,
    listen: SocketAddr,
    cookie: Vec<u8>,
    discovery: Option<Box<dyn Discovery>>,
    config: NodeConfig,
    tls: Option<crate::TlsConfig>,
    clock_skew: Duration,
}

impl std::fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("name", &self.name)
            .field("listen", &self.listen)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NodeBuilder {
    /// The UDP address of the node's QUIC endpoint. Default `0.0.0.0:4370`; use port 0 to let
    /// the system pick one (see [`Node::local_addr`]).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// The shared secret every node of the cluster must know. Default [`DEFAULT_COOKIE`].
    pub fn cookie(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.cookie = secret.as_ref().to_vec();
        self
    }

    /// Where the node learns the addresses of other nodes. Default: none (a node alone, or
    /// one that others dial).
    pub fn discovery(mut self, d: impl Discovery) -> Self {
        self.discovery = Some(Box::new(d));
        self
    }

    /// Mutual TLS with a cluster CA (see [`crate::TlsConfig`]): only nodes whose certificate the
    /// CA signed can connect. The cookie handshake still runs on top. Default: self-signed
    /// certificates, authentication by cookie alone.
    pub fn tls(mut self, tls: crate::TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Timeouts, buffer sizes and batching (see [`NodeConfig`]).
    pub fn config(mut self, config: NodeConfig) -> Self {
        self.config = config;
        self
    }

    /// Testing hook: this node's clock runs `ahead` of the system's wall clock (a node with a
    /// wrong clock, for tests of `NodeConfig::max_clock_drift`).
    #[doc(hidden)]
    pub fn clock_skew_for_tests(mut self, ahead: Duration) -> Self {
        self.clock_skew = ahead;
        self
    }

    /// Binds the endpoint and starts the node's tasks. Must run inside a Tokio runtime.
    pub async fn start(self) -> Result<Node> {
        self.config.validate()?;
        if self.name.is_empty() || self.name.len() > 255 {
            return Err(Error::Config(
                "the node name must have 1 to 255 bytes".into(),
            ));
        }
        if self.cookie.is_empty() {
            return Err(Error::Config("the cookie must not be empty".into()));
        }
        if let Some(tls) = &self.tls {
            tls.check_own_name(&self.name)?;
        }
        crate::metrics::describe();
        let id = NodeId::new(self.name);
        let config_drift = self.config.max_clock_drift;
        let (endpoint, socket) =
            crate::transport::endpoint(self.listen, &self.config, self.tls.as_ref())?;
        let local_addr = endpoint.local_addr()?;
        let registry = Arc::new(Registry::default());
        let peers = PeerManager::spawn(
            id.clone(),
            endpoint.clone(),
            Credentials::new(
                &self.cookie,
                self.tls.as_ref().is_some_and(|t| t.requires_node_names()),
            ),
            self.config.clone(),
            registry.clone(),
        );
        let discovery_state = Arc::new(Mutex::new(DiscoveryState::default()));
        let discovery = self
            .discovery
            .unwrap_or_else(|| Box::new(StaticDiscovery::new(Vec::<SocketAddr>::new())));
        let task = tokio::spawn(
            discovery_loop(
                discovery,
                peers.clone(),
                discovery_state.clone(),
                self.config.clone(),
                crate::metrics::NodeMetrics::new(&id.name).discovery_errors,
            )
            .instrument(tracing::info_span!("cets_discovery", node = %id.name)),
        );
        tracing::info!(node = %id, %local_addr, "node started");
        Ok(Node {
            inner: Arc::new(NodeInner {
                id,
                config: self.config,
                endpoint,
                socket,
                local_addr,
                registry,
                peers,
                clock: Arc::new(HybridClock::with_max_drift(config_drift).skewed(self.clock_skew)),
                tables: Mutex::new(Vec::new()),
                discovery: discovery_state,
                discovery_task: task,
            }),
        })
    }
}

#[derive(Default)]
struct DiscoveryState {
    rounds: u64,
    discovered: Vec<SocketAddr>,
    error: Option<String>,
}

/// The type-erased control side of a running table.
trait TableControl: Send + Sync {
    fn name(&self) -> &str;
    fn status(&self) -> Option<oneshot::Receiver<TableStatus>>;
    fn stop(&self) -> Option<oneshot::Receiver<()>>;
}

struct ControlOf<K, V> {
    name: String,
    tx: mpsc::UnboundedSender<Control<K, V>>,
}

impl<K: Send + Sync + 'static, V: Send + Sync + 'static> TableControl for ControlOf<K, V> {
    fn name(&self) -> &str {
        &self.name
    }
    fn status(&self) -> Option<oneshot::Receiver<TableStatus>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Control::Status(tx)).ok().map(|_| rx)
    }
    fn stop(&self) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Control::Stop(tx)).ok().map(|_| rx)
    }
}

struct NodeInner {
    id: NodeId,
    config: NodeConfig,
    endpoint: quinn::Endpoint,
    /// The endpoint's socket, closed by `shutdown` (quinn would keep it while any handle of
    /// the endpoint or of a connection lives).
    socket: Arc<crate::transport::socket::ClosableSocket>,
    local_addr: SocketAddr,
    registry: Arc<Registry>,
    peers: mpsc::UnboundedSender<Command>,
    clock: Arc<HybridClock>,
    tables: Mutex<Vec<Box<dyn TableControl>>>,
    discovery: Arc<Mutex<DiscoveryState>>,
    discovery_task: JoinHandle<()>,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        self.discovery_task.abort();
        for t in self.tables.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = t.stop();
        }
        let (tx, _rx) = oneshot::channel();
        let _ = self.peers.send(Command::Shutdown(tx));
    }
}

/// A running node: one per process. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.inner.id)
            .field("local_addr", &self.inner.local_addr)
            .finish()
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// `TableOptions::expire_after` in milliseconds: `None` for never (no option, or more than a
/// thousand years); under 1 ms is refused.
fn expire_millis(ttl: Option<Duration>) -> Result<Option<u64>> {
    const NEVER_MS: u128 = 1000 * 366 * 86_400 * 1000;
    match ttl {
        None => Ok(None),
        Some(d) if d < Duration::from_millis(1) => {
            Err(Error::Config("expire_after must be at least 1 ms".into()))
        }
        Some(d) if d.as_millis() > NEVER_MS => Ok(None),
        Some(d) => Ok(Some(d.as_millis() as u64)),
    }
}

/// What a table's lifetime mixes into its stream fingerprint: nothing without expiry, else an
/// FNV-1a hash of the milliseconds, so that every two lifetimes differ (`ms | 1` was mixed in
/// before, and 1000 ms and 1001 ms shared a table).
fn expiry_mark(expire_ms: Option<u64>) -> u64 {
    expire_ms.map_or(0, |ms| {
        ms.to_le_bytes().iter().fold(FNV_OFFSET, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(FNV_PRIME)
        })
    })
}

/// What a table started with `TableOptions::persist` restores: its last snapshot, decoded, and
/// (with `sync_writes`) its write-ahead log, decoded; or, if either cannot be read and the
/// options say to start empty, nothing and the error.
async fn restore_of<K: Key, V: Value>(
    name: &str,
    opts: &TableOptions<K, V>,
) -> Result<crate::server::Restored<K, V>> {
    use crate::server::Restored;
    let Some(p) = &opts.persist else {
        return Ok(Restored::default());
    };
    if p.sync_writes && !p.backend.has_log() {
        return Err(Error::Config(
            "PersistOptions::sync_writes needs a backend that keeps a log".into(),
        ));
    }
    let load = || async {
        let blocks = match p.backend.load(name).await? {
            None => Vec::new(),
            Some(b) => {
                crate::persistence::decode_blocks(&format!("snapshot of table {name:?}"), &b)?
            }
        };
        let mut log = Vec::new();
        let mut torn_tails = 0;
        if p.sync_writes {
            let found = p.backend.log_recover(name).await?;
            torn_tails = found.torn_tails;
            for (i, e) in found.entries.into_iter().enumerate() {
                let ops = postcard::from_bytes(&e).map_err(|e| Error::Persistence {
                    file: format!("log of table {name:?}"),
                    reason: format!("entry {i} does not decode as this table's writes: {e}"),
                })?;
                log.push(ops);
            }
        }
        Ok::<_, Error>((blocks, log, torn_tails))
    };
    // A store that cannot be reached is waited for, never taken for damage.
    let give_up = tokio::time::Instant::now() + p.restore_wait;
    let mut pause = Duration::from_millis(100);
    let loaded = loop {
        match load().await {
            Err(e @ Error::PersistenceUnavailable { .. }) => {
                let now = tokio::time::Instant::now();
                if now >= give_up {
                    tracing::error!(table = name, error = %e, wait = ?p.restore_wait,
                        "persistence unavailable at start; not starting the table");
                    return Err(e);
                }
                tracing::warn!(table = name, error = %e, retry_in = ?pause,
                    "persistence unavailable at start; waiting for it");
                tokio::time::sleep(pause.min(give_up - now)).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => break other,
        }
    };
    match loaded {
        Ok((blocks, log, torn_tails)) => Ok(Restored {
            blocks,
            log,
            torn_tails,
            error: None,
        }),
        Err(e) if p.on_restore_error == crate::persistence::OnRestoreError::StartEmpty => {
            tracing::error!(table = name, error = %e, "snapshot or log unreadable; starting empty");
            // Else the next start finds the same damage and starts empty again, losing the
            // writes acknowledged in between.
            if let Err(a) = p.backend.set_aside(name).await {
                tracing::error!(table = name, error = %a, "cannot set the unreadable state aside");
            }
            Ok(Restored {
                error: Some(e.to_string()),
                ..Restored::default()
            })
        }
        Err(e) => Err(e),
    }
}

/// A stable fingerprint of the key and value types (FNV-1a of their type names).
fn fingerprint<K, V>() -> u64 {
    let mut h: u64 = FNV_OFFSET;
    for b in std::any::type_name::<K>()
        .bytes()
        .chain([0u8])
        .chain(std::any::type_name::<V>().bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

impl Node {
    /// Starts configuring a node with a name unique in the cluster.
    pub fn builder(name: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            name: name.into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 4370)),
            cookie: DEFAULT_COOKIE.as_bytes().to_vec(),
            discovery: None,
            config: NodeConfig::default(),
            tls: None,
            clock_skew: Duration::ZERO,
        }
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.id.name
    }

    /// This node's identity (name and incarnation).
    pub fn id(&self) -> &NodeId {
        &self.inner.id
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Starts a table's server on this node and returns its handle. Every node that starts a
    /// table of the same name (with the same kind and types) holds a full copy of it.
    pub async fn start<K: Key, V: Value>(
        &self,
        name: &str,
        opts: TableOptions<K, V>,
    ) -> Result<Table<K, V>> {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::Config(
                "a table name must have 1 to 255 bytes".into(),
            ));
        }
        let kind = opts.kind;
        let expire_ms = expire_millis(opts.expire_after)?;
        // Nodes whose records live differently must not share the table: the same refusal as
        // for different types.
        crate::ownership::check(&opts)?;
        let restored = restore_of::<K, V>(name, &opts).await?;
        let fp = fingerprint::<K, V>()
            ^ expiry_mark(expire_ms)
            ^ crate::ownership::fingerprint_mark(opts.ownership);
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        self.inner.registry.insert(
            name,
            TableEntry {
                kind,
                fingerprint: fp,
                events: ev_tx,
            },
        )?;
        let (writes_tx, writes_rx) = mpsc::channel(self.inner.config.write_queue);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            name: name.to_string(),
            kind,
            store: Records::new(kind, self.inner.config.anti_entropy_interval.is_some()),
            members: std::sync::RwLock::new(Vec::new()),
            expire_ms,
            record_ttl: std::sync::atomic::AtomicBool::new(false),
            hub: Arc::new(crate::subscription::Hub::new(opts.subscription_buffer)),
        });
        let spawned = Server::spawn(ServerParts {
            shared: shared.clone(),
            opts,
            config: self.inner.config.clone(),
            clock: self.inner.clock.clone(),
            me: self.inner.id.clone(),
            fingerprint: fp,
            writes: writes_rx,
            control: control_rx,
            control_tx: control_tx.clone(),
            events: ev_rx,
            restored,
            writes_tx: writes_tx.clone(),
        });
        if let Err(e) = spawned {
            self.inner.registry.remove(name);
            return Err(e);
        }
        self.inner
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(ControlOf {
                name: name.to_string(),
                tx: control_tx.clone(),
            }));
        let _ = self.inner.peers.send(Command::Announce(name.to_string()));
        Ok(Table {
            shared,
            writes: writes_tx,
            control: control_tx,
            _types: std::marker::PhantomData,
        })
    }

    /// Asks the node to connect to an address now (discovery does this on its own), even if
    /// dials to it failed lately and discovery waits before it dials it again
    /// ([`NodeConfig::discovery_max_backoff`](crate::NodeConfig::discovery_max_backoff)).
    pub fn connect(&self, addr: SocketAddr) {
        let _ = self.inner.peers.send(Command::DialNow(addr));
    }

    /// The health report.
    pub async fn status(&self) -> NodeStatus {
        self.status_and_own_addrs().await.0
    }

    /// The health report, and the addresses found to be this node's own (a discovered address
    /// this node dialed and reached itself at).
    async fn status_and_own_addrs(&self) -> (NodeStatus, Vec<SocketAddr>) {
        let (tx, rx) = oneshot::channel();
        let view = if self.inner.peers.send(Command::View(tx)).is_ok() {
            rx.await.unwrap_or_default()
        } else {
            PeersView::default()
        };
        let receivers: Vec<_> = self
            .inner
            .tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|t| t.status())
            .collect();
        let mut tables = Vec::new();
        for rx in receivers {
            if let Ok(s) = rx.await {
                tables.push(s);
            }
        }
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        let (rounds, discovered, error) = {
            let d = self
                .inner
                .discovery
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            (d.rounds, d.discovered.clone(), d.error.clone())
        };
        let connected_addrs: Vec<SocketAddr> = view.connected.iter().map(|(_, a)| *a).collect();
        let unavailable = view
            .unavailable
            .into_iter()
            .filter(|(a, _)| {
                discovered.iter().any(|d| canonical(*d) == *a) && !connected_addrs.contains(a)
            })
            .collect();
        let status = NodeStatus {
            node: self.inner.id.clone(),
            local_addr: self.inner.local_addr,
            discovered,
            connected: view.connected,
            unavailable,
            discovery_rounds: rounds,
            discovery_error: error,
            tables,
            clock_ahead: self.inner.clock.ahead(),
        };
        (status, view.own)
    }

    /// Waits until the first discovery poll was tried, every discovered address was either
    /// connected or found unavailable, and every connected node running one of this node's
    /// tables has been joined. Call it before serving traffic that reads the tables.
    pub async fn wait_for_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = deadline_after(timeout);
        loop {
            let (s, own) = self.status_and_own_addrs().await;
            // Addresses compared the way the connection manager keys them (an IPv4-mapped
            // address is its IPv4 one).
            let same = |a: &SocketAddr, b: &SocketAddr| canonical(*a) == canonical(*b);
            let settled = s.discovered.iter().all(|a| {
                same(a, &s.local_addr)
                    || own.iter().any(|o| same(o, a))
                    || s.connected.iter().any(|(_, c)| same(c, a))
                    || s.unavailable.iter().any(|(u, _)| same(u, a))
            });
            // Every connected node is, for every table, a member, known to lack the table, or
            // refused; none is still to be joined.
            let joined = s.tables.iter().all(|t| {
                t.not_joined.is_empty()
                    && !t.paused
                    && s.connected.iter().all(|(id, _)| {
                        t.members.contains(id)
                            || t.without_table.contains(&id.name)
                            || t.refused.iter().any(|(n, _)| *n == id.name)
                    })
            });
            if s.discovery_rounds > 0 && settled && joined {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the node gracefully: tables stop, connections close with a goodbye, and peers drop
    /// this node's records at once.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.discovery_task.abort();
        let tables: Vec<_> =
            std::mem::take(&mut *self.inner.tables.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &tables {
            if let Some(rx) = t.stop() {
                let _ = rx.await;
            }
            self.inner.registry.remove(t.name());
        }
        let (tx, rx) = oneshot::channel();
        let mut closed = Vec::new();
        if self.inner.peers.send(Command::Shutdown(tx)).is_ok() {
            closed = rx.await.unwrap_or_default();
        }
        // Waits (up to 1 s) until the close frames to the peers are out, so that they drop
        // this node's records at once even if the process exits now. Only those: a dial that
        // failed or is still in flight, or an incoming connection still in its handshake, has
        // measured no round trip and drains for about three initial probe timeouts (a second
        // or more), and nobody waits for its close.
        let endpoint = &self.inner.endpoint;
        let sent = async {
            tokio::select! {
                () = endpoint.wait_idle() => {}
                () = async {
                    while !closed.iter().all(|(c, before)| close_sent(c, *before)) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                } => {}
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), sent).await;
        // The port is free from here on, so a node can start again on this address at once,
        // whatever handles of this one the program still holds. Connections still draining
        // send nothing more; their peers have had the close, or will time out.
        self.inner.socket.close();
        tracing::info!(node = %self.inner.id, "node shut down");
        Ok(())
    }
}

/// Whether our close of `conn` is on the wire: a closed connection sends nothing but its close,
/// so any datagram after the `before` it had sent is that (or the peer closed it first, and
/// there is no close of ours to send).
fn close_sent(conn: &quinn::Connection, before: u64) -> bool {
    conn.stats().udp_tx.datagrams > before
        || !matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::LocallyClosed)
        )
}

async fn discovery_loop(
    mut discovery: Box<dyn Discovery>,
    peers: mpsc::UnboundedSender<Command>,
    state: Arc<Mutex<DiscoveryState>>,
    config: NodeConfig,
    errors: ::metrics::Counter,
) {
    let mut delay = config.discovery_interval;
    loop {
        let result = discovery.get_nodes().await;
        {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            s.rounds += 1;
            match &result {
                Ok(list) => {
                    s.discovered = list.iter().map(|p| p.addr).collect();
                    s.error = None;
                }
                Err(e) => s.error = Some(e.to_string()),
            }
        }
        match result {
            Ok(list) => {
                delay = config.discovery_interval;
                let addrs = list.iter().map(|p| p.addr).collect();
                if peers.send(Command::Discovered(addrs)).is_err() {
                    return;
                }
                for p in list {
                    if peers.send(Command::Dial(p.addr)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                errors.increment(1);
                tracing::warn!(error = %e, "discovery failed");
                delay = delay.saturating_mul(2).min(config.discovery_max_backoff);
            }
        }
        tokio::time::sleep(delay).await;
    }
}
