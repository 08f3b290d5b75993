//! openai-wif: keyless OpenAI access for Envoy and Istio meshes.
//!
//! A proxy-wasm HTTP filter. For requests to the OpenAI API it obtains a subject token (from
//! the request, or from the platform the gateway runs on), exchanges it at OpenAI's token
//! endpoint for a short-lived access token, caches that token in Envoy shared data for every
//! worker, and sends the request on with `Authorization: Bearer <access token>`.
//!
//! Read it top-down: [`filter::http`] is where a request enters, [`filter::root`] runs the
//! fetches and exchanges, and the modules below them are pure logic with their own tests.
//! [`host`] is the only module that talks to Envoy.

pub mod admission;
pub mod authority;
pub mod cache;
pub mod config;
pub mod exchange;
pub mod filter;
pub mod host;
pub mod identity;
pub mod jwt;
pub mod lease;
pub mod lifetime;
pub mod logs;
pub mod metrics;
pub mod reply;
pub mod secret;
pub mod shared;
pub mod subject;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    filter::register();
}}
