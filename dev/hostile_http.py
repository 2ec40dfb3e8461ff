"""A hostile HTTP front for the tests: a loopback server that forwards every
request to a real peer (an Orthanc, the central service's stand-in) and, for
the paths that a Rule matches, damages the answer the way a broken proxy or
a failing network would: pads it with whitespace (made up as it is sent,
never held here), trickles it a byte at a time, or answers a status of its
own. It records every request it sees (method, path, headers). Not used by
client.py.

    front = HostileFront(orthanc.url)
    front.rules.append(Rule(r"^/studies/[^/]+/series$", pad_bytes=100 * 2**20))
    front.count(r"^/studies/")
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import re
import socket
import threading
import time
import urllib.parse
from typing import Any

PAD_CHUNK = b" " * 65536


@dataclasses.dataclass
class Rule:
    """What to do to the answers for the paths (without their query string)
    that `pattern` matches (re.search).

    pad_bytes: that much whitespace after the peer's body (valid JSON stays
    valid, only longer); declare_length False: no Content-Length, the body
    ends when the connection closes (a client cannot know its size before
    reading it); trickle_seconds: the body one byte every so often (the head
    at once, or trickled too with trickle_head); status: this status and
    `body` instead of the peer's answer; times: how many answers to damage
    (None: every one)."""

    pattern: str
    pad_bytes: int = 0
    declare_length: bool = True
    trickle_seconds: float = 0.0
    trickle_head: bool = False
    status: int | None = None
    body: bytes = b'{"Message": "from the front"}'
    times: int | None = None
    used: int = 0

    def applies(self, path: str) -> bool:
        return bool(re.search(self.pattern, path)) and (
            self.times is None or self.used < self.times
        )


@dataclasses.dataclass
class Seen:
    """One request as the front got it."""

    method: str
    path: str  # with its query string
    headers: dict[str, str]


class HostileFront:
    """A threaded HTTP/1.1 server on a free loopback port, forwarding to
    `upstream` (an http:// URL) with the client's own headers."""

    def __init__(self, upstream: str) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                front._handle(self)

            do_POST = do_DELETE = do_PUT = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, pattern: str) -> int:
        """How many requests for a path matching `pattern` (re.search) came."""
        with self.lock:
            return sum(1 for s in self.seen if re.search(pattern, s.path.split("?", 1)[0]))

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        with self.lock:
            self.seen.append(Seen(handler.command, handler.path, dict(handler.headers.items())))
            rule = next((r for r in self.rules if r.applies(path)), None)
            if rule is not None:
                rule.used += 1
        if rule is not None and rule.status is not None:
            status, data = rule.status, rule.body
        else:
            status, data = self._forward(handler, body)
        try:
            self._reply(handler, status, data, rule or Rule(""))
        except OSError:
            handler.close_connection = True  # the client gave up on it: its deadline

    def _forward(self, handler: Any, body: bytes) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {
                name: value
                for name, value in handler.headers.items()
                if name.lower() in ("authorization", "content-type", "accept", "x-api-key")
            }
            connection.request(handler.command, handler.path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _reply(self, handler: Any, status: int, data: bytes, rule: Rule) -> None:
        head = f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\n"
        if rule.declare_length:
            head += f"Content-Length: {len(data) + rule.pad_bytes}\r\n"
        else:
            head += "Connection: close\r\n"
            handler.close_connection = True
        out = handler.wfile
        if rule.trickle_seconds:
            if not rule.trickle_head:
                out.write((head + "\r\n").encode())
                out.flush()
                self._trickle(out, data, rule.trickle_seconds)
            else:
                self._trickle(out, (head + "\r\n").encode() + data, rule.trickle_seconds)
            handler.close_connection = True
            return
        out.write((head + "\r\n").encode() + data)
        left = rule.pad_bytes
        while left > 0 and not self.stopping.is_set():
            piece = PAD_CHUNK[: min(left, len(PAD_CHUNK))]
            out.write(piece)
            left -= len(piece)
        out.flush()

    def _trickle(self, out: Any, data: bytes, seconds: float) -> None:
        for byte in data:
            if self.stopping.is_set():
                return
            out.write(bytes([byte]))
            out.flush()
            time.sleep(seconds)


@dataclasses.dataclass
class HeaderRule(Rule):
    """A Rule whose answers (the peer's, or `status` and `body`) carry these
    headers too: a Warning, a Server (a HeaderFront honours it)."""

    headers: dict[str, str] = dataclasses.field(default_factory=dict)


class HeaderFront(HostileFront):
    """A HostileFront that also honours HeaderRule: its headers go into the
    answer's head (the answer itself neither padded nor trickled)."""

    def _reply(self, handler: Any, status: int, data: bytes, rule: Rule) -> None:
        extra = getattr(rule, "headers", None)
        if not extra:
            super()._reply(handler, status, data, rule)
            return
        head = f"HTTP/1.1 {status} Whatever\r\nContent-Type: application/dicom+json\r\n"
        head += f"Content-Length: {len(data)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in extra.items())
        handler.wfile.write((head + "\r\n").encode() + data)
        handler.wfile.flush()
