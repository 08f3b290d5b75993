# openai-wif: keyless OpenAI access for Envoy and Istio meshes.
# `make help` lists the targets.

SHELL        := bash
.SHELLFLAGS  := -eu -o pipefail -c
TARGET       := wasm32-wasip1
BUILT        := target/$(TARGET)/release/openai_wif.wasm
MODULE       := target/openai_wif.wasm
VENV         := .venv
PY           := $(VENV)/bin/python
STAMP        := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: setup
setup: $(STAMP) ## Install what the build and tests need (wasm target, Python venv with Envoy)
	@rustup target list --installed | grep -qx $(TARGET) || rustup target add $(TARGET)
	@command -v skopeo >/dev/null || (apt-get update -qq && apt-get install -y -qq skopeo >/dev/null) \
	  || echo "note: skopeo (Debian package) is missing; the OCI image check in make validate needs it"

$(STAMP): tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r tests/requirements.txt
	touch $@

.PHONY: build
build: setup ## Build the filter: target/openai_wif.wasm (cargo, then wasm-opt -Oz)
	cargo build --release --target $(TARGET)
	$(PY) -m tools.wasm_opt $(BUILT) $(MODULE)
	@ls -l $(MODULE)

.PHONY: demo
demo: build ## Run the gateway against local stand-ins and call it with the OpenAI SDK
	$(PY) -m tools.demo

.PHONY: lint
lint: setup ## cargo fmt --check and clippy -D warnings
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --release --target $(TARGET) -- -D warnings

.PHONY: unit
unit: setup ## Unit tests of the pure logic, on the host and again as wasm32-wasip1 under wasmtime
	cargo test
	CARGO_TARGET_WASM32_WASIP1_RUNNER="$(PY) tools/wasm_runner.py" cargo test --target $(TARGET)

.PHONY: check
check: ## Run the subject checks on a token: make check CONFIG=filter.json TOKEN=token [JWKS=jwks.json]
	@test -n "$(CONFIG)" -a -n "$(TOKEN)" || { echo "usage: make check CONFIG=filter.json TOKEN=token [JWKS=jwks.json] [NOW=unix_seconds]"; exit 2; }
	@cargo run --quiet --bin openai-wif-check -- --config "$(CONFIG)" --token-file "$(TOKEN)" \
	  $(if $(JWKS),--jwks-file "$(JWKS)") $(if $(NOW),--now "$(NOW)")

.PHONY: validate
validate: build ## Offline checks: Envoy configs, Istio manifests, OCI image layout
	$(PY) -m tools.validate

.PHONY: image
image: build ## Write the OCI image layout for Istio's WasmPlugin to target/oci-image
	$(PY) -m tools.oci_image --module $(MODULE) --out target/oci-image

.PHONY: fuzz
fuzz: setup ## Fuzz every parser with a million inputs per target (make test runs a short pass)
	OPENAI_WIF_FUZZ_ITERATIONS=1000000 cargo test --release --test fuzz -- --nocapture --test-threads 1

.PHONY: bench
bench: build ## Benchmarks: the filter against a no-op Wasm floor, Envoy's native peer and a static header; writes BENCHMARKS.md
	$(PY) -m bench.run

.PHONY: pin
pin: build ## Pin the WasmPlugins in istio/ to the image built from this module
	$(PY) -m tools.oci_image --module $(MODULE) --out target/oci-image --pin istio

.PHONY: e2e
e2e: build ## End-to-end tests through a real Envoy
	$(PY) -m pytest -q tests

.PHONY: test
test: lint unit validate e2e ## Everything CI runs
