"""Drive a real Envoy in tests: `Envoy` (one process), `Stack` (stand-ins plus a gateway)."""

from .envoy import (Envoy, EnvoyError, RawConnection, Response, encode_chunks, encode_request, envoy_binary,
                    http_request, raw_request)
from .stack import MODULE, ModuleMissing, Stack, bootstrap_parts, default_filter_config, module_path
from .tls import CertFiles, TestCA

__all__ = ["Envoy", "EnvoyError", "RawConnection", "Response", "encode_chunks", "encode_request", "envoy_binary",
           "http_request", "raw_request", "MODULE", "ModuleMissing", "Stack", "bootstrap_parts",
           "default_filter_config", "module_path", "CertFiles", "TestCA"]
