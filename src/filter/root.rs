//! The root context: configuration, and every callout the filter makes.
//!
//! Callouts run here rather than in a request's context because Envoy cancels a request's
//! callouts when its client goes away; an exchange started for one request must outlive it,
//! since other requests (on every worker) wait for the same token.
//!
//! A fetch for one identity is a job that moves through two stages:
//!
//! ```text
//!   lease taken ─▶ FetchSubject ─▶ Exchange ─▶ token stored, lease released, waiters resumed
//!   (platform sources only) │            │
//!                           └────────────┴──▶ failure stored with backoff, lease released,
//!                                             waiters answered with the error
//! ```
//!
//! The header source starts at `Exchange` with the workload's token. A tick resolves requests
//! waiting on this VM for tokens fetched by other workers, takes over leases whose owner is
//! gone, and (for platform sources) refreshes the gateway's token before it is needed.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::http::Http;
use super::{queue_name, RequestSubject, Vm, Waiter};
use crate::cache::{self, lookup, CachedToken, Lookup, Record, SubjectRecord, Table};
use crate::config::{Config, SubjectSource};
use crate::exchange;
use crate::host::{self, Shared};
use crate::identity::IdentityKey;
use crate::lease::{self, Acquire};
use crate::lifetime;
use crate::metrics::{Counter, Metrics};
use crate::reply::{Code, Failure, LocalReply};
use crate::secret::Secret;
use crate::shared;
use crate::subject::{self, SourceCall, SourceResponse, MAX_SOURCE_RESPONSE_BYTES};

/// Tick while requests wait on this VM: how soon a token fetched by another worker is seen.
const FAST_TICK: Duration = Duration::from_millis(10);
/// Tick otherwise: how precisely background refreshes start.
const SLOW_TICK: Duration = Duration::from_millis(250);
/// Lifetime assumed for a platform subject token without `exp`.
const SUBJECT_DEFAULT_LIFETIME_MS: u64 = 300_000;
const MAX_CONFIGURATION_BYTES: usize = 64 * 1024;
/// How often spent cache records are looked for, and how many slots per pass.
const SWEEP_EVERY_MS: u64 = 60_000;
const SWEEP_BATCH: u32 = 256;

enum Stage {
    /// Fetching the gateway's subject token; then exchange it, or (a periodic re-read) stop.
    FetchSubject { then_exchange: bool },
    /// Exchanging a subject token whose `exp` is `subject_exp_s`.
    Exchange { subject_exp_s: Option<u64> },
}

struct Job {
    identity: IdentityKey,
    stage: Stage,
}

enum Answer {
    Http { body_size: usize },
    Grpc { status: u32, size: usize },
}

pub struct Root {
    id: u32,
    vm: Rc<Vm>,
    config: Option<Rc<Config>>,
    /// The gateway's own identity, for platform sources.
    gateway: Option<IdentityKey>,
    /// In-flight callouts by token.
    jobs: BTreeMap<u32, Job>,
    tick: Option<Duration>,
    /// The slot where the next sweep batch starts (see `sweep`).
    sweep_cursor: u32,
    next_sweep_ms: u64,
}

impl Root {
    pub fn new(id: u32) -> Root {
        Root {
            id,
            vm: Vm::new(),
            config: None,
            gateway: None,
            jobs: BTreeMap::new(),
            tick: None,
            sweep_cursor: 0,
            next_sweep_ms: 0,
        }
    }

    fn configure(&mut self, bytes: &[u8]) -> Result<(), String> {
        let config = Config::parse(bytes).map_err(|e| e.to_string())?;
        if self.vm.queue.get().is_none() {
            let queue = host::register_queue(&queue_name(self.vm.owner))
                .map_err(|e| format!("could not register the wake-up queue: {e}"))?;
            self.vm.queue.set(Some(queue));
            *self.vm.metrics.borrow_mut() = Metrics::define(host::define_counter);
            // Sweeps start at a random slot so the VMs share the work.
            self.sweep_cursor =
                (host::random_u64() % u64::from(config.limits.max_identities)) as u32;
        }
        self.vm.table.set(Table::new(config.limits.max_identities));
        lease::ensure_table(&Shared)
            .map_err(|e| format!("could not create the lease table: {e}"))?;
        self.gateway = config
            .subject
            .is_gateway_identity()
            .then(|| IdentityKey::for_gateway(&config));
        let scope = match &config.scope {
            crate::config::Scope::Hosts(hosts) => format!("hosts {hosts:?}"),
            crate::config::Scope::All => "every request the filter sees".to_string(),
        };
        log::info!(
            "openai_wif {}: subject source {}, token endpoint cluster {}, authorising {scope}, at most {} identities",
            env!("CARGO_PKG_VERSION"),
            config.subject.name(),
            config.token_endpoint.cluster,
            config.limits.max_identities,
        );
        self.config = Some(Rc::new(config));
        Ok(())
    }

    fn is_active(&self, identity: &IdentityKey) -> bool {
        self.jobs.values().any(|j| &j.identity == identity)
    }

    fn table(&self) -> Table {
        self.vm.table.get()
    }

    /// Starts a fetch for `identity`, whose cache record is `record`, unless one is running
    /// anywhere or none is needed.
    fn start_if_needed(
        &mut self,
        identity: IdentityKey,
        subject: Option<RequestSubject>,
        record: Option<&Record>,
    ) {
        let Some(config) = self.config.clone() else {
            return;
        };
        if self.is_active(&identity) {
            return;
        }
        let now = host::now_ms();
        match lookup(record, now) {
            Lookup::Use { refresh: false, .. } | Lookup::Backoff(_) => return,
            Lookup::Use { refresh: true, .. } | Lookup::Miss => {}
        }
        let deadline = now + lifetime::millis(config.lease_duration());
        match lease::try_acquire(&Shared, &identity, self.vm.owner, now, deadline) {
            Ok(Acquire::Acquired) => self.begin(&config, identity, subject),
            Ok(Acquire::Held(_)) => {}
            Ok(Acquire::Full) => self.vm.log_warn(
                "leases_full",
                format_args!(
                    "no fetch started for {}: {} fetches are running",
                    identity.short(),
                    lease::MAX_LEASES
                ),
            ),
            Err(e) => self.vm.log_warn(
                "lease_unavailable",
                format_args!("lease for {} unavailable: {e}", identity.short()),
            ),
        }
    }

    /// With the lease held: exchange the given subject, or obtain the gateway's first.
    fn begin(&mut self, config: &Config, identity: IdentityKey, subject: Option<RequestSubject>) {
        if let Some(s) = subject {
            return self.exchange(config, identity, &s.token, s.exp_s);
        }
        if !config.subject.is_gateway_identity() {
            // A header identity whose requests are all gone: nothing to exchange.
            let _ = lease::release(&Shared, &identity, self.vm.owner);
            return;
        }
        let now = host::now_ms();
        match shared::read::<SubjectRecord>(&Shared, &cache::subject_key(&identity)) {
            Ok(Some((s, _))) if s.reusable(now) => {
                self.exchange(config, identity, &s.subject, s.exp_s)
            }
            _ => self.fetch_subject(config, identity, true),
        }
    }

    fn exchange(
        &mut self,
        config: &Config,
        identity: IdentityKey,
        subject: &Secret,
        exp_s: Option<u64>,
    ) {
        let endpoint = &config.token_endpoint;
        let body = exchange::request_body(config, subject);
        match host::dispatch_http(
            &endpoint.cluster,
            &exchange::request_headers(config),
            Some(&body),
            endpoint.timeout,
        ) {
            Ok(token) => {
                log::debug!(
                    "openai_wif: exchanging a subject token for {}",
                    identity.short()
                );
                self.jobs.insert(
                    token,
                    Job {
                        identity,
                        stage: Stage::Exchange {
                            subject_exp_s: exp_s,
                        },
                    },
                );
            }
            Err(e) => {
                self.vm.count(Counter::ExchangesFailed);
                let failure = Failure::new(
                    Code::TokenEndpointUnavailable,
                    format!(
                        "OpenAI token exchange failed: cannot call cluster {} ({e})",
                        endpoint.cluster
                    ),
                );
                self.fail(identity, failure, None);
            }
        }
    }

    fn fetch_subject(&mut self, config: &Config, identity: IdentityKey, then_exchange: bool) {
        let dispatched = match subject::request(&config.subject) {
            Some(SourceCall::Http {
                cluster,
                headers,
                timeout,
            }) => host::dispatch_http(&cluster, &headers, None, timeout).map_err(|e| (cluster, e)),
            Some(SourceCall::Grpc {
                cluster,
                service,
                method,
                metadata,
                message,
                timeout,
            }) => host::dispatch_grpc(&cluster, service, method, &metadata, &message, timeout)
                .map_err(|e| (cluster, e)),
            None => return,
        };
        match dispatched {
            Ok(token) => {
                self.jobs.insert(
                    token,
                    Job {
                        identity,
                        stage: Stage::FetchSubject { then_exchange },
                    },
                );
            }
            Err((cluster, e)) => {
                self.vm.count(Counter::SubjectFetchFailed);
                let err = subject::SourceError::new(
                    &config.subject,
                    format!("cannot call cluster {cluster} ({e})"),
                );
                self.fail(identity, err.failure(), None);
            }
        }
    }

    /// A callout came back.
    fn on_answer(&mut self, token: u32, answer: Answer) {
        let Some(job) = self.jobs.remove(&token) else {
            return;
        };
        let Some(config) = self.config.clone() else {
            return;
        };
        let now = host::now_ms();
        match job.stage {
            Stage::FetchSubject { then_exchange } => {
                let fetched = match answer {
                    Answer::Http { body_size } => {
                        let r = host::http_call_response(body_size, MAX_SOURCE_RESPONSE_BYTES);
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
                    Answer::Grpc { status, size } => {
                        let message = if status == 0 {
                            host::grpc_response_message(size, MAX_SOURCE_RESPONSE_BYTES)
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
                        self.vm.count(Counter::SubjectFetchOk);
                        let record = subject_record(&config, f.subject, f.exp_s, now);
                        let exp_s = record.exp_s;
                        let token = record.subject.clone();
                        if let Err(e) =
                            shared::update(&Shared, &cache::subject_key(&job.identity), |_| {
                                Some(record.clone())
                            })
                        {
                            log::warn!("openai_wif: could not store the subject token: {e}");
                        }
                        log::debug!(
                            "openai_wif: subject token obtained from {} for {}",
                            config.subject.name(),
                            job.identity.short()
                        );
                        if then_exchange {
                            self.exchange(&config, job.identity, &token, exp_s);
                        } else {
                            let _ = lease::release(&Shared, &job.identity, self.vm.owner);
                        }
                    }
                    Err(e) => {
                        self.vm.count(Counter::SubjectFetchFailed);
                        self.vm
                            .log_warn("subject_fetch_failed", format_args!("{e}"));
                        // Also when only a periodic re-read failed: the identity backs off as a
                        // whole (a still-valid token stays in use), so the source is not asked
                        // again, for a re-read or a refresh, before the backoff ends.
                        self.fail(job.identity, e.failure(), None);
                    }
                }
            }
            Stage::Exchange { subject_exp_s } => {
                let body_size = match answer {
                    Answer::Http { body_size } => body_size,
                    Answer::Grpc { .. } => 0,
                };
                let r = host::http_call_response(body_size, exchange::MAX_RESPONSE_BYTES);
                let parsed = exchange::parse_response(
                    r.status.as_deref(),
                    r.retry_after.as_deref(),
                    Some(&r.body),
                );
                match parsed {
                    Ok(issued) => {
                        let end = lifetime::token_end_ms(now, issued.expires_in_s, subject_exp_s);
                        match lifetime::plan(now, end, host::jitter()) {
                            Some(plan) => {
                                self.vm.count(Counter::ExchangesOk);
                                if self.vm.logs.borrow_mut().allow("token_issued", now) {
                                    log::info!(
                                        "openai_wif: access token issued for {}: valid {} s, refresh in {} s{}",
                                        job.identity.short(),
                                        (plan.expires_at_ms - now) / 1000,
                                        (plan.refresh_at_ms - now) / 1000,
                                        issued.scope.as_deref().map(|s| format!(", scope {s}")).unwrap_or_default(),
                                    );
                                }
                                let token = CachedToken::new(
                                    issued.access_token,
                                    plan.refresh_at_ms,
                                    plan.expires_at_ms,
                                );
                                self.succeed(job.identity, token);
                            }
                            None => {
                                self.vm.count(Counter::ExchangesFailed);
                                let failure = Failure::new(
                                    Code::SubjectTokenExpired,
                                    "the subject token expired before the exchange completed",
                                );
                                self.fail(job.identity, failure, None);
                            }
                        }
                    }
                    Err(e) => {
                        self.vm.count(Counter::ExchangesFailed);
                        self.vm.log_warn(
                            "exchange_failed",
                            format_args!("exchange for {} failed: {e}", job.identity.short()),
                        );
                        self.fail(job.identity, e.failure(), e.retry_after_s());
                    }
                }
            }
        }
    }

    fn succeed(&mut self, identity: IdentityKey, token: CachedToken) {
        let now = host::now_ms();
        let written = self.table().update(&Shared, &identity, now, |prev| {
            Some(Record::succeeded(prev, token.clone(), now))
        });
        if let Err(e) = &written {
            self.vm.log_warn(
                "store_failed",
                format_args!("could not store the access token: {e}"),
            );
        }
        let _ = lease::release(&Shared, &identity, self.vm.owner);
        // Waiters here get the token even if the store failed: it was issued for them.
        let record = written
            .ok()
            .flatten()
            .unwrap_or_else(|| Record::succeeded(None, token, now));
        self.settle(&identity, Some(&record), now);
    }

    fn fail(&mut self, identity: IdentityKey, failure: Failure, retry_after_s: Option<u64>) {
        let now = host::now_ms();
        let jitter = host::jitter();
        let written = self.table().update(&Shared, &identity, now, |prev| {
            Some(Record::failed(
                prev,
                failure.clone(),
                now,
                retry_after_s,
                jitter,
            ))
        });
        let _ = lease::release(&Shared, &identity, self.vm.owner);
        let record = match written {
            Ok(Some(r)) => r,
            _ => Record::failed(None, failure, now, retry_after_s, jitter),
        };
        self.settle(&identity, Some(&record), now);
    }

    /// Resolves the requests waiting on this VM for `identity` as far as `record` allows.
    fn settle(&mut self, identity: &IdentityKey, record: Option<&Record>, now: u64) {
        let Some(mut waiting) = self.vm.waiting.borrow_mut().remove(identity) else {
            return;
        };
        match lookup(record, now) {
            Lookup::Use { token, .. } => {
                let fingerprint = token.fingerprint;
                for w in waiting.waiters.drain(..) {
                    match host::resume_with_token(w.context_id, &token.access_token, self.id) {
                        Ok(()) => {
                            self.vm
                                .resumed
                                .borrow_mut()
                                .insert(w.context_id, (identity.clone(), fingerprint.clone()));
                        }
                        Err(e) => log::debug!("openai_wif: waiting request is gone: {e}"),
                    }
                }
            }
            Lookup::Backoff(f) => {
                let reply = LocalReply::from_failure(
                    &f.failure,
                    Some(lifetime::retry_after_s(f.retry_at_ms, now)),
                );
                for w in waiting.waiters.drain(..) {
                    self.answer(w, &reply);
                }
            }
            Lookup::Miss => {
                let failed = record.and_then(|r| r.failure.as_ref());
                let mut kept = Vec::new();
                for w in waiting.waiters.drain(..) {
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
                    let mut all = self.vm.waiting.borrow_mut();
                    let entry = all.entry(identity.clone()).or_default();
                    entry.waiters.extend(kept);
                    if entry.subject.is_none() {
                        entry.subject = waiting.subject;
                    }
                }
            }
        }
    }

    fn answer(&self, waiter: Waiter, reply: &LocalReply) {
        self.vm.count(Counter::RequestsDenied);
        if let Err(e) = host::reply_to(waiter.context_id, reply, self.id) {
            log::debug!("openai_wif: waiting request is gone: {e}");
        }
    }

    /// Requests waiting here for a fetch another worker runs (or ran, or abandoned).
    fn poll_waiters(&mut self) {
        let now = host::now_ms();
        let identities: Vec<(IdentityKey, Option<RequestSubject>)> = self
            .vm
            .waiting
            .borrow()
            .iter()
            .map(|(k, w)| (k.clone(), w.subject.clone()))
            .collect();
        let table = self.table();
        for (identity, subject) in identities {
            let record = table.record(&Shared, &identity);
            self.settle(&identity, record.as_ref(), now);
            if self.vm.waiting.borrow().contains_key(&identity) {
                // Still waiting: start a fetch if nobody (alive) is running one.
                self.start_if_needed(identity, subject, record.as_ref());
            }
        }
    }

    /// Platform sources: keep the gateway's token fresh before requests need it, and re-read
    /// the subject when it is due (a rotated Kubernetes token file is picked up this way).
    fn maintain_gateway(&mut self) {
        let (Some(identity), Some(config)) = (self.gateway.clone(), self.config.clone()) else {
            return;
        };
        if self.is_active(&identity) {
            return;
        }
        let now = host::now_ms();
        let record = self.table().record(&Shared, &identity);
        let backing_off = record
            .as_ref()
            .and_then(|r| r.failure.as_ref())
            .is_some_and(|f| now < f.retry_at_ms);
        match lookup(record.as_ref(), now) {
            Lookup::Miss | Lookup::Use { refresh: true, .. } => {
                self.start_if_needed(identity, None, record.as_ref())
            }
            Lookup::Backoff(_) => {}
            Lookup::Use { refresh: false, .. } if backing_off => {}
            Lookup::Use { refresh: false, .. } => {
                let due =
                    match shared::read::<SubjectRecord>(&Shared, &cache::subject_key(&identity)) {
                        Ok(Some((s, _))) => s.due(now),
                        _ => true,
                    };
                if due {
                    let deadline = now + lifetime::millis(config.lease_duration());
                    if let Ok(Acquire::Acquired) =
                        lease::try_acquire(&Shared, &identity, self.vm.owner, now, deadline)
                    {
                        self.fetch_subject(&config, identity, false);
                    }
                }
            }
        }
    }

    /// Per-request identities come and go (a workload's token rotates, a pod leaves). The
    /// table bounds how many records there are; a pass a minute empties the spent ones among a
    /// batch of slots, so the table holds what is alive rather than what once was.
    fn sweep(&mut self, now: u64) {
        if now < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = now + SWEEP_EVERY_MS;
        let table = self.table();
        let cleared = table.sweep(&Shared, self.sweep_cursor, SWEEP_BATCH, now);
        self.sweep_cursor = (self.sweep_cursor + SWEEP_BATCH) % table.slots();
        if cleared > 0 {
            log::debug!("openai_wif: cleared {cleared} spent cache records");
        }
    }

    fn adjust_tick(&mut self) {
        let want = if self.vm.has_waiters() {
            FAST_TICK
        } else {
            SLOW_TICK
        };
        if self.tick != Some(want) {
            host::set_tick_period(want);
            self.tick = Some(want);
        }
    }
}

fn subject_record(config: &Config, subject: Secret, exp_s: Option<u64>, now: u64) -> SubjectRecord {
    let end = exp_s.map_or(now + SUBJECT_DEFAULT_LIFETIME_MS, |e| {
        e.saturating_mul(1000)
    });
    let plan = lifetime::plan(now, end, host::jitter()).unwrap_or(lifetime::Plan {
        expires_at_ms: now,
        refresh_at_ms: now,
    });
    let reread = match &config.subject {
        SubjectSource::Kubernetes {
            refresh_interval, ..
        } => now + lifetime::millis(*refresh_interval),
        _ => u64::MAX,
    };
    SubjectRecord {
        subject,
        exp_s,
        fetched_at_ms: now,
        refresh_at_ms: plan.refresh_at_ms.min(reread),
        expires_at_ms: plan.expires_at_ms,
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        // The VM is going away and its callouts with it: give their leases back so another
        // worker fetches now rather than after the deadline.
        for job in std::mem::take(&mut self.jobs).into_values() {
            let _ = lease::release(&Shared, &job.identity, self.vm.owner);
        }
        true
    }

    fn on_http_call_response(
        &mut self,
        token: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.on_answer(token, Answer::Http { body_size });
        self.adjust_tick();
    }

    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        self.on_answer(token, Answer::Grpc { status, size });
        self.adjust_tick();
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = host::plugin_configuration(size, MAX_CONFIGURATION_BYTES);
        match self.configure(&bytes) {
            Ok(()) => {
                // The first tick warms the gateway's token up. Not from here: Envoy also
                // configures short-lived VMs (e.g. to check a configuration) whose callouts die
                // with them.
                host::set_tick_period(FAST_TICK);
                self.tick = Some(FAST_TICK);
                true
            }
            Err(e) => {
                log::error!("openai_wif: refusing configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let now = host::now_ms();
        self.vm.flush_logs(now);
        self.sweep(now);
        self.poll_waiters();
        self.maintain_gateway();
        self.adjust_tick();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        host::drain_queue(queue_id);
        let wants = std::mem::take(&mut *self.vm.wants.borrow_mut());
        let table = self.table();
        for w in wants {
            let record = table.record(&Shared, &w.identity);
            self.start_if_needed(w.identity, w.subject, record.as_ref());
        }
        self.adjust_tick();
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(
            context_id,
            self.vm.clone(),
            self.config.clone(),
            self.gateway.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
