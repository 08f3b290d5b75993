//! An in-memory [`Host`] for tests: several workers over one shared store and one clock.
//!
//! A [`World`] holds what every VM of an Envoy shares (shared data, the clock, randomness). Each
//! [`FakeHost`] is one VM on one worker: its requests' headers, the callouts it dispatched, the
//! replies and resumes it made, its counters. Tests act as Envoy does: set the current context,
//! deliver callout answers, advance the clock.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use super::{CallResponse, Host, HostError};
use crate::reply::LocalReply;
use crate::secret::Secret;
use crate::shared::{MemoryStore, SharedStore, StoreError, Versioned};

/// What all VMs of one Envoy share.
pub struct World {
    pub store: MemoryStore,
    now_ms: Cell<u64>,
    seed: Cell<u64>,
}

impl World {
    pub fn new(now_ms: u64) -> Rc<World> {
        Rc::new(World {
            store: MemoryStore::default(),
            now_ms: Cell::new(now_ms),
            seed: Cell::new(0x9e37_79b9_7f4a_7c15),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    pub fn advance(&self, by: Duration) {
        self.now_ms
            .set(self.now_ms.get() + u64::try_from(by.as_millis()).unwrap_or(u64::MAX));
    }
}

/// A callout a VM dispatched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub id: u32,
    pub cluster: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub grpc: bool,
}

#[derive(Default)]
struct Vm {
    current: u32,
    headers: BTreeMap<u32, BTreeMap<String, Vec<u8>>>,
    trailers: BTreeMap<u32, BTreeMap<String, Vec<u8>>>,
    response_status: BTreeMap<u32, String>,
    properties: BTreeMap<String, Vec<u8>>,
    request_properties: BTreeMap<(u32, String), Vec<u8>>,
    replies: Vec<(u32, LocalReply)>,
    resumed: Vec<u32>,
    calls: Vec<Call>,
    next_call: u32,
    answer: CallResponse,
    grpc_message: Vec<u8>,
    counter_names: Vec<String>,
    filter_state: BTreeMap<(u32, String), Vec<u8>>,
    env: BTreeMap<String, String>,
    counters: BTreeMap<String, u64>,
    tick: Option<Duration>,
    wake_ups: u32,
}

/// One VM: [`Host`] over the shared [`World`] and its own requests.
pub struct FakeHost {
    pub world: Rc<World>,
    vm: RefCell<Vm>,
}

impl FakeHost {
    pub fn new(world: Rc<World>) -> FakeHost {
        FakeHost {
            world,
            vm: RefCell::new(Vm {
                next_call: 1,
                ..Vm::default()
            }),
        }
    }

    /// A new request on context `id` with these headers, made the current context.
    pub fn open(&self, id: u32, headers: &[(&str, &[u8])]) {
        let mut vm = self.vm.borrow_mut();
        vm.current = id;
        vm.headers.insert(
            id,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        );
    }

    /// Makes `id` the current context (as Envoy does before each callback).
    pub fn enter(&self, id: u32) {
        self.vm.borrow_mut().current = id;
    }

    /// The request on `id` is gone (its client went away).
    pub fn close(&self, id: u32) {
        let mut vm = self.vm.borrow_mut();
        vm.headers.remove(&id);
        vm.trailers.remove(&id);
    }

    pub fn set_trailers(&self, id: u32, trailers: &[(&str, &[u8])]) {
        self.vm.borrow_mut().trailers.insert(
            id,
            trailers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        );
    }

    pub fn set_response_status(&self, id: u32, status: &str) {
        self.vm
            .borrow_mut()
            .response_status
            .insert(id, status.to_string());
    }

    pub fn set_property(&self, path: &str, value: &[u8]) {
        self.vm
            .borrow_mut()
            .properties
            .insert(path.to_string(), value.to_vec());
    }

    /// Filter state the filter set on request `id` (`openai_wif.<name>`), as text.
    pub fn state(&self, id: u32, name: &str) -> Option<String> {
        self.vm
            .borrow()
            .filter_state
            .get(&(id, format!("openai_wif.{name}")))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn set_env(&self, name: &str, value: &str) {
        self.vm
            .borrow_mut()
            .env
            .insert(name.to_string(), value.to_string());
    }

    /// A property of request `id` only (e.g. its connection's peer certificate).
    pub fn set_request_property(&self, id: u32, path: &str, value: &[u8]) {
        self.vm
            .borrow_mut()
            .request_properties
            .insert((id, path.to_string()), value.to_vec());
    }

    pub fn header(&self, id: u32, name: &str) -> Option<Vec<u8>> {
        self.vm.borrow().headers.get(&id)?.get(name).cloned()
    }

    pub fn trailer(&self, id: u32, name: &str) -> Option<Vec<u8>> {
        self.vm.borrow().trailers.get(&id)?.get(name).cloned()
    }

    /// The `Authorization` the request on `id` carries now, as text.
    pub fn authorization(&self, id: u32) -> Option<String> {
        self.header(id, "authorization")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// The local reply sent to `id`, if any.
    pub fn reply(&self, id: u32) -> Option<LocalReply> {
        self.vm
            .borrow()
            .replies
            .iter()
            .find(|(c, _)| *c == id)
            .map(|(_, r)| r.clone())
    }

    pub fn replies(&self) -> usize {
        self.vm.borrow().replies.len()
    }

    pub fn resumed(&self) -> Vec<u32> {
        self.vm.borrow().resumed.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.vm.borrow().calls.clone()
    }

    /// What the next `http_call_response` returns.
    pub fn set_answer(&self, status: Option<&str>, retry_after: Option<&str>, body: &[u8]) {
        self.vm.borrow_mut().answer = CallResponse {
            status: status.map(str::to_string),
            retry_after: retry_after.map(str::to_string),
            body: body.to_vec(),
        };
    }

    pub fn set_grpc_message(&self, message: &[u8]) {
        self.vm.borrow_mut().grpc_message = message.to_vec();
    }

    pub fn counter(&self, name: &str) -> u64 {
        self.vm
            .borrow()
            .counters
            .get(&format!("openai_wif.{name}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn tick_period(&self) -> Option<Duration> {
        self.vm.borrow().tick
    }

    pub fn wake_ups(&self) -> u32 {
        self.vm.borrow().wake_ups
    }

    fn gone() -> HostError {
        HostError(super::abi::BAD_ARGUMENT)
    }
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.world.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.world.store.set(key, value, cas)
    }
}

impl Host for FakeHost {
    fn now_ms(&self) -> u64 {
        self.world.now_ms()
    }

    fn random_u64(&self) -> u64 {
        // splitmix64: distinct owners and jitter for each VM, the same in every run.
        let z = self.world.seed.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.world.seed.set(z);
        let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        let vm = self.vm.borrow();
        vm.headers.get(&vm.current)?.get(name).cloned()
    }

    fn set_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        let mut vm = self.vm.borrow_mut();
        let current = vm.current;
        vm.headers
            .get_mut(&current)
            .ok_or_else(Self::gone)?
            .insert(name.to_string(), value.to_vec());
        Ok(())
    }

    fn remove_request_header(&self, name: &str) -> Result<(), HostError> {
        let mut vm = self.vm.borrow_mut();
        let current = vm.current;
        vm.headers
            .get_mut(&current)
            .ok_or_else(Self::gone)?
            .remove(name);
        Ok(())
    }

    fn remove_request_trailer(&self, name: &str) -> Result<(), HostError> {
        let mut vm = self.vm.borrow_mut();
        let current = vm.current;
        if let Some(t) = vm.trailers.get_mut(&current) {
            t.remove(name);
        }
        Ok(())
    }

    fn response_header(&self, name: &str) -> Option<String> {
        let vm = self.vm.borrow();
        (name == ":status")
            .then(|| vm.response_status.get(&vm.current).cloned())
            .flatten()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let vm = self.vm.borrow();
        let path = path.join(".");
        vm.request_properties
            .get(&(vm.current, path.clone()))
            .or_else(|| vm.properties.get(&path))
            .cloned()
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError> {
        let mut vm = self.vm.borrow_mut();
        let current = vm.current;
        vm.filter_state
            .insert((current, path.join(".")), value.to_vec());
        Ok(())
    }

    fn env(&self, name: &str) -> Option<String> {
        self.vm.borrow().env.get(name).cloned()
    }

    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        let mut vm = self.vm.borrow_mut();
        let current = vm.current;
        vm.filter_state.insert(
            (current, "openai_wif.error".into()),
            reply.code.as_bytes().to_vec(),
        );
        if !vm.headers.contains_key(&current) {
            return Err(Self::gone());
        }
        vm.replies.push((current, reply.clone()));
        Ok(())
    }

    fn resume_with_token(
        &self,
        context_id: u32,
        token: &Secret,
        _root_id: u32,
    ) -> Result<(), HostError> {
        let mut vm = self.vm.borrow_mut();
        vm.headers
            .get_mut(&context_id)
            .ok_or_else(Self::gone)?
            .insert("authorization".into(), super::bearer(token));
        vm.resumed.push(context_id);
        Ok(())
    }

    fn reply_to(
        &self,
        context_id: u32,
        reply: &LocalReply,
        _root_id: u32,
    ) -> Result<(), HostError> {
        let mut vm = self.vm.borrow_mut();
        if !vm.headers.contains_key(&context_id) {
            return Err(Self::gone());
        }
        vm.filter_state.insert(
            (context_id, "openai_wif.error".into()),
            reply.code.as_bytes().to_vec(),
        );
        vm.replies.push((context_id, reply.clone()));
        Ok(())
    }

    fn dispatch_http(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        body: Option<&[u8]>,
        _timeout: Duration,
    ) -> Result<u32, HostError> {
        let mut vm = self.vm.borrow_mut();
        if cluster == "no_such_cluster" {
            return Err(HostError(super::abi::BAD_ARGUMENT));
        }
        let id = vm.next_call;
        vm.next_call += 1;
        vm.calls.push(Call {
            id,
            cluster: cluster.to_string(),
            headers: headers.to_vec(),
            body: body.unwrap_or_default().to_vec(),
            grpc: false,
        });
        Ok(id)
    }

    fn dispatch_grpc(
        &self,
        cluster: &str,
        _service: &str,
        _method: &str,
        _metadata: &[(&'static str, Vec<u8>)],
        message: &[u8],
        _timeout: Duration,
    ) -> Result<u32, HostError> {
        let mut vm = self.vm.borrow_mut();
        let id = vm.next_call;
        vm.next_call += 1;
        vm.calls.push(Call {
            id,
            cluster: cluster.to_string(),
            headers: Vec::new(),
            body: message.to_vec(),
            grpc: true,
        });
        Ok(id)
    }

    fn http_call_response(&self, _body_size: usize, max_body: usize) -> CallResponse {
        let mut answer = self.vm.borrow().answer.clone();
        answer.body.truncate(max_body.saturating_add(1));
        answer
    }

    fn grpc_response_message(&self, _size: usize, max: usize) -> Vec<u8> {
        let mut m = self.vm.borrow().grpc_message.clone();
        m.truncate(max.saturating_add(1));
        m
    }

    fn set_tick_period(&self, period: Duration) {
        self.vm.borrow_mut().tick = Some(period);
    }

    fn register_queue(&self, _name: &str) -> Result<u32, HostError> {
        Ok(1)
    }

    fn enqueue(&self, _queue_id: u32) -> Result<(), HostError> {
        self.vm.borrow_mut().wake_ups += 1;
        Ok(())
    }

    fn drain_queue(&self, _queue_id: u32) {
        self.vm.borrow_mut().wake_ups = 0;
    }

    fn define_counter(&self, name: &str) -> Option<u32> {
        let mut vm = self.vm.borrow_mut();
        vm.counter_names.push(name.to_string());
        u32::try_from(vm.counter_names.len() - 1).ok()
    }

    fn increment(&self, metric_id: u32, by: u64) {
        let mut vm = self.vm.borrow_mut();
        if let Some(name) = vm.counter_names.get(metric_id as usize).cloned() {
            *vm.counters.entry(name).or_default() += by;
        }
    }
}
