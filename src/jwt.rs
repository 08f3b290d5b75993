//! The little the filter needs to know about a subject JWT before exchanging it.
//!
//! The filter does not verify signatures: the token endpoint does, against the identity
//! provider's keys. The filter checks the shape (three base64url parts, JSON header and
//! payload) so garbage is refused locally with a 401, and reads `exp`, because no token
//! obtained with a subject may outlive it. Nothing here is trusted for identity: cache keys
//! are derived from the whole token, never from a claim.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;

/// Largest subject token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("the token is empty")]
    Empty,
    #[error("the token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("the token is not a JWT: expected three dot-separated base64url parts")]
    NotCompact,
    #[error("the token's {0} is not base64url-encoded JSON")]
    BadPart(&'static str),
    #[error("the token has no usable 'alg' in its header")]
    NoAlgorithm,
}

/// Claims the filter reads from an unverified subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// `exp` in seconds since the epoch, when present.
    pub exp: Option<u64>,
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    alg: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    exp: Option<serde_json::Value>,
}

/// Checks that `token` is a compact JWS and returns the claims the filter uses.
pub fn inspect(token: &str) -> Result<Claims, JwtError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(JwtError::Empty);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::NotCompact);
    };
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(JwtError::NotCompact);
    }
    if URL_SAFE_NO_PAD.decode(signature).is_err() {
        return Err(JwtError::BadPart("signature"));
    }
    let header: Header = decode_json(header).ok_or(JwtError::BadPart("header"))?;
    match header.alg.as_deref() {
        None | Some("") | Some("none") => return Err(JwtError::NoAlgorithm),
        Some(_) => {}
    }
    let payload: Payload = decode_json(payload).ok_or(JwtError::BadPart("payload"))?;
    let exp = match payload.exp {
        None | Some(serde_json::Value::Null) => None,
        Some(n @ serde_json::Value::Number(_)) => numeric_date(&n),
        Some(_) => return Err(JwtError::BadPart("payload")),
    };
    Ok(Claims { exp })
}

/// A NumericDate (RFC 7519 §2): a non-negative JSON number, a fraction dropped.
pub(crate) fn numeric_date(value: &serde_json::Value) -> Option<u64> {
    let n = value.as_number()?;
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A syntactically valid, unsigned-for-real JWT for tests.
    pub(crate) fn make(payload: &str) -> String {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"k1","typ":"JWT"}"#);
        let p = URL_SAFE_NO_PAD.encode(payload.as_bytes());
        let s = URL_SAFE_NO_PAD.encode(b"signature-bytes");
        format!("{h}.{p}.{s}")
    }

    #[test]
    fn reads_exp() {
        let t = make(r#"{"sub":"a","exp":1700000000}"#);
        assert_eq!(inspect(&t).unwrap().exp, Some(1_700_000_000));
        let t = make(r#"{"sub":"a","exp":1700000000.5}"#);
        assert_eq!(inspect(&t).unwrap().exp, Some(1_700_000_000));
        let t = make(r#"{"sub":"a"}"#);
        assert_eq!(inspect(&t).unwrap().exp, None);
        let t = make(r#"{"sub":"a"}"#);
        assert_eq!(inspect(&format!("  {t}\n")).unwrap().exp, None);
    }

    #[test]
    fn refuses_what_is_not_a_jwt() {
        let good = make(r#"{"exp":1}"#);
        let parts: Vec<&str> = good.split('.').collect();
        let cases = [
            ("".to_string(), JwtError::Empty),
            ("   ".to_string(), JwtError::Empty),
            ("abc".to_string(), JwtError::NotCompact),
            ("a.b".to_string(), JwtError::NotCompact),
            (format!("{good}.extra"), JwtError::NotCompact),
            (format!("{}..{}", parts[0], parts[2]), JwtError::NotCompact),
            (format!("{}.{}.", parts[0], parts[1]), JwtError::NotCompact),
            (
                format!("!!!.{}.{}", parts[1], parts[2]),
                JwtError::BadPart("header"),
            ),
            (
                format!("{}.bm90IGpzb24.{}", parts[0], parts[2]),
                JwtError::BadPart("payload"),
            ),
            (
                format!("{}.{}.***", parts[0], parts[1]),
                JwtError::BadPart("signature"),
            ),
            (make(r#"{"exp":"tomorrow"}"#), JwtError::BadPart("payload")),
            ("x".repeat(MAX_TOKEN_BYTES + 1), JwtError::TooLarge),
        ];
        for (token, want) in cases {
            assert_eq!(inspect(&token), Err(want), "{token:.40}");
        }
    }

    #[test]
    fn refuses_alg_none() {
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let p = URL_SAFE_NO_PAD.encode(br#"{"exp":1}"#);
        assert_eq!(
            inspect(&format!("{h}.{p}.c2ln")),
            Err(JwtError::NoAlgorithm)
        );
    }
}
