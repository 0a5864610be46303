//! User callbacks (conflict handler, `on_node_down`, owner function) run inside the table's
//! server or a join task. A panic in one must not take those with it: a dead table server
//! stops the table on this node, and a join task that dies never reports its end, so its pair
//! stays marked as joining and is never joined again. Each call is therefore caught here,
//! logged with the table and the key (or node), and turned into an error for that one call
//! or join.

use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::{Error, Result};

/// Runs `f`, a user callback named `callback`, for `subject` (a key or a node) of `table`.
/// A panic is logged and returned as [`Error::Callback`].
///
/// `AssertUnwindSafe`: what the callback can see is borrowed for the call only (a key, values,
/// a slice of records), and nothing of the caller's state is left half-changed across it.
pub(crate) fn guarded<R>(
    table: &str,
    callback: &'static str,
    subject: &dyn Debug,
    f: impl FnOnce() -> R,
) -> Result<R> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let reason = panic_message(payload.as_ref());
        tracing::error!(table, callback, subject = ?subject, %reason, "a user callback panicked");
        Error::Callback {
            table: table.to_string(),
            callback,
            reason: format!("{reason} (for {subject:?})"),
        }
    })
}

/// The text of a panic's payload (what `panic!` was given), if it has one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_and_a_return_passes() {
        assert_eq!(guarded("t", "owner", &1, || 5).unwrap(), 5);
        let e = guarded("t", "owner", &"k", || -> u32 { panic!("boom {}", 7) }).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("boom 7") && text.contains("owner") && text.contains("\"k\""),
            "{text}"
        );
    }
}
