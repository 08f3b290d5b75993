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

from . import flood, wrk
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
