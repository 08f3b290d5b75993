//! The one module that calls Envoy (`proxy_wasm::hostcalls`).
//!
//! Everything else in the crate is plain Rust. Host statuses become [`HostError`] here; no
//! function in this module panics on a status the host returns. (The SDK's `Context` helper
//! methods unwrap host results, so they are not used.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};

use crate::reply::LocalReply;
use crate::secret::Secret;
use crate::shared::{SharedStore, StoreError, Versioned};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("host call failed: {0:?}")]
pub struct HostError(pub Status);

impl From<Status> for HostError {
    fn from(s: Status) -> Self {
        HostError(s)
    }
}

/// Wall-clock time in milliseconds since the epoch.
pub fn now_ms() -> u64 {
    let t = hostcalls::get_current_time().unwrap_or_else(|_| SystemTime::now());
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Random bits from the host (WASI `random_get`); zero if it has none, which only removes jitter.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match getrandom::fill(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}

pub fn jitter() -> u16 {
    (random_u64() & 0xffff) as u16
}

/// Envoy shared data.
pub struct Shared;

impl SharedStore for Shared {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), Some(cas))) => Ok(Some((bytes, cas))),
            Ok(_) => Ok(None),
            Err(s) => Err(StoreError::Host(s as u32)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(s) => Err(StoreError::Host(s as u32)),
        }
    }
}

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

pub fn set_request_header(name: &str, value: Option<&str>) -> Result<(), HostError> {
    Ok(hostcalls::set_map_value(
        MapType::HttpRequestHeaders,
        name,
        value,
    )?)
}

pub fn response_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpResponseHeaders, name)
        .ok()
        .flatten()
}

/// Answers the current request locally.
pub fn send_reply(reply: &LocalReply) -> Result<(), HostError> {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    Ok(hostcalls::send_http_response(
        reply.status,
        headers,
        Some(&reply.body),
    )?)
}

/// Resumes a request paused on another context with `Authorization: Bearer <token>`, then
/// makes `root_id` the current context again. Fails if the request is gone.
pub fn resume_with_token(context_id: u32, token: &Secret, root_id: u32) -> Result<(), HostError> {
    let result = hostcalls::set_effective_context(context_id)
        .and_then(|()| {
            hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "authorization",
                Some(&format!("Bearer {}", token.expose())),
            )
        })
        .and_then(|()| hostcalls::resume_http_request());
    let _ = hostcalls::set_effective_context(root_id);
    Ok(result?)
}

/// Answers a request paused on another context locally, then returns to `root_id`.
pub fn reply_to(context_id: u32, reply: &LocalReply, root_id: u32) -> Result<(), HostError> {
    let result = hostcalls::set_effective_context(context_id)
        .map_err(HostError)
        .and_then(|()| send_reply(reply));
    let _ = hostcalls::set_effective_context(root_id);
    result
}

pub fn dispatch_http(
    cluster: &str,
    headers: &[(&'static str, String)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, HostError> {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Ok(hostcalls::dispatch_http_call(
        cluster,
        headers,
        body,
        vec![],
        timeout,
    )?)
}

pub fn dispatch_grpc(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &[(&'static str, Vec<u8>)],
    message: &[u8],
    timeout: Duration,
) -> Result<u32, HostError> {
    let metadata: Vec<(&str, &[u8])> = metadata.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    Ok(hostcalls::dispatch_grpc_call(
        cluster,
        service,
        method,
        metadata,
        Some(message),
        timeout,
    )?)
}

/// The answer to an HTTP callout: `:status` (absent when the call failed), `retry-after`,
/// and up to `max_body` bytes of body.
pub struct CallResponse {
    pub status: Option<String>,
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

pub fn http_call_response(body_size: usize, max_body: usize) -> CallResponse {
    let header = |name: &str| {
        hostcalls::get_map_value(MapType::HttpCallResponseHeaders, name)
            .ok()
            .flatten()
    };
    CallResponse {
        status: header(":status"),
        retry_after: header("retry-after"),
        body: read_buffer(BufferType::HttpCallResponseBody, body_size, max_body),
    }
}

pub fn grpc_response_message(size: usize, max: usize) -> Vec<u8> {
    read_buffer(BufferType::GrpcReceiveBuffer, size, max)
}

fn read_buffer(buffer: BufferType, size: usize, max: usize) -> Vec<u8> {
    // One byte past the limit is read so oversized answers are recognised as such.
    hostcalls::get_buffer(buffer, 0, size.min(max + 1))
        .ok()
        .flatten()
        .unwrap_or_default()
}

pub fn set_tick_period(period: Duration) {
    let _ = hostcalls::set_tick_period(period);
}

pub fn register_queue(name: &str) -> Result<u32, HostError> {
    Ok(hostcalls::register_shared_queue(name)?)
}

pub fn enqueue(queue_id: u32) -> Result<(), HostError> {
    Ok(hostcalls::enqueue_shared_queue(queue_id, Some(b"1"))?)
}

/// Empties a queue; its items carry no data, only the wake-up.
pub fn drain_queue(queue_id: u32) {
    while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
}

pub fn define_counter(name: &str) -> Option<u32> {
    hostcalls::define_metric(MetricType::Counter, name).ok()
}

pub fn increment(metric_id: u32) {
    let _ = hostcalls::increment_metric(metric_id, 1);
}
