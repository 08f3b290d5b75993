"""A JWT issuer: an RSA signing key, its JWKS, and tokens minted with it (good ones and broken ones)."""

from __future__ import annotations

import hashlib
import threading
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

_keys: dict = {}
_keys_lock = threading.Lock()


def signing_key(name: str):
    """One RSA-2048 key per name per process: generating one takes ~0.1 s, and tests make many issuers."""
    with _keys_lock:
        key = _keys.get(name)
        if key is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _keys[name] = key
        return key


def _default_kid(iss: str) -> str:
    return "key-" + hashlib.sha256(iss.encode()).hexdigest()[:16]


class Issuer:
    def __init__(self, iss: str, kid: str | None = None):
        self.iss = iss
        self.kid = kid or _default_kid(iss)
        self._key = signing_key(iss)

    def public_jwk(self) -> dict:
        jwk = RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return jwk

    def jwks(self) -> dict:
        return {"keys": [self.public_jwk()]}

    def sign(self, payload: dict, kid: str | None = "", key=None) -> str:
        """Sign payload as is. kid "" means this issuer's kid; kid None leaves kid out of the header."""
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else None
        return jwt.encode(payload, key or self._key, algorithm="RS256", headers=headers)

    def claims(self, sub: str, aud, lifetime_s: float = 3600, **claims) -> dict:
        now = int(time.time())
        payload = {"iss": self.iss, "sub": sub, "aud": aud, "iat": now, "nbf": now, "exp": int(now + lifetime_s)}
        payload.update(claims)
        return payload

    def mint(self, sub: str, aud, lifetime_s: float = 3600, **claims) -> str:
        """RS256 JWT with iss/sub/aud/iat/nbf/exp; extra claims are added (and may override those)."""
        return self.sign(self.claims(sub, aud, lifetime_s, **claims))

    # Broken tokens, each wrong in exactly one way.

    def mint_wrong_signature(self, sub: str, aud, lifetime_s: float = 3600, **claims) -> str:
        """Right kid and claims, signed by a different key."""
        return self.sign(self.claims(sub, aud, lifetime_s, **claims), key=signing_key("other-key:" + self.iss))

    def mint_unknown_kid(self, sub: str, aud, lifetime_s: float = 3600, **claims) -> str:
        return self.sign(self.claims(sub, aud, lifetime_s, **claims), kid=self.kid + "-unknown")

    def mint_without_kid(self, sub: str, aud, lifetime_s: float = 3600, **claims) -> str:
        return self.sign(self.claims(sub, aud, lifetime_s, **claims), kid=None)

    def mint_expired(self, sub: str, aud, expired_s_ago: float = 60, **claims) -> str:
        now = int(time.time())
        claims = {"iat": now - 3600 - int(expired_s_ago), "nbf": now - 3600 - int(expired_s_ago), **claims}
        return self.sign(self.claims(sub, aud, -expired_s_ago, **claims))

    def mint_wrong_iss(self, sub: str, aud, lifetime_s: float = 3600, iss: str = "https://wrong-issuer.example.com",
                       **claims) -> str:
        return self.mint(sub, aud, lifetime_s, iss=iss, **claims)

    def mint_wrong_aud(self, sub: str, aud: str = "https://wrong-audience.example.com", lifetime_s: float = 3600,
                       **claims) -> str:
        return self.mint(sub, aud, lifetime_s, **claims)
