//! A tracing layer that keeps the library's log events, so a test can wait for a step that
//! nothing else shows (a stream stopped or routed inside a node).
#![allow(dead_code)]

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The events of `cets` logged so far in this test binary: each one's message and its other
/// fields, by name.
#[derive(Clone)]
pub struct Logs(Arc<Mutex<Vec<Line>>>);

impl Logs {
    /// Whether an event with this message was logged with every one of `fields`, given as
    /// `("name", "value")`; a value ending in `*` matches any value with that prefix.
    pub fn has(&self, message: &str, fields: &[(&str, &str)]) -> bool {
        self.count(message, fields) > 0
    }

    /// How many events with this message were logged with every one of `fields` (as `has`).
    pub fn count(&self, message: &str, fields: &[(&str, &str)]) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.is(message, fields))
            .count()
    }

    /// How many events match `message` and `fields` after the first event that matches
    /// `after` (its message and fields); `None` while no event matches `after`.
    pub fn count_after(
        &self,
        after: (&str, &[(&str, &str)]),
        message: &str,
        fields: &[(&str, &str)],
    ) -> Option<usize> {
        let lines = self.0.lock().unwrap();
        let first = lines.iter().position(|l| l.is(after.0, after.1))?;
        Some(
            lines[first + 1..]
                .iter()
                .filter(|l| l.is(message, fields))
                .count(),
        )
    }
}

impl Line {
    /// Whether this event has the message and every one of `fields` (as `Logs::has`).
    fn is(&self, message: &str, fields: &[(&str, &str)]) -> bool {
        self.message == message
            && fields.iter().all(|(name, want)| {
                self.fields.iter().any(|(n, v)| {
                    n == name
                        && match want.strip_suffix('*') {
                            Some(prefix) => v.starts_with(prefix),
                            None => v == want,
                        }
                })
            })
    }
}

struct Capture(Logs);

#[derive(Default)]
pub struct Line {
    message: String,
    fields: Vec<(String, String)>,
}

impl Visit for Line {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.fields
                .push((field.name().to_string(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        self.0 .0.lock().unwrap().push(line);
    }
}

/// Installs the capture (once per test binary) and returns its log. `RUST_LOG` still prints.
/// Every test of a binary that uses it must call it before it starts a node (whose
/// `init_tracing` would install another subscriber first).
pub fn capture() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs(Arc::default());
        let keep = tracing_subscriber::filter::filter_fn(|m| m.target().starts_with("cets"));
        let print = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(tracing_subscriber::EnvFilter::from_default_env());
        Registry::default()
            .with(Capture(logs.clone()).with_filter(keep))
            .with(print)
            .init();
        logs
    })
    .clone()
}
