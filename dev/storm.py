#!/usr/bin/env python3
"""The storm: proves that the central index converges to what the PACS holds,
whatever fails along the way.

A dcm4chee-like writer keeps storing (new studies, more series, patient edits
and merges, deletions, some of it committed late) into a private MariaDB
server made for the run (with --schema arc5, a dcm4chee-arc-light 5 writer:
the same, plus rejections, its counts cache dropped on every store and
rebuilt by its size scheduler a moment later), while `client.py` ticks every few seconds as cron
would, and faults are injected at random, each several times:

  sigkill, sigterm     the tick killed (kill -9) or stopped (systemd) mid-run
  db_restart           the database server shut down and started again
  kill_connection      the client's connections killed (KILL <id>)
  service_down         the central service refusing connections
  service_503          ... answering 503
  service_slow         ... answering after the client's read timeout
  service_cut          ... closing connections before answering
  study_403            ... refusing one study (403, a firewall that dislikes it)
  reconcile_beside     `client.py reconcile` started beside a tick

and all along, one study of the archive is poison: the service answers 500
to it, whatever it says, until the faults stop. The others must not wait
for it.

Then the faults stop (and arc-light's scheduler settles what it still owes);
the poison is cured and the refused study let through; the studies waiting
after a failure see their wait pass (as an hour later); one `client.py
reconcile` and one `client.py retry-failed` (with send_deletes), and every
study is compared: the last document the service accepted must equal the
one built from the database now, every deleted study must have been
DELETEd, nothing else may be in the index, every study_service row must say
sent or deleted, and no study but the refused one may have been marked
failed.

    python dev/storm.py --seconds 1800          # the long run
    python dev/storm.py --seconds 90 --json storm.json
    python dev/storm.py --seconds 1800 --schema arc5

Needs mariadbd and mariadb-install-db (the MariaDB server package) and the
mariadb (or mysql) command-line client; it runs as the user it is started by.
tests/test_storm.py runs a bounded storm in CI.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pymysql
import pymysql.cursors
from testkit import CentralService, Received, Reply, free_port

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "client.py"

FAULTS = (
    "sigkill",
    "sigterm",
    "db_restart",
    "kill_connection",
    "service_down",
    "service_503",
    "service_slow",
    "service_cut",
    "study_403",
    "reconcile_beside",
)
TICK_INTERVAL_SECONDS = 2.0
MID_RUN_ATTEMPTS = 5  # ticks tried in turn to catch one sending (3 missed once in CI)
READ_TIMEOUT_SECONDS = 1.0  # the client's; service_slow answers later than this
SERVICE_FAULT_SECONDS = (2.0, 5.0)  # how long a service fault lasts
LATE_COMMIT_SECONDS = (1.0, 6.0)  # how long a late transaction stays open
ARCHIVE_STUDIES = 400  # stored before the indexer is installed: sent by `initial`
CENTER = "007"
DATABASE = "storm_pacs"
INDEXER_USER, INDEXER_PASSWORD = "storm_indexer", "storm-indexer-pw"
PACS_USER, PACS_PASSWORD = "storm_pacs", "storm-pacs-pw"
MYSQL_CLIENT = shutil.which("mariadb") or shutil.which("mysql") or "mysql"


# --------------------------------------------------------------------------
# A private MariaDB server, so that restarting it touches nothing else
# --------------------------------------------------------------------------


class PrivateMariaDB:
    """mariadbd on its own port, socket and data directory."""

    def __init__(self, directory: Path, options: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.options = options  # more mariadbd options, at install and start
        self.datadir = directory / "data"
        self.socket = directory / "mysqld.sock"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = directory / "mariadbd.log"

    def install(self) -> None:
        installer = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
        if installer is None:
            raise RuntimeError("mariadb-install-db not found (MariaDB server package)")
        subprocess.run(
            [
                installer,
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=" + _os_user(),
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                *self.options,
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        daemon = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        self.process = subprocess.Popen(
            [
                daemon,
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--socket={self.socket}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--user=" + _os_user(),
                f"--pid-file={self.directory / 'mariadbd.pid'}",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=32M",
                "--skip-log-bin",
                "--max-connections=200",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115 (closed with the process)
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.admin("SELECT 1")
                return
            except (pymysql.MySQLError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd did not start; see {self.log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """A clean shutdown, as a service manager does for a nightly backup."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self, down_seconds: float) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def admin(self, sql: str, args: Any = None, database: str | None = None) -> list[dict]:
        conn = pymysql.connect(
            unix_socket=str(self.socket),
            user="root",
            database=database,
            autocommit=True,
            cursorclass=pymysql.cursors.DictCursor,
            connect_timeout=2,
        )
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def run_file(self, database: str, path: Path) -> None:
        with open(path, "rb") as stdin:
            subprocess.run(
                [MYSQL_CLIENT, f"--socket={self.socket}", "-uroot", database],
                stdin=stdin,
                check=True,
                capture_output=True,
            )

    def connect(self, user: str, password: str) -> Any:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            password=password,
            database=DATABASE,
            charset="utf8mb4",
            autocommit=True,
            cursorclass=pymysql.cursors.DictCursor,
            connect_timeout=2,
            read_timeout=30,
            write_timeout=30,
        )


def _os_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


# --------------------------------------------------------------------------
# The central service, on loopback, with faults on demand
# --------------------------------------------------------------------------


class CentralIndex:
    """What the central service holds: the last document accepted per study,
    on the stand-in that tests use too (testkit.CentralService), with the
    storm's faults.

    A request is recorded when it is received, before the answer is written:
    a service commits, then answers; an answer lost on the way (a cut, a
    timeout) does not undo what it stored."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.documents: dict[int, dict] = {}
        self.posts: collections.Counter = collections.Counter()
        self.deletes: collections.Counter = collections.Counter()
        self.posts_without_counts = 0
        self.poison: set[int] = set()  # answered 500, never stored
        self.refused: set[int] = set()  # answered 403, never stored
        self.refuse_next = False  # the next study posted joins `refused`
        self.poison_posts = 0
        self.mode = "ok"
        self.port = free_port()
        self.service: CentralService | None = None
        self.open()

    def open(self) -> None:
        self.service = CentralService(keep=False, port=self.port)
        self.service.respond = self._respond

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    def _respond(self, number: int, request: Received) -> Reply:
        if request.method == "GET":
            return Reply(200)
        if self.mode == "503":
            return Reply(503, headers={"Retry-After": "1"})
        document = json.loads(request.body)
        pk = document["study_pk"]
        if request.method == "POST":
            refused = self._refused(pk)
            if refused is not None:
                return refused
        with self.lock:
            if request.method == "POST":
                self.documents[pk] = document
                self.posts[pk] += 1
                # Sent before the archive counted its series (arc-light:
                # before the study settled); reconcile would hide it.
                if document.get("study_series") is None:
                    self.posts_without_counts += 1
            else:
                self.documents.pop(pk, None)
                self.deletes[pk] += 1
        if self.mode == "cut":
            return Reply(cut=True)
        if self.mode == "slow":
            return Reply(201, delay_seconds=READ_TIMEOUT_SECONDS + 0.5)
        return Reply(201)

    def _refused(self, pk: int) -> Reply | None:
        """The poison study's 500, the refused study's 403."""
        if pk in self.poison:
            self.poison_posts += 1
            return Reply(500)
        if self.refuse_next:
            self.refuse_next = False
            self.refused.add(pk)
        return Reply(403) if pk in self.refused else None

    def set_mode(self, mode: str) -> None:
        if mode == "down" and self.service is not None:
            self.close()
            self._hold_port()
        elif mode != "down" and self.service is None:
            self._release_port()
            self.open()
        self.mode = mode

    def _hold_port(self) -> None:
        """While down, the port stays bound but does not listen: connections
        are refused, as by a service that is down, and no other server (a
        test or another storm running beside this one) can take the port and
        accept the client's POSTs in this index's place."""
        self.placeholder = socket.socket()
        # As asyncio's servers do: the closed service's connections linger in TIME_WAIT.
        self.placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.placeholder.bind(("127.0.0.1", self.port))

    def _release_port(self) -> None:
        placeholder = getattr(self, "placeholder", None)
        if placeholder is not None:
            placeholder.close()
            self.placeholder = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/register"


# --------------------------------------------------------------------------
# dcm4chee: what it does to its tables while images arrive
# --------------------------------------------------------------------------


class PacsWriter(threading.Thread):
    """What the archive does to its tables while images arrive, until
    stopped; a database that is down is waited for, as the archive's own
    pool would. Subclasses give the schema: its scripts, the archive stored
    before the install, the actions, and the documents the index must hold."""

    schema_sql: Path
    indexer_sql: Path
    charset = "utf8mb4"

    def __init__(self, db: PrivateMariaDB, rng: random.Random) -> None:
        super().__init__(name=type(self).__name__, daemon=True)
        self.db = db
        self.rng = rng
        self.stopping = threading.Event()
        self.counts: collections.Counter = collections.Counter()
        self.late: list[threading.Thread] = []
        self.uid = 0

    def run(self) -> None:
        conn = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = self.db.connect(PACS_USER, PACS_PASSWORD)
                self.act(conn)
            except (pymysql.MySQLError, OSError):
                self.counts["failed while the database was away"] += 1
                with contextlib.suppress(Exception):
                    conn.rollback()
                    conn.close()
                conn = None
                time.sleep(0.2)
            time.sleep(self.rng.uniform(0.01, 0.05))
        with contextlib.suppress(Exception):
            conn.close()
        for thread in self.late:
            thread.join()

    def act(self, conn: Any) -> None:
        raise NotImplementedError

    def seed_archive(self, cur: Any) -> None:
        raise NotImplementedError

    def expected_documents(self) -> dict[int, dict]:
        raise NotImplementedError

    def settle(self, delay_seconds: float = 0.0) -> int:
        """Whatever the archive still owes once the writes stop; how many
        studies it touched."""
        return 0

    def next_uid(self) -> str:
        self.uid += 1
        return f"1.2.826.0.1.3680043.9.{os.getpid()}.{self.uid}"

    def _pick(self, conn: Any, table: str, where: str = "") -> int | None:
        condition = f" AND {where}" if where else ""
        with conn.cursor() as cur:
            cur.execute(f"SELECT MAX(pk) AS m FROM {table}")
            top = cur.fetchone()["m"]
            if not top:
                return None
            # Recent rows more often, as in a PACS: series arrive for recent studies.
            low = max(1, top - 200) if self.rng.random() < 0.8 else 1
            cur.execute(
                f"SELECT pk FROM {table} WHERE pk >= %s{condition} ORDER BY pk LIMIT 1",
                (self.rng.randint(low, top),),
            )
            row = cur.fetchone()
            return row["pk"] if row else None

    def _late(self, work: Any) -> None:
        """Runs work(cursor) in a transaction that stays open a few seconds:
        its updated_time is older than rows committed meanwhile."""

        def run() -> None:
            try:
                conn = self.db.connect(PACS_USER, PACS_PASSWORD)
                with conn:
                    conn.begin()
                    with conn.cursor() as cur:
                        work(cur)
                    time.sleep(self.rng.uniform(*LATE_COMMIT_SECONDS))
                    conn.commit()
                self.counts["late commits"] += 1
            except (pymysql.MySQLError, OSError):
                self.counts["late commits lost to a restart"] += 1

        thread = threading.Thread(target=run, daemon=True)
        self.late.append(thread)
        thread.start()

    def _transaction(self, conn: Any, work: Any, late: bool = False) -> None:
        if late:
            self._late(work)
            return
        conn.begin()
        with conn.cursor() as cur:
            work(cur)
        conn.commit()


class Dcm4cheeWriter(PacsWriter):
    """dcm4chee 2.x: stores, edits, merges and deletes."""

    schema_sql = ROOT / "tests" / "dcm4chee_schema.sql"
    indexer_sql = ROOT / "extras" / "add_indexer.sql"
    charset = "latin1"

    def act(self, conn: Any) -> None:
        roll = self.rng.random()
        if roll < 0.45:
            self.store_study(conn, late=self.rng.random() < 0.1)
        elif roll < 0.80:
            self.store_series(conn, late=self.rng.random() < 0.1)
        elif roll < 0.88:
            self.edit_patient(conn)
        elif roll < 0.93:
            self.merge_patients(conn)
        elif roll < 0.97:
            self.delete_study(conn)

    def seed_archive(self, cur: Any) -> None:
        for i in range(ARCHIVE_STUDIES):
            if i % 2 == 0:
                cur.execute(
                    "INSERT INTO patient (pat_id, pat_name, created_time, updated_time)"
                    " VALUES (%s, %s, '2019-03-04', '2019-03-04')",
                    (f"{10000000 + i}-{i % 10}", f"ARCHIVO^{i}"),
                )
                patient = cur.lastrowid
            cur.execute(
                "INSERT INTO study (patient_fk, study_iuid, study_datetime, study_desc,"
                " mods_in_study, num_series, num_instances, availability, study_status,"
                " created_time, updated_time) VALUES (%s, %s, '2019-03-04 10:00:00',"
                " 'RX TORAX', 'CR', 1, 2, 0, 0, '2019-03-04', '2019-03-04')",
                (patient, f"1.2.3.archive.{i}"),
            )

    def store_study(self, conn: Any, late: bool) -> None:
        patient = self._pick(conn, "patient") if self.rng.random() < 0.5 else None

        def work(cur: Any) -> None:
            nonlocal patient
            if patient is None:
                n = self.rng.randint(1, 10**7)
                cur.execute(
                    "INSERT INTO patient (pat_id, pat_name, created_time, updated_time)"
                    " VALUES (%s, %s, NOW(), NOW())",
                    (f"{n}-{n % 10}", f"PACIENTE^NÚMERO{n}^ÑANDÚ"),
                )
                patient = cur.lastrowid
            cur.execute(
                "INSERT INTO study (patient_fk, study_iuid, study_datetime, study_desc,"
                " mods_in_study, num_series, num_instances, availability, study_status,"
                " created_time, updated_time) VALUES (%s, %s, NOW(), 'TC CEREBRO', 'CT',"
                " 1, %s, 0, 0, NOW(), NOW())",
                (patient, self.next_uid(), self.rng.randint(1, 300)),
            )

        self._transaction(conn, work, late)
        self.counts["studies stored"] += 1

    def store_series(self, conn: Any, late: bool) -> None:
        study = self._pick(conn, "study")
        if study is None:
            return

        def work(cur: Any) -> None:
            cur.execute(
                "UPDATE study SET num_series = num_series + 1, num_instances = num_instances + %s,"
                " mods_in_study = %s, updated_time = NOW() WHERE pk = %s",
                (self.rng.randint(1, 50), self.rng.choice(["CT\\SR", "MR", "CT\\PR"]), study),
            )

        self._transaction(conn, work, late)
        self.counts["series stored"] += 1

    def edit_patient(self, conn: Any) -> None:
        patient = self._pick(conn, "patient")
        if patient is not None:
            with conn.cursor() as cur:
                cur.execute(
                    "UPDATE patient SET pat_name = %s, updated_time = NOW() WHERE pk = %s",
                    (f"CORREGIDO^{self.rng.randint(1, 999)}^JOSÉ", patient),
                )
            self.counts["patient edits"] += 1

    def merge_patients(self, conn: Any) -> None:
        prior, dominant = self._pick(conn, "patient"), self._pick(conn, "patient")
        if prior is None or dominant is None or prior == dominant:
            return

        def work(cur: Any) -> None:
            # Moves the studies; their updated_time is left as it was (the
            # worst case: only reconcile can see the move).
            cur.execute("UPDATE study SET patient_fk = %s WHERE patient_fk = %s", (dominant, prior))
            cur.execute("UPDATE patient SET merge_fk = %s WHERE pk = %s", (dominant, prior))

        self._transaction(conn, work)
        self.counts["patient merges"] += 1

    def delete_study(self, conn: Any) -> None:
        study = self._pick(conn, "study")
        if study is not None:
            with conn.cursor() as cur:
                cur.execute("DELETE FROM study WHERE pk = %s", (study,))
            self.counts["studies deleted"] += 1

    def expected_documents(self) -> dict[int, dict]:
        rows = self.db.admin(
            "SELECT s.pk, s.study_iuid, s.study_datetime, s.study_desc, s.mods_in_study,"
            " s.num_series, s.num_instances, p.pk AS patient_pk, p.pat_id, p.pat_name"
            " FROM study s LEFT JOIN patient p ON p.pk = s.patient_fk",
            database=DATABASE,
        )
        return {
            row["pk"]: {
                "patient_pk": row["patient_pk"],
                "patient_id": _text(row["pat_id"]),
                "patient_name": _text(row["pat_name"]),
                "study_pk": row["pk"],
                "study_iuid": _text(row["study_iuid"]),
                "study_datetime": row["study_datetime"].strftime("%Y-%m-%d %H:%M:%S")
                if row["study_datetime"]
                else None,
                "study_description": _text(row["study_desc"]),
                "study_modality": _text(row["mods_in_study"]),
                "study_series": row["num_series"],
                "study_instances": row["num_instances"],
                "center": CENTER,
            }
            for row in rows
        }


# The archive's series and instances, reduced to what its size scheduler
# counts: arc-light's own series and instance tables, which the indexer
# never reads, stand behind this one in a real archive.
ARC_SERIES_SQL = """
CREATE TABLE storm_series (
  pk BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  study_fk BIGINT NOT NULL,
  modality VARCHAR(16) NOT NULL,
  num_instances INTEGER NOT NULL,
  rejected TINYINT NOT NULL DEFAULT 0,
  INDEX storm_series_study (study_fk)
) ENGINE=InnoDB
"""
ARC_VIEWS = ("hideRejected", "regularUse")
ARC_SETTLE_DELAY_SECONDS = 1.0  # dcmCalculateStudySizeDelay (PT5M at a site)
ARC_SETTLE_INTERVAL_SECONDS = 0.5  # dcmCalculateStudySizePollingInterval


class ArcLightWriter(PacsWriter):
    """dcm4chee-arc-light 5: stores (the counts cache dropped, the size
    reset), edits patients, merges them (studies moved, each a JPA update),
    rejects series or whole studies, and hard-deletes studies; its size
    scheduler, a thread of its own, settles studies a moment after their
    last store, as arc-light's StudySizeScheduler does minutes later."""

    schema_sql = ROOT / "tests" / "arclight5_schema.sql"
    indexer_sql = ROOT / "extras" / "add_indexer_arclight5_mysql.sql"

    def __init__(self, db: PrivateMariaDB, rng: random.Random) -> None:
        super().__init__(db, rng)
        self.scheduler = threading.Thread(target=self._schedule, name="arc-size", daemon=True)

    def start(self) -> None:
        super().start()
        self.scheduler.start()

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        self.scheduler.join(timeout)

    def act(self, conn: Any) -> None:
        roll = self.rng.random()
        if roll < 0.40:
            self.store_study(conn, late=self.rng.random() < 0.1)
        elif roll < 0.72:
            self.store_series(conn, late=self.rng.random() < 0.1)
        elif roll < 0.80:
            self.edit_patient(conn)
        elif roll < 0.85:
            self.merge_patients(conn)
        elif roll < 0.91:
            self.reject(conn, whole_study=self.rng.random() < 0.3)
        elif roll < 0.96:
            self.delete_study(conn)

    # -- the archive's writes -----------------------------------------------

    def _add_patient(self, cur: Any, name: str, stamp: str = "NOW(6)") -> int:
        self.uid += 1
        cur.execute(
            "INSERT INTO person_name (alphabetic_name, ideographic_name, phonetic_name)"
            " VALUES (%s, '^^^^^', '^^^^^')",
            (name,),
        )
        cur.execute(
            "INSERT INTO patient (created_time, updated_time, version, pat_name_fk, num_studies)"
            f" VALUES ({stamp}, {stamp}, 0, %s, 0)",
            (cur.lastrowid,),
        )
        patient = cur.lastrowid
        # PatientID first, then the Other Patient IDs arc-light trusts.
        ids = [f"{20_000_000 + self.uid}-{self.uid % 10}"]
        if self.rng.random() < 0.3:
            ids.append(f"OTRO{self.uid}")
        for pat_id in ids:
            cur.execute(
                "INSERT INTO patient_id (pat_id, version, patient_fk) VALUES (%s, 0, %s)",
                (pat_id, patient),
            )
        return patient

    def _add_series(self, cur: Any, study: int) -> None:
        cur.execute(
            "INSERT INTO storm_series (study_fk, modality, num_instances) VALUES (%s, %s, %s)",
            (study, self.rng.choice(("CT", "MR", "SR", "PR", "CT")), self.rng.randint(1, 300)),
        )

    @staticmethod
    def _touch(cur: Any, study: int, assignments: str) -> None:
        """A JPA update of the study row: @PreUpdate stamps updated_time and
        access_time, @Version bumps version."""
        cur.execute(
            f"UPDATE study SET {assignments}, updated_time = NOW(6), access_time = NOW(6),"
            " version = version + 1 WHERE pk = %s",
            (study,),
        )

    def seed_archive(self, cur: Any) -> None:
        cur.execute(ARC_SERIES_SQL)
        for i in range(ARCHIVE_STUDIES):
            if i % 2 == 0:
                patient = self._add_patient(cur, f"ARCHIVO^{i}^^^^", "'2019-03-04'")
            cur.execute(
                "INSERT INTO study (study_iuid, study_date, study_time, study_desc, patient_fk,"
                " created_time, updated_time, modified_time, access_time, version,"
                " rejection_state, study_size) VALUES (%s, '20190304', '100000.000',"
                " 'RX TORAX', %s, '2019-03-04', '2019-03-04', '2019-03-04', '2019-03-04',"
                " 0, 0, -1)",
                (f"1.2.3.archive.{i}", patient),
            )
            self._add_series(cur, cur.lastrowid)
        self.settle()  # the archive was settled long before the install

    def store_study(self, conn: Any, late: bool) -> None:
        patient = (
            self._pick(conn, "patient", "merge_fk IS NULL") if self.rng.random() < 0.5 else None
        )

        def work(cur: Any) -> None:
            nonlocal patient
            if patient is None:
                patient = self._add_patient(cur, f"PACIENTE^NÚMERO{self.uid}^ÑANDÚ^^^")
            cur.execute(
                "INSERT INTO study (study_iuid, study_date, study_time, study_desc, patient_fk,"
                " created_time, updated_time, modified_time, access_time, version,"
                " rejection_state, study_size) VALUES (%s, DATE_FORMAT(NOW(), '%%Y%%m%%d'),"
                " %s, %s, %s, NOW(6), NOW(6), NOW(6), NOW(6), 0, 0, -1)",
                (
                    self.next_uid(),
                    "*" if self.rng.random() < 0.1 else time.strftime("%H%M%S.000"),
                    "*" if self.rng.random() < 0.1 else "TC CEREBRO",
                    patient,
                ),
            )
            self._add_series(cur, cur.lastrowid)

        self._transaction(conn, work, late)
        self.counts["studies stored"] += 1

    def store_series(self, conn: Any, late: bool) -> None:
        study = self._pick(conn, "study", "rejection_state < 2")
        if study is None:
            return

        def work(cur: Any) -> None:
            cur.execute("SELECT study_size FROM study WHERE pk = %s FOR UPDATE", (study,))
            row = cur.fetchone()
            if row is None:
                return
            self._add_series(cur, study)
            cur.execute("DELETE FROM study_query_attrs WHERE study_fk = %s", (study,))
            if row["study_size"] >= 0:
                # After the size was computed: resetSize() flushes the entity.
                self._touch(cur, study, "study_size = -1")
            # While the study is hot, only the cache is dropped.

        self._transaction(conn, work, late)
        self.counts["series stored"] += 1

    def edit_patient(self, conn: Any) -> None:
        patient = self._pick(conn, "patient")
        if patient is None:
            return

        def work(cur: Any) -> None:
            cur.execute(
                "UPDATE person_name SET alphabetic_name = %s"
                " WHERE pk = (SELECT pat_name_fk FROM patient WHERE pk = %s)",
                (f"CORREGIDO^{self.rng.randint(1, 999)}^JOSÉ^^^", patient),
            )
            cur.execute(
                "UPDATE patient SET updated_time = NOW(6), version = version + 1 WHERE pk = %s",
                (patient,),
            )

        self._transaction(conn, work)
        self.counts["patient edits"] += 1

    def merge_patients(self, conn: Any) -> None:
        source = self._pick(conn, "patient", "merge_fk IS NULL")
        target = self._pick(conn, "patient", "merge_fk IS NULL")
        if source is None or target is None or source == target:
            return

        def work(cur: Any) -> None:
            cur.execute(
                "SELECT pk FROM study WHERE patient_fk = %s ORDER BY pk FOR UPDATE", (source,)
            )
            for row in cur.fetchall():
                self._touch(cur, row["pk"], f"patient_fk = {int(target)}")
            cur.execute("UPDATE patient SET merge_fk = %s WHERE pk = %s", (target, source))

        self._transaction(conn, work)
        self.counts["patient merges"] += 1

    def reject(self, conn: Any, whole_study: bool) -> None:
        """An IOCM rejection note: one series or all of them; the study's
        rejection_state becomes 1 (PARTIAL) or 2 (COMPLETE, nothing left)."""
        study = self._pick(conn, "study", "rejection_state < 2")
        if study is None:
            return

        def work(cur: Any) -> None:
            cur.execute("SELECT pk FROM study WHERE pk = %s FOR UPDATE", (study,))
            if cur.fetchone() is None:
                return
            cur.execute(
                "SELECT COUNT(*) AS visible FROM storm_series WHERE study_fk = %s AND rejected = 0",
                (study,),
            )
            if not whole_study and cur.fetchone()["visible"] < 2:
                return  # one series left: rejecting it is a whole-study rejection
            cur.execute(
                "UPDATE storm_series SET rejected = 1 WHERE study_fk = %s AND rejected = 0"
                + ("" if whole_study else " ORDER BY pk LIMIT 1"),
                (study,),
            )
            cur.execute(
                "SELECT COUNT(*) AS visible FROM storm_series WHERE study_fk = %s AND rejected = 0",
                (study,),
            )
            state = 1 if cur.fetchone()["visible"] else 2
            cur.execute("DELETE FROM study_query_attrs WHERE study_fk = %s", (study,))
            self._touch(cur, study, f"rejection_state = {state}, study_size = -1")
            self.counts["studies rejected" if state == 2 else "series rejected"] += 1

        self._transaction(conn, work)

    def delete_study(self, conn: Any) -> None:
        study = self._pick(conn, "study")
        if study is None:
            return

        def work(cur: Any) -> None:
            for table, column in (
                ("storm_series", "study_fk"),
                ("study_query_attrs", "study_fk"),
                ("study", "pk"),
            ):
                cur.execute(f"DELETE FROM {table} WHERE {column} = %s", (study,))

        self._transaction(conn, work)
        self.counts["studies deleted"] += 1

    # -- the size scheduler --------------------------------------------------

    def _schedule(self) -> None:
        while not self.stopping.wait(ARC_SETTLE_INTERVAL_SECONDS):
            try:
                self.counts["studies settled"] += self.settle(ARC_SETTLE_DELAY_SECONDS)
            except (pymysql.MySQLError, OSError):
                self.counts["settling failed while the database was away"] += 1

    def settle(self, delay_seconds: float = 0.0) -> int:
        """StudySizeScheduler: every study whose size is unknown and that was
        last updated over `delay_seconds` ago gets its size (a bulk update:
        updated_time unchanged) and its counts for every view."""
        conn = self.db.connect(PACS_USER, PACS_PASSWORD)
        settled = 0
        with conn:
            with conn.cursor() as cur:
                cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                cur.execute(
                    "SELECT pk FROM study WHERE study_size = -1"
                    " AND updated_time < NOW(6) - INTERVAL %s MICROSECOND",
                    (int(delay_seconds * 1e6),),
                )
                candidates = [row["pk"] for row in cur.fetchall()]
            for study in candidates:
                conn.begin()
                with conn.cursor() as cur:
                    # A store still open on this study is passed over, as
                    # arc-light's claim (study_size -2) would be.
                    cur.execute(
                        "SELECT pk FROM study WHERE pk = %s AND study_size = -1"
                        " FOR UPDATE SKIP LOCKED",
                        (study,),
                    )
                    if cur.fetchone() is None:
                        conn.rollback()
                        continue
                    cur.execute("SELECT * FROM storm_series WHERE study_fk = %s", (study,))
                    series = cur.fetchall()
                    cur.execute("DELETE FROM study_query_attrs WHERE study_fk = %s", (study,))
                    for view in ARC_VIEWS:
                        shown = [s for s in series if view != "hideRejected" or not s["rejected"]]
                        # A set, in no particular order, as arc-light builds it.
                        mods = list({s["modality"] for s in shown})
                        self.rng.shuffle(mods)
                        cur.execute(
                            "INSERT INTO study_query_attrs (study_fk, view_id, num_series,"
                            " num_instances, mods_in_study) VALUES (%s, %s, %s, %s, %s)",
                            (
                                study,
                                view,
                                len(shown),
                                sum(s["num_instances"] for s in shown),
                                "\\".join(mods) or None,
                            ),
                        )
                    cur.execute(
                        "UPDATE study SET study_size = %s WHERE pk = %s",
                        (500 * sum(s["num_instances"] for s in series), study),
                    )
                conn.commit()
                settled += 1
        return settled

    def expected_documents(self) -> dict[int, dict]:
        """The documents a 2.x site would send for what arc-light holds,
        written out here on their own: the client's mapping is what is checked."""
        rows = self.db.admin(
            "SELECT s.pk, s.study_iuid, s.study_date, s.study_time, s.study_desc,"
            " p.pk AS patient_pk, n.alphabetic_name,"
            " (SELECT i.pat_id FROM patient_id i WHERE i.patient_fk = p.pk"
            "  ORDER BY i.pk LIMIT 1) AS pat_id,"
            " a.num_series, a.num_instances, a.mods_in_study"
            " FROM study s JOIN patient p ON p.pk = s.patient_fk"
            " LEFT JOIN person_name n ON n.pk = p.pat_name_fk"
            " LEFT JOIN study_query_attrs a ON a.study_fk = s.pk AND a.view_id = 'hideRejected'"
            " WHERE s.rejection_state <> 2",
            database=DATABASE,
        )
        documents = {}
        for row in rows:
            date, clock = _text(row["study_date"]), _text(row["study_time"])
            description = _text(row["study_desc"])
            clock = "000000" if clock == "*" else clock[:6]
            mods = _text(row["mods_in_study"])
            documents[row["pk"]] = {
                "patient_pk": row["patient_pk"],
                "patient_id": _text(row["pat_id"]),
                "patient_name": _text(row["alphabetic_name"]).rstrip("^") or None,
                "study_pk": row["pk"],
                "study_iuid": _text(row["study_iuid"]),
                "study_datetime": f"{date[:4]}-{date[4:6]}-{date[6:]}"
                f" {clock[:2]}:{clock[2:4]}:{clock[4:]}",
                "study_description": None if description == "*" else description,
                "study_modality": "\\".join(sorted(mods.split("\\"))) if mods else None,
                "study_series": row["num_series"],
                "study_instances": row["num_instances"],
                "center": CENTER,
            }
        return documents


WRITERS = {"dcm4chee2": Dcm4cheeWriter, "arc5": ArcLightWriter}


# --------------------------------------------------------------------------
# The storm
# --------------------------------------------------------------------------


class Storm:
    def __init__(
        self, directory: Path, seconds: float, seed: int, repeats: int, schema: str = "dcm4chee2"
    ) -> None:
        self.directory = directory
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.repeats = repeats
        self.db = PrivateMariaDB(directory / "mariadb")
        self.writer = WRITERS[schema](self.db, self.rng)
        self.index = CentralIndex()
        self.ticks: list[subprocess.Popen] = []
        self.exit_codes: collections.Counter = collections.Counter()
        self.faults: collections.Counter = collections.Counter()
        self.service_fault_until = 0.0
        self.current = ""  # the fault being injected
        self.log_lines: list[str] = []
        self.refused_studies: set[int] = set()  # every study the service refused

    # -- set-up -------------------------------------------------------------

    def prepare(self) -> None:
        (self.directory / "mariadb").mkdir(parents=True, exist_ok=True)
        self.db.install()
        self.db.start()
        self.db.admin(f"CREATE DATABASE {DATABASE} CHARACTER SET {self.writer.charset}")
        self.db.run_file(DATABASE, self.writer.schema_sql)
        for user, password in ((INDEXER_USER, INDEXER_PASSWORD), (PACS_USER, PACS_PASSWORD)):
            self.db.admin(f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'")
            self.db.admin(f"GRANT ALL ON {DATABASE}.* TO '{user}'@'%'")
        # An archive from before the install, for `initial`; one of its
        # studies the service cannot take until the faults stop.
        conn = self.db.connect(PACS_USER, PACS_PASSWORD)
        with conn, conn.cursor() as cur:
            self.writer.seed_archive(cur)
        self.index.poison.add(self.rng.randint(1, ARCHIVE_STUDIES))
        self.db.run_file(DATABASE, self.writer.indexer_sql)
        config = {
            "database": {
                "host": "127.0.0.1",
                "port": self.db.port,
                "user": INDEXER_USER,
                "password": INDEXER_PASSWORD,
                "name": DATABASE,
            },
            "key": "storm-key",
            "webservice_url": self.index.url,
            "send_deletes": True,
            # "concurrency" left out: the default, "auto", is what sites run.
            "page_size": 100,
            "read_timeout_seconds": READ_TIMEOUT_SECONDS,
            "connect_timeout_seconds": 1,
            "max_retries": 1,
            "backoff_seconds": 0.05,
            "reconcile_rows_per_second": 20000,
            "nice": 0,
        }
        (self.directory / "config.json").write_text(json.dumps(config))
        (self.directory / "server.json").write_text(json.dumps({"server": CENTER}))
        for name in ("config.json", "server.json"):
            (self.directory / name).chmod(0o600)

    def client(self, *command: str) -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                str(CLIENT),
                *command,
                "-q",
                "--config",
                str(self.directory / "config.json"),
                "--server",
                str(self.directory / "server.json"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def say(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        self.log_lines.append(line)
        print(line, file=sys.stderr, flush=True)

    # -- the storm ----------------------------------------------------------

    def reap(self) -> None:
        for process in list(self.ticks):
            code = process.poll()
            if code is not None:
                _, err = process.communicate()
                self.exit_codes[code] += 1
                self.ticks.remove(process)
                # -9: killed; -15: SIGTERM before the client set its handler
                # (still importing), with nothing started.
                if code not in (0, 4, 5, 6, 8, 143, -9, -15) or "Traceback" in err:
                    self.say(f"unexpected: exit {code}: {err.strip()[-500:]}")
                    self.exit_codes["unexpected"] += 1

    def running_tick(self) -> subprocess.Popen | None:
        """A tick caught sending: a fault that should bite mid-run waits for
        the service to receive a study after the tick started (a tick with
        little to do lasts a fraction of a second). A tick that ends without
        sending (on arc-light, every new study may still be unsettled) is
        followed by another, a few times."""
        for _ in range(MID_RUN_ATTEMPTS):
            self.reap()
            live = [p for p in self.ticks if p.poll() is None and p.args[2:3] != ["reconcile"]]
            tick = live[-1] if live else None
            if tick is None:
                tick = self.client()
                self.ticks.append(tick)
            posts = sum(self.index.posts.values())
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and tick.poll() is None:
                if sum(self.index.posts.values()) > posts:
                    time.sleep(self.rng.uniform(0, 0.05))
                    break
                time.sleep(0.005)
            if tick.poll() is None:
                self.faults[self.current + " (mid-run)"] += 1
                return tick
        return None

    def inject(self, fault: str) -> None:
        self.faults[fault] += 1
        self.current = fault
        self.say(f"fault: {fault}")
        if fault in ("sigkill", "sigterm"):
            if fault == "sigterm":
                # The stop arrives with requests in flight: with "auto" a tick
                # can post its few studies and end before a signal sent just
                # after its first post lands, and then nothing is stopped.
                self.index.set_mode("slow")
            tick = self.running_tick()
            if tick is not None:
                tick.send_signal(signal.SIGKILL if fault == "sigkill" else signal.SIGTERM)
            self.index.set_mode("ok")
        elif fault == "db_restart":
            self.running_tick()
            self.db.restart(down_seconds=self.rng.uniform(0.5, 3.0))
        elif fault == "kill_connection":
            self.running_tick()
            with contextlib.suppress(pymysql.MySQLError):
                for row in self.db.admin(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s",
                    (INDEXER_USER,),
                ):
                    with contextlib.suppress(pymysql.MySQLError):
                        self.db.admin(f"KILL {int(row['ID'])}")
        elif fault.startswith("service_"):
            self.index.set_mode(fault[len("service_") :])
            self.service_fault_until = time.monotonic() + self.rng.uniform(*SERVICE_FAULT_SECONDS)
        elif fault == "study_403":
            self.index.refuse_next = True
            self.service_fault_until = time.monotonic() + self.rng.uniform(*SERVICE_FAULT_SECONDS)
        elif fault == "reconcile_beside":
            self.running_tick()
            self.ticks.append(self.client("reconcile"))

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.prepare()
        writer = self.writer
        writer.start()
        self.ticks.append(self.client("initial"))
        schedule = sorted(
            (self.rng.uniform(0.05, 0.95) * self.seconds, fault)
            for fault in FAULTS
            for _ in range(self.repeats)
        )
        storm_started = time.monotonic()
        last_tick = storm_started
        while time.monotonic() - storm_started < self.seconds or schedule:
            now = time.monotonic() - storm_started
            self.reap()
            if self.service_fault_until and time.monotonic() > self.service_fault_until:
                self._service_heals()
            if schedule and schedule[0][0] <= now and not self.service_fault_until:
                self.inject(schedule.pop(0)[1])
            if not self.ticks and time.monotonic() - last_tick >= TICK_INTERVAL_SECONDS:
                self.ticks.append(self.client())  # cron
                last_tick = time.monotonic()
            time.sleep(0.05)
        self.say("faults stop")
        writer.stopping.set()
        writer.join()
        writer.settle()
        self._service_heals()
        poison = set(self.index.poison)
        self.index.poison.clear()
        for process in self.ticks:
            process.wait()
        self.reap()
        storm_seconds = time.monotonic() - storm_started

        # What an administrator finds: `status` lists the failed studies;
        # after the fix, `retry-failed` sends them, and the studies waiting
        # after a failure (which, an hour later, would go by themselves).
        failed = {
            row["study_pk"]
            for row in self.db.admin(
                "SELECT study_pk FROM study_service WHERE status = 'failed'", database=DATABASE
            )
        }
        self.db.admin(
            "UPDATE study_service SET next_attempt_at = NOW(6) WHERE next_attempt_at > NOW(6)",
            database=DATABASE,
        )
        final_codes = []
        for command in (("reconcile",), ("retry-failed",)):
            process = self.client(*command)
            _, err = process.communicate()
            final_codes.append(process.returncode)
            if process.returncode != 0:
                self.say(f"final {' '.join(command) or 'run'}: exit {process.returncode}: {err}")
        differences = self.compare()
        differences += [
            f"study {pk}: marked failed; the service refused only {sorted(self.refused_studies)}"
            for pk in sorted(failed - self.refused_studies)
        ]
        posts = sum(self.index.posts.values())
        db_studies = len(self.writer.expected_documents())
        result = {
            "seconds": round(storm_seconds, 1),
            "total_seconds": round(time.monotonic() - started, 1),
            "faults": dict(sorted(self.faults.items())),
            "tick_exit_codes": {str(k): v for k, v in sorted(self.exit_codes.items(), key=str)},
            "writer": dict(sorted(writer.counts.items())),
            "studies_in_pacs": db_studies,
            "posts": posts,
            "studies_posted": len(self.index.posts),
            "posts_per_study": round(posts / max(1, len(self.index.posts)), 2),
            "max_posts_one_study": max(self.index.posts.values(), default=0),
            "deletes": sum(self.index.deletes.values()),
            "posts_without_counts": self.index.posts_without_counts,
            "poison_study": sorted(poison),
            "poison_posts": self.index.poison_posts,
            "refused_studies": sorted(self.refused_studies),
            "failed_before_retry": sorted(failed),
            "final_exit_codes": final_codes,
            "differences": differences,
        }
        return result

    def _service_heals(self) -> None:
        """A service fault ends: the service answers, and takes every study."""
        self.index.set_mode("ok")
        self.index.refuse_next = False
        self.refused_studies |= self.index.refused
        self.index.refused.clear()
        self.service_fault_until = 0.0

    # -- the verdict --------------------------------------------------------

    def compare(self) -> list[str]:
        expected = self.writer.expected_documents()
        differences = []
        for pk, document in expected.items():
            held = self.index.documents.get(pk)
            if held != document:
                differences.append(f"study {pk}: index holds {held}, PACS has {document}")
        for pk in sorted(set(self.index.documents) - set(expected)):
            differences.append(f"study {pk}: deleted from the PACS, still in the index")
        rows = self.db.admin(
            "SELECT study_pk, status FROM study_service WHERE study_pk > 0"
            " AND status NOT IN ('sent', 'deleted')",
            database=DATABASE,
        )
        differences += [f"study_service {r['study_pk']}: status {r['status']}" for r in rows]
        rows = self.db.admin(
            "SELECT study_pk FROM study_service WHERE study_pk < 0", database=DATABASE
        )
        differences += [f"study_service bookkeeping row {r['study_pk']} left" for r in rows]
        missing = set(expected) - {
            r["study_pk"]
            for r in self.db.admin("SELECT study_pk FROM study_service", database=DATABASE)
        }
        differences += [f"study {pk}: no study_service row" for pk in sorted(missing)]
        return differences

    def close(self) -> None:
        for process in self.ticks:
            with contextlib.suppress(OSError):
                process.kill()
        self.index.close()
        self.db.stop()


def _text(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def run_storm(
    seconds: float,
    seed: int,
    repeats: int,
    keep: Path | None = None,
    schema: str = "dcm4chee2",
) -> dict:
    """One storm in a temporary directory (or `keep`); returns its report."""
    directory = keep or Path(tempfile.mkdtemp(prefix="dicom-indexer-storm-"))
    storm = Storm(directory, seconds, seed, repeats, schema)
    try:
        result = storm.run()
        result["seed"] = seed
        result["schema"] = schema
        return result
    finally:
        storm.close()
        if keep is None:
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1800, help="how long faults go on")
    parser.add_argument("--repeats", type=int, default=0, help="each fault at least this often")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--schema",
        choices=sorted(WRITERS),
        default="dcm4chee2",
        help="the archive the writer imitates (default dcm4chee2)",
    )
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(10**6)
    # By default, about one fault every 20 s on a long run, at least 3 each.
    repeats = args.repeats or max(3, int(args.seconds / 20 / len(FAULTS)))
    result = run_storm(args.seconds, seed, repeats, args.keep, args.schema)
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if not result["differences"] and result["final_exit_codes"] == [0, 0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
