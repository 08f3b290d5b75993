//! Subject checks: a subject token is refused locally, with the failing check named, before it
//! is sent to OpenAI's token endpoint (which answers most refusals with a generic 500).
//!
//! The checks run in a fixed order and [`check`] stops at the first failure:
//!
//! | check             | passes when                                                          |
//! |-------------------|----------------------------------------------------------------------|
//! | `well_formed`     | a compact JWS with JSON header and claims; `typ` absent or a JWT;    |
//! |                   | no `cty`, no `crit`                                                  |
//! | `algorithm`       | `alg` is allowed by `expect.algorithms` (never `none` or HMAC)       |
//! | `key_id`          | `kid` is present (OpenAI requires it), a plain string of ≤ 256 bytes |
//! | `known_key`       | with a JWKS, a key has this `kid` and may verify this `alg`          |
//! | `signature`       | with a JWKS, that key verifies the signature                        |
//! | `required_claims` | `iss`, `sub` (strings), `aud` (string or strings), `exp`, `iat`     |
//! |                   | (and `nbf` if present) NumericDates                                  |
//! | `issuer`          | `iss` equals `expect.issuer`                                         |
//! | `audience`        | `aud` contains one of `expect.audiences`                             |
//! | `expiry`          | `exp` is after now                                                   |
//! | `not_before`      | `nbf`, if present, is not after now + `leeway_s`                     |
//! | `issued_at`       | `iat` is not after now + `leeway_s`                                  |
//! | `claim`           | each `expect.claims` pattern matches its claim                      |
//!
//! A check whose expectation is not configured is skipped, never passed: without a JWKS the
//! signature is the token endpoint's to check. [`report`] runs every check it can, for the
//! offline checker.
//!
//! Claim values: `iss`/`sub` must be strings; `aud` a string or a non-empty list of strings.
//! NumericDates are non-negative JSON numbers, a fraction dropped (RFC 7519 allows one). A
//! `claims` pattern matches a string claim, any string, number or boolean element of a list
//! claim, or a number or boolean by its JSON text (`42`, `true`); never an object or null.
//! Duplicate JSON members take the last value, as serde_json does.

pub mod diagnose;
pub mod expect;
pub mod jwks;
pub mod rsassa;
mod token;
pub mod verify;

use serde_json::Value;

pub use diagnose::Facts;
pub use expect::{Expect, JwksSource, Keys, Pattern, RawExpect};
pub use jwks::{Jwk, Jwks, JwksError};
pub use verify::Algorithm;

use crate::reply::{Code, Failure};
use diagnose::{quote, show};

/// One subject check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    WellFormed,
    Algorithm,
    KeyId,
    KnownKey,
    Signature,
    RequiredClaims,
    Issuer,
    Audience,
    Expiry,
    NotBefore,
    IssuedAt,
    Claim,
}

impl Check {
    /// Every check, in the order they run.
    pub const ALL: [Check; 12] = [
        Check::WellFormed,
        Check::Algorithm,
        Check::KeyId,
        Check::KnownKey,
        Check::Signature,
        Check::RequiredClaims,
        Check::Issuer,
        Check::Audience,
        Check::Expiry,
        Check::NotBefore,
        Check::IssuedAt,
        Check::Claim,
    ];

    /// The stable name used in messages, metrics and the offline checker.
    pub fn name(self) -> &'static str {
        match self {
            Check::WellFormed => "well_formed",
            Check::Algorithm => "algorithm",
            Check::KeyId => "key_id",
            Check::KnownKey => "known_key",
            Check::Signature => "signature",
            Check::RequiredClaims => "required_claims",
            Check::Issuer => "issuer",
            Check::Audience => "audience",
            Check::Expiry => "expiry",
            Check::NotBefore => "not_before",
            Check::IssuedAt => "issued_at",
            Check::Claim => "claim",
        }
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    /// Not run, and why (not configured, or what it needs is missing).
    Skip(String),
}

/// Why a refusal happened, for the caller's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The token is bad: answer 401.
    Invalid,
    /// The `kid` is not in the JWKS at hand: the issuer may have rotated its keys, so fetch
    /// the JWKS again (rate-limited) and check again before refusing.
    UnknownKey,
    /// `expect.jwks_source` is configured and no JWKS was passed: nothing is known about the
    /// token's key yet. Not the token's fault.
    KeysUnavailable,
}

/// A subject token refused by a check. The message names what was observed and expected,
/// with claim values escaped and truncated, and never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject token failed the {} check: {message}", check.name())]
pub struct Refusal {
    pub check: Check,
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    /// True when the `kid` is not in the JWKS used: fetch it again and retry.
    pub fn is_unknown_key(&self) -> bool {
        self.kind == RefusalKind::UnknownKey
    }

    /// The client's answer: 401 `subject_token_expired` for `expiry` (as for a header token
    /// that expired), 401 `invalid_subject_token` for every other check, and 503
    /// `subject_keys_unavailable` while the JWKS has not been fetched.
    pub fn failure(&self) -> Failure {
        let code = match (self.kind, self.check) {
            (RefusalKind::KeysUnavailable, _) => Code::SubjectKeysUnavailable,
            (_, Check::Expiry) => Code::SubjectTokenExpired,
            _ => Code::InvalidSubjectToken,
        };
        Failure::new(code, self.to_string())
    }
}

/// A token that passed every check that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub alg: Algorithm,
    pub kid: String,
    pub exp_s: u64,
    /// False when no JWKS was at hand ([`Keys::Unchecked`]): `kid` and signature unchecked.
    pub signature_checked: bool,
}

/// Runs the checks in order on `token` at `now_s` and stops at the first failure.
///
/// Keys: `jwks` when given (the fetched key set, or the offline checker's), else
/// `expect.keys`' inline JWKS. With [`Keys::Unchecked`] and no `jwks`, `known_key` and
/// `signature` are skipped. With [`Keys::Source`] and no `jwks` (not fetched yet), `check`
/// refuses at `known_key` with [`RefusalKind::KeysUnavailable`]: fetch first, or answer 503.
pub fn check(
    token: &str,
    expect: &Expect,
    jwks: Option<&Jwks>,
    now_s: u64,
) -> Result<Verified, Refusal> {
    let run = run(token, expect, jwks, now_s, true);
    match run.refusal {
        Some(refusal) => Err(refusal),
        None => run.verified.ok_or(Refusal {
            // Unreachable: a run that stopped without a refusal has every part of `Verified`.
            check: Check::WellFormed,
            kind: RefusalKind::Invalid,
            message: "the token could not be read".into(),
        }),
    }
}

/// Runs every check it can on `token` and says what each found, in order. `claim` appears
/// once per configured pattern. Same keys as [`check`], except that with [`Keys::Source`] and
/// no `jwks` the key checks are skipped.
pub fn report(
    token: &str,
    expect: &Expect,
    jwks: Option<&Jwks>,
    now_s: u64,
) -> Vec<(Check, Outcome)> {
    run(token, expect, jwks, now_s, false).outcomes
}

enum KeySet<'a> {
    Have(&'a Jwks),
    Unchecked,
    NotFetched(&'a JwksSource),
}

struct Run {
    /// Stop at the first failure.
    enforce: bool,
    outcomes: Vec<(Check, Outcome)>,
    refusal: Option<Refusal>,
    verified: Option<Verified>,
}

impl Run {
    /// Records an outcome; false when the run stops here.
    fn record(&mut self, check: Check, outcome: Outcome, kind: RefusalKind) -> bool {
        if let (Outcome::Fail(message), None) = (&outcome, &self.refusal) {
            self.refusal = Some(Refusal {
                check,
                kind,
                message: message.clone(),
            });
        }
        let stop = self.enforce && self.refusal.is_some();
        self.outcomes.push((check, outcome));
        !stop
    }

    fn pass(&mut self, check: Check) -> bool {
        self.record(check, Outcome::Pass, RefusalKind::Invalid)
    }

    fn fail(&mut self, check: Check, message: String) -> bool {
        self.record(check, Outcome::Fail(message), RefusalKind::Invalid)
    }

    fn skip(&mut self, check: Check, why: &str) -> bool {
        self.record(check, Outcome::Skip(why.to_string()), RefusalKind::Invalid)
    }
}

/// Stops the run when the outcome just recorded ends it.
macro_rules! record {
    ($run:ident . $method:ident ( $($arg:expr),* )) => {
        if !$run.$method($($arg),*) {
            return $run;
        }
    };
}

fn run(token: &str, expect: &Expect, jwks: Option<&Jwks>, now_s: u64, enforce: bool) -> Run {
    let mut run = Run {
        enforce,
        outcomes: Vec::with_capacity(Check::ALL.len()),
        refusal: None,
        verified: None,
    };
    let parts = match token::parse(token).and_then(|p| token::type_header(&p.header).map(|_| p)) {
        Ok(parts) => parts,
        Err(message) => {
            run.fail(Check::WellFormed, message);
            for c in &Check::ALL[1..] {
                run.skip(*c, "the token is not a well-formed JWT");
            }
            return run;
        }
    };
    record!(run.pass(Check::WellFormed));

    let alg = algorithm(parts.header.get("alg"), expect);
    let alg = match alg {
        Ok(a) => {
            record!(run.pass(Check::Algorithm));
            Some(a)
        }
        Err(m) => {
            record!(run.fail(Check::Algorithm, m));
            None
        }
    };

    let kid = match key_id(parts.header.get("kid")) {
        Ok(k) => {
            record!(run.pass(Check::KeyId));
            Some(k)
        }
        Err(m) => {
            record!(run.fail(Check::KeyId, m));
            None
        }
    };

    let keys = match (jwks, &expect.keys) {
        (Some(j), _) | (None, Keys::Inline(j)) => KeySet::Have(j),
        (None, Keys::Unchecked) => KeySet::Unchecked,
        (None, Keys::Source(s)) => KeySet::NotFetched(s),
    };
    let mut signature_checked = false;
    match (alg, kid, keys) {
        (None, _, _) | (_, None, _) => {
            record!(run.skip(Check::KnownKey, "no usable alg and kid"));
            record!(run.skip(Check::Signature, "no usable alg and kid"));
        }
        (_, _, KeySet::Unchecked) => {
            let why = "no JWKS configured (expect.jwks or expect.jwks_source): the token endpoint checks the key";
            record!(run.skip(Check::KnownKey, why));
            record!(run.skip(Check::Signature, why));
        }
        (_, _, KeySet::NotFetched(source)) if enforce => {
            let message = format!(
                "the issuer's JWKS has not been fetched yet from cluster {}",
                source.cluster
            );
            record!(run.record(
                Check::KnownKey,
                Outcome::Fail(message),
                RefusalKind::KeysUnavailable
            ));
        }
        (_, _, KeySet::NotFetched(source)) => {
            let why = format!(
                "no JWKS at hand: the filter fetches it from cluster {} ({})",
                source.cluster, source.path
            );
            record!(run.skip(Check::KnownKey, &why));
            record!(run.skip(Check::Signature, &why));
        }
        (Some(alg), Some(kid), KeySet::Have(jwks)) => match jwks.candidates(kid, alg) {
            Ok(candidates) => {
                record!(run.pass(Check::KnownKey));
                let signed = parts.signed.as_bytes();
                if candidates
                    .iter()
                    .any(|k| verify::verify(alg, &k.key, signed, &parts.signature))
                {
                    signature_checked = true;
                    record!(run.pass(Check::Signature));
                } else {
                    record!(run.fail(
                        Check::Signature,
                        format!(
                            "the {alg} signature does not verify with the issuer's key {}",
                            quote(kid)
                        )
                    ));
                }
            }
            Err(jwks::Miss::Unknown) => {
                let message = format!(
                    "kid {} is not in the issuer's JWKS (kids: {})",
                    quote(kid),
                    diagnose::list(&jwks.kids())
                );
                record!(run.record(
                    Check::KnownKey,
                    Outcome::Fail(message),
                    RefusalKind::UnknownKey
                ));
                record!(run.skip(Check::Signature, "no key to verify with"));
            }
            Err(jwks::Miss::Unfit(why)) => {
                record!(run.fail(Check::KnownKey, format!("kid {} {why}", quote(kid))));
                record!(run.skip(Check::Signature, "no key to verify with"));
            }
        },
    }

    let claims = Claims::read(&parts.claims);
    if claims.problems.is_empty() {
        record!(run.pass(Check::RequiredClaims));
    } else {
        record!(run.fail(Check::RequiredClaims, claims.problems.join("; ")));
    }

    match (&expect.issuer, claims.iss) {
        (None, _) => record!(run.skip(Check::Issuer, "expect.issuer is not configured")),
        (_, None) => record!(run.skip(Check::Issuer, "no usable iss")),
        (Some(want), Some(iss)) if iss == want => record!(run.pass(Check::Issuer)),
        (Some(want), Some(iss)) => record!(run.fail(
            Check::Issuer,
            format!(
                "subject token iss is {}, the provider expects {}",
                quote(iss),
                quote(want)
            )
        )),
    }

    match (&expect.audiences, &claims.aud) {
        (None, _) => record!(run.skip(Check::Audience, "expect.audiences is not configured")),
        (_, None) => record!(run.skip(Check::Audience, "no usable aud")),
        (Some(want), Some(aud)) if aud.iter().any(|a| want.iter().any(|w| w == a)) => {
            record!(run.pass(Check::Audience))
        }
        (Some(want), Some(aud)) => record!(run.fail(
            Check::Audience,
            format!(
                "subject token aud is {}, the provider expects one of {}",
                diagnose::list(aud),
                diagnose::list(want)
            )
        )),
    }

    match claims.exp {
        None => record!(run.skip(Check::Expiry, "no usable exp")),
        Some(exp) if exp > now_s => record!(run.pass(Check::Expiry)),
        Some(exp) => record!(run.fail(
            Check::Expiry,
            format!(
                "subject token expired {} s ago (exp {exp}, now {now_s})",
                now_s - exp
            )
        )),
    }

    let future = |claim: &str, at: Option<u64>, absent: &str| {
        match at {
        None => Outcome::Skip(absent.to_string()),
        Some(t) if t <= now_s.saturating_add(expect.leeway_s) => Outcome::Pass,
        Some(t) => Outcome::Fail(format!(
            "subject token {claim} is {} s in the future, beyond the leeway of {} s: the issuer's clock or this host's is off",
            t - now_s,
            expect.leeway_s
        )),
    }
    };
    let nbf = future("nbf", claims.nbf, "the token has no nbf");
    record!(run.record(Check::NotBefore, nbf, RefusalKind::Invalid));
    let iat = future("iat", claims.iat, "no usable iat");
    record!(run.record(Check::IssuedAt, iat, RefusalKind::Invalid));

    if expect.claims.is_empty() {
        record!(run.skip(Check::Claim, "expect.claims is not configured"));
    }
    for (name, pattern) in &expect.claims {
        match parts.claims.get(name) {
            Some(value) if claim_matches(value, pattern) => record!(run.pass(Check::Claim)),
            Some(value) => record!(run.fail(
                Check::Claim,
                format!(
                    "subject token {name} is {}, the configuration expects {}",
                    show(value),
                    quote(&pattern.to_string())
                )
            )),
            None => record!(run.fail(
                Check::Claim,
                format!(
                    "subject token has no {name} claim, the configuration expects {}",
                    quote(&pattern.to_string())
                )
            )),
        }
    }

    if let (None, Some(alg), Some(kid), Some(exp_s)) = (&run.refusal, alg, kid, claims.exp) {
        run.verified = Some(Verified {
            alg,
            kid: kid.to_string(),
            exp_s,
            signature_checked,
        });
    }
    run
}

fn algorithm(alg: Option<&Value>, expect: &Expect) -> Result<Algorithm, String> {
    let name = match alg {
        None => return Err("the header has no alg".into()),
        Some(Value::String(s)) => s,
        Some(_) => return Err("the header's alg is not a string".into()),
    };
    if let Some(why) = verify::unsupported(name) {
        return Err(format!("alg is {}: {why}", quote(name)));
    }
    match Algorithm::parse(name) {
        Some(a) if expect.algorithms.contains(&a) => Ok(a),
        _ => Err(format!(
            "alg is {name}, the configuration allows {}",
            expect
                .algorithms
                .iter()
                .map(|a| a.name())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The `kid`: only ever compared with the JWKS's, so any plain string will do; a path, SQL
/// or a URL in it is just a `kid` no key has.
fn key_id(kid: Option<&Value>) -> Result<&str, String> {
    match kid {
        None => Err("the header has no kid: OpenAI requires one to select the issuer's key".into()),
        Some(Value::String(k))
            if !k.is_empty()
                && k.len() <= jwks::MAX_KID_BYTES
                && !k.chars().any(char::is_control) =>
        {
            Ok(k)
        }
        Some(Value::String(_)) => Err(format!(
            "the header's kid is empty, longer than {} bytes or has control characters",
            jwks::MAX_KID_BYTES
        )),
        Some(_) => Err("the header's kid is not a string".into()),
    }
}

/// The registered claims the checks use, typed, and what is wrong with them.
struct Claims<'a> {
    iss: Option<&'a str>,
    aud: Option<Vec<&'a str>>,
    exp: Option<u64>,
    iat: Option<u64>,
    nbf: Option<u64>,
    problems: Vec<String>,
}

impl<'a> Claims<'a> {
    fn read(claims: &'a serde_json::Map<String, Value>) -> Claims<'a> {
        let mut missing = Vec::new();
        let mut problems = Vec::new();
        let mut present = |name: &'static str| match claims.get(name) {
            None | Some(Value::Null) => {
                missing.push(name);
                None
            }
            Some(v) => Some(v),
        };
        let (iss, sub, aud, exp, iat) = (
            present("iss"),
            present("sub"),
            present("aud"),
            present("exp"),
            present("iat"),
        );
        if !missing.is_empty() {
            problems.push(format!(
                "missing {} (OpenAI requires iss, aud, sub, exp and iat)",
                missing.join(", ")
            ));
        }
        let mut string = |name: &str, v: Option<&'a Value>| match v {
            None => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.as_str()),
            Some(other) => {
                problems.push(format!("{name} is {}, not a non-empty string", show(other)));
                None
            }
        };
        let iss = string("iss", iss);
        string("sub", sub);
        let aud = aud.and_then(|v| {
            let list = token::audiences(v).filter(|l| l.iter().all(|a| !a.is_empty()));
            if list.is_none() {
                problems.push(format!(
                    "aud is {}, not a string or a list of strings",
                    show(v)
                ));
            }
            list
        });
        let mut date = |name: &str, v: Option<&Value>| {
            let v = v?;
            let t = token::numeric_date(v);
            if t.is_none() {
                problems.push(format!(
                    "{name} is {}, not a NumericDate (seconds since the epoch)",
                    show(v)
                ));
            }
            t
        };
        let exp = date("exp", exp);
        let iat = date("iat", iat);
        let nbf = date("nbf", claims.get("nbf").filter(|v| !v.is_null()));
        Claims {
            iss,
            aud,
            exp,
            iat,
            nbf,
            problems,
        }
    }
}

fn claim_matches(value: &Value, pattern: &Pattern) -> bool {
    match value {
        Value::String(s) => pattern.matches(s),
        Value::Number(_) | Value::Bool(_) => pattern.matches(&value.to_string()),
        Value::Array(items) => items
            .iter()
            .any(|v| !v.is_array() && claim_matches(v, pattern)),
        Value::Null | Value::Object(_) => false,
    }
}

#[cfg(test)]
pub(crate) mod tests;
