"""The module that ships: cargo's output shrunk with Binaryen's wasm-opt (-Oz).

    python -m tools.wasm_opt target/wasm32-wasip1/release/openai_wif.wasm target/openai_wif.wasm

Istio pulls the module into every gateway and Envoy loads it into every VM, so its size matters;
wasm-opt takes a fifth off what rustc emits at opt-level "z". The module is what the tests run,
so the optimised module is the tested one.

wasm-opt comes from $WASM_OPT, the PATH, or the npm package `binaryen` (pinned below), installed
into .tools/ on first use when npm is there. Without any of them the module is cargo's, copied,
with a note: it still works, it is only larger. A stamp next to the output records the digest of
the input it was made from, so an unchanged build is not optimised twice.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BINARYEN = "binaryen@132.0.0"
TOOLS = REPO / ".tools"
# The features rustc's wasm32-wasip1 target emits; Envoy's V8 runs them all.
FEATURES = ["--enable-bulk-memory", "--enable-sign-ext", "--enable-mutable-globals",
            "--enable-nontrapping-float-to-int"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_wasm_opt() -> list[str] | None:
    """The command to run wasm-opt, installing the npm package if needed; None if there is none."""
    if os.environ.get("WASM_OPT"):
        return [os.environ["WASM_OPT"]]
    if shutil.which("wasm-opt"):
        return ["wasm-opt"]
    local = TOOLS / "node_modules" / "binaryen" / "bin" / "wasm-opt"
    if not local.exists() and shutil.which("npm") and shutil.which("node"):
        print(f"installing {BINARYEN} (wasm-opt) into {TOOLS.relative_to(REPO)}/", flush=True)
        subprocess.run(["npm", "install", "--prefix", str(TOOLS), "--no-save", "--no-audit", "--no-fund",
                        "--silent", BINARYEN], check=False, stdout=subprocess.DEVNULL)
    if local.exists() and shutil.which("node"):
        return ["node", str(local)]
    return None


def optimise(built: Path, module: Path) -> int:
    stamp = module.with_name(module.name + ".from")
    source = digest(built)
    if module.exists() and stamp.exists() and stamp.read_text().strip() == source:
        return 0
    command = find_wasm_opt()
    tmp = module.with_name(module.name + ".tmp")
    if command is None:
        print(f"note: wasm-opt not found (no $WASM_OPT, no wasm-opt on the PATH, no npm for {BINARYEN}): "
              f"{module} is cargo's output as is ({built.stat().st_size} bytes)", file=sys.stderr)
        shutil.copyfile(built, tmp)
    else:
        result = subprocess.run([*command, "-Oz", *FEATURES, str(built), "-o", str(tmp)],
                                capture_output=True, text=True)
        if result.returncode != 0 or not tmp.exists() or tmp.read_bytes()[:4] != b"\0asm":
            print(f"wasm-opt failed ({result.returncode}): {result.stderr.strip()[:2000]}", file=sys.stderr)
            tmp.unlink(missing_ok=True)
            return 1
        print(f"wasm-opt -Oz: {built} ({built.stat().st_size} bytes) -> {module} "
              f"({tmp.stat().st_size} bytes)")
    os.replace(tmp, module)
    stamp.write_text(source + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    sys.exit(optimise(Path(sys.argv[1]), Path(sys.argv[2])))
