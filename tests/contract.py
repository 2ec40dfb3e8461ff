"""The sources under the source contract (tests/test_source_contract.py).

Each class here drives one kind of PACS the way its real counterpart
behaves, through one interface: add, change and delete studies, break one
study's read, lose the change history, and read the queue back. The
contract's tests speak only this interface, so that every source (and the
next one) is held to the same promises, as fsspec's abstract tests are run
by each filesystem.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any

from azure_feed_stub import AzureFeedStub
from conftest import (
    API_KEY,
    CENTER,
    ArcDb,
    PacsDb,
    wait_until,
    write_configs,
    write_orthanc_configs,
)
from hostile_http import HostileFront
from orthanc_proxy import Fault, OrthancProxy
from testkit import (
    CentralService,
    OrthancServer,
    dicom_instance,
    dicom_instance_with,
    dicomweb_orthanc_settings,
    free_port,
    new_uid,
)

from dicom_indexer.sources.harvest import uid_pk
from dicom_indexer.sources.orthanc import ORTHANC_BODY_BYTES, orthanc_pk
from dicom_indexer.study_service import QUEUE_FILE_NAME


class SourceUnderTest:
    """One PACS and the configuration that makes the client read it."""

    name = ""
    # What break_read() can do to one study's read, beyond the service's own
    # faults (which every source meets the same way).
    READ_FAULTS: tuple[str, ...] = ()
    # Ways this source's change history can be lost (lose_history()).
    HISTORY_LOSSES: tuple[str, ...] = ()
    # Ways its change feed can stop advancing (stall_feed()): a source whose
    # database moves its own cursor has none.
    FEED_STALLS: tuple[str, ...] = ()
    # Whether the source can answer "not found" for a study it still holds
    # (say_gone_once()): a database row cannot.
    SPURIOUS_GONE: tuple[str, ...] = ()
    # Ways the queue can lose a study the source still holds, which reconcile
    # must find (forget()). dcm4chee has none: a study the queue does not
    # know is the original client's, sent before this one was installed.
    FORGOTTEN: tuple[str, ...] = ()

    def __init__(self, directory: Path, service: CentralService) -> None:
        self.directory = directory
        self.service = service
        self.configs: list[str] = []

    # -- the archive -----------------------------------------------------------

    def add_studies(self, count: int) -> list[int]:
        """`count` new studies, quiet (stable) already; their pks as the
        central index receives them, in the order the client sends them."""
        raise NotImplementedError

    def add_late_studies(self, count: int) -> list[int]:
        """New studies that the PACS stamped a while ago (a late commit, a
        migration): what only a tick's own bookkeeping finds."""
        return self.add_studies(count)

    def change(self, pk: int) -> None:
        """An edit the PACS makes to a study (a new series), which the
        index must receive."""
        raise NotImplementedError

    def delete(self, pk: int) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """Lets what changed become quiet (stable), where the source waits."""

    # -- faults ----------------------------------------------------------------

    def break_read(self, pk: int, fault: str) -> None:
        raise NotImplementedError(fault)

    def heal(self) -> None:
        """Undoes break_read()."""

    def lose_history(self, how: str) -> None:
        raise NotImplementedError(how)

    def stall_feed(self, how: str) -> None:
        raise NotImplementedError(how)

    def feed_requests(self) -> int:
        """How many times the client asked the change feed."""
        raise NotImplementedError

    def say_gone_once(self, pk: int, how: str) -> None:
        raise NotImplementedError(how)

    def forget(self, pk: int, how: str) -> None:
        raise NotImplementedError(how)

    # -- what the client recorded ----------------------------------------------

    def queue(self) -> dict[int, dict[str, Any]]:
        """study_service's study rows, by pk."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Dcm4cheeUnderTest(SourceUnderTest):
    """dcm4chee 2.x on a real MariaDB or PostgreSQL: the database as the
    archive writes it (tests/conftest.py's PacsDb)."""

    HISTORY_LOSSES = ("cursor row deleted", "queue emptied")

    def __init__(self, directory: Path, service: CentralService, db: PacsDb) -> None:
        super().__init__(directory, service)
        self.db = db
        self.name = f"dcm4chee 2.x on {db.engine}"
        self.configs = write_configs(
            directory, db.name, service.url, stable_age_seconds=0, send_deletes=True
        )

    def add_studies(self, count: int) -> list[int]:
        pks = []
        for _ in range(count):
            pks.append(self.db.add_study(self.db.add_patient(), updated_time=self.db_time()))
        return pks

    def db_time(self) -> Any:
        return None  # the server's now, as dcm4chee stamps

    def add_late_studies(self, count: int) -> list[int]:
        hour_ago = self.db.query(f"SELECT {self.db.ago(3600)} AS t")[0]["t"]
        return [
            self.db.add_study(self.db.add_patient(), updated_time=hour_ago) for _ in range(count)
        ]

    def change(self, pk: int) -> None:
        self.db.store_series(pk)

    def delete(self, pk: int) -> None:
        self.db.execute("DELETE FROM study WHERE pk = %s", (pk,))

    def lose_history(self, how: str) -> None:
        if how == "cursor row deleted":
            self.db.execute("DELETE FROM study_service WHERE study_pk = 0")
        elif how == "queue emptied":
            self.db.execute("DELETE FROM study_service")
        else:
            raise NotImplementedError(how)

    def queue(self) -> dict[int, dict[str, Any]]:
        return self.db.queue()


class ArcLightUnderTest(Dcm4cheeUnderTest):
    """dcm4chee-arc-light 5 on a real MariaDB or PostgreSQL (ArcDb): its
    study_query_attrs computed, as the archive does when a study is queried."""

    def __init__(self, directory: Path, service: CentralService, db: ArcDb) -> None:
        super().__init__(directory, service, db)
        self.arc = db
        self.name = f"dcm4chee-arc-light 5 on {db.engine}"

    def add_studies(self, count: int) -> list[int]:
        pks = []
        for _ in range(count):
            pk = self.arc.add_study(self.arc.add_patient())
            self.arc.settle(pk)
            pks.append(pk)
        return pks

    def add_late_studies(self, count: int) -> list[int]:
        pks = []
        for _ in range(count):
            pk = self.arc.add_study(self.arc.add_patient(), stamped_seconds_ago=3600)
            self.arc.settle(pk)
            pks.append(pk)
        return pks

    def change(self, pk: int) -> None:
        self.arc.store_later(pk)
        self.arc.settle(pk, series=3, instances=150)

    def delete(self, pk: int) -> None:
        self.arc.delete_study(pk)


class OrthancUnderTest(SourceUnderTest):
    """A real Orthanc 1.10 (Debian's), read through its REST API; the queue
    in SQLite beside config.json. The client reads it through a proxy
    (dev/orthanc_proxy.py) that damages what a test tells it to."""

    name = "Orthanc"
    READ_FAULTS = (
        "truncated JSON",
        "Series not a list",
        "MainDicomTags missing",
        "HTTP 500",
        "a huge answer",
    )
    HISTORY_LOSSES = ("change log cleared",)
    FEED_STALLS = ("a cache repeating the first page",)
    SPURIOUS_GONE = ("one 404",)
    FORGOTTEN = ("its queue row deleted",)

    def __init__(self, directory: Path, service: CentralService, orthanc: OrthancServer) -> None:
        super().__init__(directory, service)
        self.orthanc = orthanc
        self.proxy = OrthancProxy(orthanc.url)
        self.studies: dict[int, str] = {}  # pk -> Orthanc ID
        self.patients = 0
        # The client reads Orthanc through the proxy: it has the same URL shape.
        self.configs = write_orthanc_configs(
            directory, self.proxy, service.url, stable_age_seconds=0, send_deletes=True
        )

    def add_studies(self, count: int) -> list[int]:
        added = []
        for _ in range(count):
            self.patients += 1
            study_uid, series_uid = new_uid(), new_uid()
            answer = self.orthanc.upload(
                dicom_instance(
                    f"{20000000 + self.patients}-K", "PEREZ^ANA", study_uid, series_uid, "CT"
                )
            )
            pk = orthanc_pk(answer["ParentStudy"])
            self.studies[pk] = answer["ParentStudy"]
            added.append(pk)
        self.settle()
        return sorted(added)  # the Orthanc source sends in pk order

    def change(self, pk: int) -> None:
        info = self.orthanc.get(f"/studies/{self.studies[pk]}")
        patient = info["PatientMainDicomTags"]["PatientID"]
        study_uid = info["MainDicomTags"]["StudyInstanceUID"]
        self.orthanc.upload(dicom_instance(patient, "PEREZ^ANA", study_uid, new_uid(), "MR"))
        self.settle()

    def delete(self, pk: int) -> None:
        self.orthanc.delete(f"/studies/{self.studies[pk]}")

    def settle(self) -> None:
        wait_until(
            lambda: all(
                self.orthanc.get(f"/studies/{ident}")["IsStable"] for ident in self._present()
            ),
            seconds=60,
        )

    def _present(self) -> list[str]:
        existing = set(self.orthanc.studies())
        return [ident for ident in self.studies.values() if ident in existing]

    def break_read(self, pk: int, fault: str) -> None:
        path = f"/studies/{self.studies[pk]}"
        faults = {
            "truncated JSON": Fault(path, truncate=True),
            "Series not a list": Fault(f"{path}/series", status=200, body=b'{"Series": 1}'),
            "MainDicomTags missing": Fault(path, drop=("MainDicomTags",)),
            "HTTP 500": Fault(path, status=500),
            # Past the client's bound on an Orthanc answer (ORTHANC_BODY_BYTES).
            "a huge answer": Fault(f"{path}/series", pad=ORTHANC_BODY_BYTES + 1),
        }
        self.proxy.faults.append(faults[fault])

    def heal(self) -> None:
        self.proxy.faults.clear()

    def stall_feed(self, how: str) -> None:
        self.proxy.repeat_changes = True

    def feed_requests(self) -> int:
        return self.proxy.count("/changes")

    def forget(self, pk: int, how: str) -> None:
        with sqlite3.connect(self.directory / QUEUE_FILE_NAME) as conn:
            conn.execute("DELETE FROM study_service WHERE study_pk = ?", (pk,))

    def say_gone_once(self, pk: int, how: str) -> None:
        self.proxy.faults.append(Fault(f"/studies/{self.studies[pk]}", status=404, times=1))

    def close(self) -> None:
        self.proxy.stop()

    def lose_history(self, how: str) -> None:
        if how == "change log cleared":
            self.orthanc.delete("/changes")
        else:
            raise NotImplementedError(how)

    def queue(self) -> dict[int, dict[str, Any]]:
        with sqlite3.connect(self.directory / QUEUE_FILE_NAME) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM study_service WHERE study_pk > 0").fetchall()
        return {row["study_pk"]: dict(row) for row in rows}


class DamagingQidoFront(HostileFront):
    """A front for Orthanc's QIDO-RS that damages one study's entry in every
    answer that lists it (a proxy, or a PACS, answering a value of the wrong
    kind), the rest of the answer intact."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.damage: dict[str, tuple[str, Any]] = {}  # StudyInstanceUID -> (tag, value)

    def _forward(self, handler: Any, body: bytes) -> tuple[int, bytes]:
        status, data = super()._forward(handler, body)
        if status != 200 or not self.damage or "/studies" not in handler.path:
            return status, data
        entries = json.loads(data)
        for entry in entries:
            uid = (entry.get("0020000D", {}).get("Value") or [None])[0]
            if uid in self.damage:
                tag, value = self.damage[uid]
                entry[tag] = {"vr": "PN" if tag == "00100010" else "IS", "Value": [value]}
        return status, json.dumps(entries).encode()


class HarvestUnderTest(SourceUnderTest):
    """A real Orthanc 1.10 with its DICOMweb plugin and its DICOM port, read
    by queries (sources/harvest.py) through one protocol: QIDO-RS
    ("dicomweb") or C-FIND ("dimse"). Its studies are dated today, so that a
    tick's first window sees their changes, as it does a PACS's day."""

    HISTORY_LOSSES = ("queue file deleted",)
    FORGOTTEN = ("its queue row deleted",)
    INDEXER_AE = "DICOM_INDEXER"

    def __init__(
        self,
        directory: Path,
        service: CentralService,
        protocol: str,
        orthanc_settings: dict[str, Any] | None = None,
        section_extra: dict[str, Any] | None = None,
        **config_extra: Any,
    ) -> None:
        super().__init__(directory, service)
        self.protocol = protocol
        self.name = f"Orthanc through {protocol}"
        self.dicom_port = free_port()
        self.orthanc = OrthancServer(
            directory / "orthanc",
            stable_age_seconds=1,
            **dicomweb_orthanc_settings(
                DicomServerEnabled=True,
                DicomPort=self.dicom_port,
                DicomAet="ORTHANC",
                DicomCheckCalledAet=True,
                DicomAlwaysAllowFind=False,
                DicomModalities={"indexer": [self.INDEXER_AE, "127.0.0.1", free_port()]},
                **(orthanc_settings or {}),
            ),
        )
        self.studies: dict[int, str] = {}  # pk -> Orthanc ID
        self.uids: dict[int, str] = {}  # pk -> StudyInstanceUID
        self.patients = 0
        self.front: DamagingQidoFront | None = None
        if protocol == "dicomweb":
            self.front = DamagingQidoFront(self.orthanc.url)
            section = {
                "dicomweb": {
                    "url": self.front.url + "/dicom-web",
                    "user": OrthancServer.USER,
                    "password": OrthancServer.PASSWORD,
                }
            }
        else:
            section = {
                "dimse": {
                    "host": "127.0.0.1",
                    "port": self.dicom_port,
                    "pacs_ae": "ORTHANC",
                    "indexer_ae": self.INDEXER_AE,
                }
            }
        for fields in section.values():
            fields.update(section_extra or {})
        config = {
            **section,
            "key": API_KEY,
            "webservice_url": service.url,
            "backoff_seconds": 0.01,
            "stable_age_seconds": 0,
            "send_deletes": True,
            **config_extra,
        }
        for name, data in (("config.json", config), ("server.json", {"server": CENTER})):
            (directory / name).write_text(json.dumps(data))
            (directory / name).chmod(0o600)
        self.configs = [
            "--config", str(directory / "config.json"), "--server", str(directory / "server.json")
        ]  # fmt: skip

    def set_section(self, **fields: Any) -> None:
        """Changes fields of config.json's source section."""
        path = self.directory / "config.json"
        config = json.loads(path.read_text())
        config[self.protocol].update(fields)
        path.write_text(json.dumps(config))

    def _store(
        self, study_uid: str, modality: str, study_date: str | None, patient_id: str = ""
    ) -> str:
        kwargs = {"absent": ("StudyDate", "StudyTime")} if study_date is None else {}
        answer = self.orthanc.upload(
            dicom_instance_with(
                patient_name="SOTO^ANA",
                # RUT-like, and first digits spread as a real archive's are
                # (a PatientID prefix split divides them).
                patient_id=patient_id or f"{self.patients % 10}{3000000 + self.patients}-K",
                study_uid=study_uid,
                series_uid=new_uid(),
                modality=modality,
                study_date=study_date or "20000101",
                **kwargs,
            )
        )
        return str(answer["ParentStudy"])

    def add_studies(
        self, count: int, days_ago: int = 0, study_date: str | None = "", patient_id: str = ""
    ) -> list[int]:
        """`count` new studies, dated `days_ago` days ago, or `study_date`
        (None: undated); their pks, in the order the harvest sends them."""
        if study_date == "":
            today = datetime.date.today()
            study_date = (today - datetime.timedelta(days=days_ago)).strftime("%Y%m%d")
        added = []
        for _ in range(count):
            self.patients += 1
            uid = new_uid()
            pk = uid_pk(uid)
            self.studies[pk] = self._store(uid, "CT", study_date, patient_id)
            self.uids[pk] = uid
            added.append(pk)
        return sorted(added)  # the harvest sends in pk order

    def add_late_studies(self, count: int) -> list[int]:
        return self.add_studies(count, days_ago=400)  # beyond every tick window

    def change(self, pk: int) -> None:
        info = self.orthanc.get(f"/studies/{self.studies[pk]}")
        patient = info["PatientMainDicomTags"]["PatientID"]
        self._store(self.uids[pk], "MR", info["MainDicomTags"].get("StudyDate"), patient)

    def delete(self, pk: int) -> None:
        self.orthanc.delete(f"/studies/{self.studies[pk]}")

    def break_read(self, pk: int, fault: str) -> None:
        assert self.front is not None
        self.front.damage[self.uids[pk]] = {
            "PatientName not a person name": ("00100010", 12345),
            "a count not a number": ("00201208", "many"),
        }[fault]

    def heal(self) -> None:
        if self.front is not None:
            self.front.damage.clear()

    def lose_history(self, how: str) -> None:
        if how != "queue file deleted":
            raise NotImplementedError(how)
        (self.directory / QUEUE_FILE_NAME).unlink()

    def forget(self, pk: int, how: str) -> None:
        with sqlite3.connect(self.directory / QUEUE_FILE_NAME) as conn:
            conn.execute("DELETE FROM study_service WHERE study_pk = ?", (pk,))

    def queue(self) -> dict[int, dict[str, Any]]:
        with sqlite3.connect(self.directory / QUEUE_FILE_NAME) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM study_service WHERE study_pk > 0").fetchall()
        return {row["study_pk"]: dict(row) for row in rows}

    def close(self) -> None:
        if self.front is not None:
            self.front.stop()
        self.orthanc.stop(kill=True)


class DicomwebUnderTest(HarvestUnderTest):
    """The harvest through QIDO-RS, read through a front that can damage one
    study's entry in the answers."""

    READ_FAULTS = ("PatientName not a person name", "a count not a number")

    def __init__(self, directory: Path, service: CentralService) -> None:
        super().__init__(directory, service, "dicomweb")


class AzureFeedUnderTest(HarvestUnderTest):
    """The harvest through QIDO-RS with Azure's change feed read instead of
    windows ("change_feed": "azure"): a stand-in for Azure's service
    (dev/azure_feed_stub.py) serving its documented feed, in front of a real
    Orthanc's QIDO-RS. Each store and deletion is written to the feed, as
    Azure does (one entry per instance)."""

    HISTORY_LOSSES = ("queue file deleted", "feed reset")
    FEED_STALLS = ("a page repeated whatever the offset",)

    def __init__(self, directory: Path, service: CentralService) -> None:
        super().__init__(directory, service, "dicomweb", section_extra={"change_feed": "azure"})
        self.name = "Orthanc through DICOMweb, with Azure's change feed"
        self.feed = AzureFeedStub(self.orthanc.url)
        self.set_section(url=self.feed.root)

    def add_studies(
        self, count: int, days_ago: int = 0, study_date: str | None = "", patient_id: str = ""
    ) -> list[int]:
        pks = super().add_studies(count, days_ago, study_date, patient_id)
        for pk in pks:
            self.feed.create(self.uids[pk], sop=new_uid())
        return pks

    def change(self, pk: int) -> None:
        super().change(pk)
        self.feed.create(self.uids[pk], sop=new_uid())

    def delete(self, pk: int) -> None:
        super().delete(pk)
        self.feed.delete(self.uids[pk], sop=new_uid())

    def lose_history(self, how: str) -> None:
        if how == "feed reset":
            self.feed.reset()
        else:
            super().lose_history(how)

    def stall_feed(self, how: str) -> None:
        self.feed.repeat_from = 0

    def feed_requests(self) -> int:
        return self.feed.count("/changefeed")

    def close(self) -> None:
        self.feed.stop()
        super().close()
