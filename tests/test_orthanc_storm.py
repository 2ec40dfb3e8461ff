"""A storm on an Orthanc: studies uploaded, grown, modified (new IDs) and
deleted while the client ticks as cron would, is killed (kill -9) mid-run,
and Orthanc restarts (stopped, or killed before it called a study stable).
When it ends, one reconcile and one retry-failed leave the central index
equal to Orthanc, study by study: the documents are rebuilt here from
Orthanc's REST answers, independently of the client's mapping."""

from __future__ import annotations

import datetime
import json
import os
import random
import time

import pytest
from conftest import API_KEY, CENTER, client_process
from testkit import ORTHANC_BINARY, CentralService, OrthancServer, dicom_instance, new_uid

import dicom_indexer.sources.orthanc
from dicom_indexer.cli import main

STORM_SECONDS = 40
SEED = 20261202

pytestmark = pytest.mark.skipif(
    not os.path.exists(ORTHANC_BINARY),
    reason="needs Debian's orthanc package (.ci/run installs it)",
)


class Index:
    """The central service: the last document accepted per study."""

    def __init__(self) -> None:
        self.documents: dict[int, dict] = {}
        self.posts = 0
        self.deletes = 0
        self.service = CentralService(keep=False)
        self.service.respond = self.respond

    def respond(self, number, request):
        document = json.loads(request.body)
        if request.method == "POST":
            self.documents[document["study_pk"]] = document
            self.posts += 1
        elif request.method == "DELETE":
            self.documents.pop(document["study_pk"], None)
            self.deletes += 1
        return 201, "{}"


def _pk(orthanc_id: str) -> int:
    # The README's rule, restated: the first 13 hex digits of the ID.
    return int(orthanc_id.replace("-", "")[:13], 16)


def expected_document(orthanc: OrthancServer, ident: str) -> dict:
    study = orthanc.get(f"/studies/{ident}")
    series = orthanc.get(f"/studies/{ident}/series")
    tags, patient = study["MainDicomTags"], study["PatientMainDicomTags"]
    date, clock = tags.get("StudyDate"), tags.get("StudyTime", "")
    when = None
    if date:
        digits = (clock.split(".")[0] + "000000")[:6]
        when = datetime.datetime.strptime(date + digits, "%Y%m%d%H%M%S")
    modalities = sorted({s["MainDicomTags"]["Modality"] for s in series})
    return {
        "patient_pk": _pk(study["ParentPatient"]),
        "patient_id": patient["PatientID"],
        "patient_name": patient["PatientName"].rstrip("^") or None,
        "study_pk": _pk(ident),
        "study_iuid": tags["StudyInstanceUID"],
        "study_datetime": when.strftime("%Y-%m-%d %H:%M:%S") if when else None,
        "study_description": tags.get("StudyDescription") or None,
        "study_modality": "\\".join(modalities),
        "study_series": len(series),
        "study_instances": sum(len(s["Instances"]) for s in series),
        "center": CENTER,
    }


class OrthancStorm:
    def __init__(self, directory, rng: random.Random) -> None:
        self.rng = rng
        self.orthanc = OrthancServer(directory / "orthanc", stable_age_seconds=1)
        self.index = Index()
        self.counts: dict[str, int] = {}
        self.studies: dict[str, tuple[str, str]] = {}  # StudyInstanceUID -> (PatientID, name)
        config = {
            "orthanc": {
                "url": self.orthanc.url,
                "user": OrthancServer.USER,
                "password": OrthancServer.PASSWORD,
            },
            "key": API_KEY,
            "webservice_url": self.index.service.url,
            "send_deletes": True,
            "backoff_seconds": 0.05,
            "connect_timeout_seconds": 1,
            "read_timeout_seconds": 2,
            "max_retries": 1,
            "nice": 0,
        }
        (directory / "config.json").write_text(json.dumps(config))
        (directory / "server.json").write_text(json.dumps({"server": CENTER}))
        for name in ("config.json", "server.json"):
            (directory / name).chmod(0o600)
        self.args = [
            "--config", str(directory / "config.json"), "--server", str(directory / "server.json")
        ]  # fmt: skip

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def upload(self, study_uid: str, patient: tuple[str, str], images: int) -> None:
        series_uid, modality = new_uid(), self.rng.choice(["CT", "MR", "SR", "US"])
        for _ in range(images):
            self.orthanc.upload(
                dicom_instance(*patient, study_uid, series_uid, modality,
                               study_description=self.rng.choice(["TC", "RM", None]))
            )  # fmt: skip

    def act(self) -> None:
        action = self.rng.choices(
            ["store", "grow", "modify", "delete", "restart", "kill"], [6, 4, 1, 1, 0.4, 0.3]
        )[0]
        ids = self.orthanc.studies()
        if action == "store" or not ids:
            patient = (
                f"{self.rng.randrange(10**7, 10**8)}-{self.rng.randrange(10)}",
                "PEREZ^ANA^^",
            )
            self.upload(new_uid(), patient, self.rng.randint(1, 3))
            self.count("studies stored")
        elif action == "grow":
            study = self.orthanc.get(f"/studies/{self.rng.choice(ids)}")
            patient = study["PatientMainDicomTags"]
            self.upload(
                study["MainDicomTags"]["StudyInstanceUID"],
                (patient["PatientID"], patient["PatientName"]),
                self.rng.randint(1, 2),
            )
            self.count("series added")
        elif action == "modify":
            patient = self.orthanc.get(f"/studies/{self.rng.choice(ids)}")["ParentPatient"]
            self.orthanc.post(
                f"/patients/{patient}/modify",
                {
                    "Replace": {"PatientID": f"M{self.rng.randrange(10**6)}", "PatientName": "X^Y"},
                    "Force": True,
                    "KeepSource": False,
                },
            )
            self.count("patients modified")
        elif action == "delete":
            self.orthanc.delete(f"/studies/{self.rng.choice(ids)}")
            self.count("studies deleted")
        else:
            # Stopped (SIGTERM), or killed before it could call a study stable.
            self.orthanc.restart(kill=action == "kill")
            self.count(f"orthanc {'killed' if action == 'kill' else 'restarted'}")

    def run(self, seconds: float) -> list[int]:
        codes = []
        tick = None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.act()
            if tick is None or tick.poll() is not None:
                if tick is not None:
                    codes.append(tick.returncode)
                tick = client_process(self.args, "initial" if not codes else "-q")
                if self.rng.random() < 0.2:
                    time.sleep(self.rng.uniform(0.05, 0.3))
                    tick.kill()  # kill -9 mid-run
                    tick.wait()
                    codes.append(-9)
                    tick = None
                    self.count("client killed")
            time.sleep(self.rng.uniform(0, 0.2))
        if tick is not None:
            tick.wait()
            codes.append(tick.returncode)
        return codes

    def converge(self) -> list[int]:
        """The storm is over: every study becomes stable, then the nightly
        reconcile and, as an administrator would after an outage,
        retry-failed (which also sends the studies waiting after a failure)."""
        for ident in self.orthanc.studies():
            deadline = time.monotonic() + 30
            while not self.orthanc.get(f"/studies/{ident}")["IsStable"]:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        time.sleep(1.5)  # past the quiet time of a study Orthanc restarted on
        return [main([command, *self.args]) for command in ("reconcile", "retry-failed")]

    def differences(self) -> list[str]:
        expected = {
            _pk(ident): expected_document(self.orthanc, ident) for ident in self.orthanc.studies()
        }
        found = []
        for pk, document in expected.items():
            if self.index.documents.get(pk) != document:
                found.append(f"study {pk}: index {self.index.documents.get(pk)} != {document}")
        for pk in set(self.index.documents) - set(expected):
            found.append(f"study {pk}: gone from Orthanc, still in the index")
        return found

    def close(self) -> None:
        self.orthanc.stop(kill=True)
        self.index.service.stop()


def test_orthanc_storm_ends_with_the_index_equal_to_orthanc(tmp_path, capsys, monkeypatch):
    # Orthanc's quiet time for studies it forgot about, shortened as StableAge is.
    monkeypatch.setattr(dicom_indexer.sources.orthanc, "ORTHANC_QUIET_SECONDS", 1)
    storm = OrthancStorm(tmp_path, random.Random(SEED))
    try:
        codes = storm.run(STORM_SECONDS)
        final = storm.converge()
        differences = storm.differences()
        with capsys.disabled():
            print(
                f"\northanc storm: {STORM_SECONDS} s, {storm.counts}, ticks {sorted(codes)},"
                f" {len(storm.orthanc.studies())} studies in Orthanc, {storm.index.posts} posts,"
                f" {storm.index.deletes} deletes, differences {len(differences)}"
            )
        assert differences == [], differences[:3]
        assert final == [0, 0]
        assert set(codes) <= {0, 4, 5, 8, -9}, codes
        for kind in ("studies stored", "series added", "client killed"):
            assert storm.counts.get(kind, 0) > 0, kind
    finally:
        storm.close()
