"""Database engines: MySQL/MariaDB, PostgreSQL and SQLite, each a small
adapter that imports its driver when it connects."""

from __future__ import annotations

import datetime
import os
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

from . import HERE
from .errors import DatabaseError

if TYPE_CHECKING:
    from .config import DatabaseSettings

# --------------------------------------------------------------------------
# Engines: MySQL/MariaDB and PostgreSQL
#
# The only code that knows a database driver: how to connect, run a
# statement, pass a batch of rows, lock, and what the driver's errors mean.
# Each engine is a small adapter listed in ENGINES and imports its driver
# when it connects, so a run loads one driver (each costs a few MB of a
# budget of 50). The SQL itself is the source's and the queue's.
# --------------------------------------------------------------------------

DB_CONNECT_TIMEOUT_SECONDS = 10
# The longest a statement may go without a byte from the server: far beyond
# any statement of a run (a tick after a burst of a million rewrites takes a
# few minutes), and a lock waits at most PG_LOCK_TIMEOUT_SECONDS (or MySQL's
# innodb_lock_wait_timeout) before the server says so. It only ends a run
# whose server vanished mid-statement (a host powered off) instead of
# waiting on TCP forever.
DB_READ_TIMEOUT_SECONDS = 900
PG_LOCK_TIMEOUT_SECONDS = 50  # as MySQL's innodb_lock_wait_timeout default
DEADLOCK_RETRIES = 5
# What a PACS administrator can make of the errors that end a run midway:
# the server restarted (a nightly backup), a DBA killed the connection, or
# the PACS held a row too long. Nothing is lost: the next run carries on.
LOST_CONNECTION = "the connection to the database was lost (server restarted or connection killed)"
LOCK_TIMEOUT = "lock wait timeout: a PACS transaction held the rows"
DEADLOCK = "deadlock with a PACS transaction"


class MySQLError:
    """The MySQL/MariaDB error numbers the client tells apart, by the names
    PyMySQL's constants/ER.py and CR.py give them."""

    CLOSED = 0  # PyMySQL's InterfaceError(0, ''): the connection is gone
    SERVER_SHUTDOWN = 1053
    BAD_FIELD_ERROR = 1054
    TABLEACCESS_DENIED_ERROR = 1142
    COLUMNACCESS_DENIED_ERROR = 1143
    NO_SUCH_TABLE = 1146
    LOCK_WAIT_TIMEOUT = 1205
    LOCK_DEADLOCK = 1213
    SP_DOES_NOT_EXIST = 1305
    PROCACCESS_DENIED_ERROR = 1370
    CONNECTION_KILLED = 1927  # MariaDB
    CR_SERVER_GONE_ERROR = 2006
    CR_SERVER_LOST = 2013
    CR_SERVER_LOST_EXTENDED = 2055


class PostgreSQLError:
    """The SQLSTATEs the client tells apart, by PostgreSQL's condition names."""

    UNDEFINED_TABLE = "42P01"
    UNDEFINED_COLUMN = "42703"
    UNDEFINED_FUNCTION = "42883"
    INSUFFICIENT_PRIVILEGE = "42501"
    ADMIN_SHUTDOWN = "57P01"  # pg_terminate_backend, or a fast shutdown
    CRASH_SHUTDOWN = "57P02"
    CANNOT_CONNECT_NOW = "57P03"
    LOCK_NOT_AVAILABLE = "55P03"
    QUERY_CANCELED = "57014"
    DEADLOCK_DETECTED = "40P01"
    SERIALIZATION_FAILURE = "40001"


def _import_pymysql() -> Any:
    """PyMySQL, without the `cryptography` package that its authentication
    module imports up front whenever it is installed: 7 MB of a budget of
    50, used only by MySQL 8's caching_sha2_password over a connection
    without TLS, and then only when the server has not cached the password
    (_load_pymysql_rsa loads it then)."""
    # Where it is loaded already (a test process may hold it), it costs nothing more.
    if "pymysql" not in sys.modules and "cryptography" not in sys.modules:
        _load_pymysql_auth_without("cryptography")
    import pymysql
    import pymysql.cursors

    return pymysql


def _load_pymysql_auth_without(declined: str) -> None:
    """Loads pymysql._auth (and with it PyMySQL) with an import that declines
    `declined` in that module only: nothing else in the process is touched,
    and a thread importing `declined` meanwhile gets it. Every PyMySQL from
    0.10 (the oldest requirements.txt allows) imports it under try/except
    ImportError, and then only lacks the RSA exchange."""
    import builtins
    import importlib.machinery
    import importlib.util

    package = importlib.util.find_spec("pymysql")  # found, not run
    if package is None or not package.submodule_search_locations:
        return  # not installed: `import pymysql` says so
    spec = importlib.machinery.PathFinder.find_spec(
        "pymysql._auth", list(package.submodule_search_locations)
    )
    if spec is None or spec.loader is None:
        return
    real_import = builtins.__import__

    def declining(
        name: str,
        globals: Mapping[str, Any] | None = None,
        locals: Mapping[str, Any] | None = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> Any:
        if level == 0 and name.split(".")[0] == declined:
            raise ImportError(f"{declined} is loaded only when needed", name=name)
        return real_import(name, globals, locals, fromlist, level)

    auth = importlib.util.module_from_spec(spec)
    # The builtins this module's code runs with: its own, with that import.
    auth.__dict__["__builtins__"] = {**vars(builtins), "__import__": declining}
    sys.modules[spec.name] = auth
    try:
        # Its first import (.err) runs pymysql/__init__.py, which finds this
        # module in sys.modules.
        spec.loader.exec_module(auth)
    except BaseException:
        del sys.modules[spec.name]
        raise
    import pymysql

    if getattr(pymysql, "_auth", None) is not auth:
        pymysql._auth = auth  # as the import system sets it for a submodule


def _load_pymysql_rsa(pymysql: Any) -> bool:
    """Runs PyMySQL's authentication module again, now with the process's own
    import, so that it loads `cryptography`; False when that package is not
    installed."""
    import importlib

    pymysql._auth.__dict__.pop("__builtins__", None)  # run again with the real builtins
    importlib.reload(pymysql._auth)
    return bool(pymysql._auth._have_cryptography)


# Where MariaDB and MySQL put their server's socket: Debian and Ubuntu
# (/run/mysqld, /var/run/mysqld), RHEL and CentOS (/var/lib/mysql), MySQL's
# own packages and tarballs (/tmp).
MYSQL_SOCKETS = (
    "/run/mysqld/mysqld.sock",
    "/var/run/mysqld/mysqld.sock",
    "/var/lib/mysql/mysql.sock",
    "/tmp/mysql.sock",
)
MYSQL_ACCESS_DENIED = 1045
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
GRANT_SCRIPT_MYSQL = "the grant script (extras/grant_indexer*.sql)"


def _local_mysql_socket(places: tuple[str, ...] = MYSQL_SOCKETS) -> str | None:
    """The first of `places` that is a socket, or None."""
    for place in places:
        try:
            if stat.S_ISSOCK(os.stat(place).st_mode):
                return place
        except OSError:
            continue
    return None


class MySQLEngine:
    """MySQL 5.6 to 8 and MariaDB 10.x, through PyMySQL.

    "localhost" means what it means to the mysql command: the server's local
    socket, not TCP. An account created as 'dicom_indexer'@'localhost' (as
    grant_indexer.sql does) matches only connections through that socket; over
    TCP the server sees 127.0.0.1 (with skip_name_resolve, common, never
    "localhost") and denies it. So for host "localhost" on the default port the
    socket is used where MariaDB or MySQL put it (or database.unix_socket), and
    TCP only when there is none, which `check` says."""

    name = "mysql"
    default_port = 3306
    # A table, column or procedure missing, or not granted.
    MISSING_OBJECT = frozenset(
        {
            MySQLError.NO_SUCH_TABLE,
            MySQLError.BAD_FIELD_ERROR,
            MySQLError.SP_DOES_NOT_EXIST,
            MySQLError.PROCACCESS_DENIED_ERROR,
            MySQLError.TABLEACCESS_DENIED_ERROR,
            MySQLError.COLUMNACCESS_DENIED_ERROR,
        }
    )
    CONFLICT = frozenset({MySQLError.LOCK_DEADLOCK, MySQLError.LOCK_WAIT_TIMEOUT})
    REASONS = {
        MySQLError.CLOSED: LOST_CONNECTION,
        MySQLError.CR_SERVER_GONE_ERROR: LOST_CONNECTION,
        MySQLError.CR_SERVER_LOST: LOST_CONNECTION,
        MySQLError.CR_SERVER_LOST_EXTENDED: LOST_CONNECTION,
        MySQLError.SERVER_SHUTDOWN: "the database server is shutting down",
        MySQLError.CONNECTION_KILLED: "the connection was killed",
        MySQLError.LOCK_WAIT_TIMEOUT: LOCK_TIMEOUT,
        MySQLError.LOCK_DEADLOCK: DEADLOCK,
    }
    TRY_LOCK = "SELECT GET_LOCK(%s, 0) AS got"
    UNLOCK = "SELECT RELEASE_LOCK(%s) AS released"

    @staticmethod
    def placeholders(sql: str) -> str:
        """A statement written once (see Statements) as PyMySQL takes it: %s,
        and %% for a %, since every statement goes through its %-formatting
        (query() and rowcount() pass () when there are no parameters)."""
        return _outside_quotes(sql.replace("%", "%%"), lambda text: text.replace("?", "%s"))

    def __init__(self, database: DatabaseSettings) -> None:
        self.database = database
        self.lock_scope = database.name  # the run lock is one per database
        self.driver = _import_pymysql()
        self.Error: tuple[type[BaseException], ...] = (self.driver.MySQLError,)
        self.conn: Any = None
        self.socket = database.unix_socket
        local = database.host == "localhost" and database.port == self.default_port
        if self.socket is None and local:
            self.socket = _local_mysql_socket()
        # How the connection goes, for `check` and the error lines.
        if self.socket:
            self.route = f"through the local socket {self.socket}"
        elif local:
            self.route = (
                f"on localhost:{database.port} over TCP (no MySQL socket in"
                f" {', '.join(MYSQL_SOCKETS)}; database.unix_socket names another)"
            )
        else:
            self.route = f"on {database.host}:{database.port}"

    def connect(self) -> None:
        try:
            self.conn = self._connect_once(self.socket)
        except self.driver.MySQLError as exc:
            raise DatabaseError(self.describe(exc) + self._denied_host_hint(exc)) from None
        except RuntimeError as exc:
            # MySQL 8's caching_sha2_password (or sha256_password) asked for
            # the password encrypted with the server's RSA key: the one case
            # that needs `cryptography`, loaded now.
            if "cryptography" not in str(exc):
                raise
            if not _load_pymysql_rsa(self.driver):
                raise DatabaseError(
                    "the server wants the password RSA-encrypted (MySQL 8"
                    " caching_sha2_password without TLS) and the Python package"
                    " 'cryptography' is not installed: pip install cryptography"
                ) from None
            self.conn = self._connect_once(self.socket)

    def _denied_host_hint(self, exc: BaseException) -> str:
        """For an access denied over TCP: the host the server saw, and whether
        the same user and password get in through the local socket."""
        args = getattr(exc, "args", ())
        if self.socket or not args or args[0] != MYSQL_ACCESS_DENIED:
            return ""
        seen = re.search(r"'[^']*'@'([^']*)'", str(args[1]) if len(args) > 1 else "")
        host = seen.group(1) if seen else self.database.host
        hint = (
            f"; the server saw this connection come from '{host}': an account created"
            " for 'localhost' matches only its local socket, so create it for"
            f" '{host}' too (SET @indexer_host = '{host}' before {GRANT_SCRIPT_MYSQL})"
        )
        socket = _local_mysql_socket()
        if socket and self.database.host in LOOPBACK_HOSTS:
            try:
                self._connect_once(socket).close()
            except Exception:  # denied there too: the user or the password is wrong
                return hint + ", or check the user and password"
            return (
                f"; the server saw this connection come from '{host}', and through the"
                f" local socket {socket} the same user and password are accepted: the"
                f" account exists for 'localhost' only. Set database.host to \"localhost\""
                f" (the socket), or create the account for '{host}'"
                f" (SET @indexer_host = '{host}' before {GRANT_SCRIPT_MYSQL})"
            )
        return hint + ", or check the user and password"

    def _connect_once(self, socket: str | None) -> Any:
        database = self.database
        return self.driver.connect(
            host=database.host,
            port=database.port,
            user=database.user,
            password=database.password,
            database=database.name,
            unix_socket=socket,
            # Decodes latin1 and utf8 columns alike into correct Unicode.
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=DB_CONNECT_TIMEOUT_SECONDS,
            read_timeout=DB_READ_TIMEOUT_SECONDS,
            write_timeout=DB_READ_TIMEOUT_SECONDS,
            cursorclass=self.driver.cursors.DictCursor,
        )

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, () if args is None else args)
            return list(cur.fetchall())

    def rowcount(self, sql: str, args: Any = None) -> int:
        with self.conn.cursor() as cur:
            return int(cur.execute(sql, () if args is None else args))

    def execute_batch(self, sql: str, rows: list[tuple]) -> None:
        """One statement for many rows: PyMySQL sends an INSERT ... VALUES
        batch as one multi-row statement, anything else row by row."""
        with self.conn.cursor() as cur:
            cur.executemany(sql, rows)

    def begin(self) -> None:
        self.conn.begin()

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def close(self) -> None:
        self.conn.close()

    def error_code(self, exc: BaseException) -> Any:
        return exc.args[0] if exc.args else None

    def describe(self, exc: BaseException) -> str:
        """'(1045) Access denied ...': never the password. Errors that say
        little by themselves (a killed connection is "(0) ") get the reason
        in words."""
        return _mysql_message(exc, self.REASONS)

    def is_missing_object(self, exc: BaseException) -> bool:
        return self.error_code(exc) in self.MISSING_OBJECT

    def is_conflict(self, exc: BaseException) -> bool:
        return self.error_code(exc) in self.CONFLICT

    def try_lock(self, name: str) -> bool:
        return self.query(self.TRY_LOCK, (name,))[0]["got"] == 1

    def unlock(self, name: str) -> None:
        self.query(self.UNLOCK, (name,))


def _mysql_message(exc: BaseException, reasons: Mapping[Any, str]) -> str:
    args: tuple[Any, ...] = getattr(exc, "args", ())
    code = args[0] if args else None
    text = " ".join(str(args[1]).split()) if len(args) >= 2 else ""
    reason = reasons.get(code) if isinstance(code, int) else None
    if reason and text:
        return f"{reason} ({code}: {text})"
    if reason:
        return reason
    if text:
        return f"({code}) {text}"
    return str(exc) or type(exc).__name__


class PostgreSQLEngine:
    """PostgreSQL 9.6 and later, through pg8000 (pure Python, installed only
    where needed: requirements-postgresql.txt)."""

    name = "postgresql"
    default_port = 5432
    MISSING_OBJECT = frozenset(
        {
            PostgreSQLError.UNDEFINED_TABLE,
            PostgreSQLError.UNDEFINED_COLUMN,
            PostgreSQLError.UNDEFINED_FUNCTION,
            PostgreSQLError.INSUFFICIENT_PRIVILEGE,
        }
    )
    CONFLICT = frozenset(
        {
            PostgreSQLError.DEADLOCK_DETECTED,
            PostgreSQLError.LOCK_NOT_AVAILABLE,
            PostgreSQLError.SERIALIZATION_FAILURE,
        }
    )
    REASONS = {
        PostgreSQLError.ADMIN_SHUTDOWN: LOST_CONNECTION,
        PostgreSQLError.CRASH_SHUTDOWN: "the database server is shutting down",
        PostgreSQLError.CANNOT_CONNECT_NOW: "the database server is starting up",
        PostgreSQLError.LOCK_NOT_AVAILABLE: LOCK_TIMEOUT,
        PostgreSQLError.QUERY_CANCELED: "the statement was cancelled (statement_timeout)",
        PostgreSQLError.DEADLOCK_DETECTED: DEADLOCK,
        PostgreSQLError.SERIALIZATION_FAILURE: "serialization failure with a PACS transaction",
    }
    TRY_LOCK = "SELECT pg_try_advisory_lock(hashtext(%s)) AS got"
    UNLOCK = "SELECT pg_advisory_unlock(hashtext(%s)) AS released"
    # MySQL gives up on a lock after 50 s (innodb_lock_wait_timeout);
    # PostgreSQL would wait forever on a transaction left open. A
    # lock_timeout set for the role or database is kept.
    SET_LOCK_TIMEOUT = (
        "SELECT set_config('lock_timeout', %s, false) WHERE current_setting('lock_timeout') = '0'"
    )
    # Every statement of the client reads its rows through an index: a tick
    # reads what changed and what is pending, not the archive. The planner
    # picks by statistics, which lag: a queue ANALYZEd during `initial`, when
    # every row was pending, says that a tick's page of pending studies is the
    # whole table, and it read all of study_service and study by hash joins.
    # Priced this way, an index and a nested loop by primary key are the only
    # paths it can afford, whatever it guesses (MySQL: FORCE INDEX). Plain
    # index scans, not bitmap or index-only ones: only they mark the entries
    # of dead rows (the 100,000 'pending' ones an initial load leaves until
    # VACUUM) so that the next scan skips them; the others read them again at
    # every tick. For this session only; indexer_process() sets the same.
    INDEX_PATHS_ONLY = (
        "SELECT set_config('enable_seqscan', 'off', false),"
        " set_config('enable_hashjoin', 'off', false),"
        " set_config('enable_mergejoin', 'off', false),"
        " set_config('enable_bitmapscan', 'off', false),"
        " set_config('enable_indexonlyscan', 'off', false)"
    )

    @staticmethod
    def placeholders(sql: str) -> str:
        """A statement written once (see Statements) as pg8000 takes it: %s.
        pg8000 reads a % outside quotes as %% with parameters and as % without,
        so a statement that needs one is written for this engine alone."""

        def placed(text: str) -> str:
            if "%" in text:
                raise AssertionError(f"a % outside quotes, ambiguous to pg8000: {sql[:60]!r}...")
            return text.replace("?", "%s")

        return _outside_quotes(sql, placed)

    def __init__(self, database: DatabaseSettings) -> None:
        self.database = database
        self.lock_scope = database.name  # the run lock is one per database
        try:
            import pg8000.dbapi
        except ImportError:
            raise DatabaseError(
                'config.json says database.engine "postgresql" but its driver is not'
                f" installed: run {sys.executable} -m pip install -r"
                f" {HERE / 'requirements-postgresql.txt'}"
            ) from None
        self.driver = pg8000.dbapi
        self.Error: tuple[type[BaseException], ...] = (pg8000.dbapi.Error,)
        self.conn: Any = None
        if database.unix_socket:
            self.route = f"through the local socket {database.unix_socket}"
        else:
            self.route = f"on {database.host}:{database.port}"

    def connect(self) -> None:
        database = self.database
        self.conn = self.driver.connect(
            user=database.user,
            password=database.password or None,
            host=database.host if not database.unix_socket else None,
            port=database.port,
            database=database.name,
            unix_sock=database.unix_socket,
            timeout=DB_CONNECT_TIMEOUT_SECONDS,
            application_name="dicom-indexer",
        )
        self.conn.autocommit = True
        # pg8000's timeout is the socket's, for every read, not only for
        # connecting: left at DB_CONNECT_TIMEOUT_SECONDS, a statement waiting
        # on a lock for longer would end the run with a socket error before
        # lock_timeout could answer. From here on, reads wait as MySQL's do.
        sock = getattr(self.conn, "_usock", None)
        if sock is not None:
            sock.settimeout(DB_READ_TIMEOUT_SECONDS)
        self._run(self.SET_LOCK_TIMEOUT, (f"{PG_LOCK_TIMEOUT_SECONDS}s",))
        self._run(self.INDEX_PATHS_ONLY, None)

    def _run(self, sql: str, args: Any) -> Any:
        cur = self.conn.cursor()
        cur.execute(sql, args if args is not None else ())
        return cur

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        cur = self._run(sql, args)
        if cur.description is None:
            return []
        names = [column[0] for column in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def rowcount(self, sql: str, args: Any = None) -> int:
        return int(self._run(sql, args).rowcount)

    def execute_batch(self, sql: str, rows: list[tuple]) -> None:
        """One statement for many rows: pg8000 would run executemany() one
        statement per row, so the queue's batch statements take one array
        per column (unnest, or = ANY), and the rows are transposed here."""
        self._run(sql, [list(column) for column in zip(*rows)])

    def begin(self) -> None:
        self._run("BEGIN", None)

    def commit(self) -> None:
        self._run("COMMIT", None)

    def rollback(self) -> None:
        try:
            self._run("ROLLBACK", None)
        except self.Error:
            pass  # the connection is gone: the server rolled back

    def close(self) -> None:
        self.conn.close()

    def error_code(self, exc: BaseException) -> Any:
        detail = exc.args[0] if exc.args else None
        return detail.get("C") if isinstance(detail, dict) else None

    def describe(self, exc: BaseException) -> str:
        code = self.error_code(exc)
        if code is None:
            # Network errors come as InterfaceError with a plain text.
            text = " ".join(str(exc).split())
            lost = ("network error", "connection", "closed", "broken pipe", "reset", "eof")
            if not text or any(word in text.lower() for word in lost):
                return f"{LOST_CONNECTION} ({text})" if text else LOST_CONNECTION
            return text
        text = " ".join(str(exc.args[0].get("M", "")).split())
        reason = self.REASONS.get(code)
        return f"{reason} ({code}: {text})" if reason else f"({code}) {text}"

    def is_missing_object(self, exc: BaseException) -> bool:
        return self.error_code(exc) in self.MISSING_OBJECT

    def is_conflict(self, exc: BaseException) -> bool:
        return self.error_code(exc) in self.CONFLICT

    def try_lock(self, name: str) -> bool:
        return bool(self.query(self.TRY_LOCK, (name,))[0]["got"])

    def unlock(self, name: str) -> None:
        self.query(self.UNLOCK, (name,))


ENGINES: dict[str, Any] = {"mysql": MySQLEngine, "postgresql": PostgreSQLEngine}


def statement_label(sql: str) -> str:
    """What a statement does, for an error line: 'indexer_process', 'UPDATE
    on study_service', 'SELECT from study'. Never its arguments."""
    if "indexer_process" in sql:
        return "indexer_process (finding the new and changed studies)"
    if re.search(r"_lock\(", sql, re.IGNORECASE):  # GET_LOCK, pg_try_advisory_lock
        return "the run lock (one run at a time per database)"
    verb = sql.split(None, 1)[0].upper() if sql.strip() else "statement"
    table = re.search(r"\b(FROM|INTO|UPDATE)\s+(\w+)", sql, re.IGNORECASE)
    if table is None:
        return verb
    preposition = "on" if table.group(1).upper() == "UPDATE" else table.group(1).lower()
    return f"{verb} {preposition} {table.group(2)}"


# --------------------------------------------------------------------------
# Statements: SQL written once per difference
#
# A statement is written once, as the server reads it (a % is a %), with ?
# for each parameter; the engine supplies its placeholders. A class of
# statements shared by engines (the queue's, a schema's) holds them, and a
# class per engine derives from it and holds only what differs: whole
# statements (upserts, locking, catalog queries), or parts that the shared
# ones name as {PART} (the clock, an index hint, how a statement takes many
# rows). A class that sets `engine` is one that engine runs: each of its
# statements, its own and its bases', is then written out with its parts
# filled in and in that engine's placeholders.
# --------------------------------------------------------------------------

_PART = re.compile(r"\{([A-Z][A-Z0-9_]*)\}")
_QUOTED = re.compile(r"('(?:[^']|'')*')")


def _outside_quotes(sql: str, change: Callable[[str], str]) -> str:
    """`sql` with change() applied to what is not inside a quoted literal."""
    pieces = _QUOTED.split(sql)
    return "".join(piece if i % 2 else change(piece) for i, piece in enumerate(pieces))


def _is_statement(name: str, value: Any) -> bool:
    return name.isupper() and not name.startswith("_") and isinstance(value, (str, tuple))


class Statements:
    """Statements (upper-case attributes: a text, or a tuple of them, nested)
    written once: see above. Each class records what it wrote in _written;
    a class with an engine gets all of them written out for it, at import,
    where a {PART} it does not have fails loudly."""

    engine: ClassVar[Any] = None  # the engine class that runs these; None: shared
    _written: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._written = {
            name: value for name, value in vars(cls).items() if _is_statement(name, value)
        }
        if cls.engine is None:
            return
        written: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            written.update(vars(klass).get("_written", {}))

        def filled(value: Any, name: str) -> Any:
            if isinstance(value, tuple):
                return tuple(filled(item, name) for item in value)

            def part(match: re.Match[str]) -> str:
                if match.group(1) not in written:
                    raise AssertionError(
                        f"{cls.__name__}.{name} names {{{match.group(1)}}}, which it lacks"
                    )
                return str(filled(written[match.group(1)], match.group(1)))

            return _PART.sub(part, value)

        def placed(value: Any) -> Any:
            if isinstance(value, tuple):
                return tuple(placed(item) for item in value)
            return cls.engine.placeholders(value)

        for name, value in written.items():
            setattr(cls, name, placed(filled(value, name)))


class SQLiteEngine:
    """The queue of an Orthanc site: a SQLite file, through the standard
    library; WAL, one writer at a time (the run lock), every commit durable.
    Created by the client, readable by its user only, like config.json."""

    name = "sqlite"
    # Columns (or aliases) that hold times: SQLite keeps them as text.
    TIMES = frozenset({"now", "started", "queued_at", "next_at", "t", "next_attempt_at"})
    BUSY_TIMEOUT_SECONDS = 50  # as MySQL's lock wait, for a reader beside the run

    @staticmethod
    def placeholders(sql: str) -> str:
        """The standard library's sqlite3 takes ? (and ?NNN) as written."""
        return sql

    def __init__(self, queue_file: Path) -> None:
        import sqlite3

        self.driver = sqlite3
        self.Error: tuple[type[BaseException], ...] = (sqlite3.Error,)
        self.path = queue_file
        self.lock_scope = str(self.path)  # the run lock is one per queue file
        self.conn: Any = None
        self.lock_file: Any = None

    def connect(self) -> None:
        try:
            # Created readable by its owner only: it names every study sent.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise DatabaseError(f"cannot create {self.path}: {exc.strerror or exc}") from None
        self.conn = self.driver.connect(
            str(self.path),
            timeout=self.BUSY_TIMEOUT_SECONDS,
            isolation_level=None,  # autocommit, BEGIN and COMMIT as the queue says
            check_same_thread=False,  # the initial load's thread opens its own
        )
        self.conn.row_factory = self.driver.Row
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        from .study_service import SQLiteQueueSQL  # its statements run on this module's engines

        for statement in SQLiteQueueSQL.CREATE:
            self.conn.execute(statement)

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        rows = self.conn.execute(sql, args if args is not None else ()).fetchall()
        return [self._dict(row) for row in rows]

    def _dict(self, row: Any) -> dict[str, Any]:
        values = dict(zip(row.keys(), row))
        for name in self.TIMES.intersection(values):
            if isinstance(values[name], str):
                values[name] = datetime.datetime.fromisoformat(values[name])
        return values

    def rowcount(self, sql: str, args: Any = None) -> int:
        return int(self.conn.execute(sql, args if args is not None else ()).rowcount)

    def execute_batch(self, sql: str, rows: list[tuple]) -> None:
        """Each statement of `sql` (an upsert is two) for every row."""
        for statement in sql.split(";\n"):
            self.conn.executemany(statement, rows)

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        if self.lock_file is not None:
            self.lock_file.close()  # releases the run lock
        self.conn.close()

    def error_code(self, exc: BaseException) -> Any:
        return getattr(exc, "sqlite_errorname", None) or str(exc)

    def describe(self, exc: BaseException) -> str:
        return f"{self.path}: {' '.join(str(exc).split())}"

    def is_missing_object(self, exc: BaseException) -> bool:
        return "no such" in str(exc)

    def is_conflict(self, exc: BaseException) -> bool:
        return "locked" in str(exc)

    def try_lock(self, name: str) -> bool:
        """One run at a time per queue: an exclusive lock on a file beside
        it, which the system releases when the process ends, even on kill -9."""
        import fcntl

        if self.lock_file is None:
            self.lock_file = open(f"{self.path}.lock", "a")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        return True

    def unlock(self, name: str) -> None:
        import fcntl

        fcntl.flock(self.lock_file, fcntl.LOCK_UN)
