"""The queue's statements, written once per difference, and its own writes,
which a deadlock with a PACS transaction does not lose: a real deadlock, on
MariaDB/MySQL and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, PacsDb, write_configs

from dicom_indexer import delivery
from dicom_indexer.cli import main
from dicom_indexer.config import load_settings
from dicom_indexer.engines import MySQLEngine, PostgreSQLEngine, SQLiteEngine
from dicom_indexer.sources import open_pacs
from dicom_indexer.sources.dcm4chee import ArcLight5MySQL, ArcLight523PostgreSQL
from dicom_indexer.study_service import (
    RECONCILE_ROW_PK,
    MySQLQueueSQL,
    PostgreSQLQueueSQL,
    QueueSQL,
    SQLiteQueueSQL,
)

# A safety net only: every wait below ends as soon as what it waits for happens.
PATIENCE_SECONDS = 60


# --------------------------------------------------------------------------
# Written once, placed by the engine
# --------------------------------------------------------------------------


def test_a_statement_written_once_gets_each_engines_placeholders():
    written = QueueSQL._written["SET_CURSOR"]
    assert written == "UPDATE study_service SET cursor_pk = ? WHERE study_pk = ?"
    placed = (MySQLQueueSQL.SET_CURSOR, PostgreSQLQueueSQL.SET_CURSOR, SQLiteQueueSQL.SET_CURSOR)
    assert placed == (written.replace("?", "%s"), written.replace("?", "%s"), written)
    # A part that differs is filled in per engine: the clock, and how a
    # batch names its studies (PostgreSQL: one array for the whole batch).
    assert MySQLQueueSQL.RECORD_UNCHANGED.endswith(" WHERE study_pk = %s")
    assert PostgreSQLQueueSQL.RECORD_UNCHANGED.endswith(" WHERE study_pk = ANY(%s::bigint[])")
    assert SQLiteQueueSQL.RECORD_UNCHANGED.endswith(" WHERE study_pk = ?")
    assert MySQLQueueSQL.COUNT_WAITING.endswith("next_attempt_at > NOW(6)")
    assert PostgreSQLQueueSQL.COUNT_WAITING.endswith("next_attempt_at > LOCALTIMESTAMP")
    assert "{" not in MySQLQueueSQL.ENQUEUE_CHANGED + PostgreSQLQueueSQL.ENQUEUE_CHANGED


def test_a_percent_sign_is_what_each_driver_reads_as_one():
    # PyMySQL %-formats every statement: the server must still get '%Y-%m-%d'.
    assert "DATE_FORMAT(s.updated_time, '%%Y-%%m-%%d %%H:%%i:%%s.%%f')" in (
        ArcLight5MySQL.SELECT_STUDY_PAGE
    )
    assert ArcLight5MySQL.SELECT_STUDY_PAGE.endswith("WHERE s.pk > %s ORDER BY s.pk LIMIT %s")
    assert SQLiteEngine.placeholders("strftime('%Y', 'now') > ?") == "strftime('%Y', 'now') > ?"
    # pg8000 reads a % outside quotes one way with parameters and another
    # without: refused when the class is made, at import.
    assert PostgreSQLEngine.placeholders("SELECT '100%' WHERE 1 = ?") == (
        "SELECT '100%' WHERE 1 = %s"
    )
    with pytest.raises(AssertionError, match="ambiguous to pg8000"):
        PostgreSQLEngine.placeholders("SELECT 5 % ?")


def test_a_part_an_engine_lacks_fails_at_import_naming_it():
    with pytest.raises(AssertionError, match=r"Incomplete\.DATABASE_NOW names \{NOW\}"):

        class Incomplete(QueueSQL):  # no NOW of its own
            engine = MySQLEngine


def test_a_schema_generation_overrides_one_part_and_every_statement_follows():
    # arc-light 5.23 to 5.30 differ from 5.31 by how the patient's ID is found.
    older = "(SELECT i.pat_id FROM patient_id i WHERE i.pk = p.patient_id_fk)"
    for name in ("SELECT_NEW_PAGE", "SELECT_DUE_PAGE", "SELECT_RECONCILE_PAGE"):
        statement = getattr(ArcLight523PostgreSQL, name)
        assert older in statement
        assert "patient_fk = p.pk ORDER BY i.pk" not in statement
    assert older in ArcLight523PostgreSQL.PRIVILEGE_PROBES[1][1][0]


def test_importing_pymysql_never_hides_cryptography_from_the_process():
    """PyMySQL is imported without `cryptography` (7 MB), and the rest of the
    process never sees it hidden: no import anywhere finds the module table
    saying it does not exist, as it did while PyMySQL was imported."""
    pytest.importorskip("cryptography")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from dicom_indexer.engines import _import_pymysql\n"
        "hidden = []\n"
        "def watch(event, args):\n"
        "    if event == 'import' and sys.modules.get('cryptography', 0) is None:\n"
        "        hidden.append(args[0])\n"
        "sys.addaudithook(watch)\n"
        "pymysql = _import_pymysql()\n"
        "print(pymysql._auth._have_cryptography, 'cryptography' in sys.modules, hidden)\n"
        "import cryptography.hazmat.primitives.serialization\n"
        "print('imported')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["False False []", "imported"]


# --------------------------------------------------------------------------
# A real deadlock between the queue's writes and a PACS transaction
# --------------------------------------------------------------------------


class PacsTransaction:
    """What the PACS does in the deadlock, on connections of its own (as the
    administrator): holds the study_service row that the client's write
    wants next, waits until the client waits for it, then asks for a row the
    client holds, which closes the cycle. The server then rolls one back.

    It is made the heavier of the two, so that the server chooses the client
    as the victim, as it would beside dcm4chee storing a study: MariaDB and
    MySQL roll back the transaction that wrote fewer rows (this one writes
    ballast, rolled back in the end), PostgreSQL the one whose
    deadlock_timeout ends first (this one's is longer)."""

    BALLAST_ROWS = 50

    def __init__(self, pacs: PacsDb) -> None:
        self.pacs = pacs
        self.conn = PacsDb(pacs.name)
        self.monitor = PacsDb(pacs.name)
        self.outcome: dict[str, Any] = {}
        self.thread: threading.Thread | None = None
        if pacs.postgresql:
            self.id = self.conn.query("SELECT pg_backend_pid() AS id")[0]["id"]
            self.conn.execute("SET deadlock_timeout = '600s'")
        else:
            self.id = self.conn.query("SELECT CONNECTION_ID() AS id")[0]["id"]
            self.conn.execute("CREATE TABLE IF NOT EXISTS deadlock_ballast (id INT PRIMARY KEY)")

    def hold(self, study_pk: int) -> None:
        self.conn.execute("BEGIN")
        if not self.pacs.postgresql:
            values = ", ".join(f"({i})" for i in range(self.BALLAST_ROWS))
            self.conn.execute(f"INSERT INTO deadlock_ballast (id) VALUES {values}")
        self.conn.query(
            "SELECT study_pk FROM study_service WHERE study_pk = %s FOR UPDATE", (study_pk,)
        )

    def close_the_cycle_on(self, study_pk: int) -> None:
        """In a thread: once the client waits for this transaction, asks for
        `study_pk` (which the client holds), then rolls back."""
        self.thread = threading.Thread(target=self._close_the_cycle, args=(study_pk,), daemon=True)
        self.thread.start()

    def _close_the_cycle(self, study_pk: int) -> None:
        try:
            self.outcome["client waited"] = self._client_waits()
            self.conn.query(
                "SELECT study_pk FROM study_service WHERE study_pk = %s FOR UPDATE", (study_pk,)
            )
            self.outcome["got the client's row"] = True
        except Exception as exc:  # the server chose this one: reported below
            self.outcome["got the client's row"] = repr(exc)
        finally:
            self.conn.execute("ROLLBACK")

    def _client_waits(self) -> bool:
        if self.pacs.postgresql:
            sql = "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        else:
            sql = (
                "SELECT COUNT(*) AS n FROM information_schema.INNODB_LOCK_WAITS w"
                " JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id"
                " WHERE b.trx_mysql_thread_id = %s"
            )
        deadline = time.monotonic() + PATIENCE_SECONDS
        while time.monotonic() < deadline:
            if self.monitor.query(sql, (self.id,))[0]["n"]:
                return True
            # InnoDB refreshes what INNODB_TRX and INNODB_LOCK_WAITS show only
            # once they have not been read for 0.1 s. PostgreSQL's answer is
            # live, and the sooner the cycle closes, the surer that the client
            # finds it when its deadlock_timeout (1 s) ends.
            time.sleep(0.01 if self.pacs.postgresql else 0.25)
        return False

    def finish(self) -> dict[str, Any]:
        if self.thread is not None:
            self.thread.join(PATIENCE_SECONDS)
        if not self.pacs.postgresql:
            self.monitor.execute("DROP TABLE IF EXISTS deadlock_ballast")
        self.conn.close()
        self.monitor.close()
        return self.outcome


def test_acknowledgements_chosen_as_deadlock_victim_are_written_again(
    pacs, service, tmp_path, monkeypatch, capsys
):
    first, second = pacs.add_studies(2)
    # One study at a time, and the acknowledgements written once, at the end
    # of the run: one transaction that writes `first`, then `second`.
    monkeypatch.setattr(delivery, "ACK_FLUSH_SECONDS", 3600.0)
    args = write_configs(tmp_path, pacs.name, service.url, concurrency=1)
    pacs_side = PacsTransaction(pacs)

    def respond(number: int, request: Any) -> tuple[int, str]:
        if number == 1:  # the tick has enqueued both and is sending
            pacs_side.hold(second)
            pacs_side.close_the_cycle_on(first)
        return 201, "{}"

    service.respond = respond
    try:
        code = main(args)
    finally:
        outcome = pacs_side.finish()

    # The cycle was real, and the server rolled the client's write back.
    assert outcome == {"client waited": True, "got the client's row": True}
    err = capsys.readouterr().err
    assert "deadlock with a PACS transaction" in err
    assert "in INSERT into study_service: its transaction runs again (1 of 5)" in err
    # Run again, it landed: both delivered and acknowledged, exit 0.
    assert code == 0, err
    assert service.study_pks() == [first, second]
    rows = pacs.queue()
    assert {
        pk: (row["status"], row["attempts"], row["last_error"]) for pk, row in rows.items()
    } == {
        first: ("sent", 1, None),
        second: ("sent", 1, None),
    }
    assert all(row["sent_version"] for row in rows.values())


def test_reconcile_findings_chosen_as_deadlock_victim_are_written_again(pacs, service, tmp_path):
    first, second = pacs.add_studies(2)
    args = write_configs(tmp_path, pacs.name, service.url)
    assert main(args) == 0  # both sent
    settings = load_settings(Path(args[1]), Path(args[3]))
    client = open_pacs(settings)
    pacs_side = PacsTransaction(pacs)
    try:
        queue = client.queue
        queue.reconcile_position()  # a sweep under way: its row, -2
        # The PACS holds the sweep's row; the client's page writes `first`
        # (changed since sent), then the position, then `second` (gone).
        pacs_side.hold(RECONCILE_ROW_PK)
        pacs_side.close_the_cycle_on(first)
        queue.record_reconciled([first], [(second, None)], second)
    finally:
        outcome = pacs_side.finish()
        client.close()

    assert outcome == {"client waited": True, "got the client's row": True}
    rows = pacs.queue()
    assert (rows[first]["status"], rows[first]["attempts"]) == ("pending", 0)
    assert (rows[second]["status"], rows[second]["last_error"]) == (
        "deleted",
        "study no longer in the PACS",
    )
    position = pacs.query(
        "SELECT cursor_pk FROM study_service WHERE study_pk = %s", (RECONCILE_ROW_PK,)
    )
    assert position == [{"cursor_pk": second}]
