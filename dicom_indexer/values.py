"""DICOM value rules shared by the sources: absent values, person names, times."""

from __future__ import annotations

import datetime
from typing import Any

from .document import _text


def _absent_as_none(value: Any) -> str | None:
    text = _text(value)
    return None if text in (None, "", "*") else text


def _person_name_as_2x(value: Any) -> str | None:
    """A person name as dcm4chee 2.x sends it: without trailing empty
    components ('PEREZ^JUAN^^^' is 'PEREZ^JUAN'); None when nothing is left."""
    name = _text(value)
    return (name.rstrip("^") or None) if name else None


def _arclight_datetime(date: Any, time_of_day: Any) -> datetime.datetime | None:
    date, time_of_day = _absent_as_none(date), _absent_as_none(time_of_day)
    if date is None or len(date) != 8 or not date.isdigit():
        return None
    digits = (time_of_day or "").split(".")[0]
    digits = digits if digits.isdigit() else ""
    digits = (digits + "000000")[:6]
    try:
        return datetime.datetime(
            int(date[:4]), int(date[4:6]), int(date[6:]),
            int(digits[:2]), int(digits[2:4]), int(digits[4:]),
        )  # fmt: skip
    except ValueError:
        return None
