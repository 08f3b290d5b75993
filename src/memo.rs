//! Per-VM memos: what the warm path would otherwise recompute on every request.
//!
//! A memo is only a shortcut. Its keys are the whole input (the subject token's bytes, a
//! shared-data slot's bytes), never a hash of it, so a hash collision can only cost a
//! comparison; and what it remembers is re-derived from shared data, which stays the truth,
//! whenever the input changes.
//!
//! [`Generations`] bounds a memo: entries go into a young generation; when it is full (by count
//! or bytes) the old generation is dropped and the young one becomes old. A hit in the old
//! generation moves the entry back to the young one, so what is in use stays, in O(1), and the
//! memo never holds more than twice its budget.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

use foldhash::fast::RandomState;

pub struct Generations<K, V, S = RandomState> {
    young: HashMap<K, (V, usize), S>,
    old: HashMap<K, (V, usize), S>,
    young_bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl<K: Hash + Eq, V> Generations<K, V> {
    /// A memo of at most `max_entries` entries and `max_bytes` bytes per generation.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self::with_hasher(max_entries, max_bytes)
    }
}

impl<K: Hash + Eq, V, S: BuildHasher + Default> Generations<K, V, S> {
    pub fn with_hasher(max_entries: usize, max_bytes: usize) -> Self {
        Generations {
            young: HashMap::default(),
            old: HashMap::default(),
            young_bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
        }
    }

    pub fn get<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.young.contains_key(key) {
            let (k, (v, bytes)) = self.old.remove_entry(key)?;
            self.put(k, v, bytes);
        }
        self.young.get_mut(key).map(|(v, _)| v)
    }

    /// Remembers `value` under `key`; `bytes` is what it costs (key and value).
    pub fn insert(&mut self, key: K, value: V, bytes: usize) {
        self.old.remove(&key);
        if let Some((_, b)) = self.young.remove(&key) {
            self.young_bytes -= b;
        }
        self.put(key, value, bytes);
    }

    fn put(&mut self, key: K, value: V, bytes: usize) {
        if self.young.len() >= self.max_entries || self.young_bytes + bytes > self.max_bytes {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young_bytes += bytes;
        self.young.insert(key, (value, bytes));
    }

    pub fn remove<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some((_, b)) = self.young.remove(key) {
            self.young_bytes -= b;
        }
        self.old.remove(key);
    }

    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
        self.young_bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets() {
        let mut m: Generations<u32, &str> = Generations::new(2, 1000);
        m.insert(1, "a", 1);
        m.insert(2, "b", 1);
        assert_eq!(m.get(&1).copied(), Some("a"));
        m.remove(&1);
        assert_eq!(m.get(&1), None);
        m.clear();
        assert!(m.is_empty());
    }

    #[test]
    fn bounded_by_count_and_bytes() {
        let mut m: Generations<u32, u32> = Generations::new(10, 100);
        for i in 0..10_000 {
            m.insert(i, i, 1);
            assert!(m.len() <= 20);
        }
        let mut m: Generations<u32, u32> = Generations::new(1000, 100);
        for i in 0..10_000 {
            m.insert(i, i, 30);
            assert!(m.len() <= 2 * 100 / 30 + 2);
        }
    }

    #[test]
    fn what_is_used_stays() {
        let mut m: Generations<u32, u32> = Generations::new(4, 1000);
        m.insert(0, 0, 1);
        for i in 1..1000 {
            m.insert(i, i, 1);
            // The hot entry is read between inserts: it never falls out.
            assert_eq!(m.get(&0).copied(), Some(0), "after {i} inserts");
        }
        // A cold one does.
        assert_eq!(m.get(&1), None);
    }

    /// Every key hashes the same: lookups still compare whole keys.
    #[derive(Default)]
    struct Colliding;
    struct Constant;
    impl std::hash::Hasher for Constant {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }
    impl BuildHasher for Colliding {
        type Hasher = Constant;
        fn build_hasher(&self) -> Constant {
            Constant
        }
    }

    #[test]
    fn colliding_hashes_never_mix_entries() {
        let mut m: Generations<Box<[u8]>, u32, Colliding> = Generations::with_hasher(64, 1 << 20);
        for i in 0..50u32 {
            m.insert(format!("token-{i}").into_bytes().into(), i, 10);
        }
        for i in 0..50u32 {
            assert_eq!(m.get(format!("token-{i}").as_bytes()).copied(), Some(i));
        }
        assert_eq!(m.get(b"token-50".as_slice()), None);
    }

    #[test]
    fn replacing_an_entry_keeps_the_byte_count_honest() {
        let mut m: Generations<u32, u32> = Generations::new(100, 10);
        for _ in 0..100 {
            m.insert(7, 7, 5);
        }
        m.insert(8, 8, 5);
        // 7 and 8 fit in one generation of 10 bytes only if replacing 7 did not add up.
        assert_eq!(m.young.len(), 2);
    }
}
