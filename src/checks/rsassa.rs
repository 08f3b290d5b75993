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
