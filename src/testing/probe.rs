//! [`ProbeBackend`]: a persistence backend that passes every call to another one, counts the
//! log appends that reach it, and can make them fail or wait (tests and benches only).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::persistence::{LogContents, Persistence};
use crate::{Error, Result};

/// Makes the error a failing append returns, from the table's name.
type MakeError = Arc<dyn Fn(&str) -> Error + Send + Sync>;

/// A backend that passes every call to `inner`, with probes on the log appends: how many
/// reached it ([`ProbeBackend::appends`]), appends that fail with an error of the test's
/// choosing ([`ProbeBackend::fail_appends`]) and appends held until released
/// ([`ProbeBackend::hold_appends`]). Clones share the probes. For tests and benches only; not
/// a stable API.
pub struct ProbeBackend<P> {
    inner: Arc<P>,
    appends: Arc<AtomicU64>,
    fail: Arc<Mutex<Option<MakeError>>>,
    hold: Arc<watch::Sender<bool>>,
}

impl<P> Clone for ProbeBackend<P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            appends: self.appends.clone(),
            fail: self.fail.clone(),
            hold: self.hold.clone(),
        }
    }
}

impl<P: Persistence> ProbeBackend<P> {
    /// Passes every call to `inner`; no append fails or waits until told.
    pub fn new(inner: P) -> Self {
        Self {
            inner: Arc::new(inner),
            appends: Arc::default(),
            fail: Arc::default(),
            hold: Arc::new(watch::channel(false).0),
        }
    }

    /// Log appends that reached this backend so far (each one fsync of the directory
    /// backend), counted as they start.
    pub fn appends(&self) -> u64 {
        self.appends.load(Ordering::Relaxed)
    }

    /// From now on, every log append fails with the error `error` makes from the table's name
    /// (without reaching `inner`); `None`: appends work again.
    pub fn fail_appends(&self, error: Option<fn(&str) -> Error>) {
        let make = error.map(|f| Arc::new(f) as MakeError);
        *self.fail.lock().unwrap_or_else(|p| p.into_inner()) = make;
    }

    /// While `on`, log appends (counted as they arrive) wait before reaching `inner`.
    pub fn hold_appends(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

#[async_trait]
impl<P: Persistence> Persistence for ProbeBackend<P> {
    async fn save(&self, table: &str, blocks: Vec<Vec<u8>>) -> Result<u64> {
        self.inner.save(table, blocks).await
    }
    async fn load(&self, table: &str) -> Result<Option<Vec<Vec<u8>>>> {
        self.inner.load(table).await
    }
    fn has_log(&self) -> bool {
        self.inner.has_log()
    }
    async fn log_append(&self, table: &str, entries: Vec<Vec<u8>>) -> Result<u64> {
        self.appends.fetch_add(1, Ordering::Relaxed);
        let mut held = self.hold.subscribe();
        // The sender lives in `self`: the wait ends only when the hold is released.
        let _ = held.wait_for(|on| !*on).await;
        let fail = self.fail.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(make) = fail {
            return Err(make(table));
        }
        self.inner.log_append(table, entries).await
    }
    async fn log_cut(&self, table: &str) -> Result<u64> {
        self.inner.log_cut(table).await
    }
    async fn log_drop(&self, table: &str, mark: u64) -> Result<u64> {
        self.inner.log_drop(table, mark).await
    }
    async fn log_load(&self, table: &str) -> Result<Vec<Vec<u8>>> {
        self.inner.log_load(table).await
    }
    async fn log_recover(&self, table: &str) -> Result<LogContents> {
        self.inner.log_recover(table).await
    }
    async fn set_aside(&self, table: &str) -> Result<()> {
        self.inner.set_aside(table).await
    }
}
