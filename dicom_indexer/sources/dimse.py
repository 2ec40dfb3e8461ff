"""DIMSE: a PACS asked by C-FIND (Study Root Query/Retrieve), through pynetdicom.

Every PACS since 1993 answers C-FIND; this Finder asks it what the harvest
(sources/harvest.py) wants to know, and turns the answers into FoundStudy
values, decoded by each answer's own SpecificCharacterSet but not cleaned
(values.py's rules do that).

- One association per tick: opened on the first query, reused by every
  other, released by close(); opened again once when the PACS closed it
  between queries. TCP_NODELAY on its socket as soon as it connects:
  pynetdicom leaves Nagle's algorithm on, and with the peer's delayed ACK a
  C-FIND took 92 ms instead of 8 (measured on Orthanc).
- Every query is bounded as a whole by connect_timeout_seconds +
  read_timeout_seconds, not only each wait for an answer: a PACS trickling
  its answers just under the DIMSE timeout would otherwise hold the run.
  STALLED_DEADLINES expired in a row end the run (RunEnding, exit 4).
- The PACS's word decides completeness: Success (0x0000) is complete;
  Cancel (0xFE00, Orthanc's result cap), Out of resources (0xA700),
  Unable to process (0xC000-0xCFFF, arc-light's "too broad"), an
  A-ABORT or a lost connection mid-answer are an incomplete result.
- pynetdicom and pydicom are imported when a DIMSE PACS is opened, never
  before: a site without DIMSE installs neither (requirements-dimse.txt).
  pynetdicom 3 needs Python 3.10; 2.0.2 serves Python 3.8 and 3.9.

No message or log line shows a patient value: pynetdicom's own logging of
identifiers is turned off, and its log lines are kept to this module.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import logging
import socket
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import EXIT_DATABASE, EXIT_TERMINATED, ConfigError
from ..http import STALLED_DEADLINES, TERMINATION, RunEnding
from .finding import FindResult, FoundSeries, FoundStudy, PacsUnavailable, StudyQuery
from .harvest import HarvestPacs

if TYPE_CHECKING:
    from ..config import DimseSettings, Settings

log = logging.getLogger("dicom_indexer")

INSTALL_HINT = "python3 -m pip install -r requirements-dimse.txt"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R Information Model - FIND
MAX_UIDS_PER_QUERY = 50  # a UID-list query: 50 answered in 0.12 s by Orthanc
# The most answers one query may bring (without result_cap): a PACS with no
# cap of its own would otherwise answer its whole archive to a broad query,
# and this client hold it (pynetdicom reads answers ahead of their decoding:
# 1,000 of them held about 11 MB, measured). Past it, the association is
# aborted (C-CANCEL is only a request) and the query counts as not whole:
# the harvest splits it.
MAX_ANSWERS = 500
# The cold sweep's share of an idle tick, in answers. Over C-FIND an answer
# costs pynetdicom and the PACS about 1 ms (QIDO-RS: 0.4), and every tick
# first spends some 0.2 s starting Python and importing pynetdicom and
# pydicom: 100 answers keep an idle tick near 0.4 s (150: 0.45 to 0.53 s,
# measured at 10,000 studies; dev/BENCHMARK.md, section 9.3).
COLD_ANSWERS_PER_TICK = 100
# Asked in every query: the answers are then UTF-8 where the PACS can (Orthanc
# answers in its DefaultEncoding whatever we ask, measured).
QUERY_CHARACTER_SET = "ISO_IR 192"
LATIN1_OR_NONE = {"", "ISO_IR 100", "ISO_IR 6", "ISO 2022 IR 100", "ISO 2022 IR 6"}
STUDY_KEYS = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "TimezoneOffsetFromUTC",
    "StudyDescription",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "NumberOfSeriesRelatedInstances",
)

SUCCESS = 0x0000
PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
# Final statuses that end a query short, by what they say (PS3.4 C.4.1.1.4).
REFUSALS = {
    CANCEL: "cancelled by the PACS (0xFE00: Orthanc's result cap)",
    0xA700: "refused: out of resources (0xA700)",
    0xA900: "refused: identifier does not match SOP class (0xA900)",
}
RELEASE_TIMEOUT_SECONDS = 5.0  # close() waits this long for A-RELEASE-RP


def _status_problem(status: int) -> str:
    """A final status other than Success, in one line."""
    if status in REFUSALS:
        return REFUSALS[status]
    if 0xC000 <= status <= 0xCFFF:
        return f"refused: unable to process (0x{status:04X}: too broad a query, or a fault)"
    return f"ended with status 0x{status:04X}"


# pydicom imports its test-data downloader at once, and the downloader
# imports requests and tqdm when they are installed (they are: the client's
# requirements): 5 MB and 45 ms of every DIMSE run, measured, for a download
# this client never asks for. Hidden while pydicom is imported, the
# downloader falls back on urllib; the client imports them later as usual.
PYDICOM_DOWNLOADER_MODULES = ("requests", "tqdm")


@contextlib.contextmanager
def _hidden(modules: tuple[str, ...]) -> Iterator[None]:
    """Makes `import` of these modules fail (ImportError) for a while, unless
    they are already imported (then there is nothing to save)."""
    hidden = [name for name in modules if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _pynetdicom() -> Any:
    """pynetdicom, imported when a DIMSE PACS is first opened; its logging of
    identifiers (patient names at INFO) turned off once."""
    try:
        with _hidden(PYDICOM_DOWNLOADER_MODULES):
            import pydicom  # noqa: F401 (pynetdicom's own dependency: named if missing)
        import pynetdicom
        from pynetdicom import _config
    except ImportError as exc:
        raise ConfigError(
            f"config.json: source 'dimse' needs {exc.name or exc}; install: {INSTALL_HINT}"
        ) from None
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_REQUEST_IDENTIFIERS = False
    _quiet_loggers()
    return pynetdicom


class _LastErrors(logging.Handler):
    """pynetdicom says why a connection failed only in its log ("TCP
    Initialisation Error: [Errno 111] Connection refused", a TLS error),
    from the association's own thread: kept here for the one line this
    module raises. Its other lines stay out of the client's log, which has
    lines of its own."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.connect_error = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("TCP Initialisation Error: "):
            self.connect_error = message.split(": ", 1)[1]

    def take(self) -> str:
        error, self.connect_error = self.connect_error, ""
        return error


_LAST_ERRORS = _LastErrors()


def _quiet_loggers() -> None:
    net = logging.getLogger("pynetdicom")
    if _LAST_ERRORS not in net.handlers:
        net.addHandler(_LAST_ERRORS)
        net.propagate = False
        net.setLevel(logging.ERROR)
    # pydicom warns (and logs) a value its character set cannot decode: this
    # module makes that the study's problem instead.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def _nodelay(event: Any) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY on the association's socket, before the
    A-ASSOCIATE-RQ is sent (pynetdicom 2.0 and 3 alike)."""
    sock = event.assoc.dul.socket.socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _tls_context(settings: DimseSettings) -> Any:
    import ssl

    try:
        context = ssl.create_default_context(cafile=settings.tls_ca_bundle)
        if settings.tls_certificate:
            context.load_cert_chain(settings.tls_certificate, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"config.json: dimse TLS files cannot be used: {type(exc).__name__}"
            f" {getattr(exc, 'reason', None) or exc.strerror or ''}".rstrip()
        ) from None
    return context


class _Exchange:
    """What one C-FIND brought: the answers, the final status, or why none came."""

    def __init__(self) -> None:
        self.answers = 0
        self.status: int | None = None  # the final status, if one came
        self.expired = False  # our deadline (or the DIMSE timeout) passed
        self.aborted = ""  # "aborted" (A-ABORT) or "closed" (connection lost)
        self.cut = False  # more answers than a query may bring: not read further


class DimseFinder:
    """Asks one PACS by C-FIND, over one association per tick (the Finder of
    sources/finding.py)."""

    max_uids_per_query = MAX_UIDS_PER_QUERY
    cold_answers_per_tick = COLD_ANSWERS_PER_TICK

    def __init__(self, settings: DimseSettings) -> None:
        self.net = _pynetdicom()
        self.settings = settings
        self.tls = bool(settings.tls_ca_bundle or settings.tls_certificate)
        self.where = f"PACS {settings.pacs_ae} at {settings.host}:{settings.port}"
        self.deadline_seconds = settings.connect_timeout_seconds + settings.read_timeout_seconds
        self.max_answers = settings.result_cap or MAX_ANSWERS
        self.termination = TERMINATION.get()
        self.ae: Any = None
        self.assoc: Any = None
        self.queries_on_association = 0
        self.associations = 0  # opened this run: for tests and the debug log
        self.stalls = 0  # whole-query deadlines expired in a row
        self.character_sets: set[str] = set()  # as answered, for check
        self.implementation = ""  # the PACS's implementation version name

    # -- the association -------------------------------------------------------

    def _new_ae(self) -> Any:
        ae = self.net.AE(ae_title=self.settings.indexer_ae)
        ae.add_requested_context(STUDY_ROOT_FIND)
        ae.connection_timeout = self.settings.connect_timeout_seconds
        ae.acse_timeout = self.settings.read_timeout_seconds
        ae.dimse_timeout = self.settings.read_timeout_seconds
        # Idle this long between queries (the harvest sending), the
        # association is closed: the next query opens another.
        ae.network_timeout = self.deadline_seconds
        return ae

    def _association(self) -> Any:
        """The tick's association, opened if none is (or the PACS closed it)."""
        if self.assoc is not None and self.assoc.is_established:
            return self.assoc
        self.assoc = None
        self.ae = self.ae or self._new_ae()
        options: dict[str, Any] = {
            "ae_title": self.settings.pacs_ae,
            "evt_handlers": [(self.net.evt.EVT_CONN_OPEN, _nodelay)],
        }
        if self.tls:
            options["tls_args"] = (_tls_context(self.settings), self.settings.host)
        _LAST_ERRORS.take()
        assoc = self.ae.associate(self.settings.host, self.settings.port, **options)
        if not assoc.is_established:
            raise PacsUnavailable(self._not_associated(assoc))
        self.assoc = assoc
        self.associations += 1
        self.queries_on_association = 0
        self.implementation = str(getattr(assoc.acceptor, "implementation_version_name", "") or "")
        log.debug("%s: association open (C-FIND as %s)", self.where, self.settings.indexer_ae)
        return assoc

    def _not_associated(self, assoc: Any) -> str:
        """One line for an association that did not open."""
        who = f"{self.where} (C-FIND as {self.settings.indexer_ae})"
        error = _LAST_ERRORS.take()
        if error:
            what = "TLS failed" if "SSL" in error or "certificate" in error else "cannot connect"
            return f"{who}: {what}: {error}"
        if assoc.is_rejected:
            return f"{who} rejected the association: {_rejection(assoc.acceptor.primitive)}"
        if assoc.is_aborted:
            return (
                f"{who} aborted the association request: is our AE title"
                f" {self.settings.indexer_ae} registered in it?"
            )
        return (
            f"{who} did not answer the association request within"
            f" {self.settings.read_timeout_seconds:g} s"
        )

    def _drop(self) -> None:
        """Forgets an association that can no longer be used (aborted).

        pynetdicom's association is a web of cycles (its threads, providers
        and buffers): dropped, it waits for a full collection while the next
        one allocates anew. Collected at once (6 ms), `initial`'s peak, with
        its dozens of aborted associations, was 2.3 MB lower (measured)."""
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.abort()
        self.assoc = None
        gc.collect()

    def close(self) -> None:
        """Releases the tick's association (A-RELEASE), or aborts it when the
        PACS does not answer the release in time."""
        assoc, self.assoc = self.assoc, None
        if assoc is None or not assoc.is_established:
            return
        assoc.acse_timeout = min(self.settings.read_timeout_seconds, RELEASE_TIMEOUT_SECONDS)
        try:
            assoc.release()
        except Exception:  # a release that fails leaves nothing to keep
            log.debug("%s: release failed; aborted", self.where, exc_info=True)
            assoc.abort()

    # -- one query ------------------------------------------------------------

    def _ask(self, identifier: Any, on_answer: Callable[[Any], None], what: str) -> _Exchange:
        """Sends one C-FIND and hands each answer to `on_answer`; on a
        reused association that the PACS closed before answering, opens
        another and asks once more."""
        for attempt in (1, 2):
            self._check_termination(what)
            assoc = self._association()
            first_query = self.queries_on_association == 0
            self.queries_on_association += 1
            exchange = self._exchange(assoc, identifier, on_answer, what)
            if exchange.aborted and exchange.answers == 0:
                self.assoc = None
                if first_query:
                    raise PacsUnavailable(
                        f"{self.where} {exchange.aborted} the association when asked C-FIND: is"
                        f" our AE title {self.settings.indexer_ae} registered in it, with"
                        " C-FIND allowed?"
                    )
                if attempt == 1:
                    log.debug("%s closed the association between queries: opening another",
                              self.where)  # fmt: skip
                    continue
            break
        self._count_stall(exchange, what)
        return exchange

    def _exchange(
        self, assoc: Any, identifier: Any, on_answer: Callable[[Any], None], what: str
    ) -> _Exchange:
        exchange = _Exchange()
        deadline = time.monotonic() + self.deadline_seconds
        read_timeout = self.settings.read_timeout_seconds
        # Each wait for an answer is the DIMSE timeout, cut to what is left of
        # the query's deadline: pynetdicom reads it at every wait.
        assoc.dimse_timeout = read_timeout
        try:
            responses = assoc.send_c_find(identifier, STUDY_ROOT_FIND)
        except RuntimeError:  # the association ended since is_established was read
            exchange.aborted = "closed"
            self.assoc = None
            return exchange
        except ValueError:  # no accepted presentation context for it
            self._drop()
            raise PacsUnavailable(
                f"{self.where} does not accept Study Root C-FIND from our AE title"
                f" {self.settings.indexer_ae}: allow it C-FIND (Query/Retrieve)"
            ) from None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                exchange.expired = True
                self._drop()
                return exchange
            assoc.dimse_timeout = min(read_timeout, left)
            started = time.monotonic()
            status, answer = next(responses, (None, None))
            if status is None or "Status" not in status:
                self._no_response(assoc, exchange, time.monotonic() - started)
                return exchange
            code = int(status.Status)
            if code in PENDING:
                exchange.answers += 1
                if exchange.answers > self.max_answers:
                    exchange.cut = True
                    self._drop()
                    return exchange
                if answer is None:  # pynetdicom could not decode the identifier
                    on_answer(None)
                else:
                    on_answer(answer)
                self._check_termination(what)
                continue
            exchange.status = code
            return exchange

    def _no_response(self, assoc: Any, exchange: _Exchange, waited: float) -> None:
        """No message where one was due: the PACS aborted, the connection
        closed, or the wait timed out (then pynetdicom aborted it)."""
        if assoc.acse.is_aborted("a-abort"):
            exchange.aborted = "aborted"
        elif assoc.acse.is_aborted("a-p-abort") and waited < assoc.dimse_timeout:
            exchange.aborted = "closed"
        else:
            exchange.expired = True
        self._drop()

    def _count_stall(self, exchange: _Exchange, what: str) -> None:
        if not exchange.expired:
            self.stalls = 0
            return
        self.stalls += 1
        if self.stalls >= STALLED_DEADLINES:
            raise RunEnding(
                f"{self.where} gave no complete answer within {self.deadline_seconds:g} s to"
                f" {self.stalls} C-FIND queries in a row ({what} the last): it trickles its"
                " answers or stays silent; what was not recorded stays pending",
                EXIT_DATABASE,
            )

    def _check_termination(self, what: str) -> None:
        if self.termination is not None and self.termination.is_set():
            self._drop()
            raise RunEnding(
                f"terminated (SIGTERM) while asking {self.where} for {what}; what was"
                " acknowledged is recorded, the rest stays pending",
                EXIT_TERMINATED,
            )

    @staticmethod
    def _problem(exchange: _Exchange, deadline: float) -> str:
        """Why an exchange is not complete, in one line; '' when it is."""
        if exchange.expired:
            return f"no complete answer within {deadline:g} s ({exchange.answers} answers)"
        if exchange.cut:
            return f"more than {exchange.answers - 1} answers: not read further"
        if exchange.aborted:
            return f"the PACS {exchange.aborted} the association after {exchange.answers} answers"
        if exchange.status != SUCCESS:
            return _status_problem(exchange.status or 0)
        return ""

    # -- the Finder -------------------------------------------------------------

    def study_identifier(self, query: StudyQuery) -> Any:
        """The C-FIND identifier of a study query: its matching keys, and
        every other key of STUDY_KEYS empty (a return key)."""
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.SpecificCharacterSet = QUERY_CHARACTER_SET
        ds.QueryRetrieveLevel = "STUDY"
        for keyword in STUDY_KEYS:
            setattr(ds, keyword, "")
        if query.study_uids:
            uids = list(query.study_uids)
            ds.StudyInstanceUID = uids if len(uids) > 1 else uids[0]
            return ds
        ds.StudyDate = query.date_range()
        if query.patient_id_prefix is not None:
            ds.PatientID = f"{query.patient_id_prefix}*"
        return ds

    def find_studies(self, query: StudyQuery) -> FindResult:
        studies: list[FoundStudy] = []
        unreadable: list[str] = []

        def on_answer(answer: Any) -> None:
            found = self._found_study(answer)
            if isinstance(found, str):
                unreadable.append(found)
            else:
                studies.append(found)

        what = query.describe()
        exchange = self._ask(self.study_identifier(query), on_answer, what)
        problem = self._problem(exchange, self.deadline_seconds)
        if not problem and unreadable:
            problem = f"{len(unreadable)} answers unreadable: {unreadable[0]}"
        if problem:
            log.debug("%s: %s: %s", self.where, what, problem)
        return FindResult(studies, complete=not problem, problem=problem)

    def find_series(self, study_iuid: str) -> list[FoundSeries]:
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.SpecificCharacterSet = QUERY_CHARACTER_SET
        ds.QueryRetrieveLevel = "SERIES"
        for keyword in SERIES_KEYS:
            setattr(ds, keyword, "")
        ds.StudyInstanceUID = study_iuid
        series: list[FoundSeries] = []
        problems: list[str] = []

        def on_answer(answer: Any) -> None:
            if answer is None:
                problems.append("an answer pynetdicom could not decode")
                return
            try:
                with _decoding() as failed:
                    read = _Answer(answer)
                    modality = read.text("Modality")
                    count = read.count("NumberOfSeriesRelatedInstances")
            except Exception as exc:  # one value of the wrong kind: this study's
                problems.append(f"a series answer unreadable ({type(exc).__name__})")
                return
            if failed:
                problems.append(f"a series answer undecodable in {read.charset!r}")
                return
            series.append(FoundSeries(modality or None, count))

        exchange = self._ask(ds, on_answer, "a study's series")
        problem = self._problem(exchange, self.deadline_seconds) or (problems and problems[0])
        if problem:
            raise ValueError(f"{self.where}: the series query of study {study_iuid}: {problem}")
        return series

    def _found_study(self, answer: Any) -> FoundStudy | str:
        """One pending answer -> a FoundStudy (its own problem if a value
        cannot be read), or why it has no readable StudyInstanceUID."""
        if answer is None:
            return "an answer pynetdicom could not decode"
        try:
            with _decoding() as failed:
                read = _Answer(answer)
                uid = str(read.value("StudyInstanceUID") or "").strip("\x00 ")
        except Exception as exc:
            return f"its StudyInstanceUID unreadable ({type(exc).__name__})"
        if not uid:
            return "an answer without a StudyInstanceUID"
        charset = read.charset
        self.character_sets.add(charset)
        keyword = "StudyInstanceUID"
        try:
            with _decoding() as failed_values:
                keyword = "PatientID"
                values: dict[str, Any] = {"patient_id": read.text(keyword)}
                for keyword, name in (
                    ("PatientName", "patient_name"),
                    ("StudyDate", "study_date"),
                    ("StudyTime", "study_time"),
                    ("TimezoneOffsetFromUTC", "timezone_offset"),
                    ("StudyDescription", "study_description"),
                ):
                    values[name] = read.text(keyword)
                keyword = "ModalitiesInStudy"
                values["modalities"] = read.multiple(keyword)
                keyword = "NumberOfStudyRelatedSeries"
                values["series_count"] = read.count(keyword)
                keyword = "NumberOfStudyRelatedInstances"
                values["instance_count"] = read.count(keyword)
        except Exception as exc:  # one value of the wrong kind: this study's alone
            return FoundStudy(
                study_iuid=uid, problem=f"its {keyword} cannot be read ({type(exc).__name__})"
            )
        if failed or failed_values:
            return FoundStudy(
                study_iuid=uid,
                problem=f"its values cannot be decoded in its character set {charset!r}",
            )
        if values["timezone_offset"] == "":
            values["timezone_offset"] = None
        return FoundStudy(study_iuid=uid, **values)

    # -- check ------------------------------------------------------------------

    def change_feed(self) -> None:
        """DIMSE has no change feed: the harvest's windows find what changed."""
        return None

    def version(self) -> str:
        if self.assoc is None:
            try:
                self._association()
            except PacsUnavailable:
                return self.where
        suffix = f" ({self.implementation})" if self.implementation else ""
        return f"{self.where}{suffix}"

    def describe(self) -> list[tuple[str, str, int]]:
        """check's lines: the PACS and how we reach it, then what a probe of
        one day (today, else yesterday) tells of its answers."""
        tls = ", TLS" if self.tls else ""
        head = f"source: {self.where} (C-FIND as {self.settings.indexer_ae}{tls})"
        today = datetime.date.today()
        studies: list[FoundStudy] = []
        for day in (today, today - datetime.timedelta(days=1)):
            try:
                result = self.find_studies(StudyQuery(date_from=day, date_to=day, dated=True))
            except PacsUnavailable as exc:
                return [("FAILED", f"source: {exc}", EXIT_DATABASE)]
            except RunEnding as exc:
                return [("FAILED", f"source: {exc}", EXIT_DATABASE)]
            if result.problem.startswith("refused"):
                return [
                    ("ok", head, 0),
                    ("FAILED", f"source: {self.where} C-FIND {result.problem}", EXIT_DATABASE),
                ]
            studies = result.studies
            if studies:
                break
        return [("ok", head, 0), *self._probe_lines(studies)]

    def _probe_lines(self, studies: list[FoundStudy]) -> list[tuple[str, str, int]]:
        if not studies:
            return [
                (
                    "ok",
                    "answers: no study today or yesterday to tell whether it answers counts and"
                    " ModalitiesInStudy (without them, each new study costs a SERIES query)",
                    0,
                )
            ]
        lines = []
        missing = [
            name
            for name, absent in (
                ("NumberOfStudyRelatedSeries", all(s.series_count is None for s in studies)),
                ("NumberOfStudyRelatedInstances", all(s.instance_count is None for s in studies)),
                ("ModalitiesInStudy", all(s.modalities is None for s in studies)),
            )
            if absent
        ]
        if missing:
            lines.append(
                (
                    "warning",
                    f"answers: without {', '.join(missing)} at study level: each new or changed"
                    " study costs a SERIES query",
                    0,
                )
            )
        else:
            lines.append(("ok", "answers: study-level counts and ModalitiesInStudy", 0))
        charsets = sorted(self.character_sets)
        shown = ", ".join(c or "none" for c in charsets)
        if any(c in LATIN1_OR_NONE for c in charsets):
            lines.append(
                (
                    "warning",
                    f"character set: answers in {shown} although {QUERY_CHARACTER_SET} (UTF-8)"
                    " was asked: names in other scripts lose their letters; on Orthanc set"
                    ' DefaultEncoding to "Utf8"',
                    0,
                )
            )
        else:
            lines.append(("ok", f"character set: answers in {shown}", 0))
        return lines


def _rejection(primitive: Any) -> str:
    """Why the PACS rejected the association, as pynetdicom names it."""
    try:
        reason = f"{primitive.reason_str} ({primitive.result_str}, by the {primitive.source_str})"
    except Exception:
        return "no reason given"
    hints = {
        "Called AE title not recognised": "check dimse.pacs_ae",
        "Calling AE title not recognised": "register our AE title in the PACS",
    }
    for words, hint in hints.items():
        if words.lower() in reason.lower():
            return f"{reason}: {hint}"
    return reason


class _Decoding:
    """Whether pydicom met bytes its character set cannot decode (it warns
    and replaces them: that study's values would be wrong without a word)."""

    def __init__(self) -> None:
        self.failed = False

    def __bool__(self) -> bool:
        return self.failed


@contextlib.contextmanager
def _decoding() -> Iterator[_Decoding]:
    """Collects pydicom's decoding warnings while an answer's values are read."""
    result = _Decoding()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield result
        finally:
            result.failed = any(_is_decoding(str(w.message)) for w in caught or [])


def _is_decoding(message: str) -> bool:
    message = message.lower()
    return any(
        words in message
        for words in ("decode", "encoding", "character set", "replacement characters")
    )


class _Answer:
    """One C-FIND answer's values, each converted from its raw element by
    pydicom's own converter (convert_value) in the answer's character set.
    Read as Dataset attributes instead, an answer cost 180 µs, four times
    as much (measured): pydicom stores each conversion back into the
    Dataset, with its checks. Decoding warnings are pydicom's, caught by
    _decoding() around the reading."""

    def __init__(self, dataset: Any) -> None:
        from pydicom.dataelem import RawDataElement
        from pydicom.values import convert_value

        self.raw_element, self.convert = RawDataElement, convert_value
        self.dataset = dataset
        charset = self._converted("SpecificCharacterSet", None)
        if charset is None or charset == "":
            self.charset = ""
        elif _is_multiple(charset):
            self.charset = "\\".join(str(v).strip() for v in charset)
        else:
            self.charset = str(charset).strip()
        self.codecs, known = _codecs(self.charset)
        if not known:
            warnings.warn(f"unknown character set {self.charset!r}: cannot decode", stacklevel=1)

    def _converted(self, keyword: str, codecs: list[str] | None) -> Any:
        """The value as pydicom converts it; '' when empty; None when absent."""
        tag, vr = _tag_and_vr(keyword)
        element = self.dataset.get_item(tag)
        if element is None:
            return None
        if not isinstance(element, self.raw_element):  # converted already
            return "" if element.value is None else element.value
        if not element.value:
            return ""
        return self.convert(vr, element, codecs)

    def value(self, keyword: str) -> Any:
        return self._converted(keyword, self.codecs)

    def text(self, keyword: str) -> str | None:
        """A value as answered and decoded: None if the key is missing, ''
        if empty, several values joined by a backslash."""
        value = self.value(keyword)
        if value is None or value == "":
            return value
        if _is_multiple(value):
            return "\\".join(str(v) for v in value)
        return str(value)

    def multiple(self, keyword: str) -> tuple[str, ...] | None:
        """A multi-valued CS (ModalitiesInStudy); None when missing or empty."""
        value = self.value(keyword)
        if value is None or value == "":
            return None
        values = [str(v).strip() for v in value] if _is_multiple(value) else [str(value).strip()]
        values = [v for v in values if v]
        return tuple(values) or None

    def count(self, keyword: str) -> int | None:
        """An IS count; None when missing or empty."""
        value = self.value(keyword)
        if value is None or str(value).strip() == "":
            return None
        if _is_multiple(value):
            raise ValueError("several values")
        return int(str(value).strip())


@functools.lru_cache(maxsize=None)
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    """A key's tag and VR, from pydicom's dictionary: the standard's VR,
    whatever an explicit-VR answer says."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag, dictionary_VR(tag)


@functools.lru_cache(maxsize=32)
def _codecs(charset: str) -> tuple[list[str], bool]:
    """Python's codecs for a SpecificCharacterSet, and whether pydicom knew
    every term of it (for one it does not, it warns and uses its default)."""
    from pydicom.charset import convert_encodings

    with _decoding() as failed:
        codecs = convert_encodings(charset.split("\\") if charset else None)
    return list(codecs), not failed


def _is_multiple(value: Any) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, (MultiValue, list, tuple))


class DimsePacs(HarvestPacs):
    """A PACS reached by DIMSE C-FIND, harvested (sources/harvest.py)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, DimseFinder(settings.dimse), settings.dimse.timezone)
