"""BENCHMARKS.md: the machine, the method, one table per scenario, and what the numbers say."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from . import scenarios
from .scenarios import ColdBurst, MemoryRun, RefreshRun, Warm

ROWS = (  # metric, label, digits
    ("rps", "requests/s", 0),
    ("p50_ms", "latency p50 (ms)", 2),
    ("p90_ms", "latency p90 (ms)", 2),
    ("p99_ms", "latency p99 (ms)", 2),
    ("cpu_us", "gateway CPU per request (µs)", 1),
)


@dataclass
class Results:
    warm_header: Warm | None = None
    one_connection: Warm | None = None
    warm_gateway: Warm | None = None
    warm_callers: Warm | None = None
    identities: Warm | None = None
    breakdown: Warm | None = None
    cold: ColdBurst | None = None
    refresh: RefreshRun | None = None
    memory: MemoryRun | None = None

    def goal_tables(self) -> list:
        """The warm tables the issue's warm-path goal applies to."""
        return [w for w in (self.warm_header, self.identities, self.warm_gateway, self.warm_callers) if w is not None]


def _number(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _us(value: float) -> str:
    return f"{value:+.1f} µs"


RATIOS = (("filter", "floor"), ("floor", "static"), ("native", "static"), ("filter", "static"))


def warm_goals(w: Warm) -> tuple:
    """(throughput filter / floor, CPU µs over the floor, both goals met)."""
    rps, cpu = w.ratio("filter", "floor"), w.over("filter", "floor")
    return rps, cpu, rps >= scenarios.GOAL_RPS_OVER_FLOOR and cpu <= scenarios.GOAL_CPU_OVER_FLOOR_US


def warm_table(w: Warm) -> str:
    labels = list(w.series)
    lines = [f"| median of {w.reps} runs | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for metric, label, digits in ROWS:
        lines.append(f"| {label} | " + " | ".join(_number(w.series[l].median(metric), digits) for l in labels) + " |")
    lines += ["", "| ratio of medians | requests/s | gateway CPU per request | CPU difference |", "|---|---:|---:|---:|"]
    pairs = list(RATIOS)
    if "filter_one" in w.roles:
        pairs.insert(1, ("filter", "filter_one"))
    for subject, reference in pairs:
        if subject in w.roles and reference in w.roles:
            lines.append(f"| {w.roles[subject]} / {w.roles[reference]} | {w.ratio(subject, reference):.2f} | "
                         f"{w.ratio(subject, reference, 'cpu_us'):.2f} | {_us(w.over(subject, reference))} |")
    runs = "; ".join(f"{label}: " + ", ".join(_number(v, 0) for v in series.values("rps"))
                     for label, series in w.series.items())
    samples = [s for series in w.series.values() for s in series.samples]
    requests = sum(s.result.requests for s in samples)
    others = [s.others_cores * 100 for s in samples]
    out = "\n".join(lines) + (
        f"\n\nRequests/s of each run, in the order run (alternating): {runs}. {requests:,} measured requests, every "
        f"one answered 2xx. Processes outside the benchmark kept {statistics.median(others):.0f} % of a CPU busy "
        f"during these runs (median; at most {max(others):.0f} %).")
    if {"filter", "floor"} <= set(w.roles):
        rps, cpu, _ = warm_goals(w)
        out += (f"\n\n- **Goal, throughput** filter / floor ≥ {scenarios.GOAL_RPS_OVER_FLOOR:.2f}: {rps:.2f}, "
                f"{_met(rps >= scenarios.GOAL_RPS_OVER_FLOOR)}."
                f"\n- **Goal, CPU** of the filter over the floor ≤ {scenarios.GOAL_CPU_OVER_FLOOR_US:g} µs per request: "
                f"{_us(cpu)}, {_met(cpu <= scenarios.GOAL_CPU_OVER_FLOOR_US)}.")
    return out


def breakdown_table(w: Warm) -> str:
    from . import floor

    base = w.role("floor")
    lines = [f"| median of {w.reps} runs | extra host call | requests/s | × floor | gateway CPU per request (µs) | "
             f"over the floor |", "|---|---|---:|---:|---:|---:|"]
    for label, series in w.series.items():
        what = floor.VARIANTS[label][1] if label in floor.VARIANTS else "the openai-wif filter"
        lines.append(f"| {label} | {what} | {series.median('rps'):,.0f} | "
                     f"{series.median('rps') / base.median('rps'):.2f} | {series.median('cpu_us'):.1f} | "
                     + ("—" if label == "floor" else _us(series.median('cpu_us') - base.median('cpu_us'))) + " |")
    calls = [l for l in w.series if l in floor.CALLS]
    total = sum(w.series[l].median("cpu_us") - base.median("cpu_us") for l in calls)
    out = "\n".join(lines)
    if "all_calls" in w.series:
        every = w.series["all_calls"].median("cpu_us") - base.median("cpu_us")
        out += (f"\n\n- The {len(calls)} calls one at a time add up to {_us(total)}; all of them in one module: "
                f"{_us(every)} over the floor.")
        if "filter" in w.roles:
            rest = w.series["filter"].median("cpu_us") - w.series["all_calls"].median("cpu_us")
            out += (f"\n- The filter over *all_calls*: {_us(rest)} per request: its own logic (parsing, hashing, "
                    f"the cache lookup, allocation) beyond these host calls.")
    samples = [s for series in w.series.values() for s in series.samples]
    spread = max((max(v) - min(v)) for v in (series.values("cpu_us") for series in w.series.values()))
    resolution = (f"the largest run-to-run spread of one variant's CPU per request was {spread:.1f} µs: a price "
                  f"smaller than that is not resolved" if w.reps > 1 else
                  "one run per variant, so no run-to-run spread: a price of a few µs is not resolved")
    out += (f"\n- Runs of {w.duration_s:g} s after {w.warmup_s:g} s of warm-up, {w.reps} per variant; {resolution}. "
            f"{sum(s.result.requests for s in samples):,} measured requests, every one answered 2xx.")
    return out


def cold_table(c: ColdBurst) -> str:
    cold_ms = statistics.median(c.cold_s) * 1000
    warm_ms = statistics.median(c.warm_s) * 1000
    extra_ms = statistics.median(c.extra_s) * 1000
    ms = lambda values: ", ".join(f"{v * 1000:.0f}" for v in values)  # noqa: E731
    workers = "; ".join("/".join(str(n) for _, n in sorted(w.items())) for w in c.workers)
    return "\n".join([
        f"| median of {len(c.cold_s)} bursts | token cached | new identity (cold) | cold − cached | cold / cached |",
        "|---|---:|---:|---:|---:|",
        f"| {c.n} concurrent requests: first sent → last answered (ms) | {warm_ms:.1f} | {cold_ms:.1f} | "
        f"{extra_ms:+.1f} | {c.ratio:.2f} |",
        "",
        f"- **Goal, one exchange per cold burst**: {', '.join(map(str, c.exchanges))} at the token endpoint, "
        f"{', '.join(map(str, c.filter_exchanges))} counted by the filter (`exchanges_ok`): "
        f"{_met(set(c.exchanges) == {1} and set(c.filter_exchanges) == {1})}.",
        f"- **Goal, extra latency** ≤ one exchange round-trip + {scenarios.COLD_GOAL_SLACK_S * 1000:g} ms: the cold "
        f"burst took {extra_ms:+.1f} ms more than the cached burst right after it (median of the per-repetition "
        f"differences: {', '.join(f'{v * 1000:+.1f}' for v in c.extra_s)} ms); one exchange sent straight to the same "
        f"token stand-in in the same run took {c.round_trip_s * 1000:.1f} ms (median of "
        f"{', '.join(f'{v * 1000:.1f}' for v in c.direct_exchange_s)}), so the bound is "
        f"{c.allowed_s * 1000:.1f} ms: {_met(c.met)}.",
        f"- Each burst, in ms: cold {ms(c.cold_s)}; cached {ms(c.warm_s)}.",
        f"- Where the cold burst's time goes: the token stand-in answered the one exchange "
        f"{', '.join(f'{v * 1000:.1f}' for v in c.answered_s)} ms after the first request was written (its clock "
        f"and the client's); the rest of each cold burst came after the token was there (resuming the waiting "
        f"requests and answering all {c.n}).",
        f"- Requests of each cold burst that found no token and waited (`cache_miss`): "
        f"{', '.join(map(str, c.paused))} of {c.n}.",
        f"- Connections of each cold burst per gateway worker (worker 0/worker 1): {workers}.",
        f"- Every request of every burst was answered 200.",
    ])


def refresh_table(r: RefreshRun) -> str:
    first = r.slices[0].started
    lines = ["| slice | from (s) | requests/s | p50 (ms) | p99 (ms) | max (ms) | refresh window |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for i, piece in enumerate(r.slices, 1):
        res = piece.result
        lines.append(f"| {i} | {piece.started - first:.1f} | {res.rps:,.0f} | {res.p50_ms:.2f} | {res.p99_ms:.2f} | "
                     f"{res.max_ms:.2f} | {'**yes**' if piece.refresh else ''} |")
    during, outside = r.p99("during"), r.p99("outside")
    return "\n".join(lines) + "\n\n" + "\n".join([
        f"- **Goal, 0 requests wait**: `cache_miss` moved by {r.waited} over the {r.requests:,} requests of the "
        f"slices ({r.hits:,} `cache_hit`): {_met(r.waited == 0)}.",
        f"- **Exactly one refresh**: {r.exchanges} exchange at the token endpoint, {r.filter_exchanges} counted by "
        f"the filter, {r.refresh_after_s:.1f} s after the first token was exchanged: "
        f"{_met(r.exchanges == 1 and r.filter_exchanges == 1)}.",
        f"- **Goal, p99 unchanged**: during the refresh window {', '.join(f'{v:.2f}' for v in during)} ms; the "
        f"other slices median {statistics.median(outside):.2f} ms, highest {max(outside):.2f} ms (the bound: "
        f"{scenarios.REFRESH_P99_TOLERANCE:.2f} × the highest): {_met(r.p99_met)}.",
        f"- **No request sat through the refresh**: the longest request of any slice took "
        f"{max(s.result.max_ms for s in r.slices):.2f} ms, under the {r.hold_s * 1000:.0f} ms the stand-in held "
        f"the refresh exchange: {_met(r.max_met)}.",
        f"- Every request was answered 2xx (wrk and the upstream's counters).",
    ])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def _within(value: float, target: float) -> str:
    return _met(value <= target)


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
        f"- **Goal, bytes per cached identity** (shared data and Envoy's heap: `server.memory_allocated` counts "
        f"both): ({m.first.allocated:,} − {m.baseline.allocated:,}) / {m.first.identities:,} = "
        f"**{m.bytes_per_identity:,.0f} bytes** (target ≤ {scenarios.BYTES_PER_IDENTITY_TARGET / 1024:g} KiB: "
        f"{_within(m.bytes_per_identity, scenarios.BYTES_PER_IDENTITY_TARGET)}). `max_identities` is {table}.",
        f"- **Per record, once the table is full**: ({m.last.allocated:,} − {m.baseline.allocated:,}) / "
        f"({m.table:,} − {m.warmup}) = {m.bytes_per_record:,.0f} bytes. After {m.first.identities:,} new identities "
        f"the table is not yet full: an identity may take any of {m.ways} slots from its home slot (a hash of its "
        f"token), and when all {m.ways} are taken it replaces the oldest record there, so some of the first "
        f"{m.first.identities:,} replaced others while slots elsewhere were still free. After "
        f"{m.last.identities:,}, every slot holds a record (each is the home slot of "
        f"~{m.last.identities / m.table:.0f} of the identities sent), {m.warmup} of which the baseline held.",
        f"- **Goal, flat**: from {m.first.identities:,} to {m.last.identities:,} new identities, "
        f"`server.memory_allocated` grew by **{grown:+,} bytes ({fraction * 100:+.1f} %)** and the RSS by "
        f"{rss_grown / 2**20:+.1f} MiB ({rss_fraction * 100:+.1f} %). The benchmark fails if either grows by more "
        f"than {scenarios.MEMORY_GROWTH_LIMIT * 100:.0f} %: "
        f"{_met(fraction <= scenarios.MEMORY_GROWTH_LIMIT and rss_fraction <= scenarios.MEMORY_GROWTH_LIMIT)}.",
        f"- Every request was answered 200, and each new identity cost exactly one token exchange at the "
        f"stand-in and one `cache_miss` in the filter, none refused (`new_identities_refused` 0): "
        f"{m.exchanges:,} exchanges in all, warm-up and replay included.",
        f"- **Still a cache**: the last {m.replayed:,} identities sent, sent again after the last reading: "
        f"{m.replay_hits:,} answered from the cache, {m.replay_exchanges:,} exchanged again.",
        f"- **Goal, module size**: {m.module_bytes:,} bytes ({m.module_bytes / 1024:,.0f} KiB; target ≤ "
        f"{scenarios.MODULE_BYTES_TARGET / 1000:g} KB: {_within(m.module_bytes, scenarios.MODULE_BYTES_TARGET)}).",
        f"- Wall time {m.wall_s:.0f} s, Envoy's start included; {m.flood_s:.0f} s sending the new identities, "
        f"of which the client spent {m.mint_s:.0f} s minting their subject tokens.",
        f"- Each `server.memory_allocated` reading, by new identities: {readings}.",
    ])


def _command(args) -> str:
    defaults = dict(reps=3, duration=10.0, warmup=2.0, connections=16, burst=scenarios.COLD_BURST, bursts=10, identities=100,
                    memory_table=scenarios.DEFAULT_MAX_IDENTITIES)
    changed = [f"--{k.replace('_', '-')} {getattr(args, k):g}" for k, v in defaults.items() if getattr(args, k) != v]
    changed += [f"--only {name}" for name in (args.only or [])]
    return "python -m bench.run" + (" " + " ".join(changed) if changed else "")


def goals(results: Results) -> str:
    """One line per goal of the issue, with its measured value and pass/fail."""
    lines = []
    for w in results.goal_tables():
        rps, cpu, ok = warm_goals(w)
        lines.append(f"- Warm path, {w.title[len('Warm path, '):] if w.title.startswith('Warm path, ') else w.title}: "
                     f"filter / floor {rps:.2f} (≥ {scenarios.GOAL_RPS_OVER_FLOOR:.2f}), {_us(cpu)} CPU per request "
                     f"over the floor (≤ {scenarios.GOAL_CPU_OVER_FLOOR_US:g} µs); floor / static "
                     f"{w.ratio('floor', 'static'):.2f}, native / static {w.ratio('native', 'static'):.2f}: {_met(ok)}.")
    c = results.cold
    if c is not None:
        lines.append(f"- Cold: {c.n} concurrent requests for a new identity over 2 workers: exchanges per burst "
                     f"{sorted(set(c.exchanges))}, extra latency {statistics.median(c.extra_s) * 1000:+.1f} ms against "
                     f"a bound of {c.allowed_s * 1000:.1f} ms (round-trip {c.round_trip_s * 1000:.1f} ms + "
                     f"{scenarios.COLD_GOAL_SLACK_S * 1000:g} ms): {_met(c.met and set(c.exchanges) == {1})}.")
    r = results.refresh
    if r is not None:
        lines.append(f"- Refresh under load: {r.waited} requests waited, {r.exchanges} refresh exchange, p99 during "
                     f"the refresh {max(r.p99('during')):.2f} ms against {max(r.p99('outside')):.2f} ms at most outside "
                     f"it: {_met(r.met)}.")
    m = results.memory
    if m is not None:
        _, fraction = m.growth()
        _, rss_fraction = m.growth("rss")
        flat = fraction <= scenarios.MEMORY_GROWTH_LIMIT and rss_fraction <= scenarios.MEMORY_GROWTH_LIMIT
        lines.append(f"- Memory: {m.bytes_per_identity:,.0f} bytes per cached identity at {m.first.identities:,} "
                     f"(≤ {scenarios.BYTES_PER_IDENTITY_TARGET:,}): "
                     f"{_within(m.bytes_per_identity, scenarios.BYTES_PER_IDENTITY_TARGET)}; {fraction * 100:+.1f} % "
                     f"from {m.first.identities:,} to {m.last.identities:,} identities (≤ "
                     f"{scenarios.MEMORY_GROWTH_LIMIT * 100:.0f} %): {_met(flat)}; module {m.module_bytes:,} bytes "
                     f"(≤ {scenarios.MODULE_BYTES_TARGET:,}): {_within(m.module_bytes, scenarios.MODULE_BYTES_TARGET)}.")
    return "\n".join(lines)


def render(results: Results, host, args, elapsed_s: float) -> str:
    from . import reading  # the interpretation lives apart from the tables

    r = results
    out = [
        "# Benchmarks",
        "",
        "The filter's cost, measured side by side on the same machine in the same run against its peers on the "
        "same Envoy gateway: a no-op Wasm filter built by the bench (the floor every Wasm filter pays), Envoy's "
        "native `credential_injector` (OAuth2 client credentials), and a static header set by Envoy; a cold "
        "burst, a refresh under load, and the gateway's memory as distinct identities pile up. "
        "Generated by `bench/` — do not edit by hand.",
        "",
        "```",
        "make bench                # builds the filter, then: .venv/bin/python -m bench.run",
        "python -m bench.run       # the same, with the module already built; rewrites BENCHMARKS.md",
        "python -m bench.run --quick   # a short smoke run that prints the report instead",
        "python -m bench.run --only breakdown   # one scenario (repeatable); prints its section instead",
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
        "## Goals",
        "",
        goals(r) or "(no scenario with a goal was run)",
        "",
        "## Method",
        "",
        "- **Gateways.** Every gateway is `tools/envoy_config.render(\"local\", source, ...)` started by "
        "`tests.harness.Stack` with `--concurrency 2`. Each warm table has four variants on the same rendering "
        "(`bench/peers.py`): *filter* (the openai-wif module), *floor* (the no-op Wasm module of `bench/floor/`, "
        "built by the bench with the filter's release profile, in the filter's place: same `vm_config`, same "
        "position in the chain), *native* (no Wasm; Envoy's `envoy.filters.http.credential_injector` with "
        "`envoy.http.injected_credentials.oauth2`, client credentials grant through the `openai_auth` cluster to "
        "the token stand-in, the client secret a file-based SDS generic secret; the bench checks that the "
        "stand-in granted it a token and that its `credential_injector` counted injections) and *static* (no "
        "Wasm; the route's `request_headers_to_add` sets `authorization`). In *native* and *static* the route "
        "removes the subject header (`request_headers_to_remove`), as the floor and the filter do. Every variant "
        "gets the identical request. Access logs are off everywhere; the gateways of one scenario are stopped "
        "before the next.",
        "- **Upstream.** `openai_api` points at a second Envoy (`--concurrency 1`) that answers "
        "`GET /v1/models` from a `direct_response` (200, small JSON). It answers 401 to a request without "
        "`Authorization: Bearer …` and 400 to one that still carries the subject-token header, so a request "
        "a variant mishandled cannot count as a success. `openai_auth` (the token endpoint) is the Python "
        "OpenAI stand-in, extended on the bench side (`bench/standin.py`) to answer an RFC 6749 client "
        "credentials grant for the native peer; it is used only when a token is exchanged or granted.",
        f"- **Load.** `wrk -t1 -c{args.connections} -d{args.duration:g}s` with a Lua script that sets the "
        f"headers (`Host: api.openai.com`), after {args.warmup:g} s of unmeasured load; the variants run "
        f"alternately (A, B, C, D, A, …), {args.reps} measured runs each; tables show medians. wrk is closed-loop: "
        f"under load, latency is mostly queueing (≈ connections / throughput), so the one-connection table "
        f"shows the per-request latency without queueing.",
        "- **CPU.** All processes share the machine's cores, nothing is pinned: wrk (one thread), the upstream "
        "Envoy (one worker), the gateway (two workers) and the idle Python stand-ins. Throughput is therefore "
        "the gateway's share of a contended machine. *Gateway CPU per request* (user + system time of the "
        "gateway process during the run, from `/proc/<pid>/stat`, divided by the requests) does not depend "
        "on that share and is the most direct measure of a variant's cost; the goal's µs are differences of it. "
        "Each table says how much CPU processes outside the benchmark took during its runs (machine-wide "
        "user + system time from `/proc/stat` minus the benchmark's own processes; approximate).",
        "- **Breakdown.** The floor module has one cargo feature per host call the filter makes per request "
        "(`bench/floor/Cargo.toml`); each variant is the floor plus that one call, each on its own gateway, all "
        "measured in alternation with the floor and the filter. A variant's CPU per request minus the floor's "
        "is the price of its call (the floor calls through the proxy-wasm Rust SDK, so a call's price includes "
        "the SDK's small copy of the value).",
        "- **Cold.** A burst of concurrent requests for a new identity (header source; a new subject token per "
        "repetition), then the same burst again once cached; the extra latency is the difference of the two, "
        "per repetition. The exchange round-trip is one token exchange sent straight to the same stand-in by "
        "the bench (Python `http.client`, a new connection) in the same run.",
        f"- **Refresh under load.** A gateway of its own with one hot identity whose first token lives "
        f"{scenarios.REFRESH_LIFETIME_S} s (the stand-in's `expires_in`; the filter refreshes after ~80 % of a "
        f"lifetime, less up to 5 % of jitter, `src/lifetime.rs`); the refreshed token lives an hour, so exactly one "
        f"refresh falls in the measurement. The stand-in holds that refresh exchange for "
        f"{scenarios.REFRESH_HOLD_S * 1000:.0f} ms, so the refresh window is long enough to see: a request that "
        f"waited for it would take ≥ {scenarios.REFRESH_HOLD_S * 1000:.0f} ms and would stall its connection. "
        f"wrk runs back to back in {scenarios.REFRESH_SLICE_S} s slices (each its own latency histogram) from the "
        f"first token until {scenarios.REFRESH_SLICES_AFTER} slices after the refresh; the slice whose time "
        f"overlaps the window (from the stand-in's clock: when the exchange arrived and was answered) is *during*, "
        f"the others *outside*. The filter's `cache_miss` over all slices counts the requests that waited.",
        "- **Validity.** A run counts only if every request was answered 2xx: wrk saw no socket error and no "
        "status ≥ 400, and the upstream's own counters show at least as many 2xx answers and no other status. "
        "With the filter, it must also have stayed on its warm path: its `cache_hit` counter grew by at least "
        "the number of requests, `cache_miss` and `requests_denied` did not move, and the token endpoint saw no "
        "exchange. A cold burst must make exactly one exchange. In the memory scenario, every request must be "
        "answered 200 and each new identity must cost exactly one exchange, and memory must not grow by more than "
        f"{scenarios.MEMORY_GROWTH_LIMIT * 100:.0f} % from the first reading to the last. Otherwise `bench.run` "
        "prints INVALID, exits 1 and leaves this file as it was. A goal that is not met is reported, not fatal.",
        "",
        "## Results",
        "",
    ]
    n = 0

    def section(title: str, *parts):
        nonlocal n
        n += 1
        out.extend([f"### {n}. {title}", ""])
        for part in parts:
            out.extend([part, ""])

    if r.warm_header is not None:
        section(r.warm_header.title, r.warm_header.about, warm_table(r.warm_header))
    if r.one_connection is not None:
        one = r.one_connection
        section(one.title, f"The same four variants with one connection (`-c1`, {one.duration_s:g} s runs after "
                           f"{one.warmup_s:g} s of warm-up).", warm_table(one))
    for w in (r.identities, r.warm_gateway, r.warm_callers):
        if w is not None:
            section(w.title, w.about, warm_table(w))
    if r.breakdown is not None:
        section(r.breakdown.title, r.breakdown.about, breakdown_table(r.breakdown))
    if r.cold is not None:
        c = r.cold
        section("Cold single flight",
                f"{c.n} requests for one identity the gateway has never seen, sent at once (header source; each "
                f"burst uses a new subject token, so a new identity), then the same {c.n} requests again once its "
                f"token is cached. The client is Python, in its own process: it opens {c.n} connections first "
                f"(the gateway's two workers accept them), writes the {c.n} requests in one loop (median "
                f"{statistics.median(c.sent_s) * 1000:.1f} ms from the first to the last), then reads the answers "
                f"on one thread with `selectors`; the time runs from the first request written to the last response "
                f"read.", cold_table(c))
    if r.refresh is not None:
        section("Refresh under load", f"{r.refresh.connections} connections, header source, one hot identity "
                f"(see Method).", refresh_table(r.refresh))
    if r.memory is not None:
        mem = r.memory
        section(f"Memory: {mem.last.identities:,} distinct identities, at most {mem.table:,} cached",
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
                f"whoever allocated it) are read with it.", memory_table(mem))
    out += ["## Reading", "", reading.text(r), ""]
    return "\n".join(out)
