"""The harvest: what a PACS holds, found by asking, for a PACS with no change log.

A PACS reached through DICOMweb (QIDO-RS) or DIMSE (C-FIND) can only be
asked which studies match some keys: no query says what changed since a
time, results may be capped without a word, and undated studies match no
date range. The harvest, written once for both protocols (each asks through
its Finder, sources/finding.py), decides what to ask and what to trust:

- **Hot**, every tick: StudyDate today and yesterday (the PACS's day).
- **Warm**, one day a tick: the five days before, in turn.
- **Cold**, a few queries a tick: the archive, slice by slice back in time,
  then the studies older than any seen, then the undated ones (a PatientID
  prefix sweep with no StudyDate key: the only keys that match them); then
  it starts again. Edits, deletions and late imports under old dates arrive
  within one cold cycle.
- **Complete or split**: a slice is trusted only when the PACS says it
  answered all (Success, no Warning) and its count is below the result cap
  (the configured one, one it showed twice, or a usual one: 100, 500...).
  Otherwise it is halved by date, and a single day split by PatientID
  prefix. Results are never paged by offset.
- **Deletions**: a study the queue knows in a trusted slice but not in the
  answer is asked for by its StudyInstanceUID, twice; missing both times it
  is gone (deleted from the index if send_deletes), found (a date edited)
  it is taken as found.
- **Stability**: a study is sent once its counts have not changed for
  stable_age_seconds; one first seen dated before yesterday is sent at once.

The queue is the SQLite study_service beside config.json, as for Orthanc,
with the harvest's own table beside it: what each study's last answer was
(harvest_study) and where the sweeps stand (harvest_state).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from ..database import Database
from ..engines import SQLiteEngine
from ..reconciliation import ReconcileReport
from ..run import RateCap
from ..study_service import CURSOR_ROW_PK, SQLITE_NOW
from .finding import ChangeFeed, ChangeFeedError, Finder, FindResult, FoundStudy, StudyQuery
from .slices import (
    ALL_STUDIES,
    MAX_PREFIX_LENGTH,
    PREFIX_ALPHABET,
    UNDATED_SWEEP,
    USUAL_CAPS,
    slice_json,
    slice_of,
    split,
)

if TYPE_CHECKING:
    from ..config import Settings
    from ..errors import DatabaseError
    from ..run import Stop
    from ..study_service import StudyServiceQueue

log = logging.getLogger("dicom_indexer")

HOT_DAYS = 2  # today and yesterday: every tick
WARM_DAYS = 5  # the days before them: one a tick
# The cold sweep's share of a tick: about this many answers, whatever the
# archive's size: its slices (days, or PatientID prefixes) are sized to it
# from what the queue knows. A larger archive takes more ticks per cycle,
# not more time per tick. Each Finder sets it (cold_answers_per_tick) from
# what its answers cost: this one for QIDO-RS, fewer for C-FIND.
COLD_ANSWERS_PER_TICK = 300
# And at most this many queries (the undated sweep's prefixes that find
# nothing cost a query each, however cheap).
COLD_MAX_QUERIES_PER_TICK = 3
# The undated sweep reads the whole archive again (no query matches only
# the undated): one cold cycle in this many includes it.
UNDATED_EVERY_CYCLES = 4
LANE_MAX_QUERIES = 200  # a hot or warm lane that needs more is cut short (and says so)


def uid_pk(uid: str) -> int:
    """A study's pk, as the central index stores dcm4chee's: a JSON integer
    from the first 13 hex digits of the SHA-1 of its StudyInstanceUID (52
    bits, below 2**53), the same on a rebuilt queue or another host. Two
    studies share one with a chance of n**2 / 2**53: 1 in 9,000 for a million."""
    return int(hashlib.sha1(uid.encode("utf-8")).hexdigest()[:13], 16) or 1


def patient_pk(patient_id: str | None, study_uid: str) -> int:
    """A patient's pk: the same from its PatientID (SHA-1, as uid_pk); a
    study with no PatientID is a patient of its own."""
    key = f"patient:{patient_id}" if patient_id else f"study-patient:{study_uid}"
    return uid_pk(key)


# --------------------------------------------------------------------------
# What a found study becomes
# --------------------------------------------------------------------------


def _date_key(found: FoundStudy) -> str | None:
    """The study's date as the slices compare it ('YYYYMMDD'), or None."""
    from ..values import dicom_date

    day = dicom_date(found.study_date)
    return day.strftime("%Y%m%d") if day else None


def _counts(found: FoundStudy) -> str:
    modalities = "\\".join(sorted(found.modalities)) if found.modalities is not None else None
    return json.dumps([found.series_count, found.instance_count, modalities])


def _found_json(found: FoundStudy) -> str:
    return json.dumps(asdict(found), sort_keys=True, ensure_ascii=False)


def _day(text: str | None) -> datetime.date | None:
    """A queue's 'YYYYMMDD' as a date."""
    return datetime.date(int(text[:4]), int(text[4:6]), int(text[6:8])) if text else None


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class HarvestStatements:
    """The SQLite queue's statements that only a harvesting source runs."""

    CREATE = (
        "CREATE TABLE IF NOT EXISTS harvest_study ("
        " study_pk INTEGER NOT NULL PRIMARY KEY, study_iuid TEXT NOT NULL,"
        " study_date TEXT, patient_id TEXT, found TEXT NOT NULL, found_hash TEXT NOT NULL,"
        " counts TEXT, counts_since TEXT)",
        "CREATE INDEX IF NOT EXISTS harvest_study_date ON harvest_study (study_date)",
        "CREATE INDEX IF NOT EXISTS harvest_study_patient ON harvest_study (patient_id)",
        "CREATE TABLE IF NOT EXISTS harvest_state (name TEXT NOT NULL PRIMARY KEY, value TEXT)",
    )
    GET_STATE = "SELECT value FROM harvest_state WHERE name = ?"
    SET_STATE = "INSERT OR REPLACE INTO harvest_state (name, value) VALUES (?, ?)"
    KNOWN = (
        "SELECT study_pk, found_hash, counts, counts_since FROM harvest_study WHERE study_pk IN "
    )
    UPSERT = (
        "INSERT OR REPLACE INTO harvest_study"
        " (study_pk, study_iuid, study_date, patient_id, found, found_hash, counts, counts_since)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    FORGET = "DELETE FROM harvest_study WHERE study_pk = ?"
    KNOWN_UIDS = "SELECT study_pk, study_iuid FROM harvest_study WHERE study_pk IN "
    # The members of a trusted slice, to find who is missing from it.
    MEMBERS_DATED = (
        "SELECT study_pk, study_iuid FROM harvest_study WHERE study_date >= ? AND study_date <= ?"
        " AND (? IS NULL OR substr(patient_id, 1, length(?)) = ?)"
    )
    MEMBERS_UNDATED = (
        "SELECT study_pk, study_iuid FROM harvest_study WHERE substr(patient_id, 1, length(?)) = ?"
    )
    MEMBERS_ALL = "SELECT study_pk, study_iuid FROM harvest_study"
    OLDEST_DATE = "SELECT MIN(study_date) AS d FROM harvest_study"
    CACHE_SIZE = "PRAGMA cache_size = -512"  # KiB
    # The date a cold share of studies back from a day (the index on study_date).
    DATE_BACK = (
        "SELECT study_date AS d FROM harvest_study WHERE study_date <= ?"
        " ORDER BY study_date DESC LIMIT 1 OFFSET ?"
    )
    COUNT_DATED = (
        "SELECT COUNT(*) AS n FROM harvest_study WHERE study_date >= ? AND study_date <= ?"
    )
    # The studies known under a PatientID prefix (the index on patient_id).
    COUNT_PREFIX = (
        "SELECT COUNT(*) AS n FROM harvest_study WHERE patient_id >= ? AND patient_id < ?"
    )
    # The characters that follow a prefix in the PatientIDs the queue knows.
    NEXT_CHARACTERS = (
        "SELECT DISTINCT substr(patient_id, ?, 1) AS c FROM harvest_study"
        " WHERE patient_id >= ? AND patient_id < ? ORDER BY c"
    )
    # A study found new or changed: pending (the Study Instance UID as its source_id).
    ENQUEUE = (
        "INSERT OR IGNORE INTO study_service (study_pk, status, attempts, enqueued_at, source_id)"
        f" VALUES (?1, 'pending', 0, {SQLITE_NOW}, ?2);\n"
        "UPDATE study_service SET"
        " sent_version = CASE WHEN status IN ('deleted', 'deleting') THEN NULL"
        " ELSE sent_version END, status = 'pending', attempts = 0, last_error = NULL,"
        f" next_attempt_at = NULL, enqueued_at = {SQLITE_NOW}, source_id = ?2"
        " WHERE study_pk = ?1"
    )
    # reconcile: a study the queue lost (its file replaced), sent as new.
    ENQUEUE_UNTRACKED = (
        "INSERT OR IGNORE INTO study_service (study_pk, status, attempts, enqueued_at, source_id)"
        f" VALUES (?, 'pending', 0, {SQLITE_NOW}, ?)"
    )
    QUEUE_COLUMNS = (
        "SELECT s.study_pk AS queued_pk, s.sent_version, s.study_iuid AS known_iuid,"
        " s.enqueued_at AS queued_at, s.attempts, s.source_id, h.found, h.counts_since"
        " FROM study_service s LEFT JOIN harvest_study h ON h.study_pk = s.study_pk"
    )
    SELECT_NEW_PAGE = (
        QUEUE_COLUMNS + " WHERE s.status = 'pending' AND s.attempts = 0 AND s.study_pk > ?"
        " ORDER BY s.study_pk LIMIT ?"
    )
    SELECT_DUE_PAGE = (
        QUEUE_COLUMNS + " WHERE s.status = 'pending' AND s.attempts > 0"
        f" AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= {SQLITE_NOW})"
        " AND s.study_pk > ? ORDER BY s.study_pk LIMIT ?"
    )
    SELECT_DELIVERED_IUIDS = (
        "SELECT study_iuid FROM study_service WHERE status = 'sent' AND study_iuid IN "
    )


def _in(count: int) -> str:
    return "(" + ", ".join(["?"] * count) + ")"  # placeholders, never values


# --------------------------------------------------------------------------
# The studies' fields
# --------------------------------------------------------------------------


class HarvestedStudies:
    """Studies found by query, as the document's fields:

    - study_pk: uid_pk(StudyInstanceUID); patient_pk: from the PatientID.
    - patient_id, patient_name, study_datetime, study_description: the
      answer's values under values.py's rules.
    - study_modality: ModalitiesInStudy, sorted, '\\'-joined; the counts as
      answered (or from the study's series, where the PACS lacks them).
    - A study is sent once its counts stayed the same for stable_age_seconds.
    """

    UNSETTLED = "its image counts changed lately (images may still come)"

    def __init__(self, name: str, stable_age_seconds: int) -> None:
        self.name = name
        self.stable_age_seconds = stable_age_seconds

    def join_args(self) -> tuple[Any, ...]:
        return ()

    def fields(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        return row

    def settled(self, row: Mapping[str, Any]) -> bool:
        if row.get("unreadable"):
            return False
        since = row.get("counts_since")
        if not since or not self.stable_age_seconds:
            return True
        changed = datetime.datetime.fromisoformat(str(since))
        return (_utc_now() - changed).total_seconds() >= self.stable_age_seconds

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        return row["study_pk"] is None


def study_fields(found: FoundStudy, local_offset: datetime.timedelta | None) -> dict[str, Any]:
    """A found study -> the fields study_document() takes."""
    from ..values import dicom_text, person_name, study_datetime

    modalities = None
    if found.modalities is not None:
        modalities = "\\".join(sorted({m.strip() for m in found.modalities} - {""})) or None
    patient_id = dicom_text(found.patient_id)
    return {
        "study_pk": uid_pk(found.study_iuid),
        "study_iuid": found.study_iuid,
        "patient_pk": patient_pk(patient_id, found.study_iuid),
        "pat_id": patient_id,
        "pat_name": person_name(found.patient_name),
        "study_datetime": study_datetime(
            found.study_date, found.study_time, found.timezone_offset, local_offset
        ),
        "study_desc": dicom_text(found.study_description),
        "mods_in_study": modalities,
        "num_series": found.series_count,
        "num_instances": found.instance_count,
        "updated_time": None,
    }


# --------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------


@dataclass
class Walk:
    """Slices still to ask, in order (a stack: a split slice's parts first)."""

    stack: list[StudyQuery]
    # How many known studies an undated sweep's prefix should hold: a tick's
    # share for the cold sweep, a larger bite for initial and reconcile.
    undated_target: int = 400
    queries: int = 0
    answers: int = 0  # read, whether trusted or not
    found: int = 0
    unsplittable: list[str] = field(default_factory=list)


# What a walk does with a slice's answer: (slice, studies, whether trusted whole).
Absorb = Callable[[StudyQuery, "list[FoundStudy]", bool], None]


class HarvestSource:
    """The studies of a PACS without a change log, found by queries (see the
    module's docstring), with the queue and the harvest's state in SQLite."""

    sql = HarvestStatements
    pipelined_initial = False  # the archive is listed first, then sent

    def __init__(
        self,
        db: Database,
        finder: Finder,
        schema: HarvestedStudies,
        today: Callable[[], datetime.date],
        local_offset: Callable[[], datetime.timedelta | None],
        result_cap: int | None,
    ) -> None:
        self.db = db
        self.finder = finder
        self.schema = schema
        self.today = today
        self.local_offset = local_offset
        self.page_size = db.settings.page_size
        self.configured_cap = result_cap
        self.cold_answers = finder.cold_answers_per_tick
        # The harvest reads its tables by index, a few rows at a time: 512 KiB
        # of SQLite's page cache do (its default is 2 MB). `initial` over
        # C-FIND peaked 1.4 MB lower, as fast (measured).
        self.db.query(self.sql.CACHE_SIZE)
        for statement in self.sql.CREATE:
            self.db.query(statement)
        self._initial: Walk | None = None

    # -- state ---------------------------------------------------------------

    def _state(self, name: str) -> Any:
        rows = self.db.query(self.sql.GET_STATE, (name,))
        return json.loads(rows[0]["value"]) if rows and rows[0]["value"] is not None else None

    def _set_state(self, name: str, value: Any) -> None:
        self.db.query(self.sql.SET_STATE, (name, json.dumps(value)))

    def result_cap(self) -> int | None:
        """The cap a count must stay below: the configured one, else one the
        PACS showed twice (two incomplete answers of the same length)."""
        return self.configured_cap or self._state("learned_cap")

    # -- asking ----------------------------------------------------------------

    def _trusted(self, query: StudyQuery, result: FindResult) -> bool:
        """Whether a slice's answer is all of it (complete or split)."""
        count = len(result.studies)
        if not result.complete:
            self._learn_cap(count)
            return False
        cap = self.result_cap()
        if cap is not None and count >= cap:
            return False
        return count not in USUAL_CAPS

    def _learn_cap(self, count: int) -> None:
        """Two incomplete answers with the same number of studies (10 or
        more) show the PACS's cap: later answers that long are split."""
        if count < 10 or self.configured_cap:
            return
        seen = self._state("incomplete_count")
        if seen == count and self._state("learned_cap") != count:
            self._set_state("learned_cap", count)
            log.info(
                "%s answers at most %d studies a query: slices that long are split",
                self.finder.where,
                count,
            )
        self._set_state("incomplete_count", count)

    def _walk(self, walk: Walk, budget: int, absorb: Absorb, answers: int | None = None) -> None:
        """Asks the walk's slices, splitting what is not trusted, until the
        stack is empty, `budget` queries were made, or (if given) `answers`
        answers read."""
        spent = 0
        while walk.stack and spent < budget and (answers is None or walk.answers < answers):
            query = walk.stack.pop(0)
            if query == UNDATED_SWEEP:
                walk.stack[:0] = self._undated_sweep(walk.undated_target)
                continue
            result = self.finder.find_studies(query)
            spent += 1
            walk.queries += 1
            walk.answers += len(result.studies)
            if self._trusted(query, result):
                absorb(query, result.studies, True)
                walk.found += len(result.studies)
                continue
            parts = split(query, self.today())
            if parts:
                log.debug(
                    "slice %s not whole (%s): split in %d",
                    query.describe(),
                    result.problem or f"{len(result.studies)} studies",
                    len(parts),
                )
                walk.stack[:0] = parts
            else:
                # Nothing smaller to ask: what it did answer is kept (never
                # taken as all: no deletion follows), and the slice is asked
                # again in the next cycle.
                absorb(query, result.studies, False)
                walk.unsplittable.append(f"{query.describe()} ({result.problem or 'capped'})")

    # -- what the answers change --------------------------------------------

    def _absorb_found(self, studies: Iterable[FoundStudy], enqueue_all: bool = False) -> list[int]:
        """Records found studies; enqueues the new and the changed (all of
        them with enqueue_all: reconcile's untracked). Returns their pks."""
        unique = {study.study_iuid: study for study in studies if study.study_iuid}
        if not unique:
            return []
        pks = {uid: uid_pk(uid) for uid in unique}
        known: dict[int, dict[str, Any]] = {}
        chunk = list(pks.values())
        for start in range(0, len(chunk), 500):
            part = chunk[start : start + 500]
            for row in self.db.query(self.sql.KNOWN + _in(len(part)), part):
                known[row["study_pk"]] = row
        today = self.today()
        hot_since = (today - datetime.timedelta(days=HOT_DAYS - 1)).strftime("%Y%m%d")
        now = _utc_now().isoformat(sep=" ")
        upserts, enqueue, untracked = [], [], []
        for uid, found in unique.items():
            pk = pks[uid]
            text = _found_json(found)
            digest = hashlib.md5(text.encode("utf-8")).hexdigest()
            counts = _counts(found)
            date_key = _date_key(found)
            before = known.get(pk)
            if before is None:
                # New: one dated today or yesterday may still receive images.
                since = now if date_key is not None and date_key >= hot_since else None
            elif before["found_hash"] == digest:
                if enqueue_all:
                    untracked.append((pk, uid))
                continue
            else:
                since = now if before["counts"] != counts else before["counts_since"]
            upserts.append((pk, uid, date_key, found.patient_id, text, digest, counts, since))
            enqueue.append((pk, uid))

        def work() -> None:
            self.db.execute_batch(self.sql.UPSERT, upserts)
            self.db.execute_batch(self.sql.ENQUEUE, enqueue)
            self.db.execute_batch(self.sql.ENQUEUE_UNTRACKED, untracked)

        if upserts or untracked:
            self.db.in_transaction(work)
        return list(pks.values())

    def _absorb_slice(self, query: StudyQuery, studies: list[FoundStudy], whole: bool) -> None:
        """A slice's studies recorded; when it is whole, those the queue
        knows in it but the PACS did not answer are checked for deletion."""
        seen = set(self._absorb_found(studies))
        if not whole:
            return
        missing = [row for row in self._members(query) if row["study_pk"] not in seen]
        if missing:
            self._confirm_gone(missing)

    def _members(self, query: StudyQuery) -> list[dict[str, Any]]:
        prefix = query.patient_id_prefix
        if query.dated:
            start = query.date_from.strftime("%Y%m%d") if query.date_from else "00000000"
            end = query.date_to.strftime("%Y%m%d") if query.date_to else "99999999"
            return self.db.query(self.sql.MEMBERS_DATED, (start, end, prefix, prefix, prefix))
        if prefix is not None:
            return self.db.query(self.sql.MEMBERS_UNDATED, (prefix, prefix))
        return self.db.query(self.sql.MEMBERS_ALL)

    def _confirm_gone(self, missing: list[dict[str, Any]]) -> int:
        """Asks for the missing studies by their UIDs, twice: those absent
        both times, from answers the PACS calls complete, are gone."""
        gone: list[tuple[int, str | None]] = []
        size = max(1, self.finder.max_uids_per_query)
        for start in range(0, len(missing), size):
            batch = missing[start : start + size]
            uids = tuple(row["study_iuid"] for row in batch)
            absent = set(uids)
            for _ in range(2):
                result = self.finder.find_studies(StudyQuery(study_uids=uids))
                if not result.complete:
                    absent = set()
                    break
                found = [s for s in result.studies if s.study_iuid in absent]
                self._absorb_found(found)  # still there, under another date
                absent -= {s.study_iuid for s in found}
                if not absent:
                    break
            gone += [
                (row["study_pk"], row["study_iuid"]) for row in batch if row["study_iuid"] in absent
            ]
        if gone:
            queue = self.db.queue

            def work() -> None:
                queue.mark_gone(gone)
                self.db.execute_batch(self.sql.FORGET, [(pk,) for pk, _ in gone])

            self.db.in_transaction(work)
            log.info("%d studies are gone from %s", len(gone), self.finder.where)
        return len(gone)

    # -- a tick ----------------------------------------------------------------

    def enqueue_changes(self) -> int:
        """A tick's queries: hot, warm and a share of the cold sweep; enqueues
        what is new or changed, and marks what is gone."""
        before = self._pending_marker()
        today = self.today()
        feed = self.finder.change_feed()
        if feed is not None and self._state("feed_cursor") is None:
            # Set before anything is listed: what changes meanwhile is after it.
            self._set_state("feed_cursor", feed.latest())
        if not self._state("archive_listed"):
            initial = self.db.queue.initial_state()
            if initial is None or initial["status"] != "initial":  # `initial` lists it anyway
                return self._list_archive(today)
        if feed is not None:
            return self._follow_feed(feed, today)
        hot = Walk(
            [
                StudyQuery(
                    date_from=today - datetime.timedelta(days=HOT_DAYS - 1),
                    date_to=today,
                    dated=True,
                )
            ]
        )
        self._walk(hot, LANE_MAX_QUERIES, self._absorb_slice)
        turn = int(self._state("warm_turn") or 0) % WARM_DAYS
        day = today - datetime.timedelta(days=HOT_DAYS + turn)
        warm = Walk([StudyQuery(date_from=day, date_to=day, dated=True)])
        self._walk(warm, LANE_MAX_QUERIES, self._absorb_slice)
        self._set_state("warm_turn", turn + 1)
        for lane, walk in (("hot", hot), ("warm", warm)):
            if walk.stack:
                log.warning(
                    "%s: the %s window needed more than %d queries; the rest waits for"
                    " the next tick",
                    self.finder.where,
                    lane,
                    LANE_MAX_QUERIES,
                )
        if self._state("archive_listed"):
            self._cold_step(today)
        for slice_problem in hot.unsplittable + warm.unsplittable:
            log.warning(
                "%s could not answer %s whole; asked again next time",
                self.finder.where,
                slice_problem,
            )
        return self._pending_marker() - before

    def _list_archive(self, today: datetime.date, warned: bool = False) -> int:
        """A tick on a queue that holds no listing of the archive (its file
        lost or replaced, or no `initial` yet): the whole archive is listed
        once, what is new or changed enqueued; one warning says so."""
        if not warned:
            log.warning(
                "the queue %s holds no listing of %s (a new queue, or its file was lost or"
                " replaced): the whole archive is asked once; what the queue does not hold is"
                " sent",
                self.db.where,
                self.finder.where,
            )
        before = self._pending_marker()
        walk = Walk([ALL_STUDIES])
        while walk.stack:
            self._walk(walk, len(walk.stack), self._absorb_slice)
        self._set_state("archive_listed", today.isoformat())
        return self._pending_marker() - before

    def _follow_feed(self, feed: ChangeFeed, today: datetime.date) -> int:
        """A tick on a PACS with a change feed (Azure's): the studies its
        changes name since the cursor, asked for by UID, instead of the
        windows. A feed whose newest change is below the cursor was reset:
        one warning, and the archive listed once."""
        before = self._pending_marker()
        cursor = int(self._state("feed_cursor") or 0)
        latest = feed.latest()
        if latest < cursor:
            log.warning(
                "the change feed of %s no longer goes back to where this indexer left it"
                " (sequence %d; newest now %d): the whole archive is asked once; only what"
                " changed is sent",
                self.finder.where,
                cursor,
                latest,
            )
            self._set_state("feed_cursor", latest)
            self._set_state("archive_listed", None)
            return self._list_archive(today, warned=True)
        while cursor < latest:
            changes, after = feed.changes_after(cursor)
            if after <= cursor:
                raise ChangeFeedError(
                    f"the change feed of {self.finder.where} does not advance: asked for the"
                    f" changes after sequence {cursor}, its page ends at {after}; the cursor"
                    f" stays at {cursor}"
                )
            if not self._refresh(list(dict.fromkeys(c.study_iuid for c in changes))):
                break  # not answered whole: asked again next tick, from the same cursor
            cursor = after
            self._set_state("feed_cursor", cursor)
        return self._pending_marker() - before

    def _refresh(self, uids: list[str]) -> bool:
        """The studies a feed named, asked for by UID: recorded if found,
        checked gone if not. False if the PACS did not answer whole."""
        size = max(1, self.finder.max_uids_per_query)
        for start in range(0, len(uids), size):
            batch = tuple(uids[start : start + size])
            result = self.finder.find_studies(StudyQuery(study_uids=batch))
            if not result.complete:
                log.warning(
                    "%s did not answer whole for %d studies its change feed names (%s);"
                    " asked again next tick",
                    self.finder.where,
                    len(batch),
                    result.problem,
                )
                return False
            found = {s.study_iuid for s in self._in_batch(result.studies, batch)}
            self._absorb_found(self._in_batch(result.studies, batch))
            missing = [uid for uid in batch if uid not in found]
            if missing:
                pks = [uid_pk(uid) for uid in missing]
                known = self.db.query(self.sql.KNOWN_UIDS + _in(len(pks)), pks)
                if known:
                    self._confirm_gone(known)
        return True

    @staticmethod
    def _in_batch(studies: list[FoundStudy], batch: tuple[str, ...]) -> list[FoundStudy]:
        wanted = set(batch)
        return [study for study in studies if study.study_iuid in wanted]

    def _pending_marker(self) -> int:
        return self.db.queue.count_pending()

    def _cold_step(self, today: datetime.date) -> None:
        """The cold sweep's share of a tick (the finder's cold_answers_per_tick
        answers, at most COLD_MAX_QUERIES_PER_TICK queries), from where it
        stands."""
        share = self.cold_answers
        walk = Walk([slice_of(s) for s in self._state("cold_stack") or []], undated_target=share)
        cycles = self._state("cold_cycles")
        while walk.queries < COLD_MAX_QUERIES_PER_TICK and walk.answers < share:
            if not walk.stack:
                if self._state("cold_cycles") != cycles:
                    break  # a cycle ended in this tick: the next one starts next tick
                walk.stack = self._next_cold_slices(today)
            budget = COLD_MAX_QUERIES_PER_TICK - walk.queries
            self._walk(walk, budget, self._absorb_slice, share)
        self._set_state("cold_stack", [slice_json(q) for q in walk.stack])
        for slice_problem in walk.unsplittable:
            log.warning(
                "%s could not answer %s whole; asked again next cycle",
                self.finder.where,
                slice_problem,
            )

    def _next_cold_slices(self, today: datetime.date) -> list[StudyQuery]:
        """The cold sweep's next slice: back in time from before the warm
        days, as many days as hold about a tick's share of known
        studies; then what is older than any study seen; then, one cycle in
        UNDATED_EVERY_CYCLES, the undated sweep; then again."""
        newest = today - datetime.timedelta(days=HOT_DAYS + WARM_DAYS)
        end_text = self._state("cold_to")
        end = datetime.date.fromisoformat(end_text) if end_text else newest
        if end == datetime.date.min:  # the cycle's end
            cycles = int(self._state("cold_cycles") or 0)
            self._set_state("cold_to", newest.isoformat())
            self._set_state("cold_cycles", cycles + 1)
            if cycles % UNDATED_EVERY_CYCLES == 0:
                return [UNDATED_SWEEP]
            end = newest
        oldest = _day(self.db.query(self.sql.OLDEST_DATE)[0]["d"]) or newest
        if end < oldest:
            self._set_state("cold_to", datetime.date.min.isoformat())
            return [StudyQuery(date_to=end, dated=True)]
        last = end.strftime("%Y%m%d")
        # A slice answering a usual cap's count (100, 101, 200...) is taken as
        # cut and split: one the queue knows to hold that many takes the next
        # older study's day too (with a share of 100, every other slice split).
        skipped = self.cold_answers - 1
        while True:
            back = self.db.query(self.sql.DATE_BACK, (last, skipped))
            found = _day(back[0]["d"]) if back else None
            start = min(end, found) if found else oldest
            if not found:
                break
            skipped = self.db.query(self.sql.COUNT_DATED, (start.strftime("%Y%m%d"), last))[0]["n"]
            if skipped not in USUAL_CAPS:
                break
        self._set_state("cold_to", (start - datetime.timedelta(days=1)).isoformat())
        return [StudyQuery(date_from=start, date_to=end, dated=True)]

    def _undated_sweep(self, target: int) -> list[StudyQuery]:
        """PatientID prefixes with no StudyDate key (the only keys that match
        an undated study), each holding about `target` of the studies the
        queue knows. Every first character is asked (an undated study may be
        under one the queue knows nothing of); a prefix that holds more is
        asked by the longer prefixes the queue's PatientIDs have there, not
        by every character: blind, a busy first digit would cost 62 queries,
        most finding nothing. An undated study whose PatientID shares no
        such longer prefix with a study of the archive is found only by a
        query the PACS answers whole (docs/cosecha.md)."""
        prefixes: list[str] = []
        pending = list(PREFIX_ALPHABET)
        while pending:
            prefix = pending.pop(0)
            upper = prefix + "\U0010ffff"
            known = self.db.query(self.sql.COUNT_PREFIX, (prefix, upper))[0]["n"]
            # (A prefix holding a usual cap's count would be split when asked.)
            fits = known <= target and known not in USUAL_CAPS
            if fits or len(prefix) >= MAX_PREFIX_LENGTH:
                prefixes.append(prefix)
                continue
            rows = self.db.query(self.sql.NEXT_CHARACTERS, (len(prefix) + 1, prefix, upper))
            longer = [prefix + row["c"] for row in rows if row["c"]]
            pending[:0] = longer
            if len(longer) < len(rows):  # a PatientID that is the prefix itself
                prefixes.append(prefix)
        return [StudyQuery(patient_id_prefix=prefix) for prefix in prefixes]

    # -- initial ---------------------------------------------------------------

    def count_studies(self) -> int:
        return 0  # a query-only PACS cannot count its studies cheaply

    def initial_page(self, position: int) -> tuple[list[tuple], int]:
        """The initial load's next studies: the whole archive, asked slice by
        slice from one query with no keys (split while not whole); started
        over when interrupted (what was delivered keeps its state)."""
        if position == 0 or self._initial is None:
            self._initial = Walk([ALL_STUDIES])
        walk = self._initial
        rows: list[tuple] = []

        def collect(query: StudyQuery, studies: list[FoundStudy], whole: bool) -> None:
            self._absorb_found(studies)
            rows.extend((uid_pk(s.study_iuid), s.study_iuid) for s in studies if s.study_iuid)

        while walk.stack and len(rows) < self.page_size:
            self._walk(walk, 1, collect)
        for slice_problem in walk.unsplittable:
            log.warning(
                "%s could not answer %s whole; the cold sweep asks again",
                self.finder.where,
                slice_problem,
            )
        walk.unsplittable.clear()
        if not rows and not walk.stack:
            return [], position
        return list(dict.fromkeys(rows)), position + 1

    def initial_enqueued(self, queue: StudyServiceQueue, position: int) -> None:
        """The archive is listed: ticks start the cold sweep."""
        self._set_state("archive_listed", self.today().isoformat())
        log.info(
            "%s: %d queries listed the archive",
            self.finder.where,
            self._initial.queries if self._initial else 0,
        )

    # -- delivery --------------------------------------------------------------

    def new_studies(
        self, frontier: Callable[[int], int | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        return self._stream(self.sql.SELECT_NEW_PAGE)

    def due_studies(self) -> Iterator[dict[str, Any]]:
        return self._stream(self.sql.SELECT_DUE_PAGE)

    def pending_studies(self) -> Iterator[dict[str, Any]]:
        return itertools.chain(self.new_studies(), self.due_studies())

    def _stream(self, sql: str) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            page = self.db.query(sql, (after, self.page_size))
            if not page:
                return
            for row in page:
                yield self._with_fields(row)
            after = page[-1]["queued_pk"]

    def _with_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """A queue row with its study's fields, from its last answer; a
        study whose answer lacks counts has its series asked for."""
        if row["found"] is None:
            return {**row, "study_pk": None}  # gone from the PACS
        found = FoundStudy(**json.loads(row["found"]))
        if found.problem:
            found = self._asked_again(found)  # its answer may be readable now
        if found.problem:
            return {**row, "study_pk": uid_pk(found.study_iuid), "unreadable": found.problem}
        if found.series_count is None or found.instance_count is None or found.modalities is None:
            try:
                found = self._counted(found)
            except ValueError as exc:
                return {**row, "study_pk": uid_pk(found.study_iuid), "unreadable": str(exc)}
        return {**row, **study_fields(found, self.local_offset())}

    def _asked_again(self, found: FoundStudy) -> FoundStudy:
        """A study whose last answer could not be read, asked for again by
        its UID; recorded if it now reads (else the old answer stands)."""
        result = self.finder.find_studies(StudyQuery(study_uids=(found.study_iuid,)))
        fresh = [s for s in result.studies if s.study_iuid == found.study_iuid]
        if not fresh:
            return found
        self._absorb_found(fresh[:1])
        return fresh[0]

    def _counted(self, found: FoundStudy) -> FoundStudy:
        """The counts and modalities of a PACS that does not answer them at
        study level, from the study's series."""
        from dataclasses import replace

        series = self.finder.find_series(found.study_iuid)
        counts = [s.instance_count for s in series]
        instances = sum(n for n in counts if n is not None) if None not in counts else None
        return replace(
            found,
            series_count=len(series) if found.series_count is None else found.series_count,
            instance_count=instances if found.instance_count is None else found.instance_count,
            modalities=(
                tuple(sorted({s.modality for s in series if s.modality}))
                if found.modalities is None
                else found.modalities
            ),
        )

    # -- reconcile -------------------------------------------------------------

    def reconcile(
        self, queue: StudyServiceQueue, settings: Settings, max_studies: int | None, stop: Stop
    ) -> ReconcileReport:
        """The whole archive asked again, as `initial` does: what changed or
        the queue lost is enqueued, what is gone (confirmed) marked."""
        report = ReconcileReport()
        cap = RateCap(settings.reconcile_rows_per_second)
        walk = Walk([ALL_STUDIES])
        pending_before = queue.count_pending()

        def absorb(query: StudyQuery, studies: list[FoundStudy], whole: bool) -> None:
            seen = set(self._absorb_found(studies, enqueue_all=True))
            if whole:
                missing = [row for row in self._members(query) if row["study_pk"] not in seen]
                report.gone += self._confirm_gone(missing) if missing else 0
            report.checked += len(studies)
            cap.passed(len(studies))

        while walk.stack and not stop.requested():
            if max_studies is not None and report.checked >= max_studies:
                break
            self._walk(walk, 1, absorb)
        report.finished = not walk.stack
        report.changed = max(0, queue.count_pending() - pending_before)
        report.seconds = time.monotonic() - cap.started
        return report

    # -- for check and adopt ---------------------------------------------------

    def time_index(self) -> tuple[bool, str]:
        if self.finder.change_feed() is not None:
            cursor = self._state("feed_cursor")
            return True, (
                f"the change feed of {self.finder.where}: each tick reads only the changes"
                f" after sequence {cursor if cursor is not None else '(not started yet)'}"
                " and asks for the studies they name"
            )
        cycles = self._state("cold_cycles") or 0
        listed = self._state("archive_listed")
        sweep = (
            f"the cold sweep has covered the archive {cycles} times"
            if listed
            else "the cold sweep starts once `initial` has listed the archive"
        )
        return True, (
            f"queries by StudyDate: today and yesterday every tick, one of the {WARM_DAYS} days"
            f" before, and about {self.cold_answers} studies of the cold sweep ({sweep})"
        )

    def delivered_iuids(self, iuids: list[str | None]) -> set[str]:
        wanted = [iuid for iuid in iuids if iuid]
        if not wanted:
            return set()
        rows = self.db.query(self.sql.SELECT_DELIVERED_IUIDS + _in(len(wanted)), wanted)
        return {row["study_iuid"] for row in rows}


def _zone_offset(zone: str | None) -> Callable[[], datetime.timedelta | None]:
    """The PACS's UTC offset now, from config ("-03:00" or an IANA name);
    None: the client's own zone."""
    if not zone:
        return lambda: None
    match = re.match(r"^([+-])(\d{2}):?(\d{2})$", zone)
    if match:
        sign = -1 if match.group(1) == "-" else 1
        fixed = sign * datetime.timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        return lambda: fixed
    import zoneinfo  # type: ignore[import-not-found,unused-ignore]  # Python 3.9+ (config checked)

    info = zoneinfo.ZoneInfo(zone)
    return lambda: datetime.datetime.now(info).utcoffset()


class HarvestPacs:
    """A PACS asked by queries (DICOMweb or DIMSE), as the commands see it:
    its Finder, the harvest (the source) and the queue in a SQLite file."""

    def __init__(self, settings: Settings, finder: Finder, timezone: str | None = None) -> None:
        self.settings = settings
        self.finder = finder
        self.where = finder.where
        try:
            self.db = Database(
                settings, SQLiteEngine(settings.queue_file), f"queue {settings.queue_file}"
            )
        except BaseException:
            finder.close()
            raise
        self.Error = self.db.Error
        self.queue = self.db.queue
        self.schema = HarvestedStudies(finder.where, settings.stable_age_seconds)
        offset = _zone_offset(timezone)

        def today() -> datetime.date:
            local = offset()
            if local is None:
                return datetime.date.today()
            return (_utc_now() + local).date()

        section = settings.dicomweb_section or settings.dimse_section
        self.source = HarvestSource(
            self.db, finder, self.schema, today, offset, section.result_cap if section else None
        )
        self.install_script = self.grant_script = ""

    def explain(self, exc: BaseException) -> DatabaseError:
        return self.db.explain(exc)

    def describe(self, exc: BaseException) -> str:
        return self.db.describe(exc)

    def server_version(self) -> str:
        return self.finder.version()

    def connection_lines(self) -> list[tuple[str, str, int]]:
        return self.finder.describe()

    def installation_lines(self) -> list[tuple[str, str, int]]:
        queue_version = self.db.query(self.queue.sql.SERVER_VERSION)[0]["v"]
        lines = [("ok", f"queue: {self.settings.queue_file} ({queue_version}), current", 0)]
        learned = self.source._state("learned_cap")
        if learned and not self.source.configured_cap:
            lines.append(("ok", f"result cap: {learned} studies a query, as the PACS showed", 0))
        return lines

    def privilege_problems(self) -> list[str]:
        return []

    def close(self) -> None:
        self.finder.close()
        self.db.close()


__all__ = ["HarvestPacs", "HarvestSource", "uid_pk", "patient_pk", "CURSOR_ROW_PK"]
