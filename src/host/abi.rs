//! The proxy-wasm ABI (0.2.1), called directly.
//!
//! The SDK's `hostcalls` wrappers panic on any status they do not expect and on header values
//! that are not UTF-8, and a panic traps the VM: every later request on that worker fails until
//! Envoy replaces it. So the filter declares the host functions itself and turns every status
//! into a [`HostError`]. This is the only module with `unsafe` and the only one that names the
//! host's functions; the SDK is used for its dispatcher (the exported `proxy_on_*` callbacks and
//! the memory allocator the host returns values through) and, because its dispatcher needs them,
//! its two callout wrappers ([`http_call`], [`grpc_call`]).
//!
//! Memory the host returns (`return_*_data`) was allocated by the module's own
//! `proxy_on_memory_allocate` (the SDK's, a boxed slice of exactly the requested size), so it is
//! taken back as a `Vec` of that length and capacity.

use std::ptr::{null, null_mut};

/// A host status other than `Ok`, as the raw number: unknown statuses are kept, never trusted
/// to be one of the enum values the SDK knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("host call failed with status {0} ({name})", name = status_name(*.0))]
pub struct HostError(pub u32);

pub const OK: u32 = 0;
pub const NOT_FOUND: u32 = 1;
pub const BAD_ARGUMENT: u32 = 2;
pub const CAS_MISMATCH: u32 = 8;

fn status_name(status: u32) -> &'static str {
    match status {
        0 => "ok",
        1 => "not found",
        2 => "bad argument",
        3 => "serialization failure",
        4 => "parse failure",
        7 => "empty",
        8 => "CAS mismatch",
        10 => "internal failure",
        12 => "unimplemented",
        _ => "unknown",
    }
}

/// Which header map a call reads or writes (the ABI's `MapType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Map {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    CallResponseHeaders = 6,
}

/// Which buffer a call reads (the ABI's `BufferType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Buffer {
    CallResponseBody = 4,
    GrpcReceive = 5,
    PluginConfiguration = 7,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Level {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
}

const STREAM_HTTP_REQUEST: u32 = 0;
const METRIC_COUNTER: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_register_shared_queue(
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_dequeue_shared_queue(
        queue_id: u32,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_enqueue_shared_queue(queue_id: u32, value_data: *const u8, value_size: usize) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
    #[allow(clippy::too_many_arguments)]
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
}

fn check(status: u32) -> Result<(), HostError> {
    if status == OK {
        Ok(())
    } else {
        Err(HostError(status))
    }
}

/// Takes ownership of a value the host wrote into module memory.
///
/// # Safety
/// `data` is null or was returned by the host for `size` bytes allocated through the module's
/// `proxy_on_memory_allocate`.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        // A zero-length allocation (if any) is a boxed empty slice: nothing to free.
        return Vec::new();
    }
    Vec::from_raw_parts(data, size, size)
}

/// A value-returning call: `Ok(None)` for NotFound (and Empty), the bytes for Ok.
fn returned(status: u32, data: *mut u8, size: usize) -> Result<Option<Vec<u8>>, HostError> {
    match status {
        OK => Ok(Some(unsafe { take(data, size) })),
        NOT_FOUND | 7 => Ok(None),
        s => Err(HostError(s)),
    }
}

pub fn log(level: Level, message: &str) -> Result<(), HostError> {
    check(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
}

pub fn now_ns() -> Result<u64, HostError> {
    let mut t = 0u64;
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

pub fn set_tick_period_ms(period_ms: u32) -> Result<(), HostError> {
    check(unsafe { proxy_set_tick_period_milliseconds(period_ms) })
}

pub fn buffer(buffer: Buffer, max: usize) -> Result<Option<Vec<u8>>, HostError> {
    let (mut data, mut size) = (null_mut(), 0usize);
    let status = unsafe { proxy_get_buffer_bytes(buffer as u32, 0, max, &mut data, &mut size) };
    returned(status, data, size)
}

pub fn header(map: Map, name: &str) -> Result<Option<Vec<u8>>, HostError> {
    let (mut data, mut size) = (null_mut(), 0usize);
    let status = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    returned(status, data, size)
}

pub fn replace_header(map: Map, name: &str, value: &[u8]) -> Result<(), HostError> {
    check(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes a header; removing one that is not there is not an error.
pub fn remove_header(map: Map, name: &str) -> Result<(), HostError> {
    match unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) } {
        OK | NOT_FOUND => Ok(()),
        s => Err(HostError(s)),
    }
}

/// A property path is its segments joined by NUL.
fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, HostError> {
    let path = property_path(path);
    let (mut data, mut size) = (null_mut(), 0usize);
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    returned(status, data, size)
}

pub fn set_property(path: &[&str], value: &[u8]) -> Result<(), HostError> {
    let path = property_path(path);
    check(unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) })
}

/// The value under `key` and its CAS number; `None` when the key was never written.
pub fn shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, HostError> {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    let status =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    Ok(returned(status, data, size)?.map(|v| (v, cas)))
}

/// Writes `value` under `key`; CAS 0 means "no check" in the ABI.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), HostError> {
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

pub fn register_queue(name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    check(unsafe { proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn dequeue(queue_id: u32) -> Result<Option<Vec<u8>>, HostError> {
    let (mut data, mut size) = (null_mut(), 0usize);
    let status = unsafe { proxy_dequeue_shared_queue(queue_id, &mut data, &mut size) };
    returned(status, data, size)
}

pub fn enqueue(queue_id: u32, value: &[u8]) -> Result<(), HostError> {
    check(unsafe { proxy_enqueue_shared_queue(queue_id, value.as_ptr(), value.len()) })
}

pub fn resume_request() -> Result<(), HostError> {
    check(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
}

/// Header pairs in the ABI's map encoding: the count, each pair's two lengths, then each name
/// and value followed by a NUL.
pub fn encode_pairs<V: AsRef<[u8]>>(pairs: &[(&str, V)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 10 + k.len() + v.as_ref().len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len(pairs.len()));
    for (k, v) in pairs {
        out.extend_from_slice(&len(k.len()));
        out.extend_from_slice(&len(v.as_ref().len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), HostError> {
    let headers = encode_pairs(headers);
    check(unsafe {
        proxy_send_local_response(
            status,
            null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Starts an HTTP callout. Unlike every other call here this goes through the SDK: its
/// dispatcher routes `proxy_on_http_call_response` by a token table that only its own
/// `dispatch_http_call` can fill. That wrapper panics only on statuses other than Ok,
/// BadArgument and InternalFailure, which are the only ones Envoy's `httpCall` returns (an
/// unknown cluster or missing pseudo-header is BadArgument, a failed start InternalFailure).
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: std::time::Duration,
) -> Result<u32, HostError> {
    proxy_wasm::hostcalls::dispatch_http_call(
        cluster,
        headers.to_vec(),
        Some(body),
        vec![],
        timeout,
    )
    .map_err(|s| HostError(s as u32))
}

/// Starts a gRPC callout, through the SDK for the same reason as [`http_call`]; its wrapper
/// handles Ok, ParseFailure and InternalFailure, the statuses Envoy's `grpcCall` returns.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &[(&str, &[u8])],
    message: &[u8],
    timeout: std::time::Duration,
) -> Result<u32, HostError> {
    proxy_wasm::hostcalls::dispatch_grpc_call(
        cluster,
        service,
        method,
        metadata.to_vec(),
        Some(message),
        timeout,
    )
    .map_err(|s| HostError(s as u32))
}

pub fn set_effective_context(context_id: u32) -> Result<(), HostError> {
    check(unsafe { proxy_set_effective_context(context_id) })
}

pub fn define_counter(name: &str) -> Result<u32, HostError> {
    let mut id = 0u32;
    check(unsafe { proxy_define_metric(METRIC_COUNTER, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment(metric_id: u32, by: i64) -> Result<(), HostError> {
    check(unsafe { proxy_increment_metric(metric_id, by) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_use_the_abi_encoding() {
        let e = encode_pairs(&[("a", "xy"), ("bc", "")]);
        let mut want = vec![2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"a\0xy\0bc\0\0");
        assert_eq!(e, want);
        assert_eq!(encode_pairs::<&[u8]>(&[]), vec![0, 0, 0, 0]);
    }

    #[test]
    fn property_paths_are_nul_joined() {
        assert_eq!(
            property_path(&["connection", "uri_san_peer_certificate"]),
            b"connection\0uri_san_peer_certificate"
        );
    }

    #[test]
    fn errors_keep_unknown_statuses() {
        assert_eq!(
            HostError(99).to_string(),
            "host call failed with status 99 (unknown)"
        );
        assert_eq!(
            HostError(CAS_MISMATCH).to_string(),
            "host call failed with status 8 (CAS mismatch)"
        );
    }
}
