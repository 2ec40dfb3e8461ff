"""The DICOM value rules (dicom_indexer/values.py, docs/valores.md): what a
DICOM-native source's answer becomes in the document. Pure functions, no
servers: each case is a value a PACS has been seen to send."""

from __future__ import annotations

import datetime

import pytest

from dicom_indexer.document import _format_datetime
from dicom_indexer.values import (
    _absent_as_none,
    _arclight_datetime,
    _person_name_as_2x,
    dicom_date,
    dicom_text,
    dicom_time,
    person_name,
    study_datetime,
    utc_offset,
)

D = datetime.datetime
HOUR = datetime.timedelta(hours=1)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("id11111 ", "id11111"),  # Orthanc keeps a VR UN value's padding
        (" 12.345.678-5", "12.345.678-5"),
        ("1.2.840.10008\x00", "1.2.840.10008"),  # a UID's NUL padding
        ("TC DE TÓRAX", "TC DE TÓRAX"),  # inner spaces are the value's
        ("", None),  # empty is the same as absent
        ("   ", None),
        (None, None),
        (b"PE\xc3\x91A ", "PEÑA"),  # UTF-8 bytes
        (b"PE\xd1A", "PEÑA"),  # Latin-1 bytes
        (12, "12"),
    ],
)
def test_dicom_text(value, expected):
    assert dicom_text(value) == expected


def test_dicom_text_refuses_what_is_not_text():
    with pytest.raises(TypeError, match="cannot be a list"):
        dicom_text(["A", "B"])


@pytest.mark.parametrize(
    "value, expected",
    [
        ("Wang^XiaoDong=王^小東=", "Wang^XiaoDong=王^小東"),  # Orthanc's trailing group
        ("Wang^XiaoDong=王^小東", "Wang^XiaoDong=王^小東"),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("Wang^XiaoDong^^^=王^小東^^^=^^^^", "Wang^XiaoDong=王^小東"),
        ("=王^小東=", "=王^小東"),  # no alphabetic group: the ideographic one kept
        ("Yamada==やまだ", "Yamada==やまだ"),  # an inner empty group keeps its place
        ("PEREZ^JUAN^^^", "PEREZ^JUAN"),
        ("PEREZ^JUAN^^^^", "PEREZ^JUAN"),  # arc-light's five components and sentinel
        # arc-light's three person_name columns joined by '=' (absent groups '^^^^^')
        ("PEREZ^JUAN^^^^=^^^^^=^^^^^", "PEREZ^JUAN"),
        ("Yamada^Tarou^^^^=山田^太郎^^^^=^^^^^", "Yamada^Tarou=山田^太郎"),
        ("^JUAN^^^^", "^JUAN"),  # leading empty components are the name's
        ("PEREZ ^ JUAN ", "PEREZ^JUAN"),  # components trimmed, as dcm4che stores them
        ("MUÑOZ^JOSÉ^ÁNGEL", "MUÑOZ^JOSÉ^ÁNGEL"),
        ("^^^^^", None),
        ("^^^^=^^^^=", None),
        ("", None),
        (None, None),
    ],
)
def test_person_name(value, expected):
    assert person_name(value) == expected
    assert _person_name_as_2x(value) == expected  # the name the sources call today


@pytest.mark.parametrize(
    "value, expected",
    [
        ("19970424", datetime.date(1997, 4, 24)),
        ("1997.04.24", datetime.date(1997, 4, 24)),  # ACR-NEMA, null in Orthanc's before
        ("20240517 ", datetime.date(2024, 5, 17)),
        ("20240230", None),  # no such day
        ("20240517-20240518", None),  # a range is not a date
        ("1997-04-24", None),
        ("2024051", None),
        ("*", None),  # arc-light's absent
        ("", None),
        (None, None),
        (datetime.date(2024, 5, 17), datetime.date(2024, 5, 17)),
    ],
)
def test_dicom_date(value, expected):
    assert dicom_date(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("14", datetime.time(14)),
        ("1404", datetime.time(14, 4)),
        ("140438", datetime.time(14, 4, 38)),
        ("140438.1", datetime.time(14, 4, 38, 100000)),
        ("140438.123456", datetime.time(14, 4, 38, 123456)),
        ("235959.9999999", datetime.time(23, 59, 59, 999999)),  # cut, never rounded up
        ("140438.", datetime.time(14, 4, 38)),
        ("14:04:38", datetime.time(14, 4, 38)),  # ACR-NEMA
        ("14:04:38.5", datetime.time(14, 4, 38, 500000)),
        ("14:04", datetime.time(14, 4)),
        ("235960", datetime.time(23, 59, 59)),  # a leap second
        ("250000", None),
        ("1404.5", None),
        ("140", None),
        ("*", None),
        ("", None),
        (None, None),
    ],
)
def test_dicom_time(value, expected):
    assert dicom_time(value) == expected


@pytest.mark.parametrize(
    "value, expected",
    [
        ("+0100", HOUR),
        ("-0300", -3 * HOUR),
        ("+0530", datetime.timedelta(hours=5, minutes=30)),
        ("-0000", datetime.timedelta(0)),
        ("0100", None),
        ("+1500", None),
        ("+01", None),
        ("", None),
        (None, None),
    ],
)
def test_utc_offset(value, expected):
    assert utc_offset(value) == expected


@pytest.mark.parametrize(
    "args, expected",
    [
        (("20240517", "094210.123"), D(2024, 5, 17, 9, 42, 10, 123000)),
        (("1997.04.24", "14:04:38"), D(1997, 4, 24, 14, 4, 38)),
        (("20240517", None), D(2024, 5, 17)),  # no time: midnight
        (("20240517", ""), D(2024, 5, 17)),
        (("20240517", "*"), D(2024, 5, 17)),
        (("20240517", "250000"), D(2024, 5, 17)),  # an unreadable time keeps the day
        ((None, "094210"), None),
        (("20240230", "101530.000"), None),
        # A zone given and the PACS's known: moved to the PACS's local time.
        (("20240517", "233000", "+0100", -3 * HOUR), D(2024, 5, 17, 19, 30)),
        (("20240517", "010000", "+0000", -4 * HOUR), D(2024, 5, 16, 21, 0)),  # day before
        (("20240517", "093000", "-0300", -3 * HOUR), D(2024, 5, 17, 9, 30)),  # same zone
        # A zone given but not the PACS's, or no zone: as given.
        (("20240517", "093000", "+0100", None), D(2024, 5, 17, 9, 30)),
        (("20240517", "093000", None, -3 * HOUR), D(2024, 5, 17, 9, 30)),
        (("20240517", "093000", "garbage", -3 * HOUR), D(2024, 5, 17, 9, 30)),
    ],
)
def test_study_datetime(args, expected):
    assert study_datetime(*args) == expected


def test_the_document_shows_seconds_without_rounding_up():
    moment = study_datetime("20241231", "235959.9999999")
    assert moment == D(2024, 12, 31, 23, 59, 59, 999999)
    assert _format_datetime(moment) == "2024-12-31 23:59:59"


@pytest.mark.parametrize(
    "date, time, expected",
    [
        ("20240517", "094210.123", "2024-05-17 09:42:10"),
        ("1997.04.24", "14:04:38", "1997-04-24 14:04:38"),  # was null
        ("20240517", "*", "2024-05-17 00:00:00"),
        ("*", "*", None),
        ("20240230", "101530.000", None),
    ],
)
def test_the_arclight_and_orthanc_datetime_follows_the_rules(date, time, expected):
    assert _format_datetime(_arclight_datetime(date, time)) == expected


@pytest.mark.parametrize(
    "value, expected",
    [("*", None), ("TC ", "TC"), ("", None), (None, None), ("CT\\SR", "CT\\SR")],
)
def test_arclight_absent_text(value, expected):
    assert _absent_as_none(value) == expected
