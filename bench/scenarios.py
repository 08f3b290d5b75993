"""The benchmark scenarios. Each returns the numbers bench.report turns into a table.

1. `warm_path_header`: the filter with per-request identities (header source, one identity, token
   cached) against the same gateway without the filter, where the client sends a static key.
2. `warm_path_header_one_connection`: the same pair with a single connection (latency without
   queueing behind other requests).
3. `warm_path_gateway`: the filter with the gateway's own identity (kubernetes source) against
   the same gateway without the filter.
4. `cold_single_flight`: a burst of concurrent requests for a new identity (one token exchange)
   against the same burst once its token is cached.
5. `many_identities`: the filter's warm path with 1 against 100 distinct identities, round-robin.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from tests.harness import http_request
from tools.envoy_config import SUBJECT_HEADER

from . import wrk
from .burst import in_subprocess as burst
from .load import InvalidRun, Load, Series, Variant
from .testbed import HOST, PATH, STATIC_KEY, Testbed

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@dataclass
class Comparison:
    """Two variants measured in alternation with wrk; ratios are `subject / reference`."""
    key: str
    title: str
    about: str
    reference: Series
    subject: Series
    connections: int
    duration_s: float
    warmup_s: float
    reps: int
    notes: dict = field(default_factory=dict)


@dataclass
class ColdBurst:
    n: int
    cold_s: list = field(default_factory=list)  # per repetition: burst for a new identity
    warm_s: list = field(default_factory=list)  # per repetition: the same burst, token cached
    exchanges: list = field(default_factory=list)  # per cold burst, seen by the token endpoint
    filter_exchanges: list = field(default_factory=list)  # per cold burst, the filter's exchanges_ok
    paused: list = field(default_factory=list)  # per cold burst, requests that waited (cache_miss)
    direct_exchange_s: list = field(default_factory=list)  # one exchange, straight to the stand-in
    sent_s: list = field(default_factory=list)  # per burst: first request written -> last written

    @property
    def ratio(self) -> float:
        return statistics.median(self.cold_s) / statistics.median(self.warm_s)


def _compare(load: Load, key: str, title: str, about: str, reference: Variant, subject: Variant) -> Comparison:
    print(f"{title}", flush=True)
    series = load.alternate(key, [reference, subject])
    return Comparison(key, title, about, series[reference.label], series[subject.label], load.connections,
                      load.duration_s, load.warmup_s, load.reps)


def _baseline(bed: Testbed, source: str) -> Variant:
    stack = bed.gateway(source, with_filter=False)
    bed.warm(stack, {"authorization": STATIC_KEY})
    return Variant("without filter", stack, wrk.script({"Host": HOST, "Authorization": STATIC_KEY}), False)


def warm_path_header(bed: Testbed, load: Load, title: str | None = None, key: str = "warm-header") -> Comparison:
    token = bed.subject_token("bench-0")
    stack = bed.gateway("header")
    bed.warm(stack, {SUBJECT_HEADER: token})
    subject = Variant("with filter", stack, wrk.script({"Host": HOST, SUBJECT_HEADER: token}), True)
    about = ("The client sends its subject token in `x-openai-subject-token` and no key; the filter checks "
             "and removes the header, looks the identity up in the shared cache and sets `Authorization`. "
             "Without the filter, the client sends `Authorization: Bearer <static key>`.")
    comparison = _compare(load, key, title or "Warm path, header source (one identity, token cached)", about,
                          _baseline(bed, "header"), subject)
    comparison.notes["subject_bytes"] = len(token)
    return comparison


def warm_path_gateway(bed: Testbed, load: Load) -> Comparison:
    stack = bed.gateway("kubernetes")
    bed.warm(stack)
    subject = Variant("with filter", stack, wrk.script({"Host": HOST}), True)
    return _compare(load, "warm-kubernetes", "Warm path, gateway identity (kubernetes source, token cached)",
                    "The client sends no credential; the filter sets `Authorization` from the cached token "
                    "of the gateway's own identity (the projected service account token, served by the "
                    "gateway's internal listener). Without the filter, the client sends a static key.",
                    _baseline(bed, "kubernetes"), subject)


def many_identities(bed: Testbed, load: Load, count: int = 100) -> Comparison:
    stack = bed.gateway("header")
    tokens = [bed.subject_token(f"bench-{i}") for i in range(count)]
    started = time.monotonic()
    for token in tokens:
        bed.warm(stack, {SUBJECT_HEADER: token})
    print(f"  cached {count} identities in {time.monotonic() - started:.1f} s", flush=True)
    one = Variant("1 identity", stack, wrk.script({"Host": HOST}, rotate=(SUBJECT_HEADER, tokens[:1])), True)
    many = Variant(f"{count} identities", stack, wrk.script({"Host": HOST}, rotate=(SUBJECT_HEADER, tokens)), True)
    return _compare(load, "identities", f"Many identities: 1 against {count} (header source, all cached)",
                    f"Both variants go through the same gateway with the filter and build each request in the "
                    f"wrk Lua script, taking the subject token round-robin from a list of 1 or of {count} "
                    f"tokens (one identity each, all exchanged and cached before the runs).", one, many)


def _exchange_directly(bed: Testbed, token: str) -> float:
    """Seconds for one token exchange sent straight to the Python token endpoint (no gateway)."""
    wiring = bed.standins.wiring["header"]
    body = {"grant_type": TOKEN_EXCHANGE_GRANT, "subject_token_type": JWT_TOKEN_TYPE, "subject_token": token,
            "identity_provider_id": wiring.identity_provider_id, "service_account_id": wiring.service_account_id}
    started = time.perf_counter()
    response = http_request(bed.openai.port, "POST", "/oauth/token", host="auth.openai.com", body=body)
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise InvalidRun(f"a direct token exchange failed: {response!r}")
    return elapsed


def cold_single_flight(bed: Testbed, n: int = 200, reps: int = 5) -> ColdBurst:
    print(f"Cold single flight: bursts of {n} concurrent requests (Python client)", flush=True)
    stack = bed.gateway("header")
    bed.warm(stack, {SUBJECT_HEADER: bed.subject_token("bench-0")})
    result = ColdBurst(n)
    for rep in range(1, reps + 1):
        result.direct_exchange_s.append(_exchange_directly(bed, bed.subject_token(f"bench-direct-{rep}")))
        headers = {"Host": HOST, SUBJECT_HEADER: bed.subject_token(f"bench-cold-{rep}")}
        exchanges_before, stats_before = bed.openai.exchanges, stack.stats()
        cold = burst(stack.envoy.port, n, PATH, headers)
        exchanges, stats = bed.openai.exchanges - exchanges_before, stack.stats()
        warm = burst(stack.envoy.port, n, PATH, headers)
        if not cold.all_ok or not warm.all_ok:
            raise InvalidRun(f"cold single flight, repetition {rep}: not every request got 200: "
                             f"cold {dict(cold.statuses)}, cached {dict(warm.statuses)}")
        if bed.openai.exchanges - exchanges_before != exchanges:
            raise InvalidRun(f"cold single flight, repetition {rep}: the burst with a cached token exchanged again")
        result.cold_s.append(cold.elapsed_s)
        result.warm_s.append(warm.elapsed_s)
        result.sent_s += [cold.sent_s, warm.sent_s]
        result.exchanges.append(exchanges)
        result.filter_exchanges.append(stats.get("exchanges_ok", 0) - stats_before.get("exchanges_ok", 0))
        result.paused.append(stats.get("cache_miss", 0) - stats_before.get("cache_miss", 0))
        print(f"  cold single flight [{rep}/{reps}] new identity {cold.elapsed_s * 1000:7.1f} ms "
              f"({exchanges} exchange, {result.paused[-1]} requests waited)   cached {warm.elapsed_s * 1000:7.1f} ms   "
              f"one direct exchange {result.direct_exchange_s[-1] * 1000:5.1f} ms", flush=True)
        if exchanges != 1 or result.filter_exchanges[-1] != 1:
            raise InvalidRun(f"cold single flight, repetition {rep}: {exchanges} token exchanges at the endpoint, "
                             f"{result.filter_exchanges[-1]} counted by the filter (must be 1)")
    return result
