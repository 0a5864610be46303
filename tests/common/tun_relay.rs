//! A userspace relay that delays every IP packet routed through a network namespace: the
//! kernel has no netem, so delay is added here. Used by tests/multi_host.rs only (it includes
//! this file by path), which runs it as a child process inside its router namespace.
//!
//! The router namespace forwards every packet that arrives from a node's veth to a TUN device
//! (policy routing: whatever does not come from the TUN device is routed into it); this relay
//! reads each packet from the device, holds it for the delay (a base plus a random share of the
//! jitter, so packets also overtake each other) and writes it back; the kernel then routes it to
//! the destination node's veth. Node addresses stay the real ones both ways, so a node that
//! dials back the address a peer dialed it from reaches that peer through the relay too.
//!
//! Line protocol on stdin: `delay <base µs> <jitter µs>` (answered `delay ok`). The relay
//! prints `relay ready` once the device is attached, and ends when stdin closes.

use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// `_IOW('T', 202, int)` from linux/if_tun.h.
const TUNSETIFF: u64 = 0x4004_54ca;
const IFF_TUN: i16 = 0x0001;
const IFF_NO_PI: i16 = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, the flags, padding to its full size.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Attaches to the TUN device `name` (made beforehand with `ip tuntap add`), without packet
/// information: every read is one IP packet, every write sends one.
pub fn open_tun(name: &str) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TUN | IFF_NO_PI,
        _pad: [0; 22],
    };
    let bytes = name.as_bytes();
    assert!(bytes.len() < 16, "interface name too long");
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out in full.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// The delay each packet gets, changed at run time.
#[derive(Default)]
struct Delay {
    base_us: AtomicU64,
    jitter_us: AtomicU64,
}

/// A packet waiting for its time; the heap pops the earliest first.
struct Held {
    due: Instant,
    seq: u64,
    packet: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// Runs the relay on `tun` until stdin closes: a reader thread stamps each packet with its
/// due time, a writer thread sends it back when due, and this thread reads commands.
pub fn run(tun: File) {
    let tun = Arc::new(tun);
    let delay = Arc::new(Delay::default());
    let (tx, rx) = mpsc::channel::<Held>();
    {
        let (tun, delay) = (tun.clone(), delay.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
            let mut seq = 0u64;
            loop {
                let n = match (&*tun).read(&mut buf) {
                    Ok(n) => n,
                    Err(_) => return,
                };
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let base = delay.base_us.load(Ordering::Relaxed);
                let jitter = delay.jitter_us.load(Ordering::Relaxed);
                let extra = if jitter == 0 { 0 } else { rng % (jitter + 1) };
                seq += 1;
                let held = Held {
                    due: Instant::now() + Duration::from_micros(base + extra),
                    seq,
                    packet: buf[..n].to_vec(),
                };
                if tx.send(held).is_err() {
                    return;
                }
            }
        });
    }
    {
        let tun = tun.clone();
        std::thread::spawn(move || {
            let mut heap: BinaryHeap<Held> = BinaryHeap::new();
            loop {
                let now = Instant::now();
                while heap.peek().is_some_and(|h| h.due <= now) {
                    if let Some(h) = heap.pop() {
                        // A write error (no route, a full queue) drops the packet, as a link would.
                        let _ = (&*tun).write(&h.packet);
                    }
                }
                let next = match heap.peek() {
                    Some(h) => rx.recv_timeout(h.due.saturating_duration_since(now)),
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match next {
                    Ok(h) => heap.push(h),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
    }
    println!("relay ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { return };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["delay", base, jitter] => {
                let base: u64 = base.parse().unwrap_or(0);
                let jitter: u64 = jitter.parse().unwrap_or(0);
                delay.base_us.store(base, Ordering::Relaxed);
                delay.jitter_us.store(jitter, Ordering::Relaxed);
                println!("delay ok");
            }
            _ => println!("err unknown command {line:?}"),
        }
    }
}
