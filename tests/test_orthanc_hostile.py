"""The Orthanc source against a misbehaving Orthanc: a real Orthanc behind a
proxy (dev/orthanc_proxy.py) that damages the answers the test names, or an
Orthanc whose change log was cleared or whose database was restored from an
older backup. One test per way it misbehaves; each asserts what a user
notices: the exit code, the line, what the central service received, the
queue's rows and `status`."""

from __future__ import annotations

import os
import shutil
import sqlite3
import types

import pytest
from conftest import write_orthanc_configs
from orthanc_proxy import Fault, OrthancProxy
from test_orthanc import posts_of, upload_study, wait_stable
from testkit import ORTHANC_BINARY, dicom_instance

from dicom_indexer.cli import main
from dicom_indexer.errors import EXIT_DATABASE, EXIT_DELIVERY, EXIT_OK
from dicom_indexer.sources.orthanc import orthanc_pk
from dicom_indexer.study_service import CURSOR_ROW_PK, QUEUE_FILE_NAME

pytestmark = pytest.mark.skipif(
    not os.path.exists(ORTHANC_BINARY),
    reason="needs Debian's orthanc package (.ci/run installs it)",
)


@pytest.fixture
def proxy(orthanc):
    server = OrthancProxy(orthanc.url)
    yield server
    server.stop()


@pytest.fixture
def args(tmp_path, proxy, service):
    """The client reads Orthanc through the proxy."""
    return write_orthanc_configs(tmp_path, types.SimpleNamespace(url=proxy.url), service.url)


def queue_rows(tmp_path):
    with sqlite3.connect(str(tmp_path / QUEUE_FILE_NAME)) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM study_service").fetchall()
    return {row["study_pk"]: dict(row) for row in rows}


def stable_studies(orthanc, count, first=0):
    studies = [upload_study(orthanc, f"{i}-{i}") for i in range(first, first + count)]
    for study in studies:
        wait_stable(orthanc, study)
    return studies


def error_lines(text):
    return [line for line in text.splitlines() if " ERROR " in line or " WARNING " in line]


def bad_answers(ident):
    """What a damaged Orthanc answers for one study: the faults, and what
    the study's last_error then says."""
    study, series = f"/studies/{ident}", f"/studies/{ident}/series"
    return {
        "truncated JSON": ([Fault(study, truncate=True)], f"answered GET {study} with no JSON"),
        "Series not a list": (
            [Fault(study, replace={"Series": "x"}), Fault(series, status=200, body=b'{"a": 1}')],
            f"answer to GET {series} is not a list of series",
        ),
        "MainDicomTags missing": (
            [Fault(study, drop=("MainDicomTags",))],
            f"answer to GET {study} has no MainDicomTags",
        ),
        "StudyInstanceUID missing": (
            [Fault(study, replace={"MainDicomTags": {"StudyDate": "20240517"}})],
            f"answer to GET {study} has no StudyInstanceUID",
        ),
        "HTTP 500": ([Fault(study, status=500)], f"answered HTTP 500 to GET {study}"),
        "series HTTP 404": (
            [Fault(series, status=404)],
            f"answered HTTP 404 to GET {series} but has the study",
        ),
    }


@pytest.mark.parametrize(
    "fault",
    [
        "truncated JSON",
        "Series not a list",
        "MainDicomTags missing",
        "StudyInstanceUID missing",
        "HTTP 500",
        "series HTTP 404",
    ],
)
def test_a_study_orthanc_answers_wrongly_is_that_studys_alone(
    fault, orthanc, proxy, service, args, tmp_path, capsys
):
    assert main(args) == EXIT_OK  # the queue is made
    studies = stable_studies(orthanc, 5)
    bad = min(studies, key=orthanc_pk)  # the lowest pk: read first
    faults, error = bad_answers(bad)[fault]
    proxy.faults.extend(faults)
    capsys.readouterr()
    assert main(args) == EXIT_DELIVERY
    [line, summary] = error_lines(capsys.readouterr().err)
    assert "1 studies could not be delivered and stay pending; last error: " in line
    assert error in line
    assert "sent 4," in summary and "still pending 1" in summary
    # The others are delivered; the bad one is never posted (no document
    # from a partial read, none without its StudyInstanceUID).
    assert sorted(service.study_pks()) == sorted(orthanc_pk(s) for s in studies if s != bad)
    row = queue_rows(tmp_path)[orthanc_pk(bad)]
    assert (row["status"], row["attempts"], row["sent_version"]) == ("pending", 1, None)
    assert error in row["last_error"] and row["next_attempt_at"] is not None
    # A tick before its next attempt is due leaves it be.
    assert main(args) == EXIT_OK
    assert len(service.received) == 4
    # Its attempt due, still damaged: `status` reads it, and shows it.
    with sqlite3.connect(str(tmp_path / QUEUE_FILE_NAME)) as db:
        db.execute("UPDATE study_service SET next_attempt_at = NULL WHERE study_pk > 0")
    capsys.readouterr()
    assert main(["status", *args]) == EXIT_OK
    out = capsys.readouterr().out
    assert "pending           1" in out
    assert "held              1  could not be read from the PACS: the next run records why" in out
    assert f"study {orthanc_pk(bad)} (pending, 1 attempts): " in out and error in out
    # Orthanc mended: the next attempt delivers it, once.
    proxy.faults.clear()
    assert main(args) == EXIT_OK
    [document] = posts_of(service, bad)
    assert (
        document["study_iuid"]
        == orthanc.get(f"/studies/{bad}")["MainDicomTags"]["StudyInstanceUID"]
    )
    assert len(service.received) == 5


def test_orthanc_down_while_reading_a_study_stops_the_run_and_blames_no_study(
    orthanc, proxy, service, args, tmp_path, capsys
):
    """Every study's trouble is not one study's: no study gets a backoff."""
    assert main(args) == EXIT_OK
    studies = stable_studies(orthanc, 2)
    for study in studies:
        proxy.faults.append(Fault(f"/studies/{study}", status=500))
    proxy.faults.append(_SystemFailsAfterFirst())
    capsys.readouterr()
    assert main(args) == EXIT_DATABASE
    [line] = error_lines(capsys.readouterr().err)
    assert "answered HTTP 503 to GET /system" in line
    assert service.received == []
    rows = queue_rows(tmp_path)
    assert [(rows[orthanc_pk(s)]["status"], rows[orthanc_pk(s)]["attempts"]) for s in studies] == [
        ("pending", 0),
        ("pending", 0),
    ]


class _SystemFailsAfterFirst(Fault):
    """/system answers once (the version at the start), then 503."""

    def __init__(self) -> None:
        super().__init__("/system", status=503)
        self.seen = 0

    def applies(self, path: str) -> bool:
        if path != "/system":
            return False
        self.seen += 1
        return self.seen > 1


def cursor_of(tmp_path):
    return queue_rows(tmp_path)[CURSOR_ROW_PK]["cursor_pk"]


def test_a_change_log_that_does_not_advance_stops_the_run_in_one_line(
    orthanc, proxy, service, args, tmp_path, capsys
):
    assert main(args) == EXIT_OK
    studies = stable_studies(orthanc, 5)
    before = cursor_of(tmp_path)
    proxy.repeat_changes = True  # a cache: every /changes answered with the first page
    capsys.readouterr()
    assert main(args) == EXIT_DATABASE
    [line] = error_lines(capsys.readouterr().err)
    assert "change log at" in line and "does not advance" in line
    assert proxy.count("/changes") <= 3
    after = cursor_of(tmp_path)
    assert after > before  # what the first (true) page said is kept
    # Again: the cached page is now behind the cursor, which stays put.
    capsys.readouterr()
    assert main(args) == EXIT_DATABASE
    assert "does not advance" in error_lines(capsys.readouterr().err)[0]
    assert proxy.count("/changes") <= 4
    assert cursor_of(tmp_path) == after
    # The cache gone, nothing was lost.
    proxy.repeat_changes = False
    assert main(args) == EXIT_OK
    assert sorted(service.study_pks()) == sorted(orthanc_pk(s) for s in studies)


def test_orthanc_restored_from_an_older_backup_then_past_the_cursor_loses_nothing(
    orthanc, proxy, service, args, tmp_path, capsys
):
    assert main(args) == EXIT_OK
    old = stable_studies(orthanc, 2)
    assert main(args) == EXIT_OK
    backup = tmp_path / "backup"
    orthanc.stop()
    for part in ("index", "storage"):
        shutil.copytree(orthanc.directory / part, backup / part)
    orthanc.start()
    lost = stable_studies(orthanc, 4, first=10)  # gone with the restore
    assert main(args) == EXIT_OK
    cursor = cursor_of(tmp_path)
    orthanc.stop()
    for part in ("index", "storage"):
        shutil.rmtree(orthanc.directory / part)
        shutil.copytree(backup / part, orthanc.directory / part)
    orthanc.start()
    assert orthanc.get("/changes?last")["Last"] < cursor
    new = []
    while orthanc.get("/changes?last")["Last"] <= cursor + 5:  # new studies push it past
        new += stable_studies(orthanc, 1, first=20 + len(new))
    capsys.readouterr()
    assert main(args) == EXIT_OK
    [warning] = error_lines(capsys.readouterr().err)
    assert "change log no longer goes back to where this indexer left it" in warning
    assert [len(posts_of(service, s)) for s in old + lost] == [1] * 6  # none sent again
    assert [len(posts_of(service, s)) for s in new] == [1] * len(new)  # none lost


def test_a_cleared_change_log_sends_the_studies_stored_before_it(
    orthanc, proxy, service, args, capsys
):
    assert main(args) == EXIT_OK
    [sent] = stable_studies(orthanc, 1)
    assert main(args) == EXIT_OK
    missed = stable_studies(orthanc, 3, first=1)
    orthanc.delete("/changes")  # DELETE /changes: Last stays where it was
    capsys.readouterr()
    assert main(args) == EXIT_OK
    [warning] = error_lines(capsys.readouterr().err)
    assert "change log no longer goes back to where this indexer left it" in warning
    assert [len(posts_of(service, s)) for s in [sent, *missed]] == [1, 1, 1, 1]
    capsys.readouterr()
    assert main(args) == EXIT_OK  # once: the next tick is an ordinary one
    assert error_lines(capsys.readouterr().err) == []
    assert len(service.received) == 4


def test_a_deleted_study_does_not_make_the_next_tick_resynchronise(
    orthanc, proxy, service, args, tmp_path, capsys
):
    """The rows of the change the cursor stands on go with its study: no
    history lost, no listing of the archive."""
    assert main(args) == EXIT_OK
    studies = stable_studies(orthanc, 2)
    assert main(args) == EXIT_OK
    kind, ident = queue_rows(tmp_path)[CURSOR_ROW_PK]["source_id"].split()
    [anchored] = [s for s in studies if ident in resources_of(orthanc, s)]
    orthanc.delete(f"/studies/{anchored}")
    [later] = stable_studies(orthanc, 1, first=5)
    capsys.readouterr()
    assert main(args) == EXIT_OK
    assert error_lines(capsys.readouterr().err) == []
    assert len(posts_of(service, later)) == 1
    assert proxy.count("/studies?") == 0


def resources_of(orthanc, study):
    """The Orthanc IDs of a study, its patient, its series and instances."""
    info = orthanc.get(f"/studies/{study}")
    series = orthanc.get(f"/studies/{study}/series")
    return {study, info["ParentPatient"]} | {
        ident for s in series for ident in [s["ID"], *s["Instances"]]
    }


def test_a_spurious_404_in_a_tick_sends_no_delete(orthanc, proxy, service, tmp_path, capsys):
    args = write_orthanc_configs(
        tmp_path, types.SimpleNamespace(url=proxy.url), service.url, send_deletes=True
    )
    assert main(args) == EXIT_OK
    [study] = stable_studies(orthanc, 1)
    assert main(args) == EXIT_OK
    # More images: pending again; its first read meets one 404.
    uid = orthanc.get(f"/studies/{study}")["MainDicomTags"]["StudyInstanceUID"]
    orthanc.upload(dicom_instance("0-0", "MUÑOZ^JOSÉ^^", uid, modality="MR"))
    wait_stable(orthanc, study)
    proxy.faults.append(Fault(f"/studies/{study}", status=404, times=1))
    assert main(args) == EXIT_OK
    assert [r.method for r in service.received] == ["POST", "POST"]
    assert posts_of(service, study)[1]["study_instances"] == 3
    # Gone for real (a 404 read twice): then, and only then, the DELETE.
    proxy.faults.append(Fault(f"/studies/{study}", status=404))
    orthanc.upload(dicom_instance("0-0", "MUÑOZ^JOSÉ^^", uid, modality="SR"))
    wait_stable(orthanc, study)
    assert main(args) == EXIT_OK
    assert [r.method for r in service.received] == ["POST", "POST", "DELETE"]
    assert queue_rows(tmp_path)[orthanc_pk(study)]["status"] == "deleted"
