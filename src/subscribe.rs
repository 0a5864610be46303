//! The handle's side of subscriptions: `Table::subscribe` and `Table::subscribe_at` ask the
//! table server to register a subscriber between two changes (the log and the subscription
//! are in `subscription.rs`).

use tokio::sync::oneshot;

use crate::server::Control;
use crate::subscription::{Cursor, Start, SubscribeReq, Subscription};
use crate::table::Table;
use crate::types::{Key, Value};
use crate::{Error, Result};

impl<K: Key, V: Value> Table<K, V> {
    async fn subscribe_at(&self, from: Start) -> Result<(Vec<(K, V)>, Subscription<K, V>)> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Subscribe(SubscribeReq { from, reply }))
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Subscribes to the changes this node applies to the table from now on, in apply order:
    /// local and replicated writes, expiries, records dropped with their owner, joins and
    /// repairs. A subscriber that reads too slowly never slows the table: it gets
    /// [`Update::Lagged`](crate::subscription::Update::Lagged) instead ([`TableOptions::subscription_buffer`](crate::TableOptions::subscription_buffer)).
    pub async fn subscribe(&self) -> Result<Subscription<K, V>> {
        Ok(self.subscribe_at(Start::Now).await?.1)
    }

    /// The table's current contents (as [`Table::to_vec`]) and a subscription to every change
    /// after them: taken at one point of the table server's order, so no change is missing
    /// between the two and none is in both. What a cache needs to start. The table server
    /// copies the table to take it.
    pub async fn subscribe_with_snapshot(&self) -> Result<(Vec<(K, V)>, Subscription<K, V>)> {
        self.subscribe_at(Start::Snapshot).await
    }

    /// Resumes after `cursor` (from [`Event::cursor`](crate::subscription::Event::cursor) or [`Subscription::cursor`]) with the
    /// changes since, without a reload. Fails with [`Error::CursorExpired`] if the change
    /// log no longer holds all of them (it fell out of the buffer, nobody was subscribed
    /// while it happened, or the cursor is of another node or table start): take a snapshot.
    pub async fn subscribe_from(&self, cursor: Cursor) -> Result<Subscription<K, V>> {
        Ok(self.subscribe_at(Start::After(cursor)).await?.1)
    }
}
