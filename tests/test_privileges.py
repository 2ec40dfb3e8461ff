"""The indexer's database account never gains a right it was not granted:
indexer_process runs with the caller's rights, and on PostgreSQL with a
search_path that no temporary object of the caller can shadow."""

from __future__ import annotations

import pymysql
import pytest
from conftest import (
    DB_HOST,
    DB_PORT,
    ENGINES,
    INDEXER_PASSWORD,
    INDEXER_USER,
    PG_HOST,
    PG_PORT,
    ArcDb,
    PacsDb,
    _emptied,
    create_database,
    drop_database,
    install,
)

PACS_TABLES = {
    "dcm4chee2": ("patient", "study", "series"),
    "arc5": ("person_name", "patient", "patient_id", "study", "study_query_attrs"),
}


def on(engine: str) -> pytest.MarkDecorator:
    """The test on both schemas of `engine`, if the tests run that engine."""
    params = [(schema, engine) for schema in PACS_TABLES if engine in ENGINES]
    return pytest.mark.parametrize(
        "database", params, indirect=True, ids=lambda param: "-".join(param)
    )


@pytest.fixture(scope="module")
def database(request):
    schema, engine = request.param
    name = create_database("utf8", engine, schema="arc5" if schema == "arc5" else "")
    yield schema, name
    drop_database(name)


@pytest.fixture
def db(database):
    """A 2.x or an arc-light database, on each engine, with two studies and
    the indexer freshly installed and granted."""
    schema, name = database
    tables = ("study_service", *PACS_TABLES[schema])
    db = _emptied(ArcDb(name) if schema == "arc5" else PacsDb(name), tables)
    db.schema = schema
    if schema == "arc5":
        for _ in range(2):
            db.settle(db.add_study(db.add_patient()))
    else:
        db.add_studies(2)
    yield db
    db.close()


def _snapshot(db) -> dict[str, list]:
    return {
        table: db.query(f"SELECT * FROM {table} ORDER BY pk") for table in PACS_TABLES[db.schema]
    }


def _as_indexer_pg(db):
    import pg8000.dbapi

    conn = pg8000.dbapi.connect(
        host=PG_HOST, port=PG_PORT, user=INDEXER_USER, password=INDEXER_PASSWORD,
        database=db.name,
    )  # fmt: skip
    conn.autocommit = True
    return conn


# What the indexer's role can do with nothing but the grants (TEMP on the
# database is PostgreSQL's default for every role): a temporary table named
# study_service, searched first by a function whose search_path puts pg_temp
# first, with a trigger that makes the role superuser when the function
# writes to it as its owner.
ESCALATION = (
    "CREATE TEMP TABLE study_service (LIKE public.study_service INCLUDING ALL)",
    "INSERT INTO pg_temp.study_service SELECT * FROM public.study_service",
    "CREATE FUNCTION pg_temp.escalate() RETURNS trigger LANGUAGE plpgsql AS"
    f" $$ BEGIN EXECUTE 'ALTER ROLE {INDEXER_USER} SUPERUSER'; RETURN NEW; END $$",
    "CREATE TRIGGER escalate BEFORE INSERT OR UPDATE ON pg_temp.study_service"
    " FOR EACH ROW EXECUTE PROCEDURE pg_temp.escalate()",
)


def _superuser(db) -> bool:
    return db.query("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (INDEXER_USER,))[0][
        "rolsuper"
    ]


def _escalate_and_call(db) -> None:
    conn = _as_indexer_pg(db)
    try:
        cur = conn.cursor()
        for statement in ESCALATION:
            cur.execute(statement)
        cur.execute("SELECT indexer_process()")
    finally:
        conn.close()


@on("postgresql")
def test_postgresql_role_cannot_make_itself_superuser_through_indexer_process(db):
    new_study = db.add_study(db.add_patient())
    before = _snapshot(db)

    _escalate_and_call(db)

    assert _superuser(db) is False
    assert _snapshot(db) == before
    # indexer_process wrote the real queue, not the caller's temporary table.
    assert new_study in db.queue()


@on("postgresql")
def test_postgresql_reinstall_mends_a_site_installed_with_a_definer_function(db):
    # As the scripts of version 2.1 installed it: SECURITY DEFINER, with the
    # installer's search_path, in which pg_temp is searched first.
    db.execute("ALTER FUNCTION indexer_process() SECURITY DEFINER SET search_path FROM CURRENT")
    try:
        _escalate_and_call(db)
        assert _superuser(db) is True  # the attack this guards against is real
    finally:
        db.execute(f"ALTER ROLE {INDEXER_USER} NOSUPERUSER")

    install(db.name)

    [function] = db.query(
        "SELECT prosecdef, proconfig FROM pg_proc WHERE proname = 'indexer_process'"
    )
    assert function["prosecdef"] is False
    # search_path pinned, and the planner settings that keep it on indexes.
    assert sorted(function["proconfig"]) == [
        "enable_bitmapscan=off",
        "enable_hashjoin=off",
        "enable_indexonlyscan=off",
        "enable_mergejoin=off",
        "enable_seqscan=off",
        "search_path=public, pg_temp",
    ]
    _escalate_and_call(db)
    assert _superuser(db) is False


# MySQL has no triggers on temporary tables: what a definer procedure would
# give away there is its definer's rights on the tables it reads and writes.
@on("mysql")
def test_mysql_procedure_runs_with_the_callers_rights_only(db):
    [routine] = db.query(
        "SELECT SECURITY_TYPE FROM information_schema.ROUTINES"
        " WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME = 'indexer_process'"
    )
    assert routine["SECURITY_TYPE"] == "INVOKER"
    # An account granted EXECUTE and nothing else gets nothing through it:
    # a definer procedure would have read study and written study_service
    # with root's rights.
    account = f"'{INDEXER_USER}_bare'@'%'"
    db.execute(f"CREATE USER {account} IDENTIFIED BY '{INDEXER_PASSWORD}'")
    try:
        db.execute(f"GRANT EXECUTE ON PROCEDURE `{db.name}`.indexer_process TO {account}")
        before = db.queue()
        conn = pymysql.connect(
            host=DB_HOST, port=DB_PORT, user=f"{INDEXER_USER}_bare", password=INDEXER_PASSWORD
        )
        try:
            with pytest.raises(pymysql.err.OperationalError) as denied:
                conn.cursor().execute(f"CALL `{db.name}`.indexer_process()")
        finally:
            conn.close()
        assert denied.value.args[0] in (1142, 1143)  # command denied on a table or column
        assert db.queue() == before
    finally:
        db.execute(f"DROP USER {account}")
