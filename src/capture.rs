//! The changes of a table's store, as its write path makes them, for subscribers
//! (`crate::subscription`).
//!
//! Every change of the store goes through `crate::digest::Records`, whose hook hears each
//! record stored (with the record it replaced) and each record removed. While the table server
//! captures (someone is subscribed, or the change log is kept for a subscriber to resume), the
//! hook also keeps those as [`Step`]s; the server takes them after the change and logs them
//! under its cause (`server/notify.rs`). A change thus costs no lookup of its key before or
//! after: the write already holds the record it replaces. With nobody subscribed, a write
//! costs one relaxed load here.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::types::{same_value, Rec};

/// One record (or bag object) stored or removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step<K, V> {
    /// `value` was stored under `key`, replacing `previous` (a set's or ordered_set's record;
    /// always `None` for a bag object, which replaces nothing).
    Stored {
        key: K,
        previous: Option<V>,
        value: V,
    },
    /// The record (bag object) `previous` of `key` was removed.
    Removed { key: K, previous: V },
}

/// The steps captured since the table server started capturing.
pub(crate) struct Capture<K, V> {
    /// Whether the hook keeps steps (set and read by the table server only).
    on: AtomicBool,
    steps: Mutex<Vec<Step<K, V>>>,
}

impl<K, V> Default for Capture<K, V> {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            steps: Mutex::new(Vec::new()),
        }
    }
}

impl<K, V> Capture<K, V> {
    fn steps(&self) -> MutexGuard<'_, Vec<Step<K, V>>> {
        self.steps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts capturing; false if a capture is already under way (a change within a change
    /// is reported with the outer one).
    pub(crate) fn start(&self) -> bool {
        !self.on.swap(true, Ordering::Relaxed)
    }

    /// Stops capturing and returns the steps, in the order the store made them.
    pub(crate) fn take(&self) -> Vec<Step<K, V>> {
        self.on.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.steps())
    }

    /// Where one store call puts its steps, if capturing: the lock is taken once per call.
    #[inline]
    pub(crate) fn sink(&self) -> Option<Sink<'_, K, V>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        Some(Sink(RefCell::new(self.steps())))
    }
}

/// The captured steps, held by one store call (`crate::digest::Hook`).
pub(crate) struct Sink<'a, K, V>(RefCell<MutexGuard<'a, Vec<Step<K, V>>>>);

impl<K: Clone, V: Clone + Serialize> Sink<'_, K, V> {
    /// `new` was stored under `k` in place of `old`. A record stored again as it was (same
    /// stamp, owner and value: a join or repair that found it already here) changes nothing.
    #[inline]
    pub(crate) fn stored(&self, k: &K, old: Option<&Rec<V>>, new: &Rec<V>) {
        if let Some(o) = old {
            if (o.ts, o.owner) == (new.ts, new.owner) && same_value(&o.value, &new.value) {
                return;
            }
        }
        self.0.borrow_mut().push(Step::Stored {
            key: k.clone(),
            previous: old.map(|r| r.value.clone()),
            value: new.value.clone(),
        });
    }

    /// The record `r` of `k` was removed.
    #[inline]
    pub(crate) fn removed(&self, k: &K, r: &Rec<V>) {
        self.0.borrow_mut().push(Step::Removed {
            key: k.clone(),
            previous: r.value.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_kept_only_while_capturing_and_in_order() {
        let c: Capture<u32, u32> = Capture::default();
        assert!(c.sink().is_none());
        assert!(c.start());
        assert!(!c.start(), "a capture within a capture joins the outer one");
        {
            let s = c.sink().unwrap();
            s.stored(&1, None, &Rec::new(10, 5, 0));
            s.stored(&1, Some(&Rec::new(10, 5, 0)), &Rec::new(11, 6, 0));
            // The same record again: no change.
            s.stored(&1, Some(&Rec::new(11, 6, 0)), &Rec::new(11, 6, 0));
            s.removed(&1, &Rec::new(11, 6, 0));
        }
        assert_eq!(
            c.take(),
            vec![
                Step::Stored {
                    key: 1,
                    previous: None,
                    value: 10
                },
                Step::Stored {
                    key: 1,
                    previous: Some(10),
                    value: 11
                },
                Step::Removed {
                    key: 1,
                    previous: 11
                },
            ]
        );
        assert!(c.sink().is_none());
        assert!(c.take().is_empty());
    }
}
