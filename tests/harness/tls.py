"""A test certificate authority: a server certificate for the gateway and client certificates whose
URI SANs are SPIFFE IDs, as an Istio or SPIRE mesh issues them, written to a directory.

    ca = TestCA(tmp_path / "pki")
    server = ca.server()                                     # CertFiles for the gateway's listener
    inference = ca.client("spiffe://cluster.local/ns/ai/sa/inference")
    envoy.request("GET", "/v1/models", tls=ca.client_context(inference))
    ca.listener_overrides()   # render() parameters: mTLS on the gateway listener with these files

Keys are ECDSA P-256 (fast to make). Certificates are valid from an hour ago for a day, unless a
lifetime is given (a client certificate that expires in seconds).

    issuing = ca.intermediate("issuing CA")   # signed by ca; its leaves' files carry the chain
    workload = issuing.client("spiffe://example.com/ns/ai/sa/chat", lifetime_s=8)
    ca.server(names=("mtls.auth.openai.com",))  # a serving certificate for other names
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "api.openai.com", "openai-egress.internal")


@dataclass(frozen=True)
class CertFiles:
    cert: str  # PEM certificate
    key: str  # PEM private key (unencrypted PKCS#8)
    uris: tuple = ()  # the URI SANs, in certificate order


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "openai-wif tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-80:] or "cert"


class TestCA:
    """A self-signed root that signs leaf certificates; everything is written under `directory`."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory, name: str = "openai-wif test CA", parent: "TestCA | None" = None):
        """parent: the CA that signs this one (an intermediate); None: a self-signed root."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.parent = parent
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._subject = _name(name)
        issuer_name, issuer_key = (parent._subject, parent._key) if parent else (self._subject, self._key)
        self._cert = (x509.CertificateBuilder()
                      .subject_name(self._subject).issuer_name(issuer_name)
                      .public_key(self._key.public_key())
                      .serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(hours=1))
                      .not_valid_after(now + datetime.timedelta(days=1))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=0 if parent else 1),
                                     critical=True)
                      .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                   content_commitment=False, key_encipherment=False,
                                                   data_encipherment=False, key_agreement=False,
                                                   encipher_only=False, decipher_only=False), critical=True)
                      .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                                     critical=False)
                      .sign(issuer_key, hashes.SHA256()))
        # ca_file: this CA's certificate alone (for a root: the trust anchor to configure).
        self.ca_file = str(self.directory / f"{_slug(name)}.ca.crt")
        Path(self.ca_file).write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._server: dict = {}
        self._contexts: dict = {}
        self._serial = 0

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def root(self) -> "TestCA":
        return self.parent.root if self.parent else self

    def _chain_pem(self) -> bytes:
        """The intermediates a leaf of this CA is sent with (none for a root), nearest first."""
        if self.parent is None:
            return b""
        return self._cert.public_bytes(serialization.Encoding.PEM) + self.parent._chain_pem()

    def intermediate(self, name: str) -> "TestCA":
        """An intermediate CA signed by this one; the certificate files of its leaves hold the leaf
        and then the intermediates (what a workload sends in the TLS handshake)."""
        return TestCA(self.directory, name, parent=self)

    def _issue(self, file_stem: str, common_name: str, sans: list, usage, lifetime_s: float | None = None) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        not_after = now + (datetime.timedelta(seconds=lifetime_s) if lifetime_s is not None
                           else datetime.timedelta(days=1))
        builder = (x509.CertificateBuilder()
                   .subject_name(_name(common_name)).issuer_name(self._subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                                  critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{file_stem}.crt"
        key_path = self.directory / f"{file_stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self._chain_pem())
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        uris = tuple(san.value for san in sans if isinstance(san, x509.UniformResourceIdentifier))
        return CertFiles(str(cert_path), str(key_path), uris)

    def server(self, names=SERVER_NAMES, addresses=("127.0.0.1",)) -> CertFiles:
        """A serving certificate for these names (made once per set of names; the default: the
        gateway's)."""
        key = (tuple(names), tuple(addresses))
        if key not in self._server:
            sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
            stem = f"{_slug(self.name)}.server" + (f".{len(self._server)}" if self._server else "")
            self._server[key] = self._issue(stem, names[0], sans, ExtendedKeyUsageOID.SERVER_AUTH)
        return self._server[key]

    def client(self, *uris: str, dns=(), cn: str | None = None, lifetime_s: float | None = None) -> CertFiles:
        """A client certificate whose URI SANs are `uris` (in this order), plus DNS SANs `dns`;
        cn: its common name (default: the first URI); lifetime_s: valid until that many seconds from
        now (default: a day)."""
        sans = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
        stem = f"{_slug(self.name)}.client.{_slug(uris[0] if uris else '-'.join(dns) or cn or 'nosan')}.{len(sans)}"
        if lifetime_s is not None or cn is not None:
            self._serial += 1
            stem += f".{self._serial}"
        return self._issue(stem, cn or (uris[0] if uris else "client")[-64:], sans, ExtendedKeyUsageOID.CLIENT_AUTH,
                           lifetime_s)

    def client_context(self, client: CertFiles | None = None, server_ca: str | None = None) -> ssl.SSLContext:
        """A client TLS context that presents `client` (None: no client certificate) and verifies the
        server (its name too) against this CA, or against `server_ca` (a client of another CA)."""
        key = (client.cert if client else None, server_ca)
        if key not in self._contexts:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server_ca or self.ca_file)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if client is not None:
                context.load_cert_chain(client.cert, client.key)
            self._contexts[key] = context
        return self._contexts[key]

    def listener_overrides(self, require_client_certificate: bool = True, client_ca: str | None = None) -> dict:
        """Parameters of tools.envoy_config.render for mTLS on the gateway listener with this CA.
        client_ca: another CA file to verify clients against (default: this CA)."""
        server = self.server()
        return {"downstream_tls": True, "downstream_cert": server.cert, "downstream_key": server.key,
                "downstream_ca": client_ca or self.ca_file, "require_client_certificate": require_client_certificate}

