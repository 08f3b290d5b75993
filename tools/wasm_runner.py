"""Runs a wasm32-wasip1 test binary under wasmtime: cargo's runner for `make unit`.

    CARGO_TARGET_WASM32_WASIP1_RUNNER="python tools/wasm_runner.py" cargo test --target wasm32-wasip1

The unit tests then run as the same WebAssembly the filter ships as (32-bit usize, wasm float
and integer semantics, WASI clock and random). Envoy's proxy-wasm imports are linked as traps:
the pure logic under test never calls the host.
"""

import sys

import wasmtime


def main(argv: list[str]) -> int:
    path, *args = argv
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [path, *args]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    store.set_wasi(wasi)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module.from_file(engine, path)
    linker.define_unknown_imports_as_traps(module)
    instance = linker.instantiate(store, module)
    try:
        instance.exports(store)["_start"](store)
    except wasmtime.ExitTrap as exit_:
        return exit_.code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
