//! The `header` source: each workload sends its own subject token with its request.

use serde::Deserialize;

use crate::config::{header_name, ConfigError};

use crate::jwt::{self, Claims, JwtError};
use crate::reply::{Code, Failure};
use crate::secret::Secret;

pub const NAME: &str = "header";
const DEFAULT_HEADER: &str = "x-openai-subject-token";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The header that carries the workload's token (lower case).
    pub header: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Raw {
    #[serde(default)]
    header: Option<String>,
}

impl Config {
    pub fn from_raw(raw: Raw) -> Result<Config, ConfigError> {
        Ok(Config {
            header: header_name(
                "subject_token.header",
                raw.header.unwrap_or_else(|| DEFAULT_HEADER.to_string()),
            )?,
        })
    }
}

/// The header a workload's subject token comes in when nothing else is configured: removed
/// from every request whatever the source, since it is a credential for this gateway alone.
pub const fn default_header() -> &'static str {
    DEFAULT_HEADER
}

/// Validates the header's raw value: present, not empty, not oversized, text, a three-part JWT,
/// not expired at `now_s`. Every refusal is a 401 that says what was wrong.
pub fn accept(value: Option<&[u8]>, header: &str, now_s: u64) -> Result<(Secret, Claims), Failure> {
    let Some(value) = value else {
        return Err(missing(header));
    };
    // A JWT is ASCII; bytes that are not UTF-8 make it no JWT, not a reason to stop.
    let Ok(value) = std::str::from_utf8(value) else {
        return Err(Failure::new(
            Code::InvalidSubjectToken,
            format!("the subject token in {header} is not valid: it is not text"),
        ));
    };
    let value = value.trim();
    let claims = jwt::inspect(value).map_err(|e| match e {
        JwtError::Empty => Failure::new(
            Code::MissingSubjectToken,
            format!("the {header} header is empty"),
        ),
        other => Failure::new(
            Code::InvalidSubjectToken,
            format!("the subject token in {header} is not valid: {other}"),
        ),
    })?;
    if claims.exp.is_some_and(|exp| exp <= now_s) {
        return Err(expired(header));
    }
    Ok((Secret::new(value), claims))
}

/// The header's value as a token to check: present, text, not empty, not oversized. What makes
/// it a usable JWT is left to the subject checks (`expect`), whose refusals name the check.
pub fn text<'v>(value: Option<&'v [u8]>, header: &str) -> Result<&'v str, Failure> {
    let value = value.ok_or_else(|| missing(header))?;
    let value = std::str::from_utf8(value)
        .map_err(|_| {
            Failure::new(
                Code::InvalidSubjectToken,
                format!("the subject token in {header} is not valid: it is not text"),
            )
        })?
        .trim();
    if value.is_empty() {
        return Err(Failure::new(
            Code::MissingSubjectToken,
            format!("the {header} header is empty"),
        ));
    }
    if value.len() > jwt::MAX_TOKEN_BYTES {
        return Err(Failure::new(
            Code::InvalidSubjectToken,
            format!(
                "the subject token in {header} is not valid: {}",
                JwtError::TooLarge
            ),
        ));
    }
    Ok(value)
}

/// The refusal of a request without the header.
pub fn missing(header: &str) -> Failure {
    Failure::new(
        Code::MissingSubjectToken,
        format!("the request has no subject token: send the workload's identity token in the {header} header"),
    )
}

/// The refusal of a token whose `exp` has passed.
pub fn expired(header: &str) -> Failure {
    Failure::new(
        Code::SubjectTokenExpired,
        format!("the subject token in {header} has expired"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::make;

    const H: &str = "x-openai-subject-token";

    #[test]
    fn accepts_a_jwt() {
        let t = make(r#"{"exp":2000}"#);
        let (s, c) = accept(Some(format!(" {t} ").as_bytes()), H, 1000).unwrap();
        assert_eq!(s.expose(), t);
        assert_eq!(c.exp, Some(2000));
    }

    #[test]
    fn refusals() {
        let cases = [
            (None, Code::MissingSubjectToken),
            (Some(String::new()), Code::MissingSubjectToken),
            (Some("Bearer abc".into()), Code::InvalidSubjectToken),
            (Some("x".repeat(20_000)), Code::InvalidSubjectToken),
            (Some(make(r#"{"exp":999}"#)), Code::SubjectTokenExpired),
        ];
        for (value, code) in cases {
            let f = accept(value.as_deref().map(str::as_bytes), H, 1000).unwrap_err();
            assert_eq!(f.code, code, "{value:.30?}");
            assert!(f.message.contains(H));
        }
    }

    #[test]
    fn bytes_that_are_not_text_are_an_invalid_token() {
        let mut t = make(r#"{"exp":2000}"#).into_bytes();
        t.splice(3..3, [0xff, 0xfe]);
        let f = accept(Some(&t), H, 1000).unwrap_err();
        assert_eq!(f.code, Code::InvalidSubjectToken);
        assert!(f.message.contains("not text"));
    }

    #[test]
    fn refusals_never_echo_the_token() {
        let t = make(r#"{"exp":1}"#);
        let f = accept(Some(t.as_bytes()), H, 1000).unwrap_err();
        assert!(!f.message.contains(&t));
        let f = accept(Some(b"secretgarbage"), H, 1000).unwrap_err();
        assert!(!f.message.contains("secretgarbage"));
    }
}
