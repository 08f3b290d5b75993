//! `expect`: what the subject tokens must look like, as the Workload Identity Provider at
//! OpenAI is configured. Parsed from [`RawExpect`] and validated once, with errors naming the
//! field (`expect.claims.sub`, `expect.jwks_source.cluster`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::jwks::Jwks;
use super::verify::{self, Algorithm};
use crate::config::{self, invalid, ConfigError};

/// A claim pattern, by OpenAI's mapping rule: an exact value, or a non-empty prefix and one
/// trailing `*`. The same rule as caller principals.
pub type Pattern = crate::callers::Principal;

pub const DEFAULT_LEEWAY_S: u64 = 30;
pub const MAX_LEEWAY_S: u64 = 300;
pub const DEFAULT_JWKS_REFRESH_S: u64 = 3600;
pub const MIN_JWKS_REFRESH_S: u64 = 60;
pub const MAX_JWKS_REFRESH_S: u64 = 86_400;
/// Most `claims` patterns.
pub const MAX_CLAIMS: usize = 32;
const MAX_AUDIENCES: usize = 16;
const MAX_CLAIM_NAME_BYTES: usize = 256;

/// The validated expectations. [`Expect::default`] expects nothing beyond what OpenAI
/// requires of every subject token (a signed JWT with a `kid` and the required claims, not
/// expired), and checks no signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The provider's issuer, compared exactly with `iss`.
    pub issuer: Option<String>,
    /// The provider's audiences: `aud` must contain one.
    pub audiences: Option<Vec<String>>,
    /// The algorithms a token may be signed with; every supported one unless configured.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed for `nbf` and `iat` in the future.
    pub leeway_s: u64,
    /// Claim patterns, sorted by claim name; each must match.
    pub claims: Vec<(String, Pattern)>,
    pub keys: Keys,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            issuer: None,
            audiences: None,
            algorithms: Algorithm::ALL.to_vec(),
            leeway_s: DEFAULT_LEEWAY_S,
            claims: Vec::new(),
            keys: Keys::Unchecked,
        }
    }
}

/// Where the issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keys {
    /// No JWKS: `kid` is required but not looked up, and the signature is left to the token
    /// endpoint (the checks report it as skipped, never as passed).
    Unchecked,
    /// `expect.jwks`: the key set in the configuration, as uploaded to the provider.
    Inline(Jwks),
    /// `expect.jwks_source`: fetched through an Envoy cluster at run time.
    Source(JwksSource),
}

/// `expect.jwks_source`: the issuer's `jwks_uri`, reached through an Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksSource {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    /// How often the JWKS is fetched again; also on an unknown `kid`, rate-limited.
    pub refresh_interval: Duration,
    pub timeout: Duration,
}

/// `expect` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpect {
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audiences: Option<Vec<String>>,
    #[serde(default)]
    algorithms: Option<Vec<String>>,
    #[serde(default)]
    leeway_s: Option<u64>,
    #[serde(default)]
    claims: Option<BTreeMap<String, String>>,
    #[serde(default)]
    jwks: Option<serde_json::Value>,
    #[serde(default)]
    jwks_source: Option<RawJwksSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwksSource {
    cluster: String,
    authority: String,
    path: String,
    #[serde(default)]
    refresh_interval_s: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl Expect {
    /// Validates `expect`; errors name the field under `expect.`.
    pub fn from_raw(raw: RawExpect) -> Result<Expect, ConfigError> {
        let issuer = raw
            .issuer
            .map(|i| config::identifier("expect.issuer", i))
            .transpose()?;
        let audiences = match raw.audiences {
            None => None,
            Some(list) if list.is_empty() || list.len() > MAX_AUDIENCES => {
                return Err(invalid(
                    "expect.audiences",
                    format!("must list 1 to {MAX_AUDIENCES} audiences, or be left out"),
                ))
            }
            Some(list) => Some(
                list.into_iter()
                    .enumerate()
                    .map(|(i, a)| config::identifier(&format!("expect.audiences[{i}]"), a))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let algorithms = match raw.algorithms {
            None => Algorithm::ALL.to_vec(),
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    "expect.algorithms",
                    "must list at least one algorithm, or be left out".into(),
                ))
            }
            Some(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (i, name) in list.iter().enumerate() {
                    let alg = Algorithm::parse(name).ok_or_else(|| {
                        let why = verify::unsupported(name).unwrap_or_default();
                        invalid(
                            &format!("expect.algorithms[{i}]"),
                            format!("is {name:?}: {why}"),
                        )
                    })?;
                    if !out.contains(&alg) {
                        out.push(alg);
                    }
                }
                out
            }
        };
        let leeway_s = raw.leeway_s.unwrap_or(DEFAULT_LEEWAY_S);
        if leeway_s > MAX_LEEWAY_S {
            return Err(invalid(
                "expect.leeway_s",
                format!("must be at most {MAX_LEEWAY_S} seconds, not {leeway_s}"),
            ));
        }
        let claims = claims(raw.claims.unwrap_or_default())?;
        let keys = match (raw.jwks, raw.jwks_source) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "expect.jwks_source",
                    "must not be set with expect.jwks: the keys are either in the configuration or fetched".into(),
                ))
            }
            (Some(doc), None) => Keys::Inline(inline_jwks(&doc)?),
            (None, Some(source)) => Keys::Source(jwks_source(source)?),
            (None, None) => Keys::Unchecked,
        };
        Ok(Expect {
            issuer,
            audiences,
            algorithms,
            leeway_s,
            claims,
            keys,
        })
    }
}

fn claims(raw: BTreeMap<String, String>) -> Result<Vec<(String, Pattern)>, ConfigError> {
    if raw.len() > MAX_CLAIMS {
        return Err(invalid(
            "expect.claims",
            format!("must have at most {MAX_CLAIMS} claims"),
        ));
    }
    raw.into_iter()
        .map(|(name, pattern)| {
            let name_ok = !name.is_empty()
                && name.len() <= MAX_CLAIM_NAME_BYTES
                && name.bytes().all(|b| b.is_ascii_graphic());
            if !name_ok {
                return Err(invalid(
                    "expect.claims",
                    format!(
                        "claim names must be 1 to {MAX_CLAIM_NAME_BYTES} printable ASCII characters, not {name:?}"
                    ),
                ));
            }
            let parsed = Pattern::parse(&pattern).ok_or_else(|| {
                invalid(
                    &format!("expect.claims.{name}"),
                    format!(
                        "must be an exact value or a non-empty prefix ending in one '*' (printable ASCII), not {pattern:?}"
                    ),
                )
            })?;
            Ok((name, parsed))
        })
        .collect()
}

fn inline_jwks(doc: &serde_json::Value) -> Result<Jwks, ConfigError> {
    let field = "expect.jwks";
    let bytes = serde_json::to_vec(doc).map_err(|e| invalid(field, e.to_string()))?;
    let jwks = Jwks::parse(&bytes).map_err(|e| invalid(field, format!("is unusable: {e}")))?;
    if jwks.keys().is_empty() {
        let why = jwks.skipped().first().map_or_else(
            || "it has no keys".to_string(),
            |s| format!("keys[{}]: {}", s.index, s.reason),
        );
        return Err(invalid(
            field,
            format!("has no key the checks can verify with ({why})"),
        ));
    }
    Ok(jwks)
}

fn jwks_source(raw: RawJwksSource) -> Result<JwksSource, ConfigError> {
    let refresh_s = raw.refresh_interval_s.unwrap_or(DEFAULT_JWKS_REFRESH_S);
    if !(MIN_JWKS_REFRESH_S..=MAX_JWKS_REFRESH_S).contains(&refresh_s) {
        return Err(invalid(
            "expect.jwks_source.refresh_interval_s",
            format!(
                "must be between {MIN_JWKS_REFRESH_S} and {MAX_JWKS_REFRESH_S} seconds, not {refresh_s}"
            ),
        ));
    }
    Ok(JwksSource {
        cluster: config::cluster("expect.jwks_source.cluster", raw.cluster)?,
        authority: config::authority("expect.jwks_source.authority", Some(raw.authority), "")?,
        path: config::path("expect.jwks_source.path", Some(raw.path), "")?,
        refresh_interval: Duration::from_secs(refresh_s),
        timeout: config::timeout("expect.jwks_source.timeout_ms", raw.timeout_ms)?,
    })
}
