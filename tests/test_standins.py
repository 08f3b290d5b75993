"""Tests of the stand-ins themselves: they must follow the documented protocols, or the end-to-end
tests prove nothing."""

import base64
import hashlib
import hmac
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlencode

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import RawConnection, encode_chunks, encode_request, raw_request
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from tests.standins import Standins
from tests.standins.azure_imds import AzureImdsStandin
from tests.standins.gcp_metadata import GcpMetadataStandin
from tests.standins.issuer import Issuer, compact
from tests.standins.jwks import JwksStandin
from tests.standins.kubelet import ProjectedTokenDir
from tests.standins.openai import GRANT_TYPE, OpenAIStandin, claim_matches, mapping
from tests.standins.spiffe import SpiffeStandin

AUD = "https://api.openai.com/v1"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
SUB = "spiffe://example.com/ns/inference/sa/worker"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call(port, method, target, body=None, headers=None):
    """(status, lower-case headers, body bytes); raises ConnectionError if the server hangs up."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def decode(token, issuer, audience):
    return jwt.decode(token, jwt.PyJWK(issuer.public_jwk()).key, algorithms=["RS256"], audience=audience,
                      issuer=issuer.iss)


@pytest.fixture(scope="module")
def issuer():
    return Issuer("https://spiffe.example.com")


@pytest.fixture(scope="module")
def openai_server(issuer):
    server = OpenAIStandin()
    server.add_provider("wip_test", issuer, AUD, [mapping("sa_test", sub="spiffe://example.com/ns/inference/*"),
                                                  mapping("sa_bare", sub="*")])
    with server:
        yield server


@pytest.fixture
def openai(openai_server):
    openai_server.reset()
    openai_server.default_expires_in = 3600
    yield openai_server
    openai_server.reset()


def exchange_body(subject_token, /, **overrides):
    body = {"grant_type": GRANT_TYPE, "subject_token_type": JWT_TYPE, "subject_token": subject_token,
            "identity_provider_id": "wip_test", "service_account_id": "sa_test"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def exchange(server, subject_token, **overrides):
    status, headers, body = call(server.port, "POST", "/oauth/token", exchange_body(subject_token, **overrides))
    return status, headers, json.loads(body) if body.strip().startswith(b"{") else body


# Issuer


def test_issuer_mints_rs256_tokens_with_kid_that_verify_against_its_jwks(issuer):
    token = issuer.mint(SUB, AUD, 600, extra="x")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["kid"] == issuer.kid
    assert [k["kid"] for k in issuer.jwks()["keys"]] == [issuer.kid]
    claims = decode(token, issuer, AUD)
    assert claims["sub"] == SUB and claims["extra"] == "x"
    assert claims["exp"] - claims["iat"] == 600 and claims["nbf"] == claims["iat"]


def test_issuer_broken_tokens_are_each_broken(issuer):
    key = jwt.PyJWK(issuer.public_jwk()).key
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(issuer.mint_wrong_signature(SUB, AUD), key, algorithms=["RS256"], audience=AUD)
    assert jwt.get_unverified_header(issuer.mint_unknown_kid(SUB, AUD))["kid"] != issuer.kid
    assert "kid" not in jwt.get_unverified_header(issuer.mint_without_kid(SUB, AUD))
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(issuer.mint_expired(SUB, AUD), issuer, AUD)
    with pytest.raises(jwt.InvalidIssuerError):
        decode(issuer.mint_wrong_iss(SUB, AUD), issuer, AUD)
    with pytest.raises(jwt.InvalidAudienceError):
        decode(issuer.mint_wrong_aud(SUB), issuer, AUD)


# Token endpoint


def test_exchange_accepts_a_good_subject_token(openai, issuer):
    status, headers, body = exchange(openai, issuer.mint(SUB, AUD))
    assert status == 200, openai.last_rejection
    assert headers["content-type"] == "application/json"
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert body["token_type"] == "Bearer" and body["access_token"].startswith("oaiwif_")
    assert 3590 <= body["expires_in"] <= 3600
    record = openai.issued[body["access_token"]]
    assert (record["sub"], record["service_account_id"], record["identity_provider_id"]) == (SUB, "sa_test", "wip_test")
    assert (openai.exchanges, openai.exchanges_ok) == (1, 1)
    entry = openai.exchange_log[0]
    assert entry["ok"] and entry["sub"] == SUB and entry["service_account_id"] == "sa_test"
    assert entry["fields"] == sorted(exchange_body("x"))


def test_exchange_accepts_id_token_type_and_audience_lists(openai, issuer):
    token = issuer.mint(SUB, ["https://other.example.com", AUD])
    status, _, _ = exchange(openai, token, subject_token_type="urn:ietf:params:oauth:token-type:id_token")
    assert status == 200, openai.last_rejection


BAD_EXCHANGES = {
    "bad_signature": lambda i: exchange_body(i.mint_wrong_signature(SUB, AUD)),
    "unknown_kid": lambda i: exchange_body(i.mint_unknown_kid(SUB, AUD)),
    "missing_kid": lambda i: exchange_body(i.mint_without_kid(SUB, AUD)),
    "wrong_issuer": lambda i: exchange_body(i.mint_wrong_iss(SUB, AUD)),
    "wrong_audience": lambda i: exchange_body(i.mint_wrong_aud(SUB)),
    "expired": lambda i: exchange_body(i.mint_expired(SUB, AUD, expired_s_ago=1)),
    "not_yet_valid": lambda i: exchange_body(i.mint(SUB, AUD, nbf=int(time.time()) + 600)),
    "issued_in_future": lambda i: exchange_body(i.mint(SUB, AUD, iat=int(time.time()) + 600)),
    "missing_exp": lambda i: exchange_body(i.sign({"iss": i.iss, "sub": SUB, "aud": AUD})),
    "malformed_token": lambda i: exchange_body("not.a.jwt"),
    "no_matching_mapping": lambda i: exchange_body(i.mint("spiffe://example.com/ns/other/sa/x", AUD)),
    "no_matching_mapping:prefix_is_not_a_wildcard": lambda i: exchange_body(i.mint("spiffe://example.com/ns/inference", AUD)),
    "no_matching_mapping:bare_star": lambda i: exchange_body(i.mint(SUB, AUD), service_account_id="sa_bare"),
    "unknown_service_account": lambda i: exchange_body(i.mint(SUB, AUD), service_account_id="sa_other"),
    "unknown_identity_provider": lambda i: exchange_body(i.mint(SUB, AUD), identity_provider_id="wip_other"),
    "unsupported_grant_type": lambda i: exchange_body(i.mint(SUB, AUD), grant_type="client_credentials"),
    "unsupported_subject_token_type": lambda i: exchange_body(
        i.mint(SUB, AUD), subject_token_type="urn:ietf:params:oauth:token-type:access_token"),
    **{f"missing_field:{name}": (lambda name: lambda i: exchange_body(i.mint(SUB, AUD), **{name: None}))(name)
       for name in ("grant_type", "subject_token_type", "subject_token", "identity_provider_id", "service_account_id")},
}


@pytest.mark.parametrize("case", sorted(BAD_EXCHANGES))
def test_exchange_rejects_with_a_generic_500(openai, issuer, case):
    status, headers, body = call(openai.port, "POST", "/oauth/token", BAD_EXCHANGES[case](issuer))
    assert status == 500
    expected = case if case.startswith("missing_field:") else case.split(":")[0]
    assert openai.last_rejection == expected
    # Like the real endpoint, the body says nothing about the cause.
    assert json.loads(body)["error"]["type"] == "server_error"
    assert case.split(":")[0].encode() not in body
    assert (openai.exchanges, openai.exchanges_ok) == (1, 0)
    assert openai.exchange_log[0]["ok"] is False


def test_exchange_requires_a_json_body(openai, issuer):
    form = urlencode(exchange_body(issuer.mint(SUB, AUD)))
    status, _, _ = call(openai.port, "POST", "/oauth/token", form,
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 500 and openai.last_rejection == "bad_content_type"
    status, _, _ = call(openai.port, "POST", "/oauth/token", "{not json", {"Content-Type": "application/json"})
    assert status == 500 and openai.last_rejection == "bad_json"


@pytest.mark.parametrize("expected, actual, matches", [
    ("spiffe://example.com/ns/*", "spiffe://example.com/ns/a/b", True),
    ("spiffe://example.com/ns/*", "spiffe://example.com/ns/", True),
    ("spiffe://example.com/ns/*", "spiffe://example.com/other", False),
    ("*", "anything", False),
    ("spiffe://*/ns/*", "spiffe://example.com/ns/a", False),
    ("spiffe://*/ns/a", "spiffe://*/ns/a", True),
    ("exact", "exact", True),
    ("exact", "exactly", False),
    ("exact", None, False),
    ("abc*", ["x", "abcd"], True),
    ("abc*", 42, False),
])
def test_mapping_values_allow_one_trailing_wildcard_with_a_prefix(expected, actual, matches):
    assert claim_matches(expected, actual) is matches


def test_expires_in_never_outlives_the_subject_token(openai, issuer):
    _, _, body = exchange(openai, issuer.mint(SUB, AUD, lifetime_s=120))
    assert 118 <= body["expires_in"] <= 120
    openai.default_expires_in = 60
    _, _, body = exchange(openai, issuer.mint(SUB, AUD))
    assert body["expires_in"] == 60
    openai.expires_in_override = 5
    _, _, body = exchange(openai, issuer.mint(SUB, AUD))
    assert body["expires_in"] == 5
    assert openai.issued[body["access_token"]]["expires_at"] <= time.time() + 5


def test_exchange_faults(openai, issuer):
    token = issuer.mint(SUB, AUD)
    openai.set_fault("500")
    assert exchange(openai, token)[0] == 500
    openai.set_fault("429", retry_after=7)
    status, headers, body = exchange(openai, token)
    assert status == 429 and headers["retry-after"] == "7" and body["error"]["code"] == "rate_limit_exceeded"
    openai.set_fault("garbage")
    status, _, body = call(openai.port, "POST", "/oauth/token", exchange_body(token))
    assert status == 200 and body.startswith(b"{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
    openai.set_fault("html")
    status, headers, _ = exchange(openai, token)
    assert status == 200 and headers["content-type"].startswith("text/html")
    openai.set_fault("reset")
    with pytest.raises(ConnectionError):
        exchange(openai, token)
    openai.set_fault("no_expires_in")
    status, _, body = exchange(openai, token)
    assert status == 200 and "expires_in" not in body and body["access_token"] in openai.issued
    openai.set_fault("bad_token_type")
    status, _, body = exchange(openai, token)
    assert body["token_type"] != "Bearer" and body["access_token"] not in openai.issued
    openai.set_fault("empty_token")
    assert exchange(openai, token)[2]["access_token"] == ""
    assert openai.exchanges == 8 and openai.exchanges_ok == 1  # only no_expires_in gave a usable token
    assert openai.last_rejection is None  # faults are not rejections


def test_exchange_fault_slow_and_fault_times(openai, issuer):
    token = issuer.mint(SUB, AUD)
    openai.set_fault("slow", slow_seconds=0.3)
    started = time.monotonic()
    assert exchange(openai, token)[0] == 200
    assert time.monotonic() - started >= 0.3
    openai.set_fault("500", times=2)
    assert [exchange(openai, token)[0] for _ in range(3)] == [500, 500, 200]
    assert openai.fault is None


def test_exchange_hold_keeps_exchanges_waiting_until_released(openai, issuer):
    token = issuer.mint(SUB, AUD)
    openai.hold()
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(exchange(openai, token)[0])) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while openai.exchanges < 3:
        assert time.monotonic() < deadline, "held exchanges are counted as they arrive"
        time.sleep(0.01)
    assert answers == [] and openai.exchanges_ok == 0
    openai.release()
    for thread in threads:
        thread.join(5)
    assert answers == [200, 200, 200] and openai.exchanges_ok == 3
    openai.hold()
    openai.reset()  # a test that ends holding leaves no exchange stuck
    assert exchange(openai, token)[0] == 200


def test_exchange_answers_oauth_errors_when_asked(openai, issuer):
    openai.oauth_errors = True
    cases = [(exchange_body(issuer.mint(SUB, AUD), service_account_id="sa_other"), 400, "invalid_grant"),
             (exchange_body(issuer.mint("spiffe://example.com/ns/other/sa/x", AUD)), 400, "invalid_grant"),
             (exchange_body(issuer.mint(SUB, AUD), grant_type="client_credentials"), 400, "invalid_request"),
             (exchange_body(issuer.mint_wrong_signature(SUB, AUD)), 401, "invalid_subject_token"),
             (exchange_body(issuer.mint_expired(SUB, AUD)), 401, "invalid_subject_token")]
    for body, status, error in cases:
        answer_status, _, answer = call(openai.port, "POST", "/oauth/token", body)
        answer = json.loads(answer)
        assert (answer_status, answer["error"]) == (status, error), (openai.last_rejection, answer)
        assert set(answer) == {"error", "error_description"} and answer["error_description"]
    assert openai.exchanges_ok == 0
    openai.reset()
    assert exchange(openai, issuer.mint(SUB, AUD), service_account_id="sa_other")[0] == 500


# Rotating issuers and their jwks_uri


def test_issuer_rotation_signs_with_a_new_kid_and_keeps_publishing_the_old_keys():
    rotating = Issuer("https://rotating.example.com")
    first = rotating.kid
    old_token = rotating.mint(SUB, AUD)
    second = rotating.rotate()
    new_token = rotating.mint(SUB, AUD)
    assert second != first and rotating.kid == second and rotating.kids == [first, second]
    assert [k["kid"] for k in rotating.jwks()["keys"]] == [first, second]
    assert rotating.public_jwk(first)["n"] != rotating.public_jwk(second)["n"]
    assert rotating.public_jwk() == rotating.public_jwk(second)
    for token, kid in ((old_token, first), (new_token, second)):
        assert jwt.get_unverified_header(token)["kid"] == kid
        jwt.decode(token, jwt.PyJWK(rotating.public_jwk(kid)).key, algorithms=["RS256"], audience=AUD)
        with pytest.raises(jwt.InvalidSignatureError):
            other = first if kid == second else second
            jwt.decode(token, jwt.PyJWK(rotating.public_jwk(other)).key, algorithms=["RS256"], audience=AUD)


def test_issuer_token_signs_any_header_with_any_key(issuer):
    claims = issuer.claims(SUB, AUD)
    token = issuer.token(claims, header={"typ": None, "kid": "../../etc/passwd", "x": 1})
    assert jwt.get_unverified_header(token) == {"alg": "RS256", "kid": "../../etc/passwd", "x": 1}
    jwt.decode(token, jwt.PyJWK(issuer.public_jwk()).key, algorithms=["RS256"], audience=AUD)

    pem = jwt.PyJWK(issuer.public_jwk()).key.public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    confused = issuer.token(claims, key=pem, alg="HS256")
    signing_input, _, signature = confused.rpartition(".")
    expected = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected
    assert jwt.get_unverified_header(confused)["alg"] == "HS256"

    ec_key = ec.generate_private_key(ec.SECP256R1())
    es = issuer.token(claims, key=ec_key, alg="ES256")
    jwt.decode(es, ec_key.public_key(), algorithms=["ES256"], audience=AUD)
    assert len(base64.urlsafe_b64decode(es.rsplit(".", 1)[1] + "==")) == 64  # r || s, as JWS wants

    unsigned = compact({"alg": "none"}, claims)
    assert unsigned.endswith(".") and jwt.decode(unsigned, options={"verify_signature": False})["sub"] == SUB
    assert compact("not json", "{}", b"sig").split(".")[0] == "bm90IGpzb24"


@pytest.fixture
def jwks_server():
    rotating = Issuer("https://rotating.example.com")
    with JwksStandin(rotating) as server:
        yield server


def test_jwks_standin_serves_the_issuers_current_keys_and_counts_fetches(jwks_server):
    status, headers, body = call(jwks_server.port, "GET", "/openid/v1/jwks")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == jwks_server.issuer.jwks() and len(json.loads(body)["keys"]) == 1
    new_kid = jwks_server.issuer.rotate()
    status, _, body = call(jwks_server.port, "GET", "/openid/v1/jwks")
    assert [k["kid"] for k in json.loads(body)["keys"]][-1] == new_kid and len(json.loads(body)["keys"]) == 2
    assert jwks_server.fetches == 2 and len(jwks_server.fetch_log) == 2
    last = jwks_server.fetch_log[-1]
    assert jwks_server.last_answered_at() == last["answered"] >= last["time"]
    assert call(jwks_server.port, "GET", "/other")[0] == 404
    assert call(jwks_server.port, "POST", "/openid/v1/jwks", body={})[0] == 405
    assert jwks_server.fetches == 2, "only GETs of the key set are fetches"
    jwks_server.set_fault("500")
    assert call(jwks_server.port, "GET", "/openid/v1/jwks")[0] == 500
    jwks_server.set_fault("garbage")
    status, _, body = call(jwks_server.port, "GET", "/openid/v1/jwks")
    assert status == 200 and not body.endswith(b"}")
    jwks_server.reset()
    assert jwks_server.fetches == 0 and jwks_server.fault is None


def test_jwks_standin_holds_fetches_until_released(jwks_server):
    jwks_server.hold()
    answers = []
    thread = threading.Thread(target=lambda: answers.append(call(jwks_server.port, "GET", "/openid/v1/jwks")[0]))
    thread.start()
    assert jwks_server.wait_for_fetches(1, timeout_s=5), "a held fetch is counted as it arrives"
    assert not jwks_server.wait_for_fetches(2, timeout_s=0.05)
    assert answers == [] and jwks_server.last_answered_at() is None
    jwks_server.release()
    thread.join(5)
    assert answers == [200] and jwks_server.last_answered_at() is not None


def test_provider_trusts_a_rotated_key_once_its_keys_are_set(openai):
    rotating = Issuer("https://rotating.example.com")
    openai.add_provider("wip_rotating", rotating, AUD, [mapping("sa_rotating", sub=SUB)])
    body = {"identity_provider_id": "wip_rotating", "service_account_id": "sa_rotating"}
    rotating.rotate()
    assert exchange(openai, rotating.mint(SUB, AUD), **body)[0] == 500
    assert openai.last_rejection == "unknown_kid"
    openai.set_provider_keys("wip_rotating", rotating)
    assert exchange(openai, rotating.mint(SUB, AUD), **body)[0] == 200
    rotating.rotate()  # later rotations, too: the provider's keys are a snapshot until set again
    assert exchange(openai, rotating.mint(SUB, AUD), **body)[0] == 500
    del openai.providers["wip_rotating"]


# API


def test_api_accepts_issued_tokens(openai, issuer):
    access = exchange(openai, issuer.mint(SUB, AUD))[2]["access_token"]
    auth = {"Authorization": f"Bearer {access}", "x-openai-subject-token": "leak?"}
    status, headers, body = call(openai.port, "POST", "/v1/chat/completions", {"model": "gpt-x", "messages": []}, auth)
    assert status == 200
    assert headers["x-standin-sub"] == SUB and headers["x-standin-service-account"] == "sa_test"
    completion = json.loads(body)
    assert completion["object"] == "chat.completion" and completion["model"] == "gpt-x"
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant" and completion["choices"][0]["finish_reason"] == "stop"
    assert message["content"] == f"Hello from the OpenAI stand-in, authorised as sa_test for {SUB}"
    assert completion["usage"]["total_tokens"] > 0
    status, _, body = call(openai.port, "GET", "/v1/models", headers=auth)
    assert status == 200 and json.loads(body)["object"] == "list"
    status, _, body = call(openai.port, "GET", "/v1/files", headers=auth)
    assert status == 200 and json.loads(body) == {"ok": True}
    path, authorization, seen = openai.api_requests[0]
    assert path == "/v1/chat/completions" and authorization == f"Bearer {access}"
    assert seen["x-openai-subject-token"] == "leak?"
    assert openai.api_ok == 3


def test_api_chat_completion_parses_with_the_openai_sdk(openai, issuer):
    openai_sdk = pytest.importorskip("openai")
    access = exchange(openai, issuer.mint(SUB, AUD))[2]["access_token"]
    client = openai_sdk.OpenAI(api_key=access, base_url=openai.url + "/v1", max_retries=0)
    completion = client.chat.completions.create(model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content.startswith("Hello from the OpenAI stand-in")
    response = client.responses.create(model="gpt-4.1-mini", input="hi")
    assert response.output_text.startswith("Hello from the OpenAI stand-in")


def test_api_rejects_unknown_expired_and_revoked_tokens(openai, issuer):
    def status_with(authorization):
        headers = {"Authorization": authorization} if authorization else {}
        status, _, body = call(openai.port, "GET", "/v1/models", headers=headers)
        if status == 401:
            assert json.loads(body) == {"error": {"message": json.loads(body)["error"]["message"],
                                                  "type": "invalid_request_error", "param": None,
                                                  "code": "invalid_api_key"}}
        return status

    good = openai.issue_token(SUB, "sa_test", "wip_test")
    expired = openai.issue_token(SUB, "sa_test", "wip_test", lifetime_s=-1)
    revoked = openai.issue_token(SUB, "sa_test", "wip_test")
    openai.revoke(revoked)
    assert status_with(f"Bearer {good}") == 200
    assert status_with(None) == 401
    assert status_with("Bearer sk-static-key") == 401
    assert status_with(f"Basic {good}") == 401
    assert status_with(f"Bearer {expired}") == 401
    assert status_with(f"Bearer {revoked}") == 401
    openai.api_force_401 = True
    assert status_with(f"Bearer {good}") == 401
    assert openai.api_denied == 6


def test_api_and_echo_record_trailers(openai, issuer):
    access = exchange(openai, issuer.mint(SUB, AUD))[2]["access_token"]
    trailers = [("Authorization", "Bearer in-a-trailer"), ("X-Thing", "\xff1")]
    reply = raw_request(openai.port, encode_request(
        "POST", "/v1/files", {"Host": "x", "Authorization": f"Bearer {access}"}, chunks=[b"ab", b"c"],
        trailers=trailers))
    assert reply.status == 200
    assert openai.api_trailers == [{"authorization": "Bearer in-a-trailer", "x-thing": "\xff1"}]
    reply = raw_request(openai.port, encode_request("POST", "/echo/t", {"Host": "x"}, chunks=[b"abc"],
                                                    trailers=trailers))
    echoed = reply.json()
    assert echoed["trailers"] == {"authorization": "Bearer in-a-trailer", "x-thing": "\xff1"}
    assert echoed["body_bytes"] == 3


def test_api_answers_early_before_the_body_when_asked(openai, issuer):
    access = exchange(openai, issuer.mint(SUB, AUD))[2]["access_token"]
    openai.answer_early = True
    with RawConnection(openai.port, timeout=5, method="POST") as raw:
        raw.send(encode_request("POST", "/v1/uploads", {"Host": "x", "Authorization": f"Bearer {access}"},
                                chunks=[b"12345"], end=False))
        head = raw.response_head()
        assert head.status == 200 and head.header("x-standin-sub") == SUB
        assert openai.api_early == [("/v1/uploads", f"Bearer {access}")] and openai.api_requests == []
        raw.send(encode_chunks([b"678"], last=True))
        rest = raw.response_rest()
    assert rest.status == 200 and rest.json() == {"object": "upload", "bytes": 8}
    assert len(openai.api_requests) == 1
    # Unauthorised requests are refused as usual, after the body.
    status, _, _ = call(openai.port, "POST", "/v1/uploads", b"x", {"Authorization": "Bearer sk-nope"})
    assert status == 401 and len(openai.api_early) == 1
    openai.reset()
    assert openai.answer_early is False


def test_token_endpoint_sends_extra_header_bytes_as_given(openai, issuer):
    openai.set_fault("429", token_headers=[("Retry-After", "1\xff\xfe")])
    reply = raw_request(openai.port, encode_request(
        "POST", "/oauth/token", {"Host": "x", "Content-Type": "application/json"},
        body=json.dumps(exchange_body(issuer.mint(SUB, AUD))).encode()))
    assert reply.status == 429
    assert reply.header("retry-after").encode("latin-1") == b"1\xff\xfe"  # the raw bytes 0xff 0xfe
    openai.reset_faults()
    assert openai.token_headers == [] and exchange(openai, issuer.mint(SUB, AUD))[0] == 200


def test_echo_returns_the_request_headers(openai):
    status, _, body = call(openai.port, "GET", "/echo/a?b=1", headers={"X-Thing": "1", "Authorization": "k"})
    echoed = json.loads(body)
    assert status == 200 and echoed["path"] == "/echo/a?b=1"
    assert echoed["headers"]["x-thing"] == "1" and echoed["headers"]["authorization"] == "k"


def test_http_standin_restarts_on_the_same_port(issuer):
    server = OpenAIStandin().start()
    port = server.port
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        call(port, "GET", "/echo")
    server.start()
    try:
        assert server.port == port and call(port, "GET", "/echo")[0] == 200
    finally:
        server.stop()


# GCP metadata server

GCP_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"


@pytest.fixture(scope="module")
def gcp_server():
    with GcpMetadataStandin(Issuer("https://accounts.google.com"), "1101", "wif@p.iam.gserviceaccount.com",
                            lifetime_s=900) as server:
        yield server


@pytest.fixture
def gcp(gcp_server):
    gcp_server.reset()
    yield gcp_server
    gcp_server.reset()


def gcp_get(gcp, query=None, headers=None):
    target = GCP_PATH + ("?" + urlencode(query) if query is not None else "")
    return call(gcp.port, "GET", target, headers={"Metadata-Flavor": "Google"} if headers is None else headers)


def test_gcp_identity_token_for_the_requested_audience(gcp):
    status, headers, body = gcp_get(gcp, {"audience": AUD, "format": "full"})
    assert status == 200 and headers["content-type"].startswith("text/plain")
    claims = decode(body.decode(), gcp.issuer, AUD)
    assert (claims["iss"], claims["sub"], claims["azp"]) == ("https://accounts.google.com", "1101", "1101")
    assert claims["email"] == "wif@p.iam.gserviceaccount.com" and claims["exp"] - claims["iat"] == 900
    assert gcp.requests == 1
    assert gcp.last_request.path == GCP_PATH and gcp.last_request.query == {"audience": AUD, "format": "full"}
    assert gcp.last_request.headers["metadata-flavor"] == "Google"


def test_gcp_requires_the_header_and_an_audience(gcp):
    assert gcp_get(gcp, {"audience": AUD}, headers={})[0] == 403
    assert gcp_get(gcp, {"audience": AUD}, headers={"Metadata-Flavor": "google-ish"})[0] == 403
    assert gcp_get(gcp, {"audience": AUD}, headers={"Metadata-Flavor": "Google", "X-Forwarded-For": "10.0.0.1"})[0] == 403
    assert gcp_get(gcp, {"format": "full"})[0] == 400
    assert call(gcp.port, "GET", "/computeMetadata/v1/other", headers={"Metadata-Flavor": "Google"})[0] == 404


@pytest.mark.parametrize("fault, status", [("500", 500), ("404", 404), ("403", 403), ("429", 429)])
def test_gcp_status_faults(gcp, fault, status):
    gcp.fault = fault
    assert gcp_get(gcp, {"audience": AUD})[0] == status


def test_gcp_content_faults(gcp):
    gcp.fault = "empty"
    assert gcp_get(gcp, {"audience": AUD})[2] == b""
    gcp.fault = "not_jwt"
    with pytest.raises(jwt.DecodeError):
        jwt.get_unverified_header(gcp_get(gcp, {"audience": AUD})[2].decode())
    gcp.fault = "expired"
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(gcp_get(gcp, {"audience": AUD})[2].decode(), gcp.issuer, AUD)
    gcp.fault = "down"
    with pytest.raises(ConnectionError):
        gcp_get(gcp, {"audience": AUD})
    gcp.fault, gcp.slow_seconds = "slow", 0.2
    started = time.monotonic()
    assert gcp_get(gcp, {"audience": AUD})[0] == 200 and time.monotonic() - started >= 0.2


def test_gcp_non_utf8_fault_serves_bytes_that_are_not_utf8(gcp):
    gcp.fault = "non_utf8"
    status, _, body = gcp_get(gcp, {"audience": AUD})
    assert status == 200 and body.count(b".") == 2 and b"\xff\xfe" in body
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    assert gcp.tokens == []


# Azure IMDS

IMDS_PATH = "/metadata/identity/oauth2/token"
RESOURCE = "api://00000000-1111-2222-3333-444444444444"
IDENTITY_A = {"client_id": "aaaa", "object_id": "oid-a", "msi_res_id": "/subscriptions/s/rg/identities/a"}
IDENTITY_B = {"client_id": "bbbb", "object_id": "oid-b", "msi_res_id": "/subscriptions/s/rg/identities/b"}


@pytest.fixture(scope="module")
def azure_server():
    issuer = Issuer("https://login.microsoftonline.com/tenant-1/v2.0")
    with AzureImdsStandin(issuer, "tenant-1", [IDENTITY_A]) as server:
        yield server


@pytest.fixture
def azure(azure_server):
    azure_server.reset()
    azure_server.identities = [IDENTITY_A]
    yield azure_server
    azure_server.reset()


def imds_get(azure, query, headers=None):
    status, _, body = call(azure.port, "GET", IMDS_PATH + "?" + urlencode(query),
                           headers={"Metadata": "true"} if headers is None else headers)
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def test_azure_managed_identity_token(azure):
    status, body = imds_get(azure, {"api-version": "2018-02-01", "resource": RESOURCE})
    assert status == 200
    assert set(body) == {"access_token", "client_id", "expires_in", "expires_on", "ext_expires_in",
                         "not_before", "resource", "token_type"}
    assert body["expires_in"] == "3600" and body["resource"] == RESOURCE and body["token_type"] == "Bearer"
    assert int(body["expires_on"]) - int(body["not_before"]) == 3600
    claims = decode(body["access_token"], azure.issuer, RESOURCE)
    assert (claims["tid"], claims["appid"], claims["oid"], claims["sub"]) == ("tenant-1", "aaaa", "oid-a", "oid-a")
    assert azure.requests == 1 and azure.last_request.query["resource"] == RESOURCE


def test_azure_selects_among_several_identities(azure):
    azure.identities = [IDENTITY_A, IDENTITY_B]
    base = {"api-version": "2018-02-01", "resource": RESOURCE}
    status, body = imds_get(azure, base)
    assert status == 400 and "Multiple user assigned identities" in body["error_description"]
    for selector in ("client_id", "object_id", "msi_res_id"):
        status, body = imds_get(azure, {**base, selector: IDENTITY_B[selector]})
        assert status == 200 and body["client_id"] == "bbbb"
    status, body = imds_get(azure, {**base, "client_id": "cccc"})
    assert status == 400 and body["error_description"] == "Identity not found"
    status, body = imds_get(azure, {**base, "client_id": "aaaa", "object_id": "oid-a"})
    assert status == 400 and body["error"] == "invalid_request"


def test_azure_requires_header_and_api_version(azure):
    status, body = imds_get(azure, {"api-version": "2018-02-01", "resource": RESOURCE}, headers={})
    assert status == 400 and body["error_description"] == "Required metadata header not specified"
    assert imds_get(azure, {"resource": RESOURCE})[0] == 400
    assert imds_get(azure, {"api-version": "2018-02-01"})[0] == 400
    assert imds_get(azure, {"api-version": "2018-02-01", "resource": RESOURCE},
                    headers={"Metadata": "true", "X-Forwarded-For": "10.0.0.1"})[0] == 400


def test_azure_faults(azure):
    query = {"api-version": "2018-02-01", "resource": RESOURCE}
    azure.fault = "no_token"
    status, body = imds_get(azure, query)
    assert status == 200 and "access_token" not in body and body["expires_in"] == "3600"
    azure.fault = "garbage"
    status, body = imds_get(azure, query)
    assert status == 200 and isinstance(body, bytes)
    azure.fault = "not_jwt"
    assert imds_get(azure, query)[1]["access_token"] == "this-is-not-a-jwt"
    azure.fault = "expired"
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(imds_get(azure, query)[1]["access_token"], azure.issuer, RESOURCE)
    azure.fault = "500"
    assert imds_get(azure, query)[0] == 500
    azure.fault = "empty"
    assert imds_get(azure, query) == (200, b"")
    azure.fault = "down"
    with pytest.raises(ConnectionError):
        imds_get(azure, query)


def test_azure_non_utf8_fault_serves_a_token_that_is_not_utf8(azure):
    azure.fault = "non_utf8"
    status, _, body = call(azure.port, "GET", IMDS_PATH + "?" + urlencode({"api-version": "2018-02-01",
                                                                            "resource": RESOURCE}),
                           headers={"Metadata": "true"})
    assert status == 200 and b'"access_token": "' in body and b"\xff\xfe" in body
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    assert azure.tokens == []


# Kubernetes projected token volume


def test_projected_token_dir_has_the_kubelet_layout(tmp_path):
    issuer = Issuer("https://kubernetes.example.com")
    volume = ProjectedTokenDir(tmp_path / "sa", issuer, lifetime_s=600)
    root = tmp_path / "sa"
    assert os.readlink(root / "token") == "..data/token"
    assert os.readlink(root / "..data").startswith("..2")
    claims = decode(volume.current(), issuer, AUD)
    assert claims["sub"] == "system:serviceaccount:default:openai-wif" and claims["aud"] == [AUD]
    assert claims["kubernetes.io"]["namespace"] == "default"

    first_version = os.readlink(root / "..data")
    tokens = {volume.current()}
    for _ in range(3):
        tokens.add(volume.rotate())
    assert len(tokens) == 4 and volume.current() in tokens
    assert not (root / first_version).exists()
    assert len([n for n in os.listdir(root) if n.startswith("..2")]) <= 3

    volume.write_raw("")
    assert volume.current() == ""
    volume.write_raw(b"eyJ\xff\xfe")
    with open(volume.path, "rb") as file:
        assert file.read() == b"eyJ\xff\xfe"
    volume.remove()
    with pytest.raises(FileNotFoundError):
        volume.current()
    volume.rotate()
    assert volume.current().count(".") == 2


def test_projected_token_resolves_when_data_is_swapped_in_even_after_removal(tmp_path, monkeypatch):
    """Directory watchers (Envoy's watched_directory) re-read the file on the ..data swap: by then
    the token link must exist, also on the first rotation after remove()."""
    volume = ProjectedTokenDir(tmp_path / "sa", Issuer("https://kubernetes.example.com"))
    rename, seen = os.rename, []

    def recording_rename(source, destination):
        rename(source, destination)
        if os.path.basename(destination) == "..data":
            try:
                with open(volume.path) as file:
                    seen.append(file.read())
            except OSError as error:
                seen.append(error)

    monkeypatch.setattr(os, "rename", recording_rename)
    volume.remove()
    token = volume.rotate()
    assert seen == [token]


def test_projected_token_stays_readable_through_rotations(tmp_path):
    volume = ProjectedTokenDir(tmp_path / "sa", Issuer("https://kubernetes.example.com"))
    problems, reads = [], [0]
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                with open(volume.path) as file:
                    text = file.read()
                if text.count(".") != 2 or len(text) < 100:
                    problems.append(f"partial: {text[:30]!r}")
                reads[0] += 1
            except OSError as error:
                problems.append(repr(error))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(100):
            volume.rotate()
            time.sleep(0.001)  # still thousands of times faster than a kubelet rotates
    finally:
        done.set()
        thread.join()
    assert problems == [] and reads[0] > 0 and volume.rotations == 101


# SPIFFE Workload API


@pytest.fixture(scope="module")
def spiffe_server():
    directory = tempfile.mkdtemp(prefix="wif-", dir="/tmp")  # unix socket paths must stay short
    server = SpiffeStandin(Issuer("https://oidc.spiffe.example.com"), os.path.join(directory, "agent.sock"))
    with server:
        yield server
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def spiffe(spiffe_server):
    spiffe_server.reset()
    spiffe_server.start()
    yield spiffe_server
    spiffe_server.reset()
    spiffe_server.start()


def raw_fetch(spiffe, metadata=(("workload.spiffe.io", "true"),), audience=(AUD,), spiffe_id=""):
    with grpc.insecure_channel(spiffe.address) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        return stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=spiffe_id),
                                 metadata=list(metadata), timeout=5)


def test_spiffe_client_library_fetches_a_jwt_svid(spiffe):
    client = WorkloadApiClient(spiffe.address)
    try:
        svid = client.fetch_jwt_svid(audience={AUD})
        assert str(svid.spiffe_id) == SUB and svid.audience == {AUD}
        claims = decode(svid.token, spiffe.issuer, AUD)
        assert claims["sub"] == SUB and claims["iss"] == spiffe.issuer.iss
        assert jwt.get_unverified_header(svid.token)["kid"] == spiffe.issuer.kid
        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle.get_jwt_authority(spiffe.issuer.kid) is not None
    finally:
        client.close()
    assert spiffe.requests == 1
    assert spiffe.last_metadata["workload.spiffe.io"] == "true"
    assert spiffe.last_request == {"audience": [AUD], "spiffe_id": ""}


def test_spiffe_refuses_like_an_agent(spiffe):
    with pytest.raises(grpc.RpcError) as error:
        raw_fetch(spiffe, metadata=())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        raw_fetch(spiffe, audience=())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        raw_fetch(spiffe, spiffe_id="spiffe://example.com/ns/other/sa/x")
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raw_fetch(spiffe, spiffe_id=SUB).svids[0].spiffe_id == SUB


def test_spiffe_faults_and_restart(spiffe):
    spiffe.fault = "unavailable"
    with pytest.raises(grpc.RpcError) as error:
        raw_fetch(spiffe)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    spiffe.fault = "no_svids"
    assert len(raw_fetch(spiffe).svids) == 0
    spiffe.fault = "not_jwt"
    assert raw_fetch(spiffe).svids[0].svid == "this-is-not-a-jwt"
    spiffe.fault = "expired"
    with pytest.raises(jwt.ExpiredSignatureError):
        decode(raw_fetch(spiffe).svids[0].svid, spiffe.issuer, AUD)
    spiffe.fault = None
    spiffe.stop()
    with pytest.raises(grpc.RpcError) as error:
        raw_fetch(spiffe)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    spiffe.start()
    assert raw_fetch(spiffe).svids[0].spiffe_id == SUB


# Everything wired together


def test_every_platform_token_exchanges_at_its_provider(tmp_path):
    with Standins.start_all(tmp_path) as standins:
        port = standins.openai.port

        def exchange_for(platform, token):
            wiring = standins.wiring[platform]
            status, _, body = call(port, "POST", "/oauth/token", exchange_body(
                token, identity_provider_id=wiring.identity_provider_id,
                service_account_id=wiring.service_account_id))
            assert status == 200, (platform, standins.openai.last_rejection)
            return json.loads(body)["access_token"]

        exchange_for("header", standins.subject_token("system:serviceaccount:default:app-a"))
        exchange_for("header", standins.subject_token("system:serviceaccount:default:app-b"))
        exchange_for("k8s", standins.token_dir.current())
        gcp_token = call(standins.gcp.port, "GET", GCP_PATH + "?" + urlencode({"audience": AUD}),
                         headers={"Metadata-Flavor": "Google"})[2].decode()
        exchange_for("gcp", gcp_token)
        imds = call(standins.azure.port, "GET", IMDS_PATH + "?" + urlencode(
            {"api-version": "2018-02-01", "resource": standins.wiring["azure"].audience}), headers={"Metadata": "true"})
        exchange_for("azure", json.loads(imds[2])["access_token"])
        svid = raw_fetch(standins.spiffe).svids[0].svid
        access = exchange_for("spiffe", svid)
        assert standins.openai.issued[access]["service_account_id"] == "sa_spiffe"
        assert standins.openai.exchanges_ok == 6
        # A token from one platform is no good at another platform's provider.
        status, _, _ = call(port, "POST", "/oauth/token", exchange_body(
            gcp_token, identity_provider_id="wip_k8s", service_account_id="sa_k8s"))
        assert status == 500 and standins.openai.last_rejection == "unknown_kid"
        standins.reset()
        assert standins.openai.exchanges == 0


def test_standins_run_as_a_process_for_the_demo(tmp_path):
    config = tmp_path / "standins.json"
    process = subprocess.Popen([sys.executable, "-m", "tests.standins", "--config", str(config)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not config.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        description = json.loads(config.read_text())
        status, _, body = call(description["openai"]["port"], "POST", "/oauth/token", exchange_body(
            description["subject_token"], identity_provider_id=description["identity_provider_id"],
            service_account_id=description["service_account_id"]))
        assert status == 200 and json.loads(body)["token_type"] == "Bearer"
        unmapped = description["subject_tokens"][description["unmapped_subject"]]
        status, _, _ = call(description["openai"]["port"], "POST", "/oauth/token", exchange_body(
            unmapped, identity_provider_id=description["identity_provider_id"],
            service_account_id=description["service_account_id"]))
        assert status == 500
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_team_service_accounts_are_mapped_for_the_gateway_and_for_each_teams_own_tokens(tmp_path):
    """The accounts the caller-rule tests give to teams: sa_inference and sa_batch for the gateway's
    own projected token (at wip_k8s, and sa_batch alone at a second provider for the same issuer),
    and for the header source each team's own service account tokens, by namespace."""
    from tests.standins import BATCH_PROVIDER, K8S_SUB, TEAM_ACCOUNTS

    assert TEAM_ACCOUNTS == ("sa_inference", "sa_batch")
    with Standins.start_all(tmp_path) as standins:
        port = standins.openai.port

        def exchange(token, provider, account):
            status, _, body = call(port, "POST", "/oauth/token", exchange_body(
                token, identity_provider_id=provider, service_account_id=account))
            if status != 200:
                return standins.openai.last_rejection
            record = standins.openai.issued[json.loads(body)["access_token"]]
            assert (record["identity_provider_id"], record["service_account_id"]) == (provider, account)
            return record["sub"]

        gateway = standins.token_dir.current()
        for provider, account in (("wip_k8s", "sa_k8s"), ("wip_k8s", "sa_inference"), ("wip_k8s", "sa_batch"),
                                  (BATCH_PROVIDER, "sa_batch")):
            assert exchange(gateway, provider, account) == K8S_SUB, (provider, account)
        assert exchange(gateway, BATCH_PROVIDER, "sa_inference") == "unknown_service_account"
        assert exchange(gateway, BATCH_PROVIDER, "sa_k8s") == "unknown_service_account"

        inference = "system:serviceaccount:ai:inference"
        job = "system:serviceaccount:batch:job"
        assert exchange(standins.subject_token(inference), "wip_header", "sa_inference") == inference
        assert exchange(standins.subject_token(job), "wip_header", "sa_batch") == job
        for sub, account in ((job, "sa_inference"), (inference, "sa_batch"),
                             ("system:serviceaccount:default:app", "sa_inference"),
                             ("system:serviceaccount:aix:inference", "sa_inference"),
                             ("system:serviceaccount:batchy:job", "sa_batch")):
            assert exchange(standins.subject_token(sub), "wip_header", account) == "no_matching_mapping", sub
        # The default account still maps only the default namespace.
        assert exchange(standins.subject_token(inference), "wip_header", "sa_header") == "no_matching_mapping"


# X.509 workload identity: the mTLS token endpoint and API

import ssl  # noqa: E402

from tests.harness.tls import TestCA  # noqa: E402
from tests.standins.x509 import SERVER_NAMES, X509_TOKEN_TYPE, X509Standin, x509_mapping  # noqa: E402

X509_SUB = "spiffe://example.com/ns/ai/sa/chat"


@pytest.fixture(scope="module")
def x509_pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("x509-pki")
    root = TestCA(directory, "x509 mesh root")
    issuing = root.intermediate("x509 mesh issuing CA")
    other = TestCA(directory, "x509 unaccepted root")
    return {"root": root, "issuing": issuing, "other": other, "server": root.server(names=SERVER_NAMES),
            "client": issuing.client(X509_SUB), "cn_only": issuing.client(cn="batch-worker"),
            "stranger": other.client(X509_SUB), "unmapped": issuing.client("spiffe://example.com/ns/other/sa/x")}


@pytest.fixture(scope="module")
def x509_server(x509_pki):
    server = X509Standin(x509_pki["server"], trusted_cas=[x509_pki["root"], x509_pki["other"]],
                         activated_roots=[x509_pki["root"]], intermediates=[x509_pki["issuing"]])
    server.add_provider("wip_x509", [x509_mapping("sa_x509", sub="spiffe://example.com/ns/ai/*"),
                                     x509_mapping("sa_cn", cn="batch-worker")])
    with server:
        yield server


@pytest.fixture
def x509_standin(x509_server):
    x509_server.reset()
    yield x509_server
    x509_server.reset()


def x509_body(**overrides):
    body = {"grant_type": GRANT_TYPE, "subject_token_type": X509_TOKEN_TYPE,
            "identity_provider_id": "wip_x509", "service_account_id": "sa_x509"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def mtls_call(server, pki, client, method="POST", target="/oauth/token", body=None, host="mtls.auth.openai.com",
              headers=None):
    """(status, lower-case headers, parsed JSON body) over mTLS with `client` (None: no certificate)."""
    context = pki["root"].client_context(client)
    connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=5, context=context)
    sent = {"Host": host, **(headers or {})}
    if body is not None:
        body = json.dumps(body)
        sent.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, target, body=body, headers=sent)
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data or b"null")
    finally:
        connection.close()


def test_x509_exchange_derives_the_subject_from_the_spiffe_uri_or_the_cn(x509_standin, x509_pki):
    status, headers, answer = mtls_call(x509_standin, x509_pki, x509_pki["client"], body=x509_body())
    assert status == 200, answer
    assert answer["token_type"] == "Bearer" and 3590 <= answer["expires_in"] <= 3600
    assert headers["cache-control"] == "no-store"
    record = x509_standin.issued[answer["access_token"]]
    assert (record["sub"], record["service_account_id"]) == (X509_SUB, "sa_x509")
    (entry,) = x509_standin.exchange_log
    assert entry["ok"] and "subject_token" not in entry["fields"] and entry["sub"] == X509_SUB
    status, _, answer = mtls_call(x509_standin, x509_pki, x509_pki["cn_only"], body=x509_body(service_account_id="sa_cn"))
    assert status == 200 and x509_standin.issued[answer["access_token"]]["sub"] == "batch-worker"


def test_x509_expires_in_never_outlives_the_certificate(x509_standin, x509_pki):
    short = x509_pki["issuing"].client(X509_SUB, lifetime_s=30)
    status, _, answer = mtls_call(x509_standin, x509_pki, short, body=x509_body())
    assert status == 200 and 25 <= answer["expires_in"] <= 30
    x509_standin.expires_in_override = 10
    assert mtls_call(x509_standin, x509_pki, x509_pki["client"], body=x509_body())[2]["expires_in"] == 10


def test_x509_expired_certificate_is_an_invalid_subject_token(x509_standin, x509_pki):
    expiring = x509_pki["issuing"].client(X509_SUB, lifetime_s=1.5)
    time.sleep(2)
    status, _, answer = mtls_call(x509_standin, x509_pki, expiring, body=x509_body())
    assert (status, answer["error"]) == (401, "invalid_subject_token")
    assert "validity" in answer["error_description"]


@pytest.mark.parametrize("case, status, error", [
    ("stranger", 401, "invalid_subject_token"),
    ("unmapped", 400, "invalid_grant"),
    ("unknown_provider", 400, "invalid_grant"),
    ("unknown_account", 400, "invalid_grant"),
    ("subject_token", 400, "invalid_request"),
    ("jwt_type", 400, "invalid_request"),
    ("grant_type", 400, "unsupported_grant_type"),
    ("missing_account", 400, "invalid_request"),
])
def test_x509_exchange_answers_oauth_errors(x509_standin, x509_pki, case, status, error):
    client, body = x509_pki["client"], x509_body()
    if case in ("stranger", "unmapped"):
        client = x509_pki[case]
    body.update({"unknown_provider": {"identity_provider_id": "wip_nope"},
                 "unknown_account": {"service_account_id": "sa_nope"},
                 "subject_token": {"subject_token": "eyJ.x.y"},
                 "jwt_type": {"subject_token_type": JWT_TYPE},
                 "grant_type": {"grant_type": "client_credentials"}}.get(case, {}))
    if case == "missing_account":
        del body["service_account_id"]
    answer_status, _, answer = mtls_call(x509_standin, x509_pki, client, body=body)
    assert (answer_status, answer["error"]) == (status, error), answer
    assert set(answer) == {"error", "error_description"} and answer["error_description"]
    assert x509_standin.exchanges_ok == 0
    if case == "stranger":
        assert answer["error_description"] == "certificate chain does not reach an activated root"


def test_x509_token_endpoint_accepts_only_exact_post_oauth_token(x509_standin, x509_pki):
    for method, target in (("GET", "/oauth/token"), ("PUT", "/oauth/token"), ("POST", "/oauth/token/"),
                           ("POST", "/oauth/token?x=1"), ("POST", "/oauth/authorize"), ("POST", "/v1/models")):
        status, _, _ = mtls_call(x509_standin, x509_pki, x509_pki["client"], method, target, body=x509_body())
        assert status == 403, (method, target)
    assert x509_standin.exchanges == 0


def test_x509_handshake_requires_a_certificate_from_a_trusted_ca(x509_standin, x509_pki, tmp_path):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        mtls_call(x509_standin, x509_pki, None, body=x509_body())
    untrusted = TestCA(tmp_path, "not even uploaded").client(X509_SUB)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        mtls_call(x509_standin, x509_pki, untrusted, body=x509_body())
    deadline = time.monotonic() + 5
    while len(x509_standin.handshake_failures) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(x509_standin.handshake_failures) == 2 and x509_standin.exchanges == 0


def test_x509_without_required_handshake_certificate_a_missing_one_is_an_invalid_subject_token(x509_pki):
    server = X509Standin(x509_pki["server"], trusted_cas=[x509_pki["root"]], activated_roots=[x509_pki["root"]],
                         intermediates=[x509_pki["issuing"]], require_certificate=False)
    server.add_provider("wip_x509", [x509_mapping("sa_x509", sub="spiffe://example.com/ns/ai/*")])
    with server:
        status, _, answer = mtls_call(server, x509_pki, None, body=x509_body())
        assert (status, answer["error"]) == (401, "invalid_subject_token")
        assert answer["error_description"] == "no client certificate was presented"


def test_x509_api_checks_certificate_and_bearer_independently(x509_standin, x509_pki):
    token = mtls_call(x509_standin, x509_pki, x509_pki["client"], body=x509_body())[2]["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    for host in ("mtls.api.openai.com", "mtls-us.api.openai.com", "mtls-eu.api.openai.com"):
        status, headers, _ = mtls_call(x509_standin, x509_pki, x509_pki["client"], "GET", "/v1/models",
                                       host=host, headers=bearer)
        assert status == 200 and headers["x-standin-service-account"] == "sa_x509"
        assert headers["x-standin-client-subject"] == X509_SUB
    # Not bound: another accepted certificate may carry the same bearer.
    status, headers, _ = mtls_call(x509_standin, x509_pki, x509_pki["cn_only"], "GET", "/v1/models",
                                   host="mtls.api.openai.com", headers=bearer)
    assert status == 200 and headers["x-standin-client-subject"] == "batch-worker"
    # A good bearer with a certificate of a root that is not activated: 403.
    status, _, answer = mtls_call(x509_standin, x509_pki, x509_pki["stranger"], "GET", "/v1/models",
                                  host="mtls.api.openai.com", headers=bearer)
    assert status == 403 and answer["error"]["code"] == "invalid_client_certificate"
    # A good certificate with a bad or missing bearer: 401.
    for headers in ({"Authorization": "Bearer oaiwif_unknown"}, {}):
        status, _, answer = mtls_call(x509_standin, x509_pki, x509_pki["client"], "GET", "/v1/models",
                                      host="mtls.api.openai.com", headers=headers)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert [e["status"] for e in x509_standin.api_log] == [200, 200, 200, 200, 403, 401, 401]
    assert x509_standin.api_log[0]["authorization"] == f"Bearer {token}"
    assert x509_standin.api_log[0]["host"] == "mtls.api.openai.com"


def test_x509_rotated_certificate_files_are_what_the_next_exchange_presents(x509_standin, x509_pki):
    first = x509_pki["issuing"].client(X509_SUB, lifetime_s=600)
    second = x509_pki["issuing"].client(X509_SUB, lifetime_s=600)
    for client in (first, second):
        assert mtls_call(x509_standin, x509_pki, client, body=x509_body())[0] == 200
    fingerprints = [entry["fingerprint"] for entry in x509_standin.exchange_log]
    assert len(set(fingerprints)) == 2 and None not in fingerprints


def test_x509_api_checks_the_certificate_once_per_connection_and_the_endpoint_on_every_exchange(
        x509_standin, x509_pki):
    short = x509_pki["issuing"].client(X509_SUB, lifetime_s=2)
    token = mtls_call(x509_standin, x509_pki, short, body=x509_body())[2]["access_token"]
    context = x509_pki["root"].client_context(short)
    kept = http.client.HTTPSConnection("127.0.0.1", x509_standin.port, timeout=5, context=context)
    try:
        headers = {"Host": "mtls.api.openai.com", "Authorization": f"Bearer {token}"}
        kept.request("GET", "/v1/models", headers=headers)
        reply = kept.getresponse()
        reply.read()
        assert reply.status == 200
        time.sleep(2.2)  # the certificate has expired, and so has the token (expires_in <= its lifetime)
        x509_standin.issued[token]["expires_at"] = time.time() + 60  # keep the bearer valid: check the certificate
        kept.request("GET", "/v1/models", headers=headers)
        reply = kept.getresponse()
        reply.read()
        assert reply.status == 200  # valid when this connection was opened
    finally:
        kept.close()
    status, _, answer = mtls_call(x509_standin, x509_pki, short, "GET", "/v1/models", host="mtls.api.openai.com",
                                  headers={"Authorization": f"Bearer {token}"})
    assert status == 403 and "validity" in answer["error"]["message"]
    status, _, answer = mtls_call(x509_standin, x509_pki, short, body=x509_body())
    assert (status, answer["error"]) == (401, "invalid_subject_token")


def test_sds_standin_messages_carry_the_secret_inline(x509_pki):
    from tests.standins.sds import SECRET_TYPE, _decode, _field, decode_request, encode_response, encode_secret

    client = x509_pki["client"]
    response = dict((n, v) for n, v in _decode(encode_response("7", "3", [encode_secret("default", client)])))
    assert (response[1], response[4], response[5]) == (b"7", SECRET_TYPE.encode(), b"3")
    any_fields = dict(_decode(response[2]))
    assert any_fields[1] == SECRET_TYPE.encode()
    secret = dict(_decode(any_fields[2]))
    assert secret[1] == b"default"
    tls = dict(_decode(secret[2]))
    assert dict(_decode(tls[1]))[2] == open(client.cert, "rb").read()  # the chain: leaf then intermediate
    assert dict(_decode(tls[2]))[2] == open(client.key, "rb").read()
    request = decode_request(_field(3, b"default") + _field(5, b"3") + _field(6, b"\x08\x03"))
    assert request["resource_names"] == ["default"] and request["response_nonce"] == "3" and request["nack"]
