//! Single flight across workers: at most one fetch per identity at a time.
//!
//! Each worker runs its own VM, so "one exchange per identity" needs a lock they all see. The
//! lock is a lease in shared data, taken and released by compare-and-swap. All leases live in
//! one table under one key, created when a VM starts: since creating a key is never atomic in
//! Envoy, per-identity lease keys could be created twice by racing workers, whereas updates to an
//! existing key are real CAS operations. A lease has a deadline, so a leader that dies or whose
//! callout is lost cannot block its identity: once the deadline passes, anyone may take it over.
//!
//! Lease states for an identity: free (no entry, or an entry past its deadline) → held by one
//! owner until its deadline → free again on release.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::IdentityKey;
use crate::shared::{self, SharedStore, StoreError, KEY_PREFIX};

/// Most leases held at once, gateway-wide. New identities are admitted at a bounded rate and
/// a lease lives for one fetch, so a full table means something is wrong: refuse, don't grow.
pub const MAX_LEASES: usize = 1024;

pub fn table_key() -> String {
    format!("{KEY_PREFIX}leases")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub owner: u64,
    pub deadline_ms: u64,
}

type Table = BTreeMap<String, Lease>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// The caller now holds the lease and must fetch, then release.
    Acquired,
    /// Someone holds it until `deadline_ms`; wait for their result.
    Held(Lease),
    /// [`MAX_LEASES`] live leases are held: nobody may start another fetch until one ends.
    Full,
}

/// Creates the lease table if it does not exist yet. Called when a VM starts.
pub fn ensure_table(store: &dyn SharedStore) -> Result<(), StoreError> {
    if store.get(&table_key())?.is_none() {
        store.set(&table_key(), b"{}", None)?;
    }
    Ok(())
}

/// Takes the lease for `identity` until `deadline_ms` unless someone else holds a live one.
pub fn try_acquire(
    store: &dyn SharedStore,
    identity: &IdentityKey,
    owner: u64,
    now_ms: u64,
    deadline_ms: u64,
) -> Result<Acquire, StoreError> {
    let mut outcome = Acquire::Acquired;
    shared::update(store, &table_key(), |current: Option<&Table>| {
        let mut table = current.cloned().unwrap_or_default();
        if let Some(lease) = table
            .get(identity.as_str())
            .filter(|l| l.deadline_ms > now_ms)
        {
            outcome = Acquire::Held(*lease);
            return None;
        }
        // Drop every lease past its deadline while writing anyway, so the table stays small.
        table.retain(|_, l| l.deadline_ms > now_ms);
        if table.len() >= MAX_LEASES {
            outcome = Acquire::Full;
            return None;
        }
        table.insert(identity.as_str().to_string(), Lease { owner, deadline_ms });
        outcome = Acquire::Acquired;
        Some(table)
    })?;
    Ok(outcome)
}

/// Gives the lease back, if `owner` still holds it.
pub fn release(
    store: &dyn SharedStore,
    identity: &IdentityKey,
    owner: u64,
) -> Result<(), StoreError> {
    shared::update(store, &table_key(), |current: Option<&Table>| {
        let mut table = current?.clone();
        match table.get(identity.as_str()) {
            Some(l) if l.owner == owner => {
                table.remove(identity.as_str());
                Some(table)
            }
            _ => None,
        }
    })?;
    Ok(())
}

/// The live lease on `identity`, if any (what the tests assert on).
#[cfg(test)]
pub fn holder(
    store: &dyn SharedStore,
    identity: &IdentityKey,
    now_ms: u64,
) -> Result<Option<Lease>, StoreError> {
    Ok(store.get(&table_key())?.and_then(|(bytes, _)| {
        serde_json::from_slice::<Table>(&bytes)
            .unwrap_or_default()
            .get(identity.as_str())
            .copied()
            .filter(|l| l.deadline_ms > now_ms)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    const NOW: u64 = 1_000_000;

    fn id(s: &str) -> IdentityKey {
        IdentityKey::from_raw(s)
    }

    #[test]
    fn one_holder_at_a_time() {
        let s = MemoryStore::default();
        ensure_table(&s).unwrap();
        assert_eq!(
            try_acquire(&s, &id("a"), 1, NOW, NOW + 100).unwrap(),
            Acquire::Acquired
        );
        assert_eq!(
            try_acquire(&s, &id("a"), 2, NOW + 1, NOW + 101).unwrap(),
            Acquire::Held(Lease {
                owner: 1,
                deadline_ms: NOW + 100
            })
        );
        // Another identity is independent.
        assert_eq!(
            try_acquire(&s, &id("b"), 2, NOW, NOW + 100).unwrap(),
            Acquire::Acquired
        );
        assert_eq!(holder(&s, &id("a"), NOW).unwrap().map(|l| l.owner), Some(1));
        release(&s, &id("a"), 1).unwrap();
        assert_eq!(holder(&s, &id("a"), NOW).unwrap(), None);
        assert_eq!(
            try_acquire(&s, &id("a"), 2, NOW + 2, NOW + 102).unwrap(),
            Acquire::Acquired
        );
    }

    #[test]
    fn an_expired_lease_can_be_taken_over_and_its_owner_cannot_release_the_new_one() {
        let s = MemoryStore::default();
        ensure_table(&s).unwrap();
        try_acquire(&s, &id("a"), 1, NOW, NOW + 100).unwrap();
        assert_eq!(
            try_acquire(&s, &id("a"), 2, NOW + 100, NOW + 200).unwrap(),
            Acquire::Acquired
        );
        release(&s, &id("a"), 1).unwrap();
        assert_eq!(
            holder(&s, &id("a"), NOW + 150).unwrap().map(|l| l.owner),
            Some(2)
        );
    }

    #[test]
    fn expired_leases_are_pruned() {
        let s = MemoryStore::default();
        ensure_table(&s).unwrap();
        for i in 0..50 {
            try_acquire(&s, &id(&format!("k{i}")), 1, NOW, NOW + 10).unwrap();
        }
        try_acquire(&s, &id("fresh"), 1, NOW + 20, NOW + 30).unwrap();
        let (table, _) = shared::read::<Table>(&s, &table_key()).unwrap().unwrap();
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn ensure_table_does_not_clobber_a_live_table() {
        let s = MemoryStore::default();
        ensure_table(&s).unwrap();
        try_acquire(&s, &id("a"), 1, NOW, NOW + 100).unwrap();
        ensure_table(&s).unwrap();
        assert!(holder(&s, &id("a"), NOW).unwrap().is_some());
    }

    #[test]
    fn a_corrupt_table_reads_as_empty() {
        let s = MemoryStore::default();
        s.set(&table_key(), b"not json", None).unwrap();
        assert_eq!(
            try_acquire(&s, &id("a"), 1, NOW, NOW + 100).unwrap(),
            Acquire::Acquired
        );
    }

    #[test]
    fn losing_the_race_means_waiting() {
        let s = MemoryStore::default();
        ensure_table(&s).unwrap();
        s.race_next_write(|s| {
            try_acquire(s, &id("a"), 99, NOW, NOW + 500).unwrap();
        });
        assert_eq!(
            try_acquire(&s, &id("a"), 1, NOW, NOW + 100).unwrap(),
            Acquire::Held(Lease {
                owner: 99,
                deadline_ms: NOW + 500
            })
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let s = MemoryStore::default();
        ensure_table(&s).unwrap();
        for i in 0..MAX_LEASES {
            let got = try_acquire(&s, &id(&format!("k{i}")), 1, NOW, NOW + 100).unwrap();
            assert_eq!(got, Acquire::Acquired);
        }
        assert_eq!(
            try_acquire(&s, &id("one-more"), 1, NOW, NOW + 100).unwrap(),
            Acquire::Full
        );
        release(&s, &id("k0"), 1).unwrap();
        assert_eq!(
            try_acquire(&s, &id("one-more"), 1, NOW, NOW + 100).unwrap(),
            Acquire::Acquired
        );
        // Once deadlines pass, the table empties itself on the next write.
        assert_eq!(
            try_acquire(&s, &id("later"), 1, NOW + 100, NOW + 200).unwrap(),
            Acquire::Acquired
        );
    }
}
