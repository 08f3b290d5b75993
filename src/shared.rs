//! Envoy shared data, seen through a small trait so the cache and lease logic run on the host.
//!
//! Shared data is one key-value map per `vm_id`, visible to every VM on every worker. Each value
//! carries a CAS number; a write with a CAS succeeds only if the value is unchanged since it was
//! read. One quirk shapes the lease code: a write to a key that does not exist always succeeds,
//! whatever CAS it carries, so creating a key is never atomic.

/// Every key this filter writes starts with this prefix; the version changes when a value's
/// encoding does, so an old and a new module never misread each other.
pub const KEY_PREFIX: &str = "openai_wif.v1.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the value changed since it was read")]
    CasMismatch,
    #[error("shared data call failed with status {0}")]
    Host(u32),
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
}

#[cfg(test)]
impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.inner.borrow().0.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
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
}
