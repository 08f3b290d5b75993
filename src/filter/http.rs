//! The HTTP context: where a request enters.
//!
//! Every request loses the subject-token header (a credential for this gateway alone). For a
//! request the filter authorises (see [`Config::handling`]): find its identity (the workload's
//! subject token, or the gateway's own), remove any credential the client sent, then look the
//! identity up in the shared cache. A usable token is injected and the request continues;
//! otherwise the request pauses until the root context resumes it with a token or answers it
//! with an error. An `:authority` the filter cannot parse is refused. Nothing is forwarded to
//! OpenAI without a token this filter obtained.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::{RequestSubject, Vm, Waiter};
use crate::admission::{self, Admit};
use crate::cache::{lookup, Lookup, Record};
use crate::config::{Config, Handling, SubjectSource};
use crate::host::{self, Shared};
use crate::identity::IdentityKey;
use crate::lifetime;
use crate::metrics::Counter;
use crate::reply::{Code, Failure, LocalReply};
use crate::subject::header;

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Headers not seen yet.
    New,
    /// Not one the filter authorises: it flows untouched (but for the subject header).
    Passed,
    /// Paused until the root context resumes or answers it; its body and trailers wait too.
    Waiting,
    /// Sent on with a token.
    Released,
    /// Answered locally.
    Answered,
}

pub struct Http {
    id: u32,
    vm: Rc<Vm>,
    config: Option<Rc<Config>>,
    gateway: Option<IdentityKey>,
    state: State,
    /// The identity and token fingerprint this request was sent with, to invalidate on a 401.
    injected: Option<(IdentityKey, String)>,
}

impl Http {
    pub fn new(
        id: u32,
        vm: Rc<Vm>,
        config: Option<Rc<Config>>,
        gateway: Option<IdentityKey>,
    ) -> Http {
        Http {
            id,
            vm,
            config,
            gateway,
            state: State::New,
            injected: None,
        }
    }

    fn authorise(&mut self, config: &Config) -> Action {
        let now = host::now_ms();
        let (identity, subject) = match &config.subject {
            SubjectSource::Header { header: name } => {
                let value = host::request_header(name);
                match header::accept(value.as_deref(), name, now / 1000) {
                    Ok((token, claims)) => (
                        IdentityKey::for_subject(config, &token),
                        Some(RequestSubject {
                            token,
                            exp_s: claims.exp,
                        }),
                    ),
                    Err(f) => return self.deny(&f, None),
                }
            }
            _ => match &self.gateway {
                Some(identity) => (identity.clone(), None),
                None => {
                    return self.deny(&internal("the gateway identity is not configured"), None)
                }
            },
        };
        // A client's own key must never reach OpenAI.
        if host::remove_request_header("authorization").is_err() {
            return self.deny(
                &internal("could not remove the client's authorization header"),
                None,
            );
        }
        let found = self.vm.table.get().find(&Shared, &identity);
        match lookup(found.as_ref().map(|f| &f.record), now) {
            Lookup::Use { token, refresh } => {
                if host::inject(&token.access_token).is_err() {
                    return self.deny(&internal("could not set the authorization header"), None);
                }
                self.vm.count(Counter::CacheHit);
                self.injected = Some((identity.clone(), token.fingerprint));
                if refresh {
                    self.vm.want(identity, subject);
                }
                self.state = State::Released;
                Action::Continue
            }
            Lookup::Backoff(f) => {
                let retry = lifetime::retry_after_s(f.retry_at_ms, now);
                self.deny(&f.failure, Some(retry))
            }
            Lookup::Miss => {
                let known = found.is_some() || self.vm.waiting.borrow().contains_key(&identity);
                if !known {
                    if let Some(refusal) = self.admit(config, now) {
                        return refusal;
                    }
                }
                self.vm.count(Counter::CacheMiss);
                let waiter = Waiter {
                    context_id: self.id,
                    since_ms: now,
                    deadline_ms: now + lifetime::millis(config.wait_budget()),
                };
                self.vm
                    .add_waiter(identity.clone(), subject.clone(), waiter);
                self.vm.want(identity, subject);
                self.state = State::Waiting;
                Action::Pause
            }
        }
    }

    /// An identity with no cache record draws on the gateway-wide budget for new identities;
    /// `Some` is the refusal when it is spent.
    fn admit(&mut self, config: &Config, now: u64) -> Option<Action> {
        let limits = &config.limits;
        let admitted = admission::take(
            &Shared,
            now,
            limits.new_identities_per_s,
            limits.new_identities_burst,
        );
        let retry_after_ms = match admitted {
            Ok(Admit::Yes) => return None,
            Ok(Admit::No { retry_after_ms }) => retry_after_ms,
            // Shared data that cannot be read or written: refuse rather than run unbounded.
            Err(e) => {
                self.vm.log_warn(
                    "admission_unavailable",
                    format_args!("new-identity budget unavailable: {e}"),
                );
                1000
            }
        };
        self.vm.count(Counter::NewIdentitiesRefused);
        self.vm.log_warn(
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
        Some(self.deny(&failure, Some(retry_after_ms.div_ceil(1000).max(1))))
    }

    /// Picks up what the root context did meanwhile: a waiting request it resumed with a token.
    fn sync(&mut self) {
        if self.state == State::Waiting {
            if let Some(injected) = self.vm.resumed.borrow_mut().remove(&self.id) {
                self.injected = Some(injected);
                self.state = State::Released;
            }
        }
    }

    fn deny(&mut self, failure: &Failure, retry_after_s: Option<u64>) -> Action {
        self.vm.count(Counter::RequestsDenied);
        self.vm.log_debug(
            "request_refused",
            format_args!("refusing request: {}", failure.message),
        );
        if let Err(e) = host::send_reply(&LocalReply::from_failure(failure, retry_after_s)) {
            log::warn!("openai_wif: could not send the local reply: {e}");
        }
        self.state = State::Answered;
        Action::Pause
    }

    /// OpenAI refused a token this filter injected: drop it from the cache so the next request
    /// exchanges again, unless another worker has already replaced it, or an invalidation of
    /// this identity happened within the configured interval.
    fn invalidate(&self, identity: &IdentityKey, fingerprint: &str) {
        let Some(config) = &self.config else {
            return;
        };
        let now = host::now_ms();
        let interval = lifetime::millis(config.limits.invalidate_interval);
        let changed = self
            .vm
            .table
            .get()
            .update(&Shared, identity, now, |r: Option<&Record>| {
                r.and_then(|r| r.invalidated(fingerprint, now, interval))
            });
        if let Ok(Some(_)) = changed {
            self.vm.count(Counter::TokensInvalidated);
            self.vm.log_warn(
                "token_invalidated",
                format_args!(
                    "OpenAI answered 401 to the token of {}; it will be exchanged again",
                    identity.short()
                ),
            );
        }
    }
}

fn internal(message: &str) -> Failure {
    Failure::new(Code::InternalError, message)
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return self.deny(&internal("openai-wif has no valid configuration"), None);
        };
        let action = match config.handling(host::request_header(":authority").as_deref()) {
            Handling::Authorise => {
                let cluster = config
                    .upstream_clusters
                    .is_some()
                    .then(|| host::property(&["xds", "cluster_name"]))
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
                    return self.deny(&failure, None);
                }
                self.authorise(&config)
            }
            Handling::PassThrough => {
                self.state = State::Passed;
                Action::Continue
            }
            Handling::Refuse(e) => {
                self.vm.count(Counter::AuthoritiesRefused);
                let failure = Failure::new(Code::InvalidAuthority, e.to_string());
                return self.deny(&failure, None);
            }
        };
        // The subject header never leaves the gateway, whether the request was authorised or
        // not (removed only now: the header source reads it above).
        if self.state != State::Answered
            && host::remove_request_header(config.subject_header()).is_err()
        {
            return self.deny(&internal("could not remove the subject token header"), None);
        }
        action
    }

    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        // Body and trailers wait with the headers: `Continue` here would release the headers
        // without a token. Once the root context has resumed the request they flow.
        self.sync();
        match self.state {
            State::Waiting | State::Answered => Action::Pause,
            State::New | State::Passed | State::Released => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.sync();
        if let Some(config) = &self.config {
            // Credentials in trailers reach the upstream as surely as headers do.
            let mut removed = host::remove_request_trailer(config.subject_header()).is_ok();
            if matches!(self.state, State::Waiting | State::Released) {
                removed &= host::remove_request_trailer("authorization").is_ok();
            }
            if !removed && self.state != State::Answered {
                return self.deny(
                    &internal("could not remove credentials from the trailers"),
                    None,
                );
            }
        }
        match self.state {
            State::Waiting | State::Answered => Action::Pause,
            State::New | State::Passed | State::Released => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        self.sync();
        if let Some((identity, fingerprint)) = self.injected.take() {
            if host::response_header(":status").as_deref() == Some("401") {
                self.invalidate(&identity, &fingerprint);
            }
        }
        Action::Continue
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        self.vm.forget(self.id);
    }
}
