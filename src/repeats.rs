//! Finding keys named twice in one write, cheaply: most writes name each key once, and the
//! writer must prove it for every `insert_many` of a set (`Server::with_owners`).

use std::hash::{BuildHasher, Hash};

use hashbrown::hash_table::HashTable;

/// Beyond this many slots, the table is dropped after use instead of kept for the next write.
const KEEP_SLOTS: usize = 1 << 14;

/// A table of key hashes kept from one write to the next, so a check allocates nothing once it
/// has grown to the usual write size.
pub(crate) struct Repeats {
    seen: HashTable<u64>,
    hasher: foldhash::fast::RandomState,
}

impl Repeats {
    pub(crate) fn new() -> Self {
        Self {
            seen: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Whether two of `keys` may be the same key. `false` is certain; `true` means two keys
    /// hash alike, and only then must the caller compare the keys themselves.
    pub(crate) fn may_repeat<'a, K: Hash + 'a>(
        &mut self,
        keys: impl Iterator<Item = &'a K>,
    ) -> bool {
        self.seen.clear();
        let mut repeat = false;
        for k in keys {
            let h = self.hasher.hash_one(k);
            if self.seen.find(h, |&x| x == h).is_some() {
                repeat = true;
                break;
            }
            self.seen.insert_unique(h, h, |&x| x);
        }
        if self.seen.capacity() > KEEP_SLOTS {
            self.seen = HashTable::new();
        }
        repeat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_found_and_distinct_keys_pass() {
        let mut r = Repeats::new();
        assert!(!r.may_repeat([1u64, 2, 3].iter()));
        assert!(r.may_repeat([1u64, 2, 1].iter()));
        assert!(!r.may_repeat((0..100_000u64).collect::<Vec<_>>().iter()));
        assert!(
            !r.may_repeat([1u64].iter()),
            "nothing kept from the last write"
        );
    }
}
