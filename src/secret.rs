//! Tokens that must never reach a log, an error body or a metric.
//!
//! Subject tokens and access tokens are wrapped in [`Secret`], whose `Debug` and `Display`
//! print a placeholder. The only way to the text is [`Secret::expose`], called where the
//! token is written to a header or a request body.

use std::fmt;
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Serialized as the bare string, for shared data only: shared data is memory inside Envoy,
/// never a log or a response. Cloning shares the text rather than copying it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(Rc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Rc::from(value.into()))
    }

    /// The token itself. Call only to put it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A short, non-reversible name for this secret: the first 12 hex digits of its SHA-256.
    /// Used to tell two tokens apart (cache invalidation) without keeping or printing them.
    pub fn fingerprint(&self) -> Rc<str> {
        let digest = Sha256::digest(self.0.as_bytes());
        Rc::from(hex(&digest[..6]))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("eyJhbGciOi.very.secret");
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
        assert_eq!(format!("{s}"), "[redacted]");
        assert!(!format!("{:?}", Some(&s)).contains("secret"));
        assert_eq!(s.expose(), "eyJhbGciOi.very.secret");
    }

    #[test]
    fn fingerprint_is_stable_and_short() {
        let a = Secret::new("token-a");
        assert_eq!(a.fingerprint(), Secret::new("token-a").fingerprint());
        assert_ne!(a.fingerprint(), Secret::new("token-b").fingerprint());
        assert_eq!(a.fingerprint().len(), 12);
    }

    #[test]
    fn hex_encodes() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
    }
}
