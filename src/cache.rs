//! The token cache in shared data: a fixed table of slots, seen by every worker.
//!
//! Envoy's shared data has no delete, so a key written once stays for the life of the process.
//! Keys are therefore slot numbers, never identities: the table has `max_identities` slots
//! (`openai_wif.v2.slot.<n>`), and whatever callers send, it never holds more. An identity may
//! live in any of [`WAYS`] slots starting at its home slot; each [`Record`] names the identity it
//! belongs to, so a slot is never read as another identity's. When all of an identity's slots
//! are taken, the least valuable record there is replaced: a spent one first, then one that only
//! remembers a failure, then the one written longest ago (tokens in use are refreshed, and so
//! rewritten, while they are used: the oldest write is the least recently used identity). A
//! record that only remembers a failure never replaces a live token: a flood of forged tokens
//! cannot push out callers that have one.
//!
//! A record holds the current access token (if any) with its deadlines, and the last failure (if
//! any) with its backoff. [`lookup`] turns a record into the one decision a request needs. A
//! value that does not decode is a miss, never an error.
//!
//! The same module stores the gateway's subject token for platform sources ([`SubjectRecord`]),
//! under one key per configured gateway identity.

use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::identity::IdentityKey;
use crate::lifetime;
use crate::memo::Generations;
use crate::reply::Failure;
use crate::secret::Secret;
use crate::shared::{self, SharedStore, StoreError, CAS_ATTEMPTS, KEY_PREFIX};

/// How many slots an identity may occupy: the candidates searched on a lookup.
pub const WAYS: u32 = 4;

/// The eviction class of a record with a token still in use (see `Record::value`).
const LIVE_TOKEN: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedToken {
    pub access_token: Secret,
    /// The token's [`Secret::fingerprint`], kept so a hit never hashes the token again.
    pub fingerprint: Rc<str>,
    pub refresh_at_ms: u64,
    pub expires_at_ms: u64,
}

impl CachedToken {
    pub fn new(access_token: Secret, refresh_at_ms: u64, expires_at_ms: u64) -> Self {
        CachedToken {
            fingerprint: access_token.fingerprint(),
            access_token,
            refresh_at_ms,
            expires_at_ms,
        }
    }
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
    /// The identity this record belongs to (its whole key, not a prefix).
    pub identity: String,
    pub written_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<CachedToken>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureState>,
    /// When OpenAI's 401 last made this identity drop its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalidated_at_ms: Option<u64>,
}

/// Where an identity's token stands at one instant: the one decision every caller reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A token, not yet due for refresh.
    Fresh(CachedToken),
    /// A token in the last part of its life: use it, and refresh in the background.
    RefreshDue(CachedToken),
    /// A valid token while the last refresh failed: use it, and do not refresh before the
    /// backoff ends.
    ServingWhileBackingOff(CachedToken),
    /// No usable token and the last attempt failed recently: refuse until `retry_at_ms`.
    BackingOff(FailureState),
    /// No usable token: fetch one and wait for it.
    Miss,
}

impl Lookup {
    /// The token to use, in every state that has one.
    pub fn token(&self) -> Option<&CachedToken> {
        match self {
            Lookup::Fresh(t) | Lookup::RefreshDue(t) | Lookup::ServingWhileBackingOff(t) => Some(t),
            Lookup::BackingOff(_) | Lookup::Miss => None,
        }
    }

    /// True when a fetch should start now.
    pub fn wants_fetch(&self) -> bool {
        matches!(self, Lookup::RefreshDue(_) | Lookup::Miss)
    }
}

/// Decides where `record`'s token stands at `now_ms`.
pub fn lookup(record: Option<&Record>, now_ms: u64) -> Lookup {
    let Some(record) = record else {
        return Lookup::Miss;
    };
    let backing_off = record.failure.as_ref().filter(|f| now_ms < f.retry_at_ms);
    match (&record.token, backing_off) {
        (Some(t), None) if now_ms < t.expires_at_ms && now_ms >= t.refresh_at_ms => {
            Lookup::RefreshDue(t.clone())
        }
        (Some(t), None) if now_ms < t.expires_at_ms => Lookup::Fresh(t.clone()),
        (Some(t), Some(_)) if now_ms < t.expires_at_ms => Lookup::ServingWhileBackingOff(t.clone()),
        (_, Some(f)) => Lookup::BackingOff(f.clone()),
        (_, None) => Lookup::Miss,
    }
}

impl Record {
    /// The record after a successful exchange: the new token, the failure history cleared.
    pub fn succeeded(previous: Option<&Record>, token: CachedToken, now_ms: u64) -> Record {
        Record {
            identity: String::new(),
            written_at_ms: now_ms,
            token: Some(token),
            failure: None,
            invalidated_at_ms: previous.and_then(|r| r.invalidated_at_ms),
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
            identity: String::new(),
            written_at_ms: now_ms,
            token,
            failure: Some(FailureState {
                failure,
                at_ms: now_ms,
                count,
                retry_at_ms: now_ms + lifetime::backoff_ms(count, retry_after_s, jitter),
            }),
            invalidated_at_ms: previous.and_then(|r| r.invalidated_at_ms),
        }
    }

    /// The record without its token, if the token is the one with `fingerprint` (the API
    /// refused it) and no invalidation happened within `interval_ms`; `None` when there is
    /// nothing to change. The throttle keeps a caller who can provoke 401s from draining the
    /// token everyone uses: within the interval, OpenAI's 401 goes back to the caller as is.
    pub fn invalidated(&self, fingerprint: &str, now_ms: u64, interval_ms: u64) -> Option<Record> {
        let t = self.token.as_ref()?;
        if *t.fingerprint != *fingerprint {
            return None;
        }
        if self
            .invalidated_at_ms
            .is_some_and(|at| now_ms < at.saturating_add(interval_ms))
        {
            return None;
        }
        Some(Record {
            token: None,
            invalidated_at_ms: Some(now_ms),
            written_at_ms: now_ms,
            ..self.clone()
        })
    }
}

/// How long a record with nothing usable left is kept before it may be cleared.
pub const SWEEP_GRACE_MS: u64 = 5 * 60 * 1000;

impl Record {
    /// True when the record holds nothing a request could use or learn from: no unexpired token,
    /// no backoff and no invalidation throttle in force, for at least [`SWEEP_GRACE_MS`].
    pub fn is_spent(&self, now_ms: u64) -> bool {
        let past = |t: u64| t.saturating_add(SWEEP_GRACE_MS) <= now_ms;
        self.token.as_ref().is_none_or(|t| past(t.expires_at_ms))
            && self.failure.as_ref().is_none_or(|f| past(f.retry_at_ms))
            && self.invalidated_at_ms.is_none_or(past)
    }

    /// Eviction order when an identity's slots are all taken: lower goes first.
    fn value(&self, now_ms: u64) -> (u8, u64) {
        if self.is_spent(now_ms) {
            (0, self.written_at_ms)
        } else if self
            .token
            .as_ref()
            .is_none_or(|t| t.expires_at_ms <= now_ms)
        {
            (1, self.written_at_ms)
        } else {
            (LIVE_TOKEN, self.written_at_ms)
        }
    }
}

/// The slot table: where each identity's record lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    slots: u32,
}

/// A slot's record as the warm path uses it: decoded once per value the slot takes, with the
/// `Authorization` value of its token ready to set.
#[derive(Debug)]
pub struct Decoded {
    pub record: Record,
    pub bearer: Option<Vec<u8>>,
}

impl Decoded {
    pub fn new(record: Record) -> Self {
        let bearer = record
            .token
            .as_ref()
            .map(|t| crate::host::bearer(&t.access_token));
        Decoded { record, bearer }
    }
}

/// Per VM: each slot's last bytes and what they decoded to.
pub type RecordMemo = Generations<u32, (Vec<u8>, Rc<Decoded>)>;

/// Slots remembered per VM, and their bytes (each slot counted at twice its size).
pub const RECORD_MEMO_ENTRIES: usize = 2048;
pub const RECORD_MEMO_BYTES: usize = 1 << 20;

/// A slot's shared-data key, formatted without allocating.
struct SlotKey {
    buf: [u8; 40],
    len: usize,
}

impl SlotKey {
    fn new(slot: u32) -> Self {
        let mut buf = [0u8; 40];
        let prefix = KEY_PREFIX.as_bytes();
        let mut len = prefix.len() + 5;
        buf[..prefix.len()].copy_from_slice(prefix);
        buf[prefix.len()..len].copy_from_slice(b"slot.");
        let mut digits = [0u8; 10];
        let mut n = slot;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let d = &digits[i..];
        buf[len..len + d.len()].copy_from_slice(d);
        len += d.len();
        SlotKey { buf, len }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

/// A record as found in its slot, with the slot's CAS number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub slot: u32,
    pub record: Record,
    pub cas: u32,
}

impl Table {
    pub fn new(max_identities: u32) -> Table {
        Table {
            slots: max_identities.max(1),
        }
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn slot_key(slot: u32) -> String {
        format!("{KEY_PREFIX}slot.{slot}")
    }

    /// The slots `identity` may live in, home slot first.
    pub fn candidates(&self, identity: &IdentityKey) -> impl Iterator<Item = u32> {
        let home = u32::try_from(identity.home() % u64::from(self.slots)).unwrap_or(0);
        let slots = self.slots;
        (0..WAYS.min(slots)).map(move |i| (home + i) % slots)
    }

    /// The record of `identity`, if one of its slots holds it.
    pub fn find(&self, store: &dyn SharedStore, identity: &IdentityKey) -> Option<Found> {
        self.candidates(identity).find_map(|slot| {
            let (record, cas) = shared::read::<Record>(store, &Self::slot_key(slot)).ok()??;
            (record.identity == identity.as_str()).then_some(Found { slot, record, cas })
        })
    }

    /// [`Table::find`] for the warm path: a slot whose bytes are the ones `memo` decoded last
    /// time is not decoded again (the bytes are compared whole, so the memo can never answer
    /// with another record than the slot holds now).
    pub fn find_memo(
        &self,
        store: &dyn SharedStore,
        identity: &IdentityKey,
        memo: &mut RecordMemo,
    ) -> Option<Rc<Decoded>> {
        self.candidates(identity).find_map(|slot| {
            let (bytes, _cas) = store.get(SlotKey::new(slot).as_str()).ok()??;
            let decoded = match memo.get(&slot) {
                Some((seen, decoded)) if *seen == bytes => decoded.clone(),
                _ => {
                    let record: Record = serde_json::from_slice(&bytes).ok()?;
                    let decoded = Rc::new(Decoded::new(record));
                    let cost = 2 * bytes.len() + 64;
                    memo.insert(slot, (bytes, decoded.clone()), cost);
                    decoded
                }
            };
            (decoded.record.identity == identity.as_str()).then_some(decoded)
        })
    }

    /// The record of `identity` (a missing, unreadable or undecodable one is `None`: a miss).
    pub fn record(&self, store: &dyn SharedStore, identity: &IdentityKey) -> Option<Record> {
        self.find(store, identity).map(|f| f.record)
    }

    /// Read-modify-write of `identity`'s record with CAS. `change` gets the current record
    /// (`None` when there is none) and returns the new one, or `None` to leave it. A new record
    /// takes a free slot or replaces the least valuable of the identity's slots. Returns what was
    /// written.
    pub fn update<F>(
        &self,
        store: &dyn SharedStore,
        identity: &IdentityKey,
        now_ms: u64,
        mut change: F,
    ) -> Result<Option<Record>, StoreError>
    where
        F: FnMut(Option<&Record>) -> Option<Record>,
    {
        for _ in 0..CAS_ATTEMPTS {
            let mut own = None;
            // (slot, cas, value): the best slot to take if the identity has none.
            let mut victim: Option<(u32, Option<u32>, (u8, u64))> = None;
            for slot in self.candidates(identity) {
                let (found, cas) = match store.get(&Self::slot_key(slot))? {
                    Some((bytes, cas)) => {
                        (serde_json::from_slice::<Record>(&bytes).ok(), Some(cas))
                    }
                    None => (None, None),
                };
                let value = match &found {
                    Some(r) if r.identity == identity.as_str() => {
                        own = Some((slot, cas, r.clone()));
                        break;
                    }
                    Some(r) => r.value(now_ms),
                    None => (0, 0),
                };
                if victim.is_none_or(|(_, _, v)| value < v) {
                    victim = Some((slot, cas, value));
                }
            }
            let (slot, cas, current, evicts_a_token) = match own {
                Some((slot, cas, record)) => (slot, cas, Some(record), false),
                None => match victim {
                    Some((slot, cas, (class, _))) => (slot, cas, None, class == LIVE_TOKEN),
                    None => return Ok(None),
                },
            };
            let Some(mut next) = change(current.as_ref()) else {
                return Ok(None);
            };
            // A record that only remembers a failure (a forged token, say) never pushes out
            // another identity's live token: it is not stored, and the identity stays unknown.
            if evicts_a_token && next.token.is_none() {
                return Ok(None);
            }
            next.identity = identity.as_str().to_string();
            let bytes = serde_json::to_vec(&next).map_err(|_| StoreError::Encoding)?;
            match store.set(&Self::slot_key(slot), &bytes, cas) {
                Ok(()) => return Ok(Some(next)),
                Err(StoreError::CasMismatch) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Contended)
    }

    /// Empties spent records in `count` slots from `start` (wrapping), so an identity that left
    /// stops holding a token's worth of memory. Returns how many it cleared.
    pub fn sweep(&self, store: &dyn SharedStore, start: u32, count: u32, now_ms: u64) -> u32 {
        let mut cleared = 0;
        for i in 0..count.min(self.slots) {
            let key = Self::slot_key((start + i) % self.slots);
            if let Ok(true) = clear_if_spent(store, &key, now_ms) {
                cleared += 1;
            }
        }
        cleared
    }
}

/// Empties the value under `key` if it is a spent (or undecodable) [`Record`].
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

/// The gateway's subject: one key per configured gateway identity, so bounded by configuration.
pub fn subject_key(identity: &IdentityKey) -> String {
    format!("{KEY_PREFIX}sub.{}", identity.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Code;
    use crate::shared::MemoryStore;

    const NOW: u64 = 1_700_000_000_000;

    fn token(refresh_in: u64, expires_in: u64) -> CachedToken {
        CachedToken::new(Secret::new("at-1"), NOW + refresh_in, NOW + expires_in)
    }

    fn failure() -> Failure {
        Failure::new(Code::TokenExchangeFailed, "boom")
    }

    fn id(n: u64) -> IdentityKey {
        IdentityKey::from_raw(&format!("{n:016x}{}", "0".repeat(48)))
    }

    #[test]
    fn slot_keys_are_formatted_alike_with_and_without_allocating() {
        for slot in [0, 7, 10, 9_999, 123_456, u32::MAX] {
            assert_eq!(SlotKey::new(slot).as_str(), Table::slot_key(slot));
        }
    }

    #[test]
    fn lookup_states() {
        assert_eq!(lookup(None, NOW), Lookup::Miss);
        let t = token(100, 200);
        let r = Record::succeeded(None, t.clone(), NOW);
        assert_eq!(lookup(Some(&r), NOW), Lookup::Fresh(t.clone()));
        assert_eq!(lookup(Some(&r), NOW + 100), Lookup::RefreshDue(t.clone()));
        assert_eq!(lookup(Some(&r), NOW + 199), Lookup::RefreshDue(t.clone()));
        assert!(lookup(Some(&r), NOW + 199).wants_fetch() && !lookup(Some(&r), NOW).wants_fetch());
        assert_eq!(
            lookup(Some(&r), NOW + 200),
            Lookup::Miss,
            "never used at or after expiry"
        );
        assert_eq!(t.fingerprint, Secret::new("at-1").fingerprint());
    }

    #[test]
    fn failures_back_off_but_keep_a_valid_token() {
        let t = token(100, 5_000);
        let r = Record::succeeded(None, t.clone(), NOW);
        let f = Record::failed(Some(&r), failure(), NOW + 150, None, 0);
        assert_eq!(f.failure.as_ref().unwrap().count, 1);
        assert_eq!(f.failure.as_ref().unwrap().retry_at_ms, NOW + 1_150);
        // Still valid token: served, no refresh during the backoff, refresh again after it.
        assert_eq!(
            lookup(Some(&f), NOW + 200),
            Lookup::ServingWhileBackingOff(t.clone())
        );
        assert!(!lookup(Some(&f), NOW + 200).wants_fetch());
        assert_eq!(lookup(Some(&f), NOW + 1_150), Lookup::RefreshDue(t.clone()));
        // Expired token during backoff: refused; after backoff: a miss.
        let g = Record::failed(Some(&f), failure(), NOW + 5_000, None, 0);
        assert_eq!(g.token, None);
        assert_eq!(g.failure.as_ref().unwrap().count, 2);
        assert!(matches!(
            lookup(Some(&g), NOW + 5_001),
            Lookup::BackingOff(_)
        ));
        assert_eq!(lookup(Some(&g), NOW + 5_001).token(), None);
        assert_eq!(lookup(Some(&g), NOW + 7_000), Lookup::Miss);
        // Success clears the history.
        assert_eq!(Record::succeeded(Some(&g), token(1, 2), NOW).failure, None);
    }

    #[test]
    fn invalidation_removes_only_the_refused_token_at_most_once_per_interval() {
        let r = Record::succeeded(None, token(100, 200_000), NOW);
        assert_eq!(r.invalidated("000000000000", NOW, 30_000), None);
        let fp = Secret::new("at-1").fingerprint();
        let dropped = r.invalidated(&fp, NOW, 30_000).unwrap();
        assert_eq!(dropped.token, None);
        assert_eq!(dropped.invalidated_at_ms, Some(NOW));
        // The next exchange keeps the throttle's memory...
        let again = Record::succeeded(Some(&dropped), token(100, 200_000), NOW + 10);
        assert_eq!(again.invalidated(&fp, NOW + 29_999, 30_000), None);
        // ...until the interval has passed.
        assert!(again.invalidated(&fp, NOW + 30_000, 30_000).is_some());
        // An interval of zero never throttles.
        assert!(again.invalidated(&fp, NOW + 11, 0).is_some());
    }

    #[test]
    fn records_live_in_their_identitys_slots_and_name_it() {
        let s = MemoryStore::default();
        let table = Table::new(100);
        let a = id(7);
        assert_eq!(table.candidates(&a).collect::<Vec<_>>(), vec![7, 8, 9, 10]);
        assert_eq!(Table::slot_key(7), "openai_wif.v2.slot.7");
        let written = table
            .update(&s, &a, NOW, |_| {
                Some(Record::succeeded(None, token(1, 2), NOW))
            })
            .unwrap()
            .unwrap();
        assert_eq!(written.identity, a.as_str());
        let found = table.find(&s, &a).unwrap();
        assert_eq!((found.slot, found.record), (7, written));
        // Another identity with the same home slot takes the next one and never reads a's.
        let b = id(107);
        assert_eq!(table.record(&s, &b), None);
        table
            .update(&s, &b, NOW, |_| {
                Some(Record::failed(None, failure(), NOW, None, 0))
            })
            .unwrap();
        assert_eq!(table.find(&s, &b).unwrap().slot, 8);
        assert!(table.record(&s, &a).unwrap().token.is_some());
        assert!(table.record(&s, &b).unwrap().token.is_none());
        // Leaving a record unchanged writes nothing.
        assert_eq!(table.update(&s, &a, NOW, |_| None).unwrap(), None);
    }

    #[test]
    fn undecodable_values_are_misses_and_free_slots() {
        let s = MemoryStore::default();
        let table = Table::new(10);
        let a = id(3);
        s.set(&Table::slot_key(3), b"\x00garbage", None).unwrap();
        s.set(&Table::slot_key(4), b"", None).unwrap();
        assert_eq!(table.record(&s, &a), None);
        table
            .update(&s, &a, NOW, |_| {
                Some(Record::succeeded(None, token(1, 2), NOW))
            })
            .unwrap();
        assert_eq!(table.find(&s, &a).unwrap().slot, 3);
    }

    #[test]
    fn a_full_table_replaces_the_least_valuable_record_and_stays_bounded() {
        let s = MemoryStore::default();
        let table = Table::new(4);
        // Four identities that share all four slots: live tokens written at different times.
        for n in 0..4 {
            table
                .update(&s, &id(n), NOW + n, |_| {
                    Some(Record::succeeded(None, token(100_000, 200_000), NOW + n))
                })
                .unwrap();
        }
        // A failure-only record (a forged token) never pushes out a live token...
        let forged = id(100);
        let written = table
            .update(&s, &forged, NOW + 10, |_| {
                Some(Record::failed(None, failure(), NOW + 10, None, 0))
            })
            .unwrap();
        assert_eq!(written, None);
        assert!(table.record(&s, &forged).is_none());
        for n in 0..4 {
            assert!(table.record(&s, &id(n)).is_some(), "live tokens stay");
        }
        // ...but a new token replaces the one written longest ago (least recently used).
        let fresh = id(101);
        table
            .update(&s, &fresh, NOW + 11, |_| {
                Some(Record::succeeded(None, token(100_000, 200_000), NOW + 11))
            })
            .unwrap();
        assert!(
            table.record(&s, &id(0)).is_none(),
            "the oldest live token made room"
        );
        assert!(table.record(&s, &fresh).is_some());
        // Once tokens have expired, a failure-only record may take their slots, oldest first.
        let later = NOW + 200_000;
        let failed = id(102);
        table
            .update(&s, &failed, later, |_| {
                Some(Record::failed(None, failure(), later, None, 0))
            })
            .unwrap();
        assert!(table.record(&s, &failed).is_some());
        assert!(
            table.record(&s, &id(1)).is_none(),
            "the oldest expired token made room"
        );
        assert!(table.record(&s, &fresh).is_some(), "a live token stays");
        // A flood of new identities never grows the store beyond the table.
        for n in 1_000..3_000 {
            let at = later + n;
            table
                .update(&s, &id(n), at, |_| {
                    Some(Record::succeeded(None, token(200_000 + n, 300_000 + n), at))
                })
                .unwrap();
        }
        assert_eq!(s.sizes().len(), 4);
    }

    #[test]
    fn a_concurrent_writer_is_never_overwritten_blindly() {
        let s = MemoryStore::default();
        let table = Table::new(1);
        let (a, b) = (id(0), id(1));
        let b_record = Record::succeeded(None, token(1_000, 2_000), NOW);
        let b2 = b.clone();
        s.set(&Table::slot_key(0), b"", None).unwrap();
        s.race_next_write(move |s| {
            Table::new(1)
                .update(s, &b2, NOW, |_| Some(b_record.clone()))
                .unwrap();
        });
        let mut calls = 0;
        table
            .update(&s, &a, NOW, |current| {
                calls += 1;
                assert!(current.is_none());
                Some(Record::failed(None, failure(), NOW, None, 0))
            })
            .unwrap();
        assert_eq!(calls, 2, "the lost write was decided again on what b wrote");
        // Decided again, a's failure does not replace b's live token.
        assert!(table.find(&s, &a).is_none());
        assert!(table.find(&s, &b).is_some());
    }

    #[test]
    fn only_spent_records_are_cleared() {
        let s = MemoryStore::default();
        let live = Record::succeeded(None, token(100, 200), NOW);
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
        let table = Table::new(8);
        for n in 0..8 {
            s.set(
                &Table::slot_key(n),
                &serde_json::to_vec(&failing).unwrap(),
                None,
            )
            .unwrap();
        }
        assert_eq!(table.sweep(&s, 6, 4, NOW + 300_000 + SWEEP_GRACE_MS), 4);
        assert_eq!(s.get(&Table::slot_key(1)).unwrap().unwrap().0, b"");
        assert_ne!(s.get(&Table::slot_key(2)).unwrap().unwrap().0, b"");
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
        assert_eq!(
            subject_key(&id(1)),
            format!("openai_wif.v2.sub.{}", id(1).as_str())
        );
    }
}
