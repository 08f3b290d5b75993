//! Signature verification for the algorithms the issuers OpenAI federates with use.
//!
//! RS256/384/512 (RSASSA-PKCS1-v1_5), PS256/384/512 (RSASSA-PSS, salt as long as the hash, as
//! RFC 7518 §3.5 requires) and ES256 (ECDSA on P-256, the signature as the 64 bytes `r || s` of
//! RFC 7518 §3.4, never DER). Nothing else: `none` and the HMAC algorithms are refused before a
//! key is ever looked up, and ES384/ES512 would bring another curve into the module for issuers
//! (Kubernetes, Google, Entra, SPIRE) that sign with RSA or P-256.

use p256::ecdsa::signature::Verifier;

use super::rsassa::{self, Hash};

/// A JWS algorithm the checks can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
}

/// The kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    P256,
}

impl Algorithm {
    /// Every supported algorithm, the default of `expect.algorithms`.
    pub const ALL: [Algorithm; 7] = [
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::Es256,
    ];

    /// The `alg` value, as RFC 7518 spells it.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
        }
    }

    /// The algorithm named `alg`; names are case-sensitive (RFC 7515 §4.1.1).
    pub fn parse(alg: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|a| a.name() == alg)
    }

    pub fn key_kind(self) -> KeyKind {
        match self {
            Algorithm::Es256 => KeyKind::P256,
            _ => KeyKind::Rsa,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an `alg` that is not supported is refused, in words for an operator; `None` when the
/// algorithm is supported.
pub fn unsupported(alg: &str) -> Option<String> {
    if Algorithm::parse(alg).is_some() {
        return None;
    }
    let supported = Algorithm::ALL.map(Algorithm::name).join(", ");
    Some(if alg.eq_ignore_ascii_case("none") {
        "an unsigned token (alg none) is never accepted".to_string()
    } else if alg.starts_with("HS") {
        "HMAC algorithms are never accepted: the issuers OpenAI federates with sign with \
         asymmetric keys, and a shared secret would let anyone who can verify forge (RFC 8725 §2.1)"
            .to_string()
    } else {
        format!("it is not supported (supported: {supported})")
    })
}

/// A public key ready to verify with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    Rsa(rsassa::PublicKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl PublicKey {
    pub fn kind(&self) -> KeyKind {
        match self {
            PublicKey::Rsa(_) => KeyKind::Rsa,
            PublicKey::P256(_) => KeyKind::P256,
        }
    }
}

/// True when `signature` is a valid `alg` signature of `signed` (the ASCII of
/// `header.payload`) under `key`. A key of the wrong kind never verifies.
pub fn verify(alg: Algorithm, key: &PublicKey, signed: &[u8], signature: &[u8]) -> bool {
    match (alg, key) {
        (Algorithm::Rs256, PublicKey::Rsa(k)) => k.verify_pkcs1v15(Hash::Sha256, signed, signature),
        (Algorithm::Rs384, PublicKey::Rsa(k)) => k.verify_pkcs1v15(Hash::Sha384, signed, signature),
        (Algorithm::Rs512, PublicKey::Rsa(k)) => k.verify_pkcs1v15(Hash::Sha512, signed, signature),
        (Algorithm::Ps256, PublicKey::Rsa(k)) => k.verify_pss(Hash::Sha256, signed, signature),
        (Algorithm::Ps384, PublicKey::Rsa(k)) => k.verify_pss(Hash::Sha384, signed, signature),
        (Algorithm::Ps512, PublicKey::Rsa(k)) => k.verify_pss(Hash::Sha512, signed, signature),
        (Algorithm::Es256, PublicKey::P256(k)) => {
            // Exactly r || s: a DER signature, or one with extra bytes, is not a JWS signature.
            signature.len() == 64
                && p256::ecdsa::Signature::from_slice(signature)
                    .is_ok_and(|s| k.verify(signed, &s).is_ok())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_case_sensitive() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.name()), Some(a));
            assert_eq!(a.to_string(), a.name());
        }
        for bad in ["rs256", "none", "HS256", "ES384", "EdDSA", "", "RS256 "] {
            assert_eq!(Algorithm::parse(bad), None, "{bad}");
            assert!(unsupported(bad).is_some());
        }
        assert!(unsupported("RS256").is_none());
        assert!(unsupported("none").unwrap().contains("unsigned"));
        assert!(unsupported("NONE").unwrap().contains("unsigned"));
        assert!(unsupported("HS256").unwrap().contains("HMAC"));
        assert!(unsupported("ES512").unwrap().contains("supported: RS256"));
    }
}
