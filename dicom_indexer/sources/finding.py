"""What a PACS answers to a study query, whatever the protocol asking it.

DICOMweb (QIDO-RS, sources/dicomweb.py) and DIMSE (C-FIND, sources/dimse.py)
are two ways to ask the same question: which studies match these keys. Each
protocol has a Finder that asks it and turns the answers into FoundStudy
values; the harvest (sources/harvest.py), written once for both, decides
which questions to ask, when an answer can be trusted, and what the queue
makes of it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Protocol

from ..errors import EXIT_DATABASE, IndexerError


class PacsUnavailable(IndexerError):
    """The PACS as a whole cannot be asked: unreachable, the association or
    the credentials refused, our AE title not registered, queries refused
    outright. Every study's trouble: the run stops with one line, exit 4."""

    exit_code = EXIT_DATABASE


@dataclass(frozen=True)
class StudyQuery:
    """One study-level query. Keys left at their defaults are not sent (no
    StudyDate key matches undated studies too; a date range never does).

    - date_from, date_to: the StudyDate range, inclusive; None leaves that
      end open (`-20151231`, `20230101-`). Both None: no StudyDate key.
    - patient_id_prefix: PatientID `<prefix>*`; None: no PatientID key.
    - study_uids: a list of StudyInstanceUIDs (a UID-list query); every
      other key is then left out.
    """

    date_from: datetime.date | None = None
    date_to: datetime.date | None = None
    patient_id_prefix: str | None = None
    study_uids: tuple[str, ...] = ()
    dated: bool = False  # a StudyDate key is sent (both ends may be open)

    def describe(self) -> str:
        """For messages: the keys, never a UID list's values (a prefix of at
        most a few characters says nothing of a patient)."""
        if self.study_uids:
            return f"{len(self.study_uids)} StudyInstanceUIDs"
        parts = []
        if self.dated:
            start = self.date_from.strftime("%Y%m%d") if self.date_from else ""
            end = self.date_to.strftime("%Y%m%d") if self.date_to else ""
            parts.append(f"StudyDate {start if start == end else start + '-' + end}")
        if self.patient_id_prefix is not None:
            parts.append(f"PatientID {self.patient_id_prefix}*")
        return ", ".join(parts) or "all studies"

    def date_range(self) -> str:
        """The StudyDate key's value, DICOM's range form ('' when not dated)."""
        if not self.dated:
            return ""
        start = self.date_from.strftime("%Y%m%d") if self.date_from else ""
        end = self.date_to.strftime("%Y%m%d") if self.date_to else ""
        return start if start and start == end else f"{start}-{end}"


@dataclass(frozen=True)
class FoundStudy:
    """One study as the PACS answered it, decoded (by its own character set)
    but not yet cleaned: values.py's rules make the document's fields.

    A value the PACS did not return is None; the counts and modalities are
    None when the PACS does not answer them at study level (then the
    harvest asks for the study's series)."""

    study_iuid: str
    patient_id: str | None = None
    patient_name: str | None = None  # all its component groups, as answered
    study_date: str | None = None  # DA as answered
    study_time: str | None = None  # TM as answered
    timezone_offset: str | None = None  # TimezoneOffsetFromUTC, when answered
    study_description: str | None = None
    modalities: tuple[str, ...] | None = None
    series_count: int | None = None
    instance_count: int | None = None
    # This answer could not be read (a value of the wrong kind, a character
    # set that cannot decode it): one line, no patient data. The study is
    # that answer's alone: it stays pending with this error.
    problem: str | None = None


@dataclass(frozen=True)
class FoundSeries:
    """One series of a study, for a PACS without study-level counts."""

    modality: str | None
    instance_count: int | None


@dataclass
class FindResult:
    """The answers to one query, and whether the PACS says they are all of
    them. `complete` is only the PACS's own word (a final Success status, an
    HTTP 200 without a Warning, no 413): the harvest also distrusts a count
    at a result cap. `problem` says why not complete, in one line."""

    studies: list[FoundStudy]
    complete: bool
    problem: str = ""


@dataclass(frozen=True)
class FeedChange:
    """One entry of a vendor's change feed, as the harvest needs it: its
    position, the study it is about, and what happened to it."""

    sequence: int
    study_iuid: str
    action: str  # "create", "update" or "delete"


class ChangeFeedError(IndexerError):
    """A change feed that answers what a feed never does: a page that does
    not advance, or goes backwards. The run stops; the cursor stays."""

    exit_code = EXIT_DATABASE


class ChangeFeed(Protocol):
    """A vendor's change feed (Azure's /changefeed): what changed, in order,
    from a cursor the harvest keeps."""

    def latest(self) -> int:
        """The sequence of the newest change (0: none yet)."""

    def changes_after(self, sequence: int) -> tuple[list[FeedChange], int]:
        """The changes after `sequence`, a page of them, in order, and the
        sequence the next page starts after (past the page's last change,
        or past a stretch with none). Raises ChangeFeedError for a page that
        is not a feed's (not after `sequence`, not rising)."""


class Finder(Protocol):
    """Asks one PACS about its studies, over one protocol."""

    where: str  # for messages: "DICOMweb at https://...", "PACS ORTHANC at host:port"
    max_uids_per_query: int  # how many StudyInstanceUIDs one UID-list query carries
    # The cold sweep's share of a tick, in answers: what fits in an idle
    # tick's time at what one answer costs over this protocol.
    cold_answers_per_tick: int

    def find_studies(self, query: StudyQuery) -> FindResult:
        """The studies matching `query`. Raises PacsUnavailable when the PACS
        cannot be asked at all; a refusal of this query (too broad, out of
        resources) or an answer cut short is an incomplete result."""

    def find_series(self, study_iuid: str) -> list[FoundSeries]:
        """The series of one study; raises PacsUnavailable, or ValueError
        when this study's answer cannot be read (that study's alone)."""

    def describe(self) -> list[tuple[str, str, int]]:
        """check's lines: what the PACS is, what it answers (counts and
        modalities at study level or not, its result cap, its character
        set) and one line per problem, as (level, line, exit code)."""

    def version(self) -> str:
        """The PACS as check's first line names it."""

    def change_feed(self) -> ChangeFeed | None:
        """The vendor's change feed, when config.json asks for one."""

    def close(self) -> None: ...
