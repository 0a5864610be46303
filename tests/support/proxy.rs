//! A UDP relay between one client and one target, which a test can cut and heal: a network
//! partition for nodes on loopback, without network namespaces.
//!
//! The client sends to `addr()`; the relay forwards from its own upstream socket to the target
//! and sends the target's answers back to the client. While cut, packets in both directions
//! are dropped, so QUIC sees silence and the idle timeout fires on both sides.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

pub struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let t1 = {
            let (front, back, cut, client) =
                (front.clone(), back.clone(), cut.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    if !cut.load(Ordering::Relaxed) {
                        let _ = back.send_to(&buf[..n], target).await;
                    }
                }
            })
        };
        let t2 = {
            let (front, back, cut, client) =
                (front.clone(), back.clone(), cut.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = back.recv_from(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let (Some(to), false) = (to, cut.load(Ordering::Relaxed)) {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Proxy {
            addr,
            cut,
            tasks: vec![t1, t2],
        }
    }

    /// Where the client should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every packet from now on.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// Forwards packets again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
