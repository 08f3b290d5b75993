//! Caller rules: which mesh workload may use which OpenAI service account.
//!
//! In a mesh the caller's identity is already verified: the downstream mTLS peer certificate
//! carries its SPIFFE ID (`spiffe://cluster.local/ns/<ns>/sa/<sa>` in Istio, any trust domain
//! with SPIRE). Rules are checked in order and the first whose principals match the caller
//! wins; a caller that matches none, or presented no certificate, is refused. Principals follow
//! OpenAI's own mapping rule: an exact value, or a prefix followed by one trailing `*`.

use crate::config::{invalid, Account, ConfigError};

/// One rule: these principals act as this OpenAI service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Shared with the requests and counters that name the rule.
    pub name: std::rc::Rc<str>,
    pub principals: Vec<Principal>,
    pub account: Account,
}

/// A principal pattern: exact, or a non-empty prefix and a trailing `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Exact(String),
    Prefix(String),
}

impl Principal {
    /// Parses a pattern; `None` when it is empty, `*` alone, or has a `*` anywhere but the end.
    pub fn parse(pattern: &str) -> Option<Principal> {
        let valid_text = !pattern.is_empty() && pattern.bytes().all(|b| b.is_ascii_graphic());
        if !valid_text {
            return None;
        }
        match pattern.strip_suffix('*') {
            Some(prefix) if !prefix.is_empty() && !prefix.contains('*') => {
                Some(Principal::Prefix(prefix.to_string()))
            }
            Some(_) => None,
            None if pattern.contains('*') => None,
            None => Some(Principal::Exact(pattern.to_string())),
        }
    }

    pub fn matches(&self, caller: &str) -> bool {
        match self {
            Principal::Exact(p) => p == caller,
            Principal::Prefix(p) => caller.starts_with(p.as_str()),
        }
    }
}

impl std::fmt::Display for Principal {
    /// The pattern as written.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Exact(p) => f.write_str(p),
            Principal::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// Where the caller's identity comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerSource {
    /// The downstream peer certificate of this connection (mTLS terminated here).
    PeerCertificate,
    /// The `URI=` of the first element of `x-forwarded-client-cert`, set by a trusted hop that
    /// terminated mTLS before this one. Only when configured: anyone can send the header.
    ForwardedClientCert,
}

/// The raw rule as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    name: String,
    principals: Vec<String>,
    service_account_id: String,
    #[serde(default)]
    identity_provider_id: Option<String>,
}

/// Validates the rules; `default_provider` is the top-level identity provider.
pub fn rules(raw: Vec<RawRule>, default_provider: &str) -> Result<Vec<Rule>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "callers",
            "must list at least one rule, or be left out".into(),
        ));
    }
    let mut out: Vec<Rule> = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let field = |what: &str| format!("callers[{i}].{what}");
        let name_ok = !r.name.is_empty()
            && r.name.len() <= 64
            && r.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(invalid(
                &field("name"),
                format!("must be 1 to 64 of a-z, 0-9, '_' and '-', not {:?}", r.name),
            ));
        }
        if out.iter().any(|o| *o.name == *r.name) {
            return Err(invalid(
                &field("name"),
                format!("{:?} names an earlier rule too", r.name),
            ));
        }
        if r.principals.is_empty() {
            return Err(invalid(
                &field("principals"),
                "must list at least one principal".into(),
            ));
        }
        let mut principals = Vec::with_capacity(r.principals.len());
        for (j, p) in r.principals.iter().enumerate() {
            let parsed = Principal::parse(p).ok_or_else(|| {
                invalid(
                    &field(&format!("principals[{j}]")),
                    format!("must be an exact principal or a prefix ending in one '*', not {p:?}"),
                )
            })?;
            principals.push(parsed);
        }
        let account = Account {
            identity_provider_id: crate::config::identifier(
                &field("identity_provider_id"),
                r.identity_provider_id
                    .unwrap_or_else(|| default_provider.to_string()),
            )?,
            service_account_id: crate::config::identifier(
                &field("service_account_id"),
                r.service_account_id,
            )?,
        };
        out.push(Rule {
            name: std::rc::Rc::from(r.name),
            principals,
            account,
        });
    }
    Ok(out)
}

/// The first rule whose principals match `caller`.
pub fn first_match<'a>(rules: &'a [Rule], caller: &str) -> Option<&'a Rule> {
    rules
        .iter()
        .find(|r| r.principals.iter().any(|p| p.matches(caller)))
}

/// The caller named by an `x-forwarded-client-cert` value: the `URI=` of its first element
/// (the hop closest to this one appends last, the client is first). `None` without one.
pub fn from_forwarded_client_cert(value: &[u8]) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    let first = split_outside_quotes(value, ',').into_iter().next()?;
    split_outside_quotes(first, ';')
        .into_iter()
        .find_map(|pair| {
            let (key, v) = pair.split_once('=')?;
            key.trim()
                .eq_ignore_ascii_case("uri")
                .then(|| v.trim().trim_matches('"').to_string())
                .filter(|v| !v.is_empty())
        })
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Vec<RawRule> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn patterns_follow_openais_mapping_rule() {
        let exact = Principal::parse("spiffe://cluster.local/ns/ai/sa/inference").unwrap();
        assert!(exact.matches("spiffe://cluster.local/ns/ai/sa/inference"));
        assert!(!exact.matches("spiffe://cluster.local/ns/ai/sa/inference2"));
        let prefix = Principal::parse("spiffe://cluster.local/ns/batch/*").unwrap();
        assert!(prefix.matches("spiffe://cluster.local/ns/batch/sa/job"));
        assert!(!prefix.matches("spiffe://cluster.local/ns/batchx/sa/job"));
        assert!(!prefix.matches("spiffe://cluster.local/ns/ai/sa/inference"));
        for bad in ["", "*", "a*b", "*a", "a**", "a b", "spiffe://x/*/y"] {
            assert_eq!(Principal::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn first_match_wins() {
        let rules = rules(
            raw(r#"[{"name":"inference","principals":["spiffe://td/ns/ai/sa/inference"],"service_account_id":"sa_i"},
                    {"name":"ai","principals":["spiffe://td/ns/ai/*"],"service_account_id":"sa_ai","identity_provider_id":"wip_2"}]"#),
            "wip_1",
        )
        .unwrap();
        let hit = first_match(&rules, "spiffe://td/ns/ai/sa/inference").unwrap();
        assert_eq!(
            (&*hit.name, hit.account.service_account_id.as_str()),
            ("inference", "sa_i")
        );
        assert_eq!(
            hit.account.identity_provider_id, "wip_1",
            "the top level fills in"
        );
        let other = first_match(&rules, "spiffe://td/ns/ai/sa/other").unwrap();
        assert_eq!(
            (&*other.name, other.account.identity_provider_id.as_str()),
            ("ai", "wip_2")
        );
        assert!(first_match(&rules, "spiffe://td/ns/batch/sa/x").is_none());
    }

    #[test]
    fn bad_rules_are_refused_naming_the_field() {
        let cases = [
            ("[]", "callers"),
            (
                r#"[{"name":"a","principals":[],"service_account_id":"s"}]"#,
                "callers[0].principals",
            ),
            (
                r#"[{"name":"a","principals":["x*y"],"service_account_id":"s"}]"#,
                "callers[0].principals[0]",
            ),
            (
                r#"[{"name":"a","principals":["ok","*"],"service_account_id":"s"}]"#,
                "callers[0].principals[1]",
            ),
            (
                r#"[{"name":"a","principals":["p"],"service_account_id":"s"},{"name":"a","principals":["q"],"service_account_id":"t"}]"#,
                "callers[1].name",
            ),
            (
                r#"[{"name":"Bad Name","principals":["p"],"service_account_id":"s"}]"#,
                "callers[0].name",
            ),
            (
                r#"[{"name":"a","principals":["p"],"service_account_id":""}]"#,
                "callers[0].service_account_id",
            ),
        ];
        for (json, field) in cases {
            let e = rules(raw(json), "wip").unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{json}: {e}");
        }
        assert!(serde_json::from_str::<Vec<RawRule>>(
            r#"[{"name":"a","principals":["p"],"service_account_id":"s","extra":1}]"#
        )
        .is_err());
    }

    #[test]
    fn forwarded_client_cert_gives_the_first_elements_uri() {
        assert_eq!(
            from_forwarded_client_cert(
                b"By=spiffe://gw;Hash=abc;URI=spiffe://cluster.local/ns/ai/sa/inference"
            ),
            Some("spiffe://cluster.local/ns/ai/sa/inference".into())
        );
        assert_eq!(
            from_forwarded_client_cert(
                br#"Hash=1;Subject="CN=a,O=b";URI=spiffe://one,By=x;URI=spiffe://two"#
            ),
            Some("spiffe://one".into())
        );
        assert_eq!(from_forwarded_client_cert(b"Hash=abc"), None);
        assert_eq!(from_forwarded_client_cert(b"URI="), None);
        assert_eq!(from_forwarded_client_cert(b"\xff"), None);
    }
}
