//! The HTTP context: where a request enters.
//!
//! For a request to a configured OpenAI host: find its identity (the workload's subject token,
//! or the gateway's own), remove any credential the client sent, then look the identity up in
//! the shared cache. A usable token is injected and the request continues; otherwise the request
//! pauses until the root context resumes it with a token or answers it with an error. Nothing
//! is forwarded to OpenAI without a token this filter obtained.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::{RequestSubject, Vm, Waiter};
use crate::cache::{self, lookup, Lookup, Record};
use crate::config::{Config, SubjectSource};
use crate::host::{self, Shared};
use crate::identity::IdentityKey;
use crate::lifetime;
use crate::metrics::Counter;
use crate::reply::{Code, Failure, LocalReply};
use crate::subject::header;

pub struct Http {
    id: u32,
    vm: Rc<Vm>,
    config: Option<Rc<Config>>,
    gateway: Option<IdentityKey>,
    /// Set while the request waits for a token; its body is held back meanwhile.
    paused: bool,
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
            paused: false,
            injected: None,
        }
    }

    fn authorise(&mut self, config: &Config) -> Action {
        let now = host::now_ms();
        let (identity, subject) = match &config.subject {
            SubjectSource::Header { header: name } => {
                match header::accept(host::request_header(name), name, now / 1000) {
                    Ok((token, claims)) => {
                        if host::set_request_header(name, None).is_err() {
                            return self.deny(
                                &internal("could not remove the subject token header"),
                                None,
                            );
                        }
                        let identity = IdentityKey::for_subject(config, &token);
                        (
                            identity,
                            Some(RequestSubject {
                                token,
                                exp_s: claims.exp,
                            }),
                        )
                    }
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
        if host::set_request_header("authorization", None).is_err() {
            return self.deny(
                &internal("could not remove the client's authorization header"),
                None,
            );
        }
        let record = cache::record(&Shared, &identity);
        match lookup(record.as_ref(), now) {
            Lookup::Use { token, refresh } => {
                let bearer = format!("Bearer {}", token.expose());
                if host::set_request_header("authorization", Some(&bearer)).is_err() {
                    return self.deny(&internal("could not set the authorization header"), None);
                }
                self.vm.count(Counter::CacheHit);
                self.injected = Some((identity.clone(), token.fingerprint()));
                if refresh {
                    self.vm.want(identity, subject);
                }
                Action::Continue
            }
            Lookup::Backoff(f) => {
                let retry = lifetime::retry_after_s(f.retry_at_ms, now);
                self.deny(&f.failure, Some(retry))
            }
            Lookup::Miss => {
                self.vm.count(Counter::CacheMiss);
                let waiter = Waiter {
                    context_id: self.id,
                    since_ms: now,
                    deadline_ms: now + lifetime::millis(config.wait_budget()),
                };
                self.vm
                    .add_waiter(identity.clone(), subject.clone(), waiter);
                self.vm.want(identity, subject);
                self.paused = true;
                Action::Pause
            }
        }
    }

    /// Body and trailers wait with the headers: `Continue` here would release the headers
    /// without a token. Once the root context has resumed the request they flow.
    fn hold(&mut self) -> Action {
        if self.paused && self.vm.resumed.borrow().contains_key(&self.id) {
            self.paused = false;
        }
        if self.paused {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn deny(&mut self, failure: &Failure, retry_after_s: Option<u64>) -> Action {
        self.vm.count(Counter::RequestsDenied);
        log::debug!("openai_wif: refusing request: {}", failure.message);
        if let Err(e) = host::send_reply(&LocalReply::from_failure(failure, retry_after_s)) {
            log::warn!("openai_wif: could not send the local reply: {e}");
        }
        self.paused = true;
        Action::Pause
    }

    /// OpenAI refused a token this filter injected: drop it from the cache so the next request
    /// exchanges again, unless another worker has already replaced it.
    fn invalidate(&self, identity: &IdentityKey, fingerprint: &str) {
        let changed = cache::update(
            &Shared,
            &cache::token_key(identity),
            |r: Option<&Record>| r.and_then(|r| r.invalidated(fingerprint)),
        );
        if let Ok(Some(_)) = changed {
            self.vm.count(Counter::TokensInvalidated);
            log::warn!(
                "openai_wif: OpenAI answered 401 to the token of {}; it will be exchanged again",
                identity.short()
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
        let authority = host::request_header(":authority").unwrap_or_default();
        if !config.handles(&authority) {
            return Action::Continue;
        }
        self.authorise(&config)
    }

    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        self.hold()
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        self.hold()
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let injected = self
            .injected
            .take()
            .or_else(|| self.vm.resumed.borrow_mut().remove(&self.id));
        if let Some((identity, fingerprint)) = injected {
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
