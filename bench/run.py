"""`make bench` / `python -m bench.run`: run every benchmark and (re)write BENCHMARKS.md.

Builds the no-op Wasm floor (bench/floor/), starts the stand-ins, a fast upstream Envoy and the
gateways (the filter and its peers: floor, native, static; see bench.peers) on loopback, measures
each scenario (bench.scenarios), and writes the report only if every measured run was valid: any
failed request, cache miss or unexpected token exchange in a measured run, a cold burst with other
than one exchange, or memory that keeps growing with the number of identities, makes the whole
benchmark fail (exit status 1) and leaves BENCHMARKS.md as it was. A goal that is not met does not
fail the run: the report says so. `--only` runs some scenarios and prints their
sections instead of writing the report.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from tests.harness import EnvoyError, ModuleMissing, module_path

from . import floor, machine, report, scenarios, wrk
from .load import Load
from .testbed import BenchError, Testbed

DEFAULT_OUT = machine.REPO / "BENCHMARKS.md"
SCENARIOS = ("warm-header", "warm-header-c1", "warm-kubernetes", "warm-callers", "identities", "breakdown", "cold",
             "refresh", "memory")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="alternating runs per variant (default 3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load before each run (default 2)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--burst", type=int, default=scenarios.COLD_BURST,
                        help=f"requests per cold single-flight burst (default {scenarios.COLD_BURST})")
    parser.add_argument("--bursts", type=int, default=10, help="cold single-flight repetitions (default 10)")
    parser.add_argument("--identities", type=int, default=100, help="identities in the many-identities run (default 100)")
    parser.add_argument("--memory-table", type=int, default=scenarios.DEFAULT_MAX_IDENTITIES,
                        help="max_identities in the memory run; it sends 1, 2.5, 5 and 10 times as many new "
                             "identities (default 10000, the filter's default)")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="SCENARIO",
                        help=f"run only this scenario (repeatable; one of {', '.join(SCENARIOS)}) and print its "
                             f"section instead of writing the report")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report to write (default BENCHMARKS.md)")
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (1 repetition of 2 s, memory with max_identities 1000); prints the "
                             "report instead of writing it")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.duration, args.warmup, args.bursts = 1, 2.0, 1.0, 1
        args.memory_table = min(args.memory_table, 1000)
    if (args.quick or args.only) and "--out" not in (argv or []):
        args.out = None
    return args


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raises this process's open-file limit (inherited by Envoy, wrk and the burst client) towards
    `wanted`, as far as the hard limit allows; returns the soft limit now in force. A cold burst of
    1000 connections needs ~1000 descriptors in the client and ~2000 in the gateway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def measure(args, workdir: Path) -> report.Results:
    with Testbed(workdir) as bed:
        load = Load(workdir, bed, connections=args.connections, duration_s=args.duration,
                    warmup_s=args.warmup, reps=args.reps)
        single = Load(workdir, bed, connections=1, duration_s=max(1.0, args.duration / 2),
                      warmup_s=min(1.0, args.warmup), reps=args.reps)
        short = Load(workdir, bed, connections=args.connections, duration_s=max(1.0, args.duration / 2),
                     warmup_s=min(1.0, args.warmup), reps=args.reps)
        wanted = set(args.only or SCENARIOS)
        results = report.Results()
        steps = {
            "warm-header": lambda: setattr(results, "warm_header", scenarios.warm_path_header(bed, load)),
            "warm-header-c1": lambda: setattr(results, "one_connection", scenarios.warm_path_header(
                bed, single, "Warm path, header source, one connection (latency without queueing)", "warm-header-c1")),
            "warm-kubernetes": lambda: setattr(results, "warm_gateway", scenarios.warm_path_gateway(bed, load)),
            "warm-callers": lambda: setattr(results, "warm_callers", scenarios.warm_path_callers(bed, load)),
            "identities": lambda: setattr(results, "identities", scenarios.many_identities(bed, load, args.identities)),
            "breakdown": lambda: setattr(results, "breakdown", scenarios.host_call_breakdown(bed, short)),
            "cold": lambda: setattr(results, "cold", scenarios.cold_single_flight(bed, args.burst, args.bursts)),
            "refresh": lambda: setattr(results, "refresh", scenarios.refresh_under_load(bed, workdir, args.connections)),
            # last: the stand-in keeps a record of each of its ~110 000 exchanges
            "memory": lambda: setattr(results, "memory", scenarios.memory(bed, args.memory_table)),
        }
        for name in SCENARIOS:
            if name in wanted:
                steps[name]()
                bed.release()  # idle gateways still tick: stop them before the next scenario
        return results


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    try:
        module_path()
        wrk.ensure_installed()
        files = raise_fd_limit()
        if files < 4 * args.burst:
            print(f"warning: only {files} open files allowed; a burst of {args.burst} may fail", flush=True)
        floor.module("floor")  # the no-op Wasm floor (bench/floor/), built by cargo if needed
        host = machine.describe()
        print(f"{host.cpus} CPUs ({host.cpu_model}), {host.envoy}, {host.wrk}", flush=True)
        if machine.stale_module():
            print("warning: the filter module is older than its sources; `make bench` builds it first", flush=True)
        with tempfile.TemporaryDirectory(prefix="openai-wif-bench-") as workdir:
            results = measure(args, Path(workdir))
    except (ModuleMissing, floor.FloorBuildError) as missing:
        print(f"error: {missing}")
        return 1
    except (BenchError, EnvoyError, wrk.WrkError) as error:
        print(f"\nINVALID: {error}\nThe benchmark failed; BENCHMARKS.md was not changed.")
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped")
        return 130
    elapsed = time.monotonic() - started
    text = report.render(results, host, args, elapsed)
    if args.out is None:
        print("\n" + text)
    else:
        args.out.write_text(text)
        print(f"\nwrote {args.out} ({elapsed:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
