//! RSA signature verification: RSASSA-PKCS1-v1_5 (RFC 8017 §8.2.2, EMSA-PKCS1-v1_5 of §9.2)
//! and RSASSA-PSS (RFC 8017 §8.1.2, EMSA-PSS-VERIFY of §9.1.2 with MGF1 of Appendix B.2.1),
//! with SHA-256, SHA-384 and SHA-512: the RS* and PS* algorithms of RFC 7518 §3.3 and §3.5.
//!
//! Why our own: a general big-number and RSA crate costs the module ~55 KB, and verifying
//! needs only `s^e mod n` with a small public exponent. What it does not do: no private-key
//! operation, no key generation, no encryption. It is not constant-time, and need not be: every
//! input (the key, the signature, the signed text) is public, and so is the verdict.
//!
//! The arithmetic: unsigned integers as little-endian `u32` limbs, Montgomery multiplication
//! (reduction interleaved limb by limb) with `u64` products, native in wasm32, so one verify of a 4096-bit key is about
//! twenty multiplications of 128 limbs by 128 limbs. Every slice is walked with iterators or
//! checked access: hostile keys and signatures cannot make it panic.
//!
//! What is refused, whatever the math would say:
//! - a signature that is not exactly `k` bytes, `k` the modulus length (RFC 7518 §3.3, §3.5);
//! - a signature representative `s >= n` (RSAVP1, RFC 8017 §5.2.2);
//! - PKCS #1 v1.5: any encoded message but the one built here, `00 01 FF..FF 00 || DigestInfo
//!   || H`, with the DigestInfo's NULL parameters (RFC 8017 §9.2, note 1); the padding is never
//!   parsed, the whole message is compared;
//! - PSS: a salt of any length but the hash's (RFC 7518 §3.5), or an MGF other than MGF1 with
//!   the same hash (the only one a JWS can mean).

use sha2::{Digest, Sha256, Sha384, Sha512};

/// Largest modulus accepted, in bits: bounds the work of one verify.
pub const MAX_BITS: usize = 16_384;

/// The hash of a signature algorithm (and of its MGF1, for PSS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn output_len(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// The hash of the concatenated `parts`.
    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        fn run<D: Digest>(parts: &[&[u8]]) -> Vec<u8> {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        }
        match self {
            Hash::Sha256 => run::<Sha256>(parts),
            Hash::Sha384 => run::<Sha384>(parts),
            Hash::Sha512 => run::<Sha512>(parts),
        }
    }

    /// The DER of `DigestInfo` up to the digest itself (RFC 8017 §9.2, note 1).
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }
}

/// Why a modulus and exponent are not a key to verify with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// The modulus is even, below 2^32, or over [`MAX_BITS`].
    Modulus,
    /// The exponent is even or below 3.
    Exponent,
}

/// An RSA public key, ready to verify with.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The modulus, little-endian limbs, the most significant one non-zero.
    n: Vec<u32>,
    /// Bits of the modulus.
    bits: usize,
    /// `k`: bytes of the modulus, and of every signature.
    len: usize,
    e: u32,
    /// `-n^-1 mod 2^32`.
    n0_inv: u32,
    /// `R^2 mod n`, `R = 2^(32 * limbs)`: multiplied by it, a number enters Montgomery form.
    r2: Vec<u32>,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RSA public key ({} bits, e = {})", self.bits, self.e)
    }
}

/// Bits of the big-endian unsigned integer `bytes` (leading zero bytes allowed).
pub fn bit_len(bytes: &[u8]) -> usize {
    let bytes = strip(bytes);
    match bytes.first() {
        None => 0,
        Some(&top) => bytes.len() * 8 - top.leading_zeros() as usize,
    }
}

fn strip(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|&&b| b == 0).count();
    bytes.get(zeros..).unwrap_or_default()
}

/// Little-endian limbs of the big-endian `bytes`, at least `limbs` of them.
fn limbs_of(bytes: &[u8], limbs: usize) -> Vec<u32> {
    let mut out: Vec<u32> = bytes
        .rchunks(4)
        .map(|c| c.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
        .collect();
    if out.len() < limbs {
        out.resize(limbs, 0);
    }
    out
}

/// `a >= b`, for limbs of equal length.
fn at_least(a: &[u32], b: &[u32]) -> bool {
    a.iter()
        .rev()
        .zip(b.iter().rev())
        .find(|(x, y)| x != y)
        .is_none_or(|(x, y)| x > y)
}

/// `a -= b`, for limbs of equal length; the borrow out is dropped (callers know `a >= b`, or
/// that the dropped top bit makes up for it).
fn sub_assign(a: &mut [u32], b: &[u32]) {
    let mut borrow = false;
    for (x, &y) in a.iter_mut().zip(b) {
        let (d, b1) = x.overflowing_sub(y);
        let (d, b2) = d.overflowing_sub(u32::from(borrow));
        *x = d;
        borrow = b1 || b2;
    }
}

impl PublicKey {
    /// The key of modulus `n` (big-endian, leading zero bytes allowed) and exponent `e`.
    pub fn new(n: &[u8], e: u32) -> Result<PublicKey, KeyError> {
        let n_bytes = strip(n);
        let bits = bit_len(n_bytes);
        let odd = n_bytes.last().is_some_and(|b| b & 1 == 1);
        if !odd || bits <= 32 || bits > MAX_BITS {
            return Err(KeyError::Modulus);
        }
        if e < 3 || e & 1 == 0 {
            return Err(KeyError::Exponent);
        }
        let n = limbs_of(n_bytes, 0);
        let n0 = n.first().copied().unwrap_or(1);
        // Newton's iteration: each step doubles the bits of n0^-1 that are right (3 to start).
        let mut inv = n0;
        for _ in 0..4 {
            inv = inv.wrapping_mul(2u32.wrapping_sub(n0.wrapping_mul(inv)));
        }
        let mut key = PublicKey {
            bits,
            len: n_bytes.len(),
            e,
            n0_inv: inv.wrapping_neg(),
            r2: Vec::new(),
            n,
        };
        key.r2 = key.r_squared();
        Ok(key)
    }

    /// Bits of the modulus.
    pub fn bits(&self) -> usize {
        self.bits
    }

    /// `k`: bytes of the modulus, the length of every signature.
    pub fn size(&self) -> usize {
        self.len
    }

    pub fn exponent(&self) -> u32 {
        self.e
    }

    /// `2x mod n`, for `x < n`.
    fn double(&self, x: &mut [u32]) {
        let mut carry = 0u32;
        for limb in x.iter_mut() {
            let next = *limb >> 31;
            *limb = (*limb << 1) | carry;
            carry = next;
        }
        if carry == 1 || at_least(x, &self.n) {
            sub_assign(x, &self.n);
        }
    }

    /// `R^2 mod n`: `R mod n` by doubling the top power of two below `n`, then `2R mod n` (2 in
    /// Montgomery form) raised to `log2 R` in Montgomery form, which is `R^2 mod n`.
    fn r_squared(&self) -> Vec<u32> {
        let limbs = self.n.len();
        let mut x = vec![0u32; limbs];
        let top = self.bits - 1;
        if let Some(limb) = x.get_mut(top / 32) {
            *limb = 1 << (top % 32);
        }
        for _ in top..=limbs * 32 {
            self.double(&mut x);
        }
        let exponent = u32::try_from(limbs * 32).unwrap_or(0);
        self.pow(&x, exponent)
    }

    /// `a * b * R^-1 mod n`, for `a, b < n` of the modulus' limb count: for each limb of `a`,
    /// add `a_i * b`, then the multiple of `n` that clears the lowest limb, and drop that limb.
    fn mont_mul(&self, a: &[u32], b: &[u32]) -> Vec<u32> {
        let limbs = self.n.len();
        // t < 2n throughout, held as `t` (limbs) plus `hi`, the bits above.
        let mut t = vec![0u32; limbs];
        let mut hi = 0u64;
        for &ai in a {
            // t += ai * b
            let mut carry = 0u64;
            for (tj, &bj) in t.iter_mut().zip(b) {
                let v = u64::from(*tj) + u64::from(ai) * u64::from(bj) + carry;
                *tj = v as u32;
                carry = v >> 32;
            }
            let top = hi + carry;
            // t += m * n with m making the lowest limb zero, then t /= 2^32.
            let m = t.first().copied().unwrap_or(0).wrapping_mul(self.n0_inv);
            let mut carry = 0u64;
            for (tj, &nj) in t.iter_mut().zip(&self.n) {
                let v = u64::from(*tj) + u64::from(m) * u64::from(nj) + carry;
                *tj = v as u32;
                carry = v >> 32;
            }
            let top = top + carry;
            t.rotate_left(1);
            if let Some(last) = t.last_mut() {
                *last = top as u32;
            }
            hi = top >> 32;
        }
        if hi != 0 || at_least(&t, &self.n) {
            sub_assign(&mut t, &self.n);
        }
        t
    }

    /// `x^e` in Montgomery form, for `x` in Montgomery form and `e >= 1`.
    fn pow(&self, x: &[u32], e: u32) -> Vec<u32> {
        let mut acc = x.to_vec();
        let top = 31u32.saturating_sub(e.leading_zeros());
        for bit in (0..top).rev() {
            acc = self.mont_mul(&acc, &acc);
            if (e >> bit) & 1 == 1 {
                acc = self.mont_mul(&acc, x);
            }
        }
        acc
    }

    /// RSAVP1 (RFC 8017 §5.2.2) and I2OSP to `k` bytes: the encoded message of `signature`,
    /// or `None` when the signature is not `k` bytes or not below `n`.
    fn encoded_message(&self, signature: &[u8]) -> Option<Vec<u8>> {
        if signature.len() != self.len {
            return None;
        }
        let limbs = self.n.len();
        let s = limbs_of(signature, limbs);
        if s.len() != limbs || at_least(&s, &self.n) {
            return None;
        }
        let s = self.mont_mul(&s, &self.r2);
        let m = self.pow(&s, self.e);
        let mut one = vec![0u32; limbs];
        if let Some(low) = one.first_mut() {
            *low = 1;
        }
        let m = self.mont_mul(&m, &one);
        // m < n < 256^k: the bytes dropped are zeros.
        let mut em: Vec<u8> = m.iter().flat_map(|l| l.to_le_bytes()).collect();
        em.truncate(self.len);
        em.reverse();
        Some(em)
    }

    /// RSASSA-PKCS1-v1_5-VERIFY (RFC 8017 §8.2.2): true when `signature` signs `message`.
    pub fn verify_pkcs1v15(&self, hash: Hash, message: &[u8], signature: &[u8]) -> bool {
        let Some(em) = self.encoded_message(signature) else {
            return false;
        };
        // EMSA-PKCS1-v1_5 (§9.2): 00 01 PS 00 T, PS at least 8 bytes of FF.
        let prefix = hash.digest_info_prefix();
        let t_len = prefix.len() + hash.output_len();
        let Some(ps_len) = self.len.checked_sub(t_len + 3).filter(|&p| p >= 8) else {
            return false;
        };
        let mut expected = Vec::with_capacity(self.len);
        expected.extend_from_slice(&[0x00, 0x01]);
        expected.resize(2 + ps_len, 0xff);
        expected.push(0x00);
        expected.extend_from_slice(prefix);
        expected.extend_from_slice(&hash.digest(&[message]));
        em.len() == expected.len() && same(&em, &expected)
    }

    /// RSASSA-PSS-VERIFY (RFC 8017 §8.1.2) with MGF1 of `hash` and a salt of the hash's
    /// length: true when `signature` signs `message`.
    pub fn verify_pss(&self, hash: Hash, message: &[u8], signature: &[u8]) -> bool {
        let Some(em) = self.encoded_message(signature) else {
            return false;
        };
        // emBits = modBits - 1: one byte shorter than k when modBits = 1 mod 8, and then
        // the top byte of the k must be zero (I2OSP to emLen bytes).
        let em_bits = self.bits - 1;
        let em_len = em_bits.div_ceil(8);
        let em = match (self.len.checked_sub(em_len), em.split_first()) {
            (Some(0), _) => em.as_slice(),
            (Some(1), Some((0, rest))) => rest,
            _ => return false,
        };
        pss_verify(hash, &hash.digest(&[message]), em, em_bits)
    }
}

/// EMSA-PSS-VERIFY (RFC 8017 §9.1.2), salt length = hash length, of `em` (`emLen` bytes).
fn pss_verify(hash: Hash, m_hash: &[u8], em: &[u8], em_bits: usize) -> bool {
    let h_len = hash.output_len();
    let s_len = h_len;
    let em_len = em.len();
    // Step 3.
    if em_len < h_len + s_len + 2 {
        return false;
    }
    // Steps 4 and 5: EM = maskedDB || H || 0xbc.
    let Some((&0xbc, rest)) = em.split_last() else {
        return false;
    };
    let db_len = em_len - h_len - 1;
    let (Some(masked_db), Some(h)) = (rest.get(..db_len), rest.get(db_len..)) else {
        return false;
    };
    // Step 6: the bits above emBits are zero.
    let unused = 8 * em_len - em_bits;
    let top_mask = 0xffu8.checked_shr(unused as u32).unwrap_or(0);
    if masked_db.first().is_none_or(|&b| b & !top_mask != 0) {
        return false;
    }
    // Steps 7 to 9: DB = maskedDB xor MGF1(H), the bits above emBits cleared.
    let mut db = mgf1(hash, h, db_len);
    for (d, m) in db.iter_mut().zip(masked_db) {
        *d ^= m;
    }
    if let Some(first) = db.first_mut() {
        *first &= top_mask;
    }
    // Step 10: DB = 00..00 01 salt.
    let zeros = db_len - s_len - 1;
    let (Some(padding), Some(&0x01), Some(salt)) =
        (db.get(..zeros), db.get(zeros), db.get(zeros + 1..))
    else {
        return false;
    };
    if padding.iter().any(|&b| b != 0) {
        return false;
    }
    // Steps 11 to 14: H = Hash(00 x 8 || mHash || salt).
    let h2 = hash.digest(&[&[0u8; 8], m_hash, salt]);
    h.len() == h2.len() && same(h, &h2)
}

/// MGF1 (RFC 8017 Appendix B.2.1): `len` bytes of mask from `seed`.
fn mgf1(hash: Hash, seed: &[u8], len: usize) -> Vec<u8> {
    let mut mask = Vec::with_capacity(len + hash.output_len());
    let mut counter = 0u32;
    while mask.len() < len {
        mask.extend_from_slice(&hash.digest(&[seed, &counter.to_be_bytes()]));
        counter = counter.wrapping_add(1);
    }
    mask.truncate(len);
    mask
}

/// Equal contents, every byte compared (no early exit: the comparison's time does not depend
/// on where the first difference is).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use rsa::{BigUint, Pkcs1v15Sign, Pss, RsaPrivateKey};
    use serde_json::Value;

    use super::super::tests::{RSA_NEW, RSA_OLD};
    use super::*;

    const RSA_4096: &str = include_str!("../../tests/fixtures/rsa-4096.private.jwk.json");
    const RSA_E3: &str = include_str!("../../tests/fixtures/rsa-2048-e3.private.jwk.json");
    const RSA_2049: &str = include_str!("../../tests/fixtures/rsa-2049.private.jwk.json");
    const KNOWN_ANSWERS: &str = include_str!("../../tests/fixtures/rsa-known-answers.json");

    const ALGS: [&str; 6] = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"];

    fn unb64(s: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(s).unwrap()
    }

    fn field(key: &Value, name: &str) -> Vec<u8> {
        unb64(key[name].as_str().unwrap())
    }

    fn e_of(key: &Value) -> u32 {
        field(key, "e")
            .iter()
            .fold(0, |acc, &b| (acc << 8) | u32::from(b))
    }

    fn public(private: &str) -> PublicKey {
        let key: Value = serde_json::from_str(private).unwrap();
        PublicKey::new(&field(&key, "n"), e_of(&key)).unwrap()
    }

    fn private(private: &str) -> RsaPrivateKey {
        let key: Value = serde_json::from_str(private).unwrap();
        let big = |n: &str| BigUint::from_bytes_be(&field(&key, n));
        RsaPrivateKey::from_components(big("n"), big("e"), big("d"), vec![big("p"), big("q")])
            .unwrap()
    }

    /// xorshift64*, for messages, salts and bits to flip: tests must not depend on the host's
    /// randomness.
    struct Rng(u64);

    impl rsa::rand_core::RngCore for Rng {
        fn next_u32(&mut self) -> u32 {
            (self.next_u64() >> 32) as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            rsa::rand_core::impls::fill_bytes_via_next(self, dest)
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rsa::rand_core::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    impl rsa::rand_core::CryptoRng for Rng {}

    fn below(rng: &mut Rng, n: usize) -> usize {
        use rsa::rand_core::RngCore;
        (rng.next_u64() % n as u64) as usize
    }

    fn flip(bytes: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let bit = below(rng, bytes.len() * 8);
        out[bit / 8] ^= 1 << (bit % 8);
        out
    }

    fn hash_of(alg: &str) -> Hash {
        match &alg[2..] {
            "256" => Hash::Sha256,
            "384" => Hash::Sha384,
            _ => Hash::Sha512,
        }
    }

    fn verifies(key: &PublicKey, alg: &str, message: &[u8], signature: &[u8]) -> bool {
        if alg.starts_with("RS") {
            key.verify_pkcs1v15(hash_of(alg), message, signature)
        } else {
            key.verify_pss(hash_of(alg), message, signature)
        }
    }

    fn sign(key: &RsaPrivateKey, alg: &str, message: &[u8], rng: &mut Rng) -> Vec<u8> {
        use sha2::Digest;
        match alg {
            "RS256" => key.sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message)),
            "RS384" => key.sign(Pkcs1v15Sign::new::<Sha384>(), &Sha384::digest(message)),
            "RS512" => key.sign(Pkcs1v15Sign::new::<Sha512>(), &Sha512::digest(message)),
            "PS256" => key.sign_with_rng(rng, Pss::new::<Sha256>(), &Sha256::digest(message)),
            "PS384" => key.sign_with_rng(rng, Pss::new::<Sha384>(), &Sha384::digest(message)),
            "PS512" => key.sign_with_rng(rng, Pss::new::<Sha512>(), &Sha512::digest(message)),
            other => panic!("no signer for {other}"),
        }
        .unwrap()
    }

    /// `m^d mod n` for the encoded message `em`: a signature of whatever `em` holds.
    fn raw_sign(private: &str, em: &[u8]) -> Vec<u8> {
        let key: Value = serde_json::from_str(private).unwrap();
        let n = BigUint::from_bytes_be(&field(&key, "n"));
        let d = BigUint::from_bytes_be(&field(&key, "d"));
        let s = BigUint::from_bytes_be(em).modpow(&d, &n).to_bytes_be();
        let k = public(private).size();
        let mut out = vec![0u8; k - s.len()];
        out.extend_from_slice(&s);
        out
    }

    #[test]
    fn keys_are_read_and_refused() {
        let k = public(RSA_OLD);
        assert_eq!((k.bits(), k.size(), k.exponent()), (2048, 256, 65537));
        assert_eq!(public(RSA_2049).bits(), 2049);
        assert_eq!(public(RSA_2049).size(), 257);
        assert_eq!(public(RSA_4096).size(), 512);
        assert_eq!(public(RSA_E3).exponent(), 3);
        let n = field(&serde_json::from_str(RSA_OLD).unwrap(), "n");
        let mut even = n.clone();
        *even.last_mut().unwrap() &= 0xfe;
        assert_eq!(PublicKey::new(&even, 65537), Err(KeyError::Modulus));
        assert_eq!(PublicKey::new(&[], 65537), Err(KeyError::Modulus));
        assert_eq!(
            PublicKey::new(&[0, 0, 0xff, 0xff, 0xff], 3),
            Err(KeyError::Modulus)
        );
        assert_eq!(
            PublicKey::new(&vec![0xff; MAX_BITS / 8 + 1], 3),
            Err(KeyError::Modulus)
        );
        for e in [0, 1, 2, 65536] {
            assert_eq!(PublicKey::new(&n, e), Err(KeyError::Exponent), "{e}");
        }
        // Leading zero bytes are not part of the modulus.
        let mut padded = vec![0, 0];
        padded.extend_from_slice(&n);
        assert_eq!(PublicKey::new(&padded, 65537), Ok(k));
        assert_eq!(bit_len(&[0, 0, 1, 0]), 9);
        assert_eq!(bit_len(&[0, 0]), 0);
    }

    /// Signatures made by OpenSSL, committed in tests/fixtures/rsa-known-answers.json.
    #[test]
    fn known_answers_from_openssl() {
        let doc: Value = serde_json::from_str(KNOWN_ANSWERS).unwrap();
        let keys = [
            ("old-2024", RSA_OLD),
            ("rsa-4096", RSA_4096),
            ("rsa-2048-e3", RSA_E3),
            ("rsa-2049", RSA_2049),
        ];
        let answers = doc["signatures"].as_array().unwrap();
        assert_eq!(answers.len(), keys.len() * ALGS.len());
        for a in answers {
            let kid = a["kid"].as_str().unwrap();
            let key = public(keys.iter().find(|(k, _)| *k == kid).unwrap().1);
            let alg = a["alg"].as_str().unwrap();
            let message = a["message"].as_str().unwrap().as_bytes();
            let signature = unb64(a["signature"].as_str().unwrap());
            assert!(verifies(&key, alg, message, &signature), "{kid} {alg}");
            for other in ALGS.iter().filter(|o| **o != alg) {
                assert!(
                    !verifies(&key, other, message, &signature),
                    "{kid} {alg} as {other}"
                );
            }
        }
    }

    /// Ours accepts what the rsa crate signs, and nothing one bit away: in the signature, the
    /// message, or the modulus.
    #[test]
    fn differential_against_the_rsa_crate() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for (private_jwk, rounds) in [
            (RSA_OLD, 4),
            (RSA_NEW, 2),
            (RSA_E3, 3),
            (RSA_2049, 4),
            (RSA_4096, 2),
        ] {
            let sk = private(private_jwk);
            let key = public(private_jwk);
            let n = field(&serde_json::from_str(private_jwk).unwrap(), "n");
            for alg in ALGS {
                for _ in 0..rounds {
                    let len = below(&mut rng, 300) + 1;
                    let mut message = vec![0u8; len];
                    rsa::rand_core::RngCore::fill_bytes(&mut rng, &mut message);
                    let signature = sign(&sk, alg, &message, &mut rng);
                    let what = format!("{alg} by {} bits", key.bits());
                    assert!(verifies(&key, alg, &message, &signature), "{what}");
                    let s = flip(&signature, &mut rng);
                    assert!(!verifies(&key, alg, &message, &s), "{what}: signature");
                    let m = flip(&message, &mut rng);
                    assert!(!verifies(&key, alg, &m, &signature), "{what}: message");
                    // An even modulus is no key at all; any other is a different key.
                    if let Ok(other) = PublicKey::new(&flip(&n, &mut rng), key.exponent()) {
                        assert!(!verifies(&other, alg, &message, &signature), "{what}: n");
                    }
                }
            }
        }
    }

    #[test]
    fn signatures_out_of_range_or_of_another_length_are_refused() {
        let key = public(RSA_OLD);
        let n = field(&serde_json::from_str(RSA_OLD).unwrap(), "n");
        let mut rng = Rng(7);
        let good = sign(&private(RSA_OLD), "RS256", b"m", &mut rng);
        assert!(verifies(&key, "RS256", b"m", &good));
        let plus_one = {
            let mut v = BigUint::from_bytes_be(&n);
            v += 1u32;
            v.to_bytes_be()
        };
        let minus_one = {
            let mut v = BigUint::from_bytes_be(&n);
            v -= 1u32;
            v.to_bytes_be()
        };
        let mut long = vec![0u8];
        long.extend_from_slice(&good);
        for (what, s) in [
            ("s = 0", vec![0u8; 256]),
            ("s = 1", {
                let mut v = vec![0u8; 256];
                v[255] = 1;
                v
            }),
            ("s = n", n.clone()),
            ("s = n + 1", plus_one),
            ("s = n - 1", minus_one),
            ("s = 2^2048 - 1", vec![0xff; 256]),
            ("empty", vec![]),
            ("short", good[1..].to_vec()),
            ("long, a zero first", long),
            ("long, a zero last", [good.as_slice(), &[0]].concat()),
            ("twice", [good.as_slice(), &good].concat()),
        ] {
            for alg in ALGS {
                assert!(!verifies(&key, alg, b"m", &s), "{what} {alg}");
            }
        }
        // A 2049-bit key's signatures are 257 bytes, the first one 0 or 1.
        let key = public(RSA_2049);
        let good = sign(&private(RSA_2049), "PS256", b"m", &mut rng);
        assert_eq!(good.len(), 257);
        assert!(verifies(&key, "PS256", b"m", &good));
        assert!(!verifies(&key, "PS256", b"m", &good[1..]));
    }

    /// Encoded messages that a parser of the padding might take: only the one we build is.
    #[test]
    fn pkcs1v15_compares_the_whole_encoded_message() {
        use sha2::Digest;
        let key = public(RSA_E3);
        let h = Sha256::digest(b"m").to_vec();
        let info = Hash::Sha256.digest_info_prefix();
        let em = |ps: usize, tail: &[u8]| {
            let mut em = vec![0x00, 0x01];
            em.resize(2 + ps, 0xff);
            em.push(0);
            em.extend_from_slice(tail);
            em
        };
        let t = [info, &h].concat();
        let good = em(256 - 3 - t.len(), &t);
        assert!(verifies(&key, "RS256", b"m", &raw_sign(RSA_E3, &good)));
        // DigestInfo without the NULL parameters.
        let no_null = [&[0x30, 0x2f, 0x30, 0x0b], &info[4..15], &info[17..], &h].concat();
        // The hash followed by garbage, the padding shorter (Bleichenbacher's e = 3 forgery).
        let garbage = em(8, &[&t[..], &[0xab; 256 - 11 - 51]].concat());
        let mut block_type_2 = good.clone();
        block_type_2[1] = 0x02;
        let mut a_zero_in_ps = good.clone();
        a_zero_in_ps[20] = 0x00;
        let mut sha384_oid = good.clone();
        sha384_oid[256 - 32 - 5] = 0x02;
        for (what, forged) in [
            ("no NULL", em(256 - 3 - no_null.len(), &no_null)),
            ("garbage after the hash", garbage),
            ("block type 2", block_type_2),
            ("a zero in the padding", a_zero_in_ps),
            ("the SHA-384 OID", sha384_oid),
        ] {
            assert_eq!(forged.len(), 256, "{what}");
            assert!(
                !verifies(&key, "RS256", b"m", &raw_sign(RSA_E3, &forged)),
                "{what}"
            );
        }
    }

    #[test]
    fn pss_salt_must_be_as_long_as_the_hash() {
        use sha2::Digest;
        let sk = private(RSA_OLD);
        let key = public(RSA_OLD);
        let mut rng = Rng(11);
        let digest = Sha256::digest(b"m");
        for salt in [0, 20, 31, 33, 64] {
            let s = sk
                .sign_with_rng(&mut rng, Pss::new_with_salt::<Sha256>(salt), &digest)
                .unwrap();
            assert!(!key.verify_pss(Hash::Sha256, b"m", &s), "salt of {salt}");
        }
        let s = sk
            .sign_with_rng(&mut rng, Pss::new_with_salt::<Sha256>(32), &digest)
            .unwrap();
        assert!(key.verify_pss(Hash::Sha256, b"m", &s));
        // The trailer byte and the bits above emBits are checked.
        let em = {
            let k = BigUint::from_bytes_be(&field(&serde_json::from_str(RSA_OLD).unwrap(), "n"));
            let e = BigUint::from(65537u32);
            let m = BigUint::from_bytes_be(&s).modpow(&e, &k).to_bytes_be();
            [vec![0u8; 256 - m.len()], m].concat()
        };
        assert_eq!(em[255], 0xbc);
        let mut bad_trailer = em.clone();
        bad_trailer[255] = 0xbd;
        let mut top_bit = em.clone();
        top_bit[0] ^= 0x80;
        for (what, em) in [("trailer", bad_trailer), ("top bit", top_bit)] {
            assert!(
                !key.verify_pss(Hash::Sha256, b"m", &raw_sign(RSA_OLD, &em)),
                "{what}"
            );
        }
        assert!(key.verify_pss(Hash::Sha256, b"m", &raw_sign(RSA_OLD, &em)));
    }

    #[test]
    fn jwk_moduli_with_a_leading_zero_byte_verify() {
        use super::super::tests::public_jwk;
        use super::super::verify::{verify, Algorithm, PublicKey as Key};
        let mut rng = Rng(5);
        for private_jwk in [RSA_OLD, RSA_E3, RSA_4096] {
            let mut jwk = public_jwk(private_jwk);
            let n = [vec![0u8], field(&jwk, "n")].concat();
            jwk["n"] = URL_SAFE_NO_PAD.encode(&n).into();
            jwk["kid"] = "padded".into();
            jwk.as_object_mut().unwrap().remove("alg");
            let doc = serde_json::to_vec(&serde_json::json!({ "keys": [jwk] })).unwrap();
            let jwks = super::super::Jwks::parse(&doc).unwrap();
            let Key::Rsa(k) = &jwks.keys()[0].key else {
                panic!("not an RSA key")
            };
            assert_eq!(k, &public(private_jwk));
            let sk = private(private_jwk);
            for (alg, name) in [(Algorithm::Rs256, "RS256"), (Algorithm::Ps512, "PS512")] {
                let s = sign(&sk, name, b"header.payload", &mut rng);
                assert!(verify(alg, &jwks.keys()[0].key, b"header.payload", &s));
            }
        }
    }
}
