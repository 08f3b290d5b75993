"""The filter as an OCI image for Istio's WasmPlugin, written without docker.

    python -m tools.oci_image --module target/openai_wif.wasm --out target/oci-image
        [--tag 0.1.0] [--pin istio [--repository ghcr.io/acme/openai-wif]]

Writes an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) in the "compat"
variant of the Wasm image specification that Istio fetches: one
`application/vnd.oci.image.layer.v1.tar+gzip` layer whose tar holds exactly `plugin.wasm`, an
`application/vnd.oci.image.config.v1+json` config (architecture wasm, os wasip1), the manifest
annotation `module.wasm.image/variant: compat`, and an index entry named by the tag
(`org.opencontainers.image.ref.name`).

The image is reproducible: the tar and gzip carry no times, owners or file names of the build
machine and nothing else varies, so the same module gives the same manifest digest. The digest
is the last line printed; it is what a WasmPlugin's `sha256` pins (without the `sha256:`
prefix). `--pin DIR` writes tag and digest into the WasmPlugins under DIR that use this image.

Publish with `skopeo copy oci:target/oci-image docker://ghcr.io/<org>/openai-wif:<tag>`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import shutil
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_NAME = "openai-wif"
WASM_MAGIC = b"\x00asm"

OCI_LAYOUT_VERSION = "1.0.0"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
VARIANT = "module.wasm.image/variant"
PLUGIN_FILE = "plugin.wasm"


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type: str, data: bytes, annotations: dict | None = None) -> dict:
    desc = {"mediaType": media_type, "digest": digest(data), "size": len(data)}
    if annotations:
        desc["annotations"] = annotations
    return desc


def layer_tar(module: bytes) -> bytes:
    """A tar with the one file plugin.wasm: no times, owners or modes of the build machine."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(PLUGIN_FILE)
        info.size = len(module)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        tar.addfile(info, io.BytesIO(module))
    return out.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with modification time 0 and no file name in the header."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


@dataclass
class Image:
    blobs: dict[str, bytes]  # digest -> content
    manifest: bytes
    index: bytes

    @property
    def manifest_digest(self) -> str:
        return digest(self.manifest)


def build_image(module: bytes, tag: str) -> Image:
    if not module.startswith(WASM_MAGIC):
        raise ValueError("not a WebAssembly module (no \\0asm header); Istio would refuse it")
    tar = layer_tar(module)
    layer = gzip_bytes(tar)
    config = canonical_json({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(tar)]},
    })
    manifest = canonical_json({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, config),
        "layers": [descriptor(LAYER_MEDIA_TYPE, layer)],
        "annotations": {VARIANT: "compat"},
    })
    index = canonical_json({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [descriptor(MANIFEST_MEDIA_TYPE, manifest, {REF_NAME: tag})],
    })
    blobs = {digest(b): b for b in (layer, config, manifest)}
    return Image(blobs, manifest, index)


def write_layout(image: Image, out: Path) -> None:
    """Writes the layout to `out`, replacing an earlier layout there (never other content)."""
    if out.exists():
        if any(out.iterdir()) and not (out / "oci-layout").is_file():
            raise ValueError(f"{out} exists and is not an OCI image layout; not overwriting it")
        shutil.rmtree(out)
    blob_dir = out / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    for name, data in sorted(image.blobs.items()):
        (blob_dir / name.split(":", 1)[1]).write_bytes(data)
    (out / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    (out / "index.json").write_bytes(image.index)


def crate_version() -> str:
    cargo = REPO / "Cargo.toml"
    if cargo.is_file():
        return tomllib.loads(cargo.read_text())["package"]["version"]
    return "latest"


_PLUGIN_URL = re.compile(r"^(\s*url:\s*[\"']?oci://)([^\s\"'#]*/" + IMAGE_NAME + r")(?::[^\s\"'#@]+)?([\"']?)",
                         re.MULTILINE)
_SHA256 = re.compile(r"^(\s*sha256:).*$", re.MULTILINE)


def pin_manifests(directory: Path, tag: str, manifest_digest: str, repository: str | None = None) -> list[Path]:
    """Sets the tag and sha256 of every WasmPlugin under `directory` that uses this image.
    Edits the text (comments stay); returns the files changed."""
    changed = []
    hex_digest = manifest_digest.split(":", 1)[1]
    for path in sorted(directory.rglob("*.yaml")):
        text = path.read_text()
        documents = re.split(r"(?m)^(---\s*\n)", text)
        for i, doc in enumerate(documents):
            if not re.search(r"(?m)^kind:\s*WasmPlugin\s*$", doc) or not _PLUGIN_URL.search(doc):
                continue
            doc = _PLUGIN_URL.sub(lambda m: f"{m.group(1)}{repository or m.group(2)}:{tag}{m.group(3)}", doc)
            documents[i] = _SHA256.sub(lambda m: f'{m.group(1)} "{hex_digest}"', doc, count=1)
        updated = "".join(documents)
        if updated != text:
            path.write_text(updated)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.oci_image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", type=Path, required=True, help="the built filter (.wasm)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the OCI image layout")
    parser.add_argument("--tag", help="tag recorded in index.json (default: the version in Cargo.toml)")
    parser.add_argument("--pin", type=Path, metavar="DIR",
                        help="also write tag and digest into the WasmPlugins under DIR (e.g. istio)")
    parser.add_argument("--repository", help="with --pin: image repository to set, e.g. ghcr.io/acme/openai-wif")
    args = parser.parse_args(argv)

    tag = args.tag or crate_version()
    try:
        image = build_image(args.module.read_bytes(), tag)
        write_layout(image, args.out)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (tag {tag}): {PLUGIN_FILE} {args.module.stat().st_size} bytes")
    if args.pin:
        for path in pin_manifests(args.pin, tag, image.manifest_digest, args.repository):
            print(f"pinned {path}")
    print(f"publish: skopeo copy oci:{args.out}:{tag} docker://<registry>/<org>/{IMAGE_NAME}:{tag}")
    print(image.manifest_digest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
