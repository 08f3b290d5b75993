//! What the filter can tell about a refused exchange without revealing a secret.
//!
//! OpenAI's token endpoint answers most configuration problems with a generic 500. The filter
//! cannot see why, but it can say what it sent: the subject's `iss`, `aud`, `sub`, `kid`, `alg`
//! and time to `exp` (read from the unverified token: they are the token's claims, not facts
//! about the caller), the provider and service account ids, and, when the local checks passed,
//! what is left to suspect. Claim values are attacker-controlled text: each is truncated and
//! escaped like a Rust string literal, so no value can forge a log line or hide the rest, and a
//! value that holds a JWT is withheld. The whole message stays short enough for an SDK's
//! exception text.

use serde_json::Value;

use super::token;
use crate::config::Account;
use crate::exchange::ExchangeError;
use crate::reply::Failure;

/// Longest claim value shown, in characters.
pub const MAX_VALUE_CHARS: usize = 80;
/// Longest diagnosis message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 600;
/// Most list elements shown.
const MAX_LIST_ITEMS: usize = 3;

/// The claims of a subject token that explain an exchange, read without verifying it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Facts {
    pub iss: Option<String>,
    pub aud: Vec<String>,
    pub sub: Option<String>,
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub exp: Option<u64>,
}

impl Facts {
    /// The facts of `token`; `None` when it is not a JWT at all.
    pub fn read(token: &str) -> Option<Facts> {
        let parts = token::parse(token).ok()?;
        let text = |map: &serde_json::Map<String, Value>, name: &str| {
            map.get(name).and_then(Value::as_str).map(str::to_string)
        };
        Some(Facts {
            iss: text(&parts.claims, "iss"),
            aud: parts
                .claims
                .get("aud")
                .and_then(token::audiences)
                .map(|l| l.into_iter().map(str::to_string).collect())
                .unwrap_or_default(),
            sub: text(&parts.claims, "sub"),
            kid: text(&parts.header, "kid"),
            alg: text(&parts.header, "alg"),
            exp: parts.claims.get("exp").and_then(token::numeric_date),
        })
    }

    /// `subject iss "…", aud ["…"], sub "…", kid "…", alg RS256, exp in 3512 s`.
    pub fn summary(&self, now_s: u64) -> String {
        let opt = |v: &Option<String>| v.as_deref().map_or("(none)".to_string(), quote);
        let alg = match self.alg.as_deref() {
            Some(a) if super::Algorithm::parse(a).is_some() => a.to_string(),
            other => opt(&other.map(str::to_string)),
        };
        let exp = match self.exp {
            None => "no exp".to_string(),
            Some(e) if e > now_s => format!("exp in {} s", e - now_s),
            Some(e) => format!("expired {} s ago", now_s - e),
        };
        format!(
            "subject iss {}, aud {}, sub {}, kid {}, alg {alg}, {exp}",
            opt(&self.iss),
            list(&self.aud),
            opt(&self.sub),
            opt(&self.kid),
        )
    }
}

/// What the local checks said about the subject before the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// No `expect` configured: nothing checked beyond the token's shape.
    NotConfigured,
    /// Every configured check passed; `signature_checked` when a JWKS verified it.
    Passed { signature_checked: bool },
}

/// The client's answer when the token endpoint refused an exchange: the usual 502 message,
/// with the facts and the remaining suspects when the endpoint refused (500, 400, 401, 403).
/// Other failures (unreachable, throttled, malformed answer) are left as they are.
pub fn explain(
    error: &ExchangeError,
    facts: Option<&Facts>,
    account: &Account,
    local: Local,
    now_s: u64,
) -> Failure {
    let mut failure = error.failure();
    if !matches!(
        error,
        ExchangeError::Status {
            status: 400 | 401 | 403 | 500,
            ..
        }
    ) {
        return failure;
    }
    let subject = facts.map_or("subject token unreadable".to_string(), |f| f.summary(now_s));
    let suspects = match local {
        Local::NotConfigured => {
            "set expect to check issuer, audience and signature locally".to_string()
        }
        Local::Passed {
            signature_checked: true,
        } => "local checks passed; left: the service account mapping, a disabled provider or mapping, the provider's uploaded JWKS stale".to_string(),
        Local::Passed {
            signature_checked: false,
        } => "local checks passed without a JWKS; left: the kid in the provider's JWKS, the service account mapping, a disabled provider or mapping".to_string(),
    };
    failure.message = bounded(&format!(
        "{}; {subject}; sent provider {}, service account {}; {suspects}",
        failure.message, account.identity_provider_id, account.service_account_id
    ));
    failure
}

/// `value` truncated and escaped as a string literal; a JWT-looking value is withheld.
pub fn quote(value: &str) -> String {
    if value.contains("eyJ") {
        return "(withheld: looks like a token)".to_string();
    }
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(MAX_VALUE_CHARS).collect();
    if chars.next().is_some() {
        format!("{:?}", format!("{head}…"))
    } else {
        format!("{head:?}")
    }
}

/// A list of values: `["a", "b", … (5 in all)]`.
pub fn list<S: AsRef<str>>(values: &[S]) -> String {
    let mut shown: Vec<String> = values
        .iter()
        .take(MAX_LIST_ITEMS)
        .map(|v| quote(v.as_ref()))
        .collect();
    if values.len() > MAX_LIST_ITEMS {
        shown.push(format!("… ({} in all)", values.len()));
    }
    format!("[{}]", shown.join(", "))
}

/// A claim value of any JSON type, for messages.
pub fn show(value: &Value) -> String {
    match value {
        Value::String(s) => quote(s),
        Value::Array(items) => list(&items.iter().map(scalar).collect::<Vec<_>>()),
        Value::Object(_) => "an object".to_string(),
        other => scalar(other),
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
        other => other.to_string(),
    }
}

/// `message` cut to [`MAX_MESSAGE_CHARS`].
fn bounded(message: &str) -> String {
    if message.chars().count() <= MAX_MESSAGE_CHARS {
        return message.to_string();
    }
    let mut out: String = message.chars().take(MAX_MESSAGE_CHARS - 1).collect();
    out.push('…');
    out
}
