"""The pacsdb variants real sites have: indexes dropped or renamed by a DBA,
tables converted between character sets, strict or permissive sql_mode. For
each, add_indexer.sql installs something that works, `check` says what it
found, and runs deliver."""

from __future__ import annotations

import json
import shutil
import sys

import conftest
import pytest
from conftest import (
    INDEXER_SQL,
    LONG_AGO,
    PacsDb,
    connect,
    create_database,
    drop_database,
    grant_indexer_user,
    install,
    run_sql_file,
    write_configs,
)
from test_install import _rows_read

from dicom_indexer.cli import main


@pytest.fixture
def site(service, tmp_path):
    name = create_database("latin1")
    db = PacsDb(name)
    yield db, write_configs(tmp_path, name, service.url)
    db.close()
    drop_database(name)


def _check_lines(capsys, args) -> tuple[int, list[str]]:
    code = main(["check", *args])
    return code, capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("renamed", [False, True], ids=["dropped", "renamed"])
def test_without_study_updated_the_tick_reads_the_newest_studies_and_check_says_so(
    site, service, capsys, renamed
):
    db, args = site
    db.execute("ALTER TABLE study DROP INDEX study_updated")
    if renamed:
        db.execute("ALTER TABLE study ADD INDEX idx_study_upd (updated_time)")
    install(db.name)  # re-run after the DBA's change: still installs
    grant_indexer_user(db.name)
    patient = db.add_patient()
    with db.conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO study (patient_fk, study_iuid, num_series, num_instances, availability,"
            " study_status, created_time, updated_time) VALUES (%s, %s, 1, 1, 0, 0, %s, %s)",
            [(patient, f"1.2.9.{i}", LONG_AGO, LONG_AGO) for i in range(8000)],
        )
    db.archive_predates_install()
    oldest, newest = 1, db.query("SELECT MAX(pk) AS pk FROM study")[0]["pk"]

    code, lines = _check_lines(capsys, args)
    assert code == 0
    [warning] = [line for line in lines if line.startswith("warning")]
    assert "index study_updated on study(updated_time) is missing" in warning
    assert ("exists as 'idx_study_upd'" in warning) is renamed
    assert "re-reads the 5,000 newest studies" in warning
    assert warning.endswith("CREATE INDEX study_updated ON study (updated_time)")

    new = db.add_study(patient)
    db.store_series(newest)  # a recent study gets a series
    db.store_series(oldest)  # so does a ten-year-old one
    assert main(args) == 0
    assert service.study_pks() == sorted([newest, new])
    # Bounded: the newest 5,000 by primary key, not the 8,000 of the table.
    assert _rows_read(db, "CALL indexer_process()") < 5000 * 2 + 100
    # A rewrite of an old study is found by the nightly reconcile, once the
    # archive has fingerprints (initial).
    assert main(["initial", *args]) == 0
    db.store_series(oldest)
    service.clear()
    assert main(args) == 0
    assert service.study_pks() == []
    assert main(["reconcile", *args]) == 0
    assert main(args) == 0
    assert service.study_pks() == [oldest]


def test_tables_converted_to_utf8mb4_send_the_same_names(site, service):
    db, args = site
    for table in ("patient", "study"):
        db.execute(f"ALTER TABLE {table} CONVERT TO CHARACTER SET utf8mb4")
    study = db.add_study(db.add_patient("MUÑOZ^JOSÉ^ÁNGEL", "12.345.678-5"), desc="TÓRAX")
    assert main(args) == 0
    assert main(["initial", *args]) == 0
    for document in service.documents:
        assert document["study_pk"] == study
        assert document["patient_name"] == "MUÑOZ^JOSÉ^ÁNGEL"
        assert document["study_description"] == "TÓRAX"


STRICT = (
    "STRICT_ALL_TABLES,NO_ZERO_DATE,NO_ZERO_IN_DATE,ERROR_FOR_DIVISION_BY_ZERO,"
    "ONLY_FULL_GROUP_BY,ANSI_QUOTES"
)


@pytest.fixture
def strict_server():
    """The server's sql_mode, strict, for every new session (the client's)."""
    with connect() as root, root.cursor() as cur:
        cur.execute("SELECT @@GLOBAL.sql_mode AS m")
        saved = cur.fetchone()["m"]
        cur.execute("SET GLOBAL sql_mode = %s", (STRICT,))
    yield
    with connect() as root, root.cursor() as cur:
        cur.execute("SET GLOBAL sql_mode = %s", (saved,))


def test_zero_dates_written_permissively_read_under_a_strict_sql_mode(
    site, service, strict_server, capsys
):
    db, args = site
    # dcm4chee ran permissive for years: zero dates are in the rows.
    db.execute("SET SESSION sql_mode = ''")
    patient = db.add_patient()
    zero = db.add_study(
        patient, study_datetime="0000-00-00 00:00:00", updated_time="0000-00-00 00:00:00"
    )
    result = run_sql_file(db.name, INDEXER_SQL, init=f"SET sql_mode = '{STRICT}'")
    assert result.returncode == 0, result.stderr.decode()
    grant_indexer_user(db.name)
    fresh = db.add_study(patient)

    assert main(args) == 0
    assert main(["initial", *args]) == 0
    by_pk = {doc["study_pk"]: doc for doc in service.documents}
    assert set(by_pk) == {zero, fresh}
    assert by_pk[zero]["study_datetime"] is None
    assert main(["reconcile", *args]) == 0
    assert main(["status", *args]) == 0
    code, lines = _check_lines(capsys, args)
    assert code == 0, lines


def test_postgresql_without_an_updated_time_index_reads_the_newest_studies(
    service, tmp_path, capsys
):
    if "postgresql" not in conftest.ENGINES:
        pytest.skip("PostgreSQL tests not selected")
    name = create_database("utf8", "postgresql")
    db = PacsDb(name)
    try:
        args = write_configs(tmp_path, name, service.url)
        db.execute("DROP INDEX study_updated")
        install(name)
        patient = db.add_patient()
        db.execute(
            "INSERT INTO study (patient_fk, study_iuid, num_series, num_instances, availability,"
            " study_status, created_time, updated_time)"
            " SELECT %s, '1.2.9.' || i, 1, 1, 0, 0, %s, %s FROM generate_series(1, 8000) AS i",
            (patient, LONG_AGO, LONG_AGO),
        )
        db.archive_predates_install()
        code, lines = _check_lines(capsys, args)
        assert code == 0
        [warning] = [line for line in lines if line.startswith("warning")]
        assert "index study_updated on study(updated_time) is missing" in warning

        newest = db.query("SELECT MAX(pk) AS pk FROM study")[0]["pk"]
        new = db.add_study(patient)
        db.store_series(newest)
        db.store_series(1)  # ten years old: left to reconcile
        assert main(args) == 0
        assert service.study_pks() == sorted([newest, new])

        # PostgreSQL has no index hints: an index on updated_time under any
        # name serves, and check says so.
        db.execute("CREATE INDEX idx_study_upd ON study (updated_time)")
        code, lines = _check_lines(capsys, args)
        assert "ok      index idx_study_upd on study(updated_time)" in "\n".join(lines)
    finally:
        db.close()
        drop_database(name)


@pytest.mark.skipif(
    not shutil.which("mariadb-install-db"), reason="needs mariadbd and mariadb-install-db"
)
def test_lower_case_table_names_server_installs_and_delivers(service, tmp_path, capsys):
    """lower_case_table_names=1 can only be chosen when a server's data
    directory is made: a private server of the test's own, with a database
    named in mixed case as some sites do."""
    sys.path.insert(0, str(conftest.ROOT / "dev"))
    import storm

    server = storm.PrivateMariaDB(tmp_path / "db", options=("--lower-case-table-names=1",))
    server.install()
    server.start()
    try:
        server.admin("CREATE DATABASE Pacs_DB CHARACTER SET latin1")
        server.run_file("Pacs_DB", conftest.SCHEMA_SQL)
        server.run_file("Pacs_DB", INDEXER_SQL)
        server.admin("CREATE USER 'indexer'@'%' IDENTIFIED BY 'pw'")
        server.admin("GRANT ALL ON pacs_db.* TO 'indexer'@'%'")
        server.admin(
            "INSERT INTO Study (study_iuid, num_series, num_instances, availability,"
            " study_status, updated_time) VALUES ('1.2.3', 1, 1, 0, 0, NOW())",
            database="Pacs_DB",
        )
        config = {
            "database": {
                "host": "127.0.0.1",
                "port": server.port,
                "user": "indexer",
                "password": "pw",
                "name": "Pacs_DB",
            },
            "key": "k",
            "webservice_url": service.url,
        }
        (tmp_path / "config.json").write_text(json.dumps(config))
        (tmp_path / "config.json").chmod(0o600)
        (tmp_path / "server.json").write_text('{"server": "000"}')
        args = [
            "--config",
            str(tmp_path / "config.json"),
            "--server",
            str(tmp_path / "server.json"),
        ]
        code, lines = _check_lines(capsys, args)
        assert code == 0, lines
        assert main(args) == 0
        assert [doc["study_iuid"] for doc in service.documents] == ["1.2.3"]
    finally:
        server.stop()
