"""The stand-ins plus an Envoy gateway in front of them, for one subject-token source.

    stack = Stack("kubernetes", workdir).start()
    stack.request("GET", "/v1/models")          # through the gateway, Host api.openai.com
    stack.openai.exchanges, stack.envoy.stats()
    stack.stop()

The Envoy configuration is `tools.envoy_config.render("local", source, ...)`: the same template as
the shipped production configurations, pointed at the stand-ins. The filter configuration defaults to
the stand-ins' provider and service account for that source and can be replaced or amended.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from tests.standins import AZURE_RESOURCE, OPENAI_AUDIENCE, Standins
from tools import envoy_config

from .envoy import Envoy, EnvoyError

REPO = Path(__file__).resolve().parent.parent.parent
MODULE = REPO / "target" / "openai_wif.wasm"

# The stand-ins' name for the platform behind each subject-token source.
PLATFORM = {"header": "header", "kubernetes": "k8s", "gcp_metadata": "gcp", "azure_imds": "azure", "spiffe": "spiffe"}


class ModuleMissing(RuntimeError):
    pass


def module_path() -> Path:
    """The built filter (OPENAI_WIF_MODULE overrides the default build output)."""
    path = Path(os.environ.get("OPENAI_WIF_MODULE") or MODULE)
    if not path.is_file():
        raise ModuleMissing(f"the filter module {path} does not exist: run `make build` first")
    return path


def default_filter_config(source: str, standins: Standins, hosts=None, **settings) -> dict:
    """The filter configuration that the stand-ins accept for this source.

    settings: `subject` (fields of subject_token), `token_endpoint` (fields), or top-level fields.
    """
    wiring = standins.wiring[PLATFORM[source]]
    subject = {
        "gcp_metadata": {"audience": OPENAI_AUDIENCE},
        "azure_imds": {"resource": AZURE_RESOURCE},
        "spiffe": {"audience": OPENAI_AUDIENCE},
    }.get(source, {})
    subject.update(settings.pop("subject", None) or {})
    if hosts is None:
        hosts = envoy_config.params("local").api_hosts
    return envoy_config.filter_config(source, wiring.identity_provider_id, wiring.service_account_id,
                                      hosts=hosts, subject=subject, **settings)


class Stack:
    def __init__(self, source: str, workdir, standins: Standins | None = None, filter_config: dict | None = None,
                 filter_settings: dict | None = None, log_level: str = "info", name: str = "envoy",
                 with_filter: bool = True, bootstrap_patch=None, **overrides):
        """source: a subject-token source (tools.envoy_config.SOURCES).
        standins: shared stand-ins (not stopped by stop()); None: start own ones.
        filter_config: the whole filter configuration; filter_settings: amendments to the default one.
        with_filter: False renders the gateway without the filter (tests of the routing alone).
        bootstrap_patch: a function that changes the rendered bootstrap (a dict) in place, for
        Envoy settings the template does not have (e.g. HTTP/1 trailers); see bootstrap_parts().
        overrides: more parameters of tools.envoy_config.render("local", ...)."""
        if source not in envoy_config.SOURCES:
            raise ValueError(f"unknown source {source!r}; one of {envoy_config.SOURCES}")
        self.source = source
        self.workdir = Path(workdir)
        self.standins = standins
        self._own_standins = standins is None
        self._filter_config = filter_config
        self._filter_settings = dict(filter_settings or {})
        self.log_level = log_level
        self.name = name
        self.with_filter = with_filter
        self.bootstrap_patch = bootstrap_patch
        self.overrides = overrides
        self.filter_config: dict | None = None
        self.config_yaml: str | None = None
        self.envoy: Envoy | None = None

    @property
    def openai(self):
        return self.standins.openai

    def render(self) -> str:
        standins = self.standins
        if self._filter_config is not None:
            self.filter_config = copy.deepcopy(self._filter_config)
        else:
            self.filter_config = default_filter_config(self.source, standins, **copy.deepcopy(self._filter_settings))
        parameters = {
            "openai_port": standins.openai.port,
            "gcp_metadata_port": standins.gcp.port,
            "azure_imds_port": standins.azure.port,
            "spiffe_socket": standins.spiffe.socket_path,
            "token_dir": standins.token_dir.root,
            "module": str(module_path()) if self.with_filter else None,
            "filter_config": self.filter_config,
        }
        parameters.update(self.overrides)
        text = envoy_config.render("local", self.source, **parameters)
        if self.bootstrap_patch is None:
            return text
        bootstrap = yaml.safe_load(text)
        self.bootstrap_patch(bootstrap)
        return yaml.safe_dump(bootstrap, sort_keys=False, width=4096)

    def start(self) -> "Stack":
        if self.with_filter:
            module_path()  # fail before starting anything
        try:
            if self.standins is None:
                self.standins = Standins.start_all(self.workdir / "standins")
            self.envoy = self._start_envoy()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_envoy(self, attempts: int = 3) -> Envoy:
        """Renders and starts Envoy. A free port chosen at render time (the token-file listener's)
        can be taken by another process before Envoy binds it; then render again, with a new port."""
        for attempt in range(attempts):
            self.config_yaml = self.render()
            try:
                return Envoy(self.config_yaml, self.workdir, log_level=self.log_level, name=self.name).start()
            except EnvoyError as error:
                if "Address already in use" not in str(error) or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self):
        if self.envoy is not None:
            self.envoy.stop()
        if self._own_standins and self.standins is not None:
            self.standins.stop_all()
            self.standins = None

    def restart_envoy(self) -> Envoy:
        """A fresh Envoy (empty cache) with the same configuration."""
        self.envoy.stop()
        self.envoy = Envoy(self.config_yaml, self.workdir, log_level=self.log_level, name=self.name).start()
        return self.envoy

    def request(self, method: str, path: str, host: str | None = "api.openai.com", headers: dict | None = None,
                body=None, timeout: float = 10.0, tls=None):
        return self.envoy.request(method, path, host, headers, body, timeout, tls=tls)

    def burst(self, n: int, *args, **kwargs):
        return self.envoy.burst(n, *args, **kwargs)

    def stats(self, prefix: str = "wasmcustom.openai_wif") -> dict:
        return self.envoy.stats(prefix)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def bootstrap_parts(bootstrap: dict, listener: str = envoy_config.GATEWAY_LISTENER):
    """(the listener's HttpConnectionManager config, {cluster name: cluster}) of a bootstrap dict,
    for a bootstrap_patch to change."""
    resources = bootstrap["static_resources"]
    chosen = next(item for item in resources["listeners"] if item["name"] == listener)
    hcm = next(f["typed_config"] for f in chosen["filter_chains"][0]["filters"]
               if f["name"] == "envoy.filters.network.http_connection_manager")
    return hcm, {cluster["name"]: cluster for cluster in resources["clusters"]}
