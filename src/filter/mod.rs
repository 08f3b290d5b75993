//! The proxy-wasm contexts: thin adapters between the SDK's callbacks and the coordinator.
//!
//! In each VM there is one root context ([`root::Root`]), which owns the VM's
//! [`Coordinator`], and one HTTP context per request ([`http::Http`]) holding a handle to it.
//! Each callback becomes one coordinator event; nothing here decides anything.

pub mod http;
pub mod root;

use proxy_wasm::types::Action;

use crate::coordinator::{Coordinator, Verdict};
use crate::host::{self, Envoy};

/// The coordinator of this VM, as the contexts share it.
pub type Shared = std::rc::Rc<Coordinator<Envoy>>;

/// Registers the filter with the SDK.
pub fn register() {
    host::install_logger();
    // Nothing in the filter panics on any input; should something still, say where.
    std::panic::set_hook(Box::new(|info| log::error!("openai_wif: {info}")));
    proxy_wasm::set_root_context(|context_id| Box::new(root::Root::new(context_id)));
}

fn action(verdict: Verdict) -> Action {
    match verdict {
        Verdict::Continue => Action::Continue,
        Verdict::Pause => Action::Pause,
    }
}
