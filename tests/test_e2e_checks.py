"""End to end: the subject checks (`expect`) in a real Envoy (2 workers) with the built filter.

A subject token that fails a check is refused by the gateway itself, before any exchange: 401
`invalid_subject_token` (`subject_token_expired` for `expiry`) whose message names the check and
what it saw against what it expected, never the token. The token endpoint sees nothing of it, and
a valid token afterwards is exchanged once as usual. When the endpoint still refuses a token that
passed every check, the 502 says what was sent and what is left to suspect.

Gateways:
- `gw` (header source): `expect` with the header issuer, its audience, RS256 and PS256, a `sub`
  pattern wider than the stand-in's mapping (so a token can pass every check and still be refused
  by the endpoint), and an inline JWKS of the issuer's key plus a key the provider was never given.
- `keyed` (header source): `expect.jwks_source` through an Envoy cluster to a JWKS stand-in (a
  Kubernetes-style `/openid/v1/jwks`) for an issuer of its own, which rotates its key during the
  module. Its fixture watches start-up: one fetch for every worker and VM, 503
  `subject_keys_unavailable` with `Retry-After` until the fetch has been answered.
- a kubernetes-source gateway (its own, cold) whose `expect.issuer` is not the token file's issuer.

The one wait on a clock is the filter's limit of one re-fetch per 5 s for an unknown `kid`. Wall
time is about 12 s, 5 of it that wait.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import Stack
from tests.standins import OPENAI_AUDIENCE, Issuer, JwksStandin
from tests.standins.issuer import b64url, compact, signing_key
from tests.standins.openai import mapping
from tools import envoy_config

SUBJECT_HEADER = "x-openai-subject-token"
CLIENT_HEADERS = {"Authorization": "Bearer sk-caller-own-key"}
REQUEST_TIMEOUT_S = 10.0
WAIT_S = 15.0

INVALID = "invalid_subject_token"
EXPIRED = "subject_token_expired"
KEYS_UNAVAILABLE = "subject_keys_unavailable"
SOURCE_UNAVAILABLE = "subject_source_unavailable"

SUB_PATTERN = "system:serviceaccount:*"
LEEWAY_S = 30

# The jwks_source gateway: its issuer, provider, account, and the cluster to the JWKS stand-in.
KEYS_ISSUER = "https://keys.example.com"
KEYS_PROVIDER = "wip_keys"
KEYS_ACCOUNT = "sa_keys"
JWKS_CLUSTER = "subject_jwks"
JWKS_AUTHORITY = "kubernetes.default.svc"
JWKS_PATH = "/openid/v1/jwks"
JWKS_TIMEOUT_MS = 5000  # longer than any hold below: a held fetch must not time out and be retried
UNKNOWN_KID_REFETCH_S = 5.0  # the filter's limit: one re-fetch per 5 s for a kid not in the set

_sequence = itertools.count()


def unique_sub(tag: str, namespace: str = "default") -> str:
    return f"system:serviceaccount:{namespace}:{tag}-{next(_sequence)}-{time.monotonic_ns() % 100000}"


def call(gw, token=None, headers=None, timeout=REQUEST_TIMEOUT_S):
    h = dict(headers or {})
    if token is not None:
        h[SUBJECT_HEADER] = token
    return gw.request("GET", "/v1/models", headers=h, timeout=timeout)


def error_of(response) -> dict:
    """The filter's own refusal: OpenAI's error shape, and x-openai-wif-error naming the code."""
    assert response.status is not None, response.error
    doc = response.json()
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    assert response.header("content-type") == "application/json"
    assert response.header("x-openai-wif-error") == doc["error"]["code"], response.headers
    return doc["error"]


def assert_withheld(response, token: str):
    """Nothing of the token in the answer: not the token, not its signature, not its signed part."""
    seen = response.text + repr(response.headers)
    parts = token.split(".")
    pieces = [token] + [part for part in parts if len(part) >= 16] + (
        [".".join(parts[:2])] if len(parts) >= 2 else [])
    leaked = [piece[:12] + "…" for piece in pieces if piece and piece in seen]
    assert not leaked, f"the answer carries parts of the subject token: {leaked}"


def assert_nothing_upstream(standins):
    assert standins.openai.exchanges == 0, f"{standins.openai.exchanges} token exchanges: {standins.openai.rejections}"
    assert standins.openai.api_requests == [], "a request reached the API"


def histogram(responses) -> dict:
    return dict(Counter((r.status, r.header("x-openai-wif-error")) if r.status else ("no response", r.error)
                        for r in responses))


def assert_both_workers(stack, before: dict):
    after = stack.envoy.worker_connections()
    assert len(after) == 2 and all(after[w] > before.get(w, 0) for w in after), \
        f"the requests did not reach both workers: {before} -> {after}"


def serve_on_both_workers(stack, subject: str, seen: list, what: str):
    """Requests one at a time until each worker has answered one with 200, every answer appended to
    `seen`. A worker reads a key set another one fetched within a second, and answers 503 until then."""
    served = set()

    def step():
        before = stack.envoy.worker_connections()
        seen.append(call(stack, subject))
        after = stack.envoy.worker_connections()
        worker = next((w for w in after if after[w] > before.get(w, 0)), None)
        if seen[-1].status == 200 and worker is not None:
            served.add(worker)
        return len(served) == 2
    stack.envoy.wait_for(step, timeout_s=WAIT_S, interval_s=0.02, what=what)


def fetch_times(jwks: JwksStandin) -> list:
    """(arrived, answered) of each fetch, in seconds after the first arrived, for failure messages."""
    start = jwks.fetch_log[0]["time"] if jwks.fetch_log else 0
    return [(round(e["time"] - start, 3), e["answered"] and round(e["answered"] - start, 3)) for e in jwks.fetch_log]


def assert_keys_unavailable(response, *says):
    assert response.status == 503, response
    error = error_of(response)
    assert (error["code"], error["type"]) == (KEYS_UNAVAILABLE, "server_error"), error
    assert int(response.header("retry-after") or 0) >= 1, response.headers  # the OpenAI SDKs retry a 503
    for part in says:
        assert part in error["message"], error["message"]
    return error


# ---------------------------------------------------------------------------------------------
# Tokens

DROP = object()  # a claim value that leaves the claim out

# Keys the issuer never published: a forger's, and a P-256 key (ES256 is not allowed here).
FORGER_KEY = signing_key("forger:checks")
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def claims(standins, sub: str | None = None, **overrides) -> dict:
    payload = standins.issuer.claims(sub or unique_sub("checks"), OPENAI_AUDIENCE)
    payload.update(overrides)
    return {name: value for name, value in payload.items() if value is not DROP}


def token(standins, header=None, key=None, alg="RS256", **overrides) -> str:
    """The header issuer's token (signed with its key unless `key`), header fields and claims changed."""
    return standins.issuer.token(claims(standins, **overrides), header=header, key=key, alg=alg)


def public_pem(standins) -> bytes:
    return standins.issuer.private_key().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def altered_after_signing(standins) -> str:
    """A valid token whose payload is replaced (another workload's sub) and the signature kept."""
    header, _, signature = token(standins).split(".")
    forged = b64url(claims(standins, sub="system:serviceaccount:kube-system:admin"))
    return f"{header}.{forged}.{signature}"


def jwe_compact(standins) -> str:
    """The five parts of an encrypted JWT (RFC 7516 §7.1)."""
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": standins.issuer.kid}
    return ".".join([b64url(header), b64url(b"k" * 256), b64url(b"iv" * 6), b64url(b"ciphertext"), b64url(b"t" * 16)])


def embedded_jwk(standins) -> str:
    """Signed by the forger, with the issuer's kid and the forger's own key in the header (`jwk`)."""
    from jwt.algorithms import RSAAlgorithm
    jwk = RSAAlgorithm.to_jwk(FORGER_KEY.public_key(), as_dict=True)
    return token(standins, header={"jwk": jwk}, key=FORGER_KEY)


@dataclass(frozen=True)
class Bad:
    name: str
    make: Callable  # standins -> the subject token
    check: str  # the check that refuses it
    says: tuple = ()  # parts of the message: what was observed against what was expected
    code: str = INVALID

    def __str__(self):
        return self.name


def kid(standins) -> str:
    return standins.issuer.kid


BAD_SUBJECTS = [
    Bad("not a JWT", lambda s: "not-a-jwt", "well_formed", ("1 dot-separated parts",)),
    Bad("unsigned, alg none", lambda s: compact({"alg": "none", "typ": "JWT", "kid": kid(s)}, claims(s)),
        "well_formed", ("no signature",)),
    Bad("encrypted JWE, 5 parts", jwe_compact, "well_formed", ("5 is an encrypted JWE",)),
    Bad("typ JWE", lambda s: token(s, header={"typ": "JWE"}), "well_formed", ('typ is "JWE", not a JWT',)),
    Bad("nested JWT, cty", lambda s: token(s, header={"cty": "JWT"}), "well_formed", ("the header has cty",)),
    Bad("crit extension", lambda s: token(s, header={"crit": ["exp"], "exp": 1}), "well_formed",
        ("the header has crit",)),
    Bad("alg none with a signature", lambda s: compact({"alg": "none", "typ": "JWT", "kid": kid(s)}, claims(s),
                                                       b"s" * 256),
        "algorithm", ('alg is "none"', "never accepted")),
    Bad("HS256 keyed with the issuer's public key", lambda s: token(s, key=public_pem(s), alg="HS256"),
        "algorithm", ('alg is "HS256"', "HMAC")),
    Bad("ES256, not allowed", lambda s: token(s, key=EC_KEY, alg="ES256"), "algorithm",
        ("alg is ES256, the configuration allows RS256, PS256",)),
    Bad("PS256 with the issuer's RS256 key", lambda s: token(s, alg="PS256"), "known_key",
        ("names an RS256 key in the JWKS, which does not verify PS256",)),
    Bad("no kid", lambda s: token(s, header={"kid": None}), "key_id", ("the header has no kid",)),
    Bad("kid not a string", lambda s: token(s, header={"kid": 7}), "key_id", ("kid is not a string",)),
    Bad("kid with a line break", lambda s: token(s, header={"kid": "k\nopenai_wif: forged log line"}), "key_id",
        ("control characters",)),
    Bad("unknown kid", lambda s: token(s, header={"kid": kid(s) + "-unknown"}), "known_key",
        ("-unknown\" is not in the issuer's JWKS (kids: [",)),
    Bad("kid path traversal", lambda s: token(s, header={"kid": "../../etc/passwd"}), "known_key",
        ('kid "../../etc/passwd" is not in the issuer\'s JWKS',)),
    Bad("kid SQL injection", lambda s: token(s, header={"kid": "' OR '1'='1' --"}), "known_key",
        ("kid \"' OR '1'='1' --\" is not in the issuer's JWKS",)),
    Bad("kid and jku naming another key set",
        lambda s: token(s, header={"kid": "https://evil.example/jwks.json", "jku": "https://evil.example/jwks.json"}),
        "known_key", ('kid "https://evil.example/jwks.json" is not in',)),
    Bad("forger's key embedded as jwk", embedded_jwk, "signature", ("signature does not verify",)),
    Bad("forged signature, another key", lambda s: token(s, key=FORGER_KEY), "signature",
        ("the RS256 signature does not verify with the issuer's key",)),
    Bad("payload altered after signing", altered_after_signing, "signature", ("signature does not verify",)),
    Bad("missing iat", lambda s: token(s, iat=DROP), "required_claims", ("missing iat",)),
    Bad("missing sub", lambda s: token(s, sub=DROP), "required_claims", ("missing sub",)),
    Bad("sub not a string", lambda s: token(s, sub=42), "required_claims", ("sub is 42, not a non-empty string",)),
    Bad("wrong iss", lambda s: token(s, iss="https://wrong-issuer.example.com"), "issuer",
        ('iss is "https://wrong-issuer.example.com", the provider expects "https://issuer.example.com"',)),
    Bad("wrong aud", lambda s: token(s, aud="https://wrong-audience.example.com"), "audience",
        ('aud is ["https://wrong-audience.example.com"], the provider expects one of ["https://api.openai.com/v1"]',)),
    Bad("expired", lambda s: token(s, exp=int(time.time()) - 60, iat=int(time.time()) - 3660,
                                   nbf=int(time.time()) - 3660),
        "expiry", ("subject token expired ", " s ago"), code=EXPIRED),
    Bad("nbf far in the future", lambda s: token(s, nbf=int(time.time()) + 3600), "not_before",
        ("nbf is ", f"s in the future, beyond the leeway of {LEEWAY_S} s")),
    Bad("iat far in the future", lambda s: token(s, iat=int(time.time()) + 3600), "issued_at",
        ("iat is ", f"s in the future, beyond the leeway of {LEEWAY_S} s")),
    Bad("sub outside the claims pattern", lambda s: token(s, sub="user:alice"), "claim",
        (f'sub is "user:alice", the configuration expects "{SUB_PATTERN}"',)),
]


# ---------------------------------------------------------------------------------------------
# The header-source gateway with an inline JWKS


def next_key_issuer(standins) -> Issuer:
    """The header issuer's next key: in the gateway's JWKS, never uploaded to the provider."""
    upcoming = Issuer(standins.issuer.iss)
    upcoming.rotate()
    return upcoming


def header_expect(standins) -> dict:
    keys = standins.issuer.jwks()["keys"] + [next_key_issuer(standins).public_jwk()]
    return {"issuer": standins.issuer.iss, "audiences": [OPENAI_AUDIENCE], "algorithms": ["RS256", "PS256"],
            "leeway_s": LEEWAY_S, "claims": {"sub": SUB_PATTERN}, "jwks": {"keys": keys}}


@pytest.fixture(scope="module")
def gw(gateway_for, standins):
    return gateway_for("header", filter_settings={"token_endpoint": {"timeout_ms": 2000},
                                                  "expect": header_expect(standins)})


@pytest.mark.parametrize("bad", BAD_SUBJECTS, ids=str)
def test_bad_subject_is_refused_naming_the_check_before_any_exchange(bad, gw, standins):
    subject = bad.make(standins)
    refused_before = gw.envoy.counter("subjects_refused")
    response = call(gw, subject, headers=CLIENT_HEADERS)
    assert response.status == 401, response
    error = error_of(response)
    assert (error["code"], error["type"]) == (bad.code, "invalid_request_error"), error
    assert error["message"].startswith(f"subject token failed the {bad.check} check: "), error["message"]
    for part in bad.says:
        assert part in error["message"], error["message"]
    assert_withheld(response, subject)
    assert_nothing_upstream(standins)

    again = call(gw, subject, headers=CLIENT_HEADERS)  # the same bytes: the same answer, still no exchange
    assert (again.status, again.json()) == (response.status, response.json())
    assert_nothing_upstream(standins)
    # Counted once per refusal a VM decided (the second may have been answered from a VM's memo).
    counted = gw.envoy.wait_for(lambda: gw.envoy.counter("subjects_refused") - refused_before, timeout_s=5,
                                what="subjects_refused to count the refusal")
    assert 1 <= counted <= 2, counted


def test_valid_subject_is_exchanged_once_for_a_burst_on_both_workers(gw, standins):
    sub = unique_sub("burst")
    subject = standins.subject_token(sub=sub)
    before = gw.envoy.worker_connections()
    responses = gw.burst(40, headers={SUBJECT_HEADER: subject, **CLIENT_HEADERS}, timeout=20)
    assert histogram(responses) == {(200, None): 40}, histogram(responses)
    assert all(r.header("x-standin-sub") == sub for r in responses)
    assert standins.openai.exchanges == 1, standins.openai.exchange_log
    assert standins.openai.exchange_log[0]["subject_token"] == subject
    assert_both_workers(gw, before)


def test_repeated_refusals_of_one_token_make_no_exchange_and_leave_nothing_behind(gw, standins):
    """A forged token over and over, on both workers: refused every time at `signature`, nothing
    exchanged or cached; the genuine token for the same sub then gets its own exchange, once."""
    sub = unique_sub("repeat")
    forged = token(standins, sub=sub, key=FORGER_KEY)
    before = gw.envoy.worker_connections()
    responses = gw.burst(30, headers={SUBJECT_HEADER: forged, **CLIENT_HEADERS}, timeout=20)
    assert histogram(responses) == {(401, INVALID): 30}, histogram(responses)
    messages = {error_of(r)["message"] for r in responses}
    assert len(messages) == 1 and next(iter(messages)).startswith("subject token failed the signature check: "), \
        messages
    assert_nothing_upstream(standins)
    assert_both_workers(gw, before)

    genuine = standins.subject_token(sub=sub)
    served = [call(gw, genuine) for _ in range(3)]
    assert [r.status for r in served] == [200, 200, 200], served
    assert standins.openai.exchanges == 1 and standins.openai.exchanges_for(sub) == 1


@dataclass(frozen=True)
class Refusal:
    name: str
    oauth_errors: bool  # the stand-in answers an OAuth error instead of its generic 500
    unmapped: bool  # a sub the provider's mapping does not cover (else: signed with the key never uploaded)
    status: str  # how the 502 reports the endpoint's answer
    reason: str  # the stand-in's reason

    def __str__(self):
        return self.name


REFUSALS = [
    Refusal("generic 500, sub not mapped", False, True, "answered HTTP 500; ", "no_matching_mapping"),
    Refusal("OAuth 400, sub not mapped", True, True, "answered HTTP 400 (invalid_grant: no matching mapping); ",
            "no_matching_mapping"),
    Refusal("OAuth 401, key never uploaded", True, False,
            "answered HTTP 401 (invalid_subject_token: unknown kid); ", "unknown_kid"),
]


@pytest.mark.parametrize("refusal", REFUSALS, ids=str)
def test_refused_exchange_is_explained_with_the_subject_the_ids_sent_and_what_is_left(refusal, gw, standins):
    """Every check passed (the sub fits the gateway's pattern, the key is in its JWKS), and yet the
    endpoint refuses: the 502 carries what the filter can see, for the operator's next step."""
    standins.openai.oauth_errors = refusal.oauth_errors
    if refusal.unmapped:
        # sa_header is mapped for system:serviceaccount:default:* only.
        sub, issuer = unique_sub("unmapped", namespace="ai"), standins.issuer
    else:
        sub, issuer = unique_sub("next-key"), next_key_issuer(standins)
    subject = issuer.mint(sub, OPENAI_AUDIENCE)
    response = call(gw, subject, headers=CLIENT_HEADERS)
    assert response.status == 502, response
    error = error_of(response)
    assert (error["code"], error["type"]) == ("token_exchange_failed", "server_error"), error
    message = error["message"]
    assert [e["reason"] for e in standins.openai.exchange_log] == [refusal.reason]
    assert refusal.status in message, message
    for fact in (f'subject iss "{issuer.iss}"', f'aud ["{OPENAI_AUDIENCE}"]', f'sub "{sub}"', f'kid "{issuer.kid}"',
                 "alg RS256", "sent provider wip_header, service account sa_header",
                 "local checks passed; left: the service account mapping, a disabled provider or mapping, "
                 "the provider's uploaded JWKS stale"):
        assert fact in message, f"{fact!r} not in {message!r}"
    exp_in = re.search(r"exp in (\d+) s", message)
    assert exp_in and 3500 <= int(exp_in.group(1)) <= 3600, message
    assert len(message) <= 600
    assert_withheld(response, subject)
    assert standins.openai.api_requests == []


# ---------------------------------------------------------------------------------------------
# jwks_source: the issuer's keys fetched through an Envoy cluster


def jwks_cluster(port: int):
    """A bootstrap_patch: the cluster the filter fetches the key set through (to the JWKS stand-in)."""
    def patch(bootstrap: dict):
        bootstrap["static_resources"]["clusters"].append({
            "name": JWKS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": JWKS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
    return patch


def keyed_config(issuer: Issuer) -> dict:
    expect = {"issuer": issuer.iss, "audiences": [OPENAI_AUDIENCE],
              "claims": {"sub": "system:serviceaccount:default:*"},
              "jwks_source": {"cluster": JWKS_CLUSTER, "authority": JWKS_AUTHORITY, "path": JWKS_PATH,
                              "refresh_interval_s": 3600, "timeout_ms": JWKS_TIMEOUT_MS}}
    return envoy_config.filter_config("header", KEYS_PROVIDER, KEYS_ACCOUNT,
                                      hosts=envoy_config.params("local").api_hosts,
                                      token_endpoint={"timeout_ms": 2000}, expect=expect)


@dataclass
class Keyed:
    stack: Stack
    jwks: JwksStandin
    issuer: Issuer
    startup: list  # the answers while the first fetch was held, then until both workers answered 200
    held_fetches: int  # fetches that had arrived by the time the first fetch was released
    startup_fetches: int  # fetches by the time both workers answered 200
    startup_sub: str

    def subject(self, sub: str | None = None, **claims) -> tuple:
        sub = sub or unique_sub("keyed")
        return sub, self.issuer.mint(sub, OPENAI_AUDIENCE, **claims)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, standins, module_path):
    """The jwks_source gateway, started with its JWKS fetch held: requests until the fetch has arrived
    and a few more while it is in flight (503s), then the fetch is released and requests go on until
    each worker has answered 200."""
    issuer = Issuer(KEYS_ISSUER)
    jwks = JwksStandin(issuer, JWKS_PATH).start()
    standins.openai.add_provider(KEYS_PROVIDER, issuer, OPENAI_AUDIENCE,
                                 [mapping(KEYS_ACCOUNT, sub="system:serviceaccount:default:*")])
    stack = Stack("header", tmp_path_factory.mktemp("gateway-jwks-source"), standins=standins,
                  filter_config=keyed_config(issuer), bootstrap_patch=jwks_cluster(jwks.port))
    try:
        jwks.hold()
        stack.start()
        sub = unique_sub("startup")
        subject = issuer.mint(sub, OPENAI_AUDIENCE)
        startup = [call(stack, subject)]
        fetched = jwks.wait_for_fetches(1, timeout_s=WAIT_S)
        startup += [call(stack, subject) for _ in range(4)]
        held_fetches = jwks.fetches
        jwks.release()
        assert fetched, f"no JWKS fetch within {WAIT_S} s of a request; answers {startup}"

        serve_on_both_workers(stack, subject, startup, "both workers to answer 200 after the fetch")
        yield Keyed(stack, jwks, issuer, startup, held_fetches, jwks.fetches, sub)
    finally:
        jwks.release()
        stack.stop()
        jwks.stop()
        standins.openai.providers.pop(KEYS_PROVIDER, None)


def test_keys_are_fetched_once_for_all_workers_and_requests_get_503_until_then(keyed, standins):
    first_served = next(i for i, r in enumerate(keyed.startup) if r.status == 200)
    waiting, served = keyed.startup[:first_served], keyed.startup[first_served:]
    assert len(waiting) >= 5  # before the fetch, and while it was held
    for response in waiting + [r for r in served if r.status != 200]:
        assert_keys_unavailable(response, "failed the known_key check",
                                f"the issuer's JWKS has not been fetched yet from cluster {JWKS_CLUSTER}")
    for response in served:
        assert response.status in (200, 503), response
        if response.status == 200:
            assert response.header("x-standin-sub") == keyed.startup_sub, response
    assert keyed.held_fetches == 1, f"{keyed.held_fetches} fetches arrived while the first was in flight"
    assert keyed.startup_fetches == 1, f"{keyed.startup_fetches} fetches at start-up"
    fetch = keyed.jwks.fetch_log[0]
    assert fetch["headers"].get("host") == JWKS_AUTHORITY and "authorization" not in fetch["headers"]

    # Every worker then uses the fetched set: a burst on both, one exchange, no other fetch.
    fetches = keyed.jwks.fetches
    sub, subject = keyed.subject()
    before = keyed.stack.envoy.worker_connections()
    burst_at = time.time()
    responses = keyed.stack.burst(30, headers={SUBJECT_HEADER: subject}, timeout=20)
    assert histogram(responses) == {(200, None): 30}, histogram(responses)
    assert_both_workers(keyed.stack, before)
    assert standins.openai.exchanges_for(sub) == 1
    stats = keyed.stack.stats()
    assert keyed.jwks.fetches == fetches, f"fetches (arrived, answered): {fetch_times(keyed.jwks)}, " \
                                          f"the burst at {round(burst_at - keyed.jwks.fetch_log[0]['time'], 3)}"
    assert (stats.get("jwks_fetch_ok"), stats.get("jwks_fetch_failed", 0)) == (fetches, 0), stats


def test_unknown_kid_fetches_the_keys_again_once_with_503_meanwhile_and_the_rotated_key_is_accepted(
        keyed, standins):
    jwks, stack = keyed.jwks, keyed.stack
    fetches = jwks.fetches
    old_sub, old_subject = keyed.subject()  # signed with the key the gateway has
    new_kid = keyed.issuer.rotate()
    standins.openai.set_provider_keys(KEYS_PROVIDER, keyed.issuer)
    new_sub, new_subject = keyed.subject()
    # The one clock wait: a kid the set lacks makes it be fetched again only 5 s after the last fetch.
    time.sleep(max(0.0, jwks.last_answered_at() + UNKNOWN_KID_REFETCH_S + 0.5 - time.time()))

    jwks.hold()
    try:
        first = call(stack, new_subject)
        assert_keys_unavailable(first, new_kid, "fetching the issuer's keys again")
        assert jwks.wait_for_fetches(fetches + 1, timeout_s=WAIT_S), "no fetch of the keys for an unknown kid"
        meanwhile = [call(stack, new_subject) for _ in range(6)]  # new connections: both workers
        for response in meanwhile:
            assert_keys_unavailable(response)
        known = call(stack, old_subject)  # a kid the gateway has is not held up by the fetch
        assert known.status == 200 and known.header("x-standin-sub") == old_sub, known
        assert standins.openai.exchanges_for(new_sub, ok_only=False) == 0
    finally:
        jwks.release()

    after = []
    serve_on_both_workers(stack, new_subject, after, "both workers to accept the rotated key")
    for response in after:
        if response.status == 200:
            assert response.header("x-standin-sub") == new_sub, response
        else:
            assert_keys_unavailable(response)
    assert standins.openai.exchanges_for(new_sub) == 1
    assert jwks.fetches == fetches + 1, \
        f"{jwks.fetches - fetches} fetches for one unknown kid; (arrived, answered): {fetch_times(jwks)}"
    stats = stack.stats()
    assert (stats.get("jwks_fetch_ok"), stats.get("jwks_fetch_failed", 0)) == (jwks.fetches, 0), stats

    # A kid still unknown after the fetch: refused at known_key, no other fetch, no exchange.
    stranger_sub = unique_sub("stranger")
    stranger = keyed.issuer.token(keyed.issuer.claims(stranger_sub, OPENAI_AUDIENCE),
                                  header={"kid": "kid-never-published"})
    refused = call(stack, stranger)
    assert refused.status == 401, refused
    error = error_of(refused)
    assert error["code"] == INVALID, error
    assert error["message"].startswith("subject token failed the known_key check: "), error["message"]
    assert 'kid "kid-never-published" is not in the issuer\'s JWKS' in error["message"]
    assert new_kid in error["message"], error["message"]
    assert_withheld(refused, stranger)
    assert jwks.fetches == fetches + 1
    assert standins.openai.exchanges_for(stranger_sub, ok_only=False) == 0


# ---------------------------------------------------------------------------------------------
# A platform source: the gateway's own subject is checked too


def test_gateway_subject_failing_a_check_is_a_503_naming_the_check_and_nothing_is_exchanged(standins, make_stack):
    expected_issuer = "https://kubernetes.default.svc"
    k8s = standins.issuers["k8s"]
    stack = make_stack("kubernetes", filter_settings={
        "subject": {"refresh_interval_s": 3600, "timeout_ms": 1000}, "token_endpoint": {"timeout_ms": 1000},
        "expect": {"issuer": expected_issuer, "audiences": [OPENAI_AUDIENCE], "jwks": k8s.jwks()}})
    responses = [call(stack, headers=CLIENT_HEADERS) for _ in range(3)]
    for response in responses:
        assert response.status == 503, response
        error = error_of(response)
        assert (error["code"], error["type"]) == (SOURCE_UNAVAILABLE, "server_error"), error
        assert "failed the issuer check" in error["message"], error["message"]
        assert f'iss is "{k8s.iss}", the provider expects "{expected_issuer}"' in error["message"], error["message"]
        assert_withheld(response, standins.token_dir.current())
    assert_nothing_upstream(standins)
    assert stack.envoy.counter("subject_fetch_failed") >= 1
