"""The queue: study_service, the indexer's bookkeeping (pending, sent,
failed, deleting, deleted), its statements per engine and the run lock."""

from __future__ import annotations

import collections
import datetime
import itertools
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

from .document import _format_datetime
from .engines import MySQLEngine, PostgreSQLEngine, SQLiteEngine, Statements
from .errors import DatabaseError, LockedError
from .stability import StabilityWindow, hold_reason

if TYPE_CHECKING:
    from .database import Database
    from .delivery import Outcome
    from .sources import Source

# An Orthanc site's queue (study_service in SQLite), beside config.json
# unless queue_file says otherwise.
QUEUE_FILE_NAME = "dicom_indexer_queue.sqlite3"

# study_service bookkeeping rows (see extras/add_indexer.sql).
CURSOR_ROW_PK = 0
INITIAL_ROW_PK = -1
RECONCILE_ROW_PK = -2
MAX_PK = 2**63 - 1
# Statuses of study rows in study_service.
PENDING, SENT, FAILED, DELETING, DELETED = "pending", "sent", "failed", "deleting", "deleted"


# --------------------------------------------------------------------------
# Source: what a PACS holds and how it changes
#
# dcm4chee 2.x keeps a study's fields in study and patient; dcm4chee-arc-light
# 5 spreads them over study, patient, patient_id, person_name and
# study_query_attrs (a cache of counts). A schema class (Dcm4chee2,
# ArcLight5) knows where they live and turns its rows into the fields of the
# document; its statements are written once, with a class per engine that
# holds only what differs there (sources/dcm4chee.py). PacsSource reads
# them; how a tick finds what changed is indexer_process, installed by the
# schema's script. The queue's own table, study_service,
# lives in the same database, so the statements that list pending studies
# join it: one read gives a study's queue state and its fields.
# --------------------------------------------------------------------------

# What SCHEMA_COLUMNS looks for in information_schema: enough to tell 2.x
# from arc-light, and arc-light's generations apart.
SCHEMA_PROBES = (
    ("study", "num_instances"),  # dcm4chee 2.x: the counts are columns of study
    ("study_query_attrs", "view_id"),  # arc-light 5
    ("person_name", "alphabetic_name"),  # arc-light 5.23 and later
    # A name's other groups, which the indexer's user may not see (granted
    # since 2.5): without them names are sent with their alphabetic group.
    ("person_name", "ideographic_name"),
    ("person_name", "phonetic_name"),
    ("patient_id", "patient_fk"),  # arc-light 5.31 and later: 1..n IDs per patient
)
# SCHEMA_PROBES as the list of an SQL `(table, column) IN (...)`, the same on both engines.
SCHEMA_PROBE_PAIRS = ", ".join(f"('{table}', '{column}')" for table, column in SCHEMA_PROBES)
# The SQLite queue's clock: local time, as a dcm4chee database's, to the millisecond.
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now', 'localtime')"


# --------------------------------------------------------------------------
# Queue: study_service, the indexer's bookkeeping
#
# One row per study the indexer knows of: pending, sent, failed, deleting or
# deleted, with the version of the study row last enqueued, the fingerprint
# of the document the service last acknowledged, the attempts and the last
# error, and when the next attempt is due after a failure. Rows with
# study_pk < 1 hold the tick's cursor and the unfinished initial load and
# reconcile. For dcm4chee (2.x and arc-light) it lives in the PACS's own
# database, the only table the indexer adds there, on MySQL/MariaDB or
# PostgreSQL; for every other source (Orthanc), in a SQLite file beside
# config.json. One class of statements per engine.
# --------------------------------------------------------------------------

# How often the sending loop looks again while the initial load is enqueueing.
ENQUEUE_POLL_SECONDS = 0.05
# `status` tells why pending studies wait by reading at most this many of them.
STATUS_PENDING_ROWS = 10000


class QueueSQL(Statements):
    """study_service's statements that every engine runs alike, written once
    (engines.Statements); the class of each engine holds what differs. The
    parts they name: NOW, the database's clock as the queue stamps it, and
    FOR_EACH_PK, which study each row of a batch (execute_batch) is about:
    one row per execution, or on PostgreSQL one array for the batch."""

    # What each engine's class writes for itself (SCHEMA_COLUMNS: only those
    # of a dcm4chee database, MySQL and PostgreSQL).
    NOW: ClassVar[str]
    SERVER_VERSION: ClassVar[str]
    SCHEMA_COLUMNS: ClassVar[str]
    STUDY_SERVICE_COLUMNS: ClassVar[str]
    INDEXER_PROCESS_COUNT: ClassVar[str]
    INDEXER_PROCESS_OUTDATED: ClassVar[str]
    SET_INITIAL_STARTED: ClassVar[str]
    ENQUEUE_FOR_INITIAL: ClassVar[str]
    START_BOOKKEEPING: ClassVar[str]
    RECORD_SENT: ClassVar[str]
    RECORD_FAILURE: ClassVar[str]
    OLDEST_PENDING_SECONDS: ClassVar[str]

    FOR_EACH_PK = "study_pk = ?"
    DATABASE_NOW = "SELECT {NOW} AS now"
    SELECT_BOOKKEEPING = (
        "SELECT enqueued_at AS started, cursor_pk AS position, status"
        " FROM study_service WHERE study_pk = ?"
    )
    SET_CURSOR = "UPDATE study_service SET cursor_pk = ? WHERE study_pk = ?"
    RAISE_CURSOR = (
        "UPDATE study_service SET cursor_pk = GREATEST(COALESCE(cursor_pk, 0), ?)"
        " WHERE study_pk = ?"
    )
    SET_STATUS = "UPDATE study_service SET status = ? WHERE study_pk = ?"
    DELETE_ROW = "DELETE FROM study_service WHERE study_pk = ?"
    SELECT_DELETING_PAGE = (
        "SELECT study_pk, study_iuid FROM study_service"
        " WHERE status = 'deleting' AND study_pk > ? ORDER BY study_pk LIMIT ?"
    )
    RECORD_DELETED = (
        "UPDATE study_service SET status = 'deleted', attempts = attempts + 1,"
        " last_error = NULL, next_attempt_at = NULL, sent_at = {NOW} WHERE {FOR_EACH_PK}"
    )
    RECORD_UNCHANGED = (
        "UPDATE study_service SET status = 'sent', last_error = NULL, next_attempt_at = NULL"
        " WHERE {FOR_EACH_PK}"
    )
    MARK_GONE = (
        "UPDATE study_service SET status = ?, attempts = 0, next_attempt_at = NULL,"
        " last_error = 'study no longer in the PACS' WHERE study_pk = ?"
    )
    # reconcile: sent again; a study back from the trash, as new. sent_version
    # comes first: MySQL evaluates SET left to right, the others on the old row.
    ENQUEUE_CHANGED = (
        "UPDATE study_service SET"
        " sent_version = CASE WHEN status IN ('deleted', 'deleting') THEN NULL"
        " ELSE sent_version END,"
        " status = 'pending', attempts = 0, last_error = NULL, next_attempt_at = NULL,"
        " enqueued_at = {NOW} WHERE {FOR_EACH_PK}"
    )
    # retry-failed: the refused studies, and those waiting after a failure, now.
    RETRY_FAILED = (
        "UPDATE study_service SET status = 'pending', attempts = 0, next_attempt_at = NULL"
        " WHERE status = 'failed' OR (status = 'pending' AND next_attempt_at IS NOT NULL)"
    )
    COUNT_BY_STATUS = (
        "SELECT status, COUNT(*) AS n FROM study_service WHERE study_pk > 0 GROUP BY status"
    )
    COUNT_PENDING = (
        "SELECT COUNT(*) AS n FROM study_service WHERE status IN ('pending', 'deleting')"
    )
    # Pending studies waiting after a failure, and the soonest next attempt.
    COUNT_WAITING = (
        "SELECT COUNT(*) AS n, MIN(next_attempt_at) AS next_at FROM study_service"
        " WHERE status = 'pending' AND next_attempt_at > {NOW}"
    )
    LAST_SENT = "SELECT MAX(sent_at) AS t FROM study_service"
    RECENT_ERRORS = (
        "SELECT study_pk, status, attempts, last_error, next_attempt_at FROM study_service"
        " WHERE last_error IS NOT NULL AND status IN ('pending', 'failed')"
        " ORDER BY enqueued_at DESC LIMIT 5"
    )
    # What the indexer's user must be allowed on its table in the PACS's
    # database, probed by statements that touch no row.
    PRIVILEGE_PROBES = (
        (
            "SELECT, INSERT, UPDATE and DELETE on study_service",
            (
                "SELECT study_pk FROM study_service LIMIT 0",
                "INSERT INTO study_service (study_pk) SELECT 0{FROM_NO_TABLE} WHERE 1 = 0",
                "UPDATE study_service SET attempts = attempts WHERE 1 = 0",
                "DELETE FROM study_service WHERE 1 = 0",
            ),
        ),
    )


class MySQLQueueSQL(QueueSQL):
    """study_service on MySQL/MariaDB: its upserts, index hints and catalog."""

    engine = MySQLEngine
    NOW = "NOW(6)"
    FROM_NO_TABLE = " FROM DUAL"  # MySQL 5.6 and 5.7 want one before WHERE
    SERVER_VERSION = "SELECT VERSION() AS v"
    # The columns of SCHEMA_PROBES this user can see: which schema this is.
    SCHEMA_COLUMNS = (
        "SELECT LOWER(TABLE_NAME) AS t, LOWER(COLUMN_NAME) AS c FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = DATABASE() AND (LOWER(TABLE_NAME), LOWER(COLUMN_NAME))"
        " IN (" + SCHEMA_PROBE_PAIRS + ")"
    )
    STUDY_SERVICE_COLUMNS = (
        "SELECT COLUMN_NAME AS name FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study_service'"
    )
    INDEXER_PROCESS_COUNT = (
        "SELECT COUNT(*) AS n FROM information_schema.ROUTINES"
        " WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME = 'indexer_process'"
        " AND ROUTINE_TYPE = 'PROCEDURE'"
    )
    # An indexer_process installed by an older script, to be installed again.
    INDEXER_PROCESS_OUTDATED = "SELECT 0 AS n"
    # `initial` marks every study pending, except those the service
    # acknowledged since this initial load began (SET_INITIAL_STARTED): an
    # interrupted load carries on instead of starting over.
    SET_INITIAL_STARTED = "SET @indexer_initial_started = ?"
    # study_iuid from the moment a study is enqueued (see add_indexer.sql).
    ENQUEUE_FOR_INITIAL = (
        "INSERT INTO study_service"
        " (study_pk, status, attempts, study_updated_time, study_version, enqueued_at,"
        " study_iuid)"
        " VALUES (?, 'pending', 0, ?, ?, NOW(), ?)"
        " ON DUPLICATE KEY UPDATE"
        " next_attempt_at = IF(sent_at >= @indexer_initial_started, next_attempt_at, NULL),"
        " status = IF(sent_at >= @indexer_initial_started, status, 'pending'),"
        " attempts = IF(sent_at >= @indexer_initial_started, attempts, 0),"
        " sent_version = IF(sent_at >= @indexer_initial_started, sent_version, NULL),"
        " study_updated_time = VALUES(study_updated_time),"
        " study_version = VALUES(study_version), enqueued_at = NOW(),"
        " study_iuid = VALUES(study_iuid)"
    )
    START_BOOKKEEPING = (
        "INSERT IGNORE INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
        " VALUES (?, ?, {NOW}, 0)"
    )
    SELECT_DELETING_PAGE = (
        "SELECT study_pk, study_iuid FROM study_service FORCE INDEX (study_service_status)"
        " WHERE status = 'deleting' AND study_pk > ? ORDER BY study_pk LIMIT ?"
    )
    # Acknowledgements, many rows per statement (PyMySQL batches INSERT ... VALUES).
    RECORD_SENT = (
        "INSERT INTO study_service (study_pk, status, attempts, sent_version, sent_at, study_iuid)"
        " VALUES (?, 'sent', 1, ?, {NOW}, ?)"
        " ON DUPLICATE KEY UPDATE status = 'sent', attempts = attempts + 1,"
        " last_error = NULL, next_attempt_at = NULL, sent_version = VALUES(sent_version),"
        " sent_at = {NOW}, study_iuid = VALUES(study_iuid)"
    )
    # A failure: pending again (its next attempt after `wait` seconds; NULL:
    # as soon as the next run), failed (refused for good), or deleting.
    RECORD_FAILURE = (
        "UPDATE study_service SET status = ?, attempts = attempts + 1, last_error = ?,"
        " next_attempt_at = {NOW} + INTERVAL ? SECOND WHERE study_pk = ?"
    )
    OLDEST_PENDING_SECONDS = (
        "SELECT TIMESTAMPDIFF(SECOND, MIN(enqueued_at), {NOW}) AS age"
        " FROM study_service WHERE status IN ('pending', 'deleting')"
    )


class PostgreSQLQueueSQL(QueueSQL):
    """study_service on PostgreSQL: its upserts, catalog and clock. The
    statements that take many rows at once take one array per column
    (PostgreSQLEngine.execute_batch)."""

    engine = PostgreSQLEngine
    NOW = "LOCALTIMESTAMP"
    FROM_NO_TABLE = ""
    FOR_EACH_PK = "study_pk = ANY(?::bigint[])"
    SERVER_VERSION = "SELECT 'PostgreSQL ' || current_setting('server_version') AS v"
    SCHEMA_COLUMNS = (
        "SELECT LOWER(TABLE_NAME) AS t, LOWER(COLUMN_NAME) AS c FROM information_schema.COLUMNS"
        " WHERE table_schema = current_schema() AND (LOWER(TABLE_NAME), LOWER(COLUMN_NAME))"
        " IN (" + SCHEMA_PROBE_PAIRS + ")"
    )
    STUDY_SERVICE_COLUMNS = (
        "SELECT column_name AS name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'study_service'"
    )
    INDEXER_PROCESS_COUNT = (
        "SELECT COUNT(*) AS n FROM pg_proc"
        " WHERE proname = 'indexer_process' AND pronamespace = current_schema()::regnamespace"
    )
    # Before 2.3 the function had no planner settings of its own, and a
    # generic plan or lagging statistics made a tick read the whole archive.
    INDEXER_PROCESS_OUTDATED = (
        "SELECT COUNT(*) AS n FROM pg_proc"
        " WHERE proname = 'indexer_process' AND pronamespace = current_schema()::regnamespace"
        " AND NOT 'enable_seqscan=off' = ANY(COALESCE(proconfig, '{}'))"
    )
    SET_INITIAL_STARTED = "SELECT set_config('dicom_indexer.initial_started', ?, false)"
    ENQUEUE_FOR_INITIAL = (
        "INSERT INTO study_service AS q"
        " (study_pk, status, attempts, study_updated_time, study_version, enqueued_at,"
        " study_iuid)"
        " SELECT pk, 'pending', 0, updated, row_version, LOCALTIMESTAMP, iuid"
        " FROM unnest(?::bigint[], ?::timestamp[], ?::bytea[], ?::text[])"
        " AS r(pk, updated, row_version, iuid)"
        " ON CONFLICT (study_pk) DO UPDATE SET"
        " status = CASE WHEN q.sent_at >= current_setting('dicom_indexer.initial_started')"
        "::timestamp THEN q.status ELSE 'pending' END,"
        " attempts = CASE WHEN q.sent_at >= current_setting('dicom_indexer.initial_started')"
        "::timestamp THEN q.attempts ELSE 0 END,"
        " next_attempt_at = CASE WHEN q.sent_at >="
        " current_setting('dicom_indexer.initial_started')::timestamp"
        " THEN q.next_attempt_at ELSE NULL END,"
        " sent_version = CASE WHEN q.sent_at >="
        " current_setting('dicom_indexer.initial_started')::timestamp"
        " THEN q.sent_version ELSE NULL END,"
        " study_updated_time = EXCLUDED.study_updated_time,"
        " study_version = EXCLUDED.study_version, enqueued_at = LOCALTIMESTAMP,"
        " study_iuid = EXCLUDED.study_iuid"
    )
    START_BOOKKEEPING = (
        "INSERT INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
        " VALUES (?, ?, {NOW}, 0) ON CONFLICT (study_pk) DO NOTHING"
    )
    # No index hints: the range of study_service_status itself (see dcm4chee.py).
    SELECT_DELETING_PAGE = (
        "SELECT study_pk, study_iuid FROM study_service"
        " WHERE (status, study_pk) > ('deleting', ?)"
        f" AND (status, study_pk) <= ('deleting', {MAX_PK})"
        " ORDER BY status, study_pk LIMIT ?"
    )
    RECORD_SENT = (
        "INSERT INTO study_service AS q"
        " (study_pk, status, attempts, sent_version, sent_at, study_iuid)"
        " SELECT pk, 'sent', 1, fingerprint, {NOW}, iuid"
        " FROM unnest(?::bigint[], ?::bytea[], ?::text[]) AS r(pk, fingerprint, iuid)"
        " ON CONFLICT (study_pk) DO UPDATE SET status = 'sent', attempts = q.attempts + 1,"
        " last_error = NULL, next_attempt_at = NULL, sent_version = EXCLUDED.sent_version,"
        " sent_at = {NOW}, study_iuid = EXCLUDED.study_iuid"
    )
    RECORD_FAILURE = (
        "UPDATE study_service q SET status = r.status, attempts = q.attempts + 1,"
        " last_error = r.error, next_attempt_at = {NOW} + make_interval(secs => r.wait)"
        " FROM unnest(?::text[], ?::text[], ?::float8[], ?::bigint[])"
        " AS r(status, error, wait, pk) WHERE q.study_pk = r.pk"
    )
    MARK_GONE = (
        "UPDATE study_service q SET status = r.status, attempts = 0, next_attempt_at = NULL,"
        " last_error = 'study no longer in the PACS'"
        " FROM unnest(?::text[], ?::bigint[]) AS r(status, pk) WHERE q.study_pk = r.pk"
    )
    OLDEST_PENDING_SECONDS = (
        "SELECT EXTRACT(EPOCH FROM {NOW} - MIN(enqueued_at)) AS age"
        " FROM study_service WHERE status IN ('pending', 'deleting')"
    )


class SQLiteQueueSQL(QueueSQL):
    """study_service in a SQLite file: the queue of a PACS that has no
    database the indexer may add a table to (Orthanc). Plain SQLite 3.7
    (CentOS 7's): no UPSERT, so an upsert is an INSERT OR IGNORE and an
    UPDATE, with numbered parameters that both take from one row."""

    engine = SQLiteEngine
    NOW = SQLITE_NOW

    CREATE = (
        "CREATE TABLE IF NOT EXISTS study_service ("
        " study_pk INTEGER NOT NULL PRIMARY KEY, status TEXT NOT NULL DEFAULT 'pending',"
        " attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, study_updated_time TEXT,"
        " study_version BLOB, sent_version BLOB, enqueued_at TEXT, sent_at TEXT,"
        " study_iuid TEXT, cursor_pk INTEGER, next_attempt_at TEXT,"
        # Orthanc's ID of the study, and when reconcile last found it there.
        " source_id TEXT, reconciled_at TEXT)",
        "CREATE INDEX IF NOT EXISTS study_service_status ON study_service (status, study_pk)",
    )
    SERVER_VERSION = "SELECT 'SQLite ' || sqlite_version() AS v"
    STUDY_SERVICE_COLUMNS = "PRAGMA table_info(study_service)"
    # The change capture is the client's own (OrthancSource.enqueue_changes).
    INDEXER_PROCESS_COUNT = "SELECT 1 AS n"
    INDEXER_PROCESS_OUTDATED = "SELECT 0 AS n"
    # ENQUEUE_FOR_INITIAL reads when the initial load started from its row.
    SET_INITIAL_STARTED = "SELECT ? AS started"
    # Rows: (study_pk, Orthanc ID). What the service acknowledged since this
    # initial load began keeps its state: an interrupted load carries on.
    ENQUEUE_FOR_INITIAL = (
        "INSERT OR IGNORE INTO study_service (study_pk, status, attempts, enqueued_at, source_id)"
        f" VALUES (?1, 'pending', 0, {SQLITE_NOW}, ?2);\n"
        "UPDATE study_service SET status = 'pending', attempts = 0, next_attempt_at = NULL,"
        f" sent_version = NULL, enqueued_at = {SQLITE_NOW}, source_id = ?2"
        " WHERE study_pk = ?1 AND COALESCE(sent_at, '') < COALESCE("
        f"(SELECT enqueued_at FROM study_service WHERE study_pk = {INITIAL_ROW_PK}), '9999')"
    )
    START_BOOKKEEPING = (
        "INSERT OR IGNORE INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
        f" VALUES (?, ?, {SQLITE_NOW}, 0)"
    )
    RAISE_CURSOR = (
        "UPDATE study_service SET cursor_pk = MAX(COALESCE(cursor_pk, 0), ?) WHERE study_pk = ?"
    )
    RECORD_SENT = (
        "UPDATE study_service SET status = 'sent', attempts = attempts + 1, last_error = NULL,"
        f" next_attempt_at = NULL, sent_version = ?2, sent_at = {SQLITE_NOW}, study_iuid = ?3"
        " WHERE study_pk = ?1"
    )
    RECORD_FAILURE = (
        "UPDATE study_service SET status = ?1, attempts = attempts + 1, last_error = ?2,"
        " next_attempt_at = CASE WHEN ?3 IS NULL THEN NULL ELSE"
        " strftime('%Y-%m-%d %H:%M:%f', 'now', 'localtime', '+' || ?3 || ' seconds') END"
        " WHERE study_pk = ?4"
    )
    OLDEST_PENDING_SECONDS = (
        "SELECT CAST((julianday('now', 'localtime') - julianday(MIN(enqueued_at))) * 86400"
        " AS INTEGER) AS age FROM study_service WHERE status IN ('pending', 'deleting')"
    )
    PRIVILEGE_PROBES: tuple = ()  # the client's own file: see SQLiteEngine.connect


QUEUE_STATEMENTS = {
    "mysql": MySQLQueueSQL,
    "postgresql": PostgreSQLQueueSQL,
    "sqlite": SQLiteQueueSQL,
}


class StudyServiceQueue:
    """study_service in the PACS database: the run lock, the bookkeeping of
    the initial load and of reconcile, and every acknowledgement."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.sql = QUEUE_STATEMENTS[db.engine.name]
        self.settings = db.settings

    # -- installation --------------------------------------------------------

    def check_installed(self) -> None:
        """Fails with the fix when the install script was not (re)run here."""
        db = self.db
        names = {row["name"] for row in db.query(self.sql.STUDY_SERVICE_COLUMNS)}
        if not names:
            raise DatabaseError(f"table study_service is missing in {db.where}; {db.install_fix}")
        if not {"cursor_pk", "next_attempt_at"} <= names:
            raise DatabaseError(
                f"table study_service in {db.where} is out of date; {db.install_fix}"
            )
        if not db.query(self.sql.INDEXER_PROCESS_COUNT)[0]["n"]:
            raise DatabaseError(
                f"procedure indexer_process is missing in {db.where}; {db.install_fix}"
            )
        if db.query(self.sql.INDEXER_PROCESS_OUTDATED)[0]["n"]:
            raise DatabaseError(
                f"function indexer_process() in {db.where} is out of date (a tick may read"
                f" the whole archive); {db.install_fix}"
            )

    def acquire_run_lock(self) -> None:
        """One run at a time per database, across hosts: a lock the server
        releases when this connection ends, even on kill -9."""
        if not self.db.try_lock(self._run_lock_name()):
            raise LockedError(
                f"another dicom-indexer run is working on {self.db.where}; this run stands aside"
            )

    def run_under_way(self) -> bool:
        """Whether another run holds the run lock (`status`): the lock is
        taken and given back at once when it is free."""
        name = self._run_lock_name()
        if self.db.try_lock(name):
            self.db.unlock(name)
            return False
        return True

    def _run_lock_name(self) -> str:
        return ("dicom_indexer." + self.db.engine.lock_scope)[:64]

    def database_now(self) -> datetime.datetime:
        return self.db.query(self.sql.DATABASE_NOW)[0]["now"]

    def stability_window(self) -> StabilityWindow | None:
        """stable_age_seconds, on the database's clock (the one that stamps
        updated_time and enqueued_at); None when it is not set."""
        if not self.settings.stable_age_seconds:
            return None
        return StabilityWindow(self.database_now(), self.settings.stable_age_seconds)

    # -- the initial load ----------------------------------------------------

    def bookkeeping(self, pk: int) -> dict[str, Any] | None:
        """A bookkeeping row: when it started, its position, its status."""
        rows = self.db.query(self.sql.SELECT_BOOKKEEPING, (pk,))
        return rows[0] if rows else None

    def start_bookkeeping(self, pk: int, status: str, position: int) -> None:
        self.db.query(self.sql.START_BOOKKEEPING, (pk, status))
        self.db.query(self.sql.SET_CURSOR, (position, pk))

    def initial_state(self) -> dict[str, Any] | None:
        """The unfinished initial load, if any: when it began and how far it got."""
        return self.bookkeeping(INITIAL_ROW_PK)

    def start_initial(self) -> None:
        """Records that an initial load began, unless one is already unfinished."""
        self.db.query(self.sql.START_BOOKKEEPING, (INITIAL_ROW_PK, "initial"))

    def enqueue_initial(
        self,
        source: Source,
        on_page: Callable[[int, int], None],
        keep_going: Callable[[], bool],
    ) -> int:
        """Enqueues every study after the initial load's position, one page per
        transaction, so that an interruption resumes where it stopped.
        keep_going() comes before each page (it may wait; False stops the load);
        on_page(count, position) follows each committed page."""
        state = self.initial_state()
        if state is None or state["status"] != "initial":
            return 0
        # A listing in no order (Orthanc's) could skip studies if resumed at
        # an offset: it starts over; what was acknowledged since the load
        # began keeps its state (ENQUEUE_FOR_INITIAL), so nothing is resent.
        position = int(state["position"] or 0) if source.pipelined_initial else 0
        total = 0
        self.db.query(self.sql.SET_INITIAL_STARTED, (str(state["started"]),))
        while keep_going():
            rows, after = source.initial_page(position)
            if not rows:
                source.initial_enqueued(self, position)
                self.db.query(self.sql.SET_STATUS, ("initial-sending", INITIAL_ROW_PK))
                break
            position = after

            def enqueue(rows: list[tuple] = rows, position: int = position) -> None:
                self.db.execute_batch(self.sql.ENQUEUE_FOR_INITIAL, rows)
                self.db.query(self.sql.SET_CURSOR, (position, INITIAL_ROW_PK))

            self.db.in_transaction(enqueue)
            total += len(rows)
            on_page(len(rows), position)
        return total  # stopped early: still 'initial', the next run carries on

    def raise_tick_cursor(self, position: int) -> None:
        """The tick need not re-read by pk what the initial load enqueued."""
        self.db.query(self.sql.RAISE_CURSOR, (position, CURSOR_ROW_PK))

    def finish_initial(self) -> bool:
        """Forgets the initial load once nothing it enqueued is pending."""
        state = self.initial_state()
        if state is None or state["status"] != "initial-sending" or self.count_pending():
            return False
        self.db.query(self.sql.DELETE_ROW, (INITIAL_ROW_PK,))
        return True

    # -- acknowledgements ------------------------------------------------------

    def record(self, outcomes: list[Outcome], unchanged: list[int]) -> None:
        """Writes a batch of results in one transaction, again if the server
        chose it as a deadlock victim (a PACS transaction held its rows)."""
        if not outcomes and not unchanged:
            return
        sent = [
            (o.study_pk, o.fingerprint, o.study_iuid)
            for o in outcomes
            if o.fate == SENT and not o.deletion
        ]
        deleted = [(o.study_pk,) for o in outcomes if o.fate == SENT and o.deletion]
        failures = [
            (o.fate, (o.error or "")[:255], o.wait_seconds, o.study_pk)
            for o in outcomes
            if o.fate != SENT
        ]
        unchanged_rows = [(pk,) for pk in unchanged]

        def write() -> None:
            self.db.execute_batch(self.sql.RECORD_SENT, sent)
            self.db.execute_batch(self.sql.RECORD_DELETED, deleted)
            self.db.execute_batch(self.sql.RECORD_FAILURE, failures)
            self.db.execute_batch(self.sql.RECORD_UNCHANGED, unchanged_rows)

        self.db.in_transaction(write)

    def mark_gone(self, gone: list[tuple[int, str | None]]) -> None:
        """Studies deleted from the PACS: to be DELETEd from the central index
        when send_deletes is on and the service knows them, else just noted."""
        rows = [
            (DELETING if self.settings.send_deletes and iuid else DELETED, pk) for pk, iuid in gone
        ]
        self.db.execute_batch(self.sql.MARK_GONE, rows)

    def deleting_studies(self) -> Iterator[dict[str, Any]]:
        """Studies whose DELETE is still due, page by page."""
        after = 0
        while True:
            page = self.db.query(self.sql.SELECT_DELETING_PAGE, (after, self.settings.page_size))
            if not page:
                return
            yield from page
            after = page[-1]["study_pk"]

    def retry_failed(self) -> int:
        return self.db.rowcount(self.sql.RETRY_FAILED)

    # -- reconcile -----------------------------------------------------------

    def reconcile_position(self) -> int:
        """Where an interrupted reconcile stopped (0: start a new sweep)."""
        self.db.query(self.sql.START_BOOKKEEPING, (RECONCILE_ROW_PK, "reconcile"))
        rows = self.db.query(self.sql.SELECT_BOOKKEEPING, (RECONCILE_ROW_PK,))
        return int(rows[0]["position"] or 0)

    def record_reconciled(
        self, changed: list[int], gone: list[tuple[int, str | None]], position: int
    ) -> None:
        """One page's findings and the new position, in one transaction
        (again if the server chose it as a deadlock victim)."""
        changed_rows = [(pk,) for pk in changed]

        def write() -> None:
            self.db.execute_batch(self.sql.ENQUEUE_CHANGED, changed_rows)
            self.db.query(self.sql.SET_CURSOR, (position, RECONCILE_ROW_PK))
            self.mark_gone(gone)

        self.db.in_transaction(write)

    def finish_reconcile(self) -> None:
        self.db.query(self.sql.DELETE_ROW, (RECONCILE_ROW_PK,))

    # -- status ----------------------------------------------------------------

    def oldest_pending_seconds(self) -> int | None:
        age = self.db.query(self.sql.OLDEST_PENDING_SECONDS)[0]["age"]
        return None if age is None else int(age)

    def count_pending(self) -> int:
        return int(self.db.query(self.sql.COUNT_PENDING)[0]["n"])

    def status_report(self, source: Source) -> dict[str, Any]:
        counts = dict.fromkeys((PENDING, SENT, FAILED, DELETING, DELETED), 0)
        for row in self.db.query(self.sql.COUNT_BY_STATUS):
            counts[row["status"]] = int(row["n"])
        last_sent = self.db.query(self.sql.LAST_SENT)[0]["t"]
        waiting = self.db.query(self.sql.COUNT_WAITING)[0]
        errors = self.db.query(self.sql.RECENT_ERRORS)
        initial = self.initial_state()
        return {
            "run_under_way": self.run_under_way(),
            "counts": counts,
            "held": self.held_reasons(source) if counts[PENDING] else {},
            "waiting_to_retry": int(waiting["n"]),
            "next_retry_at": _format_datetime(waiting["next_at"]),
            "oldest_pending_seconds": self.oldest_pending_seconds(),
            "last_sent_at": _format_datetime(last_sent),
            "initial_load": None
            if initial is None
            else {
                "started_at": _format_datetime(initial["started"]),
                "position_pk": initial["position"],
            },
            "recent_errors": [
                {
                    "study_pk": row["study_pk"],
                    "status": row["status"],
                    "attempts": row["attempts"],
                    "error": row["last_error"],
                    "next_attempt_at": _format_datetime(row["next_attempt_at"]),
                }
                for row in errors
            ],
        }

    def held_reasons(self, source: Source) -> dict[str, int]:
        """Why pending studies wait, as a run would decide now: reason ->
        how many (among the first STATUS_PENDING_ROWS pending)."""
        window = self.stability_window()
        reasons: collections.Counter[str] = collections.Counter()
        for row in itertools.islice(source.pending_studies(), STATUS_PENDING_ROWS):
            if row.get("unreadable"):  # the source could not read it: a run records why
                reason = "could not be read from the PACS: the next run records why"
            elif source.schema.withdrawn(row):
                reason = None
            else:
                reason = hold_reason(row, source.schema, window)
            if reason:
                reasons[reason] += 1
        return dict(reasons)
