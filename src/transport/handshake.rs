//! The cookie handshake that runs on every new connection before any table traffic.
//!
//! Both sides send a [`Hello`] on the control stream: protocol version, node name, incarnation
//! and a proof, `HMAC-SHA256(cookie, role || name || incarnation || exporter)`, where `exporter`
//! is keying material exported from this connection's TLS session (RFC 5705/8446). The proof is
//! worthless on any other connection, so a recorded handshake cannot be replayed, and `role`
//! (dialer or acceptor) keeps a node from reflecting the peer's own proof back. A wrong proof or
//! version closes the connection with a reason that the other side logs as well.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::{Connection, VarInt};
use ring::hmac;
use rustls::pki_types::CertificateDer;

use crate::frame::{self, FrameReader};
use crate::membership::NodeId;
use crate::proto::{close, Hello, MAGIC, PROTOCOL_VERSION};
use crate::{Error, Result};

const EXPORTER_LABEL: &[u8] = b"EXPORTER-cets-cookie-v1";
const HELLO_LIMIT: usize = 4096;

/// A connection whose peer proved knowledge of the cookie.
pub(crate) struct Authenticated {
    pub conn: Connection,
    pub peer: NodeId,
    /// The address this node dialed, if it dialed the connection. (Not always the connection's
    /// `remote_address()`: a socket bound to `[::]` reports an IPv4 peer as IPv4-mapped IPv6.)
    pub dialed: Option<SocketAddr>,
}

#[derive(Clone, Copy)]
enum Role {
    Dialer,
    Acceptor,
}

/// The bytes the proof signs: role, the sender's identity, and this TLS session's exporter.
fn proof_message(conn: &Connection, role: Role, node: &NodeId) -> Result<Vec<u8>> {
    let mut exporter = [0u8; 32];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .map_err(|_| Error::Tls("cannot export keying material".into()))?;
    let mut msg = Vec::with_capacity(64 + node.name.len());
    msg.extend_from_slice(match role {
        Role::Dialer => b"D",
        Role::Acceptor => b"A",
    });
    msg.extend_from_slice(&(node.name.len() as u64).to_le_bytes());
    msg.extend_from_slice(node.name.as_bytes());
    msg.extend_from_slice(&node.incarnation.to_le_bytes());
    msg.extend_from_slice(&exporter);
    Ok(msg)
}

fn proof(key: &hmac::Key, conn: &Connection, role: Role, node: &NodeId) -> Result<Vec<u8>> {
    Ok(hmac::sign(key, &proof_message(conn, role, node)?)
        .as_ref()
        .to_vec())
}

fn fail(conn: &Connection, code: u32, reason: String) -> Error {
    conn.close(VarInt::from_u32(code), reason.as_bytes());
    Error::Handshake {
        peer: conn.remote_address().to_string(),
        reason,
    }
}

fn check(auth: &Credentials, conn: &Connection, role: Role, hello: &Hello) -> Result<()> {
    if hello.magic != MAGIC || hello.version != PROTOCOL_VERSION {
        return Err(fail(
            conn,
            close::VERSION,
            format!(
                "protocol version {} is not {PROTOCOL_VERSION}",
                hello.version
            ),
        ));
    }
    // The rule a node applies to its own name (`NodeBuilder::start`): a longer one is no
    // cets node's, and would cost every table's owner map its length.
    let name = &hello.node.name;
    if name.is_empty() || name.len() > 255 {
        return Err(fail(
            conn,
            close::PROTOCOL,
            format!("node name of {} bytes (1 to 255 allowed)", name.len()),
        ));
    }
    let msg = proof_message(conn, role, &hello.node)?;
    hmac::verify(&auth.key, &msg, &hello.proof).map_err(|_| {
        fail(
            conn,
            close::AUTH,
            format!("bad cookie from {}", hello.node.name),
        )
    })?;
    if auth.node_names {
        let named = conn
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().cloned())
            .ok_or_else(|| "no certificate".to_string())
            .and_then(|leaf| super::tls::names_node(&leaf, name));
        if let Err(why) = named {
            return Err(fail(
                conn,
                close::AUTH,
                format!("the certificate of {name} does not name it: {why}"),
            ));
        }
    }
    Ok(())
}

async fn read_hello(conn: &Connection, reader: &mut FrameReader) -> Result<Hello> {
    let body = match reader.next().await {
        Ok(Some(b)) => b,
        Ok(None) => {
            return Err(fail(
                conn,
                close::PROTOCOL,
                "control stream closed during handshake".into(),
            ))
        }
        Err(e) => {
            // If the peer closed the connection, its reason is the better error.
            if let Some(reason) = conn.close_reason() {
                return Err(Error::Handshake {
                    peer: conn.remote_address().to_string(),
                    reason: reason.to_string(),
                });
            }
            return Err(fail(conn, close::PROTOCOL, format!("bad hello: {e}")));
        }
    };
    frame::decode::<Hello>(&body).map_err(|e| {
        fail(
            conn,
            close::VERSION,
            format!("undecodable hello (another protocol version?): {e}"),
        )
    })
}

/// Runs the dialer's side on a fresh connection.
pub(crate) async fn dialer(
    conn: Connection,
    addr: SocketAddr,
    me: &NodeId,
    auth: &Credentials,
    timeout: Duration,
) -> Result<Authenticated> {
    let work = async {
        let (mut send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node: me.clone(),
            proof: proof(&auth.key, &conn, Role::Dialer, me)?,
        };
        send.write_all(&frame::encode(&hello)?)
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let mut reader = FrameReader::new(recv, HELLO_LIMIT);
        let theirs = read_hello(&conn, &mut reader).await?;
        check(auth, &conn, Role::Acceptor, &theirs)?;
        super::open_up(&conn);
        let _ = send.finish();
        Ok(Authenticated {
            conn: conn.clone(),
            peer: theirs.node,
            dialed: Some(addr),
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(fail(&conn, close::PROTOCOL, "handshake timed out".into())),
    }
}

/// Runs the acceptor's side on a fresh connection.
pub(crate) async fn acceptor(
    conn: Connection,
    me: &NodeId,
    auth: &Credentials,
    timeout: Duration,
) -> Result<Authenticated> {
    let work = async {
        let (mut send, recv) = conn
            .accept_bi()
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let mut reader = FrameReader::new(recv, HELLO_LIMIT);
        let theirs = read_hello(&conn, &mut reader).await?;
        check(auth, &conn, Role::Dialer, &theirs)?;
        super::open_up(&conn);
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node: me.clone(),
            proof: proof(&auth.key, &conn, Role::Acceptor, me)?,
        };
        send.write_all(&frame::encode(&hello)?)
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let _ = send.finish();
        Ok(Authenticated {
            conn: conn.clone(),
            peer: theirs.node,
            dialed: None,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(fail(&conn, close::PROTOCOL, "handshake timed out".into())),
    }
}

/// What a node checks a peer against: the cookie, and whether the peer's certificate must name
/// it (mutual TLS with [`crate::TlsConfig::require_node_names`]).
pub(crate) struct Credentials {
    key: hmac::Key,
    node_names: bool,
}

impl Credentials {
    pub(crate) fn new(cookie: &[u8], node_names: bool) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, cookie),
            node_names,
        }
    }
}
