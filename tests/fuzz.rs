//! Fuzzing every parser and every shared-data decoder on the stable toolchain.
//!
//! Each `#[test]` runs `OPENAI_WIF_FUZZ_ITERATIONS` inputs (default 3000, a short pass inside
//! `cargo test`; `make fuzz` runs a million per target in a release build). Inputs are valid
//! examples and mutations of them: bit flips, odd bytes, inserted, deleted and duplicated
//! ranges, splices of two examples, truncation, random bytes, long runs, deep nesting and huge
//! numbers; JSON inputs are also mutated as trees. Every input must not panic, must finish in
//! 1 s (5 s in a debug build), and must satisfy the target's oracle.
//!
//! A failure names the target, the seed and the iteration, and prints the input as a
//! byte-string literal. `OPENAI_WIF_FUZZ_SEED=<seed>` repeats a run, and with
//! `OPENAI_WIF_FUZZ_ONLY=<iteration>` only the one input.

#![cfg(not(target_arch = "wasm32"))]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use prost::Message;
use serde_json::{json, Value};

use openai_wif::admission::{self, Admit};
use openai_wif::authority;
use openai_wif::cache::{self, CachedToken, Lookup, Record, Table};
use openai_wif::config::{self, Config, Scope, SubjectSource};
use openai_wif::exchange;
use openai_wif::identity::IdentityKey;
use openai_wif::jwt;
use openai_wif::lease::{self, Acquire, Lease, MAX_LEASES};
use openai_wif::reply::{Code, Failure};
use openai_wif::secret::Secret;
use openai_wif::shared::{SharedStore, StoreError, Versioned};
use openai_wif::subject::spiffe::{JwtSvid, JwtSvidResponse};
use openai_wif::subject::{self, header, SourceResponse};

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

/// xorshift64*: small, fast, and enough to drive mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 once, so nearby seeds start far apart; never zero.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        let span = hi.wrapping_sub(lo).wrapping_add(1);
        if span == 0 {
            self.next()
        } else {
            lo + self.next() % span
        }
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.next() % n == 0
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Up to `max - 1` random bytes.
    fn bytes_below(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
}

fn iterations() -> u64 {
    std::env::var("OPENAI_WIF_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(3000)
}

/// The run's seed (`OPENAI_WIF_FUZZ_SEED`, hex with `0x` or decimal).
fn run_seed() -> u64 {
    std::env::var("OPENAI_WIF_FUZZ_SEED")
        .ok()
        .and_then(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).ok(),
                None => v.parse().ok(),
            }
        })
        .unwrap_or(0x0bad_5eed_u64)
}

/// Each target draws its own inputs from the run's seed.
fn target_seed(seed: u64, target: &str) -> u64 {
    target.bytes().fold(seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Longest time one input may take: a hang detector, loose enough that a loaded machine does
/// not trip it.
fn time_limit() -> Duration {
    if cfg!(debug_assertions) {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(1)
    }
}

/// `bytes` as a Rust byte-string literal.
fn lit(bytes: &[u8]) -> String {
    const SHOWN: usize = 16 * 1024;
    let shown = &bytes[..bytes.len().min(SHOWN)];
    let mut out = format!("b\"{}\"", shown.escape_ascii());
    if bytes.len() > SHOWN {
        let _ = write!(out, " /* first {SHOWN} of {} bytes */", bytes.len());
    }
    out
}

fn lit_opt(bytes: Option<&[u8]>) -> String {
    bytes.map_or_else(|| "None".into(), |b| format!("Some({})", lit(b)))
}

thread_local! {
    static ACCEPTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Counts an input the target accepted (for the store targets: found a record, was held, was
/// refused): a target that accepts nothing, or everything, has an oracle that tests nothing.
fn accepted() {
    ACCEPTED.with(|c| c.set(true));
}

/// Runs `check` on `iterations()` inputs from `generate`. `show` renders an input for a
/// failure report (byte strings as literals).
fn fuzz<T>(
    target: &str,
    generate: impl Fn(&mut Rng) -> T,
    show: impl Fn(&T) -> String,
    check: impl Fn(&T) -> Result<(), String>,
) {
    let n = iterations();
    let run = run_seed();
    let seed = target_seed(run, target);
    let limit = time_limit();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let only: Option<u64> = std::env::var("OPENAI_WIF_FUZZ_ONLY")
        .ok()
        .and_then(|v| v.trim().parse().ok());
    let range = match only {
        Some(i) => i..i + 1,
        None => 0..n,
    };
    let n = range.end - range.start;
    let mut accepted = 0;
    for i in range {
        let mut rng = Rng::new(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let input = generate(&mut rng);
        ACCEPTED.with(|c| c.set(false));
        let t0 = Instant::now();
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = t0.elapsed();
        accepted += u64::from(ACCEPTED.with(|c| c.get()));
        slowest = slowest.max(took);
        let problem = match outcome {
            Err(payload) => Some(format!(
                "panicked: {}",
                payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
            Ok(Err(oracle)) => Some(format!("oracle failed: {oracle}")),
            Ok(Ok(())) if took > limit => Some(format!("took {took:?}, over {limit:?}")),
            Ok(Ok(())) => None,
        };
        if let Some(problem) = problem {
            panic!(
                "fuzz target {target}: {problem}\n  seed {run:#x} iteration {i}; again with \
                 OPENAI_WIF_FUZZ_SEED={run:#x} OPENAI_WIF_FUZZ_ONLY={i}\n  input: {}",
                show(&input)
            );
        }
    }
    let elapsed = started.elapsed();
    println!(
        "fuzz {target}: {n} inputs in {elapsed:.2?} ({:.0}/s, slowest {slowest:.2?}), {accepted} accepted",
        n as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    if n >= 1000 {
        assert!(
            accepted > 0,
            "fuzz target {target} accepted none of {n} inputs"
        );
        assert!(accepted < n, "fuzz target {target} accepted all {n} inputs");
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

const MAX_INPUT: usize = 80 * 1024;

const INTERESTING_BYTES: &[u8] = &[
    0x00, 0xff, 0x80, 0x7f, 0xc0, 0xed, 0xf4, b'"', b'\\', b'.', b'{', b'}', b'[', b']', b':',
    b',', b' ', b'\t', b'\n', b'\r', b'0', b'9', b'-', b'+', b'e', b'E', b'_', b'=', b'/', b'%',
    b'@',
];

const DICTIONARY: &[&str] = &[
    "null",
    "true",
    "false",
    "-0",
    "1e999",
    "-1",
    "0.5",
    "4294967296",
    "18446744073709551616",
    "\"\"",
    "\\u0000",
    "\\ud800",
    "\\\"",
    "eyJ",
    "==",
    "%00",
    ":443",
    ":65536",
    "[::1]",
    "..",
    "\"source\"",
    "\"kubernetes\"",
    "\"gcp_metadata\"",
    "\"azure_imds\"",
    "\"spiffe\"",
    "\"header\"",
    "\"hosts\"",
    "\"scope\"",
    "\"all\"",
    "\"limits\"",
    "\"timeout_ms\"",
    "\"access_token\"",
    "\"token_type\"",
    "\"expires_in\"",
    "\"exp\"",
    "\"alg\"",
    "\"none\"",
    "\"identity\"",
    "\"milli_tokens\"",
    "\"deadline_ms\"",
    "spiffe://",
];

/// One to a few byte-level mutations of `data`, drawing on `seeds` for splices.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let rounds = if rng.one_in(8) {
        1 + rng.below(16)
    } else {
        1 + rng.below(4)
    };
    for _ in 0..rounds {
        let len = data.len();
        match rng.below(14) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = if rng.one_in(2) {
                    *rng.pick(INTERESTING_BYTES)
                } else {
                    rng.next() as u8
                };
            }
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes = rng.bytes(n);
                data.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(16.min(len - from))).min(len);
                data.drain(from..to);
            }
            4 if len > 0 => {
                let from = rng.below(len);
                let to = (from + 1 + rng.below(len - from)).min(len);
                let copy = data[from..to].to_vec();
                let at = rng.below(len + 1);
                let times = if rng.one_in(8) { 1 + rng.below(64) } else { 1 };
                for _ in 0..times {
                    data.splice(at..at, copy.iter().copied());
                }
            }
            5 if !seeds.is_empty() => {
                let other = rng.pick(seeds);
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            6 => {
                let at = rng.below(len + 1);
                data.truncate(at);
            }
            7 if rng.one_in(4) => {
                let n = rng.below(64);
                *data = rng.bytes(n);
            }
            8 => {
                let at = rng.below(len + 1);
                let byte = if rng.one_in(2) {
                    *rng.pick(INTERESTING_BYTES)
                } else {
                    rng.next() as u8
                };
                let n = if rng.one_in(16) {
                    rng.below(20_000)
                } else {
                    rng.below(300)
                };
                data.splice(at..at, std::iter::repeat_n(byte, n));
            }
            9 => {
                let at = rng.below(len + 1);
                const NESTING: [&[u8]; 4] = [b"[", b"{\"a\":", b"[{\"a\":", b"{"];
                let unit = NESTING[rng.below(NESTING.len())];
                let n = if rng.one_in(8) {
                    rng.below(5_000)
                } else {
                    rng.below(200)
                };
                let run: Vec<u8> = unit.iter().copied().cycle().take(unit.len() * n).collect();
                data.splice(at..at, run);
            }
            10 => {
                let at = rng.below(len + 1);
                let n = 1 + if rng.one_in(8) {
                    rng.below(5_000)
                } else {
                    rng.below(40)
                };
                let mut digits: Vec<u8> = (0..n).map(|_| b'0' + rng.below(10) as u8).collect();
                match rng.below(4) {
                    0 => digits.insert(0, b'-'),
                    1 => digits.extend_from_slice(b"e999"),
                    2 => {
                        let dot = rng.below(digits.len() + 1);
                        digits.insert(dot, b'.');
                    }
                    _ => {}
                }
                data.splice(at..at, digits);
            }
            11 => {
                let at = rng.below(len + 1);
                let word = rng.pick(DICTIONARY).as_bytes();
                data.splice(at..at, word.iter().copied());
            }
            12 if len > 1 => {
                let from = rng.below(len);
                let to = rng.below(len);
                let n = rng.below(len - from.max(to)).min(32);
                let copy = data[from..from + n].to_vec();
                data[to..to + n].copy_from_slice(&copy);
            }
            _ => {
                if len > 0 {
                    let i = rng.below(len);
                    data[i] = data[i].wrapping_add(rng.range(1, 255) as u8);
                }
            }
        }
        if data.len() > MAX_INPUT {
            data.truncate(MAX_INPUT);
        }
    }
}

/// A seed, often mutated: what most byte-level targets feed on.
fn from_seeds(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = rng.pick(seeds).clone();
    if !rng.one_in(8) {
        mutate_bytes(rng, &mut data, seeds);
    }
    data
}

fn interesting_value(rng: &mut Rng) -> Value {
    match rng.below(24) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(false),
        3 => json!(0),
        4 => json!(-1),
        5 => json!(1),
        6 => json!(u32::MAX),
        7 => json!(u64::from(u32::MAX) + 1),
        8 => json!(u64::MAX),
        9 => json!(i64::MIN),
        10 => json!(1.5),
        11 => json!(1e300),
        12 => json!(""),
        13 => json!(" "),
        14 => json!("\u{0}"),
        15 => json!("api.openai.com"),
        16 => json!("spiffe://ex.org/w"),
        17 => json!([]),
        18 => json!({}),
        19 => {
            let n = rng.below(3000);
            json!("x".repeat(n))
        }
        20 => json!(rng.range(0, 100_000)),
        21 => json!(rng.next()),
        22 => Value::String(String::from_utf8_lossy(&rng.bytes_below(12)).into_owned()),
        _ => json!(["a", 1, null]),
    }
}

const KEYS: &[&str] = &[
    "identity_provider_id",
    "service_account_id",
    "subject_token",
    "subject_token_type",
    "token_endpoint",
    "hosts",
    "scope",
    "limits",
    "upstream_clusters",
    "source",
    "cluster",
    "header",
    "path",
    "authority",
    "audience",
    "resource",
    "client_id",
    "object_id",
    "msi_res_id",
    "spiffe_id",
    "timeout_ms",
    "refresh_interval_s",
    "new_identities_per_s",
    "new_identities_burst",
    "max_identities",
    "invalidate_interval_s",
    "access_token",
    "token_type",
    "expires_in",
    "scope",
    "exp",
    "alg",
    "identity",
    "written_at_ms",
    "token",
    "failure",
    "refresh_at_ms",
    "expires_at_ms",
    "milli_tokens",
    "at_ms",
    "owner",
    "deadline_ms",
];

/// Mutates one random node of `v`: replace it, drop or add a key, grow or shrink an array.
fn mutate_tree(rng: &mut Rng, v: &mut Value, depth: usize) {
    let descend = depth < 8 && rng.below(3) != 0;
    match v {
        Value::Object(map) if descend && !map.is_empty() => {
            let k = map.keys().nth(rng.below(map.len())).cloned().unwrap();
            if let Some(child) = map.get_mut(&k) {
                mutate_tree(rng, child, depth + 1);
            }
        }
        Value::Array(items) if descend && !items.is_empty() => {
            let i = rng.below(items.len());
            mutate_tree(rng, &mut items[i], depth + 1);
        }
        Value::Object(map) => match rng.below(4) {
            0 if !map.is_empty() => {
                let k = map.keys().nth(rng.below(map.len())).cloned().unwrap();
                map.remove(&k);
            }
            1 | 2 => {
                map.insert(rng.pick(KEYS).to_string(), interesting_value(rng));
            }
            _ => *v = interesting_value(rng),
        },
        Value::Array(items) => match rng.below(4) {
            0 if !items.is_empty() => {
                items.remove(rng.below(items.len()));
            }
            1 if !items.is_empty() => {
                let copy = items[rng.below(items.len())].clone();
                let most = if rng.one_in(8) { 2000 } else { 4 };
                let n = 1 + rng.below(most);
                items.extend(std::iter::repeat_n(copy, n));
            }
            2 => items.push(interesting_value(rng)),
            _ => *v = interesting_value(rng),
        },
        _ => *v = interesting_value(rng),
    }
}

/// A JSON seed, mutated as a tree and/or as bytes.
fn json_input(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let seed = rng.pick(seeds).clone();
    match rng.below(4) {
        0 => {
            let mut data = seed;
            mutate_bytes(rng, &mut data, seeds);
            data
        }
        1 | 2 => match serde_json::from_slice::<Value>(&seed) {
            Ok(mut v) => {
                for _ in 0..1 + rng.below(3) {
                    mutate_tree(rng, &mut v, 0);
                }
                let mut data = serde_json::to_vec(&v).unwrap();
                if rng.one_in(3) {
                    mutate_bytes(rng, &mut data, seeds);
                }
                data
            }
            Err(_) => seed,
        },
        _ => seed,
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A subject JWT for `now_s`: usually well formed, with an `exp` around `now_s` (or an odd
/// one), its header and payload sometimes mutated as JSON or as bytes before encoding.
fn jwt_for(rng: &mut Rng, now_s: u64) -> String {
    let headers: [&[u8]; 4] = [
        br#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#,
        br#"{"alg":"ES256"}"#,
        br#"{"alg":"none"}"#,
        br#"{"typ":"JWT"}"#,
    ];
    let header_seeds: Vec<Vec<u8>> = headers.iter().map(|h| h.to_vec()).collect();
    let mut header = if rng.one_in(4) {
        json_input(rng, &header_seeds)
    } else {
        header_seeds[rng.below(2)].clone()
    };
    if rng.one_in(16) {
        header.insert(0, b' ');
    }
    let exp: Value = match rng.below(14) {
        0 => Value::Null,
        1 => json!(now_s),
        2 => json!(now_s.saturating_sub(1)),
        3 => json!(now_s.saturating_add(1)),
        4 => json!(now_s.saturating_add(2)),
        5 => json!(now_s.saturating_add(3600)),
        6 => json!(0),
        7 => json!(u64::MAX),
        8 => json!(now_s as f64 + 1.5),
        9 => json!(-5),
        10 => json!("tomorrow"),
        11 => json!(1e30),
        _ => json!(now_s.saturating_add(rng.range(0, 100_000))),
    };
    let mut payload = json!({"sub": "system:serviceaccount:ns:sa", "aud": "api", "iat": now_s});
    if !rng.one_in(6) {
        payload["exp"] = exp;
    }
    let mut payload = serde_json::to_vec(&payload).unwrap();
    if rng.one_in(5) {
        let seeds = [payload.clone()];
        payload = json_input(rng, &seeds);
    }
    let signature = rng.bytes_below(80);
    let mut token = format!("{}.{}.{}", b64(&header), b64(&payload), b64(&signature));
    if rng.one_in(6) {
        let mut bytes = token.into_bytes();
        mutate_bytes(rng, &mut bytes, &[]);
        token = String::from_utf8_lossy(&bytes).into_owned();
    }
    token
}

/// Wall-clock seconds as a host reports them.
fn now_s(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => 0,
        1 => 1000,
        2 => 1_700_000_000,
        _ => rng.range(1_600_000_000, 4_000_000_000),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. :authority
// ---------------------------------------------------------------------------------------------

const AUTHORITIES: &[&str] = &[
    "api.openai.com",
    "API.OpenAI.com",
    "api.openai.com:443",
    "api.openai.com.",
    "api.openai.com.:443",
    "localhost:10000",
    "127.0.0.1:8080",
    "[::1]",
    "[::1]:8080",
    "[2001:DB8::1]:443",
    "[::ffff:127.0.0.1]",
    "my_host:0",
    "a:65535",
    "api.openai.com:443:443",
    "api.openai.com::",
    "[::1]:1:2",
    "user@api.openai.com",
    "api.openai.com,evil.example",
];

fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return !inner.is_empty()
            && inner.bytes().all(|b| {
                b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b':' || b == b'.'
            });
    }
    h.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

#[test]
fn fuzz_authority_host() {
    let seeds: Vec<Vec<u8>> = AUTHORITIES.iter().map(|s| s.as_bytes().to_vec()).collect();
    fuzz(
        "authority::host",
        |rng| from_seeds(rng, &seeds),
        |input| lit(input),
        |input| match authority::host(input) {
            Err(_) => Ok(()),
            Ok(h) => {
                accepted();
                if h.is_empty() {
                    return Err("accepted an empty host".into());
                }
                if h.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(format!("host {h:?} has upper case"));
                }
                if !valid_host(&h) {
                    return Err(format!("host {h:?} has characters a host may not have"));
                }
                match authority::host(h.as_bytes()) {
                    Ok(again) if again == h => Ok(()),
                    other => Err(format!("host({h:?}) is {other:?}, not itself")),
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 2. jwt::inspect
// ---------------------------------------------------------------------------------------------

#[test]
fn fuzz_jwt_inspect() {
    let mut seed_rng = Rng::new(1);
    let mut seeds: Vec<Vec<u8>> = (0..32)
        .map(|_| jwt_for(&mut seed_rng, 1_700_000_000).into_bytes())
        .collect();
    seeds.push(b"a.b.c".to_vec());
    seeds.push(b"  eyJhbGciOiJSUzI1NiJ9.e30.c2ln\n".to_vec());
    fuzz(
        "jwt::inspect",
        |rng| {
            if rng.one_in(2) {
                let now = now_s(rng);
                jwt_for(rng, now).into_bytes()
            } else {
                from_seeds(rng, &seeds)
            }
        },
        |input| lit(input),
        |input| {
            let text = String::from_utf8_lossy(input);
            match jwt::inspect(&text) {
                Err(_) => Ok(()),
                Ok(_) => {
                    accepted();
                    let parts: Vec<&str> = text.trim().split('.').collect();
                    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
                        return Err(format!(
                            "accepted a token of {} parts: {parts:?}",
                            parts.len()
                        ));
                    }
                    Ok(())
                }
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 3. The header source
// ---------------------------------------------------------------------------------------------

const SUBJECT_HEADER: &str = "x-openai-subject-token";

#[test]
fn fuzz_header_accept() {
    let mut seed_rng = Rng::new(2);
    let seeds: Vec<Vec<u8>> = (0..32)
        .map(|_| jwt_for(&mut seed_rng, 1_700_000_000).into_bytes())
        .collect();
    fuzz(
        "subject::header::accept",
        |rng| {
            let now = match rng.below(8) {
                0 => u64::MAX,
                _ => now_s(rng),
            };
            let value = match rng.below(40) {
                0 => None,
                1..=20 => {
                    let mut t = jwt_for(rng, now).into_bytes();
                    if rng.one_in(4) {
                        t.insert(0, b' ');
                        t.push(b'\t');
                    }
                    Some(t)
                }
                _ => Some(from_seeds(rng, &seeds)),
            };
            (value, now)
        },
        |(value, now)| format!("value {}, now_s {now}", lit_opt(value.as_deref())),
        |(value, now)| match header::accept(value.as_deref(), SUBJECT_HEADER, *now) {
            Ok((secret, claims)) => {
                accepted();
                if let Err(e) = jwt::inspect(secret.expose()) {
                    return Err(format!("accepted a subject that is no JWT: {e}"));
                }
                if claims.exp.is_some_and(|exp| exp <= *now) {
                    return Err(format!("accepted a subject expired at {:?}", claims.exp));
                }
                Ok(())
            }
            Err(failure) => {
                let Some(value) = value else { return Ok(()) };
                let text = String::from_utf8_lossy(value);
                for echoed in [text.as_ref(), text.trim()] {
                    if echoed.len() > 20 && failure.message.contains(echoed) {
                        return Err(format!(
                            "the refusal echoes the token: {:?}",
                            failure.message
                        ));
                    }
                }
                Ok(())
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The token endpoint's answer
// ---------------------------------------------------------------------------------------------

#[test]
fn fuzz_exchange_parse_response() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600}"#,
        r#"{"access_token":"at-1","token_type":"bearer","expires_in":3600,"scope":"api.model.request","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#,
        r#"{"access_token":"a","token_type":"Bearer"}"#,
        r#"{"access_token":"a","token_type":"Bearer","expires_in":99999999999}"#,
        r#"{"access_token":"a","token_type":"Bearer","expires_in":null}"#,
        r#"{"error":"invalid_grant","error_description":"subject token expired"}"#,
        "<html>oops</html>",
        "",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let statuses: Vec<Vec<u8>> = [
        "200",
        " 200 ",
        "+200",
        "0200",
        "２００",
        "429",
        "503",
        "500",
        "401",
        "201",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let retry: Vec<Vec<u8>> = ["7", "100000", "Wed, 21 Oct 2015 07:28:00 GMT", ""]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    type Case = (Option<String>, Option<String>, Option<Vec<u8>>);
    fuzz(
        "exchange::parse_response",
        |rng| -> Case {
            let status = match rng.below(16) {
                0 => None,
                1..=10 => Some("200".to_string()),
                _ => Some(String::from_utf8_lossy(&from_seeds(rng, &statuses)).into_owned()),
            };
            let retry_after = match rng.below(3) {
                0 => None,
                _ => Some(String::from_utf8_lossy(&from_seeds(rng, &retry)).into_owned()),
            };
            let body = if rng.one_in(20) {
                None
            } else {
                Some(json_input(rng, &seeds))
            };
            (status, retry_after, body)
        },
        |(status, retry_after, body)| {
            format!(
                "status {}, retry_after {}, body {}",
                lit_opt(status.as_deref().map(str::as_bytes)),
                lit_opt(retry_after.as_deref().map(str::as_bytes)),
                lit_opt(body.as_deref())
            )
        },
        |(status, retry_after, body)| {
            let result = exchange::parse_response(
                status.as_deref(),
                retry_after.as_deref(),
                body.as_deref(),
            );
            let Ok(issued) = result else { return Ok(()) };
            accepted();
            let status = status.as_deref().unwrap_or_default();
            if status.trim() != "200" {
                return Err(format!("accepted status {status:?}"));
            }
            let token = issued.access_token.expose();
            if token.is_empty()
                || token.len() > 8192
                || !token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!("accepted access token {}", lit(token.as_bytes())));
            }
            if !(1..=86_400).contains(&issued.expires_in_s) {
                return Err(format!("accepted expires_in_s {}", issued.expires_in_s));
            }
            Ok(())
        },
    );
}

/// `:status` is compared as text by everything else in the path; a 200 must be "200", not
/// "+200" or "0200" (which `u16::from_str` alone would take). Found by the exchange target.
#[test]
fn exchange_status_must_be_exactly_200() {
    let body = br#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600}"#;
    for status in ["+200", "0200", "00200"] {
        assert!(
            exchange::parse_response(Some(status), None, Some(body)).is_err(),
            "{status:?} accepted as 200"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Configuration
// ---------------------------------------------------------------------------------------------

const CONFIGS: &[&str] = &[
    r#"{"identity_provider_id":"wip_1","service_account_id":"sa_1","token_endpoint":{"cluster":"openai_auth"}}"#,
    r#"{"identity_provider_id":"wip_1","service_account_id":"sa_1",
        "subject_token":{"source":"header","header":"x-id"},"subject_token_type":"id_token",
        "token_endpoint":{"cluster":"c","authority":"auth.example:8443","path":"/t","timeout_ms":250},
        "hosts":["API.openai.com","gateway.internal"]}"#,
    r#"{"identity_provider_id":"wip_...","service_account_id":"...",
        "subject_token":{"source":"header","header":"x-openai-subject-token"},"subject_token_type":"jwt",
        "token_endpoint":{"cluster":"openai_auth","authority":"auth.openai.com","path":"/oauth/token","timeout_ms":5000},
        "hosts":["api.openai.com"]}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "subject_token":{"source":"kubernetes","cluster":"wif_token_file","path":"/token","refresh_interval_s":30,"timeout_ms":500}}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "subject_token":{"source":"gcp_metadata","cluster":"gcp","audience":"https://api.openai.com/v1"}}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "subject_token":{"source":"azure_imds","cluster":"imds","resource":"api://x","object_id":"o"}}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "subject_token":{"source":"azure_imds","cluster":"azure_imds","resource":"api://app","client_id":"c"}}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "subject_token":{"source":"spiffe","cluster":"spire","audience":"aud","spiffe_id":"spiffe://ex.org/w"}}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "hosts":["api.openai.com","localhost","gateway.internal.","[::1]"]}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"scope":"all"}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "limits":{"new_identities_per_s":5,"new_identities_burst":7,"max_identities":16,"invalidate_interval_s":0}}"#,
    r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},
        "upstream_clusters":["outbound|443||api.openai.com"]}"#,
];

#[test]
fn fuzz_config_parse() {
    let seeds: Vec<Vec<u8>> = CONFIGS.iter().map(|s| s.as_bytes().to_vec()).collect();
    fuzz(
        "config::Config::parse",
        |rng| json_input(rng, &seeds),
        |input| lit(input),
        |input| {
            let Ok(c) = Config::parse(input) else {
                return Ok(());
            };
            accepted();
            let ms = c.token_endpoint.timeout.as_millis();
            if !(1..=60_000).contains(&ms) {
                return Err(format!("token endpoint timeout {ms} ms"));
            }
            if c.subject.is_gateway_identity()
                && !(1..=60_000).contains(&c.subject.timeout().as_millis())
            {
                return Err(format!("subject timeout {:?}", c.subject.timeout()));
            }
            if c.limits.max_identities < 1 {
                return Err("max_identities 0".into());
            }
            if let Scope::Hosts(hosts) = &c.scope {
                if hosts.is_empty() {
                    return Err("no hosts".into());
                }
                for h in hosts {
                    if authority::configured_host(h).as_ref() != Some(h) {
                        return Err(format!("host {h:?} is not in normal form"));
                    }
                }
            }
            Ok(())
        },
    );
}

/// A field as configuration errors name it: `(top level)`, or keys joined by `.` with `[n]`
/// indices, never empty. (Keys may hold any character, `.` and `[` too, so only the outline
/// is checked.)
fn well_formed_field(field: &str) -> bool {
    field == "(top level)" || (!field.is_empty() && !field.contains("(top level)"))
}

#[test]
fn fuzz_config_syntax_error_field() {
    let seeds: Vec<Vec<u8>> = CONFIGS.iter().map(|s| s.as_bytes().to_vec()).collect();
    fuzz(
        "config::json_path",
        |rng| {
            let input = json_input(rng, &seeds);
            let end = rng.below(input.len() + 2);
            (input, end)
        },
        |(input, end)| format!("{} at {end}", lit(input)),
        |(input, end)| {
            // Any position in any text: a path, without panicking.
            let eof = end % 2 == 0;
            let p = config::json_path::path(input, *end, eof);
            if p != config::json_path::path(input, (*end).min(input.len()), eof) {
                return Err("a position past the end is not the end".into());
            }
            if p.contains("(top level)") && !input.windows(11).any(|w| w == b"(top level)") {
                return Err(format!("path {p:?}"));
            }
            match Config::parse(input) {
                Err(config::ConfigError::Syntax { field, reason }) => {
                    if field != "(top level)" {
                        accepted();
                    }
                    if !well_formed_field(&field) {
                        return Err(format!("syntax error at {field:?}"));
                    }
                    if !reason.contains(" at line ") {
                        return Err(format!("{field}: {reason:?} gives no position"));
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Platform sources
// ---------------------------------------------------------------------------------------------

fn source(subject_token: &str) -> SubjectSource {
    let json = format!(
        r#"{{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{{"cluster":"a"}},"subject_token":{subject_token}}}"#
    );
    Config::parse(json.as_bytes()).unwrap().subject
}

#[derive(Debug)]
enum Answer {
    Http { status: Option<u16>, body: Vec<u8> },
    Grpc { status: u32, message: Vec<u8> },
}

impl Answer {
    fn response(&self) -> SourceResponse<'_> {
        match self {
            Answer::Http { status, body } => SourceResponse::Http {
                status: *status,
                body,
            },
            Answer::Grpc { status, message } => SourceResponse::Grpc {
                status: *status,
                message,
            },
        }
    }

    fn show(&self) -> String {
        match self {
            Answer::Http { status, body } => {
                format!("Http {{ status: {status:?}, body: {} }}", lit(body))
            }
            Answer::Grpc { status, message } => {
                format!("Grpc {{ status: {status}, message: {} }}", lit(message))
            }
        }
    }
}

fn http_status(rng: &mut Rng) -> Option<u16> {
    match rng.below(12) {
        0 => None,
        1 => Some(*rng.pick(&[403, 404, 500, 503])),
        2 => Some(rng.next() as u16),
        _ => Some(200),
    }
}

/// Runs a platform source on fuzzed answers; `answer` builds one for `now_s`.
fn fuzz_source(
    target: &str,
    sources: &[SubjectSource],
    answer: impl Fn(&mut Rng, u64) -> Answer,
    extra: impl Fn(&SubjectSource, &Answer, &subject::Fetched) -> Result<(), String>,
) {
    fuzz(
        target,
        |rng| {
            let now = now_s(rng);
            let which = rng.below(sources.len());
            let a = if rng.one_in(40) {
                // The wrong kind of answer for the source.
                if rng.one_in(2) {
                    Answer::Grpc {
                        status: 0,
                        message: jwt_for(rng, now).into_bytes(),
                    }
                } else {
                    Answer::Http {
                        status: Some(200),
                        body: jwt_for(rng, now).into_bytes(),
                    }
                }
            } else {
                answer(rng, now)
            };
            (which, a, now)
        },
        |(which, a, now)| format!("source #{which}, {}, now_s {now}", a.show()),
        |(which, a, now)| {
            let src = &sources[*which];
            match subject::parse(src, a.response(), *now) {
                Ok(f) => {
                    accepted();
                    if let Err(e) = jwt::inspect(f.subject.expose()) {
                        return Err(format!("fetched a subject that is no JWT: {e}"));
                    }
                    if f.subject.expose() != f.subject.expose().trim() {
                        return Err("fetched subject keeps surrounding white space".into());
                    }
                    if f.exp_s.is_some_and(|exp| exp <= now + 1) {
                        return Err(format!("fetched a subject expiring at {:?}", f.exp_s));
                    }
                    extra(src, a, &f)
                }
                Err(e) => {
                    let message = e.to_string();
                    // Any word that passes jwt::inspect would be the stronger check; it fails
                    // today, see `source_errors_never_echo_a_jwt`.
                    if message.contains("eyJ") {
                        return Err(format!("the error carries a token: {message:?}"));
                    }
                    Ok(())
                }
            }
        },
    );
}

fn jwt_body(rng: &mut Rng, now: u64, seeds: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(4) {
        0 => from_seeds(rng, seeds),
        1 => {
            let mut t = jwt_for(rng, now).into_bytes();
            t.push(b'\n');
            mutate_bytes(rng, &mut t, seeds);
            t
        }
        2 => format!("error: {}", jwt_for(rng, now)).into_bytes(),
        _ => {
            let mut t = jwt_for(rng, now).into_bytes();
            if rng.one_in(2) {
                t.push(b'\n');
            }
            t
        }
    }
}

fn text_seeds() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(3);
    let mut seeds: Vec<Vec<u8>> = (0..16)
        .map(|_| format!("{}\n", jwt_for(&mut rng, 1_700_000_000)).into_bytes())
        .collect();
    seeds.push(b" \n".to_vec());
    seeds.push(b"Missing Metadata-Flavor:Google header.".to_vec());
    seeds
}

#[test]
fn fuzz_kubernetes_source() {
    let sources = [source(
        r#"{"source":"kubernetes","cluster":"wif_token_file","path":"/token"}"#,
    )];
    let seeds = text_seeds();
    fuzz_source(
        "subject::parse kubernetes",
        &sources,
        |rng, now| Answer::Http {
            status: http_status(rng),
            body: jwt_body(rng, now, &seeds),
        },
        |_, _, _| Ok(()),
    );
}

#[test]
fn fuzz_gcp_metadata_source() {
    let sources = [source(
        r#"{"source":"gcp_metadata","cluster":"gcp_metadata","audience":"https://api.openai.com/v1"}"#,
    )];
    let seeds = text_seeds();
    fuzz_source(
        "subject::parse gcp_metadata",
        &sources,
        |rng, now| Answer::Http {
            status: http_status(rng),
            body: jwt_body(rng, now, &seeds),
        },
        |_, _, _| Ok(()),
    );
}

#[test]
fn fuzz_azure_imds_source() {
    let sources = [
        source(r#"{"source":"azure_imds","cluster":"azure_imds","resource":"api://app"}"#),
        source(
            r#"{"source":"azure_imds","cluster":"azure_imds","resource":"api://app","client_id":"c"}"#,
        ),
    ];
    let mut seed_rng = Rng::new(4);
    let mut seeds: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            serde_json::to_vec(&json!({
                "access_token": jwt_for(&mut seed_rng, 1_700_000_000),
                "client_id": "c",
                "expires_in": "86399",
                "expires_on": "1700086399",
                "resource": "api://app",
                "token_type": "Bearer"
            }))
            .unwrap()
        })
        .collect();
    seeds.push(br#"{"error":"invalid_request","error_description":"Identity not found"}"#.to_vec());
    seeds.push(br#"{"access_token":"  "}"#.to_vec());
    fuzz_source(
        "subject::parse azure_imds",
        &sources,
        |rng, now| {
            let body = if rng.one_in(2) {
                let mut body = serde_json::to_vec(&json!({
                    "access_token": jwt_for(rng, now),
                    "token_type": "Bearer",
                    "expires_in": "3599",
                }))
                .unwrap();
                if rng.one_in(3) {
                    let own = [body.clone()];
                    body = json_input(rng, &own);
                }
                body
            } else {
                json_input(rng, &seeds)
            };
            Answer::Http {
                status: http_status(rng),
                body,
            }
        },
        |_, _, _| Ok(()),
    );
}

const SPIFFE_IDS: &[&str] = &[
    "spiffe://ex.org/w",
    "spiffe://ex.org/a",
    "",
    "spiffe://ex.org/w ",
];

fn svid_response(rng: &mut Rng, now: u64) -> Vec<u8> {
    let svids = (0..rng.below(4))
        .map(|_| JwtSvid {
            spiffe_id: rng.pick(SPIFFE_IDS).to_string(),
            svid: if rng.one_in(8) {
                String::from_utf8_lossy(&rng.bytes_below(40)).into_owned()
            } else {
                jwt_for(rng, now)
            },
            hint: if rng.one_in(2) {
                String::new()
            } else {
                "external".into()
            },
        })
        .collect();
    JwtSvidResponse { svids }.encode_to_vec()
}

#[test]
fn fuzz_spiffe_source() {
    let sources = [
        source(
            r#"{"source":"spiffe","cluster":"spiffe_workload_api","audience":"https://api.openai.com/v1"}"#,
        ),
        source(
            r#"{"source":"spiffe","cluster":"spiffe_workload_api","audience":"aud","spiffe_id":"spiffe://ex.org/w"}"#,
        ),
    ];
    let mut seed_rng = Rng::new(5);
    let mut seeds: Vec<Vec<u8>> = (0..16)
        .map(|_| svid_response(&mut seed_rng, 1_700_000_000))
        .collect();
    seeds.push(Vec::new());
    seeds.push(b"\xff\xff\xff".to_vec());
    fuzz_source(
        "subject::parse spiffe",
        &sources,
        |rng, now| {
            let status = match rng.below(12) {
                0 => *rng.pick(&[1, 2, 5, 7, 14, 16]),
                1 => rng.next() as u32,
                _ => 0,
            };
            let message = match rng.below(4) {
                0 => from_seeds(rng, &seeds),
                1 => {
                    // Repeated fields concatenate: two responses are one with both lists.
                    let mut m = svid_response(rng, now);
                    m.extend(svid_response(rng, now));
                    m
                }
                _ => {
                    let mut m = svid_response(rng, now);
                    if rng.one_in(3) {
                        mutate_bytes(rng, &mut m, &seeds);
                    }
                    m
                }
            };
            Answer::Grpc { status, message }
        },
        |src, answer, fetched| {
            // With a spiffe_id configured, the subject is that SVID's, never another's.
            let (
                SubjectSource::Spiffe(openai_wif::subject::spiffe::Config {
                    spiffe_id: Some(want),
                    ..
                }),
                Answer::Grpc { message, .. },
            ) = (src, answer)
            else {
                return Ok(());
            };
            let decoded = JwtSvidResponse::decode(message.as_slice())
                .map_err(|e| format!("accepted a message prost cannot decode: {e}"))?;
            let first = decoded.svids.iter().find(|s| &s.spiffe_id == want);
            match first {
                Some(s) if s.svid.trim() == fetched.subject.expose() => Ok(()),
                _ => Err(format!("the subject is not the first SVID of {want}")),
            }
        },
    );
}

/// A source's error body is echoed into the refusal (the client's 503 body and the logs) unless
/// it contains "eyJ", taken as the mark of a JWT. A JWT whose header JSON does not begin with
/// `{"` (a leading space: base64 `IHsi…`; `{ "alg"…`: `eyAi…`) still passes `jwt::inspect`, and
/// is echoed whole. Found by `fuzz_kubernetes_source` and `fuzz_gcp_metadata_source`.
#[test]
fn source_errors_never_echo_a_jwt() {
    let sources = [
        source(r#"{"source":"kubernetes","cluster":"wif_token_file"}"#),
        source(r#"{"source":"gcp_metadata","cluster":"gcp","audience":"aud"}"#),
        source(r#"{"source":"azure_imds","cluster":"imds","resource":"api://x"}"#),
    ];
    for header in [&br#" {"alg":"RS256"}"#[..], br#"{ "alg":"RS256"}"#] {
        let token = format!("{}.{}.{}", b64(header), b64(b"{}"), b64(b"signature"));
        assert!(jwt::inspect(&token).is_ok(), "{token}");
        let body = format!("error: {token}");
        for src in &sources {
            let e = subject::parse(
                src,
                SourceResponse::Http {
                    status: Some(500),
                    body: body.as_bytes(),
                },
                1000,
            )
            .unwrap_err();
            assert!(!e.to_string().contains(&token), "{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Shared-data records
// ---------------------------------------------------------------------------------------------

/// Shared data with Envoy's semantics: creating a key ignores CAS, updating one with a stale
/// CAS fails, and every write takes the next number of one global counter.
#[derive(Default)]
struct Store {
    inner: RefCell<(HashMap<String, Versioned>, u32)>,
}

impl SharedStore for Store {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.inner.borrow().0.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut inner = self.inner.borrow_mut();
        inner.1 = inner.1.wrapping_add(1);
        let next = inner.1;
        match inner.0.get_mut(key) {
            Some(existing) => {
                if cas.is_some_and(|c| c != existing.1) {
                    return Err(StoreError::CasMismatch);
                }
                *existing = (value.to_vec(), next);
            }
            None => {
                inner.0.insert(key.to_string(), (value.to_vec(), next));
            }
        }
        Ok(())
    }
}

impl Store {
    fn keys(&self) -> Vec<String> {
        self.inner.borrow().0.keys().cloned().collect()
    }

    fn value(&self, key: &str) -> Option<Vec<u8>> {
        self.inner.borrow().0.get(key).map(|(v, _)| v.clone())
    }
}

fn identities(n: usize) -> Vec<IdentityKey> {
    let config = Config::parse(CONFIGS[0].as_bytes()).unwrap();
    (0..n)
        .map(|i| {
            IdentityKey::for_subject(
                &config,
                &config.account,
                &Secret::new(format!("subject-{i}")),
            )
        })
        .collect()
}

const T0_MS: u64 = 1_700_000_000_000;

#[derive(Debug)]
enum CacheOp {
    Find(usize),
    Lookup(usize),
    Succeed {
        id: usize,
        refresh_in: u64,
        expires_in: u64,
    },
    Fail {
        id: usize,
        retry_after_s: Option<u64>,
        jitter: u16,
    },
    Invalidate {
        id: usize,
        interval_ms: u64,
    },
    Keep(usize),
    Sweep {
        start: u32,
        count: u32,
    },
    Clear(u32),
    Advance(u64),
}

const CACHE_SLOTS: u32 = 8;

fn record_seed(rng: &mut Rng, ids: &[IdentityKey]) -> Vec<u8> {
    let now = T0_MS + rng.range(0, 600_000);
    let token = CachedToken::new(
        Secret::new(format!("at-{}", rng.below(100))),
        now + rng.range(0, 60_000),
        now + rng.range(0, 120_000),
    );
    let mut r = Record::succeeded(None, token, now.saturating_sub(rng.range(0, 1_000_000)));
    if rng.one_in(3) {
        r = Record::failed(
            Some(&r),
            Failure::new(Code::TokenExchangeFailed, "boom"),
            now,
            Some(rng.range(0, 400)),
            rng.next() as u16,
        );
    }
    if rng.one_in(4) {
        r.token = None;
    }
    if rng.one_in(4) {
        r.invalidated_at_ms = Some(now);
    }
    r.identity = ids[rng.below(ids.len())].as_str().to_string();
    serde_json::to_vec(&r).unwrap()
}

#[test]
fn fuzz_cache_table() {
    let ids = identities(24);
    let mut seed_rng = Rng::new(6);
    let mut seeds: Vec<Vec<u8>> = (0..16).map(|_| record_seed(&mut seed_rng, &ids)).collect();
    seeds.push(Vec::new());
    seeds.push(b"{}".to_vec());
    let table = Table::new(CACHE_SLOTS);
    fuzz(
        "cache::Table",
        |rng| {
            let prefill: Vec<(u32, Vec<u8>)> = (0..rng.below(CACHE_SLOTS as usize + 1))
                .map(|_| {
                    let slot = rng.below(CACHE_SLOTS as usize) as u32;
                    let bytes = if rng.one_in(3) {
                        record_seed(rng, &ids)
                    } else {
                        json_input(rng, &seeds)
                    };
                    (slot, bytes)
                })
                .collect();
            let ops: Vec<CacheOp> = (0..1 + rng.below(24))
                .map(|_| {
                    let id = rng.below(ids.len());
                    match rng.below(10) {
                        0 => CacheOp::Find(id),
                        1 => CacheOp::Lookup(id),
                        2 | 3 => CacheOp::Succeed {
                            id,
                            refresh_in: rng.range(0, 60_000),
                            expires_in: rng.range(1, 120_000),
                        },
                        4 => CacheOp::Fail {
                            id,
                            retry_after_s: rng.one_in(2).then(|| rng.range(0, 1000)),
                            jitter: rng.next() as u16,
                        },
                        5 => CacheOp::Invalidate {
                            id,
                            interval_ms: rng.range(0, 60_000),
                        },
                        6 => CacheOp::Keep(id),
                        7 => CacheOp::Sweep {
                            start: rng.next() as u32,
                            count: rng.below(12) as u32,
                        },
                        8 => CacheOp::Clear(rng.below(CACHE_SLOTS as usize) as u32),
                        _ => CacheOp::Advance(if rng.one_in(4) {
                            rng.range(0, 1_000_000)
                        } else {
                            rng.range(0, 5_000)
                        }),
                    }
                })
                .collect();
            (prefill, ops, T0_MS + rng.range(0, 1_000_000))
        },
        |(prefill, ops, start)| {
            let mut out = format!("start {start} ms, prefill [");
            for (slot, bytes) in prefill {
                let _ = write!(out, "({slot}, {}), ", lit(bytes));
            }
            let _ = write!(out, "], ops {ops:?}");
            out
        },
        |(prefill, ops, start)| {
            let store = Store::default();
            for (slot, bytes) in prefill {
                store.set(&Table::slot_key(*slot), bytes, None).unwrap();
            }
            let mut now = *start;
            let found_ok = |key: &IdentityKey| -> Result<Option<Record>, String> {
                let found = table.find(&store, key);
                if let Some(f) = &found {
                    if f.record.identity != key.as_str() {
                        return Err(format!(
                            "found {:?} for {}",
                            f.record.identity,
                            key.as_str()
                        ));
                    }
                    if !table.candidates(key).any(|s| s == f.slot) {
                        return Err(format!(
                            "found {} in slot {}, not one of its own",
                            key.as_str(),
                            f.slot
                        ));
                    }
                }
                let record = table.record(&store, key);
                if record.is_some() {
                    accepted();
                }
                if record != found.map(|f| f.record) {
                    return Err("record and find disagree".into());
                }
                Ok(record)
            };
            for op in ops {
                match op {
                    CacheOp::Find(id) => {
                        found_ok(&ids[*id])?;
                    }
                    CacheOp::Lookup(id) => {
                        let record = found_ok(&ids[*id])?;
                        let state = cache::lookup(record.as_ref(), now);
                        if state.token().is_some_and(|t| now >= t.expires_at_ms) {
                            return Err("lookup uses an expired token".into());
                        }
                        let backing_off = matches!(
                            state,
                            Lookup::BackingOff(_) | Lookup::ServingWhileBackingOff(_)
                        );
                        let failure_over = record
                            .as_ref()
                            .and_then(|r| r.failure.as_ref())
                            .is_none_or(|f| now >= f.retry_at_ms);
                        if backing_off && failure_over {
                            return Err("lookup backs off past retry_at_ms".into());
                        }
                    }
                    CacheOp::Succeed {
                        id,
                        refresh_in,
                        expires_in,
                    } => {
                        let key = &ids[*id];
                        let token = CachedToken::new(
                            Secret::new(format!("at-{id}-{now}")),
                            now + refresh_in,
                            now + expires_in,
                        );
                        let written = table
                            .update(&store, key, now, |prev| {
                                Some(Record::succeeded(prev, token.clone(), now))
                            })
                            .map_err(|e| format!("update failed: {e}"))?
                            .ok_or("a token was not stored")?;
                        if written.identity != key.as_str() {
                            return Err("the written record names another identity".into());
                        }
                        if found_ok(key)? != Some(written) {
                            return Err("a stored token is not found again".into());
                        }
                    }
                    CacheOp::Fail {
                        id,
                        retry_after_s,
                        jitter,
                    } => {
                        let key = &ids[*id];
                        let before = store.inner.borrow().0.clone();
                        let written = table
                            .update(&store, key, now, |prev| {
                                Some(Record::failed(
                                    prev,
                                    Failure::new(Code::TokenExchangeFailed, "boom"),
                                    now,
                                    *retry_after_s,
                                    *jitter,
                                ))
                            })
                            .map_err(|e| format!("update failed: {e}"))?;
                        match written {
                            Some(w) => {
                                if found_ok(key)? != Some(w) {
                                    return Err("a stored failure is not found again".into());
                                }
                            }
                            None => {
                                if store.inner.borrow().0 != before {
                                    return Err(
                                        "an update that wrote nothing changed the store".into()
                                    );
                                }
                            }
                        }
                    }
                    CacheOp::Invalidate { id, interval_ms } => {
                        let key = &ids[*id];
                        let Some(fp) = found_ok(key)?.and_then(|r| r.token).map(|t| t.fingerprint)
                        else {
                            continue;
                        };
                        table
                            .update(&store, key, now, |prev| {
                                prev?.invalidated(&fp, now, *interval_ms)
                            })
                            .map_err(|e| format!("update failed: {e}"))?;
                        found_ok(key)?;
                    }
                    CacheOp::Keep(id) => {
                        let key = &ids[*id];
                        let before = store.inner.borrow().0.clone();
                        let written = table
                            .update(&store, key, now, |_| None)
                            .map_err(|e| format!("update failed: {e}"))?;
                        if written.is_some() || store.inner.borrow().0 != before {
                            return Err("an update that changed nothing wrote".into());
                        }
                    }
                    CacheOp::Sweep { start, count } => {
                        let cleared = table.sweep(&store, *start, *count, now);
                        if cleared > (*count).min(CACHE_SLOTS) {
                            return Err(format!("swept {cleared} of {count} slots"));
                        }
                    }
                    CacheOp::Clear(slot) => {
                        let key = Table::slot_key(*slot);
                        if let Ok(true) = cache::clear_if_spent(&store, &key, now) {
                            if store.value(&key).is_some_and(|v| !v.is_empty()) {
                                return Err("a cleared slot still holds a record".into());
                            }
                        }
                    }
                    CacheOp::Advance(ms) => now += ms,
                }
            }
            let slot_keys: Vec<String> = (0..CACHE_SLOTS).map(Table::slot_key).collect();
            let keys = store.keys();
            if keys.len() > CACHE_SLOTS as usize || keys.iter().any(|k| !slot_keys.contains(k)) {
                return Err(format!("the store holds keys {keys:?}"));
            }
            Ok(())
        },
    );
}

#[derive(Debug)]
enum LeaseOp {
    Ensure,
    Acquire { id: usize, owner: u64, ttl_ms: u64 },
    Release { id: usize, owner: u64 },
    Advance(u64),
}

type LeaseTable = BTreeMap<String, Lease>;

fn lease_table(store: &Store) -> Option<LeaseTable> {
    serde_json::from_slice(&store.value(&lease::table_key())?).ok()
}

fn lease_seed(rng: &mut Rng, ids: &[IdentityKey], n: usize) -> Vec<u8> {
    let table: LeaseTable = (0..n)
        .map(|i| {
            let key = match ids.get(i) {
                Some(k) if rng.one_in(2) => k.as_str().to_string(),
                _ => format!("k{i}"),
            };
            let lease = Lease {
                owner: rng.range(1, 3),
                deadline_ms: T0_MS + rng.range(0, 20_000),
            };
            (key, lease)
        })
        .collect();
    serde_json::to_vec(&table).unwrap()
}

#[test]
fn fuzz_lease_table() {
    let ids = identities(16);
    let mut seed_rng = Rng::new(7);
    let mut seeds: Vec<Vec<u8>> = (0..8).map(|i| lease_seed(&mut seed_rng, &ids, i)).collect();
    seeds.push(b"{}".to_vec());
    seeds.push(b"not json".to_vec());
    let big: Vec<Vec<u8>> = [MAX_LEASES - 1, MAX_LEASES, MAX_LEASES + 3]
        .iter()
        .map(|&n| {
            let table: LeaseTable = (0..n)
                .map(|i| {
                    (
                        format!("k{i}"),
                        Lease {
                            owner: 9,
                            deadline_ms: T0_MS + 10_000 + i as u64,
                        },
                    )
                })
                .collect();
            serde_json::to_vec(&table).unwrap()
        })
        .collect();
    fuzz(
        "lease",
        |rng| {
            let prefill = match rng.below(200) {
                0 => Some(rng.pick(&big).clone()),
                1..=20 => None,
                _ => Some(json_input(rng, &seeds)),
            };
            let ops: Vec<LeaseOp> = (0..1 + rng.below(16))
                .map(|_| match rng.below(9) {
                    0 => LeaseOp::Ensure,
                    1..=4 => LeaseOp::Acquire {
                        id: rng.below(ids.len()),
                        owner: rng.range(1, 3),
                        ttl_ms: rng.range(0, 10_000),
                    },
                    5..=6 => LeaseOp::Release {
                        id: rng.below(ids.len()),
                        owner: rng.range(1, 3),
                    },
                    _ => LeaseOp::Advance(rng.range(0, 12_000)),
                })
                .collect();
            (prefill, rng.one_in(2), ops)
        },
        |(prefill, ensure, ops)| {
            format!(
                "prefill {}, ensure_table first {ensure}, ops {ops:?}",
                lit_opt(prefill.as_deref())
            )
        },
        |(prefill, ensure, ops)| {
            let store = Store::default();
            if let Some(bytes) = prefill {
                store.set(&lease::table_key(), bytes, None).unwrap();
            }
            if *ensure {
                lease::ensure_table(&store).map_err(|e| e.to_string())?;
            }
            let bound = MAX_LEASES.max(lease_table(&store).map_or(0, |t| t.len()));
            let mut now = T0_MS;
            for op in ops {
                match op {
                    LeaseOp::Ensure => lease::ensure_table(&store).map_err(|e| e.to_string())?,
                    LeaseOp::Acquire { id, owner, ttl_ms } => {
                        let key = &ids[*id];
                        let deadline = now + ttl_ms;
                        let got = lease::try_acquire(&store, key, *owner, now, deadline)
                            .map_err(|e| format!("try_acquire failed: {e}"))?;
                        let table = lease_table(&store);
                        match got {
                            Acquire::Acquired => {
                                let table = table.ok_or("acquired, but no table is stored")?;
                                if table.get(key.as_str())
                                    != Some(&Lease {
                                        owner: *owner,
                                        deadline_ms: deadline,
                                    })
                                {
                                    return Err("acquired, but the table does not say so".into());
                                }
                                if table.len() > MAX_LEASES {
                                    return Err(format!(
                                        "the table grew to {} leases",
                                        table.len()
                                    ));
                                }
                            }
                            Acquire::Held(l) => {
                                accepted();
                                if l.deadline_ms <= now {
                                    return Err("held by a lease past its deadline".into());
                                }
                                if table.and_then(|t| t.get(key.as_str()).copied()) != Some(l) {
                                    return Err("held by a lease the table does not hold".into());
                                }
                            }
                            Acquire::Full => {
                                let live = table.map_or(0, |t| {
                                    t.values().filter(|l| l.deadline_ms > now).count()
                                });
                                if live < MAX_LEASES {
                                    return Err(format!("full with {live} live leases"));
                                }
                            }
                        }
                    }
                    LeaseOp::Release { id, owner } => {
                        let key = &ids[*id];
                        lease::release(&store, key, *owner)
                            .map_err(|e| format!("release failed: {e}"))?;
                        if lease_table(&store)
                            .and_then(|t| t.get(key.as_str()).copied())
                            .is_some_and(|l| l.owner == *owner)
                        {
                            return Err("the owner's lease survived its release".into());
                        }
                    }
                    LeaseOp::Advance(ms) => now += ms,
                }
                if let Some(t) = lease_table(&store) {
                    if t.len() > bound {
                        return Err(format!("the table holds {} leases", t.len()));
                    }
                }
            }
            Ok(())
        },
    );
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Bucket {
    milli_tokens: u64,
    at_ms: u64,
}

#[test]
fn fuzz_admission_bucket() {
    let seeds: Vec<Vec<u8>> = [
        r#"{"milli_tokens":0,"at_ms":1700000000000}"#,
        r#"{"milli_tokens":100000,"at_ms":1700000000000}"#,
        r#"{"milli_tokens":18446744073709551615,"at_ms":0}"#,
        r#"{"milli_tokens":5500,"at_ms":1700000099999}"#,
        "garbage",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz(
        "admission::take",
        |rng| {
            let prefill = (!rng.one_in(4)).then(|| json_input(rng, &seeds));
            let per_s = if rng.one_in(8) {
                100_000
            } else {
                rng.range(1, 50) as u32
            };
            let burst = if rng.one_in(8) {
                100_000
            } else {
                rng.range(1, 20) as u32
            };
            let steps: Vec<u64> = (0..1 + rng.below(64))
                .map(|_| match rng.below(4) {
                    0 => 0,
                    1 => rng.range(0, 2_000),
                    2 => rng.range(0, 50),
                    _ => rng.range(0, 200),
                })
                .collect();
            (prefill, per_s, burst, steps)
        },
        |(prefill, per_s, burst, steps)| {
            format!(
                "prefill {}, per_s {per_s}, burst {burst}, steps {steps:?}",
                lit_opt(prefill.as_deref())
            )
        },
        |(prefill, per_s, burst, steps)| {
            let store = Store::default();
            let mut decoded = false;
            if let Some(bytes) = prefill {
                store.set(&admission::key(), bytes, None).unwrap();
                decoded = serde_json::from_slice::<Bucket>(bytes).is_ok();
            }
            let start = T0_MS;
            let mut now = start;
            let mut admitted: u64 = 0;
            for step in steps {
                now += step;
                match admission::take(&store, now, *per_s, *burst)
                    .map_err(|e| format!("take failed: {e}"))?
                {
                    Admit::Yes => admitted += 1,
                    Admit::No { retry_after_ms } => {
                        accepted();
                        if !(1..=1000).contains(&retry_after_ms) {
                            return Err(format!("retry after {retry_after_ms} ms"));
                        }
                    }
                }
                let allowed = u64::from(*burst)
                    + u64::from(*per_s) * (now - start) / 1000
                    + 1
                    + u64::from(decoded);
                if admitted > allowed {
                    return Err(format!(
                        "admitted {admitted} in {} ms at {per_s}/s, burst {burst}",
                        now - start
                    ));
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Subject checks and JWKS documents
// ---------------------------------------------------------------------------------------------

fn public_jwk(private: &str) -> Value {
    let mut k: Value = serde_json::from_str(private).unwrap();
    for m in ["d", "p", "q"] {
        k.as_object_mut().unwrap().remove(m);
    }
    k
}

fn test_jwks() -> Vec<u8> {
    let keys = [
        public_jwk(include_str!("fixtures/rsa-2048-old.private.jwk.json")),
        public_jwk(include_str!("fixtures/ec-p256.private.jwk.json")),
        public_jwk(include_str!("fixtures/rsa-1024.private.jwk.json")),
        json!({"kty": "oct", "kid": "k1", "k": "c2VjcmV0"}),
    ];
    serde_json::to_vec(&json!({ "keys": keys })).unwrap()
}

/// A subject with every claim OpenAI requires and a kid of the test JWKS, usually; its header
/// and payload sometimes mutated as JSON, its signature random bytes.
fn subject_for(rng: &mut Rng, now_s: u64) -> String {
    let headers = [
        json!({"alg": "RS256", "kid": "old-2024", "typ": "JWT"}),
        json!({"alg": "ES256", "kid": "ec-1"}),
        json!({"alg": "PS256", "kid": "weak"}),
        json!({"alg": "HS256", "kid": "k1"}),
    ];
    let header = serde_json::to_vec(rng.pick(&headers)).unwrap();
    let exp = match rng.below(4) {
        0 => now_s,
        1 => now_s.saturating_sub(rng.range(0, 100)),
        _ => now_s.saturating_add(rng.range(1, 100_000)),
    };
    let payload = serde_json::to_vec(&json!({
        "iss": "https://kubernetes.default.svc", "aud": ["https://api.openai.com/v1"],
        "sub": "system:serviceaccount:ns:sa", "iat": now_s.saturating_sub(5), "exp": exp,
    }))
    .unwrap();
    let mut parts = [header, payload];
    for part in &mut parts {
        if rng.one_in(4) {
            let seeds = [part.clone()];
            *part = json_input(rng, &seeds);
        }
    }
    let signature = rng.bytes_below(300);
    format!("{}.{}.{}", b64(&parts[0]), b64(&parts[1]), b64(&signature))
}

#[test]
fn fuzz_checks() {
    use openai_wif::checks::{self, Expect, Facts, Jwks, Keys};
    let jwks = Jwks::parse(&test_jwks()).unwrap();
    let verifying = Expect {
        keys: Keys::Inline(jwks),
        ..Expect::default()
    };
    let mut seed_rng = Rng::new(9);
    let seeds: Vec<Vec<u8>> = (0..32)
        .map(|_| subject_for(&mut seed_rng, 1_700_000_000).into_bytes())
        .collect();
    fuzz(
        "checks::check",
        |rng| {
            let now = now_s(rng);
            let token = if rng.one_in(2) {
                subject_for(rng, now).into_bytes()
            } else if rng.one_in(2) {
                jwt_for(rng, now).into_bytes()
            } else {
                from_seeds(rng, &seeds)
            };
            (token, now)
        },
        |(token, now)| format!("{} at {now}", lit(token)),
        |(token, now)| {
            let text = String::from_utf8_lossy(token);
            // Nothing here is signed by a test key: a verifying run must refuse every input.
            if let Ok(v) = checks::check(&text, &verifying, None, *now) {
                return Err(format!("accepted an unsigned token: {v:?}"));
            }
            let signature = text.trim().rsplit('.').next().unwrap_or_default();
            match checks::check(&text, &Expect::default(), None, *now) {
                Ok(v) => {
                    accepted();
                    if v.signature_checked || v.exp_s <= *now {
                        return Err(format!("accepted {v:?} at {now}"));
                    }
                    if jwt::inspect(&text).is_err() {
                        return Err("accepted what jwt::inspect refuses".into());
                    }
                }
                Err(r) => {
                    if r.message.chars().any(char::is_control) {
                        return Err(format!("control characters in {:?}", r.message));
                    }
                    if signature.len() >= 16 && r.message.contains(signature) {
                        return Err(format!("the signature is in {:?}", r.message));
                    }
                }
            }
            if let Some(facts) = Facts::read(&text) {
                let s = facts.summary(*now);
                if s.chars().any(char::is_control) || s.chars().count() > 1000 {
                    return Err(format!("summary {s:?}"));
                }
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_jwks_parse() {
    use openai_wif::checks::jwks::{Jwks, MAX_KEYS, MAX_KID_BYTES};
    let seeds = vec![test_jwks(), br#"{"keys":[]}"#.to_vec()];
    fuzz(
        "checks::Jwks::parse",
        |rng| json_input(rng, &seeds),
        |input| lit(input),
        |input| {
            let Ok(jwks) = Jwks::parse(input) else {
                return Ok(());
            };
            if !jwks.keys().is_empty() {
                accepted();
            }
            if jwks.keys().len() + jwks.skipped().len() > MAX_KEYS {
                return Err(format!("{} keys", jwks.keys().len()));
            }
            for k in jwks.keys() {
                if k.kid.is_empty() || k.kid.len() > MAX_KID_BYTES {
                    return Err(format!("kid {:?}", k.kid));
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 9. RSA signatures
// ---------------------------------------------------------------------------------------------

/// A modulus, exponent, algorithm, message and signature; `valid` when they are one of the
/// known answers, unchanged.
struct RsaInput {
    n: Vec<u8>,
    e: u32,
    alg: &'static str,
    message: Vec<u8>,
    signature: Vec<u8>,
    valid: bool,
}

/// The known answers of tests/fixtures (OpenSSL signatures) with their keys' `n` and `e`, but
/// for the 4096-bit key's (the unit tests verify those; here they would be most of the time).
fn rsa_known_answers() -> Vec<RsaInput> {
    let keys: Vec<Value> = [
        include_str!("fixtures/rsa-2048-old.private.jwk.json"),
        include_str!("fixtures/rsa-2048-e3.private.jwk.json"),
        include_str!("fixtures/rsa-2049.private.jwk.json"),
    ]
    .iter()
    .map(|k| serde_json::from_str(k).unwrap())
    .collect();
    let doc: Value = serde_json::from_str(include_str!("fixtures/rsa-known-answers.json")).unwrap();
    let unb64 = |v: &Value| URL_SAFE_NO_PAD.decode(v.as_str().unwrap()).unwrap();
    doc["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| {
            let key = keys.iter().find(|k| k["kid"] == a["kid"])?;
            Some(RsaInput {
                n: unb64(&key["n"]),
                e: unb64(&key["e"])
                    .iter()
                    .fold(0, |acc, &b| (acc << 8) | u32::from(b)),
                alg: RSA_ALGS.iter().find(|g| a["alg"] == **g).unwrap(),
                message: a["message"].as_str().unwrap().as_bytes().to_vec(),
                signature: unb64(&a["signature"]),
                valid: true,
            })
        })
        .collect()
}

const RSA_ALGS: [&str; 6] = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"];

fn rsa_input(rng: &mut Rng, answers: &[RsaInput]) -> RsaInput {
    if !rng.one_in(10) {
        // Random keys, mostly small: the work grows with the square of the size (the known
        // answers, 2048 bits, are most of the target's time all the same).
        let len = if rng.one_in(40) {
            rng.below(600)
        } else {
            rng.below(130)
        };
        let mut n = rng.bytes(len);
        if let Some(last) = n.last_mut() {
            *last |= u8::from(!rng.one_in(8));
        }
        let e = match rng.below(3) {
            0 => 65537,
            1 => 3,
            _ => rng.next() as u32,
        };
        let k = n.iter().skip_while(|&&b| b == 0).count();
        let sig_len = if rng.one_in(4) { rng.below(k + 2) } else { k };
        return RsaInput {
            n,
            e,
            alg: RSA_ALGS[rng.below(RSA_ALGS.len())],
            message: rng.bytes_below(100),
            signature: rng.bytes(sig_len),
            valid: false,
        };
    }
    let a = rng.pick(answers);
    let mut input = RsaInput {
        n: a.n.clone(),
        e: a.e,
        alg: a.alg,
        message: a.message.clone(),
        signature: a.signature.clone(),
        valid: true,
    };
    if rng.one_in(3) {
        return input;
    }
    match rng.below(5) {
        0 => mutate_bytes(rng, &mut input.n, &[]),
        1 => input.e = rng.range(0, 1 << 17) as u32,
        2 => input.alg = *rng.pick(&RSA_ALGS),
        3 => mutate_bytes(rng, &mut input.message, &[]),
        _ => {
            let seeds = [a.n.clone()];
            mutate_bytes(rng, &mut input.signature, &seeds)
        }
    }
    // Leading zero bytes of n are not part of it.
    let strip = |n: &[u8]| {
        n.iter()
            .skip_while(|&&b| b == 0)
            .copied()
            .collect::<Vec<u8>>()
    };
    input.valid = strip(&input.n) == strip(&a.n)
        && input.e == a.e
        && input.alg == a.alg
        && input.message == a.message
        && input.signature == a.signature;
    input
}

#[test]
fn fuzz_rsa_verify() {
    use openai_wif::checks::rsassa::{Hash, PublicKey};
    let answers = rsa_known_answers();
    // The known answers' keys, read once: a key is most of the cost of a short signature.
    let keys: Vec<(Vec<u8>, u32, PublicKey)> = answers
        .iter()
        .map(|a| (a.n.clone(), a.e, PublicKey::new(&a.n, a.e).unwrap()))
        .collect();
    fuzz(
        "checks::rsassa verify",
        |rng| rsa_input(rng, &answers),
        |i| {
            format!(
                "n {} e {} {} message {} signature {} (valid: {})",
                lit(&i.n),
                i.e,
                i.alg,
                lit(&i.message),
                lit(&i.signature),
                i.valid
            )
        },
        |i| {
            let known = keys.iter().find(|(n, e, _)| *n == i.n && *e == i.e);
            let key = match known.map_or_else(|| PublicKey::new(&i.n, i.e), |k| Ok(k.2.clone())) {
                Ok(k) => k,
                Err(_) if i.valid => return Err("refused the key of a known answer".into()),
                Err(_) => return Ok(()),
            };
            let hash = match &i.alg[2..] {
                "256" => Hash::Sha256,
                "384" => Hash::Sha384,
                _ => Hash::Sha512,
            };
            let ok = if i.alg.starts_with("RS") {
                key.verify_pkcs1v15(hash, &i.message, &i.signature)
            } else {
                key.verify_pss(hash, &i.message, &i.signature)
            };
            match (ok, i.valid) {
                (true, true) => accepted(),
                (false, false) => {}
                (true, false) => return Err("verified a changed or random signature".into()),
                (false, true) => return Err("refused a known answer".into()),
            }
            Ok(())
        },
    );
}
