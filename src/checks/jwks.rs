//! An issuer's JSON Web Key Set (RFC 7517), read into keys ready to verify with.
//!
//! The document is bounded (64 KiB, 32 keys) and read key by key: a key this filter cannot or
//! must not use is skipped with its reason (an encryption key, a symmetric key, an unsupported
//! curve, a weak modulus, private material) rather than failing the whole set, so an issuer that
//! publishes one exotic key still verifies with the others. Keys are only ever selected by the
//! token's `kid`; nothing in a token (`jku`, `jwk`, `x5u`) ever names a key to fetch or trust.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};

use super::rsassa;
use super::verify::{Algorithm, KeyKind, PublicKey};

/// Largest JWKS document read.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys a JWKS may hold (issuers publish two or three: current and next, or old and new).
pub const MAX_KEYS: usize = 32;
/// Longest `kid` accepted, in a JWKS or a token.
pub const MAX_KID_BYTES: usize = 256;
pub const MIN_RSA_BITS: usize = 2048;
pub const MAX_RSA_BITS: usize = 8192;

/// A key the checks may verify with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: String,
    /// The key's own `alg`: when set, the key verifies that algorithm only.
    pub alg: Option<Algorithm>,
    pub key: PublicKey,
}

impl Jwk {
    /// True when the key may verify a token signed with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.key.kind() == alg.key_kind() && self.alg.is_none_or(|a| a == alg)
    }
}

/// A key of the document that is not used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Its position in `keys`.
    pub index: usize,
    pub kid: Option<String>,
    pub reason: String,
}

/// The usable keys of a JWKS, and the ones skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
    skipped: Vec<Skipped>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("the JWKS is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("the JWKS is not a JSON object with a \"keys\" array")]
    NotAKeySet,
    #[error("the JWKS has {0} keys, more than {MAX_KEYS}")]
    TooManyKeys(usize),
}

/// Why no key verifies a token's `kid` and `alg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No key has this `kid`: the issuer may have rotated since the JWKS was read.
    Unknown,
    /// Keys have this `kid` but none may verify this `alg`; the reason is for the operator.
    Unfit(String),
}

impl Jwks {
    /// Reads a JWKS document, as served at an issuer's `jwks_uri`.
    pub fn parse(bytes: &[u8]) -> Result<Jwks, JwksError> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let doc: Value = serde_json::from_slice(bytes).map_err(|_| JwksError::NotAKeySet)?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(JwksError::NotAKeySet)?;
        if keys.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys(keys.len()));
        }
        let mut jwks = Jwks {
            keys: Vec::with_capacity(keys.len()),
            skipped: Vec::new(),
        };
        for (index, key) in keys.iter().enumerate() {
            let kid = key.get("kid").and_then(Value::as_str).map(str::to_string);
            match key
                .as_object()
                .ok_or("not a JSON object".to_string())
                .and_then(jwk)
            {
                Ok(k) => jwks.keys.push(k),
                Err(reason) => jwks.skipped.push(Skipped { index, kid, reason }),
            }
        }
        Ok(jwks)
    }

    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }

    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The keys that may verify a token with this `kid` and `alg` (more than one only when the
    /// issuer reuses a `kid`: each is tried).
    pub fn candidates(&self, kid: &str, alg: Algorithm) -> Result<Vec<&Jwk>, Miss> {
        let named: Vec<&Jwk> = self.keys.iter().filter(|k| k.kid == kid).collect();
        let fitting: Vec<&Jwk> = named.iter().copied().filter(|k| k.fits(alg)).collect();
        if !fitting.is_empty() {
            return Ok(fitting);
        }
        if let Some(k) = named.first() {
            let what = match (k.key.kind(), k.alg) {
                (_, Some(a)) => format!("an {a} key"),
                (KeyKind::Rsa, None) => "an RSA key".to_string(),
                (KeyKind::P256, None) => "a P-256 key".to_string(),
            };
            return Err(Miss::Unfit(format!(
                "names {what} in the JWKS, which does not verify {alg}"
            )));
        }
        if let Some(s) = self.skipped.iter().find(|s| s.kid.as_deref() == Some(kid)) {
            return Err(Miss::Unfit(format!(
                "names a key of the JWKS that is not used: {}",
                s.reason
            )));
        }
        Err(Miss::Unknown)
    }

    /// The `kid`s of the usable keys, for messages.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }
}

/// One key, or why it is skipped.
fn jwk(key: &Map<String, Value>) -> Result<Jwk, String> {
    let text = |name: &str| -> Result<Option<&str>, String> {
        match key.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("{name} is not a string")),
        }
    };
    let kty = text("kty")?.ok_or("no kty")?;
    if kty == "oct" {
        return Err("a symmetric key (kty oct) never verifies a subject token".into());
    }
    let kid = match text("kid")? {
        None => return Err("no kid, so no token can select it (OpenAI requires a kid)".into()),
        Some(k) if k.is_empty() || k.len() > MAX_KID_BYTES => {
            return Err(format!("kid is empty or longer than {MAX_KID_BYTES} bytes"))
        }
        Some(k) => k.to_string(),
    };
    match text("use")? {
        None | Some("sig") => {}
        Some(other) => return Err(format!("use is {other:?}, not \"sig\"")),
    }
    if let Some(ops) = key.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|o| o == "verify"));
        if !verifies {
            return Err("key_ops does not include \"verify\"".into());
        }
    }
    let alg = match text("alg")? {
        None => None,
        Some(a) => Some(Algorithm::parse(a).ok_or_else(|| {
            let why = super::verify::unsupported(a).unwrap_or_default();
            format!("alg {a:?}: {why}")
        })?),
    };
    // A published private key is a leak, not a key to trust.
    if ["d", "p", "q", "dp", "dq", "qi", "k"]
        .iter()
        .any(|m| key.contains_key(*m))
    {
        return Err("it holds private key material: publish only the public key".into());
    }
    let bytes = |name: &str| -> Result<Vec<u8>, String> {
        let value = text(name)?.ok_or_else(|| format!("no {name}"))?;
        URL_SAFE_NO_PAD
            .decode(value)
            .map_err(|_| format!("{name} is not base64url"))
    };
    let key = match kty {
        "RSA" => PublicKey::Rsa(rsa_key(&bytes("n")?, &bytes("e")?)?),
        "EC" => match text("crv")? {
            Some("P-256") => PublicKey::P256(p256_key(&bytes("x")?, &bytes("y")?)?),
            Some(crv) => return Err(format!("curve {crv:?} is not supported (only P-256)")),
            None => return Err("no crv".into()),
        },
        other => return Err(format!("kty {other:?} is not supported (RSA or EC P-256)")),
    };
    if let Some(a) = alg {
        if a.key_kind() != key.kind() {
            return Err(format!("alg {a} does not fit kty {kty:?}"));
        }
    }
    Ok(Jwk { kid, alg, key })
}

fn rsa_key(n: &[u8], e: &[u8]) -> Result<rsassa::PublicKey, String> {
    let bits = rsassa::bit_len(n);
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!(
            "RSA modulus of {bits} bits, outside {MIN_RSA_BITS} to {MAX_RSA_BITS}"
        ));
    }
    // The exponent is small and odd (65537 in practice): a huge one is a denial of service.
    let e_value = (rsassa::bit_len(e) <= 32)
        .then(|| e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v >= 3 && v & 1 == 1)
        .ok_or("RSA exponent is not an odd number from 3 to 2^32")?;
    rsassa::PublicKey::new(n, e_value).map_err(|_| "not a usable RSA public key".to_string())
}

fn p256_key(x: &[u8], y: &[u8]) -> Result<p256::ecdsa::VerifyingKey, String> {
    let coordinate = |c: &[u8], name: &str| {
        <[u8; 32]>::try_from(c).map_err(|_| format!("{name} is not 32 bytes"))
    };
    let point = p256::EncodedPoint::from_affine_coordinates(
        &coordinate(x, "x")?.into(),
        &coordinate(y, "y")?.into(),
        false,
    );
    p256::ecdsa::VerifyingKey::from_encoded_point(&point)
        .map_err(|_| "x and y are not a point on P-256".to_string())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{public_jwk, EC, RSA_NEW, RSA_OLD, RSA_WEAK};
    use super::*;

    fn set(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    #[test]
    fn reads_rsa_and_p256_keys() {
        let jwks = Jwks::parse(&set(&[
            public_jwk(RSA_OLD),
            public_jwk(RSA_NEW),
            public_jwk(EC),
        ]))
        .unwrap();
        assert_eq!(jwks.kids(), ["old-2024", "new-2025", "ec-1"]);
        assert!(jwks.skipped().is_empty());
        assert_eq!(jwks.keys()[0].alg, Some(Algorithm::Rs256));
        assert_eq!(jwks.keys()[2].key.kind(), KeyKind::P256);
    }

    #[test]
    fn kubernetes_style_keys_without_alg_fit_every_algorithm_of_their_kind() {
        let mut k = public_jwk(RSA_OLD);
        k.as_object_mut().unwrap().remove("alg");
        let jwks = Jwks::parse(&set(&[k])).unwrap();
        assert_eq!(
            jwks.candidates("old-2024", Algorithm::Rs256).unwrap().len(),
            1
        );
        assert_eq!(
            jwks.candidates("old-2024", Algorithm::Ps512).unwrap().len(),
            1
        );
        assert!(matches!(
            jwks.candidates("old-2024", Algorithm::Es256),
            Err(Miss::Unfit(m)) if m.contains("an RSA key")
        ));
    }

    #[test]
    fn a_keys_own_alg_binds_it() {
        let jwks = Jwks::parse(&set(&[public_jwk(RSA_OLD)])).unwrap();
        assert!(jwks.candidates("old-2024", Algorithm::Rs256).is_ok());
        assert!(matches!(
            jwks.candidates("old-2024", Algorithm::Ps256),
            Err(Miss::Unfit(m)) if m.contains("RS256 key")
        ));
        assert_eq!(
            jwks.candidates("other", Algorithm::Rs256),
            Err(Miss::Unknown)
        );
    }

    #[test]
    fn skips_what_must_not_be_used_and_says_why() {
        let with = |base: &str, f: &dyn Fn(&mut Map<String, Value>)| {
            let mut k = public_jwk(base);
            f(k.as_object_mut().unwrap());
            k
        };
        let cases: Vec<(Value, &str)> = vec![
            (
                with(RSA_OLD, &|k| {
                    k.insert("use".into(), "enc".into());
                }),
                "use is \"enc\"",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("key_ops".into(), serde_json::json!(["encrypt"]));
                }),
                "key_ops",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.remove("kid");
                }),
                "no kid",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("kid".into(), "k".repeat(257).into());
                }),
                "kid is empty or longer",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("alg".into(), "RSA-OAEP".into());
                }),
                "alg \"RSA-OAEP\"",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("alg".into(), "ES256".into());
                }),
                "does not fit kty",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("e".into(), "AQAA".into());
                }),
                "exponent",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("e".into(), "Ag".into());
                }),
                "exponent",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("e".into(), "AQAAAAE".into());
                }),
                "exponent",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("n".into(), "!!".into());
                }),
                "n is not base64url",
            ),
            (
                with(RSA_OLD, &|k| {
                    k.insert("d".into(), "AQAB".into());
                }),
                "private key material",
            ),
            (public_jwk(RSA_WEAK), "1024 bits"),
            (
                with(RSA_OLD, &|k| {
                    k.insert(
                        "n".into(),
                        URL_SAFE_NO_PAD.encode(vec![0xffu8; 1025]).into(),
                    );
                }),
                "8200 bits",
            ),
            (
                with(EC, &|k| {
                    k.insert("crv".into(), "P-384".into());
                }),
                "curve \"P-384\"",
            ),
            (
                with(EC, &|k| {
                    k.insert("y".into(), k["x"].clone());
                }),
                "not a point",
            ),
            (
                with(EC, &|k| {
                    k.insert("x".into(), "AQAB".into());
                }),
                "x is not 32 bytes",
            ),
            (
                serde_json::json!({"kty":"oct","kid":"h","k":"c2VjcmV0"}),
                "symmetric",
            ),
            (
                serde_json::json!({"kty":"OKP","kid":"ed","crv":"Ed25519","x":"AA"}),
                "kty \"OKP\"",
            ),
            (serde_json::json!({"kid":"x"}), "no kty"),
            (serde_json::json!("a string"), "not a JSON object"),
        ];
        for (key, why) in cases {
            let jwks = Jwks::parse(&set(&[key.clone(), public_jwk(EC)])).unwrap();
            assert_eq!(jwks.kids(), ["ec-1"], "{key}");
            let skipped = &jwks.skipped()[0];
            assert_eq!(skipped.index, 0);
            assert!(
                skipped.reason.contains(why),
                "{key}: {} should say {why}",
                skipped.reason
            );
        }
    }

    #[test]
    fn a_skipped_keys_kid_is_named_as_unusable_not_unknown() {
        let jwks = Jwks::parse(&set(&[public_jwk(RSA_WEAK)])).unwrap();
        assert!(matches!(
            jwks.candidates("weak", Algorithm::Rs256),
            Err(Miss::Unfit(m)) if m.contains("1024 bits")
        ));
    }

    #[test]
    fn the_document_is_bounded() {
        assert_eq!(Jwks::parse(b"not json"), Err(JwksError::NotAKeySet));
        assert_eq!(Jwks::parse(b"[]"), Err(JwksError::NotAKeySet));
        assert_eq!(Jwks::parse(br#"{"keys":{}}"#), Err(JwksError::NotAKeySet));
        let many: Vec<Value> = (0..=MAX_KEYS).map(|_| public_jwk(EC)).collect();
        assert_eq!(
            Jwks::parse(&set(&many)),
            Err(JwksError::TooManyKeys(MAX_KEYS + 1))
        );
        let big = format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(MAX_JWKS_BYTES));
        assert_eq!(Jwks::parse(big.as_bytes()), Err(JwksError::TooLarge));
        assert!(Jwks::parse(br#"{"keys":[]}"#).unwrap().keys().is_empty());
    }
}
