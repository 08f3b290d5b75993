"""The hostile-request table: what an attacker can send to the gateway, in a real Envoy (2 workers)
with the built filter and the stand-ins. Every row asserts exactly what reached the upstreams (the
OpenAI stand-in's API, its /echo/ host, its token endpoint) and what the caller got.

Tables:
- Odd `:authority` values, with the caller's own key and a valid subject token: under the local
  profile's routes (which route `api.openai.com:*` and `localhost:*` to OpenAI) and under
  `"scope": "all"` with the shipped route layout (no echo host, the filter disabled on the deny
  route). A routing-only gateway first shows where Envoy itself sends each value, so the table
  cannot silently stop testing what it claims. Well-formed authorities with a port still get a token.
- Configuration: `hosts` entries normalised (`API.OpenAI.com.` matches) or refused at load; odd
  `scope`, `hosts` with `"scope": "all"`, and out-of-range `limits` refused, naming the field.
- Subject-token header removal on every request the filter sees; authorization and the subject
  header removed from the trailers of handled requests.
- Bytes that are not UTF-8 in every header the filter reads, in token-endpoint answers and in source
  answers: a refusal or "absent", never a VM trap (after each row, valid requests on both workers).
- Oversized headers: the filter's limit (401), Envoy's limit (431), nothing forwarded.
- Floods of forged subject tokens: a gateway-wide admission budget bounds the exchanges, a cached
  identity probed throughout is never refused; the log summarises instead of writing a line per
  request, and never prints a token.
- A small identity table (`max_identities`) under many identities: each served with its own token.
- A 401 storm from the API: at most one invalidation per identity per interval.
- A request resumed after a token wait whose upstream answers before the request body has ended.

Where Envoy refuses an authority itself the filter never sees it, and the row says so: Envoy's
HTTP/1 codec answers 400 to a Host with a space or bytes >= 0x80 (so a non-UTF-8 `:authority` cannot
reach the filter through Envoy), and `api.openai.com:`, `[::1]:1:1` and an empty Host match no route
domain but `*`, the deny route on which the filter is disabled (403).

The early-answer row needs an upstream that answers with its headers before it has read the request
body and finishes its answer only once the body has arrived (the OpenAI stand-in's `answer_early`):
a filter that holds the body back once the response has begun stalls that request until a timeout.

Wall time is about 30 s, a third of it the wait for the flood's log summaries (one 10 s window).
"""

from __future__ import annotations

import itertools
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import pytest

from tests.harness import EnvoyError, Stack, bootstrap_parts, default_filter_config, encode_chunks, encode_request
from tests.standins import OPENAI_AUDIENCE

SUBJECT_HEADER = "x-openai-subject-token"
CALLER_KEY = "sk-caller-own-key"
NOT_UTF8 = "\xff\xfe"  # http.client and encode_request send str as latin-1: the bytes 0xff 0xfe
INVALID_AUTHORITY = "invalid_authority"
REQUEST_TIMEOUT_S = 8.0
RECOVERY_BOUND_S = 20.0  # polling for a recovery ends at the first 200

_counter = itertools.count()


def unique_sub(tag: str) -> str:
    return f"system:serviceaccount:default:{tag}-{next(_counter)}-{time.monotonic_ns() % 100000}"


def subject(standins, tag="hostile"):
    sub = unique_sub(tag)
    return sub, standins.subject_token(sub=sub)


def forged(standins, tag="forged"):
    """Well-formed, valid-looking claims for a mapped subject, signed with a key the stand-in does not know."""
    sub = unique_sub(tag)
    return sub, standins.issuer.mint_wrong_signature(sub, OPENAI_AUDIENCE)


def call(gw, token=None, path="/v1/models", method="GET", headers=None, body=None, host="api.openai.com",
         timeout=REQUEST_TIMEOUT_S):
    h = dict(headers or {})
    if token is not None:
        h[SUBJECT_HEADER] = token
    return gw.request(method, path, host=host, headers=h, body=body, timeout=timeout)


def error_of(response) -> dict:
    """The filter's own refusal: OpenAI's error shape, and x-openai-wif-error naming the code."""
    assert response.status is not None, response.error
    doc = response.json()
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    assert response.header("content-type") == "application/json"
    assert response.header("x-openai-wif-error") == doc["error"]["code"], response.headers
    return doc["error"]


def upstream_seen(standins) -> list:
    """Everything that reached the OpenAI stand-in since its last reset, one line per request."""
    seen = [{"where": "api", "path": path, "headers": headers, "trailers": trailers}
            for (path, _, headers), trailers in zip(standins.openai.api_requests, standins.openai.api_trailers)]
    seen += [{"where": "echo", "path": r.target, "headers": r.headers, "trailers": r.trailers}
             for r in standins.openai.echo_requests]
    return seen


def describe(seen: list, secrets: dict) -> list:
    """For a failure message: where each request went and which secrets it carried (never their text)."""
    out = []
    for request in seen:
        text = repr(request["headers"]) + repr(request["trailers"])
        carried = [name for name, value in secrets.items() if value and value in text]
        out.append(f"{request['where']} {request['path']} carrying {carried or 'no secret'}")
    return out


def assert_nothing_upstream(standins, secrets: dict):
    seen = upstream_seen(standins)
    assert not seen, f"reached the upstream: {describe(seen, secrets)}"
    assert standins.openai.exchanges == 0, f"{standins.openai.exchanges} token exchanges"


def assert_no_secret_upstream(standins, secrets: dict):
    seen = upstream_seen(standins)
    leaked = [line for line in describe(seen, secrets) if not line.endswith("no secret")]
    assert not leaked, f"forwarded: {leaked}"


def bearer_sub(standins, authorization) -> str | None:
    """The subject an access token was issued to (None: not one the stand-in issued)."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    record = standins.openai.issued.get(authorization[len("Bearer "):])
    return record["sub"] if record else None


def assert_served_as(response, standins, sub: str):
    assert response.status == 200, (response.status, response.text[:300])
    assert response.header("x-standin-sub") == sub


def assert_serves_on_both_workers(stack, standins, max_requests: int = 40):
    """The VMs are alive: valid requests (a fresh identity: one exchange, then cache hits), each on a
    new connection, until both workers have served at least one; every one gets 200 as itself."""
    sub, token = subject(standins, "alive")
    before = stack.envoy.worker_connections()
    statuses = []
    for _ in range(max_requests):
        response = call(stack, token)
        statuses.append(response.status)
        assert response.status == 200 and response.header("x-standin-sub") == sub, \
            f"a valid request after the hostile ones: {response!r} (statuses so far {statuses})"
        now = stack.envoy.worker_connections()
        if len(now) >= 2 and all(now[w] > before.get(w, 0) for w in now):
            return
    raise AssertionError(f"{max_requests} requests never reached both workers: {before} -> {now}")


def flood(gw, headers: list, concurrency: int = 16, waves: int = 1, between=None,
          timeout: float = REQUEST_TIMEOUT_S):
    """One request per entry of headers, `concurrency` at a time, in `waves` equal parts with
    between() called before each part but the first (a flood that lasts, so refills and probes happen
    during it); (responses in order, elapsed s)."""
    started = time.monotonic()
    size = -(-len(headers) // waves)
    responses: list = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for wave in range(waves):
            if wave and between is not None:
                between()
            part = headers[wave * size:(wave + 1) * size]
            responses += pool.map(lambda h: gw.request("GET", "/v1/models", headers=h, timeout=timeout), part)
    return responses, time.monotonic() - started


def histogram(responses) -> dict:
    counts: dict = {}
    for r in responses:
        key = (r.status, r.header("x-openai-wif-error")) if r.status else ("no response", r.error)
        counts[key] = counts.get(key, 0) + 1
    return counts


def http1_trailers(bootstrap: dict):
    """Envoy's HTTP/1 codecs drop trailers unless told otherwise: keep them downstream and upstream."""
    hcm, clusters = bootstrap_parts(bootstrap)
    hcm["http_protocol_options"] = {"enable_trailers": True}
    clusters["openai_api"]["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {"enable_trailers": True}}}}


HEADER_SETTINGS = {"token_endpoint": {"timeout_ms": 1000}}


@pytest.fixture(scope="module")
def gw(gateway_for):
    """The local profile's gateway (header source, default limits), with HTTP/1 trailers kept."""
    return gateway_for("header", filter_settings=HEADER_SETTINGS, bootstrap_patch=http1_trailers)


def fresh(make_stack, source="header", **kwargs):
    """A gateway of its own, for rows that could kill a VM (a dead VM must not fail other rows)."""
    if source == "header":
        kwargs.setdefault("filter_settings", HEADER_SETTINGS)
    return make_stack(source, **kwargs)


# ---------------------------------------------------------------------------------------------
# Odd authorities


@dataclass(frozen=True)
class Authority:
    value: str
    envoy: str  # where Envoy's routing sends it: "api", "echo", "deny" (403, no filter), "codec" (Envoy's 400)

    def __str__(self):
        return repr(self.value)


AUTHORITIES = [
    Authority("api.openai.com:443:443", "api"),
    Authority("api.openai.com::", "api"),
    Authority("api.openai.com:]", "api"),
    Authority("api.openai.com:1,x:2", "api"),
    Authority("API.OPENAI.COM:443:80", "api"),
    Authority("localhost:1:1", "api"),
    Authority("127.0.0.1:1:1", "api"),
    Authority("api.openai.com:99999", "api"),
    Authority("api.openai.com:443443", "api"),
    Authority("api.openai.com:+443", "api"),
    Authority("api.openai.com:0x1bb", "api"),
    Authority("other.example:1:1", "echo"),
    Authority("api.openai.com:", "deny"),
    Authority("[::1]:1:1", "deny"),
    Authority("", "deny"),
    Authority("a b", "codec"),
    Authority("api.openai.com:4" + NOT_UTF8 + "3", "codec"),
]


def authority_request(gw, standins, authority: Authority):
    sub, token = subject(standins, "authority")
    secrets = {"caller key": CALLER_KEY, "subject token": token}
    response = call(gw, token, host=authority.value, headers={"Authorization": f"Bearer {CALLER_KEY}"})
    return sub, secrets, response


def assert_envoy_refused(response, authority: Authority):
    if authority.envoy == "deny":
        assert response.status == 403, response
        assert response.json()["error"]["code"] == "host_not_allowed"
    else:
        assert response.status == 400, response
        assert response.header("x-openai-wif-error") is None  # Envoy's own answer, not the filter's


@pytest.fixture(scope="module")
def routing_only(gateway_for):
    return gateway_for("header", with_filter=False)


@pytest.mark.parametrize("authority", AUTHORITIES, ids=str)
def test_envoy_routes_the_authority_where_the_table_says(authority, routing_only, standins):
    """Without the filter: the rows marked api/echo really reach an upstream, so the filter is the
    only thing between the caller's key and OpenAI."""
    response = routing_only.request("GET", "/v1/models", host=authority.value,
                                    headers={"Authorization": f"Bearer {CALLER_KEY}"})
    where = [request["where"] for request in upstream_seen(standins)]
    if authority.envoy in ("api", "echo"):
        assert where == [authority.envoy], (response, where)
    else:
        assert where == [], where
        assert_envoy_refused(response, authority)


@pytest.mark.parametrize("authority", AUTHORITIES, ids=str)
def test_odd_authority_is_refused_and_nothing_reaches_any_upstream(authority, gw, standins):
    _, secrets, response = authority_request(gw, standins, authority)
    assert_nothing_upstream(standins, secrets)
    if authority.envoy in ("api", "echo"):
        assert response.status == 400, f"{response!r} (expected the filter's 400 {INVALID_AUTHORITY})"
        error = error_of(response)
        assert error == {"message": error["message"], "type": "invalid_request_error", "param": None,
                         "code": INVALID_AUTHORITY}
        assert CALLER_KEY not in response.text and secrets["subject token"][:24] not in response.text
    else:
        assert_envoy_refused(response, authority)


@pytest.mark.parametrize("host", ["api.openai.com:443", "API.OpenAI.COM:1", "localhost:65535", "127.0.0.1:8443",
                                  "openai-egress.internal:80"])
def test_well_formed_authority_with_a_port_gets_a_token(host, gw, standins):
    """The strict parser is not a refusal of everything with a colon."""
    sub, token = subject(standins, "port")
    response = call(gw, token, host=host, headers={"Authorization": f"Bearer {CALLER_KEY}"})
    assert_served_as(response, standins, sub)
    assert_no_secret_upstream(standins, {"caller key": CALLER_KEY, "subject token": token})
    (_, authorization, _), = standins.openai.api_requests
    assert bearer_sub(standins, authorization) == sub


def scope_all_config(standins) -> dict:
    config = default_filter_config("header", standins, token_endpoint={"timeout_ms": 1000})
    del config["hosts"]
    config["scope"] = "all"
    return config


@pytest.fixture(scope="module")
def gw_all(gateway_for, standins):
    """`"scope": "all"` with the shipped route layout: the OpenAI routes and the deny route, on which
    the filter is disabled (no echo host)."""
    return gateway_for("header", filter_config=scope_all_config(standins), echo_host=None)


@pytest.mark.parametrize("authority", AUTHORITIES, ids=str)
def test_odd_authority_under_scope_all_never_forwards_the_callers_key(authority, gw_all, standins):
    sub, secrets, response = authority_request(gw_all, standins, authority)
    assert_no_secret_upstream(standins, secrets)
    if authority.envoy == "api":
        # Routed to OpenAI, so the filter authorises it: the gateway's token for this subject, only.
        assert_served_as(response, standins, sub)
        (path, authorization, headers), = standins.openai.api_requests
        assert bearer_sub(standins, authorization) == sub
        assert SUBJECT_HEADER not in headers
        assert standins.openai.echo_requests == []
    else:
        assert upstream_seen(standins) == []
        assert standins.openai.exchanges == 0
        assert_envoy_refused(response, Authority(authority.value, "deny" if authority.envoy == "echo"
                                                 else authority.envoy))


# ---------------------------------------------------------------------------------------------
# hosts entries


@pytest.fixture(scope="module")
def gw_dotted(gateway_for):
    return gateway_for("header", filter_settings={**HEADER_SETTINGS, "hosts": ["API.OpenAI.com."]})


@pytest.mark.parametrize("host", ["api.openai.com", "API.OPENAI.COM:443", "api.openai.com:8443"])
def test_hosts_entry_with_a_trailing_dot_and_capitals_matches(host, gw_dotted, standins):
    sub, token = subject(standins, "dotted")
    response = call(gw_dotted, token, host=host, headers={"Authorization": f"Bearer {CALLER_KEY}"})
    assert_no_secret_upstream(standins, {"caller key": CALLER_KEY, "subject token": token})
    assert_served_as(response, standins, sub)
    (_, authorization, _), = standins.openai.api_requests
    assert bearer_sub(standins, authorization) == sub


@pytest.mark.parametrize("settings,field", [
    ({"hosts": ["api.openai.com:443"]}, "hosts"),
    ({"hosts": ["https://api.openai.com"]}, "hosts"),
    ({"hosts": ["api openai.com"]}, "hosts"),
    ({"hosts": [""]}, "hosts"),
    ({"hosts": ["api.openai.com", "api.openai.com/v1"]}, "hosts"),
    ({"scope": "all", "hosts": ["api.openai.com"]}, "hosts"),
    ({"scope": "route"}, "scope"),
    ({"limits": {"max_identities": 0}}, "limits.max_identities"),
], ids=lambda v: repr(v)[:60] if isinstance(v, dict) else None)
def test_odd_configuration_is_refused_naming_the_field(settings, field, standins, module_path, tmp_path):
    config = {**default_filter_config("header", standins), **settings}
    stack = Stack("header", tmp_path, standins=standins, filter_config=config)
    with pytest.raises(EnvoyError):
        stack.start()
    refusals = [line for line in (tmp_path / "envoy.log").read_text(errors="replace").splitlines()
                if "refusing configuration" in line]
    assert refusals, "Envoy did not start, but not because the filter refused its configuration"
    assert re.search(r"(field|at) `" + re.escape(field) + "`", refusals[0]), refusals[0]


# ---------------------------------------------------------------------------------------------
# The subject token never leaks sideways


@pytest.mark.parametrize("case", ["valid", "not a jwt", "repeated", "20 KiB"])
def test_subject_header_is_removed_from_requests_for_other_hosts(case, gw, standins):
    """other.example has the filter enabled but is not in hosts: passed untouched, but for the
    subject token, which is a credential for the gateway alone."""
    _, token = subject(standins, "echo")
    value = {"valid": token, "not a jwt": "not-a-jwt-but-a-secret", "repeated": token,
             "20 KiB": token + "A" * 20_480}[case]
    headers = [("Host", "other.example"), ("Authorization", "Bearer caller-credential"), ("X-Custom", "kept"),
               (SUBJECT_HEADER, value)]
    if case == "repeated":
        headers.append((SUBJECT_HEADER.upper(), "second-copy-of-the-credential"))
    response = gw.envoy.raw_request(encode_request("GET", "/anything", headers))
    assert response.status == 200, response
    seen = response.json()["headers"]
    assert SUBJECT_HEADER not in seen, "the subject token was forwarded to another host"
    assert seen.get("authorization") == "Bearer caller-credential"
    assert seen.get("x-custom") == "kept"
    assert standins.openai.exchanges == 0 and standins.openai.api_requests == []


def test_trailers_of_a_handled_request_lose_authorization_and_the_subject(gw, standins):
    sub, token = subject(standins, "trailers")
    data = encode_request("POST", "/v1/files", [("Host", "api.openai.com"), (SUBJECT_HEADER, token)],
                          chunks=[b'{"purpose": "batch"}'],
                          trailers=[("Authorization", f"Bearer {CALLER_KEY}"), (SUBJECT_HEADER, token),
                                    ("X-Trailer-Kept", "1")])
    response = gw.envoy.raw_request(data)
    assert_served_as(response, standins, sub)
    assert_no_secret_upstream(standins, {"caller key": CALLER_KEY, "subject token": token})
    (trailers,) = standins.openai.api_trailers
    assert trailers.get("x-trailer-kept") == "1", f"trailers did not reach the API at all: {trailers}"
    assert "authorization" not in trailers and SUBJECT_HEADER not in trailers


# ---------------------------------------------------------------------------------------------
# Bytes that are not UTF-8: a refusal or "absent", never a VM trap


def test_non_utf8_subject_is_refused_and_the_vms_survive(make_stack, standins):
    stack = fresh(make_stack)
    value = "eyJ" + NOT_UTF8 + "hbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    responses = stack.burst(50, headers={SUBJECT_HEADER: value, "Authorization": f"Bearer {CALLER_KEY}"},
                            timeout=REQUEST_TIMEOUT_S)
    assert histogram(responses) == {(401, "invalid_subject_token"): 50}, histogram(responses)
    assert error_of(responses[0])["code"] == "invalid_subject_token"
    assert_nothing_upstream(standins, {"caller key": CALLER_KEY})
    assert_serves_on_both_workers(stack, standins)


@pytest.mark.parametrize("case", ["authorization", "other header"])
def test_non_utf8_in_other_request_headers_is_harmless(case, make_stack, standins):
    stack = fresh(make_stack)
    sub, token = subject(standins, "bytes")
    extra = {"authorization": {"Authorization": "Bearer sk-" + NOT_UTF8},
             "other header": {"X-Custom": "v" + NOT_UTF8}}[case]
    responses = [call(stack, token, headers=extra) for _ in range(10)]
    for response in responses:
        assert_served_as(response, standins, sub)
    for _, authorization, _ in standins.openai.api_requests:
        assert bearer_sub(standins, authorization) == sub
    assert_serves_on_both_workers(stack, standins)


def test_non_utf8_subject_in_a_trailer_is_removed_and_the_vms_survive(make_stack, standins):
    stack = fresh(make_stack, bootstrap_patch=http1_trailers)
    sub, token = subject(standins, "trailer-bytes")
    for _ in range(10):
        data = encode_request("POST", "/v1/files", [("Host", "api.openai.com"), (SUBJECT_HEADER, token)],
                              chunks=[b"{}"], trailers=[(SUBJECT_HEADER, "eyJ" + NOT_UTF8 + ".x.y"),
                                                        ("X-Trailer-Kept", "1")])
        assert_served_as(stack.envoy.raw_request(data), standins, sub)
    for trailers in standins.openai.api_trailers:
        assert trailers.get("x-trailer-kept") == "1" and SUBJECT_HEADER not in trailers, trailers
    assert_serves_on_both_workers(stack, standins)


def test_non_utf8_subject_for_another_host_is_removed(make_stack, standins):
    stack = fresh(make_stack)
    for _ in range(10):
        response = call(stack, "eyJ" + NOT_UTF8 + ".x.y", path="/x", host="other.example")
        assert response.status == 200, response
        assert SUBJECT_HEADER not in response.json()["headers"]
    assert standins.openai.exchanges == 0
    assert_serves_on_both_workers(stack, standins)


@pytest.mark.parametrize("fault,status,code", [
    ("429", 503, "token_endpoint_unavailable"),
    ("500", 502, "token_exchange_failed"),
    (None, 200, None),
], ids=["429", "500", "200"])
def test_non_utf8_retry_after_from_the_token_endpoint_is_treated_as_absent(fault, status, code, make_stack,
                                                                            standins):
    stack = fresh(make_stack)
    standins.openai.set_fault(fault, token_headers=[("Retry-After", "1" + NOT_UTF8)])
    sub, token = subject(standins, "retry-after")
    response = call(stack, token)
    assert response.status == status, response
    if code:
        assert error_of(response)["code"] == code
        assert standins.openai.api_requests == []
    else:
        assert_served_as(response, standins, sub)
    assert standins.openai.exchanges == 1
    standins.openai.reset_faults()
    assert_serves_on_both_workers(stack, standins)


SOURCE_SETTINGS = {"subject": {"timeout_ms": 1000}, "token_endpoint": {"timeout_ms": 1000}}


@pytest.fixture
def restore_token_file(standins):
    yield
    standins.token_dir.rotate()


@pytest.mark.parametrize("source", ["gcp_metadata", "azure_imds", "kubernetes"])
def test_non_utf8_source_answer_fails_closed_then_recovers(source, make_stack, standins, restore_token_file):
    settings = {k: dict(v) for k, v in SOURCE_SETTINGS.items()}
    if source == "kubernetes":
        settings["subject"]["refresh_interval_s"] = 1
        token = standins.token_dir.rotate()
        standins.token_dir.write_raw(token.encode()[:40] + b"\xff\xfe\xc3(" + token.encode()[40:])
    else:
        {"gcp_metadata": standins.gcp, "azure_imds": standins.azure}[source].fault = "non_utf8"
    stack = make_stack(source, filter_settings=settings)
    responses = [stack.request("GET", "/v1/models", headers={"Authorization": f"Bearer {CALLER_KEY}"},
                               timeout=REQUEST_TIMEOUT_S) for _ in range(5)]
    for response in responses:
        assert response.status == 503, response
        assert error_of(response)["code"] == "subject_source_unavailable"
    assert_nothing_upstream(standins, {"caller key": CALLER_KEY})

    if source == "kubernetes":
        standins.token_dir.rotate()
    else:
        {"gcp_metadata": standins.gcp, "azure_imds": standins.azure}[source].fault = None

    def recovered():
        response = stack.request("GET", "/v1/models", headers={"Authorization": f"Bearer {CALLER_KEY}"},
                                 timeout=REQUEST_TIMEOUT_S)
        assert response.status in (200, 503), f"while the source recovers: {response!r}"
        if response.status == 503:
            assert response.header("x-openai-wif-error") == "subject_source_unavailable", response
        return response.status == 200

    # The backoff pending is at most a few seconds: the deadline is for a loaded machine.
    stack.envoy.wait_for(recovered, timeout_s=RECOVERY_BOUND_S, interval_s=0.1, what="recovery of the fixed source")
    assert_no_secret_upstream(standins, {"caller key": CALLER_KEY})
    assert standins.openai.exchanges_ok == 1


# ---------------------------------------------------------------------------------------------
# Oversized headers


def big_subject(standins, size: int) -> str:
    """A well-formed JWT of about `size` bytes (a padding claim), signed by the right issuer."""
    return standins.issuer.mint(unique_sub("big"), OPENAI_AUDIENCE, pad="p" * int(size * 3 / 4))


@pytest.mark.parametrize("case,status", [
    ("20 KiB subject", 401),
    ("70 KiB subject", 431),
    ("70 KiB other header", 431),
    ("120 headers", 431),
])
def test_oversized_headers_are_refused_and_never_forwarded(case, status, gw, standins):
    _, token = subject(standins, "oversized")
    headers = {"Authorization": f"Bearer {CALLER_KEY}"}
    if case == "20 KiB subject":
        token = big_subject(standins, 20_480)
    elif case == "70 KiB subject":
        token = big_subject(standins, 70_000)
    elif case == "70 KiB other header":
        headers["X-Padding"] = "p" * 70_000
    else:
        headers.update({f"X-Many-{i}": str(i) for i in range(120)})
    response = call(gw, token, headers=headers)
    assert response.status == status, response
    if status == 401:
        assert error_of(response)["code"] == "invalid_subject_token"
    assert_nothing_upstream(standins, {"caller key": CALLER_KEY, "subject token": token})


# ---------------------------------------------------------------------------------------------
# Floods of identities nobody has seen


def forged_headers(standins, n: int):
    subs, headers = set(), []
    for _ in range(n):
        sub, token = forged(standins)
        subs.add(sub)
        headers.append({SUBJECT_HEADER: token, "Authorization": f"Bearer {CALLER_KEY}"})
    return subs, headers


def assert_flood_answers(responses):
    """A forged token is exchanged and refused (502), or refused before any exchange (429)."""
    counts = histogram(responses)
    assert set(counts) <= {(502, "token_exchange_failed"), (429, "too_many_new_identities")}, counts
    for response in responses:
        if response.status == 429:
            assert error_of(response)["code"] == "too_many_new_identities"
            assert int(response.header("retry-after")) >= 1
    return counts.get((429, "too_many_new_identities"), 0)


class Probe(threading.Thread):
    """A known (cached) identity's requests, back to back, while something else happens."""

    def __init__(self, gw, token: str):
        super().__init__(daemon=True, name="probe")
        self.gw, self.token = gw, token
        self.responses: list = []
        self.done = threading.Event()
        self._answered = threading.Condition()

    def run(self):
        while not self.done.is_set():
            response = call(self.gw, self.token)
            with self._answered:
                self.responses.append(response)
                self._answered.notify_all()
            self.done.wait(0.01)

    def wait_for_more(self, n: int, timeout_s: float = 4 * REQUEST_TIMEOUT_S):
        """Returns once n more probes have been answered."""
        with self._answered:
            target = len(self.responses) + n
            if not self._answered.wait_for(lambda: len(self.responses) >= target, timeout_s):
                raise AssertionError(f"{n} probes not answered within {timeout_s} s")

    def stop(self) -> list:
        self.done.set()
        self.join(REQUEST_TIMEOUT_S + 2)
        return self.responses


BUDGET = {"new_identities_per_s": 5, "new_identities_burst": 20}
SLACK = 2  # exchanges beyond the budget allowed for (a whole second of refill rounded up)


def test_forged_flood_is_bounded_by_the_admission_budget_and_a_known_identity_is_never_refused(
        make_stack, standins):
    stack = fresh(make_stack, filter_settings={**HEADER_SETTINGS, "limits": BUDGET})
    real_sub, real_token = subject(standins, "known")
    assert_served_as(call(stack, real_token), standins, real_sub)
    forged_subs, headers = forged_headers(standins, 400)
    refused_before = stack.envoy.counter("new_identities_refused")
    exchanges_before = len(standins.openai.exchange_log)

    probe = Probe(stack, real_token)
    probe.start()
    # 7 probes between waves: at least 21 during the flood, however fast or slow it goes.
    responses, elapsed = flood(stack, headers, waves=4, between=lambda: probe.wait_for_more(7))
    probed = probe.stop()

    exchanged = [e for e in standins.openai.exchange_log[exchanges_before:] if e["sub"] in forged_subs]
    bound = BUDGET["new_identities_burst"] + BUDGET["new_identities_per_s"] * elapsed + SLACK
    assert len(exchanged) <= bound, (f"{len(exchanged)} exchanges of forged tokens in {elapsed:.1f} s; the budget "
                                     f"allows {bound:.0f}; answers {histogram(responses)}")
    # The probe's own first exchange took one token from the bucket, refilled since.
    assert len(exchanged) >= BUDGET["new_identities_burst"] - 1, \
        f"only {len(exchanged)} exchanges: the budget refused identities it had room for"
    refused = assert_flood_answers(responses)
    assert refused >= len(responses) - bound
    assert stack.envoy.counter("new_identities_refused") - refused_before == refused
    assert len(probed) >= 20, f"only {len(probed)} probes during a {elapsed:.1f} s flood"
    assert histogram(probed) == {(200, None): len(probed)}, histogram(probed)
    assert all(r.header("x-standin-sub") == real_sub for r in probed)
    for _, authorization, _ in standins.openai.api_requests:
        assert bearer_sub(standins, authorization) == real_sub, "a forged identity reached the API"


SUMMARY_WINDOW_S = 10  # one line per kind of failure per 10 s
SUMMARY_SLACK_S = 20  # for the summaries to be written once the window has closed (on a tick, 250 ms)


def filter_lines(text: str) -> list:
    return [line for line in text.splitlines() if "wasm log" in line]


def filter_message(line: str) -> str:
    """What the filter wrote, without Envoy's prefix (whose time, thread id and source line are
    numbers too)."""
    return line.split("openai_wif: ")[-1]


def summary_total(lines: list) -> int:
    """What summary lines account for: the largest number in each message (its count; format-agnostic,
    and generous: a larger number in a line only makes the total larger)."""
    return sum(max((int(n) for n in re.findall(r"(?<![\w.])\d+(?![\w.])", filter_message(line))), default=0)
               for line in lines)


def logged_at(line: str) -> float:
    """The time.time() at which Envoy wrote a log line (its prefix is local time, to the ms)."""
    stamp = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]", line)
    assert stamp, f"a log line without Envoy's time prefix: {line[:80]}"
    return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()


@pytest.fixture(scope="module")
def default_flood(tmp_path_factory, standins, module_path):
    """300 forged tokens at a gateway with the default limits (20/s, burst 100), at the default log
    level; then the log until the summaries of the flood's window have been written (or a deadline).

    A window opens with the first failure of a kind, no sooner than the flood: lines written before
    it could have closed are the ones written while the requests failed ("during"), the summaries
    come after ("after")."""
    standins.reset()
    stack = Stack("header", tmp_path_factory.mktemp("default-flood"), standins=standins,
                  filter_settings=HEADER_SETTINGS).start()
    try:
        forged_subs, headers = forged_headers(standins, 300)
        log_offset = len(stack.envoy.log_text())
        flood_started = time.time()
        responses, elapsed = flood(stack, headers)
        exchanged = [e for e in standins.openai.exchange_log if e["sub"] in forged_subs]
        window_closes = flood_started + SUMMARY_WINDOW_S

        def split():
            lines = filter_lines(stack.envoy.log_text()[log_offset:])
            return ([line for line in lines if logged_at(line) < window_closes],
                    [line for line in lines if logged_at(line) >= window_closes])

        def summarised():
            during, after = split()
            return summary_total(after) >= len(responses) - len(during)

        try:
            stack.envoy.wait_for(summarised, timeout_s=SUMMARY_WINDOW_S + SUMMARY_SLACK_S, interval_s=0.2,
                                 what="the summaries of the flood's window")
        except EnvoyError:
            pass  # the tests say what is missing
        during, after = split()
        log = stack.envoy.log_text()[log_offset:]
        tokens = [h[SUBJECT_HEADER] for h in headers]
    finally:
        stack.stop()
        standins.reset()
    return {"responses": responses, "elapsed": elapsed, "exchanged": exchanged, "tokens": tokens,
            "during": during, "after": after, "log": log}


def test_forged_flood_at_the_default_budget_is_bounded(default_flood):
    run = default_flood
    bound = 100 + 20 * run["elapsed"] + SLACK
    assert len(run["exchanged"]) <= bound, (f"{len(run['exchanged'])} exchanges of forged tokens in "
                                            f"{run['elapsed']:.1f} s; the default budget allows {bound:.0f}")
    assert assert_flood_answers(run["responses"]) >= 300 - bound


def test_a_flood_of_failures_is_summarised_in_the_log_not_written_per_request(default_flood):
    """A handful of lines while 300 requests fail (per kind, per VM, per window), then summaries
    whose counts account for the rest; never a token."""
    run = default_flood
    during, after = run["during"], run["after"]
    assert len(during) <= 12, (f"{len(during)} filter log lines for 300 failing requests, e.g. "
                               f"{[filter_message(line)[:120] for line in during[:3]]}")
    assert after, f"no summary within {SUMMARY_WINDOW_S + SUMMARY_SLACK_S} s of the flood"
    assert len(after) <= 12, after[:3]
    held_back = len(run["responses"]) - len(during)
    assert summary_total(after) >= held_back, (f"the summaries account for {summary_total(after)} of the "
                                               f"{held_back} failures not logged one by one: "
                                               f"{[filter_message(line) for line in after]}")
    for token in run["tokens"]:
        for part in token.split(".")[1:]:
            assert part not in run["log"], "a subject token in the log"


def test_many_identities_in_a_small_table_are_each_served_as_themselves(make_stack, standins):
    """max_identities 16, 200 identities: records are evicted and re-exchanged, never mixed up."""
    stack = fresh(make_stack, filter_settings={**HEADER_SETTINGS, "limits": {
        "max_identities": 16, "new_identities_per_s": 1000, "new_identities_burst": 1000}})
    identities = [subject(standins, "many") for _ in range(200)]
    order = identities + random.Random(8).sample(identities, 48)

    def one(identity):
        sub, token = identity
        return sub, call(stack, token)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, order))
    wrong = [(sub, r.status, r.header("x-standin-sub")) for sub, r in results
             if r.status != 200 or r.header("x-standin-sub") != sub]
    assert not wrong, f"{len(wrong)} of {len(results)} not served as themselves, e.g. {wrong[:3]}"
    assert len(standins.openai.api_requests) == len(order)
    # 16 records at most: of the 48 repeats, no more than 16 can still have been cached, plus the few
    # that started while the last first requests (8 at a time) were still being exchanged.
    repeats = len(order) - len(identities)
    assert len(identities) + repeats - 16 - 8 <= standins.openai.exchanges_ok <= len(order), \
        f"{standins.openai.exchanges_ok} exchanges: more than 16 identities stayed cached"


# ---------------------------------------------------------------------------------------------
# A 401 storm


def test_a_401_storm_invalidates_an_identity_at_most_once_per_interval(gw, standins):
    sub, token = subject(standins, "storm")
    standins.openai.api_force_401 = True
    invalidated_before = gw.envoy.counter("tokens_invalidated")
    responses = [call(gw, token) for _ in range(30)]
    exchanges = standins.openai.exchanges_for(sub)
    assert exchanges <= 2, f"{exchanges} exchanges for 30 requests answered 401"
    for response in responses:
        assert response.status == 401, response
        assert response.header("x-openai-wif-error") is None  # OpenAI's answer, as it is
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert gw.envoy.counter("tokens_invalidated") - invalidated_before <= 1
    standins.openai.api_force_401 = False
    assert_served_as(call(gw, token), standins, sub)
    assert standins.openai.exchanges_for(sub) == exchanges, "the token still valid was thrown away"


# ---------------------------------------------------------------------------------------------
# The upstream answers before the request body has ended


@pytest.mark.parametrize("before", [0, 100], ids=["body after the answer", "some body before the token"])
def test_resumed_request_whose_upstream_answers_early_does_not_stall(before, gw, standins):
    """A cold identity pauses its request for the exchange; once resumed, the upstream answers with
    its headers at once and its body only after the whole request body has arrived."""
    sub, token = subject(standins, "early")
    standins.openai.answer_early = True
    head_chunks = [b"a" * before] if before else []
    with gw.envoy.raw_connection(timeout=5, method="POST") as raw:
        raw.send(encode_request("POST", "/v1/uploads", [("Host", "api.openai.com"), (SUBJECT_HEADER, token)],
                                chunks=head_chunks, end=False))
        head = raw.response_head()
        assert head.status == 200, head
        assert head.header("x-standin-sub") == sub
        raw.send(encode_chunks([b"b" * 1000, b"c" * 1000], last=True))
        response = raw.response_rest()
    assert response.status == 200, f"{response!r}: the request body stalled after the upstream answered"
    assert response.json() == {"object": "upload", "bytes": before + 2000}
    (path, authorization), = standins.openai.api_early
    assert path == "/v1/uploads" and bearer_sub(standins, authorization) == sub
