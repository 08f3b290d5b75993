"""Benchmarks of the filter against the same Envoy gateway without it: `python -m bench.run`."""
