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

#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use crate::admission::{self, Admit};
use crate::cache::{self, lookup, CachedToken, Lookup, Record, SubjectRecord, Table};
use crate::callers::{self, CallerSource};
use crate::config::{Account, Config, Handling, Limits, SubjectSource};
use crate::exchange;
use crate::host::Host;
use crate::identity::IdentityKey;
use crate::lease::{self, Acquire};
use crate::lifetime;
use crate::logs::{Logs, WINDOW_MS};
use crate::metrics::{Counter, Metrics};
use crate::reply::{Code, Failure, LocalReply};
use crate::secret::{self, Secret};
use crate::shared::{self, KEY_PREFIX};
use crate::subject::{self, header, SourceCall, SourceResponse, MAX_SOURCE_RESPONSE_BYTES};

/// Tick while requests wait on this VM: how soon a token fetched by another worker is seen.
pub const FAST_TICK: Duration = Duration::from_millis(10);
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
    injected: Option<(IdentityKey, String)>,
    /// The caller rule it matched.
    rule: Option<Rc<str>>,
}

/// What a fetch is doing.
enum Step {
    /// Fetching the gateway's subject token; then exchange it, or (a periodic re-read) stop.
    FetchSubject { then_exchange: bool },
    /// Exchanging a subject token whose `exp` is `subject_exp_s`.
    Exchange { subject_exp_s: Option<u64> },
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
            source: RefCell::new(None),
            rule_counters: RefCell::new(BTreeMap::new()),
            table: Cell::new(Table::new(Limits::default().max_identities)),
            queue: Cell::new(None),
            metrics: RefCell::new(Metrics::default()),
            logs: RefCell::new(Logs::default()),
            debug_logs: RefCell::new(Logs::default()),
            requests: RefCell::new(BTreeMap::new()),
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
            self.host.increment(id);
        }
    }

    /// Counts for a caller rule: 0 allowed, 1 refused, 2 exchanges.
    fn count_rule(&self, rule: Option<&Rc<str>>, which: usize) {
        let id = rule.and_then(|r| {
            self.rule_counters
                .borrow()
                .get(r)
                .and_then(|ids| ids[which])
        });
        if let Some(id) = id {
            self.host.increment(id);
        }
    }

    /// Filter state that access logs print as `%FILTER_STATE(wasm.openai_wif.<name>:PLAIN)%`.
    fn note(&self, name: &str, value: &[u8]) {
        let _ = self
            .host
            .set_property(&[&format!("openai_wif.{name}")], value);
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
                rule_counters.insert(Rc::from(rule.name.as_str()), ids);
            }
            // Sweeps start at a random slot so the VMs share the work.
            let slots = u64::from(config.limits.max_identities);
            self.sweep_cursor
                .set(u32::try_from(self.host.random_u64() % slots).unwrap_or(0));
        }
        self.table.set(Table::new(config.limits.max_identities));
        lease::ensure_table(&self.host)
            .map_err(|e| format!("could not create the lease table: {e}"))?;
        let mut gateways = self.gateways.borrow_mut();
        gateways.clear();
        if config.subject.is_gateway_identity() {
            *self.source.borrow_mut() = config
                .subject
                .platform()
                .is_some()
                .then(|| IdentityKey::for_source(&config));
            // Without caller rules the gateway acts as one account: warm it up now. With rules,
            // each rule's account is added when its first request arrives.
            if config.callers.is_none() {
                gateways.insert(
                    IdentityKey::for_gateway(&config, &config.account),
                    (config.account.clone(), None),
                );
            }
        }
        drop(gateways);
        let ids_from = if config.account_from_env.is_empty() {
            "the configuration".to_string()
        } else {
            format!(
                "the VM environment ({})",
                config.account_from_env.join(", ")
            )
        };
        let scope = match &config.scope {
            crate::config::Scope::Hosts(hosts) => format!("hosts {hosts:?}"),
            crate::config::Scope::All => "every request the filter sees".to_string(),
        };
        log::info!(
            "openai_wif {}: subject source {}, token endpoint cluster {}, authorising {scope}, at most {} identities, {} caller rules, provider and service account ids from {ids_from}",
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

    // -----------------------------------------------------------------------------------------
    // Requests

    fn stage(&self, context_id: u32) -> Option<Stage> {
        self.requests.borrow().get(&context_id).map(|r| r.stage)
    }

    /// Records where a request stands (from its own events: the entry is created here).
    fn set_stage(&self, context_id: u32, stage: Stage, injected: Option<(IdentityKey, String)>) {
        let mut requests = self.requests.borrow_mut();
        let request = requests.entry(context_id).or_insert(Request {
            stage,
            injected: None,
            rule: None,
        });
        request.stage = stage;
        if injected.is_some() {
            request.injected = injected;
        }
    }

    /// Moves a waiting request on (from the root side: a request that already ended is left
    /// alone, so nothing is kept for it).
    fn move_waiter(&self, context_id: u32, stage: Stage, injected: Option<(IdentityKey, String)>) {
        if let Some(request) = self.requests.borrow_mut().get_mut(&context_id) {
            request.stage = stage;
            if injected.is_some() {
                request.injected = injected;
            }
        }
    }

    /// A request's headers arrived (the current context is `context_id`).
    pub fn request_headers(&self, context_id: u32) -> Verdict {
        let Some(config) = self.config() else {
            return self.deny(
                context_id,
                &internal("openai-wif has no valid configuration"),
                None,
            );
        };
        let verdict = match config.handling(self.host.request_header(":authority").as_deref()) {
            Handling::Authorise => {
                let cluster = config
                    .upstream_clusters
                    .is_some()
                    .then(|| self.host.property(&["xds", "cluster_name"]))
                    .flatten();
                if !config.may_send_to(cluster.as_deref()) {
                    let failure = Failure::new(
                        Code::UpstreamNotAllowed,
                        format!(
                            "this request is routed to {}, not to a cluster that may receive OpenAI tokens",
                            cluster.map_or("no cluster".into(), |c| format!(
                                "cluster {:?}",
                                String::from_utf8_lossy(&c)
                            ))
                        ),
                    );
                    return self.deny(context_id, &failure, None);
                }
                match self.caller(context_id, &config) {
                    Ok((account, rule)) => self.authorise(context_id, &config, account, rule),
                    Err(verdict) => return verdict,
                }
            }
            Handling::PassThrough => {
                self.set_stage(context_id, Stage::Passed, None);
                Verdict::Continue
            }
            Handling::Refuse(e) => {
                self.count(Counter::AuthoritiesRefused);
                let failure = Failure::new(Code::InvalidAuthority, e.to_string());
                return self.deny(context_id, &failure, None);
            }
        };
        // The subject header never leaves the gateway, whether the request was authorised or
        // not (removed only now: the header source reads it above).
        if self.stage(context_id) != Some(Stage::Answered)
            && self
                .host
                .remove_request_header(config.subject_header())
                .is_err()
        {
            return self.deny(
                context_id,
                &internal("could not remove the subject token header"),
                None,
            );
        }
        verdict
    }

    /// Which account the caller may use, by the caller rules; `Err` is the refusal.
    fn caller(
        &self,
        context_id: u32,
        config: &Config,
    ) -> Result<(Account, Option<Rc<str>>), Verdict> {
        let Some(rules) = &config.callers else {
            return Ok((config.account.clone(), None));
        };
        let caller = match config.caller_source {
            CallerSource::PeerCertificate => self
                .host
                .property(&["connection", "uri_san_peer_certificate"])
                .map(|v| String::from_utf8_lossy(&v).into_owned()),
            CallerSource::ForwardedClientCert => self
                .host
                .request_header("x-forwarded-client-cert")
                .and_then(|v| callers::from_forwarded_client_cert(&v)),
        }
        .filter(|c| !c.is_empty());
        if let Some(c) = &caller {
            self.note("caller", c.as_bytes());
        }
        match caller
            .as_deref()
            .and_then(|c| callers::first_match(rules, c))
        {
            Some(rule) => {
                let name: Rc<str> = Rc::from(rule.name.as_str());
                self.note("rule", name.as_bytes());
                self.set_stage(context_id, Stage::Passed, None);
                if let Some(r) = self.requests.borrow_mut().get_mut(&context_id) {
                    r.rule = Some(name.clone());
                }
                Ok((rule.account.clone(), Some(name)))
            }
            None => {
                self.count(Counter::CallersRefused);
                let message = match caller {
                    Some(c) => format!("caller {c} matches no caller rule of this gateway"),
                    None => "the caller presented no client certificate; this gateway serves only callers its rules name".to_string(),
                };
                Err(self.deny(
                    context_id,
                    &Failure::new(Code::CallerNotAllowed, message),
                    None,
                ))
            }
        }
    }

    fn authorise(
        &self,
        context_id: u32,
        config: &Config,
        account: Account,
        rule: Option<Rc<str>>,
    ) -> Verdict {
        let now = self.host.now_ms();
        self.note("service_account_id", account.service_account_id.as_bytes());
        let (identity, subject) = match &config.subject {
            SubjectSource::Header(h) => {
                let name = &h.header;
                let value = self.host.request_header(name);
                match header::accept(value.as_deref(), name, now / 1000) {
                    Ok((token, claims)) => (
                        IdentityKey::for_subject(config, &account, &token),
                        Some(Subject {
                            token,
                            exp_s: claims.exp,
                        }),
                    ),
                    Err(f) => return self.deny(context_id, &f, None),
                }
            }
            _ => {
                let identity = IdentityKey::for_gateway(config, &account);
                self.gateways
                    .borrow_mut()
                    .entry(identity.clone())
                    .or_insert_with(|| (account.clone(), rule.clone()));
                (identity, None)
            }
        };
        self.note("identity", identity.short().as_bytes());
        let want = |subject: Option<Subject>| Want {
            identity: identity.clone(),
            subject,
            account: account.clone(),
            rule: rule.clone(),
        };
        // A client's own key must never reach OpenAI.
        if self.host.remove_request_header("authorization").is_err() {
            return self.deny(
                context_id,
                &internal("could not remove the client's authorization header"),
                None,
            );
        }
        let found = self.table().find(&self.host, &identity);
        let state = lookup(found.as_ref().map(|f| &f.record), now);
        let refresh = state.wants_fetch();
        match state {
            Lookup::Fresh(token)
            | Lookup::RefreshDue(token)
            | Lookup::ServingWhileBackingOff(token) => {
                if self.host.inject(&token.access_token).is_err() {
                    return self.deny(
                        context_id,
                        &internal("could not set the authorization header"),
                        None,
                    );
                }
                self.count(Counter::CacheHit);
                self.count_rule(rule.as_ref(), 0);
                self.note("cache", if refresh { b"refresh" } else { b"hit" });
                self.set_stage(
                    context_id,
                    Stage::Released,
                    Some((identity.clone(), token.fingerprint)),
                );
                if refresh {
                    self.ask(want(subject));
                }
                Verdict::Continue
            }
            Lookup::BackingOff(f) => {
                let retry = lifetime::retry_after_s(f.retry_at_ms, now);
                self.deny(context_id, &f.failure, Some(retry))
            }
            Lookup::Miss => {
                let joining = self.waiting.borrow().contains_key(&identity);
                let known = found.is_some() || joining;
                if !known {
                    if let Some(refusal) = self.admit(context_id, config, now) {
                        return refusal;
                    }
                }
                self.count(Counter::CacheMiss);
                self.note("cache", if joining { b"wait" } else { b"miss" });
                let waiter = Waiter {
                    context_id,
                    since_ms: now,
                    deadline_ms: now + lifetime::millis(config.wait_budget()),
                };
                self.add_waiter(want(subject.clone()), waiter);
                self.set_stage(context_id, Stage::Waiting, None);
                self.ask(want(subject));
                Verdict::Pause
            }
        }
    }

    /// An identity with no cache record draws on the gateway-wide budget for new identities;
    /// `Some` is the refusal when it is spent.
    fn admit(&self, context_id: u32, config: &Config, now: u64) -> Option<Verdict> {
        let limits = &config.limits;
        let admitted = admission::take(
            &self.host,
            now,
            limits.new_identities_per_s,
            limits.new_identities_burst,
        );
        let retry_after_ms = match admitted {
            Ok(Admit::Yes) => return None,
            Ok(Admit::No { retry_after_ms }) => retry_after_ms,
            // Shared data that cannot be read or written: refuse rather than run unbounded.
            Err(e) => {
                self.log_warn(
                    "admission_unavailable",
                    format_args!("new-identity budget unavailable: {e}"),
                );
                1000
            }
        };
        self.count(Counter::NewIdentitiesRefused);
        self.log_warn(
            "new_identity_refused",
            format_args!(
                "refusing a new identity: more than {} per second ({} at once) are being exchanged",
                limits.new_identities_per_s, limits.new_identities_burst
            ),
        );
        let failure = Failure::new(
            Code::TooManyNewIdentities,
            "too many new identities are being exchanged at this gateway; retry later",
        );
        Some(self.deny(
            context_id,
            &failure,
            Some(retry_after_ms.div_ceil(1000).max(1)),
        ))
    }

    /// Answers the current request locally.
    fn deny(&self, context_id: u32, failure: &Failure, retry_after_s: Option<u64>) -> Verdict {
        self.count(Counter::RequestsDenied);
        let rule = self
            .requests
            .borrow()
            .get(&context_id)
            .and_then(|r| r.rule.clone());
        self.count_rule(rule.as_ref(), 1);
        self.log_debug(
            "request_refused",
            format_args!("refusing request: {}", failure.message),
        );
        self.set_stage(context_id, Stage::Answered, None);
        if let Err(e) = self
            .host
            .send_reply(&LocalReply::from_failure(failure, retry_after_s))
        {
            log::warn!("openai_wif: could not send the local reply: {e}");
        }
        Verdict::Pause
    }

    /// Body data arrived. It waits with the headers: continuing here would release the headers
    /// without a token. Once the request is resumed it flows.
    pub fn request_body(&self, context_id: u32) -> Verdict {
        match self.stage(context_id) {
            Some(Stage::Waiting | Stage::Answered) => Verdict::Pause,
            Some(Stage::Passed | Stage::Released) | None => Verdict::Continue,
        }
    }

    /// Trailers arrived: credentials in trailers reach the upstream as surely as headers do.
    pub fn request_trailers(&self, context_id: u32) -> Verdict {
        let stage = self.stage(context_id);
        if let Some(config) = self.config() {
            let mut removed = self
                .host
                .remove_request_trailer(config.subject_header())
                .is_ok();
            if matches!(stage, Some(Stage::Waiting | Stage::Released)) {
                removed &= self.host.remove_request_trailer("authorization").is_ok();
            }
            if !removed && stage != Some(Stage::Answered) {
                return self.deny(
                    context_id,
                    &internal("could not remove credentials from the trailers"),
                    None,
                );
            }
        }
        self.request_body(context_id)
    }

    /// The response's headers arrived: a 401 from OpenAI to a token this filter injected
    /// invalidates it.
    pub fn response_headers(&self, context_id: u32) -> Verdict {
        let injected = self
            .requests
            .borrow_mut()
            .get_mut(&context_id)
            .and_then(|r| r.injected.take());
        if let Some((identity, fingerprint)) = injected {
            if self.host.response_header(":status").as_deref() == Some("401") {
                self.invalidate(&identity, &fingerprint);
            }
        }
        Verdict::Continue
    }

    /// Drops the token with `fingerprint`, unless another worker has already replaced it or an
    /// invalidation of this identity happened within the configured interval.
    fn invalidate(&self, identity: &IdentityKey, fingerprint: &str) {
        let Some(config) = self.config() else {
            return;
        };
        let now = self.host.now_ms();
        let interval = lifetime::millis(config.limits.invalidate_interval);
        let changed = self
            .table()
            .update(&self.host, identity, now, |r: Option<&Record>| {
                r.and_then(|r| r.invalidated(fingerprint, now, interval))
            });
        if let Ok(Some(_)) = changed {
            self.count(Counter::TokensInvalidated);
            self.log_warn(
                "token_invalidated",
                format_args!(
                    "OpenAI answered 401 to the token of {}; it will be exchanged again",
                    identity.short()
                ),
            );
        }
    }

    /// A request ended (served, refused or aborted by its client).
    pub fn request_done(&self, context_id: u32) {
        self.requests.borrow_mut().remove(&context_id);
        let mut waiting = self.waiting.borrow_mut();
        for w in waiting.values_mut() {
            w.list.retain(|w| w.context_id != context_id);
        }
        waiting.retain(|_, w| !w.list.is_empty());
    }

    fn add_waiter(&self, want: Want, waiter: Waiter) {
        let mut waiting = self.waiting.borrow_mut();
        let entry = waiting.entry(want.identity).or_insert_with(|| Waiters {
            subject: None,
            account: want.account,
            rule: want.rule,
            list: Vec::new(),
        });
        if entry.subject.is_none() {
            entry.subject = want.subject;
        }
        entry.list.push(waiter);
    }

    /// Asks the root side to fetch a token for `identity`, through this VM's queue. One ask
    /// per identity is enough; the list is emptied on every wake-up, and bounded should
    /// wake-ups fail (the requests still wait, and the tick retries their fetches).
    fn ask(&self, want: Want) {
        {
            let mut asked = self.asked.borrow_mut();
            if asked.iter().any(|w| w.identity == want.identity)
                || asked.len() >= MAX_FETCH_REQUESTS
            {
                return;
            }
            asked.push(want);
        }
        if let Some(q) = self.queue.get() {
            if let Err(e) = self.host.enqueue(q) {
                self.log_warn(
                    "wake_failed",
                    format_args!("could not wake the root context: {e}"),
                );
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Fetches

    /// This VM's queue woke up: start the fetches requests asked for.
    pub fn woken(&self, queue_id: u32) {
        self.host.drain_queue(queue_id);
        let asked = std::mem::take(&mut *self.asked.borrow_mut());
        let table = self.table();
        for want in asked {
            let record = table.record(&self.host, &want.identity);
            self.start_if_needed(want, record.as_ref());
        }
        self.adjust_tick();
    }

    fn is_active(&self, identity: &IdentityKey) -> bool {
        self.fetches
            .borrow()
            .values()
            .any(|f| &f.want.identity == identity)
    }

    /// Starts a fetch for `identity`, whose cache record is `record`, unless one is running
    /// anywhere or none is needed.
    fn start_if_needed(&self, want: Want, record: Option<&Record>) {
        let Some(config) = self.config() else {
            return;
        };
        let identity = want.identity.clone();
        if self.is_active(&identity) {
            return;
        }
        let now = self.host.now_ms();
        if !lookup(record, now).wants_fetch() {
            return;
        }
        let deadline = now + lifetime::millis(config.lease_duration());
        match lease::try_acquire(&self.host, &identity, self.owner, now, deadline) {
            Ok(Acquire::Acquired) => self.begin(&config, want),
            Ok(Acquire::Held(_)) => {}
            Ok(Acquire::Full) => self.log_warn(
                "leases_full",
                format_args!(
                    "no fetch started for {}: {} fetches are running",
                    identity.short(),
                    lease::MAX_LEASES
                ),
            ),
            Err(e) => self.log_warn(
                "lease_unavailable",
                format_args!("lease for {} unavailable: {e}", identity.short()),
            ),
        }
    }

    /// With the lease held: exchange the given subject, or obtain the gateway's first. The
    /// gateway's subject is fetched under a lease of its own, so several accounts that need it
    /// at once cause one fetch: the others give their lease back and try again on the next tick,
    /// when the subject is there.
    fn begin(&self, config: &Config, want: Want) {
        if let Some(s) = want.subject.clone() {
            return self.exchange(config, want, Some(&s.token), s.exp_s);
        }
        if config.subject.is_certificate() {
            // The cluster presents the certificate: nothing to fetch first.
            return self.exchange(config, want, None, None);
        }
        if !config.subject.is_gateway_identity() {
            // A header identity whose requests are all gone: nothing to exchange.
            let _ = lease::release(&self.host, &want.identity, self.owner);
            return;
        }
        let Some(source) = self.source.borrow().clone() else {
            return;
        };
        let now = self.host.now_ms();
        if let Ok(Some((s, _))) =
            shared::read::<SubjectRecord>(&self.host, &cache::subject_key(&source))
        {
            if s.reusable(now) {
                return self.exchange(config, want, Some(&s.subject), s.exp_s);
            }
        }
        let deadline = now + lifetime::millis(config.lease_duration());
        match lease::try_acquire(&self.host, &source, self.owner, now, deadline) {
            Ok(Acquire::Acquired) => self.fetch_subject(config, want, true),
            _ => {
                let _ = lease::release(&self.host, &want.identity, self.owner);
            }
        }
    }

    fn exchange(&self, config: &Config, want: Want, subject: Option<&Secret>, exp_s: Option<u64>) {
        let endpoint = &config.token_endpoint;
        let body = exchange::request_body(config, &want.account, subject);
        match self.host.dispatch_http(
            &endpoint.cluster,
            &exchange::request_headers(config),
            Some(&body),
            endpoint.timeout,
        ) {
            Ok(call_id) => {
                log::debug!(
                    "openai_wif: exchanging a subject token for {}",
                    want.identity.short()
                );
                self.fetches.borrow_mut().insert(
                    call_id,
                    Fetch {
                        want,
                        step: Step::Exchange {
                            subject_exp_s: exp_s,
                        },
                    },
                );
            }
            Err(e) => {
                self.count(Counter::ExchangesFailed);
                let failure = Failure::new(
                    Code::TokenEndpointUnavailable,
                    format!(
                        "OpenAI token exchange failed: cannot call cluster {} ({e})",
                        endpoint.cluster
                    ),
                );
                self.fail(want.identity, failure, None);
            }
        }
    }

    /// Fetches the gateway's subject (the caller holds the source's lease); then exchanges it
    /// for `want`, or (a periodic re-read) stops.
    fn fetch_subject(&self, config: &Config, want: Want, then_exchange: bool) {
        let dispatched = match subject::request(&config.subject) {
            Some(SourceCall::Http {
                cluster,
                headers,
                timeout,
            }) => self
                .host
                .dispatch_http(&cluster, &headers, None, timeout)
                .map_err(|e| (cluster, e)),
            Some(SourceCall::Grpc {
                cluster,
                service,
                method,
                metadata,
                message,
                timeout,
            }) => self
                .host
                .dispatch_grpc(&cluster, service, method, &metadata, &message, timeout)
                .map_err(|e| (cluster, e)),
            None => return,
        };
        match dispatched {
            Ok(call_id) => {
                self.fetches.borrow_mut().insert(
                    call_id,
                    Fetch {
                        want,
                        step: Step::FetchSubject { then_exchange },
                    },
                );
            }
            Err((cluster, e)) => {
                self.count(Counter::SubjectFetchFailed);
                self.release_source();
                let err = subject::SourceError::new(
                    config.subject.name(),
                    format!("cannot call cluster {cluster} ({e})"),
                );
                self.fail(want.identity, err.failure(), None);
            }
        }
    }

    /// An HTTP callout came back.
    pub fn http_answer(&self, call_id: u32, body_size: usize) {
        self.answered(call_id, CalloutAnswer::Http { body_size });
        self.adjust_tick();
    }

    /// A gRPC callout came back.
    pub fn grpc_answer(&self, call_id: u32, status: u32, size: usize) {
        self.answered(call_id, CalloutAnswer::Grpc { status, size });
        self.adjust_tick();
    }

    fn answered(&self, call_id: u32, answer: CalloutAnswer) {
        let Some(fetch) = self.fetches.borrow_mut().remove(&call_id) else {
            return;
        };
        let Some(config) = self.config() else {
            return;
        };
        match fetch.step {
            Step::FetchSubject { then_exchange } => {
                self.subject_fetched(&config, fetch.want, then_exchange, answer)
            }
            Step::Exchange { subject_exp_s } => {
                let body_size = match answer {
                    CalloutAnswer::Http { body_size } => body_size,
                    CalloutAnswer::Grpc { .. } => 0,
                };
                self.exchanged(fetch.want, subject_exp_s, body_size)
            }
        }
    }

    fn release_source(&self) {
        let source = self.source.borrow().clone();
        if let Some(source) = source {
            let _ = lease::release(&self.host, &source, self.owner);
        }
    }

    fn subject_fetched(
        &self,
        config: &Config,
        want: Want,
        then_exchange: bool,
        answer: CalloutAnswer,
    ) {
        self.release_source();
        let now = self.host.now_ms();
        let fetched = match answer {
            CalloutAnswer::Http { body_size } => {
                let r = self
                    .host
                    .http_call_response(body_size, MAX_SOURCE_RESPONSE_BYTES);
                let status = r.status.and_then(|s| s.parse().ok());
                subject::parse(
                    &config.subject,
                    SourceResponse::Http {
                        status,
                        body: &r.body,
                    },
                    now / 1000,
                )
            }
            CalloutAnswer::Grpc { status, size } => {
                let message = if status == 0 {
                    self.host
                        .grpc_response_message(size, MAX_SOURCE_RESPONSE_BYTES)
                } else {
                    Vec::new()
                };
                subject::parse(
                    &config.subject,
                    SourceResponse::Grpc {
                        status,
                        message: &message,
                    },
                    now / 1000,
                )
            }
        };
        match fetched {
            Ok(f) => {
                self.count(Counter::SubjectFetchOk);
                let record = subject_record(config, f.subject, f.exp_s, now, self.host.jitter());
                let exp_s = record.exp_s;
                let token = record.subject.clone();
                let source = self.source.borrow().clone();
                if let Some(source) = source {
                    if let Err(e) = shared::update(&self.host, &cache::subject_key(&source), |_| {
                        Some(record.clone())
                    }) {
                        log::warn!("openai_wif: could not store the subject token: {e}");
                    }
                }
                log::debug!(
                    "openai_wif: subject token obtained from {} for {}",
                    config.subject.name(),
                    want.identity.short()
                );
                if then_exchange {
                    self.exchange(config, want, Some(&token), exp_s);
                }
            }
            Err(e) => {
                self.count(Counter::SubjectFetchFailed);
                self.log_warn("subject_fetch_failed", format_args!("{e}"));
                // Also when only a periodic re-read failed: the identity backs off as a whole
                // (a still-valid token stays in use), so the source is not asked again, for a
                // re-read or a refresh, before the backoff ends.
                self.fail(want.identity, e.failure(), None);
            }
        }
    }

    fn exchanged(&self, want: Want, subject_exp_s: Option<u64>, body_size: usize) {
        let identity = want.identity;
        let now = self.host.now_ms();
        let r = self
            .host
            .http_call_response(body_size, exchange::MAX_RESPONSE_BYTES);
        let parsed =
            exchange::parse_response(r.status.as_deref(), r.retry_after.as_deref(), Some(&r.body));
        let issued = match parsed {
            Ok(issued) => issued,
            Err(e) => {
                self.count(Counter::ExchangesFailed);
                self.log_warn(
                    "exchange_failed",
                    format_args!("exchange for {} failed: {e}", identity.short()),
                );
                return self.fail(identity, e.failure(), e.retry_after_s());
            }
        };
        let end = lifetime::token_end_ms(now, issued.expires_in_s, subject_exp_s);
        let Some(plan) = lifetime::plan(now, end, self.host.jitter()) else {
            self.count(Counter::ExchangesFailed);
            let failure = Failure::new(
                Code::SubjectTokenExpired,
                "the subject token expired before the exchange completed",
            );
            return self.fail(identity, failure, None);
        };
        self.count(Counter::ExchangesOk);
        self.count_rule(want.rule.as_ref(), 2);
        let allowed = self.logs.borrow_mut().allow("token_issued", now);
        if allowed {
            log::info!(
                "openai_wif: access token issued for {}: valid {} s, refresh in {} s{}",
                identity.short(),
                (plan.expires_at_ms - now) / 1000,
                (plan.refresh_at_ms - now) / 1000,
                issued
                    .scope
                    .as_deref()
                    .map(|s| format!(", scope {s}"))
                    .unwrap_or_default(),
            );
        }
        let token = CachedToken::new(issued.access_token, plan.refresh_at_ms, plan.expires_at_ms);
        self.succeed(identity, token);
    }

    fn succeed(&self, identity: IdentityKey, token: CachedToken) {
        let now = self.host.now_ms();
        let written = self.table().update(&self.host, &identity, now, |prev| {
            Some(Record::succeeded(prev, token.clone(), now))
        });
        if let Err(e) = &written {
            self.log_warn(
                "store_failed",
                format_args!("could not store the access token: {e}"),
            );
        }
        let _ = lease::release(&self.host, &identity, self.owner);
        // Waiters here get the token even if the store failed: it was issued for them.
        let record = written
            .ok()
            .flatten()
            .unwrap_or_else(|| Record::succeeded(None, token, now));
        self.settle(&identity, Some(&record), now);
    }

    fn fail(&self, identity: IdentityKey, failure: Failure, retry_after_s: Option<u64>) {
        let now = self.host.now_ms();
        let jitter = self.host.jitter();
        let written = self.table().update(&self.host, &identity, now, |prev| {
            Some(Record::failed(
                prev,
                failure.clone(),
                now,
                retry_after_s,
                jitter,
            ))
        });
        let _ = lease::release(&self.host, &identity, self.owner);
        let record = match written {
            Ok(Some(r)) => r,
            _ => Record::failed(None, failure, now, retry_after_s, jitter),
        };
        self.settle(&identity, Some(&record), now);
    }

    /// Resolves the requests waiting on this VM for `identity` as far as `record` allows.
    fn settle(&self, identity: &IdentityKey, record: Option<&Record>, now: u64) {
        let Some(mut waiters) = self.waiting.borrow_mut().remove(identity) else {
            return;
        };
        match lookup(record, now) {
            Lookup::Fresh(token)
            | Lookup::RefreshDue(token)
            | Lookup::ServingWhileBackingOff(token) => {
                for w in waiters.list.drain(..) {
                    // Released before the host call: resuming may run the request's next
                    // callbacks at once.
                    self.move_waiter(
                        w.context_id,
                        Stage::Released,
                        Some((identity.clone(), token.fingerprint.clone())),
                    );
                    match self.host.resume_with_token(
                        w.context_id,
                        &token.access_token,
                        self.root_id,
                    ) {
                        Ok(()) => self.count_rule(waiters.rule.as_ref(), 0),
                        Err(e) => log::debug!("openai_wif: waiting request is gone: {e}"),
                    }
                }
            }
            Lookup::BackingOff(f) => {
                let reply = LocalReply::from_failure(
                    &f.failure,
                    Some(lifetime::retry_after_s(f.retry_at_ms, now)),
                );
                for w in waiters.list.drain(..) {
                    self.answer(w, &reply);
                }
            }
            Lookup::Miss => {
                let failed = record.and_then(|r| r.failure.as_ref());
                let mut kept = Vec::new();
                for w in waiters.list.drain(..) {
                    if let Some(f) = failed.filter(|f| f.at_ms >= w.since_ms) {
                        self.answer(w, &LocalReply::from_failure(&f.failure, None));
                    } else if now >= w.deadline_ms {
                        let timeout = Failure::new(
                            Code::TokenWaitTimeout,
                            "timed out waiting for an OpenAI access token",
                        );
                        self.answer(w, &LocalReply::from_failure(&timeout, None));
                    } else {
                        kept.push(w);
                    }
                }
                if !kept.is_empty() {
                    let mut all = self.waiting.borrow_mut();
                    match all.get_mut(identity) {
                        Some(entry) => {
                            entry.list.extend(kept);
                            if entry.subject.is_none() {
                                entry.subject = waiters.subject;
                            }
                        }
                        None => {
                            waiters.list = kept;
                            all.insert(identity.clone(), waiters);
                        }
                    }
                }
            }
        }
    }

    fn answer(&self, waiter: Waiter, reply: &LocalReply) {
        self.count(Counter::RequestsDenied);
        let rule = self
            .requests
            .borrow()
            .get(&waiter.context_id)
            .and_then(|r| r.rule.clone());
        self.count_rule(rule.as_ref(), 1);
        self.move_waiter(waiter.context_id, Stage::Answered, None);
        if let Err(e) = self.host.reply_to(waiter.context_id, reply, self.root_id) {
            log::debug!("openai_wif: waiting request is gone: {e}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // The tick

    /// Resolves requests waiting for fetches other workers run, keeps the gateway's token
    /// fresh, sweeps, and flushes the log summary.
    pub fn tick(&self) {
        let now = self.host.now_ms();
        self.flush_logs(now);
        self.sweep(now);
        self.poll_waiters();
        self.maintain_gateway();
        self.adjust_tick();
    }

    /// Requests waiting here for a fetch another worker runs (or ran, or abandoned).
    fn poll_waiters(&self) {
        let now = self.host.now_ms();
        let wants: Vec<Want> = self
            .waiting
            .borrow()
            .iter()
            .map(|(k, w)| Want {
                identity: k.clone(),
                subject: w.subject.clone(),
                account: w.account.clone(),
                rule: w.rule.clone(),
            })
            .collect();
        let table = self.table();
        for want in wants {
            let record = table.record(&self.host, &want.identity);
            self.settle(&want.identity, record.as_ref(), now);
            if self.waiting.borrow().contains_key(&want.identity) {
                // Still waiting: start a fetch if nobody (alive) is running one.
                self.start_if_needed(want, record.as_ref());
            }
        }
    }

    /// Platform sources: keep the gateway's tokens fresh before requests need them (one per
    /// account in use), and re-read the subject when it is due (a rotated Kubernetes token file
    /// is picked up this way).
    fn maintain_gateway(&self) {
        let Some(config) = self.config() else {
            return;
        };
        let gateways: Vec<Want> = self
            .gateways
            .borrow()
            .iter()
            .map(|(identity, (account, rule))| Want {
                identity: identity.clone(),
                subject: None,
                account: account.clone(),
                rule: rule.clone(),
            })
            .collect();
        let now = self.host.now_ms();
        let mut fresh = None;
        for want in gateways {
            if self.is_active(&want.identity) {
                continue;
            }
            let record = self.table().record(&self.host, &want.identity);
            match lookup(record.as_ref(), now) {
                Lookup::Miss | Lookup::RefreshDue(_) => self.start_if_needed(want, record.as_ref()),
                Lookup::BackingOff(_) | Lookup::ServingWhileBackingOff(_) => {}
                Lookup::Fresh(_) => fresh = fresh.or(Some(want)),
            }
        }
        // The subject is one for every account: re-read it once, under its own lease.
        let (Some(want), Some(source)) = (fresh, self.source.borrow().clone()) else {
            return;
        };
        let due = match shared::read::<SubjectRecord>(&self.host, &cache::subject_key(&source)) {
            Ok(Some((s, _))) => s.due(now),
            _ => true,
        };
        let fetching = self
            .fetches
            .borrow()
            .values()
            .any(|f| matches!(f.step, Step::FetchSubject { .. }));
        if due && !fetching {
            let deadline = now + lifetime::millis(config.lease_duration());
            if let Ok(Acquire::Acquired) =
                lease::try_acquire(&self.host, &source, self.owner, now, deadline)
            {
                self.fetch_subject(&config, want, false);
            }
        }
    }

    /// Per-request identities come and go (a workload's token rotates, a pod leaves). The
    /// table bounds how many records there are; a pass a minute empties the spent ones among a
    /// batch of slots, so the table holds what is alive rather than what once was.
    fn sweep(&self, now: u64) {
        if now < self.next_sweep_ms.get() {
            return;
        }
        self.next_sweep_ms.set(now + SWEEP_EVERY_MS);
        let table = self.table();
        let cursor = self.sweep_cursor.get();
        let cleared = table.sweep(&self.host, cursor, SWEEP_BATCH, now);
        self.sweep_cursor
            .set((cursor + SWEEP_BATCH) % table.slots());
        if cleared > 0 {
            log::debug!("openai_wif: cleared {cleared} spent cache records");
        }
    }

    fn adjust_tick(&self) {
        let want = if self.waiting.borrow().is_empty() {
            SLOW_TICK
        } else {
            FAST_TICK
        };
        if self.tick.get() != Some(want) {
            self.host.set_tick_period(want);
            self.tick.set(Some(want));
        }
    }

    /// The VM is going away and its callouts with it: give their leases back so another
    /// worker fetches now rather than after the deadline.
    pub fn done(&self) {
        let fetches = std::mem::take(&mut *self.fetches.borrow_mut());
        for fetch in fetches.into_values() {
            if matches!(fetch.step, Step::FetchSubject { .. }) {
                self.release_source();
            }
            let _ = lease::release(&self.host, &fetch.want.identity, self.owner);
        }
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
