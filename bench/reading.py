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


def _cpu(c) -> tuple:
    base, filt = c.reference.median("cpu_us"), c.subject.median("cpu_us")
    return base, filt, filt - base


def warm_paths(h, gw, one) -> str:
    hb, hf, hd = _cpu(h)
    gb, gf, gd = _cpu(gw)
    rps_h, rps_g = h.subject.median("rps") / h.reference.median("rps"), gw.subject.median("rps") / gw.reference.median("rps")
    p50_b, p50_f = one.reference.median("p50_ms"), one.subject.median("p50_ms")
    ob, of, od = _cpu(one)
    noisy = max(_spread(s) for s in (h.reference, h.subject, gw.reference, gw.subject))
    others = max(v for s in (h.reference, h.subject, gw.reference, gw.subject) for v in s.values("others_cores"))
    p99s = ", ".join(f"{v:.2f}" for v in one.reference.values("p99_ms") + one.subject.values("p99_ms"))
    return "\n".join([
        f"- **Cost of the warm path.** The filter adds about **{hd:.0f} µs of gateway CPU per request** "
        f"(×{hf / hb:.2f}) with per-request identities (header source: {hb:.0f} → {hf:.0f} µs) and about "
        f"**{gd:.0f} µs** (×{gf / gb:.2f}) with the gateway's own identity (kubernetes source: {gb:.0f} → "
        f"{gf:.0f} µs). On this machine that costs {_pct(rps_h)} and {_pct(rps_g)} of throughput (ratios "
        f"{rps_h:.2f} and {rps_g:.2f}). Throughput ratios depend on how the two cores are shared between the "
        f"gateway, wrk and the upstream; the CPU per request does not, but on this VM its absolute value moves "
        f"with the host's load from one benchmark run to the next: size with the CPU ratio.",
        f"- **Why the header source costs more** ({hd - gd:.0f} µs per request more than the gateway identity): "
        f"the client sends a {h.notes.get('subject_bytes', 0)}-byte subject token in a header that Envoy parses and "
        f"the filter reads, decodes (JWT payload, for `exp`), hashes (SHA-256 over the whole token names the "
        f"identity's cache entry) and removes, on every request; the gateway identity's key is computed once.",
        f"- **Latency.** With one connection (no queueing) the median request takes {p50_b * 1000:.0f} µs "
        f"without and {p50_f * 1000:.0f} µs with the filter ({_signed((p50_f - p50_b) * 1000, 'µs')}); the "
        f"gateway then spends {ob:.0f} → {of:.0f} µs of CPU per request ({_signed(od, 'µs')}): without "
        f"batching, every request wakes the workers on its own and costs more CPU, with or without the "
        f"filter. Under the "
        f"16-connection load the percentiles grow with the throughput ratio, as a closed loop must. The p99 "
        f"of a short one-connection run rests on a few dozen requests and follows scheduling hiccups of the "
        f"shared machine (per run, without then with the filter: {p99s} ms): do not read its ratio.",
        f"- **Noise.** Runs of the same variant differ by up to {noisy * 100:.0f} % in requests/s (a 2-core VM; "
        f"processes outside the benchmark took up to {others * 100:.0f} % of a CPU during a run); CPU per "
        f"request is steadier. Between two runs of the benchmark, absolute numbers can move together (the "
        f"host's own load is invisible from inside the VM); the ratios and differences within one run are "
        f"what it is for. Compared with the latency of a real OpenAI "
        f"request (tens of milliseconds to minutes, over TLS), the filter's warm path is negligible; it matters "
        f"for the CPU budget of a gateway serving many thousands of requests per second.",
    ])


def cold(c) -> str:
    exchanges = set(c.exchanges) | set(c.filter_exchanges)
    cold_ms, warm_ms = statistics.median(c.cold_s) * 1000, statistics.median(c.warm_s) * 1000
    direct = statistics.median(c.direct_exchange_s) * 1000
    waited = statistics.median(c.paused)
    return "\n".join([
        f"- **Single flight holds.** Every cold burst of {c.n} made exactly "
        f"{'one token exchange' if exchanges == {1} else 'these token exchanges: ' + str(sorted(exchanges))} "
        f"(counted by the token endpoint and by the filter), while a median of {waited:.0f} of the {c.n} "
        f"requests found no token and waited for it.",
        f"- **Cold cost.** The cold burst took {cold_ms:.0f} ms against {warm_ms:.0f} ms once cached "
        f"(×{c.ratio:.2f}, {_signed(cold_ms - warm_ms, 'ms')}). " + (
            f"That is within the spread of the cached bursts ({min(c.warm_s) * 1000:.0f}–{max(c.warm_s) * 1000:.0f} "
            f"ms): the one exchange (≈{direct:.1f} ms at the Python token endpoint when called directly) and "
            f"the resumption of the waiting requests take less time than the gateway and the Python client "
            f"need to answer and read {c.n} requests, so a cold identity is not measurably slower here. "
            if cold_ms <= max(c.warm_s) * 1000 else
            f"The extra time is one exchange at the Python token endpoint (≈{direct:.1f} ms when called "
            f"directly, longer while it shares the two cores with the burst) and, for requests paused on the "
            f"worker that did not run the exchange, up to one 10 ms tick of their root context before they "
            f"resume. ") +
        f"Both times include the Python client reading {c.n} responses; compare the ratio, not the absolute "
        f"milliseconds. A real token endpoint over the internet adds its own round trip, once per identity "
        f"and token lifetime.",
        f"- Per-burst times vary (cold: {', '.join(f'{v * 1000:.0f}' for v in c.cold_s)} ms); the medians "
        f"are what the table shows.",
    ])


def identities(c) -> str:
    ratio = c.subject.median("rps") / c.reference.median("rps")
    cpu = c.subject.median("cpu_us") / c.reference.median("cpu_us")
    noise = max(0.05, _spread(c.reference), _spread(c.subject))
    if abs(1 - ratio) <= noise:
        verdict = (f"No measurable difference: {c.subject.label} run at {ratio:.2f}× the requests/s of "
                   f"{c.reference.label} (CPU per request ×{cpu:.2f}), within the run-to-run noise "
                   f"(±{noise * 100:.0f} %)")
    else:
        verdict = (f"{c.subject.label} run at {ratio:.2f}× the requests/s of {c.reference.label} (CPU per "
                   f"request ×{cpu:.2f}), more than the run-to-run noise (±{noise * 100:.0f} %)")
    return (f"- **Many identities.** {verdict}. A warm request reads the few slots of the cache table its "
            f"identity may live in (found from a hash of its token), whatever the number of identities cached. "
            f"(Both variants build every request in Lua, so their requests/s are not comparable with those of "
            f"scenario 1.)")


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
    parts = []
    if results.warm_header is not None and results.warm_gateway is not None and results.one_connection is not None:
        parts.append(warm_paths(results.warm_header, results.warm_gateway, results.one_connection))
    if results.cold is not None:
        parts.append(cold(results.cold))
    if results.identities is not None:
        parts.append(identities(results.identities))
    if results.memory is not None:
        parts.append(memory(results.memory))
    return "\n".join(parts)
