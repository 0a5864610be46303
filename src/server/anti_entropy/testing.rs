//! Changes of one replica only, for the tests of anti-entropy (`crate::testing`).

use crate::server::*;

impl<K: Key, V: Value> Server<K, V> {
    /// A change of this replica only (`crate::testing`).
    pub(in crate::server) fn test_write(&mut self, w: crate::testing::TestWrite<K, V>) {
        use crate::testing::TestWrite;
        match w {
            TestWrite::Put { key, value, owner } => {
                let owner = match owner {
                    None => Some(self.me_idx),
                    Some(name) => self
                        .links
                        .iter()
                        .find(|(_, l)| l.id.name == name)
                        .map(|(k, _)| *k)
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
