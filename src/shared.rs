//! Envoy shared data, seen through a small trait so the cache and lease logic run on the host.
//!
//! Shared data is one key-value map per `vm_id`, visible to every VM on every worker. Each value
//! carries a CAS number; a write with a CAS succeeds only if the value is unchanged since it was
//! read. One quirk shapes the lease code: a write to a key that does not exist always succeeds,
//! whatever CAS it carries, so creating a key is never atomic.

/// Every key this filter writes starts with this prefix; the version changes when a value's
/// encoding does, so an old and a new module never misread each other.
pub const KEY_PREFIX: &str = "openai_wif.v2.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the value changed since it was read")]
    CasMismatch,
    #[error("shared data call failed with status {0}")]
    Host(u32),
    #[error("a value could not be encoded")]
    Encoding,
    #[error("still contended after {CAS_ATTEMPTS} attempts")]
    Contended,
}

/// How many times a read-modify-write is tried when other workers keep writing in between.
pub const CAS_ATTEMPTS: usize = 32;

/// Read-modify-write of a JSON value with CAS, the one way this filter updates shared data.
/// `change` gets the current value (`None` when missing or undecodable) and returns the new one,
/// or `None` to leave it as it is. Returns what was written.
pub fn update<T, F>(
    store: &dyn SharedStore,
    key: &str,
    mut change: F,
) -> Result<Option<T>, StoreError>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
    F: FnMut(Option<&T>) -> Option<T>,
{
    for _ in 0..CAS_ATTEMPTS {
        let current = store.get(key)?;
        let cas = current.as_ref().map(|(_, cas)| *cas);
        let value: Option<T> = current.and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok());
        let Some(next) = change(value.as_ref()) else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(&next).map_err(|_| StoreError::Encoding)?;
        match store.set(key, &bytes, cas) {
            Ok(()) => return Ok(Some(next)),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Contended)
}

/// Reads a JSON value with its CAS number; a missing or undecodable one is `None`.
pub fn read<T: serde::de::DeserializeOwned>(
    store: &dyn SharedStore,
    key: &str,
) -> Result<Option<(T, u32)>, StoreError> {
    Ok(store
        .get(key)?
        .and_then(|(bytes, cas)| serde_json::from_slice(&bytes).ok().map(|v| (v, cas))))
}

/// A value and the CAS number it was read with.
pub type Versioned = (Vec<u8>, u32);

pub trait SharedStore {
    /// The value under `key`, or `None` when the key was never written.
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes `value`; with `Some(cas)` only if the value still has that CAS number.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// An in-memory store with Envoy's semantics, for tests.
#[cfg(test)]
#[derive(Default)]
pub struct MemoryStore {
    inner: std::cell::RefCell<(std::collections::HashMap<String, Versioned>, u32)>,
    /// Runs once, before the next write: what another worker does between our read and write.
    race: std::cell::RefCell<Option<OtherWorker>>,
}

#[cfg(test)]
type OtherWorker = Box<dyn FnOnce(&MemoryStore)>;

#[cfg(test)]
impl MemoryStore {
    /// Makes `other_worker` run right before the next write.
    pub fn race_next_write(&self, other_worker: impl FnOnce(&MemoryStore) + 'static) {
        *self.race.borrow_mut() = Some(Box::new(other_worker));
    }

    /// Every key and the size of its value, for memory assertions.
    pub fn sizes(&self) -> Vec<(String, usize)> {
        self.inner
            .borrow()
            .0
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.len()))
            .collect()
    }
}

#[cfg(test)]
impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.inner.borrow().0.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let race = self.race.borrow_mut().take();
        if let Some(other_worker) = race {
            other_worker(self);
        }
        let mut inner = self.inner.borrow_mut();
        inner.1 += 1;
        let next = inner.1;
        match inner.0.get_mut(key) {
            Some(existing) => {
                if cas.is_some_and(|c| c != existing.1) {
                    return Err(StoreError::CasMismatch);
                }
                *existing = (value.to_vec(), next);
            }
            None => {
                inner.0.insert(key.to_string(), (value.to_vec(), next));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store_follows_envoy_cas_rules() {
        let s = MemoryStore::default();
        assert_eq!(s.get("k").unwrap(), None);
        s.set("k", b"a", Some(12345)).unwrap(); // creating ignores CAS, as in Envoy
        let (v, cas) = s.get("k").unwrap().unwrap();
        assert_eq!(v, b"a");
        assert_eq!(
            s.set("k", b"b", Some(cas + 1)),
            Err(StoreError::CasMismatch)
        );
        s.set("k", b"b", Some(cas)).unwrap();
        assert_eq!(s.set("k", b"c", Some(cas)), Err(StoreError::CasMismatch));
        s.set("k", b"c", None).unwrap();
        assert_eq!(s.get("k").unwrap().unwrap().0, b"c");
    }

    #[test]
    fn update_retries_when_another_worker_wrote_first() {
        let s = MemoryStore::default();
        s.set("k", b"1", None).unwrap();
        s.race_next_write(|s| s.set("k", b"10", None).unwrap());
        let mut seen = Vec::new();
        let written = update(&s, "k", |v: Option<&u32>| {
            seen.push(v.copied());
            v.map(|n| n + 1)
        })
        .unwrap();
        assert_eq!(seen, vec![Some(1), Some(10)]);
        assert_eq!(written, Some(11));
        assert_eq!(read::<u32>(&s, "k").unwrap().map(|(v, _)| v), Some(11));
        assert_eq!(update(&s, "k", |_: Option<&u32>| None).unwrap(), None);
        s.set("bad", b"\x00", None).unwrap();
        assert!(read::<u32>(&s, "bad").unwrap().is_none());
    }
}
