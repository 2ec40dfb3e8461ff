"""The one HTTP layer (dicom_indexer/http.py), from outside, for both of its
peers: the central service (the loopback CentralService, told to misbehave)
and Orthanc (a real Orthanc behind a hostile front, dev/hostile_http.py,
that pads, trickles or replaces its answers). Each peer: a huge answer is
that request's error and memory stays bounded; a peer that trickles ends
the run after a bounded number of requests, with one line and its exit
code; SIGTERM ends a run blocked on a socket; credentials written in a URL
travel in a header and never appear in any output; credentials a header
cannot carry are one line and exit 3."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import API_KEY, CENTER, Reply, client_process, free_port, wait_until, write_configs
from hostile_http import HostileFront, Rule
from testkit import ORTHANC_BINARY, OrthancServer, dicom_instance, new_uid, peak_rss_mb

from dicom_indexer.cli import main
from dicom_indexer.errors import (
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_DELIVERY,
    EXIT_OK,
    EXIT_TERMINATED,
)
from dicom_indexer.http import STALLED_DEADLINES
from dicom_indexer.sources.orthanc import ORTHANC_BODY_BYTES, ORTHANC_FETCH_THREADS
from dicom_indexer.study_service import QUEUE_FILE_NAME

MB = 1024 * 1024
needs_orthanc = pytest.mark.skipif(
    not os.path.exists(ORTHANC_BINARY),
    reason="needs Debian's orthanc package (.ci/run installs it)",
)
# Short deadlines for the tests that wait for them: 0.5 s to connect + 1 s to
# read = 1.5 s per request.
SHORT = {"connect_timeout_seconds": 0.5, "read_timeout_seconds": 1}


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("latin-1")).decode()


# -- the central service --------------------------------------------------------


@pytest.mark.parametrize("fault", ["trickles", "silent"])
def test_a_service_that_trickles_or_is_silent_stops_the_run_after_three_deadlines(
    pacs, service, tmp_path, capsys, fault
):
    pks = pacs.add_studies(6)
    # max_retries 0: each POST goes once, so the requests the service saw are
    # the exchanges the client made.
    args = write_configs(tmp_path, pacs.name, service.url, {**SHORT, "max_retries": 0})
    if fault == "trickles":  # a 500 whose body comes a byte every 0.3 s
        service.respond = lambda n, r: Reply(500, b"x" * 400, trickle_seconds=0.3)
    else:  # no byte of an answer
        service.respond = lambda n, r: Reply(201, delay_seconds=30)
    assert main(["initial", *args]) == EXIT_DELIVERY
    # Without the bound, each of the 6 studies would have had its deadline.
    assert len(service.attempts) == STALLED_DEADLINES
    [line] = [line for line in _errors(capsys.readouterr().err) if "run stopped" in line]
    assert line.endswith(
        "run stopped: the service gave no complete answer within 1.5 s to 3 requests in a"
        " row, none answered between them: it trickles its answers or stays silent; what"
        " was not recorded stays pending"
    )
    rows = pacs.queue()
    assert {rows[pk]["status"] for pk in pks} == {"pending"}
    tried = {r.json["study_pk"] for r in service.attempts}
    expected = (
        "HTTP 500: (its body did not arrive within 1.5 s)"
        if fault == "trickles"
        else "no answer within 1 s"
    )
    assert {rows[pk]["last_error"] for pk in tried} == {expected}
    assert {rows[pk]["attempts"] for pk in set(pks) - tried} == {0}  # never tried


def test_credentials_in_the_service_url_travel_in_a_header_and_are_never_shown(
    pacs, service, tmp_path, capsys
):
    password = "s3cret-p@ss-for-the-index"
    quoted = password.replace("@", "%40")
    url = service.url.replace("http://", f"http://indexer:{quoted}@")
    args = write_configs(tmp_path, pacs.name, url)
    pacs.add_studies(2)
    assert main(["-v", *args]) == EXIT_OK
    assert {r.header("Authorization") for r in service.received} == {_basic("indexer", password)}
    assert {r.path for r in service.received} == {"/api/v1/register"}

    # A redirect is reported with the URL as configured, without them.
    pacs.add_studies(1)
    service.respond = lambda n, r: Reply(301, b"", headers={"Location": "https://x.example/"})
    assert main(["-v", *args]) == EXIT_DELIVERY
    assert main(["check", *args]) == EXIT_DELIVERY
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert f"at {service.url}: check webservice_url" in output
    assert f"FAILED  webservice: {service.url} answered HTTP 301" in output
    for secret in (password, quoted, "p@ss", "p%40ss"):
        assert secret not in output


def test_a_service_url_password_a_header_cannot_carry_is_one_line_exit_3(tmp_path, capsys):
    url = "https://indexer:%E2%82%ACuro-pw@indexador.example.cl/api/v1/register"
    args = write_configs(tmp_path, "unused", url)
    assert main(args) == EXIT_CONFIG
    [line] = _errors(capsys.readouterr().err)
    assert line.endswith(
        f"{tmp_path / 'config.json'}: field 'webservice_url': holds a user or password that"
        " cannot be sent: character 1 of 7 is not Latin-1, which HTTP Basic authentication"
        " cannot carry (not shown)"
    )
    assert "uro-pw" not in line


# -- Orthanc ---------------------------------------------------------------------


@pytest.fixture
def front(orthanc):
    hostile = HostileFront(orthanc.url)
    yield hostile
    hostile.stop()


def _orthanc_configs(
    directory: Path, orthanc_section: dict[str, Any], service_url: str, **extra: Any
) -> list[str]:
    config = {
        "orthanc": orthanc_section,
        "key": API_KEY,
        "webservice_url": service_url,
        "backoff_seconds": 0.01,
        **extra,
    }
    for name, data in (("config.json", config), ("server.json", {"server": CENTER})):
        (directory / name).write_text(json.dumps(data))
        (directory / name).chmod(0o600)
    return ["--config", str(directory / "config.json"), "--server", str(directory / "server.json")]


def _through(front: HostileFront, directory: Path, service_url: str, **extra: Any) -> list[str]:
    section = {"url": front.url, "user": OrthancServer.USER, "password": OrthancServer.PASSWORD}
    return _orthanc_configs(directory, section, service_url, **extra)


def _upload_studies(orthanc: OrthancServer, count: int) -> list[str]:
    """`count` studies of one image each; their Orthanc IDs."""
    studies = []
    for number in range(count):
        answer = orthanc.upload(
            dicom_instance(f"P{number:04d}", "DOE^JANE", new_uid(), new_uid(), "CT")
        )
        studies.append(answer["ParentStudy"])
    return studies


def _stable(orthanc: OrthancServer, studies: list[str]) -> None:
    """Waits until Orthanc calls them stable: a run sends them then."""
    wait_until(lambda: all(orthanc.get(f"/studies/{s}")["IsStable"] for s in studies), 30)


def _queue(directory: Path) -> dict[str, dict[str, Any]]:
    """The SQLite queue's study rows, by Orthanc ID."""
    with sqlite3.connect(directory / QUEUE_FILE_NAME) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM study_service WHERE study_pk > 0").fetchall()
    return {row["source_id"]: dict(row) for row in rows}


def _client(args: list[str], *extra: str) -> tuple[subprocess.Popen, float]:
    """client.py as its own process, and its peak memory once it ended."""
    process = client_process(args, *extra)
    return process, peak_rss_mb(process)


@needs_orthanc
@pytest.mark.parametrize("where", ["changes", "series"])
def test_a_huge_orthanc_answer_is_refused_and_memory_stays_bounded(
    orthanc, front, service, tmp_path, where
):
    args = _through(front, tmp_path, service.url)
    assert main(["-q", *args]) == EXIT_OK  # the queue, its cursor at the log's end
    # A tick reads each new study on its own (initial reads pages): what a
    # tick that reads and sends them all takes, with its imports and
    # threads; then a tick over as many new studies, through the front.
    _stable(orthanc, _upload_studies(orthanc, ORTHANC_FETCH_THREADS))
    process, usual = _client(args, "-q")
    assert process.communicate(timeout=120)[1] == ""
    assert process.returncode == EXIT_OK
    assert len(service.received) == ORTHANC_FETCH_THREADS
    service.received.clear()
    studies = _upload_studies(orthanc, ORTHANC_FETCH_THREADS)
    _stable(orthanc, studies)

    # 100 MB of whitespace after valid JSON, with no Content-Length: the client
    # cannot know before reading how long it is. For the series: on every
    # study, which the fetch threads read at once.
    pattern = "^/changes$" if where == "changes" else "^/studies/[^/]+/series$"
    front.rules.append(Rule(pattern, pad_bytes=100 * MB, declare_length=False))
    process, peak = _client(args)
    _, err = process.communicate(timeout=300)
    # At most one answer, up to its bound, held at a time; before: 236 MB for
    # /changes, 1.1 GB for the series.
    assert 0 < peak < usual + ORTHANC_BODY_BYTES / MB + 24, (usual, peak)
    assert service.received == []
    refusal = f"Orthanc at {front.url} answered GET {{}} with more than 64 MB: not read"
    if where == "changes":
        assert process.returncode == EXIT_DATABASE, err
        [line] = _errors(err)
        assert line.endswith(
            refusal.format("/changes") + " (a proxy or a fault padding its answers?)"
        )
    else:
        # Each study's trouble is its own: pending, with the refusal.
        rows = _queue(tmp_path)
        assert {rows[ident]["status"] for ident in studies} == {"pending"}
        for ident in studies:
            assert rows[ident]["last_error"].startswith(refusal.format(f"/studies/{ident}/series"))


@needs_orthanc
def test_an_orthanc_that_trickles_ends_the_run_after_a_bounded_number_of_reads(
    orthanc, front, service, tmp_path
):
    args = _through(front, tmp_path, service.url, **SHORT)
    assert main(["-q", *args]) == EXIT_OK  # the queue, its cursor at the log's end
    studies = _upload_studies(orthanc, 40)
    # Each study's own answer (a tick reads each new study on its own), a
    # byte every 0.2 s: minutes for each.
    study_path = r"^/studies/[^/]+$"
    front.rules.append(Rule(study_path, trickle_seconds=0.2))
    process = client_process(args, "-q")
    _, err = process.communicate(timeout=120)  # a safety net: it never ended before
    assert process.returncode == EXIT_DATABASE, err
    [line] = err.splitlines()
    assert line.endswith(
        f" ERROR Orthanc at {front.url} gave no complete answer within 1.5 s to 3 requests in"
        " a row, none answered between them: it trickles its answers or stays silent; what"
        " was not recorded stays pending"
    )
    # The reads under way when it stalled, and no other: not one per study.
    assert STALLED_DEADLINES <= front.count(study_path) <= ORTHANC_FETCH_THREADS + 3
    rows = _queue(tmp_path)
    assert {rows[ident]["status"] for ident in studies} == {"pending"}
    assert service.received == []


@needs_orthanc
def test_sigterm_ends_a_run_blocked_on_a_trickling_orthanc(orthanc, front, service, tmp_path):
    # A deadline of an hour: only SIGTERM can end these reads in time.
    args = _through(front, tmp_path, service.url, read_timeout_seconds=3600)
    assert main(["-q", *args]) == EXIT_OK  # the queue, its cursor at the log's end
    studies = _upload_studies(orthanc, 3)
    study_path = r"^/studies/[^/]+$"
    front.rules.append(Rule(study_path, trickle_seconds=1.0))
    process = client_process(args, "-q")  # a tick reads each new study on its own
    wait_until(lambda: front.count(study_path) >= 1, seconds=60)
    time.sleep(0.5)  # its answer's head is in: the client is blocked on the body
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)  # a safety net: the README promises 10 s
    assert process.returncode == EXIT_TERMINATED, err
    [line] = err.splitlines()
    assert " ERROR terminated (SIGTERM) while waiting for Orthanc's answer to GET /studies/" in line
    rows = _queue(tmp_path)
    assert {rows[ident]["status"] for ident in studies} == {"pending"}
    assert service.received == []


@needs_orthanc
def test_credentials_in_the_orthanc_url_travel_in_a_header_and_are_never_shown(
    orthanc, front, service, tmp_path, capsys
):
    studies = _upload_studies(orthanc, 2)
    _stable(orthanc, studies)
    host = front.url.split("//", 1)[1]
    section = {"url": f"http://{OrthancServer.USER}:{OrthancServer.PASSWORD}@{host}"}
    args = _orthanc_configs(tmp_path, section, service.url)
    assert main(["initial", "-q", *args]) == EXIT_OK
    assert main(["-v", *args]) == EXIT_OK
    assert main(["check", *args]) == EXIT_OK
    assert len([r for r in service.received if r.method == "POST"]) == len(studies)
    # Orthanc (AuthenticationEnabled) accepted every request: in the header.
    assert {s.headers.get("Authorization") for s in front.seen} == {
        _basic(OrthancServer.USER, OrthancServer.PASSWORD)
    }
    captured = capsys.readouterr()
    assert (
        f"ok      source: Orthanc at {front.url}, Orthanc 1.10.1, credentials of"
        f" {OrthancServer.USER} accepted" in captured.out
    )
    assert OrthancServer.PASSWORD not in captured.out + captured.err

    # Refused: one line, the URL without them.
    section = {"url": f"http://{OrthancServer.USER}:wrong-pw-in-the-url@{host}"}
    args = _orthanc_configs(tmp_path, section, service.url)
    for command in (["-q"], ["-v"]):
        assert main([*command, *args]) == EXIT_DATABASE
    assert main(["check", *args]) == EXIT_DATABASE
    captured = capsys.readouterr()
    refused = (
        f"Orthanc at {front.url} refused the credentials (HTTP 401): check orthanc.user and"
        " orthanc.password in config.json"
    )
    assert [line.split(" ERROR ", 1)[1] for line in _errors(captured.err)] == [refused] * 2
    assert f"FAILED  source: {refused}" in captured.out
    assert "wrong-pw-in-the-url" not in captured.out + captured.err


@pytest.mark.parametrize("where", ["url", "password"])
def test_an_orthanc_password_a_header_cannot_carry_is_one_line_exit_3(tmp_path, capsys, where):
    password = "contraseña-€uro"  # € is not Latin-1
    if where == "url":
        section = {"url": "http://indexer:contrase%C3%B1a-%E2%82%ACuro@127.0.0.1:8042"}
        source = "field 'orthanc.url' (its password)"
    else:
        section = {"url": "http://127.0.0.1:8042", "user": "indexer", "password": password}
        source = "field 'orthanc.password'"
    args = _orthanc_configs(tmp_path, section, f"http://127.0.0.1:{free_port()}/api")
    assert main(args) == EXIT_CONFIG
    [line] = _errors(capsys.readouterr().err)
    assert line.endswith(
        f"{tmp_path / 'config.json'}: {source}: the Orthanc password cannot be sent:"
        " character 12 of 15 is not Latin-1, which HTTP Basic authentication cannot carry"
        " (the password is not shown)"
    )
    assert main(["check", *args]) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert "FAILED  configuration: " in captured.out
    for text in (line, captured.out, captured.err):
        assert "contrase" not in text and "€uro" not in text and "%E2%82%AC" not in text


def test_the_run_stops_only_on_deadlines_in_a_row(pacs, service, tmp_path, capsys):
    """An answer in time between expired deadlines resets the count: a
    service slow now and then is not a stalled one."""
    pks = pacs.add_studies(6)
    args = write_configs(tmp_path, pacs.name, service.url, {**SHORT, "max_retries": 0})
    slow = Reply(500, b"x" * 400, trickle_seconds=0.3)
    # Every third request is answered at once (and refused: 422).
    service.respond = lambda n, r: (422, "bad study") if len(service.attempts) % 3 == 2 else slow
    assert main(["initial", *args]) == EXIT_DELIVERY
    assert len(service.attempts) == len(pks)  # every study tried: no stall stop
    assert not [line for line in _errors(capsys.readouterr().err) if "run stopped" in line]
    assert pacs.statuses() == {"pending": len(pks)}
