//! Starting a table server (its state from the node's parts and what persistence restored)
//! and stopping it (every caller still waiting hears `Error::Shutdown`).

use super::*;

/// Everything a server needs from its node.
pub(crate) struct ServerParts<K, V> {
    pub shared: Arc<Shared<K, V>>,
    pub opts: TableOptions<K, V>,
    pub config: NodeConfig,
    pub clock: Arc<HybridClock>,
    pub me: NodeId,
    pub fingerprint: u64,
    pub writes: mpsc::Receiver<Write<K, V>>,
    pub control: mpsc::UnboundedReceiver<Control<K, V>>,
    pub control_tx: mpsc::UnboundedSender<Control<K, V>>,
    pub events: mpsc::UnboundedReceiver<TableEvent>,
    /// What `TableOptions::persist` restores: the last snapshot and the log (`persist.rs`).
    pub restored: Restored<K, V>,
    pub writes_tx: mpsc::Sender<Write<K, V>>,
}

impl<K: Key, V: Value> Server<K, V> {
    pub(crate) fn spawn(parts: ServerParts<K, V>) -> Result<tokio::task::JoinHandle<()>> {
        let restored = parts.restored;
        let header = frame::encode(&StreamHeader {
            table: parts.shared.name.clone(),
            kind: parts.shared.kind,
            fingerprint: parts.fingerprint,
        })?;
        let (inputs_tx, inputs) = mpsc::channel(1024);
        let ae_interval = parts.config.anti_entropy_interval;
        let mut owners = Owners::hashed(parts.shared.store.digest.owner_hashes());
        let me_idx = owners.intern(&parts.me);
        let span =
            tracing::info_span!("cets_table", node = %parts.me.name, table = %parts.shared.name);
        let metrics = TableMetrics::new(&parts.me.name, &parts.shared.name);
        let server = Server {
            shared: parts.shared,
            opts: parts.opts,
            config: parts.config,
            clock: parts.clock,
            me: parts.me,
            me_idx,
            owners,
            peers: Peers::new(),
            epoch: 0,
            commit: GroupCommit::new(),
            tombstones: Tombstones::new(),
            object_deletes: ObjectDeletes::new(),
            pause: PauseState::new(),
            joins: Joins::new(),
            ticks: 0,
            next_clock_note: Instant::now(),
            header,
            writes: parts.writes,
            control: parts.control,
            control_tx: parts.control_tx,
            events: parts.events,
            inputs,
            inputs_tx,
            to_ack: HashMap::new(),
            gone: HashSet::new(),
            repeats: Repeats::new(),
            next_sweep: Instant::now(),
            metrics,
            persist: persist::PersistState::default(),
            ae: anti_entropy::AntiEntropy::new(ae_interval),
            claims: claims::Claims::default(),
            writes_tx: parts.writes_tx,
        };
        let mut server = server;
        span.in_scope(|| server.restore(restored));
        Ok(tokio::spawn(server.run().instrument(span)))
    }

    /// Stops serving: subscribers are told, and every write still waiting, for its acks or in
    /// the queue, fails with `Error::Shutdown`.
    pub(super) fn stop(&mut self) {
        self.shared.hub.close();
        for p in self.commit.take_all() {
            for r in p.replies {
                let _ = r.send(Err(Error::Shutdown));
            }
        }
        self.writes.close();
        while let Ok(w) = self.writes.try_recv() {
            let _ = w.reply.send(Err(Error::Shutdown));
        }
    }
}
