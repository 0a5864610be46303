//! Metrics and tracing, read back after known work on real nodes over QUIC on loopback.
//!
//! Each test runs its nodes on a current-thread runtime inside `metrics::with_local_recorder`
//! with its own `DebuggingRecorder`: every task of the test's nodes runs on the test's thread,
//! so every handle the library registers goes to that test's recorder, and tests running in
//! parallel do not see each other's figures. The tracing test does the same with a scoped
//! subscriber.
//!
//! - `writes_batches_and_records_are_counted`: N inserts -> `cets_writes_total` N on the
//!   writer, `cets_records` N on both nodes, batch and ack-latency histograms, connections.
//! - `a_join_is_counted_with_its_records_and_conflicts`: a join -> `cets_joins_total`,
//!   `cets_join_records_total`, `cets_conflicts_total`, duration; status round-trips as JSON.
//! - `records_of_a_node_that_went_down_are_counted_as_drops`: a node down -> drops.
//! - `refused_handshakes_and_discovery_errors_are_counted`: a wrong cookie, a missing file.
//! - `tasks_run_in_spans_with_node_table_and_peer`: a replicated insert's server and link
//!   tasks and a join run in spans that carry node, table and peer; the join logs its outcome.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use cets::discovery::{FileDiscovery, StaticDiscovery};
use cets::{Node, NodeConfig, NodeStatus, Table, TableOptions};
use common::{eventually, joined, loopback, node, node_with, shutdown_all, WAIT};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// A metric's name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// What the recorder saw so far. A `DebuggingRecorder` snapshot resets counters and gauges
/// and drains histograms, so each snapshot is folded in here: counters add up, histograms
/// keep every sample, and a gauge keeps its last value other than the 0 a snapshot leaves.
struct Seen {
    snapshotter: Snapshotter,
    counters: RefCell<HashMap<Series, u64>>,
    gauges: RefCell<HashMap<Series, f64>>,
    histograms: RefCell<HashMap<Series, Vec<f64>>>,
}

impl Seen {
    fn refresh(&self) {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let key = key.key();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            labels.sort();
            let series = (key.name().to_string(), labels);
            match value {
                DebugValue::Counter(n) => {
                    *self.counters.borrow_mut().entry(series).or_default() += n;
                }
                DebugValue::Gauge(g) if g.into_inner() != 0.0 => {
                    self.gauges.borrow_mut().insert(series, g.into_inner());
                }
                DebugValue::Gauge(_) => {}
                DebugValue::Histogram(xs) => self
                    .histograms
                    .borrow_mut()
                    .entry(series)
                    .or_default()
                    .extend(xs.into_iter().map(|x| x.into_inner())),
            }
        }
    }

    fn series(name: &str, labels: &[(&str, &str)]) -> Series {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.sort();
        (name.to_string(), l)
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.refresh();
        let s = Self::series(name, labels);
        self.counters.borrow().get(&s).copied().unwrap_or(0)
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.refresh();
        let s = Self::series(name, labels);
        self.gauges.borrow().get(&s).copied().unwrap_or(0.0)
    }

    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.refresh();
        let s = Self::series(name, labels);
        self.histograms
            .borrow()
            .get(&s)
            .cloned()
            .unwrap_or_default()
    }
}

/// Runs `test` on a current-thread runtime with a recorder of its own (see the module doc).
fn with_recorder<F, Fut>(test: F)
where
    F: FnOnce(Rc<Seen>) -> Fut,
    Fut: Future<Output = ()>,
{
    let recorder = DebuggingRecorder::new();
    let seen = Rc::new(Seen {
        snapshotter: recorder.snapshotter(),
        counters: RefCell::default(),
        gauges: RefCell::default(),
        histograms: RefCell::default(),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || rt.block_on(test(seen)));
}

/// Polls `read` (a figure of `seen`) until it is `want`.
async fn wait_for(what: &str, want: u64, read: impl Fn() -> u64) {
    eventually(WAIT, &format!("{what} == {want}"), || {
        let ok = read() == want;
        async move { ok }
    })
    .await;
}

#[test]
fn writes_batches_and_records_are_counted() {
    with_recorder(|seen| async move {
        const N: u64 = 50;
        let c = common::cluster(&["a", "b"]).await;
        let ta: Table<u64, u64> = c[0].0.start("m_writes", TableOptions::set()).await.unwrap();
        let tb: Table<u64, u64> = c[1].0.start("m_writes", TableOptions::set()).await.unwrap();
        joined(&[&ta, &tb]).await;
        for i in 0..N {
            ta.insert(i, i).await.unwrap();
        }
        let on = |node| [("table", "m_writes"), ("node", node)];
        assert_eq!(seen.counter("cets_writes_total", &on("a")), N);
        assert_eq!(seen.counter("cets_writes_total", &on("b")), 0);
        // One batch per insert here (each awaited), each with one write.
        let batches = seen.histogram("cets_batch_writes", &on("a"));
        assert_eq!(batches.iter().sum::<f64>() as u64, N, "{batches:?}");
        assert!(seen
            .histogram("cets_batch_bytes", &on("a"))
            .iter()
            .all(|b| *b > 0.0));
        let acks = seen.histogram("cets_ack_latency_seconds", &on("a"));
        assert_eq!(acks.len() as u64, N, "one ack latency per batch");
        for node in ["a", "b"] {
            wait_for(&format!("cets_records on {node}"), N, || {
                seen.gauge("cets_records", &on(node)) as u64
            })
            .await;
        }
        wait_for("cets_connections on a", 1, || {
            seen.gauge("cets_connections", &[("node", "a")]) as u64
        })
        .await;
        shutdown_all(c.iter().map(|(n, _)| n)).await;
    });
}

#[test]
fn a_join_is_counted_with_its_records_and_conflicts() {
    with_recorder(|seen| async move {
        // Apart first: each side writes alone, one key on both.
        let (a, ha) = node("a").await;
        let (b, hb) = node("b").await;
        let ta: Table<u64, String> = a.start("m_join", TableOptions::set()).await.unwrap();
        let tb: Table<u64, String> = b.start("m_join", TableOptions::set()).await.unwrap();
        for i in 0..10 {
            ta.insert(i, "a".into()).await.unwrap();
            tb.insert(100 + i, "b".into()).await.unwrap();
        }
        ta.insert(1000, "a".into()).await.unwrap();
        tb.insert(1000, "b".into()).await.unwrap();
        let addrs = vec![a.local_addr(), b.local_addr()];
        ha.set(addrs.clone());
        hb.set(addrs);
        joined(&[&ta, &tb]).await;

        // The smaller name coordinates.
        let a_labels = [("table", "m_join"), ("node", "a")];
        let ok = [("table", "m_join"), ("node", "a"), ("outcome", "ok")];
        wait_for("cets_joins_total ok on a", 1, || {
            seen.counter("cets_joins_total", &ok)
        })
        .await;
        assert_eq!(seen.histogram("cets_join_duration_seconds", &ok).len(), 1);
        // Each side's 11 records went to the other.
        assert_eq!(seen.counter("cets_join_records_total", &a_labels), 22);
        let status = a.status().await;
        assert_eq!(status.conflicts(), 1, "{status}");
        assert_eq!(seen.counter("cets_conflicts_total", &a_labels), 1);
        let b_labels = [("table", "m_join"), ("node", "b"), ("outcome", "ok")];
        assert_eq!(seen.counter("cets_joins_total", &b_labels), 0);

        // The status serialises to JSON and back, unchanged.
        let json = serde_json::to_string(&status).unwrap();
        assert!(json.contains("\"m_join\""), "{json}");
        let back: NodeStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(back, status);
        let table = &status.tables[0];
        let back: cets::TableStatus =
            serde_json::from_value(serde_json::to_value(table).unwrap()).unwrap();
        assert_eq!(&back, table);
        shutdown_all([&a, &b]).await;
    });
}

#[test]
fn records_of_a_node_that_went_down_are_counted_as_drops() {
    with_recorder(|seen| async move {
        let c = common::cluster(&["a", "b"]).await;
        let ta: Table<u64, u64> = c[0].0.start("m_down", TableOptions::set()).await.unwrap();
        let tb: Table<u64, u64> = c[1].0.start("m_down", TableOptions::set()).await.unwrap();
        joined(&[&ta, &tb]).await;
        tb.insert_many((0..20).map(|i| (i, i)).collect())
            .await
            .unwrap();
        ta.insert(100, 100).await.unwrap();
        drop(tb);
        c[1].0.shutdown().await.unwrap();
        let a = [("table", "m_down"), ("node", "a")];
        wait_for("cets_node_down_drops_total on a", 20, || {
            seen.counter("cets_node_down_drops_total", &a)
        })
        .await;
        assert_eq!(ta.len(), 1);
        c[0].0.shutdown().await.unwrap();
    });
}

#[test]
fn refused_handshakes_and_discovery_errors_are_counted() {
    with_recorder(|seen| async move {
        let (a, ha) = node_with("a", "cookie-one", NodeConfig::fast_failover()).await;
        let (b, hb) = node_with("b", "cookie-two", NodeConfig::fast_failover()).await;
        let addrs: Vec<SocketAddr> = vec![a.local_addr(), b.local_addr()];
        ha.set(addrs.clone());
        hb.set(addrs);
        eventually(WAIT, "a refused a handshake for its cookie", || {
            let n = seen.counter(
                "cets_handshakes_refused_total",
                &[("node", "a"), ("reason", "auth")],
            );
            async move { n >= 1 }
        })
        .await;
        assert_eq!(seen.gauge("cets_connections", &[("node", "a")]), 0.0);

        let dir = tempfile::tempdir().unwrap();
        let missing = FileDiscovery::new(dir.path().join("no-such-file"));
        let c = common::node_disco("c", "cookie-one", NodeConfig::fast_failover(), missing).await;
        eventually(WAIT, "c counted a failed discovery poll", || {
            let n = seen.counter("cets_discovery_errors_total", &[("node", "c")]);
            async move { n >= 1 }
        })
        .await;
        shutdown_all([&a, &b, &c]).await;
    });
}

/// Fields of a span, as the capture layer records them.
type Fields = BTreeMap<String, String>;

/// What the capture layer saw: each span when it was first entered (name and fields), and
/// each event with its message and the fields of every span around it.
#[derive(Clone, Default)]
struct Captured {
    entered: Arc<Mutex<Vec<(&'static str, Fields)>>>,
    events: Arc<Mutex<Vec<Fields>>>,
}

struct Visit<'a>(&'a mut Fields);

impl tracing::field::Visit for Visit<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

/// Marks a span whose first entry was recorded.
struct Entered;

impl<S> tracing_subscriber::Layer<S> for Captured
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields::new();
        attrs.record(&mut Visit(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if ext.get_mut::<Entered>().is_some() {
            return;
        }
        ext.insert(Entered);
        let fields = ext.get_mut::<Fields>().cloned().unwrap_or_default();
        self.entered.lock().unwrap().push((span.name(), fields));
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: tracing_subscriber::layer::Context<'_, S>) {
        let mut fields = Fields::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<Fields>() {
                    fields.extend(f.clone());
                }
            }
        }
        event.record(&mut Visit(&mut fields));
        self.events.lock().unwrap().push(fields);
    }
}

#[test]
fn tasks_run_in_spans_with_node_table_and_peer() {
    use tracing_subscriber::layer::SubscriberExt;
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        rt.block_on(async {
            let (a, ha) = node_nolog("a").await;
            let (b, hb) = node_nolog("b").await;
            let ta: Table<u64, u64> = a.start("t_spans", TableOptions::set()).await.unwrap();
            let tb: Table<u64, u64> = b.start("t_spans", TableOptions::set()).await.unwrap();
            let addrs = vec![a.local_addr(), b.local_addr()];
            ha.set(addrs.clone());
            hb.set(addrs);
            joined(&[&ta, &tb]).await;
            ta.insert(1, 1).await.unwrap();
            assert_eq!(tb.get(&1), Some(1));
            shutdown_all([&a, &b]).await;
        })
    });
    let has = |f: &Fields, k: &str, v: &str| f.get(k).is_some_and(|x| x == v);
    let peer_is = |f: &Fields, name: &str| {
        f.get("peer")
            .is_some_and(|p| p.starts_with(&format!("{name}#")))
    };
    let entered = captured.entered.lock().unwrap().clone();
    let on_b = |f: &Fields| has(f, "node", "b") && has(f, "table", "t_spans");
    // b's table server, and the reader task that took a's batch to it.
    assert!(
        entered.iter().any(|(n, f)| *n == "cets_table" && on_b(f)),
        "{entered:?}"
    );
    assert!(
        entered
            .iter()
            .any(|(n, f)| *n == "cets_link" && on_b(f) && peer_is(f, "a") && has(f, "dir", "in")),
        "{entered:?}"
    );
    // a's writer task that sent it.
    assert!(
        entered.iter().any(|(n, f)| *n == "cets_link"
            && has(f, "node", "a")
            && has(f, "table", "t_spans")
            && peer_is(f, "b")
            && has(f, "dir", "out")),
        "{entered:?}"
    );
    // a coordinated the join (the smaller name), in a span of its own, and logged its end.
    assert!(
        entered.iter().any(|(n, f)| *n == "cets_join"
            && has(f, "node", "a")
            && has(f, "table", "t_spans")
            && peer_is(f, "b")),
        "{entered:?}"
    );
    let events = captured.events.lock().unwrap().clone();
    let done = events
        .iter()
        .find(|f| has(f, "message", "join finished"))
        .unwrap_or_else(|| panic!("no join outcome logged: {events:?}"));
    assert!(has(done, "outcome", "ok"), "{done:?}");
    assert!(
        has(done, "node", "a") && has(done, "table", "t_spans"),
        "{done:?}"
    );
    assert!(
        done.contains_key("records") && done.contains_key("took"),
        "{done:?}"
    );
    // Every span of cets that was entered carries the node.
    for (name, f) in entered.iter().filter(|(n, _)| n.starts_with("cets_")) {
        assert!(f.contains_key("node"), "span {name} without node: {f:?}");
    }
}

/// A node with a static discovery list, without installing the fmt subscriber of
/// `common::node` (the test's own subscriber captures everything).
async fn node_nolog(name: &str) -> (Node, cets::discovery::StaticDiscoveryHandle) {
    let disco = StaticDiscovery::new(Vec::<SocketAddr>::new());
    let handle = disco.handle();
    let node = Node::builder(name)
        .listen(loopback())
        .cookie("test-cookie")
        .config(NodeConfig::fast_failover())
        .discovery(disco)
        .start()
        .await
        .unwrap();
    (node, handle)
}
