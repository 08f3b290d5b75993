//! The request side: a request's headers, body, trailers and response, and its end. Decides
//! whether a request is authorised, which caller rule and account it gets, and whether it is
//! served from the cache, refused, or paused as a waiter.
use std::rc::Rc;

use super::*;

impl<H: Host> Coordinator<H> {
    pub(super) fn stage(&self, context_id: u32) -> Option<Stage> {
        self.requests.borrow().get(&context_id).map(|r| r.stage)
    }

    /// Records where a request stands (from its own events: the entry is created here).
    pub(super) fn set_stage(
        &self,
        context_id: u32,
        stage: Stage,
        injected: Option<(IdentityKey, Rc<str>)>,
    ) {
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
    pub(super) fn move_waiter(
        &self,
        context_id: u32,
        stage: Stage,
        injected: Option<(IdentityKey, Rc<str>)>,
    ) {
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
        let verdict = match config.handling(|| self.host.request_header(":authority")) {
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
                    Ok((index, account, rule)) => {
                        self.authorise(context_id, &config, index, account, rule)
                    }
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

    /// Which account the caller may use, by the caller rules; `Err` is the refusal. The number
    /// names the account within the configuration (0 without rules, the rule's place + 1).
    pub(super) fn caller<'c>(
        &self,
        context_id: u32,
        config: &'c Config,
    ) -> Result<(usize, &'c Account, Option<Rc<str>>), Verdict> {
        let Some(rules) = &config.callers else {
            return Ok((0, &config.account, None));
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
            self.note("openai_wif.caller", c.as_bytes());
        }
        let matched = caller.as_deref().and_then(|c| {
            rules
                .iter()
                .position(|r| r.principals.iter().any(|p| p.matches(c)))
        });
        match matched.and_then(|i| Some((i, rules.get(i)?))) {
            Some((i, rule)) => {
                self.note("openai_wif.rule", rule.name.as_bytes());
                self.requests.borrow_mut().insert(
                    context_id,
                    Request {
                        stage: Stage::Passed,
                        injected: None,
                        rule: Some(rule.name.clone()),
                    },
                );
                Ok((i + 1, &rule.account, Some(rule.name.clone())))
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

    /// The identity of a request's own subject token, and the subject, or why it is refused
    /// (with a `Retry-After` in seconds). A token this VM has seen is looked up by its bytes: it
    /// was checked then, and only its expiry can have changed.
    fn header_identity(
        &self,
        config: &Config,
        source: &header::Config,
        account_index: usize,
        account: &Account,
        now: u64,
    ) -> Result<(IdentityKey, Subject), (Failure, Option<u64>)> {
        self.header_subject(config, source, account_index, account, now)
            .map_err(|failure| {
                let retry = (failure.code == Code::SubjectKeysUnavailable).then_some(1);
                (failure, retry)
            })
    }

    fn header_subject(
        &self,
        config: &Config,
        source: &header::Config,
        account_index: usize,
        account: &Account,
        now: u64,
    ) -> Result<(IdentityKey, Subject), Failure> {
        let name = &source.header;
        let Some(value) = self.host.request_header(name) else {
            return Err(header::missing(name));
        };
        // The memo is not borrowed across the checks: they may clear it (new keys).
        if let Some(seen) = self.subjects.borrow_mut().get(value.as_slice()) {
            match seen {
                Seen::Accepted {
                    subject,
                    identities,
                } => {
                    if subject.exp_s.is_some_and(|exp| exp <= now / 1000) {
                        return Err(header::expired(name));
                    }
                    let identity = match identities.iter().find(|(i, _)| *i == account_index) {
                        Some((_, identity)) => identity.clone(),
                        None => {
                            let identity =
                                IdentityKey::for_subject(config, account, &subject.token);
                            identities.push((account_index, identity.clone()));
                            identity
                        }
                    };
                    return Ok((identity, subject.clone()));
                }
                Seen::Refused { failure, until_ms } if now < *until_ms => {
                    return Err(failure.clone());
                }
                Seen::Refused { .. } => {}
            }
        }
        let cost = 2 * value.len() + 160;
        let remember_refusal = |failure: &Failure, until_ms: u64| {
            let seen = Seen::Refused {
                failure: failure.clone(),
                until_ms,
            };
            self.subjects
                .borrow_mut()
                .insert(value.clone().into_boxed_slice(), seen, cost);
        };
        let subject = if config.expect.is_some() {
            // The configured checks judge the token, each refusal naming its check.
            let token = header::text(Some(&value), name).inspect_err(|f| {
                remember_refusal(f, now + REFUSAL_MEMO_MS);
            })?;
            match self.check_subject(config, token, now) {
                Ok(verified) => Subject {
                    token: Secret::new(token),
                    exp_s: verified.map(|v| v.exp_s),
                },
                // Not remembered: the keys are being fetched.
                Err(keys::Refused::Retry(failure)) => return Err(failure),
                Err(keys::Refused::Now { failure, until_ms }) => {
                    // An expired token is refused by its `exp`: nothing to remember.
                    if failure.code != Code::SubjectTokenExpired {
                        remember_refusal(&failure, until_ms);
                    }
                    return Err(failure);
                }
            }
        } else {
            match header::accept(Some(&value), name, now / 1000) {
                Ok((token, claims)) => Subject {
                    token,
                    exp_s: claims.exp,
                },
                Err(failure) => {
                    // An expired token is refused by its `exp`, nothing to remember; anything
                    // else about these bytes will not change.
                    if failure.code != Code::SubjectTokenExpired {
                        remember_refusal(&failure, now + REFUSAL_MEMO_MS);
                    }
                    return Err(failure);
                }
            }
        };
        let identity = IdentityKey::for_subject(config, account, &subject.token);
        let seen = Seen::Accepted {
            subject: subject.clone(),
            identities: vec![(account_index, identity.clone())],
        };
        self.subjects
            .borrow_mut()
            .insert(value.into_boxed_slice(), seen, cost);
        Ok((identity, subject))
    }

    pub(super) fn authorise(
        &self,
        context_id: u32,
        config: &Config,
        account_index: usize,
        account: &Account,
        rule: Option<Rc<str>>,
    ) -> Verdict {
        let now = self.host.now_ms();
        self.note(
            "openai_wif.service_account_id",
            account.service_account_id.as_bytes(),
        );
        let (identity, subject) = match &config.subject {
            SubjectSource::Header(h) => {
                match self.header_identity(config, h, account_index, account, now) {
                    Ok((identity, subject)) => (identity, Some(subject)),
                    Err((f, retry)) => return self.deny(context_id, &f, retry),
                }
            }
            _ => {
                let known = self.gateway_keys.borrow().get(account).cloned();
                let identity = known.unwrap_or_else(|| IdentityKey::for_gateway(config, account));
                let mut gateways = self.gateways.borrow_mut();
                if !gateways.contains_key(&identity) {
                    gateways.insert(identity.clone(), (account.clone(), rule.clone()));
                }
                (identity, None)
            }
        };
        self.note("openai_wif.identity", identity.short().as_bytes());
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
        let found = {
            let mut memo = self.records.borrow_mut();
            self.table().find_memo(&self.host, &identity, &mut memo)
        };
        let state = lookup(found.as_ref().map(|f| &f.record), now);
        let refresh = state.wants_fetch();
        match state {
            Lookup::Fresh(token)
            | Lookup::RefreshDue(token)
            | Lookup::ServingWhileBackingOff(token) => {
                let bearer = found.as_ref().and_then(|f| f.bearer.as_deref());
                let injected = match bearer {
                    Some(value) => self.host.set_request_header("authorization", value),
                    None => self.host.inject(&token.access_token),
                };
                if injected.is_err() {
                    return self.deny(
                        context_id,
                        &internal("could not set the authorization header"),
                        None,
                    );
                }
                if let Some(id) = self.metrics.borrow().id(Counter::CacheHit) {
                    self.count_later(id);
                }
                self.count_rule(rule.as_ref(), 0);
                self.note(
                    "openai_wif.cache",
                    if refresh { b"refresh" } else { b"hit" },
                );
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
                self.note("openai_wif.cache", if joining { b"wait" } else { b"miss" });
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
    pub(super) fn admit(&self, context_id: u32, config: &Config, now: u64) -> Option<Verdict> {
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
    pub(super) fn deny(
        &self,
        context_id: u32,
        failure: &Failure,
        retry_after_s: Option<u64>,
    ) -> Verdict {
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
    pub(super) fn invalidate(&self, identity: &IdentityKey, fingerprint: &str) {
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

    pub(super) fn add_waiter(&self, want: Want, waiter: Waiter) {
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
    pub(super) fn ask(&self, want: Want) {
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
}
