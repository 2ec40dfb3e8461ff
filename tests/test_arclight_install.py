"""arc-light's footprint: every per-tick query uses an index that arc-light
itself has (EXPLAIN on a seeded database, both engines), and the install
script runs twice over itself without touching arc-light's tables."""

from __future__ import annotations

import datetime
import re

import pytest
from conftest import (
    ARC5_INDEXER_SQL,
    ENGINES,
    ArcDb,
    create_database,
    drop_database,
    install,
)

from dicom_indexer.sources.dcm4chee import ArcLight5MySQL, ArcLight5PostgreSQL
from dicom_indexer.study_service import MAX_PK, MySQLQueueSQL, PostgreSQLQueueSQL

ARC_TABLES = ("study", "patient", "patient_id", "person_name", "study_query_attrs", "study_service")


@pytest.fixture(scope="module", params=ENGINES)
def seeded_arc(request):
    """20,000 settled studies (3,000 on MySQL, inserted row by row), all sent,
    the last ten rewritten just now."""
    engine = request.param
    name = create_database("utf8", engine, schema="arc5")
    db = ArcDb(name)
    count = 20000 if db.postgresql else 3000
    old = datetime.datetime(2019, 3, 4, 10, 0, 0)
    if db.postgresql:
        # One patient per two studies, as in an archive, each with a name and an ID.
        db.execute(
            "INSERT INTO person_name (alphabetic_name, ideographic_name, phonetic_name)"
            " SELECT 'P^' || i || '^^^^', '^^^^^', '^^^^^' FROM generate_series(1, %s) AS i",
            (count // 2,),
        )
        db.execute(
            "INSERT INTO patient (created_time, updated_time, version, pat_name_fk, num_studies)"
            " SELECT %s, %s, 0, pk, 2 FROM person_name",
            (old, old),
        )
        db.execute(
            "INSERT INTO patient_id (pat_id, version, patient_fk)"
            " SELECT pk || '-K', 0, pk FROM patient"
        )
        patients = [1]
    else:
        patients = [db.add_patient(f"P^{i}^^^^", f"{i}-K") for i in range(300)]
    if db.postgresql:
        db.execute(
            "INSERT INTO study (study_iuid, study_date, study_time, study_desc, patient_fk,"
            " created_time, updated_time, modified_time, access_time, version,"
            " rejection_state, study_size)"
            " SELECT '1.2.3.' || i, '20190304', '100000.000', 'RX', %s + (i / 2) %% 10000,"
            " %s, %s, %s, %s, 0, 0, 1000 FROM generate_series(1, %s) AS i",
            (patients[0], old, old, old, old, count),
        )
        db.execute(
            "INSERT INTO study_query_attrs (study_fk, view_id, num_series, num_instances,"
            " mods_in_study) SELECT pk, 'hideRejected', 1, 10, 'CT' FROM study"
        )
    else:
        with db.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO study (study_iuid, study_date, study_time, study_desc, patient_fk,"
                " created_time, updated_time, modified_time, access_time, version,"
                " rejection_state, study_size)"
                " VALUES (%s, '20190304', '100000.000', 'RX', %s, %s, %s, %s, %s, 0, 0, 1000)",
                [(f"1.2.3.{i}", patients[i % 300], old, old, old, old) for i in range(count)],
            )
            cur.execute(
                "INSERT INTO study_query_attrs (study_fk, view_id, num_series, num_instances,"
                " mods_in_study) SELECT pk, 'hideRejected', 1, 10, 'CT' FROM study"
            )
    db.call_indexer_process()
    db.execute("UPDATE study_service SET status = 'sent', sent_at = %s WHERE study_pk > 10", (old,))
    for row in db.query("SELECT pk FROM study ORDER BY pk DESC LIMIT 10"):
        db.touch(row["pk"])
    if db.postgresql:
        db.execute("ANALYZE " + ", ".join(ARC_TABLES))
    else:
        db.execute("ANALYZE TABLE " + ", ".join(ARC_TABLES))
    yield db
    db.close()
    drop_database(name)


def _tick_statement(db: ArcDb) -> str:
    """What indexer_process runs on each call, with its variables as a call
    has them: PostgreSQL's one statement, MySQL's cursor."""
    engine = "postgresql" if db.postgresql else "mysql"
    text = ARC5_INDEXER_SQL[engine].read_text()
    if db.postgresql:
        match = re.search(r"(WITH touched AS .*?FROM enqueued_rows);", text, re.S)
    else:
        match = re.search(r"DECLARE changed_studies CURSOR FOR\s+(.*?);", text, re.S)
    assert match, "the statement of indexer_process was not found"
    sql = re.sub(r"--[^\n]*", "", match.group(1))
    sql = sql.replace("INTO enqueued, newest_updated, newest_pk", "")
    highest = db.query("SELECT MAX(pk) AS m FROM study")[0]["m"]
    since = datetime.datetime.now().replace(microsecond=0) - datetime.timedelta(seconds=600)
    cast = "::timestamp" if db.postgresql else ""
    for name, value in (
        ("scan_from_time", f"'{since}'{cast}"),
        ("highest_pk", str(highest)),
        ("now_time", db.now()),
    ):
        sql = re.sub(rf"\b{name}\b", value, sql)
    return sql.replace("%", "%%")


def _statements(db: ArcDb) -> type:
    return ArcLight5PostgreSQL if db.postgresql else ArcLight5MySQL


def _queue_statements(db: ArcDb) -> type:
    return PostgreSQLQueueSQL if db.postgresql else MySQLQueueSQL


TICK_QUERIES = {
    "indexer_process": lambda db: (_tick_statement(db), None),
    "indexer_process cursor row": lambda db: (
        "SELECT study_updated_time, cursor_pk FROM study_service WHERE study_pk = 0 FOR UPDATE",
        None,
    ),
    "pending page": lambda db: (
        _statements(db).SELECT_NEW_PAGE,
        ("hideRejected", 0, MAX_PK, 1000),
    ),
    "due page": lambda db: (_statements(db).SELECT_DUE_PAGE, ("hideRejected", 0, 1000)),
    "pending count": lambda db: (_queue_statements(db).COUNT_PENDING, None),
}


@pytest.mark.parametrize("label", sorted(TICK_QUERIES))
def test_tick_query_uses_arclights_own_indexes(seeded_arc, label):
    sql, args = TICK_QUERIES[label](seeded_arc)
    plan = seeded_arc.query("EXPLAIN " + sql, args)
    if seeded_arc.postgresql:
        text = "\n".join(row["QUERY PLAN"] for row in plan)
        assert not re.search(rf"Seq Scan on ({'|'.join(ARC_TABLES)})\b", text), text
    else:
        aliases = (*ARC_TABLES, "s", "p", "q", "n", "a", "i")
        scans = [row for row in plan if row["table"] in aliases and row["type"] == "ALL"]
        assert scans == [], plan


def test_the_tick_enqueues_only_the_rewritten_studies(seeded_arc):
    # The ten rows rewritten since: each tick re-reads the safety window only.
    assert seeded_arc.call_indexer_process() == 10
    assert seeded_arc.call_indexer_process() == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_install_twice_keeps_the_queue_and_leaves_arclight_alone(engine):
    name = create_database("utf8", engine, schema="arc5")
    db = ArcDb(name)
    try:
        study = db.add_study(db.add_patient())
        schema = "current_schema()" if db.postgresql else "DATABASE()"
        columns = (
            "SELECT table_name AS t, column_name AS c, data_type AS d"
            f" FROM information_schema.columns WHERE table_schema = {schema}"
            " AND table_name <> 'study_service' ORDER BY 1, 2"
        )
        before = db.query(columns)
        db.call_indexer_process()
        queue = db.queue()
        assert list(queue) == [study]
        install(name)
        install(name)
        assert db.queue() == queue
        assert db.query(columns) == before
        if db.postgresql:
            triggers = db.query("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
        else:
            triggers = db.query(
                "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS"
                " WHERE TRIGGER_SCHEMA = DATABASE()"
            )
        assert triggers == []
    finally:
        db.close()
        drop_database(name)
