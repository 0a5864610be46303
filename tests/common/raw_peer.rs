//! A peer that speaks the wire protocol itself: a raw quinn client (TLS, the cookie
//! handshake, frames) built from `src/transport/` and `src/proto.rs`, speaking the library's own
//! wire types (`cets::testing::wire`, aliased for a `u64 -> String` table in `wire`), and a
//! pair of nodes (`Pair`) to aim it at. Included by the test files that
//! need it with `#[path = "common/raw_peer.rs"] mod raw_peer;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use cets::discovery::{StaticDiscovery, StaticDiscoveryHandle};
use cets::{Node, NodeConfig, NodeId, Table, TableOptions};

use crate::common::*;

pub type T = Table<u64, String>;

pub const COOKIE: &str = "test-cookie";

/// Two connected nodes `n1`, `n2` (in this name order) with a joined set table `t` each, and
/// the `on_node_down` calls their tables saw.
pub struct Pair {
    pub nodes: Vec<Node>,
    pub tables: Vec<T>,
    pub downs: Vec<Downs>,
    pub _handles: Vec<StaticDiscoveryHandle>,
}

pub async fn pair_with(config: NodeConfig) -> Pair {
    let mut nodes = Vec::new();
    let mut handles = Vec::new();
    for n in ["n1", "n2"] {
        let (node, h) = node_with(n, COOKIE, config.clone()).await;
        nodes.push(node);
        handles.push(h);
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(Node::local_addr).collect();
    for h in &handles {
        h.set(addrs.clone());
    }
    let mut tables = Vec::new();
    let mut downs = Vec::new();
    for n in &nodes {
        let d = Downs::default();
        tables.push(n.start("t", d.opts(TableOptions::set())).await.unwrap());
        downs.push(d);
    }
    joined(&tables.iter().collect::<Vec<_>>()).await;
    Pair {
        nodes,
        tables,
        downs,
        _handles: handles,
    }
}

impl Pair {
    /// Incarnations each node is connected to now.
    pub async fn links(&self) -> Vec<Vec<NodeId>> {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(
                n.status()
                    .await
                    .connected
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect(),
            );
        }
        out
    }

    /// Writes on each node are on the other one when the write returns; nobody went down.
    pub async fn still_replicates(&self, tag: u64) {
        for (i, t) in self.tables.iter().enumerate() {
            let k = tag * 10 + i as u64;
            t.insert(k, format!("w{k}")).await.unwrap();
            for u in &self.tables {
                assert_eq!(u.get(&k), Some(format!("w{k}")), "write {k} replicated");
            }
        }
        for d in &self.downs {
            assert_eq!(d.calls(), vec![], "no node went down");
        }
        for (i, t) in self.tables.iter().enumerate() {
            assert_eq!(t.nodes(), vec![["n2", "n1"][i]]);
        }
    }

    pub async fn shutdown(&self) {
        shutdown_all(&self.nodes).await;
    }

    /// The end of a robustness test: the pair still replicates (writes tagged `tag`), over the
    /// connection it had `before`; then the raw client's endpoint and the nodes are closed.
    pub async fn ends_unharmed(&self, tag: u64, before: Vec<Vec<NodeId>>, ep: quinn::Endpoint) {
        self.still_replicates(tag).await;
        assert_eq!(
            self.links().await,
            before,
            "the real connection was never replaced"
        );
        ep.close(0u32.into(), b"");
        self.shutdown().await;
    }
}

/// A port that was free a moment ago (so both nodes can be told each other's address before
/// either starts).
pub fn free_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub async fn start_at(name: &str, addr: SocketAddr, peers: Vec<SocketAddr>) -> Node {
    init_tracing();
    Node::builder(name)
        .listen(addr)
        .cookie(COOKIE)
        .config(NodeConfig::fast_failover())
        .discovery(StaticDiscovery::new(peers))
        .start()
        .await
        .expect("node starts")
}

/// A raw QUIC client that speaks (or breaks) the cets wire protocol.
pub mod raw {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use cets::NodeId;
    use quinn::crypto::rustls::QuicClientConfig;
    use serde::Serialize;

    pub const ALPN: &[u8] = b"cets/1";

    /// A client-only endpoint on loopback, with keep-alives so that an idle connection is
    /// closed by the node's decision, not by the idle timer.
    pub fn endpoint() -> quinn::Endpoint {
        endpoint_at("127.0.0.1")
    }

    /// A client-only endpoint on the loopback address `ip` (any of 127.0.0.0/8 on Linux).
    pub fn endpoint_at(ip: &str) -> quinn::Endpoint {
        endpoint_with(ip, quinn::TransportConfig::default())
    }

    /// A client endpoint for a peer that leaves a stream unread: it grants the node 64 KiB of
    /// data in flight, which its UDP socket's buffer holds, where the default windows let the
    /// node send over a megabyte at once. Without this, the datagrams the socket drops can
    /// include the node's CONNECTION_CLOSE, and the test sees a stateless reset in its place.
    pub fn unread_endpoint() -> quinn::Endpoint {
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(quinn::VarInt::from_u32(64 << 10));
        transport.receive_window(quinn::VarInt::from_u32(64 << 10));
        endpoint_with("127.0.0.1", transport)
    }

    fn endpoint_with(ip: &str, mut transport: quinn::TransportConfig) -> quinn::Endpoint {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(cets::testing::any_certificate())
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        transport.keep_alive_interval(Some(Duration::from_millis(200)));
        cfg.transport_config(Arc::new(transport));
        let mut ep = quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap();
        ep.set_default_client_config(cfg);
        ep
    }

    pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
        ep.connect(addr, "cets")
            .unwrap()
            .await
            .expect("TLS with the node")
    }

    /// A server-only endpoint on loopback `ip` with a fresh self-signed certificate, speaking
    /// the nodes' ALPN: something a node can dial.
    pub fn server_endpoint(ip: &str) -> quinn::Endpoint {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certified = rcgen::generate_simple_self_signed(vec!["cets".into()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let cfg = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
        ));
        quinn::Endpoint::server(cfg, format!("{ip}:0").parse().unwrap()).unwrap()
    }

    pub use cets::testing::wire::{Hello, StreamHeader, PROTOCOL_VERSION};

    /// `node::fingerprint::<K, V>()`: FNV-1a of the type names.
    pub fn fingerprint<K, V>() -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::any::type_name::<K>()
            .bytes()
            .chain([0u8])
            .chain(std::any::type_name::<V>().bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// A frame: `u32` little-endian length, then postcard.
    pub fn frame<T: Serialize>(msg: &T) -> Vec<u8> {
        let body = postcard::to_stdvec(msg).unwrap();
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&body);
        f
    }

    pub async fn read_frame(recv: &mut quinn::RecvStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        recv.read_exact(&mut body).await.unwrap();
        body
    }

    /// HMAC-SHA256(cookie, role || len(name) || name || incarnation || TLS exporter).
    pub fn proof(cookie: &str, conn: &quinn::Connection, role: u8, node: &NodeId) -> Vec<u8> {
        let mut exporter = [0u8; 32];
        conn.export_keying_material(&mut exporter, b"EXPORTER-cets-cookie-v1", b"")
            .unwrap();
        let mut msg = vec![role];
        msg.extend_from_slice(&(node.name.len() as u64).to_le_bytes());
        msg.extend_from_slice(node.name.as_bytes());
        msg.extend_from_slice(&node.incarnation.to_le_bytes());
        msg.extend_from_slice(&exporter);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, cookie.as_bytes());
        ring::hmac::sign(&key, &msg).as_ref().to_vec()
    }

    pub fn hello(cookie: &str, conn: &quinn::Connection, me: &NodeId) -> Hello {
        Hello {
            magic: *b"CETS",
            version: PROTOCOL_VERSION,
            node: me.clone(),
            proof: proof(cookie, conn, b'D', me),
        }
    }

    /// The dialer's side of the cookie handshake on `conn`: our hello, then the node's, or
    /// `None` on any failure.
    async fn exchange(conn: &quinn::Connection, cookie: &str, me: &NodeId) -> Option<Hello> {
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        send.write_all(&frame(&hello(cookie, conn, me)))
            .await
            .ok()?;
        let mut len = [0u8; 4];
        recv.read_exact(&mut len).await.ok()?;
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        recv.read_exact(&mut body).await.ok()?;
        let _ = send.finish();
        postcard::from_bytes(&body).ok()
    }

    /// The dialer's side of the cookie handshake; checks the node's proof; returns the node.
    pub async fn handshake(conn: &quinn::Connection, cookie: &str, me: &NodeId) -> NodeId {
        let theirs = exchange(conn, cookie, me)
            .await
            .expect("the node answers with its hello");
        assert_eq!(&theirs.magic, b"CETS");
        let expected = proof(cookie, conn, b'A', &theirs.node);
        assert_eq!(theirs.proof, expected, "the node proves the cookie");
        theirs.node
    }

    /// A new connection and the whole handshake as `me`; `false` on any failure instead of a
    /// panic (for polls).
    pub async fn try_handshake(
        ep: &quinn::Endpoint,
        addr: SocketAddr,
        cookie: &str,
        me: &NodeId,
    ) -> bool {
        let attempt = async {
            let conn = ep.connect(addr, "cets").ok()?.await.ok()?;
            let theirs = exchange(&conn, cookie, me).await?;
            let ok = theirs.proof == proof(cookie, &conn, b'A', &theirs.node);
            conn.close(0u32.into(), b"");
            Some(ok)
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), attempt).await,
            Ok(Some(true))
        )
    }

    /// How the node closed the connection (panics if it did not within the wait, or if the
    /// connection ended some other way, e.g. by idle timeout).
    pub async fn closed_by_node(conn: &quinn::Connection) -> quinn::ApplicationClose {
        match tokio::time::timeout(super::WAIT, conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => c,
            Ok(other) => panic!("connection ended otherwise: {other}"),
            Err(_) => panic!("the node did not close the connection"),
        }
    }
}

pub fn reason(c: &quinn::ApplicationClose) -> String {
    String::from_utf8_lossy(&c.reason).into_owned()
}

#[allow(unused_imports)]
pub use cets::testing::wire::close::{AUTH, OVERLOAD, PROTOCOL, REDIRECT, SELF, VERSION};

pub fn code(c: &quinn::ApplicationClose) -> u32 {
    u32::try_from(c.error_code.into_inner()).unwrap()
}

/// Authenticates as `a-raw` (which sorts before `n1`, so the node keeps the connection).
pub async fn authenticated(ep: &quinn::Endpoint, node: &Node) -> quinn::Connection {
    let conn = raw::connect(ep, node.local_addr()).await;
    let me = NodeId {
        name: "a-raw".into(),
        incarnation: rand::random(),
    };
    let theirs = raw::handshake(&conn, COOKIE, &me).await;
    assert_eq!(&theirs, node.id());
    conn
}

/// The header of the node's table stream towards us, checked against what we send.
pub async fn their_header(conn: &quinn::Connection) -> quinn::RecvStream {
    let mut recv = conn.accept_uni().await.unwrap();
    let header: raw::StreamHeader =
        postcard::from_bytes(&raw::read_frame(&mut recv).await).unwrap();
    let ours = our_header("t");
    assert_eq!(
        (header.table, header.kind, header.fingerprint),
        (ours.table, ours.kind, ours.fingerprint),
        "the fingerprint is computed as the node does"
    );
    recv
}

pub fn our_header(table: &str) -> raw::StreamHeader {
    raw::StreamHeader {
        table: table.into(),
        kind: cets::TableKind::Set,
        fingerprint: raw::fingerprint::<u64, String>(),
    }
}

/// A raw peer's two streams of table `t` to a node, speaking the join protocol.
pub struct TablePeer {
    pub ours: quinn::SendStream,
    pub theirs: quinn::RecvStream,
    pub req: u64,
}

impl TablePeer {
    /// Opens our stream of `t` next to the node's (`theirs`).
    pub async fn open(conn: &quinn::Connection, theirs: quinn::RecvStream) -> Self {
        let mut ours = conn.open_uni().await.unwrap();
        ours.write_all(&raw::frame(&our_header("t"))).await.unwrap();
        Self {
            ours,
            theirs,
            req: 0,
        }
    }

    /// Sends a join request; returns the name of the node's (first) reply's variant.
    pub async fn ask(&mut self, body: wire::JoinReq) -> &'static str {
        self.req += 1;
        let req = self.req;
        let f = raw::frame(&wire::PeerMsg::Join { req, body });
        self.ours.write_all(&f).await.unwrap();
        loop {
            let msg: wire::PeerMsg =
                postcard::from_bytes(&raw::read_frame(&mut self.theirs).await).unwrap();
            match msg {
                wire::PeerMsg::JoinReply { req: r, body } if r == req => return wire::name(&body),
                wire::PeerMsg::Tick { .. } | wire::PeerMsg::JoinReply { .. } => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// The library's wire messages (`cets::testing::wire`) for the `u64 -> String` table of the
/// raw peers here.
pub mod wire {
    use cets::testing::wire as lib;

    pub type WireRecord = lib::WireRecord<u64, String>;
    pub type OpKind = lib::OpKind<u64, String>;
    pub type Op = lib::Op<u64, String>;
    pub type JoinReq = lib::JoinReq<u64, String>;
    pub type JoinRep = lib::JoinRep<u64, String>;
    pub type PeerMsg = lib::PeerMsg<u64, String>;

    /// The name of a join reply's variant.
    pub fn name(rep: &JoinRep) -> &'static str {
        match rep {
            JoinRep::Info { .. } => "Info",
            JoinRep::Paused { .. } => "Paused",
            JoinRep::Busy { .. } => "Busy",
            JoinRep::Chunk { .. } => "Chunk",
            JoinRep::Applied { .. } => "Applied",
            JoinRep::Unpaused => "Unpaused",
            JoinRep::Refused { .. } => "Refused",
            JoinRep::Tombstones { .. } => "Tombstones",
        }
    }
}

/// A raw peer named `z-raw` (after every node name here, so the node keeps the connection it
/// dials and coordinates the join): `node` is told its address, dials it, and the acceptor's
/// side of the cookie handshake runs here. Returns the endpoint, the connection, our identity
/// and the two table streams of `t`.
pub async fn dialed_by(
    node: &Node,
    disco: &StaticDiscoveryHandle,
) -> (quinn::Endpoint, quinn::Connection, NodeId, TablePeer) {
    let fake = raw::server_endpoint("127.0.0.1");
    disco.set(vec![fake.local_addr().unwrap()]);
    let me = NodeId {
        name: "z-raw".into(),
        incarnation: rand::random(),
    };
    let conn = tokio::time::timeout(WAIT, async {
        fake.accept()
            .await
            .expect("the node dials")
            .await
            .expect("TLS")
    })
    .await
    .expect("the node dials within the wait");
    let (mut send, mut recv) = conn.accept_bi().await.unwrap();
    let theirs: raw::Hello = postcard::from_bytes(&raw::read_frame(&mut recv).await).unwrap();
    assert_eq!(&theirs.node, node.id());
    let ours = raw::Hello {
        magic: *b"CETS",
        version: raw::PROTOCOL_VERSION,
        node: me.clone(),
        proof: raw::proof(COOKIE, &conn, b'A', &me),
    };
    send.write_all(&raw::frame(&ours)).await.unwrap();
    let _ = send.finish();
    let peer = TablePeer::open(&conn, their_header(&conn).await).await;
    (fake, conn, me, peer)
}

/// The node's next join request on its table stream to us (ticks skipped).
pub async fn next_request(theirs: &mut quinn::RecvStream) -> (u64, wire::JoinReq) {
    loop {
        let msg: wire::PeerMsg = postcard::from_bytes(&raw::read_frame(theirs).await).unwrap();
        match msg {
            wire::PeerMsg::Join { req, body } => return (req, body),
            wire::PeerMsg::Tick { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

pub async fn reply(peer: &mut TablePeer, req: u64, body: wire::JoinRep) {
    let f = raw::frame(&wire::PeerMsg::JoinReply { req, body });
    peer.ours.write_all(&f).await.unwrap();
}

/// Resident memory of this process, in bytes.
pub fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

impl TablePeer {
    /// Makes the raw peer `me` a member of `node`'s set table `t` the way a join coordinator
    /// does: pause, an apply of nothing naming both nodes as the members, unpause.
    pub async fn member_of(conn: &quinn::Connection, node: &Node, me: &NodeId) -> Self {
        let mut peer = Self::open(conn, their_header(conn).await).await;
        let join = 4242;
        let pause = wire::JoinReq::Pause {
            join,
            lease_ms: 60_000,
        };
        assert_eq!(peer.ask(pause).await, "Paused");
        let apply = wire::JoinReq::Apply {
            join,
            owners: vec![],
            records: vec![],
            members: Some(vec![me.clone(), node.id().clone()]),
            merge: None,
        };
        assert_eq!(peer.ask(apply).await, "Applied");
        assert_eq!(peer.ask(wire::JoinReq::Unpause { join }).await, "Unpaused");
        peer
    }

    /// Sends one `Ops` frame of one op of `kind` as batch `seq` (stamped `seq`); returns the
    /// time until the node acked it.
    pub async fn acked_after(&mut self, seq: u64, kind: wire::OpKind) -> Duration {
        let f = raw::frame(&wire::PeerMsg::Ops {
            seq,
            ops: vec![wire::Op { ts: seq, kind }],
        });
        let start = std::time::Instant::now();
        self.ours.write_all(&f).await.unwrap();
        loop {
            let msg: wire::PeerMsg =
                postcard::from_bytes(&raw::read_frame(&mut self.theirs).await).unwrap();
            if matches!(msg, wire::PeerMsg::Ack { seq: s, .. } if s >= seq) {
                return start.elapsed();
            }
        }
    }
}
