"""extras/add_indexer.sql: installs anywhere, again over itself, and over the
original client; never touches dcm4chee's tables; tick queries use indexes."""

from __future__ import annotations

import datetime
import re

import conftest
import pymysql
import pytest
from conftest import (
    INDEXER_SQL,
    LONG_AGO,
    PacsDb,
    create_database,
    drop_database,
    grant_indexer_user,
    install,
)

from dicom_indexer.cli import main
from dicom_indexer.sources.dcm4chee import Dcm4chee2MySQL, Dcm4chee2PostgreSQL
from dicom_indexer.study_service import INITIAL_ROW_PK, MAX_PK, MySQLQueueSQL, PostgreSQLQueueSQL

SQL_TEXT = INDEXER_SQL.read_text()


@pytest.fixture
def fresh_db():
    name = create_database("latin1")
    db = PacsDb(name)
    yield db
    db.close()
    drop_database(name)


def _dcm4chee_ddl(db: PacsDb) -> list[str]:
    return [
        re.sub(
            r" AUTO_INCREMENT=\d+", "", db.query(f"SHOW CREATE TABLE {table}")[0]["Create Table"]
        )
        for table in ("patient", "study", "series")
    ]


def test_install_twice_keeps_data_and_leaves_dcm4chee_tables_alone(fresh_db, service, tmp_path):
    fresh_db.add_study(fresh_db.add_patient())
    before = _dcm4chee_ddl(fresh_db)
    fresh_db.execute("CALL indexer_process()")
    queue = fresh_db.queue()
    install(fresh_db.name)
    install(fresh_db.name)
    assert fresh_db.queue() == queue
    assert _dcm4chee_ddl(fresh_db) == before
    assert fresh_db.query("SHOW TRIGGERS") == []
    routines = fresh_db.query(
        "SELECT ROUTINE_NAME, ROUTINE_TYPE FROM information_schema.ROUTINES"
        " WHERE ROUTINE_SCHEMA = DATABASE()"
    )
    assert routines == [{"ROUTINE_NAME": "indexer_process", "ROUTINE_TYPE": "PROCEDURE"}]
    tables = {
        row["TABLE_NAME"]
        for row in fresh_db.query(
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
        )
    }
    assert tables == {"patient", "study", "series", "study_service"}


def test_reinstall_keeps_the_indexer_users_execute_grant(pacs):
    """add_indexer.sql drops and recreates the procedure, which drops its grants."""
    from conftest import INDEXER_PASSWORD, INDEXER_USER

    install(pacs.name)
    if pacs.postgresql:
        import pg8000.dbapi

        user = pg8000.dbapi.connect(
            host=conftest.PG_HOST,
            port=conftest.PG_PORT,
            user=INDEXER_USER,
            password=INDEXER_PASSWORD,
            database=pacs.name,
        )
        user.autocommit = True
        cur = user.cursor()
        cur.execute("SELECT indexer_process()")
        assert cur.fetchone() == [0]
        for sql in ("SELECT study_attrs FROM study", "UPDATE study SET num_series = 0"):
            with pytest.raises(pg8000.dbapi.DatabaseError, match="42501"):
                cur.execute(sql)
        user.close()
        # No other role may run the definer's function (EXECUTE is revoked from PUBLIC).
        rows = pacs.query(
            "SELECT has_function_privilege('public', 'indexer_process()', 'EXECUTE') AS p"
            " FROM pg_roles LIMIT 1"
        )
        assert rows[0]["p"] is False
        return
    user = pymysql.connect(
        host=conftest.DB_HOST,
        port=conftest.DB_PORT,
        user=INDEXER_USER,
        password=INDEXER_PASSWORD,
        database=pacs.name,
    )
    with user, user.cursor() as cur:
        cur.execute("CALL indexer_process()")
        assert cur.fetchone() == (0,)
        with pytest.raises(pymysql.err.OperationalError, match="1143|1142"):
            cur.execute("SELECT study_attrs FROM study")
        with pytest.raises(pymysql.err.OperationalError, match="1142"):
            cur.execute("UPDATE study SET num_series = 0")


def test_upgrade_from_original_client_sends_pending_and_new_not_the_archive(tmp_path, service):
    db, archive = conftest.original_client_database()
    name = db.name
    patient = db.query("SELECT patient_fk FROM study LIMIT 1")[0]["patient_fk"]
    try:
        # The original client had sent and dequeued four; two are still pending.
        assert sorted(db.queue()) == archive[4:]

        install(name)
        grant_indexer_user(name)  # the README's next step
        assert db.query("SHOW TRIGGERS") == []
        assert {r["status"] for r in db.queue().values()} == {"pending"}
        new = db.add_study(patient)  # no trigger now: indexer_process finds it

        from conftest import write_configs

        args = write_configs(tmp_path, name, service.url)
        assert main(args) == 0
        assert service.study_pks() == sorted(archive[4:] + [new])
        service.clear()
        assert main(["initial", *args]) == 0  # still the way to send everything
        assert service.study_pks() == sorted(archive + [new])
    finally:
        db.close()
        drop_database(name)


def test_sql_is_portable_and_names_no_database():
    code = re.sub(r"--[^\n]*|COMMENT ''[^']*''", "", SQL_TEXT).upper()
    assert "PACSDB" not in code
    for mariadb_or_new_only in (
        "IF NOT EXISTS " + "STATUS",
        "ADD COLUMN IF",
        " WITH ",
        " OVER (",
        " JSON",
    ):
        assert mariadb_or_new_only not in code
    assert "CREATE TRIGGER" not in code
    assert "ALTER TABLE STUDY " not in code and "ALTER TABLE PATIENT" not in code


# --------------------------------------------------------------------------
# Every query that runs on each tick uses an index (EXPLAIN on a seeded db)
# --------------------------------------------------------------------------


def _procedure_cursor_select(cursor: str) -> str:
    match = re.search(rf"DECLARE {cursor} CURSOR FOR\s+(.*?);", SQL_TEXT, re.S)
    assert match, f"the cursor {cursor} of indexer_process was not found"
    select = re.sub(r"--[^\n]*", "", match.group(1))
    return (
        select.replace("scan_from_time", "NOW() - INTERVAL '600' SECOND")
        .replace("scan_from_pk", "(SELECT MAX(pk) - 5000 FROM study)")
        .replace("highest_pk", "(SELECT MAX(pk) FROM study)")
    )


TICK_QUERIES = {
    "indexer_process cursor": (_procedure_cursor_select("changed_studies"), None),
    # Without the study_updated index (see tests/test_variants.py).
    "indexer_process recent cursor": (_procedure_cursor_select("recent_studies"), None),
    "indexer_process watermark": (
        "SELECT study_updated_time, cursor_pk FROM study_service WHERE study_pk = 0 FOR UPDATE",
        None,
    ),
    "pending page": (Dcm4chee2MySQL.SELECT_NEW_PAGE, (0, MAX_PK, 1000)),
    "due page": (Dcm4chee2MySQL.SELECT_DUE_PAGE, (0, 1000)),
    "pending count": (MySQLQueueSQL.COUNT_PENDING, None),
    "initial state": (
        "SELECT enqueued_at AS started, cursor_pk AS position, status"
        " FROM study_service WHERE study_pk = %s",
        (INITIAL_ROW_PK,),
    ),
}


@pytest.fixture(scope="module")
def seeded_db():
    name = create_database("utf8")
    db = PacsDb(name)
    patients = [db.add_patient(f"P^{i}", f"{i}-K") for i in range(300)]
    with db.conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO study (patient_fk, study_iuid, study_datetime, num_series, num_instances,"
            " availability, study_status, created_time, updated_time)"
            " VALUES (%s, %s, %s, 1, 1, 0, 0, %s, %s)",
            [(patients[i % 300], f"1.2.3.{i}", LONG_AGO, LONG_AGO, LONG_AGO) for i in range(3000)],
        )
    db.execute("CALL indexer_process()")
    db.execute("UPDATE study_service SET status = 'sent', sent_at = NOW() WHERE study_pk > 10")
    db.execute("UPDATE study SET updated_time = NOW() WHERE pk > 2990")
    db.execute("ANALYZE TABLE study, patient, study_service")
    yield db
    db.close()
    drop_database(name)


@pytest.mark.parametrize("label", sorted(TICK_QUERIES))
def test_tick_query_uses_an_index(seeded_db, label):
    sql, args = TICK_QUERIES[label]
    plan = seeded_db.query("EXPLAIN " + sql, args)
    full_scans = [
        row
        for row in plan
        if row["table"] in ("study", "patient", "study_service", "s", "p", "q")
        and row["type"] == "ALL"
    ]
    assert full_scans == [], plan


def _rows_read(db: PacsDb, sql: str) -> int:
    """Index and table rows the server read for one statement."""

    def handler_reads() -> int:
        # Index reads only: SHOW STATUS itself scans a temporary table (rnd_next).
        rows = db.query("SHOW SESSION STATUS LIKE 'Handler_read%%'")
        return sum(int(row["Value"]) for row in rows if "rnd" not in row["Variable_name"])

    before = handler_reads()
    db.query(sql)
    return handler_reads() - before


def test_a_quiet_pacs_tick_reads_almost_nothing(pacs):
    """After a burst of rewrites, later ticks do not re-read the burst."""
    if pacs.postgresql:
        pytest.skip("reads are counted with MySQL's Handler_read counters; on PostgreSQL,"
                    " test_postgresql_tick_queries_use_an_index checks the plans")  # fmt: skip
    patient = pacs.add_patient()
    for _ in range(400):
        pacs.add_study(patient)
    pacs.execute(
        "UPDATE study SET updated_time = NOW() - INTERVAL '10' MINUTE"
    )  # the burst ended ten minutes ago
    assert pacs.call_indexer_process() == 400
    # The previous call happened after the burst: the safety window behind it
    # holds no change.
    pacs.execute("UPDATE study_service SET enqueued_at = NOW() WHERE study_pk = 0")
    assert _rows_read(pacs, "CALL indexer_process()") < 40
    # Whereas a call that could have missed late rows re-reads the window.
    pacs.execute(
        "UPDATE study_service SET enqueued_at = NOW() - INTERVAL '12' MINUTE,"
        " study_updated_time = NOW() - INTERVAL '12' MINUTE WHERE study_pk = 0"
    )
    assert _rows_read(pacs, "CALL indexer_process()") >= 400


# --------------------------------------------------------------------------
# PostgreSQL: the same checks of the install script and the tick's plans
# --------------------------------------------------------------------------

PG_SQL_TEXT = conftest.PG_INDEXER_SQL.read_text()


@pytest.fixture(scope="module")
def seeded_pg_db():
    if "postgresql" not in conftest.ENGINES:
        pytest.skip("PostgreSQL tests not selected")
    name = create_database("utf8", "postgresql")
    db = PacsDb(name)
    patients = [db.add_patient(f"P^{i}", f"{i}-K") for i in range(300)]
    db.execute(
        "INSERT INTO study (patient_fk, study_iuid, study_datetime, num_series, num_instances,"
        " availability, study_status, created_time, updated_time)"
        " SELECT %s + (i %% 300), '1.2.3.' || i, %s, 1, 1, 0, 0, %s, %s"
        " FROM generate_series(1, 20000) AS i",
        (patients[0], LONG_AGO, LONG_AGO, LONG_AGO),
    )
    db.call_indexer_process()
    db.execute("UPDATE study_service SET status = 'sent', sent_at = NOW() WHERE study_pk > 10")
    db.execute("UPDATE study SET updated_time = NOW() WHERE pk > 19990")
    db.execute("ANALYZE study, patient, study_service")
    yield db
    db.close()
    drop_database(name)


def _pg_tick_statement(highest_pk: int) -> str:
    """The statement indexer_process runs, with its variables as the values
    a call plans it with (PL/pgSQL plans each call's statement for them)."""
    match = re.search(r"(WITH touched AS .*?FROM enqueued_rows);", PG_SQL_TEXT, re.S)
    assert match, "the statement of indexer_process was not found"
    sql = re.sub(r"--[^\n]*", "", match.group(1))
    sql = re.sub(r"INTO enqueued, newest_updated, newest_pk", "", sql)
    started = datetime.datetime.now().replace(microsecond=0) - datetime.timedelta(seconds=600)
    for name, value in (
        ("has_time_index", "true"),
        ("scan_from_time", f"'{started}'::timestamp"),
        ("scan_from_pk", str(highest_pk)),
        ("highest_pk", str(highest_pk)),
        ("now_time", "LOCALTIMESTAMP"),
    ):
        sql = re.sub(rf"\b{name}\b", value, sql)
    return sql


PG_TICK_QUERIES = {
    "indexer_process statement": (_pg_tick_statement, None),
    "indexer_process cursor row": (
        "SELECT study_updated_time, cursor_pk FROM study_service WHERE study_pk = 0 FOR UPDATE",
        None,
    ),
    "pending page": (Dcm4chee2PostgreSQL.SELECT_NEW_PAGE, (0, MAX_PK, 1000)),
    "due page": (Dcm4chee2PostgreSQL.SELECT_DUE_PAGE, (0, 1000)),
    "pending count": (PostgreSQLQueueSQL.COUNT_PENDING, None),
    "initial state": (PostgreSQLQueueSQL.SELECT_BOOKKEEPING, (INITIAL_ROW_PK,)),
}


@pytest.mark.parametrize("label", sorted(PG_TICK_QUERIES))
def test_postgresql_tick_queries_use_an_index(seeded_pg_db, label):
    sql, args = PG_TICK_QUERIES[label]
    if callable(sql):
        sql = sql(seeded_pg_db.query("SELECT MAX(pk) AS m FROM study")[0]["m"])
    plan = "\n".join(row["QUERY PLAN"] for row in seeded_pg_db.query("EXPLAIN " + sql, args))
    assert not re.search(r"Seq Scan on (study|patient|study_service)\b", plan), plan


def test_postgresql_install_twice_keeps_the_queue_and_leaves_dcm4chee_alone(service):
    if "postgresql" not in conftest.ENGINES:
        pytest.skip("PostgreSQL tests not selected")
    name = create_database("utf8", "postgresql")
    db = PacsDb(name)
    try:
        db.add_study(db.add_patient())
        columns = (
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_name IN ('patient', 'study', 'series') ORDER BY 1, 2"
        )
        indexes = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename <> 'study_service'"
        before = (db.query(columns), db.query(indexes))
        db.call_indexer_process()
        queue = db.queue()
        install(name)
        install(name)
        assert db.queue() == queue
        assert (db.query(columns), db.query(indexes)) == before
        assert db.query("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal") == []
        tables = {
            row["table_name"]
            for row in db.query(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = current_schema()"
            )
        }
        assert tables == {"patient", "study", "series", "study_service"}
    finally:
        db.close()
        drop_database(name)
