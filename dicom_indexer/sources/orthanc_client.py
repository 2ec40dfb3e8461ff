"""Orthanc's REST API, as this client reads it: GETs of JSON through the one
HTTP layer, bounded, with credentials kept out of every message."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from ..errors import EXIT_DATABASE, EXIT_TERMINATED
from ..http import HttpClient, RunEnding, get_retries, safe_url, split_credentials
from .orthanc_pages import AnswerTooLarge, OrthancError

if TYPE_CHECKING:
    from ..config import OrthancSettings

ORTHANC_MINIMUM_VERSION = (1, 10)
ORTHANC_FETCH_THREADS = 8  # studies read at once, one by one (each: two GETs)

# The largest answer an Orthanc read takes. Orthanc's largest answers to this
# client list instances' IDs, about 63 bytes each (1.10.1, measured): a
# study's expanded series (5,000 instances: about 320 KB), a page of
# expanded series (asked small enough to stay near ORTHANC_PAGE_TARGET_BYTES,
# and refused past ORTHANC_PAGE_BODY_BYTES: see orthanc_pages); the others
# are pages of 1,000 changes, IDs or studies (about 1 MB). 64 MB is a series
# of a million instances, far past any real one, and bounds what one hostile
# answer (a proxy padding it, a fault) makes this client hold: such an
# answer is that request's error, never read further. Past 1 MB, answers are
# read one at a time (HttpClient's one_large_body_at_a_time): the fetch
# threads never hold one each.
ORTHANC_BODY_BYTES = 64 * 1024 * 1024
# urllib3 retries a GET (safe to repeat) that met a connection Orthanc had
# closed (it closes idle ones after about a second); the deadline bounds the
# GET as a whole, its retries included.
ORTHANC_RETRIES = 2


class OrthancClient:
    """GETs of JSON from Orthanc's REST API, through the one HTTP layer
    (HttpClient): keep-alive connections, a deadline on each GET as a whole
    (connect_timeout_seconds + read_timeout_seconds), answers bounded by
    ORTHANC_BODY_BYTES, redirects never followed, credentials (orthanc.user
    and orthanc.password, or written in orthanc.url) in an Authorization
    header and never in a message. Orthanc letting STALLED_DEADLINES
    deadlines expire in a row, or SIGTERM, ends the run (RunEnding, never
    one study's error)."""

    def __init__(self, orthanc: OrthancSettings) -> None:
        self.http = HttpClient(
            orthanc.url,
            peer=f"Orthanc at {safe_url(split_credentials(orthanc.url)[0])}",
            connect_timeout=orthanc.connect_timeout_seconds,
            read_timeout=orthanc.read_timeout_seconds,
            retries=get_retries(ORTHANC_RETRIES),
            max_connections=ORTHANC_FETCH_THREADS + 2,
            ca_bundle=orthanc.ca_bundle,
            headers={"Accept": "application/json"},
            secrets=orthanc.secrets,
            user=orthanc.user,
            password=orthanc.password,
            environment_proxy=False,  # Orthanc is the site's own: never through its proxy
            deadline_per_attempt=False,
            one_large_body_at_a_time=True,
        )
        self.base = self.http.where  # as messages show it: never with credentials
        self.http.error_prefix = f"{self.http.peer}: "

    def get(self, path: str, missing_ok: bool = False) -> Any:
        """The JSON at `path`; None for a 404 when `missing_ok` (a resource
        deleted between the change log and its read: nothing to retry)."""
        return self.get_sized(path, ORTHANC_BODY_BYTES, missing_ok)[0]

    def get_sized(
        self, path: str, bound: int = ORTHANC_BODY_BYTES, missing_ok: bool = False
    ) -> tuple[Any, int]:
        """The JSON at `path` and its size in bytes; an answer past `bound`
        raises AnswerTooLarge (a page asked again smaller)."""
        if self.http.stalled is not None:
            raise RunEnding(self.http.stalled, EXIT_DATABASE)
        answer = self.http.exchange("GET", path, bound=bound)
        what = f"GET {path.split('?')[0]}"
        if answer.terminated:
            raise RunEnding(
                f"terminated (SIGTERM) while waiting for Orthanc's answer to {what}; what was"
                " acknowledged is recorded, the rest stays pending",
                EXIT_TERMINATED,
            )
        if answer.stalled is not None:
            raise RunEnding(answer.stalled, EXIT_DATABASE)
        status = answer.status
        if status is None:
            raise OrthancError(f"{answer.error} ({what})")
        if status == 404 and missing_ok:
            return None, 0
        if status in (401, 403):
            raise OrthancError(
                f"Orthanc at {self.base} refused the credentials (HTTP {status}):"
                " check orthanc.user and orthanc.password in config.json"
            )
        if status != 200:
            raise OrthancError(f"Orthanc at {self.base} answered HTTP {status} to {what}")
        if answer.too_large:
            raise AnswerTooLarge(
                f"Orthanc at {self.base} answered {what} with more than"
                f" {bound // (1024 * 1024)} MB: not read (a proxy or a fault"
                " padding its answers?)"
            )
        if not answer.complete:
            raise OrthancError(
                f"Orthanc at {self.base}: no complete answer within"
                f" {self.http.deadline_seconds:g} s to {what}"
            )
        try:
            return json.loads(answer.data), len(answer.data)
        except ValueError:
            raise OrthancError(f"Orthanc at {self.base} answered {what} with no JSON") from None

    def version(self) -> str:
        """Orthanc's version; refuses one older than 1.10 (its REST API)."""
        version = str(self.get("/system").get("Version", "?"))
        numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
        if version.lower() != "mainline" and numbers < ORTHANC_MINIMUM_VERSION:
            raise OrthancError(
                f"Orthanc at {self.base} is version {version}: this client reads Orthanc"
                " 1.10 and later; upgrade Orthanc"
            )
        return version

    def close(self) -> None:
        self.http.close()
