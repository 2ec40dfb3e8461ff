#!/usr/bin/env python3
"""DICOM Indexer client: registers the studies of a PACS with a central
indexer webservice, one JSON document per study, sent once and again
whenever the study changes.

The path from source to service, in file order:
  configuration  config.json / server.json -> Settings, checked once, at load
  engines        MySQL/MariaDB and PostgreSQL: small adapters, one table
                 (ENGINES), each importing its driver when it connects
  source         what a PACS holds and how it changes: dcm4chee 2.x and
                 dcm4chee-arc-light 5 (Dcm4chee2, ArcLight5), read through an
                 engine (PacsSource); Orthanc, through its REST API and its
                 change log (OrthancSource); how a tick finds what changed
  queue          study_service's bookkeeping (StudyServiceQueue): what is
                 pending, sent, failed, deleted, with which versions
  document       study_document(): one study's fields -> the 11-key JSON (pure)
  delivery       Sender (HTTP with deadlines), SendPool (worker threads),
                 StudyFates (what an answer means for a study and for the
                 run), deliver() and studies_to_send(): one run's sending
  commands       run_*() and main(): they only translate
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import heapq
import ipaddress
import itertools
import json
import logging
import logging.handlers
import os
import platform
import queue
import random
import re
import signal
import stat
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

__version__ = "2.3.0"

log = logging.getLogger("dicom_indexer")

HERE = Path(__file__).resolve().parent

# Exit codes, documented in the README ("Códigos de salida") and in --help
# (EXIT_CODE_HELP, tested against the README).
EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected error (a bug): one line; -v shows the traceback
EXIT_USAGE = 2  # argparse's own
EXIT_CONFIG = 3  # a configuration file is missing or wrong
EXIT_DATABASE = 4  # the database is unreachable, refused us, or is not installed
EXIT_DELIVERY = 5  # the service is down or failing: studies left pending
EXIT_REJECTED = 6  # the service refused studies (4xx)
EXIT_KEY_REFUSED = 7  # the service refused the API key
EXIT_LOCKED = 8  # another run holds the lock on this database
EXIT_NO_PYTHON = 9  # this Python lacks the packages (extras/dicom_indexer.sh: or is too old)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (systemd stop, kill): what was acknowledged is recorded

EXIT_CODE_HELP = (
    (EXIT_OK, "everything pending was delivered"),
    (EXIT_INTERNAL, "internal error (a bug): one line, -v for the traceback; nothing is lost"),
    (EXIT_USAGE, "wrong command line"),
    (EXIT_CONFIG, "configuration: a file or field is missing or wrong"),
    (EXIT_DATABASE, "database: unreachable, refused the login, or indexer not installed"),
    (EXIT_DELIVERY, "delivery failed: the service is down or failing; studies stay pending"),
    (EXIT_REJECTED, "the service refused studies (4xx): marked failed, or pending if it"
     " refused every one"),
    (EXIT_KEY_REFUSED, "the service refused the API key (401, or 403 for every study)"),
    (EXIT_LOCKED, "another run is working on the same database"),
    (EXIT_NO_PYTHON, "this Python lacks PyMySQL or requests (or, from cron, is too old)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); what was acknowledged is recorded"),
    (EXIT_TERMINATED, "terminated (SIGTERM); what was acknowledged is recorded"),
)  # fmt: skip

ENV_DB_PASSWORD = "DICOM_INDEXER_DB_PASSWORD"
ENV_KEY = "DICOM_INDEXER_KEY"
ENV_ORTHANC_PASSWORD = "DICOM_INDEXER_ORTHANC_PASSWORD"
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

    exit_code = EXIT_INTERNAL


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
    """Everything a run needs, from config.json and server.json; the
    defaults are load_settings()'s.

    The two files keep the original client's shapes, which every site already
    has: config.json holds "database" (the connection), "key" and
    "webservice_url", and beside them this client's optional settings;
    server.json holds "server", the center's code, sent as "center".
    """

    source: str  # "dcm4chee" (a database: "database") or "orthanc" (REST: "orthanc")
    db_engine: str  # a key of ENGINES; "sqlite" for an Orthanc site's queue
    db_host: str
    db_port: int
    db_user: str
    db_password: str = field(repr=False)
    db_name: str
    db_unix_socket: str | None
    webservice_url: str
    key: str = field(repr=False)
    key_source: str  # where the key came from, for messages: never the key itself
    orthanc_url: str
    orthanc_user: str
    orthanc_password: str = field(repr=False)
    orthanc_ca_bundle: str | None
    queue_file: Path  # Orthanc: the queue's SQLite file
    center: str
    config_path: Path
    server_path: Path
    page_size: int
    concurrency: int | None  # None: "auto", adapted between 1 and max_concurrency
    max_concurrency: int
    connect_timeout_seconds: float
    read_timeout_seconds: float
    max_retries: int
    backoff_seconds: float
    max_consecutive_failures: int
    ca_bundle: str | None
    send_deletes: bool
    stable_age_seconds: int
    reconcile_rows_per_second: int
    max_studies_per_second: int  # 0: no cap
    query_view: str  # arc-light: the view whose counts are sent
    metrics_file: Path | None
    log_file: Path | None
    nice: int
    warnings: tuple[str, ...] = ()  # found while loading; logged once per run
    # Wrong or missing fields, each one line naming file and field. `check`
    # lists them all; every other command stops at the first (exit 3).
    problems: tuple[ConfigError, ...] = ()

    @property
    def request_deadline_seconds(self) -> float:
        """How long one request may take, connecting, sending and reading
        the whole answer: a service that trickles its answer cannot hold a
        run past it."""
        return self.connect_timeout_seconds + self.read_timeout_seconds

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
QUERY_VIEW_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _read_json_object(path: Path, when_missing: str = "") -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found{when_missing}") from None
    except PermissionError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror} ({_whose(path)})") from None
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
        raise ConfigError(f"{path}: invalid JSON at {_json_mistake(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object {{...}}")
    return data


def _json_mistake(exc: json.JSONDecodeError) -> str:
    """Where a JSON file went wrong, and the likely mistake, in the words of
    someone editing it by hand: json names the place after a mistake (the
    line after a trailing comma), so the mistake's own line is named."""
    text = exc.doc
    before = text[: exc.pos].rstrip()
    line = text.count("\n", 0, len(before)) + 1
    column = len(before) - (before.rfind("\n") + 1)
    if exc.pos >= len(text.rstrip()):
        return f"line {line}: the file ends too early (a missing }} or ]?)"
    if before.endswith(",") and text[exc.pos] in "}]":
        return (
            f"line {line} column {column}: a comma after the last field of an object or"
            " list (not allowed in JSON)"
        )
    if exc.msg.startswith("Expecting ',' delimiter"):
        return f"line {line}: a missing comma at its end, or a missing quote ({exc.msg})"
    found = f"line {exc.lineno} column {exc.colno}"
    if exc.msg.startswith("Invalid control character"):
        return f"{found}: a text not closed (a missing quote?)"
    if exc.msg.startswith("Expecting property name"):
        return f"{found}: a field name not in double quotes (a missing quote?)"
    return f"{found}: {exc.msg}"


def _whose(path: Path) -> str:
    """Who this runs as, and who the file belongs to: cron or systemd as one
    user, the files installed (with sudo) as another."""
    try:
        import pwd  # Unix only

        user = pwd.getpwuid(os.geteuid()).pw_name
        info = os.stat(path)
        owner = pwd.getpwuid(info.st_uid).pw_name
        mode = info.st_mode & 0o777
        return f"this runs as user '{user}'; the file belongs to '{owner}', mode {mode:04o}"
    except (ImportError, KeyError, OSError):
        return "this user may not read it"


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

    def problem(self, name: str, problem: str, separator: str = " ") -> None:
        """Records that field `name` is wrong: "FILE: field 'NAME' PROBLEM"."""
        full = self.prefix + name
        self.problems.append(
            ConfigError(f"{self.path}: field '{full}'{separator}{problem}", field=full)
        )

    def _value(self, name: str, default: Any) -> Any:
        self.read.add(name)
        value = self.data.get(name, default)
        if value is _MISSING:
            self.problem(name, "is missing")
        return value

    def section(self, name: str) -> _Fields:
        """A nested object, such as "database"."""
        value = self._value(name, _MISSING)
        if value is not _MISSING and not isinstance(value, dict):
            self.problem(name, "must be a JSON object {...}")
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
            self.problem(name, "must be a string")
            return "" if default in (_MISSING, None) else default
        if not value.strip() and not allow_empty:
            self.problem(name, "is empty")
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
            self.problem(name, 'must be a string, such as "000"')
            return ""
        if not value.strip():
            self.problem(name, "is empty: set it to the center's code")
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
            self.problem(name, f"names {path}, which is not UTF-8 text")
            return None
        except OSError as exc:
            self.problem(name, f"cannot be read: {exc.strerror or exc}")
            return None
        return lines[0].strip() if lines else ""

    def file_path(self, name: str) -> Path | None:
        value = self.text(name, default=None)
        return Path(value) if value else None

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._value(name, default)
        if value not in choices:
            self.problem(name, "must be " + " or ".join(f'"{c}"' for c in choices))
            return default
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self._value(name, default)
        if not isinstance(value, bool):
            self.problem(name, "must be true or false")
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
            self.problem(name, f"must be a number from {minimum:g} to {maximum:g}")
            return minimum if default is _MISSING else default
        if not minimum <= value <= maximum:
            self.problem(name, f"must be from {minimum:g} to {maximum:g}, not {value}")
            return minimum if default is _MISSING else default
        return value

    def query_view(self, name: str, default: str) -> str:
        """An arc-light query/retrieve view ID: written into SQL, so letters,
        digits, '_', '.' and '-' only."""
        value = self._value(name, default)
        if not isinstance(value, str) or not QUERY_VIEW_RE.match(value):
            self.problem(name, 'must be a query/retrieve view ID such as "hideRejected"')
            return default
        return value

    def number_or_auto(self, name: str, minimum: int, maximum: int) -> int | None:
        """A whole number, or "auto" (the default): None."""
        if self._value(name, "auto") == "auto":
            return None
        value = self._value(name, None)
        if isinstance(value, str) and not value.strip().isdigit():
            self.problem(name, f'must be "auto" or a number from {minimum} to {maximum}')
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
    server = _Fields(
        server_path,
        _read_json_object(server_path, ': create it with {"server": "<center code>"}'),
        problems,
    )
    top.ignore("server")  # the original's placeholder: "see server.json"
    if "orthanc" in top.data:
        # An Orthanc site: its REST API, and the queue in a file of its own.
        if "database" in top.data:
            top.problem("orthanc", "and 'database' are both set: keep the one this site's PACS is")
        db = _Fields(config_path, {}, [], "database.")
        orthanc = top.section("orthanc")
        source = _orthanc_fields(orthanc, top, config_path)
    else:
        db = top.section("database")
        orthanc = _Fields(config_path, {}, [], "orthanc.")
        source = {**_connection_fields(db), **_NO_ORTHANC}
    settings = Settings(
        **source,
        **_service_fields(top),
        **_tuning_fields(top),
        center=server.code("server"),
        config_path=config_path,
        server_path=server_path,
    )
    warnings = [
        f"{fields.path}: unknown field '{name}' ignored (misspelt?)"
        for fields in (top, db, orthanc, server)
        for name in fields.unknown()
    ]
    warnings += _exposure_warnings(settings, db, top)
    return dataclasses.replace(settings, warnings=tuple(warnings), problems=tuple(problems))


def _connection_fields(db: _Fields) -> dict[str, Any]:
    """ "database": where the PACS's database is and how to log in."""
    engine = db.choice("engine", default="mysql", choices=tuple(ENGINES))
    # Secrets: the environment, then a file of their own, then config.json;
    # surrounding whitespace (a pasted newline) is never part of one.
    password, _ = _secret(db, "password", "password_file", ENV_DB_PASSWORD)
    return {
        "source": "dcm4chee",
        "db_engine": engine,
        "db_host": db.text("host", default="localhost"),
        "db_port": db.number(
            "port", default=ENGINES[engine].default_port, minimum=1, maximum=65535
        ),
        "db_user": db.text("user"),
        "db_password": password,
        "db_name": db.text("name"),
        "db_unix_socket": db.text("unix_socket", default=None),
    }


_NO_ORTHANC: dict[str, Any] = {
    "orthanc_url": "",
    "orthanc_user": "",
    "orthanc_password": "",
    "orthanc_ca_bundle": None,
    "queue_file": Path(QUEUE_FILE_NAME),
}


def _orthanc_fields(orthanc: _Fields, top: _Fields, config_path: Path) -> dict[str, Any]:
    """ "orthanc": its REST API's address and credentials; and where the queue is."""
    url = orthanc.text("url", default="http://127.0.0.1:8042").rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        orthanc.problem("url", "must start with http:// or https://")
    password, _ = _secret(orthanc, "password", "password_file", ENV_ORTHANC_PASSWORD)
    ca_bundle = orthanc.text("ca_bundle", default=None)
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        orthanc.problem("ca_bundle", f"file not found: {ca_bundle}", separator=": ")
    queue_file = top.file_path("queue_file") or config_path.resolve().with_name(QUEUE_FILE_NAME)
    return {
        "source": "orthanc",
        "db_engine": "sqlite",
        "db_host": "",
        "db_port": 0,
        "db_user": "",
        "db_password": "",
        "db_name": str(queue_file),
        "db_unix_socket": None,
        "orthanc_url": url,
        "orthanc_user": orthanc.text("user", default="", allow_empty=True) or "",
        "orthanc_password": password,
        "orthanc_ca_bundle": ca_bundle,
        "queue_file": queue_file,
    }


def _service_fields(top: _Fields) -> dict[str, Any]:
    """The central service: where, with which key, trusting which CA."""
    key, key_source = _secret(top, "key", "key_file", ENV_KEY)
    url = top.text("webservice_url")
    if url and not url.startswith(("http://", "https://")):
        top.problem("webservice_url", "must start with http:// or https://")
    ca_bundle = top.text("ca_bundle", default=None)
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        top.problem("ca_bundle", f"file not found: {ca_bundle}", separator=": ")
    return {"webservice_url": url, "key": key, "key_source": key_source, "ca_bundle": ca_bundle}


def _tuning_fields(top: _Fields) -> dict[str, Any]:
    """This client's optional settings, each with its default and range."""
    return {
        "page_size": top.number("page_size", default=1000, minimum=1, maximum=100000),
        "concurrency": top.number_or_auto("concurrency", minimum=1, maximum=64),
        "max_concurrency": top.number("max_concurrency", default=64, minimum=1, maximum=256),
        "connect_timeout_seconds": top.number(
            "connect_timeout_seconds", default=5, minimum=0.1, maximum=300, integer=False
        ),
        "read_timeout_seconds": top.number(
            "read_timeout_seconds", default=30, minimum=0.1, maximum=3600, integer=False
        ),
        "max_retries": top.number("max_retries", default=3, minimum=0, maximum=20),
        "backoff_seconds": top.number(
            "backoff_seconds", default=1, minimum=0, maximum=60, integer=False
        ),
        "max_consecutive_failures": top.number(
            "max_consecutive_failures", default=5, minimum=1, maximum=100000
        ),
        "send_deletes": top.flag("send_deletes", default=False),
        "stable_age_seconds": top.number("stable_age_seconds", default=0, minimum=0, maximum=86400),
        "reconcile_rows_per_second": top.number(
            "reconcile_rows_per_second", default=2000, minimum=1, maximum=1000000
        ),
        "max_studies_per_second": top.number(
            "max_studies_per_second", default=0, minimum=0, maximum=1000000
        ),
        "nice": top.number("nice", default=10, minimum=0, maximum=19),
        "query_view": top.query_view("query_view", default="hideRejected"),
        "metrics_file": top.file_path("metrics_file"),
        "log_file": top.file_path("log_file"),
    }


def _exposure_warnings(settings: Settings, db: _Fields, top: _Fields) -> list[str]:
    """Setups that expose a secret: a config.json others can read, a key
    sent in clear to another host."""
    warnings = []
    config_path, url = settings.config_path, settings.webservice_url
    orthanc = top.data.get("orthanc")
    secrets = [
        secret
        for secret, present in (
            ("database password", db.data.get("password")),
            ("Orthanc password", isinstance(orthanc, dict) and orthanc.get("password")),
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
    return warnings


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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.driver = _import_pymysql()
        self.Error: tuple[type[BaseException], ...] = (self.driver.MySQLError,)
        self.conn: Any = None
        self.socket = settings.db_unix_socket
        local = settings.db_host == "localhost" and settings.db_port == self.default_port
        if self.socket is None and local:
            self.socket = _local_mysql_socket()
        # How the connection goes, for `check` and the error lines.
        if self.socket:
            self.route = f"through the local socket {self.socket}"
        elif local:
            self.route = (
                f"on localhost:{settings.db_port} over TCP (no MySQL socket in"
                f" {', '.join(MYSQL_SOCKETS)}; database.unix_socket names another)"
            )
        else:
            self.route = f"on {settings.db_host}:{settings.db_port}"

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
        host = seen.group(1) if seen else self.settings.db_host
        hint = (
            f"; the server saw this connection come from '{host}': an account created"
            " for 'localhost' matches only its local socket, so create it for"
            f" '{host}' too (SET @indexer_host = '{host}' before {GRANT_SCRIPT_MYSQL})"
        )
        socket = _local_mysql_socket()
        if socket and self.settings.db_host in LOOPBACK_HOSTS:
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
        settings = self.settings
        return self.driver.connect(
            host=settings.db_host,
            port=settings.db_port,
            user=settings.db_user,
            password=settings.db_password,
            database=settings.db_name,
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
            cur.execute(sql, args)
            return list(cur.fetchall())

    def rowcount(self, sql: str, args: Any = None) -> int:
        with self.conn.cursor() as cur:
            return int(cur.execute(sql, args))

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
    args = getattr(exc, "args", ())
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        if settings.db_unix_socket:
            self.route = f"through the local socket {settings.db_unix_socket}"
        else:
            self.route = f"on {settings.db_host}:{settings.db_port}"

    def connect(self) -> None:
        settings = self.settings
        self.conn = self.driver.connect(
            user=settings.db_user,
            password=settings.db_password or None,
            host=settings.db_host if not settings.db_unix_socket else None,
            port=settings.db_port,
            database=settings.db_name,
            unix_sock=settings.db_unix_socket,
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


def rewritten(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced by `new`, where one statement is another's
    with one part changed; fails loudly (at import) if `old` is not there,
    so that the two cannot drift apart silently."""
    if old not in text:
        raise AssertionError(f"rewritten(): {old!r} is not in {text[:60]!r}...")
    return text.replace(old, new)


# --------------------------------------------------------------------------
# Source: what a PACS holds and how it changes
#
# dcm4chee 2.x keeps a study's fields in study and patient; dcm4chee-arc-light
# 5 spreads them over study, patient, patient_id, person_name and
# study_query_attrs (a cache of counts). A schema class (Dcm4chee2,
# ArcLight5) knows where they live and turns its rows into the fields of the
# document; its statements, one class per engine, are written out in full.
# PacsSource reads them; how a tick finds what changed is indexer_process,
# installed by the schema's script. The queue's own table, study_service,
# lives in the same database, so the statements that list pending studies
# join it: one read gives a study's queue state and its fields.
# --------------------------------------------------------------------------

# What SCHEMA_COLUMNS looks for in information_schema: enough to tell 2.x
# from arc-light, and arc-light's generations apart.
SCHEMA_PROBES = (
    ("study", "num_instances"),  # dcm4chee 2.x: the counts are columns of study
    ("study_query_attrs", "view_id"),  # arc-light 5
    ("person_name", "alphabetic_name"),  # arc-light 5.23 and later
    ("patient_id", "patient_fk"),  # arc-light 5.31 and later: 1..n IDs per patient
)
# SCHEMA_PROBES as the list of an SQL `(table, column) IN (...)`, the same on both engines.
SCHEMA_PROBE_PAIRS = ", ".join(f"('{table}', '{column}')" for table, column in SCHEMA_PROBES)
# Without dcm4chee's study_updated index, indexer_process re-reads this many
# of the newest studies on each call (recent_rows in the install scripts).
RECENT_ROWS_WITHOUT_TIME_INDEX = 5000


# How the statements that list pending studies end, whatever their schema:
# those not tried since enqueued, a page at a time in pk order up to a bound
# (how far the initial load has enqueued); and those that failed before,
# whose next attempt is due (NULL: at the next run, after the new ones).
NEW_PENDING = (
    " WHERE q.status = 'pending' AND q.attempts = 0 AND q.study_pk > %s AND q.study_pk <= %s"
    " ORDER BY q.study_pk LIMIT %s"
)
DUE_PENDING_MYSQL = (
    " WHERE q.status = 'pending' AND q.attempts > 0"
    " AND (q.next_attempt_at IS NULL OR q.next_attempt_at <= NOW(6))"
    " AND q.study_pk > %s ORDER BY q.study_pk LIMIT %s"
)
# PostgreSQL has no index hints: the pending range is written as a range of
# study_service_status itself, (status, study_pk) from ('pending', after) to
# ('pending', bound), ordered as that index is. No other index can serve that
# condition or that order, so the planner cannot walk the primary key through
# every sent study instead, whatever its statistics say (with a separate
# status = 'pending', the primary key's order would serve as well).
NEW_PENDING_POSTGRESQL = (
    " WHERE (q.status, q.study_pk) > ('pending', %s) AND (q.status, q.study_pk) <= ('pending', %s)"
    " AND q.attempts = 0 ORDER BY q.status, q.study_pk LIMIT %s"
)
DUE_PENDING_POSTGRESQL = (
    " WHERE (q.status, q.study_pk) > ('pending', %s)"
    f" AND (q.status, q.study_pk) <= ('pending', {MAX_PK}) AND q.attempts > 0"
    " AND (q.next_attempt_at IS NULL OR q.next_attempt_at <= LOCALTIMESTAMP)"
    " ORDER BY q.status, q.study_pk LIMIT %s"
)


class Dcm4chee2MySQL:
    """dcm4chee 2.x on MySQL/MariaDB (extras/add_indexer.sql)."""

    # What a study row contributes to its document, plus updated_time: the
    # version indexer_process records, so that a study enqueued by
    # `initial` is not enqueued again by the next tick. The install script
    # writes the same expression (tests/test_install.py checks they agree).
    STUDY_ROW_VERSION = (
        "UNHEX(MD5(CONCAT_WS('|', s.updated_time, s.num_series, s.num_instances,"
        " IFNULL(s.mods_in_study, ''), IFNULL(s.patient_fk, ''), s.study_iuid,"
        " IFNULL(s.study_datetime, ''), IFNULL(s.study_desc, ''))))"
    )
    INDEXER_PROCESS = "CALL indexer_process()"
    COUNT_STUDIES = "SELECT COUNT(*) AS n FROM study"
    # One page of the archive, by primary key: a plain read, so it takes no
    # lock that dcm4chee's writes would wait for.
    SELECT_STUDY_PAGE = (
        "SELECT s.pk, s.updated_time, " + STUDY_ROW_VERSION + " AS row_version, s.study_iuid"
        " FROM study s WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    # A study's fields, as the document needs them.
    STUDY_COLUMNS = (
        " s.pk AS study_pk, s.study_iuid, s.study_datetime, s.study_desc, s.updated_time,"
        " s.mods_in_study, s.num_series, s.num_instances,"
        " p.pk AS patient_pk, p.pat_id, p.pat_name"
    )
    QUEUE_COLUMNS = (
        "SELECT q.study_pk AS queued_pk, q.sent_version, q.study_iuid AS known_iuid,"
        " q.enqueued_at AS queued_at, q.attempts,"
    )
    # LEFT JOINs: a study gone from dcm4chee comes back with s.pk NULL; one
    # whose patient row is missing, with p.* NULL. The index is forced:
    # ordered by pk, the optimizer may otherwise walk the primary key through
    # every sent study to find the few pending.
    PENDING_FROM = (
        " FROM study_service q FORCE INDEX (study_service_status)"
        " LEFT JOIN study s ON s.pk = q.study_pk"
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
    )
    SELECT_NEW_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + NEW_PENDING
    SELECT_DUE_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + DUE_PENDING_MYSQL
    # reconcile: a page of the archive with what the service acknowledged
    # for each; then the queue rows of that pk range whose study is gone.
    SELECT_RECONCILE_PAGE = (
        "SELECT" + STUDY_COLUMNS + ", q.status, q.sent_version"
        " FROM study s"
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
        " LEFT JOIN study_service q ON q.study_pk = s.pk"
        " WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    SELECT_GONE_IN_RANGE = (
        "SELECT q.study_pk, q.study_iuid FROM study_service q"
        " LEFT JOIN study s ON s.pk = q.study_pk"
        " WHERE q.study_pk > %s AND q.study_pk <= %s"
        " AND q.status IN ('pending', 'sent', 'failed') AND s.pk IS NULL"
    )
    # adopt: which of these UIDs this indexer delivered, through the
    # archive's unique index on study_iuid (one placeholder per UID).
    SELECT_DELIVERED_IUIDS = (
        "SELECT s.study_iuid FROM study s JOIN study_service q ON q.study_pk = s.pk"
        " WHERE q.status = 'sent' AND s.study_iuid IN ({placeholders})"
    )
    # Indexes of study whose first column is updated_time.
    TIME_INDEXES = (
        "SELECT INDEX_NAME AS name FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study'"
        " AND SEQ_IN_INDEX = 1 AND COLUMN_NAME = 'updated_time'"
    )
    # What a tick costs without the index: the newest studies, re-read.
    READ_RECENT_STUDIES = (
        "SELECT COUNT(DISTINCT " + STUDY_ROW_VERSION + ") AS n FROM study s"
        " WHERE s.pk > (SELECT COALESCE(MAX(pk), 0) FROM study) - %s"
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


class Dcm4chee2PostgreSQL:
    """dcm4chee 2.x on PostgreSQL (extras/add_indexer_postgresql.sql)."""

    # Timestamps are formatted explicitly: concat_ws would follow the
    # session's DateStyle.
    STUDY_ROW_VERSION = (
        "decode(md5(concat_ws('|', to_char(s.updated_time, 'YYYY-MM-DD HH24:MI:SS.US'),"
        " s.num_series, s.num_instances, COALESCE(s.mods_in_study, ''),"
        " COALESCE(s.patient_fk::text, ''), s.study_iuid,"
        " COALESCE(to_char(s.study_datetime, 'YYYY-MM-DD HH24:MI:SS.US'), ''),"
        " COALESCE(s.study_desc, ''))), 'hex')"
    )
    INDEXER_PROCESS = "SELECT indexer_process() AS enqueued"
    COUNT_STUDIES = "SELECT COUNT(*) AS n FROM study"
    SELECT_STUDY_PAGE = (
        "SELECT s.pk, s.updated_time, " + STUDY_ROW_VERSION + " AS row_version, s.study_iuid"
        " FROM study s WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    STUDY_COLUMNS = Dcm4chee2MySQL.STUDY_COLUMNS
    QUEUE_COLUMNS = Dcm4chee2MySQL.QUEUE_COLUMNS
    # No index hints: the planner takes study_service_status for the
    # pending range by itself (tests/test_install.py checks the plan).
    PENDING_FROM = (
        " FROM study_service q"
        " LEFT JOIN study s ON s.pk = q.study_pk"
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
    )
    SELECT_NEW_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + NEW_PENDING_POSTGRESQL
    SELECT_DUE_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + DUE_PENDING_POSTGRESQL
    SELECT_RECONCILE_PAGE = Dcm4chee2MySQL.SELECT_RECONCILE_PAGE
    SELECT_GONE_IN_RANGE = Dcm4chee2MySQL.SELECT_GONE_IN_RANGE
    SELECT_DELIVERED_IUIDS = (
        "SELECT s.study_iuid FROM study s JOIN study_service q ON q.study_pk = s.pk"
        " WHERE q.status = 'sent' AND s.study_iuid = ANY(%s::text[])"
    )
    TIME_INDEXES = (
        "SELECT c.relname AS name FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = 'study'::regclass AND a.attname = 'updated_time'"
    )
    READ_RECENT_STUDIES = (
        "SELECT COUNT(DISTINCT " + STUDY_ROW_VERSION + ") AS n FROM study s"
        " WHERE s.pk > (SELECT COALESCE(MAX(pk), 0) FROM study) - %s"
    )
    PRIVILEGE_PROBES = Dcm4chee2MySQL.PRIVILEGE_PROBES


class ArcLight5MySQL:
    """dcm4chee-arc-light 5.31 and later on MySQL/MariaDB
    (extras/add_indexer_arclight5_mysql.sql)."""

    STUDY_ROW_VERSION = (
        "UNHEX(MD5(CONCAT_WS('|', DATE_FORMAT(s.updated_time, '%%Y-%%m-%%d %%H:%%i:%%s.%%f'),"
        " IFNULL(s.version, ''), s.patient_fk, s.study_iuid, s.study_date,"
        " s.study_time, s.study_desc, s.rejection_state)))"
    )
    INDEXER_PROCESS = "CALL indexer_process()"
    COUNT_STUDIES = "SELECT COUNT(*) AS n FROM study"
    SELECT_STUDY_PAGE = (
        "SELECT s.pk, s.updated_time, " + STUDY_ROW_VERSION + " AS row_version, s.study_iuid"
        " FROM study s WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    # The patient's primary ID: its first patient_id row (5.31 and later).
    PATIENT_ID = (
        "(SELECT i.pat_id FROM patient_id i WHERE i.patient_fk = p.pk ORDER BY i.pk LIMIT 1)"
    )
    STUDY_COLUMNS = (
        " s.pk AS study_pk, s.study_iuid, s.study_date, s.study_time, s.study_desc,"
        " s.updated_time, s.study_size, s.rejection_state,"
        " a.pk AS counts_pk, a.mods_in_study, a.num_series, a.num_instances,"
        " p.pk AS patient_pk, " + PATIENT_ID + " AS pat_id, n.alphabetic_name AS pat_name"
    )
    # The counts of the query/retrieve view (a bound parameter, first).
    STUDY_JOINS = (
        " LEFT JOIN study_query_attrs a ON a.study_fk = s.pk AND a.view_id = %s"
        " LEFT JOIN patient p ON p.pk = s.patient_fk"
        " LEFT JOIN person_name n ON n.pk = p.pat_name_fk"
    )
    QUEUE_COLUMNS = Dcm4chee2MySQL.QUEUE_COLUMNS
    PENDING_FROM = (
        " FROM study_service q FORCE INDEX (study_service_status)"
        " LEFT JOIN study s ON s.pk = q.study_pk" + STUDY_JOINS
    )
    SELECT_NEW_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + NEW_PENDING
    SELECT_DUE_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + DUE_PENDING_MYSQL
    SELECT_RECONCILE_PAGE = (
        "SELECT" + STUDY_COLUMNS + ", q.status, q.sent_version"
        " FROM study s" + STUDY_JOINS + " LEFT JOIN study_service q ON q.study_pk = s.pk"
        " WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    # A completely rejected study is withdrawn from the index, as a deleted one.
    SELECT_GONE_IN_RANGE = (
        "SELECT q.study_pk, q.study_iuid FROM study_service q"
        " LEFT JOIN study s ON s.pk = q.study_pk"
        " WHERE q.study_pk > %s AND q.study_pk <= %s"
        " AND q.status IN ('pending', 'sent', 'failed')"
        " AND (s.pk IS NULL OR s.rejection_state = 2)"
    )
    SELECT_DELIVERED_IUIDS = Dcm4chee2MySQL.SELECT_DELIVERED_IUIDS
    TIME_INDEXES = (
        "SELECT INDEX_NAME AS name FROM information_schema.STATISTICS"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'study'"
        " AND SEQ_IN_INDEX = 1 AND COLUMN_NAME = 'access_time'"
    )
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
                "SELECT p.pk, " + PATIENT_ID + ", n.alphabetic_name FROM patient p"
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


class ArcLight5PostgreSQL:
    """dcm4chee-arc-light 5.31 and later on PostgreSQL
    (extras/add_indexer_arclight5_postgresql.sql)."""

    STUDY_ROW_VERSION = (
        "decode(md5(concat_ws('|', to_char(s.updated_time, 'YYYY-MM-DD HH24:MI:SS.US'),"
        " COALESCE(s.version::text, ''), s.patient_fk::text, s.study_iuid,"
        " s.study_date, s.study_time, s.study_desc, s.rejection_state::text)), 'hex')"
    )
    INDEXER_PROCESS = "SELECT indexer_process() AS enqueued"
    COUNT_STUDIES = "SELECT COUNT(*) AS n FROM study"
    SELECT_STUDY_PAGE = (
        "SELECT s.pk, s.updated_time, " + STUDY_ROW_VERSION + " AS row_version, s.study_iuid"
        " FROM study s WHERE s.pk > %s ORDER BY s.pk LIMIT %s"
    )
    PATIENT_ID = ArcLight5MySQL.PATIENT_ID
    STUDY_COLUMNS = ArcLight5MySQL.STUDY_COLUMNS
    STUDY_JOINS = ArcLight5MySQL.STUDY_JOINS
    QUEUE_COLUMNS = Dcm4chee2MySQL.QUEUE_COLUMNS
    PENDING_FROM = " FROM study_service q LEFT JOIN study s ON s.pk = q.study_pk" + STUDY_JOINS
    SELECT_NEW_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + NEW_PENDING_POSTGRESQL
    SELECT_DUE_PAGE = QUEUE_COLUMNS + STUDY_COLUMNS + PENDING_FROM + DUE_PENDING_POSTGRESQL
    SELECT_RECONCILE_PAGE = ArcLight5MySQL.SELECT_RECONCILE_PAGE
    SELECT_GONE_IN_RANGE = ArcLight5MySQL.SELECT_GONE_IN_RANGE
    SELECT_DELIVERED_IUIDS = Dcm4chee2PostgreSQL.SELECT_DELIVERED_IUIDS
    TIME_INDEXES = (
        "SELECT c.relname AS name FROM pg_index i"
        " JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
        " WHERE i.indrelid = 'study'::regclass AND a.attname = 'access_time'"
    )
    PRIVILEGE_PROBES = ArcLight5MySQL.PRIVILEGE_PROBES


# arc-light 5.23 to 5.30: a patient has one patient_id row, which
# patient.patient_id_fk names. Everything else is as in 5.31.
PATIENT_ID_BEFORE_5_31 = "(SELECT i.pat_id FROM patient_id i WHERE i.pk = p.patient_id_fk)"


class ArcLight523MySQL(ArcLight5MySQL):
    """dcm4chee-arc-light 5.23 to 5.30 on MySQL/MariaDB."""

    PATIENT_ID = PATIENT_ID_BEFORE_5_31
    STUDY_COLUMNS = rewritten(ArcLight5MySQL.STUDY_COLUMNS, ArcLight5MySQL.PATIENT_ID, PATIENT_ID)
    SELECT_NEW_PAGE = rewritten(
        ArcLight5MySQL.SELECT_NEW_PAGE, ArcLight5MySQL.PATIENT_ID, PATIENT_ID
    )
    SELECT_DUE_PAGE = rewritten(
        ArcLight5MySQL.SELECT_DUE_PAGE, ArcLight5MySQL.PATIENT_ID, PATIENT_ID
    )
    SELECT_RECONCILE_PAGE = rewritten(
        ArcLight5MySQL.SELECT_RECONCILE_PAGE, ArcLight5MySQL.PATIENT_ID, PATIENT_ID
    )
    PRIVILEGE_PROBES = (
        ArcLight5MySQL.PRIVILEGE_PROBES[0],
        (
            ArcLight5MySQL.PRIVILEGE_PROBES[1][0],
            (
                rewritten(
                    ArcLight5MySQL.PRIVILEGE_PROBES[1][1][0], ArcLight5MySQL.PATIENT_ID, PATIENT_ID
                ),
            ),
        ),
        ArcLight5MySQL.PRIVILEGE_PROBES[2],
    )


class ArcLight523PostgreSQL(ArcLight5PostgreSQL):
    """dcm4chee-arc-light 5.23 to 5.30 on PostgreSQL."""

    PATIENT_ID = PATIENT_ID_BEFORE_5_31
    STUDY_COLUMNS = ArcLight523MySQL.STUDY_COLUMNS
    SELECT_NEW_PAGE = rewritten(
        ArcLight5PostgreSQL.SELECT_NEW_PAGE, ArcLight5PostgreSQL.PATIENT_ID, PATIENT_ID
    )
    SELECT_DUE_PAGE = rewritten(
        ArcLight5PostgreSQL.SELECT_DUE_PAGE, ArcLight5PostgreSQL.PATIENT_ID, PATIENT_ID
    )
    SELECT_RECONCILE_PAGE = ArcLight523MySQL.SELECT_RECONCILE_PAGE
    PRIVILEGE_PROBES = ArcLight523MySQL.PRIVILEGE_PROBES


class Dcm4chee2:
    """dcm4chee 2.x: the document's fields are columns of study and patient."""

    name = "dcm4chee 2.x"
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

    def __init__(self, patient_id_rows: bool, view: str) -> None:
        self.view = view
        # What the indexer's own user can see tells these two apart (a
        # column it has no right on is invisible to it).
        self.name = "dcm4chee-arc-light " + ("5.31 or later" if patient_id_rows else "5.23 to 5.30")
        self.STATEMENTS = (
            {"mysql": ArcLight5MySQL, "postgresql": ArcLight5PostgreSQL}
            if patient_id_rows
            else {"mysql": ArcLight523MySQL, "postgresql": ArcLight523PostgreSQL}
        )

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


def _absent_as_none(value: Any) -> str | None:
    text = _text(value)
    return None if text in (None, "", "*") else text


def _person_name_as_2x(value: Any) -> str | None:
    """A person name as dcm4chee 2.x sends it: without trailing empty
    components ('PEREZ^JUAN^^^' is 'PEREZ^JUAN'); None when nothing is left."""
    name = _text(value)
    return (name.rstrip("^") or None) if name else None


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
        reason = schema.UNSETTLED
    return reason


class Database:
    """One connection through an engine: what the queue (and a dcm4chee
    source) run their statements on."""

    install_script = grant_script = ""  # set where a script installs the queue

    def __init__(self, settings: Settings, engine: Any, where: str) -> None:
        self.settings = settings
        self.where = where
        self.engine = engine
        self.Error = self.engine.Error
        self.statement = ""  # the last one run: named when it fails
        try:
            self.engine.connect()
        except self.Error as exc:
            raise DatabaseError(
                f"cannot connect to {self.where}: {self.engine.describe(exc)}"
            ) from None
        except DatabaseError as exc:
            raise DatabaseError(f"cannot connect to {self.where}: {exc}") from None
        self.queue = StudyServiceQueue(self)

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        """Runs one statement (autocommit, or inside begin()); rows as dicts."""
        self.statement = sql
        return self.engine.query(sql, args)

    def rowcount(self, sql: str, args: Any = None) -> int:
        self.statement = sql
        return self.engine.rowcount(sql, args)

    def execute_batch(self, sql: str, rows: list[tuple]) -> None:
        if rows:
            self.statement = sql
            self.engine.execute_batch(sql, rows)

    def try_lock(self, name: str) -> bool:
        # The SQLite queue locks a file, with no statement to name.
        self.statement = getattr(self.engine, "TRY_LOCK", "")
        return self.engine.try_lock(name)

    def unlock(self, name: str) -> None:
        self.statement = getattr(self.engine, "UNLOCK", "")
        self.engine.unlock(name)

    def begin(self) -> None:
        self.engine.begin()

    def commit(self) -> None:
        self.engine.commit()

    def rollback(self) -> None:
        self.engine.rollback()

    def in_transaction(self, work: Callable[[], Any]) -> None:
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
                if not self.engine.is_conflict(exc) or attempt == DEADLOCK_RETRIES:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def describe(self, exc: BaseException) -> str:
        """One line for a driver error; it never holds the password."""
        return self.engine.describe(exc)

    def close(self) -> None:
        try:
            self.engine.close()
        except Exception:  # closing a dead connection: nothing left to do
            pass

    @property
    def install_fix(self) -> str:
        return f"run: {self.install_script.replace('DBNAME', self.settings.db_name)}"

    def explain(self, exc: BaseException) -> DatabaseError:
        """One line for a database error met mid-run, naming the statement
        that met it (a lock wait names what waited). A missing table, column
        or procedure raises check_installed()'s error, which names the fix;
        a missing privilege points at the grant script."""
        message = f"database error on {self.where}: {self.describe(exc)}"
        if self.statement:
            message += f", in {statement_label(self.statement)}"
        if self.engine.is_missing_object(exc):
            try:
                self.queue.check_installed()
            except self.Error:
                pass
            return DatabaseError(
                f"{message}; if the indexer's own user lacks it, run {self.grant_script}"
                " (see README)"
            )
        return DatabaseError(message)


class PacsDatabase(Database):
    """One connection to the PACS's database, through its engine; the schema
    found there; its source (the studies) and its queue (study_service)."""

    def __init__(self, settings: Settings) -> None:
        engine = ENGINES[settings.db_engine](settings)
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


def open_pacs(settings: Settings) -> Any:
    """The PACS that config.json names: a dcm4chee database on its engine
    (PacsDatabase), or an Orthanc (OrthancPacs)."""
    return OrthancPacs(settings) if settings.source == "orthanc" else PacsDatabase(settings)


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
        """Calls indexer_process: enqueues studies new or changed since its last call."""
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
        self, pacs: PacsDatabase, settings: Settings, max_studies: int | None, stop: Stop
    ) -> ReconcileReport:
        return reconcile(pacs, settings, max_studies, stop)

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
        return {_text(row["study_iuid"]) for row in rows}

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


# --------------------------------------------------------------------------
# Source: Orthanc, through its REST API
#
# Orthanc keeps its index where it likes (SQLite, or the PostgreSQL/MySQL
# plugins): the indexer reads only its REST API, the same for all. What
# changed comes from its change log (/changes, paged by Seq, kept in the
# queue's cursor row); a study is sent once Orthanc calls it stable (or it
# has been quiet long enough); deletions are not logged, so reconcile lists
# every study and finds the ones gone. The queue, with no database of ours
# to live in, is a SQLite file (SQLiteEngine), with the same table.
# --------------------------------------------------------------------------

ORTHANC_MINIMUM_VERSION = (1, 10)
# The SQLite queue's clock: local time, as a dcm4chee database's, to the millisecond.
SQLITE_NOW = "strftime('%Y-%m-%d %H:%M:%f', 'now', 'localtime')"
ORTHANC_CHANGES_PAGE = 1000  # change log rows per request
ORTHANC_LIST_PAGE = 1000  # study IDs per /studies request
ORTHANC_FETCH_THREADS = 8  # studies read at once (each: two GETs)
# Orthanc calls a study stable StableAge seconds (60 by default) after its
# last image; it keeps that in memory only, so a study stored just before a
# restart never gets a StableStudy. A study quiet for this long counts as
# stable whatever Orthanc says (or stable_age_seconds, if longer).
ORTHANC_QUIET_SECONDS = 120
# The change log's entries that make a study worth reading again.
ORTHANC_STUDY_CHANGES = frozenset(
    {"NewStudy", "NewSeries", "NewInstance", "StableStudy", "UpdatedMetadata"}
)


class OrthancError(IndexerError):
    """Orthanc is unreachable, refused the credentials, or is too old."""

    exit_code = EXIT_DATABASE


def orthanc_pk(orthanc_id: str) -> int:
    """A study's (or patient's) pk, as the central index stores dcm4chee's:
    a JSON integer, from the first 13 hex digits of its Orthanc ID (itself
    a SHA-1 of PatientID and StudyInstanceUID): 52 bits, below 2**53, the
    same on a rebuilt queue or another host. Two studies of an archive share
    one with a chance of n**2 / 2**53: about 1 in 9,000 for a million."""
    return int(orthanc_id.replace("-", "")[:13], 16) or 1


class OrthancClient:
    """GETs of JSON from Orthanc's REST API, over keep-alive connections.
    Orthanc closes idle ones after about a second: urllib3 reconnects, and
    retries a GET (safe to repeat) that met a closed connection."""

    def __init__(self, settings: Settings) -> None:
        import urllib3

        self.base = settings.orthanc_url
        headers = {"Accept": "application/json"}
        if settings.orthanc_user or settings.orthanc_password:
            credentials = f"{settings.orthanc_user}:{settings.orthanc_password}"
            headers.update(urllib3.make_headers(basic_auth=credentials))
            hide_secrets(settings.orthanc_password, headers["authorization"].split()[-1])
        options: dict[str, Any] = {
            "num_pools": 1,
            "maxsize": ORTHANC_FETCH_THREADS + 2,
            "headers": headers,
            "retries": urllib3.util.Retry(
                total=2, connect=2, read=2, status=0, redirect=0, backoff_factor=0.1
            ),
            "timeout": urllib3.Timeout(
                connect=settings.connect_timeout_seconds, read=settings.read_timeout_seconds
            ),
        }
        if self.base.startswith("https://"):
            options["cert_reqs"] = "CERT_REQUIRED"
            options["ca_certs"] = settings.orthanc_ca_bundle or _default_ca_bundle()
        self.pool = urllib3.PoolManager(**options)
        self.http_error = urllib3.exceptions.HTTPError

    def get(self, path: str, missing_ok: bool = False) -> Any:
        """The JSON at `path`; None for a 404 when `missing_ok` (a resource
        deleted between the change log and its read: nothing to retry)."""
        try:
            response = self.pool.request("GET", self.base + path, redirect=False)
        except self.http_error as exc:
            raise OrthancError(
                f"cannot reach Orthanc at {self.base}: {_reason(_cause_chain(exc))}"
            ) from None
        if response.status == 404 and missing_ok:
            return None
        if response.status in (401, 403):
            raise OrthancError(
                f"Orthanc at {self.base} refused the credentials (HTTP {response.status}):"
                " check orthanc.user and orthanc.password in config.json"
            )
        if response.status != 200:
            raise OrthancError(
                f"Orthanc at {self.base} answered HTTP {response.status} to GET"
                f" {path.split('?')[0]}"
            )
        try:
            return json.loads(response.data)
        except ValueError:
            raise OrthancError(
                f"Orthanc at {self.base} answered GET {path.split('?')[0]} with no JSON"
            ) from None

    def version(self) -> str:
        """Orthanc's version; refuses one older than 1.10 (its REST API)."""
        version = str(self.get("/system").get("Version", "?"))
        numbers = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
        if version.lower() != "mainline" and numbers < ORTHANC_MINIMUM_VERSION:
            raise OrthancError(
                f"Orthanc at {self.base} is version {version}: this client reads Orthanc"
                " 1.10 and later; upgrade Orthanc"
            )
        return version

    def close(self) -> None:
        self.pool.clear()


class OrthancStatements:
    """The SQLite queue's statements that only an Orthanc source runs."""

    QUEUE_COLUMNS = (
        "SELECT study_pk AS queued_pk, sent_version, study_iuid AS known_iuid,"
        " enqueued_at AS queued_at, attempts, source_id FROM study_service"
    )
    SELECT_NEW_PAGE = (
        QUEUE_COLUMNS + " WHERE status = 'pending' AND attempts = 0 AND study_pk > ?"
        " ORDER BY study_pk LIMIT ?"
    )
    SELECT_DUE_PAGE = (
        QUEUE_COLUMNS + " WHERE status = 'pending' AND attempts > 0"
        f" AND (next_attempt_at IS NULL OR next_attempt_at <= {SQLITE_NOW})"
        " AND study_pk > ? ORDER BY study_pk LIMIT ?"
    )
    # A change in Orthanc: the study pending again (its Orthanc ID kept).
    # Rows: (study_pk, Orthanc ID).
    ENQUEUE_CHANGE = (
        "INSERT OR IGNORE INTO study_service (study_pk, status, attempts, enqueued_at, source_id)"
        f" VALUES (?1, 'pending', 0, {SQLITE_NOW}, ?2);\n"
        "UPDATE study_service SET"
        " sent_version = CASE WHEN status IN ('deleted', 'deleting') THEN NULL"
        " ELSE sent_version END, status = 'pending', attempts = 0, last_error = NULL,"
        f" next_attempt_at = NULL, enqueued_at = {SQLITE_NOW}, source_id = ?2"
        " WHERE study_pk = ?1"
    )
    QUEUE_STATE = "SELECT study_pk, status, sent_version FROM study_service WHERE study_pk IN "
    MARK_RECONCILED = f"UPDATE study_service SET reconciled_at = {SQLITE_NOW} WHERE study_pk = ?"
    # What reconcile did not find in Orthanc since its sweep began.
    SELECT_UNSEEN = (
        "SELECT study_pk, study_iuid, source_id FROM study_service WHERE study_pk > 0"
        " AND status IN ('pending', 'sent', 'failed') AND COALESCE(reconciled_at, '') < ?"
    )
    SELECT_DELIVERED_IUIDS = (
        "SELECT study_iuid FROM study_service WHERE status = 'sent' AND study_iuid IN "
    )


class Orthanc:
    """Orthanc's studies as the document's fields:

    - patient_pk and study_pk: orthanc_pk() of the Orthanc IDs.
    - patient_id, patient_name: PatientMainDicomTags (the name without its
      trailing empty components, as 2.x sends it).
    - study_datetime: StudyDate and StudyTime, as arc-light's; description,
      UID: MainDicomTags.
    - study_modality: the distinct modalities of its series, in alphabetical
      order; study_series and study_instances: its series, and their images.
    - A study is sent once stable: IsStable, or quiet for
      ORTHANC_QUIET_SECONDS (Orthanc forgets what it was waiting for when it
      restarts). A study Orthanc no longer has is withdrawn.
    """

    name = "Orthanc"
    UNSETTLED = "Orthanc has not marked it stable yet (images may still come)"

    def __init__(self, quiet_seconds: int) -> None:
        self.quiet_seconds = quiet_seconds

    def join_args(self) -> tuple[Any, ...]:
        return ()

    def fields(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        fields = dict(row)
        fields["pat_name"] = _person_name_as_2x(row["pat_name"])
        fields["study_desc"] = row["study_desc"] or None
        fields["study_datetime"] = _arclight_datetime(row["study_date"], row["study_time"])
        return fields

    def settled(self, row: Mapping[str, Any]) -> bool:
        if row["is_stable"]:
            return True
        updated = _orthanc_time(row["last_update"])
        if updated is None:
            return False
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        return (now - updated).total_seconds() > self.quiet_seconds

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        return row["study_pk"] is None


def _orthanc_time(value: Any) -> datetime.datetime | None:
    """Orthanc's "20261202T023015" (its clock, in UTC)."""
    try:
        return datetime.datetime.strptime(str(value), "%Y%m%dT%H%M%S")
    except ValueError:
        return None


class OrthancSource:
    """The studies of an Orthanc, read through its REST API, with the change
    log's cursor and the pending studies in the SQLite queue."""

    sql = OrthancStatements
    pipelined_initial = False  # Orthanc lists studies in no order: enqueued first

    def __init__(self, db: Database, client: OrthancClient, schema: Orthanc) -> None:
        self.db = db
        self.client = client
        self.schema = schema
        self.page_size = db.settings.page_size

    # -- what changed --------------------------------------------------------

    def enqueue_changes(self) -> int:
        """Reads the change log after the cursor and enqueues the studies it
        names; the first call (a new queue) starts the cursor at the end of
        the log, as installing the indexer does on dcm4chee."""
        state = self.db.queue.bookkeeping(CURSOR_ROW_PK)
        if state is None:
            last = int(self.client.get("/changes?last")["Last"])
            self.db.queue.start_bookkeeping(CURSOR_ROW_PK, "cursor", last)
            return 0
        cursor, enqueued = int(state["position"] or 0), 0
        while True:
            page = self.client.get(f"/changes?since={cursor}&limit={ORTHANC_CHANGES_PAGE}")
            changes, last = page["Changes"], int(page["Last"])
            if self._history_lost(cursor, changes, last):
                return enqueued + self._resynchronise(cursor, last)
            if not changes:
                return enqueued
            studies = self._studies_of(changes)
            cursor = int(changes[-1]["Seq"])
            self._enqueue(studies, cursor)
            enqueued += len(studies)
            if page["Done"]:
                return enqueued

    def _history_lost(self, cursor: int, changes: list[dict], last: int) -> bool:
        """Whether the log no longer goes back to the cursor: Orthanc's
        database replaced or restored (its newest Seq below the cursor), or
        its log cleared (its oldest row past the cursor: the rows of deleted
        resources go too, but never all of the older ones)."""
        if not changes:
            return last < cursor
        if int(changes[0]["Seq"]) == cursor + 1:
            return False
        oldest = self.client.get("/changes?since=0&limit=1")["Changes"]
        return bool(oldest) and int(oldest[0]["Seq"]) > cursor + 1

    def _resynchronise(self, cursor: int, last: int) -> int:
        log.warning(
            "Orthanc's change log no longer goes back to where this indexer left it (Seq %d;"
            " newest now %d): its database was replaced or restored, or its log cleared;"
            " every study is enqueued again and only what changed will be sent",
            cursor,
            last,
        )
        count, offset = 0, 0
        while True:
            ids = self.client.get(f"/studies?since={offset}&limit={ORTHANC_LIST_PAGE}")
            if not ids:
                break
            self._enqueue(ids, None)
            count, offset = count + len(ids), offset + len(ids)
        self.db.query(self.db.queue.sql.SET_CURSOR, (last, CURSOR_ROW_PK))
        return count

    def _studies_of(self, changes: list[dict]) -> list[str]:
        """The studies the changes are about, in order, once each (a series
        or an instance is looked up: its study is not in the entry)."""
        wanted = [c for c in changes if c["ChangeType"] in ORTHANC_STUDY_CHANGES]
        series_study: dict[str, str | None] = {}

        def study_of(change: dict) -> str | None:
            kind, ident = change["ResourceType"], change["ID"]
            if kind == "Study":
                return ident
            if kind == "Instance":
                instance = self.client.get(f"/instances/{ident}", missing_ok=True)
                ident = instance["ParentSeries"] if instance else None
            if kind in ("Series", "Instance") and ident is not None:
                if ident not in series_study:
                    series = self.client.get(f"/series/{ident}", missing_ok=True)
                    series_study[ident] = series["ParentStudy"] if series else None
                return series_study[ident]
            return None  # a patient's change: its studies log their own

        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            found = list(pool.map(study_of, wanted))
        return list(dict.fromkeys(ident for ident in found if ident))

    def _enqueue(self, studies: list[str], cursor: int | None) -> None:
        rows = [(orthanc_pk(ident), ident) for ident in studies]

        def work() -> None:
            self.db.execute_batch(self.sql.ENQUEUE_CHANGE, rows)
            if cursor is not None:
                self.db.query(self.db.queue.sql.SET_CURSOR, (cursor, CURSOR_ROW_PK))

        self.db.in_transaction(work)

    # -- the studies ----------------------------------------------------------

    def count_studies(self) -> int:
        return int(self.client.get("/statistics")["CountStudies"])

    def initial_page(self, offset: int) -> tuple[list[tuple], int]:
        """The initial load's next page of Orthanc's studies (by offset: it
        lists them in no order, so an interrupted load starts over; a study
        added meanwhile is in the change log anyway), as ENQUEUE_FOR_INITIAL
        takes them."""
        ids = self.client.get(f"/studies?since={offset}&limit={ORTHANC_LIST_PAGE}")
        return [(orthanc_pk(ident), ident) for ident in ids], offset + len(ids)

    def initial_enqueued(self, queue: StudyServiceQueue, position: int) -> None:
        """The change log's cursor was set when the queue was made."""

    def new_studies(
        self, frontier: Callable[[int], int | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """The pending studies not tried since enqueued, with their fields."""
        return self._stream(self.sql.SELECT_NEW_PAGE)

    def due_studies(self) -> Iterator[dict[str, Any]]:
        """The pending studies that failed before, whose next attempt is due."""
        return self._stream(self.sql.SELECT_DUE_PAGE)

    def pending_studies(self) -> Iterator[dict[str, Any]]:
        return itertools.chain(self.new_studies(), self.due_studies())

    def _stream(self, sql: str) -> Iterator[dict[str, Any]]:
        import concurrent.futures

        after = 0
        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            while True:
                page = self.db.query(sql, (after, self.page_size))
                if not page:
                    return
                yield from pool.map(self._with_fields, page)
                after = page[-1]["queued_pk"]

    def _with_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """A queue row with its study's fields, read from Orthanc (two GETs);
        study_pk None if Orthanc no longer has it."""
        return {**row, **self.study_fields(row["source_id"])}

    def study_fields(self, ident: str, study: dict | None = None) -> dict[str, Any]:
        study = study or self.client.get(f"/studies/{ident}", missing_ok=True)
        series = self.client.get(f"/studies/{ident}/series", missing_ok=True) if study else None
        if study is None or series is None:
            return {"study_pk": None}
        tags, patient = study.get("MainDicomTags", {}), study.get("PatientMainDicomTags", {})
        modalities = {s.get("MainDicomTags", {}).get("Modality") for s in series} - {None, ""}
        return {
            "study_pk": orthanc_pk(study["ID"]),
            "study_iuid": tags.get("StudyInstanceUID"),
            "study_date": tags.get("StudyDate"),
            "study_time": tags.get("StudyTime"),
            "study_desc": tags.get("StudyDescription"),
            "updated_time": None,
            "mods_in_study": "\\".join(sorted(modalities)) or None,
            "num_series": len(series),
            "num_instances": sum(len(s.get("Instances", ())) for s in series),
            "patient_pk": orthanc_pk(study["ParentPatient"]),
            "pat_id": patient.get("PatientID"),
            "pat_name": patient.get("PatientName"),
            "is_stable": bool(study.get("IsStable")),
            "last_update": study.get("LastUpdate"),
        }

    # -- reconcile -----------------------------------------------------------

    def reconcile(
        self, pacs: OrthancPacs, settings: Settings, max_studies: int | None, stop: Stop
    ) -> ReconcileReport:
        """Lists every study of Orthanc, enqueueing those whose document is
        not what the service holds; then, once the sweep is whole, the
        studies it did not find, each checked gone, as deleted (Orthanc
        logs no deletion: this is how they are followed)."""
        report, queue = ReconcileReport(), pacs.queue
        offset = queue.reconcile_position()
        started = queue.bookkeeping(RECONCILE_ROW_PK)["started"]
        bar = _progress_bar(self.count_studies, "reconciling")
        cap = RateCap(settings.reconcile_rows_per_second)
        try:
            while (max_studies is None or report.checked < max_studies) and not stop.requested():
                ids = self.client.get(f"/studies?since={offset}&limit={self.page_size}")
                if not ids:
                    report.gone = self._mark_unseen_gone(queue, started)
                    report.finished = True
                    queue.finish_reconcile()
                    break
                offset += len(ids)
                self._reconcile_page(queue, ids, offset, settings.center, report)
                bar.update(len(ids))
                cap.passed(len(ids))
        finally:
            bar.close()
            report.seconds = time.monotonic() - cap.started
        return report

    def _reconcile_page(
        self, queue: StudyServiceQueue, ids: list[str], offset: int, center: str, report: Any
    ) -> None:
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(ORTHANC_FETCH_THREADS) as pool:
            fields = list(pool.map(self.study_fields, ids))
        pks = [orthanc_pk(ident) for ident in ids]
        placeholders = "(" + ", ".join(["?"] * len(pks)) + ")"  # placeholders, never values
        rows = self.db.query(self.sql.QUEUE_STATE + placeholders, pks)
        state = {row["study_pk"]: row for row in rows}
        changed = []
        for pk, study in zip(pks, fields):
            known = state.get(pk)
            if known is None:
                report.untracked += 1
            elif needs_resend({**known, **study}, center, self.schema):
                changed.append(pk)
        report.checked += len(ids)
        report.changed += len(changed)

        def work() -> None:
            self.db.execute_batch(queue.sql.ENQUEUE_CHANGED, [(pk,) for pk in changed])
            self.db.execute_batch(self.sql.MARK_RECONCILED, [(pk,) for pk in pks])
            self.db.query(queue.sql.SET_CURSOR, (offset, RECONCILE_ROW_PK))

        self.db.in_transaction(work)

    def _mark_unseen_gone(self, queue: StudyServiceQueue, started: Any) -> int:
        """The studies the sweep did not see, that Orthanc confirms gone."""
        unseen = self.db.query(self.sql.SELECT_UNSEEN, (str(started),))
        gone = [
            (row["study_pk"], row["study_iuid"])
            for row in unseen
            if row["source_id"] is None
            or self.client.get(f"/studies/{row['source_id']}", missing_ok=True) is None
        ]
        queue.mark_gone(gone)
        return len(gone)

    # -- for check and adopt ---------------------------------------------------

    def time_index(self) -> tuple[bool, str]:
        state = self.db.queue.bookkeeping(CURSOR_ROW_PK)
        seq = state["position"] if state else "(not started yet)"
        return True, (
            f"Orthanc's change log: each tick reads only the changes after Seq {seq}"
            " (deletions are found by the nightly `client.py reconcile`)"
        )

    def delivered_iuids(self, iuids: list[str | None]) -> set[str]:
        wanted = [iuid for iuid in iuids if iuid]
        if not wanted:
            return set()
        placeholders = "(" + ", ".join(["?"] * len(wanted)) + ")"  # placeholders, never values
        rows = self.db.query(self.sql.SELECT_DELIVERED_IUIDS + placeholders, wanted)
        return {row["study_iuid"] for row in rows}


class OrthancPacs:
    """An Orthanc, as the commands see a PACS: its REST API (the source)
    and the queue in a SQLite file (queue_file, beside config.json)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.where = f"Orthanc at {settings.orthanc_url}"
        self.client = OrthancClient(settings)
        self.version = self.client.version()  # also proves the credentials
        self.db = Database(settings, SQLiteEngine(settings), f"queue {settings.queue_file}")
        self.Error = self.db.Error
        self.queue = self.db.queue
        self.schema = Orthanc(max(ORTHANC_QUIET_SECONDS, settings.stable_age_seconds))
        self.source = OrthancSource(self.db, self.client, self.schema)
        self.install_script = self.grant_script = ""

    def explain(self, exc: BaseException) -> DatabaseError:
        return self.db.explain(exc)

    def describe(self, exc: BaseException) -> str:
        return self.db.describe(exc)

    def server_version(self) -> str:
        return f"Orthanc {self.version}"

    def privilege_problems(self) -> list[str]:
        return []  # the credentials were accepted; Orthanc has no finer rights to read

    def close(self) -> None:
        self.client.close()
        self.db.close()


# --------------------------------------------------------------------------
# Queue: study_service, the indexer's bookkeeping
#
# One row per study the indexer knows of: pending, sent, failed, deleting or
# deleted, with the version of the study row last enqueued, the fingerprint
# of the document the service last acknowledged, the attempts and the last
# error, and when the next attempt is due after a failure. Rows with
# study_pk < 1 hold the tick's cursor and the unfinished initial load and
# reconcile. It lives in the PACS's own database (the only table the indexer
# adds there); the statements are the same for both schemas.
# --------------------------------------------------------------------------

# How often the sending loop looks again while the initial load is enqueueing.
ENQUEUE_POLL_SECONDS = 0.05
# `status` tells why pending studies wait by reading at most this many of them.
STATUS_PENDING_ROWS = 10000


class MySQLQueueSQL:
    """study_service on MySQL/MariaDB, and the catalog queries of that engine."""

    SERVER_VERSION = "SELECT VERSION() AS v"
    DATABASE_NOW = "SELECT NOW(6) AS now"
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
    SET_INITIAL_STARTED = "SET @indexer_initial_started = %s"
    # study_iuid from the moment a study is enqueued (see add_indexer.sql).
    ENQUEUE_FOR_INITIAL = (
        "INSERT INTO study_service"
        " (study_pk, status, attempts, study_updated_time, study_version, enqueued_at,"
        " study_iuid)"
        " VALUES (%s, 'pending', 0, %s, %s, NOW(), %s)"
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
        " VALUES (%s, %s, NOW(6), 0)"
    )
    SELECT_BOOKKEEPING = (
        "SELECT enqueued_at AS started, cursor_pk AS position, status"
        " FROM study_service WHERE study_pk = %s"
    )
    SET_CURSOR = "UPDATE study_service SET cursor_pk = %s WHERE study_pk = %s"
    RAISE_CURSOR = (
        "UPDATE study_service SET cursor_pk = GREATEST(COALESCE(cursor_pk, 0), %s)"
        " WHERE study_pk = %s"
    )
    SET_STATUS = "UPDATE study_service SET status = %s WHERE study_pk = %s"
    DELETE_ROW = "DELETE FROM study_service WHERE study_pk = %s"
    SELECT_DELETING_PAGE = (
        "SELECT study_pk, study_iuid FROM study_service FORCE INDEX (study_service_status)"
        " WHERE status = 'deleting' AND study_pk > %s ORDER BY study_pk LIMIT %s"
    )
    # Acknowledgements, many rows per statement (PyMySQL batches INSERT ... VALUES).
    RECORD_SENT = (
        "INSERT INTO study_service (study_pk, status, attempts, sent_version, sent_at, study_iuid)"
        " VALUES (%s, 'sent', 1, %s, NOW(6), %s)"
        " ON DUPLICATE KEY UPDATE status = 'sent', attempts = attempts + 1,"
        " last_error = NULL, next_attempt_at = NULL, sent_version = VALUES(sent_version),"
        " sent_at = NOW(6), study_iuid = VALUES(study_iuid)"
    )
    RECORD_DELETED = (
        "UPDATE study_service SET status = 'deleted', attempts = attempts + 1,"
        " last_error = NULL, next_attempt_at = NULL, sent_at = NOW(6) WHERE study_pk = %s"
    )
    # A failure: pending again (its next attempt after `wait` seconds; NULL:
    # as soon as the next run), failed (refused for good), or deleting.
    RECORD_FAILURE = (
        "UPDATE study_service SET status = %s, attempts = attempts + 1, last_error = %s,"
        " next_attempt_at = NOW(6) + INTERVAL %s SECOND WHERE study_pk = %s"
    )
    RECORD_UNCHANGED = (
        "UPDATE study_service SET status = 'sent', last_error = NULL, next_attempt_at = NULL"
        " WHERE study_pk = %s"
    )
    MARK_GONE = (
        "UPDATE study_service SET status = %s, attempts = 0, next_attempt_at = NULL,"
        " last_error = 'study no longer in the PACS' WHERE study_pk = %s"
    )
    # reconcile: sent again. sent_version is assigned first (MySQL evaluates
    # SET left to right): a study back from the trash is sent again as new.
    ENQUEUE_CHANGED = (
        "UPDATE study_service SET"
        " sent_version = IF(status IN ('deleted', 'deleting'), NULL, sent_version),"
        " status = 'pending', attempts = 0, last_error = NULL, next_attempt_at = NULL,"
        " enqueued_at = NOW(6) WHERE study_pk = %s"
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
        " WHERE status = 'pending' AND next_attempt_at > NOW(6)"
    )
    OLDEST_PENDING_SECONDS = (
        "SELECT TIMESTAMPDIFF(SECOND, MIN(enqueued_at), NOW(6)) AS age"
        " FROM study_service WHERE status IN ('pending', 'deleting')"
    )
    LAST_SENT = "SELECT MAX(sent_at) AS t FROM study_service"
    RECENT_ERRORS = (
        "SELECT study_pk, status, attempts, last_error, next_attempt_at FROM study_service"
        " WHERE last_error IS NOT NULL AND status IN ('pending', 'failed')"
        " ORDER BY enqueued_at DESC LIMIT 5"
    )
    PRIVILEGE_PROBES = (
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


class PostgreSQLQueueSQL:
    """study_service on PostgreSQL. The statements that take many rows at
    once take one array per column (PostgreSQLEngine.execute_batch)."""

    SERVER_VERSION = "SELECT 'PostgreSQL ' || current_setting('server_version') AS v"
    DATABASE_NOW = "SELECT LOCALTIMESTAMP AS now"
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
    SET_INITIAL_STARTED = "SELECT set_config('dicom_indexer.initial_started', %s, false)"
    ENQUEUE_FOR_INITIAL = (
        "INSERT INTO study_service AS q"
        " (study_pk, status, attempts, study_updated_time, study_version, enqueued_at,"
        " study_iuid)"
        " SELECT pk, 'pending', 0, updated, row_version, LOCALTIMESTAMP, iuid"
        " FROM unnest(%s::bigint[], %s::timestamp[], %s::bytea[], %s::text[])"
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
        " VALUES (%s, %s, LOCALTIMESTAMP, 0) ON CONFLICT (study_pk) DO NOTHING"
    )
    SELECT_BOOKKEEPING = MySQLQueueSQL.SELECT_BOOKKEEPING
    SET_CURSOR = MySQLQueueSQL.SET_CURSOR
    RAISE_CURSOR = MySQLQueueSQL.RAISE_CURSOR
    SET_STATUS = MySQLQueueSQL.SET_STATUS
    DELETE_ROW = MySQLQueueSQL.DELETE_ROW
    SELECT_DELETING_PAGE = (
        "SELECT study_pk, study_iuid FROM study_service"
        " WHERE (status, study_pk) > ('deleting', %s)"
        f" AND (status, study_pk) <= ('deleting', {MAX_PK})"
        " ORDER BY status, study_pk LIMIT %s"
    )
    RECORD_SENT = (
        "INSERT INTO study_service AS q"
        " (study_pk, status, attempts, sent_version, sent_at, study_iuid)"
        " SELECT pk, 'sent', 1, fingerprint, LOCALTIMESTAMP, iuid"
        " FROM unnest(%s::bigint[], %s::bytea[], %s::text[]) AS r(pk, fingerprint, iuid)"
        " ON CONFLICT (study_pk) DO UPDATE SET status = 'sent', attempts = q.attempts + 1,"
        " last_error = NULL, next_attempt_at = NULL, sent_version = EXCLUDED.sent_version,"
        " sent_at = LOCALTIMESTAMP, study_iuid = EXCLUDED.study_iuid"
    )
    RECORD_DELETED = (
        "UPDATE study_service SET status = 'deleted', attempts = attempts + 1,"
        " last_error = NULL, next_attempt_at = NULL, sent_at = LOCALTIMESTAMP"
        " WHERE study_pk = ANY(%s::bigint[])"
    )
    RECORD_FAILURE = (
        "UPDATE study_service q SET status = r.status, attempts = q.attempts + 1,"
        " last_error = r.error, next_attempt_at = LOCALTIMESTAMP + make_interval(secs => r.wait)"
        " FROM unnest(%s::text[], %s::text[], %s::float8[], %s::bigint[])"
        " AS r(status, error, wait, pk) WHERE q.study_pk = r.pk"
    )
    RECORD_UNCHANGED = (
        "UPDATE study_service SET status = 'sent', last_error = NULL, next_attempt_at = NULL"
        " WHERE study_pk = ANY(%s::bigint[])"
    )
    MARK_GONE = (
        "UPDATE study_service q SET status = r.status, attempts = 0, next_attempt_at = NULL,"
        " last_error = 'study no longer in the PACS'"
        " FROM unnest(%s::text[], %s::bigint[]) AS r(status, pk) WHERE q.study_pk = r.pk"
    )
    # PostgreSQL evaluates every SET expression on the old row.
    ENQUEUE_CHANGED = (
        "UPDATE study_service SET"
        " sent_version = CASE WHEN status IN ('deleted', 'deleting') THEN NULL"
        " ELSE sent_version END,"
        " status = 'pending', attempts = 0, last_error = NULL, next_attempt_at = NULL,"
        " enqueued_at = LOCALTIMESTAMP WHERE study_pk = ANY(%s::bigint[])"
    )
    RETRY_FAILED = MySQLQueueSQL.RETRY_FAILED
    COUNT_BY_STATUS = MySQLQueueSQL.COUNT_BY_STATUS
    COUNT_PENDING = MySQLQueueSQL.COUNT_PENDING
    COUNT_WAITING = (
        "SELECT COUNT(*) AS n, MIN(next_attempt_at) AS next_at FROM study_service"
        " WHERE status = 'pending' AND next_attempt_at > LOCALTIMESTAMP"
    )
    OLDEST_PENDING_SECONDS = (
        "SELECT EXTRACT(EPOCH FROM LOCALTIMESTAMP - MIN(enqueued_at)) AS age"
        " FROM study_service WHERE status IN ('pending', 'deleting')"
    )
    LAST_SENT = MySQLQueueSQL.LAST_SENT
    RECENT_ERRORS = MySQLQueueSQL.RECENT_ERRORS
    PRIVILEGE_PROBES = (
        (
            "SELECT, INSERT, UPDATE and DELETE on study_service",
            (
                "SELECT study_pk FROM study_service LIMIT 0",
                "INSERT INTO study_service (study_pk) SELECT 0 WHERE 1 = 0",
                "UPDATE study_service SET attempts = attempts WHERE 1 = 0",
                "DELETE FROM study_service WHERE 1 = 0",
            ),
        ),
    )


class SQLiteQueueSQL:
    """study_service in a SQLite file: the queue of a PACS that has no
    database the indexer may add a table to (Orthanc). Plain SQLite 3.7
    (CentOS 7's): no UPSERT, so an upsert is an INSERT OR IGNORE and an
    UPDATE, with numbered parameters that both take from one row."""

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
    DATABASE_NOW = f"SELECT {SQLITE_NOW} AS now"
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
    SELECT_BOOKKEEPING = (
        "SELECT enqueued_at AS started, cursor_pk AS position, status"
        " FROM study_service WHERE study_pk = ?"
    )
    SET_CURSOR = "UPDATE study_service SET cursor_pk = ? WHERE study_pk = ?"
    RAISE_CURSOR = (
        "UPDATE study_service SET cursor_pk = MAX(COALESCE(cursor_pk, 0), ?) WHERE study_pk = ?"
    )
    SET_STATUS = "UPDATE study_service SET status = ? WHERE study_pk = ?"
    DELETE_ROW = "DELETE FROM study_service WHERE study_pk = ?"
    SELECT_DELETING_PAGE = (
        "SELECT study_pk, study_iuid FROM study_service"
        " WHERE status = 'deleting' AND study_pk > ? ORDER BY study_pk LIMIT ?"
    )
    RECORD_SENT = (
        "UPDATE study_service SET status = 'sent', attempts = attempts + 1, last_error = NULL,"
        f" next_attempt_at = NULL, sent_version = ?2, sent_at = {SQLITE_NOW}, study_iuid = ?3"
        " WHERE study_pk = ?1"
    )
    RECORD_DELETED = (
        "UPDATE study_service SET status = 'deleted', attempts = attempts + 1,"
        f" last_error = NULL, next_attempt_at = NULL, sent_at = {SQLITE_NOW} WHERE study_pk = ?"
    )
    RECORD_FAILURE = (
        "UPDATE study_service SET status = ?1, attempts = attempts + 1, last_error = ?2,"
        " next_attempt_at = CASE WHEN ?3 IS NULL THEN NULL ELSE"
        " strftime('%Y-%m-%d %H:%M:%f', 'now', 'localtime', '+' || ?3 || ' seconds') END"
        " WHERE study_pk = ?4"
    )
    RECORD_UNCHANGED = (
        "UPDATE study_service SET status = 'sent', last_error = NULL, next_attempt_at = NULL"
        " WHERE study_pk = ?"
    )
    MARK_GONE = (
        "UPDATE study_service SET status = ?, attempts = 0, next_attempt_at = NULL,"
        " last_error = 'study no longer in the PACS' WHERE study_pk = ?"
    )
    ENQUEUE_CHANGED = (
        "UPDATE study_service SET"
        " sent_version = CASE WHEN status IN ('deleted', 'deleting') THEN NULL"
        " ELSE sent_version END, status = 'pending', attempts = 0, last_error = NULL,"
        f" next_attempt_at = NULL, enqueued_at = {SQLITE_NOW} WHERE study_pk = ?"
    )
    RETRY_FAILED = MySQLQueueSQL.RETRY_FAILED
    COUNT_BY_STATUS = MySQLQueueSQL.COUNT_BY_STATUS
    COUNT_PENDING = MySQLQueueSQL.COUNT_PENDING
    COUNT_WAITING = (
        "SELECT COUNT(*) AS n, MIN(next_attempt_at) AS next_at FROM study_service"
        f" WHERE status = 'pending' AND next_attempt_at > {SQLITE_NOW}"
    )
    OLDEST_PENDING_SECONDS = (
        "SELECT CAST((julianday('now', 'localtime') - julianday(MIN(enqueued_at))) * 86400"
        " AS INTEGER) AS age FROM study_service WHERE status IN ('pending', 'deleting')"
    )
    LAST_SENT = MySQLQueueSQL.LAST_SENT
    RECENT_ERRORS = (
        "SELECT study_pk, status, attempts, last_error, next_attempt_at FROM study_service"
        " WHERE last_error IS NOT NULL AND status IN ('pending', 'failed')"
        " ORDER BY enqueued_at DESC LIMIT 5"
    )
    PRIVILEGE_PROBES: tuple = ()  # the client's own file: see SQLiteEngine.connect


class SQLiteEngine:
    """The queue of an Orthanc site: a SQLite file, through the standard
    library; WAL, one writer at a time (the run lock), every commit durable.
    Created by the client, readable by its user only, like config.json."""

    name = "sqlite"
    # Columns (or aliases) that hold times: SQLite keeps them as text.
    TIMES = frozenset({"now", "started", "queued_at", "next_at", "t", "next_attempt_at"})
    BUSY_TIMEOUT_SECONDS = 50  # as MySQL's lock wait, for a reader beside the run

    def __init__(self, settings: Settings) -> None:
        import sqlite3

        self.settings = settings
        self.driver = sqlite3
        self.Error: tuple[type[BaseException], ...] = (sqlite3.Error,)
        self.path = settings.queue_file
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


QUEUE_STATEMENTS = {
    "mysql": MySQLQueueSQL,
    "postgresql": PostgreSQLQueueSQL,
    "sqlite": SQLiteQueueSQL,
}


class StudyServiceQueue:
    """study_service in the PACS database: the run lock, the bookkeeping of
    the initial load and of reconcile, and every acknowledgement."""

    def __init__(self, db: PacsDatabase) -> None:
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
        return ("dicom_indexer." + self.settings.db_name)[:64]

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
        source: PacsSource,
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
            self.db.in_transaction(
                lambda rows=rows, position=position: (
                    self.db.execute_batch(self.sql.ENQUEUE_FOR_INITIAL, rows),
                    self.db.query(self.sql.SET_CURSOR, (position, INITIAL_ROW_PK)),
                )
            )
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
        """Writes a batch of results in one transaction."""
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
        self.db.begin()
        self.db.execute_batch(self.sql.RECORD_SENT, sent)
        self.db.execute_batch(self.sql.RECORD_DELETED, deleted)
        self.db.execute_batch(self.sql.RECORD_FAILURE, failures)
        self.db.execute_batch(self.sql.RECORD_UNCHANGED, [(pk,) for pk in unchanged])
        self.db.commit()

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
        """One page's findings and the new position, in one transaction."""
        self.db.begin()
        self.db.execute_batch(self.sql.ENQUEUE_CHANGED, [(pk,) for pk in changed])
        self.db.query(self.sql.SET_CURSOR, (position, RECONCILE_ROW_PK))
        self.mark_gone(gone)
        self.db.commit()

    def finish_reconcile(self) -> None:
        self.db.query(self.sql.DELETE_ROW, (RECONCILE_ROW_PK,))

    # -- status ----------------------------------------------------------------

    def oldest_pending_seconds(self) -> int | None:
        age = self.db.query(self.sql.OLDEST_PENDING_SECONDS)[0]["age"]
        return None if age is None else int(age)

    def count_pending(self) -> int:
        return int(self.db.query(self.sql.COUNT_PENDING)[0]["n"])

    def status_report(self, source: PacsSource) -> dict[str, Any]:
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

    def held_reasons(self, source: PacsSource) -> dict[str, int]:
        """Why pending studies wait, as a run would decide now: reason ->
        how many (among the first STATUS_PENDING_ROWS pending)."""
        window = self.stability_window()
        reasons: collections.Counter[str] = collections.Counter()
        for row in itertools.islice(source.pending_studies(), STATUS_PENDING_ROWS):
            reason = (
                None if source.schema.withdrawn(row) else hold_reason(row, source.schema, window)
            )
            if reason:
                reasons[reason] += 1
        return dict(reasons)


# --------------------------------------------------------------------------
# Document: one study's fields -> the JSON the service receives (pure)
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
    """The JSON document for one study, with the original client's value
    types, from its fields as dcm4chee 2.x names them (Dcm4chee2.fields)."""
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


def document_fingerprint(body: bytes) -> bytes:
    """The MD5 of a request body, kept in study_service.sent_version once the
    service acknowledged it: the same document is never sent twice."""
    return hashlib.md5(body).digest()


# --------------------------------------------------------------------------
# Delivery: sending, pacing, retries, answers
#
# Sender makes one exchange with the service, with a deadline on the whole
# of it; SendPool runs the exchanges on worker threads, as many at once as
# ConcurrencyLimit allows; StudyFates decides what each answer means for its
# study (sent, refused, to be tried again now or at a later run) and for the
# run (go on, or stop); Delivery and deliver() tie them together for one
# run, with studies_to_send() deciding what goes and in which order.
# --------------------------------------------------------------------------

# Retry-After can ask for hours; a cron tick should give up sooner.
MAX_RETRY_AFTER_SECONDS = 30
# "Too many requests" and "overloaded": with Retry-After, they pause every
# request and lower the concurrency limit.
OVERLOAD_STATUSES = (429, 503)
# Answers that say "not now" rather than "not this study": a study that gets
# one is tried up to 3 x max_retries more times in the run (a 500 says
# "this request breaks me": max_retries).
TRANSIENT_STATUSES = (408, 429, 502, 503, 504)
TRANSIENT_RETRY_FACTOR = 3
QUICK_RETRY_FACTOR = 0.1  # of the backoff, while most requests succeed
ERROR_TEXT_CHARS = 200  # how much of a refusal's body is kept in last_error
ERROR_BODY_BYTES = 4096  # read of an error's body; the rest is never read
SUCCESS_BODY_BYTES = 65536  # read of a 2xx body (unused), to keep the connection
ACK_FLUSH_ROWS = 200  # acknowledgements written per transaction...
ACK_FLUSH_SECONDS = 1.0  # ...or at least this often: bounds resends after a crash
# A study to blame for its failure (StudyFates._resolve) waits this long
# before its next attempt, at a later run, doubling with each failure up to
# STUDY_RETRY_MAX_SECONDS.
STUDY_RETRY_FIRST_SECONDS = 60
STUDY_RETRY_MAX_SECONDS = 3600
# A run stops after max_consecutive_failures studies in a row that got no
# answer, or that were refused; after this many times that number when the
# answers were 5xx (a backend failing now and then must not stop it).
FAILING_STREAK_FACTOR = 4
DEADLINE_CHECK_SECONDS = 0.1
# After SIGTERM, requests already in flight may finish for this long (their
# answers are recorded); systemd's default stop timeout is 90 s, a shutdown's
# patience often 10 s.
TERMINATION_GRACE_SECONDS = 7.0
AUTO_REPORT_SECONDS = 5.0  # -v: a line about the concurrency limit this often

# What an answer is, for its study and for the run (Outcome.kind).
DELIVERED = "delivered"  # 2xx (a DELETE: or 404, already gone)
KEY_REFUSED = "key refused"  # 401: every study would get it
WRONG_URL = "wrong url"  # 3xx, 404, 405: a setting, not a study, is wrong
REFUSED = "refused"  # another 4xx: this study, unless every study gets it
FAILING = "failing"  # 5xx, 408, 429: try again
UNREACHABLE = "unreachable"  # no complete answer (urllib3 retried it already)
INTERNAL = "internal"  # a bug while sending
# Why a run stopped early, beside those kinds.
REFUSING = "refusing"  # every study tried was refused
TERMINATED = "terminated"  # SIGTERM
STOP_EXIT_CODES = {
    KEY_REFUSED: EXIT_KEY_REFUSED,
    WRONG_URL: EXIT_DELIVERY,
    UNREACHABLE: EXIT_DELIVERY,
    FAILING: EXIT_DELIVERY,
    REFUSING: EXIT_REJECTED,
    TERMINATED: EXIT_TERMINATED,
    INTERNAL: EXIT_INTERNAL,
}


def study_backoff_seconds(attempts: int) -> int:
    """How long a study that failed `attempts` times waits for its next try."""
    return min(STUDY_RETRY_MAX_SECONDS, STUDY_RETRY_FIRST_SECONDS * 2 ** min(attempts - 1, 16))


@dataclass
class Outcome:
    """One study on its way: what is sent, and what the service answered."""

    study_pk: int
    fingerprint: bytes | None  # of the body; None for a DELETE
    study_iuid: str | None
    deletion: bool = False  # a DELETE for a study gone from the PACS, not a POST
    attempts: int = 0  # failed attempts recorded before this run
    body: bytes = field(default=b"", repr=False)
    tries: int = 0  # exchanges in this run
    delivered: bool = False
    status_code: int | None = None
    error: str | None = None  # one line, never patient data
    retry_after: float | None = None  # the service asked everyone to wait this long
    timed_out: bool = False
    latency: float | None = None  # one round trip, when it was one
    internal_error: BaseException | None = None
    fate: str = PENDING  # what the queue records: SENT, FAILED, PENDING, DELETING
    wait_seconds: int | None = None  # PENDING: until the next attempt (None: next run)
    awaits_judgement: bool = False  # SendPool holds new requests until it is judged

    @property
    def kind(self) -> str:
        code = self.status_code
        if self.internal_error is not None:
            return INTERNAL
        if self.delivered:
            return DELIVERED
        if code is None:
            return UNREACHABLE
        if code == 401:
            return KEY_REFUSED
        if 300 <= code < 400 or code in ((405,) if self.deletion else (404, 405)):
            return WRONG_URL
        if code >= 500 or code in TRANSIENT_STATUSES:
            return FAILING
        return REFUSED


@dataclass
class StopReason:
    kind: str  # a key of STOP_EXIT_CODES
    message: str


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
AUTO_OVERLOAD_FACTOR = 0.5  # multiplicative decrease, at most once per round trip
# 5xx answers say the service is saturated only when they are most of the
# last round trip's answers (at least this many): a backend that fails one
# request in four is failing, not full, and fewer requests would not help.
AUTO_FAILURE_SHARE = 0.5
AUTO_FAILURE_MIN_ANSWERS = 8


class ConcurrencyLimit:
    """How many requests may be in flight, and the pause that a 429 or 503
    with Retry-After imposes on all of them.

    With a fixed `concurrency` the limit never moves. With "auto" it starts at
    1 and grows by half every round trip while the latency holds (slow start,
    gentler than TCP's doubling: ten centers starting together overshoot
    less), then follows LEDBAT's increase, at most +1/4 per round trip while
    the queueing delay is under the target, and sheds up to 30% per round
    trip while it is over; a Retry-After, a timeout, or a round trip of
    mostly 5xx halves it, at most once per round trip. It does not grow
    while the client cannot fill it (the database side is the bottleneck), so
    it never drifts to a number it never tried.
    """

    def __init__(
        self, fixed: int | None, maximum: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # self.allowed: how many requests may be in flight, a float that
        # grows by fractions; int(allowed) of them start.
        self.clock = clock  # tests pass their own
        self.adaptive = fixed is None
        self.maximum = maximum if fixed is None else fixed
        self.allowed = float(min(AUTO_START_LIMIT, maximum) if fixed is None else fixed)
        self.in_flight = 0
        self.paused_until = 0.0
        self.slow_start = True
        self.last_decrease = 0.0
        self.base_minutes: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=AUTO_BASE_MINUTES
        )
        self.recent: collections.deque[float] = collections.deque(maxlen=AUTO_RECENT_SAMPLES)
        self.failures: collections.deque[bool] = collections.deque(maxlen=AUTO_RECENT_SAMPLES)
        self.latency_total = 0.0
        self.latency_count = 0
        self.turn = threading.Condition()

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Waits for a free slot and for any pause to end; False if cancelled."""
        with self.turn:
            while not cancelled():
                pause = self.paused_until - self.clock()
                if pause <= 0 and self.in_flight < int(self.allowed):
                    self.in_flight += 1
                    return True
                self.turn.wait(timeout=min(pause, 0.25) if pause > 0 else 0.25)
            return False

    def release(
        self, latency: float | None, overloaded: bool = False, failed: bool = False
    ) -> None:
        """One request is over. `latency`: its round trip, None when it says
        nothing about the service's queue (retried inside urllib3, no
        answer); `overloaded`: the service said so, or did not answer in
        time; `failed`: a 5xx."""
        with self.turn:
            in_flight = self.in_flight
            self.in_flight -= 1
            before = int(self.allowed)
            if failed or latency is not None:
                self.failures.append(failed)
            if overloaded or (failed and self.mostly_failing()):
                self._decrease()
            elif latency is not None:
                self._measure(latency, in_flight)
            self.turn.notify(1 + max(0, int(self.allowed) - before))

    def pause(self, seconds: float) -> bool:
        """No request starts for `seconds` (the service's Retry-After);
        True if this starts a pause rather than extending one."""
        with self.turn:
            now = self.clock()
            started = self.paused_until <= now
            self.paused_until = max(self.paused_until, now + seconds)
            return started and seconds > 0

    def mostly_failing(self) -> bool:
        """Whether most answers of the last round trip were 5xx."""
        window = max(AUTO_FAILURE_MIN_ANSWERS, int(self.allowed))
        last = list(itertools.islice(reversed(self.failures), window))
        return len(last) >= AUTO_FAILURE_MIN_ANSWERS and sum(last) > AUTO_FAILURE_SHARE * len(last)

    def _measure(self, latency: float, in_flight: int) -> None:
        self.latency_total += latency
        self.latency_count += 1
        minute = int(self.clock() // 60)
        if self.base_minutes and self.base_minutes[-1][0] == minute:
            self.base_minutes[-1] = (minute, min(self.base_minutes[-1][1], latency))
        else:
            self.base_minutes.append((minute, latency))
        self.recent.append(latency)
        if not self.adaptive or in_flight < self.allowed / 2:
            return  # the client, not the service, is what limits the pace now
        base = self.base_latency()
        target = max(AUTO_TARGET_SECONDS, AUTO_TARGET_FRACTION * base)
        delay = self.current_latency() - base
        if self.slow_start and delay <= target / 2:
            self.allowed = min(self.maximum, self.allowed + AUTO_SLOW_START_STEP)
            return
        self.slow_start = False
        if delay <= target:
            # LEDBAT's increase: in proportion to the room left under the
            # target, +1 per round trip at most (one answer in `limit`).
            room = (target - delay) / target
            self.allowed = min(float(self.maximum), self.allowed + AUTO_GAIN * room / self.allowed)
        else:
            # Down by a share of the limit, not by a constant as LEDBAT does:
            # additive increase with multiplicative decrease is what makes
            # several clients converge to equal shares (Chiu and Jain), so ten
            # centers loading together end up at the same pace.
            excess = min(1.0, (delay - target) / target)
            self.allowed = max(1.0, self.allowed - AUTO_DECREASE_PER_ROUND_TRIP * excess)

    def current_latency(self) -> float:
        """The mean of the last half round trip's answers."""
        window = max(2, int(self.allowed / 2))
        last = list(itertools.islice(reversed(self.recent), window))
        return sum(last) / len(last) if last else self.base_latency()

    def _decrease(self) -> None:
        now = self.clock()
        self.slow_start = False
        if self.adaptive and now - self.last_decrease >= max(self.current_latency(), 0.05):
            self.allowed = max(1.0, self.allowed * AUTO_OVERLOAD_FACTOR)
            self.last_decrease = now

    def base_latency(self) -> float:
        """The unloaded round trip: the lowest in the last AUTO_BASE_MINUTES."""
        return min((low for _, low in self.base_minutes), default=0.0)

    def mean_latency(self) -> float | None:
        return self.latency_total / self.latency_count if self.latency_count else None

    def describe(self) -> str:
        """For the summary line and -v: "concurrency 37 (auto, up to 64), latency 51 ms"."""
        mode = f"auto, up to {self.maximum}" if self.adaptive else "fixed"
        text = f"concurrency {int(self.allowed)} ({mode})"
        mean = self.mean_latency()
        if mean is not None:
            text += f", latency {mean * 1000:.0f} ms (unloaded {self.base_latency() * 1000:.0f} ms)"
        return text


# The DeadlineWatch of the request running on each thread, for the
# connections that urllib3 opens on it.
_THREAD_WATCH = threading.local()


class DeadlineWatch:
    """Ends any request still running at its deadline (connect + read
    timeouts), by shutting its socket down. urllib3's timeouts bound each
    wait for a byte, not the exchange: a service that trickles its answer a
    byte at a time would hold a worker, and the run, as long as it liked.

    Each thread writes only its own entry (deadline, connections, expired),
    and the watching thread reads a copy: under the interpreter lock that
    needs no lock of its own, which 64 senders would queue on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # thread id -> [deadline, connections, expired (ever), shut (this attempt)]
        self.running: dict[int, list[Any]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="deadlines", daemon=True)
        self.thread.start()

    def begin(self) -> None:
        """A request starts on this thread."""
        _THREAD_WATCH.value = self
        self.running[threading.get_ident()] = [time.monotonic() + self.seconds, (), False, False]

    def attempt(self, connection: Any) -> None:
        """urllib3 starts an attempt on `connection` (its first, or a retry):
        each attempt has the whole deadline."""
        entry = self.running.get(threading.get_ident())
        if entry is not None:
            entry[0], entry[1], entry[3] = time.monotonic() + self.seconds, (connection,), False

    def end(self) -> bool:
        """The request is over; True if its deadline passed meanwhile."""
        entry = self.running.pop(threading.get_ident(), None)
        return entry is not None and entry[2]

    def close(self) -> None:
        self.stopping.set()

    def _watch(self) -> None:
        while not self.stopping.wait(DEADLINE_CHECK_SECONDS):
            now = time.monotonic()
            for entry in list(self.running.values()):
                if entry[0] <= now and not entry[3]:
                    entry[2] = entry[3] = True
                    for connection in entry[1]:
                        _shut_down(connection)


def _shut_down(connection: Any) -> None:
    """Ends a connection's exchange from another thread: the waiting read
    returns at once, and urllib3 treats the connection as lost."""
    import socket

    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_URLLIB3_CLASSES: dict[str, Any] = {}


def _urllib3_classes() -> dict[str, Any]:
    """urllib3's pools, with connections that tell the thread's DeadlineWatch
    of every attempt they start, and its Retry with jitter and a bounded
    Retry-After. Made on first use: urllib3 is imported only by a run that
    sends something (a tick with nothing to send never pays for it)."""
    if _URLLIB3_CLASSES:
        return _URLLIB3_CLASSES
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import InvalidHeader
    from urllib3.util.retry import Retry

    def watched(base: type) -> type:
        class Watched(base):  # type: ignore[misc, valid-type]
            def connect(self, *args: Any, **kwargs: Any) -> Any:
                _tell_watch(self)
                return super().connect(*args, **kwargs)

            def request(self, *args: Any, **kwargs: Any) -> Any:
                _tell_watch(self)
                return super().request(*args, **kwargs)

        return Watched

    class WatchedHTTPPool(HTTPConnectionPool):
        ConnectionCls = watched(HTTPConnection)

    class WatchedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = watched(HTTPSConnection)

    class BoundedRetry(Retry):
        """Jitter keeps several clients from retrying in lockstep; the cap
        keeps a cron tick from sleeping for hours on a Retry-After."""

        def get_backoff_time(self) -> float:
            return super().get_backoff_time() * random.uniform(0.5, 1.5)

        def get_retry_after(self, response: Any) -> float | None:
            try:
                seconds = super().get_retry_after(response)
            except InvalidHeader:  # "Retry-After: soon": as if absent
                return None
            return None if seconds is None else min(seconds, MAX_RETRY_AFTER_SECONDS)

    _URLLIB3_CLASSES.update(
        pools={"http": WatchedHTTPPool, "https": WatchedHTTPSPool}, retry=BoundedRetry
    )
    return _URLLIB3_CLASSES


def _tell_watch(connection: Any) -> None:
    watch = getattr(_THREAD_WATCH, "value", None)
    if watch is not None:
        watch.attempt(connection)


def _transport_retries(settings: Settings) -> Any:
    """urllib3's Retry for what never got an answer (refused or lost
    connections, timeouts), with exponential backoff. Answers, 5xx included,
    come back at once: what they mean is StudyFates' business, and a study
    retried later does not keep a worker asleep."""
    retry = _urllib3_classes()["retry"]
    options: dict[str, Any] = {
        "total": settings.max_retries,
        "connect": settings.max_retries,
        "read": settings.max_retries,
        "status": 0,
        "other": 0,
        "redirect": 0,
        "backoff_factor": settings.backoff_seconds,
        "respect_retry_after_header": False,
        "raise_on_status": False,
        "raise_on_redirect": False,
    }
    methods = frozenset({"POST", "DELETE", "GET"})
    try:
        return retry(allowed_methods=methods, **options)
    except TypeError:  # urllib3 < 1.26: method_whitelist, and no `other`
        del options["other"]
        return retry(method_whitelist=methods, **options)


@dataclass
class Answer:
    """What one exchange with the service gave."""

    status: int | None = None  # None: no complete HTTP answer
    text: str = ""  # the start of the body, on one line
    location: str | None = None  # a redirect's
    retry_after: float | None = None
    latency: float | None = None  # one round trip; None if urllib3 retried it
    error: str | None = None  # why there is no answer
    timed_out: bool = False


class Sender:
    """One exchange at a time per worker thread, over one pool of keep-alive
    connections that the threads share.

    It calls urllib3, the transport under requests, directly: requests'
    per-request objects (sessions, prepared requests, cookie jars, responses)
    cost 7% of the throughput over a 50 ms network with 16 connections (286
    studies/s against 306, measured). requests still reads the proxy
    settings of the environment, when there are any. Every exchange is
    bounded: a deadline on the whole of it (DeadlineWatch), and the body of
    an answer read up to a small cap, the rest never read.
    """

    def __init__(self, settings: Settings) -> None:
        import urllib3

        self.settings = settings
        self.url = settings.webservice_url
        self.headers = {"Content-Type": "application/json", "X-Api-Key": settings.key}
        self.retries = _transport_retries(settings)
        self.watch = DeadlineWatch(settings.request_deadline_seconds)
        options: dict[str, Any] = {
            "num_pools": 1,
            "maxsize": settings.concurrency or settings.max_concurrency,
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
        if proxy is not None:
            proxy_url, proxy_headers = proxy
            self.pool = urllib3.ProxyManager(proxy_url, proxy_headers=proxy_headers, **options)
        else:
            self.pool = urllib3.PoolManager(**options)
        self.pool.pool_classes_by_scheme = _urllib3_classes()["pools"]
        self.http_error = urllib3.exceptions.HTTPError
        self.read_timeout = urllib3.exceptions.ReadTimeoutError

    def close(self) -> None:
        self.watch.close()
        self.pool.clear()

    def send(self, outcome: Outcome, body: bytes) -> None:
        """Registers (POST) or removes (DELETE) one study; records the answer
        in `outcome`. Never raises for network trouble."""
        outcome.tries += 1
        answer = self._exchange("DELETE" if outcome.deletion else "POST", body)
        status = answer.status
        outcome.status_code = status
        outcome.latency = answer.latency
        outcome.retry_after = answer.retry_after
        outcome.timed_out = answer.timed_out
        # For a DELETE, 404 means already gone: done.
        outcome.delivered = status is not None and (
            200 <= status < 300 or (outcome.deletion and status == 404)
        )
        if status is None:
            outcome.error = answer.error
        elif outcome.delivered:
            outcome.error = None
        else:
            outcome.error = redact(_answer_line(answer))

    def probe(self) -> tuple[int, str]:
        """For `check`: reaches the service with the key without registering
        anything (a GET); the exit code a run would meet (EXIT_OK: fine)
        and one line. A redirect fails: a POST would not follow it. A
        service that answers a GET (405, 200) may not look at the key for it,
        and only a POST would prove it, which could register a study: the
        line says so rather than call the key good."""
        where = _safe_url(self.url)
        answer = self._exchange("GET", None)
        code = answer.status
        if code is None:
            return EXIT_DELIVERY, f"{where}: {answer.error}"
        if 300 <= code < 400:
            return EXIT_DELIVERY, (
                f"{where} answered HTTP {code}, a redirect to"
                f" {_safe_url(answer.location or '(no Location)')}: set webservice_url to the"
                " address it redirects to (a POST is never redirected)"
            )
        if code in (401, 403):
            return EXIT_KEY_REFUSED, f"the service refused the key (HTTP {code})"
        if code >= 500:
            return EXIT_DELIVERY, f"the service is failing (HTTP {code})"
        return EXIT_OK, (
            f"{where} answered HTTP {code}; the API key is verified only when the first"
            " study is sent"
        )

    def _exchange(self, method: str, body: bytes | None) -> Answer:
        answer = Answer()
        self.watch.begin()
        started = time.monotonic()
        try:
            response = self.pool.urlopen(
                method,
                self.url,
                body=body,
                headers=self.headers,
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
        except self.http_error as exc:
            expired = self.watch.end()
            answer.timed_out = expired or _caused_by(exc, self.read_timeout)
            answer.error = self._describe(exc, expired)
            return answer
        answer.status = response.status
        answer.location = response.headers.get("Location")
        if response.status in OVERLOAD_STATUSES:
            answer.retry_after = self.retries.get_retry_after(response)
        complete = False
        try:
            cap = SUCCESS_BODY_BYTES if 200 <= response.status < 300 else ERROR_BODY_BYTES
            data = response.read(cap + 1)
            complete = len(data) <= cap
            answer.text = " ".join(data[:cap].decode("utf-8", "replace").split())
        except (self.http_error, OSError):
            pass  # the status line arrived: it is the answer
        finally:
            expired = self.watch.end()
            complete = complete and not expired  # a cut read can end without an error
            if not complete:
                # A body too long, or cut: never read the rest, drop the connection.
                response.close()
            response.release_conn()
        answer.timed_out = expired
        if expired and not complete:
            answer.text = f"(its body did not arrive within {self.watch.seconds:g} s)"
        retried = bool(response.retries and response.retries.history)
        answer.latency = None if retried else time.monotonic() - started
        return answer

    def _describe(self, exc: BaseException, expired: bool) -> str:
        """One line for an exchange without an answer: timeout, TLS, or unreachable."""
        import ssl

        import urllib3

        if expired:
            return f"no complete answer within {self.watch.seconds:g} s"
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
            return redact(f"TLS error: {_reason(chain)}")
        return redact(f"cannot reach the service: {_reason(chain)}")


def _answer_line(answer: Answer) -> str:
    """'HTTP 422: {"error": ...}', for last_error and the log."""
    line = f"HTTP {answer.status}"
    if answer.status is not None and 300 <= answer.status < 400:
        line += f" (a redirect to {_safe_url(answer.location or '(no Location)')})"
    text = answer.text[:ERROR_TEXT_CHARS]
    return f"{line}: {text}" if text else line


def _default_ca_bundle() -> str:
    """certifi's bundle, which is what requests uses."""
    import certifi

    return certifi.where()


def _environment_proxy(url: str) -> tuple[str, dict[str, str]] | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read as requests reads them and
    taken as curl takes them: "host:port" without a scheme is an HTTP proxy,
    and user:password in it is sent as Proxy-Authorization (and hidden from
    every log line). requests itself (5 MB of memory: measured) is imported
    only when one of them is set, which on most PACS servers none is."""
    if not any(name.lower().endswith("_proxy") and value for name, value in os.environ.items()):
        return None
    import urllib3
    from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy

    proxy = select_proxy(url, get_environ_proxies(url))
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    user, password = get_auth_from_url(proxy)
    parts = urllib.parse.urlsplit(proxy)
    headers: dict[str, str] = {}
    if user or password:
        hide_secrets(password, parts.password)
        headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        proxy = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return proxy, headers


def _caused_by(exc: BaseException, kind: Any) -> bool:
    return any(isinstance(e, kind) for e in _cause_chain(exc))


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


class Stop:
    """A request to end the run soon (SIGTERM: systemd stop, kill), passed
    down to what loops. The run takes no new study, lets the requests in
    flight finish for TERMINATION_GRACE_SECONDS, records every
    acknowledgement it has and exits 143. The handler only sets a flag:
    raising inside whatever the main thread was doing (writing
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
    failed: int = 0  # refused (4xx) for good: marked failed
    undelivered: int = 0  # left pending after a failure
    gone: int = 0  # found deleted from the PACS
    deleted: int = 0  # DELETEs acknowledged
    held: int = 0  # left pending for a later run (stability window, arc-light's counts)
    pending: int | None = None  # None: the run never got to count them
    oldest_pending_seconds: int | None = None
    stop: StopReason | None = None  # why the run stopped early
    last_error: str | None = None  # the last delivery failure, for the summary
    started: float = field(default_factory=time.monotonic)
    concurrency: ConcurrencyLimit | None = None  # the sending's, once it started

    def summary(self) -> str:
        extra = "".join(
            f", {name} {count}"
            for name, count in (("held", self.held), ("deleted", self.deleted))
            if count
        )
        if self.concurrency is not None and self.concurrency.latency_count:
            extra += f", {self.concurrency.describe()}"
        return (
            f"enqueued {self.enqueued}, sent {self.sent}, unchanged {self.unchanged},"
            f" failed {self.failed}, still pending {self.pending or 0}{extra},"
            f" {time.monotonic() - self.started:.1f} s"
        )

    @property
    def exit_code(self) -> int:
        """The run's exit code: the only place a sending run's is decided."""
        if self.stop is not None:
            return STOP_EXIT_CODES[self.stop.kind]
        if self.undelivered:
            return EXIT_DELIVERY
        if self.failed:
            return EXIT_REJECTED
        return EXIT_OK


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


class StudyFates:
    """What each answer means for its study, and whether the run goes on.

    - 2xx: sent. 401, a redirect, 404 or 405: every study would get the
      same, so the run stops at once and they stay pending.
    - 5xx, 408, 429: sent again in this run after a backoff (or the
      service's Retry-After), up to max_retries more times (3 x that for
      "not now" answers: 502, 503, 504, 408, 429).
    - A failure that is final for this run (no answer, or 5xx past those
      tries) and another 4xx are held until the run knows whose fault they
      are. An acceptance after them says the service works: a refused study
      is refused for good (failed); a failing one waits before its next
      attempt, longer after each failure (study_backoff_seconds), while the
      others go on. A stop says the service is down, failing, or refusing
      everything: they stay pending, for the next run, after its new studies.
    - Studies in a row, none accepted: max_consecutive_failures without an
      answer, or refused, or 4 x that in all, stop the run. All refused
      with 403: the key is refused.
    """

    def __init__(self, settings: Settings, report: RunReport) -> None:
        self.settings = settings
        self.report = report
        self.concurrency = report.concurrency  # what it says of the service's health
        self.accepted = False  # the service accepted a study in this run
        self.streak: dict[int, str] = {}  # not accepted since the last acceptance: pk -> kind
        self.unresolved: list[Outcome] = []  # final failures since the last acceptance
        self.decided: list[Outcome] = []  # for the queue to record

    def judge(self, outcome: Outcome) -> float | None:
        """Decides one answer; returns in how many seconds to send the
        study again in this run, or None when it is decided (or held)."""
        kind = outcome.kind
        if outcome.delivered:
            verb = "deleted" if outcome.deletion else "sent"
            log.debug("study %d %s (HTTP %s)", outcome.study_pk, verb, outcome.status_code)
        else:
            log.debug("study %d not delivered: %s", outcome.study_pk, outcome.error)
        if kind == DELIVERED:
            self._accepted(outcome)
            return None
        if kind in (KEY_REFUSED, WRONG_URL, INTERNAL):
            self._stop_at_once(outcome, kind)
            return None
        self.streak[outcome.study_pk] = kind
        if outcome.deletion:
            self._decide(outcome, DELETING)  # tried again at the next run
        elif kind == FAILING and self.report.stop is None and self._has_tries_left(outcome):
            self._check_streak(outcome)
            if self.report.stop is None:
                return self._retry_in(outcome)
            self.last_try(outcome)
        else:
            self.unresolved.append(outcome)
            self._check_streak(outcome)
        return None

    def last_try(self, outcome: Outcome) -> None:
        """A study waiting for another try in this run, which ends first."""
        self.unresolved.append(outcome)
        if self.report.stop is not None:
            self._resolve_unresolved()

    def close(self) -> None:
        """At the end of the run: what is still held is decided."""
        self._resolve_unresolved()

    def _accepted(self, outcome: Outcome) -> None:
        self.accepted = True
        self.streak.clear()
        self._decide(outcome, SENT)
        for held in self.unresolved:
            self._resolve(held, accepted_after=True)
        self.unresolved.clear()

    def _resolve_unresolved(self) -> None:
        for held in self.unresolved:
            self._resolve(held, accepted_after=False)
        self.unresolved.clear()

    def _resolve(self, outcome: Outcome, accepted_after: bool) -> None:
        """A held failure's fate.

        Refused: for good if the service accepts other studies (one after it,
        or some before it in a run that ended normally); else pending.
        Failing or unanswered: the study is to blame, and waits before its
        next attempt, if the service accepted a study after it; or, in a run
        that ended normally, if it accepted any, or the study failed before;
        or, in a run that stopped (the service down, failing, refusing), if
        it accepted others while this study failed once more. Otherwise it
        goes at the next run, after the new studies: a service that was down
        must not leave studies waiting once it is back."""
        if outcome.kind == REFUSED:
            if accepted_after or (self.accepted and self.report.stop is None):
                log.warning("study %d refused by the service: %s", outcome.study_pk, outcome.error)
                self._decide(outcome, FAILED)
            else:
                self._decide(outcome, PENDING)
            return
        failed_before = outcome.attempts > 0
        if accepted_after:
            blamed = True
        elif self.report.stop is None:
            blamed = self.accepted or (outcome.kind == FAILING and failed_before)
        else:
            blamed = self.accepted and failed_before
        if blamed:
            self._decide(outcome, PENDING, study_backoff_seconds(outcome.attempts + 1))
        else:
            self._decide(outcome, PENDING)

    def _stop_at_once(self, outcome: Outcome, kind: str) -> None:
        if kind == KEY_REFUSED:
            message = f"the service refused the API key ({outcome.error})"
        elif kind == WRONG_URL:
            url = _safe_url(self.settings.webservice_url)
            message = (
                f"the service answered {outcome.error} at {url}:"
                f" check webservice_url in {self.settings.config_path}"
            )
        else:
            assert outcome.internal_error is not None
            log.debug("study %d", outcome.study_pk, exc_info=outcome.internal_error)
            message = internal_error_line(outcome.internal_error)
            outcome.error = f"internal error: {type(outcome.internal_error).__name__}"
        self._stop(kind, message)
        self._decide(outcome, DELETING if outcome.deletion else PENDING)

    def _check_streak(self, outcome: Outcome) -> None:
        """Stops the run when the studies not accepted in a row say the
        service, not the studies, is the problem."""
        most = self.settings.max_consecutive_failures
        kinds = list(self.streak.values())
        refused = [o for o in self.unresolved if o.kind == REFUSED]
        if kinds.count(UNREACHABLE) >= most:
            self._stop(
                UNREACHABLE,
                f"{kinds.count(UNREACHABLE)} studies in a row could not be delivered,"
                f" last: {outcome.error}",
            )
        elif len(refused) >= most and all(o.status_code == 403 for o in refused):
            self._stop(
                KEY_REFUSED,
                f"the service refused the API key ({outcome.error}): {len(refused)} studies"
                " in a row answered 403 and none was accepted",
            )
        elif len(refused) >= most:
            self._stop(
                REFUSING,
                f"the service refuses every study: the last {len(refused)} tried were all"
                f" refused and none was accepted (last: {outcome.error}); they stay pending",
            )
        elif len(kinds) >= FAILING_STREAK_FACTOR * most:
            self._stop(
                FAILING,
                f"the service is failing: {len(kinds)} studies in a row were not accepted"
                f" (last: {outcome.error})",
            )

    def _stop(self, kind: str, message: str) -> None:
        if self.report.stop is None:
            self.report.stop = StopReason(kind, message)
        self._resolve_unresolved()

    def _has_tries_left(self, outcome: Outcome) -> bool:
        factor = TRANSIENT_RETRY_FACTOR if outcome.status_code in TRANSIENT_STATUSES else 1
        return outcome.tries <= self.settings.max_retries * factor

    def _retry_in(self, outcome: Outcome) -> float:
        """When to send a failing study again: the service's Retry-After; or,
        while most other requests succeed (a backend failing now and then),
        soon, behind the others, so that the run does not wait long for its
        last studies; or, while most fail, after an exponential backoff."""
        if outcome.retry_after is not None:
            return outcome.retry_after  # every request waits as long (ConcurrencyLimit.pause)
        if self.concurrency is not None and not self.concurrency.mostly_failing():
            backoff = self.settings.backoff_seconds * QUICK_RETRY_FACTOR
        else:
            backoff = self.settings.backoff_seconds * 2 ** (outcome.tries - 1)
        return min(backoff * random.uniform(0.5, 1.5), MAX_RETRY_AFTER_SECONDS)

    def _decide(self, outcome: Outcome, fate: str, wait: int | None = None) -> None:
        outcome.fate, outcome.wait_seconds = fate, wait
        outcome.body = b""
        self.decided.append(outcome)
        report = self.report
        if fate == SENT and outcome.deletion:
            report.deleted += 1
        elif fate == SENT:
            report.sent += 1
        elif fate == FAILED:
            report.failed += 1
        else:
            report.undelivered += 1
            report.last_error = outcome.error


class Acknowledgements:
    """Decided outcomes waiting to be written to the queue, written in
    batches: one transaction per ACK_FLUSH_ROWS, or per ACK_FLUSH_SECONDS,
    which bounds what a crash makes the next run send again."""

    def __init__(self, study_queue: StudyServiceQueue) -> None:
        self.queue = study_queue
        self.outcomes: list[Outcome] = []
        self.unchanged: list[int] = []
        self.last_flush = time.monotonic()

    def flush(self, force: bool = False) -> None:
        due = len(self.outcomes) + len(self.unchanged) >= ACK_FLUSH_ROWS
        if force or due or time.monotonic() - self.last_flush >= ACK_FLUSH_SECONDS:
            self.queue.record(self.outcomes, self.unchanged)
            self.outcomes.clear()
            self.unchanged.clear()
            self.last_flush = time.monotonic()


class SendPool:
    """Worker threads that send what they are handed, as many at once as the
    ConcurrencyLimit allows, and hand back each outcome (None for a study
    never sent because the run was stopping: it stays pending, untried).

    Plain queues rather than futures: the per-study overhead is what limits
    a run on a fast network, and every thread shares one interpreter lock.
    Workers are started as the limit grows: a tick with three studies
    starts one or two.

    Until the service has accepted a study in this run, a failed answer is
    judged before the next request goes out: whether 403 after 403 means a
    refused key is the main thread's decision, and a worker that went on
    meanwhile would send every study of the run to a service refusing them
    all, as many as the main thread was slow (on a loaded machine, all)."""

    def __init__(
        self, sender: Sender, concurrency: ConcurrencyLimit, halted: Callable[[], bool]
    ) -> None:
        self.sender = sender
        self.concurrency = concurrency
        self.stopping = threading.Event()  # every study would fail alike, or closed
        self.run_halted = halted
        self.jobs: queue.Queue = queue.Queue(maxsize=concurrency.maximum * 2)
        self.answers: queue.Queue = queue.Queue()
        self.workers: list[threading.Thread] = []
        self.outstanding = 0  # handed over and not answered yet (the main thread's count)
        self.judging = threading.Condition()
        self.unjudged = 0  # failed answers handed back and not judged yet
        self.accepted = False  # the service accepted a study in this run

    def halted(self) -> bool:
        return self.stopping.is_set() or self.run_halted()

    def submit(self, outcome: Outcome, timeout: float) -> bool:
        """Hands one study over; False if none could be taken within `timeout`."""
        wanted = min(self.concurrency.maximum, int(self.concurrency.allowed))
        while len(self.workers) < wanted:
            worker = threading.Thread(
                target=self._work, name=f"sender-{len(self.workers)}", daemon=True
            )
            worker.start()
            self.workers.append(worker)
        try:
            self.jobs.put(outcome, timeout=timeout) if timeout else self.jobs.put_nowait(outcome)
        except queue.Full:
            return False
        self.outstanding += 1
        return True

    def take(self, wait: float = 0.0) -> Iterator[Outcome | None]:
        """The answers that came, waiting up to `wait` seconds for the first."""
        block = wait > 0
        while self.outstanding:
            try:
                answer = self.answers.get(block=block, timeout=wait if block else None)
            except queue.Empty:
                return
            self.outstanding -= 1
            block = False
            yield answer

    def drop_waiting(self) -> None:
        """Studies handed over but not started stay pending, untried."""
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                return
            self.outstanding -= 1

    def close(self) -> None:
        """Tells the workers to end (those still waiting on the service end
        when it answers, or at their deadline)."""
        self.drop_waiting()
        self.stopping.set()  # a worker holding for a judgement stops holding
        for _ in self.workers:
            self.jobs.put(None)

    def judged(self, outcome: Outcome) -> None:
        """The main thread has judged this answer: held requests may go."""
        with self.judging:
            if outcome.delivered:
                self.accepted = True
            if outcome.awaits_judgement:
                outcome.awaits_judgement = False
                self.unjudged -= 1
            self.judging.notify_all()

    def _judgement_awaited(self) -> bool:
        """Waits while a failure is not judged yet; False once the run stops."""
        with self.judging:
            while self.unjudged and not self.halted():
                self.judging.wait(0.05)
        return not self.halted()

    def _work(self) -> None:
        while True:
            outcome = self.jobs.get()
            if outcome is None:
                return
            if (
                not self._judgement_awaited()
                or self.halted()
                or not self.concurrency.acquire(self.halted)
            ):
                self.answers.put(None)
                continue
            try:
                self.sender.send(outcome, outcome.body)
            except BaseException as exc:  # a bug: it ends the run, never hangs it
                outcome.internal_error = exc
            finally:
                self._release(outcome)
            with self.judging:
                if not outcome.delivered and not self.accepted:
                    outcome.awaits_judgement = True
                    self.unjudged += 1
            if outcome.kind in (KEY_REFUSED, WRONG_URL, INTERNAL):
                # Every other study would get the same answer: the other workers
                # stop at once, not when the main thread gets to this one.
                self.stopping.set()
            self.answers.put(outcome)

    def _release(self, outcome: Outcome) -> None:
        """Tells the concurrency limit what this exchange said of the service."""
        concurrency = self.concurrency
        if outcome.status_code is None:
            concurrency.release(None, overloaded=outcome.timed_out)
        elif outcome.kind == FAILING and outcome.retry_after is not None:
            # The service asked everyone to wait: no request starts meanwhile.
            if concurrency.pause(outcome.retry_after):
                log.info(
                    "the service answered HTTP %d: all sending paused for %g s (%s)",
                    outcome.status_code,
                    outcome.retry_after,
                    concurrency.describe(),
                )
            concurrency.release(None, overloaded=True)
        elif outcome.kind == FAILING:
            concurrency.release(None, overloaded=outcome.timed_out, failed=True)
        else:
            # Only an acceptance is a reason to send more at once: a service
            # refusing every study quickly must not draw a burst of refusals.
            concurrency.release(outcome.latency if outcome.delivered else None)


class Delivery:
    """One run's sending: studies handed to the pool, their answers judged,
    those worth another try in this run sent again when due, and the
    acknowledgements written in batches."""

    def __init__(
        self,
        pacs: PacsDatabase,
        sender: Sender,
        settings: Settings,
        report: RunReport,
        stop: Stop,
        total: int | Callable[[], int],
    ) -> None:
        self.report = report
        self.stop = stop
        self.progress = _progress_bar(total, "sending")
        report.concurrency = ConcurrencyLimit(settings.concurrency, settings.max_concurrency)
        self.fates = StudyFates(settings, report)
        self.acks = Acknowledgements(pacs.queue)
        self.pool = SendPool(sender, report.concurrency, self.halted)
        self.retries: list[tuple[float, int, Outcome]] = []  # a heap, by when they are due
        self.sequence = itertools.count()
        self.last_report = time.monotonic()

    def halted(self) -> bool:
        """The run takes no new study: it was stopped, or SIGTERM came."""
        if self.stop.requested() and self.report.stop is None:
            self.report.stop = StopReason(TERMINATED, "terminated (SIGTERM): no new study taken")
        return self.report.stop is not None

    def send(self, outcome: Outcome) -> bool:
        """Hands one study to the pool, taking answers while it is full;
        False once the run stops (the study stays pending)."""
        while not self.halted():
            self._resend_due()
            if self.pool.submit(outcome, timeout=ACK_FLUSH_SECONDS / 4):
                self.take_answers()
                return True
            self.take_answers()
        return False

    def unchanged(self, study_pk: int) -> None:
        """Rewritten in the PACS, but the document is what the service has."""
        self.acks.unchanged.append(study_pk)
        self.report.unchanged += 1
        self.progress.update(1)

    def take_answers(self, wait: float = 0.0) -> None:
        for outcome in self.pool.take(wait):
            if outcome is None:
                continue
            retry_in = self.fates.judge(outcome)
            self.pool.judged(outcome)
            if retry_in is not None:
                due = time.monotonic() + retry_in
                heapq.heappush(self.retries, (due, next(self.sequence), outcome))
        self._record_decided()
        self.acks.flush()
        if time.monotonic() - self.last_report >= AUTO_REPORT_SECONDS:
            concurrency = self.pool.concurrency
            log.debug("%s, %d in flight", concurrency.describe(), concurrency.in_flight)
            self.last_report = time.monotonic()

    def finish(self) -> None:
        """Waits for the answers still due and sends the retries as they
        come due; after a stop, only for the answers in flight (after
        SIGTERM, for TERMINATION_GRACE_SECONDS at most)."""
        while (self.pool.outstanding or self.retries) and not self.halted():
            self._resend_due()
            wait = ACK_FLUSH_SECONDS
            if self.retries:
                wait = min(wait, max(0.01, self.retries[0][0] - time.monotonic()))
            if self.pool.outstanding:
                self.take_answers(wait)
            else:
                time.sleep(wait)  # only retries left, none due yet
        self.pool.drop_waiting()
        while self.pool.outstanding:
            if self.stop.requested() and self.stop.grace_over():
                # Still waiting on the service: those studies stay pending.
                log.warning("requests still unanswered after SIGTERM: left pending")
                break
            self.take_answers(ACK_FLUSH_SECONDS / 4)
        for _, _, outcome in self.retries:
            self.fates.last_try(outcome)
        self.retries.clear()
        self.fates.close()
        self._record_decided()

    def close(self) -> None:
        """Ends the workers and writes what is decided, whatever happened."""
        self.pool.close()
        self.progress.close()
        self._record_decided()
        self.acks.flush(force=True)

    def _resend_due(self) -> None:
        now = time.monotonic()
        while self.retries and self.retries[0][0] <= now and not self.halted():
            _, _, outcome = self.retries[0]
            if not self.pool.submit(outcome, timeout=0):
                return  # the pool is full: at the next look
            heapq.heappop(self.retries)

    def _record_decided(self) -> None:
        decided = self.fates.decided
        if decided:
            self.acks.outcomes.extend(decided)
            self.progress.update(len(decided))
            decided.clear()


def deliver(
    pacs: PacsDatabase,
    sender: Sender,
    settings: Settings,
    report: RunReport,
    stop: Stop,
    max_studies: int | None = None,
    total: int | Callable[[], int] = 0,
    window: StabilityWindow | None = None,
    frontier: Callable[[int], int | None] | None = None,
) -> None:
    """Sends every pending study (at most `max_studies`), recording each
    answer in the queue; then, with send_deletes, the DELETEs due.

    The main thread reads pages, builds documents and writes acknowledgements
    while worker threads wait on HTTP, so the database work overlaps the
    network. A study is marked sent only after a 2xx; after a crash, at most
    max_resent_after_crash() studies are posted again.
    """
    delivery = Delivery(pacs, sender, settings, report, stop, total)
    cap = RateCap(settings.max_studies_per_second)
    submitted = 0
    try:
        for outcome in studies_to_send(pacs, settings, delivery, window, frontier):
            if max_studies is not None and submitted >= max_studies:
                break
            if not delivery.send(outcome):
                break
            submitted += 1
            cap.passed()
        delivery.finish()
        if not delivery.halted():
            delete_gone(pacs, sender, settings, delivery)
    finally:
        delivery.close()


def studies_to_send(
    pacs: PacsDatabase,
    settings: Settings,
    delivery: Delivery,
    window: StabilityWindow | None,
    frontier: Callable[[int], int | None] | None,
) -> Iterator[Outcome]:
    """The studies to send in this run, in the order they go: those never
    tried, in pk order (as the initial load enqueues them), then those whose
    next attempt after a failure is due, so that a study that keeps failing
    never stands ahead of the others. Along the way: a study gone from the
    PACS is marked, one that waits (still receiving images, arc-light's
    counts not computed) is left for a later run, and one whose document is
    what the service already has is recorded as such."""
    source, schema, report = pacs.source, pacs.schema, delivery.report

    def bounded_frontier(reached: int) -> int | None:
        # After SIGTERM, stop waiting for the initial load's next page.
        return None if frontier is None or delivery.stop.requested() else frontier(reached)

    rows = itertools.chain(
        source.new_studies(bounded_frontier if frontier else None), source.due_studies()
    )
    for row in rows:
        if delivery.halted():
            return
        if schema.withdrawn(row):
            # Deleted from the PACS (or, on arc-light, rejected) since enqueued.
            pacs.queue.mark_gone([(row["queued_pk"], row["known_iuid"])])
            report.gone += 1
            continue
        if hold_reason(row, schema, window):
            report.held += 1
            continue
        body = encode_document(study_document(schema.fields(row), settings.center))
        fingerprint = document_fingerprint(body)
        if fingerprint == row["sent_version"]:
            delivery.unchanged(row["study_pk"])
            continue
        yield Outcome(
            row["study_pk"],
            fingerprint,
            _text(row["study_iuid"]),
            attempts=row["attempts"],
            body=body,
        )


def delete_gone(pacs: PacsDatabase, sender: Sender, settings: Settings, delivery: Delivery) -> None:
    """DELETEs, one at a time: studies leave the PACS rarely, and by hand."""
    for row in pacs.queue.deleting_studies():
        outcome = Outcome(row["study_pk"], None, _text(row["study_iuid"]), deletion=True)
        if settings.send_deletes:
            body = encode_document(
                {"study_iuid": outcome.study_iuid, "study_pk": outcome.study_pk,
                 "center": settings.center}
            )  # fmt: skip
            sender.send(outcome, body)
        else:
            outcome.delivered = True  # send_deletes was turned off meanwhile
        delivery.fates.judge(outcome)
        delivery.take_answers()
        if delivery.halted():
            return


def print_pending_documents(
    pacs: PacsDatabase, settings: Settings, out: Any, max_studies: int | None
) -> int:
    """--dry-run: the JSON documents the pending studies would be sent as,
    one per line, and nothing else: no write to the database (a study gone
    from the PACS is only logged), no request, no lock."""
    log.info("dry run: printing the pending studies' documents, sending and writing nothing")
    window = pacs.queue.stability_window()
    printed = 0
    for row in pacs.source.pending_studies():
        if max_studies is not None and printed >= max_studies:
            break
        if pacs.schema.withdrawn(row):
            log.info("dry run: study %d is gone from the PACS (a run marks it)", row["queued_pk"])
            continue
        reason = hold_reason(row, pacs.schema, window)
        if reason:
            log.info("dry run: study %d waits: %s", row["study_pk"], reason)
            continue
        document = study_document(pacs.schema.fields(row), settings.center)
        out.write(json.dumps(document, ensure_ascii=False) + "\n")
        printed += 1
    return printed


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

# How many committed pages the initial load's enqueueing may run ahead of the
# sending. Unpaced, it ran ahead (about 2,000 studies/s against 1,300 sent,
# measured at 1,000,000 studies): on an archive larger than the buffer pool
# its pages were evicted before the sending read them again, so each was
# read from disk twice. Paced, the archive is read from disk once, at the
# sending's speed, and each page is still in the buffer pool when the
# sending reads it again.
INITIAL_LEAD_PAGES = 4


class InitialLoad:
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
            self.enqueued = self.pacs.queue.enqueue_initial(
                self.pacs.source, self._advance, self._keep_going
            )
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
    settings: Settings, command: str, max_studies: int | None, report: RunReport, stop: Stop
) -> int:
    """`client.py` (a tick), `initial` and `retry-failed`."""
    pacs = open_pacs(settings)
    sender: Sender | None = None
    loader: InitialLoad | None = None
    try:
        pacs.queue.acquire_run_lock()
        if command == "initial":
            pacs.queue.start_initial()
        if command == "retry-failed":
            log.info("%d failed or waiting studies made pending again", pacs.queue.retry_failed())
        # The tick first: its transaction and the initial load's pages would
        # otherwise lock the same rows in different orders.
        found_by_tick = pacs.source.enqueue_changes()
        report.enqueued += found_by_tick
        state = pacs.queue.initial_state()
        if state is not None and state["status"] == "initial" and pacs.source.pipelined_initial:
            log.info("enqueueing the whole archive (initial load) and sending as it goes")
            loader = InitialLoad(settings)
            loader.start()
        elif state is not None and state["status"] == "initial":
            log.info("enqueueing the whole archive (initial load), then sending")
            # The archive includes what the tick found: each study counted once.
            loaded = pacs.queue.enqueue_initial(
                pacs.source, lambda count, position: None, lambda: not stop.requested()
            )
            report.enqueued = max(loaded, found_by_tick)
        pending = pacs.queue.count_pending()
        if pending or loader:
            sender = Sender(settings)
            deliver(
                pacs,
                sender,
                settings,
                report,
                stop,
                max_studies=max_studies,
                total=pacs.source.count_studies if loader else pending,
                window=pacs.queue.stability_window(),
                frontier=loader.frontier if loader else None,
            )
        if loader:
            # The archive includes what the tick found: each study counted once.
            report.enqueued = max(loader.finish(), found_by_tick)
            loader = None
        report.pending = pacs.queue.count_pending()
        report.oldest_pending_seconds = (
            pacs.queue.oldest_pending_seconds() if report.pending else None
        )
        if pacs.queue.finish_initial():
            log.info("initial load complete")
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        if loader is not None:  # leaving on an error: stop reading the archive
            loader.stop()
        if sender is not None:
            sender.close()
        pacs.close()
    _log_run_end(report)
    return report.exit_code


def _log_run_end(report: RunReport) -> None:
    """The lines a run ends with: why it stopped, what was refused, the summary."""
    if report.stop is not None:
        log.error("run stopped: %s", report.stop.message)
    if report.failed:
        log.error(
            "%d studies were refused by the service and marked failed;"
            " see `client.py status`, then `client.py retry-failed`",
            report.failed,
        )
    if report.undelivered and report.stop is None:
        log.error(
            "%d studies could not be delivered and stay pending; last error: %s",
            report.undelivered,
            report.last_error,
        )
    (log.info if report.exit_code == EXIT_OK else log.error)("%s", report.summary())


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
    body = encode_document(study_document(schema.fields(row), center))
    return document_fingerprint(body) != row["sent_version"]


def reconcile(
    pacs: PacsDatabase, settings: Settings, max_studies: int | None, stop: Stop
) -> ReconcileReport:
    """Sweeps the archive in pk pages, throttled, enqueueing what the tick
    cannot see: patient edits and merges, deletions, restored studies."""
    report = ReconcileReport()
    position = pacs.queue.reconcile_position()
    if position:
        log.info("resuming reconcile after study pk %d", position)
    rate = settings.reconcile_rows_per_second
    page_size = max(1, min(settings.page_size, rate))
    bar = _progress_bar(pacs.source.count_studies, "reconciling")
    cap = RateCap(rate)
    try:
        while (max_studies is None or report.checked < max_studies) and not stop.requested():
            size = (
                page_size if max_studies is None else min(page_size, max_studies - report.checked)
            )
            page = pacs.source.reconcile_page(position, size)
            upto = page[-1]["study_pk"] if page else MAX_PK
            changed = []
            for row in page:
                if row["status"] is None:
                    report.untracked += 1
                elif needs_resend(row, settings.center, pacs.schema):
                    changed.append(row["study_pk"])
            gone = pacs.source.gone_between(position, upto)
            pacs.queue.record_reconciled(changed, gone, upto if page else position)
            report.checked += len(page)
            report.changed += len(changed)
            report.gone += len(gone)
            bar.update(len(page))
            if not page:
                report.finished = True
                pacs.queue.finish_reconcile()
                break
            position = upto
            cap.passed(len(page))
    finally:
        bar.close()
        report.seconds = time.monotonic() - cap.started
    return report


def run_reconcile(settings: Settings, max_studies: int | None, stop: Stop) -> int:
    pacs = open_pacs(settings)
    try:
        pacs.queue.acquire_run_lock()
        result = pacs.source.reconcile(pacs, settings, max_studies, stop)
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
    return STOP_EXIT_CODES[TERMINATED] if stop.requested() else EXIT_OK


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
        pacs.queue.acquire_run_lock()
        pacs.source.enqueue_changes()  # the tick's first step: imported studies become pending
        old = open_pacs(old_settings)
        rows = (
            row
            for row in pacs.source.pending_studies()
            if not pacs.schema.withdrawn(row) and pacs.schema.settled(row)
        )  # not settled: counts not computed yet, the next adopt sees it
        while True:
            batch = list(itertools.islice(rows, settings.page_size))
            if not batch:
                break
            checked += len(batch)
            adopted += _adopt(pacs, old, batch, settings.center)
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


def _adopt(pacs: PacsDatabase, old: PacsDatabase, rows: list[dict[str, Any]], center: str) -> int:
    """Records as sent those of `rows` that the old archive's indexer delivered."""
    delivered = old.source.delivered_iuids([_text(row["study_iuid"]) for row in rows])
    outcomes = []
    for row in rows:
        iuid = _text(row["study_iuid"])
        if iuid in delivered:
            body = encode_document(study_document(pacs.schema.fields(row), center))
            outcome = Outcome(row["study_pk"], document_fingerprint(body), iuid)
            outcome.fate = SENT
            outcomes.append(outcome)
    pacs.queue.record(outcomes, [])
    return len(outcomes)


def run_status(settings: Settings, as_json: bool) -> int:
    pacs = open_pacs(settings)
    try:
        pacs.queue.check_installed()
        status = pacs.queue.status_report(pacs.source)
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        pacs.close()
    if as_json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(redact("\n".join(_status_lines(pacs.where, status))))
    return EXIT_OK


def _status_lines(where: str, status: dict[str, Any]) -> list[str]:
    counts = status["counts"]
    lines = [f"study_service in {where}"]
    for name in (SENT, PENDING, FAILED, DELETING, DELETED):
        lines.append(f"  {name:<8} {counts.get(name, 0):>10,}")
    for reason, count in sorted(status["held"].items()):
        lines.append(f"  held     {count:>10,}  {reason}")
    if status["waiting_to_retry"]:
        lines.append(
            f"  waiting  {status['waiting_to_retry']:>10,}  failed, tried again from"
            f" {status['next_retry_at']} (or now: client.py retry-failed)"
        )
    age = status["oldest_pending_seconds"]
    lines.append("oldest pending: " + ("none" if age is None else _format_age(age)))
    lines.append("last delivery:  " + (status["last_sent_at"] or "never"))
    load = status["initial_load"]
    if status["run_under_way"]:
        since = f", an initial load started {load['started_at']}" if load else ""
        lines.append(f"run:            under way (another client.py holds the run lock{since})")
    if load and status["run_under_way"]:
        lines.append(f"initial load:   under way, enqueued up to study pk {load['position_pk']}")
    elif load:
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
    return lines


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
    results: list[tuple[str, str, int]] = []  # (ok/FAILED/skipped/warning, message, exit code)
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
        results.append(_check_service(settings))
    results += [("warning", warning, 0) for warning in settings.warnings]
    for state, message, _ in results:
        print(redact(f"{state:<7} {message}"))
    failed = [code for state, _, code in results if state == "FAILED"]
    return failed[0] if failed else EXIT_OK


def _check_service(settings: Settings) -> tuple[str, str, int]:
    sender = Sender(settings)
    try:
        code, message = sender.probe()
    finally:
        sender.close()
    return ("ok" if code == EXIT_OK else "FAILED", f"webservice: {message}", code)


def _check_database(settings: Settings) -> list[tuple[str, str, int]]:
    """The PACS's lines of `check`: connection, schema, installation,
    privileges, how a tick finds what changed."""
    try:
        pacs = open_pacs(settings)
    except IndexerError as exc:
        return [("FAILED", f"{'source' if settings.source == 'orthanc' else 'database'}: {exc}",
                 exc.exit_code)]  # fmt: skip
    results = []
    try:
        results += _check_connection(settings, pacs)
        fast, message = pacs.source.time_index()
        results.append(("ok" if fast else "warning", message, 0))
    except pacs.Error as exc:
        results.append(("FAILED", f"database: {pacs.describe(exc)}", EXIT_DATABASE))
    finally:
        pacs.close()
    return results


def _check_connection(settings: Settings, pacs: Any) -> list[tuple[str, str, int]]:
    version = pacs.server_version()
    if settings.source == "orthanc":
        user = settings.orthanc_user or "no user"
        results = [("ok", f"source: {pacs.where}, {version}, credentials of {user} accepted", 0)]
    else:
        line = f"database: connected to {pacs.where} as {settings.db_user} (server {version})"
        results = [("ok", line, 0), ("ok", f"schema: {pacs.schema.name}", 0)]
    try:
        pacs.queue.check_installed()
    except DatabaseError as exc:
        return [*results, ("FAILED", f"indexer: {exc}", EXIT_DATABASE)]
    if settings.source == "orthanc":
        queue_version = pacs.db.query(pacs.queue.sql.SERVER_VERSION)[0]["v"]
        return [*results, ("ok", f"queue: {settings.queue_file} ({queue_version}), current", 0)]
    results.append(("ok", "study_service and indexer_process are installed and current", 0))
    problems = pacs.privilege_problems()
    fix = f"; fix: run {pacs.grant_script} (see README)"
    results += [("FAILED", f"privileges: {p}{fix}", EXIT_DATABASE) for p in problems]
    if not problems:
        results.append(("ok", f"privileges: {settings.db_user} may do what a run does", 0))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Registers the studies of a PACS with the central indexer: dcm4chee 2.x"
        " and dcm4chee-arc-light 5 through their database (MySQL/MariaDB or PostgreSQL,"
        ' config.json "database"), Orthanc through its REST API ("orthanc").',
        epilog="exit codes:\n"
        + "".join(f"  {code:<4} {meaning}\n" for code, meaning in EXIT_CODE_HELP),
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=(*SENDING_COMMANDS, "reconcile", "status", "check", "adopt"),
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
    parser.add_argument(
        "--limit",
        type=int,
        dest="max_studies",
        metavar="N",
        help="send (reconcile: check) at most N studies in this run",
    )
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
    concurrency = report.concurrency
    if concurrency is not None and concurrency.latency_count:
        values["concurrency_limit"] = int(concurrency.allowed)
        values["latency_seconds"] = concurrency.mean_latency()
        values["unloaded_latency_seconds"] = concurrency.base_latency()
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
SHORT_SECRET_CHARS = 6


def hide_secrets(*secrets: str | None) -> None:
    """From now on, these never appear in a log line or a printed message."""
    _SECRETS.update(secret for secret in secrets if secret)


def redact(text: str) -> str:
    """`text` with every secret blanked out, also as a repr or a URL writes
    it: the last line of defence for text no one wrote for a log (a driver's
    error, a traceback, a service that echoes the key back)."""
    for secret in _SECRETS:
        for form in {secret, repr(secret)[1:-1], urllib.parse.quote(secret, safe="")}:
            if len(form) >= SHORT_SECRET_CHARS:
                text = text.replace(form, "***")
            elif form:
                # A secret of a few characters (a test's) would blank every
                # word it is part of: only where it stands alone.
                text = re.sub(rf"(?<!\w){re.escape(form)}(?!\w)", "***", text)
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
    if args.max_studies is not None and args.max_studies < 1:
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
    _SECRETS.clear()
    hide_secrets(settings.key, settings.db_password, settings.orthanc_password)
    sending = args.command in SENDING_COMMANDS and not args.dry_run
    if args.command != "check":  # check lists every problem and warning itself
        problems = list(settings.problems)
        key_problem = settings.key_problem() if sending else None
        if key_problem is not None:
            problems.append(key_problem)
        if problems:
            more = len(problems) - 1
            log.error("%s%s", problems[0], f" ({more} more: see client.py check)" if more else "")
            return EXIT_CONFIG
        # Under cron (-q) too: a secret readable by every user of the PACS
        # server, or sent in clear, is worth a mail until it is fixed.
        for warning in settings.warnings:
            log.warning("%s", warning)
    if settings.log_file:
        _add_log_file(settings.log_file, args.verbose)
    report, stop = RunReport(), Stop()
    long_running = sending or args.command == "reconcile"
    if long_running:
        _yield_cpu_to_the_pacs(settings.nice)
    with _sigterm_requests(stop, long_running):
        exit_code = _run_guarded(lambda: COMMANDS[args.command](args, settings, report, stop))
    if exit_code is None:
        return EXIT_LOCKED  # no metrics: the run that holds the lock writes them
    if sending and settings.metrics_file:
        write_metrics(settings.metrics_file, report, exit_code)
    return exit_code


def _run_guarded(command: Callable[[], int]) -> int | None:
    """Runs a command; an expected failure becomes one line and its exit
    code, anything else one line and EXIT_INTERNAL (-v: the traceback).
    None: the run stood aside for another."""
    try:
        return command()
    except LockedError as exc:
        # Standing aside is routine (cron while a long initial runs): INFO,
        # so that -q keeps cron quiet.
        log.info("%s", exc)
        return None
    except IndexerError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; what was acknowledged is recorded, the rest stays pending")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for cron, the traceback with -v
        log.debug("internal error", exc_info=True)
        log.error("%s", internal_error_line(exc))
        return EXIT_INTERNAL


class _sigterm_requests:  # noqa: N801 (used as a context manager, like a function)
    """SIGTERM asks `stop` to end the run, for as long as the block runs.
    Python takes signals in the main thread only (tests call main()
    elsewhere): there, or when not wanted, it changes nothing."""

    def __init__(self, stop: Stop, wanted: bool) -> None:
        self.stop = stop
        self.active = wanted and threading.current_thread() is threading.main_thread()
        self.previous: Any = None

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self.stop.request)

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.previous)


def _yield_cpu_to_the_pacs(nice: int) -> None:
    """On the PACS server, the PACS and its database come first: when the
    CPU is short, the scheduler serves them before the indexer."""
    if hasattr(os, "nice"):
        current = os.nice(0)
        if current < nice:
            os.nice(nice - current)


def run_dry(settings: Settings, max_studies: int | None) -> int:
    """--dry-run: the documents the pending studies would be sent as."""
    pacs = open_pacs(settings)
    try:
        print_pending_documents(pacs, settings, sys.stdout, max_studies)
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        pacs.close()
    return EXIT_OK


SENDING_COMMANDS = ("run", "initial", "retry-failed")
# What each command runs: (args, settings, report, stop) -> exit code.
COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, RunReport, Stop], int]] = {
    "status": lambda args, settings, report, stop: run_status(settings, args.json),
    "check": lambda args, settings, report, stop: run_check(settings),
    "reconcile": lambda args, settings, report, stop: run_reconcile(
        settings, args.max_studies, stop
    ),
    "adopt": lambda args, settings, report, stop: run_adopt(settings, args.adopt_from),
    **{
        name: lambda args, settings, report, stop: (
            run_dry(settings, args.max_studies)
            if args.dry_run
            else run_send(settings, args.command, args.max_studies, report, stop)
        )
        for name in SENDING_COMMANDS
    },
}


if __name__ == "__main__":
    raise SystemExit(main())
