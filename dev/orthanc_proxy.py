"""A misbehaving Orthanc for the tests: a loopback HTTP proxy in front of a
real one (testkit.OrthancServer) that forwards every request and can be told,
per path, to damage the answer: truncate its JSON, replace or drop a key,
answer a status of its own, or, for the change log, repeat the first page it
forwarded forever (a caching proxy). It counts the requests it forwards. Not
used by client.py.

    proxy = OrthancProxy(orthanc.url)
    proxy.faults.append(Fault(f"/studies/{ident}", truncate=True))
    proxy.repeat_changes = True
    proxy.count("/changes")
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import socket
import threading
import urllib.parse
from typing import Any


@dataclasses.dataclass
class Fault:
    """What to do to the answers for one path (without its query string).

    truncate: the body cut in half (truncated JSON); replace: top-level keys
    given other values; drop: top-level keys removed; status: this status
    and `body` instead of Orthanc's answer; pad: that many bytes of
    whitespace after the JSON (a huge answer, sent as it is made); times:
    how many answers to damage (None: every one)."""

    path: str
    truncate: bool = False
    replace: dict[str, Any] = dataclasses.field(default_factory=dict)
    drop: tuple[str, ...] = ()
    status: int | None = None
    body: bytes = b'{"Message": "from the proxy"}'
    pad: int = 0
    times: int | None = None
    used: int = 0

    def applies(self, path: str) -> bool:
        return path == self.path and (self.times is None or self.used < self.times)


class OrthancProxy:
    """A threaded HTTP/1.1 server on a free loopback port (keep-alive, as
    Orthanc's), forwarding to `upstream` with the client's own headers."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.faults: list[Fault] = []
        # Once set: every /changes answered with the first page forwarded after it
        # (Done: false), up to max_repeats times; then 503, so that a client that
        # never stops asking fails a test instead of hanging it.
        self.repeat_changes = False
        self.max_repeats = 200
        self.repeats = 0
        self.first_changes_page: bytes | None = None
        self.requests: list[str] = []  # "GET /path?query", in order
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                proxy._handle(self)

            do_POST = do_DELETE = do_PUT = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, prefix: str) -> int:
        """How many requests for a path starting with `prefix` came."""
        with self.lock:
            return sum(1 for line in self.requests if line.split(" ", 1)[1].startswith(prefix))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        with self.lock:
            self.requests.append(f"{handler.command} {handler.path}")
            fault = next((f for f in self.faults if f.applies(path)), None)
            if fault is not None:
                fault.used += 1
            repeated = self.first_changes_page if path == "/changes" else None
        if repeated is not None and self.repeat_changes:
            with self.lock:
                self.repeats += 1
                exhausted = self.repeats > self.max_repeats
            self._reply(handler, 503 if exhausted else 200, b"{}" if exhausted else repeated)
            return
        if fault is not None and fault.status is not None:
            self._reply(handler, fault.status, fault.body)
            return
        status, data = self._forward(handler, body)
        if (
            path == "/changes"
            and status == 200
            and self.repeat_changes
            and self.first_changes_page is None
        ):
            page = json.loads(data)
            page["Done"] = False  # as a cache answering a page of a longer log
            data = json.dumps(page).encode()
            with self.lock:
                self.first_changes_page = data
        if fault is not None and status == 200:
            data = self._damage(fault, data)
        self._reply(handler, status, data, fault.pad if fault is not None else 0)

    def _forward(self, handler: Any, body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {
                name: value
                for name, value in handler.headers.items()
                if name.lower() in ("authorization", "content-type", "accept")
            }
            connection.request(handler.command, handler.path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    @staticmethod
    def _damage(fault: Fault, data: bytes) -> bytes:
        if fault.replace or fault.drop:
            document = json.loads(data)
            document.update(fault.replace)
            for key in fault.drop:
                document.pop(key, None)
            data = json.dumps(document).encode()
        if fault.truncate:
            data = data[: len(data) // 2]
        return data

    @staticmethod
    def _reply(handler: Any, status: int, data: bytes, pad: int = 0) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data) + pad))
        handler.end_headers()
        handler.wfile.write(data)
        chunk = b" " * min(pad, 1 << 20)
        try:
            while pad > 0:  # the client may hang up once past its bound
                handler.wfile.write(chunk[:pad])
                pad -= len(chunk)
        except OSError:
            handler.close_connection = True
