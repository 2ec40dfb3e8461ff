"""The client and the install scripts compute a study row's version alike,
for every engine and schema: a study that `initial` enqueued is not enqueued
again by the next tick, and a tick's enqueue is what `initial` would write."""

from __future__ import annotations

import re

import pytest
from conftest import ENGINES, ROOT, ArcDb, PacsDb, _emptied, create_database, drop_database

from dicom_indexer.sources.dcm4chee import (
    ArcLight5MySQL,
    ArcLight5PostgreSQL,
    Dcm4chee2MySQL,
    Dcm4chee2PostgreSQL,
)

CASES = {
    ("dcm4chee2", "mysql"): ("add_indexer.sql", Dcm4chee2MySQL),
    ("dcm4chee2", "postgresql"): ("add_indexer_postgresql.sql", Dcm4chee2PostgreSQL),
    ("arc5", "mysql"): ("add_indexer_arclight5_mysql.sql", ArcLight5MySQL),
    ("arc5", "postgresql"): ("add_indexer_arclight5_postgresql.sql", ArcLight5PostgreSQL),
}
PARAMS = [case for case in CASES if case[1] in ENGINES]


def _normalized(sql: str) -> str:
    # The client's statements go through the driver's %-formatting.
    return re.sub(r"\s+", "", sql.replace("%%", "%")).lower()


@pytest.mark.parametrize("schema, engine", sorted(CASES), ids="-".join)
def test_the_install_script_writes_the_clients_version_expression(schema, engine):
    script, statements = CASES[(schema, engine)]
    text = re.sub(r"--[^\n]*", "", (ROOT / "extras" / script).read_text())
    found = re.findall(r"((?:UNHEX\(MD5|decode\(md5)\(.*?)\s+AS version", text, re.S | re.I)
    assert found, f"no version expression in {script}"
    for expression in found:
        assert _normalized(expression) == _normalized(statements.STUDY_ROW_VERSION), script


@pytest.fixture(scope="module", params=PARAMS, ids="-".join)
def database(request):
    schema, engine = request.param
    name = create_database("utf8", engine, schema="arc5" if schema == "arc5" else "")
    yield schema, name
    drop_database(name)


def test_indexer_process_records_the_version_the_client_computes(database):
    schema, name = database
    if schema == "arc5":
        db = _emptied(ArcDb(name), ("study_service", "study_query_attrs", "study", "patient_id",
                                    "patient", "person_name"))  # fmt: skip
        for _ in range(3):
            db.settle(db.add_study(db.add_patient()))
        db.add_study(db.add_patient(None), desc="*", time="*")
    else:
        db = _emptied(PacsDb(name), ("study_service", "series", "study", "patient"))
        db.add_studies(3)
        db.add_study(None, desc=None, mods=None, study_datetime=None)
    try:
        assert db.call_indexer_process() == 4
        statements = CASES[(schema, db.engine)][1]
        computed = {
            row["pk"]: bytes(row["row_version"])
            for row in db.query(statements.SELECT_STUDY_PAGE, (0, 100))
        }
        recorded = {pk: bytes(row["study_version"]) for pk, row in db.queue().items()}
        assert computed == recorded
    finally:
        db.close()
