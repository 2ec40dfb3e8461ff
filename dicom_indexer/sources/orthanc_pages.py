"""Orthanc's answers about studies, checked, and its archive read in pages.

One study's read (GET /studies/{id} and /studies/{id}/series) and a page's
entries (GET /studies?expand, /series?expand) become the same row, by the
same checks. `initial` and `reconcile` read the whole archive in pages, a
few dozen requests for 10,000 studies instead of two per study: every study
(PageListing over /studies), then every series (over /series, for each
study's modalities and images), joined in temporary tables of the SQLite
queue's connection (PageStore), never in memory.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import EXIT_DATABASE, IndexerError

if TYPE_CHECKING:
    from ..database import Database


class OrthancError(IndexerError):
    """Orthanc is unreachable, refused the credentials, or is too old."""

    exit_code = EXIT_DATABASE


class AnswerTooLarge(OrthancError):
    """An answer grew past the bound it was asked with: not read further."""


class UnreadableStudy(Exception):
    """One study's answers were not a study's (malformed or truncated JSON,
    wrong types, no StudyInstanceUID, an error status): that study's alone."""


def orthanc_pk(orthanc_id: str) -> int:
    """A study's (or patient's) pk, as the central index stores dcm4chee's:
    a JSON integer, from the first 13 hex digits of its Orthanc ID (itself
    a SHA-1 of PatientID and StudyInstanceUID): 52 bits, below 2**53, the
    same on a rebuilt queue or another host. Two studies of an archive share
    one with a chance of n**2 / 2**53: about 1 in 9,000 for a million."""
    return int(orthanc_id.replace("-", "")[:13], 16) or 1


# --------------------------------------------------------------------------
# A study's answers, checked: never a document from a partial or wrong read
# --------------------------------------------------------------------------


def checked_study(ident: str, study: Any, where: str) -> tuple[dict, dict]:
    """The study's MainDicomTags and PatientMainDicomTags, once `study`
    (GET /studies/{id}, or its entry in a page) is that study's."""
    if not isinstance(study, dict):
        raise UnreadableStudy(f"{where} is not a study")
    tags, patient = study.get("MainDicomTags"), study.get("PatientMainDicomTags")
    if not isinstance(tags, dict):
        raise UnreadableStudy(f"{where} has no MainDicomTags")
    if not isinstance(patient, dict):
        raise UnreadableStudy(f"{where} has no PatientMainDicomTags")
    uid = tags.get("StudyInstanceUID")
    if not isinstance(uid, str) or not uid.strip():
        raise UnreadableStudy(f"{where} has no StudyInstanceUID")
    if study.get("ID") != ident or not isinstance(study.get("ParentPatient"), str):
        raise UnreadableStudy(f"{where} is not that study's (its ID or ParentPatient)")
    for names, values in (
        (("StudyDate", "StudyTime", "StudyDescription"), tags),
        (("PatientID", "PatientName"), patient),
    ):
        for name in names:
            if not isinstance(values.get(name, ""), str):
                raise UnreadableStudy(f"{where} has a {name} that is not text")
    return tags, patient


def series_ok(series: Any) -> bool:
    """Whether one expanded series is a series' (its modality text, its instances a list)."""
    return (
        isinstance(series, dict)
        and isinstance(series.get("MainDicomTags"), dict)
        and isinstance(series["MainDicomTags"].get("Modality", ""), str)
        and isinstance(series.get("Instances"), list)
    )


def study_row(
    study: dict, tags: dict, patient: dict, modalities: set, series: int, images: int
) -> dict[str, Any]:
    """A checked study and its series' totals, as the fields Orthanc (the schema) reads."""
    return {
        "study_pk": orthanc_pk(study["ID"]),
        "study_iuid": tags.get("StudyInstanceUID"),
        "study_date": tags.get("StudyDate"),
        "study_time": tags.get("StudyTime"),
        "study_desc": tags.get("StudyDescription"),
        "updated_time": None,
        "mods_in_study": "\\".join(sorted(modalities - {None, ""})) or None,
        "num_series": series,
        "num_instances": images,
        "patient_pk": orthanc_pk(study["ParentPatient"]),
        "pat_id": patient.get("PatientID"),
        "pat_name": patient.get("PatientName"),
        "is_stable": bool(study.get("IsStable")),
        "last_update": study.get("LastUpdate"),
    }


# --------------------------------------------------------------------------
# Listings in pages
# --------------------------------------------------------------------------

ORTHANC_PAGE_LIMIT = 1000  # entries per page, at most
# A page aims at this size: an expanded series lists every instance's ID
# (about 63 bytes each on 1.10.1), so a page of 1,000 CT series of 1,000
# slices would be 63 MB. The next page's limit follows the bytes per entry
# of the last one (growing back at most twofold a page).
ORTHANC_PAGE_TARGET_BYTES = 2 * 1024 * 1024
# A page past this is not read further (the HTTP layer stops at the bound)
# and is asked again, a quarter as long; a single entry past it is asked
# once more with the bound of any answer (ORTHANC_BODY_BYTES).
ORTHANC_PAGE_BODY_BYTES = 8 * 1024 * 1024
# `since` is an offset, not a cursor: a study deleted before it moves every
# later one a place back, and the next page would begin one study late. Each
# page of studies starts this many entries early; where the last page's
# final entries are found in it says where the new ones begin.
ORTHANC_PAGE_OVERLAP = 16
# Re-reads from further back (more deletions than the overlap between two
# pages) a listing may need before it gives up as moving too much to read.
ORTHANC_PAGE_STEPS_BACK = 20


class PageListing:
    """One listing of Orthanc's studies or series (GET /{resource}?expand),
    page after page, each page's size set by the bytes of the last.

    With an overlap (studies), each page starts a little before where the
    last ended and begins its new entries after the last entry already read,
    wherever a deletion has moved it: no study that still exists is skipped.
    Series are listed without one: a series skipped leaves its study's
    totals incomplete, and that study is read on its own (PageStore).

    A page that repeats the last one (a cache in front of Orthanc), or that
    holds only entries already read though it could have held more, stops
    the run (OrthancError, one line)."""

    def __init__(
        self,
        get_sized: Callable[[str, int], tuple[Any, int]],
        where: str,
        resource: str,
        *,
        expand: bool = True,
        overlapping: bool = False,
        body_bytes: int,
    ) -> None:
        self.get_sized = get_sized
        self.where = where  # "Orthanc at URL", for messages
        self.resource = resource
        self.expand = expand
        self.overlap = ORTHANC_PAGE_OVERLAP if overlapping else 0
        self.body_bytes = body_bytes  # the bound of a single entry's answer
        self.limit = ORTHANC_PAGE_LIMIT
        self.position = 0  # entries read, numbered as Orthanc numbered them at the last page
        self.tail: list[str] = []  # the IDs of the last entries read (the overlap)
        self.previous: list[Any] | None = None  # the last page's IDs, and where it began
        self.previous_since = -1
        self.steps_back = 0
        self.requests = 0
        self.skipped = 0  # single entries past any bound (series only)

    def pages(self) -> Iterator[list[Any]]:
        """Each page's new entries, until the listing ends."""
        while True:
            page = self.next_page()
            if page is None:
                return
            yield page

    def next_page(self) -> list[Any] | None:
        """The next entries never read (None: the listing has ended)."""
        overlap = min(len(self.tail), self.position)
        since = self.position - overlap
        while True:
            asked = self.limit + (self.position - since)
            page, size = self._get(since, asked)
            ids = [_entry_id(entry) for entry in page]
            if page and ids == self.previous and since != self.previous_since:
                raise OrthancError(
                    f"{self.where} answered GET /{self.resource} with the same page for"
                    f" another position (asked from {since}): its listing does not advance"
                    " (a cache or proxy in front of Orthanc?)"
                )
            start = self._after_tail(ids) if self.tail and since < self.position else 0
            if start is None:  # the last entries read are not in it: more deletions
                if since == 0:
                    start = 0  # read again from the start: what was read is read again
                else:
                    self._step_back()
                    since = max(since - self.limit, 0)
                    continue
            break
        self.previous, self.previous_since = ids, since
        new = page[start:]
        if not new:
            if page and len(page) >= asked:
                raise OrthancError(
                    f"{self.where} answered GET /{self.resource}, asked for the entries after"
                    f" {self.position}, with entries already read only: its listing does not"
                    " advance (a cache or proxy in front of Orthanc?)"
                )
            return None
        self.position = since + len(page)
        if self.overlap:
            self.tail = [i for i in ids[-self.overlap :] if i is not None]
        self._resize(size, len(page))
        return new

    def _after_tail(self, ids: list[Any]) -> int | None:
        """Where the entries not yet read begin: after the last of them
        already read (None: none of those is in the page)."""
        tail = set(self.tail)
        for index in range(len(ids) - 1, -1, -1):
            if ids[index] in tail:
                return index + 1
        return None

    def _step_back(self) -> None:
        self.steps_back += 1
        if self.steps_back > ORTHANC_PAGE_STEPS_BACK:
            raise OrthancError(
                f"{self.where}: its list of {self.resource} kept moving while it was read"
                f" ({ORTHANC_PAGE_STEPS_BACK} times more deletions than a page's overlap);"
                " run it again later"
            )

    def _get(self, since: int, asked: int) -> tuple[list[Any], int]:
        bound = ORTHANC_PAGE_BODY_BYTES
        while True:
            expand = "expand&" if self.expand else ""
            path = f"/{self.resource}?{expand}since={since}&limit={asked}"
            self.requests += 1
            try:
                page, size = self.get_sized(path, bound)
            except AnswerTooLarge:
                if asked > 1:  # a smaller page, and the limit after it
                    asked = max(1, asked // 4)
                    self.limit = max(1, min(self.limit, asked - (self.position - since)))
                    continue
                if bound < self.body_bytes:
                    bound = self.body_bytes
                    continue
                if self.overlap:
                    raise
                # One series past any answer's bound: its study is read on
                # its own (and found unreadable there: that study's alone).
                self.skipped += 1
                since, self.position, self.tail = since + 1, since + 1, []
                continue
            if not isinstance(page, list):
                raise OrthancError(
                    f"{self.where} answered GET /{self.resource} with something that is not a list"
                )
            return page, size

    def _resize(self, size: int, entries: int) -> None:
        per_entry = max(size / max(entries, 1), 1.0)
        fits = int(ORTHANC_PAGE_TARGET_BYTES / per_entry)
        self.limit = max(1, min(ORTHANC_PAGE_LIMIT, fits, self.limit * 2))


def _entry_id(entry: Any) -> Any:
    """A page entry's Orthanc ID: the entry itself (IDs only) or its "ID"."""
    if isinstance(entry, dict):
        entry = entry.get("ID")
    return entry if isinstance(entry, str) else None


# --------------------------------------------------------------------------
# The join, in the queue's SQLite connection
# --------------------------------------------------------------------------


class PageStore:
    """What the pages said, in temporary tables of the queue's connection
    (gone when the run ends): each study's checked fields and the IDs of its
    series, and each series' modality and images, filled in as the series
    pages come (in storage order, not grouped by study). A study's row is
    complete once every series it listed has been seen with that study as
    its parent; otherwise (a series added, deleted or skipped meanwhile, a
    malformed entry) the study is read on its own, as a tick reads it."""

    CREATE = (
        "CREATE TEMP TABLE IF NOT EXISTS orthanc_page_study ("
        " study_pk INTEGER PRIMARY KEY, ident TEXT NOT NULL, fields TEXT NOT NULL,"
        " series INTEGER NOT NULL)",
        "CREATE TEMP TABLE IF NOT EXISTS orthanc_page_series ("
        " series_id TEXT PRIMARY KEY, study_pk INTEGER NOT NULL, modality TEXT,"
        " images INTEGER)",
        "CREATE INDEX IF NOT EXISTS temp.orthanc_page_series_study"
        " ON orthanc_page_series (study_pk)",
    )
    CLEAR = ("DELETE FROM orthanc_page_study", "DELETE FROM orthanc_page_series")
    PUT_STUDY = (
        "INSERT OR REPLACE INTO orthanc_page_study (study_pk, ident, fields, series)"
        " VALUES (?, ?, ?, ?)"
    )
    FORGET_STUDY = "DELETE FROM orthanc_page_study WHERE study_pk = ?"
    PUT_SERIES_ID = (
        "INSERT OR REPLACE INTO orthanc_page_series (series_id, study_pk, modality, images)"
        " VALUES (?, ?, NULL, NULL)"
    )
    PUT_SERIES = (
        "UPDATE orthanc_page_series SET modality = ?, images = ?"
        " WHERE series_id = ? AND study_pk = ?"
    )
    # Per study: its fields, the series it listed, those seen in the series
    # pages and their images. Placeholders are appended, never values.
    SELECT_JOINED = (
        "SELECT s.study_pk, s.ident, s.fields, s.series AS listed,"
        " COUNT(r.images) AS seen, COALESCE(SUM(r.images), 0) AS images"
        " FROM orthanc_page_study s LEFT JOIN orthanc_page_series r"
        " ON r.study_pk = s.study_pk WHERE s.study_pk IN {pks} GROUP BY s.study_pk"
    )
    SELECT_MODALITIES = (
        "SELECT DISTINCT study_pk, modality FROM orthanc_page_series"
        " WHERE images IS NOT NULL AND study_pk IN {pks}"
    )
    SELECT_STUDIES_AFTER = (
        "SELECT study_pk, ident FROM orthanc_page_study WHERE study_pk > ?"
        " ORDER BY study_pk LIMIT ?"
    )
    # Studies of a page whose entry was not a study's: listed, read on their own.
    PUT_UNREAD = (
        "INSERT OR REPLACE INTO orthanc_page_study (study_pk, ident, fields, series)"
        " VALUES (?, ?, '', -1)"
    )

    def __init__(self, db: Database) -> None:
        self.db = db
        self.active = False  # tables made and emptied in this run
        self.nameless = 0  # page entries with no ID: nothing to read them by

    def reset(self) -> None:
        """Empty tables for a new reading of the archive."""
        for statement in self.CREATE + self.CLEAR:
            self.db.query(statement)
        self.active, self.nameless = True, 0

    def add_studies(self, entries: list[Any]) -> list[tuple[int, str]]:
        """Keeps a page of expanded studies; (study_pk, Orthanc ID) of each
        entry that has an ID, its fields kept only if the entry is a study's."""
        listed: list[tuple[int, str]] = []
        studies: list[tuple] = []
        unread: list[tuple] = []
        series: list[tuple] = []
        for entry in entries:
            ident = _entry_id(entry)
            if ident is None:
                self.nameless += 1
                continue
            pk = orthanc_pk(ident)
            listed.append((pk, ident))
            where = f"Orthanc's entry for study {ident} in GET /studies?expand"
            try:
                tags, patient = checked_study(ident, entry, where)
                ids = entry.get("Series")
                if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                    raise UnreadableStudy(f"{where} has no list of Series")
            except UnreadableStudy:
                unread.append((pk, ident))
                continue
            fields = study_row(entry, tags, patient, set(), 0, 0)
            studies.append((pk, ident, json.dumps(fields), len(ids)))
            series += [(i, pk) for i in ids]

        def work() -> None:
            self.db.execute_batch(self.PUT_STUDY, studies)
            self.db.execute_batch(self.PUT_UNREAD, unread)
            self.db.execute_batch(self.PUT_SERIES_ID, series)

        self.db.in_transaction(work)
        return listed

    def add_series(self, entries: list[Any]) -> None:
        """Fills in a page of expanded series (a malformed one is left out:
        its study is then read on its own)."""
        rows = []
        for entry in entries:
            ident, parent = (
                _entry_id(entry),
                entry.get("ParentStudy") if isinstance(entry, dict) else None,
            )
            if ident is None or not isinstance(parent, str) or not series_ok(entry):
                continue
            modality = entry["MainDicomTags"].get("Modality")
            rows.append((modality, len(entry["Instances"]), ident, orthanc_pk(parent)))
        self.db.in_transaction(lambda: self.db.execute_batch(self.PUT_SERIES, rows))

    def forget(self, pks: list[int]) -> None:
        """Studies changed since their page: read on their own from now on."""
        if self.active:
            self.db.execute_batch(self.FORGET_STUDY, [(pk,) for pk in pks])

    def studies_after(self, after: int, limit: int) -> list[dict[str, Any]]:
        """The studies the pages listed, by pk: study_pk, ident."""
        return self.db.query(self.SELECT_STUDIES_AFTER, (after, limit))

    def joined(self, wanted: dict[int, str]) -> dict[int, dict[str, Any]]:
        """The fields of those studies (pk -> Orthanc ID) the pages read whole."""
        if not self.active or not wanted:
            return {}
        pks = list(wanted)
        placeholders = "(" + ", ".join(["?"] * len(pks)) + ")"  # placeholders, never values
        modalities: dict[int, set] = {}
        for row in self.db.query(self.SELECT_MODALITIES.format(pks=placeholders), pks):
            modalities.setdefault(row["study_pk"], set()).add(row["modality"])
        found = {}
        for row in self.db.query(self.SELECT_JOINED.format(pks=placeholders), pks):
            pk = row["study_pk"]
            if row["ident"] != wanted[pk] or not row["fields"] or row["seen"] != row["listed"]:
                continue
            fields = json.loads(row["fields"])
            fields["mods_in_study"] = (
                "\\".join(sorted(modalities.get(pk, set()) - {None, ""})) or None
            )
            fields["num_series"], fields["num_instances"] = row["listed"], row["images"]
            found[pk] = fields
        return found
