//! Admission of incoming connections: how many may be in their handshake at once.
//!
//! An incoming connection holds a task, QUIC state and a small buffer until its cookie handshake
//! ends (at most `handshake_timeout`): until then it may open no table stream and have at most
//! 64 KiB in flight to us (`transport::open_up` grants the rest). Unauthenticated, it must not
//! be able to multiply that cost without bound, nor crowd out the nodes of the cluster:
//!
//! - at most `max_handshakes` connections are in their handshake at once; beyond that new ones
//!   are refused at their first packet;
//! - past half of that, a connection whose source address is not yet validated is asked for a
//!   QUIC retry first (stateless for us), so forged source addresses cannot hold slots;
//! - once its QUIC handshake is done (its address proven), at most `max_handshakes_per_ip`
//!   connections from one IP may run the cookie handshake at once; one more is closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// What to do with a new incoming connection.
pub(crate) enum Admit {
    /// Go on; the slot is held until the guard is dropped.
    Yes(Slot),
    /// Ask the client to prove its address first.
    Retry,
    /// Too many handshakes in progress.
    Refuse,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// The handshake slots of one node.
#[derive(Clone)]
pub(crate) struct Admission {
    counts: Arc<Mutex<Counts>>,
    max: usize,
    per_ip: usize,
}

impl Admission {
    pub(crate) fn new(max: usize, per_ip: usize) -> Self {
        Self {
            counts: Arc::default(),
            max,
            per_ip,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides on a new connection, before its QUIC handshake.
    pub(crate) fn admit(&self, address_validated: bool, may_retry: bool) -> Admit {
        let mut c = self.lock();
        if c.total >= self.max {
            return Admit::Refuse;
        }
        if c.total >= self.max / 2 && !address_validated && may_retry {
            return Admit::Retry;
        }
        c.total += 1;
        Admit::Yes(Slot {
            admission: self.clone(),
            ip: None,
        })
    }
}

/// A handshake slot; dropping it frees it.
pub(crate) struct Slot {
    admission: Admission,
    ip: Option<IpAddr>,
}

impl Slot {
    /// Counts the slot against its (now validated) source IP; `false` if that IP already has
    /// `max_handshakes_per_ip` handshakes in progress.
    pub(crate) fn claim_ip(&mut self, ip: IpAddr) -> bool {
        let limit = self.admission.per_ip;
        let mut c = self.admission.lock();
        let n = c.per_ip.entry(ip).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        drop(c);
        self.ip = Some(ip);
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.admission.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.ip {
            if let Some(n) = c.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_freed() {
        let a = Admission::new(4, 1);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let Admit::Yes(mut s1) = a.admit(false, true) else {
            panic!("first is admitted")
        };
        assert!(s1.claim_ip(ip));
        let Admit::Yes(mut s2) = a.admit(false, true) else {
            panic!("second is admitted")
        };
        assert!(!s2.claim_ip(ip), "one per IP");
        assert!(matches!(a.admit(false, true), Admit::Retry), "half full");
        let Admit::Yes(_s3) = a.admit(true, true) else {
            panic!("validated is admitted")
        };
        let Admit::Yes(_s4) = a.admit(false, false) else {
            panic!("one that cannot retry is admitted")
        };
        assert!(matches!(a.admit(true, true), Admit::Refuse), "full");
        drop(s2);
        drop(s1);
        assert!(matches!(a.admit(true, true), Admit::Yes(_)));
        assert!(a.lock().per_ip.is_empty(), "no entry left for a freed IP");
        let Admit::Yes(mut s5) = a.admit(true, true) else {
            panic!()
        };
        assert!(s5.claim_ip(ip), "the IP's slot was freed");
    }
}
