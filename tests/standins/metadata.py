"""What the Google metadata server and Azure IMDS stand-ins share: an issuer, counters, the
record of the last request, and the connection-level faults ("down", "slow")."""

from __future__ import annotations

from collections import namedtuple

from .http_server import CLOSE, HttpStandin, Request

MetadataRequest = namedtuple("MetadataRequest", "path query headers")


class MetadataStandin(HttpStandin):
    def __init__(self, issuer, lifetime_s: int):
        super().__init__()
        self.issuer = issuer
        self.lifetime_s = lifetime_s
        # Both real services refuse proxied requests.
        self.reject_x_forwarded_for = True
        self.reset()

    def reset(self):
        with self._lock:
            self.fault = None
            self.slow_seconds = 10.0
            self.requests = 0
            self.last_request = None
            self.tokens: list = []  # every token served, oldest first

    def begin(self, request: Request):
        """Records the request; returns CLOSE when a connection-level fault answers it."""
        with self._lock:
            self.requests += 1
            self.last_request = MetadataRequest(request.path, request.query, request.headers)
        if self.fault == "down":
            return CLOSE
        if self.fault == "slow" and self.pause(self.slow_seconds):
            return CLOSE
        return None
