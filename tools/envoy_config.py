"""Every Envoy configuration of the project, rendered from one template.

The shipped examples under `envoy/` (profile `production`) and the gateways the tests and the demo
start (profile `local`) come from the same function, so they cannot drift apart: `local` differs
only in parameters (loopback addresses, plain HTTP instead of TLS, paths of the test module, token
directory and socket) and in one extra virtual host that proves the filter leaves other hosts alone.

    render(profile, source, **overrides) -> str    the bootstrap as YAML, with explanatory comments
    build(profile, source, **overrides) -> dict    the same bootstrap as a plain dict
    filter_config(source, ...) -> dict             the filter's JSON configuration

    python -m tools.envoy_config --write    regenerate the files under envoy/
    python -m tools.envoy_config --check    exit 1 if a file under envoy/ differs from its rendering
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import ipaddress
import json
import re
import socket
import sys
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ENVOY_DIR = REPO / "envoy"

PROFILES = ("production", "local")
SOURCES = ("header", "kubernetes", "gcp_metadata", "azure_imds", "spiffe")
# The gateway's own mTLS certificate as the credential (OpenAI's X.509 workload identity): no
# subject token and no identity-source cluster; the token endpoint and the API are reached over
# clusters that present the certificate (its own template branch, not in SOURCES).
X509_SOURCE = "x509"
ALL_SOURCES = SOURCES + (X509_SOURCE,)

# The identity-source cluster each gateway-identity source needs (the header source needs none).
SOURCE_CLUSTER = {
    "kubernetes": "wif_token_file",
    "gcp_metadata": "gcp_metadata",
    "azure_imds": "azure_imds",
    "spiffe": "spiffe_workload_api",
}

FILTER_NAME = "openai_wif"  # the HTTP filter's name: the key that per-route configs refer to
API_CLUSTER = "openai_api"
AUTH_CLUSTER = "openai_auth"
MTLS_API_CLUSTER = "openai_api_mtls"
MTLS_AUTH_CLUSTER = "openai_auth_mtls"
MTLS_AUTH_HOST = "mtls.auth.openai.com"
MTLS_API_HOSTS = ("mtls.api.openai.com", "mtls-us.api.openai.com", "mtls-eu.api.openai.com")
# Where the x509 source's certificate comes from: "files" (a mounted Secret, delivered by SDS from
# a file that Envoy watches) or "sds" (an SDS server: the SPIRE agent on its unix socket).
CLIENT_CERTIFICATE_SOURCES = ("files", "sds")
CLIENT_CERT_SECRET = "openai_client_certificate"  # the secret's name in the SDS file
SPIRE_SVID_SECRET = "default"  # the SPIRE agent's SDS name for the workload's own X.509-SVID
SDS_CLUSTER = "spire_agent_sds"
TOKEN_LISTENER = "wif_token_file"
# The token listener binds loopback only, on a port none of Istio's proxies use (Istio's: 15000,
# 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090).
TOKEN_ADDRESS = "127.0.0.1"
TOKEN_PORT = 15098
GATEWAY_LISTENER = "openai_egress"
ECHO_HOST = "other.example"
SUBJECT_HEADER = "x-openai-subject-token"
AUDIENCE = "https://api.openai.com/v1"
PLACEHOLDER_PROVIDER = "wip_REPLACE_ME"
PLACEHOLDER_ACCOUNT = "sa_REPLACE_ME"


@dataclasses.dataclass(frozen=True)
class Params:
    """Everything that differs between deployments. Profiles are sets of defaults for these."""

    listen_address: str = "0.0.0.0"
    listen_port: int = 10000
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    # :authority values routed to OpenAI.
    api_hosts: tuple = ("api.openai.com", "openai-egress.internal")
    # Which requests the filter authorises by default: "all" (every request on a route where the
    # filter is enabled: the route decides, so the filter cannot disagree with routing) or "hosts"
    # (those whose :authority is in api_hosts; the tests' default, to exercise host matching).
    filter_scope: str = "all"
    api_address: str = "api.openai.com"
    api_port: int = 443
    auth_address: str = "auth.openai.com"
    auth_port: int = 443
    upstream_tls: bool = True
    ca_file: str = "/etc/ssl/certs/ca-certificates.crt"
    gcp_metadata_address: str = "metadata.google.internal"
    gcp_metadata_port: int = 80
    azure_imds_address: str = "169.254.169.254"
    azure_imds_port: int = 80
    spiffe_socket: str = "/run/spire/agent.sock"
    token_dir: str = "/var/run/secrets/tokens"
    token_file: str = "token"
    # Port of the loopback listener that serves the token file (on TOKEN_ADDRESS); 0: a free port,
    # chosen when the configuration is rendered (tests run several Envoys side by side).
    token_port: int = TOKEN_PORT
    # The filter's module; None leaves the filter out (tests of the routing alone).
    module: str | None = "/etc/envoy/openai_wif.wasm"
    # The filter's configuration (a dict, serialised to JSON); None: the example with placeholders.
    filter_config: dict | None = None
    # Identity-source clusters to include; None: only the one the source needs.
    identity_clusters: tuple | None = None
    # A virtual host for this name routed to the OpenAI upstream's /echo/ with the filter enabled
    # (tests: proves that the filter passes requests for other hosts untouched). None: no such host.
    echo_host: str | None = None
    access_log: bool = True
    # mTLS on the gateway listener: Envoy terminates TLS with downstream_cert/downstream_key and
    # verifies a client certificate against downstream_ca (the filter's caller rules match its SPIFFE
    # ID). require_client_certificate=False also accepts a connection without a client certificate
    # (a certificate that is presented is still verified): the filter then refuses the request
    # itself, naming the missing certificate. False: plain HTTP.
    downstream_tls: bool = False
    downstream_cert: str = "/etc/envoy/tls/tls.crt"
    downstream_key: str = "/etc/envoy/tls/tls.key"
    downstream_ca: str = "/etc/envoy/tls/ca.crt"
    require_client_certificate: bool = True
    # The HTTP connection manager's forward_client_cert_details (None: Envoy's default, SANITIZE,
    # which removes an incoming x-forwarded-client-cert before any filter sees it). Behind a hop
    # that terminates mTLS and sets the header (with "caller_identity": "x-forwarded-client-cert"):
    # ALWAYS_FORWARD_ONLY. The header is never forwarded to OpenAI.
    forward_client_cert: str | None = None
    # Environment variables of the filter's VM (vm_config.environment_variables.key_values), e.g.
    # OPENAI_IDENTITY_PROVIDER_ID / OPENAI_SERVICE_ACCOUNT_ID; vm_env_keys: names passed through from
    # Envoy's own environment (host_env_keys).
    vm_env: dict | None = None
    vm_env_keys: tuple = ()
    # Which platform the comments talk about (only changes comments).
    platform: str | None = None
    # The x509 source. client_certificate: "files" or "sds" (CLIENT_CERTIFICATE_SOURCES).
    client_certificate: str = "files"
    # "files": the mounted Secret's directory (tls.crt: leaf then intermediates; tls.key), and the
    # SDS file that names them (sds_secret_file() renders it), in a directory of its own.
    client_cert_dir: str = "/var/run/secrets/openai-mtls"
    client_cert_sds_file: str = "/etc/envoy/sds/openai-client-certificate.yaml"
    # "sds": the secret's name at the SDS server (the SPIRE agent's default SVID: "default"); the
    # server is the SPIRE agent on spiffe_socket. None: CLIENT_CERT_SECRET for files, "default" for sds.
    client_cert_secret: str | None = None
    # The mTLS API host the route rewrites to (regional: mtls-us.api.openai.com, mtls-eu.api.openai.com),
    # and where the mTLS clusters connect (None: the host name itself; ports: api_port and auth_port).
    mtls_api_host: str = "mtls.api.openai.com"
    mtls_api_address: str | None = None
    mtls_auth_address: str | None = None


PROFILE_DEFAULTS = {
    "production": {},
    "local": {
        "listen_address": "127.0.0.1",
        "listen_port": 0,
        "admin_port": 0,
        "token_port": 0,
        "api_hosts": ("api.openai.com", "openai-egress.internal", "localhost", "127.0.0.1"),
        "filter_scope": "hosts",
        "api_address": "127.0.0.1",
        "auth_address": "127.0.0.1",
        "upstream_tls": False,
        "gcp_metadata_address": "127.0.0.1",
        "azure_imds_address": "127.0.0.1",
        "echo_host": ECHO_HOST,
        "mtls_api_address": "127.0.0.1",
        "mtls_auth_address": "127.0.0.1",
    },
}


def params(profile: str, **overrides) -> Params:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; one of {PROFILES}")
    values = dict(PROFILE_DEFAULTS[profile])
    # Shorthand for the local profile: one stand-in serves both the token endpoint and the API.
    if "openai_port" in overrides:
        port = overrides.pop("openai_port")
        values.update(api_port=port, auth_port=port)
    values.update(overrides)
    for name in ("api_hosts", "identity_clusters", "vm_env_keys"):
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    return Params(**values)  # an unknown override is a TypeError naming it


# ---------------------------------------------------------------------------------------------
# The filter's configuration


def subject_token(source: str, **settings) -> dict:
    """The `subject_token` section for a source, with the cluster names this module uses."""
    examples = {
        "header": {"source": "header", "header": SUBJECT_HEADER},
        "kubernetes": {"source": "kubernetes", "cluster": SOURCE_CLUSTER["kubernetes"], "path": "/token",
                       "authority": "localhost"},
        "gcp_metadata": {"source": "gcp_metadata", "cluster": SOURCE_CLUSTER["gcp_metadata"], "audience": AUDIENCE,
                         "authority": "metadata.google.internal"},
        "azure_imds": {"source": "azure_imds", "cluster": SOURCE_CLUSTER["azure_imds"],
                       "resource": "api://REPLACE_ME_APPLICATION_ID"},
        "spiffe": {"source": "spiffe", "cluster": SOURCE_CLUSTER["spiffe"], "audience": AUDIENCE},
        "x509": {"source": X509_SOURCE},
    }
    if source not in examples:
        raise ValueError(f"unknown subject token source {source!r}; one of {ALL_SOURCES}")
    section = dict(examples[source])
    section.update(settings)
    return {k: v for k, v in section.items() if v is not None}


def filter_config(source: str, identity_provider_id: str = PLACEHOLDER_PROVIDER,
                  service_account_id: str = PLACEHOLDER_ACCOUNT, hosts=("api.openai.com",),
                  subject: dict | None = None, token_endpoint: dict | None = None, scope: str = "hosts",
                  **extra) -> dict:
    """The filter's configuration (see the README): `subject` overrides fields of `subject_token`.
    scope "all" authorises every request the filter sees (no `hosts`); "hosts" lists `hosts`."""
    if source == X509_SOURCE:
        endpoint = {"cluster": MTLS_AUTH_CLUSTER, "authority": MTLS_AUTH_HOST}
    else:
        endpoint = {"cluster": AUTH_CLUSTER, "authority": "auth.openai.com"}
    endpoint.update({"path": "/oauth/token", "timeout_ms": 5000})
    endpoint.update(token_endpoint or {})
    config = {
        "identity_provider_id": identity_provider_id,
        "service_account_id": service_account_id,
        "subject_token": subject_token(source, **(subject or {})),
        "subject_token_type": "jwt",
        "token_endpoint": endpoint,
    }
    if source == X509_SOURCE:
        del config["subject_token_type"]  # the source's own (urn:openai:params:oauth:token-type:x509)
    if scope == "all":
        config["scope"] = "all"
    else:
        config["hosts"] = list(hosts)
    config.update(extra)
    return config


# ---------------------------------------------------------------------------------------------
# Comments inside generated YAML
#
# PyYAML cannot write comments, so a comment is a marker key (`__note_<n>__: null`) placed in a
# mapping right before the key it explains; render() turns markers into comment lines, build()
# drops them.

_NOTE_KEY = re.compile(r"^__note_(\d+)__$")
_NOTE_LINE = re.compile(r"^(?P<indent> *)(?P<dash>- )?__note_(?P<n>\d+)__: null$")


class _Notes:
    def __init__(self):
        self.texts: list = []

    def __call__(self, text: str) -> str:
        self.texts.append(textwrap.dedent(text).strip("\n"))
        return f"__note_{len(self.texts) - 1}__"


def _strip_notes(value):
    if isinstance(value, dict):
        return {k: _strip_notes(v) for k, v in value.items() if not (isinstance(k, str) and _NOTE_KEY.match(k))}
    if isinstance(value, list):
        return [_strip_notes(v) for v in value]
    return value


def _apply_notes(text: str, notes: _Notes) -> str:
    out: list = []
    dash_pending = None  # indentation of a "- " whose first key was a note
    for line in text.splitlines():
        match = _NOTE_LINE.match(line)
        if match:
            indent = match["indent"]
            for comment_line in notes.texts[int(match["n"])].splitlines():
                out.append(f"{indent}# {comment_line}".rstrip())
            if match["dash"]:
                dash_pending = indent
            continue
        if dash_pending is not None:
            line = dash_pending + "- " + line[len(dash_pending) + 2:]
            dash_pending = None
        out.append(line)
    return "\n".join(out) + "\n"


class _Literal(str):
    """A string written as a YAML literal block (the filter's JSON configuration stays readable)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Literal, lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|"))


# ---------------------------------------------------------------------------------------------
# Building blocks


def _typed(type_name: str, **fields) -> dict:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return False


def _socket(address: str, port: int) -> dict:
    return {"socket_address": {"address": address, "port_value": port}}


def _endpoints(name: str, address: dict) -> dict:
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]}


def _http_options(**options) -> dict:
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions":
            _typed("envoy.extensions.upstreams.http.v3.HttpProtocolOptions", **options)}


def _tls_socket_plain(host: str, ca_file: str) -> dict:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            sni=host,
            common_tls_context={
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "validation_context": {
                    "trusted_ca": {"filename": ca_file},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                },
            },
        ),
    }


def _client_certificate_sds(p: Params) -> dict:
    """tls_certificate_sds_secret_configs entry: the certificate the mTLS clusters present."""
    if p.client_certificate not in CLIENT_CERTIFICATE_SOURCES:
        raise ValueError(f"unknown client_certificate {p.client_certificate!r}; one of {CLIENT_CERTIFICATE_SOURCES}")
    if p.client_certificate == "files":
        directory = str(Path(p.client_cert_sds_file).parent)
        source = {"path_config_source": {"path": p.client_cert_sds_file, "watched_directory": {"path": directory}}}
        name = p.client_cert_secret or CLIENT_CERT_SECRET
    else:
        source = {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
                                        "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]}}
        name = p.client_cert_secret or SPIRE_SVID_SECRET
    return {"name": name, "sds_config": {"resource_api_version": "V3", **source}}


def sds_secret_file(cert_dir: str = Params.client_cert_dir, name: str = CLIENT_CERT_SECRET) -> str:
    """The SDS file of the "files" variant (Params.client_cert_sds_file): the secret `name` with the
    certificate chain and key of the mounted Secret in cert_dir. Envoy re-reads the pair when an
    entry is moved into cert_dir (kubelet's ..data swap on rotation), and the file itself when one
    is moved into its own directory."""
    directory = cert_dir.rstrip("/") or "/"
    secret = {"resources": [_typed(
        "envoy.extensions.transport_sockets.tls.v3.Secret", name=name,
        tls_certificate={"certificate_chain": {"filename": f"{directory}/tls.crt"},
                         "private_key": {"filename": f"{directory}/tls.key"},
                         "watched_directory": {"path": directory}})]}
    return yaml.dump(secret, Dumper=_Dumper, sort_keys=False, width=4096, default_flow_style=False)


def _tls_socket(host: str, ca_file: str, client_certificate: dict | None = None) -> dict:
    """Verified TLS to `host`; with client_certificate (an SDS secret config), mTLS presenting it."""
    socket = _tls_socket_plain(host, ca_file)
    if client_certificate:
        socket["typed_config"]["common_tls_context"] = {
            "tls_certificate_sds_secret_configs": [client_certificate],
            **socket["typed_config"]["common_tls_context"]}
    return socket


def _tcp_cluster(name: str, address: str, port: int, connect_timeout: str, tls_host: str | None,
                 ca_file: str, note=None, **extra) -> dict:
    """A cluster for one host:port: STATIC for an IP, LOGICAL_DNS for a name; TLS if tls_host."""
    cluster = {}
    if note:
        cluster[note] = None
    cluster.update({"name": name, "type": "STATIC" if _is_ip(address) else "LOGICAL_DNS",
                    "connect_timeout": connect_timeout})
    if not _is_ip(address):
        cluster.update({"dns_lookup_family": "V4_PREFERRED", "respect_dns_ttl": True})
    cluster["load_assignment"] = _endpoints(name, _socket(address, port))
    if tls_host:
        cluster["transport_socket"] = _tls_socket(tls_host, ca_file)
    cluster.update(extra)
    return cluster


# The gateway's access log: one JSON object per request on stdout. Who called (the verified peer
# certificate's URI SAN, and the caller, rule, OpenAI service account and identity the filter chose),
# what was asked (method, authority, path without the query string), and what came of it (status,
# Envoy's response code details, the filter's error code, whether the token came from the cache).
# Never a request or response header that can carry a credential (authorization, the subject-token
# header, x-forwarded-client-cert, cookies), and never the query string.
FILTER_STATE_FIELDS = ("caller", "rule", "service_account_id", "identity", "cache", "error")
ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%PATH(NQ:ORIG_OR_PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "response_flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "downstream": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    **{name: f"%FILTER_STATE(wasm.openai_wif.{name}:PLAIN)%" for name in FILTER_STATE_FIELDS},
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


def _access_log(note=None) -> list:
    logger = {"name": "envoy.access_loggers.stdout", "typed_config": _typed(
        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        log_format={"json_format": dict(ACCESS_LOG_FORMAT)})}
    if note:
        logger = {note: None, **logger}
    return [logger]


def _hcm(stat_prefix: str, route_config: dict, http_filters: list, access_log: bool, note=None,
         forward_client_cert: str | None = None) -> dict:
    config = {"stat_prefix": stat_prefix, "codec_type": "AUTO"}
    if access_log:
        config["access_log"] = _access_log(note("""\
            One JSON line per request: the caller (verified peer certificate), the rule, OpenAI service
            account and identity the filter used, the cache outcome, and the error code of a refusal,
            with status and path (no query string). Never a header that can carry a credential.""")
                                           if note else None)
    if forward_client_cert:
        config["forward_client_cert_details"] = forward_client_cert
    config.update({"route_config": route_config, "http_filters": http_filters})
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager", **config)}


def _router() -> dict:
    return {"name": "envoy.filters.http.router",
            "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}


def _domains(hosts) -> list:
    # Clients that address the gateway by host:port send the port in :authority; match both forms.
    result = []
    for host in hosts:
        result += [host, f"{host}:*"]
    return result


def _filter_disabled() -> dict:
    return {FILTER_NAME: _typed("envoy.config.route.v3.FilterConfig", disabled=True)}


def _error_json(message: str, code: str) -> str:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})


# ---------------------------------------------------------------------------------------------
# The bootstrap


def _vm_config(p: Params) -> dict:
    vm = {"vm_id": "openai_wif", "runtime": "envoy.wasm.runtime.v8", "code": {"local": {"filename": p.module}}}
    environment = {}
    if p.vm_env_keys:
        environment["host_env_keys"] = list(p.vm_env_keys)
    if p.vm_env:
        environment["key_values"] = {str(k): str(v) for k, v in p.vm_env.items()}
    if environment:
        vm["environment_variables"] = environment
    return vm


def _downstream_tls(p: Params) -> dict:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            require_client_certificate=p.require_client_certificate,
            common_tls_context={
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [{"certificate_chain": {"filename": p.downstream_cert},
                                      "private_key": {"filename": p.downstream_key}}],
                "validation_context": {"trusted_ca": {"filename": p.downstream_ca}},
            },
        ),
    }


def _wasm_filter(p: Params, config: dict, note) -> dict:
    return {
        note("""\
            The openai-wif filter. FAIL_RELOAD: if its VM dies, requests are refused (never passed on
            without credentials) while Envoy replaces the VM, instead of failing until a restart. With
            "scope": "all" it gives a token to every request on a route where it is enabled, and it is
            disabled on every other route, so it cannot disagree with routing. Its configuration is JSON
            (reference: README.md); replace the placeholder ids with your Workload Identity Provider
            (wip_...) and service account (sa_...)."""): None,
        "name": FILTER_NAME,
        "typed_config": _typed("envoy.extensions.filters.http.wasm.v3.Wasm", config={
            "name": "openai_wif",
            "root_id": "openai_wif",
            "failure_policy": "FAIL_RELOAD",
            "vm_config": _vm_config(p),
            "configuration": _typed("google.protobuf.StringValue",
                                    value=_Literal(json.dumps(config, indent=2) + "\n")),
        }),
    }


def _gateway_listener(p: Params, config: dict, note, x509: bool = False) -> dict:
    api_cluster = MTLS_API_CLUSTER if x509 else API_CLUSTER
    api_route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": api_cluster,
            "host_rewrite_literal": p.mtls_api_host if x509 else "api.openai.com",
            note("""\
                No overall deadline: completions can stream for minutes. A stream that stays silent
                for idle_timeout is ended."""): None,
            "timeout": "0s",
            "idle_timeout": "300s",
        },
    }
    if p.forward_client_cert:
        api_route[note("The callers' certificate details stay in the mesh: never sent to OpenAI.")] = None
        api_route["request_headers_to_remove"] = ["x-forwarded-client-cert"]
    deny_route = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 403, "body": {"inline_string": _error_json(
            "This gateway only forwards requests to the OpenAI API.", "host_not_allowed")}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }
    if p.module:
        deny_route.update({
            note("The filter does not run for refused requests (no token exchange for them)."): None,
            "typed_per_filter_config": _filter_disabled(),
        })
    virtual_hosts = [{"name": "openai_api", "domains": _domains(p.api_hosts), "routes": [api_route]}]
    if p.echo_host:
        virtual_hosts.append({
            note("""\
                Test only: another host, forwarded to the stand-in's /echo/ with the filter enabled, to
                show that the filter leaves requests for hosts it does not handle untouched."""): None,
            "name": "echo",
            "domains": _domains([p.echo_host]),
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": api_cluster, "prefix_rewrite": "/echo/", "timeout": "10s"}}],
        })
    virtual_hosts.append({
        note("Everything else is refused: the gateway is not an open proxy."): None,
        "name": "deny",
        "domains": ["*"],
        "routes": [deny_route],
    })
    route_config = {"name": "openai_egress", "virtual_hosts": virtual_hosts}
    http_filters = ([_wasm_filter(p, config, note)] if p.module else []) + [_router()]
    hcm = _hcm("openai_egress", route_config, http_filters, p.access_log, note, p.forward_client_cert)
    if p.downstream_tls:
        chain = {
            note("""\
                mTLS from the mesh: a client certificate signed by downstream_ca is verified here, and
                the filter's "callers" rules match its SPIFFE ID (URI SAN) to decide who may use which
                OpenAI service account."""
                 + ("" if p.require_client_certificate else """
                A connection without a client certificate is accepted (a presented one is still
                verified); with "callers" set the filter refuses its requests (caller_not_allowed).""")): None,
            "transport_socket": _downstream_tls(p),
            "filters": [hcm],
        }
    else:
        chain = {
            note("""\
                Plain HTTP from the mesh. To require mTLS from clients, add a transport_socket here:
                  transport_socket:
                    name: envoy.transport_sockets.tls
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
                      require_client_certificate: true
                      common_tls_context:
                        tls_certificates: [{certificate_chain: {filename: /etc/envoy/tls/tls.crt},
                                            private_key: {filename: /etc/envoy/tls/tls.key}}]
                        validation_context: {trusted_ca: {filename: /etc/envoy/tls/ca.crt}}
                and give each calling workload its own OpenAI service account with "callers" rules on
                its SPIFFE ID (README). Whoever can reach this listener can use the gateway's OpenAI
                identity (for the header source: any identity they hold a token for), so restrict who
                can reach it."""): None,
            "filters": [hcm],
        }
    return {"name": GATEWAY_LISTENER, "address": _socket(p.listen_address, p.listen_port), "filter_chains": [chain]}


def _token_file_listener(p: Params, note) -> dict:
    directory = p.token_dir.rstrip("/") or "/"
    token_route = {
        "match": {"path": "/token", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "direct_response": {"status": 200, "body": {
            "filename": f"{directory}/{p.token_file}",
            note("""\
                Kubelet rotates the projected token by swapping the directory's ..data symlink;
                watching the directory makes Envoy serve the new token (without it, the first one
                forever)."""): None,
            "watched_directory": {"path": directory}}},
    }
    route_config = {"name": "wif_token_file", "virtual_hosts": [{"name": "token", "domains": ["*"], "routes": [
        token_route,
        {note("Nothing but GET /token."): None, "match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]}]}
    return {
        note("""\
            Serves the Kubernetes projected service account token to the filter (a Wasm module cannot
            read files) through the wif_token_file cluster. A loopback TCP listener, not an internal
            one: the filter also calls it from Envoy's main thread, which cannot reach internal
            listeners. The port is none of Istio's. Trade-off: every container in the gateway's pod
            (its network namespace) can reach 127.0.0.1 and so read this token, the gateway's own
            identity; run only trusted containers (sidecars) next to the gateway."""): None,
        "name": TOKEN_LISTENER,
        "address": _socket(TOKEN_ADDRESS, p.token_port),
        "filter_chains": [{"filters": [_hcm("wif_token_file", route_config, [_router()], False)]}],
    }


def _free_loopback_port() -> int:
    """A port that nothing listens on now (the kernel's choice for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((TOKEN_ADDRESS, 0))
        return probe.getsockname()[1]


def _mtls_clusters(p: Params, note) -> list:
    """The x509 source's clusters: the token endpoint and the API over mTLS, presenting the
    gateway's certificate, verifying the server against ca_file and its name."""
    certificate = _client_certificate_sds(p)
    where = (f"the certificate of the mounted Secret in {p.client_cert_dir}, delivered by SDS from "
             f"{p.client_cert_sds_file} (rotation needs no restart: both are watched)"
             if p.client_certificate == "files" else
             f"the workload's X.509-SVID from the SPIRE agent's SDS (secret {certificate['name']!r}), rotated by the agent")
    api_extra = {
        "typed_extension_protocol_options": _http_options(
            auto_config={"http_protocol_options": {}, "http2_protocol_options": {}}),
        "circuit_breakers": {"thresholds": [{"max_connections": 4096, "max_pending_requests": 4096,
                                             "max_requests": 4096}]},
    }
    api = _tcp_cluster(MTLS_API_CLUSTER, p.mtls_api_address or p.mtls_api_host, p.api_port, "5s", None, p.ca_file,
                       note=note(textwrap.fill(
                           f"The OpenAI API for X.509 workload identity ({p.mtls_api_host}): every request "
                           f"carries the bearer and presents {where}. The server is verified against ca_file "
                           f"and its name.", 96)), **api_extra)
    api["transport_socket"] = _tls_socket(p.mtls_api_host, p.ca_file, copy.deepcopy(certificate))
    auth = _tcp_cluster(MTLS_AUTH_CLUSTER, p.mtls_auth_address or MTLS_AUTH_HOST, p.auth_port, "5s", None,
                        p.ca_file, note=note(textwrap.fill(
                            f"OpenAI's token endpoint for X.509 workload identity ({MTLS_AUTH_HOST}): the "
                            f"filter's exchange (no subject token) presents {where}; the certificate is the "
                            f"credential. One exchange per connection: every exchange makes its own TLS "
                            f"handshake, with the certificate as it is at that moment (never on a connection "
                            f"opened before a rotation).", 96)),
                        typed_extension_protocol_options=_http_options(
                            common_http_protocol_options={"max_requests_per_connection": 1},
                            explicit_http_config={"http_protocol_options": {}}))
    auth["transport_socket"] = _tls_socket(MTLS_AUTH_HOST, p.ca_file, copy.deepcopy(certificate))
    clusters = [api, auth]
    if p.client_certificate == "sds":
        clusters.append({
            note("""\
                The SPIRE agent's SDS (the same unix socket as its Workload API), over gRPC (HTTP/2).
                Register the gateway as a workload so the agent issues it an X.509-SVID."""): None,
            "name": SDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": _http_options(explicit_http_config={"http2_protocol_options": {}}),
            "load_assignment": _endpoints(SDS_CLUSTER, {"pipe": {"path": p.spiffe_socket}})})
    return clusters


def _openai_clusters(p: Params, note) -> list:
    api_extra = {}
    if p.upstream_tls:
        # HTTP/2 when the server offers it in ALPN (many streams per connection), else HTTP/1.1.
        api_extra["typed_extension_protocol_options"] = _http_options(
            auto_config={"http_protocol_options": {}, "http2_protocol_options": {}})
    api_extra["circuit_breakers"] = {"thresholds": [
        {"max_connections": 4096, "max_pending_requests": 4096, "max_requests": 4096}]}
    tls_note = ("TLS to OpenAI, verified against the system CA bundle and the expected host name."
                if p.upstream_tls else "Plain HTTP to a local stand-in (production: TLS, see envoy/egress-gateway.yaml).")
    return [
        _tcp_cluster(API_CLUSTER, p.api_address, p.api_port, "5s", "api.openai.com" if p.upstream_tls else None,
                     p.ca_file, note=note(f"The OpenAI API. {tls_note}"), **api_extra),
        _tcp_cluster(AUTH_CLUSTER, p.auth_address, p.auth_port, "5s", "auth.openai.com" if p.upstream_tls else None,
                     p.ca_file, note=note("""\
                         OpenAI's token endpoint (POST /oauth/token), called by the filter to exchange the
                         subject token for an access token.""")),
    ]


_PLATFORM_NOTES = {
    "wif_token_file": """\
        Kubernetes (any distribution, GKE, AKS, EKS): the projected service account token, served by
        the wif_token_file loopback listener above. Keep with "source": "kubernetes".""",
    "gcp_metadata": """\
        Google Cloud (Compute Engine, GKE with Workload Identity, Cloud Run): the metadata server's
        identity tokens. Keep with "source": "gcp_metadata".""",
    "azure_imds": """\
        Azure (VMs, VM scale sets, AKS nodes with a managed identity): Instance Metadata Service
        managed identity tokens. Keep with "source": "azure_imds".""",
    "spiffe_workload_api": """\
        SPIFFE (SPIRE, Defakto): the Workload API on the agent's unix socket, over gRPC (HTTP/2).
        With the SPIFFE CSI driver the socket is where the driver mounts it, e.g.
        /spiffe-workload-api/spire-agent.sock. Keep with "source": "spiffe".""",
}


def _identity_cluster(name: str, p: Params, note) -> dict:
    text = _PLATFORM_NOTES[name]
    if name == "wif_token_file":
        return _tcp_cluster(name, TOKEN_ADDRESS, p.token_port, "1s", None, p.ca_file, note=note(text))
    if name == "gcp_metadata":
        return _tcp_cluster(name, p.gcp_metadata_address, p.gcp_metadata_port, "1s", None, p.ca_file, note=note(text))
    if name == "azure_imds":
        return _tcp_cluster(name, p.azure_imds_address, p.azure_imds_port, "1s", None, p.ca_file, note=note(text))
    return {note(text): None, "name": name, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": _http_options(explicit_http_config={"http2_protocol_options": {}}),
            "load_assignment": _endpoints(name, {"pipe": {"path": p.spiffe_socket}})}


def _bootstrap(profile: str, source: str, p: Params, notes: _Notes) -> dict:
    if source not in ALL_SOURCES:
        raise ValueError(f"unknown subject token source {source!r}; one of {ALL_SOURCES}")
    config = p.filter_config if p.filter_config is not None else filter_config(source, hosts=p.api_hosts,
                                                                                  scope=p.filter_scope)
    wanted = p.identity_clusters if p.identity_clusters is not None else (
        (SOURCE_CLUSTER[source],) if source in SOURCE_CLUSTER else ())
    identity = [name for name in SOURCE_CLUSTER.values() if name in wanted]
    unknown = set(wanted) - set(identity)
    if unknown:
        raise ValueError(f"unknown identity clusters {sorted(unknown)}; known: {sorted(SOURCE_CLUSTER.values())}")

    if "wif_token_file" in identity and p.token_port == 0:
        # The listener and the cluster must name the same port, so choose it here.
        p = dataclasses.replace(p, token_port=_free_loopback_port())
    x509 = source == X509_SOURCE
    listeners = [_gateway_listener(p, config, notes, x509)]
    if "wif_token_file" in identity:
        listeners.append(_token_file_listener(p, notes))
    clusters = (_mtls_clusters(p, notes) if x509 else _openai_clusters(p, notes)) + [
        _identity_cluster(name, p, notes) for name in identity]

    bootstrap = {}
    if x509:
        bootstrap["node"] = {
            notes("""\
                SDS needs a node id and cluster (any names: the SPIRE agent identifies the gateway by the
                process on its socket, not by these)."""): None,
            "id": GATEWAY_LISTENER, "cluster": GATEWAY_LISTENER}
    bootstrap.update({
        "admin": {
            notes("Admin (stats, readiness) on loopback only: it can change the server's state."): None,
            "address": _socket(p.admin_address, p.admin_port),
        },
    })
    bootstrap["overload_manager"] = {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": _typed(
            "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
            max_active_downstream_connections=50000)}]}
    bootstrap["static_resources"] = {"listeners": listeners, "clusters": clusters}
    return bootstrap


def build(profile: str, source: str, **overrides) -> dict:
    """The bootstrap as a plain dict (no comments)."""
    return _strip_notes(_bootstrap(profile, source, params(profile, **overrides), _Notes()))


def render(profile: str, source: str, header: str | None = None, **overrides) -> str:
    """The bootstrap as YAML with comments; `header` (comment text) goes on top."""
    notes = _Notes()
    bootstrap = _bootstrap(profile, source, params(profile, **overrides), notes)
    text = yaml.dump(bootstrap, Dumper=_Dumper, sort_keys=False, width=4096, default_flow_style=False)
    text = _apply_notes(text, notes)
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in textwrap.dedent(header).strip("\n").splitlines()) \
            + "\n" + text
    return text


# ---------------------------------------------------------------------------------------------
# The checked-in examples

GENERATED = """\
Generated by tools/envoy_config.py; do not edit by hand.
Regenerate: python -m tools.envoy_config --write (checked by make validate)."""

_TOKEN_VOLUME = """\
Mount the projected token with the audience your Workload Identity Provider expects:
  volumes:
  - name: openai-token
    projected:
      sources:
      - serviceAccountToken: {path: token, audience: "https://api.openai.com/v1", expirationSeconds: 3600}
  volumeMounts: [{name: openai-token, mountPath: /var/run/secrets/tokens, readOnly: true}]"""

EXAMPLES = {
    "egress-gateway.yaml": {
        "source": "kubernetes",
        "overrides": {"identity_clusters": tuple(SOURCE_CLUSTER.values())},
        "about": """\
            Production egress gateway for the OpenAI API with keyless credentials (openai-wif).
            Clients in the mesh send plain HTTP to this gateway (port 10000) with Host api.openai.com or
            openai-egress.internal, and no API key. The filter obtains the gateway's identity token,
            exchanges it at auth.openai.com for a short-lived OpenAI access token, caches it, and sends
            the request to api.openai.com over verified TLS with Authorization: Bearer <access token>.
            Requests for any other host get 403.

            This file carries every identity source's cluster: keep only the one your platform uses
            (the comments on the clusters say which), and set "subject_token" to match. The module is
            expected at /etc/envoy/openai_wif.wasm. As written it uses the Kubernetes projected token.""",
        "token_volume": True,
    },
    "kubernetes.yaml": {
        "source": "kubernetes",
        "about": """\
            Kubernetes: the gateway presents its projected service account token (issuer: the
            cluster's, `kubectl get --raw /.well-known/openid-configuration | jq -r .issuer`).""",
        "token_volume": True,
    },
    "gke.yaml": {
        "source": "kubernetes",
        "about": """\
            GKE: the same as kubernetes.yaml. The Workload Identity Provider's issuer is the cluster's,
            https://container.googleapis.com/v1/projects/<project>/locations/<location>/clusters/<cluster>.
            (To present a Google service account's identity instead, use google-cloud.yaml.)""",
        "token_volume": True,
    },
    "aks.yaml": {
        "source": "kubernetes",
        "about": """\
            AKS: the projected service account token, issuer = the cluster's OIDC issuer URL
            (`az aks show -n <cluster> -g <group> --query oidcIssuerProfile.issuerUrl`; enable it with
            --enable-oidc-issuer). Alternatively use the node's or a pod's managed identity through
            IMDS, as in azure.yaml.""",
        "token_volume": True,
    },
    "google-cloud.yaml": {
        "source": "gcp_metadata",
        "about": """\
            Google Cloud: the gateway presents an identity token of the service account attached to its
            VM (or GKE Workload Identity / Cloud Run service), from the metadata server, with audience
            https://api.openai.com/v1 (the Workload Identity Provider's issuer is https://accounts.google.com).""",
    },
    "azure.yaml": {
        "source": "azure_imds",
        "about": """\
            Azure: the gateway presents a managed identity token from the Instance Metadata Service.
            Set "resource" to the Entra application's Application ID URI (api://...), which is also the
            Workload Identity Provider's audience. With several user-assigned identities, add one of
            "client_id", "object_id" or "msi_res_id" to "subject_token". (On AKS you can also use the
            projected service account token: aks.yaml.)""",
    },
    "spiffe.yaml": {
        "source": "spiffe",
        "about": """\
            SPIFFE (SPIRE, Defakto): the gateway presents a JWT-SVID fetched from the Workload API on the
            agent's unix socket, with audience https://api.openai.com/v1. Optionally pin "spiffe_id" in
            "subject_token". Mount the agent socket into the gateway's pod (SPIFFE CSI driver, or a
            hostPath) and set the socket path of the spiffe_workload_api cluster.""",
    },
    "header.yaml": {
        "source": "header",
        "about": """\
            Per-workload identity: each client sends its own subject token (e.g. its projected service
            account token) in the x-openai-subject-token header; the gateway exchanges it (cached per
            token) and removes the header. No identity-source cluster is needed.""",
    },
}


_X509_SETUP = """\
OpenAI side (X.509 workload identity): upload and activate the mesh's trust root in the
organisation's Mutual TLS settings, create an X.509 Workload Identity Provider whose attribute
transformation derives openai.subject from the certificate (e.g. its SPIFFE URI SAN, else its CN),
and map that subject to a service account. The filter's hosts stay the callers' names
(api.openai.com); the route rewrites to the mTLS API host (mtls.api.openai.com; regional:
mtls-us.api.openai.com, mtls-eu.api.openai.com)."""

EXAMPLES.update({
    "x509.yaml": {
        "source": X509_SOURCE,
        "about": """\
            X.509 workload identity: the gateway's own mTLS certificate is the OpenAI credential (no
            token volume, no metadata server, no JWT). The filter exchanges at mtls.auth.openai.com with
            no subject token; Envoy presents the certificate in the TLS handshake, and again on every
            API request to mtls.api.openai.com with the bearer. The certificate comes from a mounted
            Secret (tls.crt: leaf then intermediates; tls.key) at /var/run/secrets/openai-mtls, named by
            the SDS file /etc/envoy/sds/openai-client-certificate.yaml (envoy/sds/ has it; mount it,
            e.g. from a ConfigMap). Envoy watches both: a rotated Secret is used by the next
            connection, with no restart.""",
        "x509_setup": True,
    },
    "x509-spire.yaml": {
        "source": X509_SOURCE,
        "overrides": {"client_certificate": "sds"},
        "about": """\
            X.509 workload identity with SPIRE: the gateway's X.509-SVID, from the SPIRE agent's SDS on
            its unix socket (/run/spire/agent.sock; secret "default", the workload's own SVID), is the
            OpenAI credential; the agent rotates it. The filter exchanges at mtls.auth.openai.com with no
            subject token, and API requests go to mtls.api.openai.com with the bearer and the SVID.
            Upload the SPIRE trust bundle's root as the organisation's Mutual TLS root.""",
        "x509_setup": True,
    },
})

# Files other than bootstraps that the examples name (relative to envoy/), with their renderings.
SUPPORT_FILES = {
    "sds/openai-client-certificate.yaml": lambda: (
        "".join(f"# {line}".rstrip() + "\n" for line in (GENERATED + "\n\n" + textwrap.dedent("""\
            The SDS file of envoy/x509.yaml (at /etc/envoy/sds/openai-client-certificate.yaml): the
            certificate the OpenAI mTLS clusters present, from the Secret mounted at
            /var/run/secrets/openai-mtls (tls.crt: leaf then intermediates; tls.key).""")).splitlines())
        + "\n" + sds_secret_file()),
}


def render_example(filename: str) -> str:
    example = EXAMPLES[filename]
    header = GENERATED + "\n\n" + textwrap.dedent(example["about"]).strip("\n")
    if example.get("token_volume"):
        header += "\n" + _TOKEN_VOLUME
    if example.get("x509_setup"):
        header += "\n\n" + _X509_SETUP
    return render("production", example["source"], header=header, **example.get("overrides", {}))


def check(directory: Path = ENVOY_DIR, out=sys.stdout) -> bool:
    """True if every example under directory is exactly its rendering and nothing else is there."""
    ok = True
    for filename in EXAMPLES:
        path = directory / filename
        expected = render_example(filename)
        if not path.exists():
            print(f"missing: {path}", file=out)
            ok = False
            continue
        actual = path.read_text()
        if actual != expected:
            ok = False
            print(f"differs from its rendering: {path}", file=out)
            diff = difflib.unified_diff(actual.splitlines(), expected.splitlines(),
                                        f"{filename} (checked in)", f"{filename} (rendered)", lineterm="", n=1)
            for line in list(diff)[:40]:
                print("  " + line, file=out)
    for filename, rendering in SUPPORT_FILES.items():
        path = directory / filename
        if not path.exists() or path.read_text() != rendering():
            print(f"missing or differs from its rendering: {path}", file=out)
            ok = False
    for path in sorted(directory.glob("*.yaml")):
        if path.name not in EXAMPLES:
            print(f"not generated (add it to EXAMPLES in tools/envoy_config.py or remove it): {path}", file=out)
            ok = False
    return ok


def write(directory: Path = ENVOY_DIR) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename in EXAMPLES:
        path = directory / filename
        text = render_example(filename)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    for filename, rendering in SUPPORT_FILES.items():
        path = directory / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != rendering():
            path.write_text(rendering())
            written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.envoy_config", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="regenerate the files under envoy/")
    group.add_argument("--check", action="store_true", help="fail if a file under envoy/ differs from its rendering")
    group.add_argument("--print", metavar="FILE", choices=sorted(EXAMPLES), help="print one example's rendering")
    parser.add_argument("--dir", type=Path, default=ENVOY_DIR, help="directory of the examples (default: envoy/)")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(render_example(args.print))
        return 0
    if args.write:
        written = write(args.dir)
        print(f"{len(written)} of {len(EXAMPLES)} files updated under {args.dir}")
        return 0
    if check(args.dir):
        print(f"{len(EXAMPLES)} Envoy configurations under {args.dir} match their rendering")
        return 0
    print("run `python -m tools.envoy_config --write` to regenerate", file=sys.stdout)
    return 1


if __name__ == "__main__":
    sys.exit(main())
