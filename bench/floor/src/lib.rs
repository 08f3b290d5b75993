//! The benchmark's floor: the least a proxy-wasm HTTP filter can do for this job.
//!
//! Plugin configuration (JSON, flat, string values without escapes):
//! `{"authorization": "Bearer ...", "header": "x-openai-subject-token"}`.
//! On request headers it sets `authorization` to the configured value and removes `header`.
//! Each cargo feature adds exactly one host call per request (see Cargo.toml), so the benchmark
//! can price each call the real filter makes against this floor, in the same run.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

#[cfg(feature = "shared_data")]
const RECORD_KEY: &str = "bench_floor.record";
#[cfg(feature = "shared_data")]
const RECORD_BYTES: usize = 300;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

#[derive(Default)]
struct Config {
    authorization: Vec<u8>,
    header: String,
}

#[derive(Default)]
struct Root {
    config: Rc<Config>,
    #[cfg_attr(not(feature = "counter"), allow(dead_code))]
    counter: Option<u32>,
}

/// The string value of `"key": "..."` in a flat JSON object (no escapes in the value).
fn field(json: &str, key: &str) -> Option<String> {
    let quoted = format!("\"{key}\"");
    let rest = &json[json.find(&quoted)? + quoted.len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_string())
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&raw);
        let (Some(authorization), Some(header)) =
            (field(&text, "authorization"), field(&text, "header"))
        else {
            proxy_wasm::hostcalls::log(
                LogLevel::Error,
                "bench floor: configuration needs authorization and header",
            )
            .ok();
            return false;
        };
        self.config = Rc::new(Config {
            authorization: authorization.into_bytes(),
            header,
        });
        #[cfg(feature = "shared_data")]
        {
            let record = vec![b'r'; RECORD_BYTES];
            if proxy_wasm::hostcalls::set_shared_data(RECORD_KEY, Some(&record), None).is_err() {
                return false;
            }
        }
        #[cfg(feature = "counter")]
        {
            self.counter = proxy_wasm::hostcalls::define_metric(
                proxy_wasm::types::MetricType::Counter,
                "bench_floor.requests",
            )
            .ok();
        }
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            config: self.config.clone(),
            counter: self.counter,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    config: Rc<Config>,
    #[cfg_attr(not(feature = "counter"), allow(dead_code))]
    counter: Option<u32>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        #[cfg(feature = "authority")]
        std::hint::black_box(self.get_http_request_header_bytes(":authority"));
        #[cfg(feature = "subject")]
        std::hint::black_box(self.get_http_request_header_bytes(&self.config.header));
        #[cfg(feature = "shared_data")]
        std::hint::black_box(proxy_wasm::hostcalls::get_shared_data(RECORD_KEY).ok());
        #[cfg(feature = "property")]
        std::hint::black_box(proxy_wasm::hostcalls::get_property(vec!["xds", "cluster_name"]).ok());
        #[cfg(feature = "counter")]
        if let Some(id) = self.counter {
            proxy_wasm::hostcalls::increment_metric(id, 1).ok();
        }
        #[cfg(feature = "filter_state")]
        proxy_wasm::hostcalls::set_property(vec!["openai_wif.identity"], Some(b"0123456789ab"))
            .ok();
        #[cfg(feature = "remove_authorization")]
        self.set_http_request_header_bytes("authorization", None);
        self.set_http_request_header_bytes("authorization", Some(&self.config.authorization));
        self.set_http_request_header_bytes(&self.config.header, None);
        Action::Continue
    }
}
