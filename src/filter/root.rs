//! The root context: configuration, ticks, queue wake-ups and callout answers, forwarded to
//! the coordinator. Callouts are made from here (through the coordinator) rather than from a
//! request, because Envoy cancels a request's callouts when its client goes away, and other
//! requests on every worker may wait for the same token.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::http::Http;
use super::Shared;
use crate::coordinator::Coordinator;
use crate::host::{self, Envoy};

const MAX_CONFIGURATION_BYTES: usize = 64 * 1024;

pub struct Root {
    coordinator: Shared,
}

impl Root {
    pub fn new(id: u32) -> Root {
        Root {
            coordinator: Rc::new(Coordinator::new(Envoy, id)),
        }
    }
}

impl Context for Root {
    fn on_done(&mut self) -> bool {
        self.coordinator.done();
        true
    }

    fn on_http_call_response(
        &mut self,
        call_id: u32,
        _headers: usize,
        body_size: usize,
        _trailers: usize,
    ) {
        self.coordinator.http_answer(call_id, body_size);
    }

    fn on_grpc_call_response(&mut self, call_id: u32, status: u32, size: usize) {
        self.coordinator.grpc_answer(call_id, status, size);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = host::plugin_configuration(size, MAX_CONFIGURATION_BYTES);
        match self.coordinator.configure(&bytes) {
            Ok(()) => true,
            Err(e) => {
                log::error!("openai_wif: refusing configuration: {e}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        self.coordinator.tick();
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        self.coordinator.woken(queue_id);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http::new(context_id, self.coordinator.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
