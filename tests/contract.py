"""The sources under the source contract (tests/test_source_contract.py).

Each class here drives one kind of PACS the way its real counterpart
behaves, through one interface: add, change and delete studies, break one
study's read, lose the change history, and read the queue back. The
contract's tests speak only this interface, so that every source (and the
next one) is held to the same promises, as fsspec's abstract tests are run
by each filesystem.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from conftest import ArcDb, PacsDb, wait_until, write_configs, write_orthanc_configs
from orthanc_proxy import Fault, OrthancProxy
from testkit import CentralService, OrthancServer, dicom_instance, new_uid

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
