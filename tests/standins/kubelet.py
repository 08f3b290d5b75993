"""A projected service account token volume, written the way the kubelet writes it.

    <root>/..2024_05_20_12_00_00.123456789/token   the data, one directory per version
    <root>/..data -> ..2024_05_20_12_00_00.123456789
    <root>/token  -> ..data/token

A new version goes into a new directory, then `..data` is swapped atomically (a temporary symlink
renamed over it), so `<root>/token` always resolves to a complete file. Watchers such as Envoy's
`watched_directory` see the swap as a move into `<root>`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
import uuid

DATA = "..data"
TOKEN = "token"
DEFAULT_SUB = "system:serviceaccount:default:openai-wif"
DEFAULT_AUD = "https://api.openai.com/v1"


class ProjectedTokenDir:
    def __init__(self, root: str, issuer, sub: str = DEFAULT_SUB, aud=DEFAULT_AUD, lifetime_s: int = 3600):
        self.root = str(root)
        self.issuer = issuer
        self.sub = sub
        self.aud = aud
        self.lifetime_s = lifetime_s
        self.rotations = 0
        self._sequence = itertools.count()
        self._recent: list = []  # versions replaced last, kept a little longer (see _publish)
        os.makedirs(self.root, exist_ok=True)
        self.rotate()

    @property
    def path(self) -> str:
        """The token file an application (or Envoy) reads: <root>/token."""
        return os.path.join(self.root, TOKEN)

    def claims(self) -> dict:
        parts = self.sub.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            namespace, name = parts[2], parts[3]
        else:
            namespace, name = "default", self.sub
        return {"kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.sub))},
            "pod": {"name": f"{name}-7d4b9c8f6-x2x9q", "uid": str(uuid.uuid4())},
        }}

    def rotate(self, lifetime_s: int | None = None, **claims) -> str:
        """Write a freshly minted token as a new version; returns it."""
        aud = [self.aud] if isinstance(self.aud, str) else self.aud
        token = self.issuer.mint(self.sub, aud, self.lifetime_s if lifetime_s is None else lifetime_s,
                                 **{**self.claims(), **claims})
        self._publish(token)
        return token

    def write_raw(self, text):
        """Publish arbitrary content (an empty file, garbage; str, or bytes written as they are) with
        the same atomic swap."""
        self._publish(text)

    def current(self) -> str:
        with open(self.path) as file:
            return file.read()

    def remove(self):
        """Make the token disappear: no token link, no ..data, no version directories."""
        for name in (TOKEN, DATA):
            try:
                os.unlink(os.path.join(self.root, name))
            except FileNotFoundError:
                pass
        for version in self._versions():
            shutil.rmtree(os.path.join(self.root, version), ignore_errors=True)

    def _versions(self) -> list:
        return sorted(name for name in os.listdir(self.root)
                      if name.startswith("..") and name not in (DATA, DATA + "_tmp")
                      and os.path.isdir(os.path.join(self.root, name)) and not os.path.islink(os.path.join(self.root, name)))

    def _publish(self, text: str):
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        version = f"..{stamp}.{time.time_ns() % 1_000_000_000:09d}{next(self._sequence):04d}"
        os.mkdir(os.path.join(self.root, version))
        with open(os.path.join(self.root, version, TOKEN), "wb") as file:
            file.write(text if isinstance(text, bytes) else text.encode())
        os.chmod(os.path.join(self.root, version, TOKEN), 0o644)

        previous = os.readlink(os.path.join(self.root, DATA)) if os.path.islink(os.path.join(self.root, DATA)) else None
        # The token link comes first (dangling until ..data exists, e.g. after remove()): the swap
        # below is the event directory watchers such as Envoy's react to, so the file must resolve
        # by then.
        if not os.path.lexists(self.path):
            os.symlink(os.path.join(DATA, TOKEN), self.path)
        temporary = os.path.join(self.root, DATA + "_tmp")
        if os.path.lexists(temporary):
            os.unlink(temporary)
        os.symlink(version, temporary)
        os.rename(temporary, os.path.join(self.root, DATA))
        self.rotations += 1
        # The kubelet deletes the old version right after the swap. Keeping the two last replaced
        # a little longer spares a reader that resolved `..data` a moment before a swap, even when
        # a test rotates far faster than a kubelet ever does.
        self._recent = [v for v in (*self._recent, previous) if v][-2:]
        for old in self._versions():
            if old != version and old not in self._recent:
                shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)
