"""Real parts for the tests: a throwaway MariaDB/MySQL database built from the
project's own SQL, and a recording HTTP server on loopback that can be told
to fail."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Any, Callable

import pymysql
import pymysql.cursors
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "dev"))

# The central service's stand-in and the PostgreSQL helper, shared with the
# storm and the benchmark.
from testkit import (  # noqa: E402
    CentralService,
    OrthancServer,
    PgConnection,
    Reply,  # noqa: F401 (for the tests)
    free_port,  # noqa: F401 (for the tests)
)

SCHEMA_SQL = ROOT / "tests" / "dcm4chee_schema.sql"
INDEXER_SQL = ROOT / "extras" / "add_indexer.sql"
GRANT_SQL = ROOT / "extras" / "grant_indexer.sql"

DB_HOST = os.environ.get("DICOM_INDEXER_TEST_DB_HOST", "127.0.0.1")
DB_PORT = int(os.environ.get("DICOM_INDEXER_TEST_DB_PORT", "3306"))
DB_USER = os.environ.get("DICOM_INDEXER_TEST_DB_USER", "root")
DB_PASSWORD = os.environ.get("DICOM_INDEXER_TEST_DB_PASSWORD", "")

LONG_AGO = datetime.datetime(2019, 3, 4, 10, 0, 0)


PG_HOST = os.environ.get("DICOM_INDEXER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("DICOM_INDEXER_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("DICOM_INDEXER_TEST_PG_USER", "postgres")
PG_PASSWORD = os.environ.get("DICOM_INDEXER_TEST_PG_PASSWORD", "")
PG_SCHEMA_SQL = ROOT / "tests" / "dcm4chee_schema_postgresql.sql"
PG_INDEXER_SQL = ROOT / "extras" / "add_indexer_postgresql.sql"
PG_GRANT_SQL = ROOT / "extras" / "grant_indexer_postgresql.sql"

# dcm4chee-arc-light 5: its test schema and the indexer's scripts, by engine.
ARC5_SCHEMA_SQL = {
    "mysql": ROOT / "tests" / "arclight5_schema.sql",
    "postgresql": ROOT / "tests" / "arclight5_schema_postgresql.sql",
}
ARC5_INDEXER_SQL = {
    "mysql": ROOT / "extras" / "add_indexer_arclight5_mysql.sql",
    "postgresql": ROOT / "extras" / "add_indexer_arclight5_postgresql.sql",
}
ARC5_GRANT_SQL = {
    "mysql": ROOT / "extras" / "grant_indexer_arclight5_mysql.sql",
    "postgresql": ROOT / "extras" / "grant_indexer_arclight5_postgresql.sql",
}
# The schema of each database the tests made ("arc5" or absent: dcm4chee 2.x).
SCHEMA_OF: dict[str, str] = {}

# Every database test runs on each engine (DICOM_INDEXER_TEST_ENGINES=mysql
# to run one only).
ENGINES = os.environ.get("DICOM_INDEXER_TEST_ENGINES", "mysql,postgresql").split(",")
# The engine of each database the tests made, so that helpers taking a
# database name (write_configs, install, PacsDb) need not be told.
ENGINE_OF: dict[str, str] = {}


def connect(database: str | None = None, **extra: Any) -> pymysql.connections.Connection:
    """A MySQL/MariaDB connection as the administrator."""
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


def pg_connect(database: str = "postgres") -> PgConnection:
    """A PostgreSQL connection as the administrator."""
    return PgConnection(PG_HOST, PG_PORT, PG_USER, PG_PASSWORD, database)


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


def run_psql_file(database: str, path: Path, *variables: str) -> subprocess.CompletedProcess:
    """`psql -d DBNAME -f file`, exactly as the README tells an administrator."""
    env = dict(os.environ, PGPASSWORD=PG_PASSWORD)
    command = ["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", database]
    command += ["-v", "ON_ERROR_STOP=1", "-q", *variables, "-f", str(path)]
    return subprocess.run(command, capture_output=True, env=env, check=False)


def install(database: str, path: Path | None = None) -> None:
    """The install script of the database's engine and schema (or `path`)."""
    engine = ENGINE_OF.get(database, "mysql")
    if path is None and SCHEMA_OF.get(database) == "arc5":
        path = ARC5_INDEXER_SQL[engine]
    if engine == "postgresql":
        result = run_psql_file(database, path or PG_INDEXER_SQL)
    else:
        result = run_sql_file(database, path or INDEXER_SQL)
    assert result.returncode == 0, result.stderr.decode()


class PacsDb:
    """A dcm4chee-like database for one test, with helpers to act as dcm4chee."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.engine = ENGINE_OF.get(name, "mysql")
        self.conn = pg_connect(name) if self.engine == "postgresql" else connect(name)
        self._uid = 0

    @property
    def postgresql(self) -> bool:
        return self.engine == "postgresql"

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def execute(self, sql: str, args: Any = None) -> int:
        with self.conn.cursor() as cur:
            return cur.execute(sql, args)

    def _insert(self, sql: str, args: Any) -> int:
        """INSERT returning the new row's pk, on either engine."""
        if self.postgresql:
            return self.query(sql + " RETURNING pk", args)[0]["pk"]
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.lastrowid

    def add_patient(
        self, name: str | None = "PEREZ^JUAN", pat_id: str | None = "12345678-5"
    ) -> int:
        return self._insert(
            "INSERT INTO patient (pat_id, pat_name, pat_birthdate, pat_sex, created_time,"
            " updated_time) VALUES (%s, %s, '19700101', 'M', %s, %s)",
            (pat_id, name, LONG_AGO, LONG_AGO),
        )

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
        """A study as dcm4chee stores it; updated_time defaults to the server's now."""
        self._uid += 1
        iuid = iuid or f"1.2.840.113619.2.{uuid.uuid4().int % 10**12}.{self._uid}"
        now = "LOCALTIMESTAMP(0)" if self.postgresql else "NOW()"
        return self._insert(
            "INSERT INTO study (patient_fk, study_iuid, study_datetime, study_desc,"
            " mods_in_study, num_series, num_instances, availability, study_status,"
            " created_time, updated_time, study_attrs)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s, 0, 0, COALESCE(%s, {now}),"
            f" COALESCE(%s, {now}), %s)",
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
                b"attrs",
            ),
        )

    def add_studies(self, count: int, updated_time: Any = LONG_AGO) -> list[int]:
        """Many studies at once, two per patient."""
        pks = []
        for i in range(count):
            if i % 2 == 0:
                patient = self.add_patient(f"PACIENTE^NUMERO{i}", f"{10000000 + i}-{i % 10}")
            pks.append(self.add_study(patient, updated_time=updated_time))
        return pks

    def now(self) -> str:
        """The SQL for the server's local time, to the second, as dcm4chee stamps."""
        return "LOCALTIMESTAMP(0)" if self.postgresql else "NOW()"

    def ago(self, seconds: int) -> str:
        """The SQL for that many seconds before now."""
        if self.postgresql:
            return f"(LOCALTIMESTAMP(0) - INTERVAL '{int(seconds)} seconds')"
        return f"(NOW() - INTERVAL {int(seconds)} SECOND)"

    def store_series(self, study_pk: int, mods: str = "CT\\SR", instances: int = 5) -> None:
        """What dcm4chee does when a new series arrives: derived fields change."""
        self.execute(
            "UPDATE study SET num_series = num_series + 1, num_instances = num_instances + %s,"
            f" mods_in_study = %s, updated_time = {self.now()} WHERE pk = %s",
            (instances, mods, study_pk),
        )

    def call_indexer_process(self) -> int:
        """A tick's first step, as the client runs it."""
        sql = (
            "SELECT indexer_process() AS enqueued" if self.postgresql else "CALL indexer_process()"
        )
        return int(self.query(sql)[0]["enqueued"])

    def drop_indexer_process(self) -> None:
        if self.postgresql:
            self.execute("DROP FUNCTION indexer_process()")
        else:
            self.execute("DROP PROCEDURE indexer_process")

    def run_lock(self, take: bool) -> None:
        """Takes (or gives back) the lock that a run holds on this database."""
        name = f"dicom_indexer.{self.name}"
        if self.postgresql:
            verb = "pg_try_advisory_lock" if take else "pg_advisory_unlock"
            self.query(f"SELECT {verb}(hashtext(%s))", (name,))
        else:
            self.query("SELECT GET_LOCK(%s, 0)" if take else "SELECT RELEASE_LOCK(%s)", (name,))

    def run_lock_free(self) -> bool:
        name = f"dicom_indexer.{self.name}"
        if not self.postgresql:
            return self.query("SELECT IS_FREE_LOCK(%s) AS f", (name,))[0]["f"] == 1
        if self.query("SELECT pg_try_advisory_lock(hashtext(%s)) AS f", (name,))[0]["f"]:
            self.query("SELECT pg_advisory_unlock(hashtext(%s))", (name,))
            return True
        return False

    def archive_predates_install(self) -> None:
        """As the install script leaves a site whose studies were there before it:
        the tick's cursor past them, so only `initial` sends them."""
        self.execute(
            "UPDATE study_service SET cursor_pk = (SELECT MAX(pk) FROM study),"
            f" study_updated_time = {self.now()} WHERE study_pk = 0"
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


def create_database(charset: str = "utf8", engine: str = "mysql", schema: str = "") -> str:
    """A throwaway dcm4chee database (2.x, or arc-light 5 with schema "arc5")
    with the indexer installed and granted. PostgreSQL databases are UTF8
    whatever `charset` says (dcm4chee's too)."""
    name = f"dicom_indexer_test_{uuid.uuid4().hex[:10]}"
    assert name != "pacsdb"
    ENGINE_OF[name] = engine
    if schema:
        SCHEMA_OF[name] = schema
    if engine == "postgresql":
        with pg_connect() as conn:
            conn.cursor().execute(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
        install(name, ARC5_SCHEMA_SQL[engine] if schema else PG_SCHEMA_SQL)
    else:
        with connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET {charset}")
        install(name, ARC5_SCHEMA_SQL[engine] if schema else SCHEMA_SQL)
    install(name)
    grant_indexer_user(name)
    return name


# What the original client installed: a trigger enqueueing each new study.
ORIGINAL_CLIENT_SQL = """
CREATE TABLE study_service (study_pk INT PRIMARY KEY);
CREATE TRIGGER indexer_process AFTER INSERT ON study
FOR EACH ROW INSERT INTO study_service (study_pk) VALUES (NEW.pk);
"""


def original_client_database() -> tuple[PacsDb, list[int]]:
    """A MySQL pacsdb as a site running the original client has it: its
    trigger and table, six archived studies of which it sent four (and
    dequeued them) and left two pending."""
    db = PacsDb(create_database("latin1"))
    db.execute("DROP TABLE study_service")
    db.execute("DROP PROCEDURE indexer_process")
    for statement in ORIGINAL_CLIENT_SQL.split(";\n"):
        if statement.strip():
            db.execute(statement)
    patient = db.add_patient()
    archive = [db.add_study(patient, updated_time=LONG_AGO) for _ in range(6)]
    db.execute("DELETE FROM study_service WHERE study_pk <= %s", (archive[3],))
    return db, archive


def drop_database(name: str) -> None:
    if ENGINE_OF.get(name) == "postgresql":
        with pg_connect() as conn:
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        return
    with connect() as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


# The client runs as the least-privilege user that the grant script creates,
# so a privilege the script forgot fails a test. One user per test session,
# with access to the session's databases only.
INDEXER_USER = f"dit_{uuid.uuid4().hex[:10]}"
INDEXER_PASSWORD = f"pw-{uuid.uuid4().hex}"


def grant_indexer_user(database: str) -> None:
    arc5 = SCHEMA_OF.get(database) == "arc5"
    if ENGINE_OF.get(database) == "postgresql":
        result = run_psql_file(
            database,
            ARC5_GRANT_SQL["postgresql"] if arc5 else PG_GRANT_SQL,
            "-v",
            f"indexer_password={INDEXER_PASSWORD}",
            "-v",
            f"indexer_role={INDEXER_USER}",
        )
    else:
        init = (
            f"SET @indexer_user = '{INDEXER_USER}', @indexer_host = '%',"
            f" @indexer_password = '{INDEXER_PASSWORD}'"
        )
        result = run_sql_file(database, ARC5_GRANT_SQL["mysql"] if arc5 else GRANT_SQL, init=init)
    assert result.returncode == 0, result.stderr.decode()


def _server_or_exit(engine: str) -> None:
    try:
        (pg_connect() if engine == "postgresql" else connect()).close()
    except Exception as exc:
        where = f"{PG_HOST}:{PG_PORT}" if engine == "postgresql" else f"{DB_HOST}:{DB_PORT}"
        pytest.exit(f"no {engine} server at {where}: {exc}", returncode=3)


@pytest.fixture(scope="session", autouse=True)
def _indexer_users_dropped_at_the_end() -> Any:
    """Set up first, so torn down last: after every database that names them."""
    yield
    for name in [n for n in ENGINE_OF if ENGINE_OF[n]]:
        drop_database(name)  # any a failed test left behind
    if "postgresql" in ENGINES and "postgresql" in ENGINE_OF.values():
        with pg_connect() as conn:
            conn.cursor().execute(f"DROP ROLE IF EXISTS {INDEXER_USER}")
    if "mysql" in ENGINE_OF.values():
        with connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP USER IF EXISTS '{INDEXER_USER}'@'%'")


@pytest.fixture(scope="session", params=ENGINES)
def database_name(request: Any) -> Any:
    engine = request.param
    _server_or_exit(engine)
    name = create_database("utf8", engine)
    yield name
    drop_database(name)


@pytest.fixture
def pacs(database_name: str) -> Any:
    """The session's database, emptied and with a fresh indexer install."""
    db = _emptied(PacsDb(database_name), ("study_service", "series", "study", "patient"))
    yield db
    db.close()


def _emptied(db: Any, tables: tuple[str, ...]) -> Any:
    """`db` with these tables emptied (ids from 1 again) and the indexer
    installed afresh: some tests drop the procedure, and its grant."""
    if db.postgresql:
        db.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
    else:
        db.execute("SET FOREIGN_KEY_CHECKS = 0")
        for table in tables:
            db.execute(f"TRUNCATE TABLE {table}")
        db.execute("SET FOREIGN_KEY_CHECKS = 1")
    install(db.name)
    grant_indexer_user(db.name)
    return db


# --------------------------------------------------------------------------
# The central service: a real HTTP server on loopback
# --------------------------------------------------------------------------


@pytest.fixture
def service() -> Any:
    server = CentralService()
    yield server
    server.stop()


def client_process(args: list[str], *extra: str) -> subprocess.Popen:
    """client.py as its own process, as cron runs it."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "client.py"), *extra, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition: Callable[[], Any], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def read_metrics(path: Path) -> dict[str, float]:
    """The metrics file's values, by name without the dicom_indexer_ prefix."""
    values = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            name, value = line.split()
            values[name.replace("dicom_indexer_", "")] = float(value)
    return values


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
    postgresql = ENGINE_OF.get(database) == "postgresql"
    connection = (
        {"engine": "postgresql", "host": PG_HOST, "port": PG_PORT}
        if postgresql
        else {"host": DB_HOST, "port": str(DB_PORT)}  # a string, as the original client's
    )
    config: dict[str, Any] = {
        "database": {
            **connection,
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


# --------------------------------------------------------------------------
# dcm4chee-arc-light 5: a database that acts as the archive does
# --------------------------------------------------------------------------

ARC5_VIEWS = ("hideRejected", "regularUse")


class ArcDb(PacsDb):
    """An arc-light 5 database for one test; each helper writes the rows that
    the archive writes for that event (docs/arc-light.md tells what each event changes)."""

    def now(self) -> str:
        return "LOCALTIMESTAMP" if self.postgresql else "NOW(6)"

    def add_patient(  # type: ignore[override]
        self,
        name: str | None = "PEREZ^JUAN^^^^",
        *ids: str,
        ideographic: str = "^^^^^",
        phonetic: str = "^^^^^",
    ) -> int:
        """A patient; `name` (its alphabetic group) and its other groups as
        person_name stores them (five components and a sentinel caret; an
        absent group '^^^^^'); its patient_id rows in `ids` order (the first
        is the primary ID)."""
        name_pk = None
        if name is not None:
            name_pk = self._insert(
                "INSERT INTO person_name (alphabetic_name, ideographic_name, phonetic_name)"
                " VALUES (%s, %s, %s)",
                (name, ideographic, phonetic),
            )
        patient = self._insert(
            "INSERT INTO patient (created_time, updated_time, version, pat_name_fk, num_studies)"
            f" VALUES ({self.now()}, {self.now()}, 0, %s, 0)",
            (name_pk,),
        )
        self._uid += 1
        # 5.34+: (pat_id, issuer '*', name '*') is unique across patients.
        for pat_id in ids or (f"{10_000_000 + self._uid}-{self._uid % 10}",):
            self.execute(
                "INSERT INTO patient_id (pat_id, version, patient_fk) VALUES (%s, 0, %s)",
                (pat_id, patient),
            )
        return patient

    def add_study(  # type: ignore[override]
        self,
        patient_pk: int,
        *,
        date: str = "20240517",
        time: str = "094210.000",
        desc: str = "TC DE CEREBRO SIN CONTRASTE",
        iuid: str | None = None,
        stamped_seconds_ago: int = 0,
    ) -> int:
        """The first object of a new study: a hot study (study_size -1, no
        counts computed yet)."""
        self._uid += 1
        iuid = iuid or f"1.2.826.0.1.3680043.{uuid.uuid4().int % 10**12}.{self._uid}"
        stamp = self.ago(stamped_seconds_ago) if stamped_seconds_ago else self.now()
        return self._insert(
            "INSERT INTO study (study_iuid, study_date, study_time, study_desc, patient_fk,"
            " created_time, updated_time, modified_time, access_time, version,"
            " rejection_state, study_size)"
            f" VALUES (%s, %s, %s, %s, %s, {stamp}, {stamp}, {stamp}, {stamp}, 0, 0, -1)",
            (iuid, date, time, desc, patient_pk),
        )

    def ago(self, seconds: int) -> str:
        if self.postgresql:
            return f"(LOCALTIMESTAMP - INTERVAL '{int(seconds)} seconds')"
        return f"(NOW(6) - INTERVAL {int(seconds)} SECOND)"

    def settle(
        self, study_pk: int, series: int = 2, instances: int = 120, mods: str | None = "SR\\CT"
    ) -> None:
        """The archive's scheduler, minutes after the last store: the size
        (a bulk update: updated_time unchanged) and the counts of every view."""
        self.execute("UPDATE study SET study_size = %s WHERE pk = %s", (instances * 500, study_pk))
        for view in ARC5_VIEWS:
            self.execute(
                "INSERT INTO study_query_attrs (study_fk, view_id, num_series, num_instances,"
                " mods_in_study) VALUES (%s, %s, %s, %s, %s)",
                (study_pk, view, series, instances, mods),
            )

    def store_same_association(self, study_pk: int) -> None:
        """More objects while the study is hot: only the cache is dropped."""
        self.execute("DELETE FROM study_query_attrs WHERE study_fk = %s", (study_pk,))

    def store_later(self, study_pk: int) -> None:
        """More objects after the size was computed: resetSize() flushes the
        entity (updated_time, access_time, version) and the cache is dropped."""
        self.execute("DELETE FROM study_query_attrs WHERE study_fk = %s", (study_pk,))
        self.touch(study_pk, "study_size = -1")

    def touch(self, study_pk: int, assignments: str = "") -> None:
        """A JPA update of the study row: @PreUpdate stamps updated_time and
        access_time, @Version bumps version."""
        extra = f"{assignments}, " if assignments else ""
        self.execute(
            f"UPDATE study SET {extra}updated_time = {self.now()}, access_time = {self.now()},"
            " version = version + 1 WHERE pk = %s",
            (study_pk,),
        )

    def rename_patient(self, patient_pk: int, name: str) -> None:
        """A patient edit (HL7 ADT A08): only patient and person_name change."""
        self.execute(
            "UPDATE person_name SET alphabetic_name = %s WHERE pk ="
            " (SELECT pat_name_fk FROM patient WHERE pk = %s)",
            (name, patient_pk),
        )
        self.execute(
            f"UPDATE patient SET updated_time = {self.now()}, version = version + 1 WHERE pk = %s",
            (patient_pk,),
        )

    def merge(self, source: int, target: int) -> None:
        """ADT A40: every study of the source moves to the target (each a JPA
        update); the source stays, merged away, with its own IDs."""
        for row in self.query("SELECT pk FROM study WHERE patient_fk = %s", (source,)):
            self.touch(row["pk"], f"patient_fk = {int(target)}")
        self.execute("UPDATE patient SET merge_fk = %s WHERE pk = %s", (target, source))

    def reject(self, study_pk: int, complete: bool) -> None:
        """An IOCM rejection note: rejection_state 1 (PARTIAL) or 2 (COMPLETE),
        the cache dropped; a complete one leaves nothing visible."""
        self.execute("DELETE FROM study_query_attrs WHERE study_fk = %s", (study_pk,))
        self.touch(study_pk, f"rejection_state = {2 if complete else 1}, study_size = -1")

    def delete_study(self, study_pk: int) -> None:
        """A hard delete: no tombstone."""
        self.execute("DELETE FROM study_query_attrs WHERE study_fk = %s", (study_pk,))
        self.execute("DELETE FROM study WHERE pk = %s", (study_pk,))


@pytest.fixture(scope="session", params=ENGINES)
def arc_database_name(request: Any) -> Any:
    engine = request.param
    _server_or_exit(engine)
    name = create_database("utf8", engine, schema="arc5")
    yield name
    drop_database(name)


@pytest.fixture
def arc(arc_database_name: str) -> Any:
    """The session's arc-light database, emptied, with a fresh indexer install."""
    tables = ("study_service", "study_query_attrs", "study", "patient_id", "patient", "person_name")
    db = _emptied(ArcDb(arc_database_name), tables)
    yield db
    db.close()


# --------------------------------------------------------------------------
# The "server" marker, set automatically: `pytest -m "not server"` runs the
# tests that need no server (CI runs them under the oldest Python supported)
# --------------------------------------------------------------------------

# Fixtures that stand a server up: a MySQL/PostgreSQL database, Orthanc, the
# central service's stand-in (the fixtures built on them are found through
# each test's fixture closure).
SERVER_FIXTURES = {"database_name", "arc_database_name", "pacs", "arc", "service", "orthanc"}
# What reaches a server when a test or fixture calls it directly: a database
# made or opened, an Orthanc or a central service started, client.py run as a
# process against what the test configured.
SERVER_HELPERS = {
    "connect",
    "pg_connect",
    "PgConnection",
    "create_database",
    "original_client_database",
    "run_sql_file",
    "run_psql_file",
    "PacsDb",
    "ArcDb",
    "CentralService",
    "OrthancServer",
    "client_process",
}
_HERE = (str(ROOT / "tests"), str(ROOT / "dev"))
# dev/'s programs (the benchmark, the storm...): each runs against servers.
DEV_PROGRAMS = {
    path.name
    for path in (ROOT / "dev").glob("*.py")
    if 'if __name__ == "__main__"' in path.read_text(encoding="utf-8")
}


def _code_objects(code: types.CodeType) -> Any:
    """A function's code and that of the functions, lambdas and
    comprehensions written inside it."""
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


def _reaches_a_server(target: Any, seen: set[Any]) -> bool:
    """Whether this function (or class) of the tests or of dev/, or one of
    theirs that it names, uses a server fixture by name or a SERVER_HELPER."""
    if isinstance(target, type):
        return any(_reaches_a_server(member, seen) for member in vars(target).values())
    target = getattr(target, "__func__", target)  # a method, a staticmethod
    code = getattr(target, "__code__", None)
    if code is None or code in seen or not code.co_filename.startswith(_HERE):
        return False
    seen.add(code)
    namespace = getattr(target, "__globals__", {})
    for each in _code_objects(code):
        if SERVER_HELPERS.intersection(each.co_names):
            return True
        # request.getfixturevalue("pacs"); ROOT / "dev" / "benchmark.py"
        texts = {c for c in each.co_consts if isinstance(c, str)}
        if texts & SERVER_FIXTURES or texts & DEV_PROGRAMS:
            return True
        # Names of the test's module, and of modules of tests/ or dev/ that
        # it names (storm.run_storm).
        spaces = [namespace] + [
            vars(namespace[name])
            for name in each.co_names
            if isinstance(namespace.get(name), types.ModuleType)
            and str(getattr(namespace[name], "__file__", "")).startswith(_HERE)
        ]
        for name in each.co_names:
            for space in spaces:
                if name in space and _reaches_a_server(space[name], seen):
                    return True
    return False


def _needs_a_server(item: Any) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    if names & SERVER_FIXTURES:
        return True
    # An autouse fixture is in every test's closure: it is not counted (the
    # session's teardown drops only the databases that tests made). If
    # pytest stops keeping this table, every test is a server test and CI's
    # `-m "not server"` step fails, selecting none.
    autouse = getattr(item.session._fixturemanager, "_nodeid_autousenames", {})
    skipped = {name for node in item.listchain() for name in autouse.get(node.nodeid, ())}
    seen: set[Any] = set()
    info = getattr(item, "_fixtureinfo", None)
    for name, definitions in info.name2fixturedefs.items() if info else ():
        counted = name in names and name not in skipped
        if counted and any(_reaches_a_server(d.func, seen) for d in definitions):
            return True
    return _reaches_a_server(getattr(item, "function", None), seen)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Marks "server" every test that needs one (before -m selects)."""
    for item in items:
        if _needs_a_server(item):
            item.add_marker(pytest.mark.server)


# --------------------------------------------------------------------------
# Orthanc: a real one (Debian's package) per test, on a free loopback port
# --------------------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    server = OrthancServer(tmp_path / "orthanc", stable_age_seconds=1)
    yield server
    server.stop(kill=True)


def write_orthanc_configs(directory: Path, orthanc: Any, url: str, **extra: Any) -> list[str]:
    """config.json (an "orthanc" section with the server's credentials) and
    server.json, for a client reading `orthanc` and sending to `url`."""
    config = {
        "orthanc": {
            "url": orthanc.url,
            "user": OrthancServer.USER,
            "password": OrthancServer.PASSWORD,
        },
        "key": API_KEY,
        "webservice_url": url,
        "backoff_seconds": 0.01,
        **extra,
    }
    for name, data in (("config.json", config), ("server.json", {"server": CENTER})):
        (directory / name).write_text(json.dumps(data))
        (directory / name).chmod(0o600)
    return ["--config", str(directory / "config.json"), "--server", str(directory / "server.json")]
