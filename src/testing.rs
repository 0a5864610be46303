//! For tests only, with the cargo feature `testing`; not a stable API: it changes with the
//! protocol and the internals whenever they change.
//!
//! - `Table::testing_*`: ways to change one replica behind the protocol's back (how the tests
//!   of anti-entropy make replicas differ);
//! - [`wire`]: the wire types, for the tests whose raw peer speaks the protocol itself;
//! - [`any_certificate`]: the nodes' own verifier of server certificates, for raw QUIC clients;
//! - [`ProbeBackend`]: a persistence backend around another one whose log appends a test can
//!   count, fail or hold.

use tokio::sync::oneshot;

mod probe;
pub use probe::ProbeBackend;

use crate::server::{Control, TestWrite};
use crate::table::Table;
use crate::types::{Key, Value};
use crate::{Error, Result};

impl<K: Key, V: Value> Table<K, V> {
    async fn testing(&self, w: TestWrite<K, V>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Testing(w, tx))
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Testing only: stores a record in this replica alone, with a new stamp and the owner
    /// named (this node if `None`; a name that is neither this node nor a connected one stores
    /// nothing). Nothing is sent to the peers.
    #[doc(hidden)]
    pub async fn testing_put_local(&self, key: K, value: V, owner: Option<&str>) -> Result<()> {
        let owner = owner.map(str::to_string);
        self.testing(TestWrite::Put { key, value, owner }).await
    }

    /// Testing only: removes a key (or, with `value`, one object of it) from this replica
    /// alone, leaving no tombstone. Nothing is sent to the peers.
    #[doc(hidden)]
    pub async fn testing_remove_local(&self, key: K, value: Option<V>) -> Result<()> {
        self.testing(TestWrite::Remove { key, value }).await
    }

    /// Testing only: deletes a key in this replica alone, as a delete is applied here (with a
    /// new stamp, leaving a tombstone), without sending it to the peers.
    #[doc(hidden)]
    pub async fn testing_delete_local(&self, key: K) -> Result<()> {
        self.testing(TestWrite::Delete { key }).await
    }

    /// Testing only: turns this node's comparison of digests as they are (when both sides
    /// applied the same writes) off or on, so that a test can show what the comparison at a
    /// cut alone finds and repairs.
    #[doc(hidden)]
    pub async fn testing_compare_at_rest(&self, on: bool) -> Result<()> {
        self.testing(TestWrite::CompareAtRest(on)).await
    }
}

/// The messages of the wire protocol, as the library encodes them (postcard): a raw peer in
/// a test builds and reads them with these types rather than with copies. For tests only; not a
/// stable API.
pub mod wire {
    pub use crate::proto::{
        close, stop, AeEntry, AeMsg, ClaimOutcome, Frontier, Hello, JoinRep, JoinReq, Op, OpKind,
        PeerMsg, StreamHeader, WireRecord, WireTombstone, MAGIC, PROTOCOL_VERSION,
    };
}

/// The server certificate verifier the nodes use when they dial (no cluster CA): it accepts
/// any certificate and checks the handshake's signatures (ring), since the cookie proof is the
/// authentication. For a test's or bench's own QUIC client of a node
/// (`rustls::ClientConfig::dangerous().with_custom_certificate_verifier`). For tests only.
pub fn any_certificate() -> std::sync::Arc<dyn rustls::client::danger::ServerCertVerifier> {
    crate::transport::tls::any_certificate()
}
