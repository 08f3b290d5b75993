//! The coordinator: one VM's state machine for requests, fetches and the tokens they share.
//!
//! Envoy runs one VM per worker thread (plus some on the main thread), and each VM has one
//! [`Coordinator`]. Its events come from the proxy-wasm contexts, which only translate:
//!
//! - a request's headers, body, trailers and response headers ([`Coordinator::request_headers`]
//!   and friends), and its end ([`Coordinator::request_done`]);
//! - a callout's answer ([`Coordinator::http_answer`], [`Coordinator::grpc_answer`]);
//! - a tick ([`Coordinator::tick`]) and a wake-up of this VM's queue ([`Coordinator::woken`]).
//!
//! Its effects go out through the [`Host`]: headers set and removed, requests paused, resumed or
//! answered, callouts dispatched, shared data written, counters counted. The same code runs in
//! Envoy over [`crate::host::Envoy`] and in unit tests over `host::fake`, where several
//! coordinators (workers) share one store and one clock.
//!
//! A request for a token the cache does not have pauses as a *waiter*. One fetch per identity
//! runs gateway-wide (a lease in shared data); it moves through two stages:
//!
//! ```text
//!   lease taken ─▶ FetchSubject ─▶ Exchange ─▶ token stored, lease released, waiters resumed
//!   (platform sources only) │            │
//!                           └────────────┴──▶ failure stored with backoff, lease released,
//!                                             waiters answered with the error
//! ```
//!
//! The header source starts at `Exchange` with the workload's token. Waiters on other workers
//! are resolved by their own coordinator's tick, which also takes over leases whose owner is gone
//! and (for platform sources) refreshes the gateway's token before requests need it.
//!
//! State lives in cells and no borrow is held across a host call: resuming or answering a
//! request can make Envoy call back into this VM at once.
//!
//! This file holds the state and configuration; `request.rs` the request side, `fetch.rs` leases,
//! fetches, exchanges and their outcomes, `tick.rs` what runs on the timer.

mod fetch;
mod keys;
mod request;
#[cfg(test)]
mod tests;
mod tick;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use crate::admission::{self, Admit};
use crate::cache::{self, lookup, CachedToken, Lookup, Record, RecordMemo, SubjectRecord, Table};
use crate::callers::{self, CallerSource};
use crate::checks;
use crate::config::{
    Account, Config, Handling, Limits, SubjectSource, PROVIDER_ENV, SERVICE_ACCOUNT_ENV,
};
use crate::exchange;
use crate::host::Host;
use crate::identity::IdentityKey;
use crate::lease::{self, Acquire};
use crate::lifetime;
use crate::logs::{Logs, WINDOW_MS};
use crate::memo::Generations;
use crate::metrics::{Counter, Metrics};
use crate::reply::{Code, Failure, LocalReply};
use crate::secret::{self, Secret};
use crate::shared::{self, KEY_PREFIX};
use crate::subject::{self, header, SourceCall, SourceResponse, MAX_SOURCE_RESPONSE_BYTES};

/// Tick while requests wait on this VM: how soon a token fetched by another worker is seen.
pub const FAST_TICK: Duration = Duration::from_millis(2);
/// Tick otherwise: how precisely background refreshes start.
pub const SLOW_TICK: Duration = Duration::from_millis(250);
/// Lifetime assumed for a platform subject token without `exp`.
const SUBJECT_DEFAULT_LIFETIME_MS: u64 = 300_000;
/// How often spent cache records are looked for, and how many slots per pass.
const SWEEP_EVERY_MS: u64 = 60_000;
const SWEEP_BATCH: u32 = 256;
/// Most fetches this VM's requests may ask for between two wake-ups.
const MAX_FETCH_REQUESTS: usize = 1024;

/// What the context does with the stream after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Pause,
}

/// A subject token sent by a workload, kept while its requests wait so any worker can
/// exchange it.
#[derive(Debug, Clone)]
pub struct Subject {
    pub token: Secret,
    pub exp_s: Option<u64>,
}

/// What this VM found a subject token (by its bytes) to be.
enum Seen {
    /// Accepted, with its identity per account it was used with (by the account's number).
    Accepted {
        subject: Subject,
        identities: Vec<(usize, IdentityKey)>,
    },
    /// Refused: the same bytes get the same answer until `until_ms`.
    Refused { failure: Failure, until_ms: u64 },
}

/// Subject tokens remembered per VM (each generation), and their bytes.
const SUBJECT_MEMO_ENTRIES: usize = 1024;
const SUBJECT_MEMO_BYTES: usize = 1 << 20;
/// How long a subject token refused for its shape is answered from the memo.
const REFUSAL_MEMO_MS: u64 = 10_000;

/// A paused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub context_id: u32,
    pub since_ms: u64,
    pub deadline_ms: u64,
}

/// The requests waiting for one identity on this VM, and what to exchange for them.
#[derive(Debug)]
struct Waiters {
    subject: Option<Subject>,
    account: Account,
    rule: Option<Rc<str>>,
    list: Vec<Waiter>,
}

/// What a fetch is for: an identity, the account it is exchanged for, and the caller rule
/// that selected the account (for its counters).
#[derive(Debug, Clone)]
struct Want {
    identity: IdentityKey,
    subject: Option<Subject>,
    account: Account,
    rule: Option<Rc<str>>,
}

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not one the filter authorises: it flows untouched (but for the subject header).
    Passed,
    /// Paused until the root resumes or answers it; its body and trailers wait too.
    Waiting,
    /// Sent on with a token.
    Released,
    /// Answered locally.
    Answered,
}

#[derive(Debug, Clone)]
struct Request {
    stage: Stage,
    /// The identity and token fingerprint it was sent with, to invalidate on a 401.
    injected: Option<(IdentityKey, Rc<str>)>,
    /// The caller rule it matched.
    rule: Option<Rc<str>>,
}

/// What a fetch is doing.
enum Step {
    /// Fetching the gateway's subject token; then exchange it, or (a periodic re-read) stop.
    FetchSubject { then_exchange: bool },
    /// Exchanging `subject` (none in X.509 mode), whose `exp` is `subject_exp_s`; the subject
    /// is kept to explain a refusal.
    Exchange {
        subject: Option<Secret>,
        subject_exp_s: Option<u64>,
    },
}

/// A gateway identity kept fresh: the account it is exchanged for, and the rule that chose it.
type Gateway = (Account, Option<Rc<str>>);

/// A fetch in flight, by its callout id.
struct Fetch {
    want: Want,
    step: Step,
}

/// An answer to a callout.
pub enum CalloutAnswer {
    Http { body_size: usize },
    Grpc { status: u32, size: usize },
}

pub struct Coordinator<H: Host> {
    host: H,
    /// This VM's root context: where to return after acting on a request's context.
    root_id: u32,
    /// Names this VM in lease records.
    owner: u64,
    config: RefCell<Option<Rc<Config>>>,
    /// Gateway identities to keep fresh (platform sources): one per account in use.
    gateways: RefCell<BTreeMap<IdentityKey, Gateway>>,
    /// The gateway identity of each account the configuration can select, hashed once.
    gateway_keys: RefCell<BTreeMap<Account, IdentityKey>>,
    /// The gateway's subject, whatever it is exchanged for (platform sources).
    source: RefCell<Option<IdentityKey>>,
    /// Counter ids per caller rule: allowed, refused, exchanges.
    rule_counters: RefCell<BTreeMap<Rc<str>, [Option<u32>; 3]>>,
    table: Cell<Table>,
    /// This VM's own wake-up queue: a request enqueues, the root runs the fetches it asked for.
    queue: Cell<Option<u32>>,
    metrics: RefCell<Metrics>,
    logs: RefCell<Logs>,
    debug_logs: RefCell<Logs>,
    requests: RefCell<BTreeMap<u32, Request>>,
    /// Warm-path counts not yet handed to Envoy: (metric id, count).
    pending_counts: RefCell<Vec<(u32, u64)>>,
    /// Subject tokens this VM has seen, by their bytes (header source).
    subjects: RefCell<Generations<Box<[u8]>, Seen>>,
    /// Cache slots this VM has decoded, by their bytes.
    records: RefCell<RecordMemo>,
    /// The issuer's key set as this VM last parsed it (`expect.jwks_source`).
    keys: RefCell<Option<keys::ParsedKeys>>,
    /// A request asked for the key set to be fetched.
    keys_asked: Cell<bool>,
    /// The key set's callout in flight from this VM.
    keys_call: Cell<Option<u32>>,
    waiting: RefCell<BTreeMap<IdentityKey, Waiters>>,
    /// Fetches requests asked for since the last wake-up.
    asked: RefCell<Vec<Want>>,
    fetches: RefCell<BTreeMap<u32, Fetch>>,
    tick: Cell<Option<Duration>>,
    sweep_cursor: Cell<u32>,
    next_sweep_ms: Cell<u64>,
}

impl<H: Host> Coordinator<H> {
    pub fn new(host: H, root_id: u32) -> Self {
        let owner = host.random_u64();
        Coordinator {
            host,
            root_id,
            owner,
            config: RefCell::new(None),
            gateways: RefCell::new(BTreeMap::new()),
            gateway_keys: RefCell::new(BTreeMap::new()),
            source: RefCell::new(None),
            rule_counters: RefCell::new(BTreeMap::new()),
            table: Cell::new(Table::new(Limits::default().max_identities)),
            queue: Cell::new(None),
            metrics: RefCell::new(Metrics::default()),
            logs: RefCell::new(Logs::default()),
            debug_logs: RefCell::new(Logs::default()),
            requests: RefCell::new(BTreeMap::new()),
            pending_counts: RefCell::new(Vec::new()),
            subjects: RefCell::new(Generations::new(SUBJECT_MEMO_ENTRIES, SUBJECT_MEMO_BYTES)),
            records: RefCell::new(Generations::new(
                cache::RECORD_MEMO_ENTRIES,
                cache::RECORD_MEMO_BYTES,
            )),
            keys: RefCell::new(None),
            keys_asked: Cell::new(false),
            keys_call: Cell::new(None),
            waiting: RefCell::new(BTreeMap::new()),
            asked: RefCell::new(Vec::new()),
            fetches: RefCell::new(BTreeMap::new()),
            tick: Cell::new(None),
            sweep_cursor: Cell::new(0),
            next_sweep_ms: Cell::new(0),
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    fn config(&self) -> Option<Rc<Config>> {
        self.config.borrow().clone()
    }

    fn table(&self) -> Table {
        self.table.get()
    }

    fn count(&self, counter: Counter) {
        let id = self.metrics.borrow().id(counter);
        if let Some(id) = id {
            self.host.increment(id, 1);
        }
    }

    /// Counts for a caller rule: 0 allowed, 1 refused, 2 exchanges. Allowed requests are
    /// counted on the next tick, like cache hits.
    fn count_rule(&self, rule: Option<&Rc<str>>, which: usize) {
        let id = rule.and_then(|r| {
            self.rule_counters
                .borrow()
                .get(r)
                .and_then(|ids| ids[which])
        });
        match id {
            Some(id) if which == 0 => self.count_later(id),
            Some(id) => self.host.increment(id, 1),
            None => {}
        }
    }

    /// Counts on the warm path are added up per VM and handed to Envoy on each tick (at most
    /// [`SLOW_TICK`] late): one host call per counter per tick instead of one per request.
    fn count_later(&self, id: u32) {
        let mut pending = self.pending_counts.borrow_mut();
        match pending.iter_mut().find(|(i, _)| *i == id) {
            Some((_, n)) => *n += 1,
            None => pending.push((id, 1)),
        }
    }

    fn flush_counts(&self) {
        let pending = std::mem::take(&mut *self.pending_counts.borrow_mut());
        for (id, n) in pending {
            self.host.increment(id, n);
        }
    }

    /// Filter state that access logs print as `%FILTER_STATE(wasm.<name>:PLAIN)%`; `name` is
    /// the whole property name (`openai_wif.caller`, …).
    fn note(&self, name: &'static str, value: &[u8]) {
        let _ = self.host.set_property(&[name], value);
    }

    /// Logs at warning level, at most once per kind per window (see [`crate::logs`]).
    fn log_warn(&self, kind: &'static str, message: std::fmt::Arguments<'_>) {
        let allowed = self.logs.borrow_mut().allow(kind, self.host.now_ms());
        if allowed {
            log::warn!("openai_wif: {message}");
        }
    }

    fn log_debug(&self, kind: &'static str, message: std::fmt::Arguments<'_>) {
        let allowed = self.debug_logs.borrow_mut().allow(kind, self.host.now_ms());
        if allowed {
            log::debug!("openai_wif: {message}");
        }
    }

    /// Logs how many lines each kind held back in windows that have closed.
    fn flush_logs(&self, now_ms: u64) {
        let window_s = WINDOW_MS / 1000;
        let warned = self.logs.borrow_mut().flush(now_ms);
        for (kind, count) in warned {
            log::warn!("openai_wif: {count} more {kind} events in the last {window_s} s (logged once per window)");
        }
        let debugged = self.debug_logs.borrow_mut().flush(now_ms);
        for (kind, count) in debugged {
            log::debug!("openai_wif: {count} more {kind} events in the last {window_s} s (logged once per window)");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Configuration

    /// Parses and installs the configuration; on error the filter refuses to start.
    pub fn configure(&self, bytes: &[u8]) -> Result<(), String> {
        let config = Config::parse_with_env(bytes, &|name| self.host.env(name))
            .map_err(|e| e.to_string())?;
        if self.queue.get().is_none() {
            let queue = self
                .host
                .register_queue(&queue_name(self.owner))
                .map_err(|e| format!("could not register the wake-up queue: {e}"))?;
            self.queue.set(Some(queue));
            *self.metrics.borrow_mut() = Metrics::define(|name| self.host.define_counter(name));
            let mut rule_counters = self.rule_counters.borrow_mut();
            for rule in config.callers.iter().flatten() {
                let ids = ["allowed", "refused", "exchanges"].map(|what| {
                    self.host
                        .define_counter(&format!("openai_wif.rule.{}.{what}", rule.name))
                });
                rule_counters.insert(rule.name.clone(), ids);
            }
            // Sweeps start at a random slot so the VMs share the work.
            let slots = u64::from(config.limits.max_identities);
            self.sweep_cursor
                .set(u32::try_from(self.host.random_u64() % slots).unwrap_or(0));
        }
        self.table.set(Table::new(config.limits.max_identities));
        // What the memos remember was derived under the previous configuration.
        self.subjects.borrow_mut().clear();
        self.records.borrow_mut().clear();
        *self.keys.borrow_mut() = None;
        lease::ensure_table(&self.host)
            .map_err(|e| format!("could not create the lease table: {e}"))?;
        let mut gateways = self.gateways.borrow_mut();
        gateways.clear();
        let mut keys = self.gateway_keys.borrow_mut();
        keys.clear();
        if config.subject.is_gateway_identity() {
            let accounts = std::iter::once(&config.account)
                .chain(config.callers.iter().flatten().map(|r| &r.account));
            for account in accounts {
                keys.entry(account.clone())
                    .or_insert_with(|| IdentityKey::for_gateway(&config, account));
            }
            *self.source.borrow_mut() = config
                .subject
                .platform()
                .is_some()
                .then(|| IdentityKey::for_source(&config));
            // Without caller rules the gateway acts as one account: warm it up now. With rules,
            // each rule's account is added when its first request arrives.
            if config.callers.is_none() {
                if let Some(key) = keys.get(&config.account) {
                    gateways.insert(key.clone(), (config.account.clone(), None));
                }
            }
        }
        drop((gateways, keys));
        let from = |var: &str| {
            if config.account_from_env.contains(&var) {
                var.to_string()
            } else {
                "the configuration".to_string()
            }
        };
        let service_account = if config.account.service_account_id.is_empty() {
            "service_account_id from each caller rule".to_string()
        } else {
            format!("service_account_id from {}", from(SERVICE_ACCOUNT_ENV))
        };
        let ids_from = format!(
            "identity_provider_id from {}, {service_account}",
            from(PROVIDER_ENV)
        );
        let scope = match &config.scope {
            crate::config::Scope::Hosts(hosts) => format!("hosts {hosts:?}"),
            crate::config::Scope::All => "every request the filter sees".to_string(),
        };
        log::info!(
            "openai_wif {}: subject source {}, token endpoint cluster {}, authorising {scope}, at most {} identities, {} caller rules, {ids_from}",
            env!("CARGO_PKG_VERSION"),
            config.subject.name(),
            config.token_endpoint.cluster,
            config.limits.max_identities,
            config.callers.as_ref().map_or(0, Vec::len),
        );
        *self.config.borrow_mut() = Some(Rc::new(config));
        // The first tick warms the gateway's token up. Not from here: Envoy also configures
        // short-lived VMs (e.g. to check a configuration) whose callouts die with them.
        self.host.set_tick_period(FAST_TICK);
        self.tick.set(Some(FAST_TICK));
        Ok(())
    }
}

fn internal(message: &str) -> Failure {
    Failure::new(Code::InternalError, message)
}

fn subject_record(
    config: &Config,
    subject: Secret,
    exp_s: Option<u64>,
    now: u64,
    jitter: u16,
) -> SubjectRecord {
    let end = exp_s.map_or(now + SUBJECT_DEFAULT_LIFETIME_MS, |e| {
        e.saturating_mul(1000)
    });
    let plan = lifetime::plan(now, end, jitter).unwrap_or(lifetime::Plan {
        expires_at_ms: now,
        refresh_at_ms: now,
    });
    let reread = config
        .subject
        .platform()
        .and_then(|p| p.reread_interval())
        .map_or(u64::MAX, |every| now + lifetime::millis(every));
    SubjectRecord {
        subject,
        exp_s,
        fetched_at_ms: now,
        refresh_at_ms: plan.refresh_at_ms.min(reread),
        expires_at_ms: plan.expires_at_ms,
    }
}

/// The queue name for a VM: unique per VM, because a shared queue wakes only the VM that
/// registered it last.
pub fn queue_name(owner: u64) -> String {
    format!("{KEY_PREFIX}wake.{}", secret::hex(&owner.to_be_bytes()))
}
