"""Drive a real Envoy in tests: `Envoy` (one process), `Stack` (stand-ins plus a gateway)."""

from .envoy import Envoy, EnvoyError, Response, envoy_binary, http_request
from .stack import MODULE, ModuleMissing, Stack, default_filter_config, module_path

__all__ = ["Envoy", "EnvoyError", "Response", "envoy_binary", "http_request", "MODULE", "ModuleMissing", "Stack",
           "default_filter_config", "module_path"]
