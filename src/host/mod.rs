//! The seam to Envoy: the [`Host`] trait, and [`Envoy`], its one real implementation.
//!
//! Everything else in the crate is plain Rust that runs against any `Host` (the coordinator's
//! tests use `host::fake`). The real calls go through [`abi`], which declares the host's
//! functions itself rather than using the SDK's `hostcalls` wrappers (those panic on unexpected
//! statuses and on non-UTF-8 header values, and a panic traps the VM). Here host statuses become
//! [`HostError`]s and header values stay bytes: nothing panics, whatever the host or a client
//! sends. `tests::only_the_host_seam_calls_the_host` keeps it that way.

pub mod abi;
#[cfg(test)]
pub mod fake;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use abi::HostError;
use abi::{Buffer, Map};

use crate::reply::LocalReply;
use crate::secret::Secret;
use crate::shared::{SharedStore, StoreError, Versioned};

/// Everything the filter asks of its host: the one seam between the logic and Envoy.
///
/// Request calls (`request_header`, `send_reply`, …) act on the current context, which the SDK
/// sets before each callback; `resume_with_token` and `reply_to` act on another one and come
/// back to `root_id`. [`Envoy`] is the real host; `host::fake` (tests) simulates several workers
/// over one shared store and clock.
pub trait Host: SharedStore {
    /// Wall-clock time in milliseconds since the epoch.
    fn now_ms(&self) -> u64;
    /// Random bits; zero if there are none, which only removes jitter.
    fn random_u64(&self) -> u64;

    /// A request header's raw value; one the host cannot give is absent.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    fn set_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError>;
    fn remove_request_header(&self, name: &str) -> Result<(), HostError>;
    fn remove_request_trailer(&self, name: &str) -> Result<(), HostError>;
    /// A response header as text; missing, unreadable or not UTF-8 is absent.
    fn response_header(&self, name: &str) -> Option<String>;
    /// A property of the current request or connection (e.g. `["xds", "cluster_name"]`).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Sets filter state on the current request (access logs print it as
    /// `%FILTER_STATE(wasm.<path>:PLAIN)%`).
    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError>;
    /// An environment variable of the VM (Envoy's `vm_config.environment_variables`).
    fn env(&self, name: &str) -> Option<String>;
    /// Answers the current request locally.
    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError>;
    /// Resumes a request paused on another context with `Authorization: Bearer <token>`.
    /// Fails if the request is gone.
    fn resume_with_token(
        &self,
        context_id: u32,
        token: &Secret,
        root_id: u32,
    ) -> Result<(), HostError>;
    /// Answers a request paused on another context locally. Fails if the request is gone.
    fn reply_to(&self, context_id: u32, reply: &LocalReply, root_id: u32) -> Result<(), HostError>;

    fn dispatch_http(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError>;
    fn dispatch_grpc(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        metadata: &[(&'static str, Vec<u8>)],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError>;
    /// The answer to the HTTP callout being delivered.
    fn http_call_response(&self, body_size: usize, max_body: usize) -> CallResponse;
    /// The message of the gRPC callout being delivered.
    fn grpc_response_message(&self, size: usize, max: usize) -> Vec<u8>;

    fn set_tick_period(&self, period: Duration);
    fn register_queue(&self, name: &str) -> Result<u32, HostError>;
    fn enqueue(&self, queue_id: u32) -> Result<(), HostError>;
    /// Empties a queue; its items carry no data, only the wake-up.
    fn drain_queue(&self, queue_id: u32);
    fn define_counter(&self, name: &str) -> Option<u32>;
    fn increment(&self, metric_id: u32, by: u64);

    /// 16 random bits, for jitter.
    fn jitter(&self) -> u16 {
        (self.random_u64() & 0xffff) as u16
    }

    /// `Authorization: Bearer <token>` on the current request.
    fn inject(&self, token: &Secret) -> Result<(), HostError> {
        self.set_request_header("authorization", &bearer(token))
    }
}

/// The value of `Authorization` for `token`.
pub fn bearer(token: &Secret) -> Vec<u8> {
    let mut value = Vec::with_capacity(7 + token.expose().len());
    value.extend_from_slice(b"Bearer ");
    value.extend_from_slice(token.expose().as_bytes());
    value
}

/// The answer to an HTTP callout: `:status` (absent when the call failed), `retry-after`
/// (absent when missing or not text), and up to `max_body` bytes of body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallResponse {
    pub status: Option<String>,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

/// Envoy, through the proxy-wasm ABI.
pub struct Envoy;

fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| String::from_utf8(b).ok())
}

fn read_buffer(buffer: Buffer, size: usize, max: usize) -> Vec<u8> {
    // One byte past the limit is read so oversized answers are recognised as such.
    abi::buffer(buffer, size.min(max.saturating_add(1)))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The plugin configuration, up to `max` bytes (read before the filter is configured).
pub fn plugin_configuration(size: usize, max: usize) -> Vec<u8> {
    read_buffer(Buffer::PluginConfiguration, size, max)
}

/// Runs `f` with `context_id` as the current context, then makes `root_id` current again.
fn on_context<T>(
    context_id: u32,
    root_id: u32,
    f: impl FnOnce() -> Result<T, HostError>,
) -> Result<T, HostError> {
    let result = abi::set_effective_context(context_id).and_then(|()| f());
    let _ = abi::set_effective_context(root_id);
    result
}

impl SharedStore for Envoy {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        abi::shared_data(key).map_err(|e| StoreError::Host(e.0))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match abi::set_shared_data(key, value, cas.unwrap_or(0)) {
            Ok(()) => Ok(()),
            Err(HostError(abi::CAS_MISMATCH)) => Err(StoreError::CasMismatch),
            Err(e) => Err(StoreError::Host(e.0)),
        }
    }
}

impl Host for Envoy {
    fn now_ms(&self) -> u64 {
        match abi::now_ns() {
            Ok(ns) => ns / 1_000_000,
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0),
        }
    }

    fn random_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        match getrandom::fill(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => 0,
        }
    }

    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        abi::header(Map::RequestHeaders, name).ok().flatten()
    }

    fn set_request_header(&self, name: &str, value: &[u8]) -> Result<(), HostError> {
        abi::replace_header(Map::RequestHeaders, name, value)
    }

    fn remove_request_header(&self, name: &str) -> Result<(), HostError> {
        abi::remove_header(Map::RequestHeaders, name)
    }

    fn remove_request_trailer(&self, name: &str) -> Result<(), HostError> {
        abi::remove_header(Map::RequestTrailers, name)
    }

    fn response_header(&self, name: &str) -> Option<String> {
        text(abi::header(Map::ResponseHeaders, name).ok().flatten())
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        abi::property(path).ok().flatten()
    }

    fn set_property(&self, path: &[&str], value: &[u8]) -> Result<(), HostError> {
        abi::set_property(path, value)
    }

    fn env(&self, name: &str) -> Option<String> {
        // WASI's environment, which Envoy fills from vm_config.environment_variables.
        std::env::var(name).ok()
    }

    fn send_reply(&self, reply: &LocalReply) -> Result<(), HostError> {
        // Access logs say why the filter answered: the error code as filter state.
        let _ = abi::set_property(&["openai_wif.error"], reply.code.as_bytes());
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        abi::send_local_response(reply.status, &headers, &reply.body)
    }

    fn resume_with_token(
        &self,
        context_id: u32,
        token: &Secret,
        root_id: u32,
    ) -> Result<(), HostError> {
        on_context(context_id, root_id, || {
            self.inject(token)?;
            abi::resume_request()
        })
    }

    fn reply_to(&self, context_id: u32, reply: &LocalReply, root_id: u32) -> Result<(), HostError> {
        on_context(context_id, root_id, || self.send_reply(reply))
    }

    fn dispatch_http(
        &self,
        cluster: &str,
        headers: &[(&'static str, String)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, HostError> {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        abi::http_call(cluster, &headers, body.unwrap_or_default(), timeout)
    }

    fn dispatch_grpc(
        &self,
        cluster: &str,
        service: &str,
        method: &str,
        metadata: &[(&'static str, Vec<u8>)],
        message: &[u8],
        timeout: Duration,
    ) -> Result<u32, HostError> {
        let metadata: Vec<(&str, &[u8])> =
            metadata.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        abi::grpc_call(cluster, service, method, &metadata, message, timeout)
    }

    fn http_call_response(&self, body_size: usize, max_body: usize) -> CallResponse {
        let header = |name: &str| text(abi::header(Map::CallResponseHeaders, name).ok().flatten());
        CallResponse {
            status: header(":status"),
            retry_after: header("retry-after"),
            body: read_buffer(Buffer::CallResponseBody, body_size, max_body),
        }
    }

    fn grpc_response_message(&self, size: usize, max: usize) -> Vec<u8> {
        read_buffer(Buffer::GrpcReceive, size, max)
    }

    fn set_tick_period(&self, period: Duration) {
        let _ = abi::set_tick_period_ms(millis_u32(period));
    }

    fn register_queue(&self, name: &str) -> Result<u32, HostError> {
        abi::register_queue(name)
    }

    fn enqueue(&self, queue_id: u32) -> Result<(), HostError> {
        abi::enqueue(queue_id, b"1")
    }

    fn drain_queue(&self, queue_id: u32) {
        while let Ok(Some(_)) = abi::dequeue(queue_id) {}
    }

    fn define_counter(&self, name: &str) -> Option<u32> {
        abi::define_counter(name).ok()
    }

    fn increment(&self, metric_id: u32, by: u64) {
        let _ = abi::increment(metric_id, i64::try_from(by).unwrap_or(i64::MAX));
    }
}

/// Sends the `log` crate's records to Envoy's log. A log call that the host refuses is dropped.
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = match record.level() {
            log::Level::Error => abi::Level::Error,
            log::Level::Warn => abi::Level::Warn,
            log::Level::Info => abi::Level::Info,
            log::Level::Debug => abi::Level::Debug,
            log::Level::Trace => abi::Level::Trace,
        };
        let message = record.args().to_string();
        let _ = abi::log(level, &message);
    }

    fn flush(&self) {}
}

static LOGGER: HostLogger = HostLogger;

/// Installs the logger (once per VM; Envoy filters by its own log level).
pub fn install_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    /// The SDK's `hostcalls::*` and its `Context` helper methods (called on the context itself,
    /// `self.…`) panic on host statuses they do not expect and on non-UTF-8 values. Only
    /// `host::abi` may call the host, so none of them may appear anywhere else.
    #[test]
    fn only_the_host_seam_calls_the_host() {
        let forbidden = [
            "hostcalls::",
            "proxy_wasm::types::Status",
            "self.get_http_request_header(",
            "self.set_http_request_header(",
            "self.get_http_response_header(",
            "self.send_http_response(",
            "self.dispatch_http_call(",
            "self.dispatch_grpc_call(",
            "self.get_shared_data(",
            "self.set_shared_data(",
            "self.get_property(",
            "self.set_property(",
            "self.get_http_call_response(",
            "self.get_grpc_call_response(",
            "self.resume_http_request(",
            "self.set_tick_period(",
            "self.get_current_time(",
            "self.register_shared_queue(",
            "self.enqueue_shared_queue(",
            "self.dequeue_shared_queue(",
            "proxy_wasm::set_log_level",
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![root];
        let mut offenders = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).unwrap() {
                    files.push(entry.unwrap().path());
                }
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("host/abi.rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            // This test names the forbidden calls itself.
            let source = source.split("mod tests {").next().unwrap_or_default();
            for f in forbidden {
                if source.contains(f) {
                    offenders.push(format!("{}: {f}", path.display()));
                }
            }
        }
        assert!(
            offenders.is_empty(),
            "host calls outside host::abi: {offenders:?}"
        );
    }
}
