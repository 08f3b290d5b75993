//! openai-wif: keyless OpenAI access for Envoy and Istio meshes.
//!
//! A proxy-wasm HTTP filter. For requests to the OpenAI API it obtains a subject token (from
//! the request, or from the platform the gateway runs on), exchanges it at OpenAI's token
//! endpoint for a short-lived access token, caches that token in Envoy shared data for every
//! worker, and sends the request on with `Authorization: Bearer <access token>`.
//!
//! Read it top-down: [`filter`] turns proxy-wasm callbacks into events for the
//! [`coordinator`], the per-VM state machine that decides who fetches, who waits, who is
//! resumed or answered, when to refresh and what to sweep. Below it are pure modules with their
//! own tests: [`config`], [`authority`], [`subject`] (where subject tokens come from),
//! [`checks`] (what a subject token must look like), [`exchange`], [`cache`], [`lease`],
//! [`admission`], [`lifetime`], [`identity`], [`jwt`], [`reply`], [`logs`]. [`host`] is the seam to Envoy, the only module
//! that talks to it.

pub mod admission;
pub mod authority;
pub mod cache;
pub mod callers;
pub mod checks;
pub mod config;
pub mod coordinator;
pub mod exchange;
pub mod filter;
pub mod host;
pub mod identity;
pub mod jwt;
pub mod lease;
pub mod lifetime;
pub mod logs;
pub mod memo;
pub mod metrics;
pub mod reply;
pub mod secret;
pub mod shared;
pub mod subject;

#[cfg(target_arch = "wasm32")]
proxy_wasm::main! {{
    filter::register();
}}
