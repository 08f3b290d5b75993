//! A subject token taken apart: the compact JWS (RFC 7515 §7.1) as three base64url parts, the
//! header and the claims as JSON objects. Nothing here is trusted until the signature check.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use crate::jwt::MAX_TOKEN_BYTES;

pub(crate) struct Parts<'a> {
    /// `header.payload`, the bytes the signature covers.
    pub signed: &'a str,
    pub signature: Vec<u8>,
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
}

/// The token's parts, or why it is not a compact JWS with JSON header and claims.
pub(crate) fn parse(token: &str) -> Result<Parts<'_>, String> {
    let token = token.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(format!("the token is larger than {MAX_TOKEN_BYTES} bytes"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        let n = token.split('.').count();
        return Err(format!(
            "the token has {n} dot-separated parts, a signed JWT has 3{}",
            if n == 5 {
                " (5 is an encrypted JWE)"
            } else {
                ""
            }
        ));
    };
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err("a part of the token is empty (an unsigned JWT has no signature)".into());
    }
    let signed = &token[..header.len() + 1 + payload.len()];
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "the signature is not base64url".to_string())?;
    let object = |part: &str, what: &str| -> Result<Map<String, Value>, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| format!("the {what} is not base64url"))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            _ => Err(format!("the {what} is not a JSON object")),
        }
    };
    let header = object(header, "header")?;
    let claims = object(payload, "payload")?;
    Ok(Parts {
        signed,
        signature,
        header,
        claims,
    })
}

/// `typ`, `cty` and `crit` (RFC 8725 §3.11, RFC 7515 §4.1.11): a token that says it is another
/// kind of JWT, nests one, or needs an extension this filter does not implement is refused.
pub(crate) fn type_header(header: &Map<String, Value>) -> Result<(), String> {
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) => {
            let media = typ.to_ascii_lowercase();
            let media = media.strip_prefix("application/").unwrap_or(&media);
            if !["jwt", "at+jwt", "jose"].contains(&media) {
                return Err(format!(
                    "the header's typ is {}, not a JWT (JWT, at+jwt or absent)",
                    super::diagnose::quote(typ)
                ));
            }
        }
        Some(_) => return Err("the header's typ is not a string".into()),
    }
    if let Some(cty) = header.get("cty") {
        return Err(format!(
            "the header has cty {}: a nested or non-JWT payload is not a subject token",
            super::diagnose::quote(&cty.to_string())
        ));
    }
    if header.contains_key("crit") {
        return Err("the header has crit: no JWS extension is supported".into());
    }
    Ok(())
}

pub(crate) use crate::jwt::numeric_date;

/// `aud` as a list: a string is a list of one (RFC 7519 §4.1.3).
pub(crate) fn audiences(value: &Value) -> Option<Vec<&str>> {
    match value {
        Value::String(s) => Some(vec![s.as_str()]),
        Value::Array(items) if !items.is_empty() => items.iter().map(Value::as_str).collect(),
        _ => None,
    }
}
