"""A stand-in for Azure's DICOM service, for the tests: Azure cannot run
here, so this loopback server mimics it, kept to what Microsoft documents
and its open-source server (microsoft/dicom-server) does, API v1:

- `/v1/studies...` (QIDO-RS) is forwarded to a real Orthanc's DICOMweb
  plugin (`/dicom-web/studies...`): the studies are real.
- `/v1/changefeed?offset=&limit=&includemetadata=` answers the entries whose
  Sequence lies in (offset, offset + limit] (dbo.GetChangeFeed: `Sequence
  BETWEEN @offset+1 AND @offset+@limit`), in order, as a JSON array; limit
  1..100 (default 10), offset >= 0, else 400. Entries carry Sequence,
  StudyInstanceUid, SeriesInstanceUid, SopInstanceUid, Action
  (create|update|delete), Timestamp (UTC) and State (current|replaced|
  deleted), and Metadata only if includemetadata is not false.
- `/v1/changefeed/latest` answers the newest entry, or 204 when the feed
  is empty (an ASP.NET null result).

The feed is a list in memory the test appends to (one entry per instance,
sequences rising, gaps allowed), with knobs for what a broken feed does:
`repeat_from` (every page is the page after that sequence, whatever the
offset), `backwards` (a page's entries in falling order), `reset()` (the
feed emptied: its history lost, sequences start again). Status faults,
trickles and request counts are HostileFront's (dev/hostile_http.py):
its rules apply to the feed's paths as to the others. Not used by client.py.

    stub = AzureFeedStub(orthanc.url)   # QIDO at stub.root, the feed at stub.root + "/changefeed"
    stub.create(study_uid, series_uid, sop_uid)
"""

from __future__ import annotations

import datetime
import json
import threading
import urllib.parse
from typing import Any

from hostile_http import HeaderFront

API_ROOT = "/v1"
FEED_DEFAULT_LIMIT = 10
FEED_MAX_LIMIT = 100
NO_UPSTREAM = "http://127.0.0.1:9"  # nothing listens there: QIDO then answers 502


class AzureFeedStub(HeaderFront):
    """Azure's DICOM service, v1: QIDO-RS forwarded to `upstream` (an
    Orthanc's root URL; its DICOMweb plugin at /dicom-web), the change feed
    served from `entries`."""

    def __init__(self, upstream: str | None = None, upstream_root: str = "/dicom-web") -> None:
        super().__init__(upstream or NO_UPSTREAM)
        self.has_upstream = upstream is not None
        self.upstream_root = upstream_root
        self.root = self.url + API_ROOT  # what dicomweb.url names
        self.entries: list[dict[str, Any]] = []
        self.feed_lock = threading.Lock()
        self.next_sequence = 1
        self.repeat_from: int | None = None
        self.backwards = False

    # -- the test's side -------------------------------------------------------

    def append(
        self,
        action: str,
        study: str,
        series: str = "1.2.3.4",
        sop: str = "1.2.3.4.5",
        gap: int = 0,
    ) -> int:
        """One entry, `gap` sequences after the previous one would be (a
        stretch of sequences without entries); its sequence."""
        with self.feed_lock:
            sequence = self.next_sequence + gap
            self.next_sequence = sequence + 1
            state = "deleted" if action == "delete" else "current"
            if action != "create":
                # Azure marks the instance's earlier entries as replaced.
                for entry in self.entries:
                    if entry["SopInstanceUid"] == sop and entry["State"] == "current":
                        entry["State"] = "replaced" if action == "update" else "deleted"
            self.entries.append(
                {
                    "Sequence": sequence,
                    "StudyInstanceUid": study,
                    "SeriesInstanceUid": series,
                    "SopInstanceUid": sop,
                    "Action": action,
                    "Timestamp": datetime.datetime.now(datetime.timezone.utc).strftime(
                        "%Y-%m-%dT%H:%M:%S.%fZ"
                    ),
                    "State": state,
                    "Metadata": {"00080060": {"vr": "CS", "Value": ["CT"]}},
                }
            )
            return sequence

    def create(self, study: str, series: str = "1.2.3.4", sop: str = "1.2.3.4.5") -> int:
        return self.append("create", study, series, sop)

    def update(self, study: str, series: str = "1.2.3.4", sop: str = "1.2.3.4.5") -> int:
        return self.append("update", study, series, sop)

    def delete(self, study: str, series: str = "1.2.3.4", sop: str = "1.2.3.4.5") -> int:
        return self.append("delete", study, series, sop)

    def reset(self) -> None:
        """The feed emptied (a service recreated, restored): sequences start again at 1."""
        with self.feed_lock:
            self.entries.clear()
            self.next_sequence = 1

    @property
    def latest(self) -> int:
        with self.feed_lock:
            return self.entries[-1]["Sequence"] if self.entries else 0

    # -- the service's side ----------------------------------------------------

    def _forward(self, handler: Any, body: bytes) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(handler.path)
        path = parts.path
        if path in (API_ROOT + "/changefeed", API_ROOT + "/changefeed/"):
            return self._page(urllib.parse.parse_qs(parts.query))
        if path == API_ROOT + "/changefeed/latest":
            return self._latest(urllib.parse.parse_qs(parts.query))
        if path.startswith(API_ROOT + "/") and self.has_upstream:
            handler.path = self.upstream_root + handler.path[len(API_ROOT) :]
            return super()._forward(handler, body)
        return 404, b'{"error": "not found"}'

    def _page(self, query: dict[str, list[str]]) -> tuple[int, bytes]:
        try:
            offset = int(query.get("offset", ["0"])[0])
            limit = int(query.get("limit", [str(FEED_DEFAULT_LIMIT)])[0])
        except ValueError:
            return 400, b'"The value is not valid."'
        if offset < 0 or not 1 <= limit <= FEED_MAX_LIMIT:
            return 400, b'"The limit must be between 1 and 100, the offset at least 0."'
        metadata = _flag(query, "includemetadata")
        with self.feed_lock:
            start = offset if self.repeat_from is None else self.repeat_from
            page = [dict(e) for e in self.entries if start < e["Sequence"] <= start + limit]
        if self.backwards:
            page.reverse()
        for entry in page:
            if not metadata:
                entry["Metadata"] = None
        return 200, json.dumps(page).encode()

    def _latest(self, query: dict[str, list[str]]) -> tuple[int, bytes]:
        with self.feed_lock:
            entry = dict(self.entries[-1]) if self.entries else None
        if entry is None:
            return 204, b""
        if not _flag(query, "includemetadata"):
            entry["Metadata"] = None
        return 200, json.dumps(entry).encode()


def _flag(query: dict[str, list[str]], name: str) -> bool:
    """A bool query parameter as ASP.NET reads it (default true)."""
    values = {k.lower(): v for k, v in query.items()}.get(name.lower(), ["true"])
    return values[0].strip().lower() != "false"
