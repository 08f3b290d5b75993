"""Offline checks of everything the project ships (`make validate`).

1. The Envoy configurations under envoy/ are exactly what tools/envoy_config.py renders.
2. Each of them passes `envoy --mode validate`. Validation loads the Wasm module and the token file
   named in the configuration, which exist only on a deployed gateway, so each file is validated
   as a copy with those two paths pointed at the built module and a placeholder token (and the x509
   examples' SDS directory at an SDS file naming a throwaway certificate).
3. The Istio manifests pass tools/istio_validate.py.
4. The OCI image for Istio's WasmPlugin builds (tools/oci_image.py) and passes tests/test_oci_image.py.

One line per check, then a summary; exit status 1 if any check failed.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tools import envoy_config

REPO = envoy_config.REPO
MODULE = REPO / "target" / "openai_wif.wasm"
DEPLOYED_MODULE = "/etc/envoy/openai_wif.wasm"
DEPLOYED_TOKEN_DIR = "/var/run/secrets/tokens"
DEPLOYED_SDS_DIR = str(Path(envoy_config.Params.client_cert_sds_file).parent)
TIMEOUT_S = 300


class Report:
    def __init__(self):
        self.results: list = []  # (status, name)

    def add(self, status: str, name: str, detail: str = ""):
        self.results.append((status, name))
        print(f"{status:<5} {name}", flush=True)
        if detail.strip():
            for line in detail.rstrip().splitlines():
                print(f"      {line}")

    def count(self, status: str) -> int:
        return sum(1 for result, _ in self.results if result == status)


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=TIMEOUT_S, **kwargs)
    except subprocess.TimeoutExpired as expired:
        return subprocess.CompletedProcess(command, 124, expired.stdout or "", f"timed out after {TIMEOUT_S} s")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check_rendering(report: Report):
    out = io.StringIO()
    ok = envoy_config.check(out=out)
    report.add("PASS" if ok else "FAIL",
               f"envoy/*.yaml match tools/envoy_config.py ({len(envoy_config.EXAMPLES)} files)",
               "" if ok else out.getvalue() + "fix: python -m tools.envoy_config --write")


def envoy_binary() -> str:
    candidate = Path(sys.executable).parent / "envoy"
    return str(candidate) if candidate.exists() else "envoy"


def _placeholder_certificate(directory: Path):
    """tls.crt and tls.key in directory: a self-signed client certificate (validation only)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "openai-wif validate placeholder")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    directory.mkdir(parents=True)
    (directory / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


def check_envoy_validate(report: Report):
    files = sorted((REPO / "envoy").glob("*.yaml"))
    if not MODULE.is_file():
        for path in files:
            report.add("FAIL", f"envoy --mode validate {path.relative_to(REPO)}",
                       f"{MODULE.relative_to(REPO)} is missing (validation loads the module): run `make build`")
        return
    with tempfile.TemporaryDirectory(prefix="validate-envoy-") as scratch:
        token_dir = Path(scratch, "tokens")
        token_dir.mkdir()
        (token_dir / "token").write_text("placeholder.subject.token")
        sds_dir, cert_dir = Path(scratch, "sds"), Path(scratch, "openai-mtls")
        _placeholder_certificate(cert_dir)
        sds_dir.mkdir()
        sds_file = Path(envoy_config.Params.client_cert_sds_file).name
        (sds_dir / sds_file).write_text(envoy_config.sds_secret_file(str(cert_dir)))
        for path in files:
            text = path.read_text()
            copy = Path(scratch, path.name)
            copy.write_text(text.replace(DEPLOYED_MODULE, str(MODULE)).replace(DEPLOYED_TOKEN_DIR, str(token_dir))
                            .replace(DEPLOYED_SDS_DIR + "/", str(sds_dir) + "/")
                            .replace(DEPLOYED_SDS_DIR + "\n", str(sds_dir) + "\n"))
            result = _run([envoy_binary(), "--mode", "validate", "-c", str(copy), "-l", "error",
                           "--use-dynamic-base-id"])
            rewritten = [what for what, original in (("module", DEPLOYED_MODULE), ("token dir", DEPLOYED_TOKEN_DIR),
                                                     ("SDS dir", DEPLOYED_SDS_DIR + "/")) if original in text]
            note = f" (validated with {' and '.join(rewritten)} rewritten)" if rewritten else ""
            name = f"envoy --mode validate {path.relative_to(REPO)}{note}"
            if result.returncode == 0:
                report.add("PASS", name)
            else:
                report.add("FAIL", name, _tail(result.stdout + result.stderr))


def check_istio(report: Report):
    if not (REPO / "tools" / "istio_validate.py").exists():
        report.add("FAIL", "Istio manifests: tools/istio_validate.py is missing")
        return
    # --template: istio/ as committed carries the image placeholders that `make pin` replaces.
    result = _run([sys.executable, "-m", "tools.istio_validate", "--template"])
    report.add("PASS" if result.returncode == 0 else "FAIL", "Istio manifests (python -m tools.istio_validate --template)",
               _tail(result.stdout + result.stderr) if result.returncode else "")


def check_oci_image(report: Report):
    if not (REPO / "tools" / "oci_image.py").exists():
        report.add("FAIL", "OCI image: tools/oci_image.py is missing")
        return
    if not MODULE.is_file():
        report.add("FAIL", "OCI image build", f"{MODULE.relative_to(REPO)} is missing: run `make build`")
        return
    with tempfile.TemporaryDirectory(prefix="validate-oci-") as scratch:
        result = _run([sys.executable, "-m", "tools.oci_image", "--module", str(MODULE),
                       "--out", str(Path(scratch, "oci-image"))])
    report.add("PASS" if result.returncode == 0 else "FAIL", "OCI image build (python -m tools.oci_image)",
               _tail(result.stdout + result.stderr) if result.returncode else "")
    tests = REPO / "tests" / "test_oci_image.py"
    if not tests.exists():
        report.add("FAIL", "OCI image tests: tests/test_oci_image.py is missing")
        return
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests.relative_to(REPO))],
                  env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    report.add("PASS" if result.returncode == 0 else "FAIL", "OCI image tests (pytest tests/test_oci_image.py)",
               _tail(result.stdout + result.stderr, 25) if result.returncode else "")


def main() -> int:
    report = Report()
    for check in (check_rendering, check_envoy_validate, check_istio, check_oci_image):
        check(report)
    passed, failed = report.count("PASS"), report.count("FAIL")
    summary = f"validate: {passed} passed, {failed} failed"
    print(("FAILED " if failed else "OK ") + summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
