"""DICOM value rules shared by the DICOM-native sources (Orthanc, DICOMweb,
DIMSE, arc-light): text, person names, dates, times, the study's date and time.

One set of rules, so that the same study read through any of them gives the
same document (docs/valores.md states them for a site). dcm4chee 2.x is not
among them: its documents are the original client's contract and are sent as
its columns hold them (Dcm4chee2.fields).
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from .document import _text

# PS3.5 6.2: values are padded to an even length with a space (a NUL for
# UIDs); some writers pad at the front too, and the padding means nothing.
PADDING = " \x00"

# DA: 'YYYYMMDD'; ACR-NEMA (PS3.5 6.2, "Date" note): 'YYYY.MM.DD'.
DA_FORMS = (
    re.compile(r"(\d{4})(\d{2})(\d{2})"),
    re.compile(r"(\d{4})\.(\d{2})\.(\d{2})"),
)
# TM: 'HH', 'HHMM', 'HHMMSS', 'HHMMSS.F' (1 to 6 digits); ACR-NEMA:
# 'HH:MM:SS.frac' (and 'HH:MM'). A fraction longer than six digits is cut
# to microseconds, never rounded (rounding could carry into the next second).
TM_FORMS = (
    re.compile(r"(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d*))?)?)?"),
    re.compile(r"(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d*))?)?"),
)
# TimezoneOffsetFromUTC (0008,0201): '+HHMM' or '-HHMM'.
TZ_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")


def dicom_text(value: Any) -> str | None:
    """A text value as the document carries it: bytes decoded (UTF-8, else
    Latin-1), padding (spaces, NULs) trimmed at both ends, and empty the same
    as absent (None)."""
    text = _text(value)
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        # A source hands text or bytes; anything else is a bug of that source.
        raise TypeError(f"a DICOM text value cannot be a {type(text).__name__}")
    return text.strip(PADDING) or None


def person_name(value: Any) -> str | None:
    """A person name (PN) as the document carries it.

    Every component group the value has (alphabetic, ideographic,
    phonetic) is kept, each component trimmed of spaces, empty trailing
    components removed within each group, and empty trailing groups removed:
    'PEREZ^JUAN^^^' is 'PEREZ^JUAN', 'Wang^XiaoDong=王^小東=' is
    'Wang^XiaoDong=王^小東', and a name with only an ideographic group stays
    '=王^小東'. It is the form dcm4che (arc-light) writes a name in. None when
    nothing is left.
    """
    text = dicom_text(value)
    if text is None:
        return None
    groups = []
    for group in text.split("="):
        components = [component.strip(" ") for component in group.split("^")]
        groups.append("^".join(components).rstrip("^"))
    return "=".join(groups).rstrip("=") or None


def dicom_date(value: Any) -> datetime.date | None:
    """A DA value: 'YYYYMMDD', or the ACR-NEMA 'YYYY.MM.DD' that PS3.5 asks
    readers to accept. Anything else (a range, a wrong day, '*') is None."""
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    text = dicom_text(value)
    if text is None:
        return None
    for form in DA_FORMS:
        match = form.fullmatch(text)
        if match:
            try:
                return datetime.date(*(int(part) for part in match.groups()))
            except ValueError:
                return None
    return None


def dicom_time(value: Any) -> datetime.time | None:
    """A TM value: 'HH', 'HHMM', 'HHMMSS', 'HHMMSS.FFFFFF', or the ACR-NEMA
    'HH:MM:SS.frac'. The fraction is kept as microseconds (cut, never
    rounded); a leap second (60) reads as 59. Anything else is None."""
    if isinstance(value, datetime.time):
        return value
    text = dicom_text(value)
    if text is None:
        return None
    for form in TM_FORMS:
        match = form.fullmatch(text)
        if match:
            hours, minutes, seconds, fraction = match.groups()
            try:
                return datetime.time(
                    int(hours),
                    int(minutes or 0),
                    min(int(seconds or 0), 59),
                    int(((fraction or "") + "000000")[:6]),
                )
            except ValueError:
                return None
    return None


def utc_offset(value: Any) -> datetime.timedelta | None:
    """TimezoneOffsetFromUTC ('+0100', '-0300') as a timedelta; None when
    absent or not of that form (then no zone is applied)."""
    text = dicom_text(value)
    match = TZ_OFFSET.fullmatch(text) if text else None
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    if int(hours) > 14 or int(minutes) > 59:
        return None
    offset = datetime.timedelta(hours=int(hours), minutes=int(minutes))
    return -offset if sign == "-" else offset


def study_datetime(
    date: Any,
    time: Any,
    timezone_offset: Any = None,
    local_offset: datetime.timedelta | None = None,
) -> datetime.datetime | None:
    """The document's study_datetime: naive, in the PACS's local time, as
    dcm4chee sends it. StudyDate and StudyTime; a missing or unreadable time
    is 00:00:00 (the day is still right); no readable date is None.

    When the answer carries TimezoneOffsetFromUTC and the caller knows the
    PACS's own offset for that date (`local_offset`), a study stamped in
    another zone is moved to the PACS's; otherwise the values stand as
    given. The fraction of a second is kept (the document shows seconds).
    """
    day = dicom_date(date)
    if day is None:
        return None
    moment = datetime.datetime.combine(day, dicom_time(time) or datetime.time())
    given = utc_offset(timezone_offset)
    if given is not None and local_offset is not None and given != local_offset:
        try:
            moment = moment - given + local_offset
        except OverflowError:  # year 1 or 9999 moved out of range
            return None
    return moment


def _absent_as_none(value: Any) -> str | None:
    """arc-light's text columns: '*' is its mark for an absent value."""
    text = dicom_text(value)
    return None if text == "*" else text


def _person_name_as_2x(value: Any) -> str | None:
    """Kept for the sources that call it: person_name()."""
    return person_name(value)


def _arclight_datetime(date: Any, time_of_day: Any) -> datetime.datetime | None:
    """Kept for the sources that call it: study_datetime() without a zone
    (arc-light and Orthanc store none). arc-light's '*' is no date."""
    return study_datetime(date, time_of_day)
