//! The token cache in shared data: one record per identity, seen by every worker.
//!
//! A [`Record`] holds the current access token (if any) with its deadlines, and the last
//! failure (if any) with its backoff. [`lookup`] turns a record into the one decision a request
//! needs: use a token, use it and refresh, refuse for now, or fetch. A value that does not
//! decode is a miss, never an error.
//!
//! The same module stores the gateway's subject token for platform sources ([`SubjectRecord`]).

use serde::{Deserialize, Serialize};

use crate::identity::IdentityKey;
use crate::lifetime;
use crate::reply::Failure;
use crate::secret::Secret;
use crate::shared::{SharedStore, StoreError, KEY_PREFIX};

/// How many times a read-modify-write is retried when another worker wrote in between.
const CAS_ATTEMPTS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedToken {
    pub access_token: Secret,
    pub issued_at_ms: u64,
    pub refresh_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureState {
    pub failure: Failure,
    pub at_ms: u64,
    /// Consecutive failures, 1 for the first.
    pub count: u32,
    /// No new attempt before this instant.
    pub retry_at_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<CachedToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureState>,
}

/// What a request should do, given the record for its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Use this token; when `refresh` is set, also start a refresh in the background.
    Use { token: Secret, refresh: bool },
    /// No usable token and the last attempt failed recently: refuse until `retry_at_ms`.
    Backoff(FailureState),
    /// No usable token: fetch one and wait for it.
    Miss,
}

/// Decides what a request does at `now_ms`.
pub fn lookup(record: Option<&Record>, now_ms: u64) -> Lookup {
    let Some(record) = record else {
        return Lookup::Miss;
    };
    let backing_off = record.failure.as_ref().filter(|f| now_ms < f.retry_at_ms);
    match &record.token {
        Some(t) if now_ms < t.expires_at_ms => Lookup::Use {
            token: t.access_token.clone(),
            refresh: now_ms >= t.refresh_at_ms && backing_off.is_none(),
        },
        _ => match backing_off {
            Some(f) => Lookup::Backoff(f.clone()),
            None => Lookup::Miss,
        },
    }
}

impl Record {
    /// The record after a successful exchange: the new token, and the failure history cleared.
    pub fn succeeded(token: CachedToken) -> Record {
        Record {
            token: Some(token),
            failure: None,
        }
    }

    /// The record after a failed attempt: a still-valid token is kept, and the next attempt is
    /// pushed back exponentially (or by the server's `Retry-After`).
    pub fn failed(
        previous: Option<&Record>,
        failure: Failure,
        now_ms: u64,
        retry_after_s: Option<u64>,
        jitter: u16,
    ) -> Record {
        let count = previous
            .and_then(|r| r.failure.as_ref())
            .map_or(1, |f| f.count.saturating_add(1));
        let token = previous
            .and_then(|r| r.token.clone())
            .filter(|t| now_ms < t.expires_at_ms);
        Record {
            token,
            failure: Some(FailureState {
                failure,
                at_ms: now_ms,
                count,
                retry_at_ms: now_ms + lifetime::backoff_ms(count, retry_after_s, jitter),
            }),
        }
    }

    /// The record without its token, if the token is the one with `fingerprint`
    /// (the API refused it); `None` when there is nothing to change.
    pub fn invalidated(&self, fingerprint: &str) -> Option<Record> {
        let t = self.token.as_ref()?;
        (t.access_token.fingerprint() == fingerprint).then(|| Record {
            token: None,
            failure: self.failure.clone(),
        })
    }
}

/// How long a record with nothing usable left is kept before it may be cleared.
pub const SWEEP_GRACE_MS: u64 = 5 * 60 * 1000;

impl Record {
    /// True when the record holds nothing a request could use or learn from: no unexpired token
    /// and no backoff in force, for at least [`SWEEP_GRACE_MS`].
    pub fn is_spent(&self, now_ms: u64) -> bool {
        let token_done = self
            .token
            .as_ref()
            .is_none_or(|t| t.expires_at_ms.saturating_add(SWEEP_GRACE_MS) <= now_ms);
        let failure_done = self
            .failure
            .as_ref()
            .is_none_or(|f| f.retry_at_ms.saturating_add(SWEEP_GRACE_MS) <= now_ms);
        token_done && failure_done
    }
}

/// Empties the value under `key` if it is a spent [`Record`]. Envoy's shared data has no delete,
/// so the key stays, but a per-request identity whose subject rotated away no longer holds a
/// token's worth of memory. Returns whether it cleared the value.
pub fn clear_if_spent(store: &dyn SharedStore, key: &str, now_ms: u64) -> Result<bool, StoreError> {
    let Some((bytes, cas)) = store.get(key)? else {
        return Ok(false);
    };
    if bytes.is_empty() {
        return Ok(false);
    }
    let spent = serde_json::from_slice::<Record>(&bytes).map_or(true, |r| r.is_spent(now_ms));
    if !spent {
        return Ok(false);
    }
    match store.set(key, b"", Some(cas)) {
        Ok(()) => Ok(true),
        // Someone wrote a fresh record meanwhile: it is not spent.
        Err(StoreError::CasMismatch) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The gateway's subject token, fetched from its platform source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubjectRecord {
    pub subject: Secret,
    /// The subject's `exp`, in seconds.
    pub exp_s: Option<u64>,
    pub fetched_at_ms: u64,
    /// From this instant the subject is fetched again before the next exchange.
    pub refresh_at_ms: u64,
    /// After this instant the subject is never used.
    pub expires_at_ms: u64,
}

impl SubjectRecord {
    pub fn usable(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }

    pub fn due(&self, now_ms: u64) -> bool {
        now_ms >= self.refresh_at_ms
    }

    /// True when an exchange may use this subject instead of fetching one: fetched moments ago
    /// (by a periodic re-read, or by a leader that lost its exchange) and still good. Otherwise
    /// an exchange fetches afresh, so a token is never capped by an old subject's last seconds.
    pub fn reusable(&self, now_ms: u64) -> bool {
        self.usable(now_ms)
            && !self.due(now_ms)
            && now_ms.saturating_sub(self.fetched_at_ms) <= SUBJECT_REUSE_MS
    }
}

/// How recent a fetched subject must be for an exchange to use it without fetching again.
pub const SUBJECT_REUSE_MS: u64 = 5_000;

pub fn token_key(identity: &IdentityKey) -> String {
    format!("{KEY_PREFIX}tok.{}", identity.as_str())
}

pub fn subject_key(identity: &IdentityKey) -> String {
    format!("{KEY_PREFIX}sub.{}", identity.as_str())
}

/// Reads a JSON value; a missing or undecodable one is `None`.
pub fn read<T: for<'de> Deserialize<'de>>(
    store: &dyn SharedStore,
    key: &str,
) -> Result<Option<(T, u32)>, StoreError> {
    Ok(store
        .get(key)?
        .and_then(|(bytes, cas)| serde_json::from_slice(&bytes).ok().map(|v| (v, cas))))
}

/// The token record of `identity`; a missing, unreadable or undecodable one is `None` (a miss).
pub fn record(store: &dyn SharedStore, identity: &IdentityKey) -> Option<Record> {
    read::<Record>(store, &token_key(identity))
        .ok()
        .flatten()
        .map(|(r, _)| r)
}

/// Read-modify-write with CAS: `change` gets the current value and returns the new one, or
/// `None` to leave it as it is. Returns what was written.
pub fn update<T, F>(
    store: &dyn SharedStore,
    key: &str,
    mut change: F,
) -> Result<Option<T>, StoreError>
where
    T: Serialize + for<'de> Deserialize<'de>,
    F: FnMut(Option<&T>) -> Option<T>,
{
    for _ in 0..CAS_ATTEMPTS {
        let current = store.get(key)?;
        let cas = current.as_ref().map(|(_, cas)| *cas);
        let value: Option<T> = current.and_then(|(bytes, _)| serde_json::from_slice(&bytes).ok());
        let Some(next) = change(value.as_ref()) else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(&next).map_err(|_| StoreError::Host(0))?;
        match store.set(key, &bytes, cas) {
            Ok(()) => return Ok(Some(next)),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::CasMismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Code;
    use crate::shared::MemoryStore;

    const NOW: u64 = 1_700_000_000_000;

    fn token(refresh_in: u64, expires_in: u64) -> CachedToken {
        CachedToken {
            access_token: Secret::new("at-1"),
            issued_at_ms: NOW,
            refresh_at_ms: NOW + refresh_in,
            expires_at_ms: NOW + expires_in,
            scope: None,
        }
    }

    fn failure() -> Failure {
        Failure::new(Code::TokenExchangeFailed, "boom")
    }

    #[test]
    fn lookup_states() {
        assert_eq!(lookup(None, NOW), Lookup::Miss);
        let r = Record::succeeded(token(100, 200));
        assert_eq!(
            lookup(Some(&r), NOW),
            Lookup::Use {
                token: Secret::new("at-1"),
                refresh: false
            }
        );
        assert_eq!(
            lookup(Some(&r), NOW + 100),
            Lookup::Use {
                token: Secret::new("at-1"),
                refresh: true
            }
        );
        assert_eq!(
            lookup(Some(&r), NOW + 199),
            Lookup::Use {
                token: Secret::new("at-1"),
                refresh: true
            }
        );
        assert_eq!(
            lookup(Some(&r), NOW + 200),
            Lookup::Miss,
            "never used at or after expiry"
        );
    }

    #[test]
    fn failures_back_off_but_keep_a_valid_token() {
        let r = Record::succeeded(token(100, 5_000));
        let f = Record::failed(Some(&r), failure(), NOW + 150, None, 0);
        assert_eq!(f.failure.as_ref().unwrap().count, 1);
        assert_eq!(f.failure.as_ref().unwrap().retry_at_ms, NOW + 1_150);
        // Still valid token: served, no refresh during the backoff, refresh again after it.
        assert_eq!(
            lookup(Some(&f), NOW + 200),
            Lookup::Use {
                token: Secret::new("at-1"),
                refresh: false
            }
        );
        assert_eq!(
            lookup(Some(&f), NOW + 1_150),
            Lookup::Use {
                token: Secret::new("at-1"),
                refresh: true
            }
        );
        // Expired token during backoff: refused; after backoff: a miss.
        let g = Record::failed(Some(&f), failure(), NOW + 5_000, None, 0);
        assert_eq!(g.token, None);
        assert_eq!(g.failure.as_ref().unwrap().count, 2);
        assert!(matches!(lookup(Some(&g), NOW + 5_001), Lookup::Backoff(_)));
        assert_eq!(lookup(Some(&g), NOW + 7_000), Lookup::Miss);
        // Success clears the history.
        assert_eq!(Record::succeeded(token(1, 2)).failure, None);
    }

    #[test]
    fn invalidation_only_removes_the_refused_token() {
        let r = Record::succeeded(token(100, 200));
        assert_eq!(r.invalidated("000000000000"), None);
        let fp = Secret::new("at-1").fingerprint();
        assert_eq!(r.invalidated(&fp).unwrap().token, None);
    }

    #[test]
    fn undecodable_values_are_misses() {
        let s = MemoryStore::default();
        let id = IdentityKey::from_raw("ab");
        s.set(&token_key(&id), b"\x00garbage", None).unwrap();
        assert!(read::<Record>(&s, &token_key(&id)).unwrap().is_none());
        s.set(&token_key(&id), b"", None).unwrap();
        assert!(read::<Record>(&s, &token_key(&id)).unwrap().is_none());
    }

    #[test]
    fn update_round_trips_and_keys_are_versioned() {
        let s = MemoryStore::default();
        let id = IdentityKey::from_raw("ab");
        let key = token_key(&id);
        assert_eq!(key, "openai_wif.v1.tok.ab");
        assert_eq!(subject_key(&id), "openai_wif.v1.sub.ab");
        let written = update(&s, &key, |_: Option<&Record>| {
            Some(Record::succeeded(token(1, 2)))
        })
        .unwrap();
        assert!(written.is_some());
        let (back, _) = read::<Record>(&s, &key).unwrap().unwrap();
        assert_eq!(back, Record::succeeded(token(1, 2)));
        let none = update(&s, &key, |_: Option<&Record>| None).unwrap();
        assert!(none.is_none());
    }

    #[test]
    fn only_spent_records_are_cleared() {
        let s = MemoryStore::default();
        let live = Record::succeeded(token(100, 200));
        s.set("live", &serde_json::to_vec(&live).unwrap(), None)
            .unwrap();
        assert!(!clear_if_spent(&s, "live", NOW + 199).unwrap());
        assert!(!clear_if_spent(&s, "live", NOW + 200 + SWEEP_GRACE_MS - 1).unwrap());
        assert!(clear_if_spent(&s, "live", NOW + 200 + SWEEP_GRACE_MS).unwrap());
        assert_eq!(s.get("live").unwrap().unwrap().0, b"");
        assert!(
            !clear_if_spent(&s, "live", NOW + 10 * SWEEP_GRACE_MS).unwrap(),
            "already empty"
        );
        assert!(!clear_if_spent(&s, "missing", NOW).unwrap());
        let failing = Record::failed(None, failure(), NOW, Some(300), 0);
        s.set("failing", &serde_json::to_vec(&failing).unwrap(), None)
            .unwrap();
        assert!(
            !clear_if_spent(&s, "failing", NOW + SWEEP_GRACE_MS).unwrap(),
            "backoff still in force"
        );
        assert!(clear_if_spent(&s, "failing", NOW + 300_000 + SWEEP_GRACE_MS).unwrap());
        s.set("garbage", b"\x01", None).unwrap();
        assert!(clear_if_spent(&s, "garbage", NOW).unwrap());
    }

    fn subject(fetched_at_ms: u64) -> SubjectRecord {
        SubjectRecord {
            subject: Secret::new("s.u.b"),
            exp_s: Some((NOW + 3_600_000) / 1000),
            fetched_at_ms,
            refresh_at_ms: NOW + 30_000,
            expires_at_ms: NOW + 3_570_000,
        }
    }

    #[test]
    fn subjects_are_reused_only_when_just_fetched() {
        let s = subject(NOW);
        assert!(s.reusable(NOW + SUBJECT_REUSE_MS));
        assert!(!s.reusable(NOW + SUBJECT_REUSE_MS + 1));
        let due = SubjectRecord {
            refresh_at_ms: NOW + 1,
            ..subject(NOW)
        };
        assert!(!due.reusable(NOW + 1));
        assert!(s.usable(NOW + 3_569_999) && !s.usable(NOW + 3_570_000));
    }

    /// A store whose value changes under the first write, as when another worker writes.
    struct Racy {
        inner: MemoryStore,
        raced: std::cell::Cell<bool>,
    }

    impl SharedStore for Racy {
        fn get(&self, key: &str) -> Result<Option<crate::shared::Versioned>, StoreError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            if !self.raced.replace(true) {
                self.inner.set(key, br#"{"failure":null}"#, None)?;
            }
            self.inner.set(key, value, cas)
        }
    }

    #[test]
    fn update_retries_when_another_worker_wrote_first() {
        let s = Racy {
            inner: MemoryStore::default(),
            raced: false.into(),
        };
        s.inner.set("k", b"{}", None).unwrap();
        let mut calls = 0;
        update(&s, "k", |_: Option<&Record>| {
            calls += 1;
            Some(Record::succeeded(token(1, 2)))
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(
            read::<Record>(&s.inner, "k").unwrap().unwrap().0,
            Record::succeeded(token(1, 2))
        );
    }
}
