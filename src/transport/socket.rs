//! The node's UDP socket, wrapped so that `Node::shutdown` can close it.
//!
//! quinn keeps its socket for as long as anything refers to the endpoint: an `Endpoint` handle
//! (the node holds one for as long as the program holds a `Node` clone), a connection handle,
//! a connection still draining after its close. So the port of a node that shut down stayed
//! bound while the program held any of them, and a node could not start again on the same
//! address in the same process (`AddrInUse`). This wrapper owns the file descriptor itself:
//! [`ClosableSocket::close`] drops it at once, whoever still refers to the endpoint. After
//! that, datagrams sent are dropped as if lost, and nothing is received.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;

/// The open socket: tokio's for readiness, quinn-udp's state for GSO/GRO and ECN.
#[derive(Debug)]
struct Open {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
}

/// A UDP socket for quinn that the node can close (see the module documentation).
pub(crate) struct ClosableSocket {
    open: RwLock<Option<Open>>,
    addr: SocketAddr,
}

impl fmt::Debug for ClosableSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClosableSocket")
            .field("addr", &self.addr)
            .field("open", &self.is_open())
            .finish()
    }
}

impl ClosableSocket {
    /// Wraps a bound socket. Must run inside a Tokio runtime.
    pub(crate) fn new(socket: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        let addr = socket.local_addr()?;
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        let io = tokio::net::UdpSocket::from_std(socket)?;
        Ok(Arc::new(Self {
            open: RwLock::new(Some(Open { io, state })),
            addr,
        }))
    }

    /// Closes the socket now: its port is free when this returns.
    pub(crate) fn close(&self) {
        let open = self.open.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(open);
    }

    fn is_open(&self) -> bool {
        self.open
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn with_open<R>(&self, closed: R, f: impl FnOnce(&Open) -> R) -> R {
        match &*self.open.read().unwrap_or_else(|p| p.into_inner()) {
            Some(open) => f(open),
            None => closed,
        }
    }
}

impl AsyncUdpSocket for ClosableSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller(self))
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // Closed: the datagram is dropped, as the network may drop any.
        self.with_open(Ok(()), |o| {
            o.io.try_io(Interest::WRITABLE, || {
                o.state.send((&o.io).into(), transmit)
            })
        })
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Closed: nothing arrives any more (and nothing will wake this poll).
        self.with_open(Poll::Pending, |o| loop {
            ready!(o.io.poll_recv_ready(cx))?;
            if let Ok(n) = o.io.try_io(Interest::READABLE, || {
                o.state.recv((&o.io).into(), bufs, meta)
            }) {
                return Poll::Ready(Ok(n));
            }
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn may_fragment(&self) -> bool {
        self.with_open(true, |o| o.state.may_fragment())
    }

    fn max_transmit_segments(&self) -> usize {
        self.with_open(1, |o| o.state.max_gso_segments())
    }

    fn max_receive_segments(&self) -> usize {
        self.with_open(1, |o| o.state.gro_segments())
    }
}

/// Tells quinn when the socket can take another datagram.
struct Poller(Arc<ClosableSocket>);

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Poller")
    }
}

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        // Closed: always "writable", and every send is dropped.
        self.0
            .with_open(Poll::Ready(Ok(())), |o| o.io.poll_send_ready(cx))
    }
}
