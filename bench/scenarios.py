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
6. `memory`: Envoy's memory (`server.memory_allocated`) before and after 10 000 new identities,
   then after 25 000, 50 000 and 100 000: the cache table holds at most `max_identities` records,
   so memory must stop growing once the table is full.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import http_request, module_path
from tests.standins import OPENAI_AUDIENCE
from tests.standins.issuer import signing_key
from tools.envoy_config import SUBJECT_HEADER

from . import flood, floor, peers, wrk
from .burst import in_subprocess as burst
from .load import InvalidRun, Load, Series, Variant
from .upstream import STAT_PREFIX as UPSTREAM_STATS
from .testbed import HOST, PATH, STATIC_KEY, Testbed

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"


@dataclass
class Warm:
    """Variants measured in alternation with wrk: the filter and its peers (bench.peers), and for some
    tables more variants (another client pattern, the floor's host-call variants)."""
    key: str
    title: str
    about: str
    series: dict  # label -> Series, in the table's column order
    roles: dict  # role (bench.peers.ROLES) -> label
    connections: int
    duration_s: float
    warmup_s: float
    reps: int
    notes: dict = field(default_factory=dict)

    def role(self, name: str) -> Series:
        return self.series[self.roles[name]]

    def ratio(self, subject: str, reference: str, metric: str = "rps") -> float:
        return self.role(subject).median(metric) / self.role(reference).median(metric)

    def over(self, subject: str, reference: str, metric: str = "cpu_us") -> float:
        return self.role(subject).median(metric) - self.role(reference).median(metric)


# The warm-path goal of the issue: the filter against the no-op Wasm floor, in the same run.
GOAL_RPS_OVER_FLOOR = 0.95  # throughput, filter / floor, at least
GOAL_CPU_OVER_FLOOR_US = 5.0  # gateway CPU per request, filter minus floor, at most

PEERS_ABOUT = ("Peers, each on the same gateway rendering and each sent the identical request: *floor* is the "
               "no-op Wasm filter built by the bench (`bench/floor/`: sets `authorization` from its "
               "configuration and removes the subject header, nothing else) in the filter's place; *native* is "
               "Envoy's `credential_injector` with the `oauth2` client credentials grant against the token "
               "stand-in (one token for the gateway, fetched at start); *static* is the route's "
               "`request_headers_to_add` (a fixed `authorization`) and `request_headers_to_remove` (the "
               "subject header), no HTTP filter but the router.")


def _measure(load: Load, key: str, title: str, about: str, variants: list, roles: dict, **notes) -> Warm:
    print(f"{title}", flush=True)
    series = load.alternate(key, variants)
    return Warm(key, title, about, series, roles, load.connections, load.duration_s, load.warmup_s, load.reps,
                dict(notes))


def _peer_variants(bed: Testbed, stacks: dict, script: str, warm_headers: dict | None) -> list:
    variants = []
    for role, stack in stacks.items():
        bed.warm(stack, warm_headers)
        variants.append(Variant(role, stack, script, role == "filter"))
    native = stacks.get("native")
    if native is not None:
        _check_native(bed, native, warm_headers)
    return variants


def _check_native(bed: Testbed, stack, headers: dict | None):
    """The native peer must be what injects the bearer: it fetched its token with client credentials,
    and a request without any credential gets through (the upstream answers 401 without a bearer)."""
    if bed.openai.client_credentials_grants < 1:
        raise InvalidRun("the native peer answered 200 but the token stand-in granted it no client credentials")
    response = stack.request("GET", PATH, host=HOST, headers=headers)
    if response.status != 200:
        raise InvalidRun(f"the native peer did not inject a bearer: {response!r}")
    injector = stack.envoy.stats("http.openai_egress.credential_injector")
    if not any(name.endswith("injected") and int(value) > 0 for name, value in injector.items()):
        raise InvalidRun(f"the native peer's credential_injector counted no injected credential: {injector}")


def warm_path_header(bed: Testbed, load: Load, title: str | None = None, key: str = "warm-header") -> Warm:
    token = bed.subject_token("bench-0")
    stacks = peers.gateways(bed, "header")
    headers = {SUBJECT_HEADER: token}
    variants = _peer_variants(bed, stacks, wrk.script({"Host": HOST, **headers}), headers)
    about = ("The client sends its subject token in `x-openai-subject-token` and no key; the filter checks "
             "and removes the header, looks the identity up in the shared cache and sets `Authorization`. "
             + PEERS_ABOUT)
    return _measure(load, key, title or "Warm path, header source (one identity, token cached)", about, variants,
                    {r: r for r in stacks}, subject_bytes=len(token))


def warm_path_gateway(bed: Testbed, load: Load) -> Warm:
    stacks = peers.gateways(bed, "kubernetes")
    variants = _peer_variants(bed, stacks, wrk.script({"Host": HOST}), None)
    return _measure(load, "warm-kubernetes", "Warm path, gateway identity (kubernetes source, token cached)",
                    "The client sends no credential; the filter sets `Authorization` from the cached token "
                    "of the gateway's own identity (the projected service account token, served by the "
                    "gateway's internal listener). " + PEERS_ABOUT, variants, {r: r for r in stacks})


# Caller rules (scenario warm-callers): the caller named by x-forwarded-client-cert, as a hop that
# terminated the caller's mTLS sets it (wrk cannot present client certificates).
CALLER = "spiffe://cluster.local/ns/ai/sa/inference"
CALLER_RULES = [
    {"name": "inference", "principals": [CALLER], "service_account_id": "sa_inference"},
    {"name": "batch", "principals": ["spiffe://cluster.local/ns/batch/*"], "service_account_id": "sa_batch"},
]


def warm_path_callers(bed: Testbed, load: Load) -> Warm:
    settings = {"callers": CALLER_RULES, "caller_identity": "x-forwarded-client-cert",
                "subject": {"refresh_interval_s": 3600}}
    stacks = peers.gateways(bed, "kubernetes", tag="callers", filter_settings=settings,
                            forward_client_cert="ALWAYS_FORWARD_ONLY")
    headers = {"x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/istio-system/sa/gateway;URI={CALLER}"}
    variants = _peer_variants(bed, stacks, wrk.script({"Host": HOST, **headers}), headers)
    return _measure(load, "warm-callers", "Warm path, caller rules on (kubernetes source, caller from "
                    "x-forwarded-client-cert, token cached)",
                    f"The gateway identity with two caller rules; the client sends `x-forwarded-client-cert` "
                    f"naming `{CALLER}` (as a hop that terminated the caller's mTLS would; the listener keeps it "
                    f"with `forward_client_cert_details: ALWAYS_FORWARD_ONLY`, the route removes it), and the "
                    f"filter configured with `\"caller_identity\": \"x-forwarded-client-cert\"` matches it to "
                    f"the rule `inference` and sets that rule's cached token. Every peer gets the same header. "
                    + PEERS_ABOUT, variants, {r: r for r in stacks})


def many_identities(bed: Testbed, load: Load, count: int = 100) -> Warm:
    stacks = peers.gateways(bed, "header", tag="identities")
    tokens = [bed.subject_token(f"bench-{i}") for i in range(count)]
    started = time.monotonic()
    for token in tokens:
        bed.warm(stacks["filter"], {SUBJECT_HEADER: token})
    print(f"  cached {count} identities in {time.monotonic() - started:.1f} s", flush=True)
    many_script = wrk.script({"Host": HOST}, rotate=(SUBJECT_HEADER, tokens))
    variants = _peer_variants(bed, stacks, many_script, {SUBJECT_HEADER: tokens[0]})
    many, one = f"filter, {count} identities", "filter, 1 identity"
    variants[0].label = many
    variants.insert(1, Variant(one, stacks["filter"], wrk.script({"Host": HOST}, rotate=(SUBJECT_HEADER, tokens[:1])),
                               True))
    roles = {**{r: r for r in stacks}, "filter": many, "filter_one": one}
    return _measure(load, "identities", f"Warm path, header source, {count} identities (all cached)",
                    f"Every variant builds each request in the wrk Lua script, taking the subject token "
                    f"round-robin from a list of {count} tokens (one identity each, all exchanged and cached "
                    f"before the runs); *{one}* is the filter with the same Lua script over a list of one, so "
                    f"the two filter columns differ only in the number of identities. " + PEERS_ABOUT,
                    variants, roles, count=count)


def host_call_breakdown(bed: Testbed, load: Load) -> Warm:
    """The floor's variants (bench.floor.VARIANTS) and the filter, header source, one identity."""
    token = bed.subject_token("bench-0")
    headers = {SUBJECT_HEADER: token}
    script = wrk.script({"Host": HOST, **headers})
    print("  building the floor's variants (bench/floor/, cargo)", flush=True)
    floor.build_all()
    variants = []
    for name in floor.VARIANTS:
        stack = peers.floor_gateway(bed, "header", name, tag="breakdown")
        bed.warm(stack, headers)
        variants.append(Variant(name, stack, script, False))
    stack = peers.gateways(bed, "header", roles=("filter",))["filter"]
    bed.warm(stack, headers)
    variants.append(Variant("filter", stack, script, True))
    return _measure(load, "breakdown", "Where the time goes: the price of each host call against the floor",
                    "One gateway per variant of the floor module (header source rendering, one identity, the "
                    "subject token sent on every request), each variant the floor plus exactly one host call the "
                    "filter makes per request (a cargo feature of `bench/floor/src/lib.rs`); *all_calls* makes "
                    "every one of them; *filter* is the filter itself. A variant's CPU per request minus the "
                    "floor's is the price of its call.",
                    variants, {"floor": "floor", "filter": "filter"})


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
    workers: list = field(default_factory=list)  # per cold burst: {worker: connections it accepted}
    answered_s: list = field(default_factory=list)  # per cold burst: first request sent -> the exchange answered

    @property
    def ratio(self) -> float:
        return statistics.median(self.cold_s) / statistics.median(self.warm_s)

    @property
    def extra_s(self) -> list:
        """Per repetition: the cold burst's time minus that of the cached burst right after it."""
        return [c - w for c, w in zip(self.cold_s, self.warm_s)]

    @property
    def round_trip_s(self) -> float:
        """One exchange at the same token stand-in, sent directly (median)."""
        return statistics.median(self.direct_exchange_s)

    @property
    def allowed_s(self) -> float:
        return self.round_trip_s + COLD_GOAL_SLACK_S

    @property
    def met(self) -> bool:
        return statistics.median(self.extra_s) <= self.allowed_s


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


COLD_BURST = 1000  # concurrent requests per cold burst (the goal)
COLD_GOAL_SLACK_S = 0.002  # the cold burst may take one exchange round-trip plus this over a cached one


def cold_single_flight(bed: Testbed, n: int = COLD_BURST, reps: int = 5) -> ColdBurst:
    print(f"Cold single flight: bursts of {n} concurrent requests (Python client)", flush=True)
    stack = bed.gateway("header")
    bed.warm(stack, {SUBJECT_HEADER: bed.subject_token("bench-0")})
    result = ColdBurst(n)
    for rep in range(1, reps + 1):
        result.direct_exchange_s.append(_exchange_directly(bed, bed.subject_token(f"bench-direct-{rep}")))
        headers = {"Host": HOST, SUBJECT_HEADER: bed.subject_token(f"bench-cold-{rep}")}
        exchanges_before, stats_before = bed.openai.exchanges, stack.stats()
        log_before = len(bed.openai.exchange_log)
        workers_before = stack.envoy.worker_connections()
        cold = burst(stack.envoy.port, n, PATH, headers)
        exchanges, stats = bed.openai.exchanges - exchanges_before, stack.stats()
        result.workers.append({w: c - workers_before.get(w, 0) for w, c in stack.envoy.worker_connections().items()})
        answers = [e["time"] for e in bed.openai.exchange_log[log_before:]]
        result.answered_s.append(answers[0] - cold.started_at if answers and cold.started_at else float("nan"))
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
              f"one direct exchange {result.direct_exchange_s[-1] * 1000:5.1f} ms   connections per worker "
              f"{sorted(result.workers[-1].values())}", flush=True)
        if exchanges != 1 or result.filter_exchanges[-1] != 1:
            raise InvalidRun(f"cold single flight, repetition {rep}: {exchanges} token exchanges at the endpoint, "
                             f"{result.filter_exchanges[-1]} counted by the filter (must be 1)")
    return result


# Refresh under load.
REFRESH_LIFETIME_S = 10  # expires_in of the hot identity's first token: refreshed ~7.5-8 s later
REFRESH_HOLD_S = 0.3  # the stand-in holds the refresh exchange this long: the refresh window
REFRESH_SLICE_S = 1  # wrk runs back to back, one latency histogram each
REFRESH_SLICES_AFTER = 3  # slices measured after the one with the refresh
REFRESH_P99_TOLERANCE = 1.10  # the refresh slice's p99 may exceed the highest other slice's by this factor


@dataclass
class Slice:
    started: float  # wall clock (time.time(), the stand-in's clock for its exchange log)
    ended: float
    result: wrk.Result
    refresh: bool = False  # the refresh window overlaps this slice


@dataclass
class RefreshRun:
    lifetime_s: int
    hold_s: float
    connections: int
    slices: list = field(default_factory=list)
    exchanges: int = 0  # during the slices, at the token endpoint
    filter_exchanges: int = 0  # exchanges_ok
    waited: int = 0  # cache_miss during the slices
    denied: int = 0
    hits: int = 0
    requests: int = 0
    window: tuple = (0.0, 0.0)  # the refresh exchange: arrived at the stand-in, answered
    refresh_after_s: float = 0.0  # from the first token's exchange to the refresh's arrival

    @property
    def during(self) -> list:
        return [s for s in self.slices if s.refresh]

    @property
    def outside(self) -> list:
        return [s for s in self.slices if not s.refresh]

    def p99(self, which: str) -> list:
        return [s.result.p99_ms for s in getattr(self, which)]

    @property
    def p99_met(self) -> bool:
        return bool(self.during) and max(self.p99("during")) <= max(self.p99("outside")) * REFRESH_P99_TOLERANCE

    @property
    def max_met(self) -> bool:
        """No request took as long as the held refresh: none sat through it."""
        return all(s.result.max_ms < self.hold_s * 1000 for s in self.slices)

    @property
    def met(self) -> bool:
        return self.waited == 0 and self.exchanges == 1 and self.filter_exchanges == 1 and self.p99_met and self.max_met


def refresh_under_load(bed: Testbed, workdir: Path, connections: int = 16, max_slices: int = 20) -> RefreshRun:
    print(f"Refresh under load: a hot identity with a {REFRESH_LIFETIME_S} s token, wrk in {REFRESH_SLICE_S} s "
          f"slices through its refresh (held {REFRESH_HOLD_S * 1000:.0f} ms at the stand-in)", flush=True)
    stack = bed.gateway("header", variant="refresh")
    token = bed.subject_token("bench-refresh")
    headers = {SUBJECT_HEADER: token}
    script = workdir / "wrk" / "refresh.lua"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(wrk.script({"Host": HOST, **headers}))
    url = stack.envoy.url + PATH
    openai = bed.openai
    run = RefreshRun(REFRESH_LIFETIME_S, REFRESH_HOLD_S, connections)
    try:
        openai.expires_in_override = REFRESH_LIFETIME_S
        exchanged_at = time.time()
        bed.warm(stack, headers)  # the one exchange: a token for REFRESH_LIFETIME_S
        openai.expires_in_override = None  # the refreshed token lives an hour: exactly one refresh
        openai.set_fault("slow", times=1, slow_seconds=REFRESH_HOLD_S)
        log_before, exchanges_before, stats_before = len(openai.exchange_log), openai.exchanges, stack.stats()
        upstream_before = bed.upstream.stats(f"http.{UPSTREAM_STATS}").get("downstream_rq_2xx", 0)
        after = None
        while len(run.slices) < max_slices and (after is None or after < REFRESH_SLICES_AFTER):
            started = time.time()
            result = wrk.run(url, script, connections, REFRESH_SLICE_S)
            piece = Slice(started, time.time(), result)
            if result.problem():
                raise InvalidRun(f"refresh under load, slice {len(run.slices) + 1}: {result.problem()}\n"
                                 f"{stack.envoy.log_tail(10)}")
            run.slices.append(piece)
            if after is not None:
                after += 1
            elif openai.exchanges > exchanges_before and len(openai.exchange_log) > log_before:
                answered = openai.exchange_log[log_before]["time"]
                run.window = (answered - REFRESH_HOLD_S, answered)
                after = 0
            print(f"  refresh [{len(run.slices):2d}] {result.rps:8.0f} req/s  p99 {result.p99_ms:6.2f} ms  max "
                  f"{result.max_ms:7.2f} ms  ({result.requests} requests, all 2xx)"
                  + ("   <- the refresh exchange was answered during this slice" if after == 0 else ""), flush=True)
        stats = stack.stats()
        upstream_ok = bed.upstream.stats(f"http.{UPSTREAM_STATS}").get("downstream_rq_2xx", 0) - upstream_before
    finally:
        openai.reset_faults()
    delta = {k: stats.get(k, 0) - stats_before.get(k, 0)
             for k in ("cache_hit", "cache_miss", "requests_denied", "exchanges_ok")}
    run.exchanges = openai.exchanges - exchanges_before
    run.filter_exchanges, run.waited, run.denied, run.hits = (delta["exchanges_ok"], delta["cache_miss"],
                                                              delta["requests_denied"], delta["cache_hit"])
    run.requests = sum(s.result.requests for s in run.slices)
    run.refresh_after_s = run.window[0] - exchanged_at if run.window[0] else 0.0
    for piece in run.slices:
        piece.refresh = piece.started <= run.window[1] and piece.ended >= run.window[0]
    if not run.window[0]:
        raise InvalidRun(f"refresh under load: no refresh exchange in {len(run.slices)} slices")
    if upstream_ok < run.requests or run.denied or run.hits < run.requests:
        raise InvalidRun(f"refresh under load: {run.requests} requests, the upstream answered {upstream_ok} with 2xx, "
                         f"the filter counted {delta}")
    print(f"  refresh: {run.exchanges} exchange at the endpoint, {run.filter_exchanges} counted by the filter, "
          f"{run.waited} requests waited; p99 during the refresh {run.p99('during')} ms, outside: median "
          f"{statistics.median(run.p99('outside')):.2f}, highest {max(run.p99('outside')):.2f} ms", flush=True)
    bed.stop_gateway(stack)
    return run


# Memory (scenario 6).
DEFAULT_MAX_IDENTITIES = 10_000  # the table of the memory run (the filter's default, see default_max_identities)
MEMORY_CHECKPOINTS = (1, 2.5, 5, 10)  # new identities at each reading, in multiples of the table size
MEMORY_WARMUP = 100  # identities sent before the baseline reading (connections, VM heaps)
MEMORY_CONNECTIONS = 4
MEMORY_REPLAY = 0.1  # the last identities sent, as a share of the table, sent again at the end: still cached?
MEMORY_GROWTH_LIMIT = 0.10  # from the first reading to the last; more fails the benchmark
BYTES_PER_IDENTITY_TARGET = 4 * 1024
MODULE_BYTES_TARGET = 600 * 1000
STATS_FLUSH_S = 1.0  # Envoy updates server.memory_* when it flushes stats (default every 5 s)
MEMORY_READINGS = 3  # per checkpoint, one flush apart; the median counts


@dataclass
class MemorySample:
    identities: int  # new distinct identities sent so far (the warm-up's not counted)
    allocated: int  # server.memory_allocated (bytes), median of the readings
    heap: int  # server.memory_heap_size (bytes), median
    rss: int  # VmRSS of the Envoy process (bytes), median
    readings: list  # every server.memory_allocated reading
    rate: float = 0.0  # new identities per second in the phase that ended here


@dataclass
class MemoryRun:
    table: int  # limits.max_identities
    ways: int  # slots an identity may take (src/cache.rs WAYS)
    default_table: bool  # the table size is the filter's default
    warmup: int
    connections: int
    samples: list = field(default_factory=list)  # the baseline first (identities 0)
    module_bytes: int = 0
    exchanges: int = 0  # at the token endpoint, warm-up and replay included
    replayed: int = 0
    replay_hits: int = 0  # of the replayed requests, answered from the cache
    replay_exchanges: int = 0
    mint_s: float = 0.0  # the client's time minting subject tokens
    flood_s: float = 0.0  # sending the new identities (all phases)
    wall_s: float = 0.0  # the whole scenario, Envoy's start included

    @property
    def baseline(self) -> MemorySample:
        return self.samples[0]

    @property
    def first(self) -> MemorySample:
        """The reading after as many new identities as the table has slots."""
        return self.samples[1]

    @property
    def last(self) -> MemorySample:
        return self.samples[-1]

    @property
    def bytes_per_identity(self) -> float:
        return (self.first.allocated - self.baseline.allocated) / self.first.identities

    @property
    def bytes_per_record(self) -> float:
        """Growth from the baseline to the last reading, per record added: the table is full by then
        (every slot is the home slot of ~10 of the identities sent) and held the warm-up's records
        at the baseline."""
        return (self.last.allocated - self.baseline.allocated) / (self.table - self.warmup)

    def growth(self, metric: str = "allocated") -> tuple:
        """(bytes, fraction) from the first reading to the last."""
        first, last = getattr(self.first, metric), getattr(self.last, metric)
        return last - first, (last - first) / first


def _from_source(path: str, pattern: str, what: str) -> int:
    source = (Path(__file__).resolve().parent.parent / path).read_text()
    found = re.search(pattern, source)
    if not found:
        raise InvalidRun(f"{path} no longer defines {what} where bench/scenarios.py looks for it")
    return int(found.group(1).replace("_", ""))


def cache_ways() -> int:
    """How many slots of the cache table an identity may take, as src/cache.rs defines it."""
    return _from_source("src/cache.rs", r"pub const WAYS: u32 = (\d+);", "`WAYS`")


def default_max_identities() -> int:
    """The filter's default `limits.max_identities`, as src/config.rs defines it."""
    return _from_source("src/config.rs", r"max_identities: ([\d_]+),", "the default `max_identities`")


def _flush_every_second(bootstrap: dict):
    bootstrap["stats_flush_interval"] = f"{STATS_FLUSH_S:g}s"


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _memory_sample(stack, identities: int, rate: float = 0.0) -> MemorySample:
    """Envoy's memory once the gateway is idle: MEMORY_READINGS readings, one stats flush apart."""
    readings = []
    for _ in range(MEMORY_READINGS):
        time.sleep(STATS_FLUSH_S * 1.2)
        stats = stack.envoy.stats("server")
        if "memory_allocated" not in stats:
            raise InvalidRun("Envoy reports no server.memory_allocated (built without tcmalloc?)")
        readings.append((int(stats["memory_allocated"]), int(stats.get("memory_heap_size", 0)),
                         _rss_bytes(stack.envoy.process.pid)))
    allocated, heap, rss = (int(statistics.median(r[i] for r in readings)) for i in range(3))
    return MemorySample(identities, allocated, heap, rss, [r[0] for r in readings], rate)


def _send(bed: Testbed, stack, job: dict, what: str) -> flood.FloodResult:
    """Sends the job's requests; each one must be a new identity: one miss, one exchange, 200."""
    exchanges, stats = bed.openai.exchanges, stack.stats()
    result = flood.in_subprocess(job)
    if not result.all_ok:
        raise InvalidRun(f"memory, {what}: not every request got 200: {dict(result.statuses)}\n"
                         f"{stack.envoy.log_tail(10)}")
    after = stack.stats()
    delta = {k: after.get(k, 0) - stats.get(k, 0)
             for k in ("exchanges_ok", "cache_miss", "new_identities_refused", "requests_denied")}
    exchanged = bed.openai.exchanges - exchanges
    if exchanged != result.sent or delta["exchanges_ok"] != result.sent or delta["cache_miss"] != result.sent \
            or delta["new_identities_refused"] or delta["requests_denied"]:
        raise InvalidRun(f"memory, {what}: {result.sent} new identities, but {exchanged} exchanges at the token "
                         f"endpoint and the filter counted {delta}")
    return result


def memory(bed: Testbed, table: int = DEFAULT_MAX_IDENTITIES, connections: int = MEMORY_CONNECTIONS) -> MemoryRun:
    started = time.monotonic()
    targets = [int(table * m) for m in MEMORY_CHECKPOINTS]
    print(f"Memory: {', '.join(f'{t:,}' for t in targets)} new identities, max_identities {table:,}", flush=True)
    limits = {"new_identities_per_s": 100_000, "new_identities_burst": 100_000, "max_identities": table}
    stack = bed.gateway("header", variant="memory", filter_settings={"limits": limits},
                        bootstrap_patch=_flush_every_second)
    run = MemoryRun(table, cache_ways(), table == default_max_identities(), MEMORY_WARMUP, connections,
                    module_bytes=module_path().stat().st_size)
    issuer = bed.standins.issuer
    exchanges_before = bed.openai.exchanges
    job = {"port": stack.envoy.port, "path": PATH, "host": HOST, "header": SUBJECT_HEADER, "iss": issuer.iss,
           "kid": issuer.kid, "pem": flood.private_pem(signing_key(issuer.iss)), "audience": OPENAI_AUDIENCE,
           "connections": connections, "label": "memory: "}
    try:
        warm = _send(bed, stack, dict(job, name="bench-memory-warmup", start=0, count=MEMORY_WARMUP,
                                      timeout_s=60), "warm-up")
        run.mint_s += warm.mint_s
        run.samples.append(_memory_sample(stack, 0))
        print(f"  memory: baseline after {MEMORY_WARMUP} warm-up identities: server.memory_allocated "
              f"{run.baseline.allocated:,} bytes", flush=True)
        sent, last_tokens = 0, []
        for target in targets:
            count = target - sent
            phase = dict(job, name="bench-memory", start=sent, count=count, timeout_s=max(60.0, count / 100),
                         progress_every=max(1000, table // 2))
            if target == targets[-1]:
                phase["keep_last"] = min(max(1, int(table * MEMORY_REPLAY)), count)
            result = _send(bed, stack, phase, f"{sent:,} to {target:,} identities")
            run.flood_s += result.elapsed_s
            run.mint_s += result.mint_s
            last_tokens = result.last_tokens or last_tokens
            sent = target
            sample = _memory_sample(stack, target, count / result.elapsed_s)
            run.samples.append(sample)
            print(f"  memory: after {target:,} new identities: server.memory_allocated {sample.allocated:,} bytes "
                  f"({sample.allocated - run.baseline.allocated:+,} since the baseline), RSS "
                  f"{sample.rss / 2**20:.1f} MiB  ({sample.rate:,.0f} new identities/s)", flush=True)
        # The most recent identities again: the cache still serves them, from memory that stopped growing.
        stats, exchanges = stack.stats(), bed.openai.exchanges
        replay = flood.in_subprocess(dict(job, tokens=last_tokens, timeout_s=60))
        if not replay.all_ok:
            raise InvalidRun(f"memory, replay: not every request got 200: {dict(replay.statuses)}")
        run.replayed = replay.sent
        run.replay_hits = stack.stats().get("cache_hit", 0) - stats.get("cache_hit", 0)
        run.replay_exchanges = bed.openai.exchanges - exchanges
        run.exchanges = bed.openai.exchanges - exchanges_before
    finally:
        bed.stop_gateway(stack)
    run.wall_s = time.monotonic() - started
    grown, fraction = run.growth()
    rss_grown, rss_fraction = run.growth("rss")
    print(f"  memory: {run.bytes_per_identity:,.0f} bytes per identity; from {targets[0]:,} to {targets[-1]:,} "
          f"identities server.memory_allocated grew {grown:+,} bytes ({fraction * 100:+.1f} %), RSS "
          f"{rss_grown / 2**20:+.1f} MiB ({rss_fraction * 100:+.1f} %); the last {run.replayed:,} identities "
          f"again: {run.replay_hits:,} cache hits; {run.wall_s:.0f} s", flush=True)
    for label, value in (("server.memory_allocated", fraction), ("the gateway's RSS", rss_fraction)):
        if value > MEMORY_GROWTH_LIMIT:
            raise InvalidRun(f"memory is not bounded: {label} grew by {value * 100:.1f} % from {targets[0]:,} to "
                             f"{targets[-1]:,} distinct identities (limit {MEMORY_GROWTH_LIMIT * 100:.0f} %) "
                             f"with max_identities {table:,}")
    return run
