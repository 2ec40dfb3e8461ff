"""Orthanc, read through its REST API and its change log."""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import logging.handlers
import re
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..database import Database
from ..engines import SQLiteEngine
from ..errors import EXIT_DATABASE, IndexerError
from ..http import _cause_chain, _default_ca_bundle, _reason
from ..logs import hide_secrets
from ..reconciliation import ReconcileReport, needs_resend
from ..run import RateCap, _progress_bar
from ..study_service import CURSOR_ROW_PK, RECONCILE_ROW_PK, SQLITE_NOW
from ..values import _arclight_datetime, _person_name_as_2x

if TYPE_CHECKING:
    from ..config import Settings
    from ..errors import DatabaseError
    from ..run import Stop
    from ..study_service import StudyServiceQueue

log = logging.getLogger("dicom_indexer")

# --------------------------------------------------------------------------
# Source: Orthanc, through its REST API
#
# Orthanc keeps its index where it likes (SQLite, or the PostgreSQL/MySQL
# plugins): the indexer reads only its REST API, the same for all. What
# changed comes from its change log (/changes, paged by Seq, kept in the
# queue's cursor row); a study is sent once Orthanc calls it stable (or it
# has been quiet long enough); deletions are not logged, so reconcile lists
# every study and finds the ones gone. The queue, with no database of ours
# to live in, is a SQLite file (SQLiteEngine), with the same table.
# --------------------------------------------------------------------------

ORTHANC_MINIMUM_VERSION = (1, 10)
ORTHANC_CHANGES_PAGE = 1000  # change log rows per request
ORTHANC_LIST_PAGE = 1000  # study IDs per /studies request
ORTHANC_FETCH_THREADS = 8  # studies read at once (each: two GETs)
# Orthanc calls a study stable StableAge seconds (60 by default) after its
# last image; it keeps that in memory only, so a study stored just before a
# restart never gets a StableStudy. A study quiet for this long counts as
# stable whatever Orthanc says (or stable_age_seconds, if longer).
ORTHANC_QUIET_SECONDS = 120
# The change log's entries that make a study worth reading again.
ORTHANC_STUDY_CHANGES = frozenset(
    {"NewStudy", "NewSeries", "NewInstance", "StableStudy", "UpdatedMetadata"}
)


class OrthancError(IndexerError):
    """Orthanc is unreachable, refused the credentials, or is too old."""

    exit_code = EXIT_DATABASE


def orthanc_pk(orthanc_id: str) -> int:
    """A study's (or patient's) pk, as the central index stores dcm4chee's:
    a JSON integer, from the first 13 hex digits of its Orthanc ID (itself
    a SHA-1 of PatientID and StudyInstanceUID): 52 bits, below 2**53, the
    same on a rebuilt queue or another host. Two studies of an archive share
    one with a chance of n**2 / 2**53: about 1 in 9,000 for a million."""
    return int(orthanc_id.replace("-", "")[:13], 16) or 1


class OrthancClient:
    """GETs of JSON from Orthanc's REST API, over keep-alive connections.
    Orthanc closes idle ones after about a second: urllib3 reconnects, and
    retries a GET (safe to repeat) that met a closed connection."""

    def __init__(self, settings: Settings) -> None:
        import urllib3

        self.base = settings.orthanc_url
        headers = {"Accept": "application/json"}
        if settings.orthanc_user or settings.orthanc_password:
            credentials = f"{settings.orthanc_user}:{settings.orthanc_password}"
            headers.update(urllib3.make_headers(basic_auth=credentials))
            hide_secrets(settings.orthanc_password, headers["authorization"].split()[-1])
        options: dict[str, Any] = {
            "num_pools": 1,
            "maxsize": ORTHANC_FETCH_THREADS + 2,
            "headers": headers,
            "retries": urllib3.util.Retry(
                total=2, connect=2, read=2, status=0, redirect=0, backoff_factor=0.1
            ),
            "timeout": urllib3.Timeout(
                connect=settings.connect_timeout_seconds, read=settings.read_timeout_seconds
            ),
        }
        if self.base.startswith("https://"):
            options["cert_reqs"] = "CERT_REQUIRED"
            options["ca_certs"] = settings.orthanc_ca_bundle or _default_ca_bundle()
        self.pool = urllib3.PoolManager(**options)
        self.http_error = urllib3.exceptions.HTTPError

    def get(self, path: str, missing_ok: bool = False) -> Any:
        """The JSON at `path`; None for a 404 when `missing_ok` (a resource
        deleted between the change log and its read: nothing to retry)."""
        try:
            response = self.pool.request("GET", self.base + path, redirect=False)
        except self.http_error as exc:
            raise OrthancError(
                f"cannot reach Orthanc at {self.base}: {_reason(_cause_chain(exc))}"
            ) from None
        if response.status == 404 and missing_ok:
            return None
        if response.status in (401, 403):
            raise OrthancError(
                f"Orthanc at {self.base} refused the credentials (HTTP {response.status}):"
                " check orthanc.user and orthanc.password in config.json"
            )
        if response.status != 200:
            raise OrthancError(
                f"Orthanc at {self.base} answered HTTP {response.status} to GET"
                f" {path.split('?')[0]}"
            )
        try:
            return json.loads(response.data)
        except ValueError:
            raise OrthancError(
                f"Orthanc at {self.base} answered GET {path.split('?')[0]} with no JSON"
            ) from None

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
        self.pool.clear()


class OrthancStatements:
    """The SQLite queue's statements that only an Orthanc source runs."""

    QUEUE_COLUMNS = (
        "SELECT study_pk AS queued_pk, sent_version, study_iuid AS known_iuid,"
        " enqueued_at AS queued_at, attempts, source_id FROM study_service"
    )
    SELECT_NEW_PAGE = (
        QUEUE_COLUMNS + " WHERE status = 'pending' AND attempts = 0 AND study_pk > ?"
        " ORDER BY study_pk LIMIT ?"
    )
    SELECT_DUE_PAGE = (
        QUEUE_COLUMNS + " WHERE status = 'pending' AND attempts > 0"
        f" AND (next_attempt_at IS NULL OR next_attempt_at <= {SQLITE_NOW})"
        " AND study_pk > ? ORDER BY study_pk LIMIT ?"
    )
    # A change in Orthanc: the study pending again (its Orthanc ID kept).
    # Rows: (study_pk, Orthanc ID).
    ENQUEUE_CHANGE = (
        "INSERT OR IGNORE INTO study_service (study_pk, status, attempts, enqueued_at, source_id)"
        f" VALUES (?1, 'pending', 0, {SQLITE_NOW}, ?2);\n"
        "UPDATE study_service SET"
        " sent_version = CASE WHEN status IN ('deleted', 'deleting') THEN NULL"
        " ELSE sent_version END, status = 'pending', attempts = 0, last_error = NULL,"
        f" next_attempt_at = NULL, enqueued_at = {SQLITE_NOW}, source_id = ?2"
        " WHERE study_pk = ?1"
    )
    QUEUE_STATE = "SELECT study_pk, status, sent_version FROM study_service WHERE study_pk IN "
    MARK_RECONCILED = f"UPDATE study_service SET reconciled_at = {SQLITE_NOW} WHERE study_pk = ?"
    # What reconcile did not find in Orthanc since its sweep began.
    SELECT_UNSEEN = (
        "SELECT study_pk, study_iuid, source_id FROM study_service WHERE study_pk > 0"
        " AND status IN ('pending', 'sent', 'failed') AND COALESCE(reconciled_at, '') < ?"
    )
    SELECT_DELIVERED_IUIDS = (
        "SELECT study_iuid FROM study_service WHERE status = 'sent' AND study_iuid IN "
    )


class Orthanc:
    """Orthanc's studies as the document's fields:

    - patient_pk and study_pk: orthanc_pk() of the Orthanc IDs.
    - patient_id, patient_name: PatientMainDicomTags (the name without its
      trailing empty components, as 2.x sends it).
    - study_datetime: StudyDate and StudyTime, as arc-light's; description,
      UID: MainDicomTags.
    - study_modality: the distinct modalities of its series, in alphabetical
      order; study_series and study_instances: its series, and their images.
    - A study is sent once stable: IsStable, or quiet for
      ORTHANC_QUIET_SECONDS (Orthanc forgets what it was waiting for when it
      restarts). A study Orthanc no longer has is withdrawn.
    """

    name = "Orthanc"
    UNSETTLED = "Orthanc has not marked it stable yet (images may still come)"

    def __init__(self, quiet_seconds: int) -> None:
        self.quiet_seconds = quiet_seconds

    def join_args(self) -> tuple[Any, ...]:
        return ()

    def fields(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        fields = dict(row)
        fields["pat_name"] = _person_name_as_2x(row["pat_name"])
        fields["study_desc"] = row["study_desc"] or None
        fields["study_datetime"] = _arclight_datetime(row["study_date"], row["study_time"])
        return fields

    def settled(self, row: Mapping[str, Any]) -> bool:
        if row["is_stable"]:
            return True
        updated = _orthanc_time(row["last_update"])
        if updated is None:
            return False
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        return (now - updated).total_seconds() > self.quiet_seconds

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        return row["study_pk"] is None


def _orthanc_time(value: Any) -> datetime.datetime | None:
    """Orthanc's "20261202T023015" (its clock, in UTC)."""
    try:
        return datetime.datetime.strptime(str(value), "%Y%m%dT%H%M%S")
    except ValueError:
        return None


class OrthancSource:
    """The studies of an Orthanc, read through its REST API, with the change
    log's cursor and the pending studies in the SQLite queue."""

    sql = OrthancStatements
    pipelined_initial = False  # Orthanc lists studies in no order: enqueued first

    def __init__(self, db: Database, client: OrthancClient, schema: Orthanc) -> None:
        self.db = db
        self.client = client
        self.schema = schema
        self.page_size = db.settings.page_size

    # -- what changed --------------------------------------------------------

    def enqueue_changes(self) -> int:
        """Reads the change log after the cursor and enqueues the studies it
        names; the first call (a new queue) starts the cursor at the end of
        the log, as installing the indexer does on dcm4chee."""
        state = self.db.queue.bookkeeping(CURSOR_ROW_PK)
        if state is None:
            last = int(self.client.get("/changes?last")["Last"])
            self.db.queue.start_bookkeeping(CURSOR_ROW_PK, "cursor", last)
            return 0
        cursor, enqueued = int(state["position"] or 0), 0
        while True:
            page = self.client.get(f"/changes?since={cursor}&limit={ORTHANC_CHANGES_PAGE}")
            changes, last = page["Changes"], int(page["Last"])
            if self._history_lost(cursor, changes, last):
                return enqueued + self._resynchronise(cursor, last)
            if not changes:
                return enqueued
            studies = self._studies_of(changes)
            cursor = int(changes[-1]["Seq"])
            self._enqueue(studies, cursor)
            enqueued += len(studies)
            if page["Done"]:
                return enqueued

    def _history_lost(self, cursor: int, changes: list[dict], last: int) -> bool:
        """Whether the log no longer goes back to the cursor: Orthanc's
        database replaced or restored (its newest Seq below the cursor), or
        its log cleared (its oldest row past the cursor: the rows of deleted
        resources go too, but never all of the older ones)."""
        if not changes:
            return last < cursor
        if int(changes[0]["Seq"]) == cursor + 1:
            return False
        oldest = self.client.get("/changes?since=0&limit=1")["Changes"]
        return bool(oldest) and int(oldest[0]["Seq"]) > cursor + 1

    def _resynchronise(self, cursor: int, last: int) -> int:
        log.warning(
            "Orthanc's change log no longer goes back to where this indexer left it (Seq %d;"
            " newest now %d): its database was replaced or restored, or its log cleared;"
            " every study is enqueued again and only what changed will be sent",
            cursor,
            last,
        )
        count, offset = 0, 0
        while True:
            ids = self.client.get(f"/studies?since={offset}&limit={ORTHANC_LIST_PAGE}")
            if not ids:
                break
            self._enqueue(ids, None)
            count, offset = count + len(ids), offset + len(ids)
        self.db.query(self.db.queue.sql.SET_CURSOR, (last, CURSOR_ROW_PK))
        return count

    def _studies_of(self, changes: list[dict]) -> list[str]:
        """The studies the changes are about, in order, once each (a series
        or an instance is looked up: its study is not in the entry)."""
        wanted = [c for c in changes if c["ChangeType"] in ORTHANC_STUDY_CHANGES]
        series_study: dict[str, str | None] = {}

        def study_of(change: dict) -> str | None:
            kind, ident = change["ResourceType"], change["ID"]
            if kind == "Study":
                return ident
            if kind == "Instance":
                instance = self.client.get(f"/instances/{ident}", missing_ok=True)
                ident = instance["ParentSeries"] if instance else None
            if kind in ("Series", "Instance") and ident is not None:
                if ident not in series_study:
                    series = self.client.get(f"/series/{ident}", missing_ok=True)
                    series_study[ident] = series["ParentStudy"] if series else None
                return series_study[ident]
            return None  # a patient's change: its studies log their own

        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            found = list(pool.map(study_of, wanted))
        return list(dict.fromkeys(ident for ident in found if ident))

    def _enqueue(self, studies: list[str], cursor: int | None) -> None:
        rows = [(orthanc_pk(ident), ident) for ident in studies]

        def work() -> None:
            self.db.execute_batch(self.sql.ENQUEUE_CHANGE, rows)
            if cursor is not None:
                self.db.query(self.db.queue.sql.SET_CURSOR, (cursor, CURSOR_ROW_PK))

        self.db.in_transaction(work)

    # -- the studies ----------------------------------------------------------

    def count_studies(self) -> int:
        return int(self.client.get("/statistics")["CountStudies"])

    def initial_page(self, offset: int) -> tuple[list[tuple], int]:
        """The initial load's next page of Orthanc's studies (by offset: it
        lists them in no order, so an interrupted load starts over; a study
        added meanwhile is in the change log anyway), as ENQUEUE_FOR_INITIAL
        takes them."""
        ids = self.client.get(f"/studies?since={offset}&limit={ORTHANC_LIST_PAGE}")
        return [(orthanc_pk(ident), ident) for ident in ids], offset + len(ids)

    def initial_enqueued(self, queue: StudyServiceQueue, position: int) -> None:
        """The change log's cursor was set when the queue was made."""

    def new_studies(
        self, frontier: Callable[[int], int | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The pending studies not tried since enqueued, with their fields."""
        return self._stream(self.sql.SELECT_NEW_PAGE)

    def due_studies(self) -> Iterator[dict[str, Any]]:
        """The pending studies that failed before, whose next attempt is due."""
        return self._stream(self.sql.SELECT_DUE_PAGE)

    def pending_studies(self) -> Iterator[dict[str, Any]]:
        return itertools.chain(self.new_studies(), self.due_studies())

    def _stream(self, sql: str) -> Iterator[dict[str, Any]]:
        import concurrent.futures

        after = 0
        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            while True:
                page = self.db.query(sql, (after, self.page_size))
                if not page:
                    return
                yield from pool.map(self._with_fields, page)
                after = page[-1]["queued_pk"]

    def _with_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """A queue row with its study's fields, read from Orthanc (two GETs);
        study_pk None if Orthanc no longer has it."""
        return {**row, **self.study_fields(row["source_id"])}

    def study_fields(self, ident: str, study: dict | None = None) -> dict[str, Any]:
        study = study or self.client.get(f"/studies/{ident}", missing_ok=True)
        series = self.client.get(f"/studies/{ident}/series", missing_ok=True) if study else None
        if study is None or series is None:
            return {"study_pk": None}
        tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
        modalities = {s.get("MainDicomTags", {}).get("Modality") for s in series} - {None, ""}
        return {
            "study_pk": orthanc_pk(study["ID"]),
            "study_iuid": tags.get("StudyInstanceUID"),
            "study_date": tags.get("StudyDate"),
            "study_time": tags.get("StudyTime"),
            "study_desc": tags.get("StudyDescription"),
            "updated_time": None,
            "mods_in_study": "\\".join(sorted(modalities)) or None,
            "num_series": len(series),
            "num_instances": sum(len(s.get("Instances", ())) for s in series),
            "patient_pk": orthanc_pk(study["ParentPatient"]),
            "pat_id": patient.get("PatientID"),
            "pat_name": patient.get("PatientName"),
            "is_stable": bool(study.get("IsStable")),
            "last_update": study.get("LastUpdate"),
        }

    # -- reconcile -----------------------------------------------------------

    def reconcile(
        self, pacs: OrthancPacs, settings: Settings, max_studies: int | None, stop: Stop
    ) -> ReconcileReport:
        """Lists every study of Orthanc, enqueueing those whose document is
        not what the service holds; then, once the sweep is whole, the
        studies it did not find, each checked gone, as deleted (Orthanc
        logs no deletion: this is how they are followed)."""
        report, queue = ReconcileReport(), pacs.queue
        offset = queue.reconcile_position()
        started = queue.bookkeeping(RECONCILE_ROW_PK)["started"]
        bar = _progress_bar(self.count_studies, "reconciling")
        cap = RateCap(settings.reconcile_rows_per_second)
        try:
            while (max_studies is None or report.checked < max_studies) and not stop.requested():
                ids = self.client.get(f"/studies?since={offset}&limit={self.page_size}")
                if not ids:
                    report.gone = self._mark_unseen_gone(queue, started)
                    report.finished = True
                    queue.finish_reconcile()
                    break
                offset += len(ids)
                self._reconcile_page(queue, ids, offset, settings.center, report)
                bar.update(len(ids))
                cap.passed(len(ids))
        finally:
            bar.close()
            report.seconds = time.monotonic() - cap.started
        return report

    def _reconcile_page(
        self, queue: StudyServiceQueue, ids: list[str], offset: int, center: str, report: Any
    ) -> None:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            fields = list(pool.map(self.study_fields, ids))
        pks = [orthanc_pk(ident) for ident in ids]
        placeholders = "(" + ", ".join(["?"] * len(pks)) + ")"  # placeholders, never values
        rows = self.db.query(self.sql.QUEUE_STATE + placeholders, pks)
        state = {row["study_pk"]: row for row in rows}
        changed = []
        for pk, study in zip(pks, fields):
            known = state.get(pk)
            if known is None:
                report.untracked += 1
            elif needs_resend({**known, **study}, center, self.schema):
                changed.append(pk)
        report.checked += len(ids)
        report.changed += len(changed)

        def work() -> None:
            self.db.execute_batch(queue.sql.ENQUEUE_CHANGED, [(pk,) for pk in changed])
            self.db.execute_batch(self.sql.MARK_RECONCILED, [(pk,) for pk in pks])
            self.db.query(queue.sql.SET_CURSOR, (offset, RECONCILE_ROW_PK))

        self.db.in_transaction(work)

    def _mark_unseen_gone(self, queue: StudyServiceQueue, started: Any) -> int:
        """The studies the sweep did not see, that Orthanc confirms gone."""
        unseen = self.db.query(self.sql.SELECT_UNSEEN, (str(started),))
        gone = [
            (row["study_pk"], row["study_iuid"])
            for row in unseen
            if row["source_id"] is None
            or self.client.get(f"/studies/{row['source_id']}", missing_ok=True) is None
        ]
        queue.mark_gone(gone)
        return len(gone)

    # -- for check and adopt ---------------------------------------------------

    def time_index(self) -> tuple[bool, str]:
        state = self.db.queue.bookkeeping(CURSOR_ROW_PK)
        seq = state["position"] if state else "(not started yet)"
        return True, (
            f"Orthanc's change log: each tick reads only the changes after Seq {seq}"
            " (deletions are found by the nightly `client.py reconcile`)"
        )

    def delivered_iuids(self, iuids: list[str | None]) -> set[str]:
        wanted = [iuid for iuid in iuids if iuid]
        if not wanted:
            return set()
        placeholders = "(" + ", ".join(["?"] * len(wanted)) + ")"  # placeholders, never values
        rows = self.db.query(self.sql.SELECT_DELIVERED_IUIDS + placeholders, wanted)
        return {row["study_iuid"] for row in rows}


class OrthancPacs:
    """An Orthanc, as the commands see a PACS: its REST API (the source)
    and the queue in a SQLite file (queue_file, beside config.json)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.where = f"Orthanc at {settings.orthanc_url}"
        self.client = OrthancClient(settings)
        self.version = self.client.version()  # also proves the credentials
        self.db = Database(settings, SQLiteEngine(settings), f"queue {settings.queue_file}")
        self.Error = self.db.Error
        self.queue = self.db.queue
        self.schema = Orthanc(max(ORTHANC_QUIET_SECONDS, settings.stable_age_seconds))
        self.source = OrthancSource(self.db, self.client, self.schema)
        self.install_script = self.grant_script = ""

    def explain(self, exc: BaseException) -> DatabaseError:
        return self.db.explain(exc)

    def describe(self, exc: BaseException) -> str:
        return self.db.describe(exc)

    def server_version(self) -> str:
        return f"Orthanc {self.version}"

    def connection_lines(self) -> list[tuple[str, str, int]]:
        """check's first line: the Orthanc, its version, whose credentials."""
        user = self.settings.orthanc_user or "no user"
        line = f"source: {self.where}, {self.server_version()}, credentials of {user} accepted"
        return [("ok", line, 0)]

    def installation_lines(self) -> list[tuple[str, str, int]]:
        """check's line once the SQLite queue is found current."""
        queue_version = self.db.query(self.queue.sql.SERVER_VERSION)[0]["v"]
        return [("ok", f"queue: {self.settings.queue_file} ({queue_version}), current", 0)]

    def privilege_problems(self) -> list[str]:
        return []  # the credentials were accepted; Orthanc has no finer rights to read

    def close(self) -> None:
        self.client.close()
        self.db.close()
