"""A C-FIND SCP that behaves as it is told, for what a real Orthanc cannot show.

ScriptedScp is a pynetdicom SCP (Study Root Q/R FIND) on a free loopback
port, run on threads of the test process, answering from a record: a list
of RecordStudy, each a study's keys (PatientName, StudyDate...) and its
series. It matches as a PACS does (StudyDate ranges, undated studies
matching no range, PatientID prefixes, UID lists, SERIES level), and its
Script says how to misbehave:

- refuse with 0xC000 or 0xA700 (arc-light's "too broad"), or cancel with
  0xFE00 after N answers (Orthanc's cap), or stop silently after N with
  Success (a silent cap), when a query matches more than N;
- leave out the study-level counts or ModalitiesInStudy;
- refuse `*` (or ranges) in StudyDate;
- answer a TimezoneOffsetFromUTC;
- abort the association after N answers, or accept it and abort on C-FIND
  (Orthanc's answer to an AE it does not know);
- trickle: sleep before each answer;
- reject the association (calling AE title not recognised).

Every query it receives is recorded (Received: its level, its keys as
strings, the requestor's port, which tells associations apart). Works with
pynetdicom 2.0.2 (Python 3.8, 3.9) and 3.x. Not used by client.py.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Any

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
SUCCESS, PENDING, CANCEL = 0x0000, 0xFF00, 0xFE00


@dataclasses.dataclass
class RecordStudy:
    """One study of the record. `keys`: study-level values as pydicom takes
    them (str, or bytes written as they are: an undecodable value); a key
    missing is empty in the answer (StudyDate missing: an undated study).
    `series`: (Modality, number of instances) each."""

    uid: str
    keys: dict[str, Any]
    series: tuple[tuple[str, int], ...] = (("CT", 1),)
    charset: str | list[str] = "ISO_IR 192"


@dataclasses.dataclass
class Script:
    """How the SCP misbehaves; the defaults answer as a conforming PACS."""

    over: int | None = None  # a query matching more than this many...
    over_status: int | None = 0xC000  # ...is refused so; CANCEL: `over` answers then 0xFE00;
    # None: `over` answers then Success (a silent cap)
    no_counts: bool = False
    no_modalities: bool = False
    refuse_in_dates: str = ""  # characters ('*', '-') that make StudyDate refused (0xC000)
    timezone_offset: str | None = None  # answered as TimezoneOffsetFromUTC
    abort_after: int | None = None  # A-ABORT after this many answers
    abort_on_find: bool = False  # A-ABORT on C-FIND, before any answer
    trickle_seconds: float = 0.0  # before each answer
    reject: bool = False  # reject every association (calling AE not recognised)


@dataclasses.dataclass
class Received:
    level: str
    keys: dict[str, str]
    requestor_port: int


def _nodelay(event: Any) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ScriptedScp:
    """The SCP, listening on 127.0.0.1:`port` as AE `ae_title` until stop()."""

    def __init__(
        self, record: list[RecordStudy], ae_title: str = "SCRIPTED", ssl_context: Any = None
    ) -> None:
        from pynetdicom import AE, evt

        self.record = list(record)
        self.script = Script()
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.ae_title = ae_title
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(STUDY_ROOT_FIND)
        self.ae.require_called_aet = True
        self.ae.network_timeout = 30
        self.ae.dimse_timeout = 30
        handlers = [(evt.EVT_C_FIND, self._on_find), (evt.EVT_CONN_OPEN, _nodelay)]
        # ssl_context: DICOM over TLS (PS3.15 B.1), as a PACS that requires it.
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
        self.port = self.server.server_address[1]

    def set_script(self, **behaviour: Any) -> None:
        """Misbehaves from the next association or query on, as told."""
        self.script = Script(**behaviour)
        # An AE title no requestor has: every association is then rejected
        # with "calling AE title not recognised".
        self.ae.require_calling_aet = ["NOBODY"] if self.script.reject else []
        with self.lock:
            self.received.clear()

    def stop(self) -> None:
        self.server.shutdown()

    def queries(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    # -- answering ---------------------------------------------------------------

    def _on_find(self, event: Any) -> Any:
        query = event.identifier
        script = self.script
        level = str(query.get("QueryRetrieveLevel", "")).upper()
        keys = {
            elem.keyword: _as_text(elem.value)
            for elem in query
            if elem.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")
        }
        requestor = event.assoc.requestor
        port = int(getattr(requestor, "port", 0) or 0)
        with self.lock:
            self.received.append(Received(level, keys, port))
        if script.abort_on_find:
            event.assoc.abort()
            return
        if any(c in keys.get("StudyDate", "") for c in script.refuse_in_dates):
            yield 0xC000, None
            return
        matches = self._matches(level, keys)
        capped = script.over is not None and len(matches) > script.over
        if capped:
            if script.over_status not in (None, CANCEL):
                yield script.over_status, None
                return
            matches = matches[: script.over]
        for index, answer in enumerate(matches):
            if script.abort_after is not None and index >= script.abort_after:
                event.assoc.abort()
                return
            if event.is_cancelled:
                yield CANCEL, None
                return
            if script.trickle_seconds:
                time.sleep(script.trickle_seconds)
            yield PENDING, self._answer(level, keys, answer)
        yield (CANCEL if capped and script.over_status == CANCEL else SUCCESS), None

    def _matches(self, level: str, keys: dict[str, str]) -> list[Any]:
        studies = [s for s in self.record if _study_matches(s, keys)]
        if level == "SERIES":
            return [(study, index) for study in studies for index in range(len(study.series))]
        return studies

    def _answer(self, level: str, keys: dict[str, str], match: Any) -> Any:
        from pydicom.dataset import Dataset

        ds = Dataset()
        study, index = match if level == "SERIES" else (match, None)
        ds.SpecificCharacterSet = study.charset
        ds.QueryRetrieveLevel = level
        ds.RetrieveAETitle = self.ae_title
        values = dict(study.keys, StudyInstanceUID=study.uid)
        if index is not None:
            modality, instances = study.series[index]
            values.update(
                SeriesInstanceUID=f"{study.uid}.{index + 1}",
                Modality=modality,
                NumberOfSeriesRelatedInstances=str(instances),
            )
        else:
            values.update(_study_counts(study, self.script))
            if self.script.timezone_offset is not None:
                values["TimezoneOffsetFromUTC"] = self.script.timezone_offset
        for keyword in keys:
            counts = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
            if keyword in counts and self.script.no_counts:
                continue
            if keyword == "ModalitiesInStudy" and self.script.no_modalities:
                continue
            _set(ds, keyword, values.get(keyword, ""))
        return ds


def _study_counts(study: RecordStudy, script: Script) -> dict[str, Any]:
    modalities = sorted({modality for modality, _ in study.series})
    return {
        "ModalitiesInStudy": modalities if len(modalities) > 1 else "".join(modalities),
        "NumberOfStudyRelatedSeries": str(len(study.series)),
        "NumberOfStudyRelatedInstances": str(sum(n for _, n in study.series)),
    }


def _set(ds: Any, keyword: str, value: Any) -> None:
    """Sets a key; bytes are written as they are, whatever the character set
    (as UN, which the requestor reads by its dictionary VR, as it reads every
    element of an implicit VR transfer syntax)."""
    if isinstance(value, bytes):
        from pydicom.datadict import tag_for_keyword
        from pydicom.dataelem import DataElement

        raw = value + (b" " if len(value) % 2 else b"")
        ds.add(DataElement(tag_for_keyword(keyword), "UN", raw))
        return
    setattr(ds, keyword, value)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _study_matches(study: RecordStudy, keys: dict[str, str]) -> bool:
    uids = keys.get("StudyInstanceUID", "")
    if uids and study.uid not in uids.split("\\"):
        return False
    patient_id = keys.get("PatientID", "")
    own = str(study.keys.get("PatientID", ""))
    if patient_id and patient_id != "*":
        if patient_id.endswith("*"):
            if not own.startswith(patient_id[:-1]):
                return False
        elif own != patient_id:
            return False
    return _date_matches(str(study.keys.get("StudyDate", "")), keys.get("StudyDate", ""))


def _date_matches(date: str, wanted: str) -> bool:
    """StudyDate matching: a single date or a range; undated studies match
    no StudyDate key at all (Orthanc, measured)."""
    if not wanted or wanted == "*":
        return True
    if not date:
        return False
    if "-" not in wanted:
        return date == wanted
    start, end = wanted.split("-", 1)
    return (not start or date >= start) and (not end or date <= end)
