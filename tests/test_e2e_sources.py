"""End to end: the gateway-identity sources (kubernetes, gcp_metadata, azure_imds, spiffe) through a
real Envoy (2 workers) running the built filter, against the stand-ins.

For every source the gateway obtains its own subject token with exactly the request the platform
expects, exchanges it once at the token endpoint, and sets `Authorization: Bearer <issued token>` on
requests to the API in place of whatever the client sent. It keeps the token fresh as the subject
rotates or expires without failing or delaying a request, fails closed with a 503 that names the
source and the cause when the source fails and no valid token is left, keeps serving a still-valid
token while the source fails, backs off, recovers by itself, and never writes a token to its log.

Gateways: module-scoped ones for the warm path; a fresh one (`make_stack`) wherever the test needs a
cold cache or a token derived from a short-lived subject.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass

import jwt
import pytest

from tests.harness import http_request
from tests.standins import AZURE_RESOURCE, OPENAI_AUDIENCE
from tests.standins.azure_imds import DEFAULT_IDENTITY
from tests.standins.gcp_metadata import IDENTITY_PATH
from tests.standins.spiffe import SECURITY_HEADER

# Sent with every request: the gateway must drop it, and it must never reach the API.
STATIC_KEY = "sk-static-key"
CLIENT_HEADERS = {"Authorization": f"Bearer {STATIC_KEY}"}

SOURCE_UNAVAILABLE = "subject_source_unavailable"
AZURE_API_VERSION = "2018-02-01"

# Timeouts small enough that a lost callout or a slow source costs little, large enough for a
# loaded 2-core machine (the stand-ins answer on loopback in milliseconds).
SUBJECT_TIMEOUT_MS = 1000
ENDPOINT_TIMEOUT_MS = 1000
SLOW_SOURCE_TIMEOUT_MS = 300

# Backoff after the 1st, 2nd, 3rd failure: at most 1 s, 2 s, 4 s. Recovery is polled for far longer
# than the backoff that can be pending (a cold gateway has failed once or twice, a warm one up to 3
# times), so a loaded machine does not turn a slow recovery into a failure; polling ends at the
# first 200.
RECOVERY_BOUND_S = 15.0
LONG_RECOVERY_BOUND_S = 20.0
REQUEST_TIMEOUT_S = 8.0
# Deadline for a flow of requests to reach the event it waits for (a new subject, a 503).
FLOW_BOUND_S = 30.0

# Subjects that expire while requests flow. Not shorter: a refresh may exchange the cached subject
# when only ~25 % of its life is left, and the token endpoint refuses subjects with < 1 s left.
SHORT_LIFETIME_S = 6


def decode(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def monotonic_at(epoch_s: float) -> float:
    """The time.monotonic() of a time.time() instant (such as a JWT's exp)."""
    return time.monotonic() + (epoch_s - time.time())


@dataclass(frozen=True)
class Platform:
    source: str  # subject_token.source
    wiring: str  # key of standins.wiring / standins.issuers
    sub: str  # `sub` of the subject tokens the platform issues to the gateway
    cluster: str  # the Envoy cluster the filter calls

    def __str__(self):
        return self.source

    def settings(self, timeout_ms: int = SUBJECT_TIMEOUT_MS, **subject) -> dict:
        """Filter settings (amendments to the default configuration) for this source."""
        return {"subject": {"timeout_ms": timeout_ms, **subject},
                "token_endpoint": {"timeout_ms": ENDPOINT_TIMEOUT_MS}}

    def served(self, standins) -> list:
        """Subject tokens the platform stand-in handed out since the last reset (not kubernetes:
        Envoy serves that file itself)."""
        return {"gcp_metadata": standins.gcp.tokens, "azure_imds": standins.azure.tokens,
                "spiffe": standins.spiffe.tokens}.get(self.source, [])

    def fetches(self, standins, stack) -> int:
        """Subject fetches that reached the platform."""
        if self.source == "kubernetes":
            return stack.envoy.counter("downstream_rq_total", prefix="http.wif_token_file")
        return {"gcp_metadata": standins.gcp, "azure_imds": standins.azure,
                "spiffe": standins.spiffe}[self.source].requests

    def assert_from_platform(self, standins, subject_token: str, served=None):
        """The token is one the platform issued to the gateway: signed by its issuer, for its `sub`,
        and (but for kubernetes) among those the stand-in served (`served`: a copy taken earlier)."""
        issuer = standins.issuers[self.wiring]
        claims = jwt.decode(subject_token, jwt.PyJWK(issuer.public_jwk()).key, algorithms=["RS256"],
                            options={"verify_aud": False, "verify_exp": False, "verify_iat": False,
                                     "verify_nbf": False})
        assert claims["iss"] == issuer.iss
        assert claims["sub"] == self.sub
        if self.source != "kubernetes":
            assert subject_token in (self.served(standins) if served is None else served)


KUBERNETES = Platform("kubernetes", "k8s", "system:serviceaccount:default:openai-wif", "wif_token_file")
GCP = Platform("gcp_metadata", "gcp", "110123456789012345678", "gcp_metadata")
AZURE = Platform("azure_imds", "azure", DEFAULT_IDENTITY["object_id"], "azure_imds")
SPIFFE = Platform("spiffe", "spiffe", "spiffe://example.com/ns/inference/sa/worker", "spiffe_workload_api")
PLATFORMS = [KUBERNETES, GCP, AZURE, SPIFFE]


# ---------------------------------------------------------------------------------------------
# What each platform must have received


def assert_gcp_request(standins, audience=OPENAI_AUDIENCE):
    request = standins.gcp.last_request
    assert request is not None, "the metadata server saw no request"
    assert request.path == IDENTITY_PATH.format(account="default")
    assert request.query == {"audience": audience, "format": "full"}
    assert request.headers.get("metadata-flavor") == "Google"
    assert request.headers.get("host") == "metadata.google.internal"
    assert "x-forwarded-for" not in request.headers  # the metadata server refuses proxied requests
    assert "authorization" not in request.headers


def assert_azure_request(standins, selector: dict | None = None):
    request = standins.azure.last_request
    assert request is not None, "IMDS saw no request"
    assert request.path == "/metadata/identity/oauth2/token"
    assert request.query == {"api-version": AZURE_API_VERSION, "resource": AZURE_RESOURCE, **(selector or {})}
    assert request.headers.get("metadata") == "true"
    assert request.headers.get("host") == "169.254.169.254"
    assert "x-forwarded-for" not in request.headers
    assert "authorization" not in request.headers


def assert_spiffe_request(standins, spiffe_id: str = ""):
    assert standins.spiffe.last_metadata is not None, "the Workload API saw no call"
    assert standins.spiffe.last_metadata.get(SECURITY_HEADER) == "true"
    assert standins.spiffe.last_request == {"audience": [OPENAI_AUDIENCE], "spiffe_id": spiffe_id}


def assert_kubernetes_request(standins, stack):
    # Envoy serves the file itself (direct_response); its listener counts what it served.
    assert stack.envoy.counter("downstream_rq_2xx", prefix="http.wif_token_file") >= 1


def assert_platform_request(platform: Platform, standins, stack):
    {"kubernetes": lambda: assert_kubernetes_request(standins, stack),
     "gcp_metadata": lambda: assert_gcp_request(standins),
     "azure_imds": lambda: assert_azure_request(standins),
     "spiffe": lambda: assert_spiffe_request(standins)}[platform.source]()


# ---------------------------------------------------------------------------------------------
# What the token endpoint and the API must have received


def assert_exchange(platform: Platform, standins, entry: dict, served=None):
    wiring = standins.wiring[platform.wiring]
    assert entry["ok"], f"the token endpoint refused the exchange: {entry['reason']} {entry['detail']}"
    assert entry["identity_provider_id"] == wiring.identity_provider_id
    assert entry["service_account_id"] == wiring.service_account_id
    assert entry["sub"] == platform.sub
    platform.assert_from_platform(standins, entry["subject_token"], served)


def api_bearers(standins, api_requests=None) -> list:
    """The access token of every request that reached the API (or of `api_requests`, a copy taken
    earlier), in order; asserts the form of the header and that the client's key never got there."""
    tokens = []
    for path, authorization, headers in list(standins.openai.api_requests if api_requests is None else api_requests):
        assert STATIC_KEY not in json.dumps(headers), f"the client's key reached the API on {path}"
        assert authorization is not None and authorization.startswith("Bearer "), authorization
        tokens.append(authorization[len("Bearer "):])
    assert not any(STATIC_KEY in json.dumps(r.headers) for r in standins.openai.echo_requests)
    return tokens


def assert_issued_for(platform: Platform, standins, access_token: str):
    record = standins.openai.issued.get(access_token)
    assert record is not None, "the API received a token the token endpoint never issued"
    wiring = standins.wiring[platform.wiring]
    assert (record["sub"], record["identity_provider_id"], record["service_account_id"]) == \
        (platform.sub, wiring.identity_provider_id, wiring.service_account_id)


# ---------------------------------------------------------------------------------------------
# Replies, polling, counters, logs


def source_error(response, platform: Platform) -> str:
    """Asserts the fail-closed reply (503, OpenAI-shaped JSON naming the source); returns the cause."""
    assert response.status == 503, response
    assert response.header("content-type", "").startswith("application/json")
    assert response.header("x-openai-wif-error") == SOURCE_UNAVAILABLE
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == SOURCE_UNAVAILABLE
    assert error["param"] is None
    assert isinstance(error["type"], str) and error["type"]
    prefix = f"could not obtain subject token from {platform.source}: "
    assert error["message"].startswith(prefix), error["message"]
    return error["message"][len(prefix):]


def get(stack, path="/v1/models", **kwargs):
    return stack.request("GET", path, headers=CLIENT_HEADERS, timeout=REQUEST_TIMEOUT_S, **kwargs)


def poll_until_ok(stack, bound_s: float, interval_s: float = 0.05):
    """Requests until one is answered 200; returns (that response, every response before it)."""
    deadline = time.monotonic() + bound_s
    seen = []
    while True:
        response = get(stack)
        if response.status == 200:
            return response, seen
        seen.append(response)
        if time.monotonic() >= deadline:
            raise AssertionError(f"no 200 within {bound_s} s; last answers: {seen[-3:]}; "
                                 f"stats {nonzero(stack.stats())}; filter said: {warnings(stack)[-3:]}")
        time.sleep(interval_s)


def warm(stack, bound_s: float = RECOVERY_BOUND_S):
    """Precondition of tests about a hot token: the gateway has one."""
    return poll_until_ok(stack, bound_s)[0]


def nonzero(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if v}


def delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}


def warnings(stack) -> list:
    return [line.split("openai_wif: ", 2)[-1] for line in stack.envoy.log_text().splitlines()
            if "][warning][wasm]" in line or "][error][wasm]" in line]


def filter_log_entries(stack) -> list:
    """Log entries (with continuation lines) written by the filter or naming it. Envoy's own router
    debug entries print request headers, Authorization included: those are Envoy's, not ours."""
    entries, current = [], []
    for line in stack.envoy.log_text().splitlines():
        if re.match(r"^\[\d{4}-\d\d-\d\d ", line) and current:
            entries.append("\n".join(current))
            current = []
        current.append(line)
    if current:
        entries.append("\n".join(current))
    return [e for e in entries if "wasm log" in e or "openai_wif" in e]


def secret_fragments(tokens) -> set:
    """Each token, and the payload and signature of each JWT (a truncated print still leaks them)."""
    fragments = set()
    for token in tokens:
        if not token or len(token) < 16:
            continue
        fragments.add(token)
        parts = token.split(".")
        if len(parts) == 3:
            fragments.update(p for p in parts[1:] if len(p) >= 16)
    return fragments


def tokens_seen(standins, extra=()) -> set:
    """Every token the stand-ins handed out or received since their last reset, and every access
    token ever issued."""
    tokens = set(extra)
    tokens.update(standins.gcp.tokens, standins.azure.tokens, standins.spiffe.tokens)
    tokens.update(e["subject_token"] for e in standins.openai.exchange_log if isinstance(e["subject_token"], str))
    tokens.update(standins.openai.issued)
    return tokens


def assert_no_token_in(entries: list, tokens):
    assert entries, "the filter wrote nothing to the log: the check would prove nothing"
    text = "\n".join(entries)
    for fragment in secret_fragments(tokens):
        if fragment in text:
            entry = next(e for e in entries if fragment in e)
            raise AssertionError(f"token text in the filter's log: {entry.replace(fragment, '<TOKEN>')[:300]}")


@dataclass(frozen=True)
class Sent:
    """One request of a Flow. Times are time.monotonic()."""
    read_at: float  # just before subject_fetch_failed was read (with_stats)
    sent: float  # just before the request was sent (and after the counter was read)
    response: object
    answered: float  # once the response (or the error) was in
    failed: int | None  # subject_fetch_failed as read before sending; None without with_stats


class Flow:
    """Requests sent back to back from one thread until an event, each recorded (see Sent) with the
    filter's failed-fetch counter read just before it was sent."""

    def __init__(self, stack, with_stats: bool = False, pause_s: float = 0.02):
        self.stack = stack
        self.with_stats = with_stats
        self.pause_s = pause_s  # pacing only: a flow ends on an event, never on a duration
        self.records: list = []

    def run_until(self, done, bound_s: float = FLOW_BOUND_S):
        """Runs until done(record) is true (returns that record) or bound_s passes (returns None)."""
        deadline = time.monotonic() + bound_s
        while time.monotonic() < deadline:
            read_at = time.monotonic()
            failed = self.stack.envoy.counter("subject_fetch_failed") if self.with_stats else None
            sent = time.monotonic()
            response = get(self.stack)
            record = Sent(read_at, sent, response, time.monotonic(), failed)
            self.records.append(record)
            if done(record):
                return record
            time.sleep(self.pause_s)
        return None

    def responses(self) -> list:
        return [record.response for record in self.records]


# ---------------------------------------------------------------------------------------------
# Short-lived subjects, per platform


class Subjects:
    """Makes a platform issue short-lived subject tokens (and, for kubernetes, rotate the projected
    file like the kubelet); restores the defaults on exit. `written` holds the kubernetes tokens."""

    def __init__(self, platform: Platform, standins, lifetime_s: int):
        self.platform = platform
        self.standins = standins
        self.lifetime_s = lifetime_s
        self.written = []
        self._stop = threading.Event()
        self._thread = None
        self._saved = None

    def _standin(self):
        return {"gcp_metadata": self.standins.gcp, "azure_imds": self.standins.azure,
                "spiffe": self.standins.spiffe}.get(self.platform.source)

    def __enter__(self):
        standin = self._standin()
        if standin is not None:
            self._saved = standin.lifetime_s
            standin.lifetime_s = self.lifetime_s
        else:
            self.written.append(self.standins.token_dir.rotate(lifetime_s=self.lifetime_s))
            self._thread = threading.Thread(target=self._rotate, daemon=True, name="kubelet")
            self._thread.start()
        return self

    def _rotate(self):
        # The kubelet refreshes well before expiry; here: a new token every 30 % of the lifetime.
        while not self._stop.wait(self.lifetime_s * 0.3):
            self.written.append(self.standins.token_dir.rotate(lifetime_s=self.lifetime_s))

    def stop_rotating(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __exit__(self, *exc):
        self.stop_rotating()
        standin = self._standin()
        if standin is not None:
            standin.lifetime_s = self._saved
        else:
            self.written.append(self.standins.token_dir.rotate())


# ---------------------------------------------------------------------------------------------
# Warm path: module-scoped gateways


@pytest.fixture(scope="module")
def warm_gateway(gateway_for):
    def get_gateway(platform: Platform):
        # Kubernetes: no periodic re-read during the test, so "no fetch" is exact.
        extra = {"refresh_interval_s": 3600} if platform is KUBERNETES else {}
        return gateway_for(platform.source, filter_settings=platform.settings(**extra))
    return get_gateway


@pytest.mark.parametrize("platform", PLATFORMS, ids=str)
def test_hot_token_is_injected_in_place_of_the_client_key_without_new_fetches(platform, standins, warm_gateway):
    stack = warm_gateway(platform)
    warm(stack)
    standins.openai.reset()
    before_stats, before_fetches = stack.stats(), platform.fetches(standins, stack)

    responses = stack.burst(40, "GET", "/v1/models", headers=CLIENT_HEADERS, timeout=REQUEST_TIMEOUT_S)
    chat = stack.request("POST", "/v1/chat/completions", headers=CLIENT_HEADERS, timeout=REQUEST_TIMEOUT_S,
                         body={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]})

    assert [r.status for r in responses] == [200] * 40, [r for r in responses if r.status != 200][:3]
    assert chat.status == 200, chat
    change = delta(stack.stats(), before_stats)
    assert (change["cache_hit"], change["cache_miss"]) == (41, 0)
    assert (change["subject_fetch_ok"], change["subject_fetch_failed"]) == (0, 0)
    assert (change["exchanges_ok"], change["exchanges_failed"]) == (0, 0)
    assert platform.fetches(standins, stack) == before_fetches
    assert standins.openai.exchanges == 0
    bearers = api_bearers(standins)
    assert len(bearers) == 41 and len(set(bearers)) == 1, "one cached token for the gateway's identity"
    assert_issued_for(platform, standins, bearers[0])


# ---------------------------------------------------------------------------------------------
# Cold start: warm-up, the exact platform request, single flight


@pytest.mark.parametrize("platform", PLATFORMS, ids=str)
def test_cold_burst_waits_for_one_fetch_and_one_exchange(platform, standins, make_stack):
    """The default configuration. The warm-up starts by itself; its exchange is held at the endpoint
    until a burst of 120 concurrent requests has arrived while no token exists yet: every request
    waits, and the whole gateway (both workers) makes exactly one subject fetch and one exchange."""
    standins.openai.hold()
    stack = make_stack(platform.source)
    try:
        stack.envoy.wait_for(lambda: standins.openai.exchanges >= 1, timeout_s=10,
                             what="the warm-up exchange, started without any request")
    except Exception as error:
        raise AssertionError(f"{error}; stats {nonzero(stack.stats())}; filter said: {warnings(stack)}")

    responses: list = []
    burst = threading.Thread(target=lambda: responses.extend(
        stack.burst(120, "GET", "/v1/models", headers=CLIENT_HEADERS, timeout=15)))
    burst.start()
    # Released before the endpoint timeout (5 s by default) ends the held exchange.
    stack.envoy.wait_for(lambda: stack.envoy.counter("cache_miss") >= 120, timeout_s=4,
                         what="120 requests waiting for the warm-up exchange")
    standins.openai.release()
    burst.join(45)

    assert [r.status for r in responses] == [200] * 120, [r for r in responses if r.status != 200][:3]
    stats = stack.stats()
    assert (stats["cache_miss"], stats["cache_hit"]) == (120, 0), "the burst was not cold"
    assert (stats["subject_fetch_ok"], stats["subject_fetch_failed"]) == (1, 0), warnings(stack)
    assert (stats["exchanges_ok"], stats["exchanges_failed"]) == (1, 0)
    assert platform.fetches(standins, stack) == 1
    assert stack.envoy.counter("upstream_rq_total", prefix=f"cluster.{platform.cluster}") == 1
    assert standins.openai.exchanges == 1
    assert_platform_request(platform, standins, stack)
    assert len(standins.openai.exchange_log) == 1
    assert_exchange(platform, standins, standins.openai.exchange_log[0])
    bearers = api_bearers(standins)
    assert len(bearers) == 120 and len(set(bearers)) == 1
    assert_issued_for(platform, standins, bearers[0])


SELECTORS = [
    pytest.param(AZURE, {"client_id": DEFAULT_IDENTITY["client_id"]}, id="azure_imds-client_id"),
    pytest.param(AZURE, {"object_id": DEFAULT_IDENTITY["object_id"]}, id="azure_imds-object_id"),
    pytest.param(AZURE, {"msi_res_id": DEFAULT_IDENTITY["msi_res_id"]}, id="azure_imds-msi_res_id"),
    pytest.param(SPIFFE, {"spiffe_id": SPIFFE.sub}, id="spiffe-spiffe_id"),
]


@pytest.mark.parametrize("platform, selector", SELECTORS)
def test_configured_identity_is_requested_from_the_platform(platform, selector, standins, make_stack):
    stack = make_stack(platform.source, filter_settings=platform.settings(**selector))
    warm(stack)

    if platform is AZURE:
        assert_azure_request(standins, selector)
        # IMDS refuses a request without `Metadata: true`: the filter's got through because it sends it.
        request = standins.azure.last_request
        target = "/metadata/identity/oauth2/token?" + "&".join(
            f"{k}={v}" for k, v in {"api-version": AZURE_API_VERSION, "resource": AZURE_RESOURCE}.items())
        refused = http_request(standins.azure.port, "GET", target, host=request.headers["host"], timeout=5)
        assert refused.status == 400
        assert refused.json()["error_description"] == "Required metadata header not specified"
    else:
        assert_spiffe_request(standins, spiffe_id=selector["spiffe_id"])
    assert_exchange(platform, standins, standins.openai.exchange_log[-1])
    bearers = api_bearers(standins)
    assert bearers
    assert_issued_for(platform, standins, bearers[-1])


# ---------------------------------------------------------------------------------------------
# Rotation and expiry while requests flow; failure with a still-valid token; fail closed; recovery

LIFECYCLE_FAULTS = {
    # platform: (break the source, the cause the 503 must give, repair)
    "kubernetes": (lambda s: s.token_dir.write_raw(""), r"the token file is empty", lambda s: None),
    "gcp_metadata": (lambda s: setattr(s.gcp, "fault", "500"), r"HTTP 500: metadata server fault 500",
                     lambda s: setattr(s.gcp, "fault", None)),
    "azure_imds": (lambda s: setattr(s.azure, "fault", "no_token"), r"the answer has no access_token",
                   lambda s: setattr(s.azure, "fault", None)),
    "spiffe": (lambda s: setattr(s.spiffe, "fault", "unavailable"), r"gRPC status 14 \(UNAVAILABLE\)",
               lambda s: setattr(s.spiffe, "fault", None)),
}


def backoff_attempts(window_s: float) -> int:
    """The most attempts backoff allows in window_s after a first failure (1 s, 2 s, 4 s …, each
    jittered down to 75 %)."""
    attempts, at, wait = 1, 0.0, 0.75
    while at + wait <= window_s:
        attempts, at, wait = attempts + 1, at + wait, wait * 2
    return attempts


@dataclass
class Lifecycle:
    """What one gateway did over a recorded scenario; the tests below check it aspect by aspect.

    1. Subjects live SHORT_LIFETIME_S (kubernetes: the kubelet rotates the file) while requests flow
       until the subject in use at the start has expired and been replaced (see flow_events).
       2. The source breaks; requests go on until the first 503. 3. The fault clears; requests go on
       until the first 200."""
    platform: Platform
    cause: str
    problem: str | None = None  # a step that could not be carried out
    flow: list = None  # responses while subjects expired and were replaced
    flow_missing: list = None  # the events the flow waited for in vain (see flow_events)
    flow_stats: dict = None  # counters' change over the flow
    flow_exchanges: list = None  # exchange log entries of the flow
    subject_at_start: str | None = None  # the subject of the token in use when the flow started
    flow_api_requests: list = None
    served: list = None  # subject tokens the platform stand-in served
    written: list = None  # tokens the kubelet stand-in wrote
    failing: list = None  # Sent records from the break on
    failed_before: int = 0
    failed_before_read_at: float = 0.0  # just before failed_before was read
    first_503: Sent | None = None
    meanwhile: list = None  # answers between the repair and the first 200
    recovered: object = None  # the first 200 after the repair
    recovery_exchange: dict | None = None
    recovery_api_requests: list = None
    log_entries: list = None
    tokens: set = None


def flow_events(standins, subject_at_start: str, exchanges_before: int, api_before: int, records: list) -> dict:
    """What a flow of requests while subjects expire must have seen before it ends: {event: seen}."""
    flow_exchanges = standins.openai.exchange_log[exchanges_before:]
    exp = monotonic_at(decode(subject_at_start)["exp"])
    return {
        "50 requests": len(records) >= 50,
        # From then on, the API refuses an access token obtained for that subject.
        "a request after the first subject's exp": any(record.sent > exp for record in records),
        "an exchange of another subject": any(e["subject_token"] != subject_at_start for e in flow_exchanges),
        "a second access token at the API":
            len({a for _, a, _ in standins.openai.api_requests[api_before:]}) >= 2,
    }


def run_lifecycle(platform: Platform, standins, gateway_for) -> Lifecycle:
    break_source, cause, repair = LIFECYCLE_FAULTS[platform.source]
    result = Lifecycle(platform, cause)
    refresh = {"refresh_interval_s": 1} if platform is KUBERNETES else {}
    with Subjects(platform, standins, SHORT_LIFETIME_S) as subjects:
        # A gateway of its own (debug log), started now so that its first subject is short-lived.
        stack = gateway_for(platform.source, filter_settings=platform.settings(**refresh), log_level="debug")
        try:
            warm(stack)
            before = stack.stats()
            exchanges_before = len(standins.openai.exchange_log)
            api_before = len(standins.openai.api_requests)
            result.subject_at_start = standins.openai.exchange_log[-1]["subject_token"]
            flow = Flow(stack)

            def missing():
                seen = flow_events(standins, result.subject_at_start, exchanges_before, api_before, flow.records)
                return [event for event, happened in seen.items() if not happened]

            flow.run_until(lambda _: not missing())
            result.flow_missing = missing()
            result.flow = flow.responses()
            result.flow_stats = delta(stack.stats(), before)
            result.flow_exchanges = standins.openai.exchange_log[exchanges_before:]
            result.flow_api_requests = standins.openai.api_requests[api_before:]

            subjects.stop_rotating()
            result.failed_before_read_at = time.monotonic()
            result.failed_before = stack.envoy.counter("subject_fetch_failed")
            break_source(standins)
            flow = Flow(stack, with_stats=True, pause_s=0.01)
            result.first_503 = flow.run_until(lambda record: record.response.status == 503)
            result.failing = flow.records

            repair(standins)
            if platform is KUBERNETES:
                subjects.written.append(standins.token_dir.rotate())
            exchanges_before = len(standins.openai.exchange_log)
            api_before = len(standins.openai.api_requests)
            result.recovered, result.meanwhile = poll_until_ok(stack, LONG_RECOVERY_BOUND_S)
            result.recovery_exchange = (standins.openai.exchange_log[exchanges_before:] or [None])[-1]
            result.recovery_api_requests = standins.openai.api_requests[api_before:]
        except AssertionError as problem:
            result.problem = str(problem)
        finally:
            stack.stop()  # idle from here on: no background refresh during later tests
            result.served = list(platform.served(standins))
            result.written = list(subjects.written)
            result.log_entries = filter_log_entries(stack)
            result.tokens = tokens_seen(standins, subjects.written)
    return result


@pytest.fixture(scope="module")
def lifecycle(standins, gateway_for):
    recorded = {}

    def get(platform: Platform) -> Lifecycle:
        if platform.source not in recorded:
            recorded[platform.source] = run_lifecycle(platform, standins, gateway_for)
        return recorded[platform.source]
    return get


@pytest.mark.parametrize("platform", PLATFORMS, ids=str)
def test_short_lived_subjects_are_replaced_while_requests_flow_without_failing_or_waiting(
        platform, standins, lifecycle):
    run = lifecycle(platform)
    assert run.flow is not None, run.problem
    assert [r.status for r in run.flow] == [200] * len(run.flow), [r for r in run.flow if r.status != 200][:3]
    # A request that waited for a refresh of the hot token would count as a miss.
    assert run.flow_stats["cache_miss"] == 0, "a request waited for the refresh of a hot token"
    assert run.flow_stats["exchanges_failed"] == 0, \
        [(e["reason"], e["detail"]) for e in run.flow_exchanges if not e["ok"]]
    assert run.flow_stats["subject_fetch_failed"] == 0, [e for e in run.log_entries if "could not obtain" in e][:3]
    for entry in run.flow_exchanges:
        assert_exchange(platform, standins, entry, run.served)
    subjects_used = {e["subject_token"] for e in run.flow_exchanges}
    assert subjects_used - {run.subject_at_start}, "the short-lived subject was never replaced"
    if platform is KUBERNETES:
        assert subjects_used <= set(run.written), "a subject the kubelet never wrote"
    # Every access token reached the API before its expiry (the API refuses expired ones: no 401 above).
    bearers = api_bearers(standins, run.flow_api_requests)
    assert len(set(bearers)) >= 2, "the access token was never refreshed"
    for bearer in set(bearers):
        assert_issued_for(platform, standins, bearer)
    assert not run.flow_missing, f"the flow ended after {FLOW_BOUND_S} s without {run.flow_missing}"


@pytest.mark.parametrize("platform", PLATFORMS, ids=str)
def test_failing_source_keeps_the_valid_token_in_use_then_fails_closed(platform, lifecycle):
    run = lifecycle(platform)
    assert run.failing is not None, run.problem
    assert run.first_503 is not None, f"still no 503 {FLOW_BOUND_S} s after the source broke"
    responses = [record.response for record in run.failing]
    # Never 401: an access token is not used after its subject's exp.
    assert {r.status for r in responses} <= {200, 503}, [r for r in responses if r.status not in (200, 503)][:3]
    served_while_failing = [record for record in run.failing
                            if record.response.status == 200 and record.failed > run.failed_before]
    assert served_while_failing, ("no request was served with the still-valid token while the source failed: "
                                  f"{[(r.response.status, r.failed - run.failed_before) for r in run.failing][-8:]}, "
                                  f"then {run.first_503.response.text[:200]}")
    assert re.fullmatch(run.cause, source_error(run.first_503.response, platform))


@pytest.mark.parametrize("platform", PLATFORMS, ids=str)
def test_gateway_recovers_by_itself_with_a_new_subject(platform, standins, lifecycle):
    run = lifecycle(platform)
    assert run.recovered is not None, run.problem
    for response in run.meanwhile:  # until then: the same refusal
        assert re.fullmatch(run.cause, source_error(response, platform))
    assert run.recovery_exchange is not None, "recovered without an exchange"
    assert_exchange(platform, standins, run.recovery_exchange, run.served)
    assert run.recovery_exchange["subject_token"] not in {e["subject_token"] for e in run.flow_exchanges}
    bearers = api_bearers(standins, run.recovery_api_requests)
    assert len(bearers) == 1
    assert_issued_for(platform, standins, bearers[0])


@pytest.mark.parametrize("platform", PLATFORMS, ids=str)
def test_failing_source_is_asked_again_no_faster_than_backoff(platform, lifecycle):
    """Between the first failed fetch and the first 503 the token is still valid; the source must
    not be called more often than backoff allows (1 s, 2 s, 4 s …; kubernetes: plus the periodic
    re-read, every 1 s here), on any worker."""
    run = lifecycle(platform)
    assert run.first_503 is not None, run.problem
    first_seen = next((i for i, record in enumerate(run.failing) if record.failed > run.failed_before), None)
    assert first_seen is not None, "no failed fetch was seen before the 503"
    # The counter is sampled: the first failure came after the last read that did not show it began,
    # and every failure counted before the 503 came before that request was sent. The window between
    # those two instants contains the real one, however slowly the requests went.
    no_failure_yet = run.failing[first_seen - 1].read_at if first_seen else run.failed_before_read_at
    window_s = run.first_503.sent - no_failure_yet
    failures = run.first_503.failed - run.failed_before
    periodic = int(window_s + 1) if platform is KUBERNETES else 0
    allowed = backoff_attempts(window_s) + periodic
    assert failures <= allowed, (f"{failures} failed fetches from {platform.source} in the {window_s:.2f} s "
                                 f"between the first failure and the first 503; backoff allows about {allowed}")


@pytest.mark.parametrize("platform", PLATFORMS, ids=str)
def test_no_token_text_in_the_filter_log(platform, lifecycle):
    """Debug level, through fetches, exchanges, refreshes, failures and recovery."""
    run = lifecycle(platform)
    assert_no_token_in(run.log_entries, run.tokens)


def test_kubernetes_rotated_token_is_used_after_the_periodic_re_read(standins, make_stack):
    """A long-lived projected token is replaced by the kubelet: the gateway re-reads the file every
    refresh_interval_s and exchanges the new token from its next refresh on, without a failed request.
    (Access tokens live 2 s here, so refreshes are frequent; the subject itself never nears its exp.)"""
    old = standins.token_dir.rotate()
    standins.openai.expires_in_override = 2
    stack = make_stack("kubernetes", filter_settings=KUBERNETES.settings(refresh_interval_s=1))
    warm(stack)
    flow = Flow(stack)
    # The old token is refreshed at least once before the rotation.
    assert flow.run_until(lambda _: standins.openai.exchanges_ok >= 2) is not None, \
        f"no refresh of the 2 s access token; filter said: {warnings(stack)[-3:]}"
    rotated_at = time.time()
    new = standins.token_dir.rotate()

    def exchanges_of_new():
        return sum(1 for e in standins.openai.exchange_log if e["subject_token"] == new)

    # Picked up at the first access-token refresh after a re-read (every 1 s); and the refresh after
    # that uses it too.
    assert flow.run_until(lambda _: exchanges_of_new() >= 2) is not None, \
        f"the rotated token was not used; filter said: {warnings(stack)[-3:]}"

    responses = flow.responses()
    assert [r.status for r in responses] == [200] * len(responses), [r for r in responses if r.status != 200][:3]
    log = standins.openai.exchange_log
    for entry in log:
        assert_exchange(KUBERNETES, standins, entry)
    assert {e["subject_token"] for e in log} == {old, new}
    first_new = next(i for i, e in enumerate(log) if e["subject_token"] == new)
    assert log[first_new]["time"] >= rotated_at
    assert all(e["subject_token"] == new for e in log[first_new:]), "the old token came back"
    bearers = api_bearers(standins)
    assert len(set(bearers)) >= 3
    assert_issued_for(KUBERNETES, standins, bearers[-1])


def test_kubernetes_missing_token_file_fails_closed_once_the_last_token_expires(standins, make_stack):
    """The projected file disappears (Envoy keeps serving the last content it read): the gateway
    serves its token until the subject's exp, then refuses, naming the source; it recovers once the
    kubelet writes a token again."""
    lifetime_s = 4
    # The gateway starts before the kubelet has written a token, so the short lifetime is not spent
    # while Envoy starts: the first fetch fails, and the one after its backoff (at most 2 s even if a
    # second fetch fails before the rotation) gets the token.
    standins.token_dir.write_raw("")
    stack = make_stack("kubernetes", filter_settings=KUBERNETES.settings(refresh_interval_s=1))
    token = standins.token_dir.rotate(lifetime_s=lifetime_s)
    warm(stack)
    assert standins.openai.exchange_log[-1]["subject_token"] == token
    exp_monotonic = monotonic_at(decode(token)["exp"])
    standins.token_dir.remove()

    flow = Flow(stack)
    first_503 = flow.run_until(lambda record: record.response.status == 503)
    assert first_503 is not None, f"a token was still served {FLOW_BOUND_S} s after the removal"
    assert any(r.status == 200 for r in flow.responses()), "the valid token was not served after the removal"
    # Answered once the filter had seen the subject expire (it allows for skew: a tenth of the life).
    assert first_503.answered >= exp_monotonic - 1, "refused while the subject was still valid"
    assert "expired" in source_error(first_503.response, KUBERNETES)
    for record in flow.records:
        response = record.response
        if response.status == 502:
            # A refresh may exchange the subject in its final second (the filter counts whole seconds),
            # which the token endpoint refuses (it wants >= 1 s left, so it refused after exp - 1 s):
            # reported as the endpoint's refusal until the backoff ends.
            assert response.header("x-openai-wif-error") == "token_exchange_failed"
            assert record.answered >= exp_monotonic - 1.05, "an exchange failed while the subject had time left"
        else:
            assert response.status in (200, 503), response  # never 401: no expired token reached the API

    # After remove() the token link is recreated after the `..data` swap, which Envoy's directory watch
    # does not see; the kubelet's next rotation is.
    standins.token_dir.rotate()
    standins.token_dir.rotate()
    poll_until_ok(stack, RECOVERY_BOUND_S)
    assert_exchange(KUBERNETES, standins, standins.openai.exchange_log[-1])
    assert standins.openai.exchange_log[-1]["subject_token"] == standins.token_dir.current()


# ---------------------------------------------------------------------------------------------
# Faults with a cold cache: fail closed with the source and the cause, then recover by itself


@dataclass(frozen=True)
class Fault:
    platform: Platform
    name: str
    cause: str  # regular expression for the cause in the 503's message
    settings: dict | None = None  # subject_token settings this case needs
    # Whether to clear the fault and wait for recovery. Recovery is checked for every way a source
    # can break the connection (stopped, closed, slow) and for one refusal per source; the other
    # refusals recover the same way. Configuration mistakes have nothing to clear.
    recovers: bool = False


def break_source(fault: Fault, standins):
    platform, name = fault.platform, fault.name
    if platform is KUBERNETES:
        {"empty": lambda: standins.token_dir.write_raw(""),
         "not_jwt": lambda: standins.token_dir.write_raw("not-a-jwt-but-a-secret-looking-string"),
         "expired": lambda: standins.token_dir.rotate(lifetime_s=-60),
         "wrong_path": lambda: None}[name]()
        return
    standin = {"gcp_metadata": standins.gcp, "azure_imds": standins.azure, "spiffe": standins.spiffe}[platform.source]
    if name == "stopped":
        standin.stop()
    elif name not in ("wrong_client_id", "wrong_spiffe_id"):
        standin.fault = name
        standin.slow_seconds = 1.0


def repair_source(fault: Fault, standins):
    if fault.platform is KUBERNETES:
        standins.token_dir.rotate()
        return
    standin = {"gcp_metadata": standins.gcp, "azure_imds": standins.azure,
               "spiffe": standins.spiffe}[fault.platform.source]
    if fault.name == "stopped":
        standin.start()
    standin.fault = None


CONNECT_FAILED = r"HTTP 503: upstream connect error or disconnect/reset before headers\. reset reason: "
NOT_A_JWT = r"the answer is not a usable JWT \(the token is not a JWT: expected three dot-separated base64url parts\)"
SLOW = {"timeout_ms": SLOW_SOURCE_TIMEOUT_MS}

FAULTS = [
    Fault(GCP, "stopped", CONNECT_FAILED + "remote connection failure", recovers=True),
    Fault(GCP, "down", CONNECT_FAILED + "connection termination", recovers=True),
    Fault(GCP, "slow", r"HTTP 504: upstream request timeout", SLOW, recovers=True),
    Fault(GCP, "403", r"HTTP 403: metadata server fault 403"),
    Fault(GCP, "404", r"HTTP 404: metadata server fault 404"),
    Fault(GCP, "500", r"HTTP 500: metadata server fault 500", recovers=True),
    Fault(GCP, "empty", r"the token is empty"),
    Fault(GCP, "not_jwt", NOT_A_JWT),
    Fault(GCP, "expired", r"the token has already expired"),
    Fault(AZURE, "stopped", CONNECT_FAILED + "remote connection failure", recovers=True),
    Fault(AZURE, "down", CONNECT_FAILED + "connection termination", recovers=True),
    Fault(AZURE, "slow", r"HTTP 504: upstream request timeout", SLOW, recovers=True),
    Fault(AZURE, "403", r'HTTP 403: \{"error": "fault", "error_description": "IMDS fault 403"\}'),
    Fault(AZURE, "404", r'HTTP 404: \{"error": "fault", "error_description": "IMDS fault 404"\}'),
    Fault(AZURE, "500", r'HTTP 500: \{"error": "fault", "error_description": "IMDS fault 500"\}'),
    Fault(AZURE, "empty", r"the answer is not JSON"),
    Fault(AZURE, "garbage", r"the answer is not JSON"),
    Fault(AZURE, "not_jwt", NOT_A_JWT),
    Fault(AZURE, "no_token", r"the answer has no access_token", recovers=True),
    Fault(AZURE, "expired", r"the token has already expired"),
    Fault(AZURE, "wrong_client_id",
          r'HTTP 400: \{"error": "invalid_request", "error_description": "Identity not found"\}',
          {"client_id": "99999999-9999-9999-9999-999999999999"}),
    Fault(SPIFFE, "stopped", r"gRPC status 14 \(UNAVAILABLE\)", recovers=True),
    Fault(SPIFFE, "unavailable", r"gRPC status 14 \(UNAVAILABLE\)"),
    # Envoy's router may time the call out first (and answers UNAVAILABLE) or the gRPC deadline may.
    Fault(SPIFFE, "slow", r"gRPC status (4 \(DEADLINE_EXCEEDED\)|14 \(UNAVAILABLE\))", SLOW, recovers=True),
    Fault(SPIFFE, "no_svids", r"the Workload API returned no JWT-SVID", recovers=True),
    Fault(SPIFFE, "not_jwt", NOT_A_JWT),
    Fault(SPIFFE, "expired", r"the token has already expired"),
    Fault(SPIFFE, "wrong_spiffe_id", r"gRPC status 7 \(PERMISSION_DENIED\)",
          {"spiffe_id": "spiffe://example.com/ns/other/sa/other"}),
    Fault(KUBERNETES, "empty", r"the token file is empty", recovers=True),
    Fault(KUBERNETES, "not_jwt", NOT_A_JWT),
    Fault(KUBERNETES, "expired", r"the token has already expired"),
    Fault(KUBERNETES, "wrong_path", r"HTTP 404", {"path": "/no-such-file"}),
]


@pytest.fixture
def restore_token_file(standins):
    yield
    standins.token_dir.rotate()  # a broken token file is not left to the next test


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f"{f.platform.source}-{f.name}")
def test_source_fault_fails_closed_naming_the_source_then_recovers(fault, standins, make_stack, restore_token_file):
    platform = fault.platform
    timeout_ms = (fault.settings or {}).get("timeout_ms", SUBJECT_TIMEOUT_MS)
    subject = {k: v for k, v in (fault.settings or {}).items() if k != "timeout_ms"}
    break_source(fault, standins)
    planted = standins.token_dir.current() if platform is KUBERNETES else ""
    stack = make_stack(platform.source, filter_settings=platform.settings(timeout_ms, **subject), log_level="debug")

    refused = get(stack)
    assert re.fullmatch(fault.cause, source_error(refused, platform)), refused.json()["error"]["message"]
    assert standins.openai.exchanges == 0, "a subject was exchanged although the source failed"
    assert standins.openai.api_requests == [], "a request reached the API without a token"
    stats = stack.stats()
    assert stats["subject_fetch_failed"] >= 1 and stats["subject_fetch_ok"] == 0
    assert stats["requests_denied"] >= 1

    if fault.recovers:
        repair_source(fault, standins)
        recovered, meanwhile = poll_until_ok(stack, RECOVERY_BOUND_S)
        for response in meanwhile:  # until then: the same refusal
            assert re.fullmatch(fault.cause, source_error(response, platform))
        assert standins.openai.exchanges == 1
        assert_exchange(platform, standins, standins.openai.exchange_log[0])
        bearers = api_bearers(standins)
        assert len(bearers) == 1
        assert_issued_for(platform, standins, bearers[0])

    assert_no_token_in(filter_log_entries(stack), tokens_seen(standins, [planted, standins.token_dir.current()]))
