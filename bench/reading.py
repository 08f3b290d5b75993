"""What the numbers say: the reading section of BENCHMARKS.md, written from the measured values.

Every figure here comes from the results of the same run; the sentences only state what holds for
any plausible outcome of these measurements, and compare numbers where the comparison matters.
"""

from __future__ import annotations

import statistics


def _spread(series, metric: str = "rps") -> float:
    """Largest minus smallest run, relative to the median (run-to-run noise)."""
    values = series.values(metric)
    return (max(values) - min(values)) / statistics.median(values)


def _pct(ratio: float) -> str:
    return f"{abs(1 - ratio) * 100:.0f} %"


def _signed(value: float, unit: str) -> str:
    return f"±0 {unit}" if round(value) == 0 else f"{value:+.0f} {unit}"


def _all_series(w) -> list:
    return list(w.series.values())


def warm(tables: list, header=None, gateway=None, one=None) -> str:
    lines = []
    for w in tables:
        f, fl, nat, st = (w.role(r).median("cpu_us") for r in ("filter", "floor", "native", "static"))
        lines.append(
            f"- **{w.title}.** Gateway CPU per request: static {st:.0f} µs, native {nat:.0f} µs "
            f"({_signed(nat - st, 'µs')}), floor {fl:.0f} µs ({_signed(fl - st, 'µs')}: the price of a Wasm "
            f"filter that does next to nothing), filter {f:.0f} µs (**{_signed(f - fl, 'µs')} over the floor**: "
            f"the filter's own work). Throughput: filter / floor {w.ratio('filter', 'floor'):.2f}, floor / static "
            f"{w.ratio('floor', 'static'):.2f}, native / static {w.ratio('native', 'static'):.2f}.")
    if header is not None and gateway is not None:
        extra = header.over("filter", "floor") - gateway.over("filter", "floor")
        lines.append(
            f"- **Why the header source costs more** ({_signed(extra, 'µs')} per request over the floor more than the "
            f"gateway identity): the client sends a {header.notes.get('subject_bytes', 0)}-byte subject token that "
            f"the filter reads, decodes (JWT payload, for `exp`), hashes (the identity's cache key) and removes on "
            f"every request; the gateway identity's key is computed once.")
    if one is not None:
        p50 = {r: one.role(r).median("p50_ms") * 1000 for r in ("static", "native", "floor", "filter")}
        lines.append(
            f"- **Latency.** With one connection (no queueing) the median request takes "
            + ", ".join(f"{v:.0f} µs ({r})" for r, v in p50.items())
            + ". Under the 16-connection load the percentiles grow with the throughput ratio, as a closed loop "
            "must. The p99 of a short one-connection run rests on a few dozen requests and follows scheduling "
            "hiccups of the shared machine: do not read its ratio.")
    if tables:
        series = [s for w in tables for s in _all_series(w)]
        noisy = max(_spread(s) for s in series)
        others = max(v for s in series for v in s.values("others_cores"))
        lines.append(
            f"- **Noise.** Runs of the same variant differ by up to {noisy * 100:.0f} % in requests/s (a 2-core VM; "
            f"processes outside the benchmark took up to {others * 100:.0f} % of a CPU during a run); CPU per "
            f"request is steadier. Between two runs of the benchmark, absolute numbers can move together (the "
            f"host's own load is invisible from inside the VM); the ratios and differences within one run are "
            f"what it is for.")
    return "\n".join(lines)


def breakdown(w) -> str:
    from .floor import CALLS

    base = w.role("floor").median("cpu_us")
    prices = sorted(((w.series[c].median("cpu_us") - base, c) for c in CALLS if c in w.series), reverse=True)
    if not prices:
        return ""
    top = ", ".join(f"`{c}` {_signed(v, 'µs')}" for v, c in prices[:3])
    return (f"- **Where the time goes.** The dearest host calls, each against the floor: {top}. The rest of the "
            f"filter's cost over the floor is its own logic (see the breakdown table: the filter over *all_calls*).")


def cold(c) -> str:
    extra = statistics.median(c.extra_s) * 1000
    return "\n".join([
        f"- **Single flight holds.** Every cold burst of {c.n} made "
        + ("exactly one token exchange" if set(c.exchanges) == {1} else f"these exchanges: {sorted(set(c.exchanges))}")
        + f" (counted by the token endpoint and by the filter), while a median of "
        f"{statistics.median(c.paused):.0f} of the {c.n} requests found no token and waited for it.",
        f"- **Cold cost.** The cold burst took {extra:+.1f} ms more than the cached one (×{c.ratio:.2f}); one "
        f"exchange at the same Python stand-in takes {c.round_trip_s * 1000:.1f} ms. The rest is resuming the "
        f"waiting requests: on the worker that did not run the exchange, a paused request resumes on its root "
        f"context's next tick. Both times include the Python client reading {c.n} responses, which dominates "
        f"their absolute milliseconds. A real token endpoint over the internet adds its own round trip, once per "
        f"identity and token lifetime.",
    ])


def identities(w) -> str:
    ratio = w.ratio("filter", "filter_one")
    cpu = w.over("filter", "filter_one")
    noise = max(0.05, _spread(w.role("filter")), _spread(w.role("filter_one")))
    verdict = ("no measurable difference" if abs(1 - ratio) <= noise else "a difference beyond the run-to-run noise")
    return (f"- **Many identities.** {w.roles['filter']} against {w.roles['filter_one']}: {ratio:.2f}× the "
            f"requests/s ({_signed(cpu, 'µs')} CPU per request), {verdict} (±{noise * 100:.0f} %). A warm request "
            f"reads the few slots of the cache table its identity may live in, whatever the number cached.")


def refresh(r) -> str:
    return (f"- **Refresh under load.** The hot identity's token was refreshed {r.refresh_after_s:.1f} s after it was "
            f"exchanged, in the background: {r.waited} of {r.requests:,} requests waited, and the slice with the "
            f"refresh had a p99 of {max(r.p99('during')):.2f} ms against {statistics.median(r.p99('outside')):.2f} ms "
            f"(median) outside it, although the stand-in held the refresh for {r.hold_s * 1000:.0f} ms.")


def memory(m) -> str:
    from .scenarios import BYTES_PER_IDENTITY_TARGET, MEMORY_GROWTH_LIMIT

    grown, fraction = m.growth()
    filling = m.samples[2].allocated - m.first.allocated if len(m.samples) > 2 else 0
    full = m.samples[2] if len(m.samples) > 2 else m.last
    after_full = m.last.allocated - full.allocated
    per_more = after_full / (m.last.identities - full.identities) if m.last.identities > full.identities else 0.0
    bounded = fraction <= MEMORY_GROWTH_LIMIT
    lines = [
        f"- **Memory is bounded by `max_identities`.** {m.last.identities:,} distinct identities, "
        f"{m.last.identities // m.table} times the table, left `server.memory_allocated` "
        f"{grown:+,} bytes ({fraction * 100:+.1f} %) away from where {m.first.identities:,} had left it"
        + (", within the benchmark's limit of " if bounded else ", beyond the limit of ")
        + f"{MEMORY_GROWTH_LIMIT * 100:.0f} %. "
        + (f"Most of that ({filling:+,} bytes) came before {full.identities:,}, while the table's last free slots "
           f"filled; from {full.identities:,} to {m.last.identities:,} it moved by {after_full:+,} bytes "
           f"({per_more:+.1f} bytes per additional identity): each new identity replaces an old record instead "
           f"of adding one."
           if abs(after_full) < abs(filling) else
           f"From {full.identities:,} to {m.last.identities:,} it moved by {after_full:+,} bytes "
           f"({per_more:+.1f} bytes per additional identity)."),
        f"- **Cost of an identity.** About {m.bytes_per_identity:,.0f} bytes per identity "
        f"({m.bytes_per_record:,.0f} bytes per record of a full table), "
        + (f"well under the {BYTES_PER_IDENTITY_TARGET / 1024:g} KiB target"
           if m.bytes_per_record <= BYTES_PER_IDENTITY_TARGET else
           f"over the {BYTES_PER_IDENTITY_TARGET / 1024:g} KiB target")
        + f": a full table of {m.table:,} costs about {m.bytes_per_record * m.table / 2**20:.1f} MiB of Envoy's "
        f"heap, so `max_identities` sizes the cache's memory directly (≈ {m.bytes_per_record / 1024:.2f} KiB × "
        f"`max_identities`). A record is one shared-data value (the identity's hash, the access token, its "
        f"fingerprint and deadlines) under a fixed slot key.",
        f"- **Still serving.** The last {m.replayed:,} identities sent, sent again, got {m.replay_hits:,} cache hits: "
        f"the table keeps the identities written last; those it replaced get a new exchange on their next "
        f"request (the budget for new identities applies to them again).",
    ]
    return "\n".join(lines)


def text(results) -> str:
    parts = [warm(results.goal_tables(), results.warm_header, results.warm_gateway, results.one_connection)]
    if results.breakdown is not None:
        parts.append(breakdown(results.breakdown))
    if results.cold is not None:
        parts.append(cold(results.cold))
    if results.identities is not None:
        parts.append(identities(results.identities))
    if results.refresh is not None:
        parts.append(refresh(results.refresh))
    if results.memory is not None:
        parts.append(memory(results.memory))
    return "\n".join(p for p in parts if p)
