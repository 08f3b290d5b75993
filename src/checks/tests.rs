//! Tests of the checks, with tokens signed here by the fixed test keys in `tests/fixtures/`
//! (generated for these tests only; they sign nothing else).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use rsa::{Pkcs1v15Sign, Pss};
use serde_json::{json, Value};
use sha2::{Digest, Sha256, Sha384, Sha512};

use super::*;

pub(crate) const RSA_OLD: &str = include_str!("../../tests/fixtures/rsa-2048-old.private.jwk.json");
pub(crate) const RSA_NEW: &str = include_str!("../../tests/fixtures/rsa-2048-new.private.jwk.json");
pub(crate) const RSA_WEAK: &str = include_str!("../../tests/fixtures/rsa-1024.private.jwk.json");
pub(crate) const EC: &str = include_str!("../../tests/fixtures/ec-p256.private.jwk.json");

pub(crate) const NOW: u64 = 1_716_235_500;
pub(crate) const ISS: &str =
    "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c";
pub(crate) const AUD: &str = "https://api.openai.com/v1";
const SUB: &str = "system:serviceaccount:istio-system:gateway";

/// The public half of a test key, as an issuer publishes it.
pub(crate) fn public_jwk(private: &str) -> Value {
    let mut k: Value = serde_json::from_str(private).unwrap();
    for m in ["d", "p", "q", "dp", "dq", "qi"] {
        k.as_object_mut().unwrap().remove(m);
    }
    k
}

pub(crate) fn jwks_of(private: &[&str]) -> Jwks {
    let keys: Vec<Value> = private.iter().map(|k| public_jwk(k)).collect();
    Jwks::parse(&serde_json::to_vec(&json!({ "keys": keys })).unwrap()).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn field(key: &Value, name: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(key[name].as_str().unwrap()).unwrap()
}

/// A deterministic generator for the PSS salt: tests must not depend on the host's randomness.
struct Counter(u8);

impl rsa::rand_core::RngCore for Counter {
    fn next_u32(&mut self) -> u32 {
        rsa::rand_core::impls::next_u32_via_fill(self)
    }
    fn next_u64(&mut self) -> u64 {
        rsa::rand_core::impls::next_u64_via_fill(self)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rsa::rand_core::CryptoRng for Counter {}

/// The signature of `signed` by the private test key, with the header's `alg`.
fn signature(private: &str, alg: &str, signed: &[u8]) -> Vec<u8> {
    let key: Value = serde_json::from_str(private).unwrap();
    if key["kty"] == "EC" {
        assert_eq!(alg, "ES256");
        let sk = p256::ecdsa::SigningKey::from_slice(&field(&key, "d")).unwrap();
        let sig: p256::ecdsa::Signature = sk.sign(signed);
        return sig.to_bytes().to_vec();
    }
    let big = |n: &str| rsa::BigUint::from_bytes_be(&field(&key, n));
    let sk =
        rsa::RsaPrivateKey::from_components(big("n"), big("e"), big("d"), vec![big("p"), big("q")])
            .unwrap();
    let mut rng = Counter(0);
    match alg {
        "RS256" => sk.sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(signed)),
        "RS384" => sk.sign(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(signed)),
        "RS512" => sk.sign(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(signed)),
        "PS256" => sk.sign_with_rng(&mut rng, Pss::new::<Sha256>(), &Sha256::digest(signed)),
        "PS384" => sk.sign_with_rng(&mut rng, Pss::new::<Sha384>(), &Sha384::digest(signed)),
        other => panic!("no test signer for {other}"),
    }
    .unwrap()
}

/// A compact JWS of `header` and `claims` signed by the private test key.
pub(crate) fn sign(private: &str, header: &Value, claims: &Value) -> String {
    let signed = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = signature(private, header["alg"].as_str().unwrap(), signed.as_bytes());
    format!("{signed}.{}", b64(&sig))
}

/// A token with any signature bytes.
fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

fn header(private: &str, alg: &str) -> Value {
    let kid = serde_json::from_str::<Value>(private).unwrap()["kid"].clone();
    json!({"alg": alg, "kid": kid, "typ": "JWT"})
}

pub(crate) fn claims() -> Value {
    json!({"iss": ISS, "aud": [AUD], "sub": SUB, "iat": NOW - 60, "exp": NOW + 3540,
           "kubernetes.io": {"namespace": "istio-system"}})
}

fn with(mut v: Value, changes: Value) -> Value {
    for (k, c) in changes.as_object().unwrap() {
        if c.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = c.clone();
        }
    }
    v
}

fn good() -> String {
    sign(RSA_OLD, &header(RSA_OLD, "RS256"), &claims())
}

/// Every expectation, with the JWKS inline.
fn expect(keys: &[&str]) -> Expect {
    let keys: Vec<Value> = keys.iter().map(|k| public_jwk(k)).collect();
    expect_from(json!({
        "issuer": ISS, "audiences": [AUD], "leeway_s": 30,
        "claims": {"sub": "system:serviceaccount:istio-system:*"},
        "jwks": {"keys": keys}
    }))
}

fn expect_from(v: Value) -> Expect {
    Expect::from_raw(serde_json::from_value(v).unwrap()).unwrap()
}

fn refused(token: &str, expect: &Expect) -> Refusal {
    check(token, expect, None, NOW).expect_err("should be refused")
}

/// Asserts the first failing check and a fragment of its message.
#[track_caller]
fn assert_refused(token: &str, expect: &Expect, check: Check, fragment: &str) -> Refusal {
    let r = refused(token, expect);
    assert_eq!(r.check, check, "{r}");
    assert!(r.message.contains(fragment), "{r} should say {fragment:?}");
    assert!(
        token.len() < 8 || !r.message.contains(token),
        "the token leaked: {r}"
    );
    if let Some(sig) = token.rsplit('.').next().filter(|s| s.len() > 8) {
        assert!(!r.message.contains(sig), "the signature leaked: {r}");
    }
    r
}

#[test]
fn check_names_are_stable() {
    let names: Vec<&str> = Check::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "well_formed",
            "algorithm",
            "key_id",
            "known_key",
            "signature",
            "required_claims",
            "issuer",
            "audience",
            "expiry",
            "not_before",
            "issued_at",
            "claim"
        ]
    );
}

#[test]
fn a_good_token_passes_every_check() {
    let v = check(&good(), &expect(&[RSA_OLD]), None, NOW).unwrap();
    assert_eq!(
        v,
        Verified {
            alg: Algorithm::Rs256,
            kid: "old-2024".into(),
            exp_s: NOW + 3540,
            signature_checked: true
        }
    );
    let report = report(&good(), &expect(&[RSA_OLD]), None, NOW);
    let checks: Vec<Check> = report.iter().map(|(c, _)| *c).collect();
    assert_eq!(checks, Check::ALL);
    for (c, o) in &report {
        let want = if *c == Check::NotBefore {
            Outcome::Skip("the token has no nbf".into())
        } else {
            Outcome::Pass
        };
        assert_eq!(o, &want, "{}", c.name());
    }
}

#[test]
fn every_algorithm_verifies_and_a_changed_payload_does_not() {
    let jwks_no_alg = {
        let mut k = public_jwk(RSA_OLD);
        k.as_object_mut().unwrap().remove("alg");
        Jwks::parse(&serde_json::to_vec(&json!({ "keys": [k, public_jwk(EC)] })).unwrap()).unwrap()
    };
    let e = Expect::default();
    for (key, alg) in [
        (RSA_OLD, "RS256"),
        (RSA_OLD, "RS384"),
        (RSA_OLD, "RS512"),
        (RSA_OLD, "PS256"),
        (RSA_OLD, "PS384"),
        (EC, "ES256"),
    ] {
        let token = sign(key, &header(key, alg), &claims());
        let v = check(&token, &e, Some(&jwks_no_alg), NOW).unwrap_or_else(|r| panic!("{alg}: {r}"));
        assert_eq!(v.alg.name(), alg);
        assert!(v.signature_checked);
        // The same signature over other claims: a verify that always says yes fails here.
        let (h, _, s) = {
            let mut p = token.split('.');
            (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
        };
        let other = b64(with(claims(), json!({"sub": "system:serviceaccount:x:y"}))
            .to_string()
            .as_bytes());
        let tampered = format!("{h}.{other}.{s}");
        assert_refused(
            &tampered,
            &e_with(&jwks_no_alg),
            Check::Signature,
            "does not verify",
        );
        assert!(
            check(&tampered, &e, Some(&jwks_no_alg), NOW).is_err(),
            "{alg}"
        );
    }
}

fn e_with(jwks: &Jwks) -> Expect {
    Expect {
        keys: Keys::Inline(jwks.clone()),
        ..Expect::default()
    }
}

#[test]
fn signatures_of_the_wrong_shape_do_not_verify() {
    let e = expect(&[RSA_OLD, EC]);
    let h = header(EC, "ES256");
    let token = sign(EC, &h, &claims());
    let sig = URL_SAFE_NO_PAD
        .decode(token.rsplit('.').next().unwrap())
        .unwrap();
    let der = p256::ecdsa::Signature::from_slice(&sig).unwrap().to_der();
    assert_refused(
        &forge(&h, &claims(), der.as_bytes()),
        &e,
        Check::Signature,
        "ES256",
    );
    let mut long = sig.clone();
    long.push(0);
    assert_refused(&forge(&h, &claims(), &long), &e, Check::Signature, "ES256");
    let rsa = good();
    let rsa_sig = URL_SAFE_NO_PAD
        .decode(rsa.rsplit('.').next().unwrap())
        .unwrap();
    let h = header(RSA_OLD, "RS256");
    assert_refused(
        &forge(&h, &claims(), &rsa_sig[1..]),
        &e,
        Check::Signature,
        "RS256",
    );
    assert_refused(&forge(&h, &claims(), b"x"), &e, Check::Signature, "RS256");
}

#[test]
fn rfc8725_alg_none_is_refused() {
    let e = expect(&[RSA_OLD]);
    let h = json!({"alg": "none", "kid": "old-2024"});
    // The usual form has an empty signature, which is not a signed JWT at all.
    let unsigned = format!(
        "{}.{}.",
        b64(h.to_string().as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    assert_refused(&unsigned, &e, Check::WellFormed, "no signature");
    for none in ["none", "None", "NONE"] {
        let h = json!({"alg": none, "kid": "old-2024"});
        assert_refused(
            &forge(&h, &claims(), b"sig"),
            &e,
            Check::Algorithm,
            "never accepted",
        );
        assert_refused(
            &forge(&h, &claims(), b"sig"),
            &Expect::default(),
            Check::Algorithm,
            "unsigned",
        );
    }
}

/// HMAC-SHA256 (RFC 2104), to forge what an attacker would.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

#[test]
fn rfc8725_hs256_with_the_rsa_public_key_as_secret_is_refused() {
    let public = public_jwk(RSA_OLD);
    let h = json!({"alg": "HS256", "kid": "old-2024", "typ": "JWT"});
    let signed = format!(
        "{}.{}",
        b64(h.to_string().as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    for secret in [public.to_string().into_bytes(), field(&public, "n")] {
        let token = format!("{signed}.{}", b64(&hmac_sha256(&secret, signed.as_bytes())));
        let r = assert_refused(&token, &expect(&[RSA_OLD]), Check::Algorithm, "HMAC");
        assert!(r.message.contains("RFC 8725"), "{r}");
        assert_refused(&token, &Expect::default(), Check::Algorithm, "HMAC");
    }
    for alg in ["HS384", "HS512"] {
        let h = json!({"alg": alg, "kid": "old-2024"});
        assert_refused(
            &forge(&h, &claims(), b"mac"),
            &Expect::default(),
            Check::Algorithm,
            "HMAC",
        );
    }
}

#[test]
fn algorithms_outside_the_configuration_are_refused() {
    let e = Expect {
        algorithms: vec![Algorithm::Rs256],
        ..expect(&[EC])
    };
    let token = sign(EC, &header(EC, "ES256"), &claims());
    assert_refused(
        &token,
        &e,
        Check::Algorithm,
        "alg is ES256, the configuration allows RS256",
    );
    let cases = [
        (json!({"kid": "k"}), "no alg"),
        (json!({"alg": 256, "kid": "k"}), "not a string"),
        (json!({"alg": "ES384", "kid": "k"}), "not supported"),
        (json!({"alg": "rs256", "kid": "k"}), "not supported"),
    ];
    for (h, why) in cases {
        assert_refused(
            &forge(&h, &claims(), b"sig"),
            &Expect::default(),
            Check::Algorithm,
            why,
        );
    }
}

#[test]
fn rfc8725_typ_of_another_kind_is_refused() {
    let e = expect(&[RSA_OLD]);
    for typ in [
        "JWT",
        "jwt",
        "application/jwt",
        "at+jwt",
        "application/at+JWT",
        "JOSE",
    ] {
        let h = with(header(RSA_OLD, "RS256"), json!({ "typ": typ }));
        check(&sign(RSA_OLD, &h, &claims()), &e, None, NOW)
            .unwrap_or_else(|r| panic!("{typ}: {r}"));
    }
    let h = with(header(RSA_OLD, "RS256"), json!({"typ": null}));
    check(&sign(RSA_OLD, &h, &claims()), &e, None, NOW).unwrap();
    for typ in [
        "JWE",
        "secevent+jwt",
        "dpop+jwt",
        "JOSE+JSON",
        "application/json",
        "",
    ] {
        let h = with(header(RSA_OLD, "RS256"), json!({ "typ": typ }));
        assert_refused(&sign(RSA_OLD, &h, &claims()), &e, Check::WellFormed, "typ");
    }
    let cases = [
        (json!({"typ": 1}), "typ is not a string"),
        (json!({"cty": "JWT"}), "cty"),
        (json!({"crit": ["exp"], "exp": 1}), "crit"),
    ];
    for (change, why) in cases {
        let h = with(header(RSA_OLD, "RS256"), change);
        assert_refused(&sign(RSA_OLD, &h, &claims()), &e, Check::WellFormed, why);
    }
}

#[test]
fn what_is_not_a_jwt_fails_well_formed_and_nothing_else_runs() {
    let good = good();
    let p: Vec<&str> = good.split('.').collect();
    let cases = [
        (String::new(), "empty"),
        ("abc".into(), "1 dot-separated"),
        (format!("{}.{}", p[0], p[1]), "2 dot-separated"),
        (format!("{good}.a.b"), "encrypted JWE"),
        (format!("{}..{}", p[0], p[2]), "empty"),
        (format!("!!.{}.{}", p[1], p[2]), "header is not base64url"),
        (
            format!("{}=.{}.{}", p[0], p[1], p[2]),
            "header is not base64url",
        ),
        (
            format!("{}.{}.{}", b64(b"[1]"), p[1], p[2]),
            "header is not a JSON object",
        ),
        (
            format!("{}.{}.{}", p[0], b64(b"not json"), p[2]),
            "payload is not a JSON object",
        ),
        (
            format!("{}.{}.{}", p[0], b64(b"\"s\""), p[2]),
            "payload is not a JSON object",
        ),
        (format!("{}.{}.*", p[0], p[1]), "signature is not base64url"),
        ("a".repeat(crate::jwt::MAX_TOKEN_BYTES + 1), "larger than"),
    ];
    for (token, why) in cases {
        assert_refused(&token, &expect(&[RSA_OLD]), Check::WellFormed, why);
        let report = report(&token, &expect(&[RSA_OLD]), None, NOW);
        assert!(matches!(report[0], (Check::WellFormed, Outcome::Fail(_))));
        assert_eq!(report.len(), Check::ALL.len());
        assert!(report[1..]
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Skip(_))));
    }
    // Surrounding whitespace (a file's newline) is not part of the token.
    check(&format!("  {good}\n"), &expect(&[RSA_OLD]), None, NOW).unwrap();
}

#[test]
fn kid_is_required_and_bounded() {
    let e = expect(&[RSA_OLD]);
    let cases = [
        (json!({"kid": null}), "OpenAI requires"),
        (json!({"kid": 7}), "not a string"),
        (json!({"kid": ""}), "empty"),
        (json!({"kid": "k".repeat(257)}), "longer than 256"),
        (json!({"kid": "old-2024\n"}), "control"),
    ];
    for (change, why) in cases {
        let h = with(header(RSA_OLD, "RS256"), change);
        let r = assert_refused(&sign(RSA_OLD, &h, &claims()), &e, Check::KeyId, why);
        assert!(!r.is_unknown_key());
    }
    // Without a JWKS the kid is still required: OpenAI refuses a token without one.
    let h = with(header(RSA_OLD, "RS256"), json!({"kid": null}));
    assert_refused(
        &sign(RSA_OLD, &h, &claims()),
        &Expect::default(),
        Check::KeyId,
        "OpenAI requires",
    );
}

#[test]
fn rfc8725_kid_injection_only_fails_to_match() {
    let e = expect(&[RSA_OLD]);
    for kid in [
        "../../../../../../dev/null",
        "' OR '1'='1' --",
        "http://evil.example/jwks.json",
        "old-2024' UNION SELECT 'secret",
        "*",
        "old-2024\u{0}",
    ] {
        let h = with(header(RSA_OLD, "RS256"), json!({ "kid": kid }));
        let token = sign(RSA_OLD, &h, &claims());
        let r = refused(&token, &e);
        assert!(
            matches!(r.check, Check::KnownKey | Check::KeyId),
            "{kid}: {r}"
        );
        if r.check == Check::KnownKey {
            assert!(r.is_unknown_key(), "{r}");
            assert!(r.message.contains("kids: [\"old-2024\"]"), "{r}");
        }
    }
    // Keys named by the token itself (jwk, jku, x5u) are never used: the attacker's key, with
    // a kid of the JWKS, does not verify.
    let attacker = public_jwk(RSA_NEW);
    let h = json!({"alg": "RS256", "kid": "old-2024", "jwk": attacker,
                   "jku": "https://evil.example/jwks", "x5u": "https://evil.example/cert"});
    let token = sign(RSA_NEW, &h, &claims());
    assert_refused(
        &token,
        &e,
        Check::Signature,
        "does not verify with the issuer's key \"old-2024\"",
    );
}

#[test]
fn with_several_keys_the_kid_selects() {
    let e = expect(&[RSA_OLD, RSA_NEW, EC]);
    for (key, alg) in [(RSA_OLD, "RS256"), (RSA_NEW, "RS256"), (EC, "ES256")] {
        let v = check(&sign(key, &header(key, alg), &claims()), &e, None, NOW).unwrap();
        assert!(v.signature_checked);
    }
    // Signed by one key, labelled with another's kid.
    let h = header(RSA_OLD, "RS256");
    assert_refused(
        &sign(RSA_NEW, &h, &claims()),
        &e,
        Check::Signature,
        "\"old-2024\"",
    );
    // A kid of the JWKS whose key is of another kind.
    let h = with(header(EC, "ES256"), json!({"kid": "old-2024"}));
    let r = assert_refused(&sign(EC, &h, &claims()), &e, Check::KnownKey, "RS256 key");
    assert!(!r.is_unknown_key());
}

#[test]
fn key_rotation() {
    let old = good();
    let new = sign(RSA_NEW, &header(RSA_NEW, "RS256"), &claims());
    let both = expect(&[RSA_OLD, RSA_NEW]);
    check(&old, &both, None, NOW).unwrap();
    check(&new, &both, None, NOW).unwrap();
    let after = expect(&[RSA_NEW]);
    check(&new, &after, None, NOW).unwrap();
    let r = assert_refused(
        &old,
        &after,
        Check::KnownKey,
        "\"old-2024\" is not in the issuer's JWKS",
    );
    assert!(r.is_unknown_key());
    assert_eq!(r.failure().code, crate::reply::Code::InvalidSubjectToken);
    // A fetched JWKS passed by the caller replaces the configured one.
    check(&old, &after, Some(&jwks_of(&[RSA_OLD])), NOW).unwrap();
}

#[test]
fn a_jwks_alg_that_disagrees_with_the_tokens_is_not_used() {
    let ps = sign(RSA_OLD, &header(RSA_OLD, "PS256"), &claims());
    let r = assert_refused(
        &ps,
        &expect(&[RSA_OLD]),
        Check::KnownKey,
        "does not verify PS256",
    );
    assert!(!r.is_unknown_key());
    let weak = sign(RSA_WEAK, &header(RSA_WEAK, "RS256"), &claims());
    let jwks = Jwks::parse(
        &serde_json::to_vec(&json!({"keys": [public_jwk(RSA_WEAK), public_jwk(RSA_OLD)]})).unwrap(),
    )
    .unwrap();
    let r = refused(&weak, &e_with(&jwks));
    assert_eq!(r.check, Check::KnownKey);
    assert!(r.message.contains("1024 bits"), "{r}");
}

#[test]
fn without_a_jwks_the_signature_is_skipped_never_passed() {
    let e = Expect::default();
    let forged = forge(&header(RSA_OLD, "RS256"), &claims(), b"not a signature");
    let v = check(&forged, &e, None, NOW).unwrap();
    assert!(!v.signature_checked);
    let report = report(&forged, &e, None, NOW);
    for (c, o) in &report {
        if matches!(c, Check::KnownKey | Check::Signature) {
            assert!(
                matches!(o, Outcome::Skip(w) if w.contains("no JWKS configured")),
                "{o:?}"
            );
        }
    }
    // The offline checker's --jwks-file catches it.
    let r = check(&forged, &e, Some(&jwks_of(&[RSA_OLD])), NOW).unwrap_err();
    assert_eq!(r.check, Check::Signature);
}

#[test]
fn a_jwks_source_not_fetched_yet_is_not_the_tokens_fault() {
    let e = expect_from(json!({"issuer": ISS, "jwks_source": {
        "cluster": "kube_api", "authority": "kubernetes.default.svc", "path": "/openid/v1/jwks"}}));
    let r = refused(&good(), &e);
    assert_eq!(
        (r.check, r.kind),
        (Check::KnownKey, RefusalKind::KeysUnavailable)
    );
    assert!(r.message.contains("kube_api"));
    assert_eq!(r.failure().code.status(), 503);
    check(&good(), &e, Some(&jwks_of(&[RSA_OLD])), NOW).unwrap();
    let report = report(&good(), &e, None, NOW);
    assert!(report.iter().all(|(_, o)| !matches!(o, Outcome::Fail(_))));
    assert!(matches!(&report[3].1, Outcome::Skip(w) if w.contains("/openid/v1/jwks")));
}

#[test]
fn required_claims_are_present_and_typed() {
    let e = expect(&[RSA_OLD]);
    let cases = [
        (json!({"iss": null}), "missing iss"),
        (json!({"aud": null}), "missing aud"),
        (json!({"sub": null}), "missing sub"),
        (json!({"exp": null}), "missing exp"),
        (json!({"iat": null}), "missing iat"),
        (json!({"iss": 5}), "iss is 5, not a non-empty string"),
        (json!({"sub": ""}), "sub is \"\", not a non-empty string"),
        (json!({"aud": 5}), "aud is 5"),
        (json!({"aud": []}), "aud is []"),
        (
            json!({"aud": [AUD, 1]}),
            "not a string or a list of strings",
        ),
        (json!({"aud": [""]}), "not a string or a list of strings"),
        (
            json!({"exp": "tomorrow"}),
            "exp is \"tomorrow\", not a NumericDate",
        ),
        (json!({"exp": -1}), "exp is -1"),
        (json!({"iat": true}), "iat is true"),
        (json!({"nbf": "now"}), "nbf is \"now\""),
    ];
    for (change, why) in cases {
        let token = sign(RSA_OLD, &header(RSA_OLD, "RS256"), &with(claims(), change));
        assert_refused(&token, &e, Check::RequiredClaims, why);
    }
    let none = json!({"iss": null, "aud": null, "sub": null, "exp": null, "iat": null});
    let token = sign(RSA_OLD, &header(RSA_OLD, "RS256"), &with(claims(), none));
    assert_refused(
        &token,
        &e,
        Check::RequiredClaims,
        "missing iss, sub, aud, exp, iat",
    );
    // A fractional NumericDate is a NumericDate (RFC 7519 §2).
    let token = sign(
        RSA_OLD,
        &header(RSA_OLD, "RS256"),
        &with(claims(), json!({"exp": (NOW + 10) as f64 + 0.5})),
    );
    assert_eq!(check(&token, &e, None, NOW).unwrap().exp_s, NOW + 10);
}

#[test]
fn issuer_is_compared_exactly() {
    let e = expect(&[RSA_OLD]);
    let token = sign(
        RSA_OLD,
        &header(RSA_OLD, "RS256"),
        &with(claims(), json!({"iss": "https://kubernetes.default.svc"})),
    );
    let r = assert_refused(&token, &e, Check::Issuer, "");
    assert_eq!(
        r.message,
        format!("subject token iss is \"https://kubernetes.default.svc\", the provider expects \"{ISS}\"")
    );
    assert_eq!(
        r.to_string(),
        format!("subject token failed the issuer check: {}", r.message)
    );
    assert_eq!(r.failure().code, crate::reply::Code::InvalidSubjectToken);
    for near in [format!("{ISS}/"), ISS.to_uppercase(), format!(" {ISS}")] {
        let token = sign(
            RSA_OLD,
            &header(RSA_OLD, "RS256"),
            &with(claims(), json!({ "iss": near })),
        );
        assert_refused(&token, &e, Check::Issuer, "the provider expects");
    }
}

#[test]
fn audience_must_contain_an_expected_one() {
    let e = expect(&[RSA_OLD]);
    for aud in [json!(AUD), json!(["other", AUD]), json!([AUD])] {
        let token = sign(
            RSA_OLD,
            &header(RSA_OLD, "RS256"),
            &with(claims(), json!({ "aud": aud })),
        );
        check(&token, &e, None, NOW).unwrap();
    }
    let token = sign(
        RSA_OLD,
        &header(RSA_OLD, "RS256"),
        &with(
            claims(),
            json!({"aud": ["https://kubernetes.default.svc", "x"]}),
        ),
    );
    let r = assert_refused(&token, &e, Check::Audience, "");
    assert_eq!(
        r.message,
        format!("subject token aud is [\"https://kubernetes.default.svc\", \"x\"], the provider expects one of [\"{AUD}\"]")
    );
}

#[test]
fn expiry_not_before_and_issued_at_with_leeway() {
    let e = expect(&[RSA_OLD]);
    let at = |changes: Value| sign(RSA_OLD, &header(RSA_OLD, "RS256"), &with(claims(), changes));
    check(&at(json!({"exp": NOW + 1})), &e, None, NOW).unwrap();
    let r = assert_refused(
        &at(json!({"exp": NOW})),
        &e,
        Check::Expiry,
        "expired 0 s ago",
    );
    assert_eq!(r.failure().code, crate::reply::Code::SubjectTokenExpired);
    assert_refused(
        &at(json!({"exp": NOW - 10})),
        &e,
        Check::Expiry,
        &format!("expired 10 s ago (exp {}, now {NOW})", NOW - 10),
    );
    check(
        &at(json!({"nbf": NOW + 30, "iat": NOW + 30})),
        &e,
        None,
        NOW,
    )
    .unwrap();
    assert_refused(
        &at(json!({"nbf": NOW + 31})),
        &e,
        Check::NotBefore,
        "nbf is 31 s in the future, beyond the leeway of 30 s",
    );
    assert_refused(
        &at(json!({"iat": NOW + 31})),
        &e,
        Check::IssuedAt,
        "iat is 31 s in the future",
    );
    let strict = Expect { leeway_s: 0, ..e };
    assert_refused(
        &at(json!({"iat": NOW + 1})),
        &strict,
        Check::IssuedAt,
        "leeway of 0 s",
    );
    check(&at(json!({"iat": NOW, "nbf": NOW})), &strict, None, NOW).unwrap();
}

#[test]
fn claim_patterns_follow_the_mapping_rule() {
    let e =
        |pattern: &str| expect_from(json!({"claims": {"sub": pattern, "email_verified": "true"}}));
    let token = |sub: Value| {
        sign(
            RSA_OLD,
            &header(RSA_OLD, "RS256"),
            &with(claims(), json!({"sub": sub, "email_verified": true})),
        )
    };
    let ok = [
        ("system:serviceaccount:istio-system:*", json!(SUB)),
        (SUB, json!(SUB)),
        ("system:serviceaccount:istio-system:gateway*", json!(SUB)),
    ];
    for (pattern, sub) in ok {
        check(&token(sub), &e(pattern), None, NOW).unwrap_or_else(|r| panic!("{pattern}: {r}"));
    }
    let r = assert_refused(
        &token(json!("system:serviceaccount:default:app")),
        &e("system:serviceaccount:istio-system:*"),
        Check::Claim,
        "",
    );
    assert_eq!(
        r.message,
        "subject token sub is \"system:serviceaccount:default:app\", the configuration expects \"system:serviceaccount:istio-system:*\""
    );
    // sub must be a string for required_claims; other claims may be anything.
    let list = expect_from(
        json!({"claims": {"groups": "team-a*", "n": "42", "aud": "https://api.openai.com/*"}}),
    );
    let t = |groups: Value, n: Value| {
        sign(
            RSA_OLD,
            &header(RSA_OLD, "RS256"),
            &with(claims(), json!({"groups": groups, "n": n})),
        )
    };
    check(
        &t(json!(["x", "team-a-admins"]), json!(42)),
        &list,
        None,
        NOW,
    )
    .unwrap();
    check(&t(json!("team-a"), json!("42")), &list, None, NOW).unwrap();
    check(
        &t(json!(["x", "team-a"]), json!([41, 42])),
        &list,
        None,
        NOW,
    )
    .unwrap();
    assert_refused(
        &t(json!(["x", "team-b"]), json!(42)),
        &list,
        Check::Claim,
        "groups is [\"x\", \"team-b\"]",
    );
    assert_refused(
        &t(json!({"team-a": 1}), json!(42)),
        &list,
        Check::Claim,
        "groups is an object",
    );
    assert_refused(
        &t(json!([["team-a"]]), json!(42)),
        &list,
        Check::Claim,
        "groups is [\"a list\"]",
    );
    assert_refused(
        &t(json!("team-a"), json!(42.5)),
        &list,
        Check::Claim,
        "n is 42.5",
    );
    let token = sign(RSA_OLD, &header(RSA_OLD, "RS256"), &claims());
    assert_refused(
        &token,
        &list,
        Check::Claim,
        "has no groups claim, the configuration expects \"team-a*\"",
    );
    // One line per pattern in the report.
    let report = report(&t(json!("team-b"), json!(42)), &list, None, NOW);
    let claim_lines: Vec<&Outcome> = report
        .iter()
        .filter(|(c, _)| *c == Check::Claim)
        .map(|(_, o)| o)
        .collect();
    assert_eq!(claim_lines.len(), 3);
    assert_eq!(
        claim_lines
            .iter()
            .filter(|o| matches!(o, Outcome::Fail(_)))
            .count(),
        1
    );
}

#[test]
fn checks_run_in_the_documented_order() {
    let e = expect(&[RSA_OLD]);
    let all_wrong = with(
        claims(),
        json!({"iss": "x", "aud": "y", "exp": NOW - 1, "iat": NOW + 100, "sub": "z"}),
    );
    let token = sign(RSA_OLD, &header(RSA_OLD, "RS256"), &all_wrong);
    assert_refused(&token, &e, Check::Issuer, "");
    let failed: Vec<Check> = report(&token, &e, None, NOW)
        .into_iter()
        .filter(|(_, o)| matches!(o, Outcome::Fail(_)))
        .map(|(c, _)| c)
        .collect();
    assert_eq!(
        failed,
        [
            Check::Issuer,
            Check::Audience,
            Check::Expiry,
            Check::IssuedAt,
            Check::Claim
        ]
    );
    // A bad signature is named before any claim.
    let forged = forge(&header(RSA_OLD, "RS256"), &all_wrong, b"x");
    assert_refused(&forged, &e, Check::Signature, "");
    // An unknown kid before the signature, HMAC before the kid.
    let h = json!({"alg": "HS256"});
    assert_refused(&forge(&h, &all_wrong, b"x"), &e, Check::Algorithm, "");
}

#[test]
fn claim_values_in_messages_are_escaped_and_truncated() {
    let e = expect(&[RSA_OLD]);
    let forged_line = "https://x\n2026-01-01 INFO openai-wif: exchange ok \u{202e}";
    let token = sign(
        RSA_OLD,
        &header(RSA_OLD, "RS256"),
        &with(claims(), json!({ "iss": forged_line })),
    );
    let r = assert_refused(&token, &e, Check::Issuer, "\\n2026-01-01");
    assert!(
        !r.message.contains('\n') && !r.message.contains('\u{202e}'),
        "{r}"
    );
    let long = format!("https://{}", "a".repeat(500));
    let token = sign(
        RSA_OLD,
        &header(RSA_OLD, "RS256"),
        &with(claims(), json!({ "iss": long })),
    );
    let r = assert_refused(&token, &e, Check::Issuer, "…\"");
    assert!(r.message.len() < 300, "{}", r.message.len());
    // A token pasted into a claim is withheld.
    let inner = good();
    let token = sign(
        RSA_OLD,
        &header(RSA_OLD, "RS256"),
        &with(claims(), json!({ "iss": inner })),
    );
    let r = assert_refused(&token, &e, Check::Issuer, "withheld");
    assert!(!r.message.contains(&inner[..20]));
}
