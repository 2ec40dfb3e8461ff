"""A misbehaving Orthanc for the tests: a HostileFront (dev/hostile_http.py)
in front of a real one (testkit.OrthancServer) that forwards every request and can be told,
per path, to damage the answer: truncate its JSON, replace or drop a key,
answer a status of its own, or, for the change log, repeat the first page it
forwarded forever (a caching proxy). It counts the requests it forwards. Not
used by client.py.

A fault on a study's own read (/studies/{id}, /studies/{id}/series) damages
that study wherever Orthanc would answer it, as a broken Orthanc would: in a
page of /studies?expand too, its entry loses its MainDicomTags (or gets the
fault's replacements), so that the client's page reader must leave the
study to its own read, where it meets the fault. A 404 stays one read's:
a study Orthanc no longer has is simply not listed.

    proxy = OrthancProxy(orthanc.url)
    proxy.faults.append(Fault(f"/studies/{ident}", truncate=True))
    proxy.repeat_changes = True
    proxy.count("/changes")
"""

from __future__ import annotations

import dataclasses
import http.server
import json
from typing import Any, Callable

from hostile_http import HostileFront, Rule, Seen


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


class OrthancProxy(HostileFront):
    """A HostileFront (its server, its forwarding) that damages answers the
    way a broken Orthanc or a caching proxy would: Faults by exact path, and
    a change log that repeats its first page."""

    def __init__(self, upstream: str) -> None:
        self.faults: list[Fault] = []
        # Once set: every /changes answered with the first page forwarded after it
        # (Done: false), up to max_repeats times; then 503, so that a client that
        # never stops asking fails a test instead of hanging it.
        self.repeat_changes = False
        self.max_repeats = 200
        self.repeats = 0
        self.first_changes_page: bytes | None = None
        # Called with each forwarded request's path (and query) once Orthanc
        # has answered it, before the client gets the answer: what a test
        # does to Orthanc between two pages.
        self.on_answer: Callable[[str], None] | None = None
        super().__init__(upstream)

    def count(self, prefix: str) -> int:
        """How many requests for a path (with its query) starting with `prefix` came."""
        with self.lock:
            return sum(1 for seen in self.seen if seen.path.startswith(prefix))

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        with self.lock:
            self.seen.append(Seen(handler.command, handler.path, dict(handler.headers.items())))
            fault = next((f for f in self.faults if f.applies(path)), None)
            if fault is not None:
                fault.used += 1
            repeated = self.first_changes_page if path == "/changes" else None
        if repeated is not None and self.repeat_changes:
            with self.lock:
                self.repeats += 1
                exhausted = self.repeats > self.max_repeats
            self._send(handler, 503 if exhausted else 200, b"{}" if exhausted else repeated)
            return
        if fault is not None and fault.status is not None:
            self._send(handler, fault.status, fault.body)
            return
        status, data = self._forward(handler, body)
        if self.on_answer is not None:
            self.on_answer(handler.path)
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
        elif path == "/studies" and status == 200 and "expand" in handler.path:
            data = self._damage_entries(data)
        self._send(handler, status, data, fault.pad if fault is not None else 0)

    def _send(self, handler: Any, status: int, data: bytes, pad: int = 0) -> None:
        try:
            self._reply(handler, status, data, Rule("", pad_bytes=pad))
        except OSError:
            handler.close_connection = True  # the client hung up once past its bound

    def _damage_entries(self, data: bytes) -> bytes:
        """A page of studies with the entries of the studies a fault names damaged."""
        with self.lock:
            damaged = {
                f.path.split("/")[2]: f
                for f in self.faults
                if f.path.startswith("/studies/") and f.status != 404
                and (f.times is None or f.used < f.times)
            }  # fmt: skip
        if not damaged:
            return data
        page = json.loads(data)
        for entry in page:
            fault = damaged.get(entry.get("ID")) if isinstance(entry, dict) else None
            if fault is not None:
                entry.update(fault.replace)
                if not fault.replace or fault.path.endswith("/series"):
                    entry.pop("MainDicomTags", None)
        return json.dumps(page).encode()

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
