//! The fetch side: leases, subject fetches, exchanges, storing what came back, and resuming or
//! answering the requests that waited for it.

use super::*;

impl<H: Host> Coordinator<H> {
    /// This VM's queue woke up: start the fetches requests asked for.
    pub fn woken(&self, queue_id: u32) {
        self.host.drain_queue(queue_id);
        self.maintain_keys(self.host.now_ms());
        let asked = std::mem::take(&mut *self.asked.borrow_mut());
        let table = self.table();
        for want in asked {
            let record = table.record(&self.host, &want.identity);
            self.start_if_needed(want, record.as_ref());
        }
        self.adjust_tick();
    }

    pub(super) fn is_active(&self, identity: &IdentityKey) -> bool {
        self.fetches
            .borrow()
            .values()
            .any(|f| &f.want.identity == identity)
    }

    /// Starts a fetch for `identity`, whose cache record is `record`, unless one is running
    /// anywhere or none is needed.
    pub(super) fn start_if_needed(&self, want: Want, record: Option<&Record>) {
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
    pub(super) fn begin(&self, config: &Config, want: Want) {
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

    pub(super) fn exchange(
        &self,
        config: &Config,
        want: Want,
        subject: Option<&Secret>,
        exp_s: Option<u64>,
    ) {
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
                            subject: subject.cloned(),
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
    pub(super) fn fetch_subject(&self, config: &Config, want: Want, then_exchange: bool) {
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
        if !self.keys_answered(call_id, body_size) {
            self.answered(call_id, CalloutAnswer::Http { body_size });
        }
        self.adjust_tick();
    }

    /// A gRPC callout came back.
    pub fn grpc_answer(&self, call_id: u32, status: u32, size: usize) {
        self.answered(call_id, CalloutAnswer::Grpc { status, size });
        self.adjust_tick();
    }

    pub(super) fn answered(&self, call_id: u32, answer: CalloutAnswer) {
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
            Step::Exchange {
                subject,
                subject_exp_s,
            } => {
                let body_size = match answer {
                    CalloutAnswer::Http { body_size } => body_size,
                    CalloutAnswer::Grpc { .. } => 0,
                };
                self.exchanged(&config, fetch.want, subject, subject_exp_s, body_size)
            }
        }
    }

    pub(super) fn release_source(&self) {
        let source = self.source.borrow().clone();
        if let Some(source) = source {
            let _ = lease::release(&self.host, &source, self.owner);
        }
    }

    pub(super) fn subject_fetched(
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
        let fetched = fetched.map_err(|e| e.failure()).and_then(|f| {
            match self.check_subject(config, f.subject.expose(), now) {
                Ok(_) => Ok(f),
                Err(refused) => Err(self.refused_gateway_subject(config, refused)),
            }
        });
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
            Err(failure) => {
                self.count(Counter::SubjectFetchFailed);
                self.log_warn("subject_fetch_failed", format_args!("{}", failure.message));
                // Also when only a periodic re-read failed: the identity backs off as a whole
                // (a still-valid token stays in use), so the source is not asked again, for a
                // re-read or a refresh, before the backoff ends.
                let retry = (failure.code == Code::SubjectKeysUnavailable).then_some(1);
                self.fail(want.identity, failure, retry);
            }
        }
    }

    pub(super) fn exchanged(
        &self,
        config: &Config,
        want: Want,
        subject: Option<Secret>,
        subject_exp_s: Option<u64>,
        body_size: usize,
    ) {
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
                // What the filter can see of the subject, for an endpoint that only says no.
                let facts = subject
                    .as_ref()
                    .and_then(|s| checks::Facts::read(s.expose()));
                let local = match &config.expect {
                    None => checks::diagnose::Local::NotConfigured,
                    Some(expect) => checks::diagnose::Local::Passed {
                        signature_checked: !matches!(expect.keys, checks::Keys::Unchecked),
                    },
                };
                let failure =
                    checks::diagnose::explain(&e, facts.as_ref(), &want.account, local, now / 1000);
                self.log_warn(
                    "exchange_failed",
                    format_args!(
                        "exchange for {} failed: {}",
                        identity.short(),
                        failure.message
                    ),
                );
                return self.fail(identity, failure, e.retry_after_s());
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

    pub(super) fn succeed(&self, identity: IdentityKey, token: CachedToken) {
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

    pub(super) fn fail(&self, identity: IdentityKey, failure: Failure, retry_after_s: Option<u64>) {
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
    pub(super) fn settle(&self, identity: &IdentityKey, record: Option<&Record>, now: u64) {
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

    pub(super) fn answer(&self, waiter: Waiter, reply: &LocalReply) {
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
}
