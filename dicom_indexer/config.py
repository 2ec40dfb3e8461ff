"""config.json and server.json -> Settings, checked once, at load."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engines import ENGINES
from .errors import ConfigError
from .http import credential_problem, split_credentials
from .logs import Secrets
from .study_service import QUEUE_FILE_NAME

ENV_DB_PASSWORD = "DICOM_INDEXER_DB_PASSWORD"
ENV_KEY = "DICOM_INDEXER_KEY"
ENV_ORTHANC_PASSWORD = "DICOM_INDEXER_ORTHANC_PASSWORD"
ENV_DICOMWEB_PASSWORD = "DICOM_INDEXER_DICOMWEB_PASSWORD"
ENV_DICOMWEB_TOKEN = "DICOM_INDEXER_DICOMWEB_TOKEN"
# The sections that name a site's source: exactly one of them.
SOURCE_SECTIONS = ("database", "orthanc", "dicomweb", "dimse")
# An AE title: up to 16 characters of printable ASCII but the backslash (PS3.5, AE).
AE_TITLE_RE = re.compile(r"^[ -\[\]-~]{1,16}$")


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSettings:
    """The central service, as Sender (and check) needs it: nothing else of
    config.json reaches the HTTP exchange with the service."""

    url: str
    key: str
    ca_bundle: str | None
    connect_timeout_seconds: float
    read_timeout_seconds: float
    max_retries: int
    backoff_seconds: float
    max_connections: int
    secrets: Secrets


@dataclass(frozen=True)
class DatabaseSettings:
    """A dcm4chee database, as its engine needs it to connect."""

    engine: str  # a key of ENGINES
    host: str
    port: int
    user: str
    password: str
    name: str
    unix_socket: str | None


@dataclass(frozen=True)
class OrthancSettings:
    """An Orthanc's REST API, as OrthancClient needs it."""

    url: str
    user: str
    password: str
    ca_bundle: str | None
    connect_timeout_seconds: float
    read_timeout_seconds: float
    secrets: Secrets


@dataclass(frozen=True)
class DicomwebSettings:
    """A PACS's QIDO-RS service, as DicomwebFinder needs it."""

    url: str  # the DICOMweb root (".../dicom-web"), without credentials
    auth: str  # "none", "basic" or "bearer"
    user: str
    password: str = field(repr=False)
    token: str = field(repr=False)
    ca_bundle: str | None
    result_cap: int | None  # the PACS's known result cap, if the site knows it
    change_feed: str  # "none", or the vendor's change feed read instead of windows ("azure")
    connect_timeout_seconds: float
    read_timeout_seconds: float
    secrets: Secrets


@dataclass(frozen=True)
class DimseSettings:
    """A PACS's C-FIND service, as DimseFinder needs it."""

    host: str
    port: int
    pacs_ae: str  # the PACS's AE title (the called AE)
    indexer_ae: str  # ours (the calling AE), registered in the PACS
    tls_ca_bundle: str | None  # TLS: the CA that signed the PACS's certificate
    tls_certificate: str | None  # our certificate, when the PACS asks for one
    tls_key: str | None
    timezone: str | None  # the PACS's time zone ("America/Santiago", "-03:00"); None: ours
    result_cap: int | None
    connect_timeout_seconds: float
    read_timeout_seconds: float  # DIMSE and network timeouts: each answer's wait
    secrets: Secrets


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, from config.json and server.json; the
    defaults are load_settings()'s.

    The two files keep the original client's shapes, which every site already
    has: config.json holds "database" (the connection), "key" and
    "webservice_url", and beside them this client's optional settings;
    server.json holds "server", the center's code, sent as "center".
    """

    # "dcm4chee" (section "database"), "orthanc", "dicomweb" or "dimse": a key
    # of sources.KNOWN_SOURCES, named by its config.json section.
    source: str
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
    queue_file: Path  # Orthanc, DICOMweb, DIMSE: the queue's SQLite file
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
    # The key and the passwords (and, later, what the HTTP layer makes of
    # them): what no log line or message may show.
    secrets: Secrets = field(default_factory=Secrets, compare=False, repr=False)
    # The source's own section, for the sources whose settings are read
    # only as a whole (None for the others).
    dicomweb_section: DicomwebSettings | None = None
    dimse_section: DimseSettings | None = None

    @property
    def dicomweb(self) -> DicomwebSettings:
        assert self.dicomweb_section is not None, "not a DICOMweb site"
        return self.dicomweb_section

    @property
    def dimse(self) -> DimseSettings:
        assert self.dimse_section is not None, "not a DIMSE site"
        return self.dimse_section

    @property
    def service(self) -> ServiceSettings:
        return ServiceSettings(
            url=self.webservice_url,
            key=self.key,
            ca_bundle=self.ca_bundle,
            connect_timeout_seconds=self.connect_timeout_seconds,
            read_timeout_seconds=self.read_timeout_seconds,
            max_retries=self.max_retries,
            backoff_seconds=self.backoff_seconds,
            max_connections=self.concurrency or self.max_concurrency,
            secrets=self.secrets,
        )

    @property
    def database(self) -> DatabaseSettings:
        return DatabaseSettings(
            engine=self.db_engine,
            host=self.db_host,
            port=self.db_port,
            user=self.db_user,
            password=self.db_password,
            name=self.db_name,
            unix_socket=self.db_unix_socket,
        )

    @property
    def orthanc(self) -> OrthancSettings:
        return OrthancSettings(
            url=self.orthanc_url,
            user=self.orthanc_user,
            password=self.orthanc_password,
            ca_bundle=self.orthanc_ca_bundle,
            connect_timeout_seconds=self.connect_timeout_seconds,
            read_timeout_seconds=self.read_timeout_seconds,
            secrets=self.secrets,
        )

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
    named = [name for name in SOURCE_SECTIONS if name in top.data]
    chosen = named[0] if named else "database"
    for other in named[1:]:
        top.problem(other, f"and '{chosen}' are both set: keep the one this site's PACS is")
    sections = {
        name: top.section(name) if name == chosen else _Fields(config_path, {}, [], name + ".")
        for name in SOURCE_SECTIONS
    }
    db = sections["database"]
    tuning = _tuning_fields(top)
    dicomweb = dimse = None
    if chosen == "database":
        source = {**_connection_fields(db), **_NO_ORTHANC}
    elif chosen == "orthanc":
        # An Orthanc site: its REST API, and the queue in a file of its own.
        source = _orthanc_fields(sections["orthanc"], top, config_path)
    else:
        # DICOMweb and DIMSE: the PACS's query service, the queue in a file.
        source = {**_NO_ORTHANC, **_QUEUE_FILE_ONLY, "source": chosen}
        source["queue_file"] = _queue_file(top, config_path)
        if chosen == "dicomweb":
            dicomweb = _dicomweb_fields(sections["dicomweb"], tuning)
        else:
            dimse = _dimse_fields(sections["dimse"], tuning)
    settings = Settings(
        **source,
        **_service_fields(top),
        **tuning,
        center=server.code("server"),
        config_path=config_path,
        server_path=server_path,
        dicomweb_section=dicomweb,
        dimse_section=dimse,
    )
    warnings = [
        f"{fields.path}: unknown field '{name}' ignored (misspelt?)"
        for fields in (top, *sections.values(), server)
        for name in fields.unknown()
    ]
    warnings += _exposure_warnings(settings, db, top)
    secrets = Secrets(settings.key, settings.db_password, settings.orthanc_password)
    if dicomweb is not None:
        secrets.add(dicomweb.password)
        secrets.add(dicomweb.token)
        secrets.add(split_credentials(dicomweb.url)[2])
    for url in (settings.orthanc_url, settings.webservice_url):
        secrets.add(split_credentials(url)[2])
    return dataclasses.replace(
        settings,
        warnings=tuple(warnings),
        problems=tuple(problems),
        secrets=secrets,
        dicomweb_section=dicomweb and dataclasses.replace(dicomweb, secrets=secrets),
        dimse_section=dimse and dataclasses.replace(dimse, secrets=secrets),
    )


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


_QUEUE_FILE_ONLY: dict[str, Any] = {
    "db_engine": "sqlite",
    "db_host": "",
    "db_port": 0,
    "db_user": "",
    "db_password": "",
    "db_name": "",
    "db_unix_socket": None,
}


def _queue_file(top: _Fields, config_path: Path) -> Path:
    """Where a source without a database of ours keeps the queue: beside config.json."""
    return top.file_path("queue_file") or config_path.resolve().with_name(QUEUE_FILE_NAME)


def _existing_file(fields: _Fields, name: str) -> str | None:
    """An optional field naming a file that must exist (a CA bundle, a key)."""
    value = fields.text(name, default=None)
    if value is not None and not Path(value).is_file():
        fields.problem(name, f"file not found: {value}", separator=": ")
    return value


def _result_cap(fields: _Fields) -> int | None:
    if fields.data.get("result_cap") is None:
        fields.ignore("result_cap")
        return None
    cap: int = fields.number("result_cap", default=None, minimum=1, maximum=1000000)
    return cap


def _dicomweb_fields(web: _Fields, tuning: dict[str, Any]) -> DicomwebSettings:
    """ "dicomweb": a QIDO-RS root and how to authenticate to it."""
    url = web.text("url").rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        web.problem("url", "must start with http:// or https://")
    url, url_user, url_password = split_credentials(url)
    password, password_source = _secret(web, "password", "password_file", ENV_DICOMWEB_PASSWORD)
    token, token_source = _secret(web, "token", "token_file", ENV_DICOMWEB_TOKEN)
    user = web.text("user", default="", allow_empty=True) or url_user
    password = password or url_password
    default_auth = "bearer" if token else "basic" if (user or password) else "none"
    auth = web.choice("auth", default=default_auth, choices=("none", "basic", "bearer"))
    if auth == "basic" and not user:
        web.problem("user", 'is missing: auth "basic" needs a user and a password')
    if auth == "bearer" and not token:
        web.problem(
            "token",
            f'is missing: auth "bearer" needs a token (or token_file, or {ENV_DICOMWEB_TOKEN})',
        )
    for what, value, source in (
        ("user", user, f"{web.path}: field 'dicomweb.user'"),
        ("password", password, password_source),
    ):
        problem = credential_problem(value) if auth == "basic" and value else None
        if problem:
            web.problems.append(
                ConfigError(
                    f"{source}: the DICOMweb {what} cannot be sent: {problem}",
                    field=f"dicomweb.{what}",
                )
            )
    problem = header_value_problem(token) if auth == "bearer" and token else None
    if problem:
        web.problems.append(
            ConfigError(
                f"{token_source}: the DICOMweb token cannot be sent in an HTTP header:"
                f" {problem} (the token is not shown)",
                field="dicomweb.token",
            )
        )
    return DicomwebSettings(
        url=url,
        auth=auth,
        user=user if auth == "basic" else "",
        password=password if auth == "basic" else "",
        token=token if auth == "bearer" else "",
        ca_bundle=_existing_file(web, "ca_bundle"),
        result_cap=_result_cap(web),
        change_feed=web.choice("change_feed", default="none", choices=("none", "azure")),
        connect_timeout_seconds=tuning["connect_timeout_seconds"],
        read_timeout_seconds=tuning["read_timeout_seconds"],
        secrets=Secrets(),
    )


def _ae_title(fields: _Fields, name: str, default: Any = _MISSING) -> str:
    value = fields.text(name, default=default)
    if value and not AE_TITLE_RE.match(value.strip() or "\\"):
        fields.problem(name, "must be an AE title: 1 to 16 characters, no backslash")
    return str(value or "").strip()


def _dimse_fields(dimse: _Fields, tuning: dict[str, Any]) -> DimseSettings:
    """ "dimse": the PACS's C-FIND service: where it listens, both AE titles, TLS."""
    certificate = _existing_file(dimse, "tls_certificate")
    key = _existing_file(dimse, "tls_key")
    if bool(certificate) != bool(key):
        dimse.problem(
            "tls_key" if certificate else "tls_certificate",
            "is missing: a TLS certificate needs its key, and a key its certificate",
        )
    timezone = dimse.text("timezone", default=None)
    if timezone is not None and _zone_problem(timezone):
        dimse.problem("timezone", _zone_problem(timezone) or "", separator=": ")
        timezone = None
    return DimseSettings(
        host=dimse.text("host"),
        port=dimse.number("port", default=104, minimum=1, maximum=65535),
        pacs_ae=_ae_title(dimse, "pacs_ae"),
        indexer_ae=_ae_title(dimse, "indexer_ae", default="DICOM_INDEXER"),
        tls_ca_bundle=_existing_file(dimse, "tls_ca_bundle"),
        tls_certificate=certificate,
        tls_key=key,
        timezone=timezone,
        result_cap=_result_cap(dimse),
        connect_timeout_seconds=tuning["connect_timeout_seconds"],
        read_timeout_seconds=tuning["read_timeout_seconds"],
        secrets=Secrets(),
    )


UTC_OFFSET_RE = re.compile(r"^([+-])(\d{2}):?(\d{2})$")


def _zone_problem(zone: str) -> str | None:
    """Why a time zone cannot be used: an offset ("-03:00", "-0300") or an
    IANA name ("America/Santiago", Python 3.9 and later)."""
    if UTC_OFFSET_RE.match(zone):
        return None
    try:
        import zoneinfo  # Python 3.9+
    except ImportError:
        return f"{zone!r}: a zone name needs Python 3.9 or later; give an offset such as -03:00"
    try:
        zoneinfo.ZoneInfo(zone)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return f"{zone!r} is neither an offset such as -03:00 nor a known zone name"
    return None


def _orthanc_fields(orthanc: _Fields, top: _Fields, config_path: Path) -> dict[str, Any]:
    """ "orthanc": its REST API's address and credentials; and where the queue is."""
    url = orthanc.text("url", default="http://127.0.0.1:8042").rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        orthanc.problem("url", "must start with http:// or https://")
    password, password_source = _secret(orthanc, "password", "password_file", ENV_ORTHANC_PASSWORD)
    user = orthanc.text("user", default="", allow_empty=True) or ""
    url, user, password = _url_credentials(orthanc, url, user, password, password_source)
    ca_bundle = orthanc.text("ca_bundle", default=None)
    if ca_bundle is not None and not Path(ca_bundle).is_file():
        orthanc.problem("ca_bundle", f"file not found: {ca_bundle}", separator=": ")
    queue_file = _queue_file(top, config_path)
    return {
        "source": "orthanc",
        "db_engine": "sqlite",
        "db_host": "",
        "db_port": 0,
        "db_user": "",
        "db_password": "",
        "db_name": "",
        "db_unix_socket": None,
        "orthanc_url": url,  # without credentials: they are orthanc_user and orthanc_password
        "orthanc_user": user,
        "orthanc_password": password,
        "orthanc_ca_bundle": ca_bundle,
        "queue_file": queue_file,
    }


def _url_credentials(
    orthanc: _Fields, url: str, user: str, password: str, password_source: str
) -> tuple[str, str, str]:
    """orthanc.url without the user and password written in it, which join
    (or must agree with) orthanc.user and orthanc.password; each checked to
    be sendable in HTTP Basic authentication (Latin-1, and no ':' in the
    user), with one line naming where it came from and never showing it."""
    url, url_user, url_password = split_credentials(url)
    user_source = f"{orthanc.path}: field 'orthanc.user'"
    if url_user and user and url_user != user:
        orthanc.problem("url", "holds a user other than field 'orthanc.user': keep one of them")
    if url_password and password and url_password != password:
        orthanc.problem(
            "url",
            "holds a password other than orthanc.password (or its file, or"
            f" {ENV_ORTHANC_PASSWORD}): keep one of them",
        )
    if url_user and not user:
        user, user_source = url_user, f"{orthanc.path}: field 'orthanc.url' (its user)"
    if url_password and not password:
        password = url_password
        password_source = f"{orthanc.path}: field 'orthanc.url' (its password)"
    for what, value, source, field_name in (
        ("user", user, user_source, "orthanc.user"),
        ("password", password, password_source, "orthanc.password"),
    ):
        problem = credential_problem(value)
        if what == "user" and not problem and ":" in value:
            problem = "it holds a ':', which HTTP Basic authentication cannot carry in a user"
        if problem:
            orthanc.problems.append(
                ConfigError(
                    f"{source}: the Orthanc {what} cannot be sent: {problem}"
                    f" (the {what} is not shown)",
                    field=field_name,
                )
            )
    return url, user, password


def _service_fields(top: _Fields) -> dict[str, Any]:
    """The central service: where, with which key, trusting which CA."""
    key, key_source = _secret(top, "key", "key_file", ENV_KEY)
    url = top.text("webservice_url")
    if url and not url.startswith(("http://", "https://")):
        top.problem("webservice_url", "must start with http:// or https://")
    # A user and password in it go in an Authorization header (HttpClient).
    _, url_user, url_password = split_credentials(url or "")
    problem = credential_problem(url_user) or credential_problem(url_password)
    if problem:
        top.problem(
            "webservice_url",
            f"holds a user or password that cannot be sent: {problem} (not shown)",
            separator=": ",
        )
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
            (
                "Orthanc password",  # in its field, or written in its URL
                isinstance(orthanc, dict)
                and (orthanc.get("password") or split_credentials(str(orthanc.get("url")))[2]),
            ),
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
    from_file = fields.secret_file(file_field)
    if from_file is not None:
        fields.ignore(name)
        return from_file, f"{fields.path}: the file in field '{fields.prefix}{file_field}'"
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
