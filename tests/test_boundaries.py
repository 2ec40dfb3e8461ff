"""What crosses a boundary is checked before it is trusted: a bug met midway,
a PACS clock set wrong, a lock held by another session, a dry run; each ends
with one line and a documented exit code, and loses nothing."""

from __future__ import annotations

import re
import threading

import pytest
from conftest import API_KEY, PacsDb, read_metrics, write_configs

import dicom_indexer.delivery
from dicom_indexer.cli import main
from dicom_indexer.errors import EXIT_INTERNAL
from dicom_indexer.logs import Secrets


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


def test_an_unexpected_error_is_one_line_exit_1_with_metrics_and_no_secret(
    pacs, service, tmp_path, capsys, monkeypatch
):
    study = pacs.add_study(pacs.add_patient())
    metrics = tmp_path / "metrics.prom"
    args = write_configs(tmp_path, pacs.name, service.url, metrics_file=str(metrics))

    def broken(row, center):
        raise ValueError(f"cannot map {API_KEY} for PEREZ^JUAN")

    monkeypatch.setattr(dicom_indexer.delivery, "study_document", broken)
    assert main(args) == EXIT_INTERNAL
    err = capsys.readouterr().err
    [line] = err.strip().splitlines()
    # Where it came from (here, the stand-in above), never what it said.
    assert re.search(r" ERROR internal error: ValueError at test_boundaries\.py:\d+;", line)
    assert line.endswith("run again with -v for the traceback and report it")
    assert "PEREZ" not in err and API_KEY not in err
    assert read_metrics(metrics)["last_run_exit_code"] == EXIT_INTERNAL
    assert pacs.queue()[study]["status"] == "pending"

    # -v: the traceback, with the key blanked out.
    assert main(["-v", *args]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "ValueError: cannot map *** for PEREZ^JUAN" in err
    assert API_KEY not in err

    monkeypatch.undo()
    assert main(args) == 0
    assert service.study_pks() == [study]


def test_dry_run_writes_nothing_at_all(pacs, service, tmp_path, capsys):
    pks = pacs.add_studies(4)
    pacs.call_indexer_process()
    pacs.execute("DELETE FROM study WHERE pk = %s", (pks[1],))  # gone from the PACS
    pacs.execute(  # still receiving images
        f"UPDATE study SET updated_time = {pacs.now()} WHERE pk = %s", (pks[2],)
    )
    args = write_configs(tmp_path, pacs.name, service.url, stable_age_seconds=600)
    before = pacs.query("SELECT * FROM study_service ORDER BY study_pk")

    assert main(["--dry-run", *args]) == 0

    out = capsys.readouterr().out
    assert [int(line.split('"study_pk":')[1].split(",")[0]) for line in out.splitlines()] == [
        pks[0],
        pks[3],
    ]
    assert pacs.query("SELECT * FROM study_service ORDER BY study_pk") == before
    assert service.attempts == []


def test_a_study_dated_in_the_future_waits_stable_age_seconds_not_until_its_date(
    pacs, service, tmp_path, capsys
):
    args = write_configs(tmp_path, pacs.name, service.url, stable_age_seconds=600)
    future = pacs.add_study(pacs.add_patient())
    pacs.execute(  # a PACS whose clock was a year ahead
        f"UPDATE study SET updated_time = {pacs.ago(-365 * 86400)} WHERE pk = %s", (future,)
    )
    assert main(args) == 0
    assert service.attempts == []
    capsys.readouterr()
    assert main(["status", *args]) == 0
    out = capsys.readouterr().out
    assert "held              1  dated in the future (updated_time is ahead of the" in out

    # Enqueued 601 s ago, as if that much time had passed: a year before its date.
    pacs.execute(
        f"UPDATE study_service SET enqueued_at = {pacs.ago(601)} WHERE study_pk = %s", (future,)
    )
    assert main(args) == 0
    assert service.study_pks() == [future]


def test_postgresql_statement_waiting_20_s_on_a_lock_waits_and_delivers(
    pacs, service, configs, capsys
):
    if not pacs.postgresql:
        pytest.skip("PostgreSQL: pg8000's socket timeout was the problem; MySQL waits 50 s")
    study = pacs.add_study(pacs.add_patient())
    holder = PacsDb(pacs.name)
    holder.conn.begin()
    # Another session holds the tick's cursor row, as an administrator's
    # transaction left open for 20 s would.
    holder.query("SELECT * FROM study_service WHERE study_pk = 0 FOR UPDATE")
    released = threading.Event()

    def release_after_20_s() -> None:
        released.set()  # before the lock goes: the run cannot get past it sooner
        holder.conn.rollback()

    release = threading.Timer(20, release_after_20_s)
    release.start()
    try:
        assert main(configs) == 0, capsys.readouterr().err
        waited = released.is_set()
    finally:
        release.join()
        holder.close()
    assert waited  # the run waited for the lock, and was not cut off meanwhile
    assert service.study_pks() == [study]


def test_secrets_are_blanked_out_of_any_text_but_a_short_one_only_as_a_word():
    secrets = Secrets("s3cr3t-key-value", "pw", None, "")
    redact = secrets.redact
    assert redact("key s3cr3t-key-value, repr 's3cr3t-key-value'") == "key ***, repr '***'"
    assert redact("ok: pw is the password, pwned stays") == "ok: *** is the password, pwned stays"
    assert redact("url user:s3cr3t%2Dkey") == "url user:s3cr3t%2Dkey"  # not this secret
    secrets.add("a b/c")
    assert redact("proxy http://u:a%20b%2Fc@host") == "proxy http://u:***@host"
    assert Secrets().redact("s3cr3t-key-value") == "s3cr3t-key-value"  # another run's are its own
