"""End to end, the x509 source: a real Envoy (2 workers) whose token-endpoint and API clusters
present the gateway's client certificate (delivered by SDS from a watched file naming a kubelet-style
Secret directory, or pushed by an SPIRE-like SDS server on a unix socket), in front of the X.509 stand-in (tests/standins/x509.py), with real TLS on both
hops: mtls.auth.openai.com for the exchange, mtls.api.openai.com (or a regional host) for the API.
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from tests.harness import Envoy, TestCA, module_path
from tests.standins.sds import SdsStandin
from tests.standins.x509 import SERVER_NAMES, X509_TOKEN_TYPE, X509Standin, _fingerprint, x509_mapping
from tools import envoy_config

PROVIDER = "wip_x509"
ACCOUNT = "sa_x509"
GATEWAY_ID = "spiffe://example.com/ns/egress/sa/openai-gateway"
EXCHANGE_FIELDS = sorted(["grant_type", "subject_token_type", "identity_provider_id", "service_account_id"])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    root = TestCA(directory, "mesh root")
    issuing = root.intermediate("mesh issuing CA")
    other = TestCA(directory, "unaccepted root")  # uploaded, never activated
    return {"root": root, "issuing": issuing, "other": other,
            "server": root.server(names=SERVER_NAMES, addresses=("127.0.0.1",))}


@pytest.fixture(scope="module")
def standin_server(pki):
    server = X509Standin(pki["server"], trusted_cas=[pki["root"], pki["other"]], activated_roots=[pki["root"]],
                         intermediates=[pki["issuing"]])
    server.add_provider(PROVIDER, [x509_mapping(ACCOUNT, sub="spiffe://example.com/ns/egress/*"),
                                   x509_mapping("sa_inference", sub=GATEWAY_ID),
                                   x509_mapping("sa_batch", sub=GATEWAY_ID)])
    with server:
        yield server


@pytest.fixture
def standin(standin_server):
    standin_server.reset()
    yield standin_server
    standin_server.reset()


def fingerprint(files) -> str:
    return _fingerprint(x509.load_pem_x509_certificates(Path(files.cert).read_bytes())[0])


def not_after(files) -> float:
    return x509.load_pem_x509_certificates(Path(files.cert).read_bytes())[0].not_valid_after_utc.timestamp()


class SecretDir:
    """A Kubernetes Secret volume: tls.crt and tls.key are symlinks into ..data, which kubelet swaps
    atomically (a rename into the directory) on every update."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True)
        for name in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", root / name)
        self.version = 0

    def install(self, files):
        self.version += 1
        target = self.root / f"..{self.version}"
        target.mkdir()
        shutil.copyfile(files.cert, target / "tls.crt")
        shutil.copyfile(files.key, target / "tls.key")
        os.symlink(target.name, self.root / "..data_tmp")
        os.rename(self.root / "..data_tmp", self.root / "..data")


class Gateway:
    def __init__(self, workdir: Path, standin: X509Standin, pki: dict, certificate, **settings):
        self.workdir = workdir
        self.secret = SecretDir(workdir / "openai-mtls")
        self.secret.install(certificate)
        sds_dir = workdir / "sds"
        sds_dir.mkdir()
        sds_file = sds_dir / "openai-client-certificate.yaml"
        sds_file.write_text(envoy_config.sds_secret_file(str(self.secret.root)))
        overrides = settings.pop("overrides", {})
        hosts = envoy_config.params("local").api_hosts
        self.filter_config = envoy_config.filter_config("x509", PROVIDER, ACCOUNT, hosts=hosts, **settings)
        config = envoy_config.render("local", "x509", openai_port=standin.port, module=str(module_path()),
                                     filter_config=self.filter_config, ca_file=pki["root"].ca_file,
                                     client_cert_sds_file=str(sds_file), **overrides)
        self.envoy = Envoy(config, workdir)

    def __enter__(self):
        self.envoy.start()
        return self

    def __exit__(self, *exc):
        self.envoy.stop()

    def request(self, path="/v1/models", **kwargs):
        return self.envoy.request("GET", path, "api.openai.com", **kwargs)


def failure(gateway, standin) -> str:
    return (f"exchanges {standin.exchange_log[-3:]}; handshake failures {standin.handshake_failures[-3:]}; "
            f"envoy log:\n{gateway.envoy.log_tail(25)}")


def test_a_burst_makes_one_exchange_without_a_subject_token_and_the_api_sees_bearer_and_certificate(
        tmp_path, standin, pki):
    certificate = pki["issuing"].client(GATEWAY_ID)
    with Gateway(tmp_path, standin, pki, certificate) as gateway:
        responses = gateway.envoy.burst(60, "GET", "/v1/models", "api.openai.com")
        assert [r.status for r in responses].count(200) == 60, (responses[:3], failure(gateway, standin))
        assert {r.header("x-standin-service-account") for r in responses} == {ACCOUNT}
        assert {r.header("x-standin-client-subject") for r in responses} == {GATEWAY_ID}
        assert standin.exchanges == 1, failure(gateway, standin)
        (exchange,) = standin.exchange_log
        assert exchange["ok"] and exchange["fields"] == EXCHANGE_FIELDS
        assert "subject_token" not in exchange["body"]
        assert exchange["body"]["subject_token_type"] == X509_TOKEN_TYPE
        assert (exchange["identity_provider_id"], exchange["service_account_id"]) == (PROVIDER, ACCOUNT)
        assert exchange["sub"] == GATEWAY_ID and exchange["fingerprint"] == fingerprint(certificate)
        # The API saw the bearer the endpoint issued and the same certificate, on every request.
        assert len(standin.api_log) == 60
        assert {e["authorization"] for e in standin.api_log} == {f"Bearer {exchange['token']}"}
        assert {e["client_fingerprint"] for e in standin.api_log} == {fingerprint(certificate)}
        assert {e["host"] for e in standin.api_log} == {"mtls.api.openai.com"}
        assert {e["headers"]["host"] for e in standin.api_log} == {"mtls.api.openai.com"}


def test_an_unaccepted_certificate_is_a_502_naming_the_certificate_problem(tmp_path, standin, pki):
    stranger = pki["other"].client(GATEWAY_ID)
    with Gateway(tmp_path, standin, pki, stranger) as gateway:
        response = gateway.request()
        assert response.status == 502, (response, failure(gateway, standin))
        error = response.json()["error"]
        assert error["code"] == "token_exchange_failed"
        assert "invalid_subject_token" in error["message"], error
        assert "activated root" in error["message"], error
        assert "HTTP 401" in error["message"], error
        assert response.header("x-openai-wif-error") == "token_exchange_failed"
        assert standin.api_log == []  # nothing reached the API
        assert standin.exchanges_ok == 0 and standin.rejections[0]["reason"] == "invalid_subject_token"


def test_a_certificate_that_expires_in_seconds_is_never_outlived_and_the_rotated_one_is_used(
        tmp_path, standin, pki):
    lifetime = 10  # the refresh at 80 % leaves 2 s before the expiry, on a loaded machine too
    short = pki["issuing"].client(GATEWAY_ID, lifetime_s=lifetime)
    renewed = pki["issuing"].client(GATEWAY_ID)
    with Gateway(tmp_path, standin, pki, short) as gateway:
        first = gateway.request()
        assert first.status == 200, (first, failure(gateway, standin))
        (exchange,) = [e for e in standin.exchange_log if e["ok"]]
        assert exchange["fingerprint"] == fingerprint(short) and exchange["expires_in"] <= lifetime
        # The mesh rotates the certificate (as kubelet updates a Secret volume) before it expires.
        gateway.secret.install(renewed)
        statuses = []
        deadline = time.time() + lifetime + 6
        while time.time() < deadline:
            statuses.append(gateway.request().status)
            if any(e["ok"] and e["fingerprint"] == fingerprint(renewed) for e in standin.exchange_log) \
                    and time.time() > not_after(short) + 1:
                break
            time.sleep(0.1)
        assert time.time() > not_after(short), failure(gateway, standin)
        after = gateway.request()
        assert after.status == 200, (after, failure(gateway, standin))
        # The token issued for the short-lived certificate was never presented past its expiry.
        first_token = f"Bearer {exchange['token']}"
        used = [e["time"] for e in standin.api_log if e["authorization"] == first_token]
        assert used and max(used) < not_after(short), failure(gateway, standin)
        # Every exchange after the rotation presented the renewed certificate.
        later = standin.exchange_log[1:]
        assert later and {e["fingerprint"] for e in later} == {fingerprint(renewed)}, failure(gateway, standin)
        assert all(e["ok"] for e in later), failure(gateway, standin)
        # (An API connection opened before the rotation may still carry the old certificate: it was
        # valid at its handshake, which is where a TLS server checks it.)
        assert statuses.count(200) == len(statuses), (statuses, failure(gateway, standin))


@pytest.mark.parametrize("host", ["mtls-us.api.openai.com", "mtls-eu.api.openai.com"])
def test_the_regional_mtls_api_host(tmp_path, standin, pki, host):
    certificate = pki["issuing"].client(GATEWAY_ID)
    with Gateway(tmp_path, standin, pki, certificate, overrides={"mtls_api_host": host}) as gateway:
        response = gateway.request()
        assert response.status == 200, (response, failure(gateway, standin))
        assert [e["host"] for e in standin.api_log] == [host]
        assert standin.api_log[0]["client_fingerprint"] == fingerprint(certificate)
        assert standin.exchanges == 1


def test_the_api_refuses_the_bearer_without_the_certificate(tmp_path, standin, pki):
    """The stand-in checks both: the bearer the gateway obtained is not enough on its own."""
    certificate = pki["issuing"].client(GATEWAY_ID)
    with Gateway(tmp_path, standin, pki, certificate) as gateway:
        assert gateway.request().status == 200, failure(gateway, standin)
        token = standin.exchange_log[0]["token"]
    context = pki["root"].client_context(pki["other"].client("spiffe://example.com/ns/egress/sa/other"))
    connection = http.client.HTTPSConnection("127.0.0.1", standin.port, timeout=5, context=context)
    try:
        connection.request("GET", "/v1/models", headers={"Host": "mtls.api.openai.com",
                                                         "Authorization": f"Bearer {token}"})
        assert connection.getresponse().status == 403
    finally:
        connection.close()



def test_without_a_rotation_the_token_dies_with_the_certificate(tmp_path, standin, pki):
    lifetime = 5
    short = pki["issuing"].client(GATEWAY_ID, lifetime_s=lifetime)
    with Gateway(tmp_path, standin, pki, short) as gateway:
        assert gateway.request().status == 200, failure(gateway, standin)
        token = f"Bearer {standin.exchange_log[0]['token']}"
        late = []
        deadline = not_after(short) + 3
        while time.time() < deadline:
            response = gateway.request()
            if time.time() > not_after(short) + 0.5:
                late.append(response)
            time.sleep(0.1)
        used = [e["time"] for e in standin.api_log if e["authorization"] == token]
        assert used and max(used) < not_after(short), failure(gateway, standin)
        assert late and all(r.status == 502 for r in late), (late[:3], failure(gateway, standin))
        assert "invalid_subject_token" in late[-1].json()["error"]["message"]
        assert "validity" in late[-1].json()["error"]["message"]


def test_a_refused_handshake_is_a_503_token_endpoint_unavailable(tmp_path, standin, pki):
    unknown = TestCA(tmp_path / "pki", "never uploaded").client(GATEWAY_ID)
    with Gateway(tmp_path, standin, pki, unknown) as gateway:
        response = gateway.request()
        assert response.status == 503, (response, failure(gateway, standin))
        assert response.json()["error"]["code"] == "token_endpoint_unavailable"
        assert standin.handshake_failures and standin.exchanges == 0 and standin.api_log == []


def test_caller_rules_give_each_mesh_caller_its_service_account_with_the_gateways_certificate(
        tmp_path, standin, pki):
    callers = TestCA(tmp_path / "callers", "callers CA")
    inference = callers.client("spiffe://cluster.local/ns/ai/sa/inference")
    job = callers.client("spiffe://cluster.local/ns/batch/sa/job")
    rogue = callers.client("spiffe://cluster.local/ns/other/sa/rogue")
    rules = [{"name": "inference", "principals": [inference.uris[0]], "service_account_id": "sa_inference"},
             {"name": "batch", "principals": ["spiffe://cluster.local/ns/batch/*"], "service_account_id": "sa_batch"}]
    certificate = pki["issuing"].client(GATEWAY_ID)
    with Gateway(tmp_path, standin, pki, certificate, callers=rules,
                 overrides=callers.listener_overrides()) as gateway:
        for _ in range(3):
            for who, account in ((inference, "sa_inference"), (job, "sa_batch")):
                response = gateway.request(tls=callers.client_context(who))
                assert response.status == 200, (response, failure(gateway, standin))
                assert response.header("x-standin-service-account") == account
        refused = gateway.request(tls=callers.client_context(rogue))
        assert refused.status == 403 and refused.json()["error"]["code"] == "caller_not_allowed"
        ok = [e for e in standin.exchange_log if e["ok"]]
        assert sorted(e["service_account_id"] for e in ok) == ["sa_batch", "sa_inference"], failure(gateway, standin)
        assert {e["fingerprint"] for e in ok} == {fingerprint(certificate)}
        assert {e["client_fingerprint"] for e in standin.api_log} == {fingerprint(certificate)}


def test_the_spire_agent_variant_presents_the_svid_it_pushes_and_the_rotated_one(tmp_path, standin, pki):
    lifetime = 6
    short = pki["issuing"].client(GATEWAY_ID, lifetime_s=lifetime)
    renewed = pki["issuing"].client(GATEWAY_ID)
    socket_dir = Path(tempfile.mkdtemp(prefix="wif-sds-", dir="/tmp"))
    try:
        with SdsStandin(str(socket_dir / "agent.sock"), {"default": short}) as agent, \
                Gateway(tmp_path, standin, pki, short, overrides={
                    "client_certificate": "sds", "spiffe_socket": agent.socket_path}) as gateway:
            # Envoy adds the mTLS clusters once the agent has delivered the secret; a warm-up exchange
            # on the filter's first tick can come before that (the cluster does not exist yet) and is
            # then retried after its backoff.
            early = []
            deadline = time.time() + 20
            while time.time() < deadline:
                first = gateway.request()
                if first.status == 200:
                    break
                early.append(first)
                time.sleep(0.2)
            assert first.status == 200, (first, early[:2], failure(gateway, standin))
            assert all(r.json()["error"]["code"] == "token_endpoint_unavailable" for r in early), early[:2]
            print(f"requests refused before the first exchange: {len(early)}")
            assert standin.exchange_log[0]["fingerprint"] == fingerprint(short)
            assert "default" in agent.requests[0]["resource_names"]
            agent.update("default", renewed)  # the agent rotates the SVID and pushes it
            deadline = time.time() + lifetime + 6
            while time.time() < deadline and not any(
                    e["ok"] and e["fingerprint"] == fingerprint(renewed) for e in standin.exchange_log):
                assert gateway.request().status == 200, failure(gateway, standin)
                time.sleep(0.1)
            later = standin.exchange_log[1:]
            assert later and {e["fingerprint"] for e in later} == {fingerprint(renewed)}, failure(gateway, standin)
            assert gateway.request().status == 200
            assert not any(r["nack"] for r in agent.requests), agent.requests
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
