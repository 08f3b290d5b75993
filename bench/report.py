"""BENCHMARKS.md: the machine, the method, one table per scenario, and what the numbers say."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from . import scenarios
from .scenarios import ColdBurst, Comparison, MemoryRun

ROWS = (  # metric, label, digits
    ("rps", "requests/s", 0),
    ("p50_ms", "latency p50 (ms)", 2),
    ("p90_ms", "latency p90 (ms)", 2),
    ("p99_ms", "latency p99 (ms)", 2),
    ("cpu_us", "gateway CPU per request (µs)", 1),
)


@dataclass
class Results:
    warm_header: Comparison | None = None
    one_connection: Comparison | None = None
    warm_gateway: Comparison | None = None
    cold: ColdBurst | None = None
    identities: Comparison | None = None
    memory: MemoryRun | None = None


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _ratio(c: Comparison, metric: str) -> float:
    return c.subject.median(metric) / c.reference.median(metric)


def comparison_table(c: Comparison) -> str:
    lines = [
        f"| median of {c.reps} runs | {c.reference.label} | {c.subject.label} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for metric, label, digits in ROWS:
        lines.append(f"| {label} | {_number(c.reference.median(metric), digits)} | "
                     f"{_number(c.subject.median(metric), digits)} | {_ratio(c, metric):.2f} |")
    runs = "; ".join(f"{s.label}: " + ", ".join(_number(v, 0) for v in s.values("rps"))
                     for s in (c.reference, c.subject))
    samples = [s for series in (c.reference, c.subject) for s in series.samples]
    requests = sum(s.result.requests for s in samples)
    others = [s.others_cores * 100 for s in samples]
    return "\n".join(lines) + (
        f"\n\nratio = {c.subject.label} / {c.reference.label}. Requests/s of each run, in the order run "
        f"(alternating): {runs}. {requests:,} measured requests, every one answered 2xx. Processes outside "
        f"the benchmark kept {statistics.median(others):.0f} % of a CPU busy during these runs (median; "
        f"at most {max(others):.0f} %).")


def cold_table(c: ColdBurst) -> str:
    cold_ms = statistics.median(c.cold_s) * 1000
    warm_ms = statistics.median(c.warm_s) * 1000
    ms = lambda values: ", ".join(f"{v * 1000:.0f}" for v in values)  # noqa: E731
    return "\n".join([
        f"| median of {len(c.cold_s)} bursts | token cached | new identity (cold) | cold / cached |",
        "|---|---:|---:|---:|",
        f"| {c.n} concurrent requests: first sent → last answered (ms) | {warm_ms:.0f} | {cold_ms:.0f} | {c.ratio:.2f} |",
        "",
        f"- Each burst, in ms: cold {ms(c.cold_s)}; cached {ms(c.warm_s)}.",
        f"- Token exchanges per cold burst, at the token endpoint: {', '.join(map(str, c.exchanges))}; "
        f"counted by the filter (`exchanges_ok`): {', '.join(map(str, c.filter_exchanges))}.",
        f"- Requests of each cold burst that found no token and waited (`cache_miss`): "
        f"{', '.join(map(str, c.paused))} of {c.n}.",
        f"- One token exchange sent straight to the Python token endpoint (no gateway): median "
        f"{statistics.median(c.direct_exchange_s) * 1000:.1f} ms.",
        f"- Every request of every burst was answered 200.",
    ])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _met(value: float, target: float) -> str:
    return "met" if value <= target else "**not met**"


def memory_table(m: MemoryRun) -> str:
    lines = [
        "| new identities | `server.memory_allocated` (bytes) | since the baseline (bytes) | "
        "`server.memory_heap_size` (MiB) | RSS (MiB) | new identities/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for sample in m.samples:
        first = sample is m.baseline
        label = f"0 (baseline, after {m.warmup} warm-up identities)" if first else f"{sample.identities:,}"
        since = "—" if first else f"{sample.allocated - m.baseline.allocated:+,}"
        rate = "—" if first else f"{sample.rate:,.0f}"
        lines.append(f"| {label} | {sample.allocated:,} | {since} | {_mib(sample.heap)} | {_mib(sample.rss)} | {rate} |")
    grown, fraction = m.growth()
    rss_grown, rss_fraction = m.growth("rss")
    readings = "; ".join(f"{s.identities:,}: " + ", ".join(f"{v:,}" for v in s.readings) for s in m.samples)
    table = f"{m.table:,}" + (" (the default)" if m.default_table else "")
    return "\n".join(lines) + "\n\n" + "\n".join([
        f"- **Bytes per identity**: ({m.first.allocated:,} − {m.baseline.allocated:,}) / {m.first.identities:,} = "
        f"**{m.bytes_per_identity:,.0f} bytes** (target ≤ {scenarios.BYTES_PER_IDENTITY_TARGET / 1024:g} KiB: "
        f"{_met(m.bytes_per_identity, scenarios.BYTES_PER_IDENTITY_TARGET)}). `max_identities` is {table}.",
        f"- **Per record, once the table is full**: ({m.last.allocated:,} − {m.baseline.allocated:,}) / "
        f"({m.table:,} − {m.warmup}) = {m.bytes_per_record:,.0f} bytes. After {m.first.identities:,} new identities "
        f"the table is not yet full: an identity may take any of {m.ways} slots from its home slot (a hash of its "
        f"token), and when all {m.ways} are taken it replaces the oldest record there, so some of the first "
        f"{m.first.identities:,} replaced others while slots elsewhere were still free. After "
        f"{m.last.identities:,}, every slot holds a record (each is the home slot of "
        f"~{m.last.identities / m.table:.0f} of the identities sent), {m.warmup} of which the baseline held.",
        f"- **Flat**: from {m.first.identities:,} to {m.last.identities:,} new identities, "
        f"`server.memory_allocated` grew by **{grown:+,} bytes ({fraction * 100:+.1f} %)** and the RSS by "
        f"{rss_grown / 2**20:+.1f} MiB ({rss_fraction * 100:+.1f} %). The benchmark fails if either grows by more "
        f"than {scenarios.MEMORY_GROWTH_LIMIT * 100:.0f} %.",
        f"- Every request was answered 200, and each new identity cost exactly one token exchange at the "
        f"stand-in and one `cache_miss` in the filter, none refused (`new_identities_refused` 0): "
        f"{m.exchanges:,} exchanges in all, warm-up and replay included.",
        f"- **Still a cache**: the last {m.replayed:,} identities sent, sent again after the last reading: "
        f"{m.replay_hits:,} answered from the cache, {m.replay_exchanges:,} exchanged again.",
        f"- **Filter module**: {m.module_bytes:,} bytes ({m.module_bytes / 1024:,.0f} KiB; target ≤ "
        f"{scenarios.MODULE_BYTES_TARGET / 1000:g} KB: {_met(m.module_bytes, scenarios.MODULE_BYTES_TARGET)}).",
        f"- Wall time {m.wall_s:.0f} s, Envoy's start included; {m.flood_s:.0f} s sending the new identities, "
        f"of which the client spent {m.mint_s:.0f} s minting their subject tokens.",
        f"- Each `server.memory_allocated` reading, by new identities: {readings}.",
    ])


def _command(args) -> str:
    defaults = dict(reps=3, duration=10.0, warmup=2.0, connections=16, burst=200, bursts=10, identities=100,
                    memory_table=scenarios.DEFAULT_MAX_IDENTITIES)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k):g}" for k, v in defaults.items() if getattr(args, k) != v]
    changed += [f"--only {name}" for name in (args.only or [])]
    return "python -m bench.run" + (" " + " ".join(changed) if changed else "")


def render(results: Results, host, args, elapsed_s: float) -> str:
    from . import reading  # the interpretation lives apart from the tables

    h, one, gw, cold, ids, mem = (results.warm_header, results.one_connection, results.warm_gateway, results.cold,
                                  results.identities, results.memory)
    out = [
        "# Benchmarks",
        "",
        "The filter's cost, measured as ratios against the same Envoy gateway without the filter, run side "
        "by side on the same machine in the same run, and the gateway's memory as distinct identities pile up. "
        "Generated by `bench/` — do not edit by hand.",
        "",
        "```",
        "make bench                # builds the filter, then: .venv/bin/python -m bench.run",
        "python -m bench.run       # the same, with the module already built; rewrites BENCHMARKS.md",
        "python -m bench.run --quick   # a short smoke run that prints the report instead",
        "python -m bench.run --only memory   # one scenario (repeatable); prints its section instead",
        "```",
        "",
        f"This report: `{_command(args)}`, {elapsed_s / 60:.1f} minutes, {host.date}.",
        "",
        "## Machine",
        "",
        f"- {host.cpus} CPUs (`nproc`), {host.cpu_model}, {host.memory_gib:.0f} GiB, {host.kernel}",
        f"- {host.envoy}, runtime V8; {host.wrk}; {host.python}",
        f"- Filter module {host.module}, commit {host.commit}",
        "",
        "## Method",
        "",
        "- **Gateways.** Every gateway is `tools/envoy_config.render(\"local\", source, ...)` started by "
        "`tests.harness.Stack` with `--concurrency 2`; the baseline is the same rendering with "
        "`with_filter=False` (no Wasm filter, nothing else changed). Access logs are off in both.",
        "- **Upstream.** `openai_api` points at a second Envoy (`--concurrency 1`) that answers "
        "`GET /v1/models` from a `direct_response` (200, small JSON). It answers 401 to a request without "
        "`Authorization: Bearer …` and 400 to one that still carries the subject-token header, so a request "
        "the filter mishandled cannot count as a success. `openai_auth` (the token endpoint) is the Python "
        "OpenAI stand-in; it is only used when a token is exchanged.",
        f"- **Load.** `wrk -t1 -c{args.connections} -d{args.duration:g}s` with a Lua script that sets the "
        f"headers (`Host: api.openai.com`), after {args.warmup:g} s of unmeasured load; the two variants run "
        f"alternately (A, B, A, B, …), {args.reps} measured runs each; tables show medians. wrk is closed-loop: "
        f"under load, latency is mostly queueing (≈ connections / throughput), so the one-connection table "
        f"shows the per-request latency without queueing.",
        "- **CPU.** All processes share the machine's cores, nothing is pinned: wrk (one thread), the upstream "
        "Envoy (one worker), the gateway (two workers) and the idle Python stand-ins. Throughput is therefore "
        "the gateway's share of a contended machine. *Gateway CPU per request* (user + system time of the "
        "gateway process during the run, from `/proc/<pid>/stat`, divided by the requests) does not depend "
        "on that share and is the most direct measure of the filter's cost. The machine may also run other "
        "work; each table says how much CPU processes outside the benchmark took during its runs (machine-wide "
        "user + system time from `/proc/stat` minus the benchmark's own processes; approximate).",
        "- **Validity.** A run counts only if every request was answered 2xx: wrk saw no socket error and no "
        "status ≥ 400, and the upstream's own counters show at least as many 2xx answers and no other status. "
        "With the filter, it must also have stayed on its warm path: its `cache_hit` counter grew by at least "
        "the number of requests, `cache_miss` and `requests_denied` did not move, and the token endpoint saw no "
        "exchange. In the memory scenario, every request must be answered 200 and each new identity must cost "
        "exactly one exchange, and memory must not grow by more than "
        f"{scenarios.MEMORY_GROWTH_LIMIT * 100:.0f} % from the first reading to the last. Otherwise `bench.run` "
        "prints INVALID, exits 1 and leaves this file as it was.",
        "",
        "## Results",
        "",
    ]
    if h is not None:
        out += [f"### 1. {h.title}", "", h.about, "", comparison_table(h), ""]
    if one is not None:
        out += [f"With one connection (`-c1`, {one.duration_s:g} s runs after {one.warmup_s:g} s of warm-up):", "",
                comparison_table(one), ""]
    if gw is not None:
        out += [f"### 2. {gw.title}", "", gw.about, "", comparison_table(gw), ""]
    if cold is not None:
        out += [
            "### 3. Cold single flight",
            "",
            f"{cold.n} requests for one identity the gateway has never seen, sent at once (header source; each "
            f"burst uses a new subject token, so a new identity), then the same {cold.n} requests again once its "
            f"token is cached. The client is Python, in its own process: it opens {cold.n} connections first, "
            f"writes the {cold.n} requests in one loop (median {statistics.median(cold.sent_s) * 1000:.1f} ms from "
            f"the first to the last), then reads the answers on one thread with `selectors`; the time runs from "
            f"the first request written to the last response read. (A thread per request spread the burst over "
            f"~50 ms, so most requests arrived after the exchange had finished.)",
            "",
            cold_table(cold),
            "",
        ]
    if ids is not None:
        out += [f"### 4. {ids.title}", "", ids.about, "", comparison_table(ids), ""]
    if mem is not None:
        out += [
            f"### 5. Memory: {mem.last.identities:,} distinct identities, at most {mem.table:,} cached",
            "",
            f"One gateway with the filter (header source, `--concurrency 2`), `limits.max_identities` "
            f"{mem.table:,}{' (the default)' if mem.default_table else ''} and the budget for new identities "
            f"raised to 100 000 per second (`new_identities_per_s`, `new_identities_burst`) so that none is "
            f"refused. A Python client in its own process (`bench/flood.py`) mints a new subject token for every "
            f"request, as the stand-in issuer does (RS256 with its key, a new `sub` each: a new workload "
            f"identity), and sends them over {mem.connections} keep-alive connections, one request in flight on "
            f"each; the stand-in token endpoint verifies every token and exchanges it. After {mem.warmup} warm-up "
            f"identities (connections, the VMs' heaps), Envoy's `server.memory_allocated` (admin `/stats`; Envoy "
            f"updates it when it flushes stats, here every {scenarios.STATS_FLUSH_S:g} s) is read "
            f"{scenarios.MEMORY_READINGS} times, one flush apart, once the gateway is idle (the table shows the "
            f"median): the baseline, then after {', '.join(f'{s.identities:,}' for s in mem.samples[1:])} new "
            f"identities. `server.memory_heap_size` and the Envoy process's RSS (`VmRSS`, every page it holds, "
            f"whoever allocated it) are read with it.",
            "",
            memory_table(mem),
            "",
        ]
    out += [
        "## Reading",
        "",
        reading.text(results),
        "",
    ]
    return "\n".join(out)
