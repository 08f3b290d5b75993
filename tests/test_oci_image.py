"""tools/oci_image.py: the OCI image layout Istio's WasmPlugin pulls.

Checked twice: by reading the layout back here (digests, sizes, media types, the layer's tar and
gzip headers), and by an independent implementation, skopeo (containers/image), which must be
installed (`make setup` does: apt-get install -y skopeo).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tools import oci_image

REPO = Path(__file__).resolve().parent.parent
FAKE_MODULE = b"\x00asm\x01\x00\x00\x00" + bytes(range(256)) * 4  # a wasm header, then filler


def build(tmp_path: Path, name: str, module: bytes = FAKE_MODULE, *extra: str) -> tuple[Path, str]:
    """Runs the CLI as `make image` does; returns the layout and the digest it printed last."""
    module_path = tmp_path / f"{name}.wasm"
    module_path.write_bytes(module)
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "tools.oci_image", "--module", str(module_path), "--out", str(out),
                           "--tag", "1.2.3", *extra], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout.strip().splitlines()[-1]


def blob(layout: Path, digest: str) -> bytes:
    algorithm, hex_digest = digest.split(":")
    data = (layout / "blobs" / algorithm / hex_digest).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hex_digest, f"blob {digest} does not match its name"
    return data


def resolve(layout: Path, desc: dict) -> bytes:
    data = blob(layout, desc["digest"])
    assert len(data) == desc["size"], f"size of {desc['digest']}"
    return data


def read_layout(layout: Path) -> dict:
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    manifest = json.loads(resolve(layout, entry))
    (layer_desc,) = manifest["layers"]
    return {
        "index": index, "entry": entry, "manifest": manifest,
        "config": json.loads(resolve(layout, manifest["config"])),
        "layer_desc": layer_desc, "layer": resolve(layout, layer_desc),
    }


def test_same_module_gives_the_same_image(tmp_path):
    first, digest1 = build(tmp_path, "first")
    second, digest2 = build(tmp_path, "second")
    assert digest1 == digest2
    assert digest1.startswith("sha256:") and len(digest1) == 71
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_another_module_gives_another_digest(tmp_path):
    _, digest1 = build(tmp_path, "a")
    _, digest2 = build(tmp_path, "b", FAKE_MODULE + b"\x00")
    assert digest1 != digest2


def test_layout_descriptors_and_media_types(tmp_path):
    layout, printed = build(tmp_path, "image")
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    image = read_layout(layout)
    assert image["index"]["schemaVersion"] == 2
    assert image["index"]["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert image["entry"]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert image["entry"]["digest"] == printed
    assert image["entry"]["annotations"] == {"org.opencontainers.image.ref.name": "1.2.3"}
    manifest = image["manifest"]
    assert manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    assert image["layer_desc"]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    # The compat variant with an OCI layer is marked in the manifest.
    assert manifest["annotations"] == {"module.wasm.image/variant": "compat"}
    # Nothing unreferenced in blobs/.
    referenced = {image["entry"]["digest"], manifest["config"]["digest"], image["layer_desc"]["digest"]}
    assert {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()} == referenced


def test_layer_holds_exactly_plugin_wasm_without_build_metadata(tmp_path):
    layout, _ = build(tmp_path, "image")
    image = read_layout(layout)
    layer = image["layer"]
    # gzip header: magic, deflate, flags (no FNAME, no FCOMMENT), mtime 0.
    assert layer[:3] == b"\x1f\x8b\x08"
    assert layer[3] & 0x18 == 0, "gzip header carries a file name or comment"
    assert int.from_bytes(layer[4:8], "little") == 0, "gzip header carries a modification time"
    tar_bytes = gzip.decompress(layer)
    # The config's diff_id is the digest of the uncompressed tar.
    assert image["config"]["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes).hexdigest()]}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["plugin.wasm"]
        (member,) = members
        assert member.isreg()
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (0, 0, 0, "", "")
        assert tar.extractfile(member).read() == FAKE_MODULE


def test_config_is_a_minimal_valid_image_config(tmp_path):
    layout, _ = build(tmp_path, "image")
    config = read_layout(layout)["config"]
    assert config["architecture"] == "wasm"
    assert config["os"] == "wasip1"
    assert "created" not in config  # a timestamp would make every build different


def test_rejects_a_file_that_is_not_wasm(tmp_path):
    module = tmp_path / "not.wasm"
    module.write_bytes(b"#!/bin/sh\n")
    proc = subprocess.run([sys.executable, "-m", "tools.oci_image", "--module", str(module), "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "not a WebAssembly module" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_does_not_overwrite_a_directory_that_is_not_a_layout(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an OCI image layout"):
        oci_image.write_layout(oci_image.build_image(FAKE_MODULE, "t"), out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_rebuild_replaces_the_previous_layout(tmp_path):
    layout, _ = build(tmp_path, "image", FAKE_MODULE + b"old")
    _, digest = build(tmp_path, "image")
    assert read_layout(layout)["entry"]["digest"] == digest
    assert len(list((layout / "blobs" / "sha256").iterdir())) == 3


def test_pin_writes_tag_and_digest_into_wasmplugins(tmp_path):
    manifests = tmp_path / "istio"
    manifests.mkdir()
    plugin = manifests / "plugin.yaml"
    plugin.write_text(
        "# keep this comment\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  sha256: untouched\n---\n"
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: openai-wif\nspec:\n"
        "  url: oci://ghcr.io/<org>/openai-wif:0.0.1  # the image\n"
        '  sha256: "0000000000000000000000000000000000000000000000000000000000000000"\n'
        "  phase: AUTHN\n")
    other = manifests / "other.yaml"
    other.write_text("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nspec:\n"
                     "  url: oci://ghcr.io/someone/else:1\n  sha256: abc\n")
    _, digest = build(tmp_path, "image", FAKE_MODULE, "--pin", str(manifests), "--repository", "ghcr.io/acme/openai-wif")
    text = plugin.read_text()
    assert "  url: oci://ghcr.io/acme/openai-wif:1.2.3  # the image\n" in text
    assert f'  sha256: "{digest.split(":")[1]}"\n' in text
    assert "# keep this comment\n" in text and "  sha256: untouched\n" in text and "  phase: AUTHN\n" in text
    assert other.read_text().endswith("  url: oci://ghcr.io/someone/else:1\n  sha256: abc\n")


# --- an independent reader: skopeo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.fail("skopeo is not installed: run `make setup` (it runs `apt-get install -y skopeo`) "
                    "or install it yourself; the OCI layout is checked with it")
    return path


def test_skopeo_reads_the_layout(tmp_path, skopeo):
    layout, digest = build(tmp_path, "image")
    image = read_layout(layout)
    proc = subprocess.run([skopeo, "inspect", f"oci:{layout}:1.2.3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    inspected = json.loads(proc.stdout)
    assert inspected["Digest"] == digest
    assert inspected["Layers"] == [image["layer_desc"]["digest"]]
    assert (inspected["Architecture"], inspected["Os"]) == ("wasm", "wasip1")


def test_skopeo_copies_the_image_unchanged(tmp_path, skopeo):
    layout, digest = build(tmp_path, "image")
    image = read_layout(layout)
    copied = tmp_path / "copied"
    # A local copy between two layouts: no registry, so no signature policy is involved.
    proc = subprocess.run([skopeo, "--insecure-policy", "copy", "--preserve-digests", f"oci:{layout}",
                           f"dir:{copied}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    manifest = (copied / "manifest.json").read_bytes()
    assert "sha256:" + hashlib.sha256(manifest).hexdigest() == digest
    layer_hex = image["layer_desc"]["digest"].split(":")[1]
    assert (copied / layer_hex).read_bytes() == image["layer"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress((copied / layer_hex).read_bytes()))) as tar:
        assert tar.extractfile("plugin.wasm").read() == FAKE_MODULE
