//! Local replies in OpenAI's error shape.
//!
//! Every request the filter refuses gets `{"error": {"message", "type", "param", "code"}}`,
//! the body OpenAI's SDKs already know how to surface, plus `x-openai-wif-error: <code>` so
//! operators can tell the gateway's refusals from OpenAI's. Messages never contain a token.

use serde::{Deserialize, Serialize};

/// Why a request was refused. The code fixes the HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    InvalidAuthority,
    MissingSubjectToken,
    InvalidSubjectToken,
    SubjectTokenExpired,
    TokenExchangeFailed,
    TokenEndpointUnavailable,
    SubjectSourceUnavailable,
    SubjectKeysUnavailable,
    TokenWaitTimeout,
    TooManyNewIdentities,
    UpstreamNotAllowed,
    CallerNotAllowed,
    InternalError,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidAuthority => "invalid_authority",
            Code::MissingSubjectToken => "missing_subject_token",
            Code::InvalidSubjectToken => "invalid_subject_token",
            Code::SubjectTokenExpired => "subject_token_expired",
            Code::TokenExchangeFailed => "token_exchange_failed",
            Code::TokenEndpointUnavailable => "token_endpoint_unavailable",
            Code::SubjectSourceUnavailable => "subject_source_unavailable",
            Code::SubjectKeysUnavailable => "subject_keys_unavailable",
            Code::TokenWaitTimeout => "token_wait_timeout",
            Code::TooManyNewIdentities => "too_many_new_identities",
            Code::UpstreamNotAllowed => "upstream_not_allowed",
            Code::CallerNotAllowed => "caller_not_allowed",
            Code::InternalError => "internal_error",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            Code::InvalidAuthority => 400,
            Code::MissingSubjectToken | Code::InvalidSubjectToken | Code::SubjectTokenExpired => {
                401
            }
            Code::TooManyNewIdentities => 429,
            Code::UpstreamNotAllowed | Code::CallerNotAllowed => 403,
            Code::TokenExchangeFailed => 502,
            Code::TokenEndpointUnavailable
            | Code::SubjectSourceUnavailable
            | Code::SubjectKeysUnavailable
            | Code::TokenWaitTimeout
            | Code::InternalError => 503,
        }
    }

    fn error_type(self) -> &'static str {
        match self.status() {
            400 | 401 | 403 => "invalid_request_error",
            429 => "rate_limit_error",
            _ => "server_error",
        }
    }
}

/// A refusal: what to tell the client. Stored in shared data for backoff, so it is serde.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// A fully built local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// The error code, also in the body and in `x-openai-wif-error`.
    pub code: &'static str,
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl LocalReply {
    /// The reply for `failure`; `retry_after_s` adds a `retry-after` header.
    pub fn from_failure(failure: &Failure, retry_after_s: Option<u64>) -> Self {
        let body = serde_json::json!({
            "error": {
                "message": failure.message,
                "type": failure.code.error_type(),
                "param": null,
                "code": failure.code.as_str(),
            }
        });
        let mut headers = vec![
            ("content-type", "application/json".to_string()),
            ("x-openai-wif-error", failure.code.as_str().to_string()),
        ];
        if let Some(s) = retry_after_s {
            headers.push(("retry-after", s.max(1).to_string()));
        }
        if failure.code.status() == 401 {
            headers.push((
                "www-authenticate",
                "Bearer realm=\"openai-wif\"".to_string(),
            ));
        }
        LocalReply {
            code: failure.code.as_str(),
            status: failure.code.status(),
            headers,
            body: body.to_string().into_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_has_openai_error_shape() {
        let f = Failure::new(
            Code::TokenExchangeFailed,
            "the token endpoint answered HTTP 500",
        );
        let r = LocalReply::from_failure(&f, Some(2));
        assert_eq!(r.status, 502);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["code"], "token_exchange_failed");
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(
            v["error"]["message"],
            "the token endpoint answered HTTP 500"
        );
        assert!(v["error"]["param"].is_null());
        assert!(r.headers.contains(&("retry-after", "2".into())));
        assert!(r
            .headers
            .contains(&("x-openai-wif-error", "token_exchange_failed".into())));
    }

    #[test]
    fn statuses_follow_codes() {
        assert_eq!(Code::MissingSubjectToken.status(), 401);
        assert_eq!(Code::SubjectTokenExpired.status(), 401);
        assert_eq!(Code::TokenEndpointUnavailable.status(), 503);
        assert_eq!(Code::SubjectSourceUnavailable.status(), 503);
        assert_eq!(Code::InvalidAuthority.status(), 400);
        assert_eq!(Code::TooManyNewIdentities.status(), 429);
        let r = LocalReply::from_failure(&Failure::new(Code::TooManyNewIdentities, "x"), Some(1));
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "too_many_new_identities");
        let r = LocalReply::from_failure(&Failure::new(Code::InvalidSubjectToken, "x"), None);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(r.headers.iter().all(|(k, _)| *k != "retry-after"));
    }

    #[test]
    fn codes_round_trip_through_serde() {
        let f = Failure::new(Code::SubjectSourceUnavailable, "m");
        let s = serde_json::to_string(&f).unwrap();
        assert!(s.contains("subject_source_unavailable"));
        assert_eq!(serde_json::from_str::<Failure>(&s).unwrap(), f);
    }
}
