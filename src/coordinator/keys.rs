//! The subject checks (`expect`) and the issuer's keys they verify signatures with.
//!
//! With `expect.jwks_source`, the key set is fetched through an Envoy cluster by one VM at a
//! time (a lease), stored in shared data for every worker, and fetched again when its refresh
//! interval has passed (on the tick) or when a token names a `kid` the set does not hold (at
//! most once per [`UNKNOWN_KID_REFETCH_MS`]). Each VM parses the stored set once per value it
//! takes. While there is no set yet, or while a set is fetched again for an unknown `kid`,
//! requests are answered 503 with `Retry-After`: the OpenAI SDKs retry those.

use serde::{Deserialize, Serialize};

use super::*;
use crate::checks::{self, Jwks, JwksSource, Keys, RefusalKind, Verified};

/// Shared-data key of the fetched key set.
pub fn jwks_key() -> String {
    format!("{KEY_PREFIX}jwks")
}

/// The soonest a token with an unknown `kid` makes the key set be fetched again.
pub const UNKNOWN_KID_REFETCH_MS: u64 = 5_000;
/// Largest key set accepted from the issuer.
const MAX_JWKS_BYTES: usize = 64 * 1024;
/// How long a subject refused by a check is answered from the memo.
const REFUSED_FOR_MS: u64 = 10_000;
/// How often a VM looks at the stored key set (it may be up to 64 KiB): other workers see a
/// set fetched by one within this.
const KEYS_READ_EVERY_MS: u64 = 1_000;

/// The key set as stored in shared data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredKeys {
    /// The issuer's JWKS as fetched (validated before it was stored); empty before the first
    /// successful fetch.
    #[serde(default)]
    document: String,
    #[serde(default)]
    fetched_at_ms: u64,
    /// After a failed fetch: not before this.
    #[serde(default)]
    retry_at_ms: u64,
    #[serde(default)]
    failures: u32,
}

/// A key set parsed by this VM: the shared bytes it came from, when it was fetched, when a
/// fetch may be tried again, and when this VM read it.
pub(super) struct ParsedKeys {
    bytes: Vec<u8>,
    jwks: Option<Rc<Jwks>>,
    fetched_at_ms: u64,
    retry_at_ms: u64,
    read_at_ms: u64,
}

/// Why a subject was not accepted.
pub(super) enum Refused {
    /// By a check: the same bytes get the same answer until `until_ms`.
    Now { failure: Failure, until_ms: u64 },
    /// The keys are being fetched: ask again in a second.
    Retry(Failure),
}

impl<H: Host> Coordinator<H> {
    /// Runs the configured checks on `token` (a workload's or the gateway's subject).
    pub(super) fn check_subject(
        &self,
        config: &Config,
        token: &str,
        now: u64,
    ) -> Result<Option<Verified>, Refused> {
        let Some(expect) = &config.expect else {
            return Ok(None);
        };
        let fetched = match &expect.keys {
            Keys::Source(_) => self.fetched_keys(now),
            Keys::Unchecked | Keys::Inline(_) => None,
        };
        let jwks = fetched.as_ref().map(|(j, _)| &**j);
        let refusal = match checks::check(token, expect, jwks, now / 1000) {
            Ok(verified) => return Ok(Some(verified)),
            Err(refusal) => refusal,
        };
        let fetched_at = fetched.as_ref().map(|(_, at)| *at);
        match refusal.kind {
            RefusalKind::KeysUnavailable => {
                self.want_keys();
                Err(Refused::Retry(refusal.failure()))
            }
            RefusalKind::UnknownKey
                if fetched_at.is_some_and(|at| now >= at + UNKNOWN_KID_REFETCH_MS) =>
            {
                self.want_keys();
                Err(Refused::Retry(Failure::new(
                    Code::SubjectKeysUnavailable,
                    format!(
                        "{refusal}; fetching the issuer's keys again (they may have rotated): retry"
                    ),
                )))
            }
            RefusalKind::UnknownKey | RefusalKind::Invalid => {
                self.count(Counter::SubjectsRefused);
                self.log_debug(
                    "subject_refused",
                    format_args!("subject token refused: {refusal}"),
                );
                // A token refused for its kid is looked at again once the keys may be fetched
                // again; any other refusal holds for these bytes.
                let until_ms = match (refusal.kind, fetched_at) {
                    (RefusalKind::UnknownKey, Some(at)) => at + UNKNOWN_KID_REFETCH_MS,
                    _ => now + REFUSED_FOR_MS,
                };
                Err(Refused::Now {
                    failure: refusal.failure(),
                    until_ms,
                })
            }
        }
    }

    /// The fetched key set (`None` before the first successful fetch) and when it was fetched,
    /// as this VM last read it (at most every [`KEYS_READ_EVERY_MS`]); parsed again only when
    /// the stored bytes change.
    fn fetched_keys(&self, now: u64) -> Option<(Rc<Jwks>, u64)> {
        self.read_keys(now);
        let parsed = self.keys.borrow();
        let p = parsed.as_ref()?;
        p.jwks.clone().map(|j| (j, p.fetched_at_ms))
    }

    fn read_keys(&self, now: u64) {
        if self
            .keys
            .borrow()
            .as_ref()
            .is_some_and(|p| now < p.read_at_ms + KEYS_READ_EVERY_MS)
        {
            return;
        }
        let bytes = match self.host.get(&jwks_key()) {
            Ok(Some((bytes, _))) => bytes,
            _ => Vec::new(),
        };
        let mut parsed = self.keys.borrow_mut();
        if let Some(p) = parsed.as_mut().filter(|p| p.bytes == bytes) {
            p.read_at_ms = now;
            return;
        }
        let stored: StoredKeys = serde_json::from_slice(&bytes).unwrap_or_default();
        let jwks = (!stored.document.is_empty())
            .then(|| Jwks::parse(stored.document.as_bytes()).ok())
            .flatten()
            .map(Rc::new);
        let fetched_again = parsed
            .as_ref()
            .is_some_and(|p| p.jwks.is_some() && p.fetched_at_ms != stored.fetched_at_ms);
        *parsed = Some(ParsedKeys {
            bytes,
            jwks,
            fetched_at_ms: stored.fetched_at_ms,
            retry_at_ms: stored.retry_at_ms,
            read_at_ms: now,
        });
        drop(parsed);
        if fetched_again {
            // Subjects accepted under the old keys are checked again under the new ones.
            self.subjects.borrow_mut().clear();
        }
    }

    /// Asks the root side to fetch the key set (a request cannot make the callout: it would
    /// die with the request).
    fn want_keys(&self) {
        if self.keys_asked.replace(true) {
            return;
        }
        if let Some(q) = self.queue.get() {
            let _ = self.host.enqueue(q);
        }
    }

    /// From the root side (a wake-up or a tick): fetch the key set if it was asked for or is
    /// due, unless a fetch runs here or elsewhere or the last one failed too recently.
    pub(super) fn maintain_keys(&self, now: u64) {
        let Some(config) = self.config() else {
            return;
        };
        let Some(Keys::Source(source)) = config.expect.as_ref().map(|e| &e.keys) else {
            return;
        };
        let asked = self.keys_asked.replace(false);
        if self.keys_call.get().is_some() {
            return;
        }
        let due = || {
            let (have, fetched_at_ms, retry_at_ms) = match self.keys.borrow().as_ref() {
                Some(p) => (p.jwks.is_some(), p.fetched_at_ms, p.retry_at_ms),
                None => (false, 0, 0),
            };
            let stale = now >= fetched_at_ms + lifetime::millis(source.refresh_interval);
            let refetch = asked && now >= fetched_at_ms + UNKNOWN_KID_REFETCH_MS;
            now >= retry_at_ms && (!have || stale || refetch)
        };
        self.read_keys(now);
        if !due() {
            return;
        }
        // What this VM read may be a second old: another worker may have just stored a set.
        if let Some(p) = self.keys.borrow_mut().as_mut() {
            p.read_at_ms = 0;
        }
        self.read_keys(now);
        if !due() {
            return;
        }
        let lease_key = IdentityKey::for_keys(source);
        let deadline = now + lifetime::millis(source.timeout) + 1_000;
        if let Ok(Acquire::Acquired) =
            lease::try_acquire(&self.host, &lease_key, self.owner, now, deadline)
        {
            self.fetch_keys(source, &lease_key);
        }
    }

    fn fetch_keys(&self, source: &JwksSource, lease_key: &IdentityKey) {
        let headers = [
            (":method", "GET".to_string()),
            (":path", source.path.clone()),
            (":authority", source.authority.clone()),
            ("accept", "application/json".to_string()),
        ];
        match self
            .host
            .dispatch_http(&source.cluster, &headers, None, source.timeout)
        {
            Ok(call_id) => self.keys_call.set(Some(call_id)),
            Err(e) => {
                let _ = lease::release(&self.host, lease_key, self.owner);
                self.keys_failed(&format!("cannot call cluster {} ({e})", source.cluster));
            }
        }
    }

    /// The key set's callout came back (`false`: `call_id` is another callout).
    pub(super) fn keys_answered(&self, call_id: u32, body_size: usize) -> bool {
        if self.keys_call.get() != Some(call_id) {
            return false;
        }
        self.keys_call.set(None);
        let Some(config) = self.config() else {
            return true;
        };
        let Some(Keys::Source(source)) = config.expect.as_ref().map(|e| &e.keys) else {
            return true;
        };
        let _ = lease::release(&self.host, &IdentityKey::for_keys(source), self.owner);
        let r = self.host.http_call_response(body_size, MAX_JWKS_BYTES + 1);
        let parsed = match r.status.as_deref() {
            Some("200") if r.body.len() <= MAX_JWKS_BYTES => {
                Jwks::parse(&r.body).map_err(|e| format!("the key set is not usable: {e}"))
            }
            Some("200") => Err(format!("the key set is larger than {MAX_JWKS_BYTES} bytes")),
            Some(status) => Err(format!("HTTP {status}")),
            None => Err("no answer (timeout or connection failure)".to_string()),
        };
        let jwks = match parsed {
            Ok(jwks) => jwks,
            Err(why) => {
                self.keys_failed(&format!("{} from cluster {}", why, source.cluster));
                return true;
            }
        };
        let now = self.host.now_ms();
        let document = String::from_utf8_lossy(&r.body).into_owned();
        let written = shared::update(&self.host, &jwks_key(), |_: Option<&StoredKeys>| {
            Some(StoredKeys {
                document: document.clone(),
                fetched_at_ms: now,
                retry_at_ms: 0,
                failures: 0,
            })
        });
        match written {
            Ok(_) => {
                // Seen here at once; the other workers read it within a second.
                if let Some(p) = self.keys.borrow_mut().as_mut() {
                    p.read_at_ms = 0;
                }
                self.read_keys(now);
                self.count(Counter::JwksFetchOk);
                log::info!(
                    "openai_wif: fetched the issuer's keys from cluster {}: kids {:?}{}",
                    source.cluster,
                    jwks.kids(),
                    if jwks.skipped().is_empty() {
                        String::new()
                    } else {
                        format!(", {} keys skipped", jwks.skipped().len())
                    }
                );
            }
            Err(e) => self.keys_failed(&format!("could not store the key set: {e}")),
        }
        true
    }

    /// A fetch of the key set failed: the previous set (if any) stays in use, and the next
    /// attempt backs off.
    fn keys_failed(&self, why: &str) {
        self.count(Counter::JwksFetchFailed);
        self.log_warn(
            "jwks_fetch_failed",
            format_args!("could not fetch the issuer's keys: {why}"),
        );
        let now = self.host.now_ms();
        let jitter = self.host.jitter();
        let _ = shared::update(&self.host, &jwks_key(), |s: Option<&StoredKeys>| {
            let mut next = s.cloned().unwrap_or_default();
            next.failures = next.failures.saturating_add(1);
            next.retry_at_ms = now + lifetime::backoff_ms(next.failures, None, jitter);
            Some(next)
        });
        if let Some(p) = self.keys.borrow_mut().as_mut() {
            p.read_at_ms = 0;
        }
    }

    /// The 503 (or 401) for a gateway subject that failed a check.
    pub(super) fn refused_gateway_subject(&self, config: &Config, refused: Refused) -> Failure {
        match refused {
            Refused::Retry(f) => f,
            Refused::Now { failure, .. } => Failure::new(
                Code::SubjectSourceUnavailable,
                format!(
                    "the subject token from {}: {}",
                    config.subject.name(),
                    failure.message
                ),
            ),
        }
    }
}
