"""The peers every warm table shows next to the filter, each on the same gateway rendering.

    filter   the openai-wif module (`tools.envoy_config.render("local", source, ...)`, as shipped)
    floor    the same rendering with the no-op Wasm floor (bench/floor/) in the filter's place: sets
             `authorization` from its configuration and removes the subject header, nothing else
    native   the same rendering without Wasm, with Envoy's `envoy.filters.http.credential_injector`
             and `envoy.http.injected_credentials.oauth2` (client credentials grant against the token
             stand-in through the `openai_auth` cluster, client secret from a file-based SDS generic
             secret); the route removes the subject header
    static   the same rendering without Wasm; the route sets a static `authorization` with
             `request_headers_to_add` and removes the subject header with `request_headers_to_remove`

Every variant gets the identical request from the client; the upstream answers 401 to a request
without `Authorization: Bearer …` and 400 to one that still has the subject header.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.harness import bootstrap_parts
from tools.envoy_config import AUTH_CLUSTER, SUBJECT_HEADER

from . import floor
from .standin import CLIENT_ID, CLIENT_SECRET
from .testbed import STATIC_KEY

ROLES = ("filter", "floor", "native", "static")
NATIVE_SECRET = "bench_native_client_secret"
NATIVE_FILTER = "envoy.filters.http.credential_injector"


def _api_route(bootstrap: dict) -> dict:
    hcm, _ = bootstrap_parts(bootstrap)
    host = next(h for h in hcm["route_config"]["virtual_hosts"] if h["name"] == "openai_api")
    return host["routes"][0]


def _remove_subject_header(route: dict):
    removed = route.setdefault("request_headers_to_remove", [])
    if SUBJECT_HEADER not in removed:
        removed.append(SUBJECT_HEADER)


def static_patch(bootstrap: dict):
    route = _api_route(bootstrap)
    route["request_headers_to_add"] = [{"header": {"key": "authorization", "value": STATIC_KEY},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    _remove_subject_header(route)


def write_native_secret(directory: Path) -> Path:
    """The SDS file with the native peer's client secret (a generic secret, as a mounted Secret)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "client-secret.yaml"
    path.write_text(yaml.safe_dump({"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": NATIVE_SECRET, "generic_secret": {"secret": {"inline_string": CLIENT_SECRET}}}]}))
    return path


def native_patch(secret_file: Path):
    def patch(bootstrap: dict):
        hcm, clusters = bootstrap_parts(bootstrap)
        bootstrap.setdefault("node", {"id": "openai_egress", "cluster": "openai_egress"})  # SDS needs them
        if AUTH_CLUSTER not in clusters:
            raise ValueError(f"the rendering has no {AUTH_CLUSTER} cluster for the native peer's token endpoint")
        injector = {"name": NATIVE_FILTER, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "overwrite": True,
            "credential": {"name": "envoy.http.injected_credentials.oauth2", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.oauth2.v3.OAuth2",
                "token_endpoint": {"uri": "http://auth.openai.com/oauth/token", "cluster": AUTH_CLUSTER,
                                   "timeout": "5s"},
                "client_credentials": {"client_id": CLIENT_ID, "client_secret": {
                    "name": NATIVE_SECRET,
                    "sds_config": {"resource_api_version": "V3",
                                   "path_config_source": {"path": str(secret_file)}}}},
            }},
        }}
        hcm["http_filters"].insert(len(hcm["http_filters"]) - 1, injector)  # before the router
        _remove_subject_header(_api_route(bootstrap))
    return patch


def gateways(bed, source: str, tag: str = "", filter_settings: dict | None = None, filter_module: bool = True,
             roles=ROLES, **rendering) -> dict:
    """role -> started gateway (tests.harness.Stack) for `source`; rendering: more parameters of
    tools.envoy_config.render shared by every role (e.g. forward_client_cert)."""
    prefix = f"{tag}-" if tag else ""
    stacks = {}
    for role in roles:
        if role == "filter":
            stacks[role] = bed.gateway(source, variant=f"{prefix}filter", filter_settings=filter_settings,
                                       **rendering)
        elif role == "floor":
            stacks[role] = floor_gateway(bed, source, "floor", tag, **rendering)
        elif role == "native":
            secret = write_native_secret(bed.workdir / "native-secret")
            stacks[role] = bed.gateway(source, with_filter=False, variant=f"{prefix}native",
                                       bootstrap_patch=native_patch(secret), **rendering)
        elif role == "static":
            stacks[role] = bed.gateway(source, with_filter=False, variant=f"{prefix}static",
                                       bootstrap_patch=static_patch, **rendering)
        else:
            raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    return stacks


def floor_gateway(bed, source: str, variant: str = "floor", tag: str = "", **rendering):
    """A gateway with one floor variant (bench.floor.VARIANTS) where the filter would be."""
    prefix = f"{tag}-" if tag else ""
    return bed.gateway(source, variant=f"{prefix}floor-{variant}", module=str(floor.module(variant)),
                       filter_config=floor.config(STATIC_KEY, SUBJECT_HEADER), **rendering)
