//! Anti-entropy: members compare digests of what they hold and repair what differs
//! (ALGORITHM.md, section 15; the digest itself is in `crate::digest`).
//!
//! Every `anti_entropy_interval`, and in a few quick rounds after the view changes (a join, a
//! node down, a heal), a server sends each member `Digest { view, frontier, root, count }`.
//! The receiver compares only if it is not paused and its own view and frontier are equal to
//! the sender's: then both hold the result of the same writes, and any difference is one that
//! replication will never mend, not a write still in flight. If the roots differ, the member
//! with the smaller name narrows the difference down: its bucket list goes to the other, which
//! answers with the entries (key, stamp, owner, value hash) of the buckets that differ; the
//! smaller-named member decides each differing key and sends the repair, and the other answers
//! with the records it was asked for. Every step re-checks the views and frontiers, so a write
//! that arrives meanwhile cancels the round instead of being "repaired". A member whose
//! digests are never comparable (writes that never pause) is compared at a cut instead
//! (`cut.rs`).
//!
//! The decision, per key (per object in a bag):
//! - both hold it in different versions: each sends its version, and each side stores the
//!   other's by the rule of a replicated write (newer stamp, then owner, then value), so both
//!   keep the winner;
//! - one side only holds it: the record's owner decides. If the owner is the side that holds
//!   it, the record is copied; if the owner is the side that lacks it (it deleted the record,
//!   or never had it), the other drops that version. A record owned by a third member is left
//!   to the comparisons of each side with that owner. A tombstone still held for the key that
//!   is newer than the record also drops it.

use super::*;
use crate::digest;
use crate::proto::{AeMsg, Frontier};

mod compare;
mod cut;
mod decide;
mod repair;
#[cfg(feature = "testing")]
mod testing;
#[cfg(feature = "testing")]
pub(crate) use testing::TestWrite;

/// Quick rounds after a change of the view, this far apart (or `anti_entropy_interval`, if
/// shorter): the members change their views at slightly different moments.
const QUICK_ROUND: Duration = Duration::from_millis(250);
const QUICK_ROUNDS: u32 = 4;
/// Records (objects) whose entries one round lists at most, on either side: about 3 MB on the
/// wire and in memory. A larger difference is repaired over several rounds, bucket by bucket.
const MAX_ENTRIES: u64 = 100_000;

/// What anti-entropy knows of one member.
#[derive(Debug, Clone)]
pub(super) struct PeerAe {
    id: NodeId,
    /// The `seq` of the member's last write batch this server processed (from its batches, or
    /// announced in its anti-entropy messages, which travel behind them).
    heard: u64,
    compared: u64,
    last: Option<Instant>,
    matches: bool,
    differences: u64,
    repaired: u64,
    /// When this server last asked the member for the entries of differing buckets.
    narrowing: Option<Instant>,
}

/// The anti-entropy state of a table server.
pub(super) struct AntiEntropy {
    pub(super) interval: Option<Duration>,
    next_round: Instant,
    quick: u32,
    last_view: u64,
    rounds: u64,
    /// Bytes of anti-entropy frames queued to members.
    bytes: u64,
    peers: HashMap<OwnerIdx, PeerAe>,
    /// Comparisons at a cut, by member (`cut.rs`).
    pub(super) cuts: HashMap<OwnerIdx, cut::Cut>,
    /// Whether digests are compared as they are; only tests turn it off
    /// (`Table::testing_compare_at_rest`).
    at_rest: bool,
}

impl AntiEntropy {
    pub(super) fn new(interval: Option<Duration>) -> Self {
        Self {
            interval,
            next_round: Instant::now(),
            quick: 0,
            last_view: 0,
            rounds: 0,
            bytes: 0,
            peers: HashMap::new(),
            cuts: HashMap::new(),
            at_rest: true,
        }
    }
}

impl<K: Key, V: Value> Server<K, V> {
    fn ae_peer(&mut self, key: OwnerIdx) -> Option<&mut PeerAe> {
        let id = self.peers.id_of(key)?;
        let fresh = || PeerAe {
            id: id.clone(),
            heard: 0,
            compared: 0,
            last: None,
            matches: false,
            differences: 0,
            repaired: 0,
            narrowing: None,
        };
        let p = self.ae.peers.entry(key).or_insert_with(fresh);
        if p.id != *id {
            // The index now names another node: start over.
            *p = fresh();
        }
        Some(p)
    }

    /// A write batch `seq` of member `key` was applied.
    pub(super) fn ae_heard(&mut self, key: OwnerIdx, seq: u64) {
        if self.ae.interval.is_none() {
            return;
        }
        if let Some(p) = self.ae_peer(key) {
            p.heard = p.heard.max(seq);
        }
    }

    /// This server's frontier: its own last batch and the last batch of each member it applied.
    fn frontier(&self) -> Frontier {
        let mut f: Frontier = vec![(self.me.clone(), self.commit.seq())];
        for (k, l) in self.peers.member_links() {
            let heard = self
                .ae
                .peers
                .get(&k)
                .filter(|p| p.id == *l.id())
                .map_or(0, |p| p.heard);
            f.push((l.id().clone(), heard));
        }
        f.sort();
        f
    }

    /// Whether a message sent with this view and frontier describes the same writes as this
    /// server holds now: only then is a difference a divergence.
    fn comparable(&self, view: u64, frontier: &Frontier) -> bool {
        !self.pause.is_paused() && view == self.view() && *frontier == self.frontier()
    }

    /// Called at every tick: starts a round when one is due.
    pub(super) fn ae_tick(&mut self, now: Instant) {
        let Some(interval) = self.ae.interval else {
            return;
        };
        let view = self.view();
        if view != self.ae.last_view {
            self.ae.last_view = view;
            self.ae.quick = QUICK_ROUNDS;
            self.ae.next_round = now;
        }
        if now < self.ae.next_round || self.pause.is_paused() {
            return;
        }
        let gap = if self.ae.quick > 0 {
            self.ae.quick -= 1;
            QUICK_ROUND.min(interval)
        } else {
            interval
        };
        self.ae.next_round = now + gap;
        let links = &self.peers;
        self.ae.peers.retain(|&k, p| links.id_of(k) == Some(&p.id));
        self.ae.cuts.retain(|&k, _| links.is_linked(k));
        if !self.peers.has_members() {
            return;
        }
        self.ae.rounds += 1;
        let (root, count) = self.shared.store.digest.root();
        let msg = PeerMsg::<K, V>::AntiEntropy(AeMsg::Digest {
            view,
            frontier: self.frontier(),
            root,
            count,
        });
        if let Ok(f) = frame::encode(&msg) {
            for (_, l) in self.peers.member_links().filter(|(_, l)| l.ready()) {
                if l.queue(f.clone()) {
                    self.ae.bytes += f.len() as u64;
                }
            }
        }
    }

    /// Queues an anti-entropy message to a member, and counts its bytes.
    pub(super) fn ae_send(&mut self, key: OwnerIdx, msg: AeMsg<K, V>) {
        let Some(link) = self.peers.get(key) else {
            return;
        };
        match frame::encode(&PeerMsg::AntiEntropy(msg)) {
            // A frame past the peer's limit would close the connection: a table whose
            // `max_frame_size` cannot carry the 16 KiB of buckets is not narrowed down.
            Ok(f) if f.len() > self.config.max_frame_size => {
                tracing::debug!(
                    bytes = f.len(),
                    "anti-entropy message over max_frame_size; not sent"
                );
            }
            Ok(f) => {
                let n = f.len() as u64;
                if link.queue(f) {
                    self.ae.bytes += n;
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode an anti-entropy message"),
        }
    }

    pub(super) fn on_ae(&mut self, key: OwnerIdx, msg: AeMsg<K, V>) {
        if self.ae.interval.is_none() || !self.peers.is_member(key) {
            return;
        }
        let Some(peer) = self.peers.id_of(key).cloned() else {
            return;
        };
        // Its own last batch, as it announces it: everything before it was sent ahead.
        if let AeMsg::Digest { frontier, .. }
        | AeMsg::Buckets { frontier, .. }
        | AeMsg::Entries { frontier, .. } = &msg
        {
            if let Some(&(_, seq)) = frontier.iter().find(|(id, _)| *id == peer) {
                self.ae_heard(key, seq);
            }
        }
        match msg {
            AeMsg::Digest {
                view,
                frontier,
                root,
                count,
            } => self.ae_on_digest(key, &peer, view, frontier, (root, count)),
            AeMsg::Buckets {
                view,
                frontier,
                buckets,
            } => self.ae_on_buckets(key, view, frontier, buckets),
            AeMsg::Entries {
                view,
                frontier,
                buckets,
                owners,
                entries,
            } => {
                if let Some(p) = self.ae_peer(key) {
                    p.narrowing = None;
                }
                if self.comparable(view, &frontier) {
                    self.ae_decide(key, &peer, &buckets, &owners, entries, None);
                }
            }
            AeMsg::CutBuckets {
                view,
                buckets,
                prefer,
            } => self.ae_on_cut_buckets(key, view, buckets, prefer),
            AeMsg::CutEntries {
                view,
                stable,
                seen,
                buckets,
                owners,
                entries,
            } => {
                let stamps = cut::CutStamps { stable, seen };
                self.ae_on_cut_entries(key, &peer, view, stamps, buckets, owners, entries);
            }
            AeMsg::Repair {
                owners,
                records,
                remove,
                want,
                answer,
            } => self.ae_on_repair(key, &peer, owners, records, remove, (want, answer)),
        }
    }

    /// The anti-entropy part of the status report.
    pub(super) fn ae_status(&self) -> Option<digest::AntiEntropyStatus> {
        self.ae.interval?;
        let (root, records) = self.shared.store.digest.root();
        let mut peers: Vec<digest::PeerDigest> = self
            .peers
            .member_links()
            .map(|(k, l)| {
                let p = self.ae.peers.get(&k).filter(|p| p.id == *l.id());
                digest::PeerDigest {
                    node: l.id().name.clone(),
                    rounds: p.map_or(0, |p| p.compared),
                    last_round: p.and_then(|p| p.last).map(|t| t.elapsed()),
                    matches: p.is_some_and(|p| p.matches),
                    differences: p.map_or(0, |p| p.differences),
                    repaired: p.map_or(0, |p| p.repaired),
                    rounds_at_cut: self.ae_cut_rounds(k, l.id()),
                }
            })
            .collect();
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        Some(digest::AntiEntropyStatus {
            digest: root,
            records,
            rounds: self.ae.rounds,
            bytes_sent: self.ae.bytes,
            in_sync: peers.iter().all(|p| p.matches),
            peers,
        })
    }
}
