"""SPIFFE Workload API stand-in: a gRPC server on a unix socket, like a SPIRE or Defakto agent.

Serves `SpiffeWorkloadAPI/FetchJWTSVID` and `SpiffeWorkloadAPI/FetchJWTBundles` with the messages
generated from the Workload API proto (shipped in the PyPI `spiffe` package). Like SPIRE it refuses
calls without the `workload.spiffe.io: true` metadata (INVALID_ARGUMENT) and without an audience
(INVALID_ARGUMENT), and a request for a SPIFFE ID the workload does not have (PERMISSION_DENIED).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent import futures

import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

DEFAULT_SPIFFE_ID = "spiffe://example.com/ns/inference/sa/worker"
SECURITY_HEADER = "workload.spiffe.io"
FAULTS = (None, "unavailable", "no_svids", "not_jwt", "expired", "slow")
MAX_UNIX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL


class _WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, standin: "SpiffeStandin"):
        self.standin = standin

    @staticmethod
    def _require_security_header(context, metadata: dict):
        if metadata.get(SECURITY_HEADER) != "true":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def FetchJWTSVID(self, request, context):  # noqa: N802 - name from the proto
        standin = self.standin
        metadata = {key: value for key, value in context.invocation_metadata()}
        with standin._lock:
            standin.requests += 1
            standin.last_metadata = metadata
            standin.last_request = {"audience": list(request.audience), "spiffe_id": request.spiffe_id}
        fault = standin.fault
        if fault == "slow" and standin._stopping.wait(standin.slow_seconds):
            context.abort(grpc.StatusCode.UNAVAILABLE, "agent is shutting down")
        if fault == "unavailable":
            context.abort(grpc.StatusCode.UNAVAILABLE, "agent unavailable")
        self._require_security_header(context, metadata)
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != standin.spiffe_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
        if fault == "no_svids":
            return workload_pb2.JWTSVIDResponse()
        audience = list(request.audience)
        aud = audience[0] if len(audience) == 1 else audience
        if fault == "not_jwt":
            token = "this-is-not-a-jwt"
        elif fault == "expired":
            token = standin.issuer.mint_expired(standin.spiffe_id, aud)
        else:
            token = standin.issuer.mint(standin.spiffe_id, aud, standin.lifetime_s)
        with standin._lock:
            standin.tokens.append(token)
        return workload_pb2.JWTSVIDResponse(svids=[
            workload_pb2.JWTSVID(spiffe_id=standin.spiffe_id, svid=token, hint=standin.hint)])

    def FetchJWTBundles(self, request, context):  # noqa: N802 - name from the proto
        metadata = {key: value for key, value in context.invocation_metadata()}
        self._require_security_header(context, metadata)
        standin = self.standin
        bundle = json.dumps(standin.issuer.jwks()).encode()
        yield workload_pb2.JWTBundlesResponse(bundles={standin.trust_domain: bundle})
        # The agent keeps the stream open to push bundle updates; end it when the client goes away.
        while context.is_active() and not standin._stopping.wait(0.2):
            pass


class SpiffeStandin:
    def __init__(self, issuer, socket_path: str, spiffe_id: str = DEFAULT_SPIFFE_ID, lifetime_s: int = 3600):
        if len(os.fsencode(socket_path)) > MAX_UNIX_SOCKET_PATH:
            raise ValueError(f"unix socket path too long ({len(socket_path)} > {MAX_UNIX_SOCKET_PATH}): {socket_path}")
        self.issuer = issuer
        self.socket_path = socket_path
        self.spiffe_id = spiffe_id
        self.lifetime_s = lifetime_s
        self.hint = ""
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = None
        self.reset()

    @property
    def address(self) -> str:
        return "unix://" + self.socket_path

    @property
    def trust_domain(self) -> str:
        """The trust domain's SPIFFE ID (the Workload API keys JWT bundles by it)."""
        return "spiffe://" + self.spiffe_id.removeprefix("spiffe://").split("/")[0]

    @property
    def running(self) -> bool:
        return self._server is not None

    def reset(self):
        with self._lock:
            self.fault = None
            self.slow_seconds = 10.0
            self.requests = 0
            self.last_metadata = None
            self.last_request = None
            self.tokens: list = []

    def start(self):
        if self._server is not None:
            return self
        self._stopping.clear()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="spiffe-standin"))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_WorkloadApi(self), server)
        if not server.add_insecure_port("unix:" + self.socket_path):
            raise RuntimeError(f"cannot listen on {self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self):
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.stop(grace=None).wait(5)
        deadline = time.monotonic() + 2
        while os.path.exists(self.socket_path) and time.monotonic() < deadline:
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                break

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
