#!/usr/bin/env python3
"""DICOM Indexer client: registers the studies of a dcm4chee 2.x or
dcm4chee-arc-light 5 PACS with a central indexer webservice, one JSON document
per study.

Layers, top to bottom of this file:
  configuration  config.json / server.json -> Settings (checked once, at load)
  PACS           Pacs: the database and the study_service queue, per engine;
                 Dcm4chee2 / ArcLight5: where each schema keeps the fields
  mapping        study_document(): one study row -> the JSON document (pure)
  delivery       Sender: HTTP POST with retries; deliver_pending(): the run loop
  commands       run_*() and main(): the CLI only translates
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import ipaddress
import itertools
import json
import logging
import logging.handlers
import os
import platform
import random
import re
import signal
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__version__ = "2.1.0"

log = logging.getLogger("dicom_indexer")

HERE = Path(__file__).resolve().parent

# Exit codes, documented in the README ("Códigos de salida").
EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected error (a bug): one line; -v shows the traceback
EXIT_CONFIG = 3  # a configuration file is missing or wrong
EXIT_DATABASE = 4  # the database is unreachable, refused us, or is not installed
EXIT_DELIVERY = 5  # the service is down or failing: studies left pending
EXIT_REJECTED = 6  # the service refused some studies (4xx): marked failed
EXIT_KEY_REFUSED = 7  # the service answered 401/403: the key is wrong
EXIT_LOCKED = 8  # another run holds the lock on this database
EXIT_NO_PYTHON = 9  # this Python lacks the packages (extras/dicom_indexer.sh: or is too old)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (systemd stop, kill): what was acknowledged is recorded

ENV_DB_PASSWORD = "DICOM_INDEXER_DB_PASSWORD"
ENV_KEY = "DICOM_INDEXER_KEY"

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
# How often the sending loop looks again while the initial load is enqueueing.
ENQUEUE_POLL_SECONDS = 0.05
# How many committed pages the initial load's enqueueing may run ahead of the
# sending. Unpaced, it ran ahead (about 2,000 studies/s against 1,300 sent,
# measured at 1,000,000 studies): on an archive larger than the buffer pool
# its pages were evicted before the sending read them again, so each was
# read from disk twice. Paced, the archive is read from disk once, at the
# sending's speed, and each page is still in the buffer pool when the
# sending reads it again.
INITIAL_LEAD_PAGES = 4
MAX_PK = 2**63 - 1
# study_service bookkeeping rows (see extras/add_indexer.sql).
CURSOR_ROW_PK = 0
INITIAL_ROW_PK = -1
RECONCILE_ROW_PK = -2
# Statuses of study rows in study_service.
PENDING, SENT, FAILED, DELETING, DELETED = "pending", "sent", "failed", "deleting", "deleted"
# Retry-After can ask for hours; a cron tick should give up sooner.
MAX_RETRY_AFTER_SECONDS = 30
# Statuses worth retrying: the service is busy or failing, not refusing the study.
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
# "Too many requests" and "overloaded": retried by Sender itself, not by
# urllib3, because they pause every request and lower the concurrency limit.
OVERLOAD_STATUSES = (429, 503)
ERROR_TEXT_CHARS = 200  # how much of a refusal's body is kept in last_error
ACK_FLUSH_ROWS = 200  # acknowledgements written per transaction...
ACK_FLUSH_SECONDS = 1.0  # ...or at least this often: bounds resends after a crash

# The document sent for each study: exactly the original client's keys, in
# this order. The central service reads these names; they are its contract.
DOCUMENT_KEYS = (
    "patient_pk",
    "patient_id",
    "patient_name",
    "study_pk",
    "study_iuid",
    "study_datetime",
    "study_description",
    "study_modality",
    "study_series",
    "study_instances",
    "center",
)


class IndexerError(Exception):
    """An expected failure, reported as one line with its exit code."""

    exit_code = 1


class ConfigError(IndexerError):
    """A configuration file is missing, unreadable, or has a wrong field."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # 'database.name', 'key', ...: None for the whole file


class DatabaseError(IndexerError):
    """The database is unreachable, refused the login, or lacks the indexer."""

    exit_code = EXIT_DATABASE


class LockedError(IndexerError):
    """Another run is working on the same database."""

    exit_code = EXIT_LOCKED


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, from config.json and server.json.

    The two files keep the original client's shapes, which every site already
    has: config.json holds "database" (the connection), "key" and
    "webservice_url", and beside them this client's optional settings;
    server.json holds "server", the center's code, sent as "center".
    """

    db_host: str
    db_port: int
    db_user: str
    db_password: str = field(repr=False)
    db_name: str
    webservice_url: str
    key: str = field(repr=False)
    center: str
    key_source: str = "config.json: field 'key'"  # for messages: never the key itself
    config_path: Path = Path("config.json")
    server_path: Path = Path("server.json")
    db_engine: str = "mysql"  # or "postgresql": PACS_ENGINES
    db_unix_socket: str | None = None
    page_size: int = 1000
    concurrency: int | None = None  # None: "auto", adapted between 1 and max_concurrency
    max_concurrency: int = 64
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0
    max_retries: int = 3
    backoff_seconds: float = 1.0
    max_consecutive_failures: int = 5
    ca_bundle: str | None = None
    send_deletes: bool = False
    stable_age_seconds: int = 0
    reconcile_rows_per_second: int = 2000
    max_studies_per_second: int = 0  # 0: no cap
    query_view: str = "hideRejected"  # arc-light: the view whose counts are sent
    metrics_file: Path | None = None
    log_file: Path | None = None
    nice: int = 10
    warnings: tuple[str, ...] = ()  # found while loading; logged once per run
    # Wrong or missing fields, each one line naming file and field. `check`
    # lists them all; every other command stops at the first (exit 3).
    problems: tuple[ConfigError, ...] = ()

    def key_problem(self) -> ConfigError | None:
        """Only commands that send need the key (not --dry-run, status, reconcile).
        A key that a header cannot carry would fail every request, or split
        the header: it is refused here, before any request, and not shown."""
        if not self.key:
            return ConfigError(
                f"{self.config_path}: field 'key' is missing or empty (or set key_file,"
                f" or {ENV_KEY})",
                field="key",
            )
        problem = header_value_problem(self.key)
        if problem:
            return ConfigError(
                f"{self.key_source}: the API key cannot be sent in an HTTP header: {problem}"
                " (the key is not shown); copy it again",
                field="key",
            )
        return None


_MISSING = object()
DEFAULT_PORTS = {"mysql": 3306, "postgresql": 5432}


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        # From bytes, json tells UTF-8 from UTF-16 and UTF-32 and skips a
        # byte order mark: Windows editors (Notepad) write one.
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: is not UTF-8 text (saved as ANSI or Latin-1?): save it as UTF-8"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object {{...}}")
    return data


class _Fields:
    """Reads typed fields out of one JSON object. A wrong field is recorded,
    named with its file and path ('database.name'), and its default is used,
    so that `check` can report every problem of a file in one run."""

    def __init__(
        self, path: Path, data: dict[str, Any], problems: list[ConfigError], prefix: str = ""
    ) -> None:
        self.path = path
        self.data = data
        self.problems = problems
        self.prefix = prefix
        self.read: set[str] = set()

    def _problem(self, name: str, problem: str) -> None:
        full = self.prefix + name
        self.problems.append(ConfigError(f"{self.path}: field '{full}' {problem}", field=full))

    def _value(self, name: str, default: Any) -> Any:
        self.read.add(name)
        value = self.data.get(name, default)
        if value is _MISSING:
            self._problem(name, "is missing")
        return value

    def section(self, name: str) -> _Fields:
        """A nested object, such as "database"."""
        value = self._value(name, _MISSING)
        if value is not _MISSING and not isinstance(value, dict):
            self._problem(name, "must be a JSON object {...}")
        data = value if isinstance(value, dict) else {}
        return _Fields(self.path, data, self.problems, f"{self.prefix}{name}.")

    def ignore(self, name: str) -> None:
        """A field the original client wrote and this one does not use."""
        self.read.add(name)

    def text(self, name: str, default: Any = _MISSING, allow_empty: bool = False) -> Any:
        value = self._value(name, default)
        if value is _MISSING:
            return ""
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            self._problem(name, "must be a string")
            return "" if default in (_MISSING, None) else default
        if not value.strip() and not allow_empty:
            self._problem(name, "is empty")
        return value

    def code(self, name: str) -> str:
        """A code kept as written ("000" keeps its zeros); a number is
        accepted and sent as its digits."""
        value = self._value(name, _MISSING)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if value is _MISSING:
            return ""
        if not isinstance(value, str):
            self._problem(name, 'must be a string, such as "000"')
            return ""
        if not value.strip():
            self._problem(name, "is empty: set it to the center's code")
        return value.strip()

    def secret_file(self, name: str) -> str | None:
        """The first line of the file that `name` points at, for sites that keep
        secrets out of the JSON files."""
        path = self.text(name, default=None)
        if not path:
            return None
        try:
            lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError:
            self._problem(name, f"names {path}, which is not UTF-8 text")
            return None
        except OSError as exc:
            self._problem(name, f"cannot be read: {exc.strerror or exc}")
            return None
        return lines[0].strip() if lines else ""

    def file_path(self, name: str) -> Path | None:
        value = self.text(name, default=None)
        return Path(value) if value else None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._value(name, default)
        if value not in choices:
            self._problem(name, "must be " + " or ".join(f'"{c}"' for c in choices))
            return default
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self._value(name, default)
        if not isinstance(value, bool):
            self._problem(name, "must be true or false")
            return default
        return value

    def number(
        self, name: str, default: Any, minimum: float, maximum: float, integer: bool = True
    ) -> Any:
        value = self._value(name, default)
        if value is _MISSING:
            return minimum
        # The original client kept numbers as strings ("3306"): accept both.
        if isinstance(value, str) and value.strip():
            try:
                value = int(value) if integer else float(value)
            except ValueError:
                pass
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind):
            self._problem(name, f"must be a number from {minimum:g} to {maximum:g}")
            return minimum if default is _MISSING else default
        if not minimum <= value <= maximum:
            self._problem(name, f"must be from {minimum:g} to {maximum:g}, not {value}")
            return minimum if default is _MISSING else default
        return value

    def query_view(self, name: str, default: str) -> str:
        """An arc-light query/retrieve view ID: written into SQL, so letters,
        digits, '_', '.' and '-' only."""
        value = self._value(name, default)
        if not isinstance(value, str) or not QUERY_VIEW_RE.match(value):
            self._problem(name, 'must be a query/retrieve view ID such as "hideRejected"')
            return default
        return value

    def number_or_auto(self, name: str, minimum: int, maximum: int) -> int | None:
        """A whole number, or "auto" (the default): None."""
        if self._value(name, "auto") == "auto":
            return None
        value = self._value(name, None)
        if isinstance(value, str) and not value.strip().isdigit():
            self._problem(name, f'must be "auto" or a number from {minimum} to {maximum}')
            return None
        return self.number(name, None, minimum, maximum)

    def unknown(self) -> list[str]:
        """Fields nobody read: usually a typo, which would otherwise be
        silently ignored (and the setting left at its default)."""
        return [self.prefix + name for name in self.data if name not in self.read]


def load_settings(config_path: Path, server_path: Path) -> Settings:
    """Reads and checks both files. A file that cannot be read or parsed
    raises ConfigError; wrong fields are collected in Settings.problems."""
    problems: list[ConfigError] = []
    top = _Fields(config_path, _read_json_object(config_path), problems)
    server = _Fields(server_path, _read_json_object(server_path), problems)
    db = top.section("database")

    # Secrets: the environment, then a file of their own, then config.json;
    # surrounding whitespace (a pasted newline) is never part of one.
    password, _ = _secret(db, "password", "password_file", ENV_DB_PASSWORD)
    key, key_source = _secret(top, "key", "key_file", ENV_KEY)

    url = top.text("webservice_url")
    if url and not url.startswith(("http://", "https://")):
        problems.append(
            ConfigError(
                f"{config_path}: field 'webservice_url' must start with http:// or https://",
                field="webservice_url",
            )
        )
    ca_bundle = top.text("ca_bundle", default=None)
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        problems.append(
            ConfigError(
                f"{config_path}: field 'ca_bundle': file not found: {ca_bundle}",
                field="ca_bundle",
            )
        )
    top.ignore("server")  # the original's placeholder: "see server.json"

    engine = db.choice("engine", default="mysql", choices=("mysql", "postgresql"))
    settings = Settings(
        db_engine=engine,
        db_host=db.text("host", default="localhost"),
        db_port=db.number("port", default=DEFAULT_PORTS[engine], minimum=1, maximum=65535),
        db_user=db.text("user"),
        db_password=password,
        db_name=db.text("name"),
        db_unix_socket=db.text("unix_socket", default=None),
        webservice_url=url,
        key=key,
        key_source=key_source,
        center=server.code("server"),
        page_size=top.number("page_size", default=1000, minimum=1, maximum=100000),
        concurrency=top.number_or_auto("concurrency", minimum=1, maximum=64),
        max_concurrency=top.number("max_concurrency", default=64, minimum=1, maximum=256),
        connect_timeout_seconds=top.number(
            "connect_timeout_seconds", default=5, minimum=0.1, maximum=300, integer=False
        ),
        read_timeout_seconds=top.number(
            "read_timeout_seconds", default=30, minimum=0.1, maximum=3600, integer=False
        ),
        max_retries=top.number("max_retries", default=3, minimum=0, maximum=20),
        backoff_seconds=top.number(
            "backoff_seconds", default=1, minimum=0, maximum=60, integer=False
        ),
        max_consecutive_failures=top.number(
            "max_consecutive_failures", default=5, minimum=1, maximum=100000
        ),
        ca_bundle=ca_bundle,
        send_deletes=top.flag("send_deletes", default=False),
        stable_age_seconds=top.number("stable_age_seconds", default=0, minimum=0, maximum=86400),
        reconcile_rows_per_second=top.number(
            "reconcile_rows_per_second", default=2000, minimum=1, maximum=1000000
        ),
        max_studies_per_second=top.number(
            "max_studies_per_second", default=0, minimum=0, maximum=1000000
        ),
        nice=top.number("nice", default=10, minimum=0, maximum=19),
        query_view=top.query_view("query_view", default="hideRejected"),
        metrics_file=top.file_path("metrics_file"),
        log_file=top.file_path("log_file"),
        config_path=config_path,
        server_path=server_path,
    )
    warnings = [
        f"{fields.path}: unknown field '{name}' ignored (misspelt?)"
        for fields in (top, db, server)
        for name in fields.unknown()
    ]
    secrets = [
        secret
        for secret, present in (
            ("database password", db.data.get("password")),
            ("API key", top.data.get("key")),
        )
        if present
    ]
    if secrets and _readable_by_others(config_path):
        warnings.append(
            f"{config_path} holds the {' and the '.join(secrets)} and other users of this"
            f" machine can read it; fix: chmod 600 {config_path}"
        )
    host = urllib.parse.urlsplit(url).hostname or ""
    if url.startswith("http://") and not _is_loopback(host):
        warnings.append(
            f"webservice_url in {config_path} is http:// to {host}: the API key and patient"
            " data travel unencrypted; use https:// unless this is a private network"
        )
    return dataclasses.replace(settings, warnings=tuple(warnings), problems=tuple(problems))


def _secret(fields: _Fields, name: str, file_field: str, variable: str) -> tuple[str, str]:
    """A secret and where it came from: the environment variable if it is
    set and not blank (an empty one never hides a configured secret), else
    the file that `file_field` names, else the field itself."""
    value = os.environ.get(variable, "").strip()
    if value:
        fields.ignore(name)
        fields.ignore(file_field)
        return value, f"environment variable {variable}"
    value = fields.secret_file(file_field)
    if value is not None:
        fields.ignore(name)
        return value, f"{fields.path}: the file in field '{fields.prefix}{file_field}'"
    value = fields.text(name, default="", allow_empty=True) or ""
    return value.strip(), f"{fields.path}: field '{fields.prefix}{name}'"


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot travel in an HTTP header, without showing it: a
    control character (a newline splits the header) or a character outside
    printable ASCII (http.client refuses some and servers mangle the rest)."""
    for position, char in enumerate(value, 1):
        if not " " <= char <= "~":
            kind = (
                "a control character" if char < " " or char == "\x7f" else "a non-ASCII character"
            )
            return f"character {position} of {len(value)} is {kind}"
    return None


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o044)
    except OSError:
        return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------
# PACS: the dcm4chee database and the study_service queue
#
# Pacs holds what a run does with the database; each engine's subclass holds
# the SQL text, the connection, the lock and the translation of its errors.
# Delivery, mapping, configuration and the commands see only Pacs. A second
# schema (dcm4chee-arc-light) is another subclass, not a set of branches.
# --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the service answered for one study."""

    study_pk: int
    version: bytes | None
    study_iuid: str | None
    deletion: bool = False  # a DELETE for a study gone from dcm4chee, not a POST
    delivered: bool = False
    status_code: int | None = None
    error: str | None = None  # one line, never patient data

    @property
    def refused_key(self) -> bool:
        return self.status_code in (401, 403)

    @property
    def wrong_url(self) -> bool:
        # Every study would get the same answer: a setting, not a study, is
        # wrong (for a DELETE, 404 means done and 405 that deletes are unsupported).
        return self.status_code in ((405,) if self.deletion else (404, 405))

    @property
    def rejected(self) -> bool:
        code = self.status_code
        return (
            code is not None
            and 400 <= code < 500
            and code not in RETRY_STATUSES
            and not self.refused_key
            and not self.wrong_url
        )


# `status` tells why pending studies wait by reading at most this many of them.
STATUS_PENDING_ROWS = 10000
# Without dcm4chee's study_updated index, indexer_process re-reads this many
# of the newest studies on each call (recent_rows in the install scripts).
RECENT_ROWS_WITHOUT_TIME_INDEX = 5000
# What a PACS administrator can make of the errors that end a run midway:
# the server restarted (a nightly backup), a DBA killed the connection, or
# dcm4chee held a row too long. Nothing is lost: the next run carries on.
LOST_CONNECTION = "the connection to the database was lost (server restarted or connection killed)"
LOCK_TIMEOUT = "lock wait timeout: a PACS transaction held the rows"
DEADLOCK = "deadlock with a PACS transaction"


class MySQLStatements:
    """dcm4chee 2.x on MySQL/MariaDB (extras/add_indexer.sql)."""

    # Must stay the same expression as in indexer_process: a study enqueued
    # by `initial` is then not enqueued again by the next tick.
    STUDY_VERSION = (
        "UNHEX(MD5(CONCAT_WS('|', s.updated_time, s.num_series, s.num_instances,"
        " IFNULL(s.mods_in_study, ''), IFNULL(s.patient_fk, ''), s.study_iuid,"
        " IFNULL(s.study_datetime, ''), IFNULL(s.study_desc, ''))))"
    )
    # One page of the archive, by primary key: a plain read, so it takes no
    # lock that dcm4chee's writes would wait for.
    SELECT_STUDY_PAGE = (
        "SELECT s.pk, s.updated_time, " + STUDY_VERSION + " AS version, s.study_iuid"
        " FROM study s WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    # `initial` marks every study pending, except those the service
    # acknowledged since this initial load began (SET_INITIAL_STARTED): an
    # interrupted load carries on instead of starting over.
    SET_INITIAL_STARTED = "SET @indexer_initial_started = %s"
    # study_iuid from the moment a study is enqueued (see add_indexer.sql).
    ENQUEUE_FOR_INITIAL = (
        "INSERT INTO study_service"
        " (study_pk, status, attempts, study_updated_time, study_version, enqueued_at,"
        " study_iuid)"
        " VALUES (%s, 'pending', 0, %s, %s, NOW(), %s)"
        " ON DUPLICATE KEY UPDATE"
        " status = IF(sent_at >= @indexer_initial_started, status, 'pending'),"
        " attempts = IF(sent_at >= @indexer_initial_started, attempts, 0),"
        " sent_version = IF(sent_at >= @indexer_initial_started, sent_version, NULL),"
        " study_updated_time = VALUES(study_updated_time),"
        " study_version = VALUES(study_version), enqueued_at = NOW(),"
        " study_iuid = VALUES(study_iuid)"
    )
    START_BOOKKEEPING = (
        "INSERT IGNORE INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
        " VALUES (%s, %s, NOW(6), 0)"
    )
    # Pending studies with what their documents need, a page at a time in pk
    # order. The index is forced: ordered by pk, the optimizer may otherwise
    # walk the primary key through every sent study to find the few pending.
    # LEFT JOINs: a study gone from dcm4chee comes back with s.pk NULL; one
    # whose patient row is missing, with p.* NULL.
    SELECT_PENDING_PAGE = (
        "SELECT q.study_pk AS queued_pk, q.sent_version, q.study_iuid AS known_iuid,"
        " q.enqueued_at AS queued_at,"
        " s.pk AS study_pk, s.study_iuid, s.study_datetime, s.study_desc, s.updated_time,"
        " s.mods_in_study, s.num_series, s.num_instances,"
        " p.pk AS patient_pk, p.pat_id, p.pat_name"
        " FROM study_service q FORCE INDEX (study_service_status)"
        " LEFT JOIN study s ON s.pk = q.study_pk"
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
        " WHERE q.status = 'pending' AND q.study_pk > %s AND q.study_pk <= %s"
        " ORDER BY q.study_pk LIMIT %s"
    )
    SELECT_DELETING_PAGE = (
        "SELECT study_pk, study_iuid FROM study_service FORCE INDEX (study_service_status)"
        " WHERE status = 'deleting' AND study_pk > %s ORDER BY study_pk LIMIT %s"
    )
    # Acknowledgements, many rows per statement (PyMySQL batches INSERT ... VALUES).
    RECORD_SENT = (
        "INSERT INTO study_service (study_pk, status, attempts, sent_version, sent_at, study_iuid)"
        " VALUES (%s, 'sent', 1, %s, NOW(6), %s)"
        " ON DUPLICATE KEY UPDATE status = 'sent', attempts = attempts + 1,"
        " last_error = NULL, sent_version = VALUES(sent_version), sent_at = NOW(6),"
        " study_iuid = VALUES(study_iuid)"
    )
    RECORD_DELETED = (
        "UPDATE study_service SET status = 'deleted', attempts = attempts + 1,"
        " last_error = NULL, sent_at = NOW(6) WHERE study_pk = %s"
    )
    # sent_version is assigned first: MySQL evaluates SET left to right, and
    # a study back from the trash (deleted) must be sent again as new.
    ENQUEUE_CHANGED = (
        "UPDATE study_service SET"
        " sent_version = IF(status IN ('deleted', 'deleting'), NULL, sent_version),"
        " status = 'pending', attempts = 0, last_error = NULL, enqueued_at = NOW(6)"
        " WHERE study_pk = %s"
    )
    DATABASE_NOW = "SELECT NOW(6) AS now"
    OLDEST_PENDING_SECONDS = (
        "SELECT TIMESTAMPDIFF(SECOND, MIN(enqueued_at), NOW(6)) AS age"
        " FROM study_service WHERE status IN ('pending', 'deleting')"
    )
    CALL_INDEXER_PROCESS = "CALL indexer_process()"
    STUDY_SERVICE_COLUMNS = (
        "SELECT COLUMN_NAME AS name FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study_service'"
    )
    INDEXER_PROCESS_COUNT = (
        "SELECT COUNT(*) AS n FROM information_schema.ROUTINES"
        " WHERE ROUTINE_SCHEMA = DATABASE() AND ROUTINE_NAME = 'indexer_process'"
        " AND ROUTINE_TYPE = 'PROCEDURE'"
    )
    # Indexes of study whose first column is updated_time.
    TIME_INDEXES = (
        "SELECT INDEX_NAME AS name FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study'"
        " AND SEQ_IN_INDEX = 1 AND COLUMN_NAME = 'updated_time'"
    )
    SERVER_VERSION = "SELECT VERSION() AS v"
    # The columns of SCHEMA_PROBES this user can see: which schema this is.
    SCHEMA_COLUMNS = (
        "SELECT LOWER(TABLE_NAME) AS t, LOWER(COLUMN_NAME) AS c FROM information_schema.COLUMNS"
        " WHERE TABLE_SCHEMA = DATABASE() AND (LOWER(TABLE_NAME), LOWER(COLUMN_NAME)) IN ({probes})"
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
        (
            "SELECT, INSERT, UPDATE and DELETE on study_service",
            (
                "SELECT study_pk FROM study_service LIMIT 0",
                "INSERT INTO study_service (study_pk) SELECT 0 FROM DUAL WHERE 1 = 0",
                "UPDATE study_service SET attempts = attempts WHERE 1 = 0",
                "DELETE FROM study_service WHERE 1 = 0",
            ),
        ),
    )


# The statements both engines write alike.
for _name, _sql in {
    # reconcile: a page of the archive with what its documents need and
    # what the service acknowledged for each; then the queue rows of that pk
    # range whose study is gone.
    "SELECT_RECONCILE_PAGE": (
        "SELECT s.pk AS study_pk, s.study_iuid, s.study_datetime, s.study_desc,"
        " s.mods_in_study, s.num_series, s.num_instances,"
        " p.pk AS patient_pk, p.pat_id, p.pat_name, q.status, q.sent_version"
        " FROM study s"
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
        " LEFT JOIN study_service q ON q.study_pk = s.pk"
        " WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    ),
    "SELECT_GONE_IN_RANGE": (
        "SELECT q.study_pk, q.study_iuid FROM study_service q"
        " LEFT JOIN study s ON s.pk = q.study_pk"
        " WHERE q.study_pk > %s AND q.study_pk <= %s"
        " AND q.status IN ('pending', 'sent', 'failed') AND s.pk IS NULL"
    ),
    "RECORD_UNCHANGED": (
        "UPDATE study_service SET status = 'sent', last_error = NULL WHERE study_pk = %s"
    ),
    "RECORD_FAILURE": (
        "UPDATE study_service SET status = %s, attempts = attempts + 1, last_error = %s"
        " WHERE study_pk = %s"
    ),
    "MARK_GONE": (
        "UPDATE study_service SET status = %s, attempts = 0,"
        " last_error = 'study no longer in the PACS' WHERE study_pk = %s"
    ),
    "RETRY_FAILED": (
        "UPDATE study_service SET status = 'pending', attempts = 0 WHERE status = 'failed'"
    ),
    "SET_CURSOR": "UPDATE study_service SET cursor_pk = %s WHERE study_pk = %s",
    "RAISE_CURSOR": (
        "UPDATE study_service SET cursor_pk = GREATEST(COALESCE(cursor_pk, 0), %s)"
        " WHERE study_pk = %s"
    ),
    "SET_STATUS": "UPDATE study_service SET status = %s WHERE study_pk = %s",
    "DELETE_ROW": "DELETE FROM study_service WHERE study_pk = %s",
    "SELECT_BOOKKEEPING": (
        "SELECT enqueued_at AS started, cursor_pk AS position, status"
        " FROM study_service WHERE study_pk = %s"
    ),
    "COUNT_STUDIES": "SELECT COUNT(*) AS n FROM study",
    "COUNT_BY_STATUS": (
        "SELECT status, COUNT(*) AS n FROM study_service WHERE study_pk > 0 GROUP BY status"
    ),
    "COUNT_PENDING": (
        "SELECT COUNT(*) AS n FROM study_service WHERE status IN ('pending', 'deleting')"
    ),
    "LAST_SENT": "SELECT MAX(sent_at) AS t FROM study_service",
    "RECENT_ERRORS": (
        "SELECT study_pk, status, attempts, last_error FROM study_service"
        " WHERE last_error IS NOT NULL AND status IN ('pending', 'failed')"
        " ORDER BY enqueued_at DESC LIMIT 5"
    ),
}.items():
    setattr(MySQLStatements, _name, _sql)


class PostgreSQLStatements(MySQLStatements):
    """dcm4chee 2.x on PostgreSQL (extras/add_indexer_postgresql.sql). What
    is not here is written alike for both engines."""

    # Must stay the same expression as in indexer_process. Timestamps are
    # formatted explicitly: concat_ws would follow the session's DateStyle.
    STUDY_VERSION = (
        "decode(md5(concat_ws('|', to_char(s.updated_time, 'YYYY-MM-DD HH24:MI:SS.US'),"
        " s.num_series, s.num_instances, COALESCE(s.mods_in_study, ''),"
        " COALESCE(s.patient_fk::text, ''), s.study_iuid,"
        " COALESCE(to_char(s.study_datetime, 'YYYY-MM-DD HH24:MI:SS.US'), ''),"
        " COALESCE(s.study_desc, ''))), 'hex')"
    )
    SELECT_STUDY_PAGE = (
        "SELECT s.pk, s.updated_time, " + STUDY_VERSION + " AS version, s.study_iuid"
        " FROM study s WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    SET_INITIAL_STARTED = "SELECT set_config('dicom_indexer.initial_started', %s, false)"
    ENQUEUE_FOR_INITIAL = (
        "INSERT INTO study_service AS q"
        " (study_pk, status, attempts, study_updated_time, study_version, enqueued_at,"
        " study_iuid)"
        " VALUES (%s, 'pending', 0, %s, %s, LOCALTIMESTAMP, %s)"
        " ON CONFLICT (study_pk) DO UPDATE SET"
        " status = CASE WHEN q.sent_at >= current_setting('dicom_indexer.initial_started')"
        "::timestamp THEN q.status ELSE 'pending' END,"
        " attempts = CASE WHEN q.sent_at >= current_setting('dicom_indexer.initial_started')"
        "::timestamp THEN q.attempts ELSE 0 END,"
        " sent_version = CASE WHEN q.sent_at >="
        " current_setting('dicom_indexer.initial_started')::timestamp"
        " THEN q.sent_version ELSE NULL END,"
        " study_updated_time = EXCLUDED.study_updated_time,"
        " study_version = EXCLUDED.study_version, enqueued_at = LOCALTIMESTAMP,"
        " study_iuid = EXCLUDED.study_iuid"
    )
    START_BOOKKEEPING = (
        "INSERT INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
        " VALUES (%s, %s, LOCALTIMESTAMP, 0) ON CONFLICT (study_pk) DO NOTHING"
    )
    # PostgreSQL has no index hints; its planner takes study_service_status
    # for the pending range by itself (tests/test_install.py checks the plan).
    SELECT_PENDING_PAGE = MySQLStatements.SELECT_PENDING_PAGE.replace(
        " FORCE INDEX (study_service_status)", ""
    )
    SELECT_DELETING_PAGE = MySQLStatements.SELECT_DELETING_PAGE.replace(
        " FORCE INDEX (study_service_status)", ""
    )
    RECORD_SENT = (
        "INSERT INTO study_service AS q"
        " (study_pk, status, attempts, sent_version, sent_at, study_iuid)"
        " VALUES (%s, 'sent', 1, %s, LOCALTIMESTAMP, %s)"
        " ON CONFLICT (study_pk) DO UPDATE SET status = 'sent', attempts = q.attempts + 1,"
        " last_error = NULL, sent_version = EXCLUDED.sent_version, sent_at = LOCALTIMESTAMP,"
        " study_iuid = EXCLUDED.study_iuid"
    )
    RECORD_DELETED = MySQLStatements.RECORD_DELETED.replace("NOW(6)", "LOCALTIMESTAMP")
    # PostgreSQL evaluates every SET expression on the old row.
    ENQUEUE_CHANGED = (
        "UPDATE study_service SET"
        " sent_version = CASE WHEN status IN ('deleted', 'deleting') THEN NULL"
        " ELSE sent_version END,"
        " status = 'pending', attempts = 0, last_error = NULL, enqueued_at = LOCALTIMESTAMP"
        " WHERE study_pk = %s"
    )
    DATABASE_NOW = "SELECT LOCALTIMESTAMP AS now"
    OLDEST_PENDING_SECONDS = (
        "SELECT EXTRACT(EPOCH FROM LOCALTIMESTAMP - MIN(enqueued_at)) AS age"
        " FROM study_service WHERE status IN ('pending', 'deleting')"
    )
    CALL_INDEXER_PROCESS = "SELECT indexer_process() AS enqueued"
    STUDY_SERVICE_COLUMNS = (
        "SELECT column_name AS name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'study_service'"
    )
    INDEXER_PROCESS_COUNT = (
        "SELECT COUNT(*) AS n FROM pg_proc"
        " WHERE proname = 'indexer_process' AND pronamespace = current_schema()::regnamespace"
    )
    TIME_INDEXES = (
        "SELECT c.relname AS name FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = 'study'::regclass AND a.attname = 'updated_time'"
    )
    SERVER_VERSION = "SELECT 'PostgreSQL ' || current_setting('server_version') AS v"
    SCHEMA_COLUMNS = MySQLStatements.SCHEMA_COLUMNS.replace(
        "TABLE_SCHEMA = DATABASE()", "table_schema = current_schema()"
    )
    # pg8000 runs executemany() one statement per row: the statements run
    # many rows at a time take them as arrays instead, one statement for all
    # (rows are transposed into one array per column).
    ENQUEUE_FOR_INITIAL_ROWS = ENQUEUE_FOR_INITIAL.replace(
        "VALUES (%s, 'pending', 0, %s, %s, LOCALTIMESTAMP, %s)",
        "SELECT pk, 'pending', 0, updated, version, LOCALTIMESTAMP, iuid"
        " FROM unnest(%s::bigint[], %s::timestamp[], %s::bytea[], %s::text[])"
        " AS r(pk, updated, version, iuid)",
    )
    RECORD_SENT_ROWS = RECORD_SENT.replace(
        "VALUES (%s, 'sent', 1, %s, LOCALTIMESTAMP, %s)",
        "SELECT pk, 'sent', 1, version, LOCALTIMESTAMP, iuid"
        " FROM unnest(%s::bigint[], %s::bytea[], %s::text[]) AS r(pk, version, iuid)",
    )
    RECORD_FAILURE_ROWS = (
        "UPDATE study_service q SET status = r.status, attempts = q.attempts + 1,"
        " last_error = r.error FROM unnest(%s::text[], %s::text[], %s::bigint[])"
        " AS r(status, error, pk) WHERE q.study_pk = r.pk"
    )
    MARK_GONE_ROWS = (
        "UPDATE study_service q SET status = r.status, attempts = 0,"
        " last_error = 'study no longer in the PACS'"
        " FROM unnest(%s::text[], %s::bigint[]) AS r(status, pk) WHERE q.study_pk = r.pk"
    )

    PRIVILEGE_PROBES = tuple(
        (what, tuple(sql.replace(" FROM DUAL", "") for sql in statements))
        for what, statements in MySQLStatements.PRIVILEGE_PROBES
    )


# --------------------------------------------------------------------------
# Schemas: where the 11 fields live. dcm4chee 2.x keeps them in study and
# patient; dcm4chee-arc-light 5 spreads them over study, patient, patient_id,
# person_name and study_query_attrs (a cache of counts). A schema gives the
# engine's statements its own text and turns its rows into the fields the
# document is made of; delivery and the commands never know which one runs.
# --------------------------------------------------------------------------

# What SCHEMA_COLUMNS looks for in information_schema: enough to tell 2.x
# from arc-light, and arc-light's generations apart.
SCHEMA_PROBES = (
    ("study", "num_instances"),  # dcm4chee 2.x: the counts are columns of study
    ("study_query_attrs", "view_id"),  # arc-light 5
    ("person_name", "alphabetic_name"),  # arc-light 5.23 and later
    ("patient_id", "patient_fk"),  # arc-light 5.31 and later: 1..n IDs per patient
)
for _statements in (MySQLStatements, PostgreSQLStatements):
    _statements.SCHEMA_COLUMNS = _statements.SCHEMA_COLUMNS.format(
        probes=", ".join(f"('{table}', '{column}')" for table, column in SCHEMA_PROBES)
    )
QUERY_VIEW_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Dcm4chee2:
    """dcm4chee 2.x: the document's fields are columns of study and patient."""

    name = "dcm4chee 2.x"

    def statements(self, engine: type[MySQLStatements], postgresql: bool) -> type:
        return engine

    def scripts(self, engine: str) -> tuple[str, str]:
        return {
            "mysql": ("mysql DBNAME < extras/add_indexer.sql", "extras/grant_indexer.sql"),
            "postgresql": (
                "psql -d DBNAME -f extras/add_indexer_postgresql.sql",
                "extras/grant_indexer_postgresql.sql",
            ),
        }[engine]

    def document_row(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        return row

    def document(self, row: Mapping[str, Any], center: str) -> dict[str, Any]:
        """The JSON document of one study row read with this schema's statements."""
        return study_document(self.document_row(row), center)

    def settled(self, row: Mapping[str, Any]) -> bool:
        return True

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        """Deleted from the PACS since it was enqueued."""
        return row["study_pk"] is None

    def time_index(self, pacs: Pacs, names: list[str]) -> tuple[bool, str]:
        """`check`'s verdict on the indexes of study whose first column is the
        one indexer_process reads by (`names`): dcm4chee's study_updated, or
        without it the newest studies re-read on each tick."""
        if pacs.uses_time_index(names):
            return True, (
                f"index {names[0]} on study(updated_time): each tick reads only"
                " the studies that changed"
            )
        started = time.monotonic()
        pacs.query(
            "SELECT COUNT(DISTINCT " + pacs.SQL.STUDY_VERSION + ") AS n FROM study s"
            " WHERE s.pk > (SELECT COALESCE(MAX(pk), 0) FROM study) - %s",
            (RECENT_ROWS_WITHOUT_TIME_INDEX,),
        )
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
    - patient_name: person_name.alphabetic_name, stored as five components
      and a sentinel caret ('PEREZ^JUAN^^^^'), sent as 2.x sent it, trailing
      empty components dropped ('PEREZ^JUAN').
    - study_datetime from study_date 'YYYYMMDD' and study_time 'HHMMSS.fff';
      '*' (absent) gives null, or midnight when only the time is absent.
    - '*' descriptions as null; counts and modalities from study_query_attrs
      for the query/retrieve view (modalities sorted: arc-light builds them
      from a set, in no order, and the document must not change with it).
    - A study is sent once it has settled: its study_query_attrs row rebuilt
      and study_size computed after the last store. Until then it waits,
      pending. A complete rejection withdraws it, as a deletion does.
    """

    def __init__(self, patient_id_rows: bool, view: str) -> None:
        self.patient_id_rows = patient_id_rows
        self.view = view
        # What the indexer's own user can see tells these two apart (a
        # column it has no right on is invisible to it).
        self.name = "dcm4chee-arc-light " + ("5.31 or later" if patient_id_rows else "5.23 to 5.30")

    def statements(self, engine: type[MySQLStatements], postgresql: bool) -> type:
        return arclight5_statements(engine, postgresql, self.patient_id_rows, self.view)

    def scripts(self, engine: str) -> tuple[str, str]:
        return (
            {
                "mysql": "mysql DBNAME < extras/add_indexer_arclight5_mysql.sql",
                "postgresql": "psql -d DBNAME -f extras/add_indexer_arclight5_postgresql.sql",
            }[engine],
            f"extras/grant_indexer_arclight5_{engine}.sql",
        )

    def document_row(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        fields = dict(row)
        name = _text(row["pat_name"])
        fields["pat_name"] = name.rstrip("^") or None if name is not None else None
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

    def time_index(self, pacs: Pacs, names: list[str]) -> tuple[bool, str]:
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


def _absent_as_none(value: Any) -> str | None:
    text = _text(value)
    return None if text in (None, "", "*") else text


def _arclight_datetime(date: Any, time_of_day: Any) -> datetime.datetime | None:
    date, time_of_day = _absent_as_none(date), _absent_as_none(time_of_day)
    if date is None or len(date) != 8 or not date.isdigit():
        return None
    digits = (time_of_day or "").split(".")[0]
    digits = digits if digits.isdigit() else ""
    digits = (digits + "000000")[:6]
    try:
        return datetime.datetime(
            int(date[:4]), int(date[4:6]), int(date[6:]),
            int(digits[:2]), int(digits[2:4]), int(digits[4:]),
        )  # fmt: skip
    except ValueError:
        return None


def arclight5_statements(
    engine: type[MySQLStatements], postgresql: bool, patient_id_rows: bool, view: str
) -> type:
    """The engine's statements with arc-light's text for those that read the archive."""
    if postgresql:
        version = (
            "decode(md5(concat_ws('|', to_char(s.updated_time, 'YYYY-MM-DD HH24:MI:SS.US'),"
            " COALESCE(s.version::text, ''), s.patient_fk::text, s.study_iuid,"
            " s.study_date, s.study_time, s.study_desc, s.rejection_state::text)), 'hex')"
        )
        queue_index = ""
    else:
        version = (
            "UNHEX(MD5(CONCAT_WS('|', DATE_FORMAT(s.updated_time, '%%Y-%%m-%%d %%H:%%i:%%s.%%f'),"
            " IFNULL(s.version, ''), s.patient_fk, s.study_iuid, s.study_date,"
            " s.study_time, s.study_desc, s.rejection_state)))"
        )
        queue_index = " FORCE INDEX (study_service_status)"
    if patient_id_rows:
        patient_id = (
            "(SELECT i.pat_id FROM patient_id i WHERE i.patient_fk = p.pk ORDER BY i.pk LIMIT 1)"
        )
    else:
        patient_id = "(SELECT i.pat_id FROM patient_id i WHERE i.pk = p.patient_id_fk)"
    documents = (
        " s.pk AS study_pk, s.study_iuid, s.study_date, s.study_time, s.study_desc,"
        " s.updated_time, s.study_size, s.rejection_state,"
        " a.pk AS counts_pk, a.mods_in_study, a.num_series, a.num_instances,"
        f" p.pk AS patient_pk, {patient_id} AS pat_id, n.alphabetic_name AS pat_name"
    )
    joins = (
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
        " LEFT JOIN person_name n ON n.pk = p.pat_name_fk"
        f" LEFT JOIN study_query_attrs a ON a.study_fk = s.pk AND a.view_id = '{view}'"
    )

    class ArcLight5Statements(engine):  # type: ignore[misc, valid-type]
        STUDY_VERSION = version
        SELECT_STUDY_PAGE = (
            "SELECT s.pk, s.updated_time, " + version + " AS version, s.study_iuid"
            " FROM study s WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
        )
        SELECT_PENDING_PAGE = (
            "SELECT q.study_pk AS queued_pk, q.sent_version, q.study_iuid AS known_iuid,"
            " q.enqueued_at AS queued_at," + documents + f" FROM study_service q{queue_index}"
            " LEFT JOIN study s ON s.pk = q.study_pk"
            + joins
            + " WHERE q.status = 'pending' AND q.study_pk > %s AND q.study_pk <= %s"
            " ORDER BY q.study_pk LIMIT %s"
        )
        SELECT_RECONCILE_PAGE = (
            "SELECT" + documents + ", q.status, q.sent_version"
            " FROM study s" + joins + " LEFT JOIN study_service q ON q.study_pk = s.pk"
            " WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
        )
        # A completely rejected study is withdrawn from the index, as a deleted one.
        SELECT_GONE_IN_RANGE = engine.SELECT_GONE_IN_RANGE.replace(
            "AND s.pk IS NULL", "AND (s.pk IS NULL OR s.rejection_state = 2)"
        )
        TIME_INDEXES = engine.TIME_INDEXES.replace("'updated_time'", "'access_time'")
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
                    "SELECT p.pk, " + patient_id + ", n.alphabetic_name FROM patient p"
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
            engine.PRIVILEGE_PROBES[-1],  # study_service
        )

    return ArcLight5Statements


@dataclass(frozen=True)
class StabilityWindow:
    """A study still receiving images waits until it has been quiet for
    `seconds` (stable_age_seconds), as the database's clock tells it."""

    now: datetime.datetime
    seconds: int

    def hold(self, row: Mapping[str, Any]) -> str | None:
        """Why this pending study waits, or None. A study dated in the future
        (a PACS clock set wrong) waits `seconds` from when it was enqueued,
        not until its date: it would otherwise wait, silently, for years."""
        cutoff = self.now - datetime.timedelta(seconds=self.seconds)
        updated, queued = row["updated_time"], row["queued_at"]
        if not isinstance(updated, datetime.datetime) or updated <= cutoff:
            return None
        if isinstance(queued, datetime.datetime) and queued <= cutoff:
            return None
        if updated > self.now:
            return (
                "dated in the future (updated_time is ahead of the database's clock):"
                " sent stable_age_seconds after it was enqueued"
            )
        return "still receiving images: sent once quiet for stable_age_seconds"


def hold_reason(
    row: Mapping[str, Any], schema: Dcm4chee2, window: StabilityWindow | None
) -> str | None:
    """Why a pending study is not sent in this run, or None to send it."""
    reason = window.hold(row) if window is not None else None
    if reason is None and not schema.settled(row):
        reason = "the archive has not computed its counts yet (arc-light: study_query_attrs)"
    return reason


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
    return ArcLight5(("patient_id", "patient_fk") in columns, view)


class Pacs:
    """A dcm4chee database, read for the documents, and its study_service
    queue. Subclasses connect, hold the SQL (`SQL`), lock, and translate
    errors; `Error` is what their driver raises."""

    SQL: type[MySQLStatements] = MySQLStatements
    Error: tuple[type[BaseException], ...] = ()
    # Set from the schema found (Dcm4chee2.scripts), once connected.
    INSTALL_SCRIPT: str
    GRANT_SCRIPT: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.where = f"database '{settings.db_name}' on {settings.db_host}:{settings.db_port}"
        self.statement = ""  # the last one run: named when it fails
        try:
            self.conn = self._connect()
        except self.Error as exc:
            raise DatabaseError(f"cannot connect to {self.where}: {self.describe(exc)}") from None
        try:
            found = {(row["t"], row["c"]) for row in self.query(self.SQL.SCHEMA_COLUMNS)}
        except self.Error as exc:
            self.close()
            raise DatabaseError(f"cannot read {self.where}: {self.describe(exc)}") from None
        try:
            self.schema = detect_schema(found, settings.query_view)
        except DatabaseError:
            self.close()
            raise
        # The schema's statements and scripts, for this engine.
        self.SQL = self.schema.statements(type(self).SQL, settings.db_engine == "postgresql")
        self.INSTALL_SCRIPT, self.GRANT_SCRIPT = self.schema.scripts(settings.db_engine)

    # -- what each engine provides -----------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        """Runs one statement (autocommit, or inside begin()); rows as dicts."""
        raise NotImplementedError

    def execute_many(self, sql: str, rows: list[tuple]) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def error_code(self, exc: BaseException) -> Any:
        raise NotImplementedError

    def describe(self, exc: BaseException) -> str:
        """One line for a driver error; it never holds the password."""
        raise NotImplementedError

    def is_missing_object(self, exc: BaseException) -> bool:
        """A table, column or function missing, or not granted."""
        raise NotImplementedError

    def is_conflict(self, exc: BaseException) -> bool:
        """A deadlock or lock wait timeout: worth running the transaction again."""
        raise NotImplementedError

    def try_run_lock(self, name: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:  # closing a dead connection: nothing left to do
            pass

    # -- installation and privileges ----------------------------------------

    @property
    def install_fix(self) -> str:
        return f"run: {self.INSTALL_SCRIPT.replace('DBNAME', self.settings.db_name)}"

    def check_installed(self) -> None:
        """Fails with the fix when the install script was not (re)run here."""
        names = {row["name"] for row in self.query(self.SQL.STUDY_SERVICE_COLUMNS)}
        if not names:
            raise DatabaseError(
                f"table study_service is missing in {self.where}; {self.install_fix}"
            )
        if "cursor_pk" not in names:
            raise DatabaseError(
                f"table study_service in {self.where} is out of date; {self.install_fix}"
            )
        if not self.query(self.SQL.INDEXER_PROCESS_COUNT)[0]["n"]:
            raise DatabaseError(
                f"procedure indexer_process is missing in {self.where}; {self.install_fix}"
            )

    def server_version(self) -> str:
        return str(self.query(self.SQL.SERVER_VERSION)[0]["v"])

    def privilege_problems(self) -> list[str]:
        """What a run needs and this user may not do, found by statements
        that touch no row (the server checks privileges before rows)."""
        user = self.settings.db_user
        problems = []
        for what, statements in self.SQL.PRIVILEGE_PROBES:
            for sql in statements:
                try:
                    self.query(sql)
                except self.Error as exc:
                    if self.is_missing_object(exc):
                        problems.append(f"user '{user}' lacks {what}: {self.describe(exc)}")
                        break
                    raise
        return problems

    def time_index(self) -> tuple[bool, str]:
        """How indexer_process finds changed studies in this database (for
        `check`): through an index, or by re-reading the newest studies."""
        names = sorted({row["name"] for row in self.query(self.SQL.TIME_INDEXES)})
        return self.schema.time_index(self, names)

    def uses_time_index(self, names: list[str]) -> bool:
        """Whether indexer_process can use one of these indexes."""
        return "study_updated" in names

    def explain(self, exc: BaseException) -> DatabaseError:
        """One line for a database error met mid-run. A missing table, column
        or procedure raises check_installed()'s error, which names the fix;
        a missing privilege points at the grant script."""
        message = f"database error on {self.where}: {self.describe(exc)}"
        if self.statement:
            # Which statement met it: a lock wait names what waited.
            message += f", in {statement_label(self.statement)}"
        if self.is_missing_object(exc):
            try:
                self.check_installed()
            except self.Error:
                pass
            return DatabaseError(
                f"{message}; if the indexer's own user lacks it, run {self.GRANT_SCRIPT}"
                " (see README)"
            )
        return DatabaseError(message)

    def acquire_run_lock(self) -> None:
        """One run at a time per database, across hosts: a lock the server
        releases when this connection ends, even on kill -9."""
        if not self.try_run_lock(("dicom_indexer." + self.settings.db_name)[:64]):
            raise LockedError(
                f"another dicom-indexer run is working on {self.where}; this run stands aside"
            )

    def enqueue_changes(self) -> int:
        """Calls indexer_process: enqueues studies new or changed since its last call."""
        return int(self.query(self.SQL.CALL_INDEXER_PROCESS)[0]["enqueued"])

    # -- the initial load ---------------------------------------------------

    def initial_state(self) -> dict[str, Any] | None:
        """The unfinished initial load, if any: when it began and how far it got."""
        rows = self.query(self.SQL.SELECT_BOOKKEEPING, (INITIAL_ROW_PK,))
        return rows[0] if rows else None

    def start_initial(self) -> None:
        """Records that an initial load began, unless one is already unfinished."""
        self.query(self.SQL.START_BOOKKEEPING, (INITIAL_ROW_PK, "initial"))

    def count_studies(self) -> int:
        return int(self.query(self.SQL.COUNT_STUDIES)[0]["n"])

    def enqueue_initial(
        self, on_page: Callable[[int, int], None], keep_going: Callable[[], bool]
    ) -> int:
        """Enqueues every study after the initial load's position, one page per
        transaction, so that an interruption resumes where it stopped.
        keep_going() comes before each page (it may wait; False stops the load);
        on_page(count, position) follows each committed page."""
        state = self.initial_state()
        if state is None or state["status"] != "initial":
            return 0
        position = int(state["position"] or 0)
        total = 0
        self.query(self.SQL.SET_INITIAL_STARTED, (str(state["started"]),))
        while True:
            if not keep_going():
                return total  # still 'initial': the next run carries on from here
            page = self.query(self.SQL.SELECT_STUDY_PAGE, (position, self.settings.page_size))
            if not page:
                break
            position = page[-1]["pk"]
            rows = [
                (
                    row["pk"],
                    _datetime_or_none(row["updated_time"]),
                    row["version"],
                    _text(row["study_iuid"]),
                )
                for row in page
            ]
            self._in_transaction(
                lambda rows=rows, position=position: (
                    self.execute_many(self.SQL.ENQUEUE_FOR_INITIAL, rows),
                    self.query(self.SQL.SET_CURSOR, (position, INITIAL_ROW_PK)),
                )
            )
            total += len(page)
            on_page(len(page), position)
        # Every study up to here is enqueued: the tick need not re-read them
        # by pk (late rows with lower pks are still caught by its time window).
        self.query(self.SQL.RAISE_CURSOR, (position, CURSOR_ROW_PK))
        self.query(self.SQL.SET_STATUS, ("initial-sending", INITIAL_ROW_PK))
        return total

    def _in_transaction(self, work: Callable[[], Any]) -> None:
        """Runs work() in one transaction, again if the server chose it as a
        deadlock victim: the initial load writes while acknowledgements do."""
        for attempt in range(DEADLOCK_RETRIES + 1):
            self.begin()
            try:
                work()
                self.commit()
                return
            except self.Error as exc:
                self.rollback()
                if not self.is_conflict(exc) or attempt == DEADLOCK_RETRIES:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def finish_initial(self) -> bool:
        """Forgets the initial load once nothing it enqueued is pending."""
        state = self.initial_state()
        if state is None or state["status"] != "initial-sending" or self.count_pending():
            return False
        self.query(self.SQL.DELETE_ROW, (INITIAL_ROW_PK,))
        return True

    # -- delivery bookkeeping ------------------------------------------------

    def pending_studies(
        self, frontier: Callable[[int], int | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Streams pending studies page by page: memory stays flat.

        While an initial load is still enqueueing, frontier(reached) is told how
        far the stream has read and returns the last pk the load committed: the
        stream waits for it instead of ending early. It returns None once
        everything is enqueued.
        """
        after = 0
        while True:
            bound = frontier(after) if frontier else None
            page = self.query(
                self.SQL.SELECT_PENDING_PAGE,
                (after, MAX_PK if bound is None else bound, self.settings.page_size),
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

    def record(self, outcomes: list[Outcome], unchanged: list[int]) -> None:
        """Writes a batch of results in one transaction."""
        if not outcomes and not unchanged:
            return
        sent = [
            (o.study_pk, o.version, o.study_iuid)
            for o in outcomes
            if o.delivered and not o.deletion
        ]
        deleted = [(o.study_pk,) for o in outcomes if o.delivered and o.deletion]
        failures = [
            (
                FAILED if o.rejected else DELETING if o.deletion else PENDING,
                (o.error or "")[:255],
                o.study_pk,
            )
            for o in outcomes
            if not o.delivered
        ]
        self.begin()
        for sql, rows in (
            (self.SQL.RECORD_SENT, sent),
            (self.SQL.RECORD_DELETED, deleted),
            (self.SQL.RECORD_FAILURE, failures),
            (self.SQL.RECORD_UNCHANGED, [(pk,) for pk in unchanged]),
        ):
            if rows:
                self.execute_many(sql, rows)
        self.commit()

    def mark_gone(self, gone: list[tuple[int, str | None]]) -> None:
        """Studies deleted from dcm4chee: to be DELETEd from the central index
        when send_deletes is on and the service knows them, else just noted."""
        rows = [
            (DELETING if self.settings.send_deletes and iuid else DELETED, pk) for pk, iuid in gone
        ]
        if rows:
            self.execute_many(self.SQL.MARK_GONE, rows)

    def deleting_studies(self) -> Iterator[dict[str, Any]]:
        """Studies whose DELETE is still due, page by page."""
        after = 0
        while True:
            page = self.query(self.SQL.SELECT_DELETING_PAGE, (after, self.settings.page_size))
            if not page:
                return
            yield from page
            after = page[-1]["study_pk"]

    def retry_failed(self) -> int:
        return self.rowcount(self.SQL.RETRY_FAILED)

    def delivered_iuids(self, iuids: list[str | None]) -> set[str]:
        """Which of these Study Instance UIDs this database's indexer has
        delivered: through the archive's own unique index on study_iuid."""
        wanted = [iuid for iuid in iuids if iuid]
        if not wanted:
            return set()
        rows = self.query(
            "SELECT s.study_iuid FROM study s JOIN study_service q ON q.study_pk = s.pk"
            f" WHERE q.status = 'sent' AND s.study_iuid IN ({', '.join(['%s'] * len(wanted))})",
            wanted,
        )
        return {_text(row["study_iuid"]) for row in rows}

    def rowcount(self, sql: str, args: Any = None) -> int:
        raise NotImplementedError

    def stability_window(self) -> StabilityWindow | None:
        """stable_age_seconds, on the database's clock (the one that stamps
        updated_time and enqueued_at); None when it is not set."""
        if not self.settings.stable_age_seconds:
            return None
        now = self.query(self.SQL.DATABASE_NOW)[0]["now"]
        return StabilityWindow(now, self.settings.stable_age_seconds)

    # -- reconcile --------------------------------------------------------

    def reconcile_position(self) -> int:
        """Where an interrupted reconcile stopped (0: start a new sweep)."""
        self.query(self.SQL.START_BOOKKEEPING, (RECONCILE_ROW_PK, "reconcile"))
        rows = self.query(self.SQL.SELECT_BOOKKEEPING, (RECONCILE_ROW_PK,))
        return int(rows[0]["position"] or 0)

    def reconcile_page(self, after: int, size: int) -> list[dict[str, Any]]:
        return self.query(self.SQL.SELECT_RECONCILE_PAGE, (after, size))

    def gone_between(self, after: int, upto: int) -> list[tuple[int, str | None]]:
        rows = self.query(self.SQL.SELECT_GONE_IN_RANGE, (after, upto))
        return [(row["study_pk"], row["study_iuid"]) for row in rows]

    def record_reconciled(
        self, changed: list[int], gone: list[tuple[int, str | None]], position: int
    ) -> None:
        """One page's findings and the new position, in one transaction."""
        self.begin()
        if changed:
            self.execute_many(self.SQL.ENQUEUE_CHANGED, [(pk,) for pk in changed])
        self.query(self.SQL.SET_CURSOR, (position, RECONCILE_ROW_PK))
        self.mark_gone(gone)
        self.commit()

    def finish_reconcile(self) -> None:
        self.query(self.SQL.DELETE_ROW, (RECONCILE_ROW_PK,))

    def held_reasons(self) -> dict[str, int]:
        """Why pending studies wait, as a run would decide now: reason ->
        how many (among the first STATUS_PENDING_ROWS pending)."""
        window = self.stability_window()
        reasons: collections.Counter[str] = collections.Counter()
        for row in itertools.islice(self.pending_studies(), STATUS_PENDING_ROWS):
            reason = None if self.schema.withdrawn(row) else hold_reason(row, self.schema, window)
            if reason:
                reasons[reason] += 1
        return dict(reasons)

    def oldest_pending_seconds(self) -> int | None:
        age = self.query(self.SQL.OLDEST_PENDING_SECONDS)[0]["age"]
        return None if age is None else int(age)

    def count_pending(self) -> int:
        return int(self.query(self.SQL.COUNT_PENDING)[0]["n"])

    def status_report(self) -> dict[str, Any]:
        counts = dict.fromkeys((PENDING, SENT, FAILED, DELETING, DELETED), 0)
        for row in self.query(self.SQL.COUNT_BY_STATUS):
            counts[row["status"]] = int(row["n"])
        last_sent = self.query(self.SQL.LAST_SENT)[0]["t"]
        errors = self.query(self.SQL.RECENT_ERRORS)
        initial = self.initial_state()
        return {
            "counts": counts,
            "held": self.held_reasons() if counts[PENDING] else {},
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
                }
                for row in errors
            ],
        }


def _import_pymysql() -> Any:
    """PyMySQL, without the `cryptography` package it imports up front when
    it is installed: 7 MB of a budget of 50, used only by MySQL 8's
    caching_sha2_password over a connection without TLS, and then only when
    the server has not cached the password (_load_pymysql_rsa does it then)."""
    # Only where neither is loaded yet (a test process may hold both).
    blocked = "cryptography" not in sys.modules and "pymysql" not in sys.modules
    if blocked:
        sys.modules["cryptography"] = None  # type: ignore[assignment]
    try:
        # Every PyMySQL from 0.10 (the oldest requirements.txt allows) imports
        # it under try/except ImportError: it then only lacks the RSA exchange.
        import pymysql
        import pymysql.cursors
    finally:
        if blocked:
            del sys.modules["cryptography"]
    return pymysql


def _load_pymysql_rsa(pymysql: Any) -> bool:
    """Re-imports PyMySQL's authentication module, now with `cryptography`;
    False when that package is not installed."""
    import importlib

    importlib.reload(pymysql._auth)
    return sys.modules.get("cryptography") is not None


class MySQLPacs(Pacs):
    """dcm4chee 2.x on MySQL 5.6 to 8 or MariaDB 10.x, through PyMySQL."""

    SQL = MySQLStatements
    # Table, column or procedure missing (or not granted).
    MISSING_OBJECT_ERRORS = (1146, 1054, 1305, 1370, 1142, 1143)
    REASONS = {
        0: LOST_CONNECTION,
        2006: LOST_CONNECTION,
        2013: LOST_CONNECTION,
        2055: LOST_CONNECTION,
        1053: "the database server is shutting down",
        1927: "the connection was killed",
        1205: LOCK_TIMEOUT,
        1213: DEADLOCK,
    }

    def __init__(self, settings: Settings) -> None:
        # Imported here, as pg8000 is by PostgreSQLPacs: a run loads one
        # driver (each costs a few MB of a budget of 50).
        pymysql = _import_pymysql()
        self.driver = pymysql
        self.Error = (pymysql.MySQLError,)
        super().__init__(settings)

    def _connect(self) -> Any:
        try:
            return self._connect_once()
        except RuntimeError as exc:
            # MySQL 8's caching_sha2_password (or sha256_password) asked for
            # the password encrypted with the server's RSA key: the one case
            # that needs `cryptography`, loaded now.
            if "cryptography" not in str(exc):
                raise
            if not _load_pymysql_rsa(self.driver):
                raise DatabaseError(
                    f"cannot connect to {self.where}: the server wants the password"
                    " RSA-encrypted (MySQL 8 caching_sha2_password without TLS) and the"
                    " Python package 'cryptography' is not installed: pip install cryptography"
                ) from None
            return self._connect_once()

    def _connect_once(self) -> Any:
        settings = self.settings
        pymysql = self.driver
        return pymysql.connect(
            host=settings.db_host,
            port=settings.db_port,
            user=settings.db_user,
            password=settings.db_password,
            database=settings.db_name,
            unix_socket=settings.db_unix_socket,
            # Decodes latin1 and utf8 columns alike into correct Unicode.
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=DB_CONNECT_TIMEOUT_SECONDS,
            read_timeout=DB_READ_TIMEOUT_SECONDS,
            write_timeout=DB_READ_TIMEOUT_SECONDS,
            cursorclass=pymysql.cursors.DictCursor,
        )

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        self.statement = sql
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def rowcount(self, sql: str, args: Any = None) -> int:
        self.statement = sql
        with self.conn.cursor() as cur:
            return cur.execute(sql, args)

    def execute_many(self, sql: str, rows: list[tuple]) -> None:
        self.statement = sql
        with self.conn.cursor() as cur:
            cur.executemany(sql, rows)

    def begin(self) -> None:
        self.conn.begin()

    def commit(self) -> None:
        self.conn.commit()

    def rollback(self) -> None:
        self.conn.rollback()

    def error_code(self, exc: BaseException) -> Any:
        return exc.args[0] if exc.args else None

    def describe(self, exc: BaseException) -> str:
        return _mysql_message(exc, self.REASONS)

    def is_missing_object(self, exc: BaseException) -> bool:
        return self.error_code(exc) in self.MISSING_OBJECT_ERRORS

    def is_conflict(self, exc: BaseException) -> bool:
        return self.error_code(exc) in (1213, 1205)

    def try_run_lock(self, name: str) -> bool:
        return self.query("SELECT GET_LOCK(%s, 0) AS got", (name,))[0]["got"] == 1


class PostgreSQLPacs(Pacs):
    """dcm4chee 2.x on PostgreSQL 9.6 and later, through pg8000 (pure Python,
    installed only where needed: requirements-postgresql.txt)."""

    SQL = PostgreSQLStatements
    BATCHED: dict[str, str] = {}  # per-row statement -> its array form, below the class
    # SQLSTATEs: undefined table, column or function; insufficient privilege.
    MISSING_OBJECT_ERRORS = ("42P01", "42703", "42883", "42501")
    REASONS = {
        "57P01": LOST_CONNECTION,  # pg_terminate_backend, or a fast shutdown
        "57P02": "the database server is shutting down",
        "57P03": "the database server is starting up",
        "55P03": LOCK_TIMEOUT,
        "57014": "the statement was cancelled (statement_timeout)",
        "40P01": DEADLOCK,
        "40001": "serialization failure with a PACS transaction",
    }

    def __init__(self, settings: Settings) -> None:
        try:
            import pg8000.dbapi
        except ImportError:
            raise DatabaseError(
                'config.json says database.engine "postgresql" but its driver is not'
                f" installed: run {sys.executable} -m pip install -r"
                f" {HERE / 'requirements-postgresql.txt'}"
            ) from None
        self.driver = pg8000.dbapi
        self.Error = (pg8000.dbapi.Error,)
        super().__init__(settings)

    def _connect(self) -> Any:
        settings = self.settings
        conn = self.driver.connect(
            user=settings.db_user,
            password=settings.db_password or None,
            host=settings.db_host if not settings.db_unix_socket else None,
            port=settings.db_port,
            database=settings.db_name,
            unix_sock=settings.db_unix_socket,
            timeout=DB_CONNECT_TIMEOUT_SECONDS,
            application_name="dicom-indexer",
        )
        conn.autocommit = True
        # pg8000's timeout is the socket's, for every read, not only for
        # connecting: left at DB_CONNECT_TIMEOUT_SECONDS, a statement waiting
        # on a lock for longer would end the run with a socket error before
        # lock_timeout could answer. From here on, reads wait as MySQL's do.
        sock = getattr(conn, "_usock", None)
        if sock is not None:
            sock.settimeout(DB_READ_TIMEOUT_SECONDS)
        # MySQL gives up on a lock after 50 s (innodb_lock_wait_timeout);
        # PostgreSQL would wait forever on a transaction left open. A
        # lock_timeout set for the role or database is kept.
        conn.cursor().execute(
            "SELECT set_config('lock_timeout', %s, false)"
            " WHERE current_setting('lock_timeout') = '0'",
            (f"{PG_LOCK_TIMEOUT_SECONDS}s",),
        )
        return conn

    def _run(self, sql: str, args: Any) -> Any:
        self.statement = sql
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

    def execute_many(self, sql: str, rows: list[tuple]) -> None:
        batched = self.BATCHED.get(sql)
        if batched is not None:
            self._run(batched, [list(column) for column in zip(*rows)])
        elif sql.endswith("WHERE study_pk = %s") and all(len(row) == 1 for row in rows):
            # One column, the pk: the whole batch by = ANY(array).
            self._run(sql.replace("study_pk = %s", "study_pk = ANY(%s::bigint[])"),
                      ([row[0] for row in rows],))  # fmt: skip
        else:
            cur = self.conn.cursor()
            for row in rows:
                cur.execute(sql, row)

    def begin(self) -> None:
        self._run("BEGIN", None)

    def commit(self) -> None:
        self._run("COMMIT", None)

    def rollback(self) -> None:
        try:
            self._run("ROLLBACK", None)
        except self.Error:
            pass  # the connection is gone: the server rolled back

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
        return self.error_code(exc) in self.MISSING_OBJECT_ERRORS

    def is_conflict(self, exc: BaseException) -> bool:
        return self.error_code(exc) in ("40P01", "55P03", "40001")

    def try_run_lock(self, name: str) -> bool:
        rows = self.query("SELECT pg_try_advisory_lock(hashtext(%s)) AS got", (name,))
        return bool(rows[0]["got"])

    def uses_time_index(self, names: list[str]) -> bool:
        # No index hints: the planner takes any index on updated_time.
        return bool(names)


PostgreSQLPacs.BATCHED = {
    PostgreSQLStatements.ENQUEUE_FOR_INITIAL: PostgreSQLStatements.ENQUEUE_FOR_INITIAL_ROWS,
    PostgreSQLStatements.RECORD_SENT: PostgreSQLStatements.RECORD_SENT_ROWS,
    PostgreSQLStatements.RECORD_FAILURE: PostgreSQLStatements.RECORD_FAILURE_ROWS,
    PostgreSQLStatements.MARK_GONE: PostgreSQLStatements.MARK_GONE_ROWS,
}

PACS_ENGINES: dict[str, type[Pacs]] = {"mysql": MySQLPacs, "postgresql": PostgreSQLPacs}


def open_pacs(settings: Settings) -> Pacs:
    """The PACS database that config.json names, on its engine."""
    return PACS_ENGINES[settings.db_engine](settings)


def statement_label(sql: str) -> str:
    """What a statement does, for an error line: 'indexer_process', 'UPDATE
    study_service', 'SELECT from study'. Never its arguments."""
    if "indexer_process" in sql:
        return "indexer_process (finding the new and changed studies)"
    verb = sql.split(None, 1)[0].upper() if sql.strip() else "statement"
    table = re.search(r"\b(FROM|INTO|UPDATE)\s+(\w+)", sql, re.IGNORECASE)
    if table is None:
        return verb
    preposition = "on" if table.group(1).upper() == "UPDATE" else table.group(1).lower()
    return f"{verb} {preposition} {table.group(2)}"


def _mysql_message(exc: Exception, reasons: Mapping[Any, str] | None = None) -> str:
    """'(1045) Access denied ...' from a PyMySQL error; it never holds the
    password. Errors that say little by themselves (a killed connection is
    "(0) ") get the reason in words."""
    args = getattr(exc, "args", ())
    code = args[0] if args else None
    text = " ".join(str(args[1]).split()) if len(args) >= 2 else ""
    reasons = MySQLPacs.REASONS if reasons is None else reasons
    reason = reasons.get(code) if isinstance(code, int) else None
    if reason and text:
        return f"{reason} ({code}: {text})"
    if reason:
        return reason
    if text:
        return f"({code}) {text}"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------
# Mapping: one study row -> the document sent
# --------------------------------------------------------------------------


def _format_datetime(value: Any) -> str | None:
    """'YYYY-MM-DD HH:MM:SS', or None for NULL and zero dates.

    PyMySQL hands back zero dates ('0000-00-00 00:00:00') as the raw string.
    """
    if isinstance(value, datetime.datetime):
        return "%04d-%02d-%02d %02d:%02d:%02d" % (
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
        )
    if isinstance(value, datetime.date):
        return "%04d-%02d-%02d 00:00:00" % (value.year, value.month, value.day)
    return None


def _datetime_or_none(value: Any) -> datetime.datetime | None:
    # Zero dates come back as strings and strict servers refuse them as input.
    return value if isinstance(value, datetime.datetime) else None


def _text(value: Any) -> str | None:
    # dcm4chee's columns are text, but a site may have altered one to binary.
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).decode("latin-1")
    return value


def study_document(row: Mapping[str, Any], center: str) -> dict[str, Any]:
    """The JSON document for one study, with the original client's value types."""
    return {
        "patient_pk": row["patient_pk"],
        "patient_id": _text(row["pat_id"]),
        "patient_name": _text(row["pat_name"]),
        "study_pk": row["study_pk"],
        "study_iuid": _text(row["study_iuid"]),
        "study_datetime": _format_datetime(row["study_datetime"]),
        "study_description": _text(row["study_desc"]),
        "study_modality": _text(row["mods_in_study"]),
        "study_series": row["num_series"],
        "study_instances": row["num_instances"],
        "center": center,
    }


def encode_document(document: Mapping[str, Any]) -> bytes:
    """The request body: compact JSON, ASCII-escaped so any receiver decodes it."""
    return json.dumps(document, separators=(",", ":")).encode("ascii")


def document_version(body: bytes) -> bytes:
    """The fingerprint kept in study_service.sent_version (BINARY(16))."""
    return hashlib.md5(body).digest()


# --------------------------------------------------------------------------
# Delivery
# --------------------------------------------------------------------------


def _retry_policy(settings: Settings) -> Any:
    """urllib3's Retry, with jitter on the backoff and a cap on Retry-After.

    Jitter keeps several clients from retrying in lockstep; the cap keeps a
    cron tick from sleeping for hours on a Retry-After the service sent.
    """
    from urllib3.exceptions import InvalidHeader
    from urllib3.util.retry import Retry

    class BoundedRetry(Retry):
        def get_backoff_time(self) -> float:
            return super().get_backoff_time() * random.uniform(0.5, 1.5)

        def get_retry_after(self, response: Any) -> float | None:
            try:
                seconds = super().get_retry_after(response)
            except InvalidHeader:  # "Retry-After: soon": as if absent
                return None
            return None if seconds is None else min(seconds, MAX_RETRY_AFTER_SECONDS)

    options: dict[str, Any] = {
        "total": settings.max_retries,
        "connect": settings.max_retries,
        "read": settings.max_retries,
        "status": settings.max_retries,
        "other": 0,
        "redirect": 0,
        "status_forcelist": tuple(c for c in RETRY_STATUSES if c not in OVERLOAD_STATUSES),
        "backoff_factor": settings.backoff_seconds,
        # Retry-After is Sender's business: urllib3 would retry a 429 or 503
        # carrying it and sleep in that one thread while the others go on.
        "respect_retry_after_header": False,
        "raise_on_status": False,
        "raise_on_redirect": False,
    }
    methods = frozenset({"POST", "DELETE", "GET"})
    try:
        return BoundedRetry(allowed_methods=methods, **options)
    except TypeError:  # urllib3 < 1.26: method_whitelist, and no `other`
        del options["other"]
        return BoundedRetry(method_whitelist=methods, **options)


# "auto" concurrency: LEDBAT (RFC 6817), the delay-based congestion control
# written for background transfers that must yield to everyone else's traffic,
# with a multiplicative decrease. It keeps the service's queueing delay near a
# small target whatever the number of clients: ten centers loading at once
# share the service's capacity instead of each adding its own queue, as a
# Vegas-style count of queued requests per client would; and additive increase
# with multiplicative decrease makes their shares converge (Chiu and Jain).
AUTO_START_LIMIT = 1  # latency measured before any load of ours: a true unloaded figure
AUTO_TARGET_SECONDS = 0.001  # queueing delay tolerated at the service...
AUTO_TARGET_FRACTION = 0.25  # ...or this fraction of the unloaded latency, if larger
AUTO_BASE_MINUTES = 10  # the unloaded latency: the minimum over this many minutes
# The current latency: the mean of the answers of the last half round trip
# (limit / 2 answers, at least 2), which evens out the jitter of a busy
# machine and still sees a queue within one round trip at any limit. (The
# lowest of them, LEDBAT's filter, misses the queue of a service that does
# not serve in strict order: some request always passes without waiting.)
AUTO_RECENT_SAMPLES = 128
AUTO_SLOW_START_STEP = 0.5  # per answer: x1.5 per round trip until the delay shows
AUTO_GAIN = 0.25  # LEDBAT's GAIN: at most +1/4 per round trip once past slow start
AUTO_DECREASE_PER_ROUND_TRIP = 0.3  # share of the limit shed per round trip over the target
AUTO_OVERLOAD_FACTOR = 0.5  # multiplicative decrease on 429/503/timeout, once per round trip
AUTO_REPORT_SECONDS = 5.0  # -v: a line about the limit this often


class ConcurrencyLimit:
    """How many requests may be in flight, and the pause that a 429 or 503
    imposes on all of them.

    With a fixed `concurrency` the limit never moves. With "auto" it starts at
    1 and grows by half every round trip while the latency holds (slow start,
    gentler than TCP's doubling: ten centers starting together overshoot
    less), then follows LEDBAT's increase, at most +1/4 per round trip while
    the queueing delay is under the target, and sheds up to 30% per round
    trip while it is over; a 429, 503 or timeout halves it. It does not grow
    while the client cannot fill it (the database side is the bottleneck), so
    it never drifts to a number it never tried.
    """

    def __init__(self, fixed: int | None, maximum: int) -> None:
        self.adaptive = fixed is None
        self.maximum = maximum if fixed is None else fixed
        self.limit = float(min(AUTO_START_LIMIT, maximum) if fixed is None else fixed)
        self.in_flight = 0
        self.paused_until = 0.0
        self.slow_start = True
        self.last_decrease = 0.0
        self.base_minutes: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=AUTO_BASE_MINUTES
        )
        self.recent: collections.deque[float] = collections.deque(maxlen=AUTO_RECENT_SAMPLES)
        self.latency_total = 0.0
        self.latency_count = 0
        self.turn = threading.Condition()

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Waits for a free slot and for any pause to end; False if cancelled."""
        with self.turn:
            while not cancelled():
                pause = self.paused_until - time.monotonic()
                if pause <= 0 and self.in_flight < int(self.limit):
                    self.in_flight += 1
                    return True
                self.turn.wait(timeout=min(pause, 0.25) if pause > 0 else 0.25)
            return False

    def release(self, latency: float | None, overloaded: bool = False) -> None:
        """One request is answered: `latency` None when it says nothing about
        the service's queue (a retry inside urllib3, a refused connection)."""
        with self.turn:
            in_flight = self.in_flight
            self.in_flight -= 1
            before = int(self.limit)
            if overloaded:
                self._decrease()
            elif latency is not None:
                self._measure(latency, in_flight)
            self.turn.notify(1 + max(0, int(self.limit) - before))

    def pause(self, seconds: float) -> bool:
        """No request starts for `seconds` (the service's Retry-After);
        True if this starts a pause rather than extending one."""
        with self.turn:
            now = time.monotonic()
            started = self.paused_until <= now
            self.paused_until = max(self.paused_until, now + seconds)
            return started and seconds > 0

    def _measure(self, latency: float, in_flight: int) -> None:
        self.latency_total += latency
        self.latency_count += 1
        minute = int(time.monotonic() // 60)
        if self.base_minutes and self.base_minutes[-1][0] == minute:
            self.base_minutes[-1] = (minute, min(self.base_minutes[-1][1], latency))
        else:
            self.base_minutes.append((minute, latency))
        self.recent.append(latency)
        if not self.adaptive or in_flight < self.limit / 2:
            return  # the client, not the service, is what limits the pace now
        base = self.base_latency()
        target = max(AUTO_TARGET_SECONDS, AUTO_TARGET_FRACTION * base)
        window = max(2, int(self.limit / 2))
        delay = sum(itertools.islice(reversed(self.recent), window)) / window - base
        if self.slow_start and delay <= target / 2:
            self.limit = min(self.maximum, self.limit + AUTO_SLOW_START_STEP)
            return
        self.slow_start = False
        if delay <= target:
            # LEDBAT's increase: in proportion to the room left under the
            # target, +1 per round trip at most (one answer in `limit`).
            room = (target - delay) / target
            self.limit = min(float(self.maximum), self.limit + AUTO_GAIN * room / self.limit)
        else:
            # Down by a share of the limit, not by a constant as LEDBAT does:
            # additive increase with multiplicative decrease is what makes
            # several clients converge to equal shares (Chiu and Jain), so ten
            # centers loading together end up at the same pace.
            excess = min(1.0, (delay - target) / target)
            self.limit = max(1.0, self.limit - AUTO_DECREASE_PER_ROUND_TRIP * excess)

    def _decrease(self) -> None:
        now = time.monotonic()
        self.slow_start = False
        if self.adaptive and now - self.last_decrease >= max(self.base_latency(), 0.05):
            self.limit = max(1.0, self.limit * AUTO_OVERLOAD_FACTOR)
            self.last_decrease = now

    def base_latency(self) -> float:
        """The unloaded round trip: the lowest in the last AUTO_BASE_MINUTES."""
        return min((low for _, low in self.base_minutes), default=0.0)

    def mean_latency(self) -> float | None:
        return self.latency_total / self.latency_count if self.latency_count else None

    def describe(self) -> str:
        """For the summary line and -v: "concurrency 37 (auto, up to 64), latency 51 ms"."""
        mode = f"auto, up to {self.maximum}" if self.adaptive else "fixed"
        text = f"concurrency {int(self.limit)} ({mode})"
        mean = self.mean_latency()
        if mean is not None:
            text += f", latency {mean * 1000:.0f} ms (unloaded {self.base_latency() * 1000:.0f} ms)"
        return text


class Sender:
    """POSTs documents over one pool of keep-alive connections shared by the
    worker threads, with urllib3's retry machinery.

    The per-study path calls urllib3, the transport under requests, directly:
    requests' per-request objects (sessions, prepared requests, cookie jars,
    responses) cost 7% of the throughput over a 50 ms network with 16
    connections (286 studies/s against 306, measured). requests still reads
    the proxy settings of the environment, when there are any. urllib3 is
    imported here, not at the top, so a tick with nothing to send never pays
    for it.
    """

    def __init__(self, settings: Settings) -> None:
        import urllib3

        self.settings = settings
        self.url = settings.webservice_url
        self.headers = {"Content-Type": "application/json", "X-Api-Key": settings.key}
        self.limit = ConcurrencyLimit(settings.concurrency, settings.max_concurrency)
        self.retries = _retry_policy(settings)
        options: dict[str, Any] = {
            "num_pools": 1,
            "maxsize": self.limit.maximum,
            "block": True,
            "retries": self.retries,
            "timeout": urllib3.Timeout(
                connect=settings.connect_timeout_seconds, read=settings.read_timeout_seconds
            ),
        }
        if self.url.startswith("https://"):
            options["cert_reqs"] = "CERT_REQUIRED"
            options["ca_certs"] = (
                settings.ca_bundle
                or os.environ.get("REQUESTS_CA_BUNDLE")
                or os.environ.get("CURL_CA_BUNDLE")
                or _default_ca_bundle()
            )
        proxy = _environment_proxy(self.url)
        self.pool = (
            urllib3.ProxyManager(proxy, **options) if proxy else urllib3.PoolManager(**options)
        )
        self.http_error = urllib3.exceptions.HTTPError
        self.read_timeout = urllib3.exceptions.ReadTimeoutError

    def close(self) -> None:
        self.pool.clear()

    def post(self, outcome: Outcome, body: bytes, cancelled: Callable[[], bool] = bool) -> bool:
        """Registers one study; never raises for network trouble. False if
        the run stopped (`cancelled`) before it was first sent."""
        return self._send("POST", outcome, body, cancelled)

    def delete(self, outcome: Outcome) -> Outcome:
        """Removes one study from the central index; 404 means already gone."""
        body = encode_document(
            {
                "study_iuid": outcome.study_iuid,
                "study_pk": outcome.study_pk,
                "center": self.settings.center,
            }
        )
        self._send("DELETE", outcome, body, bool)
        if outcome.status_code == 404:
            outcome.delivered, outcome.error = True, None
        return outcome

    def _send(
        self, method: str, outcome: Outcome, body: bytes, cancelled: Callable[[], bool]
    ) -> bool:
        """urllib3 retries timeouts, lost connections and 5xx; a 429 or 503 is
        retried here, after pausing every request for its Retry-After."""
        limit = self.limit
        for attempt in range(1, self.settings.max_retries + 2):
            if not limit.acquire(cancelled):
                return attempt > 1  # a study already tried keeps its error: it stays pending
            started = time.monotonic()
            try:
                # The whole answer is read (preload_content), which hands the
                # connection back to the pool for the next study.
                response = self.pool.urlopen(
                    method, self.url, body=body, headers=self.headers, redirect=False
                )
            except self.http_error as exc:
                outcome.error = self._describe(exc)
                timed_out = any(isinstance(e, self.read_timeout) for e in _cause_chain(exc))
                limit.release(None, overloaded=timed_out)
                return True
            overloaded = response.status in OVERLOAD_STATUSES
            # Retried inside urllib3: the time measured is not one round trip.
            retried = bool(response.retries and response.retries.history)
            limit.release(None if retried else time.monotonic() - started, overloaded)
            outcome.status_code = response.status
            outcome.delivered = 200 <= response.status < 300
            if outcome.delivered:
                outcome.error = None
                return True
            text = " ".join(response.data[:ERROR_TEXT_CHARS].decode("utf-8", "replace").split())
            outcome.error = f"HTTP {response.status}" + (f": {text}" if text else "")
            if not overloaded or attempt > self.settings.max_retries:
                return True
            retry_after = self.retries.get_retry_after(response)
            if retry_after is not None:
                # The service asked everyone to wait: no request starts meanwhile.
                if limit.pause(retry_after):
                    log.info(
                        "the service answered HTTP %d: all sending paused for %g s (%s)",
                        response.status,
                        retry_after,
                        limit.describe(),
                    )
            else:
                backoff = self.settings.backoff_seconds * 2 ** (attempt - 1)
                _sleep_unless(
                    cancelled, min(backoff * random.uniform(0.5, 1.5), MAX_RETRY_AFTER_SECONDS)
                )
        return True

    def probe(self) -> tuple[bool, str]:
        """For `check`: reaches the service with the key without registering anything."""
        where = _safe_url(self.url)
        try:
            response = self.pool.urlopen("GET", self.url, headers=self.headers, redirect=False)
        except self.http_error as exc:
            return False, f"{where}: {self._describe(exc)}"
        code = response.status
        if code in (401, 403):
            return False, f"the service refused the key (HTTP {code})"
        if code >= 500:
            return False, f"the service is failing (HTTP {code})"
        return True, f"{where} answered HTTP {code}"

    def _describe(self, exc: BaseException) -> str:
        """One line for a failed request: timeout, TLS, or unreachable."""
        import ssl

        import urllib3

        chain = _cause_chain(exc)

        def caused_by(kind: Any) -> bool:
            return any(isinstance(e, kind) for e in chain)

        if caused_by(urllib3.exceptions.ReadTimeoutError):
            return f"no answer within {self.settings.read_timeout_seconds:g} s"
        # urllib3 makes NewConnectionError (refused, no route) a ConnectTimeoutError.
        if caused_by(urllib3.exceptions.ConnectTimeoutError) and not caused_by(
            urllib3.exceptions.NewConnectionError
        ):
            return f"no connection within {self.settings.connect_timeout_seconds:g} s"
        if caused_by((urllib3.exceptions.SSLError, ssl.SSLError)):
            return f"TLS error: {_reason(chain)}"
        return f"cannot reach the service: {_reason(chain)}"


def _default_ca_bundle() -> str:
    """certifi's bundle, which is what requests uses."""
    import certifi

    return certifi.where()


def _environment_proxy(url: str) -> str | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read as requests reads them.
    requests itself (5 MB of memory: measured) is imported only when one of
    them is set, which on most PACS servers none is."""
    if not any(name.lower().endswith("_proxy") and value for name, value in os.environ.items()):
        return None
    from requests.utils import get_environ_proxies, select_proxy

    return select_proxy(url, get_environ_proxies(url))


def _sleep_unless(cancelled: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not cancelled() and time.monotonic() < deadline:
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """exc, then what caused it (urllib3 keeps it in .reason), innermost last."""
    chain = [exc]
    while len(chain) < 10:
        inner = chain[-1]
        nxt = getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if not isinstance(nxt, BaseException) or nxt in chain:
            break
        chain.append(nxt)
    # requests and urllib3 also wrap causes in their args.
    for arg in chain[-1].args if chain[-1].args else exc.args:
        if isinstance(arg, BaseException) and arg not in chain:
            chain.extend(_cause_chain(arg))
            break
    return chain


def _reason(chain: list[BaseException]) -> str:
    """The innermost cause, short enough for one line."""
    inner = chain[-1]
    text = str(inner)
    if text.startswith("<") and "]: " in text:  # "<urllib3.connection...>: Failed to ..."
        text = text.split("]: ", 1)[1]
    elif text.startswith("<") and ">: " in text:
        text = text.split(">: ", 1)[1]
    return text.strip()[:ERROR_TEXT_CHARS] or type(inner).__name__


def _safe_url(url: str) -> str:
    """The URL without any query string, which might hold a token."""
    return url.split("?", 1)[0]


# After SIGTERM, requests already in flight may finish for this long (their
# answers are recorded); systemd's default stop timeout is 90 s, a shutdown's
# patience often 10 s.
TERMINATION_GRACE_SECONDS = 7.0


class Termination:
    """SIGTERM (systemd stop, kill) asks a run to end soon: it takes no new
    study, lets the requests in flight finish for TERMINATION_GRACE_SECONDS,
    records every acknowledgement it has and exits 143. The handler only sets
    a flag: raising inside whatever the main thread was doing (writing
    acknowledgements, say) could lose them."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at: float | None = None

    def request(self, signum: int = 0, frame: Any = None) -> None:
        self.at = time.monotonic()
        self.event.set()

    def requested(self) -> bool:
        return self.event.is_set()

    def grace_over(self) -> bool:
        return self.at is not None and time.monotonic() - self.at > TERMINATION_GRACE_SECONDS

    def reset(self) -> None:
        self.at = None
        self.event.clear()


TERMINATION = Termination()


class RateCap:
    """Keeps a loop at or under `per_second` items per second on average
    (0: no cap): a light, steady load on the PACS instead of a burst."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.count = 0
        self.started = time.monotonic()

    def passed(self, count: int = 1) -> None:
        """Counts `count` items done, then sleeps while ahead of the cap."""
        self.count += count
        if self.per_second:
            ahead = self.count / self.per_second - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


@dataclass
class RunReport:
    """What one run did; becomes the summary line and the exit code."""

    enqueued: int = 0
    sent: int = 0
    unchanged: int = 0
    failed: int = 0  # refused with a 4xx: marked failed
    undelivered: int = 0  # transport failure or 5xx: left pending
    gone: int = 0  # found deleted from dcm4chee
    deleted: int = 0  # DELETEs acknowledged
    held: int = 0  # left pending by the stability window
    pending: int | None = None  # None: the run never got to count them
    oldest_pending_seconds: int | None = None
    stopped: str | None = None  # why the run stopped early
    last_error: str | None = None  # the last delivery failure, for the summary
    exit_code: int = EXIT_OK
    started: float = field(default_factory=time.monotonic)
    limit: ConcurrencyLimit | None = None  # the sending's, once it started

    def summary(self) -> str:
        extra = "".join(
            f", {name} {count}"
            for name, count in (("held", self.held), ("deleted", self.deleted))
            if count
        )
        if self.limit is not None and self.limit.latency_count:
            extra += f", {self.limit.describe()}"
        return (
            f"enqueued {self.enqueued}, sent {self.sent}, unchanged {self.unchanged},"
            f" failed {self.failed}, still pending {self.pending or 0}{extra},"
            f" {time.monotonic() - self.started:.1f} s"
        )


def _progress_bar(total: int | Callable[[], int], desc: str) -> Any:
    """A tqdm bar on a terminal; a no-op object under cron. `total` may be a
    function, called only when a bar is shown (counting a large archive costs)."""
    if not sys.stderr.isatty():
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    count = total() if callable(total) else total
    if not count:
        return _NoProgress()
    return tqdm(total=count, desc=desc, unit=" studies", file=sys.stderr)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def max_resent_after_crash(concurrency: int = 64) -> int:
    """The README's bound on studies posted twice after a crash (kill -9).

    Acknowledgements are written once ACK_FLUSH_ROWS of them are buffered (or
    every ACK_FLUSH_SECONDS); between two writes the main thread collects at
    most the 3 x concurrency studies that can be queued or in a worker.
    """
    return ACK_FLUSH_ROWS + 3 * concurrency


class _Delivery:
    """The bookkeeping of one sending run: outcomes in, acknowledgements out."""

    def __init__(
        self, pacs: Pacs, settings: Settings, report: RunReport, total: int | Callable[[], int]
    ) -> None:
        self.pacs = pacs
        self.settings = settings
        self.report = report
        self.progress = _progress_bar(total, "sending")
        self.consecutive_failures = 0
        self.outcomes: list[Outcome] = []
        self.unchanged: list[int] = []
        self.last_flush = time.monotonic()

    def settle(self, outcome: Outcome) -> None:
        """Counts one answer and decides whether the run must stop."""
        report, settings = self.report, self.settings
        self.outcomes.append(outcome)
        self.progress.update(1)
        if outcome.delivered:
            self.consecutive_failures = 0
            if outcome.deletion:
                report.deleted += 1
                log.debug("study %d deleted (HTTP %s)", outcome.study_pk, outcome.status_code)
            else:
                report.sent += 1
                log.debug("study %d sent (HTTP %s)", outcome.study_pk, outcome.status_code)
            return
        log.debug("study %d not delivered: %s", outcome.study_pk, outcome.error)
        if outcome.refused_key:
            report.stopped = f"the service refused the API key ({outcome.error})"
            report.exit_code = EXIT_KEY_REFUSED
        elif outcome.wrong_url:
            report.stopped = (
                f"the service answered {outcome.error} at {_safe_url(settings.webservice_url)}:"
                f" check webservice_url in {settings.config_path}"
            )
            report.exit_code = EXIT_DELIVERY
        elif outcome.rejected:
            self.consecutive_failures = 0
            report.failed += 1
            log.warning("study %d refused by the service: %s", outcome.study_pk, outcome.error)
        else:
            self.consecutive_failures += 1
            report.undelivered += 1
            report.last_error = outcome.error
            if self.consecutive_failures >= settings.max_consecutive_failures:
                report.stopped = report.stopped or (
                    f"{self.consecutive_failures} studies in a row could not be delivered,"
                    f" last: {outcome.error}"
                )
                report.exit_code = report.exit_code or EXIT_DELIVERY

    def skip_unchanged(self, study_pk: int) -> None:
        self.unchanged.append(study_pk)
        self.report.unchanged += 1
        self.progress.update(1)

    def flush(self, force: bool = False) -> None:
        """Writes the acknowledgements, in batches: one transaction per batch."""
        due = len(self.outcomes) + len(self.unchanged) >= ACK_FLUSH_ROWS
        if force or due or time.monotonic() - self.last_flush >= ACK_FLUSH_SECONDS:
            self.pacs.record(self.outcomes, self.unchanged)
            self.outcomes.clear()
            self.unchanged.clear()
            self.last_flush = time.monotonic()


def deliver_pending(
    pacs: Pacs,
    sender: Sender | None,
    settings: Settings,
    report: RunReport,
    limit: int | None = None,
    total: int | Callable[[], int] = 0,
    window: StabilityWindow | None = None,
    frontier: Callable[[int], int | None] | None = None,
) -> None:
    """Sends every pending study, recording each answer in study_service.

    Studies still receiving images (the stability `window`) wait for a later
    run. Then, with send_deletes, the studies gone from dcm4chee are DELETEd.

    The main thread reads pages, builds documents and writes acknowledgements
    while `concurrency` worker threads wait on HTTP, so the database work
    overlaps the network. A study is marked sent only after a 2xx; after a
    crash, at most max_resent_after_crash() studies are posted again.
    """
    import queue

    delivery = _Delivery(pacs, settings, report, total)
    concurrency = sender.limit if sender else ConcurrencyLimit(1, 1)
    # Plain queues rather than futures: the per-study overhead is what limits
    # a run on a fast network, and every thread shares one interpreter lock.
    jobs: queue.Queue = queue.Queue(maxsize=concurrency.maximum * 2)
    answers: queue.Queue = queue.Queue()

    stopping = threading.Event()

    def work() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            outcome, body = job
            # Once the run is stopping, studies not yet posted stay pending, untried.
            try:
                tried = not stopping.is_set() and sender.post(outcome, body, stopping.is_set)
            except Exception as exc:  # a bug: keep the traceback, never hang the run
                log.exception("study %d: unexpected error while sending", outcome.study_pk)
                outcome.error = f"internal error: {type(exc).__name__}"
                tried = True
            if outcome.refused_key or outcome.wrong_url:
                # Every other study would get the same answer: the other workers
                # stop at once, not when the main thread gets to this answer.
                stopping.set()
            answers.put(outcome if tried else None)

    # Started as the limit grows: a tick with three studies starts one or two.
    workers: list[threading.Thread] = []

    def add_workers() -> None:
        wanted = min(concurrency.maximum, int(concurrency.limit))
        while len(workers) < wanted:
            worker = threading.Thread(target=work, name=f"sender-{len(workers)}", daemon=True)
            worker.start()
            workers.append(worker)

    report.limit = concurrency
    last_report = time.monotonic()

    def settle_answers(block: bool = False) -> None:
        while True:
            try:
                outcome = answers.get(block=block, timeout=ACK_FLUSH_SECONDS)
            except queue.Empty:
                return
            if outcome is not None:
                delivery.settle(outcome)
                if report.stopped:
                    stopping.set()
            block = False

    def terminated() -> bool:
        if TERMINATION.requested() and not report.stopped:
            report.stopped = "terminated (SIGTERM): no new study taken"
            report.exit_code = EXIT_TERMINATED
            stopping.set()
        return TERMINATION.requested()

    def submit(job: tuple[Outcome, bytes]) -> bool:
        """Hands a study to the workers; False if SIGTERM came while all
        were busy (the study stays pending)."""
        nonlocal last_report
        add_workers()
        if time.monotonic() - last_report >= AUTO_REPORT_SECONDS:
            log.debug("%s, %d in flight", concurrency.describe(), concurrency.in_flight)
            last_report = time.monotonic()
        while True:
            try:
                jobs.put(job, timeout=ACK_FLUSH_SECONDS / 4)
                return True
            except queue.Full:
                settle_answers()
                delivery.flush()
                if terminated():
                    return False

    def bounded_frontier(reached: int) -> int | None:
        # After SIGTERM, stop waiting for the initial load's next page.
        return None if frontier is None or TERMINATION.requested() else frontier(reached)

    submitted = 0
    cap = RateCap(settings.max_studies_per_second)
    try:
        for row in pacs.pending_studies(bounded_frontier if frontier else None):
            if terminated() or report.stopped or (limit is not None and submitted >= limit):
                break
            if pacs.schema.withdrawn(row):
                # Deleted from the PACS (or, on arc-light, rejected) since enqueued.
                pacs.mark_gone([(row["queued_pk"], row["known_iuid"])])
                report.gone += 1
                continue
            if hold_reason(row, pacs.schema, window):
                report.held += 1  # a later run sends it
                continue
            document = pacs.schema.document(row, settings.center)
            body = encode_document(document)
            version = document_version(body)
            if version == row["sent_version"]:
                # Rewritten by dcm4chee, but the document is what the service has.
                delivery.skip_unchanged(row["study_pk"])
            else:
                outcome = Outcome(row["study_pk"], version, row["study_iuid"])
                if not submit((outcome, body)):
                    break
                submitted += 1
                cap.passed()
            settle_answers()
            delivery.flush()
        if report.stopped:
            # Not yet started: they stay pending, untried.
            while not jobs.empty():
                jobs.get_nowait()
                submitted -= 1
        for _ in workers:
            jobs.put(None)
        while any(worker.is_alive() for worker in workers):
            settle_answers(block=True)
            delivery.flush()
            if terminated() and TERMINATION.grace_over():
                # Still waiting on the service: those studies stay pending.
                log.warning("requests still unanswered after SIGTERM: left pending")
                break
        settle_answers()
        if not report.stopped:
            _delete_gone(pacs, sender, delivery)
    finally:
        if any(worker.is_alive() for worker in workers):  # leaving on an exception
            while not jobs.empty():
                jobs.get_nowait()
            for _ in workers:
                jobs.put(None)
            settle_answers()
        delivery.progress.close()
        delivery.flush(force=True)
    if report.exit_code == EXIT_OK and report.undelivered:
        report.exit_code = EXIT_DELIVERY
    if report.exit_code == EXIT_OK and report.failed:
        report.exit_code = EXIT_REJECTED


def print_pending_documents(pacs: Pacs, settings: Settings, out: Any, limit: int | None) -> int:
    """--dry-run: the JSON documents the pending studies would be sent as,
    one per line, and nothing else: no write to the database (a study gone
    from the PACS is only logged), no request, no lock."""
    log.info("dry run: printing the pending studies' documents, sending and writing nothing")
    window = pacs.stability_window()
    printed = 0
    for row in pacs.pending_studies():
        if limit is not None and printed >= limit:
            break
        if pacs.schema.withdrawn(row):
            log.info("dry run: study %d is gone from the PACS (a run marks it)", row["queued_pk"])
            continue
        reason = hold_reason(row, pacs.schema, window)
        if reason:
            log.info("dry run: study %d waits: %s", row["study_pk"], reason)
            continue
        document = pacs.schema.document(row, settings.center)
        out.write(json.dumps(document, ensure_ascii=False) + "\n")
        printed += 1
    return printed


def _delete_gone(pacs: Pacs, sender: Sender | None, delivery: _Delivery) -> None:
    """DELETEs, one at a time: studies leave dcm4chee rarely, and by hand."""
    for row in pacs.deleting_studies():
        outcome = Outcome(row["study_pk"], None, row["study_iuid"], deletion=True)
        if sender is None or not delivery.settings.send_deletes:
            outcome.delivered = True  # send_deletes was turned off meanwhile
        else:
            sender.delete(outcome)
        delivery.settle(outcome)
        delivery.flush()
        if delivery.report.stopped:
            return


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


class _InitialLoad:
    """`initial`'s enqueueing, on a connection and a thread of its own, so
    that the archive is read while the first studies are already being sent,
    and paced by the sending: at most INITIAL_LEAD_PAGES pages ahead of it."""

    def __init__(self, settings: Settings) -> None:
        self.pacs = open_pacs(settings)
        self.position = 0
        self.enqueued = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.stopping = threading.Event()
        self.pages_ahead: collections.deque[int] = collections.deque()  # their last pks
        self.turn = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="initial-load", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            self.enqueued = self.pacs.enqueue_initial(self._advance, self._keep_going)
        except BaseException as exc:  # handed to the main thread by finish()
            self.error = exc
        finally:
            self.done.set()

    def _keep_going(self) -> bool:
        """Waits until the sending is close enough; False once told to stop."""
        with self.turn:
            self.turn.wait_for(
                lambda: self.stopping.is_set() or len(self.pages_ahead) < INITIAL_LEAD_PAGES
            )
            return not self.stopping.is_set()

    def _advance(self, count: int, position: int) -> None:
        with self.turn:
            self.position = position
            self.pages_ahead.append(position)

    def frontier(self, reached: int) -> int | None:
        """Told how far the sending has read: the last pk enqueued, or None
        once everything is (or on failure)."""
        with self.turn:
            while self.pages_ahead and self.pages_ahead[0] <= reached:
                self.pages_ahead.popleft()
                self.turn.notify()
        return None if self.done.is_set() else self.position

    def stop(self) -> None:
        """Stops the enqueueing (if still running) and waits for it."""
        with self.turn:
            self.stopping.set()
            self.turn.notify()
        self.thread.join()
        self.pacs.close()

    def finish(self) -> int:
        """Stops, and raises what the thread met."""
        self.stop()
        if self.error is not None:
            raise self.error
        return self.enqueued


def run_send(
    settings: Settings, command: str, limit: int | None, dry_run: bool, report: RunReport
) -> int:
    """`client.py` (tick), `initial` and `retry-failed`."""
    pacs = open_pacs(settings)
    sender: Sender | None = None
    loader: _InitialLoad | None = None
    try:
        if dry_run:
            print_pending_documents(pacs, settings, sys.stdout, limit)
            return EXIT_OK
        pacs.acquire_run_lock()
        if command == "initial":
            pacs.start_initial()
        if command == "retry-failed":
            log.info("%d failed studies made pending again", pacs.retry_failed())
        # The tick first: its transaction and the initial load's pages would
        # otherwise lock the same rows in different orders.
        report.enqueued += pacs.enqueue_changes()
        state = pacs.initial_state()
        if state is not None and state["status"] == "initial":
            log.info("enqueueing the whole archive (initial load) and sending as it goes")
            loader = _InitialLoad(settings)
            loader.start()
        pending = pacs.count_pending()
        if pending or loader:
            sender = Sender(settings)
            deliver_pending(
                pacs,
                sender,
                settings,
                report,
                limit=limit,
                total=pacs.count_studies if loader else pending,
                window=pacs.stability_window(),
                frontier=loader.frontier if loader else None,
            )
        if loader:
            report.enqueued += loader.finish()
            loader = None
        pending = pacs.count_pending()
        report.pending = pending
        report.oldest_pending_seconds = pacs.oldest_pending_seconds() if pending else None
        if pacs.finish_initial():
            log.info("initial load complete")
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        if loader is not None:  # leaving on an error: stop reading the archive
            loader.stop()
        if sender is not None:
            sender.close()
        pacs.close()
    if report.stopped:
        log.error("run stopped: %s", report.stopped)
    if report.failed:
        log.error(
            "%d studies were refused by the service and marked failed;"
            " see `client.py status`, then `client.py retry-failed`",
            report.failed,
        )
    if report.exit_code == EXIT_DELIVERY and not report.stopped:
        log.error(
            "%d studies could not be delivered and stay pending; last error: %s",
            report.undelivered,
            report.last_error,
        )
    (log.info if report.exit_code == EXIT_OK else log.error)("%s", report.summary())
    return report.exit_code


@dataclass
class ReconcileReport:
    checked: int = 0
    changed: int = 0
    gone: int = 0
    untracked: int = 0
    seconds: float = 0.0
    finished: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.checked / self.seconds if self.seconds else 0.0


def needs_resend(row: Mapping[str, Any], center: str, schema: Dcm4chee2) -> bool:
    """Reconcile's verdict on one study: does the service hold a stale document?"""
    if schema.withdrawn(row) or not schema.settled(row):
        return False  # withdrawn: found by gone_between; unsettled: the tick sends it
    if row["status"] in (DELETED, DELETING):
        return True  # back from the trash: sent again as new
    if row["status"] != SENT:
        return False  # pending goes anyway; failed waits for a change or retry-failed
    document = schema.document(row, center)
    return document_version(encode_document(document)) != row["sent_version"]


def reconcile(pacs: Pacs, settings: Settings, limit: int | None) -> ReconcileReport:
    """Sweeps the archive in pk pages, throttled, enqueueing what the tick
    cannot see: patient edits and merges, deletions, restored studies."""
    report = ReconcileReport()
    position = pacs.reconcile_position()
    if position:
        log.info("resuming reconcile after study pk %d", position)
    rate = settings.reconcile_rows_per_second
    page_size = max(1, min(settings.page_size, rate))
    bar = _progress_bar(pacs.count_studies, "reconciling")
    cap = RateCap(rate)
    try:
        while (limit is None or report.checked < limit) and not TERMINATION.requested():
            size = page_size if limit is None else min(page_size, limit - report.checked)
            page = pacs.reconcile_page(position, size)
            upto = page[-1]["study_pk"] if page else 2**63 - 1
            changed = []
            for row in page:
                if row["status"] is None:
                    report.untracked += 1
                elif needs_resend(row, settings.center, pacs.schema):
                    changed.append(row["study_pk"])
            gone = pacs.gone_between(position, upto)
            pacs.record_reconciled(changed, gone, upto if page else position)
            report.checked += len(page)
            report.changed += len(changed)
            report.gone += len(gone)
            bar.update(len(page))
            if not page:
                report.finished = True
                pacs.finish_reconcile()
                break
            position = upto
            cap.passed(len(page))
    finally:
        bar.close()
        report.seconds = time.monotonic() - cap.started
    return report


def run_reconcile(settings: Settings, limit: int | None) -> int:
    pacs = open_pacs(settings)
    try:
        pacs.acquire_run_lock()
        result = reconcile(pacs, settings, limit)
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        pacs.close()
    log.info(
        "reconcile %s: checked %d studies in %.1f s (%.0f rows/s, cap %d):"
        " %d changed and enqueued, %d gone, %d never sent by this client%s",
        "complete" if result.finished else "paused",
        result.checked,
        result.seconds,
        result.rows_per_second,
        settings.reconcile_rows_per_second,
        result.changed,
        result.gone,
        result.untracked,
        "" if result.finished else "; the next reconcile carries on",
    )
    return EXIT_TERMINATED if TERMINATION.requested() else EXIT_OK


def run_adopt(settings: Settings, old_config: Path) -> int:
    """`adopt --from OLD/config.json`: a center moving to a new archive (from
    dcm4chee 2.x to arc-light, say) keeps its registrations. The old archive's
    studies arrive in the new one with new pks; those its indexer already
    delivered (same Study Instance UID, acknowledged) are recorded as sent
    here without a POST, with the document the new archive gives: the index
    keeps them, and a later change sends them again. Reads only the new
    queue's pending studies, and the old archive by its index on study_iuid.
    Run it before each tick while the migration imports studies (they wait,
    pending, until the new archive has computed their counts)."""
    old_settings = load_settings(old_config, old_config.with_name("server.json"))
    if old_settings.problems:
        raise old_settings.problems[0]
    pacs, old = open_pacs(settings), None
    adopted = checked = 0
    try:
        pacs.acquire_run_lock()
        pacs.enqueue_changes()  # the tick's first step: imported studies become pending
        old = open_pacs(old_settings)
        batch: list[dict[str, Any]] = []

        def adopt(rows: list[dict[str, Any]]) -> int:
            delivered = old.delivered_iuids([_text(row["study_iuid"]) for row in rows])
            outcomes = []
            for row in rows:
                if _text(row["study_iuid"]) in delivered:
                    body = encode_document(pacs.schema.document(row, settings.center))
                    outcome = Outcome(
                        row["study_pk"], document_version(body), _text(row["study_iuid"])
                    )
                    outcome.delivered = True
                    outcomes.append(outcome)
            pacs.record(outcomes, [])
            return len(outcomes)

        for row in pacs.pending_studies():
            if pacs.schema.withdrawn(row) or not pacs.schema.settled(row):
                continue  # counts not computed yet: the next adopt sees it
            checked += 1
            batch.append(row)
            if len(batch) >= settings.page_size:
                adopted += adopt(batch)
                batch = []
        if batch:
            adopted += adopt(batch)
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        pacs.close()
        if old is not None:
            old.close()
    log.info(
        "%d of %d pending studies were already delivered by the indexer of %s: marked sent",
        adopted,
        checked,
        old_settings.db_name,
    )
    return EXIT_OK


def run_status(settings: Settings, as_json: bool) -> int:
    pacs = open_pacs(settings)
    try:
        pacs.check_installed()
        status = pacs.status_report()
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        pacs.close()
    if as_json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    counts = status["counts"]
    lines = [f"study_service in {pacs.where}"]
    for name in (SENT, PENDING, FAILED, DELETING, DELETED):
        lines.append(f"  {name:<8} {counts.get(name, 0):>10,}")
    for reason, count in sorted(status["held"].items()):
        lines.append(f"  held     {count:>10,}  {reason}")
    age = status["oldest_pending_seconds"]
    lines.append("oldest pending: " + ("none" if age is None else _format_age(age)))
    lines.append("last delivery:  " + (status["last_sent_at"] or "never"))
    if status["initial_load"]:
        load = status["initial_load"]
        lines.append(
            f"initial load:   unfinished (started {load['started_at']},"
            f" enqueued up to study pk {load['position_pk']}); run client.py to carry on"
        )
    if status["recent_errors"]:
        lines.append("recent errors:")
        for err in status["recent_errors"]:
            lines.append(
                f"  study {err['study_pk']} ({err['status']},"
                f" {err['attempts']} attempts): {err['error']}"
            )
    print("\n".join(lines))
    return EXIT_OK


def _format_age(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    if seconds < 172800:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def run_check(settings: Settings) -> int:
    """One line per check, every problem found in one run; registers nothing."""
    results: list[tuple[str, str, int]] = []  # (ok/FAILED/skipped, message, exit code)
    problems = list(settings.problems)
    key_problem = settings.key_problem()
    if key_problem is not None:
        problems.append(key_problem)
    results += [("FAILED", f"configuration: {problem}", EXIT_CONFIG) for problem in problems]
    if not problems:
        results.append(
            ("ok", f"configuration: {settings.config_path} and {settings.server_path} are valid", 0)
        )
    fields = {problem.field or "" for problem in problems}
    if any(name.startswith("database") for name in fields):
        results.append(("skipped", f"database: fix 'database' in {settings.config_path} first", 0))
    else:
        results += _check_database(settings)
    if fields & {"webservice_url", "ca_bundle", "key", "key_file"}:
        results.append(("skipped", "webservice: fix the fields above first", 0))
    else:
        sender = Sender(settings)
        try:
            ok, message = sender.probe()
        finally:
            sender.close()
        code = EXIT_KEY_REFUSED if "refused the key" in message else EXIT_DELIVERY
        results.append(("ok" if ok else "FAILED", f"webservice: {message}", code))
    results += [("warning", warning, 0) for warning in settings.warnings]
    for state, message, _ in results:
        print(f"{state:<7} {message}")
    failed = [code for state, _, code in results if state == "FAILED"]
    return failed[0] if failed else EXIT_OK


def _check_database(settings: Settings) -> list[tuple[str, str, int]]:
    try:
        pacs = open_pacs(settings)
    except DatabaseError as exc:
        return [("FAILED", f"database: {exc}", EXIT_DATABASE)]
    results = []
    try:
        version = pacs.server_version()
        results.append(
            (
                "ok",
                f"database: connected to {pacs.where} as {settings.db_user} (server {version})",
                0,
            )
        )
        results.append(("ok", f"schema: {pacs.schema.name}", 0))
        try:
            pacs.check_installed()
            results.append(("ok", "study_service and indexer_process are installed and current", 0))
        except DatabaseError as exc:
            results.append(("FAILED", f"indexer: {exc}", EXIT_DATABASE))
        else:
            problems = pacs.privilege_problems()
            fix = f"; fix: run {pacs.GRANT_SCRIPT} (see README)"
            results += [("FAILED", f"privileges: {p}{fix}", EXIT_DATABASE) for p in problems]
            if not problems:
                results.append(("ok", f"privileges: {settings.db_user} may do what a run does", 0))
        fast, message = pacs.time_index()
        results.append(("ok" if fast else "warning", message, 0))
    except pacs.Error as exc:
        results.append(("FAILED", f"database: {pacs.describe(exc)}", EXIT_DATABASE))
    finally:
        pacs.close()
    return results


# The README's "Códigos de salida", for --help.
EXIT_CODE_HELP = (
    (EXIT_OK, "everything pending was delivered"),
    (EXIT_INTERNAL, "internal error (a bug): one line, -v for the traceback; nothing is lost"),
    (2, "wrong command line"),
    (EXIT_CONFIG, "configuration: a file or field is missing or wrong"),
    (EXIT_DATABASE, "database: unreachable, refused the login, or indexer not installed"),
    (EXIT_DELIVERY, "delivery failed: the service is down or failing; studies stay pending"),
    (EXIT_REJECTED, "the service refused some studies (4xx): marked failed"),
    (EXIT_KEY_REFUSED, "the service refused the API key (401/403)"),
    (EXIT_LOCKED, "another run is working on the same database"),
    (
        EXIT_NO_PYTHON,
        "this Python lacks PyMySQL or requests (or, from the cron script, is too old)",
    ),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); what was acknowledged is recorded"),
    (EXIT_TERMINATED, "terminated (SIGTERM); what was acknowledged is recorded"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Registers the studies of a dcm4chee 2.x or dcm4chee-arc-light 5 PACS"
        " with the central indexer.",
        epilog="exit codes:\n"
        + "".join(f"  {code:<4} {meaning}\n" for code, meaning in EXIT_CODE_HELP),
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "initial", "retry-failed", "reconcile", "status", "check", "adopt"),
        help=(
            "run (default): enqueue new and changed studies and send what is pending;"
            " initial: send the whole archive (resumable); retry-failed: send the refused"
            " studies again; reconcile: find patient edits, merges and deletions (nightly);"
            " status: what is pending, failed, sent; check: test the setup;"
            " adopt --from OLD/config.json: while a center migrates to a new archive, mark"
            " sent the pending studies that the old archive's indexer already delivered"
        ),
    )
    parser.add_argument(
        "--from",
        dest="adopt_from",
        type=Path,
        metavar="CONFIG",
        help="adopt: the old archive's config.json (its server.json beside it)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=HERE / "config.json",
        help="database, webservice_url, key and settings (default: beside client.py)",
    )
    parser.add_argument(
        "--server",
        type=Path,
        default=HERE / "server.json",
        help='the center\'s code, {"server": "000"} (default: beside client.py)',
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the JSON that would be sent; send and change nothing",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="send at most N studies in this run")
    parser.add_argument("--json", action="store_true", help="status: machine-readable output")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="one line per study")
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="print only errors (for cron)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# Prometheus text format, for node_exporter's textfile collector.
METRICS_HELP = {
    "last_run_timestamp_seconds": "When the last sending run ended (Unix time).",
    "last_success_timestamp_seconds": "When a sending run last ended with exit code 0.",
    "last_run_exit_code": "Exit code of the last sending run (see the README).",
    "run_duration_seconds": "How long the last sending run took.",
    "run_studies_sent": "Studies acknowledged by the service in the last run.",
    "run_studies_failed": "Studies refused by the service (4xx) in the last run.",
    "studies_pending": "Studies waiting to be sent after the last run.",
    "oldest_pending_age_seconds": "Age of the oldest study waiting to be sent.",
    "concurrency_limit": "Requests in flight allowed at the end of the last run (auto or fixed).",
    "latency_seconds": "Mean round trip of the last run's requests to the service.",
    "unloaded_latency_seconds": "Lowest round trip seen in the last run: the service unloaded.",
}


def read_metrics(path: Path) -> dict[str, float]:
    """A metrics file's values by name, without the dicom_indexer_ prefix;
    a line that does not parse is skipped. Raises OSError if unreadable."""
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].startswith("dicom_indexer_"):
            try:
                values[parts[0][len("dicom_indexer_") :]] = float(parts[1])
            except ValueError:
                pass
    return values


def write_metrics(path: Path, report: RunReport, exit_code: int) -> None:
    """Writes the run's metrics atomically (temporary file, then rename), as
    the textfile collector requires; a failure to write costs only a warning."""
    try:
        last_success = read_metrics(path).get("last_success_timestamp_seconds")
    except OSError:
        last_success = None
    now = time.time()
    values = {
        "last_run_timestamp_seconds": now,
        "last_success_timestamp_seconds": now if exit_code == EXIT_OK else last_success,
        "last_run_exit_code": exit_code,
        "run_duration_seconds": round(time.monotonic() - report.started, 3),
        "run_studies_sent": report.sent,
        "run_studies_failed": report.failed,
        "studies_pending": report.pending,
        "oldest_pending_age_seconds": report.oldest_pending_seconds or 0
        if report.pending is not None
        else None,
    }
    limit = report.limit
    if limit is not None and limit.latency_count:
        values["concurrency_limit"] = int(limit.limit)
        values["latency_seconds"] = limit.mean_latency()
        values["unloaded_latency_seconds"] = limit.base_latency()
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        lines += [
            f"# HELP dicom_indexer_{key} {METRICS_HELP[key]}",
            f"# TYPE dicom_indexer_{key} gauge",
            f"dicom_indexer_{key} {value:.3f}"
            if isinstance(value, float)
            else f"dicom_indexer_{key} {value}",
        ]
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("cannot write metrics_file %s: %s", path, exc.strerror or exc)


LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
# The API key and the database password, once known: no log line shows them.
_SECRETS: set[str] = set()


def hide_secrets(*secrets: str | None) -> None:
    """From now on, these never appear in a log line or a printed message."""
    _SECRETS.update(secret for secret in secrets if secret)


def redact(text: str) -> str:
    """`text` with every secret blanked out, also as a repr or a URL writes
    it: the last line of defence for text no one wrote for a log (a driver's
    error, a traceback, a service that echoes the key back)."""
    for secret in _SECRETS:
        for form in {secret, repr(secret)[1:-1], urllib.parse.quote(secret, safe="")}:
            if form:
                text = text.replace(form, "***")
    return text


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return redact(super().formatException(ei))


class _LogFileHandler(logging.handlers.RotatingFileHandler):
    """log_file, rotated by the logging library. When it cannot be written
    midway (disk full, permissions changed), one warning on stderr instead of
    logging's traceback for every line; the delivery goes on."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        exc = sys.exc_info()[1]
        reason = getattr(exc, "strerror", None) or exc
        log.warning("cannot write log_file %s: %s; logging to it stops", self.baseFilename, reason)


def _add_log_file(path: Path, verbose: bool) -> None:
    """Also log to a file, rotated by the logging library (10 MB x 5)."""
    try:
        handler = _LogFileHandler(
            path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
    except OSError as exc:
        log.warning("cannot open log_file %s: %s", path, exc.strerror or exc)
        return
    handler.setFormatter(_RedactingFormatter(LOG_FORMAT))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.addHandler(handler)
    # The file keeps the INFO summary even when -q silences the terminal.
    log.setLevel(min(log.level, handler.level))


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(LOG_FORMAT))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for old in log.handlers:
        old.close()
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(handler.level)
    # urllib3 warns on every retry; the run's own summary says what matters.
    logging.getLogger("urllib3").setLevel(logging.WARNING if verbose else logging.ERROR)


# Imported by module name; the README's requirements.txt installs them.
REQUIRED_PACKAGES = {"pymysql": "PyMySQL", "requests": "requests", "urllib3": "urllib3"}


def missing_packages() -> list[str]:
    """The required packages this Python cannot import (found without importing)."""
    import importlib.util

    return [
        name for module, name in REQUIRED_PACKAGES.items() if not importlib.util.find_spec(module)
    ]


def internal_error_line(exc: BaseException) -> str:
    """One line for an error nobody expected: its kind and where it came
    from, never its text (which may hold patient data)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return (
        f"internal error: {type(exc).__name__}{where}; what was acknowledged is recorded;"
        " run again with -v for the traceback and report it"
    )


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_packages()
    if missing:
        # Before logging is set up: this must reach cron's mail whatever -q says.
        print(
            f"client.py: {', '.join(missing)} not installed for {sys.executable}"
            f" (Python {platform.python_version()}); run: {sys.executable} -m pip install"
            f" -r {HERE / 'requirements.txt'}",
            file=sys.stderr,
        )
        return EXIT_NO_PYTHON
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be at least 1")
    if (args.command == "adopt") != (args.adopt_from is not None):
        parser.error("adopt needs --from OLD/config.json, and only adopt takes it")
    _setup_logging(args.verbose, args.quiet)
    try:
        return run_command(args)
    except Exception as exc:  # a bug outside a command (its own handler writes metrics)
        log.debug("internal error", exc_info=True)
        log.error("%s", internal_error_line(exc))
        return EXIT_INTERNAL


def run_command(args: argparse.Namespace) -> int:
    """Loads the settings, runs the command, writes the metrics: main()
    after the command line is parsed and logging set up."""
    try:
        settings = load_settings(args.config, args.server)
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    hide_secrets(settings.key, settings.db_password)
    sending = args.command in ("run", "initial", "retry-failed") and not args.dry_run
    if args.command != "check":  # check lists every problem and warning itself
        problems = list(settings.problems)
        key_problem = settings.key_problem() if sending else None
        if key_problem is not None:
            problems.append(key_problem)
        if problems:
            more = len(problems) - 1
            log.error("%s%s", problems[0], f" ({more} more: see client.py check)" if more else "")
            return EXIT_CONFIG
    if settings.log_file:
        _add_log_file(settings.log_file, args.verbose)
    if args.command != "check":
        # Under cron (-q) too: a secret readable by every user of the PACS
        # server, or sent in clear, is worth a mail until it is fixed.
        for warning in settings.warnings:
            log.warning("%s", warning)
    report = RunReport()
    if (sending or args.command == "reconcile") and hasattr(os, "nice"):
        # On the PACS server, the PACS and its database come first: when the
        # CPU is short, the scheduler serves them before the indexer.
        current = os.nice(0)
        if current < settings.nice:
            os.nice(settings.nice - current)
    exit_code = EXIT_OK
    # Python takes signals in the main thread only (tests call main() elsewhere).
    handles_sigterm = (sending or args.command == "reconcile") and (
        threading.current_thread() is threading.main_thread()
    )
    if handles_sigterm:
        previous_handler = signal.signal(signal.SIGTERM, TERMINATION.request)
    try:
        if args.command == "status":
            exit_code = run_status(settings, args.json)
        elif args.command == "check":
            exit_code = run_check(settings)
        elif args.command == "reconcile":
            exit_code = run_reconcile(settings, args.limit)
        elif args.command == "adopt":
            exit_code = run_adopt(settings, args.adopt_from)
        else:
            exit_code = run_send(settings, args.command, args.limit, args.dry_run, report)
    except LockedError as exc:
        # Standing aside is routine (cron while a long initial runs): INFO,
        # so that -q keeps cron quiet, and no metrics: the other run writes them.
        log.info("%s", exc)
        return exc.exit_code
    except IndexerError as exc:
        log.error("%s", exc)
        exit_code = exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; what was acknowledged is recorded, the rest stays pending")
        exit_code = EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for cron, the traceback with -v
        log.debug("internal error", exc_info=True)
        log.error("%s", internal_error_line(exc))
        exit_code = EXIT_INTERNAL
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous_handler)
        TERMINATION.reset()
    if sending and settings.metrics_file:
        write_metrics(settings.metrics_file, report, exit_code)
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
