"""Slices: what one harvest query asks, and how a slice the PACS did not
answer whole is split into smaller ones that match the same studies.

By date first (halves; open ends in ten-year steps), then, for a single day
or for no date at all, by PatientID prefix: DICOM matching has no "not", so
every character a PatientID may start with is asked in turn. Slices are
kept in the queue between ticks as JSON (slice_json, slice_of).
"""

from __future__ import annotations

import datetime
from typing import Any, Mapping

from .finding import StudyQuery

# Result caps seen in the field (and Orthanc's QIDO, which answers cap + 1):
# a count at one of them is never trusted.
USUAL_CAPS = frozenset({100, 101, 200, 500, 501, 1000, 1001, 2000, 5000, 5001, 10000, 10001})
# A PatientID prefix sweep: the characters a PatientID usually starts with.
# DICOM matching cannot say "none of these", so an undated study whose
# PatientID starts with another character (or is empty) is found only by a
# query with no keys that the PACS answers whole (README: harvesting costs).
PREFIX_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
MAX_PREFIX_LENGTH = 16  # LO: up to 64; past this the rest waits for a cap the PACS lifts


ALL_STUDIES = StudyQuery()
# Where a walk reaches it, the undated sweep: PatientID prefixes sized from
# what the queue knows by then (see HarvestSource._undated_sweep).
UNDATED_SWEEP = StudyQuery(patient_id_prefix="\x00")


def split(query: StudyQuery, today: datetime.date) -> list[StudyQuery]:
    """A slice the PACS did not answer whole, as smaller slices that together
    match the same studies; [] when it cannot be split further."""
    prefix = query.patient_id_prefix
    if not query.dated and prefix is None:
        # Everything: the dated studies by date, the undated by PatientID.
        return [
            StudyQuery(date_to=datetime.date(1989, 12, 31), dated=True),
            StudyQuery(date_from=datetime.date(1990, 1, 1), dated=True),
            UNDATED_SWEEP,
        ]
    start, end = query.date_from, query.date_to
    if query.dated and (start is None or end is None or start < end):
        if start is None:  # older than `end`: ten years at a time
            assert end is not None
            cut = end - datetime.timedelta(days=3652)
            return [
                StudyQuery(date_to=cut, dated=True),
                StudyQuery(date_from=cut + datetime.timedelta(days=1), date_to=end, dated=True),
            ]
        if end is None:  # from `start` on: up to tomorrow, then the future
            horizon = max(start, today + datetime.timedelta(days=1))
            later = StudyQuery(date_from=horizon + datetime.timedelta(days=1), dated=True)
            return [StudyQuery(date_from=start, date_to=horizon, dated=True), later]
        middle = start + (end - start) // 2
        return [
            StudyQuery(date_from=start, date_to=middle, dated=True),
            StudyQuery(date_from=middle + datetime.timedelta(days=1), date_to=end, dated=True),
        ]
    # One day (or no date): by PatientID prefix.
    prefix = prefix or ""
    if len(prefix) >= MAX_PREFIX_LENGTH:
        return []
    return [
        StudyQuery(date_from=start, date_to=end, dated=query.dated, patient_id_prefix=prefix + c)
        for c in PREFIX_ALPHABET
    ]


def slice_json(query: StudyQuery) -> dict[str, Any]:
    return {
        "from": query.date_from.isoformat() if query.date_from else None,
        "to": query.date_to.isoformat() if query.date_to else None,
        "dated": query.dated,
        "prefix": query.patient_id_prefix,
    }


def slice_of(data: Mapping[str, Any]) -> StudyQuery:
    def day(value: Any) -> datetime.date | None:
        return datetime.date.fromisoformat(value) if value else None

    return StudyQuery(
        date_from=day(data.get("from")),
        date_to=day(data.get("to")),
        dated=bool(data.get("dated")),
        patient_id_prefix=data.get("prefix"),
    )
