//! A link's outbound queue: the frames a table server has queued for one peer's table stream,
//! bounded in bytes.
//!
//! The table server never waits for a peer, so it cannot apply back-pressure to one: a peer
//! that stops reading (QUIC flow control then holds the stream's writer task) would otherwise
//! make the queue grow with every write, tick and join reply addressed to it. Instead each
//! queue counts the bytes it holds, from the moment a frame is queued until the writer task has
//! handed it to QUIC, and refuses a frame that would take it past
//! [`NodeConfig::max_link_queue_bytes`](crate::NodeConfig::max_link_queue_bytes). The table
//! server then closes the connection to that peer (`close::OVERLOAD`).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

/// Byte count and state shared by both ends of one queue.
#[derive(Debug)]
struct Shared {
    queued: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    /// Woken each time the writer task hands frames to QUIC (`Outbox::room`).
    drained: tokio::sync::Notify,
}

/// The table server's end of a link's queue. A join coordinator holds a copy to renew its
/// lease without waiting for the table server (`join::Lease`).
#[derive(Debug, Clone)]
pub(crate) struct Outbox {
    tx: mpsc::UnboundedSender<Bytes>,
    shared: Arc<Shared>,
}

/// The writer task's end of a link's queue.
#[derive(Debug)]
pub(crate) struct OutboxReceiver {
    rx: mpsc::UnboundedReceiver<Bytes>,
    shared: Arc<Shared>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// This frame would take the queue past its limit (reported once per queue): the
    /// connection to the peer must be closed.
    Overflow {
        /// Bytes queued and not yet written.
        queued: usize,
    },
    /// The queue overflowed before, or its writer task ended: nothing is queued any more.
    Closed,
}

/// A queue holding at most `limit` bytes of frames at once.
pub(crate) fn outbox(limit: usize) -> (Outbox, OutboxReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        limit,
        overflowed: AtomicBool::new(false),
        drained: tokio::sync::Notify::new(),
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        OutboxReceiver { rx, shared },
    )
}

impl Outbox {
    /// Queues `frame`, unless it would take the queue past its limit. The first refusal is an
    /// `Overflow`; every later frame is refused as `Closed`, so the queue never resumes in the
    /// middle of what the peer should have received.
    pub(crate) fn send(&self, frame: Bytes) -> Result<(), Refused> {
        if self.shared.overflowed.load(Ordering::Relaxed) {
            return Err(Refused::Closed);
        }
        let len = frame.len();
        let queued = self.shared.queued.fetch_add(len, Ordering::Relaxed);
        if queued.saturating_add(len) > self.shared.limit {
            self.shared.queued.fetch_sub(len, Ordering::Relaxed);
            self.shared.overflowed.store(true, Ordering::Relaxed);
            return Err(Refused::Overflow { queued });
        }
        self.tx.send(frame).map_err(|_| {
            self.shared.queued.fetch_sub(len, Ordering::Relaxed);
            Refused::Closed
        })
    }

    /// Whether the queue overflowed, or its writer task ended: no frame will be queued again.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed) || self.tx.is_closed()
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Waits until `len` more bytes keep the queue at or under half its limit (or it is empty),
    /// so that bulk data (a join's dump, its chunks to apply) flows as fast as the peer reads
    /// while the other half stays free for writes, acks and ticks. False once the queue is
    /// closed.
    pub(crate) async fn room(&self, len: usize) -> bool {
        let high = self.shared.limit / 2;
        loop {
            let drained = self.shared.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.is_closed() {
                return false;
            }
            let queued = self.queued();
            if queued == 0 || queued.saturating_add(len) <= high {
                return true;
            }
            drained.await;
        }
    }
}

impl OutboxReceiver {
    /// The next frame; `None` once the table server dropped its end and all was taken.
    pub(crate) async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// The next frame if one is queued now.
    pub(crate) fn try_recv(&mut self) -> Option<Bytes> {
        self.rx.try_recv().ok()
    }

    /// Frames of `bytes` bytes in all were handed to QUIC: they no longer count.
    pub(crate) fn written(&self, bytes: usize) {
        self.shared.queued.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.drained.notify_waiters();
    }

    /// The queue overflowed: what it still holds will not be written.
    pub(crate) fn overflowed(&self) -> bool {
        self.shared.overflowed.load(Ordering::Relaxed)
    }
}

impl Drop for OutboxReceiver {
    /// The writer task ended: whoever waits for room learns that the queue is closed.
    fn drop(&mut self) {
        self.rx.close();
        self.shared.drained.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_queue_holds_at_most_its_limit_and_closes_at_the_first_overflow() {
        let (out, mut rx) = outbox(10);
        assert_eq!(out.send(Bytes::from_static(b"1234")), Ok(()));
        assert_eq!(out.send(Bytes::from_static(b"567890")), Ok(()));
        assert_eq!(out.queued(), 10);
        assert_eq!(
            out.send(Bytes::from_static(b"x")),
            Err(Refused::Overflow { queued: 10 })
        );
        assert!(rx.overflowed());
        // Written bytes make room, but an overflowed queue stays closed.
        let first = rx.recv().await.unwrap();
        rx.written(first.len());
        assert_eq!(out.queued(), 6);
        assert_eq!(out.send(Bytes::from_static(b"x")), Err(Refused::Closed));
    }

    #[tokio::test]
    async fn written_frames_make_room() {
        let (out, mut rx) = outbox(8);
        for _ in 0..100 {
            out.send(Bytes::from_static(b"12345678")).unwrap();
            let f = rx.try_recv().unwrap();
            rx.written(f.len());
        }
        assert_eq!(out.queued(), 0);
        assert!(out.room(8).await);
        drop(rx);
        assert!(!out.room(8).await);
        assert_eq!(out.send(Bytes::from_static(b"1")), Err(Refused::Closed));
    }

    #[tokio::test]
    async fn bulk_waits_for_the_writer_to_drain_half_the_queue() {
        let (out, mut rx) = outbox(16);
        out.send(Bytes::from_static(b"12345678")).unwrap();
        let waiter = {
            let out = out.clone();
            tokio::spawn(async move { out.room(4).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "8 + 4 bytes are over half of 16");
        let f = rx.recv().await.unwrap();
        rx.written(f.len());
        assert!(waiter.await.unwrap());
    }
}
