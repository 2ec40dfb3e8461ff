"""Orthanc as a source, against real Orthanc servers (Debian's package): each
test starts its own on a free loopback port, with a throwaway storage, and
feeds it DICOM files made here (pydicom) through POST /instances."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import API_KEY, CENTER, ROOT, client_process, wait_until, write_orthanc_configs
from testkit import ORTHANC_BINARY, CentralService, OrthancServer, dicom_instance, new_uid

from dicom_indexer.cli import main
from dicom_indexer.config import load_settings
from dicom_indexer.document import DOCUMENT_KEYS
from dicom_indexer.errors import EXIT_DATABASE, EXIT_LOCKED, EXIT_REJECTED
from dicom_indexer.sources import open_pacs
from dicom_indexer.sources.orthanc import OrthancClient, orthanc_pk
from dicom_indexer.study_service import CURSOR_ROW_PK, QUEUE_FILE_NAME

pytestmark = pytest.mark.skipif(
    not os.path.exists(ORTHANC_BINARY),
    reason="needs Debian's orthanc package (.ci/run installs it)",
)


@pytest.fixture
def args(tmp_path, orthanc, service):
    return write_orthanc_configs(tmp_path, orthanc, service.url)


def upload_study(
    orthanc, patient_id="12345678-5", name="MUÑOZ^JOSÉ^^", series=(("CT", 2),), **tags
):
    """A study of `series` (modality, images); its Orthanc ID."""
    study_uid = new_uid()
    study = None
    for modality, images in series:
        series_uid = new_uid()
        for _ in range(images):
            answer = orthanc.upload(
                dicom_instance(patient_id, name, study_uid, series_uid, modality, **tags)
            )
            study = answer["ParentStudy"]
    return study


def wait_stable(orthanc, study):
    wait_until(lambda: orthanc.get(f"/studies/{study}")["IsStable"], seconds=30)


def posts_of(service, study):
    pk = orthanc_pk(study)
    return [r.json for r in service.received if r.method == "POST" and r.json["study_pk"] == pk]


def test_a_new_study_is_sent_once_stable_with_the_contracts_keys(orthanc, service, args):
    assert main(args) == 0  # the queue is made; the archive is `initial`'s
    study = upload_study(
        orthanc, series=(("CT", 2), ("SR", 1)), study_time="094210.123", study_description="TC"
    )
    assert main(args) == 0
    assert service.received == []  # not stable yet: held
    wait_stable(orthanc, study)
    assert main(args) == 0
    [document] = posts_of(service, study)
    info = orthanc.get(f"/studies/{study}")
    assert document == {
        "patient_pk": orthanc_pk(info["ParentPatient"]),
        "patient_id": "12345678-5",
        "patient_name": "MUÑOZ^JOSÉ",
        "study_pk": orthanc_pk(study),
        "study_iuid": info["MainDicomTags"]["StudyInstanceUID"],
        "study_datetime": "2024-05-17 09:42:10",
        "study_description": "TC",
        "study_modality": "CT\\SR",
        "study_series": 2,
        "study_instances": 3,
        "center": CENTER,
    }
    assert list(document) == list(DOCUMENT_KEYS)
    assert 0 < document["study_pk"] < 2**53
    assert main(args) == 0  # nothing new: nothing sent
    assert len(service.received) == 1


def test_pks_are_the_ids_first_52_bits_the_same_everywhere():
    ident = "7c672414-779e93fe-36bc82ae-e549c2a8-f99c8b99"
    assert orthanc_pk(ident) == 0x7C672414779E9
    assert orthanc_pk(ident) < 2**53


def test_initial_sends_the_archive_resumably_once(orthanc, service, args):
    studies = [upload_study(orthanc, patient_id=f"P{i}") for i in range(25)]
    for study in studies:
        wait_stable(orthanc, study)
    assert main(["initial", "--limit", "10", *args]) == 0
    assert len(service.received) == 10
    assert main(args) == 0  # a tick carries the initial load on
    assert sorted(r.json["study_pk"] for r in service.received) == sorted(
        orthanc_pk(s) for s in studies
    )


def test_more_images_send_the_study_again_with_its_new_counts(orthanc, service, args):
    assert main(args) == 0
    study_uid = new_uid()
    study = orthanc.upload(dicom_instance(study_uid=study_uid))["ParentStudy"]
    wait_stable(orthanc, study)
    assert main(args) == 0
    orthanc.upload(dicom_instance(study_uid=study_uid, modality="MR"))
    wait_stable(orthanc, study)
    assert main(args) == 0
    first, second = posts_of(service, study)
    assert (first["study_instances"], first["study_modality"]) == (1, "CT")
    assert (second["study_instances"], second["study_modality"]) == (2, "CT\\MR")


def test_a_patient_modified_sends_the_new_study_and_deletes_the_old_one(orthanc, service, tmp_path):
    args = write_orthanc_configs(tmp_path, orthanc, service.url, send_deletes=True)
    assert main(args) == 0
    old = upload_study(orthanc, patient_id="11111111-1", name="PEREZ^JUAN")
    wait_stable(orthanc, old)
    assert main(args) == 0
    patient = orthanc.get(f"/studies/{old}")["ParentPatient"]
    orthanc.post(
        f"/patients/{patient}/modify",
        {
            "Replace": {"PatientID": "22222222-2", "PatientName": "PEREZ^JUANA"},
            "Force": True,
            "KeepSource": False,
        },
    )
    [new] = orthanc.studies()
    wait_stable(orthanc, new)
    assert main(args) == 0
    [document] = posts_of(service, new)
    assert (document["patient_id"], document["patient_name"]) == ("22222222-2", "PEREZ^JUANA")
    # Orthanc logs no deletion: reconcile finds the old study gone.
    assert [r for r in service.received if r.method == "DELETE"] == []
    assert main(["reconcile", *args]) == 0
    assert main(args) == 0
    [delete] = [r.json for r in service.received if r.method == "DELETE"]
    assert delete["study_pk"] == orthanc_pk(old)


def test_a_deleted_study_gets_its_delete_after_reconcile(orthanc, service, tmp_path):
    args = write_orthanc_configs(tmp_path, orthanc, service.url, send_deletes=True)
    assert main(args) == 0
    kept, deleted = upload_study(orthanc, "1-1"), upload_study(orthanc, "2-2")
    wait_stable(orthanc, kept)
    wait_stable(orthanc, deleted)
    assert main(args) == 0
    orthanc.delete(f"/studies/{deleted}")
    assert main(args) == 0
    assert [r for r in service.received if r.method == "DELETE"] == []
    assert main(["reconcile", *args]) == 0
    assert main(args) == 0
    [delete] = [r.json for r in service.received if r.method == "DELETE"]
    assert delete["study_pk"] == orthanc_pk(deleted)


def test_an_orthanc_restart_mid_study_still_sends_it_once_stable(tmp_path, service):
    orthanc = OrthancServer(tmp_path / "orthanc", stable_age_seconds=30)
    try:
        args = write_orthanc_configs(tmp_path, orthanc, service.url)
        assert main(args) == 0
        study = upload_study(orthanc)
        assert main(args) == 0
        assert service.received == []  # not stable: held
        # Killed before it called the study stable: it never logs StableStudy.
        orthanc.restart(kill=True)
        assert orthanc.get(f"/studies/{study}")["IsStable"]
        assert main(args) == 0
        assert len(posts_of(service, study)) == 1
    finally:
        orthanc.stop(kill=True)


def test_a_lost_change_log_resynchronises_with_one_warning(orthanc, service, args, capsys):
    assert main(args) == 0
    sent = upload_study(orthanc, "1-1")
    wait_stable(orthanc, sent)
    assert main(args) == 0
    missed = upload_study(orthanc, "2-2")
    wait_stable(orthanc, missed)
    orthanc.delete("/changes")  # the log cleared before the tick read it
    later = upload_study(orthanc, "3-3")
    wait_stable(orthanc, later)
    capsys.readouterr()
    assert main(args) == 0
    [warning] = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert "change log no longer goes back to where this indexer left it" in warning
    # The missed study is found; the one already sent is not sent again.
    assert [len(posts_of(service, s)) for s in (sent, missed, later)] == [1, 1, 1]


def test_a_queue_cursor_ahead_of_orthancs_log_resynchronises(orthanc, service, args, capsys):
    assert main(args) == 0
    study = upload_study(orthanc)
    wait_stable(orthanc, study)
    assert main(args) == 0
    settings = load_settings(
        *(Path(a) for a in (args[1], args[3]))  # config.json, server.json
    )
    pacs = open_pacs(settings)
    try:
        pacs.db.query(pacs.queue.sql.SET_CURSOR, (10**6, CURSOR_ROW_PK))
    finally:
        pacs.close()
    assert main(args) == 0  # Orthanc's database replaced by an older one
    assert "change log no longer goes back" in capsys.readouterr().err
    assert len(posts_of(service, study)) == 1  # unchanged: not sent again


def test_an_idle_tick_reads_only_the_change_log(orthanc, service, args, monkeypatch):
    assert main(args) == 0
    for i in range(5):
        wait_stable(orthanc, upload_study(orthanc, f"{i}-{i}"))
    assert main(args) == 0
    gets = []
    real = OrthancClient.get

    def spy(self, path, missing_ok=False):
        gets.append(path)
        return real(self, path, missing_ok)

    monkeypatch.setattr(OrthancClient, "get", spy)
    assert main(args) == 0
    assert gets == ["/system", gets[1]] and gets[1].startswith("/changes?since=")


def test_wrong_credentials_are_one_line_exit_4(orthanc, service, tmp_path, capsys):
    args = write_orthanc_configs(tmp_path, orthanc, service.url)
    config = json.loads((tmp_path / "config.json").read_text())
    config["orthanc"]["password"] = "wrong-password-here"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(args) == EXIT_DATABASE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        f"Orthanc at {orthanc.url} refused the credentials (HTTP 401): check orthanc.user and"
        " orthanc.password in config.json"
    )
    assert "wrong-password-here" not in line


def test_check_names_the_source_its_version_and_the_queue(orthanc, service, args, tmp_path, capsys):
    assert main(["check", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == (
        f"ok      source: Orthanc at {orthanc.url}, Orthanc 1.10.1, credentials of indexer accepted"
    )
    assert out[2].startswith(f"ok      queue: {tmp_path / QUEUE_FILE_NAME} (SQLite 3.")
    assert out[2].endswith("), current")
    assert out[3].startswith("ok      Orthanc's change log: each tick reads only the changes after")


def test_an_orthanc_older_than_1_10_is_refused_in_one_line(service, tmp_path, capsys):
    old = CentralService()  # answers what Orthanc 1.9 answers to /system
    old.respond = lambda n, r: (200, json.dumps({"Version": "1.9.7", "ApiVersion": 12}))
    try:
        config = {
            "orthanc": {"url": old.url.rsplit("/api/", 1)[0]},
            "key": API_KEY,
            "webservice_url": service.url,
        }
        (tmp_path / "config.json").write_text(json.dumps(config))
        (tmp_path / "server.json").write_text(json.dumps({"server": CENTER}))
        (tmp_path / "config.json").chmod(0o600)
        args = [
            "--config",
            str(tmp_path / "config.json"),
            "--server",
            str(tmp_path / "server.json"),
        ]
        assert main(args) == EXIT_DATABASE
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.endswith(
            "is version 1.9.7: this client reads Orthanc 1.10 and later; upgrade Orthanc"
        )
    finally:
        old.stop()


def test_the_queue_is_beside_config_json_readable_by_its_owner_only(
    orthanc, service, args, tmp_path
):
    assert main(args) == 0
    queue = tmp_path / QUEUE_FILE_NAME
    assert stat.S_IMODE(queue.stat().st_mode) == 0o600
    assert main(["status", *args]) == 0


def test_one_run_at_a_time_per_queue(orthanc, service, args, tmp_path):
    assert main(args) == 0
    for study in [upload_study(orthanc, f"{i}-{i}") for i in range(30)]:
        wait_stable(orthanc, study)
    service.delay_seconds = 0.2
    first = client_process(["initial", *args])
    wait_until(lambda: service.attempts, seconds=60)
    second = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), *args], capture_output=True, text=True
    )
    assert second.returncode == EXIT_LOCKED
    service.delay_seconds = 0
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert len(service.received) == 30


def test_status_and_retry_failed_work_on_the_sqlite_queue(orthanc, service, args, capsys):
    assert main(args) == 0
    bad, good = upload_study(orthanc, "1-1"), upload_study(orthanc, "2-2")
    for study in (bad, good):
        wait_stable(orthanc, study)
    bad_pk = orthanc_pk(bad)
    service.respond = lambda n, r: (422, "no") if r.json["study_pk"] == bad_pk else (201, "{}")
    assert main(args) == EXIT_REJECTED
    capsys.readouterr()
    assert main(["status", *args]) == 0
    out = capsys.readouterr().out
    assert (
        "failed            1" in out and f"study {bad_pk} (failed, 1 attempts): HTTP 422: no" in out
    )
    service.respond = lambda n, r: (201, "{}")
    assert main(["retry-failed", *args]) == 0
    assert len(posts_of(service, bad)) == 1


def test_client_kill_9_mid_run_loses_nothing(orthanc, service, args):
    assert main(args) == 0
    studies = [upload_study(orthanc, f"{i}-{i}") for i in range(40)]
    for study in studies:
        wait_stable(orthanc, study)
    service.delay_seconds = 0.05
    process = client_process(["initial", *args])
    wait_until(lambda: len(service.received) >= 5, seconds=60)
    process.kill()
    process.wait()
    service.delay_seconds = 0
    assert main(args) == 0
    assert {r.json["study_pk"] for r in service.received} == {orthanc_pk(s) for s in studies}
