//! The proxy-wasm contexts and the state one VM shares between them.
//!
//! Envoy runs one VM per worker thread (plus some on the main thread). In each VM there is one
//! root context ([`root::Root`]), which owns every callout, and one HTTP context per request
//! ([`http::Http`]). Requests that need a token the cache does not have yet are *waiters*: they
//! pause, and the root context resumes them when the token (or a failure) lands in shared data,
//! whichever worker fetched it. The [`Vm`] below is how an HTTP context hands work to its root.

pub mod http;
pub mod root;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;

use crate::cache::Table;
use crate::identity::IdentityKey;
use crate::logs::Logs;
use crate::metrics::{Counter, Metrics};
use crate::secret::Secret;
use crate::{host, secret};

/// Registers the filter with the SDK.
pub fn register() {
    host::install_logger();
    // Nothing in the filter panics on any input; should something still, say where.
    std::panic::set_hook(Box::new(|info| log::error!("openai_wif: {info}")));
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}

/// A subject token sent by a workload, kept while its requests wait so any worker can exchange it.
#[derive(Debug, Clone)]
pub struct RequestSubject {
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

/// The requests waiting for one identity on this VM.
#[derive(Debug, Default)]
pub struct Waiting {
    pub subject: Option<RequestSubject>,
    pub waiters: Vec<Waiter>,
}

/// A fetch an HTTP context asks its root context to start.
#[derive(Debug, Clone)]
pub struct Want {
    pub identity: IdentityKey,
    pub subject: Option<RequestSubject>,
}

/// Most fetches one VM's requests may ask for between two wake-ups of its root context.
const MAX_WANTS: usize = 1024;

/// State shared by the contexts of one VM (one thread: `RefCell`s, never held across host calls).
pub struct Vm {
    /// Names this VM in lease records.
    pub owner: u64,
    /// This VM's own wake-up queue: an HTTP context enqueues, the root context runs.
    pub queue: Cell<Option<u32>>,
    pub metrics: RefCell<Metrics>,
    /// The shape of the cache table (from the configuration's `max_identities`).
    pub table: Cell<Table>,
    pub logs: RefCell<Logs>,
    pub debug_logs: RefCell<Logs>,
    pub waiting: RefCell<BTreeMap<IdentityKey, Waiting>>,
    pub wants: RefCell<Vec<Want>>,
    /// Requests resumed by the root context with a token: the identity and the token's fingerprint,
    /// so a 401 from the API can invalidate exactly that token.
    pub resumed: RefCell<BTreeMap<u32, (IdentityKey, String)>>,
}

impl Vm {
    pub fn new() -> Rc<Vm> {
        Rc::new(Vm {
            owner: host::random_u64(),
            queue: Cell::new(None),
            metrics: RefCell::new(Metrics::default()),
            table: Cell::new(Table::new(crate::config::Limits::default().max_identities)),
            logs: RefCell::new(Logs::default()),
            debug_logs: RefCell::new(Logs::default()),
            waiting: RefCell::new(BTreeMap::new()),
            wants: RefCell::new(Vec::new()),
            resumed: RefCell::new(BTreeMap::new()),
        })
    }

    pub fn count(&self, counter: Counter) {
        if let Some(id) = self.metrics.borrow().id(counter) {
            host::increment(id);
        }
    }

    /// Logs at warning level, at most once per kind per window (see [`crate::logs`]).
    pub fn log_warn(&self, kind: &'static str, message: std::fmt::Arguments<'_>) {
        if self.logs.borrow_mut().allow(kind, host::now_ms()) {
            log::warn!("openai_wif: {message}");
        }
    }

    pub fn log_debug(&self, kind: &'static str, message: std::fmt::Arguments<'_>) {
        if self.debug_logs.borrow_mut().allow(kind, host::now_ms()) {
            log::debug!("openai_wif: {message}");
        }
    }

    /// Logs how many lines each kind held back in windows that have closed.
    pub fn flush_logs(&self, now_ms: u64) {
        let window_s = crate::logs::WINDOW_MS / 1000;
        for (kind, count) in self.logs.borrow_mut().flush(now_ms) {
            log::warn!("openai_wif: {count} more {kind} events in the last {window_s} s (logged once per window)");
        }
        for (kind, count) in self.debug_logs.borrow_mut().flush(now_ms) {
            log::debug!("openai_wif: {count} more {kind} events in the last {window_s} s (logged once per window)");
        }
    }

    /// Asks the root context to fetch a token for `identity`, through this VM's queue.
    /// One want per identity is enough; the list is emptied on every wake-up, and bounded
    /// should wake-ups fail (the requests still wait, and the tick retries their fetches).
    pub fn want(&self, identity: IdentityKey, subject: Option<RequestSubject>) {
        {
            let mut wants = self.wants.borrow_mut();
            if wants.iter().any(|w| w.identity == identity) {
                return;
            }
            if wants.len() >= MAX_WANTS {
                return;
            }
            wants.push(Want { identity, subject });
        }
        if let Some(q) = self.queue.get() {
            if let Err(e) = host::enqueue(q) {
                self.log_warn(
                    "wake_failed",
                    format_args!("could not wake the root context: {e}"),
                );
            }
        }
    }

    pub fn add_waiter(
        &self,
        identity: IdentityKey,
        subject: Option<RequestSubject>,
        waiter: Waiter,
    ) {
        let mut waiting = self.waiting.borrow_mut();
        let entry = waiting.entry(identity).or_default();
        if entry.subject.is_none() {
            entry.subject = subject;
        }
        entry.waiters.push(waiter);
    }

    /// Forgets a request that ended (served, refused or aborted by its client).
    pub fn forget(&self, context_id: u32) {
        let mut waiting = self.waiting.borrow_mut();
        for w in waiting.values_mut() {
            w.waiters.retain(|w| w.context_id != context_id);
        }
        waiting.retain(|_, w| !w.waiters.is_empty());
        drop(waiting);
        self.resumed.borrow_mut().remove(&context_id);
    }

    pub fn has_waiters(&self) -> bool {
        !self.waiting.borrow().is_empty()
    }
}

/// The queue name for a VM: unique per VM, because a shared queue wakes only the VM that
/// registered it last.
pub fn queue_name(owner: u64) -> String {
    format!(
        "{}wake.{}",
        crate::shared::KEY_PREFIX,
        secret::hex(&owner.to_be_bytes())
    )
}
