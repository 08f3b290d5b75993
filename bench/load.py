"""Closed-loop load with wrk: variants measured in alternation, every run checked.

A variant is one gateway plus the requests a client sends to it. `alternate` runs the variants in
turn (A, B, A, B, ...), each run preceded by an unmeasured warm-up run, so slow drift of the machine
affects every variant alike. Besides wrk's numbers, each run records the CPU time the gateway Envoy
used, which stays meaningful when the load generator and the upstream share its two cores, and how
much CPU processes outside the benchmark took meanwhile (the machine may be shared).

A run is valid only if every request got a 2xx answer: wrk counts no socket error and no status >= 400,
and the upstream's own counters show at least as many 2xx answers and no other status (it answers
400/401 when the gateway forwarded a request wrongly). For a variant with the filter, the filter must
also have taken its warm path for the whole run: no cache miss and no token exchange. Anything else
raises `InvalidRun`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import wrk
from .testbed import PATH, BenchError, cpu_seconds, machine_busy_seconds
from .upstream import STAT_PREFIX as UPSTREAM_STATS


class InvalidRun(BenchError):
    pass


@dataclass
class Variant:
    label: str
    stack: object  # tests.harness.Stack
    script: str  # the wrk Lua script (bench.wrk.script)
    filtered: bool  # the gateway runs the filter: check that it stayed on its warm path


@dataclass
class Sample:
    result: wrk.Result
    gateway_cpu_s: float
    # CPUs kept busy by processes the benchmark did not start, on average over the run (approximate:
    # machine-wide user + system time minus the benchmark's own processes).
    others_cores: float = 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.gateway_cpu_s / self.result.requests * 1e6 if self.result.requests else 0.0


METRICS = {
    "rps": lambda s: s.result.rps,
    "p50_ms": lambda s: s.result.p50_ms,
    "p90_ms": lambda s: s.result.p90_ms,
    "p99_ms": lambda s: s.result.p99_ms,
    "cpu_us": lambda s: s.cpu_us_per_request,
    "others_cores": lambda s: s.others_cores,
}


@dataclass
class Series:
    """The samples of one variant, and their medians."""
    label: str
    samples: list = field(default_factory=list)

    def median(self, metric: str) -> float:
        return statistics.median(METRICS[metric](s) for s in self.samples)

    def values(self, metric: str) -> list:
        return [METRICS[metric](s) for s in self.samples]


@dataclass
class Load:
    workdir: Path
    testbed: object  # bench.testbed.Testbed
    connections: int = 16
    duration_s: float = 10.0
    warmup_s: float = 2.0
    reps: int = 3
    threads: int = 1

    def alternate(self, scenario: str, variants: list) -> dict:
        """label -> Series, after `reps` rounds of one run per variant."""
        series = {v.label: Series(v.label) for v in variants}
        for rep in range(1, self.reps + 1):
            for variant in variants:
                sample = self.measure(scenario, variant)
                series[variant.label].samples.append(sample)
                r = sample.result
                print(f"  {scenario} [{rep}/{self.reps}] {variant.label:<22} {r.rps:9.0f} req/s  "
                      f"p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms  gateway CPU "
                      f"{sample.cpu_us_per_request:6.1f} us/req  ({r.requests} requests, all 2xx; other processes "
                      f"{sample.others_cores * 100:.0f} % of a CPU)", flush=True)
        return series

    def _script_path(self, scenario: str, variant: Variant) -> Path:
        slug = "".join(c if c.isalnum() else "-" for c in f"{scenario}-{variant.label}").strip("-")
        path = self.workdir / "wrk" / f"{slug}.lua"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(variant.script)
        return path

    def _upstream_answers(self) -> dict:
        stats = self.testbed.upstream.stats(f"http.{UPSTREAM_STATS}")
        return {f"{c}xx": stats.get(f"downstream_rq_{c}xx", 0) for c in range(1, 6)}

    def measure(self, scenario: str, variant: Variant) -> Sample:
        script = self._script_path(scenario, variant)
        url = variant.stack.envoy.url + PATH
        what = f"{scenario}, {variant.label}"
        if self.warmup_s > 0:
            warmup = wrk.run(url, script, self.connections, self.warmup_s, self.threads)
            if warmup.problem():
                raise InvalidRun(f"{what}: warm-up run: {warmup.problem()}\n{variant.stack.envoy.log_tail(10)}")
        openai = self.testbed.openai
        exchanges_before = openai.exchanges
        upstream_before = self._upstream_answers()
        stats_before = variant.stack.stats() if variant.filtered else {}
        pid = variant.stack.envoy.process.pid
        cpu_before = cpu_seconds(pid)
        machine_before, own_before, wall_before = machine_busy_seconds(), self.testbed.own_cpu_seconds(), time.monotonic()
        result = wrk.run(url, script, self.connections, self.duration_s, self.threads)
        cpu = cpu_seconds(pid) - cpu_before
        others = (machine_busy_seconds() - machine_before) - (self.testbed.own_cpu_seconds() - own_before)
        others_cores = max(0.0, others) / (time.monotonic() - wall_before)
        problem = result.problem()
        if problem:
            raise InvalidRun(f"{what}: {problem}\n{variant.stack.envoy.log_tail(10)}")
        upstream = {k: v - upstream_before[k] for k, v in self._upstream_answers().items()}
        if upstream["2xx"] < result.requests or any(n for k, n in upstream.items() if k != "2xx"):
            raise InvalidRun(f"{what}: wrk counted {result.requests} good answers, the upstream answered {upstream}")
        if openai.exchanges != exchanges_before:
            raise InvalidRun(f"{what}: {openai.exchanges - exchanges_before} token exchanges during a warm run")
        if variant.filtered:
            stats = variant.stack.stats()
            delta = {k: stats.get(k, 0) - stats_before.get(k, 0) for k in ("cache_hit", "cache_miss", "requests_denied")}
            if delta["cache_miss"] or delta["requests_denied"]:
                raise InvalidRun(f"{what}: the filter left its warm path: {delta}")
            if delta["cache_hit"] < result.requests:
                raise InvalidRun(f"{what}: {result.requests} requests answered but only {delta['cache_hit']} "
                                 f"cache hits counted by the filter")
        return Sample(result, cpu, others_cores)
