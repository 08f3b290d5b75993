"""What the numbers were measured on: CPUs, kernel, Envoy, wrk, Python, the filter module."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tests.harness import envoy_binary, module_path

from . import wrk

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Machine:
    cpus: int
    cpu_model: str
    kernel: str
    memory_gib: float
    envoy: str
    wrk: str
    python: str
    module: str
    commit: str
    date: str


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _envoy_version() -> str:
    completed = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=False)
    text = completed.stdout.strip().split("version:", 1)[-1].strip()
    parts = text.split("/")
    return f"Envoy {parts[1]} ({'/'.join(parts[2:])}, {parts[0][:12]})" if len(parts) > 2 else text or "unknown"


def _git(*args) -> str:
    completed = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
    return completed.stdout.strip()


def _commit() -> str:
    head = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")
    return head + (" (with uncommitted changes in src/)" if dirty else "")


def stale_module() -> bool:
    """True when a source file of the filter changed after the module was built."""
    sources = [REPO / "Cargo.toml", REPO / "Cargo.lock", *(REPO / "src").rglob("*.rs")]
    newest = max((p.stat().st_mtime for p in sources if p.exists()), default=0.0)
    return module_path().stat().st_mtime < newest


def _module() -> str:
    path = module_path()
    data = path.read_bytes()
    built = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}, {len(data) // 1024} KiB, "
            f"sha256 {hashlib.sha256(data).hexdigest()[:16]}…, built {built}"
            + (" (older than the sources in src/: not built from this tree)" if stale_module() else ""))


def describe() -> Machine:
    return Machine(
        cpus=len(os.sched_getaffinity(0)),
        cpu_model=_cpu_model(),
        kernel=f"{platform.system()} {platform.release()}",
        memory_gib=_memory_gib(),
        envoy=_envoy_version(),
        wrk=wrk.version(),
        python=f"Python {sys.version.split()[0]}",
        module=_module(),
        commit=_commit(),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
