"""DICOMweb: a PACS's studies, asked through its QIDO-RS service.

DicomwebFinder asks one question at a time (sources/finding.py: the Finder
protocol) over the one HTTP layer (http.py: a deadline on each whole
query, bodies read up to a bound, no redirect followed, credentials in a
header and never in a message), and says what the PACS answered: the
studies, decoded from DICOM JSON (PS3.18 F.2) but not cleaned, and whether
the PACS says they are all of them. What to ask, and what to make of the
answers, is the harvest's (sources/harvest.py)."""

from __future__ import annotations

import json
import re
import string
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable

from ..errors import EXIT_DATABASE, EXIT_TERMINATED
from ..http import Answer, HttpClient, RunEnding, get_retries, safe_url
from .finding import ChangeFeed, FindResult, FoundSeries, FoundStudy, PacsUnavailable, StudyQuery
from .harvest import COLD_ANSWERS_PER_TICK, HarvestPacs

if TYPE_CHECKING:
    from ..config import DicomwebSettings, Settings

# A query asks for at most this many studies when the PACS's cap is not
# known (dicomweb.result_cap): an answer with as many is a full page, which
# the harvest splits, never pages with `offset` (over a live archive, offset
# paging skips and repeats studies: measured on Orthanc).
DICOMWEB_PAGE = 1000
# StudyInstanceUIDs in one UID-list query (50 measured on Orthanc's plugin;
# a URL stays under 4 KB, which every server takes).
DICOMWEB_UIDS_PER_QUERY = 50
# The largest answer read: a full page of 1,000 studies is about 1 MB
# (2,004 studies: 2.06 MB, measured); 64 MB bounds what a hostile answer (a
# proxy padding it, a fault) makes this client hold.
DICOMWEB_BODY_BYTES = 64 * 1024 * 1024
DICOMWEB_ERROR_BYTES = 4096  # of a refusal's body, for its reason
REASON_CHARS = 100  # of a refusal's reason, in a problem line
SERVER_CHARS = 60  # of the Server header, in check's first line
# urllib3 retries a GET (safe to repeat) that met a connection the server
# had closed (an idle keep-alive); the deadline bounds the query as a whole.
DICOMWEB_RETRIES = 2

# The study-level attributes, by tag.
SPECIFIC_CHARACTER_SET = "00080005"
STUDY_DATE = "00080020"
STUDY_TIME = "00080030"
MODALITIES_IN_STUDY = "00080061"
TIMEZONE_OFFSET = "00080201"
STUDY_DESCRIPTION = "00081030"
PATIENT_NAME = "00100010"
PATIENT_ID = "00100020"
STUDY_INSTANCE_UID = "0020000D"
STUDY_SERIES = "00201206"
STUDY_INSTANCES = "00201208"
MODALITY = "00080060"
SERIES_INSTANCES = "00201209"
# What a study query asks for beyond the standard's default attributes:
# StudyDescription is not among them, and some servers leave out the
# modalities, the counts (Azure) or the offset unless asked.
STUDY_INCLUDE = (
    STUDY_DESCRIPTION,
    MODALITIES_IN_STUDY,
    STUDY_SERIES,
    STUDY_INSTANCES,
    TIMEZONE_OFFSET,
)
SERIES_INCLUDE = (MODALITY, SERIES_INSTANCES)
# What tells the harvest whether a study's series must be asked for.
STUDY_LEVEL = {
    MODALITIES_IN_STUDY: "ModalitiesInStudy",
    STUDY_SERIES: "NumberOfStudyRelatedSeries",
    STUDY_INSTANCES: "NumberOfStudyRelatedInstances",
}
UTF8 = "ISO_IR 192"
# What goes raw into a query string: QIDO servers do not match a
# percent-encoded `*`, `-` or `,` (Orthanc: `%2A` matches nothing,
# measured), so values are written by hand and limited to these.
URL_SAFE = frozenset(string.ascii_letters + string.digits + "-._~")
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# A UID in a server's message: never repeated in ours.
UID_IN_TEXT = re.compile(r"\d+(?:\.\d+){2,}")


class UnreadableAnswer(ValueError):
    """One answer, or one study in it, is not what DICOM JSON says it is:
    the line says which attribute, never its value."""


class DicomwebFinder:
    """Study and series queries to a QIDO-RS service (settings.url, the
    DICOMweb root), one at a time, over HttpClient: keep-alive, a deadline
    on each query as a whole (connect_timeout_seconds +
    read_timeout_seconds), answers bounded by DICOMWEB_BODY_BYTES, no
    redirect followed. Authentication none, basic (user and password) or
    bearer (a token): either way a secret, never in a message. The server
    letting STALLED_DEADLINES deadlines expire in a row, or SIGTERM, ends
    the run (RunEnding)."""

    cold_answers_per_tick = COLD_ANSWERS_PER_TICK  # 300: an idle tick took 0.35 s (measured)

    def __init__(self, settings: DicomwebSettings) -> None:
        self.settings = settings
        self.secrets = settings.secrets
        self.url = settings.url.rstrip("/")
        self.where = f"DICOMweb at {safe_url(self.url)}"
        self.page = settings.result_cap or DICOMWEB_PAGE
        # A UID list's answer must never be a full page (it would not be complete).
        self.max_uids_per_query = max(1, min(DICOMWEB_UIDS_PER_QUERY, self.page - 1))
        headers = {"Accept": "application/dicom+json"}
        if settings.auth == "bearer":
            headers["Authorization"] = f"Bearer {settings.token}"
            self.secrets.add(settings.token, headers["Authorization"])
        self.http = HttpClient(
            self.url,
            peer=self.where,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            retries=get_retries(DICOMWEB_RETRIES),
            max_connections=2,
            ca_bundle=settings.ca_bundle,
            headers=headers,
            user=settings.user if settings.auth == "basic" else "",
            password=settings.password if settings.auth == "basic" else "",
            error_prefix=f"{self.where}: ",
            deadline_per_attempt=False,
            secrets=self.secrets,
        )
        self.server: str | None = None  # the Server header, once an answer carried one
        self.probed: tuple[FindResult, list[Any]] | None = None
        self.feed: ChangeFeed | None = None

    # -- the queries ---------------------------------------------------------

    def find_studies(self, query: StudyQuery) -> FindResult:
        """The studies matching `query`, and whether the PACS says they are
        all (see FindResult). Never pages: a page as full as asked is
        incomplete, for the harvest to split."""
        return self._studies(study_query_string(query, self.page))[0]

    def find_series(self, study_iuid: str) -> list[FoundSeries]:
        """The series of one study: their modality and instance count. A
        study the PACS does not know has none; an answer that cannot be read
        is a ValueError, that study's alone."""
        include = "&".join(f"includefield={tag}" for tag in SERIES_INCLUDE)
        path = f"/studies/{_raw(study_iuid, uid=True)}/series?{include}"
        what = f"the series of study {study_iuid}"
        answer = self._get(path)
        if answer.status in (204, 404):
            return []
        trouble = self._trouble(answer, what)
        if trouble:
            raise UnreadableAnswer(f"{self.where}: {trouble}")
        try:
            return [_series(entry) for entry in _json_list(answer.data)]
        except UnreadableAnswer as exc:
            raise UnreadableAnswer(f"{self.where}: the answer for {what} {exc}") from None

    def _studies(self, params: str) -> tuple[FindResult, list[Any]]:
        """One study query (its query string, without the '?'): the result
        and the entries as answered (for describe's probe)."""
        answer = self._get(f"/studies?{params}")
        if answer.status == 204:
            return FindResult([], complete=True), []
        trouble = self._trouble(answer, "the query")
        if trouble:
            return FindResult([], complete=False, problem=f"{self.where}: {trouble}"), []
        try:
            entries = _json_list(answer.data)
        except UnreadableAnswer as exc:
            return FindResult([], complete=False, problem=f"{self.where}: the answer {exc}"), []
        studies = []
        for number, entry in enumerate(entries, 1):
            study = _study(entry)
            if study is None:
                problem = (
                    f"{self.where}: study {number} of the answer has no readable StudyInstanceUID"
                )
                return FindResult([], complete=False, problem=problem), entries
            studies.append(study)
        warning = answer.headers.get("Warning")
        if warning:
            problem = (
                f"{self.where} warns that its answer is partial ({len(studies)} studies;"
                f" Warning: {_short(warning)})"
            )
            return FindResult(studies, complete=False, problem=problem), entries
        if len(studies) >= self.page:
            problem = (
                f"{self.where} answered a full page ({len(studies)} studies, as many as"
                " asked): more may match"
            )
            return FindResult(studies, complete=False, problem=problem), entries
        return FindResult(studies, complete=True), entries

    def _get(self, path: str, bound: int = DICOMWEB_BODY_BYTES) -> Answer:
        """One GET, its body read up to `bound`; the run ends on a stalled
        server or SIGTERM, and a server that cannot be asked at all
        (unreachable, the credentials refused, no QIDO-RS service at the
        URL, a redirect) is PacsUnavailable."""
        if self.http.stalled is not None:
            raise RunEnding(self.http.stalled, EXIT_DATABASE)
        answer = self.http.exchange("GET", path, bound=bound, error_bound=DICOMWEB_ERROR_BYTES)
        server = answer.headers.get("Server")
        if server:
            self.server = _short(server, SERVER_CHARS)
        if answer.terminated:
            raise RunEnding(
                f"terminated (SIGTERM) while waiting for the answer of {self.where}; what was"
                " acknowledged is recorded, the rest stays pending",
                EXIT_TERMINATED,
            )
        if answer.stalled is not None:
            raise RunEnding(answer.stalled, EXIT_DATABASE)
        if answer.status is None and not answer.timed_out:
            raise PacsUnavailable(self.secrets.redact(answer.error or f"cannot reach {self.where}"))
        if answer.status in (401, 403):
            raise PacsUnavailable(f"{self.where} refused {self._credentials()}")
        if answer.status is not None and 300 <= answer.status < 400:
            to = safe_url(answer.location or "") or "nowhere"
            raise PacsUnavailable(
                f"{self.where} answered HTTP {answer.status}, a redirect to {to}: check"
                " dicomweb.url (a redirect is never followed: the credentials stay here)"
            )
        if answer.status == 404 and path.startswith("/studies?"):
            raise PacsUnavailable(
                f"{self.where} has no QIDO-RS study search (HTTP 404 for /studies): check"
                " dicomweb.url, the DICOMweb root (Orthanc: http://host:8042/dicom-web)"
            )
        return answer

    def _credentials(self) -> str:
        """What the PACS refused, and which fields to check."""
        if self.settings.auth == "basic":
            return (
                f"the credentials of {self.settings.user}: check dicomweb.user and"
                " dicomweb.password in config.json"
            )
        if self.settings.auth == "bearer":
            return (
                "the token: check dicomweb.token (or token_file): expired, or not allowed"
                " to search studies?"
            )
        return (
            "a query without credentials: set dicomweb.auth, with dicomweb.user and"
            " password (basic) or a token (bearer)"
        )

    def _trouble(self, answer: Answer, what: str) -> str:
        """Why a 2xx answer cannot be read whole, or what an error status
        means for this query; '' for a whole 200."""
        status = answer.status
        if status is None:  # its deadline (a stalled server ends the run in _get)
            return f"no complete answer to {what} within {self.http.deadline_seconds:g} s"
        if status == 200:
            if answer.too_large:
                mb = DICOMWEB_BODY_BYTES // (1024 * 1024)
                return f"answered {what} with more than {mb} MB: not read"
            if answer.timed_out:
                return f"no complete answer to {what} within {self.http.deadline_seconds:g} s"
            if not answer.complete:
                return f"the answer to {what} was cut short"
            return ""
        if status == 413:
            return f"refused {what} as matching too many studies (HTTP 413)"
        if status == 400:
            return f"refused {what} (HTTP 400: {_reason(answer.data)})"
        if status >= 500:
            return (
                f"answered {what} with HTTP {status} (a passing fault, or a query it cannot"
                f" do: {_reason(answer.data)})"
            )
        return f"answered {what} with HTTP {status}"

    # -- check ---------------------------------------------------------------

    def _probe(self) -> tuple[FindResult, list[Any]]:
        """One cheap query (one study, no key): it proves the URL and the
        credentials, and shows what the server answers at study level."""
        if self.probed is None:
            include = "&".join(f"includefield={tag}" for tag in STUDY_INCLUDE)
            self.probed = self._studies(f"{include}&limit=1")
        return self.probed

    def change_feed(self) -> ChangeFeed | None:
        """The vendor's change feed (dicomweb.change_feed), over this
        finder's own client; None when config.json asks for none."""
        if self.settings.change_feed != "azure":
            return None
        if self.feed is None:
            from .azure_feed import AzureChangeFeed

            self.feed = AzureChangeFeed(self)
        return self.feed

    def version(self) -> str:
        """The PACS as check's first line names it; asks the probe query
        (PacsUnavailable if it cannot be asked)."""
        self._probe()
        return f"{self.where}" + (f" ({self.server})" if self.server else "")

    def describe(self) -> list[tuple[str, str, int]]:
        """check's lines: the service and whose credentials it took, what it
        answers at study level, its result cap, its character set."""
        try:
            result, entries = self._probe()
        except PacsUnavailable as exc:
            return [("FAILED", f"source: {exc}", exc.exit_code)]
        auth = self.settings.auth
        who = f", user {self.settings.user}" if auth == "basic" else ""
        lines = [("ok", f"source: {self.version()} (auth {auth}{who}) answers QIDO-RS", 0)]
        if result.problem and not entries:
            return [*lines, ("FAILED", f"source: {result.problem}", EXIT_DATABASE)]
        lines.append(_study_level_line(entries))
        if self.settings.result_cap:
            cap = f"{self.settings.result_cap} studies a query (dicomweb.result_cap)"
        else:
            cap = (
                f"not configured (dicomweb.result_cap): a query asks for {DICOMWEB_PAGE}"
                " studies, and a full page is split"
            )
        lines.append(("ok", f"result cap: {cap}", 0))
        charset = _charset(entries[0]) if entries else None
        if charset is not None and UTF8 not in charset:
            lines.append(
                (
                    "warning",
                    f"character set: answers in {charset}, not UTF-8 ({UTF8}): names in"
                    " scripts it lacks are lost (Latin-1 drops all but Western ones);"
                    ' for Orthanc, set "DefaultEncoding": "Utf8"',
                    0,
                )
            )
        return lines

    def close(self) -> None:
        self.http.close()


class DicomwebPacs(HarvestPacs):
    """A PACS reached by QIDO-RS, harvested (sources/harvest.py)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, DicomwebFinder(settings.dicomweb))


# -- the query string ----------------------------------------------------------


def study_query_string(query: StudyQuery, limit: int) -> str:
    """A study query's string, written by hand: `*`, `-` and `,` raw (QIDO
    servers do not match them percent-encoded), the attributes beyond the
    defaults asked for, and `limit` (never `offset`)."""
    params = []
    if query.study_uids:
        params.append(
            "StudyInstanceUID=" + ",".join(_raw(uid, uid=True) for uid in query.study_uids)
        )
    else:
        if query.dated:
            params.append(f"StudyDate={query.date_range()}")
        if query.patient_id_prefix is not None:
            params.append(f"PatientID={_raw(query.patient_id_prefix)}*")
    params += [f"includefield={tag}" for tag in STUDY_INCLUDE]
    params.append(f"limit={limit}")
    return "&".join(params)


def _raw(value: str, uid: bool = False) -> str:
    """A value as it goes into a query string: unchanged, since a server
    would not match it percent-encoded. A UID is digits and dots; one that
    is not (a PACS's malformed UID) is percent-encoded (it is matched
    exactly, if at all). A PatientID prefix comes from the harvest's own
    alphabet: anything else is a bug."""
    if all(c in URL_SAFE for c in value):
        return value
    if uid:
        return urllib.parse.quote(value, safe="")
    raise ValueError("a PatientID prefix must be letters, digits or -._~ to go raw in a URL")


# -- reading DICOM JSON --------------------------------------------------------


def _json_list(data: bytes | bytearray) -> list[Any]:
    """The body as a JSON list (of studies, of series)."""
    try:
        entries = json.loads(data)
    except ValueError:
        raise UnreadableAnswer("is not JSON (a proxy's page?)") from None
    if not isinstance(entries, list):
        raise UnreadableAnswer("is not a list (a proxy's page?)")
    return entries


def _study(entry: Any) -> FoundStudy | None:
    """One study of a QIDO answer, as answered; None when it has no
    readable StudyInstanceUID (whose study it is cannot be told)."""
    try:
        uid = _text(entry, STUDY_INSTANCE_UID) if isinstance(entry, dict) else None
    except UnreadableAnswer:
        return None
    if not uid or not uid.strip():
        return None
    try:
        return FoundStudy(
            study_iuid=uid,
            patient_id=_text(entry, PATIENT_ID),
            patient_name=_person_name(entry, PATIENT_NAME),
            study_date=_text(entry, STUDY_DATE),
            study_time=_text(entry, STUDY_TIME),
            timezone_offset=_text(entry, TIMEZONE_OFFSET),
            study_description=_text(entry, STUDY_DESCRIPTION),
            modalities=_texts(entry, MODALITIES_IN_STUDY),
            series_count=_number(entry, STUDY_SERIES),
            instance_count=_number(entry, STUDY_INSTANCES),
        )
    except UnreadableAnswer as exc:
        return FoundStudy(study_iuid=uid, problem=f"the DICOMweb answer for study {uid} {exc}")


def _series(entry: Any) -> FoundSeries:
    if not isinstance(entry, dict):
        raise UnreadableAnswer("holds a series that is not a DICOM JSON object")
    return FoundSeries(
        modality=_text(entry, MODALITY), instance_count=_number(entry, SERIES_INSTANCES)
    )


def _values(entry: dict, tag: str) -> list[Any] | None:
    """An attribute's values; None when absent or empty (an attribute a
    server does not answer may come back empty: not answered, either way)."""
    element = entry.get(tag)
    if element is None:
        return None
    if not isinstance(element, dict):
        raise UnreadableAnswer(f"has a {_name(tag)} that is not a DICOM JSON attribute")
    values = element.get("Value")
    if values is None or values == []:
        return None
    if not isinstance(values, list):
        raise UnreadableAnswer(f"has a {_name(tag)} whose Value is not a list")
    return values


def _text(entry: dict, tag: str) -> str | None:
    """A text attribute; several values joined by '\\', as DICOM writes them."""
    values = _values(entry, tag)
    if values is None:
        return None
    return "\\".join(_one_text(value, tag) for value in values)


def _texts(entry: dict, tag: str) -> tuple[str, ...] | None:
    values = _values(entry, tag)
    return None if values is None else tuple(_one_text(value, tag) for value in values)


def _one_text(value: Any, tag: str) -> str:
    if value is None:  # an empty value among others (DICOM JSON writes null)
        return ""
    if not isinstance(value, str):
        raise UnreadableAnswer(f"has a {_name(tag)} that is not text")
    return value


def _person_name(entry: dict, tag: str) -> str | None:
    """A PN as DICOM writes it: its component groups joined by '=', up to
    the last one answered (an empty middle group kept: trimming is the
    value rules' job, values.py)."""
    values = _values(entry, tag)
    if values is None:
        return None
    return "\\".join(_one_person_name(value, tag) for value in values)


def _one_person_name(value: Any, tag: str) -> str:
    if value is None or isinstance(value, str):  # a name written as text: taken as it is
        return value or ""
    if not isinstance(value, dict) or not all(
        isinstance(value.get(group, ""), str) for group in PN_GROUPS
    ):
        raise UnreadableAnswer(f"has a {_name(tag)} that is not a person name")
    present = [i for i, group in enumerate(PN_GROUPS) if group in value]
    if not present:
        return ""
    return "=".join(value.get(group, "") for group in PN_GROUPS[: present[-1] + 1])


def _number(entry: dict, tag: str) -> int | None:
    """A count (IS): a JSON number, or text on some servers."""
    values = _values(entry, tag)
    if values is None:
        return None
    value = values[0]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnreadableAnswer(f"has a {_name(tag)} that is not a number")
    if value < 0 or value != int(value):
        raise UnreadableAnswer(f"has a {_name(tag)} that is not a count")
    return int(value)


def _name(tag: str) -> str:
    names = {
        STUDY_INSTANCE_UID: "StudyInstanceUID",
        PATIENT_ID: "PatientID",
        PATIENT_NAME: "PatientName",
        STUDY_DATE: "StudyDate",
        STUDY_TIME: "StudyTime",
        TIMEZONE_OFFSET: "TimezoneOffsetFromUTC",
        STUDY_DESCRIPTION: "StudyDescription",
        MODALITY: "Modality",
        SERIES_INSTANCES: "NumberOfSeriesRelatedInstances",
        SPECIFIC_CHARACTER_SET: "SpecificCharacterSet",
        **STUDY_LEVEL,
    }
    return f"{names.get(tag, 'attribute')} ({tag[:4]},{tag[4:]})"


def _charset(entry: Any) -> str | None:
    try:
        return _text(entry, SPECIFIC_CHARACTER_SET) if isinstance(entry, dict) else None
    except UnreadableAnswer:
        return None


def _study_level_line(entries: list[Any]) -> tuple[str, str, int]:
    """Whether the server answers counts and modalities at study level (or
    each new or changed study costs a series query)."""
    if not entries:
        return (
            "warning",
            "it holds no study yet: whether it answers study-level counts and modalities"
            " is told once it does",
            0,
        )
    entry = entries[0]
    readers: dict[str, Callable[[dict, str], Any]] = {
        MODALITIES_IN_STUDY: _texts,
        STUDY_SERIES: _number,
        STUDY_INSTANCES: _number,
    }
    missing = []
    for tag, read in readers.items():
        try:
            answered = isinstance(entry, dict) and read(entry, tag) is not None
        except UnreadableAnswer:
            answered = False
        if not answered:
            missing.append(STUDY_LEVEL[tag])
    if not missing:
        return ("ok", "answers study-level counts and modalities", 0)
    return (
        "warning",
        f"does not answer {' nor '.join(missing)} at study level: each new or changed study"
        " costs one more query, for its series",
        0,
    )


def _short(text: str, chars: int = REASON_CHARS) -> str:
    """A server's text on one line, short, without UIDs (which could be a
    UID list's: never printed)."""
    line = " ".join(text.split())
    line = UID_IN_TEXT.sub("<UID>", line)
    return line[:chars] + ("..." if len(line) > chars else "")


def _reason(data: bytes | bytearray) -> str:
    """A refusal's reason: its JSON's message (Orthanc's, DICOMweb's
    errorMessage) or its text, short and without UIDs."""
    text = bytes(data).decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("Details", "Message", "errorMessage", "message", "error"):
            if isinstance(body.get(key), str) and body[key].strip():
                text = body[key]
                break
    return _short(text) or "no reason given"
