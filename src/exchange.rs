//! The OAuth 2.0 token exchange with OpenAI: the request the filter sends and what it accepts back.
//!
//! `POST /oauth/token` with a JSON body of the five documented fields. A 200 is accepted only
//! with a non-empty `access_token` that is safe in a header, `token_type` Bearer and a usable
//! `expires_in`; anything else is an [`ExchangeError`] that names what was wrong, never the token.

use serde::Deserialize;

use crate::config::{Account, Config};
use crate::reply::{Code, Failure};
use crate::secret::Secret;

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// `expires_in` assumed when the endpoint omits it: short, so a wrong guess costs little.
pub const DEFAULT_EXPIRES_IN_S: u64 = 300;
/// Longest lifetime believed, whatever the endpoint says.
pub const MAX_EXPIRES_IN_S: u64 = 24 * 3600;
/// Largest response body read from the endpoint.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
const MAX_ACCESS_TOKEN_BYTES: usize = 8 * 1024;
const MAX_RETRY_AFTER_S: u64 = 300;

/// The JSON body of the exchange request, for `account`. Without a subject (the x509 source)
/// there is no `subject_token` field at all: the certificate in the handshake is the subject.
pub fn request_body(config: &Config, account: &Account, subject: Option<&Secret>) -> Vec<u8> {
    let mut body = serde_json::json!({
        "grant_type": GRANT_TYPE,
        "subject_token_type": config.subject_token_type.urn(),
        "identity_provider_id": account.identity_provider_id,
        "service_account_id": account.service_account_id,
    });
    if let (Some(subject), Some(fields)) = (subject, body.as_object_mut()) {
        fields.insert("subject_token".into(), subject.expose().into());
    }
    body.to_string().into_bytes()
}

/// The headers of the exchange request.
pub fn request_headers(config: &Config) -> Vec<(&'static str, String)> {
    vec![
        (":method", "POST".into()),
        (":path", config.token_endpoint.path.clone()),
        (":authority", config.token_endpoint.authority.clone()),
        ("content-type", "application/json".into()),
        ("accept", "application/json".into()),
        (
            "user-agent",
            concat!("openai-wif/", env!("CARGO_PKG_VERSION")).into(),
        ),
    ]
}

/// An access token as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub access_token: Secret,
    pub expires_in_s: u64,
    pub scope: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("the token endpoint did not answer (timeout, reset or no such cluster)")]
    NoResponse,
    #[error("the token endpoint answered HTTP {status}{}", oauth.as_deref().map(|o| format!(" ({o})")).unwrap_or_default())]
    Status {
        status: u16,
        retry_after_s: Option<u64>,
        /// The OAuth `error` (and a short `error_description`) the endpoint gave, if any.
        oauth: Option<String>,
    },
    #[error("the token endpoint's answer was unusable: {0}")]
    Malformed(&'static str),
}

impl ExchangeError {
    /// How the failure is reported to clients.
    pub fn failure(&self) -> Failure {
        let code = match self {
            ExchangeError::NoResponse => Code::TokenEndpointUnavailable,
            // Rate limiting and an unreachable or overloaded endpoint (Envoy answers 503 itself
            // when the connection fails) are "try later", not a refusal.
            ExchangeError::Status {
                status: 429 | 502 | 503 | 504,
                ..
            } => Code::TokenEndpointUnavailable,
            ExchangeError::Status { .. } | ExchangeError::Malformed(_) => Code::TokenExchangeFailed,
        };
        Failure::new(code, format!("OpenAI token exchange failed: {self}"))
    }

    /// The server's `Retry-After`, when it gave one.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            ExchangeError::Status { retry_after_s, .. } => *retry_after_s,
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    scope: Option<String>,
}

/// Parses the endpoint's answer: `status` is the `:status` header (absent when the callout
/// failed before a response), `retry_after` the `Retry-After` header.
pub fn parse_response(
    status: Option<&str>,
    retry_after: Option<&str>,
    body: Option<&[u8]>,
) -> Result<Issued, ExchangeError> {
    // Exactly three digits, as Envoy writes `:status`: "+200" or "0200" is no answer.
    let status: u16 = status
        .map(str::trim)
        .filter(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or(ExchangeError::NoResponse)?;
    if status != 200 {
        return Err(ExchangeError::Status {
            status,
            retry_after_s: retry_after.and_then(parse_retry_after),
            oauth: body.and_then(oauth_error),
        });
    }
    let body = body.unwrap_or_default();
    if body.len() > MAX_RESPONSE_BYTES {
        return Err(ExchangeError::Malformed("the body is too large"));
    }
    let response: Response = serde_json::from_slice(body)
        .map_err(|_| ExchangeError::Malformed("the body is not a JSON object"))?;
    let access_token = response
        .access_token
        .ok_or(ExchangeError::Malformed("no access_token"))?;
    if access_token.is_empty() {
        return Err(ExchangeError::Malformed("access_token is empty"));
    }
    if access_token.len() > MAX_ACCESS_TOKEN_BYTES
        || !access_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(ExchangeError::Malformed(
            "access_token is not a header-safe string",
        ));
    }
    match response.token_type.as_deref() {
        Some(t) if t.eq_ignore_ascii_case("bearer") => {}
        Some(_) => return Err(ExchangeError::Malformed("token_type is not Bearer")),
        None => return Err(ExchangeError::Malformed("no token_type")),
    }
    let expires_in_s = match response.expires_in {
        None | Some(serde_json::Value::Null) => DEFAULT_EXPIRES_IN_S,
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(0) | None => {
                return Err(ExchangeError::Malformed(
                    "expires_in is not a positive integer",
                ))
            }
            Some(s) => s.min(MAX_EXPIRES_IN_S),
        },
        Some(_) => {
            return Err(ExchangeError::Malformed(
                "expires_in is not a positive integer",
            ))
        }
    };
    Ok(Issued {
        access_token: Secret::new(access_token),
        expires_in_s,
        scope: response.scope,
    })
}

#[derive(Deserialize)]
struct OAuthError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
}

/// `error: error_description` from an OAuth error answer, short and printable; nothing when the
/// answer is not one, or carries anything token-shaped.
fn oauth_error(body: &[u8]) -> Option<String> {
    if body.len() > MAX_RESPONSE_BYTES || crate::subject::carries_a_token(body) {
        return None;
    }
    let parsed: OAuthError = serde_json::from_slice(body).ok()?;
    let clean = |s: String, max: usize| -> String {
        s.chars()
            .filter(|c| !c.is_control())
            .take(max)
            .collect::<String>()
            .trim()
            .to_string()
    };
    let error = clean(parsed.error?, 64);
    if error.is_empty() {
        return None;
    }
    Some(match parsed.error_description.map(|d| clean(d, 160)) {
        Some(d) if !d.is_empty() => format!("{error}: {d}"),
        _ => error,
    })
}

/// `Retry-After` as delta-seconds; an HTTP date or garbage is ignored.
fn parse_retry_after(value: &str) -> Option<u64> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| s.min(MAX_RETRY_AFTER_S))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            br#"{"identity_provider_id":"wip_1","service_account_id":"sa_1",
            "token_endpoint":{"cluster":"openai_auth"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn request_carries_the_five_fields() {
        let c = config();
        let body = request_body(&c, &c.account, Some(&Secret::new("a.b.c")));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["grant_type"], GRANT_TYPE);
        assert_eq!(
            v["subject_token_type"],
            "urn:ietf:params:oauth:token-type:jwt"
        );
        assert_eq!(v["subject_token"], "a.b.c");
        assert_eq!(v["identity_provider_id"], "wip_1");
        assert_eq!(v["service_account_id"], "sa_1");
        assert_eq!(v.as_object().unwrap().len(), 5);
        let h = request_headers(&config());
        assert!(h.contains(&(":method", "POST".into())));
        assert!(h.contains(&(":path", "/oauth/token".into())));
        assert!(h.contains(&(":authority", "auth.openai.com".into())));
        assert!(h.contains(&("content-type", "application/json".into())));
    }

    #[test]
    fn the_x509_exchange_has_no_subject_token() {
        let c = Config::parse(
            br#"{"identity_provider_id":"wip_1","service_account_id":"sa_1",
            "subject_token":{"source":"x509"},"token_endpoint":{"cluster":"openai_auth_mtls"}}"#,
        )
        .unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&request_body(&c, &c.account, None)).unwrap();
        assert_eq!(
            v["subject_token_type"],
            "urn:openai:params:oauth:token-type:x509"
        );
        assert!(v.get("subject_token").is_none());
        assert_eq!(v.as_object().unwrap().len(), 4);
        assert!(request_headers(&c).contains(&(":authority", "mtls.auth.openai.com".into())));
        let e = Config::parse(
            br#"{"identity_provider_id":"w","service_account_id":"s","subject_token_type":"jwt",
            "subject_token":{"source":"x509"},"token_endpoint":{"cluster":"c"}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("subject_token_type"));
    }

    fn ok(body: &str) -> Result<Issued, ExchangeError> {
        parse_response(Some("200"), None, Some(body.as_bytes()))
    }

    #[test]
    fn accepts_a_good_answer() {
        let i = ok(r#"{"access_token":"at-1","token_type":"bearer","expires_in":3600,"scope":"api.model.request","issued_token_type":"urn:ietf:params:oauth:token-type:access_token"}"#).unwrap();
        assert_eq!(i.access_token.expose(), "at-1");
        assert_eq!(i.expires_in_s, 3600);
        assert_eq!(i.scope.as_deref(), Some("api.model.request"));
    }

    #[test]
    fn missing_expires_in_is_conservative_and_absurd_is_clamped() {
        assert_eq!(
            ok(r#"{"access_token":"a","token_type":"Bearer"}"#)
                .unwrap()
                .expires_in_s,
            DEFAULT_EXPIRES_IN_S
        );
        assert_eq!(
            ok(r#"{"access_token":"a","token_type":"Bearer","expires_in":99999999999}"#)
                .unwrap()
                .expires_in_s,
            MAX_EXPIRES_IN_S
        );
    }

    #[test]
    fn refuses_unusable_answers() {
        let bad = [
            "",
            "<html>oops</html>",
            "[]",
            r#"{"token_type":"Bearer","expires_in":60}"#,
            r#"{"access_token":"","token_type":"Bearer","expires_in":60}"#,
            r#"{"access_token":"a b","token_type":"Bearer","expires_in":60}"#,
            "{\"access_token\":\"a\\r\\nx-evil: 1\",\"token_type\":\"Bearer\",\"expires_in\":60}",
            r#"{"access_token":"a","token_type":"mac","expires_in":60}"#,
            r#"{"access_token":"a","expires_in":60}"#,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":0}"#,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":-5}"#,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":"60"}"#,
            r#"{"access_token":"a","token_type":"Bearer","expires_in":1.5}"#,
            r#"{"access_token":7,"token_type":"Bearer","expires_in":60}"#,
        ];
        for body in bad {
            assert!(
                matches!(ok(body), Err(ExchangeError::Malformed(_))),
                "{body}"
            );
        }
        let huge = format!(
            r#"{{"access_token":"{}","token_type":"Bearer"}}"#,
            "a".repeat(MAX_RESPONSE_BYTES)
        );
        assert!(ok(&huge).is_err());
    }

    #[test]
    fn statuses_and_retry_after() {
        assert_eq!(
            parse_response(None, None, None),
            Err(ExchangeError::NoResponse)
        );
        assert_eq!(
            parse_response(Some("garbage"), None, None),
            Err(ExchangeError::NoResponse)
        );
        let e = parse_response(Some("429"), Some("7"), Some(b"{}")).unwrap_err();
        assert_eq!(e.retry_after_s(), Some(7));
        assert_eq!(e.failure().code, Code::TokenEndpointUnavailable);
        let e =
            parse_response(Some("429"), Some("Wed, 21 Oct 2015 07:28:00 GMT"), None).unwrap_err();
        assert_eq!(e.retry_after_s(), None);
        let e = parse_response(Some("503"), None, None).unwrap_err();
        assert_eq!(e.failure().code, Code::TokenEndpointUnavailable);
        let e = parse_response(Some("500"), None, Some(b"{}")).unwrap_err();
        assert_eq!(e.failure().code, Code::TokenExchangeFailed);
        assert_eq!(
            e.failure().message,
            "OpenAI token exchange failed: the token endpoint answered HTTP 500"
        );
        let e = parse_response(
            Some("401"),
            None,
            Some(br#"{"error":"invalid_subject_token","error_description":"certificate chain does not reach an activated root"}"#),
        )
        .unwrap_err();
        assert_eq!(e.failure().code, Code::TokenExchangeFailed);
        assert_eq!(
            e.failure().message,
            "OpenAI token exchange failed: the token endpoint answered HTTP 401 (invalid_subject_token: certificate chain does not reach an activated root)"
        );
        let leaky = parse_response(
            Some("400"),
            None,
            Some(br#"{"error":"invalid_grant","error_description":"bad token eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}"#),
        )
        .unwrap_err();
        assert_eq!(leaky.to_string(), "the token endpoint answered HTTP 400");
        assert_eq!(
            parse_response(Some("503"), Some("100000"), None)
                .unwrap_err()
                .retry_after_s(),
            Some(300)
        );
    }

    #[test]
    fn errors_never_carry_the_token() {
        let e = ok(r#"{"access_token":"secret-at","token_type":"mac"}"#).unwrap_err();
        assert!(!format!("{e} {e:?} {:?}", e.failure()).contains("secret-at"));
    }
}
