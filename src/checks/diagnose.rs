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
    let sent = format!(
        "sent provider {}, service account {}; {suspects}",
        account.identity_provider_id, account.service_account_id
    );
    // Long claims give way, so the ids sent and the suspects always show.
    let room = MAX_MESSAGE_CHARS
        .saturating_sub(failure.message.chars().count() + sent.chars().count() + 4);
    failure.message = bounded(
        &format!("{}; {}; {sent}", failure.message, bounded(&subject, room)),
        MAX_MESSAGE_CHARS,
    );
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

/// `message` cut to `max` characters, an ellipsis marking the cut.
fn bounded(message: &str, max: usize) -> String {
    if message.chars().count() <= max {
        return message.to_string();
    }
    let mut out: String = message.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{claims, sign, AUD, ISS, NOW, RSA_OLD};
    use super::*;
    use serde_json::json;

    fn account() -> Account {
        Account {
            identity_provider_id: "idp_123".into(),
            service_account_id: "sa_456".into(),
        }
    }

    fn token(claims: &Value) -> String {
        sign(
            RSA_OLD,
            &json!({"alg": "RS256", "kid": "old-2024", "typ": "JWT"}),
            claims,
        )
    }

    fn refused(status: u16, oauth: Option<&str>) -> ExchangeError {
        ExchangeError::Status {
            status,
            retry_after_s: None,
            oauth: oauth.map(str::to_string),
        }
    }

    #[test]
    fn facts_summarise_what_was_sent() {
        let facts = Facts::read(&token(&claims())).unwrap();
        assert_eq!(
            facts.summary(NOW),
            format!("subject iss \"{ISS}\", aud [\"{AUD}\"], sub \"system:serviceaccount:istio-system:gateway\", kid \"old-2024\", alg RS256, exp in 3540 s")
        );
        let mut c = claims();
        c["exp"] = json!(NOW - 5);
        c["aud"] = json!("single");
        c.as_object_mut().unwrap().remove("sub");
        let facts = Facts::read(&token(&c)).unwrap();
        assert!(facts.summary(NOW).contains(
            "aud [\"single\"], sub (none), kid \"old-2024\", alg RS256, expired 5 s ago"
        ));
        assert_eq!(Facts::read("not a jwt"), None);
        let odd = Facts {
            alg: Some("HS256\n".into()),
            ..Facts::default()
        };
        assert!(odd.summary(NOW).contains("alg \"HS256\\n\", no exp"));
    }

    #[test]
    fn a_refusal_is_explained_with_the_facts_and_the_suspects() {
        let t = token(&claims());
        let facts = Facts::read(&t).unwrap();
        let f = explain(
            &refused(500, None),
            Some(&facts),
            &account(),
            Local::Passed {
                signature_checked: true,
            },
            NOW,
        );
        assert_eq!(f.code, crate::reply::Code::TokenExchangeFailed);
        assert!(f.message.starts_with(
            "OpenAI token exchange failed: the token endpoint answered HTTP 500; subject iss \""
        ));
        assert!(f.message.contains("sent provider idp_123, service account sa_456; local checks passed; left: the service account mapping"), "{}", f.message);
        assert!(f.message.contains("uploaded JWKS stale"));
        let f = explain(
            &refused(401, Some("invalid_grant: subject token rejected")),
            Some(&facts),
            &account(),
            Local::NotConfigured,
            NOW,
        );
        assert!(f
            .message
            .contains("HTTP 401 (invalid_grant: subject token rejected); subject"));
        assert!(f
            .message
            .ends_with("set expect to check issuer, audience and signature locally"));
        let f = explain(
            &refused(403, None),
            None,
            &account(),
            Local::Passed {
                signature_checked: false,
            },
            NOW,
        );
        assert!(f.message.contains("subject token unreadable"));
        assert!(f
            .message
            .contains("without a JWKS; left: the kid in the provider's JWKS"));
    }

    #[test]
    fn other_failures_are_left_alone() {
        let facts = Facts::read(&token(&claims())).unwrap();
        for e in [
            ExchangeError::NoResponse,
            ExchangeError::Malformed("no access_token"),
            refused(429, None),
            refused(503, None),
        ] {
            assert_eq!(
                explain(&e, Some(&facts), &account(), Local::NotConfigured, NOW),
                e.failure()
            );
        }
    }

    #[test]
    fn the_message_is_bounded_escaped_and_never_carries_the_token() {
        let hostile = json!({
            "iss": format!("https://x\r\n{}", "i".repeat(1000)),
            "aud": (0..50).map(|i| format!("aud-{i}-{}", "a".repeat(200))).collect::<Vec<_>>(),
            "sub": "\u{1b}[31mred\u{7}\"quoted\"",
            "exp": NOW + 10, "iat": NOW,
        });
        let t = token(&hostile);
        let facts = Facts::read(&t).unwrap();
        let f = explain(
            &refused(500, Some(&"d".repeat(200))),
            Some(&facts),
            &account(),
            Local::Passed {
                signature_checked: true,
            },
            NOW,
        );
        assert!(
            f.message.chars().count() <= MAX_MESSAGE_CHARS,
            "{}",
            f.message.len()
        );
        assert!(
            f.message
                .contains("…; sent provider idp_123, service account sa_456; local checks passed"),
            "{}",
            f.message
        );
        assert!(!f.message.chars().any(char::is_control), "{:?}", f.message);
        assert!(f.message.contains("\\r\\n"));
        let signature = t.rsplit('.').next().unwrap();
        assert!(!f.message.contains(signature) && !f.message.contains(&t[..30]));
        let inner = token(&claims());
        let facts =
            Facts::read(&token(&json!({"sub": "\u{1b}[31mred\"q\"", "iss": inner}))).unwrap();
        let s = facts.summary(NOW);
        assert!(s.contains("sub \"\\u{1b}[31mred\\\"q\\\"\""), "{s}");
        assert!(s.contains("iss (withheld: looks like a token)"), "{s}");
    }

    #[test]
    fn values_are_truncated_on_character_boundaries() {
        let q = quote(&"é".repeat(200));
        assert_eq!(q.chars().count(), MAX_VALUE_CHARS + 3);
        assert!(q.ends_with("…\""));
        assert_eq!(quote("plain"), "\"plain\"");
        assert_eq!(
            list(&["a", "b", "c", "d"]),
            "[\"a\", \"b\", \"c\", … (4 in all)]"
        );
        assert_eq!(show(&json!([1, true, "x"])), "[\"1\", \"true\", \"x\"]");
        assert_eq!(show(&json!(null)), "null");
    }
}
