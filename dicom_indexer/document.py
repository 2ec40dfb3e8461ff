"""One study's fields -> the 11-key JSON document the central index receives."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, Mapping

# The document sent for each study: exactly the original client's keys, in
# this order. The central service reads these names; they are its contract.
DOCUMENT_KEYS = (
    "patient_pk",
    "patient_id",
    "patient_name",
    "study_pk",
    "study_iuid",
    "study_datetime",
    "study_description",
    "study_modality",
    "study_series",
    "study_instances",
    "center",
)


# --------------------------------------------------------------------------
# Document: one study's fields -> the JSON the service receives (pure)
# --------------------------------------------------------------------------


def _format_datetime(value: Any) -> str | None:
    """'YYYY-MM-DD HH:MM:SS', or None for NULL and zero dates.

    PyMySQL hands back zero dates ('0000-00-00 00:00:00') as the raw string.
    """
    if isinstance(value, datetime.datetime):
        return "%04d-%02d-%02d %02d:%02d:%02d" % (
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
        )
    if isinstance(value, datetime.date):
        return "%04d-%02d-%02d 00:00:00" % (value.year, value.month, value.day)
    return None


def _datetime_or_none(value: Any) -> datetime.datetime | None:
    # Zero dates come back as strings and strict servers refuse them as input.
    return value if isinstance(value, datetime.datetime) else None


def _text(value: Any) -> str | None:
    # dcm4chee's columns are text, but a site may have altered one to binary.
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).decode("latin-1")
    return value


def study_document(row: Mapping[str, Any], center: str) -> dict[str, Any]:
    """The JSON document for one study, with the original client's value
    types, from its fields as dcm4chee 2.x names them (Dcm4chee2.fields)."""
    return {
        "patient_pk": row["patient_pk"],
        "patient_id": _text(row["pat_id"]),
        "patient_name": _text(row["pat_name"]),
        "study_pk": row["study_pk"],
        "study_iuid": _text(row["study_iuid"]),
        "study_datetime": _format_datetime(row["study_datetime"]),
        "study_description": _text(row["study_desc"]),
        "study_modality": _text(row["mods_in_study"]),
        "study_series": row["num_series"],
        "study_instances": row["num_instances"],
        "center": center,
    }


def encode_document(document: Mapping[str, Any]) -> bytes:
    """The request body: compact JSON, ASCII-escaped so any receiver decodes it."""
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def document_fingerprint(body: bytes) -> bytes:
    """The MD5 of a request body, kept in study_service.sent_version once the
    service acknowledged it: the same document is never sent twice."""
    return hashlib.md5(body).digest()
