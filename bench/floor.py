"""The no-op Wasm floor (bench/floor/): built here, one module per variant.

`floor` is the least a proxy-wasm HTTP filter can do for this job: set `authorization` from its
plugin configuration and remove the subject-token header. Every other variant is the floor plus one
host call that the filter makes per request (a cargo feature of the same source file), so the
difference between a variant and the floor, measured in the same run, is the price of that call.
`all_calls` makes every one of them.

    path = floor.module("floor")          # builds if needed, returns target/bench-floor/variants/floor.wasm
    floor.config(token, header)           # its plugin configuration (a dict, rendered as JSON)
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tools import wasm_opt

from .machine import REPO

SOURCE = REPO / "bench" / "floor"
TARGET_DIR = REPO / "target" / "bench-floor"
OUT_DIR = TARGET_DIR / "variants"
TRIPLE = "wasm32-wasip1"

# variant -> (cargo features, what the extra host call is); the floor itself has none.
VARIANTS = {
    "floor": ((), "the floor: set `authorization`, remove the subject header"),
    "authority": (("authority",), "read `:authority` (`get_header_map_value`)"),
    "subject": (("subject",), "read the subject-token header (`get_header_map_value`, ~640 bytes)"),
    "shared_data": (("shared_data",), "`get_shared_data` of a 300-byte record"),
    "property": (("property",), "`get_property([\"xds\", \"cluster_name\"])`"),
    "counter": (("counter",), "increment a counter (`increment_metric`)"),
    "filter_state": (("filter_state",), "set filter state (`set_property([\"openai_wif.identity\"])`)"),
    "remove_authorization": (("remove_authorization",), "remove `authorization` before setting it"),
}
CALLS = tuple(name for name in VARIANTS if name != "floor")
VARIANTS["all_calls"] = (tuple(f for name in CALLS for f in VARIANTS[name][0]), "the floor plus every call above")


class FloorBuildError(RuntimeError):
    pass


def _newest_source() -> float:
    files = [SOURCE / "Cargo.toml", SOURCE / "Cargo.lock", *(SOURCE / "src").rglob("*.rs")]
    return max(p.stat().st_mtime for p in files if p.exists())


def module(variant: str = "floor") -> Path:
    """The module of one variant, built with cargo unless it is newer than bench/floor/."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown floor variant {variant!r}; one of {', '.join(VARIANTS)}")
    out = OUT_DIR / f"{variant}.wasm"
    if out.is_file() and out.stat().st_mtime >= _newest_source():
        return out
    features = VARIANTS[variant][0]
    command = ["cargo", "build", "--quiet", "--release", "--target", TRIPLE, "--manifest-path",
               str(SOURCE / "Cargo.toml"), "--target-dir", str(TARGET_DIR)]
    if features:
        command += ["--features", ",".join(features)]
    completed = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if completed.returncode != 0:
        raise FloorBuildError(f"building the floor module ({variant}) failed:\n{completed.stderr[-3000:]}")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    # Shrunk like the filter's module (tools.wasm_opt), so both run code made the same way.
    if wasm_opt.optimise(TARGET_DIR / TRIPLE / "release" / "bench_floor.wasm", out) != 0:
        raise FloorBuildError(f"wasm-opt failed on the floor module ({variant})")
    return out


def build_all(variants=None) -> dict:
    """variant -> module path, every one built (a few seconds each the first time)."""
    return {name: module(name) for name in (variants or VARIANTS)}


def config(authorization: str, header: str) -> dict:
    """The floor's plugin configuration: the whole `authorization` value and the header to remove."""
    return {"authorization": authorization, "header": header}
