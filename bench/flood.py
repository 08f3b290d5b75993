"""Many distinct identities through a gateway: one new subject token per request.

The client runs in its own Python process (`python -m bench.flood`, the job as JSON on stdin, the
result as JSON on stdout, progress on stderr), because the Python stand-ins run in the
benchmark's process and must keep its interpreter lock while they answer token exchanges. It
mints every token itself, as the stand-in issuer does (`Issuer.claims` and `Issuer.sign`, RS256
with the issuer's key, given as PEM in the job), so the token endpoint verifies each one as it
would any other. Minting (~0.4 ms a token) overlaps with the gateway's and the stand-in's work.

It keeps `connections` keep-alive connections open, each with one request in flight; when an
answer arrives, it mints the next token and sends the next request on that connection. Token i is
for `system:serviceaccount:default:<name>-<i>`, so every index names a new workload identity.
A job may instead give the tokens to send (`tokens`: identities sent before, sent again), and may
ask for the last tokens it sent back (`keep_last`).
"""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from tests.standins.issuer import Issuer

from .burst import _Answer

SUBJECT_PREFIX = "system:serviceaccount:default:"


@dataclass
class FloodResult:
    sent: int
    elapsed_s: float
    statuses: Counter  # HTTP status (or what went wrong) -> count
    mint_s: float  # of elapsed_s, spent minting tokens
    last_tokens: list  # the last `keep_last` tokens sent, in the order sent

    @property
    def all_ok(self) -> bool:
        return set(self.statuses) == {200} and self.statuses[200] == self.sent


def private_pem(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


class _Minter:
    def __init__(self, job: dict):
        self.issuer = Issuer(job["iss"], job["kid"])
        self.key = serialization.load_pem_private_key(job["pem"].encode(), password=None)
        self.audience = job["audience"]
        self.prefix = SUBJECT_PREFIX + job["name"] + "-"
        self.lifetime_s = job.get("lifetime_s", 3600)
        self.spent_s = 0.0

    def token(self, index: int) -> str:
        started = time.perf_counter()
        claims = self.issuer.claims(f"{self.prefix}{index}", self.audience, self.lifetime_s)
        token = self.issuer.sign(claims, key=self.key)
        self.spent_s += time.perf_counter() - started
        return token


def flood(job: dict) -> FloodResult:
    given = job.get("tokens")
    minter = None if given is not None else _Minter(job)
    port, first = job["port"], job.get("start", 0)
    count = len(given) if given is not None else job["count"]
    keep_last = job.get("keep_last", 0)
    last_tokens: list = []
    head = f"GET {job['path']} HTTP/1.1\r\nHost: {job['host']}\r\n{job['header']}: "
    every = job.get("progress_every", 0)
    label = job.get("label", "")
    selector = selectors.DefaultSelector()
    statuses: Counter = Counter()
    answers: dict = {}
    next_index = first
    done = 0
    started = time.perf_counter()
    deadline = started + job.get("timeout_s", 600)

    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        return sock

    def send(sock):
        nonlocal next_index
        token = given[next_index - first] if given is not None else minter.token(next_index)
        next_index += 1
        if next_index > first + count - keep_last:
            last_tokens.append(token)
        answers[sock] = _Answer()
        sock.setblocking(True)
        sock.sendall((head + token + "\r\n\r\n").encode("latin-1"))
        sock.setblocking(False)

    def finish(sock, outcome):
        nonlocal done
        statuses[outcome] += 1
        done += 1
        if every and done % every == 0:
            rate = done / (time.perf_counter() - started)
            print(f"  {label}{first + done:,} identities ({rate:,.0f} new identities/s)", file=sys.stderr, flush=True)

    try:
        for _ in range(min(job["connections"], count)):
            send(connect())
        while done < count and time.perf_counter() < deadline:
            for key, _ in selector.select(timeout=1.0):
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as error:
                    chunk, outcome = None, type(error).__name__
                if chunk is not None and chunk != b"":
                    if not answers[sock].feed(chunk):
                        continue
                    finish(sock, answers[sock].status)
                    if next_index < first + count:
                        send(sock)
                    else:
                        selector.unregister(sock)
                        sock.close()
                    continue
                # The connection ended without a (whole) answer: count it, go on with a new one.
                finish(sock, outcome if chunk is None else "connection closed")
                selector.unregister(sock)
                sock.close()
                if next_index < first + count:
                    send(connect())
        if done < count:
            statuses["no answer"] += count - done
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return FloodResult(count, time.perf_counter() - started, statuses, minter.spent_s if minter else 0.0, last_tokens)


def in_subprocess(job: dict) -> FloodResult:
    completed = subprocess.run([sys.executable, "-m", "bench.flood"], input=json.dumps(job), stdout=subprocess.PIPE,
                               text=True, timeout=job.get("timeout_s", 600) + 60, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the identity flood client failed (exit status {completed.returncode})")
    result = json.loads(completed.stdout)
    statuses = Counter({int(k) if k.isdigit() else k: v for k, v in result["statuses"].items()})
    return FloodResult(result["sent"], result["elapsed_s"], statuses, result["mint_s"], result["last_tokens"])


def main() -> int:
    result = flood(json.load(sys.stdin))
    json.dump({"sent": result.sent, "elapsed_s": result.elapsed_s, "mint_s": result.mint_s,
               "last_tokens": result.last_tokens,
               "statuses": {str(k): v for k, v in result.statuses.items()}}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
