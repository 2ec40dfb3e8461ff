"""Orthanc, read through its REST API and its change log."""

from __future__ import annotations

import datetime
import functools
import itertools
import logging
import logging.handlers
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..database import Database
from ..engines import SQLiteEngine
from ..reconciliation import ReconcileReport, needs_resend
from ..run import RateCap, _progress_bar
from ..study_service import CURSOR_ROW_PK, RECONCILE_ROW_PK, SQLITE_NOW
from ..values import _arclight_datetime, _person_name_as_2x, dicom_text
from .orthanc_client import (
    ORTHANC_BODY_BYTES,
    ORTHANC_FETCH_THREADS,
    OrthancClient,
)
from .orthanc_pages import (
    OrthancError,
    PageListing,
    PageStore,
    UnreadableStudy,
    checked_study,
    orthanc_pk,
    series_ok,
    study_row,
)

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

ORTHANC_CHANGES_PAGE = 1000  # change log rows per request
# Orthanc calls a study stable StableAge seconds (60 by default) after its
# last image; it keeps that in memory only, so a study stored just before a
# restart never gets a StableStudy. A study quiet for this long counts as
# stable whatever Orthanc says (or stable_age_seconds, if longer).
ORTHANC_QUIET_SECONDS = 120
# The change log's entries that make a study worth reading again.
ORTHANC_STUDY_CHANGES = frozenset(
    {"NewStudy", "NewSeries", "NewInstance", "StableStudy", "UpdatedMetadata"}
)


class ChangeFeedError(OrthancError):
    """The change log answered what Orthanc never does: a page that does not
    advance (a caching proxy repeating one page), or goes backwards."""


# What reading one study can raise when Orthanc (or a proxy in front of it)
# answers wrongly: the client's errors, and what a malformed answer makes of
# the code that reads it.
STUDY_READ_ERRORS = (OrthancError, UnreadableStudy, ValueError, TypeError, KeyError, AttributeError)
# The paths that tell whether a resource of a change still exists.
RESOURCE_PATHS = {
    "Patient": "patients",
    "Study": "studies",
    "Series": "series",
    "Instance": "instances",
}


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
    # A study Orthanc holds and the queue never knew (its change lost with a
    # restored Orthanc, its row lost with the queue file): sent as new.
    ENQUEUE_UNTRACKED = (
        "INSERT OR IGNORE INTO study_service (study_pk, status, attempts, enqueued_at, source_id)"
        f" VALUES (?, 'pending', 0, {SQLITE_NOW}, ?)"
    )
    # What reconcile did not find in Orthanc since its sweep began.
    SELECT_UNSEEN = (
        "SELECT study_pk, study_iuid, source_id FROM study_service WHERE study_pk > 0"
        " AND status IN ('pending', 'sent', 'failed') AND COALESCE(reconciled_at, '') < ?"
    )
    SELECT_DELIVERED_IUIDS = (
        "SELECT study_iuid FROM study_service WHERE status = 'sent' AND study_iuid IN "
    )
    # The change log's cursor row keeps, beside the Seq of the last change
    # read (cursor_pk), that change's "ResourceType ID" (source_id): the
    # anchor by which the next tick knows the log is still the one it read.
    SELECT_ANCHOR = (
        f"SELECT cursor_pk AS position, source_id AS anchor FROM study_service"
        f" WHERE study_pk = {CURSOR_ROW_PK}"
    )
    SET_CURSOR_AND_ANCHOR = (
        f"UPDATE study_service SET cursor_pk = ?, source_id = ? WHERE study_pk = {CURSOR_ROW_PK}"
    )


class Orthanc:
    """Orthanc's studies as the document's fields:

    - patient_pk and study_pk: orthanc_pk() of the Orthanc IDs.
    - patient_id, patient_name: PatientMainDicomTags; study_datetime,
      description, UID: MainDicomTags; each under values.py's rules (empty
      trailing components and groups dropped, padding trimmed, empty as
      absent, ACR-NEMA dates read).
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
        # values.py's rules: padding trimmed, empty the same as absent.
        fields["pat_id"] = dicom_text(row["pat_id"])
        fields["study_desc"] = dicom_text(row["study_desc"])
        fields["study_datetime"] = _arclight_datetime(row["study_date"], row["study_time"])
        return fields

    def settled(self, row: Mapping[str, Any]) -> bool:
        if row.get("unreadable"):
            return False  # never sent: delivery records its error (studies_to_send)
        if row["is_stable"]:
            return True
        updated = _orthanc_time(row["last_update"])
        if updated is None:
            return False
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        return (now - updated).total_seconds() > self.quiet_seconds

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        return row["study_pk"] is None


def _anchor_of(change: Mapping[str, Any]) -> str:
    """A change's anchor: "ResourceType ID" (see OrthancSource, what changed)."""
    return f"{change['ResourceType']} {change['ID']}"


def _one_line(exc: BaseException, ident: str | None = None) -> str:
    """A read's failure as one line: the client's and ours say what was
    asked and how it failed; anything else only its kind (its text could
    hold an answer's values, patient data among them)."""
    if isinstance(exc, (OrthancError, UnreadableStudy)):
        return str(exc)
    about = f" for study {ident}" if ident else ""
    return f"Orthanc's answer{about} could not be read ({type(exc).__name__})"


def _checked_study(ident: str, study: Any, series: Any) -> tuple[dict, dict]:
    """The study's MainDicomTags and PatientMainDicomTags, once its answers
    (GET /studies/{id} and /studies/{id}/series) are a study's: never a
    document made from a partial or wrong read."""
    tags, patient = checked_study(ident, study, f"Orthanc's answer to GET /studies/{ident}")
    if not isinstance(series, list) or not all(series_ok(s) for s in series):
        raise UnreadableStudy(
            f"Orthanc's answer to GET /studies/{ident}/series is not a list of series"
        )
    return tags, patient


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
        self.pages = PageStore(db)  # what this run's pages read (initial, reconcile)
        self.listing: PageListing | None = None  # initial's listing of studies

    # -- what changed --------------------------------------------------------
    #
    # The cursor row keeps the Seq of the last change read and, as its anchor,
    # that change's "ResourceType ID". Each tick's first request starts one
    # change early (since = cursor - 1), so the one request that reads what is
    # new also shows whether the log is still the one the cursor was read from:
    # - its Last below the cursor: Orthanc's database replaced, or restored
    #   from an older backup;
    # - another change at the cursor's Seq: restored, and new studies have
    #   pushed Last past the cursor again (Seq are numbered anew from the
    #   backup's Last, so the cursor's Seq now names another change);
    # - no change at the cursor's Seq: either its resource was deleted (its
    #   rows go with it, an ordinary day) or the log was cleared (DELETE
    #   /changes does not lower Last). It is history lost if the anchor's
    #   resource still exists, or if no row at or below the cursor is left.
    #   An anchor "" says the log had no change at the cursor when it was set
    #   (a resynchronisation on an empty log, as DELETE /changes leaves it):
    #   then history is lost if what followed the cursor is gone (a gap after
    #   it, or no change left below Last). No anchor (a queue from before
    #   anchors): history is lost if no row at or below the cursor is left;
    #   its anchor is taken from the change at the cursor, once seen.
    # History lost is a full resynchronisation: every study enqueued again,
    # only what changed sent (the queue keeps the fingerprints). A change
    # whose resource was deleted and then stored again (same Orthanc ID) can
    # cause one resynchronisation too many: costly, never a loss.
    # A page that does not advance (a caching proxy repeating one page, Seq
    # or Last going backwards) stops the run: ChangeFeedError, exit 4, the
    # cursor where it was.

    def enqueue_changes(self) -> int:
        """Reads the change log after the cursor and enqueues the studies it
        names; the first call (a new queue) starts the cursor at the end of
        the log, as installing the indexer does on dcm4chee."""
        state = self.db.queue.bookkeeping(CURSOR_ROW_PK)
        if state is None:
            seq, anchor = self._newest_change()
            self.db.queue.start_bookkeeping(CURSOR_ROW_PK, "cursor", seq)
            self.db.query(self.sql.SET_CURSOR_AND_ANCHOR, (seq, anchor))
            return 0
        row = self.db.query(self.sql.SELECT_ANCHOR)[0]
        cursor, anchor = int(row["position"] or 0), row["anchor"]
        since, newest, enqueued, first = max(cursor - 1, 0), None, 0, True
        series_study: dict[str, str | None] = {}  # the series looked up in this tick
        while True:
            changes, newest, done = self._changes_page(since, cursor, newest)
            if first and cursor > 0:
                if self._history_lost(cursor, anchor, changes, newest):
                    return self._resynchronise(cursor, newest)
                if changes and int(changes[0]["Seq"]) == cursor:
                    if anchor is None:  # a queue from before anchors: its anchor now
                        anchor = _anchor_of(changes[0])
                        self.db.query(self.sql.SET_CURSOR_AND_ANCHOR, (cursor, anchor))
                    changes = changes[1:]  # the anchor itself, read at the last tick
            first = False
            if changes:
                studies = self._studies_of(changes, series_study)
                cursor, anchor = int(changes[-1]["Seq"]), _anchor_of(changes[-1])
                self._enqueue(studies, cursor, anchor)
                enqueued += len(studies)
            if done or since == cursor:
                return enqueued
            since = cursor

    def _changes_page(
        self, since: int, cursor: int, newest: int | None
    ) -> tuple[list[dict], int, bool]:
        """One page of the change log after `since`: its changes, Last and
        Done, checked to be what Orthanc answers (Seq above `since`, rising,
        at most Last; Last never lower than earlier in this run)."""
        page = self.client.get(f"/changes?since={since}&limit={ORTHANC_CHANGES_PAGE}")
        try:
            changes, last, done = page["Changes"], int(page["Last"]), bool(page["Done"])
            seqs = [int(change["Seq"]) for change in changes]
            if not all(isinstance(c[k], str) for c in changes for k in ("ResourceType", "ID")):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ChangeFeedError(
                f"Orthanc at {self.client.base} answered GET /changes with a page that is not"
                f" a change log's; the cursor stays at Seq {cursor}"
            ) from None
        problem = None
        if seqs and seqs[0] <= since:
            problem = f"its changes begin at Seq {seqs[0]}, not after Seq {since} as asked"
        elif any(later <= earlier for earlier, later in zip(seqs, seqs[1:])):
            problem = "its changes' Seq go backwards"
        elif seqs and last < seqs[-1]:
            problem = f"its Last ({last}) is below its own changes (up to Seq {seqs[-1]})"
        elif newest is not None and last < newest:
            problem = f"its Last went back from {newest} to {last} during this run"
        if problem:
            raise ChangeFeedError(
                f"Orthanc's change log at {self.client.base} does not advance: asked for the"
                f" changes after Seq {since}, {problem} (a cache or proxy in front of Orthanc?);"
                f" the cursor stays at Seq {cursor}"
            )
        return changes, last, done

    def _history_lost(
        self, cursor: int, anchor: str | None, changes: list[dict], last: int
    ) -> bool:
        """Whether the log is no longer the one the cursor was read from (see above)."""
        if last < cursor:
            return True
        first = int(changes[0]["Seq"]) if changes else None
        if first == cursor:
            return bool(anchor) and _anchor_of(changes[0]) != anchor
        if anchor == "":  # the log had no change at the cursor when it was set
            # Changes after it are gone (a gap, or none left below Last).
            return (first is None and last > cursor) or (first is not None and first > cursor + 1)
        if anchor is not None and self._resource_exists(anchor):
            return True
        oldest = self._oldest_change()
        return oldest is None or oldest > cursor

    def _oldest_change(self) -> int | None:
        """The Seq of the oldest change left in the log (None: it is empty)."""
        page = self.client.get("/changes?since=0&limit=1")
        try:
            changes = page["Changes"]
            return int(changes[0]["Seq"]) if changes else None
        except (KeyError, TypeError, ValueError):
            raise ChangeFeedError(
                f"Orthanc at {self.client.base} answered GET /changes with a page that is not"
                " a change log's"
            ) from None

    def _resource_exists(self, anchor: str) -> bool:
        kind, _, ident = anchor.partition(" ")
        path = RESOURCE_PATHS.get(kind)
        return path is not None and self.client.get(f"/{path}/{ident}", missing_ok=True) is not None

    def _newest_change(self) -> tuple[int, str]:
        """The newest change's Seq and anchor ("": the log has no change at
        that Seq, as after DELETE /changes, or none at all)."""
        page = self.client.get("/changes?last")
        try:
            last, changes = int(page["Last"]), page["Changes"]
            anchor = _anchor_of(changes[-1]) if changes and changes[-1]["Seq"] == last else ""
        except (KeyError, TypeError, ValueError):
            raise ChangeFeedError(
                f"Orthanc at {self.client.base} answered GET /changes?last with a page that is"
                " not a change log's"
            ) from None
        return last, anchor

    def _resynchronise(self, cursor: int, last: int) -> int:
        log.warning(
            "Orthanc's change log no longer goes back to where this indexer left it (Seq %d;"
            " newest now %d): its database was replaced or restored, or its log cleared;"
            " every study is enqueued again and only what changed will be sent",
            cursor,
            last,
        )
        # The newest change before the listing: what changes during it is after it.
        newest, anchor = self._newest_change()
        count = 0
        for ids in self._listing("studies", expand=False).pages():
            if not all(isinstance(i, str) for i in ids):
                raise OrthancError(
                    f"Orthanc at {self.client.base} answered GET /studies with something that"
                    " is not a list of study IDs"
                )
            self._enqueue(ids, None, None)
            count += len(ids)
        self.db.query(self.sql.SET_CURSOR_AND_ANCHOR, (newest, anchor))
        return count

    def _studies_of(self, changes: list[dict], series_study: dict[str, str | None]) -> list[str]:
        """The studies the changes are about, in order, once each. A series'
        or an instance's study is not in its entry: it is looked up, a series
        once per tick (`series_study`). An instance is looked up only when no
        series read here lists it: a series of 1,000 new images costs one
        instance's lookup and its series', not 1,000 (_series_of_instances).
        A lookup that fails while Orthanc answers is skipped: the study's
        StableStudy, logged after any new image, names it without a lookup."""
        wanted = [c for c in changes if c.get("ChangeType") in ORTHANC_STUDY_CHANGES]
        instances = [c["ID"] for c in wanted if c["ResourceType"] == "Instance"]
        instance_series = self._series_of_instances(instances, series_study)
        series = {c["ID"] for c in wanted if c["ResourceType"] == "Series"}
        self._look_up_series([i for i in series if i not in series_study], series_study)

        def study_of(change: dict) -> str | None:
            kind, ident = change["ResourceType"], change["ID"]
            if kind == "Study":
                return str(ident)
            if kind == "Instance":
                ident = instance_series.get(ident)
            if kind in ("Series", "Instance") and ident is not None:
                return series_study.get(ident)
            return None  # a patient's change: its studies log their own

        return list(dict.fromkeys(ident for ident in map(study_of, wanted) if ident))

    def _series_of_instances(
        self, instances: list[str], series_study: dict[str, str | None]
    ) -> dict[str, str | None]:
        """Each new instance's series. A few instances are looked up at once
        (one at first, twice as many while each finds a series of its own);
        each series found is read, and every instance it lists is answered
        by it without a lookup of its own."""
        import concurrent.futures

        found: dict[str, str | None] = {}
        unresolved = list(dict.fromkeys(instances))
        wave = 1
        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            while unresolved:
                asked, unresolved = unresolved[:wave], unresolved[wave:]
                parents = list(pool.map(self._parent_series, asked))
                found.update(zip(asked, parents))
                new = [p for p in dict.fromkeys(parents) if p is not None]
                listed = self._look_up_series(new, series_study, pool)
                still = []
                for ident in unresolved:
                    if ident in listed:
                        found[ident] = listed[ident]
                    else:
                        still.append(ident)
                unresolved = still
                distinct = len(new) == len(asked)
                wave = min(wave * 2, ORTHANC_FETCH_THREADS) if distinct else 1
        return found

    def _parent_series(self, instance: str) -> str | None:
        try:
            answer = self.client.get(f"/instances/{instance}", missing_ok=True)
            if answer is None:
                return None  # deleted since: nothing to send for it
            parent = answer["ParentSeries"]
            if not isinstance(parent, str):
                raise TypeError
            return parent
        except STUDY_READ_ERRORS as exc:
            self._check_orthanc_answers()
            log.debug("instance %s skipped: %s", instance, _one_line(exc))
            return None

    def _look_up_series(
        self, series: list[str], series_study: dict[str, str | None], pool: Any = None
    ) -> dict[str, str]:
        """Reads each series (GET /series/{id}) into `series_study`; returns
        which series each instance they list belongs to."""
        import concurrent.futures

        def read(ident: str) -> tuple[str | None, list]:
            try:
                answer = self.client.get(f"/series/{ident}", missing_ok=True)
                if answer is None:
                    return None, []
                study, listed = answer["ParentStudy"], answer.get("Instances", [])
                if not isinstance(study, str) or not isinstance(listed, list):
                    raise TypeError
                return study, listed
            except STUDY_READ_ERRORS as exc:
                self._check_orthanc_answers()
                log.debug("series %s skipped: %s", ident, _one_line(exc))
                return None, []

        if not series:
            return {}
        if pool is None:
            with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as own:
                answers = list(own.map(read, series))
        else:
            answers = list(pool.map(read, series))
        listed: dict[str, str] = {}
        for ident, (study, instances) in zip(series, answers):
            series_study[ident] = study
            listed.update((i, ident) for i in instances if isinstance(i, str))
        return listed

    def _enqueue(self, studies: list[str], cursor: int | None, anchor: str | None) -> None:
        rows = [(orthanc_pk(ident), ident) for ident in studies]

        def work() -> None:
            self.db.execute_batch(self.sql.ENQUEUE_CHANGE, rows)
            # Changed since its page was read (initial): read again on its own.
            self.pages.forget([pk for pk, _ in rows])
            if cursor is not None:
                self.db.query(self.sql.SET_CURSOR_AND_ANCHOR, (cursor, anchor))

        self.db.in_transaction(work)

    def _listing(self, resource: str, expand: bool = True) -> PageListing:
        """Orthanc's studies (overlapping pages: none skipped) or series."""
        return PageListing(
            self.client.get_sized,
            f"Orthanc at {self.client.base}",
            resource,
            expand=expand,
            overlapping=resource == "studies",
            body_bytes=ORTHANC_BODY_BYTES,
        )

    def _check_orthanc_answers(self) -> None:
        """After one study's read failed: raises if Orthanc itself does not
        answer (down, credentials refused), which is every study's trouble."""
        self.client.get("/system")

    # -- the studies ----------------------------------------------------------

    def count_studies(self) -> int:
        """For the progress bar only: 0 when Orthanc's answer makes no sense."""
        try:
            return int(self.client.get("/statistics")["CountStudies"])
        except (KeyError, TypeError, ValueError):
            return 0

    def initial_page(self, offset: int) -> tuple[list[tuple], int]:
        """The initial load's next page of Orthanc's studies, expanded, as
        ENQUEUE_FOR_INITIAL takes them; what they say is kept (PageStore) so
        that delivery need not ask again. Orthanc lists them by offset, in no
        guaranteed order: an interrupted load starts over (offset 0); a
        study added meanwhile is in the change log anyway."""
        if offset == 0 or self.listing is None:
            self.pages.reset()
            self.listing = self._listing("studies")
        while True:
            entries = self.listing.next_page()
            if entries is None:
                return [], self.listing.position
            rows = self.pages.add_studies(entries)
            if rows:
                return rows, self.listing.position

    def initial_enqueued(self, queue: StudyServiceQueue, position: int) -> None:
        """Every study listed: then every series (for each study's
        modalities and images), and the change log once more, from the
        cursor set before the first page: a study stored or changed while
        the pages were read is enqueued and read again on its own."""
        if self.listing is None:
            return
        self.listing = None
        for entries in self._listing("series").pages():
            self.pages.add_series(entries)
        if self.pages.nameless:
            log.warning(
                "Orthanc listed %d studies without an ID: they cannot be read or sent",
                self.pages.nameless,
            )
        self.enqueue_changes()

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
                wanted = {row["queued_pk"]: row["source_id"] for row in page if row["source_id"]}
                joined = self.pages.joined(wanted)
                if len(joined) == len(page):  # all read in this run's pages
                    yield from ({**row, **joined[row["queued_pk"]]} for row in page)
                else:
                    yield from pool.map(functools.partial(self._with_fields, joined=joined), page)
                after = page[-1]["queued_pk"]

    def _with_fields(
        self, row: dict[str, Any], joined: Mapping[int, dict[str, Any]]
    ) -> dict[str, Any]:
        """A queue row with its study's fields: those this run's pages read,
        or else read from Orthanc (two GETs, see study_fields)."""
        if row["source_id"] is None:
            return {**row, "study_pk": None}
        fields = joined.get(row["queued_pk"])
        return {**row, **(fields or self.study_fields(row["source_id"]))}

    def study_fields(self, ident: str, study: dict | None = None) -> dict[str, Any]:
        """The study's fields, from GET /studies/{id} and /studies/{id}/series.

        - study_pk None: Orthanc confirms it gone (a 404 read twice: a single
          spurious 404, from a proxy say, must not DELETE it from the index).
        - "unreadable" (one line, no patient data): its answers were not a
          study's (malformed or truncated JSON, wrong types, no
          StudyInstanceUID, an error status). That study's alone: it stays
          pending with that error and a next attempt; never sent.
        Raises only when Orthanc itself fails (its /system fails too)."""
        try:
            return self._read_study(ident, study)
        except STUDY_READ_ERRORS as exc:
            self._check_orthanc_answers()
            return {"study_pk": orthanc_pk(ident), "unreadable": _one_line(exc, ident)}

    def _read_study(self, ident: str, study: Any = None) -> dict[str, Any]:
        study = study or self._study_or_gone(ident)
        if study is None:
            return {"study_pk": None}
        series = self.client.get(f"/studies/{ident}/series", missing_ok=True)
        if series is None:  # deleted between the two reads, or a spurious 404
            if self._study_or_gone(ident) is None:
                return {"study_pk": None}
            raise UnreadableStudy(
                f"Orthanc answered HTTP 404 to GET /studies/{ident}/series but has the study"
            )
        tags, patient = _checked_study(ident, study, series)
        modalities = {s["MainDicomTags"].get("Modality") for s in series}
        images = sum(len(s["Instances"]) for s in series)
        return study_row(study, tags, patient, modalities, len(series), images)

    def _study_or_gone(self, ident: str) -> Any:
        """GET /studies/{id}; None once a 404 is read twice in a row."""
        for _ in range(2):
            study = self.client.get(f"/studies/{ident}", missing_ok=True)
            if study is not None:
                return study
        return None

    def _gone(self, ident: str) -> bool:
        """Whether Orthanc confirms the study gone (an error: not confirmed)."""
        try:
            return self._study_or_gone(ident) is None
        except STUDY_READ_ERRORS:
            self._check_orthanc_answers()
            return False

    # -- reconcile -----------------------------------------------------------

    def reconcile(
        self, queue: StudyServiceQueue, settings: Settings, max_studies: int | None, stop: Stop
    ) -> ReconcileReport:
        """Lists every study of Orthanc in pages, then every series, and
        enqueues the studies whose document is not what the service holds;
        then, once the sweep is whole, the studies it did not find, each
        checked gone, as deleted (Orthanc logs no deletion: this is how they
        are followed). With max_studies, the sweep pauses after about that
        many and the next reconcile carries on."""
        report = ReconcileReport()
        listing = self._listing("studies")
        listing.position = queue.reconcile_position()
        sweep = queue.bookkeeping(RECONCILE_ROW_PK)
        assert sweep is not None  # reconcile_position() started it
        bar = _progress_bar(self.count_studies, "reconciling")
        cap = RateCap(settings.reconcile_rows_per_second)
        self.pages.reset()
        try:
            listed, ended = 0, False
            while (max_studies is None or listed < max_studies) and not stop.requested():
                entries = listing.next_page()
                if entries is None:
                    ended = True
                    break
                count = len(self.pages.add_studies(entries))
                listed += count
                bar.update(count)
                cap.passed(count)
            for entries in self._listing("series").pages() if listed else ():
                if stop.requested():
                    break
                self.pages.add_series(entries)
            self._compare(queue, settings.center, report, stop)
            if stop.requested():
                return report  # the next reconcile lists these pages again
            if not ended:
                self.db.query(queue.sql.SET_CURSOR, (listing.position, RECONCILE_ROW_PK))
                return report
            report.gone = self._mark_unseen_gone(queue, sweep["started"])
            report.finished = True
            queue.finish_reconcile()
        finally:
            bar.close()
            report.seconds = time.monotonic() - cap.started
        return report

    def _compare(
        self, queue: StudyServiceQueue, center: str, report: ReconcileReport, stop: Stop
    ) -> None:
        """The studies the pages listed, by pk, a batch at a time, against
        the queue; a study the pages did not read whole is read on its own."""
        import concurrent.futures

        after = 0
        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            while not stop.requested():
                batch = self.pages.studies_after(after, self.page_size)
                if not batch:
                    return
                after = batch[-1]["study_pk"]
                joined = self.pages.joined({row["study_pk"]: row["ident"] for row in batch})
                ids = [row["ident"] for row in batch]
                read = [ident for ident in ids if orthanc_pk(ident) not in joined]
                alone = dict(zip(read, pool.map(self.study_fields, read)))
                fields = [joined.get(orthanc_pk(i)) or alone[i] for i in ids]
                self._reconcile_page(queue, ids, fields, center, report)

    def _reconcile_page(
        self,
        queue: StudyServiceQueue,
        ids: list[str],
        fields: list[dict[str, Any]],
        center: str,
        report: ReconcileReport,
    ) -> None:
        pks = [orthanc_pk(ident) for ident in ids]
        placeholders = "(" + ", ".join(["?"] * len(pks)) + ")"  # placeholders, never values
        rows = self.db.query(self.sql.QUEUE_STATE + placeholders, pks)
        state = {row["study_pk"]: row for row in rows}
        changed, untracked = [], []
        for ident, pk, study in zip(ids, pks, fields):
            known = state.get(pk)
            if known is None:
                # Unlike dcm4chee's (the original client's archive, sent
                # before this client), every study of an Orthanc is this
                # client's to send: one it never knew was lost on the way.
                untracked.append((pk, ident))
            elif needs_resend({**known, **study}, center, self.schema):
                changed.append(pk)
        report.checked += len(ids)
        report.changed += len(changed) + len(untracked)

        def work() -> None:
            self.db.execute_batch(self.sql.ENQUEUE_UNTRACKED, untracked)
            self.db.execute_batch(queue.sql.ENQUEUE_CHANGED, [(pk,) for pk in changed])
            self.db.execute_batch(self.sql.MARK_RECONCILED, [(pk,) for pk in pks])

        self.db.in_transaction(work)

    def _mark_unseen_gone(self, queue: StudyServiceQueue, started: Any) -> int:
        """The studies the sweep did not see, that Orthanc confirms gone."""
        unseen = self.db.query(self.sql.SELECT_UNSEEN, (str(started),))
        gone = [
            (row["study_pk"], row["study_iuid"])
            for row in unseen
            if row["source_id"] is None or self._gone(row["source_id"])
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
        self.client = OrthancClient(settings.orthanc)
        self.version = self.client.version()  # also proves the credentials
        self.db = Database(
            settings, SQLiteEngine(settings.queue_file), f"queue {settings.queue_file}"
        )
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
