"""dcm4chee 2.x and dcm4chee-arc-light 5, read through their database."""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..database import Database
from ..document import _datetime_or_none, _text
from ..engines import ENGINES, MySQLEngine, PostgreSQLEngine, Statements
from ..errors import EXIT_DATABASE, DatabaseError
from ..reconciliation import reconcile
from ..study_service import ENQUEUE_POLL_SECONDS, MAX_PK
from ..values import _absent_as_none, _arclight_datetime, _person_name_as_2x

if TYPE_CHECKING:
    from ..config import Settings
    from ..reconciliation import ReconcileReport
    from ..run import Stop
    from ..study_service import StudyServiceQueue

# Without dcm4chee's study_updated index, indexer_process re-reads this many
# of the newest studies on each call (recent_rows in the install scripts).
log = logging.getLogger("dicom_indexer")

RECENT_ROWS_WITHOUT_TIME_INDEX = 5000
# indexer_process's cursor (the same on both engines and every schema), and
# the one a lost cursor is replaced with: before every study.
TICK_CURSOR = "SELECT study_pk FROM study_service WHERE study_pk = 0"
RESTART_TICK_CURSOR = (
    "INSERT INTO study_service (study_pk, status, study_updated_time, cursor_pk)"
    " VALUES (0, 'cursor', '1970-01-02 00:00:00', 0)"
)


# --------------------------------------------------------------------------
# Statements, written once per difference (engines.Statements): what every
# schema runs alike (Dcm4cheeSQL); where each schema keeps a study's fields
# (Dcm4chee2SQL, ArcLight5SQL); what differs on each engine, whatever the
# schema (MySQLSourceSQL, PostgreSQLSourceSQL); and per schema and engine,
# only the study row's version, which the install scripts compute alike.
# --------------------------------------------------------------------------


class Dcm4cheeSQL(Statements):
    """The statements of every dcm4chee schema on every engine. The parts
    they name: a schema's STUDY_COLUMNS, STUDY_JOINS (the tables beside study
    they come from), WITHDRAWN (a study no longer in the index) and
    TIME_COLUMN (what indexer_process reads by); an engine's PENDING_INDEX,
    NEW_PENDING, DUE_PENDING and IN_IUIDS; a schema on an engine's
    STUDY_ROW_VERSION."""

    COUNT_STUDIES = "SELECT COUNT(*) AS n FROM study"
    # One page of the archive, by primary key: a plain read, so it takes no
    # lock that dcm4chee's writes would wait for. The version is what a study
    # row contributes to its document, plus updated_time: the version
    # indexer_process records, so that a study enqueued by `initial` is not
    # enqueued again by the next tick. The install script writes the same
    # expression (tests/test_sql.py checks they agree).
    SELECT_STUDY_PAGE = (
        "SELECT s.pk, s.updated_time, {STUDY_ROW_VERSION} AS row_version, s.study_iuid"
        " FROM study s WHERE s.pk > ? ORDER BY s.pk LIMIT ?"
    )
    QUEUE_COLUMNS = (
        "SELECT q.study_pk AS queued_pk, q.sent_version, q.study_iuid AS known_iuid,"
        " q.enqueued_at AS queued_at, q.attempts,"
    )
    # LEFT JOINs: a study gone from dcm4chee comes back with s.pk NULL; one
    # whose patient row is missing, with p.* NULL.
    PENDING_FROM = (
        " FROM study_service q{PENDING_INDEX} LEFT JOIN study s ON s.pk = q.study_pk{STUDY_JOINS}"
    )
    SELECT_NEW_PAGE = "{QUEUE_COLUMNS}{STUDY_COLUMNS}{PENDING_FROM}{NEW_PENDING}"
    SELECT_DUE_PAGE = "{QUEUE_COLUMNS}{STUDY_COLUMNS}{PENDING_FROM}{DUE_PENDING}"
    # reconcile: a page of the archive with what the service acknowledged
    # for each; then the queue rows of that pk range whose study is gone.
    SELECT_RECONCILE_PAGE = (
        "SELECT{STUDY_COLUMNS}, q.status, q.sent_version"
        " FROM study s{STUDY_JOINS} LEFT JOIN study_service q ON q.study_pk = s.pk"
        " WHERE s.pk > ? ORDER BY s.pk LIMIT ?"
    )
    SELECT_GONE_IN_RANGE = (
        "SELECT q.study_pk, q.study_iuid FROM study_service q"
        " LEFT JOIN study s ON s.pk = q.study_pk"
        " WHERE q.study_pk > ? AND q.study_pk <= ?"
        " AND q.status IN ('pending', 'sent', 'failed') AND {WITHDRAWN}"
    )
    # adopt: which of these UIDs this indexer delivered, through the
    # archive's unique index on study_iuid.
    SELECT_DELIVERED_IUIDS = (
        "SELECT s.study_iuid FROM study s JOIN study_service q ON q.study_pk = s.pk"
        " WHERE q.status = 'sent' AND s.study_iuid {IN_IUIDS}"
    )


class MySQLSourceSQL(Dcm4cheeSQL):
    """What every schema runs differently on MySQL/MariaDB."""

    INDEXER_PROCESS = "CALL indexer_process()"
    # Forced: ordered by pk, the optimizer may otherwise walk the primary key
    # through every sent study to find the few pending.
    PENDING_INDEX = " FORCE INDEX (study_service_status)"
    # How the statements that list pending studies end, whatever their
    # schema: those not tried since enqueued, a page at a time in pk order up
    # to a bound (how far the initial load has enqueued); and those that
    # failed before, whose next attempt is due (NULL: at the next run, after
    # the new ones).
    NEW_PENDING = (
        " WHERE q.status = 'pending' AND q.attempts = 0 AND q.study_pk > ? AND q.study_pk <= ?"
        " ORDER BY q.study_pk LIMIT ?"
    )
    DUE_PENDING = (
        " WHERE q.status = 'pending' AND q.attempts > 0"
        " AND (q.next_attempt_at IS NULL OR q.next_attempt_at <= NOW(6))"
        " AND q.study_pk > ? ORDER BY q.study_pk LIMIT ?"
    )
    IN_IUIDS = "IN ({placeholders})"  # one %s per UID, by PacsSource.delivered_iuids
    # Indexes of study whose first column is the one indexer_process reads by.
    TIME_INDEXES = (
        "SELECT INDEX_NAME AS name FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study'"
        " AND SEQ_IN_INDEX = 1 AND COLUMN_NAME = '{TIME_COLUMN}'"
    )


class PostgreSQLSourceSQL(Dcm4cheeSQL):
    """What every schema runs differently on PostgreSQL.

    It has no index hints: the pending range is written as a range of
    study_service_status itself, (status, study_pk) from ('pending', after)
    to ('pending', bound), ordered as that index is. No other index can serve
    that condition or that order, so the planner cannot walk the primary key
    through every sent study instead, whatever its statistics say (with a
    separate status = 'pending', the primary key's order would serve as
    well); tests/test_install.py checks the plan."""

    INDEXER_PROCESS = "SELECT indexer_process() AS enqueued"
    PENDING_INDEX = ""
    NEW_PENDING = (
        " WHERE (q.status, q.study_pk) > ('pending', ?)"
        " AND (q.status, q.study_pk) <= ('pending', ?)"
        " AND q.attempts = 0 ORDER BY q.status, q.study_pk LIMIT ?"
    )
    DUE_PENDING = (
        " WHERE (q.status, q.study_pk) > ('pending', ?)"
        f" AND (q.status, q.study_pk) <= ('pending', {MAX_PK}) AND q.attempts > 0"
        " AND (q.next_attempt_at IS NULL OR q.next_attempt_at <= LOCALTIMESTAMP)"
        " ORDER BY q.status, q.study_pk LIMIT ?"
    )
    IN_IUIDS = "= ANY(?::text[])"
    TIME_INDEXES = (
        "SELECT c.relname AS name FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = 'study'::regclass AND a.attname = '{TIME_COLUMN}'"
    )


class Dcm4chee2SQL(Dcm4cheeSQL):
    """dcm4chee 2.x: a study's fields are columns of study and patient."""

    STUDY_COLUMNS = (
        " s.pk AS study_pk, s.study_iuid, s.study_datetime, s.study_desc, s.updated_time,"
        " s.mods_in_study, s.num_series, s.num_instances,"
        " p.pk AS patient_pk, p.pat_id, p.pat_name"
    )
    STUDY_JOINS = " LEFT JOIN patient p ON p.pk = s.patient_fk"
    WITHDRAWN = "s.pk IS NULL"
    TIME_COLUMN = "updated_time"
    # What a tick costs without the index: the newest studies, re-read.
    READ_RECENT_STUDIES = (
        "SELECT COUNT(DISTINCT {STUDY_ROW_VERSION}) AS n FROM study s"
        " WHERE s.pk > (SELECT COALESCE(MAX(pk), 0) FROM study) - ?"
    )
    # What the indexer's user must be allowed (extras/grant_indexer.sql),
    # each probed by statements that touch no row.
    PRIVILEGE_PROBES = (
        (
            "SELECT on the columns of study it reads",
            (
                "SELECT pk, patient_fk, study_iuid, study_datetime, study_desc, mods_in_study,"
                " num_series, num_instances, updated_time FROM study LIMIT 0",
            ),
        ),
        (
            "SELECT on the columns of patient it reads",
            ("SELECT pk, pat_id, pat_name FROM patient LIMIT 0",),
        ),
    )


class Dcm4chee2MySQL(MySQLSourceSQL, Dcm4chee2SQL):
    """dcm4chee 2.x on MySQL/MariaDB (extras/add_indexer.sql)."""

    engine = MySQLEngine
    STUDY_ROW_VERSION = (
        "UNHEX(MD5(CONCAT_WS('|', s.updated_time, s.num_series, s.num_instances,"
        " IFNULL(s.mods_in_study, ''), IFNULL(s.patient_fk, ''), s.study_iuid,"
        " IFNULL(s.study_datetime, ''), IFNULL(s.study_desc, ''))))"
    )


class Dcm4chee2PostgreSQL(PostgreSQLSourceSQL, Dcm4chee2SQL):
    """dcm4chee 2.x on PostgreSQL (extras/add_indexer_postgresql.sql)."""

    engine = PostgreSQLEngine
    # Timestamps are formatted explicitly: concat_ws would follow the
    # session's DateStyle.
    STUDY_ROW_VERSION = (
        "decode(md5(concat_ws('|', to_char(s.updated_time, 'YYYY-MM-DD HH24:MI:SS.US'),"
        " s.num_series, s.num_instances, COALESCE(s.mods_in_study, ''),"
        " COALESCE(s.patient_fk::text, ''), s.study_iuid,"
        " COALESCE(to_char(s.study_datetime, 'YYYY-MM-DD HH24:MI:SS.US'), ''),"
        " COALESCE(s.study_desc, ''))), 'hex')"
    )


class ArcLight5SQL(Dcm4cheeSQL):
    """dcm4chee-arc-light 5.31 and later: a study's fields spread over study,
    study_query_attrs, patient, patient_id and person_name."""

    # The patient's primary ID: its first patient_id row (5.31 and later).
    PATIENT_ID = (
        "(SELECT i.pat_id FROM patient_id i WHERE i.patient_fk = p.pk ORDER BY i.pk LIMIT 1)"
    )
    STUDY_COLUMNS = (
        " s.pk AS study_pk, s.study_iuid, s.study_date, s.study_time, s.study_desc,"
        " s.updated_time, s.study_size, s.rejection_state,"
        " a.pk AS counts_pk, a.mods_in_study, a.num_series, a.num_instances,"
        " p.pk AS patient_pk, {PATIENT_ID} AS pat_id, {PAT_NAME} AS pat_name"
    )
    # The patient's name: its alphabetic group (a user granted before 2.5
    # sees no other), or all three groups, '='-joined, for values.person_name
    # (arc-light stores an absent group as '^^^^^', never NULL; COALESCE
    # anyway: MySQL's CONCAT is NULL if any part is).
    PAT_NAME = "n.alphabetic_name"
    # The counts of the query/retrieve view (a bound parameter, first).
    STUDY_JOINS = (
        " LEFT JOIN study_query_attrs a ON a.study_fk = s.pk AND a.view_id = ?"
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
        " LEFT JOIN person_name n ON n.pk = p.pat_name_fk"
    )
    # A completely rejected study is withdrawn from the index, as a deleted one.
    WITHDRAWN = "(s.pk IS NULL OR s.rejection_state = 2)"
    # Any index on access_time serves: the install scripts force none.
    TIME_COLUMN = "access_time"
    PRIVILEGE_PROBES = (
        (
            "SELECT on the columns of study it reads",
            (
                "SELECT pk, patient_fk, study_iuid, study_date, study_time, study_desc,"
                " updated_time, access_time, version, rejection_state, study_size"
                " FROM study LIMIT 0",
            ),
        ),
        (
            "SELECT on the columns of patient, patient_id and person_name it reads",
            (
                "SELECT p.pk, {PATIENT_ID}, {PAT_NAME} FROM patient p"
                " LEFT JOIN person_name n ON n.pk = p.pat_name_fk LIMIT 0",
            ),
        ),
        (
            "SELECT on the columns of study_query_attrs it reads",
            (
                "SELECT pk, study_fk, view_id, num_series, num_instances, mods_in_study"
                " FROM study_query_attrs LIMIT 0",
            ),
        ),
    )


class ArcLight5MySQL(MySQLSourceSQL, ArcLight5SQL):
    """dcm4chee-arc-light 5.31 and later on MySQL/MariaDB
    (extras/add_indexer_arclight5_mysql.sql)."""

    engine = MySQLEngine
    STUDY_ROW_VERSION = (
        "UNHEX(MD5(CONCAT_WS('|', DATE_FORMAT(s.updated_time, '%Y-%m-%d %H:%i:%s.%f'),"
        " IFNULL(s.version, ''), s.patient_fk, s.study_iuid, s.study_date,"
        " s.study_time, s.study_desc, s.rejection_state)))"
    )


class ArcLight5PostgreSQL(PostgreSQLSourceSQL, ArcLight5SQL):
    """dcm4chee-arc-light 5.31 and later on PostgreSQL
    (extras/add_indexer_arclight5_postgresql.sql)."""

    engine = PostgreSQLEngine
    STUDY_ROW_VERSION = (
        "decode(md5(concat_ws('|', to_char(s.updated_time, 'YYYY-MM-DD HH24:MI:SS.US'),"
        " COALESCE(s.version::text, ''), s.patient_fk::text, s.study_iuid,"
        " s.study_date, s.study_time, s.study_desc, s.rejection_state::text)), 'hex')"
    )


# arc-light 5.23 to 5.30: a patient has one patient_id row, which
# patient.patient_id_fk names. Everything else is as in 5.31.
PATIENT_ID_BEFORE_5_31 = "(SELECT i.pat_id FROM patient_id i WHERE i.pk = p.patient_id_fk)"


class ArcLight523MySQL(ArcLight5MySQL):
    """dcm4chee-arc-light 5.23 to 5.30 on MySQL/MariaDB."""

    PATIENT_ID = PATIENT_ID_BEFORE_5_31


class ArcLight523PostgreSQL(ArcLight5PostgreSQL):
    """dcm4chee-arc-light 5.23 to 5.30 on PostgreSQL."""

    PATIENT_ID = PATIENT_ID_BEFORE_5_31


NAME_GROUPS = (
    "CONCAT(COALESCE(n.alphabetic_name, ''), '=', COALESCE(n.ideographic_name, ''), '=',"
    " COALESCE(n.phonetic_name, ''))"
)


class ArcLight5GroupsMySQL(ArcLight5MySQL):
    PAT_NAME = NAME_GROUPS


class ArcLight5GroupsPostgreSQL(ArcLight5PostgreSQL):
    PAT_NAME = NAME_GROUPS


class ArcLight523GroupsMySQL(ArcLight523MySQL):
    PAT_NAME = NAME_GROUPS


class ArcLight523GroupsPostgreSQL(ArcLight523PostgreSQL):
    PAT_NAME = NAME_GROUPS


class Dcm4chee2:
    """dcm4chee 2.x: the document's fields are columns of study and patient."""

    name = "dcm4chee 2.x"
    name_groups = True  # 2.x stores a name whole, its groups included
    STATEMENTS: Mapping[str, Any] = {"mysql": Dcm4chee2MySQL, "postgresql": Dcm4chee2PostgreSQL}
    UNSETTLED = "the archive has not computed its counts yet (arc-light: study_query_attrs)"
    SCRIPTS = {
        "mysql": ("mysql DBNAME < extras/add_indexer.sql", "extras/grant_indexer.sql"),
        "postgresql": (
            "psql -d DBNAME -f extras/add_indexer_postgresql.sql",
            "extras/grant_indexer_postgresql.sql",
        ),
    }

    def statements(self, engine: str) -> Any:
        return self.STATEMENTS[engine]

    def join_args(self) -> tuple[Any, ...]:
        """The parameters the statements' joins take before their own."""
        return ()

    def fields(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """A row read with this schema's statements -> the fields that
        study_document() takes (2.x's own columns)."""
        return row

    def settled(self, row: Mapping[str, Any]) -> bool:
        """Whether the archive has computed everything the document carries."""
        return True

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        """Deleted from the PACS since it was enqueued."""
        return row["study_pk"] is None

    def time_index(self, source: PacsSource, names: list[str]) -> tuple[bool, str]:
        """`check`'s verdict on the indexes of study whose first column is the
        one indexer_process reads by (`names`): dcm4chee's study_updated, or
        without it the newest studies re-read on each tick."""
        if source.uses_time_index(names):
            return True, (
                f"index {names[0]} on study(updated_time): each tick reads only"
                " the studies that changed"
            )
        started = time.monotonic()
        source.db.query(source.sql.READ_RECENT_STUDIES, (RECENT_ROWS_WITHOUT_TIME_INDEX,))
        cost_ms = (time.monotonic() - started) * 1000
        other = f" (an index on it exists as '{names[0]}', another name)" if names else ""
        return False, (
            f"index study_updated on study(updated_time) is missing{other}: each tick"
            f" re-reads the {RECENT_ROWS_WITHOUT_TIME_INDEX:,} newest studies"
            f" ({cost_ms:.0f} ms here) and finds changes to older ones only with the nightly"
            " `client.py reconcile`; to read only what changed, if your DBA agrees:"
            " CREATE INDEX study_updated ON study (updated_time)"
        )


class ArcLight5(Dcm4chee2):
    """dcm4chee-arc-light 5.23 and later (checked up to 5.35).

    - patient_id: the patient's primary ID, the lowest patient_id.pk of the
      patient (arc-light inserts PatientID before the Other Patient IDs it
      trusts); before 5.31, the one row patient.patient_id_fk names.
    - patient_name: person_name's three groups, '='-joined, under
      values.person_name's rule (trailing empty components and groups
      dropped: 'PEREZ^JUAN^^^^', '^^^^^', '^^^^^' is 'PEREZ^JUAN', as 2.x
      sends it; 'Wang^XiaoDong=王^小東', as Orthanc, DICOMweb and DIMSE do).
      A user granted before 2.5 sees only the alphabetic group: that one.
    - study_datetime from study_date 'YYYYMMDD' and study_time 'HHMMSS.fff';
      '*' (absent) gives null, or midnight when only the time is absent.
    - '*' descriptions as null; counts and modalities from study_query_attrs
      for the query/retrieve view (modalities sorted: arc-light builds them
      from a set, in no order, and the document must not change with it).
    - A study is sent once it has settled: its study_query_attrs row rebuilt
      and study_size computed after the last store. Until then it waits,
      pending. A complete rejection withdraws it, as a deletion does.
    """

    SCRIPTS = {
        "mysql": (
            "mysql DBNAME < extras/add_indexer_arclight5_mysql.sql",
            "extras/grant_indexer_arclight5_mysql.sql",
        ),
        "postgresql": (
            "psql -d DBNAME -f extras/add_indexer_arclight5_postgresql.sql",
            "extras/grant_indexer_arclight5_postgresql.sql",
        ),
    }

    def __init__(self, patient_id_rows: bool, view: str, name_groups: bool = True) -> None:
        self.view = view
        # What the indexer's own user can see tells these apart (a column it
        # has no right on is invisible to it): the generation, and whether it
        # may read a name's ideographic and phonetic groups.
        self.name = "dcm4chee-arc-light " + ("5.31 or later" if patient_id_rows else "5.23 to 5.30")
        self.name_groups = name_groups
        self.STATEMENTS = {
            (True, True): {"mysql": ArcLight5GroupsMySQL, "postgresql": ArcLight5GroupsPostgreSQL},
            (True, False): {"mysql": ArcLight5MySQL, "postgresql": ArcLight5PostgreSQL},
            (False, True): {
                "mysql": ArcLight523GroupsMySQL,
                "postgresql": ArcLight523GroupsPostgreSQL,
            },
            (False, False): {"mysql": ArcLight523MySQL, "postgresql": ArcLight523PostgreSQL},
        }[(patient_id_rows, name_groups)]

    def join_args(self) -> tuple[Any, ...]:
        return (self.view,)

    def fields(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        fields = dict(row)
        fields["pat_name"] = _person_name_as_2x(row["pat_name"])
        fields["study_desc"] = _absent_as_none(row["study_desc"])
        fields["study_datetime"] = _arclight_datetime(row["study_date"], row["study_time"])
        mods = _absent_as_none(row["mods_in_study"])
        fields["mods_in_study"] = "\\".join(sorted(set(mods.split("\\")))) if mods else None
        return fields

    def settled(self, row: Mapping[str, Any]) -> bool:
        size = row["study_size"]
        return row["counts_pk"] is not None and size is not None and size >= 0

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        # rejection_state 2: every instance rejected (COMPLETE); the archive
        # no longer returns the study to queries.
        return row["study_pk"] is None or row["rejection_state"] == 2

    def time_index(self, source: PacsSource, names: list[str]) -> tuple[bool, str]:
        # Any index on access_time serves: the install scripts force none.
        if names:
            return True, (
                f"index {names[0]} on study(access_time): each tick reads only the"
                " studies that changed (arc-light sets access_time whenever it updates"
                " a study)"
            )
        return False, (
            "arc-light's index on study(access_time) is missing: each tick reads the"
            " whole study table; re-create it as arc-light's create script does"
        )


def detect_schema(columns: set[tuple[str, str]], view: str) -> Dcm4chee2:
    """Which schema a database holds, from the SCHEMA_PROBES columns found."""
    if ("study", "num_instances") in columns or ("study_query_attrs", "view_id") not in columns:
        # 2.x, or nothing this user may see: 2.x's own checks say what is wrong.
        return Dcm4chee2()
    if ("person_name", "alphabetic_name") not in columns:
        raise DatabaseError(
            "this is a dcm4chee-arc-light database older than 5.23 (person_name has no"
            " alphabetic_name column): this client reads 5.23 to 5.35; upgrade the archive"
        )
    groups = {("person_name", "ideographic_name"), ("person_name", "phonetic_name")} <= columns
    return ArcLight5(("patient_id", "patient_fk") in columns, view, groups)


class PacsDatabase(Database):
    """One connection to the PACS's database, through its engine; the schema
    found there; its source (the studies) and its queue (study_service)."""

    def __init__(self, settings: Settings) -> None:
        engine = ENGINES[settings.db_engine](settings.database)
        super().__init__(settings, engine, f"database '{settings.db_name}' {engine.route}")
        try:
            found = {(row["t"], row["c"]) for row in self.query(self.queue.sql.SCHEMA_COLUMNS)}
            self.schema = detect_schema(found, settings.query_view)
        except self.Error as exc:
            self.close()
            raise DatabaseError(f"cannot read {self.where}: {self.describe(exc)}") from None
        except DatabaseError:
            self.close()
            raise
        self.source = PacsSource(self, self.schema)
        self.install_script, self.grant_script = self.schema.SCRIPTS[settings.db_engine]

    def privilege_problems(self) -> list[str]:
        """What a run needs and this user may not do, found by statements
        that touch no row (the server checks privileges before rows)."""
        user = self.settings.db_user
        problems = []
        probes = (*self.source.sql.PRIVILEGE_PROBES, *self.queue.sql.PRIVILEGE_PROBES)
        for what, statements in probes:
            for sql in statements:
                try:
                    self.query(sql)
                except self.Error as exc:
                    if self.engine.is_missing_object(exc):
                        problems.append(f"user '{user}' lacks {what}: {self.describe(exc)}")
                        break
                    raise
        return problems

    def server_version(self) -> str:
        return str(self.query(self.queue.sql.SERVER_VERSION)[0]["v"])

    def connection_lines(self) -> list[tuple[str, str, int]]:
        """check's first lines: whom it connected to, and the schema found."""
        user, version = self.settings.db_user, self.server_version()
        line = f"database: connected to {self.where} as {user} (server {version})"
        return [("ok", line, 0), ("ok", f"schema: {self.schema.name}", 0)]

    def installation_lines(self) -> list[tuple[str, str, int]]:
        """check's lines once study_service is found current: the privileges."""
        results = [("ok", "study_service and indexer_process are installed and current", 0)]
        problems = self.privilege_problems()
        fix = f"; fix: run {self.grant_script} (see README)"
        results += [("FAILED", f"privileges: {p}{fix}", EXIT_DATABASE) for p in problems]
        if not problems:
            user = self.settings.db_user
            results.append(("ok", f"privileges: {user} may do what a run does", 0))
        if not self.schema.name_groups:
            results.append(
                (
                    "warning",
                    "names are sent with their alphabetic group only: this user may not read"
                    " person_name's ideographic_name and phonetic_name (granted since 2.5);"
                    f" to send every group, as the other sources do, run {self.grant_script}",
                    0,
                )
            )
        return results


class PacsSource:
    """The studies of a dcm4chee database, read with its schema's statements
    for its engine."""

    pipelined_initial = True  # read in pk order: sent while the load goes on

    def __init__(self, db: PacsDatabase, schema: Dcm4chee2) -> None:
        self.db = db
        self.schema = schema
        self.sql = schema.statements(db.settings.db_engine)
        self.page_size = db.settings.page_size

    def enqueue_changes(self) -> int:
        """Calls indexer_process: enqueues studies new or changed since its last call.

        Without its cursor row (deleted by hand, or study_service emptied)
        indexer_process would start again from now, and a study stored since
        the last tick would never be sent. The row is put back at the very
        beginning instead: this one call reads every study once, through the
        time index, and enqueues those whose version the queue does not hold
        (every one, if the queue was emptied): a full resynchronisation."""
        if not self.db.query(TICK_CURSOR):
            log.warning(
                "study_service has lost the tick's cursor (row 0 deleted, or the table emptied):"
                " this tick reads every study once and sends what the queue does not hold"
            )
            self.db.rowcount(RESTART_TICK_CURSOR)
        return int(self.db.query(self.sql.INDEXER_PROCESS)[0]["enqueued"])

    def count_studies(self) -> int:
        return int(self.db.query(self.sql.COUNT_STUDIES)[0]["n"])

    def initial_page(self, after: int) -> tuple[list[tuple], int]:
        """The initial load's next page: the archive's studies after pk
        `after`, as ENQUEUE_FOR_INITIAL takes them, and the page's last pk."""
        page = self.db.query(self.sql.SELECT_STUDY_PAGE, (after, self.page_size))
        rows = [
            (
                row["pk"],
                _datetime_or_none(row["updated_time"]),
                row["row_version"],
                _text(row["study_iuid"]),
            )
            for row in page
        ]
        return rows, page[-1]["pk"] if page else after

    def initial_enqueued(self, queue: StudyServiceQueue, position: int) -> None:
        """Every study up to here is enqueued: the tick need not re-read them
        by pk (late rows with lower pks are still caught by its time window)."""
        queue.raise_tick_cursor(position)

    def new_studies(
        self, frontier: Callable[[int], int | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Streams the pending studies never tried since enqueued, page by
        page in pk order, with their fields: memory stays flat.

        While an initial load is still enqueueing, frontier(reached) is told how
        far the stream has read and returns the last pk the load committed: the
        stream waits for it instead of ending early. It returns None once
        everything is enqueued.
        """
        after = 0
        while True:
            bound = frontier(after) if frontier else None
            page = self.db.query(
                self.sql.SELECT_NEW_PAGE,
                (
                    *self.schema.join_args(),
                    after,
                    MAX_PK if bound is None else bound,
                    self.page_size,
                ),
            )
            if page:
                yield from page
                after = page[-1]["queued_pk"]
            elif bound is None:
                return
            else:
                # Nothing pending up to the bound: the stream has reached it
                # (the load may have enqueued a page of studies already sent).
                after = bound
                time.sleep(ENQUEUE_POLL_SECONDS)

    def due_studies(self) -> Iterator[dict[str, Any]]:
        """Streams the pending studies that failed before and whose next
        attempt is due, page by page in pk order."""
        after = 0
        while True:
            page = self.db.query(
                self.sql.SELECT_DUE_PAGE, (*self.schema.join_args(), after, self.page_size)
            )
            if not page:
                return
            yield from page
            after = page[-1]["queued_pk"]

    def pending_studies(self) -> Iterator[dict[str, Any]]:
        """Every pending study: never tried first, then those due again."""
        return itertools.chain(self.new_studies(), self.due_studies())

    def reconcile(
        self, queue: StudyServiceQueue, settings: Settings, max_studies: int | None, stop: Stop
    ) -> ReconcileReport:
        return reconcile(self, queue, settings, max_studies, stop)

    def reconcile_page(self, after: int, size: int) -> list[dict[str, Any]]:
        return self.db.query(
            self.sql.SELECT_RECONCILE_PAGE, (*self.schema.join_args(), after, size)
        )

    def gone_between(self, after: int, upto: int) -> list[tuple[int, str | None]]:
        """Queue rows in (after, upto] whose study left the PACS."""
        rows = self.db.query(self.sql.SELECT_GONE_IN_RANGE, (after, upto))
        return [(row["study_pk"], row["study_iuid"]) for row in rows]

    def delivered_iuids(self, iuids: list[str | None]) -> set[str]:
        """Which of these Study Instance UIDs this database's indexer has
        delivered: through the archive's own unique index on study_iuid."""
        wanted = [iuid for iuid in iuids if iuid]
        if not wanted:
            return set()
        if self.db.settings.db_engine == "postgresql":
            rows = self.db.query(self.sql.SELECT_DELIVERED_IUIDS, (wanted,))
        else:
            placeholders = ", ".join(["%s"] * len(wanted))  # placeholders, never values
            rows = self.db.query(
                self.sql.SELECT_DELIVERED_IUIDS.format(placeholders=placeholders), wanted
            )
        return {iuid for iuid in (_text(row["study_iuid"]) for row in rows) if iuid}

    def time_index(self) -> tuple[bool, str]:
        """How indexer_process finds changed studies in this database (for
        `check`): through an index, or by re-reading the newest studies."""
        names = sorted({row["name"] for row in self.db.query(self.sql.TIME_INDEXES)})
        return self.schema.time_index(self, names)

    def uses_time_index(self, names: list[str]) -> bool:
        """Whether indexer_process can use one of these indexes: on MySQL it
        forces study_updated by name; PostgreSQL's planner takes any."""
        if self.db.settings.db_engine == "postgresql":
            return bool(names)
        return "study_updated" in names
