"""A JWT issuer: an RSA signing key, its JWKS, and tokens minted with it (good ones and broken ones).

An issuer can rotate: `rotate()` adds a new signing key with a new `kid` and signs with it from then
on, while its JWKS keeps publishing the older keys (as Kubernetes and the OIDC providers do during a
rotation). `token(claims, header=..., key=..., alg=...)` signs anything, with any header, for the
subject checks' tables; `compact(header, claims, signature)` assembles a JWS from parts as given.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm, get_default_algorithms

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


def b64url(data) -> str:
    """base64url without padding; str is encoded as UTF-8, a dict or list as compact JSON."""
    if isinstance(data, (dict, list)):
        data = json.dumps(data, separators=(",", ":"))
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header, claims, signature: bytes = b"") -> str:
    """A compact JWS from its parts exactly as given (header and claims: dicts, or str/bytes taken as
    they are), with `signature` as its third part: an unsigned token, or bytes that sign nothing."""
    return f"{b64url(header)}.{b64url(claims)}.{b64url(signature)}"


def sign_input(signing_input: str, key, alg: str) -> bytes:
    """The `alg` signature of `signing_input` with `key` (a private key object; bytes for HS*),
    computed without PyJWT's key checks, so that a test can sign with the wrong kind of key on purpose
    (an HMAC keyed with an RSA public key's PEM)."""
    return get_default_algorithms()[alg].sign(signing_input.encode(), key)


class Issuer:
    def __init__(self, iss: str, kid: str | None = None):
        self.iss = iss
        self.kid = kid or _default_kid(iss)
        self._key = signing_key(iss)
        self._keys = [(self.kid, self._key)]  # every key the JWKS publishes, oldest first

    @property
    def kids(self) -> list:
        return [kid for kid, _ in self._keys]

    def private_key(self, kid: str | None = None):
        """The signing key of `kid` (default: the current one)."""
        return dict(self._keys)[kid or self.kid]

    def public_jwk(self, kid: str | None = None) -> dict:
        """The JWK of `kid` (default: the current signing key)."""
        kid = kid or self.kid
        jwk = RSAAlgorithm.to_jwk(self.private_key(kid).public_key(), as_dict=True)
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        return jwk

    def jwks(self) -> dict:
        """The key set as the issuer publishes it: every key, oldest first."""
        return {"keys": [self.public_jwk(kid) for kid, _ in self._keys]}

    def rotate(self) -> str:
        """A new signing key with a new kid, signed with from now on; the older keys stay published.
        Returns the new kid."""
        n = len(self._keys)
        kid = f"{_default_kid(self.iss)}-r{n}"
        self._key = signing_key(f"{self.iss}#rotation-{n}")
        self._keys.append((kid, self._key))
        self.kid = kid
        return kid

    def token(self, claims: dict, header: dict | None = None, key=None, alg: str = "RS256") -> str:
        """`claims` signed by `alg` with `key` (default: the current signing key), under the header
        {"alg": alg, "typ": "JWT", "kid": the current kid} updated with `header`; a header value of
        None leaves that field out. The header is signed as given, whatever it says."""
        fields = {"alg": alg, "typ": "JWT", "kid": self.kid}
        fields.update(header or {})
        fields = {name: value for name, value in fields.items() if value is not None}
        signing_input = f"{b64url(fields)}.{b64url(claims)}"
        signature = sign_input(signing_input, self._key if key is None else key, alg)
        return f"{signing_input}.{b64url(signature)}"

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
