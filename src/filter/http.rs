//! The HTTP context: a request's callbacks, forwarded to the coordinator.

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::{action, Shared};

pub struct Http {
    id: u32,
    coordinator: Shared,
}

impl Http {
    pub fn new(id: u32, coordinator: Shared) -> Http {
        Http { id, coordinator }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        action(self.coordinator.request_headers(self.id))
    }

    fn on_http_request_body(&mut self, _size: usize, _end_of_stream: bool) -> Action {
        action(self.coordinator.request_body(self.id))
    }

    fn on_http_request_trailers(&mut self, _trailers: usize) -> Action {
        action(self.coordinator.request_trailers(self.id))
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        action(self.coordinator.response_headers(self.id))
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        self.coordinator.request_done(self.id);
    }
}
