"""Delivery that never loses a study: a failing, slow, refusing or dying service,
kill -9, two runs at once, and the administrator's commands."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from conftest import (
    API_KEY,
    INDEXER_PASSWORD,
    INDEXER_USER,
    ROOT,
    CentralService,
    client_process,
    free_port,
    wait_until,
    write_configs,
)

from dicom_indexer.cli import main
from dicom_indexer.delivery import max_resent_after_crash
from dicom_indexer.errors import (
    EXIT_DATABASE,
    EXIT_DELIVERY,
    EXIT_KEY_REFUSED,
    EXIT_LOCKED,
    EXIT_REJECTED,
)


def test_503_on_every_fourth_request_still_delivers_everything(pacs, service, configs):
    pks = pacs.add_studies(60)
    service.respond = lambda n, r: (503, "busy") if len(service.attempts) % 4 == 3 else (201, "{}")
    assert main(["initial", *configs]) == 0
    assert service.study_pks() == pks
    assert pacs.statuses() == {"sent": 60}


def test_422_marks_one_study_failed_others_carry_on_and_it_is_not_reposted(
    pacs, service, configs, capsys
):
    pks = pacs.add_studies(10)
    bad = pks[3]
    service.respond = lambda n, r: (
        (422, '{"error": "bad uid"}') if r.json["study_pk"] == bad else (201, "{}")
    )
    assert main(["initial", *configs]) == EXIT_REJECTED
    assert service.study_pks() == [pk for pk in pks if pk != bad]
    row = pacs.queue()[bad]
    assert row["status"] == "failed"
    assert row["last_error"] == 'HTTP 422: {"error": "bad uid"}'
    assert "1 studies were refused by the service" in capsys.readouterr().err

    attempts = len(service.attempts)
    assert main(configs) == 0  # the next tick does not post it again
    assert len(service.attempts) == attempts

    service.respond = lambda n, r: (201, "{}")
    assert main(["retry-failed", *configs]) == 0
    assert service.study_pks() == pks
    assert pacs.statuses() == {"sent": 10}


def test_failed_study_is_retried_when_dcm4chee_changes_it(pacs, service, configs):
    study, other = pacs.add_studies(2)
    service.respond = lambda n, r: (422, "no") if r.json["study_pk"] == study else (201, "{}")
    assert main(configs) == EXIT_REJECTED
    assert pacs.queue()[study]["status"] == "failed"
    service.respond = lambda n, r: (201, "{}")
    pacs.store_series(study)
    assert main(configs) == 0
    assert service.study_pks() == [study, other]


def test_401_stops_at_once_with_one_clear_line(pacs, service, configs, capsys):
    pacs.add_studies(50)
    service.respond = lambda n, r: (401, "unauthorized")
    assert main(["initial", *configs]) == EXIT_KEY_REFUSED
    # Only what was already in flight was tried; nothing marked failed.
    assert len(service.attempts) <= 2 * 4
    assert pacs.statuses() == {"pending": 50}
    err = capsys.readouterr().err
    assert "run stopped: the service refused the API key (HTTP 401: unauthorized)" in err
    assert API_KEY not in err


def test_slow_service_times_out_and_leaves_studies_pending(pacs, service, tmp_path, capsys):
    pks = pacs.add_studies(3)
    args = write_configs(
        tmp_path,
        pacs.name,
        service.url,
        {"read_timeout_seconds": 0.2, "max_retries": 1, "max_consecutive_failures": 2},
    )
    service.delay_seconds = 0.5
    assert main(["initial", *args]) == EXIT_DELIVERY
    # Each request given up at its deadline, the run stopped after two studies
    # in a row without an answer: never a wait for the whole slow answer.
    assert "2 studies in a row could not be delivered" in capsys.readouterr().err
    assert len(service.attempts) <= 2 * len(pks)  # at most 1 + max_retries each
    assert pacs.statuses().get("sent", 0) == 0
    assert "no answer within 0.2 s" in {r["last_error"] for r in pacs.queue().values()}
    service.delay_seconds = 0
    assert main(args) == 0
    assert set(service.study_pks()) == set(pks)


def test_refused_connections_end_the_run_fast_and_lose_nothing(pacs, tmp_path, capsys):
    pks = pacs.add_studies(30)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/register"
    # The defaults, as an administrator runs it (the other tests shorten the backoff).
    args = write_configs(
        tmp_path, pacs.name, url, {"backoff_seconds": 1, "connect_timeout_seconds": 5}
    )
    assert main(["initial", *args]) == EXIT_DELIVERY
    err = capsys.readouterr().err
    # Fast: it stops after max_consecutive_failures (5) studies in a row,
    # not once each of the 30 has been tried with its backoffs.
    assert "run stopped: 5 studies in a row could not be delivered" in err
    assert "cannot reach the service" in err
    assert pacs.statuses() == {"pending": 30}
    tried = [row for row in pacs.queue().values() if row["last_error"]]
    assert len(tried) < 30

    service = CentralService()  # the service comes back
    try:
        args = write_configs(tmp_path, pacs.name, service.url)
        assert main(args) == 0
        assert service.study_pks() == pks
    finally:
        service.stop()


def test_service_dying_mid_run_loses_nothing(pacs, service, configs):
    pks = pacs.add_studies(80)

    def die_after_20(n, request):
        if len(service.received) >= 20:
            raise ConnectionResetError  # the handler dies: the connection drops
        return 201, "{}"

    service.respond = die_after_20
    assert main(["initial", *configs]) == EXIT_DELIVERY
    assert len(service.received) == 20
    sent = {pk for pk, row in pacs.queue().items() if row["status"] == "sent"}
    assert sent == set(service.study_pks())
    service.respond = lambda n, r: (201, "{}")
    assert main(configs) == 0
    assert service.study_pks() == pks


def test_kill_9_mid_run_is_completed_by_the_next_run(pacs, service, configs):
    pks = pacs.add_studies(400)
    service.delay_seconds = 0.005
    process = client_process(configs, "initial")
    wait_until(lambda: len(service.received) >= 50)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # The server frees the run lock when it notices the dead connection.
    wait_until(pacs.run_lock_free)
    service.delay_seconds = 0
    assert main(configs) == 0
    received = service.study_pks()
    assert set(received) == set(pks)
    # Posted twice: at most the bound the README documents (392 with the defaults).
    assert len(received) - len(pks) <= max_resent_after_crash()


def test_two_runs_at_once_one_stands_aside_and_nothing_is_posted_twice(pacs, service, configs):
    pks = pacs.add_studies(300)
    service.delay_seconds = 0.02  # the first run lasts about 1.5 s: the second meets it
    first = client_process(configs, "initial")
    wait_until(lambda: len(service.received) >= 10)
    second = client_process(configs)
    out, err = second.communicate(timeout=30)
    assert second.returncode == EXIT_LOCKED
    assert "another dicom-indexer run is working on database" in err
    assert err.count("\n") == 1
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert service.study_pks() == pks  # each exactly once


def test_status_shows_counts_age_and_errors(pacs, service, configs, capsys):
    pks = pacs.add_studies(5)
    service.respond = lambda n, r: (422, "invalid") if r.json["study_pk"] == pks[0] else (201, "{}")
    main(["initial", *configs])
    capsys.readouterr()
    assert main(["status", *configs]) == 0
    out = capsys.readouterr().out
    assert "sent              4" in out
    assert "failed            1" in out
    assert "oldest pending: none" in out
    assert f"study {pks[0]} (failed, 1 attempts): HTTP 422: invalid" in out
    assert "PACIENTE" not in out

    assert main(["status", "--json", *configs]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == {"pending": 0, "sent": 4, "failed": 1, "deleting": 0, "deleted": 0}
    assert status["last_sent_at"] is not None
    assert status["recent_errors"][0]["study_pk"] == pks[0]


def test_check_reports_each_part_and_registers_nothing(pacs, service, configs, capsys):
    assert main(["check", *configs]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["ok"] * 7
    assert lines[2] == "ok      schema: dcm4chee 2.x"
    assert lines[4] == "ok      privileges: " + INDEXER_USER + " may do what a run does"
    assert lines[5].startswith("ok      index study_updated on study(updated_time)")
    assert "answered HTTP 201" in lines[6]
    assert all(r.method == "GET" for r in service.attempts)

    service.respond = lambda n, r: (403, "forbidden")
    assert main(["check", *configs]) == EXIT_KEY_REFUSED
    assert "FAILED  webservice: the service refused the key (HTTP 403)" in capsys.readouterr().out

    pacs.drop_indexer_process()
    assert main(["check", *configs]) == EXIT_DATABASE
    assert "FAILED  indexer: procedure indexer_process is missing" in capsys.readouterr().out
    assert service.documents == []


def test_dry_run_prints_documents_and_changes_nothing(pacs, service, configs, capsys):
    pks = pacs.add_studies(3)
    pacs.call_indexer_process()
    before = pacs.queue()
    assert main(["--dry-run", *configs]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["study_pk"] for d in printed] == pks
    assert printed[0]["patient_name"] == "PACIENTE^NUMERO0"
    assert service.attempts == []
    assert pacs.queue() == before


def test_limit_sends_at_most_n(pacs, service, configs):
    pacs.add_studies(10)
    assert main(["initial", "--limit", "4", *configs]) == 0
    assert len(service.received) == 4
    assert pacs.statuses() == {"sent": 4, "pending": 6}


def test_secrets_never_appear_even_verbose(pacs, service, tmp_path):
    pacs.add_studies(4)
    args = write_configs(tmp_path, pacs.name, service.url)
    service.respond = lambda n, r: (503, "down") if n % 2 else (201, "{}")
    outputs = []
    for extra in (["initial", "-v"], ["status"], ["check"], ["-v"]):
        result = subprocess.run(
            [sys.executable, str(ROOT / "client.py"), *extra, *args],
            capture_output=True,
            text=True,
        )
        outputs.append(result.stdout + result.stderr)
    text = "\n".join(outputs)
    assert API_KEY not in text
    assert INDEXER_PASSWORD not in text
    assert "PACIENTE" not in text
