"""SDS stand-in: Envoy's Secret Discovery Service on a unix socket, as the SPIRE agent serves it.

    sds = SdsStandin("/tmp/x/agent.sock", {"default": cert_files}).start()
    sds.update("default", renewed_files)   # pushed at once to every open stream (as an agent rotates)

Serves `envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets` (state of the world): each
requested name that it has answers as a `Secret` with a `tls_certificate` whose chain and key are
inline (as the SPIRE agent sends the workload's X.509-SVID). No Envoy protobuf package is needed:
the few messages are encoded here by hand (field numbers from envoy/service/discovery/v3 and
envoy/extensions/transport_sockets/tls/v3). `requests` records each DiscoveryRequest (resource
names, response nonce, whether it carried an error: a NACK).
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent import futures
from pathlib import Path

import grpc

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _decode(data: bytes) -> list:
    """[(field number, value)] of a message: ints for varints, bytes for length-delimited fields."""
    fields, i = [], 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 2:
            length, i = _read_varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire}")
        fields.append((number, value))
    return fields


def _read_varint(data: bytes, i: int):
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def encode_secret(name: str, files) -> bytes:
    """envoy.extensions.transport_sockets.tls.v3.Secret{name, tls_certificate{certificate_chain,
    private_key}} with the PEM files' contents inline (DataSource.inline_bytes = 2)."""
    chain, key = Path(files.cert).read_bytes(), Path(files.key).read_bytes()
    tls_certificate = _field(1, _field(2, chain)) + _field(2, _field(2, key))
    return _field(1, name.encode()) + _field(2, tls_certificate)


def encode_response(version: str, nonce: str, secrets: list) -> bytes:
    """DiscoveryResponse{version_info=1, resources=2 (Any{type_url=1, value=2}), type_url=4, nonce=5}."""
    resources = b"".join(_field(2, _field(1, SECRET_TYPE.encode()) + _field(2, secret)) for secret in secrets)
    return _field(1, version.encode()) + resources + _field(4, SECRET_TYPE.encode()) + _field(5, nonce.encode())


def decode_request(data: bytes) -> dict:
    """DiscoveryRequest{version_info=1, resource_names=3, type_url=4, response_nonce=5, error_detail=6}."""
    fields = _decode(data)
    text = {1: "version_info", 4: "type_url", 5: "response_nonce"}
    request = {"resource_names": [], "version_info": "", "type_url": "", "response_nonce": "", "nack": False}
    for number, value in fields:
        if number == 3:
            request["resource_names"].append(value.decode())
        elif number in text:
            request[text[number]] = value.decode()
        elif number == 6:
            request["nack"] = True
    return request


class SdsStandin:
    def __init__(self, socket_path: str, secrets: dict):
        """secrets: name -> CertFiles (the certificate chain and key served under that name)."""
        self.socket_path = socket_path
        self.secrets = dict(secrets)
        self.version = 1
        self.requests: list = []
        self.pushes = 0  # responses sent
        self._lock = threading.Lock()
        self._streams: list = []  # one queue per open stream
        self._server = None

    def start(self):
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(self._stream)})
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix:{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self):
        if self._server is not None:
            with self._lock:
                for stream in self._streams:
                    stream.put(None)
            self._server.stop(grace=0).wait(5)
            self._server = None

    def update(self, name: str, files):
        """Serve `files` under `name` from now on and push it to every open stream."""
        with self._lock:
            self.secrets[name] = files
            self.version += 1
            for stream in self._streams:
                stream.put("push")

    def _stream(self, request_iterator, context):
        pending: queue.Queue = queue.Queue()
        wanted: list = []
        with self._lock:
            self._streams.append(pending)

        def read():
            try:
                for raw in request_iterator:
                    request = decode_request(raw)
                    with self._lock:
                        self.requests.append(request)
                    if not request["response_nonce"] or request["resource_names"] != wanted:
                        wanted[:] = request["resource_names"]
                        pending.put("push")
            except grpc.RpcError:
                pass
            pending.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            while context.is_active():
                try:
                    item = pending.get(timeout=0.5)
                except queue.Empty:
                    continue
                if item is None:
                    return
                with self._lock:
                    secrets = [encode_secret(name, self.secrets[name]) for name in wanted if name in self.secrets]
                    self.pushes += 1
                    version, nonce = str(self.version), str(self.pushes)
                yield encode_response(version, nonce, secrets)
        finally:
            with self._lock:
                self._streams.remove(pending)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
