"""The Envoy configuration template (tools/envoy_config.py) and the files it generates under envoy/.

Fast tests of the rendered structure, then a real Envoy running the local profile (without the
filter: routing alone; with the filter: each identity source's cluster reaches its stand-in).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import pytest
import yaml

from tests.harness import Stack, TestCA, envoy_binary, http_request
from tools import envoy_config
from tools.envoy_config import API_CLUSTER, AUTH_CLUSTER, EXAMPLES, FILTER_NAME, SOURCE_CLUSTER, SOURCES, build

LOCAL_PORTS = {"openai_port": 18001, "gcp_metadata_port": 18002, "azure_imds_port": 18003, "token_port": 18004,
               "spiffe_socket": "/tmp/test.sock", "token_dir": "/tmp/tokens", "module": "/tmp/openai_wif.wasm"}


def example(filename: str) -> dict:
    return yaml.safe_load((envoy_config.ENVOY_DIR / filename).read_text())


def clusters(bootstrap: dict) -> dict:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def listeners(bootstrap: dict) -> dict:
    return {listener["name"]: listener for listener in bootstrap["static_resources"]["listeners"]}


def gateway_hcm(bootstrap: dict) -> dict:
    listener = listeners(bootstrap)[envoy_config.GATEWAY_LISTENER]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def virtual_hosts(bootstrap: dict) -> dict:
    return {vh["name"]: vh for vh in gateway_hcm(bootstrap)["route_config"]["virtual_hosts"]}


def wasm(bootstrap: dict) -> dict:
    (found,) = [f for f in gateway_hcm(bootstrap)["http_filters"] if f["name"] == FILTER_NAME]
    return found["typed_config"]["config"]


def filter_json(bootstrap: dict) -> dict:
    return json.loads(wasm(bootstrap)["configuration"]["value"])


ALL_EXAMPLES = sorted(EXAMPLES)
X509_EXAMPLES = [f for f in ALL_EXAMPLES if EXAMPLES[f]["source"] == envoy_config.X509_SOURCE]


def openai_clusters(filename: str) -> tuple:
    """((API cluster, its host), (token endpoint cluster, its host)) of an example."""
    if filename in X509_EXAMPLES:
        return ((envoy_config.MTLS_API_CLUSTER, "mtls.api.openai.com"),
                (envoy_config.MTLS_AUTH_CLUSTER, "mtls.auth.openai.com"))
    return (API_CLUSTER, "api.openai.com"), (AUTH_CLUSTER, "auth.openai.com")


# Production examples


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_openai_clusters_verify_tls_against_the_system_cas_and_the_host_name(filename):
    found = clusters(example(filename))
    for name, host in openai_clusters(filename):
        cluster = found[name]
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address["socket_address"] == {"address": host, "port_value": 443}
        assert cluster["type"] == "LOGICAL_DNS"
        socket = cluster["transport_socket"]
        assert socket["name"] == "envoy.transport_sockets.tls"
        tls = socket["typed_config"]
        assert tls["@type"].endswith("UpstreamTlsContext")
        assert tls["sni"] == host
        validation = tls["common_tls_context"]["validation_context"]
        assert validation["trusted_ca"] == {"filename": "/etc/ssl/certs/ca-certificates.crt"}
        assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": host}}]
        assert "trust_chain_verification" not in validation  # ACCEPT_UNTRUSTED would switch checks off


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_nothing_weakens_tls(filename):
    text = (envoy_config.ENVOY_DIR / filename).read_text().lower()
    for weakness in ("insecure", "accept_untrusted", "allow_expired_certificate", "verify_certificate_spki: []"):
        assert weakness not in text


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_only_the_openai_hosts_are_forwarded_and_everything_else_gets_403_without_the_filter(filename):
    bootstrap = example(filename)
    hosts = virtual_hosts(bootstrap)
    assert list(hosts) == ["openai_api", "deny"]  # no test-only virtual host ships
    assert set(hosts["openai_api"]["domains"]) == {"api.openai.com", "api.openai.com:*",
                                                  "openai-egress.internal", "openai-egress.internal:*"}
    (api_route,) = hosts["openai_api"]["routes"]
    ((api_cluster, api_host), _) = openai_clusters(filename)
    assert api_route["route"]["cluster"] == api_cluster
    assert api_route["route"]["host_rewrite_literal"] == api_host
    assert hosts["deny"]["domains"] == ["*"]
    (deny_route,) = hosts["deny"]["routes"]
    assert deny_route["direct_response"]["status"] == 403
    assert json.loads(deny_route["direct_response"]["body"]["inline_string"])["error"]["code"] == "host_not_allowed"
    disabled = deny_route["typed_per_filter_config"][FILTER_NAME]
    assert disabled == {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_filter_fails_closed_is_reloaded_when_it_dies_and_runs_before_the_router(filename):
    bootstrap = example(filename)
    names = [f["name"] for f in gateway_hcm(bootstrap)["http_filters"]]
    assert names == [FILTER_NAME, "envoy.filters.http.router"]
    config = wasm(bootstrap)
    # FAIL_RELOAD: refused while a dead VM is replaced (FAIL_CLOSED would refuse until a restart).
    assert config["failure_policy"] == "FAIL_RELOAD"
    assert "fail_open" not in config
    assert config["vm_config"]["code"]["local"]["filename"] == "/etc/envoy/openai_wif.wasm"
    assert config["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_filter_configuration_uses_placeholders_and_existing_clusters(filename):
    bootstrap = example(filename)
    config = filter_json(bootstrap)
    assert config["identity_provider_id"] == "wip_REPLACE_ME"
    assert config["service_account_id"] == "sa_REPLACE_ME"
    assert config["subject_token"]["source"] == EXAMPLES[filename]["source"]
    # The route decides: the filter authorises every request it sees and is disabled on every
    # route but OpenAI's, so it cannot disagree with Envoy's routing about a malformed Host.
    assert config["scope"] == "all" and "hosts" not in config
    for vhost in virtual_hosts(bootstrap).values():
        for route in vhost["routes"]:
            if route.get("route", {}).get("cluster") not in (API_CLUSTER, envoy_config.MTLS_API_CLUSTER):
                assert route["typed_per_filter_config"][FILTER_NAME]["disabled"] is True
    names = clusters(bootstrap)
    assert config["token_endpoint"]["cluster"] in names
    if "cluster" in config["subject_token"]:
        assert config["subject_token"]["cluster"] in names


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_each_example_carries_only_the_identity_cluster_its_source_needs(filename):
    source = EXAMPLES[filename]["source"]
    names = set(clusters(example(filename)))
    if filename == "egress-gateway.yaml":
        expected = set(SOURCE_CLUSTER.values())
    elif filename == "x509-spire.yaml":
        expected = {envoy_config.SDS_CLUSTER}
    else:
        expected = {SOURCE_CLUSTER[source]} if source in SOURCE_CLUSTER else set()
    assert names == {name for name, _ in openai_clusters(filename)} | expected
    token_listener = envoy_config.TOKEN_LISTENER in listeners(example(filename))
    assert token_listener == ("wif_token_file" in expected)


@pytest.mark.parametrize("filename", [f for f in ALL_EXAMPLES if EXAMPLES[f]["source"] == "kubernetes"])
def test_projected_token_is_served_on_loopback_only_by_a_listener_that_follows_rotation(filename):
    bootstrap = example(filename)
    listener = listeners(bootstrap)[envoy_config.TOKEN_LISTENER]
    assert listener["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 15098}}
    assert "internal_listener" not in listener and "bootstrap_extensions" not in bootstrap
    (vhost,) = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    token, rest = vhost["routes"]
    assert token["match"] == {"path": "/token", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]}
    assert token["direct_response"]["body"] == {"filename": "/var/run/secrets/tokens/token",
                                                 "watched_directory": {"path": "/var/run/secrets/tokens"}}
    assert rest == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
    cluster = clusters(bootstrap)["wif_token_file"]
    assert cluster["type"] == "STATIC"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == listener["address"]


def test_token_port_is_none_of_istios():
    istio_ports = {15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090}
    assert envoy_config.TOKEN_PORT not in istio_ports


def test_local_token_port_is_chosen_free_and_shared_by_listener_and_cluster():
    bootstrap = build("local", "kubernetes", **{k: v for k, v in LOCAL_PORTS.items() if k != "token_port"})
    address = listeners(bootstrap)[envoy_config.TOKEN_LISTENER]["address"]["socket_address"]
    cluster = clusters(bootstrap)["wif_token_file"]
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": address}
    assert address["address"] == "127.0.0.1" and address["port_value"] > 0
    given = build("local", "kubernetes", **{**LOCAL_PORTS, "token_port": 18004})
    assert listeners(given)[envoy_config.TOKEN_LISTENER]["address"]["socket_address"]["port_value"] == 18004


def test_spiffe_cluster_is_http2_over_the_agent_socket():
    cluster = clusters(example("spiffe.yaml"))["spiffe_workload_api"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": "/run/spire/agent.sock"}}
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}


# Access log: who used which identity, and never a credential

# The only request headers an access log format may name; every other one may carry a credential
# (authorization, the subject-token header, x-forwarded-client-cert, cookies, api keys).
LOGGABLE_HEADERS = {":method", ":authority", "x-request-id"}
CREDENTIAL_WORDS = ("authorization", "subject-token", "subject_token", "x-forwarded-client-cert", "cookie",
                    "api-key", "api_key", "bearer", "token")
HEADER_OPERATOR = re.compile(r"%(REQ|RESP|TRAILER|REQ_WITHOUT_QUERY|REQUEST_HEADER|RESPONSE_HEADER|"
                             r"RESPONSE_TRAILER)\(([^)]*)\)(:\d+)?%")


def access_logs(bootstrap: dict, listener: str = envoy_config.GATEWAY_LISTENER) -> list:
    hcm = listeners(bootstrap)[listener]["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm.get("access_log", [])


def access_log_format(bootstrap: dict) -> dict:
    (log,) = access_logs(bootstrap)
    assert log["name"] == "envoy.access_loggers.stdout"
    config = log["typed_config"]
    assert config["@type"] == "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"
    assert set(config["log_format"]) == {"json_format"}
    return config["log_format"]["json_format"]


def assert_no_credential_in_format(fmt: dict):
    for key, value in fmt.items():
        assert isinstance(value, str), (key, value)
        for operator, argument, _ in HEADER_OPERATOR.findall(value):
            names = {name.lower() for name in argument.split("?")}
            assert names <= LOGGABLE_HEADERS, f"{key}: %{operator}({argument})% can carry a credential"
        words = value.lower().replace("%filter_state(wasm.openai_wif.", "")  # the filter's own field names
        for word in CREDENTIAL_WORDS:
            assert word not in words and word not in key.lower(), (key, value)
        # The query string can carry anything a client put there: paths are logged without it.
        assert "%REQ(:PATH)%" not in value.upper() and "X-ENVOY-ORIGINAL-PATH" not in value.upper()
        for whole in ("%DOWNSTREAM_PEER_CERT%", "%DYNAMIC_METADATA", "%REQ_WITHOUT_QUERY"):
            assert whole not in value.upper(), (key, value)


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_gateway_access_log_prints_who_used_which_identity_and_what_came_of_it(filename):
    fmt = access_log_format(example(filename))
    for name in ("caller", "rule", "service_account_id", "identity", "cache", "error"):
        assert fmt[name] == f"%FILTER_STATE(wasm.openai_wif.{name}:PLAIN)%"
    assert fmt["peer"] == "%DOWNSTREAM_PEER_URI_SAN%"
    assert fmt["status"] == "%RESPONSE_CODE%"
    assert fmt["response_code_details"] == "%RESPONSE_CODE_DETAILS%"
    assert fmt["path"] == "%PATH(NQ:ORIG_OR_PATH)%"
    assert fmt == envoy_config.ACCESS_LOG_FORMAT


@pytest.mark.parametrize("filename", ALL_EXAMPLES)
def test_gateway_access_log_names_no_header_that_can_carry_a_credential(filename):
    bootstrap = example(filename)
    assert_no_credential_in_format(access_log_format(bootstrap))
    # The token-file listener (it serves the gateway's subject token) logs nothing at all.
    if envoy_config.TOKEN_LISTENER in listeners(bootstrap):
        assert access_logs(bootstrap, envoy_config.TOKEN_LISTENER) == []


def test_the_credential_check_catches_a_credential_header():
    for bad in ("%REQ(AUTHORIZATION)%", "%REQ(x-openai-subject-token)%", "%REQ(X-FORWARDED-CLIENT-CERT)%",
                "%REQ(:PATH)%", "%REQ(X-REQUEST-ID?AUTHORIZATION)%", "%RESP(set-cookie)%", "%TRAILER(authorization)%",
                "%REQ(api-key):20%", "%DOWNSTREAM_PEER_CERT%"):
        with pytest.raises(AssertionError):
            assert_no_credential_in_format({"x": bad})
    assert_no_credential_in_format(envoy_config.ACCESS_LOG_FORMAT)


def test_access_log_can_be_left_out():
    bootstrap = build("local", "header", **{**LOCAL_PORTS, "access_log": False})
    assert access_logs(bootstrap) == []


# mTLS on the gateway listener, XFCC, the VM's environment

TLS_FILES = {"downstream_cert": "/tmp/tls/tls.crt", "downstream_key": "/tmp/tls/tls.key",
             "downstream_ca": "/tmp/tls/ca.crt"}


def downstream_tls(bootstrap: dict) -> dict:
    (chain,) = listeners(bootstrap)[envoy_config.GATEWAY_LISTENER]["filter_chains"]
    socket = chain["transport_socket"]
    assert socket["name"] == "envoy.transport_sockets.tls"
    assert socket["typed_config"]["@type"] == (
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext")
    return socket["typed_config"]


@pytest.mark.parametrize("require", [True, False])
@pytest.mark.parametrize("profile", envoy_config.PROFILES)
def test_gateway_listener_terminates_mtls_verifying_clients_against_the_ca(profile, require):
    kwargs = {**(LOCAL_PORTS if profile == "local" else {}), **TLS_FILES, "downstream_tls": True,
              "require_client_certificate": require}
    tls = downstream_tls(build(profile, "kubernetes", **kwargs))
    assert tls["require_client_certificate"] is require
    common = tls["common_tls_context"]
    assert common["tls_certificates"] == [{"certificate_chain": {"filename": "/tmp/tls/tls.crt"},
                                           "private_key": {"filename": "/tmp/tls/tls.key"}}]
    # Without require_client_certificate the validation context still verifies any certificate presented.
    assert common["validation_context"] == {"trusted_ca": {"filename": "/tmp/tls/ca.crt"}}
    assert common["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_2"}
    assert common["alpn_protocols"] == ["h2", "http/1.1"]
    text = envoy_config.render(profile, "kubernetes", **kwargs).lower()
    for weakness in ("accept_untrusted", "allow_expired_certificate", "trust_chain_verification"):
        assert weakness not in text


def test_plain_http_listener_by_default_and_in_every_example():
    assert "transport_socket" not in listeners(build("local", "header", **LOCAL_PORTS))[
        envoy_config.GATEWAY_LISTENER]["filter_chains"][0]
    for filename in ALL_EXAMPLES:
        (chain,) = listeners(example(filename))[envoy_config.GATEWAY_LISTENER]["filter_chains"]
        assert "transport_socket" not in chain


def test_xfcc_is_sanitised_by_default_and_when_forwarded_never_reaches_openai():
    default = build("local", "header", **LOCAL_PORTS)
    assert "forward_client_cert_details" not in gateway_hcm(default)  # Envoy's default: SANITIZE
    assert "x-forwarded-client-cert" not in json.dumps(default)
    forwarded = build("local", "header", forward_client_cert="ALWAYS_FORWARD_ONLY", **LOCAL_PORTS)
    assert gateway_hcm(forwarded)["forward_client_cert_details"] == "ALWAYS_FORWARD_ONLY"
    api_route, = virtual_hosts(forwarded)["openai_api"]["routes"]
    assert api_route["request_headers_to_remove"] == ["x-forwarded-client-cert"]


def test_vm_environment_variables():
    vm = wasm(build("local", "header", vm_env={"OPENAI_IDENTITY_PROVIDER_ID": "wip_x"},
                    vm_env_keys=["OPENAI_SERVICE_ACCOUNT_ID"], **LOCAL_PORTS))["vm_config"]
    assert vm["environment_variables"] == {"host_env_keys": ["OPENAI_SERVICE_ACCOUNT_ID"],
                                           "key_values": {"OPENAI_IDENTITY_PROVIDER_ID": "wip_x"}}
    for filename in ALL_EXAMPLES:
        assert "environment_variables" not in wasm(example(filename))["vm_config"]


def test_production_gateway_with_mtls_passes_envoy_validate(tmp_path):
    """envoy --mode validate loads the certificates and the module: the mTLS listener, the access log
    format, XFCC forwarding and the VM environment are all accepted by Envoy itself."""
    from tools.validate import MODULE
    if not MODULE.is_file():
        pytest.skip("the module is not built (make build)")
    ca = TestCA(tmp_path / "pki")
    server = ca.server()
    text = envoy_config.render("production", "header", module=str(MODULE), downstream_tls=True,
                               downstream_cert=server.cert, downstream_key=server.key, downstream_ca=ca.ca_file,
                               require_client_certificate=False, forward_client_cert="ALWAYS_FORWARD_ONLY",
                               vm_env={"OPENAI_SERVICE_ACCOUNT_ID": "sa_x"})
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    result = subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(config), "-l", "error",
                             "--use-dynamic-base-id"], capture_output=True, text=True, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_admin_listens_on_loopback_only():
    for filename in ALL_EXAMPLES:
        assert example(filename)["admin"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                                           "port_value": 9901}


# The template


@pytest.mark.parametrize("source", SOURCES)
def test_local_and_production_share_the_filter_chain_and_routes(source):
    production = build("production", source)
    local = build("local", source, filter_config=envoy_config.filter_config(source), **LOCAL_PORTS)

    def normalised(bootstrap):
        hcm = json.loads(json.dumps(gateway_hcm(bootstrap)))
        code = hcm["http_filters"][0]["typed_config"]["config"]["vm_config"]["code"]["local"]
        code["filename"] = "<module>"
        hcm["http_filters"][0]["typed_config"]["config"]["configuration"]["value"] = "<config>"
        hosts = hcm["route_config"]["virtual_hosts"]
        hcm["route_config"]["virtual_hosts"] = [vh for vh in hosts if vh["name"] != "echo"]
        for vh in hcm["route_config"]["virtual_hosts"]:
            vh["domains"] = "<domains>"
        return hcm

    assert normalised(local) == normalised(production)
    assert set(clusters(local)) == set(clusters(production))


def test_local_profile_differs_only_in_parameters():
    local = build("local", "kubernetes", filter_config={"x": 1}, **LOCAL_PORTS)
    for name in (API_CLUSTER, AUTH_CLUSTER):
        cluster = clusters(local)[name]
        assert "transport_socket" not in cluster
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert address["socket_address"] == {"address": "127.0.0.1", "port_value": 18001}
    assert listeners(local)[envoy_config.GATEWAY_LISTENER]["address"]["socket_address"] == {
        "address": "127.0.0.1", "port_value": 0}
    assert local["admin"]["address"]["socket_address"]["port_value"] == 0
    assert json.loads(wasm(local)["configuration"]["value"]) == {"x": 1}
    assert wasm(local)["vm_config"]["code"]["local"]["filename"] == "/tmp/openai_wif.wasm"
    hosts = virtual_hosts(local)
    assert list(hosts) == ["openai_api", "echo", "deny"]
    assert {"localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"} <= set(hosts["openai_api"]["domains"])
    assert "typed_per_filter_config" not in hosts["echo"]["routes"][0]  # the filter runs there


def test_rendered_comments_do_not_change_the_configuration():
    for profile in envoy_config.PROFILES:
        for source in SOURCES:
            kwargs = LOCAL_PORTS if profile == "local" else {}
            text = envoy_config.render(profile, source, header="a header", **kwargs)
            assert text.startswith("# a header\n")
            assert "__note_" not in text
            assert yaml.safe_load(text) == build(profile, source, **kwargs)


def test_unknown_parameters_are_refused():
    with pytest.raises(TypeError, match="no_such_parameter"):
        build("production", "header", no_such_parameter=1)
    with pytest.raises(ValueError, match="unknown profile"):
        build("staging", "header")
    with pytest.raises(ValueError, match="unknown subject token source"):
        build("production", "file")
    with pytest.raises(ValueError, match="unknown identity clusters"):
        build("production", "header", identity_clusters=["vault"])


def test_gateway_without_module_has_no_filter():
    bootstrap = build("local", "header", **{**LOCAL_PORTS, "module": None})
    assert [f["name"] for f in gateway_hcm(bootstrap)["http_filters"]] == ["envoy.filters.http.router"]
    assert "typed_per_filter_config" not in json.dumps(bootstrap)


# --check and --write


def test_checked_in_files_match_their_rendering():
    out = io.StringIO()
    assert envoy_config.check(out=out), out.getvalue()


def test_check_catches_drift_missing_and_stray_files(tmp_path):
    envoy_config.write(tmp_path)
    assert envoy_config.check(tmp_path, out=io.StringIO())
    for filename in ALL_EXAMPLES:
        text = (tmp_path / filename).read_text()
        assert text.startswith("# Generated by tools/envoy_config.py; do not edit by hand.\n")

    edited = tmp_path / "header.yaml"
    edited.write_text(edited.read_text().replace("port_value: 10000", "port_value: 10001"))
    out = io.StringIO()
    assert not envoy_config.check(tmp_path, out=out)
    assert "header.yaml" in out.getvalue() and "10001" in out.getvalue()

    envoy_config.write(tmp_path)
    assert envoy_config.check(tmp_path, out=io.StringIO())
    (tmp_path / "azure.yaml").unlink()
    assert not envoy_config.check(tmp_path, out=io.StringIO())

    envoy_config.write(tmp_path)
    (tmp_path / "hand-written.yaml").write_text("admin: {}\n")
    assert not envoy_config.check(tmp_path, out=io.StringIO())


def test_check_command_exit_status(tmp_path):
    command = [sys.executable, "-m", "tools.envoy_config", "--dir", str(tmp_path)]
    cwd = envoy_config.REPO
    assert subprocess.run(command + ["--write"], cwd=cwd, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(command + ["--check"], cwd=cwd, capture_output=True, timeout=60).returncode == 0
    (tmp_path / "spiffe.yaml").write_text("# edited\n")
    result = subprocess.run(command + ["--check"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "spiffe.yaml" in result.stdout


# A real Envoy


def test_local_gateway_routes_in_a_real_envoy_without_the_filter(tmp_path, standins):
    with Stack("kubernetes", tmp_path, standins=standins, with_filter=False) as stack:
        # The OpenAI host, by name or by the gateway's own address, reaches the API stand-in
        # (which refuses it: without the filter nobody adds a token).
        for host in ("api.openai.com", f"localhost:{stack.envoy.port}", "openai-egress.internal"):
            response = stack.request("GET", "/v1/models", host=host)
            assert response.status == 401, (host, response)
            assert response.json()["error"]["code"] == "invalid_api_key"
        assert stack.openai.api_requests[-1][2]["host"] == "api.openai.com"  # host rewritten

        denied = stack.request("GET", "/v1/models", host="example.com")
        assert denied.status == 403
        assert denied.header("content-type") == "application/json"
        assert denied.json()["error"]["code"] == "host_not_allowed"

        echoed = stack.request("GET", "/anything?x=1", host="other.example", headers={"Authorization": "Bearer k"})
        assert echoed.status == 200
        assert echoed.json()["path"] == "/echo/anything?x=1"
        assert echoed.json()["headers"]["authorization"] == "Bearer k"

        responses = stack.burst(50, "GET", "/v1/models")
        assert [r.status for r in responses] == [401] * 50


def test_token_listener_serves_only_get_token_on_127_0_0_1_and_follows_rotation(tmp_path, standins):
    with Stack("kubernetes", tmp_path, standins=standins, with_filter=False) as stack:
        port = stack.envoy.ports[envoy_config.TOKEN_LISTENER]
        bound = json.loads(stack.envoy.admin("/listeners?format=json"))
        (status,) = [s for s in bound["listener_statuses"] if s["name"] == envoy_config.TOKEN_LISTENER]
        assert status["local_address"]["socket_address"] == {"address": "127.0.0.1", "port_value": port}
        # Bound to 127.0.0.1 itself, not to every address: another loopback address is refused.
        assert "refused" in (http_request(port, "GET", "/token", address="127.0.0.2", timeout=2).error or "").lower()

        def served():
            response = http_request(port, "GET", "/token", host="localhost", timeout=2)
            return response.text if response.status == 200 else None

        token = standins.token_dir.current()
        assert served() == token
        for method, path in (("GET", "/"), ("GET", "/token/x"), ("GET", "/tokens"), ("GET", "/etc/passwd"),
                             ("POST", "/token"), ("PUT", "/token"), ("HEAD", "/token")):
            response = http_request(port, method, path, host="localhost", timeout=2)
            assert response.status == 404 and token.encode() not in response.body, (method, path, response)

        # A kubelet rotation (atomic ..data swap) is served within about a second.
        rotated = standins.token_dir.rotate()
        assert rotated != token
        stack.envoy.wait_for(lambda: served() == rotated, timeout_s=1.0, interval_s=0.02, what="the rotated token")


# With the filter: every identity source's cluster reaches its stand-in (needs `make build`).

EXPECTED_ACCOUNT = {"header": "sa_header", "kubernetes": "sa_k8s", "gcp_metadata": "sa_gcp",
                    "azure_imds": "sa_azure", "spiffe": "sa_spiffe"}


@pytest.mark.parametrize("source", SOURCES)
def test_each_source_obtains_a_token_through_its_cluster(source, make_stack, standins):
    stack = make_stack(source)
    headers = {"Authorization": "Bearer placeholder-not-a-secret"}
    if source == "header":
        headers[envoy_config.SUBJECT_HEADER] = standins.subject_token("system:serviceaccount:default:wiring")
    response = stack.request("POST", "/v1/chat/completions", host=f"localhost:{stack.envoy.port}", headers=headers,
                             body={"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status == 200, (response, stack.envoy.log_tail())
    assert response.header("x-standin-service-account") == EXPECTED_ACCOUNT[source]
    assert standins.openai.exchanges == 1
    path, authorization, seen = standins.openai.api_requests[-1]
    assert authorization.startswith("Bearer oaiwif_")
    assert envoy_config.SUBJECT_HEADER not in seen

    untouched = stack.request("GET", "/x", host="other.example", headers=headers)
    assert untouched.status == 200
    assert untouched.json()["headers"]["authorization"] == "Bearer placeholder-not-a-secret"
    assert standins.openai.exchanges == 1

    denied = stack.request("GET", "/v1/models", host="example.com", headers=headers)
    assert denied.status == 403
    assert standins.openai.exchanges == 1


def test_mtls_listener_and_access_log_in_a_real_envoy_without_the_filter(tmp_path, standins):
    """The gateway listener with mTLS, routing alone: a client certificate from the CA is verified and
    its SPIFFE ID printed in the access log; a certificate from another CA, or none where one is
    required, or plain HTTP, never gets a request through. Envoy's default removes a client's
    x-forwarded-client-cert before any filter; with ALWAYS_FORWARD_ONLY it reaches the filters but
    never OpenAI. No credential a request carries reaches the access log."""
    ca = TestCA(tmp_path / "pki")
    rogue = TestCA(tmp_path / "pki", name="another CA")
    spiffe_id = "spiffe://cluster.local/ns/ai/sa/inference"
    client, impostor = ca.client(spiffe_id), rogue.client(spiffe_id)
    secrets = {"Authorization": "Bearer sk-never-logged", "x-openai-subject-token": "subject-never-logged",
               "x-forwarded-client-cert": "By=spiffe://gw;URI=spiffe://cluster.local/ns/forged/sa/x"}

    with Stack("kubernetes", tmp_path / "required", standins=standins, with_filter=False,
               **ca.listener_overrides(require_client_certificate=True)) as stack:
        reached = stack.request("GET", "/v1/models?api_key=query-never-logged", headers=secrets,
                                tls=ca.client_context(client))
        assert reached.status == 401, reached  # the API stand-in: no filter, no token
        echoed = stack.request("GET", "/x", host="other.example", headers=secrets, tls=ca.client_context(client))
        assert echoed.status == 200 and "x-forwarded-client-cert" not in echoed.json()["headers"]
        for refused in (stack.request("GET", "/v1/models", tls=ca.client_context(None)),
                        stack.request("GET", "/v1/models", tls=rogue.client_context(impostor, server_ca=ca.ca_file)),
                        stack.request("GET", "/v1/models")):
            assert refused.status is None, refused
        entries = stack.envoy.wait_for_access_log(2)
        assert len(standins.openai.api_requests) == 1 and len(standins.openai.echo_requests) == 1
        first = entries[0]
        assert (first["peer"], first["status"], first["path"], first["method"]) == (spiffe_id, 401, "/v1/models", "GET")
        assert first["response_code_details"] == "via_upstream"
        assert all(first[name] is None for name in envoy_config.FILTER_STATE_FIELDS)
        assert entries[1]["path"] == "/x" and entries[1]["peer"] == spiffe_id
        log = stack.envoy.log_text()
        for value in ("sk-never-logged", "subject-never-logged", "query-never-logged", "ns/forged"):
            assert value not in log

    with Stack("kubernetes", tmp_path / "optional", standins=standins, with_filter=False,
               forward_client_cert="ALWAYS_FORWARD_ONLY",
               **ca.listener_overrides(require_client_certificate=False)) as stack:
        standins.openai.reset()
        without = stack.request("GET", "/v1/models", headers=secrets, tls=ca.client_context(None))
        assert without.status == 401, without
        assert "x-forwarded-client-cert" not in standins.openai.api_requests[-1][2]  # removed on the OpenAI route
        echoed = stack.request("GET", "/x", host="other.example", headers=secrets, tls=ca.client_context(None))
        assert echoed.json()["headers"]["x-forwarded-client-cert"] == secrets["x-forwarded-client-cert"]
        impostor_response = stack.request("GET", "/v1/models", tls=rogue.client_context(impostor, server_ca=ca.ca_file))
        assert impostor_response.status is None, impostor_response  # presented, so verified, and refused
        entries = stack.envoy.wait_for_access_log(2)
        assert entries[0]["peer"] is None and entries[0]["status"] == 401


# The x509 source: the gateway's certificate on both OpenAI clusters


def tls_context(cluster: dict) -> dict:
    return cluster["transport_socket"]["typed_config"]


@pytest.mark.parametrize("filename", X509_EXAMPLES)
def test_x509_clusters_present_the_same_certificate_and_verify_the_server(filename):
    bootstrap = example(filename)
    found = clusters(bootstrap)
    secrets = []
    for name, host in openai_clusters(filename):
        context = tls_context(found[name])
        assert context["sni"] == host
        (secret,) = context["common_tls_context"]["tls_certificate_sds_secret_configs"]
        assert "tls_certificates" not in context["common_tls_context"]  # SDS: rotation without a restart
        secrets.append(secret)
    assert secrets[0] == secrets[1]
    # Each exchange on a new connection: the TLS handshake presents the certificate as it is now.
    options = found[envoy_config.MTLS_AUTH_CLUSTER]["typed_extension_protocol_options"]
    assert options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["common_http_protocol_options"] == {
        "max_requests_per_connection": 1}
    sds = secrets[0]["sds_config"]
    assert sds["resource_api_version"] == "V3"
    if filename == "x509.yaml":
        assert secrets[0]["name"] == envoy_config.CLIENT_CERT_SECRET
        assert sds["path_config_source"] == {"path": "/etc/envoy/sds/openai-client-certificate.yaml",
                                             "watched_directory": {"path": "/etc/envoy/sds"}}
    else:
        assert secrets[0]["name"] == "default"  # the SPIRE agent's name for the workload's own SVID
        assert sds["api_config_source"] == {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [
            {"envoy_grpc": {"cluster_name": envoy_config.SDS_CLUSTER}}]}
        agent = found[envoy_config.SDS_CLUSTER]
        assert agent["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
            "pipe": {"path": "/run/spire/agent.sock"}}
        assert "http2_protocol_options" in json.dumps(agent["typed_extension_protocol_options"])
    assert bootstrap["node"]["id"] and bootstrap["node"]["cluster"]  # SDS needs both


@pytest.mark.parametrize("filename", X509_EXAMPLES)
def test_x509_filter_exchanges_at_the_mtls_token_endpoint_without_a_subject_token_type(filename):
    config = filter_json(example(filename))
    assert config["subject_token"] == {"source": "x509"}
    assert "subject_token_type" not in config
    assert config["token_endpoint"] == {"cluster": "openai_auth_mtls", "authority": "mtls.auth.openai.com",
                                        "path": "/oauth/token", "timeout_ms": 5000}


def test_x509_sds_file_names_the_mounted_secret_and_watches_it():
    shipped = yaml.safe_load((envoy_config.ENVOY_DIR / "sds" / "openai-client-certificate.yaml").read_text())
    (secret,) = shipped["resources"]
    assert secret["@type"] == "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    assert secret["name"] == envoy_config.CLIENT_CERT_SECRET
    assert secret["tls_certificate"] == {
        "certificate_chain": {"filename": "/var/run/secrets/openai-mtls/tls.crt"},
        "private_key": {"filename": "/var/run/secrets/openai-mtls/tls.key"},
        "watched_directory": {"path": "/var/run/secrets/openai-mtls"}}
    assert yaml.safe_load(envoy_config.sds_secret_file("/x/y/"))["resources"][0]["tls_certificate"][
        "watched_directory"] == {"path": "/x/y"}


@pytest.mark.parametrize("host", envoy_config.MTLS_API_HOSTS)
def test_x509_regional_api_host_is_the_route_sni_san_and_address(host):
    bootstrap = build("production", "x509", mtls_api_host=host)
    (route,) = virtual_hosts(bootstrap)["openai_api"]["routes"]
    assert route["route"]["cluster"] == envoy_config.MTLS_API_CLUSTER
    assert route["route"]["host_rewrite_literal"] == host
    api = clusters(bootstrap)[envoy_config.MTLS_API_CLUSTER]
    assert tls_context(api)["sni"] == host
    assert tls_context(api)["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": host}}]
    assert api["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": host, "port_value": 443}}
    # The token endpoint is not regional; the filter's hosts stay the callers' names.
    assert tls_context(clusters(bootstrap)[envoy_config.MTLS_AUTH_CLUSTER])["sni"] == "mtls.auth.openai.com"
    assert set(virtual_hosts(bootstrap)["openai_api"]["domains"]) >= {"api.openai.com", "api.openai.com:*"}


def test_x509_local_profile_uses_tls_to_the_stand_ins_with_the_test_ca():
    local = build("local", "x509", ca_file="/tmp/test-ca.crt", client_cert_sds_file="/tmp/sds/client.yaml",
                  filter_config={"x": 1}, **LOCAL_PORTS)
    production = build("production", "x509")
    for name, host in ((envoy_config.MTLS_API_CLUSTER, "mtls.api.openai.com"),
                       (envoy_config.MTLS_AUTH_CLUSTER, "mtls.auth.openai.com")):
        cluster = clusters(local)[name]
        assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
            "socket_address": {"address": "127.0.0.1", "port_value": 18001}}
        context = tls_context(cluster)
        assert context["sni"] == host
        assert context["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": "/tmp/test-ca.crt"}
        (secret,) = context["common_tls_context"]["tls_certificate_sds_secret_configs"]
        assert secret["sds_config"]["path_config_source"] == {"path": "/tmp/sds/client.yaml",
                                                              "watched_directory": {"path": "/tmp/sds"}}
    assert set(clusters(local)) == set(clusters(production))
    for profile, kwargs in (("production", {}), ("local", LOCAL_PORTS)):
        text = envoy_config.render(profile, "x509", header="h", **kwargs)
        assert "__note_" not in text and "&id" not in text  # no YAML anchors between the two clusters
        assert yaml.safe_load(text) == build(profile, "x509", **kwargs)
    with pytest.raises(ValueError, match="client_certificate"):
        build("production", "x509", client_certificate="vault")
