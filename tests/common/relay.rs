//! A UDP relay between one client and one target, which a test can cut and heal: a network
//! partition for nodes on loopback, without network namespaces.
//!
//! The client sends to `addr()`; the relay forwards from its own upstream socket to the target
//! and sends the target's answers back to the client. While cut, packets in both directions
//! are dropped, so QUIC sees silence and the idle timeout fires on both sides. Each direction
//! can also be cut alone (`cut_way`), packets can be dropped at random (`set_loss`), and
//! delayed (`set_delay`: a base delay each way plus a random jitter, so packets also arrive
//! out of order).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// One direction of a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// From the client to the target.
    Up,
    /// From the target back to the client.
    Down,
}

#[derive(Default)]
struct Faults {
    up: AtomicBool,
    down: AtomicBool,
    /// Packets dropped at random, per million.
    loss: AtomicU32,
    /// Each packet waits this many microseconds, plus up to `jitter_us` more, each way.
    delay_us: AtomicU64,
    jitter_us: AtomicU64,
    /// A xorshift state for the loss and jitter draws.
    rng: AtomicU64,
}

impl Faults {
    fn drops(&self, way: Way) -> bool {
        let cut = match way {
            Way::Up => &self.up,
            Way::Down => &self.down,
        };
        if cut.load(Ordering::Relaxed) {
            return true;
        }
        let loss = self.loss.load(Ordering::Relaxed);
        if loss == 0 {
            return false;
        }
        (self.draw() % 1_000_000) < u64::from(loss)
    }

    fn draw(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x
    }

    /// How long the next packet waits, if at all.
    fn delay(&self) -> Option<std::time::Duration> {
        let base = self.delay_us.load(Ordering::Relaxed);
        let jitter = self.jitter_us.load(Ordering::Relaxed);
        if base == 0 && jitter == 0 {
            return None;
        }
        let extra = if jitter == 0 {
            0
        } else {
            self.draw() % (jitter + 1)
        };
        Some(std::time::Duration::from_micros(base + extra))
    }
}

/// Sends `packet` to `to` from `socket`, at once or after the relay's delay.
async fn forward(socket: &Arc<UdpSocket>, faults: &Faults, packet: &[u8], to: SocketAddr) {
    match faults.delay() {
        None => {
            let _ = socket.send_to(packet, to).await;
        }
        Some(wait) => {
            let (socket, packet) = (socket.clone(), packet.to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let _ = socket.send_to(&packet, to).await;
            });
        }
    }
}

pub struct Relay {
    addr: SocketAddr,
    faults: Arc<Faults>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let faults = Arc::new(Faults {
            rng: AtomicU64::new(u64::from(addr.port()) * 0x9e37_79b9 + 1),
            ..Faults::default()
        });
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let t1 = {
            let (front, back, faults, client) =
                (front.clone(), back.clone(), faults.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    if !faults.drops(Way::Up) {
                        forward(&back, &faults, &buf[..n], target).await;
                    }
                }
            })
        };
        let t2 = {
            let (front, back, faults, client) =
                (front.clone(), back.clone(), faults.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = back.recv_from(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        if !faults.drops(Way::Down) {
                            forward(&front, &faults, &buf[..n], to).await;
                        }
                    }
                }
            })
        };
        Relay {
            addr,
            faults,
            tasks: vec![t1, t2],
        }
    }

    /// Where the client should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every packet from now on.
    pub fn cut(&self) {
        self.cut_way(Way::Up);
        self.cut_way(Way::Down);
    }

    /// Drops every packet going `way` from now on; the other direction is unchanged.
    pub fn cut_way(&self, way: Way) {
        match way {
            Way::Up => self.faults.up.store(true, Ordering::Relaxed),
            Way::Down => self.faults.down.store(true, Ordering::Relaxed),
        }
    }

    /// Drops each packet, either way, with probability `p` (0 to 1) on top of any cut.
    pub fn set_loss(&self, p: f64) {
        let per_million = (p.clamp(0.0, 1.0) * 1_000_000.0) as u32;
        self.faults.loss.store(per_million, Ordering::Relaxed);
    }

    /// Delays every packet, either way, by `base` plus a random share of `jitter` (so packets
    /// overtake each other); zero for both forwards at once again.
    pub fn set_delay(&self, base: std::time::Duration, jitter: std::time::Duration) {
        let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.faults.delay_us.store(us(base), Ordering::Relaxed);
        self.faults.jitter_us.store(us(jitter), Ordering::Relaxed);
    }

    /// Forwards packets again, both ways, at once, and ends any loss.
    pub fn heal(&self) {
        self.faults.up.store(false, Ordering::Relaxed);
        self.faults.down.store(false, Ordering::Relaxed);
        self.faults.loss.store(0, Ordering::Relaxed);
        self.set_delay(std::time::Duration::ZERO, std::time::Duration::ZERO);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
