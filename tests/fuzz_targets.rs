//! Every parser against generated inputs: a seeded, dependency-free fuzzer for the stable toolchain.
//!
//! Each target starts from a corpus of valid inputs and mutates it (bit flips, bytes that are not
//! UTF-8, insertions, deletions, splices, long runs, deep nesting). Per input it checks that the
//! target does not panic, that it answers within a time bound (a second: a hang, not a slow
//! input), and an oracle: what a target
//! accepts must really be valid ("garbage never parses as success").
//!
//! `cargo test` runs a short pass; `make fuzz` sets `OPENAI_WIF_FUZZ_ITERATIONS=1000000`.
//! A failure prints the target, the seed and the input, so it can be replayed.
#![cfg(not(target_arch = "wasm32"))]
// A test harness: failing loudly is its job.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openai_wif::admission::{self, Admit};
use openai_wif::authority;
use openai_wif::cache::{lookup, CachedToken, Record, Table};
use openai_wif::config::{Config, Scope};
use openai_wif::exchange;
use openai_wif::identity::IdentityKey;
use openai_wif::jwt;
use openai_wif::lease::{self, Acquire};
use openai_wif::secret::Secret;
use openai_wif::shared::{SharedStore, StoreError, Versioned};
use openai_wif::subject::{self, header, SourceResponse};

const NOW_S: u64 = 1_800_000_000;

fn iterations() -> u64 {
    std::env::var("OPENAI_WIF_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// xorshift64*: small, fast, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn byte(&mut self) -> u8 {
        const INTERESTING: &[u8] = b"\x00\xff\x80\xc3\xfe\x7f.:[]{}\",\\ 0123456789eyJ*%";
        if self.next() % 3 == 0 {
            INTERESTING[self.below(INTERESTING.len())]
        } else {
            self.next() as u8
        }
    }
}

/// One mutation of a corpus entry (sometimes several stacked).
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut input = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let len = input.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.byte();
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
                input.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let j = (i + 1 + rng.below(16)).min(len);
                input.drain(i..j);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let j = (i + 1 + rng.below(32)).min(len);
                let copy = input[i..j].to_vec();
                input.splice(j..j, copy);
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(input.len() + 1);
                let from = rng.below(other.len() + 1);
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
            6 => input.truncate(rng.below(len + 1)),
            7 => {
                let i = rng.below(len + 1);
                let run = [b"[".as_slice(), b"{\"a\":", b"9", b"A", b".", b"\xff"][rng.below(6)];
                let n = 1 + rng.below(2_000);
                let bytes: Vec<u8> = run.iter().copied().cycle().take(run.len() * n).collect();
                input.splice(i..i, bytes);
            }
            8 => {
                let n = rng.below(64);
                input = (0..n).map(|_| rng.byte()).collect();
            }
            _ => {
                // Inside a JWT, mutate a decoded part and encode it again, so the mutation
                // reaches the JSON parser rather than stopping at base64.
                if let Some(mutated) = mutate_jwt_part(rng, &input) {
                    input = mutated;
                }
            }
        }
    }
    input
}

fn mutate_jwt_part(rng: &mut Rng, input: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(input).ok()?;
    let mut parts: Vec<String> = text.split('.').map(str::to_string).collect();
    if parts.len() != 3 {
        return None;
    }
    let which = rng.below(2);
    let mut decoded = URL_SAFE_NO_PAD.decode(&parts[which]).ok()?;
    if decoded.is_empty() {
        return None;
    }
    let i = rng.below(decoded.len());
    decoded[i] = rng.byte();
    parts[which] = URL_SAFE_NO_PAD.encode(decoded);
    Some(parts.join(".").into_bytes())
}

/// Runs `target` on `iterations()` inputs from `corpus`; `check` is the oracle (panics on a
/// violation) and says whether the target accepted the input. Fails on a panic, a violated
/// oracle, an input that takes too long, or a target that accepted nothing or everything (then
/// the mutations or the oracle are not doing their job).
fn fuzz(name: &str, seed: u64, corpus: &[Vec<u8>], mut check: impl FnMut(&[u8]) -> bool) {
    // A hang detector, not a benchmark: loose enough that a loaded machine does not trip it.
    let limit = if cfg!(debug_assertions) {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(1)
    };
    let mut rng = Rng(seed | 1);
    let n = iterations();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut accepted = 0u64;
    for i in 0..n {
        let input = if i < corpus.len() as u64 {
            corpus[i as usize].clone()
        } else {
            mutate(&mut rng, corpus)
        };
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = t.elapsed();
        slowest = slowest.max(took);
        match outcome {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(_) => panic!(
                "{name}: input {i} (seed {seed}) failed: {:?}",
                String::from_utf8_lossy(&input)
            ),
        }
        assert!(
            took <= limit,
            "{name}: input {i} (seed {seed}) took {took:?}: {:?}",
            String::from_utf8_lossy(&input[..input.len().min(200)])
        );
    }
    println!(
        "fuzz {name}: {n} inputs in {:.2?}, {accepted} accepted (slowest {slowest:?})",
        started.elapsed()
    );
    assert!(
        accepted > 0 && accepted < n,
        "{name}: {accepted} of {n} accepted"
    );
}

fn jwt_with(header: &str, payload: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload),
        URL_SAFE_NO_PAD.encode(b"signature-bytes")
    )
}

fn jwts() -> Vec<Vec<u8>> {
    let exp = NOW_S + 3600;
    [
        jwt_with(
            r#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#,
            &format!(r#"{{"iss":"https://kubernetes.default.svc","sub":"system:serviceaccount:ai:app","aud":["https://api.openai.com/v1"],"exp":{exp},"iat":{NOW_S}}}"#),
        ),
        jwt_with(r#"{"alg":"ES256","kid":"x"}"#, &format!(r#"{{"exp":{exp}.5}}"#)),
        jwt_with(r#"{"alg":"RS256"}"#, r#"{"sub":"no-exp"}"#),
        jwt_with(r#"{"alg":"none"}"#, r#"{"exp":1}"#),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

/// What an accepted subject must be: three non-empty dot-separated parts.
fn assert_compact(token: &str) {
    let parts: Vec<&str> = token.trim().split('.').collect();
    assert_eq!(parts.len(), 3, "accepted a token that is not three parts");
    assert!(
        parts.iter().all(|p| !p.is_empty()),
        "accepted an empty part"
    );
}

#[test]
fn authority() {
    let corpus: Vec<Vec<u8>> = [
        "api.openai.com",
        "API.OpenAI.com:443",
        "api.openai.com.",
        "localhost:10000",
        "[::1]:8080",
        "[2001:db8::1]",
        "127.0.0.1",
        "api.openai.com:443:443",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("authority", 1, &corpus, |input| {
        if let Ok(host) = authority::host(input) {
            assert!(!host.is_empty());
            assert_eq!(host, host.to_ascii_lowercase());
            let bracketed = host.starts_with('[') && host.ends_with(']');
            assert!(
                bracketed
                    || host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
                "{host:?}"
            );
            assert_eq!(
                authority::host(host.as_bytes()),
                Ok(host.clone()),
                "not idempotent"
            );
            return true;
        }
        false
    });
}

#[test]
fn jwt_and_the_header_source() {
    fuzz("jwt", 2, &jwts(), |input| {
        let text = String::from_utf8_lossy(input);
        if jwt::inspect(&text).is_ok() {
            assert_compact(&text);
        }
        match header::accept(Some(input), "x-openai-subject-token", NOW_S) {
            Ok((secret, claims)) => {
                let accepted = true;
                assert_compact(secret.expose());
                assert!(jwt::inspect(secret.expose()).is_ok());
                assert!(
                    claims.exp.is_none_or(|e| e > NOW_S),
                    "accepted an expired subject"
                );
                accepted
            }
            Err(f) => {
                if input.len() > 20 {
                    assert!(
                        !f.message.contains(&*String::from_utf8_lossy(input)),
                        "a refusal echoed the token"
                    );
                }
                false
            }
        }
    });
}

#[test]
fn exchange_response() {
    let corpus: Vec<Vec<u8>> = [
        r#"{"access_token":"at-1","token_type":"Bearer","expires_in":3600}"#,
        r#"{"access_token":"oaiwif_abc","token_type":"bearer","expires_in":60,"scope":"api","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#,
        r#"{"access_token":"a","token_type":"Bearer"}"#,
        r#"{"error":"invalid_grant","error_description":"no mapping"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let statuses = ["200", "200", "200", " 200", "500", "429", "", "2OO"];
    let mut k = 0usize;
    fuzz("exchange response", 3, &corpus, |body| {
        k += 1;
        let status = statuses[k % statuses.len()];
        let retry = ["7", "\u{fffd}", "-1", "99999999999999999999"][k % 4];
        if let Ok(issued) = exchange::parse_response(Some(status), Some(retry), Some(body)) {
            assert_eq!(status.trim(), "200");
            let at = issued.access_token.expose();
            assert!(!at.is_empty() && at.len() <= 8192);
            assert!(
                at.bytes().all(|b| b.is_ascii_graphic()),
                "header-unsafe token"
            );
            assert!((1..=86_400).contains(&issued.expires_in_s));
            return true;
        }
        false
    });
}

fn configs() -> Vec<Vec<u8>> {
    [
        r#"{"identity_provider_id":"wip_1","service_account_id":"sa_1","token_endpoint":{"cluster":"openai_auth"}}"#,
        r#"{"identity_provider_id":"w","service_account_id":"s","subject_token":{"source":"header","header":"x-id"},"subject_token_type":"id_token","token_endpoint":{"cluster":"c","authority":"auth.example:8443","path":"/t","timeout_ms":250},"hosts":["API.openai.com","gateway.internal."]}"#,
        r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"kubernetes","cluster":"wif_token_file","path":"/token","refresh_interval_s":30}}"#,
        r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"gcp_metadata","cluster":"gcp","audience":"https://api.openai.com/v1"}}"#,
        r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"azure_imds","cluster":"imds","resource":"api://x","client_id":"c"}}"#,
        r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"subject_token":{"source":"spiffe","cluster":"spire","audience":"aud","spiffe_id":"spiffe://ex.org/w"}}"#,
        r#"{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{"cluster":"a"},"scope":"all","upstream_clusters":["openai_api"],"limits":{"new_identities_per_s":5,"new_identities_burst":10,"max_identities":16,"invalidate_interval_s":0}}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[test]
fn configuration() {
    fuzz("configuration", 4, &configs(), |input| {
        if let Ok(c) = Config::parse(input) {
            let t = c.token_endpoint.timeout.as_millis();
            assert!((1..=60_000).contains(&t));
            assert!(c.limits.max_identities >= 1 && c.limits.new_identities_burst >= 1);
            if let Scope::Hosts(hosts) = &c.scope {
                assert!(!hosts.is_empty());
                for h in hosts {
                    assert_eq!(authority::configured_host(h).as_deref(), Some(h.as_str()));
                }
            }
            return true;
        }
        false
    });
}

fn source(json: &str) -> openai_wif::config::SubjectSource {
    let c = Config::parse(
        format!(
            r#"{{"identity_provider_id":"w","service_account_id":"s","token_endpoint":{{"cluster":"a"}},"subject_token":{json}}}"#
        )
        .as_bytes(),
    )
    .expect("a valid source");
    c.subject
}

fn assert_fetched(result: Result<subject::Fetched, subject::SourceError>) -> bool {
    if let Ok(f) = result {
        assert_compact(f.subject.expose());
        assert!(jwt::inspect(f.subject.expose()).is_ok());
        assert!(
            f.exp_s.is_none_or(|e| e > NOW_S + 1),
            "accepted an expired subject"
        );
        return true;
    }
    false
}

#[test]
fn http_sources() {
    let token = String::from_utf8(jwts().remove(0)).expect("ascii");
    let sources = [
        source(r#"{"source":"kubernetes","cluster":"k"}"#),
        source(r#"{"source":"gcp_metadata","cluster":"g","audience":"aud"}"#),
        source(r#"{"source":"azure_imds","cluster":"i","resource":"api://x"}"#),
    ];
    let corpus: Vec<Vec<u8>> = vec![
        format!("{token}\n").into_bytes(),
        format!(r#"{{"access_token":"{token}","expires_on":"1800003600","resource":"api://x","token_type":"Bearer"}}"#)
            .into_bytes(),
        b"Missing Metadata-Flavor:Google header.".to_vec(),
        br#"{"error":"invalid_request","error_description":"Identity not found"}"#.to_vec(),
    ];
    let mut k = 0usize;
    fuzz("http sources", 5, &corpus, |body| {
        k += 1;
        let status = [Some(200), Some(200), Some(404), None][k % 4];
        let mut any = false;
        for s in &sources {
            any |= assert_fetched(subject::parse(
                s,
                SourceResponse::Http { status, body },
                NOW_S,
            ));
        }
        any
    });
}

/// Protobuf: a length-delimited field.
fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![(number << 3) | 2];
    let mut len = bytes.len();
    loop {
        let b = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(bytes);
    out
}

#[test]
fn spiffe_source() {
    let token = jwts().remove(0);
    let svid = [field(1, b"spiffe://example.org/gateway"), field(2, &token)].concat();
    let corpus = vec![
        field(1, &svid),
        [field(1, &svid), field(1, &svid)].concat(),
        Vec::new(),
    ];
    let sources = [
        source(r#"{"source":"spiffe","cluster":"s","audience":"aud"}"#),
        source(
            r#"{"source":"spiffe","cluster":"s","audience":"aud","spiffe_id":"spiffe://example.org/gateway"}"#,
        ),
    ];
    let mut k = 0u32;
    fuzz("spiffe source", 6, &corpus, |message| {
        k += 1;
        let status = [0, 0, 0, 14][(k % 4) as usize];
        let mut any = false;
        for s in &sources {
            any |= assert_fetched(subject::parse(
                s,
                SourceResponse::Grpc { status, message },
                NOW_S,
            ));
        }
        any
    });
}

/// Shared data with Envoy's rules: creating a key ignores CAS, an update with a stale CAS fails.
#[derive(Default)]
struct Store(RefCell<(HashMap<String, Versioned>, u32)>);

impl SharedStore for Store {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.0.borrow().0.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        let mut inner = self.0.borrow_mut();
        inner.1 += 1;
        let next = inner.1;
        if let Some(existing) = inner.0.get_mut(key) {
            if cas.is_some_and(|c| c != existing.1) {
                return Err(StoreError::CasMismatch);
            }
            *existing = (value.to_vec(), next);
        } else {
            inner.0.insert(key.to_string(), (value.to_vec(), next));
        }
        Ok(())
    }
}

fn identity(config: &Config, n: u64) -> IdentityKey {
    IdentityKey::for_subject(
        config,
        &config.account,
        &Secret::new(format!("subject-{n}")),
    )
}

#[test]
fn cache_records() {
    let config = Config::parse(&configs()[0]).expect("valid");
    let table = Table::new(8);
    let record = |n: u64| {
        let mut r = Record::succeeded(
            None,
            CachedToken::new(
                Secret::new(format!("at-{n}")),
                NOW_S * 1000,
                NOW_S * 1000 + 9,
            ),
            NOW_S * 1000,
        );
        r.identity = identity(&config, n).as_str().to_string();
        serde_json::to_vec(&r).expect("encodes")
    };
    let corpus: Vec<Vec<u8>> = (0..4).map(record).collect();
    let mut rng = Rng(7);
    fuzz("cache records", 7, &corpus, |bytes| {
        let store = Store::default();
        for slot in 0..table.slots() {
            if rng.next() % 2 == 0 {
                store.set(&Table::slot_key(slot), bytes, None).expect("set");
            }
        }
        for n in 0..4 {
            let id = identity(&config, n);
            if let Some(found) = table.find(&store, &id) {
                assert_eq!(
                    found.record.identity,
                    id.as_str(),
                    "another identity's record"
                );
                let _ = lookup(Some(&found.record), NOW_S * 1000);
            }
            let now = NOW_S * 1000 + rng.next() % 1_000_000;
            let token = CachedToken::new(Secret::new("at"), now + 1, now + 2);
            table
                .update(&store, &id, now, |prev| {
                    Some(Record::succeeded(prev, token.clone(), now))
                })
                .expect("update");
            let found = table.find(&store, &id).expect("just written");
            assert_eq!(found.record.identity, id.as_str());
        }
        assert!(store.0.borrow().0.len() <= table.slots() as usize);
        // Accepted: the fuzzed bytes decoded as a record.
        serde_json::from_slice::<Record>(bytes).is_ok()
    });
}

#[test]
fn lease_table() {
    let config = Config::parse(&configs()[0]).expect("valid");
    let corpus = vec![
        br#"{}"#.to_vec(),
        br#"{"ab":{"owner":1,"deadline_ms":5}}"#.to_vec(),
        b"not json".to_vec(),
    ];
    let mut rng = Rng(8);
    fuzz("lease table", 8, &corpus, |bytes| {
        let store = Store::default();
        store.set(&lease::table_key(), bytes, None).expect("set");
        lease::ensure_table(&store).expect("ensure");
        for _ in 0..4 {
            let id = identity(&config, rng.next() % 3);
            let now = rng.next() % 1_000;
            match lease::try_acquire(&store, &id, rng.next() % 2, now, now + 100) {
                Ok(Acquire::Acquired | Acquire::Held(_) | Acquire::Full) => {}
                Err(e) => panic!("lease: {e}"),
            }
            lease::release(&store, &id, rng.next() % 2).expect("release");
        }
        let (table, _) = store
            .get(&lease::table_key())
            .expect("get")
            .expect("present");
        if let Ok(map) = serde_json::from_slice::<HashMap<String, serde_json::Value>>(&table) {
            assert!(map.len() <= lease::MAX_LEASES);
        }
        serde_json::from_slice::<HashMap<String, serde_json::Value>>(bytes).is_ok()
    });
}

#[test]
fn admission_bucket() {
    let corpus = vec![
        br#"{"milli_tokens":5000,"at_ms":1000}"#.to_vec(),
        br#"{"milli_tokens":18446744073709551615,"at_ms":0}"#.to_vec(),
        b"garbage".to_vec(),
    ];
    let mut rng = Rng(9);
    fuzz("admission", 9, &corpus, |bytes| {
        let store = Store::default();
        store.set(&admission::key(), bytes, None).expect("set");
        let (per_s, burst) = (1 + (rng.next() % 50) as u32, 1 + (rng.next() % 50) as u32);
        let start = 1_000_000 + rng.next() % 1_000;
        let mut now = start;
        let mut admitted = 0u64;
        for _ in 0..200 {
            now += rng.next() % 20;
            if admission::take(&store, now, per_s, burst).expect("take") == Admit::Yes {
                admitted += 1;
            }
        }
        // A stored bucket is capped at the burst once it is read, whatever it said.
        let bound = u64::from(burst) + u64::from(per_s) * (now - start) / 1000 + 1;
        assert!(admitted <= bound, "{admitted} admitted, at most {bound}");
        serde_json::from_slice::<serde_json::Value>(bytes).is_ok_and(|v| v.is_object())
    });
}
