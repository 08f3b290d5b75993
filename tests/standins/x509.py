"""OpenAI stand-in for X.509 workload identity: the mTLS token endpoint and the mTLS API, on one
TLS port, told apart by :authority as OpenAI's hosts are (`mtls.auth.openai.com` for the token
endpoint; `mtls.api.openai.com`, `mtls-us.api.openai.com`, `mtls-eu.api.openai.com` for the API).

    standin = X509Standin(server_cert, trusted_cas=[ca.ca_file, other.ca_file], activated_roots=[ca])
    standin.add_provider("wip_x509", [x509_mapping("sa_x509", sub="spiffe://example.com/ns/ai/*")])
    standin.start()   # https://127.0.0.1:<port>

The token endpoint follows OpenAI's contract for X.509 workload identity:
- only exact `POST /oauth/token` (anything else: 403);
- the client certificate (leaf + intermediates) comes in the TLS handshake; the JSON body has
  grant_type (token exchange), subject_token_type `urn:openai:params:oauth:token-type:x509`,
  identity_provider_id and service_account_id, and no `subject_token` (a body with one: 400);
- the subject is derived from the certificate: its SPIFFE URI SAN, else its common name; the
  provider's mappings (subject -> service account, one trailing `*`, as in openai.py) decide;
- `expires_in` is min(3600 or the configured cap, the certificate's notAfter - now);
- errors are OAuth errors `{"error", "error_description"}`: `invalid_subject_token` (401) for a
  missing, malformed, untrusted or expired certificate, `invalid_grant` (400) for provider and
  mapping problems, `invalid_request` / `unsupported_grant_type` (400) for the body.

The TLS layer trusts `trusted_cas` (every CA the stand-in knows, like a TLS front end that takes any
uploaded root), with CERT_REQUIRED by default (a connection without a client certificate fails the
handshake) and without the time check (an expired certificate is refused by the endpoint itself,
with its OAuth error). Whether the chain reaches an *activated* root is the endpoint's decision.
`require_certificate=False` accepts a handshake without a certificate (then: 401
invalid_subject_token).

The API (`/v1/...`) checks the client certificate (accepted: chain to an activated root, valid
when the connection was opened, as a TLS server checks it once per handshake; else 403) and the bearer (issued here, not expired; else 401) independently: the bearer is
not bound to the certificate. It reports `x-standin-sub`, `x-standin-service-account` and
`x-standin-client-subject` (the subject of the certificate on this connection), and records every
request in `api_log`. Python 3.11's ssl shows only the peer's leaf certificate, so the chain is
walked from the leaf through the CAs the stand-in was given (`trusted_cas` and `intermediates`).
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from .http_server import RESET, HttpStandin, Reply, Request, _Handler, _Server
from .openai import GRANT_TYPE, ISSUED_TOKEN_TYPE, OpenAIStandin, mapping_matches, openai_error

X509_TOKEN_TYPE = "urn:openai:params:oauth:token-type:x509"
AUTH_HOST = "mtls.auth.openai.com"
API_HOSTS = ("mtls.api.openai.com", "mtls-us.api.openai.com", "mtls-eu.api.openai.com")
SERVER_NAMES = (AUTH_HOST, *API_HOSTS, "localhost")
X509_FIELDS = ("grant_type", "subject_token_type", "identity_provider_id", "service_account_id")
_NO_CHECK_TIME = 0x200000  # OpenSSL's X509_V_FLAG_NO_CHECK_TIME


class OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str):
        super().__init__(f"{error}: {description}")
        self.status, self.error, self.description = status, error, description

    def reply(self) -> Reply:
        return Reply.json(self.status, {"error": self.error, "error_description": self.description},
                          [("Cache-Control", "no-store")])


def x509_mapping(service_account_id: str, **facts) -> dict:
    """A mapping on certificate facts: `sub` (the derived subject), `cn`, `uri` (any URI SAN), `dns`."""
    return {"service_account_id": service_account_id, "claims": facts}


def _load_pem_certificates(path) -> list:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()


def certificate_facts(certificate: x509.Certificate) -> dict:
    """What an attribute transformation can see: sub (SPIFFE URI SAN, else CN), cn, uri, dns."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        uris, dns = [], []
    cns = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return {"sub": spiffe[0] if spiffe else cn, "cn": cn, "uri": uris, "dns": dns}


class _TlsServer(_Server):
    """The stand-ins' HTTP server with TLS; the handshake runs in the connection's own thread."""

    def finish_request(self, request, client_address):
        standin = self.standin
        try:
            connection = standin.tls_context.wrap_socket(request, server_side=True)  # detaches `request`
        except (ssl.SSLError, OSError) as error:
            standin._handshake_failed(error)
            return
        with self._open_lock:
            self._open.add(connection)
        try:
            der = connection.getpeercert(binary_form=True)
            standin._peer.certificate = x509.load_der_x509_certificate(der) if der else None
            standin._peer.opened = datetime.datetime.now(datetime.timezone.utc)
            self.RequestHandlerClass(connection, client_address, self)
        except (ssl.SSLError, OSError):
            pass
        finally:
            standin._peer.certificate = None
            with self._open_lock:
                self._open.discard(connection)
            try:
                connection.close()
            except OSError:
                pass


class X509Standin(OpenAIStandin):
    def __init__(self, server, trusted_cas=(), activated_roots=(), intermediates=(), default_expires_in: int = 3600,
                 require_certificate: bool = True):
        """server: CertFiles of the serving certificate (names: SERVER_NAMES);
        trusted_cas: CA files the TLS layer accepts client certificates from;
        activated_roots: TestCA objects or CA files whose chains the endpoint and the API accept;
        intermediates: CA files of intermediates (the leaf's chain is walked through them)."""
        super().__init__(default_expires_in=default_expires_in)
        self.server_files = server
        self.trusted_cas = [str(getattr(ca, "ca_file", ca)) for ca in trusted_cas]
        self.require_certificate = require_certificate
        self.x509_providers: dict = {}  # provider id -> [x509_mapping(...)]
        self._known: dict = {}  # subject name (DER) -> CA certificate
        for path in [*self.trusted_cas, *(str(getattr(ca, "ca_file", ca)) for ca in intermediates)]:
            for certificate in _load_pem_certificates(path):
                self._known[certificate.subject.public_bytes()] = certificate
        self.activated: set = set()
        for root in activated_roots:
            self.activate(root)
        self._peer = threading.local()
        self._peer.certificate = None
        self.tls_context = self._make_context()

    def _make_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.server_files.cert, self.server_files.key)
        for path in self.trusted_cas:
            context.load_verify_locations(cafile=path)
        context.verify_mode = ssl.CERT_REQUIRED if self.require_certificate else ssl.CERT_OPTIONAL
        context.verify_flags = context.verify_flags | _NO_CHECK_TIME
        context.set_alpn_protocols(["http/1.1"])
        return context

    def reset(self):
        super().reset()
        with self._lock:
            self.handshake_failures: list = []  # str(error) of each refused TLS handshake
            self.api_log: list = []  # {"host", "path", "authorization", "client_subject", "client_fingerprint", "status"}

    def activate(self, root):
        """Accept chains that end at this root (a TestCA or a CA file), as after uploading and
        activating it in the organisation's Mutual TLS settings."""
        path = str(getattr(getattr(root, "root", root), "ca_file", root))
        for certificate in _load_pem_certificates(path):
            self.activated.add(_fingerprint(certificate))
            self._known.setdefault(certificate.subject.public_bytes(), certificate)

    def deactivate(self, root):
        path = str(getattr(getattr(root, "root", root), "ca_file", root))
        for certificate in _load_pem_certificates(path):
            self.activated.discard(_fingerprint(certificate))

    def add_provider(self, provider_id: str, mappings: list):  # noqa: D401 - a different signature on purpose
        self.x509_providers[provider_id] = list(mappings)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self):
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _TlsServer(("127.0.0.1", self.port or 0), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{type(self).__name__}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def _handshake_failed(self, error):
        with self._lock:
            self.handshake_failures.append(f"{type(error).__name__}: {error}")

    # Certificates

    def check_certificate(self, certificate, at: datetime.datetime | None = None) -> dict:
        """The certificate's facts if the endpoint accepts it (valid at `at`, default now); else
        OAuthError(401, invalid_subject_token)."""
        if certificate is None:
            raise OAuthError(401, "invalid_subject_token", "no client certificate was presented")
        now = at or datetime.datetime.now(datetime.timezone.utc)
        chain = [certificate]
        while True:
            current = chain[-1]
            issuer = self._known.get(current.issuer.public_bytes())
            if issuer is None:
                raise OAuthError(401, "invalid_subject_token", "certificate chain does not reach an activated root")
            try:
                current.verify_directly_issued_by(issuer)
            except Exception:
                raise OAuthError(401, "invalid_subject_token", "certificate signature does not verify")
            if issuer.subject == issuer.issuer or len(chain) > 8:
                chain.append(issuer)
                break
            chain.append(issuer)
        if _fingerprint(chain[-1]) not in self.activated:
            raise OAuthError(401, "invalid_subject_token", "certificate chain does not reach an activated root")
        for link in chain:
            if not (link.not_valid_before_utc <= now < link.not_valid_after_utc):
                raise OAuthError(401, "invalid_subject_token", "certificate is outside its validity period")
        facts = certificate_facts(certificate)
        if not facts["sub"]:
            raise OAuthError(401, "invalid_subject_token", "certificate has neither a SPIFFE URI SAN nor a CN")
        facts["not_after"] = certificate.not_valid_after_utc.timestamp()
        facts["fingerprint"] = _fingerprint(certificate)
        return facts

    # HTTP

    def early(self, request: Request):
        return None

    def handle(self, request: Request):
        host, _, port = (request.header("host") or "").rpartition(":")
        if not port.isdigit():
            host = request.header("host") or ""
        if host == AUTH_HOST:
            if request.method != "POST" or request.target != "/oauth/token":
                return Reply.json(403, {"error": "access_denied",
                                        "error_description": "only POST /oauth/token is accepted"})
            return self._x509_token_endpoint(request)
        if host in API_HOSTS and request.path.startswith("/v1/"):
            return self._mtls_api(request, host)
        return Reply.json(404, openai_error(f"Unknown host or path {host} {request.path}", "not_found"))

    def _x509_token_endpoint(self, request: Request):
        fault = self._take_fault()
        while not self._released.wait(0.05):
            if self._stopping.is_set():
                return RESET
        if fault == "reset":
            self._log(None, None, False, "fault:reset")
            return RESET
        if fault == "500":
            self._log(None, None, False, "fault:500")
            return Reply.json(500, {"error": "server_error", "error_description": "internal error"})
        if fault == "slow" and self.pause(self.slow_seconds):
            return RESET
        body, facts = None, None
        try:
            try:
                body = request.json()
            except Exception:
                raise OAuthError(400, "invalid_request", "the body is not JSON")
            service_account_id, provider_id = self._check_body(request, body)
            facts = self.check_certificate(self._peer.certificate)
            self._check_mapping(provider_id, service_account_id, facts)
        except OAuthError as refusal:
            self._log(body, facts, False, refusal.error, refusal.description)
            return refusal.reply()
        cap = self.expires_in_override if self.expires_in_override is not None else self.default_expires_in
        remaining = int(facts["not_after"] - time.time())
        if remaining < 1:
            refusal = OAuthError(401, "invalid_subject_token", "certificate is outside its validity period")
            self._log(body, facts, False, refusal.error, refusal.description)
            return refusal.reply()
        expires_in = int(min(cap, remaining))
        token = "oaiwif_" + secrets.token_urlsafe(32)
        with self._lock:
            self.issued[token] = {"sub": facts["sub"], "service_account_id": service_account_id,
                                  "identity_provider_id": provider_id, "expires_at": time.time() + expires_in,
                                  "revoked": False, "fingerprint": facts["fingerprint"]}
        self._log(body, facts, True, None, token=token, expires_in=expires_in)
        return Reply.json(200, {"access_token": token, "issued_token_type": ISSUED_TOKEN_TYPE,
                                "token_type": "Bearer", "expires_in": expires_in}, [("Cache-Control", "no-store")])

    def _check_body(self, request: Request, body):
        content_type = (request.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise OAuthError(400, "invalid_request", "the body must be application/json")
        if not isinstance(body, dict):
            raise OAuthError(400, "invalid_request", "the body must be a JSON object")
        if "subject_token" in body:
            raise OAuthError(400, "invalid_request",
                             "subject_token must not be sent: the client certificate is the subject token")
        for name in X509_FIELDS:
            if not isinstance(body.get(name), str) or not body[name]:
                raise OAuthError(400, "invalid_request", f"missing {name}")
        if body["grant_type"] != GRANT_TYPE:
            raise OAuthError(400, "unsupported_grant_type", "grant_type must be token-exchange")
        if body["subject_token_type"] != X509_TOKEN_TYPE:
            raise OAuthError(400, "invalid_request", f"subject_token_type must be {X509_TOKEN_TYPE}")
        return body["service_account_id"], body["identity_provider_id"]

    def _check_mapping(self, provider_id: str, service_account_id: str, facts: dict):
        mappings = self.x509_providers.get(provider_id)
        if mappings is None:
            raise OAuthError(400, "invalid_grant", "unknown identity provider")
        candidates = [m for m in mappings if m["service_account_id"] == service_account_id]
        if not candidates:
            raise OAuthError(400, "invalid_grant", "the service account is not mapped for this provider")
        if not any(mapping_matches(m["claims"], facts) for m in candidates):
            raise OAuthError(400, "invalid_grant", "no mapping matches the certificate's subject")

    def _log(self, body, facts, ok: bool, reason, detail: str = "", **extra):
        body = body if isinstance(body, dict) else {}
        entry = {"time": time.time(), "ok": ok, "reason": reason, "detail": detail,
                 "sub": (facts or {}).get("sub"),
                 "fingerprint": (facts or {}).get("fingerprint") or self._peer_fingerprint(),
                 "service_account_id": body.get("service_account_id"),
                 "identity_provider_id": body.get("identity_provider_id"),
                 "fields": sorted(body), "body": body, **extra}
        with self._lock:
            self.exchange_log.append(entry)
            if ok:
                self.exchanges_ok += 1
            elif reason and not reason.startswith("fault:"):
                self.last_rejection = reason
                self.rejections.append({"reason": reason, "detail": detail, "time": entry["time"]})

    def _peer_fingerprint(self):
        certificate = getattr(self._peer, "certificate", None)
        return _fingerprint(certificate) if certificate is not None else None

    # API

    def _mtls_api(self, request: Request, host: str):
        authorization = request.header("authorization")
        certificate = self._peer.certificate
        entry = {"time": time.time(), "host": host, "path": request.path, "authorization": authorization,
                 "client_subject": certificate_facts(certificate)["sub"] if certificate is not None else None,
                 "client_fingerprint": _fingerprint(certificate) if certificate is not None else None,
                 "headers": request.headers}
        with self._lock:
            self.api_requests.append((request.path, authorization, request.headers))
            self.api_log.append(entry)
        try:
            self.check_certificate(certificate, at=getattr(self._peer, "opened", None))
        except OAuthError as refusal:
            entry["status"] = 403
            with self._lock:
                self.api_denied += 1
            return Reply.json(403, openai_error(f"Client certificate not accepted: {refusal.description}",
                                                "invalid_client_certificate"))
        record = self._authorised(authorization)
        if record is None:
            entry["status"] = 401
            with self._lock:
                self.api_denied += 1
            return Reply.json(401, openai_error(
                "Incorrect API key provided. The access token is missing, unknown, revoked or expired.",
                "invalid_api_key"))
        entry["status"] = 200
        with self._lock:
            self.api_ok += 1
        headers = self._identity_headers(record) + [("x-standin-client-subject", entry["client_subject"] or "")]
        return Reply.json(200, self._api_body(request, record), headers)
