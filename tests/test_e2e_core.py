"""The core keyless path through a real Envoy (2 workers) with the built module, header source.

Each test uses subjects of its own, so the gateway's shared cache never carries over between tests
unless a test wants it to; tests that need a cold cache start their own gateway.
"""

from __future__ import annotations

import itertools
import threading
import re
import time

import jwt
import pytest

from tests.harness import encode_request

SUBJECT_HEADER = "x-openai-subject-token"
# Deadlines for what a test waits on: generous for a loaded 2-core machine, reached in a fraction of
# that when all is well.
REQUEST_TIMEOUT_S = 10.0
WAIT_S = 20.0
_counter = itertools.count()


def unique_sub(tag: str) -> str:
    return f"system:serviceaccount:default:{tag}-{next(_counter)}-{time.monotonic_ns() % 100000}"


def subject(standins, tag="app", lifetime_s=3600, **claims):
    sub = unique_sub(tag)
    return sub, standins.subject_token(sub=sub, lifetime_s=lifetime_s, **claims)


def call(gw, token=None, path="/v1/models", method="GET", headers=None, body=None, host="api.openai.com",
         timeout=10.0):
    h = dict(headers or {})
    if token is not None:
        h[SUBJECT_HEADER] = token
    return gw.request(method, path, host=host, headers=h, body=body, timeout=timeout)


def error_of(response) -> dict:
    doc = response.json()
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    assert response.header("content-type") == "application/json"
    assert response.header("x-openai-wif-error") == doc["error"]["code"]
    return doc["error"]


@pytest.fixture(scope="module")
def gw(gateway_for):
    """A header-source gateway with a short token-endpoint timeout, so timeouts are quick to test."""
    return gateway_for("header", filter_settings={"token_endpoint": {"timeout_ms": 1000}})


@pytest.fixture(scope="module")
def gw_patient(gateway_for):
    """The default token-endpoint timeout (5 s): room to hold an exchange while a test sets up."""
    return gateway_for("header")


# The happy path


def test_token_injected_static_key_and_subject_header_removed(gw, standins):
    sub, token = subject(standins)
    r = call(gw, token, headers={"Authorization": "Bearer sk-static-key-must-not-leave"})
    assert r.status == 200, r.text
    assert r.header("x-standin-sub") == sub
    assert r.header("x-standin-service-account") == "sa_header"
    path, authorization, headers = standins.openai.api_requests[-1]
    assert path == "/v1/models"
    assert authorization.startswith("Bearer ")
    issued = authorization[len("Bearer "):]
    assert standins.openai.issued[issued]["sub"] == sub
    assert SUBJECT_HEADER not in headers
    assert "sk-static-key" not in repr(headers)
    assert standins.openai.exchanges == 1


def test_second_request_is_a_cache_hit(gw, standins):
    _, token = subject(standins)
    before = gw.stats()
    assert call(gw, token).status == 200
    assert call(gw, token).status == 200
    after = gw.stats()
    assert standins.openai.exchanges == 1
    assert after["cache_hit"] - before.get("cache_hit", 0) >= 1
    assert after["cache_miss"] - before.get("cache_miss", 0) == 1
    assert after["exchanges_ok"] - before.get("exchanges_ok", 0) == 1


def test_request_body_waits_with_the_headers(gw, standins):
    """A cold POST pauses for the exchange; its body must reach OpenAI intact, after the token."""
    _, token = subject(standins)
    body = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "x" * 50_000}]}
    r = call(gw, token, path="/v1/chat/completions", method="POST", body=body)
    assert r.status == 200, r.text
    assert r.json()["model"] == "gpt-4.1-mini"


def test_exchange_request_is_the_documented_one(gw, standins):
    sub, token = subject(standins)
    assert call(gw, token).status == 200
    entry = standins.openai.exchange_log[-1]
    assert entry["ok"], entry
    assert entry["fields"] == sorted(["grant_type", "subject_token_type", "subject_token",
                                      "identity_provider_id", "service_account_id"])
    assert entry["subject_token"] == token
    assert entry["identity_provider_id"] == "wip_header"
    assert entry["service_account_id"] == "sa_header"
    assert entry["sub"] == sub


# Single flight and isolation


def test_cold_burst_of_200_makes_exactly_one_exchange(make_stack, standins):
    stack = make_stack("header")
    sub, token = subject(standins)
    responses = stack.burst(200, headers={SUBJECT_HEADER: token}, timeout=20)
    statuses = [r.status for r in responses]
    assert statuses == [200] * 200, {s: statuses.count(s) for s in set(statuses)}
    assert standins.openai.exchanges == 1
    assert all(r.header("x-standin-sub") == sub for r in responses)


def test_two_identities_concurrently_each_authorised_as_itself(make_stack, standins):
    stack = make_stack("header")
    subs = [subject(standins, tag) for tag in ("alpha", "beta")]
    responses = stack.burst(120, headers=lambda i: {SUBJECT_HEADER: subs[i % 2][1]}, timeout=20)
    for i, r in enumerate(responses):
        assert r.status == 200, (i, r.status, r.text[:200])
        assert r.header("x-standin-sub") == subs[i % 2][0]
    assert standins.openai.exchanges == 2
    assert sorted(e["sub"] for e in standins.openai.exchange_log) == sorted(s for s, _ in subs)


def test_forged_token_with_another_workloads_sub_gets_no_cached_token(gw, standins):
    """The cache is keyed on the whole token: a forgery carrying a victim's sub must be exchanged
    (and refused by OpenAI), never served the victim's cached token."""
    sub, token = subject(standins)
    assert call(gw, token).status == 200
    forged = standins.issuer.mint_wrong_signature(sub, "https://api.openai.com/v1")
    r = call(gw, forged)
    assert r.status == 502
    assert error_of(r)["code"] == "token_exchange_failed"
    assert standins.openai.exchanges == 2
    assert standins.openai.last_rejection == "bad_signature"
    assert len(standins.openai.api_requests) == 1


def test_aborted_leader_does_not_strand_waiters(gw_patient, standins):
    """The exchange belongs to the root context: a client that gives up does not cancel it. The
    leader's exchange is held at the endpoint while its client goes away and 20 more requests
    queue behind it; released, it serves them all."""
    gw = gw_patient
    _, token = subject(standins)
    misses = gw.envoy.counter("cache_miss")
    aborted = gw.envoy.counter("downstream_cx_destroy_remote_active_rq", prefix="http.openai_egress")
    standins.openai.hold()
    leader = gw.envoy.raw_connection()
    leader.send(encode_request("GET", "/v1/models", {"Host": "api.openai.com", SUBJECT_HEADER: token}))
    gw.envoy.wait_for(lambda: standins.openai.exchanges == 1, what="the leader's exchange at the endpoint")
    leader.close()  # the client gives up while its exchange is in flight
    gw.envoy.wait_for(lambda: gw.envoy.counter("downstream_cx_destroy_remote_active_rq",
                                               prefix="http.openai_egress") > aborted,
                      what="Envoy to see the leader's client go")
    results: list = []
    waiters = threading.Thread(target=lambda: results.extend(
        gw.burst(20, headers={SUBJECT_HEADER: token}, timeout=REQUEST_TIMEOUT_S)))
    waiters.start()
    gw.envoy.wait_for(lambda: gw.envoy.counter("cache_miss") - misses == 21,
                      what="20 requests waiting behind the leader")
    standins.openai.release()
    waiters.join(2 * REQUEST_TIMEOUT_S + 5)
    assert [r.status for r in results] == [200] * 20, results
    assert standins.openai.exchanges == 1


# Refusals


@pytest.mark.parametrize("case,value,code", [
    ("missing", None, "missing_subject_token"),
    ("empty", "", "missing_subject_token"),
    ("not a jwt", "not-a-jwt", "invalid_subject_token"),
    ("two parts", "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0", "invalid_subject_token"),
    ("bad base64", "eyJhbGciOiJSUzI1NiJ9.***.c2ln", "invalid_subject_token"),
    ("oversized", "a" * 17_000, "invalid_subject_token"),
    ("static key", "sk-proj-abcdef", "invalid_subject_token"),
])
def test_bad_subject_is_refused_with_401_and_nothing_forwarded(gw, standins, case, value, code):
    r = call(gw, value)
    assert r.status == 401, (case, r.status, r.text)
    err = error_of(r)
    assert err["code"] == code
    assert err["type"] == "invalid_request_error"
    assert SUBJECT_HEADER in err["message"]
    if value:
        assert value[:20] not in err["message"]
    assert standins.openai.api_requests == []
    assert standins.openai.exchanges == 0


def test_expired_subject_is_refused_locally(gw, standins):
    token = standins.issuer.mint_expired(unique_sub("late"), "https://api.openai.com/v1")
    r = call(gw, token)
    assert r.status == 401
    assert error_of(r)["code"] == "subject_token_expired"
    assert standins.openai.exchanges == 0
    assert standins.openai.api_requests == []


@pytest.mark.parametrize("case", ["wrong audience", "unmapped subject", "unknown kid", "wrong issuer"])
def test_endpoint_rejection_is_an_error_and_nothing_is_forwarded(gw, standins, case):
    issuer, aud = standins.issuer, "https://api.openai.com/v1"
    token = {
        "wrong audience": lambda: issuer.mint_wrong_aud(unique_sub("aud")),
        "unmapped subject": lambda: issuer.mint("system:serviceaccount:other-ns:app", aud),
        "unknown kid": lambda: issuer.mint_unknown_kid(unique_sub("kid"), aud),
        "wrong issuer": lambda: issuer.mint_wrong_iss(unique_sub("iss"), aud),
    }[case]()
    r = call(gw, token)
    assert r.status == 502, r.text
    err = error_of(r)
    assert err["code"] == "token_exchange_failed"
    # The endpoint's generic 500, explained with what the gateway can see, never the token.
    message = err["message"]
    assert message.startswith("OpenAI token exchange failed: the token endpoint answered HTTP 500; subject iss "), message
    claims = jwt.decode(token, options={"verify_signature": False})
    header = jwt.get_unverified_header(token)
    for seen in (claims["iss"], claims["sub"], header["kid"], "alg RS256", "provider wip_header",
                 "service account sa_header", "set expect to check issuer, audience and signature locally"):
        assert seen in message, (seen, message)
    assert token not in message and token.split(".")[2] not in message
    assert standins.openai.api_requests == []


def test_other_hosts_pass_through_untouched_but_never_see_the_subject_token(gw, standins):
    _, token = subject(standins)
    r = call(gw, token, path="/echo/anything", host="other.example",
             headers={"Authorization": "Bearer caller-credential"})
    assert r.status == 200, r.text
    seen = r.json()["headers"]
    assert seen.get("authorization") == "Bearer caller-credential"
    # The subject token is a credential for this gateway alone: removed from every request.
    assert SUBJECT_HEADER not in seen
    assert standins.openai.exchanges == 0
    # Without any subject token, too: not the filter's business.
    assert call(gw, None, path="/echo/x", host="other.example").status == 200


def test_host_match_ignores_port_and_case(gw, standins):
    _, token = subject(standins)
    assert call(gw, token, host="API.OpenAI.com:443").status == 200
    assert call(gw, None, host="api.openai.com:8443").status == 401


# Lifetimes


def test_freshly_issued_token_is_used_even_if_it_lives_one_second(gw, standins):
    standins.openai.expires_in_override = 1
    _, token = subject(standins)
    assert call(gw, token).status == 200


def test_three_second_token_is_refreshed_and_never_used_expired(gw, standins):
    """Requests flow, with tokens that live 3 s, until the gateway has refreshed twice (past the
    first token's expiry): the API stand-in refuses expired tokens with 401, so every request
    succeeding shows none was used after expiry."""
    lifetime_s = 3
    standins.openai.expires_in_override = lifetime_s
    sub, token = subject(standins)
    statuses = []
    deadline = time.monotonic() + WAIT_S
    while standins.openai.exchanges_for(sub) < 3:
        assert time.monotonic() < deadline, f"{standins.openai.exchanges_for(sub)} tokens in {WAIT_S} s"
        statuses.append(call(gw, token).status)
        time.sleep(0.02)  # pacing, not timing: the loop ends on the exchange count
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert standins.openai.api_denied == 0
    # No refresh before its time: the next exchange starts at >= 75 % of a token's life (80 %, less
    # up to 5 % jitter) after the gateway received the previous one, itself after the stand-in logged it.
    issued = [e["time"] for e in standins.openai.exchange_log if e["sub"] == sub]
    gaps = [later - earlier for earlier, later in zip(issued, issued[1:])]
    assert min(gaps) >= 0.75 * lifetime_s - 0.05, gaps
    assert standins.openai.exchanges == len(issued), "an exchange failed"


def test_subject_exp_caps_the_cached_token(make_stack, standins):
    """The endpoint issues an hour, the subject expires in 4 s: the token is cached for less than
    the subject lives. (A request cannot show it: once the subject expires, the header check
    refuses it before the cache is looked at. The filter's log line for the issued token can.)"""
    standins.openai.cap_to_subject = False
    stack = make_stack("header")
    _, token = subject(standins, lifetime_s=4)
    assert call(stack, token).status == 200
    line = stack.envoy.wait_for(
        lambda: next((l for l in stack.envoy.log_text().splitlines() if "access token issued for" in l), None),
        timeout_s=WAIT_S, what="the issued-token log line")
    valid_s = int(re.search(r"valid (\d+) s", line).group(1))
    assert valid_s <= 4, line
    bearer = standins.openai.api_requests[-1][1][len("Bearer "):]
    issued = standins.openai.issued[bearer]
    assert issued["expires_at"] - time.time() > 3000, "the endpoint issued an hour: the cap is the filter's"


# Endpoint faults: clear error, bounded time, backoff, recovery


@pytest.mark.parametrize("fault,status,code", [
    ("500", 502, "token_exchange_failed"),
    ("garbage", 502, "token_exchange_failed"),
    ("html", 502, "token_exchange_failed"),
    ("empty_token", 502, "token_exchange_failed"),
    ("bad_token_type", 502, "token_exchange_failed"),
    ("reset", 503, "token_endpoint_unavailable"),
    ("slow", 503, "token_endpoint_unavailable"),
])
def test_endpoint_fault_then_backoff_then_recovery(gw, standins, fault, status, code):
    _, token = subject(standins)
    # Slower than the default timeout (5 s): answered sooner, the configured 1 s was applied.
    standins.openai.set_fault(fault, slow_seconds=6)
    started = time.monotonic()
    r = call(gw, token)
    elapsed = time.monotonic() - started
    assert r.status == status, r.text
    err = error_of(r)
    assert err["code"] == code
    assert err["message"].startswith("OpenAI token exchange failed")
    assert elapsed < 5, f"took {elapsed:.1f} s (timeout is 1 s)"
    assert standins.openai.api_requests == []
    # During the backoff the endpoint is not called again, and the refusal says when to retry.
    attempts = standins.openai.exchanges
    again = call(gw, token)
    assert again.status == status
    assert int(again.header("retry-after")) >= 1
    assert standins.openai.exchanges == attempts
    # The endpoint recovers; so does the gateway, by itself.
    standins.openai.reset_faults()
    recovered = gw.envoy.wait_for(lambda: call(gw, token).status == 200, timeout_s=WAIT_S, what="recovery")
    assert recovered
    assert standins.openai.api_requests and standins.openai.api_denied == 0


def test_429_retry_after_is_honoured(gw, standins):
    """Retry-After: 2 holds the next attempt back longer than the gateway's own backoff after one
    failure (at most 1 s): requests meanwhile are refused without calling the endpoint, and the
    first one served comes no sooner than 2 s after the 429."""
    _, token = subject(standins)
    standins.openai.set_fault("429", retry_after=2)
    sent = time.monotonic()
    r = call(gw, token)
    assert r.status == 503
    assert error_of(r)["code"] == "token_endpoint_unavailable"
    assert "HTTP 429" in error_of(r)["message"]
    standins.openai.reset_faults()
    held = []

    def served():
        response = call(gw, token)
        if response.status == 200:
            return response
        held.append(response)
        return None

    gw.envoy.wait_for(served, timeout_s=WAIT_S, what="recovery after the Retry-After")
    # The 429 was answered after `sent`, and the retry only after it plus 2 s.
    assert time.monotonic() - sent >= 1.95
    assert held, "no request was held back"
    for response in held:
        assert response.status == 503, "Retry-After: 2 must hold the next attempt back"
        assert error_of(response)["code"] == "token_endpoint_unavailable"
        assert int(response.header("retry-after")) in (1, 2)
    assert standins.openai.exchanges == 2


def test_valid_token_keeps_being_served_while_refresh_fails(gw, standins):
    """A 6 s token: from 75-80 % of its life a request triggers a refresh, which fails; until the
    token expires (at 90 %) it is still served. Requests flow until the failed refresh is counted,
    then one more: all served with the first token."""
    standins.openai.expires_in_override = 6
    _, token = subject(standins)
    assert call(gw, token).status == 200
    first = standins.openai.api_requests[-1][1]
    failed = gw.envoy.counter("exchanges_failed")
    standins.openai.set_fault("500")
    deadline = time.monotonic() + WAIT_S
    responses = []
    while True:
        refresh_failed = gw.envoy.counter("exchanges_failed") > failed
        responses.append(call(gw, token))
        if refresh_failed:
            break
        assert time.monotonic() < deadline, "no refresh was attempted"
        time.sleep(0.02)  # pacing, not timing: the loop ends on the counter
    assert [r.status for r in responses] == [200] * len(responses), responses[-3:]
    bearers = {authorization for _, authorization, _ in standins.openai.api_requests}
    assert bearers == {first}, "served with a token other than the first"
    assert standins.openai.exchanges >= 2


def test_missing_token_endpoint_cluster_fails_closed(make_stack, standins):
    stack = make_stack("header", filter_settings={"token_endpoint": {"cluster": "no_such_cluster"}})
    _, token = subject(standins)
    r = call(stack, token)
    assert r.status == 503
    err = error_of(r)
    assert err["code"] == "token_endpoint_unavailable"
    assert "no_such_cluster" in err["message"]
    assert standins.openai.api_requests == []


@pytest.mark.parametrize("allowed,status", [(["openai_api"], 200), (["openai_auth", "other"], 403)])
def test_tokens_go_only_to_the_configured_upstream_clusters(gateway_for, standins, allowed, status):
    stack = gateway_for("header", filter_settings={"upstream_clusters": allowed})
    _, token = subject(standins)
    r = call(stack, token, headers={"Authorization": "Bearer sk-caller-key"})
    assert r.status == status, r.text
    if status == 403:
        err = error_of(r)
        assert err["code"] == "upstream_not_allowed"
        assert "openai_api" in err["message"]
        assert standins.openai.api_requests == [] and standins.openai.exchanges == 0
    else:
        assert standins.openai.api_requests[-1][1].startswith("Bearer oaiwif_")


# Invalidation


def test_401_from_the_api_invalidates_the_cached_token(gw, standins):
    _, token = subject(standins)
    assert call(gw, token).status == 200
    first = standins.openai.api_requests[-1][1]
    standins.openai.revoke(first[len("Bearer "):])
    assert call(gw, token).status == 401  # OpenAI's own answer, passed through
    r = call(gw, token)
    assert r.status == 200
    assert standins.openai.exchanges == 2
    assert standins.openai.api_requests[-1][1] != first
    assert gw.stats().get("tokens_invalidated", 0) >= 1


# Secrets never leak


def test_no_token_text_in_anything_the_filter_logs(make_stack, standins):
    stack = make_stack("header", log_level="debug")
    _, good = subject(standins)
    _, refused = subject(standins, "refused")
    assert call(stack, good).status == 200
    assert call(stack, good).status == 200
    standins.openai.set_fault("garbage")
    assert call(stack, refused).status == 502
    standins.openai.reset_faults()
    assert call(stack, "x.y.z").status == 401
    lines = [line for line in stack.envoy.log_text().splitlines() if "openai_wif" in line]
    assert any("access token issued" in line for line in lines), "the filter's own logs are captured"
    secrets = [good, refused, *standins.openai.issued]
    for secret in secrets:
        for part in secret.split("."):
            if len(part) >= 16:
                leaked = [line for line in lines if part in line]
                assert not leaked, leaked[:1]


def test_concurrent_clients_over_many_connections(gw, standins):
    """Many identities and repeat requests at once: every response is for its own identity."""
    identities = [subject(standins, f"w{i}") for i in range(8)]
    errors = []

    def worker(i):
        sub, token = identities[i % len(identities)]
        for _ in range(10):
            r = call(gw, token)
            if r.status != 200 or r.header("x-standin-sub") != sub:
                errors.append((i, r.status, r.header("x-standin-sub")))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert standins.openai.exchanges == len(identities)
