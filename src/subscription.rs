//! Change subscriptions: a stream of the changes a table applies on this node, in apply order.
//!
//! The table server is the only writer of a table, so it is the one place that sees every
//! change in order. Where it changes the store (a write, local or replicated; an expiry sweep;
//! the records of a node that went down; a join or a repair) it takes each record the store
//! stores (with the one it replaces) or removes from the store's own write path
//! (`crate::capture`) and turns it into a [`Change`], but only while someone is subscribed:
//! with no subscriber each of those places costs one atomic load.
//!
//! The changes go into one ring buffer per table (the change log), shared by every subscriber
//! of the table on this node and bounded by [`TableOptions::subscription_buffer`](crate::TableOptions::subscription_buffer). The server
//! never waits for a subscriber: a subscriber that falls more than the buffer behind gets an
//! [`Update::Lagged`] with the number of changes it missed, then the oldest change still kept.
//! Each change carries a [`Cursor`]; [`Table::subscribe_from`](crate::Table::subscribe_from) resumes after a cursor as long
//! as the log still holds the next change, and otherwise fails with [`Error::CursorExpired`](crate::Error::CursorExpired)
//! (then [`Table::subscribe_with_snapshot`](crate::Table::subscribe_with_snapshot) starts over from the current contents). The log
//! goes on for [`LOG_RETENTION`] after the last subscriber left (a subscriber that dropped its
//! stream resumes within that time), then is emptied; changes applied after that are not
//! logged, and a cursor taken before them is refused.
//!
//! A subscriber that lagged lost changes the log no longer holds, so it cannot resume from its
//! cursor: it takes a snapshot again. Resuming serves a consumer that stopped reading for a
//! while (restarted its task, lost its client connection) and comes back within the log.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use crate::membership::NodeId;
use crate::Result;

/// Changes kept per table for subscribers by default ([`TableOptions::subscription_buffer`](crate::TableOptions::subscription_buffer)).
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 16_384;

/// How long a table goes on logging its changes after its last subscriber left, so that a
/// subscriber that dropped its stream can resume from its cursor ([`Table::subscribe_from`](crate::Table::subscribe_from)).
pub const LOG_RETENTION: Duration = Duration::from_secs(30);

/// What changed in the table on this node.
///
/// In a bag, each object counts alone: adding one is an `Inserted` with no `previous`, and a
/// delete of a key is one `Deleted` per object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change<K, V> {
    /// A write stored `value` (a local or replicated insert), replacing `previous` if any.
    Inserted {
        /// The key.
        key: K,
        /// The value stored now.
        value: V,
        /// The value it replaced.
        previous: Option<V>,
    },
    /// A delete (or `delete_object`) removed the record.
    Deleted {
        /// The key.
        key: K,
        /// The value removed.
        previous: V,
    },
    /// The record expired ([`TableOptions::expire_after`](crate::TableOptions::expire_after)) and the table server removed it.
    Expired {
        /// The key.
        key: K,
        /// The value removed.
        value: V,
    },
    /// The record was dropped because its owner went down (the event's node).
    OwnerDown {
        /// The key.
        key: K,
        /// The value removed.
        value: V,
    },
    /// A join of two partitions stored `value`, replacing `previous` if any.
    Joined {
        /// The key.
        key: K,
        /// The value stored now.
        value: V,
        /// The value it replaced.
        previous: Option<V>,
    },
    /// A repair (anti-entropy between members) changed the record: `value: None` removed it.
    Repaired {
        /// The key.
        key: K,
        /// The value stored now, if any.
        value: Option<V>,
        /// The value before, if any.
        previous: Option<V>,
    },
}

impl<K, V> Change<K, V> {
    /// The key that changed.
    pub fn key(&self) -> &K {
        match self {
            Change::Inserted { key, .. }
            | Change::Deleted { key, .. }
            | Change::Expired { key, .. }
            | Change::OwnerDown { key, .. }
            | Change::Joined { key, .. }
            | Change::Repaired { key, .. } => key,
        }
    }

    /// The value the key holds after the change (for a bag: the object added), if any.
    pub fn value(&self) -> Option<&V> {
        match self {
            Change::Inserted { value, .. } | Change::Joined { value, .. } => Some(value),
            Change::Repaired { value, .. } => value.as_ref(),
            Change::Deleted { .. } | Change::Expired { .. } | Change::OwnerDown { .. } => None,
        }
    }
}

/// A position in a table's change log on one node: the change it follows. Resume after it
/// with [`Table::subscribe_from`](crate::Table::subscribe_from). Valid only on the node and table start that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    /// Random per table start: a cursor of another start is refused, never misread.
    stream: u64,
    /// Sequence number of the change (changes are numbered from 1).
    seq: u64,
}

impl Cursor {
    /// The change's sequence number on this node (it grows by one per change logged).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// One applied change and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<K, V> {
    /// Its position in the change log.
    pub cursor: Cursor,
    /// The node it came from: the writer of an insert or delete, the owner that went down,
    /// the coordinator of a join, the peer of a repair, this node for an expiry.
    pub node: NodeId,
    /// What changed.
    pub change: Change<K, V>,
}

/// An item of a [`Subscription`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update<K, V> {
    /// The next change.
    Change(Event<K, V>),
    /// The subscriber fell behind: this many changes left the log before it read them. The
    /// stream goes on with the oldest change still kept; a cache resynchronises with
    /// [`Table::subscribe_with_snapshot`](crate::Table::subscribe_with_snapshot).
    Lagged(u64),
}

/// A change as the log keeps it, in place in the ring (logging a change allocates nothing once
/// the ring is full: the slot of the oldest is reused), its node shared with the other changes
/// of that node, so that logging a change copies no name. A subscriber's read copies the change
/// out into an [`Event`].
struct Logged<K, V> {
    seq: u64,
    node: Arc<NodeId>,
    change: Change<K, V>,
}

/// Nodes whose identity the ring keeps for the changes it logs next: the writers of a table
/// are few, so a short list found by comparison saves a copy of the name per change.
const NODES_KEPT: usize = 8;

/// The ring of changes shared by the table server (writer) and the subscribers (readers).
struct Ring<K, V> {
    events: VecDeque<Logged<K, V>>,
    /// The sequence number the next change gets; the oldest kept is `next - events.len()`.
    next: u64,
    /// Recent nodes of logged changes ([`NODES_KEPT`]).
    nodes: Vec<Arc<NodeId>>,
}

impl<K, V> Ring<K, V> {
    /// The shared identity of `node`.
    fn node(&mut self, node: &NodeId) -> Arc<NodeId> {
        if let Some(n) = self.nodes.iter().find(|n| ***n == *node) {
            return n.clone();
        }
        if self.nodes.len() == NODES_KEPT {
            self.nodes.remove(0);
        }
        let n = Arc::new(node.clone());
        self.nodes.push(n.clone());
        n
    }
}

/// A table's change log on this node.
pub(crate) struct Hub<K, V> {
    stream: u64,
    capacity: usize,
    /// Live subscriptions; changed under the ring's lock, read without it by the server.
    subscribers: AtomicUsize,
    /// A change was applied and not logged (set by the server only).
    unlogged: AtomicBool,
    /// Until when (milliseconds after `born`, 0: not) changes are still logged after the last
    /// subscriber left, so that it can resume ([`LOG_RETENTION`]).
    retain_until: AtomicU64,
    born: Instant,
    /// `Ring::next`, readable without the lock (wake-ups).
    head: AtomicU64,
    /// Subscribers waiting for a change: with none, a change wakes nobody and skips `notify`.
    waiting: AtomicUsize,
    closed: AtomicBool,
    ring: Mutex<Ring<K, V>>,
    notify: Notify,
}

impl<K, V> Hub<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            stream: rand::random(),
            capacity: capacity.max(1),
            subscribers: AtomicUsize::new(0),
            unlogged: AtomicBool::new(false),
            retain_until: AtomicU64::new(0),
            born: Instant::now(),
            head: AtomicU64::new(1),
            waiting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                next: 1,
                nodes: Vec::new(),
            }),
            notify: Notify::new(),
        }
    }

    fn ring(&self) -> MutexGuard<'_, Ring<K, V>> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the server must build the changes it is about to apply: someone is subscribed,
    /// or the last subscriber left less than [`LOG_RETENTION`] ago. If not, the change goes
    /// unlogged, and cursors taken before it are refused later.
    #[inline]
    pub(crate) fn watching(&self) -> bool {
        if self.subscribers.load(Ordering::Relaxed) > 0 {
            return true;
        }
        self.retained()
    }

    #[cold]
    fn retained(&self) -> bool {
        let until = self.retain_until.load(Ordering::Relaxed);
        if until != 0 && self.now_ms() < until {
            return true;
        }
        if until != 0 || !self.unlogged.load(Ordering::Relaxed) {
            let mut ring = self.ring();
            if self.subscribers.load(Ordering::Relaxed) > 0 {
                return true;
            }
            self.retain_until.store(0, Ordering::Relaxed);
            self.unlogged.store(true, Ordering::Relaxed);
            ring.events = VecDeque::new();
        }
        false
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Logs changes that came from `node` (server only) and wakes the subscribers.
    pub(crate) fn publish(&self, node: &NodeId, changes: impl IntoIterator<Item = Change<K, V>>) {
        let mut changes = changes.into_iter().peekable();
        if changes.peek().is_none() {
            return;
        }
        {
            let mut ring = self.ring();
            let node = ring.node(node);
            for change in changes {
                let seq = ring.next;
                ring.next += 1;
                if ring.events.len() == self.capacity {
                    ring.events.pop_front();
                }
                let node = node.clone();
                ring.events.push_back(Logged { seq, node, change });
            }
            self.head.store(ring.next, Ordering::SeqCst);
        }
        // Either a subscriber that starts to wait is counted here, or it sees the new head
        // (both sides are sequentially consistent; see `Subscription::poll`).
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Registers a subscriber (server only, between two changes): the sequence number of
    /// the first change it reads. `after`: resume after this cursor, if the log still holds
    /// every change since.
    pub(crate) fn join(&self, after: Option<Cursor>) -> std::result::Result<u64, ()> {
        let mut ring = self.ring();
        if self.unlogged.swap(false, Ordering::Relaxed) {
            // Changes were applied that the log does not hold: older cursors must not resume
            // across them (a skipped number marks the hole).
            ring.events.clear();
            ring.next += 1;
            self.head.store(ring.next, Ordering::Release);
        }
        let start = match after {
            None => ring.next,
            Some(c) => {
                let oldest = ring.next - ring.events.len() as u64;
                if c.stream != self.stream || c.seq >= ring.next || c.seq + 1 < oldest {
                    return Err(());
                }
                c.seq + 1
            }
        };
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        Ok(start)
    }

    fn leave(&self) {
        let _ring = self.ring();
        if self.subscribers.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The log goes on for a while, for the subscriber to resume from its cursor; then
            // it is emptied by the next change (`retained`).
            let until = self
                .now_ms()
                .saturating_add(LOG_RETENTION.as_millis() as u64);
            self.retain_until.store(until, Ordering::Relaxed);
        }
    }

    /// The table stopped: subscriptions end once they have read what is logged.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// A copy of the change numbered `pos` (as an [`Event`]), or how many changes before the
    /// oldest kept it is.
    fn read(&self, pos: u64) -> Option<std::result::Result<Event<K, V>, u64>>
    where
        K: Clone,
        V: Clone,
    {
        let ring = self.ring();
        let oldest = ring.next - ring.events.len() as u64;
        if pos < oldest {
            return Some(Err(oldest - pos));
        }
        let logged = ring.events.get((pos - oldest) as usize)?;
        Some(Ok(Event {
            cursor: Cursor {
                stream: self.stream,
                seq: logged.seq,
            },
            node: NodeId::clone(&logged.node),
            change: logged.change.clone(),
        }))
    }
}

type Wait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One subscriber waiting for a change (`Hub::waiting`), for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A stream of the changes a table applies on this node ([`Table::subscribe`](crate::Table::subscribe)); implements
/// `futures_core::Stream`, and [`Subscription::recv`] reads it without any stream trait. It
/// ends when the table stops. Dropping it unsubscribes.
pub struct Subscription<K, V> {
    hub: Arc<Hub<K, V>>,
    /// The sequence number of the next change to read.
    pos: u64,
    wait: Option<Wait>,
}

impl<K, V> std::fmt::Debug for Subscription<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("cursor", &self.cursor())
            .finish()
    }
}

impl<K, V> Subscription<K, V> {
    /// A subscriber registered by `Hub::join` (the table server), reading from `pos`: from
    /// here on, dropping it unregisters it.
    pub(crate) fn new(hub: Arc<Hub<K, V>>, pos: u64) -> Self {
        Self {
            hub,
            pos,
            wait: None,
        }
    }

    /// The position of the last change this subscription returned (or, before the first, of
    /// the change before it): [`Table::subscribe_from`](crate::Table::subscribe_from) resumes from it.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            stream: self.hub.stream,
            seq: self.pos - 1,
        }
    }
}

impl<K: Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static> Subscription<K, V> {
    /// The next item; `None` once the table has stopped.
    pub async fn recv(&mut self) -> Option<Update<K, V>> {
        std::future::poll_fn(|cx| self.poll(cx)).await
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Update<K, V>>> {
        loop {
            match self.hub.read(self.pos) {
                Some(Ok(event)) => {
                    self.wait = None;
                    self.pos += 1;
                    return Poll::Ready(Some(Update::Change(event)));
                }
                Some(Err(missed)) => {
                    self.wait = None;
                    self.pos += missed;
                    return Poll::Ready(Some(Update::Lagged(missed)));
                }
                None if self.hub.closed.load(Ordering::Acquire) => return Poll::Ready(None),
                None => {}
            }
            let wait = self.wait.get_or_insert_with(|| {
                let (hub, pos) = (self.hub.clone(), self.pos);
                Box::pin(async move {
                    // Counted before the check of the head: `publish` stores the head, then
                    // reads the count, so it either wakes this wait or this check sees its change.
                    let _waiting = Waiting::new(&hub.waiting);
                    loop {
                        let notified = hub.notify.notified();
                        tokio::pin!(notified);
                        // Registered before the check, so a change published after it wakes us.
                        notified.as_mut().enable();
                        if hub.head.load(Ordering::SeqCst) > pos
                            || hub.closed.load(Ordering::Acquire)
                        {
                            return;
                        }
                        notified.await;
                    }
                })
            });
            match wait.as_mut().poll(cx) {
                Poll::Ready(()) => self.wait = None,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<K: Clone + Send + Sync + 'static, V: Clone + Send + Sync + 'static> futures_core::Stream
    for Subscription<K, V>
{
    type Item = Update<K, V>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll(cx)
    }
}

impl<K, V> Drop for Subscription<K, V> {
    fn drop(&mut self) {
        self.hub.leave();
    }
}

/// Where a new subscription starts.
pub(crate) enum Start {
    Now,
    Snapshot,
    After(Cursor),
}

/// A subscription request to the table server: it registers the subscriber between two
/// changes, so that a snapshot taken with it and the stream neither overlap nor leave a gap.
pub(crate) struct SubscribeReq<K, V> {
    pub from: Start,
    pub reply: oneshot::Sender<Result<Subscribed<K, V>>>,
}

/// A snapshot (empty unless asked for) and the subscription that follows it.
pub(crate) type Subscribed<K, V> = (Vec<(K, V)>, Subscription<K, V>);
