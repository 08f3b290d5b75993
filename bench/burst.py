"""A burst of concurrent requests, timed from the first byte sent to the last response read.

The client is Python, written to get out of the way: it opens every connection first, builds the
request bytes once, writes them to all connections in one tight loop (a few milliseconds for 200),
then reads the answers with `selectors` on one thread. With a thread per request instead, the
Python client itself spreads a burst of 200 over ~50 ms on two cores, and most requests arrive after
the token exchange has finished: the single flight would hardly be exercised.

`in_subprocess` runs the burst in a separate Python process (`python -m bench.burst`, the job as
JSON on stdin, the result as JSON on stdout): the Python stand-ins run in the benchmark's own
process, and the client must not hold their interpreter lock while the token endpoint answers.
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


@dataclass
class BurstResult:
    elapsed_s: float  # first request written -> last response read
    sent_s: float  # first request written -> last request written
    statuses: Counter  # HTTP status (or what went wrong) -> count
    started_at: float = 0.0  # wall clock (time.time()) when the first request was written

    @property
    def all_ok(self) -> bool:
        return set(self.statuses) == {200}


class _Answer:
    """Accumulates one HTTP/1.1 response (Content-Length framing, as Envoy sends here)."""

    def __init__(self):
        self.data = b""
        self.status: int | None = None
        self.needed: int | None = None  # total bytes of head and body, once the head is in

    def feed(self, chunk: bytes) -> bool:
        """True once the response is complete."""
        self.data += chunk
        if self.needed is None:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = self.data[:end].decode("latin-1").split("\r\n")
            self.status = int(head[0].split()[1])
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            self.needed = end + 4 + length
        return len(self.data) >= self.needed


def burst(port: int, n: int, path: str, headers: dict, timeout_s: float = 30.0) -> BurstResult:
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    sockets = []
    selector = selectors.DefaultSelector()
    try:
        for _ in range(n):
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sockets.append(sock)
        answers = {sock: _Answer() for sock in sockets}
        statuses: Counter = Counter()
        started_at, started = time.time(), time.perf_counter()
        for sock in sockets:
            sock.sendall(request)
        sent = time.perf_counter()
        for sock in sockets:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        pending = len(sockets)
        finished = started
        deadline = started + timeout_s
        while pending and time.perf_counter() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.perf_counter())):
                sock = key.fileobj
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as error:
                    outcome = type(error).__name__
                else:
                    if chunk == b"":
                        outcome = "connection closed"
                    elif answers[sock].feed(chunk):
                        outcome = answers[sock].status
                    else:
                        continue
                statuses[outcome] += 1
                finished = time.perf_counter()
                selector.unregister(sock)
                pending -= 1
        if pending:
            statuses["no answer"] += pending
        return BurstResult(finished - started, sent - started, statuses, started_at)
    finally:
        selector.close()
        for sock in sockets:
            sock.close()


def in_subprocess(port: int, n: int, path: str, headers: dict, timeout_s: float = 30.0) -> BurstResult:
    job = {"port": port, "n": n, "path": path, "headers": headers, "timeout_s": timeout_s}
    completed = subprocess.run([sys.executable, "-m", "bench.burst"], input=json.dumps(job), capture_output=True,
                               text=True, timeout=timeout_s + 60, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the burst client failed: {completed.stderr.strip()[-2000:]}")
    result = json.loads(completed.stdout)
    statuses = Counter({int(k) if k.isdigit() else k: v for k, v in result["statuses"].items()})
    return BurstResult(result["elapsed_s"], result["sent_s"], statuses, result.get("started_at", 0.0))


def main() -> int:
    job = json.load(sys.stdin)
    result = burst(job["port"], job["n"], job["path"], job["headers"], job["timeout_s"])
    json.dump({"elapsed_s": result.elapsed_s, "sent_s": result.sent_s, "started_at": result.started_at,
               "statuses": {str(k): v for k, v in result.statuses.items()}}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
