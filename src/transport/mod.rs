//! QUIC transport: one endpoint per node, one authenticated connection per pair of nodes.
//!
//! - [`admission`]: how many incoming connections may be in their handshake at once.
//! - [`tls`]: certificates and rustls configs (ring provider, always explicit).
//! - [`handshake`]: the cookie proof bound to the TLS session.
//! - [`frame`]: length-prefixed postcard frames with a size limit.
//! - [`peers`]: the connection manager, one task that owns every connection of the node.

pub(crate) mod admission;
pub(crate) mod handshake;
pub(crate) mod peers;
pub(crate) mod socket;
pub(crate) mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};

use crate::config::NodeConfig;
use crate::{Error, Result};

/// Maximum table streams a peer may open towards us (one per table).
const MAX_UNI_STREAMS: u32 = 4096;
/// Bytes a peer may have in flight to us on one connection once it is authenticated.
const RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;
/// Bytes a peer may have in flight to us before its cookie proof is checked: room for its hello
/// (at most `handshake::HELLO_LIMIT`), so that a connection in its handshake holds little
/// memory here, whoever opened it.
const HANDSHAKE_RECEIVE_WINDOW: u32 = 64 * 1024;

/// A connection starts with what the handshake needs: one bidirectional stream, no table
/// streams, a small receive window. [`open_up`] grants the rest once the peer is proven.
fn transport_config(cfg: &NodeConfig) -> Result<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(cfg.keep_alive_interval));
    t.initial_rtt(cfg.initial_rtt);
    t.max_idle_timeout(Some(
        IdleTimeout::try_from(cfg.idle_timeout)
            .map_err(|_| Error::Config("idle_timeout is too large".into()))?,
    ));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(HANDSHAKE_RECEIVE_WINDOW));
    t.send_window(32 * 1024 * 1024);
    Ok(t)
}

/// Grants a peer whose cookie proof checked out what table traffic needs: its table streams
/// and the full receive window.
pub(crate) fn open_up(conn: &quinn::Connection) {
    conn.set_max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS));
    conn.set_receive_window(VarInt::from_u32(RECEIVE_WINDOW));
}

fn bind(listen: SocketAddr, cfg: &NodeConfig) -> Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // Accept IPv4-mapped peers too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    if let Err(e) = socket.set_recv_buffer_size(cfg.socket_receive_buffer_size) {
        tracing::warn!(error = %e, "cannot set the UDP receive buffer size; keeping the default");
    }
    if let Err(e) = socket.set_send_buffer_size(cfg.socket_send_buffer_size) {
        tracing::warn!(error = %e, "cannot set the UDP send buffer size; keeping the default");
    }
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

/// Binds the node's QUIC endpoint: server and client on one UDP socket, which the node closes
/// itself at shutdown (`socket::ClosableSocket`).
pub(crate) fn endpoint(
    listen: SocketAddr,
    cfg: &NodeConfig,
    mtls: Option<&tls::TlsConfig>,
) -> Result<(Endpoint, Arc<socket::ClosableSocket>)> {
    let (server_crypto, client_crypto) = tls::configs(mtls)?;
    let transport = Arc::new(transport_config(cfg)?);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);
    let socket = socket::ClosableSocket::new(bind(listen, cfg)?)?;
    let mut ep = Endpoint::new_with_abstract_socket(
        EndpointConfig::default(),
        Some(server),
        socket.clone(),
        Arc::new(TokioRuntime),
    )?;
    ep.set_default_client_config(client);
    Ok((ep, socket))
}
