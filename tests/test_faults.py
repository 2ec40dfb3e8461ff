"""Faults that must end cleanly: the database lost mid-run, SIGTERM, and log
or metrics files that cannot be written. Each ends in one line and an exit
code, loses nothing, and the next run completes."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

import pymysql
import pytest
from conftest import INDEXER_USER, ROOT, PacsDb, client_process, connect, wait_until, write_configs

from dicom_indexer.cli import main
from dicom_indexer.engines import MySQLEngine, PostgreSQLEngine, _mysql_message, statement_label
from dicom_indexer.errors import EXIT_DATABASE, EXIT_TERMINATED


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def _sent(pacs) -> list[int]:
    return sorted(pk for pk, row in pacs.queue().items() if row["status"] == "sent")


@pytest.mark.parametrize(
    "code, text, expected",
    [
        (0, "", "the connection to the database was lost (server restarted or connection killed)"),
        (2013, "Lost connection to MySQL server during query", "was lost (server restarted"),
        (1205, "Lock wait timeout exceeded", "lock wait timeout: a PACS transaction held the rows"),
        (1213, "Deadlock found", "deadlock with a PACS transaction (1213: Deadlock found)"),
        (1045, "Access denied for user 'x'", "(1045) Access denied for user 'x'"),
    ],
)
def test_database_errors_say_what_happened(code, text, expected):
    exc = pymysql.err.OperationalError(code, text) if text else pymysql.err.InterfaceError(0, "")
    assert expected in _mysql_message(exc, MySQLEngine.REASONS)


@pytest.mark.parametrize(
    "sql, label",
    [
        (MySQLEngine.TRY_LOCK, "the run lock (one run at a time per database)"),
        (PostgreSQLEngine.TRY_LOCK, "the run lock (one run at a time per database)"),
        ("CALL indexer_process(%s)", "indexer_process (finding the new and changed studies)"),
        ("UPDATE study_service SET status = %s", "UPDATE on study_service"),
        ("SELECT pk FROM study WHERE pk = %s", "SELECT from study"),
    ],
)
def test_a_database_error_names_what_it_was_doing_never_its_arguments(sql, label):
    assert statement_label(sql) == label


def test_connection_killed_mid_run_is_one_line_exit_4_and_the_next_run_completes(
    pacs, service, configs
):
    pks = pacs.add_studies(60)
    service.delay_seconds = 0.1  # a run of a few seconds, to kill it midway
    process = client_process(configs, "initial")
    wait_until(lambda: len(service.received) >= 10)
    if pacs.postgresql:
        pacs.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename = %s AND datname = %s",
            (INDEXER_USER, pacs.name),
        )
    else:
        with connect() as root, root.cursor() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s AND DB = %s",
                (INDEXER_USER, pacs.name),
            )
            for row in cur.fetchall():
                cur.execute(f"KILL {int(row['ID'])}")
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == EXIT_DATABASE, stderr
    assert "Traceback" not in stderr
    [error] = _errors(stderr)
    assert f"database error on database '{pacs.name}'" in error
    assert (
        "the connection to the database was lost (server restarted or connection killed)" in error
    )

    service.delay_seconds = 0
    assert main(configs) == 0
    assert set(service.study_pks()) == set(pks)
    assert pacs.statuses() == {"sent": 60}


@contextlib.contextmanager
def _lock_wait_timeout_of_one_second(pacs):
    """The server's lock wait timeout, 1 s for the indexer's sessions."""
    if pacs.postgresql:
        pacs.execute(f"ALTER ROLE {INDEXER_USER} IN DATABASE {pacs.name} SET lock_timeout = '1s'")
        try:
            yield
        finally:
            pacs.execute(f"ALTER ROLE {INDEXER_USER} IN DATABASE {pacs.name} RESET lock_timeout")
        return
    with connect() as root, root.cursor() as cur:
        cur.execute("SELECT @@GLOBAL.innodb_lock_wait_timeout AS t")
        saved = cur.fetchone()["t"]
        cur.execute("SET GLOBAL innodb_lock_wait_timeout = 1")
    try:
        yield
    finally:
        with connect() as root, root.cursor() as cur:
            cur.execute("SET GLOBAL innodb_lock_wait_timeout = %s", (saved,))


def test_lock_wait_timeout_is_one_line_exit_4_and_the_next_run_completes(pacs, service, configs):
    study = pacs.add_study(pacs.add_patient())
    holder = PacsDb(pacs.name)
    with _lock_wait_timeout_of_one_second(pacs):
        try:
            holder.conn.begin()
            # As a long transaction would (an administrator's, left open).
            holder.query("SELECT * FROM study_service WHERE study_pk = 0 FOR UPDATE")
            process = client_process(configs)
            _, stderr = process.communicate(timeout=60)
        finally:
            holder.conn.rollback()
            holder.close()
    assert process.returncode == EXIT_DATABASE, stderr
    [error] = _errors(stderr)
    assert "lock wait timeout: a PACS transaction held the rows (" in error
    assert error.endswith("in indexer_process (finding the new and changed studies)")
    assert service.attempts == []
    assert main(configs) == 0
    assert service.study_pks() == [study]


def test_sigterm_finishes_the_requests_in_flight_records_them_and_exits_143(pacs, service, configs):
    pks = pacs.add_studies(40)
    service.delay_seconds = 1.5  # four requests in flight when SIGTERM comes
    process = client_process(configs, "initial")
    wait_until(lambda: len(service.attempts) >= 4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)  # a safety net: it ends by itself

    assert process.returncode == EXIT_TERMINATED == 143, stderr
    assert "run stopped: terminated (SIGTERM): no new study taken" in stderr
    assert "Traceback" not in stderr
    # Every study the service accepted is recorded as sent: none forgotten,
    # and none recorded that the service did not accept.
    accepted = service.study_pks()
    assert accepted and len(accepted) < 40
    assert _sent(pacs) == accepted

    service.delay_seconds = 0
    assert main(configs) == 0
    assert service.study_pks() == sorted(pks)  # each study exactly once


def test_sigterm_with_requests_hung_exits_within_10_seconds_and_loses_nothing(
    pacs, service, tmp_path
):
    pks = pacs.add_studies(12)
    args = write_configs(tmp_path, pacs.name, service.url, read_timeout_seconds=60, concurrency=2)
    service.delay_seconds = 45  # the service hangs, longer than the grace after SIGTERM
    process = client_process(args, "initial")
    wait_until(lambda: len(service.attempts) >= 2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=40)  # a safety net, short of the answers
    assert process.returncode == EXIT_TERMINATED, stderr
    # It gave up on the hung requests at the end of its grace, not when they
    # would have been answered: nothing was, nothing is recorded as sent.
    assert "requests still unanswered after SIGTERM: left pending" in stderr
    assert _sent(pacs) == []

    service.delay_seconds = 0
    assert main(args) == 0
    assert set(service.study_pks()) == set(pks)


def test_sigterm_pauses_reconcile_where_it_is(pacs, service, tmp_path):
    pacs.add_studies(300)
    # 20 rows a second: 15 s for the 300, paused long before their end.
    args = write_configs(tmp_path, pacs.name, service.url, reconcile_rows_per_second=20)
    assert main(["initial", *args]) == 0
    process = client_process(args, "reconcile")
    position = "SELECT cursor_pk FROM study_service WHERE study_pk = -2"
    wait_until(lambda: [row for row in pacs.query(position) if row["cursor_pk"]])
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == EXIT_TERMINATED, stderr
    assert "reconcile paused" in stderr
    [row] = pacs.query(position)
    assert 0 < row["cursor_pk"] < 300  # where it paused: the next reconcile carries on


def test_log_file_that_cannot_be_written_is_one_warning_and_delivery_goes_on(
    pacs, service, tmp_path
):
    pks = pacs.add_studies(3)
    args = write_configs(tmp_path, pacs.name, service.url, log_file="/dev/full")
    result = subprocess.run(
        [sys.executable, str(ROOT / "client.py"), "initial", *args],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert service.study_pks() == sorted(pks)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1
    assert "cannot write log_file /dev/full: No space left on device" in warnings[0]
    assert "Logging error" not in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_file_that_cannot_be_written_is_a_warning_and_delivery_goes_on(
    pacs, service, tmp_path, capsys
):
    study = pacs.add_study(pacs.add_patient())
    (tmp_path / "not-a-directory").write_text("")
    metrics = tmp_path / "not-a-directory" / "dicom_indexer.prom"
    args = write_configs(tmp_path, pacs.name, service.url, metrics_file=str(metrics))
    assert main(args) == 0
    assert service.study_pks() == [study]
    assert f"cannot write metrics_file {metrics}: Not a directory" in capsys.readouterr().err
