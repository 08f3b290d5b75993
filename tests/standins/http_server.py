"""HTTP plumbing shared by the stand-ins.

A stand-in is a threaded HTTP/1.1 server on an ephemeral loopback port. It can be stopped and
started again on the same port, and stopping it also drops the connections it holds open, so a
client that keeps connections alive (Envoy does) sees the upstream go down, not a zombie.

A stand-in may also answer early: `early(request)` sees the request before its body is read; if it
returns a Reply, that status and those headers go out at once (the body chunked), the request body
is read after, and `handle(request)` then gives the response body.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

# What a stand-in's handle() may return instead of a Reply.
CLOSE = "close"  # close the connection without answering (FIN)
RESET = "reset"  # abort the connection without answering (RST)


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: dict  # first value of each query parameter
    headers: dict  # lower-case names; repeated headers joined with ", "
    body: bytes
    target: str  # the request target as received, query included
    trailers: dict = field(default_factory=dict)  # of a chunked body; lower-case names, as headers

    def header(self, name: str, default=None):
        return self.headers.get(name.lower(), default)

    def json(self):
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: list = field(default_factory=list)

    @classmethod
    def json(cls, status: int, value, headers=None) -> "Reply":
        body = json.dumps(value).encode()
        return cls(status, body, [("Content-Type", "application/json")] + list(headers or []))

    @classmethod
    def text(cls, status: int, text: str, content_type="text/plain; charset=utf-8", headers=None) -> "Reply":
        return cls(status, text.encode(), [("Content-Type", content_type)] + list(headers or []))


def headers_as_dict(message) -> dict:
    result: dict = {}
    for name, value in message.items():
        key = name.lower()
        result[key] = f"{result[key]}, {value}" if key in result else value
    return result


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 turns bursts into connection failures (spurious 503s in Envoy).
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, standin):
        self.standin = standin
        self._open = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def drop_connections(self):
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes on keep-alive connections: without TCP_NODELAY,
    # Nagle's algorithm and the peer's delayed ACK can hold the body back ~40 ms.
    disable_nagle_algorithm = True
    server_version = "standin"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - signature from the base class
        pass

    def _read_body(self):
        """(body, trailers)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    trailers: dict = {}
                    while (line := self.rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
                        name, _, value = line.decode("latin-1").partition(":")
                        key, value = name.strip().lower(), value.strip()
                        trailers[key] = f"{trailers[key]}, {value}" if key in trailers else value
                    return b"".join(chunks), trailers
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return (self.rfile.read(length) if length > 0 else b""), {}

    def _dispatch(self):
        parts = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers=headers_as_dict(self.headers),
            body=b"",
            target=self.path,
        )
        standin = self.server.standin
        try:
            early = standin.early(request)
        except Exception as error:
            early = Reply.text(599, f"stand-in error: {error!r}")
        if isinstance(early, Reply):
            return self._answer_early(early, request)
        request.body, request.trailers = self._read_body()
        try:
            reply = standin.handle(request)
        except Exception as error:  # a stand-in bug must show up as a clear 599, not a hang
            reply = Reply.text(599, f"stand-in error: {error!r}")
        if reply == CLOSE or reply == RESET:
            if reply == RESET:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _answer_early(self, early: Reply, request: Request):
        self.send_response(early.status)
        for name, value in early.headers:
            self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            request.body, request.trailers = self._read_body()
        except (OSError, ValueError):
            return  # the peer gave up before the body ended
        try:
            reply = self.server.standin.handle(request)
            body = reply.body if isinstance(reply, Reply) else b""
        except Exception as error:
            body = f"stand-in error: {error!r}".encode()
        try:
            if body:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body), body))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the peer is gone

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _dispatch


class HttpStandin:
    """Base class: subclasses implement handle(request) -> Reply | CLOSE | RESET."""

    def __init__(self):
        self.port = None  # known after the first start(); kept across stop()/start()
        self._server = None
        self._thread = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self):
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port or 0), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self):
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # wakes handlers that are sleeping for a "slow" fault
        server.shutdown()
        server.server_close()
        server.drop_connections()
        self._thread.join(timeout=5)

    def pause(self, seconds: float) -> bool:
        """Sleep that stop() interrupts; returns True if interrupted."""
        return self._stopping.wait(seconds)

    def early(self, request: Request):
        """A Reply to send before the request body is read (request.body is still empty), or None."""
        return None

    def handle(self, request: Request):
        raise NotImplementedError

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
