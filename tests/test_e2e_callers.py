"""End to end: caller rules. Which mesh workload may use which OpenAI service account, and who used
what, in a real Envoy (2 workers) with real mTLS on the gateway listener.

A test CA (tests/harness/tls.py) issues the gateway's server certificate and client certificates with
SPIFFE URI SANs, as Istio or SPIRE issue them. The rules:

    inference      spiffe://cluster.local/ns/ai/sa/inference     -> sa_inference (top-level provider)
    batch          spiffe://cluster.local/ns/batch/*             -> sa_batch at wip_k8s_batch
    batch_special  spiffe://cluster.local/ns/batch/sa/special    -> never reached: batch matches first

The stand-ins map sa_inference and sa_batch for the gateway's projected token, and (header source)
for each team's own service account tokens by namespace (tests/standins/__init__.py).

Gateways: `k8s` (kubernetes source, mTLS, a connection without a certificate accepted so that the
filter refuses it, and a client's x-forwarded-client-cert passed to the filter, which must ignore
it); `header` (header source, mTLS); `xfcc` (plain HTTP, "caller_identity": "x-forwarded-client-cert");
and fresh gateways for plain HTTP with XFCC passed to the filter but no opt-in, the mixed cold burst,
two for ids from the VM environment; and one per configuration refused at load.

Every wait has a generous deadline and ends on a counter or a log line, never on a sleep.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter

import pytest

from tests.harness import EnvoyError, Stack, TestCA, default_filter_config
from tests.standins import BATCH_PROVIDER, K8S_SUB

INFERENCE = "spiffe://cluster.local/ns/ai/sa/inference"
JOB = "spiffe://cluster.local/ns/batch/sa/job"
SPECIAL = "spiffe://cluster.local/ns/batch/sa/special"
OTHER = "spiffe://cluster.local/ns/other/sa/x"
CANARY = "spiffe://cluster.local/ns/ai/sa/inference-canary"  # the exact rule is not a prefix
BATCHY = "spiffe://cluster.local/ns/batchy/sa/y"  # "ns/batch/*" ends with a slash
ISTIO_GATEWAY = "spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway"

RULES = [
    {"name": "inference", "principals": [INFERENCE], "service_account_id": "sa_inference"},
    {"name": "batch", "principals": ["spiffe://cluster.local/ns/batch/*"], "service_account_id": "sa_batch",
     "identity_provider_id": BATCH_PROVIDER},
    {"name": "batch_special", "principals": [SPECIAL], "service_account_id": "sa_special"},
]
RULE_NAMES = [rule["name"] for rule in RULES]
PROVIDER = {"inference": "wip_k8s", "batch": BATCH_PROVIDER}
ACCOUNT = {"inference": "sa_inference", "batch": "sa_batch"}

SUBJECT_HEADER = "x-openai-subject-token"
CALLER_KEY = "sk-caller-own-key"
CALLER_NOT_ALLOWED = "caller_not_allowed"
NO_CERTIFICATE = "the caller presented no client certificate"
CACHE_OUTCOMES = {"hit", "miss", "refresh", "wait"}
IDENTITY = re.compile(r"^[0-9a-f]{12}$")
XFCC = "x-forwarded-client-cert"

REQUEST_TIMEOUT_S = 10.0
WAIT_S = 20.0
ENDPOINT_TIMEOUT_MS = 4000
# The kubernetes source re-reads the token file periodically; not during these tests, so that
# "one subject fetch" is exact.
K8S_SUBJECT = {"refresh_interval_s": 3600}

_sequence = itertools.count()


def unique(tag: str) -> str:
    return f"{tag}-{next(_sequence)}-{time.monotonic_ns() % 1_000_000}"


# ---------------------------------------------------------------------------------------------
# Certificates, gateways


class Pki:
    def __init__(self, directory):
        self.ca = TestCA(directory)
        self.rogue = TestCA(directory, name="another CA")
        self.certs = {uri: self.ca.client(uri) for uri in (INFERENCE, JOB, SPECIAL, OTHER, CANARY, BATCHY)}
        # Two URI SANs: the filter reads the first.
        self.certs["inference+other"] = self.ca.client(INFERENCE, OTHER)
        self.impostor = self.rogue.client(INFERENCE)

    def tls(self, who):
        """A client context presenting `who`'s certificate (None: no certificate)."""
        return self.ca.client_context(None if who is None else self.certs[who])

    def peer(self, who) -> str | None:
        """What %DOWNSTREAM_PEER_URI_SAN% prints for `who`: its URI SANs, comma-separated."""
        return None if who is None else ",".join(self.certs[who].uris)

    def listener(self, require_client_certificate=False) -> dict:
        return self.ca.listener_overrides(require_client_certificate=require_client_certificate)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def k8s_settings(**extra) -> dict:
    return {"callers": RULES, "subject": K8S_SUBJECT, "token_endpoint": {"timeout_ms": ENDPOINT_TIMEOUT_MS},
            **extra}


def settle(stack, standins, rules=("inference", "batch"), tls=None, headers=None):
    """Warms the gateway: one request per rule, then waits until every exchange the stand-in has seen
    is one the filter has finished (a warm-up exchange included), so that later "no exchange"
    assertions cannot be disturbed by one still in flight."""
    for rule in rules:
        response = stack.request("GET", "/v1/models", tls=tls(rule) if tls else None,
                                 headers=headers(rule) if headers else None, timeout=REQUEST_TIMEOUT_S)
        assert response.status == 200, (rule, response, startup_lines(stack)[-5:])

    def finished():
        stats = stack.stats()
        return stats.get("exchanges_ok", 0) + stats.get("exchanges_failed", 0) == standins.openai.exchanges
    stack.envoy.wait_for(finished, timeout_s=WAIT_S, what="every exchange the stand-in saw to finish")
    return stack


@pytest.fixture(scope="module")
def k8s(gateway_for, pki, standins):
    stack = gateway_for("kubernetes", filter_settings=k8s_settings(), forward_client_cert="ALWAYS_FORWARD_ONLY",
                        **pki.listener())
    return settle(stack, standins, tls=lambda rule: pki.tls({"inference": INFERENCE, "batch": JOB}[rule]))


@pytest.fixture(scope="module")
def xfcc(gateway_for, standins):
    stack = gateway_for("kubernetes", filter_settings=k8s_settings(caller_identity=XFCC),
                        forward_client_cert="ALWAYS_FORWARD_ONLY")
    return settle(stack, standins, headers=lambda rule: {XFCC: "URI=" + {"inference": INFERENCE, "batch": JOB}[rule]})


HEADER_RULES = [
    {"name": "inference", "principals": [INFERENCE], "service_account_id": "sa_inference"},
    {"name": "batch", "principals": ["spiffe://cluster.local/ns/batch/*"], "service_account_id": "sa_batch"},
]


@pytest.fixture(scope="module")
def header(gateway_for, pki):
    return gateway_for("header", filter_settings={"callers": HEADER_RULES,
                                                  "token_endpoint": {"timeout_ms": ENDPOINT_TIMEOUT_MS}},
                       **pki.listener())


# ---------------------------------------------------------------------------------------------
# What a response, the upstreams, the counters and the access log must show


def error_of(response) -> dict:
    """The filter's own refusal: OpenAI's error shape, and x-openai-wif-error naming the code."""
    assert response.status is not None, response.error
    doc = response.json()
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
    assert response.header("content-type") == "application/json"
    assert response.header("x-openai-wif-error") == doc["error"]["code"], response.headers
    return doc["error"]


def assert_caller_not_allowed(response, seen: str | None):
    assert response.status == 403, response
    error = error_of(response)
    assert (error["code"], error["type"], error["param"]) == (CALLER_NOT_ALLOWED, "invalid_request_error", None)
    # The message names the principal seen ("caller spiffe://... matches no rule"), or says there was none.
    if seen is None:
        assert NO_CERTIFICATE in error["message"], error["message"]
    else:
        assert f"caller {seen} " in error["message"] and "matches no" in error["message"], error["message"]


def assert_nothing_upstream(standins, exchanges_before: int = 0):
    assert standins.openai.exchanges == exchanges_before, "a token exchange was made"
    assert standins.openai.api_requests == [] and standins.openai.echo_requests == [], "a request was forwarded"


def delta(after: dict, before: dict) -> dict:
    return {name: after.get(name, 0) - before.get(name, 0) for name in set(after) | set(before)
            if after.get(name, 0) != before.get(name, 0)}


def rule_counters(stats: dict) -> dict:
    """The caller-rule counters that are not zero."""
    return {name: value for name, value in stats.items()
            if (name.startswith("rule.") or name == "callers_refused") and value}


def assert_no_rule_exchange(standins):
    """No exchange for any rule's account, and nothing forwarded (a gateway started in this test may
    still make its own warm-up exchange for the top-level account)."""
    accounts = {rule["service_account_id"] for rule in RULES}
    assert [e for e in standins.openai.exchange_log if e["service_account_id"] in accounts] == []
    assert standins.openai.api_requests == [] and standins.openai.echo_requests == [], "a request was forwarded"


def log_line(stack, path: str) -> dict:
    """The access log line of the one request for `path` (paths are unique per request)."""
    entries = stack.envoy.wait_for_access_log(1, where=lambda e: e["path"] == path, timeout_s=WAIT_S)
    assert len(entries) == 1, entries
    return entries[0]


def assert_allowed_line(entry: dict, caller: str, rule: str, account: str, peer):
    assert entry["status"] == 200 and entry["response_code_details"] == "via_upstream", entry
    assert (entry["caller"], entry["rule"], entry["service_account_id"]) == (caller, rule, account), entry
    assert entry["peer"] == peer, entry
    assert entry["error"] is None, entry
    assert entry["cache"] in CACHE_OUTCOMES, entry
    assert entry["identity"] and IDENTITY.match(entry["identity"]), entry


def assert_refused_line(entry: dict, caller, peer, code=CALLER_NOT_ALLOWED, status=403, rule=None, account=None):
    assert entry["status"] == status, entry
    assert entry["error"] == code, entry
    assert entry["response_code_details"] != "via_upstream", entry
    assert (entry["caller"], entry["rule"], entry["service_account_id"]) == (caller, rule, account), entry
    assert entry["peer"] == peer, entry


def served_account(standins) -> tuple:
    """(sub, provider, service account) of the token on the one request that reached the API."""
    (_, authorization, headers), = standins.openai.api_requests
    assert CALLER_KEY not in json.dumps(headers) and SUBJECT_HEADER not in headers and XFCC not in headers
    record = standins.openai.issued[authorization[len("Bearer "):]]
    return record["sub"], record["identity_provider_id"], record["service_account_id"]


# ---------------------------------------------------------------------------------------------
# Gateway identity (kubernetes) behind mTLS


ALLOWED = [
    pytest.param(INFERENCE, INFERENCE, "inference", id="exact"),
    pytest.param(JOB, JOB, "batch", id="wildcard"),
    pytest.param(SPECIAL, SPECIAL, "batch", id="first-match-wins"),
    pytest.param("inference+other", INFERENCE, "inference", id="first-uri-san"),
]


@pytest.mark.parametrize("who, caller, rule", ALLOWED)
def test_allowed_caller_gets_its_rules_service_account(who, caller, rule, k8s, pki, standins):
    before = k8s.stats()
    path = "/v1/" + unique("allowed")
    # The client's own x-forwarded-client-cert names someone else: without the opt-in it is ignored.
    response = k8s.request("GET", path, tls=pki.tls(who),
                           headers={"Authorization": f"Bearer {CALLER_KEY}", XFCC: "URI=" + OTHER},
                           timeout=REQUEST_TIMEOUT_S)
    assert response.status == 200, (response, startup_lines(k8s)[-5:])
    assert response.header("x-standin-service-account") == ACCOUNT[rule]
    assert served_account(standins) == (K8S_SUB, PROVIDER[rule], ACCOUNT[rule])
    assert standins.openai.exchanges == 0, "warm: the rule's token comes from the cache"
    assert rule_counters(delta(k8s.stats(), before)) == {f"rule.{rule}.allowed": 1}
    assert_allowed_line(log_line(k8s, path), caller, rule, ACCOUNT[rule], pki.peer(who))


REFUSED = [
    pytest.param(OTHER, OTHER, id="unlisted"),
    pytest.param(CANARY, CANARY, id="exact-is-no-prefix"),
    pytest.param(BATCHY, BATCHY, id="wildcard-ends-with-a-slash"),
    pytest.param(None, None, id="no-certificate"),
]


@pytest.mark.parametrize("who, seen", REFUSED)
def test_unlisted_caller_or_no_certificate_is_refused_with_no_exchange_and_nothing_forwarded(who, seen, k8s, pki,
                                                                                             standins):
    before = k8s.stats()
    path = "/v1/" + unique("refused")
    response = k8s.request("POST", path, tls=pki.tls(who), headers={"Authorization": f"Bearer {CALLER_KEY}"},
                           body={"model": "gpt-4.1-mini"}, timeout=REQUEST_TIMEOUT_S)
    assert_caller_not_allowed(response, seen)
    assert_nothing_upstream(standins)
    change = delta(k8s.stats(), before)
    assert rule_counters(change) == {"callers_refused": 1}
    assert change.get("exchanges_ok", 0) == 0 and change.get("cache_hit", 0) == 0
    assert_refused_line(log_line(k8s, path), seen, pki.peer(who))


XFCC_IGNORED = [
    pytest.param(OTHER, INFERENCE, OTHER, id="certificate-other-xfcc-allowed"),
    pytest.param(None, INFERENCE, None, id="no-certificate-xfcc-allowed"),
]


@pytest.mark.parametrize("who, forged, seen", XFCC_IGNORED)
def test_without_the_opt_in_xfcc_never_names_the_caller(who, forged, seen, k8s, pki, standins):
    """The listener passes a client's x-forwarded-client-cert on to the filter (ALWAYS_FORWARD_ONLY):
    without "caller_identity" the caller is still the connection's certificate."""
    before = k8s.stats()
    path = "/v1/" + unique("forged-xfcc")
    response = k8s.request("GET", path, tls=pki.tls(who),
                           headers={XFCC: f"By={ISTIO_GATEWAY};Hash=abc;URI={forged}"}, timeout=REQUEST_TIMEOUT_S)
    assert_caller_not_allowed(response, seen)
    assert_nothing_upstream(standins)
    assert rule_counters(delta(k8s.stats(), before)) == {"callers_refused": 1}
    assert_refused_line(log_line(k8s, path), seen, pki.peer(who))


def test_plain_http_without_the_opt_in_has_no_caller_whatever_xfcc_says(make_stack, standins):
    stack = make_stack("kubernetes", filter_settings=k8s_settings(), forward_client_cert="ALWAYS_FORWARD_ONLY")
    values = [f"By={ISTIO_GATEWAY};Hash=abc;URI={INFERENCE}", f"URI={JOB}", None]
    for value in values:
        path = "/v1/" + unique("plain")
        response = stack.request("GET", path, headers={XFCC: value} if value else None, timeout=REQUEST_TIMEOUT_S)
        assert_caller_not_allowed(response, None)
        assert_refused_line(log_line(stack, path), None, None)
    assert_no_rule_exchange(standins)
    assert rule_counters(stack.stats()) == {"callers_refused": len(values)}


def test_a_certificate_from_another_ca_never_gets_a_request_in(k8s, pki, standins):
    before = k8s.stats()
    response = k8s.request("GET", "/v1/models", tls=pki.rogue.client_context(pki.impostor, server_ca=pki.ca.ca_file),
                           timeout=REQUEST_TIMEOUT_S)
    assert response.status is None, response  # the handshake fails: the filter never sees it
    assert_nothing_upstream(standins)
    assert rule_counters(delta(k8s.stats(), before)) == {}


def test_mixed_cold_burst_makes_one_exchange_per_service_account_and_one_subject_fetch(make_stack, pki, standins):
    """Four kinds of caller at once through one gateway identity, while no token exists yet and every
    exchange is slow: inference and batch each get their own service account, from exactly one
    exchange each (single flight per account across both workers), the gateway's subject is fetched
    once, and the others are refused without any exchange."""
    standins.openai.set_fault("slow", slow_seconds=1.5)  # every exchange, until the test ends
    stack = make_stack("kubernetes", filter_settings=k8s_settings(), **pki.listener())
    kinds = [INFERENCE, JOB, OTHER, None]
    n = 48

    responses = stack.burst(n, "GET", "/v1/models", tls=lambda i: pki.tls(kinds[i % 4]),
                            headers={"Authorization": f"Bearer {CALLER_KEY}"}, timeout=REQUEST_TIMEOUT_S + 5)

    for i, response in enumerate(responses):
        who = kinds[i % 4]
        if who in (INFERENCE, JOB):
            assert response.status == 200, (i, response)
            assert response.header("x-standin-service-account") == ("sa_inference" if who == INFERENCE else "sa_batch")
        else:
            assert_caller_not_allowed(response, who)
    by_account = Counter((e["identity_provider_id"], e["service_account_id"]) for e in standins.openai.exchange_log)
    assert by_account[("wip_k8s", "sa_inference")] == 1, by_account
    assert by_account[(BATCH_PROVIDER, "sa_batch")] == 1, by_account
    others = {key: count for key, count in by_account.items()
              if key not in (("wip_k8s", "sa_inference"), (BATCH_PROVIDER, "sa_batch"))}
    # The only other exchange there may be: a warm-up of the top-level account, once.
    assert set(others) <= {("wip_k8s", "sa_k8s")} and sum(others.values()) <= 1, others
    assert all(e["ok"] and e["sub"] == K8S_SUB for e in standins.openai.exchange_log)
    stats = stack.stats()
    assert (stats.get("subject_fetch_ok"), stats.get("subject_fetch_failed", 0)) == (1, 0)
    assert stack.envoy.counter("downstream_rq_total", prefix="http.wif_token_file") == 1
    assert rule_counters(stats) == {"rule.inference.allowed": n // 4, "rule.inference.exchanges": 1,
                                    "rule.batch.allowed": n // 4, "rule.batch.exchanges": 1,
                                    "callers_refused": n // 2}
    bearers = Counter(served[1] for served in standins.openai.api_requests)
    assert len(bearers) == 2 and sorted(bearers.values()) == [n // 4, n // 4], "one token per service account"

    entries = stack.envoy.wait_for_access_log(n, timeout_s=WAIT_S)
    assert len(entries) == n
    for entry in entries:
        peer = entry["peer"]
        if peer in (INFERENCE, JOB):
            rule = "inference" if peer == INFERENCE else "batch"
            assert_allowed_line(entry, peer, rule, ACCOUNT[rule], peer)
        else:
            assert peer in (OTHER, None), entry
            assert_refused_line(entry, peer, peer)
    for rule_peer in (INFERENCE, JOB):
        outcomes = Counter(e["cache"] for e in entries if e["peer"] == rule_peer)
        assert outcomes["hit"] < n // 4, f"the burst was not cold for {rule_peer}: {outcomes}"


def test_access_log_and_filter_log_never_carry_a_token(k8s, pki, standins):
    """After the requests of this module (allowed, refused, with the caller's key and a subject token
    header), neither the access log nor Envoy's own log holds any token."""
    subject_token = standins.subject_token("system:serviceaccount:ai:inference")
    for who in (INFERENCE, JOB, OTHER, None):
        k8s.request("GET", "/v1/" + unique("no-token") + "?api_key=sk-in-the-query",
                    tls=pki.tls(who), headers={"Authorization": f"Bearer {CALLER_KEY}", SUBJECT_HEADER: subject_token},
                    timeout=REQUEST_TIMEOUT_S)
    entries = k8s.envoy.wait_for_access_log(4, where=lambda e: e["path"].startswith("/v1/no-token"), timeout_s=WAIT_S)
    assert all("?" not in e["path"] for e in entries)
    log = k8s.envoy.log_text()
    secrets = {"the caller's key": CALLER_KEY, "a query secret": "sk-in-the-query", "the subject header": subject_token,
               "the gateway's subject": standins.token_dir.current()}
    secrets.update({f"issued token {i}": token for i, token in enumerate(standins.openai.issued)})
    leaked = [name for name, value in secrets.items() if value in log]
    assert not leaked, leaked
    assert not re.search(r"oaiwif_[A-Za-z0-9_-]{8,}|eyJ[A-Za-z0-9_-]{10,}\.", log)


# ---------------------------------------------------------------------------------------------
# Header source: the rule decides who may present a token at all, and which account it gets


HEADER_CASES = [
    pytest.param(INFERENCE, "system:serviceaccount:ai:inference", 200, "sa_inference", None, id="inference"),
    pytest.param(JOB, "system:serviceaccount:batch:job", 200, "sa_batch", None, id="batch"),
    # The rule, not the token, picks the account: batch's token as sa_inference has no mapping.
    pytest.param(INFERENCE, "system:serviceaccount:batch:job", 502, "sa_inference", "token_exchange_failed",
                 id="token-of-another-team"),
    pytest.param(INFERENCE, None, 401, None, "missing_subject_token", id="no-token"),
    pytest.param(OTHER, "system:serviceaccount:ai:inference", 403, None, CALLER_NOT_ALLOWED, id="unlisted"),
    pytest.param(None, "system:serviceaccount:ai:inference", 403, None, CALLER_NOT_ALLOWED, id="no-certificate"),
]


@pytest.mark.parametrize("who, sub, status, account, code", HEADER_CASES)
def test_header_source_rules_decide_who_may_present_a_token_and_its_account(who, sub, status, account, code,
                                                                             header, pki, standins):
    rule = {INFERENCE: "inference", JOB: "batch"}.get(who)
    sub = sub and f"{sub}-{unique('h')}"
    headers = {"Authorization": f"Bearer {CALLER_KEY}"}
    if sub:
        headers[SUBJECT_HEADER] = standins.subject_token(sub)
    before = header.stats()
    path = "/v1/" + unique("header")
    response = header.request("GET", path, tls=pki.tls(who), headers=headers, timeout=REQUEST_TIMEOUT_S)
    entry = log_line(header, path)
    change = rule_counters(delta(header.stats(), before))
    if status == 200:
        assert response.status == 200, response
        assert served_account(standins) == (sub, "wip_header", account)
        (exchange,) = standins.openai.exchange_log
        assert (exchange["sub"], exchange["service_account_id"], exchange["ok"]) == (sub, account, True)
        assert change == {f"rule.{rule}.allowed": 1, f"rule.{rule}.exchanges": 1}
        assert_allowed_line(entry, who, rule, account, pki.peer(who))
        return
    assert response.status == status, response
    assert error_of(response)["code"] == code
    assert standins.openai.api_requests == []
    if code == CALLER_NOT_ALLOWED:
        assert_caller_not_allowed(response, who)
        assert standins.openai.exchanges == 0
        assert change == {"callers_refused": 1}
        assert_refused_line(entry, who, pki.peer(who))
        return
    # The rule matched; the request was refused for another reason.
    assert change == {f"rule.{rule}.refused": 1}
    assert_refused_line(entry, who, pki.peer(who), code=code, status=status, rule=rule, account="sa_inference")
    if sub:
        (exchange,) = standins.openai.exchange_log
        assert (exchange["service_account_id"], exchange["ok"]) == ("sa_inference", False)
    else:
        assert standins.openai.exchanges == 0


# ---------------------------------------------------------------------------------------------
# The caller from x-forwarded-client-cert, only when configured


XFCC_CASES = [
    pytest.param(f"By={ISTIO_GATEWAY};Hash=abc123;URI={INFERENCE}", INFERENCE, "inference", id="inference"),
    pytest.param(f"Hash=def456;URI={JOB};DNS=job.batch.svc", JOB, "batch", id="batch-wildcard"),
    pytest.param(f"By={ISTIO_GATEWAY};URI={INFERENCE},By=spiffe://next;URI={OTHER}", INFERENCE, "inference",
                 id="first-element-decides"),
    pytest.param(f"By={ISTIO_GATEWAY};URI={OTHER},By=spiffe://next;URI={INFERENCE}", OTHER, None,
                 id="first-element-unlisted"),
    pytest.param(f"By={ISTIO_GATEWAY};Hash=abc123", None, None, id="no-uri"),
    pytest.param(None, None, None, id="no-header"),
]


@pytest.mark.parametrize("value, caller, rule", XFCC_CASES)
def test_opt_in_takes_the_caller_from_xfcc(value, caller, rule, xfcc, standins):
    path = "/v1/" + unique("xfcc")
    response = xfcc.request("GET", path, headers={XFCC: value} if value else None, timeout=REQUEST_TIMEOUT_S)
    entry = log_line(xfcc, path)
    if rule:
        assert response.status == 200, response
        assert served_account(standins) == (K8S_SUB, PROVIDER[rule], ACCOUNT[rule])  # XFCC not forwarded either
        assert_allowed_line(entry, caller, rule, ACCOUNT[rule], None)
    else:
        assert_caller_not_allowed(response, caller)
        assert_nothing_upstream(standins)
        assert_refused_line(entry, caller, None)


# ---------------------------------------------------------------------------------------------
# Configurations refused at load


def refused_line(tmp_path) -> str:
    refusals = [line for line in (tmp_path / "envoy.log").read_text(errors="replace").splitlines()
                if "refusing configuration" in line]
    assert refusals, "Envoy did not start, but not because the filter refused its configuration"
    return refusals[0]


def names_field(line: str, field: str) -> bool:
    """The refusal names the field: its whole path, not as the start of a longer one."""
    return re.search(r"(?<![\w.\[\]])" + re.escape(field) + r"(?![\w.\[])", line) is not None


OK_RULE = {"name": "inference", "principals": [INFERENCE], "service_account_id": "sa_inference"}


def rule(**fields) -> dict:
    return {**OK_RULE, **fields}


BAD_CONFIGS = [
    ({"callers": []}, "callers"),
    ({"callers": [rule(principals=[])]}, "callers[0].principals"),
    ({"callers": [rule(principals=[""])]}, "callers[0].principals[0]"),
    ({"callers": [rule(principals=["*"])]}, "callers[0].principals[0]"),
    ({"callers": [OK_RULE, rule(name="batch", principals=["spiffe://cluster.local/*/sa/job"])]},
     "callers[1].principals[0]"),
    ({"callers": [rule(principals=[INFERENCE, "spiffe://cluster.local/ns/**"])]}, "callers[0].principals[1]"),
    ({"callers": [OK_RULE, rule(name="batch"), rule(principals=[JOB])]}, "callers[2].name"),
    ({"callers": [rule(name="Inference")]}, "callers[0].name"),
    ({"callers": [rule(name="")]}, "callers[0].name"),
    ({"callers": [rule(name="x" * 65)]}, "callers[0].name"),
    ({"caller_identity": "xfcc"}, "caller_identity"),
    ({"identity_provider_id": None}, "identity_provider_id"),
    # Without caller rules the top-level account is the only one: required (with rules, see below).
    ({"service_account_id": None, "callers": None}, "service_account_id"),
]


@pytest.mark.parametrize("settings, field", BAD_CONFIGS, ids=[field + ":" + json.dumps(settings)[:40]
                                                                 for settings, field in BAD_CONFIGS])
def test_bad_rules_are_refused_at_load_naming_the_field(settings, field, standins, module_path, tmp_path, pki):
    config = {**default_filter_config("kubernetes", standins), "callers": [OK_RULE], **settings}
    config = {name: value for name, value in config.items() if value is not None}
    stack = Stack("kubernetes", tmp_path, standins=standins, filter_config=config, **pki.listener())
    with pytest.raises(EnvoyError):
        stack.start()
    line = refused_line(tmp_path)
    assert names_field(line, field), line


def test_with_caller_rules_the_top_level_service_account_may_be_left_out(make_stack, pki, standins):
    """Every request takes the account of the rule it matches, so no top-level account is needed
    (none in the configuration, none in the environment)."""
    config = without_ids(default_filter_config("kubernetes", standins, subject=K8S_SUBJECT, callers=RULES),
                         "service_account_id")
    stack = make_stack("kubernetes", filter_config=config, **pki.listener())
    for who, rule in ((INFERENCE, "inference"), (JOB, "batch")):
        standins.openai.reset()
        response = stack.request("GET", "/v1/models", tls=pki.tls(who), timeout=REQUEST_TIMEOUT_S)
        assert response.status == 200, (response, startup_lines(stack)[-5:])
        assert served_account(standins) == (K8S_SUB, PROVIDER[rule], ACCOUNT[rule])
    standins.openai.reset()
    assert_caller_not_allowed(stack.request("GET", "/v1/models", tls=pki.tls(OTHER), timeout=REQUEST_TIMEOUT_S),
                              OTHER)
    assert_no_rule_exchange(standins)


def test_a_rule_without_a_service_account_is_refused_naming_it(standins, module_path, tmp_path, pki):
    bad = {k: v for k, v in OK_RULE.items() if k != "service_account_id"}
    config = {**default_filter_config("kubernetes", standins), "callers": [OK_RULE, bad]}
    with pytest.raises(EnvoyError):
        Stack("kubernetes", tmp_path, standins=standins, filter_config=config, **pki.listener()).start()
    line = refused_line(tmp_path)
    assert "service_account_id" in line and "callers[1]" in line, line


# ---------------------------------------------------------------------------------------------
# Ids from the VM environment


def startup_lines(stack) -> list:
    """The filter's own log lines (no token in them), for failure messages."""
    return [line.split("wasm log ", 1)[1] for line in stack.envoy.log_text().splitlines() if "wasm log " in line]


def assert_startup_names_the_environment(stack, used: set):
    """The startup line says which id came from the VM environment: it names the variable of each id
    taken from there (e.g. "identity_provider_id from OPENAI_IDENTITY_PROVIDER_ID"), and no other."""
    lines = [line for line in startup_lines(stack) if "OPENAI_" in line]
    assert lines, startup_lines(stack)
    named = {var for var in ("OPENAI_IDENTITY_PROVIDER_ID", "OPENAI_SERVICE_ACCOUNT_ID") if any(var in l for l in lines)}
    assert named == used, lines


def without_ids(config: dict, *names) -> dict:
    return {name: value for name, value in config.items() if name not in names}


def test_ids_come_from_the_vm_environment_when_the_configuration_omits_them(make_stack, standins):
    config = without_ids(default_filter_config("kubernetes", standins, subject=K8S_SUBJECT),
                         "identity_provider_id", "service_account_id")
    stack = make_stack("kubernetes", filter_config=config,
                       vm_env={"OPENAI_IDENTITY_PROVIDER_ID": "wip_k8s", "OPENAI_SERVICE_ACCOUNT_ID": "sa_inference"})
    response = stack.request("GET", "/v1/models", timeout=REQUEST_TIMEOUT_S)
    assert response.status == 200, (response, startup_lines(stack)[-5:])
    assert served_account(standins) == (K8S_SUB, "wip_k8s", "sa_inference")
    assert_startup_names_the_environment(stack, {"OPENAI_IDENTITY_PROVIDER_ID", "OPENAI_SERVICE_ACCOUNT_ID"})


def test_the_configuration_wins_over_the_environment_and_rules_inherit_the_provider(make_stack, pki, standins):
    """identity_provider_id from the environment (the rule names none, so it inherits it);
    service_account_id from the configuration, although the environment has one too."""
    rules = [{"name": "batch", "principals": ["spiffe://cluster.local/ns/batch/*"], "service_account_id": "sa_batch"}]
    config = without_ids(default_filter_config("kubernetes", standins, subject=K8S_SUBJECT, callers=rules),
                         "identity_provider_id")
    config["service_account_id"] = "sa_batch"
    stack = make_stack("kubernetes", filter_config=config, **pki.listener(),
                       vm_env={"OPENAI_IDENTITY_PROVIDER_ID": BATCH_PROVIDER, "OPENAI_SERVICE_ACCOUNT_ID": "sa_inference"})
    response = stack.request("GET", "/v1/models", tls=pki.tls(JOB), timeout=REQUEST_TIMEOUT_S)
    assert response.status == 200, (response, startup_lines(stack)[-5:])
    assert served_account(standins) == (K8S_SUB, BATCH_PROVIDER, "sa_batch")
    assert {e["service_account_id"] for e in standins.openai.exchange_log} == {"sa_batch"}
    assert_startup_names_the_environment(stack, {"OPENAI_IDENTITY_PROVIDER_ID"})
