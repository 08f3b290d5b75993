"""An issuer's `jwks_uri` (Kubernetes' `/openid/v1/jwks`, Google's `/oauth2/v3/certs`, ...): `GET <path>`
answers the issuer's key set as it is at that moment, so `issuer.rotate()` shows in the next fetch.

Counts every GET of the key set as it arrives (`fetches`, `fetch_log`), and `wait_for_fetches(n)`
returns once n have arrived: a test waits on the fetch itself, not on a sleep. `hold()` keeps every
fetch waiting at the door (already counted) until `release()`, so a test knows a fetch is in flight
for as long as it needs. `set_fault("500" | "garbage")` breaks the answers; `reset()` clears it all.
"""

from __future__ import annotations

import threading
import time

from .http_server import RESET, HttpStandin, Reply, Request

DEFAULT_PATH = "/openid/v1/jwks"
FAULTS = (None, "500", "garbage")


class JwksStandin(HttpStandin):
    def __init__(self, issuer, path: str = DEFAULT_PATH):
        super().__init__()
        self.issuer = issuer
        self.path = path
        self._released = threading.Event()
        self._arrived = threading.Condition(self._lock)
        self.reset()

    def reset(self):
        with self._lock:
            self.fetches = 0
            # Each GET of the key set, in order: {"time" it arrived, "headers", "answered" (the time
            # its answer was sent; None while it is held)}.
            self.fetch_log: list = []
            self.fault = None
        self._released.set()

    def set_fault(self, fault):
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        self.fault = fault

    def hold(self):
        """From now on every fetch waits, counted as it arrives, until release() (or reset(), or stop())."""
        self._released.clear()

    def release(self):
        self._released.set()

    def wait_for_fetches(self, n: int, timeout_s: float = 10.0) -> bool:
        """True once at least n fetches have arrived; False after timeout_s."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self.fetches >= n, timeout_s)

    def last_answered_at(self) -> float | None:
        """The time.time() at which the last fetch was answered (None: none answered yet)."""
        with self._lock:
            answered = [entry["answered"] for entry in self.fetch_log if entry["answered"] is not None]
            return max(answered) if answered else None

    def handle(self, request: Request):
        if request.path != self.path:
            return Reply.json(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404})
        if request.method != "GET":
            return Reply.json(405, {"kind": "Status", "status": "Failure", "reason": "MethodNotAllowed",
                                    "code": 405})
        entry = {"time": time.time(), "headers": request.headers, "answered": None}
        with self._arrived:
            self.fetches += 1
            self.fetch_log.append(entry)
            self._arrived.notify_all()
        while not self._released.wait(0.05):
            if self._stopping.is_set():
                return RESET
        if self.fault == "500":
            reply = Reply.text(500, "Internal Server Error")
        elif self.fault == "garbage":
            reply = Reply(200, b'{"keys": [{"kty": "RSA", "n": ', [("Content-Type", "application/json")])
        else:
            reply = Reply.json(200, self.issuer.jwks(), [("Cache-Control", "public, max-age=3600")])
        with self._lock:
            entry["answered"] = time.time()
        return reply
