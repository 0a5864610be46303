//! Changes of one replica only, for the tests of anti-entropy (`crate::testing` sends them).

use crate::server::*;

/// A change of one replica's store that is not replicated.
pub(crate) enum TestWrite<K, V> {
    /// Store `(key, value)` with a new stamp, owned by the node named `owner` (this node if
    /// `None`), replacing the key's record (a bag: adding the object).
    Put {
        key: K,
        value: V,
        owner: Option<String>,
    },
    /// Remove the key (`value: None`) or one object of it, leaving no tombstone.
    Remove { key: K, value: Option<V> },
    /// Apply a delete of the key with a new stamp, as a replicated delete is applied (with
    /// its tombstone), without sending it: a delete the other replicas missed.
    Delete { key: K },
    /// Compare digests as they are (section 15.3) or not: with `false`, only the comparison
    /// at a cut (15.4) runs, whether writes are in flight or not.
    CompareAtRest(bool),
}

impl<K: Key, V: Value> Server<K, V> {
    /// A change of this replica only (`crate::testing`).
    pub(in crate::server) fn test_write(&mut self, w: TestWrite<K, V>) {
        match w {
            TestWrite::Put { key, value, owner } => {
                let owner = match owner {
                    None => Some(self.me_idx),
                    Some(name) => self
                        .peers
                        .key_named(&name)
                        .or((name == self.me.name).then_some(self.me_idx)),
                };
                if let Some(owner) = owner {
                    let owner = if self.cluster_owned() {
                        self.cluster_writer(owner)
                    } else {
                        owner
                    };
                    let rec = Rec {
                        value,
                        ts: self.clock.now(),
                        owner,
                        ttl: 0,
                    };
                    self.shared
                        .store
                        .put_many_if(vec![(key, rec)], |_, _, _| true);
                }
            }
            TestWrite::Remove { key, value: None } => {
                self.shared.store.remove(&key);
            }
            TestWrite::Remove {
                key,
                value: Some(v),
            } => {
                self.shared.store.remove_object(&key, &v);
            }
            TestWrite::CompareAtRest(on) => self.ae.at_rest = on,
            TestWrite::Delete { key } => {
                let op = Op {
                    ts: self.clock.now(),
                    kind: OpKind::Delete(vec![key]),
                };
                self.apply(op, self.me_idx);
            }
        }
    }
}
