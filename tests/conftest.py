"""Real parts for the tests: a throwaway MariaDB/MySQL database built from the
project's own SQL, and a recording HTTP server on loopback that can be told
to fail."""

from __future__ import annotations

import datetime
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pymysql
import pymysql.cursors
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA_SQL = ROOT / "tests" / "dcm4chee_schema.sql"
INDEXER_SQL = ROOT / "extras" / "add_indexer.sql"
GRANT_SQL = ROOT / "extras" / "grant_indexer.sql"

DB_HOST = os.environ.get("DICOM_INDEXER_TEST_DB_HOST", "127.0.0.1")
DB_PORT = int(os.environ.get("DICOM_INDEXER_TEST_DB_PORT", "3306"))
DB_USER = os.environ.get("DICOM_INDEXER_TEST_DB_USER", "root")
DB_PASSWORD = os.environ.get("DICOM_INDEXER_TEST_DB_PASSWORD", "")

LONG_AGO = datetime.datetime(2019, 3, 4, 10, 0, 0)


def connect(database: str | None = None, **extra: Any) -> pymysql.connections.Connection:
    return pymysql.connect(
        host=DB_HOST,
        port=DB_PORT,
        user=DB_USER,
        password=DB_PASSWORD,
        database=database,
        charset="utf8mb4",
        autocommit=True,
        cursorclass=pymysql.cursors.DictCursor,
        **extra,
    )


def mysql_client() -> str:
    for name in ("mysql", "mariadb"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no mysql command-line client on PATH")


def run_sql_file(database: str, path: Path, init: str | None = None) -> subprocess.CompletedProcess:
    """`mysql DBNAME < file`, exactly as the README tells an administrator."""
    env = dict(os.environ, MYSQL_PWD=DB_PASSWORD)
    command = [mysql_client(), "-h", DB_HOST, "-P", str(DB_PORT), "-u", DB_USER, database]
    if init:
        command.append(f"--init-command={init}")
    with open(path, "rb") as stdin:
        return subprocess.run(command, stdin=stdin, capture_output=True, env=env, check=False)


def install(database: str, path: Path = INDEXER_SQL) -> None:
    result = run_sql_file(database, path)
    assert result.returncode == 0, result.stderr.decode()


class PacsDb:
    """A dcm4chee-like database for one test, with helpers to act as dcm4chee."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = connect(name)
        self._uid = 0

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def execute(self, sql: str, args: Any = None) -> int:
        with self.conn.cursor() as cur:
            return cur.execute(sql, args)

    def add_patient(
        self, name: str | None = "PEREZ^JUAN", pat_id: str | None = "12345678-5"
    ) -> int:
        with self.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO patient (pat_id, pat_name, pat_birthdate, pat_sex, created_time,"
                " updated_time) VALUES (%s, %s, '19700101', 'M', %s, %s)",
                (pat_id, name, LONG_AGO, LONG_AGO),
            )
            return cur.lastrowid

    def add_study(
        self,
        patient_pk: int | None,
        *,
        desc: str | None = "TC CEREBRO",
        mods: str | None = "CT",
        num_series: int = 1,
        num_instances: int = 10,
        study_datetime: Any = LONG_AGO,
        updated_time: Any = None,
        iuid: str | None = None,
    ) -> int:
        """A study as dcm4chee stores it; updated_time defaults to the server's NOW()."""
        self._uid += 1
        iuid = iuid or f"1.2.840.113619.2.{uuid.uuid4().int % 10**12}.{self._uid}"
        with self.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO study (patient_fk, study_iuid, study_datetime, study_desc,"
                " mods_in_study, num_series, num_instances, availability, study_status,"
                " created_time, updated_time, study_attrs)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, 0, 0, IFNULL(%s, NOW()), IFNULL(%s, NOW()),"
                " 'attrs')",
                (
                    patient_pk,
                    iuid,
                    study_datetime,
                    desc,
                    mods,
                    num_series,
                    num_instances,
                    updated_time,
                    updated_time,
                ),
            )
            return cur.lastrowid

    def add_studies(self, count: int, updated_time: Any = LONG_AGO) -> list[int]:
        """Many studies at once, two per patient."""
        pks = []
        for i in range(count):
            if i % 2 == 0:
                patient = self.add_patient(f"PACIENTE^NUMERO{i}", f"{10000000 + i}-{i % 10}")
            pks.append(self.add_study(patient, updated_time=updated_time))
        return pks

    def store_series(self, study_pk: int, mods: str = "CT\\SR", instances: int = 5) -> None:
        """What dcm4chee does when a new series arrives: derived fields change."""
        self.execute(
            "UPDATE study SET num_series = num_series + 1, num_instances = num_instances + %s,"
            " mods_in_study = %s, updated_time = NOW() WHERE pk = %s",
            (instances, mods, study_pk),
        )

    def archive_predates_install(self) -> None:
        """As add_indexer.sql leaves a site whose studies were there before it:
        the tick's cursor past them, so only `initial` sends them."""
        self.execute(
            "UPDATE study_service SET cursor_pk = (SELECT MAX(pk) FROM study),"
            " study_updated_time = NOW() WHERE study_pk = 0"
        )

    def queue(self) -> dict[int, dict[str, Any]]:
        rows = self.query("SELECT * FROM study_service WHERE study_pk > 0")
        return {row["study_pk"]: row for row in rows}

    def statuses(self) -> dict[str, int]:
        rows = self.query(
            "SELECT status, COUNT(*) AS n FROM study_service WHERE study_pk > 0 GROUP BY status"
        )
        return {row["status"]: row["n"] for row in rows}

    def close(self) -> None:
        self.conn.close()


def create_database(charset: str = "utf8") -> str:
    name = f"dicom_indexer_test_{uuid.uuid4().hex[:10]}"
    assert name != "pacsdb"
    with connect() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET {charset}")
    install(name, SCHEMA_SQL)
    install(name)
    grant_indexer_user(name)
    return name


def drop_database(name: str) -> None:
    with connect() as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


# The client runs as the least-privilege user that extras/grant_indexer.sql
# creates, so a privilege the script forgot fails a test. One user per test
# session, with access to the session's databases only.
INDEXER_USER = f"dit_{uuid.uuid4().hex[:10]}"
INDEXER_PASSWORD = f"pw-{uuid.uuid4().hex}"


def grant_indexer_user(database: str) -> None:
    init = (
        f"SET @indexer_user = '{INDEXER_USER}', @indexer_host = '%',"
        f" @indexer_password = '{INDEXER_PASSWORD}'"
    )
    result = run_sql_file(database, GRANT_SQL, init=init)
    assert result.returncode == 0, result.stderr.decode()


@pytest.fixture(scope="session")
def database_name() -> Any:
    try:
        connect().close()
    except pymysql.MySQLError as exc:
        pytest.exit(f"no MySQL/MariaDB server at {DB_HOST}:{DB_PORT}: {exc}", returncode=3)
    name = create_database("utf8")
    yield name
    drop_database(name)
    with connect() as conn, conn.cursor() as cur:
        cur.execute(f"DROP USER IF EXISTS '{INDEXER_USER}'@'%'")


@pytest.fixture
def pacs(database_name: str) -> Any:
    """The session's database, emptied and with a fresh indexer install."""
    db = PacsDb(database_name)
    db.execute("SET FOREIGN_KEY_CHECKS = 0")
    for table in ("study_service", "series", "study", "patient"):
        db.execute(f"TRUNCATE TABLE {table}")
    db.execute("SET FOREIGN_KEY_CHECKS = 1")
    install(database_name)
    grant_indexer_user(database_name)  # some tests drop the procedure, and its grant
    yield db
    db.close()


# --------------------------------------------------------------------------
# The central service: a real HTTP server on loopback
# --------------------------------------------------------------------------


class Received:
    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.json = json.loads(body) if body else None


class CentralService:
    """Records every request; `respond` decides each answer (status, body, delay)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.lock = threading.Lock()
        self.respond: Callable[[int, Received], tuple[int, str]] = lambda n, r: (201, "{}")
        self.delay_seconds = 0.0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Without it every answer waits ~40 ms on Nagle against delayed ACK.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Received(self.command, self.path, dict(self.headers), body)
                with outer.lock:
                    number = len(outer.received) + 1
                    status, text = outer.respond(number, request)
                    if 200 <= status < 300:
                        outer.received.append(request)
                    outer.attempts.append(request)
                if outer.delay_seconds:
                    time.sleep(outer.delay_seconds)
                payload = text.encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if status in (429, 503):
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass

            do_POST = do_GET = do_DELETE = _handle

        self.attempts: list[Received] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/register"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def documents(self) -> list[dict[str, Any]]:
        """The documents acknowledged with 2xx, in arrival order."""
        return [r.json for r in self.received if r.method == "POST"]

    def study_pks(self) -> list[int]:
        return sorted(doc["study_pk"] for doc in self.documents)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()
            self.attempts.clear()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service() -> Any:
    server = CentralService()
    yield server
    server.stop()


def free_port() -> int:
    """A loopback port with nothing listening: connections to it are refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


API_KEY = "test-key-5f4dcc3b5aa765d61d8327deb882cf99"
DB_SECRET_MARK = "db-password-never-shown"


CENTER = "007"  # a center code with leading zeros, which must survive


def write_configs(
    directory: Path,
    database: str,
    url: str,
    extra: dict | None = None,
    database_extra: dict | None = None,
    **more: Any,
) -> list[str]:
    """config.json and server.json in the original client's shapes. `extra`
    and `more` go beside "key" in config.json; `database_extra` inside
    "database"."""
    config: dict[str, Any] = {
        "database": {
            "host": DB_HOST,
            "port": str(DB_PORT),
            "user": INDEXER_USER,
            "password": INDEXER_PASSWORD,
            "name": database,
            **(database_extra or {}),
        },
        "server": "No se usa, revisar: server.json",
        "key": API_KEY,
        "webservice_url": url,
        # Fast retries: the behaviour is the same as with the defaults, only quicker.
        "backoff_seconds": 0.01,
        "connect_timeout_seconds": 2,
    }
    config.update(extra or {})
    config.update(more)
    for name, data in (("config.json", config), ("server.json", {"server": CENTER})):
        (directory / name).write_text(json.dumps(data))
        (directory / name).chmod(0o600)  # as the README tells administrators
    return ["--config", str(directory / "config.json"), "--server", str(directory / "server.json")]


@pytest.fixture
def configs(tmp_path: Path, pacs: PacsDb, service: CentralService) -> list[str]:
    return write_configs(tmp_path, pacs.name, service.url)
