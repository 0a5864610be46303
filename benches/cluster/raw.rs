//! Raw QUIC baselines: our own rustls configs (ring provider, the nodes' verifier of any server
//! certificate, TLS 1.3) and the transport settings cets uses, on sockets with the same 4 MiB
//! buffers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{Rec, Res};

const NAME: &str = "bench";
const ALPN: &[u8] = b"cets-bench";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Res<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(IdleTimeout::try_from(Duration::from_secs(3))?));
    t.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    Ok(t)
}

/// A QUIC endpoint (server and client) on 127.0.0.1, port chosen by the system.
pub(super) fn endpoint() -> Res<Endpoint> {
    let certified = rcgen::generate_simple_self_signed(vec![NAME.to_string()])?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(cets::testing::any_certificate())
        .with_no_client_auth();
    client.alpn_protocols = vec![ALPN.to_vec()];

    let transport = Arc::new(transport()?);
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client)?));
    client.transport_config(transport);

    use socket2::{Domain, Protocol, Socket, Type};
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(4 * 1024 * 1024);
    let _ = socket.set_send_buffer_size(4 * 1024 * 1024);
    socket.bind(&addr.into())?;
    let mut ep = Endpoint::new(
        EndpointConfig::default(),
        Some(server),
        socket.into(),
        Arc::new(TokioRuntime),
    )?;
    ep.set_default_client_config(client);
    Ok(ep)
}

async fn accept(ep: &Endpoint) -> Res<quinn::Connection> {
    let incoming = ep.accept().await.ok_or("endpoint closed")?;
    Ok(incoming.await?)
}

/// Round trips of 32 bytes on one long-lived bi stream: `warm` unrecorded, then `n`.
pub(super) async fn ping(warm: usize, n: usize) -> Res<Vec<Duration>> {
    let server = endpoint()?;
    let client = endpoint()?;
    let addr = server.local_addr()?;
    let echo = tokio::spawn(async move {
        let conn = accept(&server).await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut buf = [0u8; 32];
        while recv.read_exact(&mut buf).await.is_ok() {
            send.write_all(&buf).await?;
        }
        Res::Ok(())
    });
    let conn = client.connect(addr, NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut buf = [7u8; 32];
    let mut samples = Vec::with_capacity(n);
    for i in 0..warm + n {
        let t0 = Instant::now();
        send.write_all(&buf).await?;
        recv.read_exact(&mut buf).await?;
        if i >= warm {
            samples.push(t0.elapsed());
        }
    }
    let _ = send.finish();
    conn.close(VarInt::from_u32(0), b"done");
    let _ = echo.await;
    client.wait_idle().await;
    Ok(samples)
}

/// What the sender streams.
pub(super) enum Source {
    /// Frames encoded before the clock starts (pure transport).
    Frames(Arc<Vec<Bytes>>),
    /// Records encoded into frames of `chunk` while the clock runs.
    Records(Arc<Vec<Rec>>, usize),
}

/// Streams `source` over one uni stream to each of `peers` receivers (one connection each,
/// the same bytes to all) and returns the time until every receiver has it all, with the
/// bytes each received. With `decode`, receivers split the frames and decode the records.
pub(super) async fn stream(source: Source, peers: usize, decode: bool) -> Res<(Duration, u64)> {
    let sender = endpoint()?;
    let mut receivers = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..peers {
        let ep = endpoint()?;
        let addr = ep.local_addr()?;
        receivers.push(tokio::spawn(async move {
            let conn = accept(&ep).await?;
            let mut recv = conn.accept_uni().await?;
            let mut bytes = 0u64;
            let mut buf = BytesMut::with_capacity(1 << 20);
            let mut decoded: Vec<Rec> = Vec::new();
            while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                bytes += chunk.bytes.len() as u64;
                if !decode {
                    continue;
                }
                buf.extend_from_slice(&chunk.bytes);
                loop {
                    if buf.len() < 4 {
                        break;
                    }
                    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() < 4 + len {
                        break;
                    }
                    buf.advance(4);
                    let body = buf.split_to(len);
                    let recs: Vec<Rec> = postcard::from_bytes(&body)?;
                    decoded.extend(recs);
                }
            }
            if decode && !buf.is_empty() {
                return Err("stream ended inside a frame".into());
            }
            std::hint::black_box(&decoded);
            conn.close(VarInt::from_u32(0), b"done");
            Res::Ok(bytes)
        }));
        conns.push(sender.connect(addr, NAME)?.await?);
    }
    let source = Arc::new(source);
    let t0 = Instant::now();
    let mut writers = Vec::new();
    for conn in conns {
        let source = source.clone();
        writers.push(tokio::spawn(async move {
            let mut send = conn.open_uni().await?;
            match &*source {
                Source::Frames(frames) => {
                    for f in frames.iter() {
                        send.write_all(f).await?;
                    }
                }
                Source::Records(recs, chunk) => {
                    for c in recs.chunks(*chunk) {
                        send.write_all(&super::frame(c)?).await?;
                    }
                }
            }
            send.finish()?;
            let _ = send.stopped().await;
            Res::Ok(())
        }));
    }
    let mut bytes = 0;
    for r in receivers {
        bytes = r.await??;
    }
    let elapsed = t0.elapsed();
    for w in writers {
        let _ = w.await;
    }
    sender.close(VarInt::from_u32(0), b"done");
    Ok((elapsed, bytes))
}
