"""What the benchmarks run against: the stand-ins, a fast upstream, and gateways with and without the filter.

    with Testbed(workdir) as bed:
        filtered = bed.gateway("header")                    # the filter, header source
        plain = bed.gateway("header", with_filter=False)    # the same configuration without it

Every gateway is `tests.harness.Stack`: `tools.envoy_config.render("local", source, ...)`, with
`--concurrency 2`, its `openai_api` cluster pointed at the fast upstream (bench.upstream) and its
`openai_auth` cluster at the Python OpenAI stand-in (used only when a token is exchanged; here it
also grants client credentials to Envoy's native peer, see bench.standin and bench.peers). Access
logs are off in every variant (they would cost the same in all and only add noise).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from tests.harness import Envoy, Stack
from tests.standins import Standins

from . import standin, upstream

HOST = "api.openai.com"
PATH = "/v1/models"
STATIC_KEY = "Bearer sk-bench-static-key"  # what a client without the filter sends


class BenchError(RuntimeError):
    pass


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all processes of the machine spent in user and system mode so far (all CPUs)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


class Testbed:
    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.standins: Standins | None = None
        self.upstream: Envoy | None = None
        self.stacks: dict = {}

    def start(self) -> "Testbed":
        standins = Standins(self.workdir / "standins")
        standins.openai = standin.install(standins)  # the token stand-in, also granting client credentials
        try:
            self.standins = standins.start()
        except BaseException:
            standins.stop_all()
            raise
        self.upstream = Envoy(upstream.render(), self.workdir / "upstream", log_level="warning", name="upstream",
                              concurrency=1).start()
        return self

    def stop(self):
        for stack in self.stacks.values():
            stack.stop()
        self.stacks = {}
        if self.upstream is not None:
            self.upstream.stop()
            self.upstream = None
        if self.standins is not None:
            self.standins.stop_all()
            self.standins = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def openai(self):
        """The Python OpenAI stand-in (token endpoint): counts the exchanges."""
        return self.standins.openai

    def gateway(self, source: str, with_filter: bool = True, variant: str | None = None, **options) -> Stack:
        """A started gateway for source (started once, then reused).

        variant names a gateway of its own, started with options (more arguments of
        tests.harness.Stack, e.g. filter_settings or bootstrap_patch)."""
        key = (source, with_filter, variant)
        if key not in self.stacks:
            name = f"{source}-{variant or ('filter' if with_filter else 'baseline')}"
            stack = Stack(source, self.workdir / name, standins=self.standins, with_filter=with_filter,
                          log_level="warning", name="gateway", api_port=self.upstream.port, access_log=False,
                          **options)
            self.stacks[key] = stack.start()
        return self.stacks[key]

    def release(self):
        """Stops every gateway (between scenarios: idle gateways still tick and flush stats)."""
        for stack in self.stacks.values():
            stack.stop()
        self.stacks = {}

    def stop_gateway(self, stack: Stack):
        """Stops one gateway now (it is not reused)."""
        for key, started in list(self.stacks.items()):
            if started is stack:
                del self.stacks[key]
        stack.stop()

    def own_cpu_seconds(self) -> float:
        """CPU time of everything the benchmark runs: this process (with the stand-ins), its finished
        children (wrk, burst clients) and every Envoy it started."""
        pids = [self.upstream.process.pid] + [s.envoy.process.pid for s in self.stacks.values() if s.envoy.process]
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(cpu_seconds(pid) for pid in pids) + sum(u.ru_utime + u.ru_stime for u in usage)

    def subject_token(self, name: str) -> str:
        """A subject token (header source) for one workload identity, valid for an hour."""
        return self.standins.subject_token(f"system:serviceaccount:default:{name}")

    def warm(self, stack: Stack, headers: dict | None = None, timeout_s: float = 15.0):
        """Wait until a request through stack succeeds (for the filter: its token is cached)."""
        deadline = time.monotonic() + timeout_s
        while True:
            response = stack.request("GET", PATH, host=HOST, headers=headers)
            if response.status == 200:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{stack.source} gateway never answered 200 while warming up: {response!r}\n"
                                 f"{stack.envoy.log_tail(20)}")
            time.sleep(0.1)
