"""Azure's DICOM change feed: what changed in the archive, in order, from a
cursor the harvest keeps (sources/harvest.py), instead of date windows.

Azure Health Data Services' DICOM service logs every create, update and
delete of an instance with a rising Sequence. API v1 reads it as
`GET {root}/changefeed?offset=<seq>&limit=<span>`: the entries whose
Sequence lies in (offset, offset + span] (microsoft/dicom-server's
dbo.GetChangeFeed: `Sequence BETWEEN @offset+1 AND @offset+@limit`), so a
page over a stretch of deleted sequences is empty while later ones exist;
and `GET {root}/changefeed/latest`: the newest entry, or 204 when there is
none. {root} is the QIDO-RS root, `https://<ws>-<svc>.dicom.azurehealthcareapis.com/v1`.

AzureChangeFeed asks through the DicomwebFinder's own HttpClient and its
helpers (the same deadline, credentials and refusals), and reads a page
only if it is a feed's: after the cursor, rising, within the span asked.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..http import STALLED_DEADLINES, Answer
from .finding import ChangeFeedError, FeedChange, PacsUnavailable

if TYPE_CHECKING:
    from .dicomweb import DicomwebFinder

# Sequences one page covers: v1's `limit` is a span (default 10, at most
# 100); the largest means the fewest requests over a sparse feed.
AZURE_FEED_SPAN = 100
AZURE_FEED_MAX_SPAN = 100
# A page of 100 entries without metadata is about 40 KB; 4 MB leaves room
# for a service that sends the metadata anyway, and bounds a hostile one.
AZURE_FEED_BODY_BYTES = 4 * 1024 * 1024
AZURE_ACTIONS = ("create", "update", "delete")
# The feed's semantics are v1's; v2 reads `offset` as entries skipped.
FEED_API_VERSION = 1
API_VERSION = re.compile(r"^v(\d+)(?:\.\d+)?(?:-[A-Za-z0-9.]+)?$")


class AzureChangeFeed:
    """Azure's change feed (API v1) of the DICOMweb service `finder` asks:
    `latest()` and `changes_after(sequence)`, one entry per instance, as
    FeedChange (the harvest makes studies of them). A page that is not a
    feed's is a ChangeFeedError; a service that cannot be asked is the
    finder's PacsUnavailable or RunEnding (stalled, SIGTERM)."""

    def __init__(self, finder: DicomwebFinder, span: int = AZURE_FEED_SPAN) -> None:
        if not 1 <= span <= AZURE_FEED_MAX_SPAN:
            raise ValueError(f"a change feed span is 1 to {AZURE_FEED_MAX_SPAN} sequences")
        version = api_version(finder.url)
        if version is not None and version != FEED_API_VERSION:
            raise ConfigError(
                f'dicomweb.change_feed "azure" reads the change feed of API v1 (offset a'
                f" sequence, limit a span), and dicomweb.url ends in /v{version}: give the"
                " same URL ending in /v1 (its QIDO-RS answers the same)",
                field="dicomweb.url",
            )
        self.finder = finder
        self.span = span
        self.where = f"{finder.where}: the change feed"
        # The newest sequence the last latest() saw: no page moves the
        # cursor past it over a stretch without entries (sequences after it
        # may still come).
        self.newest: int | None = None

    def latest(self) -> int:
        """The sequence of the newest change (0: none yet)."""
        answer = self._read("/changefeed/latest?includemetadata=false", "its latest entry")
        body = None if answer.status == 204 else _json(answer.data, allow_empty=True)
        if body is None:  # 204, or a 200 without a body: the feed is empty
            self.newest = 0
            return 0
        if not isinstance(body, dict):
            raise ChangeFeedError(f"{self.where} answered its latest entry with no entry")
        sequence = _sequence(body)
        if sequence is None:
            raise ChangeFeedError(
                f"{self.where} answered its latest entry without a Sequence (a whole number)"
            )
        self.newest = sequence
        return sequence

    def changes_after(self, sequence: int) -> tuple[list[FeedChange], int]:
        """The changes in (sequence, sequence + span], in order, and where the
        next page starts: past the last change, or past the stretch without
        changes (never past the newest sequence latest() saw). Raises
        ChangeFeedError for a page that is not a feed's: the cursor stays."""
        if self.newest is None:
            self.latest()
        newest = self.newest or 0
        what = f"the page after sequence {sequence}"
        answer = self._read(
            f"/changefeed?offset={sequence}&limit={self.span}&includemetadata=false", what
        )
        entries = [] if answer.status == 204 else _json(answer.data, allow_empty=True)
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise self._malformed(what, "with no list of entries")
        changes: list[FeedChange] = []
        last = sequence
        for number, entry in enumerate(entries, 1):
            change = _change(entry)
            if isinstance(change, str):
                raise self._malformed(what, f"with entry {number} {change}")
            if change.sequence <= sequence:
                raise self._malformed(
                    what,
                    f"with entry {number} at sequence {change.sequence}, not after it: the"
                    " feed does not advance",
                )
            if change.sequence <= last:
                raise self._malformed(
                    what,
                    f"with entry {number} at sequence {change.sequence} after {last}: its"
                    " sequences do not rise",
                )
            if change.sequence > sequence + self.span:
                raise self._malformed(
                    what,
                    f"with entry {number} at sequence {change.sequence}, past the"
                    f" {self.span} sequences asked (limit is a span in API v1)",
                )
            changes.append(change)
            last = change.sequence
        # The span was read whole: the next page starts past it, but not past
        # the newest sequence known, after which changes may still arrive.
        return changes, max(last, min(sequence + self.span, max(newest, sequence)))

    # -- one request -------------------------------------------------------

    def _read(self, path: str, what: str) -> Answer:
        """A whole 200 or a 204 for `path`. Refused credentials, no feed at
        all or any other failure: PacsUnavailable, one line; a deadline
        expired: asked again, and the finder's client ends the run
        (RunEnding) when STALLED_DEADLINES expire in a row."""
        for _ in range(STALLED_DEADLINES):
            answer = self.finder._get(path, bound=AZURE_FEED_BODY_BYTES)
            if answer.timed_out:
                continue
            if answer.status == 404:
                raise PacsUnavailable(
                    f"{self.where} is not there (HTTP 404 for /changefeed):"
                    ' dicomweb.change_feed "azure" needs Azure\'s DICOM service, with'
                    " dicomweb.url its root and API version"
                    " (https://<workspace>-<service>.dicom.azurehealthcareapis.com/v1)"
                )
            if answer.status == 204:
                return answer
            if answer.status == 200 and answer.too_large:
                mb = AZURE_FEED_BODY_BYTES // (1024 * 1024)
                raise PacsUnavailable(f"{self.where} answered {what} with more than {mb} MB")
            trouble = self.finder._trouble(answer, what)
            if trouble:
                raise PacsUnavailable(f"{self.where}: {trouble}")
            return answer
        raise PacsUnavailable(
            f"{self.where}: no complete answer to {what} within"
            f" {self.finder.http.deadline_seconds:g} s, {STALLED_DEADLINES} times"
        )

    def _malformed(self, what: str, problem: str) -> ChangeFeedError:
        return ChangeFeedError(
            f"{self.where} answered {what} {problem}; the cursor stays where it was"
        )


def api_version(url: str) -> int | None:
    """The API version a DICOMweb root names in its last segment (`/v1`,
    `/v1.0-prerelease`, `/v2`), or None."""
    last = url.rstrip("/").rsplit("/", 1)[-1]
    match = API_VERSION.match(last)
    return int(match.group(1)) if match else None


def _json(data: bytes | bytearray, allow_empty: bool = False) -> Any:
    """The body as JSON (None for an empty body, when allowed)."""
    if allow_empty and not bytes(data).strip():
        return None
    try:
        return json.loads(data)
    except ValueError:
        return _NOT_JSON


_NOT_JSON = object()  # neither a list nor a dict: malformed, whatever was asked


def _field(entry: dict, name: str) -> Any:
    """A field by its documented name (PascalCase), or in another case (a
    serializer set to camelCase)."""
    if name in entry:
        return entry[name]
    lower = name.lower()
    return next((value for key, value in entry.items() if str(key).lower() == lower), None)


def _sequence(entry: dict) -> int | None:
    value = _field(entry, "Sequence")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


def _change(entry: Any) -> FeedChange | str:
    """One entry as a FeedChange, or why it cannot be one (never a UID)."""
    if not isinstance(entry, dict):
        return "that is not an entry (a JSON object)"
    sequence = _sequence(entry)
    if sequence is None:
        return "without a Sequence (a whole number)"
    study = _field(entry, "StudyInstanceUid")
    if not isinstance(study, str) or not study.strip():
        return f"at sequence {sequence} without a StudyInstanceUid"
    action = _field(entry, "Action")
    if not isinstance(action, str):
        return f"at sequence {sequence} without an Action"
    action = action.strip().lower()
    # An action this client does not know yet (Azure added "update" later):
    # the study changed somehow, and the harvest asks QIDO-RS what it is now.
    return FeedChange(sequence, study.strip(), action if action in AZURE_ACTIONS else "update")
