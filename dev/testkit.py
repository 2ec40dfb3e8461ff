"""What the tests (tests/conftest.py), the storm (dev/storm.py) and the
benchmark (dev/benchmark.py) share: a stand-in for the central service,
and a PostgreSQL connection shaped like PyMySQL's.

CentralService is a real HTTP/1.1 server on loopback (asyncio, on a thread
of its own), keep-alive like a real one, that records what it receives and
answers as it is told: a status and a text, or a Reply that misbehaves (a
redirect, a body trickled a byte at a time, a huge body, a connection cut
before the answer), after a delay, serving at most so many requests at once
(the rest wait in its queue, as in a real service's worker pool), over
TLS if given a context. The
benchmark runs it in a process of its own, so that it is never the
bottleneck. Not used by client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable


def peak_rss_mb(process: subprocess.Popen) -> float:
    """A child's own peak memory (VmHWM), read while it runs (not wait4's
    ru_maxrss, which keeps the parent's size from before the exec)."""
    peak = 0.0
    status = Path(f"/proc/{process.pid}/status")
    while process.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            break
        time.sleep(0.02)
    return peak


def free_port() -> int:
    """A loopback port with nothing listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Received:
    """One request as the service got it."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.at = time.monotonic()  # when it arrived
        self._json: Any = None

    @property
    def json(self) -> Any:
        if self._json is None and self.body:
            self._json = json.loads(self.body)
        return self._json

    def header(self, name: str) -> str | None:
        """A header, by its name in any case."""
        wanted = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == wanted), None)


@dataclasses.dataclass
class Reply:
    """An answer beyond (status, text), for a service that misbehaves: extra
    headers; a body of `size` bytes made up as it is sent (a huge one); the
    body (or the head: `trickle_head`) one byte every `trickle_seconds`; no
    answer at all (`cut`: the connection closed once the request is in); and
    `delay_seconds` before it, instead of the service's own."""

    status: int = 201
    body: bytes = b"{}"
    headers: dict = dataclasses.field(default_factory=dict)
    size: int = 0
    trickle_seconds: float = 0.0
    trickle_head: bool = False
    cut: bool = False
    delay_seconds: float | None = None


def _head(reply: Reply) -> bytes:
    """The status line and headers of `reply`, kept on it: a Reply answered
    many times (the benchmark's) is encoded once."""
    head = reply.__dict__.get("_head")
    if head is None:
        length = reply.size or len(reply.body)
        head = (
            f"HTTP/1.1 {reply.status} {REASONS.get(reply.status, 'Whatever')}\r\n"
            f"Content-Length: {length}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in reply.headers.items())
            + "\r\n"
        ).encode()
        reply.__dict__["_head"] = head
    return head


def _as_reply(answer: Any, retry_after: str | None) -> Reply:
    if isinstance(answer, Reply):
        return answer
    status, text = answer[:2]
    headers = {"Content-Type": "application/json"}
    if status in (429, 503) and retry_after is not None:
        headers["Retry-After"] = retry_after
    return Reply(status, text.encode() if isinstance(text, str) else text, headers)


REASONS = {200: "OK", 201: "Created", 301: "Moved Permanently", 400: "Bad Request"}


class CentralService:
    """The central service's stand-in, on a free loopback port.

    `respond(number, request)` decides each answer (number: how many were
    accepted before, plus one); it returns (status, text) or a Reply. Every
    request goes to `attempts`, the 2xx ones to `received`, unless `keep` is
    False (the benchmark counts instead, in `on_request`). `delay_seconds`:
    how long each takes; serve_at_most(): how many at once."""

    def __init__(self, keep: bool = True, port: int = 0, tls: Any = None) -> None:
        self.keep = keep
        self.received: list[Received] = []
        self.attempts: list[Received] = []
        self.lock = threading.Lock()
        self.respond: Callable[[int, Received], Any] = lambda n, r: (201, "{}")
        self.on_request: Callable[[Received, float], None] | None = None
        self.delay_seconds = 0.0
        self.retry_after: str | None = "0"  # with a 429 or 503; None: no header
        self.in_flight = 0
        self.max_in_flight = 0
        self.queue_waits: list[float] = []  # how long each waited for a slot
        self._slots: asyncio.Semaphore | None = None
        self._capacity = 0
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._writers: set[Any] = set()  # open connections, closed by stop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(port, tls, ready), daemon=True)
        self._thread.start()
        ready.wait()
        self.port = self._server.sockets[0].getsockname()[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}/api/v1/register"

    # -- what tests see --------------------------------------------------------

    @property
    def documents(self) -> list[dict[str, Any]]:
        """The documents acknowledged with 2xx, in arrival order."""
        return [r.json for r in self.received if r.method == "POST"]

    def study_pks(self) -> list[int]:
        return sorted(doc["study_pk"] for doc in self.documents)

    def clear(self) -> None:
        with self.lock:
            self.received.clear()
            self.attempts.clear()

    def serve_at_most(self, capacity: int, seconds_each: float) -> None:
        """A service with limited capacity: `capacity` requests at once, each
        taking `seconds_each`; the rest wait their turn, so latency rises with load."""
        self._capacity = capacity
        self.delay_seconds = seconds_each
        self._loop.call_soon_threadsafe(self._set_slots)

    def stop(self) -> None:
        """Stops listening and drops every connection (a service going down)."""

        async def close() -> None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # -- the server ------------------------------------------------------------

    def _set_slots(self) -> None:
        self._slots = asyncio.Semaphore(self._capacity) if self._capacity else None

    def _serve(self, port: int, tls: Any, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", port, backlog=1024, ssl=tls)
        )
        ready.set()
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self._writers.add(writer)
        try:
            while await self._exchange(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, OSError):
            pass  # a client gone mid-request (killed, or its deadline): a real
            # service stores nothing of it
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: Any) -> bool:
        """One request and its answer; False when the connection is done."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = next((int(v) for k, v in headers.items() if k.lower() == "content-length"), 0)
        body = await reader.readexactly(length) if length else b""
        request = Received(method, path, headers, body)
        with self.lock:
            reply = _as_reply(self.respond(len(self.received) + 1, request), self.retry_after)
            self.attempts.append(request)
            if 200 <= reply.status < 300 and self.keep:
                self.received.append(request)
        if not self.keep:
            self.attempts.clear()
        await self._take_time(request, reply.delay_seconds)
        if reply.cut:
            return False
        await self._answer(writer, reply)
        return not (reply.size or reply.trickle_seconds or reply.trickle_head)

    async def _take_time(self, request: Received, delay: float | None) -> None:
        if delay == 0:
            return  # at once, past any queue (the benchmark's /stats)
        delay = self.delay_seconds if delay is None else delay
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self._slots is not None:
                async with self._slots:  # the requests beyond capacity wait here: the queue
                    self.queue_waits.append(time.monotonic() - request.at)
                    await asyncio.sleep(delay)
            elif delay:
                await asyncio.sleep(delay)
        finally:
            self.in_flight -= 1
        if self.on_request is not None:
            self.on_request(request, time.monotonic())

    async def _answer(self, writer: Any, reply: Reply) -> None:
        head = _head(reply)
        if reply.trickle_head:
            await self._trickle(writer, head, reply.trickle_seconds)
            return
        if not (reply.size or reply.trickle_seconds):
            writer.write(head + reply.body)  # one packet, as a real server sends it
            await writer.drain()
            return
        writer.write(head)
        if reply.size:
            chunk = b"x" * 65536
            for _ in range(reply.size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
        elif reply.trickle_seconds:
            await self._trickle(writer, reply.body, reply.trickle_seconds)
        else:
            writer.write(reply.body)
        await writer.drain()

    @staticmethod
    async def _trickle(writer: Any, data: bytes, seconds: float) -> None:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(seconds)


class PgConnection:
    """A pg8000 connection with PyMySQL's shape, as far as the tests, the
    storm and the benchmark use it: cursors as context managers that return
    rows as dicts (or tuples, as PyMySQL's default cursor), begin, commit,
    rollback, autocommit."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str | None,
        database: str,
        dict_rows: bool = True,
    ) -> None:
        import pg8000.dbapi

        self.conn = pg8000.dbapi.connect(
            host=host, port=port, user=user, password=password or None, database=database
        )
        self.conn.autocommit = True
        self.dict_rows = dict_rows

    def cursor(self) -> PgCursor:
        return PgCursor(self.conn, self.dict_rows)

    def begin(self) -> None:
        self.cursor().execute("BEGIN")

    def commit(self) -> None:
        self.cursor().execute("COMMIT")

    def rollback(self) -> None:
        self.cursor().execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PgConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class PgCursor:
    """Enough of a DB-API cursor with dict rows, as PyMySQL's DictCursor."""

    def __init__(self, conn: Any, dict_rows: bool = True) -> None:
        self.cur = conn.cursor()
        self.dict_rows = dict_rows
        self.lastrowid = None

    def __enter__(self) -> PgCursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cur.close()

    def execute(self, sql: str, args: Any = None) -> int:
        self.cur.execute(sql, args if args is not None else ())
        return self.cur.rowcount

    def executemany(self, sql: str, rows: Any) -> None:
        for row in rows:
            self.execute(sql, row)

    def fetchall(self) -> list[Any]:
        if self.cur.description is None:
            return []
        if not self.dict_rows:
            return [tuple(row) for row in self.cur.fetchall()]
        names = [column[0] for column in self.cur.description]
        return [dict(zip(names, row)) for row in self.cur.fetchall()]

    def fetchone(self) -> Any:
        rows = self.fetchall()
        return rows[0] if rows else None


# --------------------------------------------------------------------------
# Orthanc: a real one (Debian's package), and DICOM files to feed it
# --------------------------------------------------------------------------

ORTHANC_BINARY = "/usr/sbin/Orthanc"


class OrthancServer:
    """A real Orthanc on a free loopback port, with a throwaway storage in
    `directory`, users `indexer` (and its password) only. Stopped by its own
    process id (SIGTERM, as systemd does, or SIGKILL)."""

    USER, PASSWORD = "indexer", "orthanc-pw-for-tests"

    def __init__(self, directory: Any, stable_age_seconds: int = 2, **settings: Any) -> None:
        import pathlib

        import requests

        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "Name": "dicom-indexer-test",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "StableAge": stable_age_seconds,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.USER: self.PASSWORD},
            "HttpCompressionEnabled": False,
            **settings,
        }
        self.config = self.directory / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.http = requests.Session()
        self.http.auth = (self.USER, self.PASSWORD)
        self.process: Any = None
        self.start()

    def start(self, timeout_seconds: float = 30.0) -> None:
        import subprocess

        log = open(self.directory / "orthanc.log", "ab")  # noqa: SIM115 (the process keeps it)
        # TCP_NODELAY=1: DCMTK (Orthanc's DICOM port) then turns off Nagle's
        # algorithm; without it each C-FIND waits out a delayed ACK (92 ms
        # instead of 8, measured): the tests' time, not what they check.
        self.process = subprocess.Popen(
            [ORTHANC_BINARY, str(self.config)],
            stdout=log,
            stderr=log,
            cwd=self.directory,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        deadline = time.monotonic() + timeout_seconds
        while True:
            try:
                if self.http.get(self.url + "/system", timeout=2).status_code == 200:
                    return
            except OSError:  # requests' errors are OSErrors: not listening yet
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: see {self.directory / 'orthanc.log'}")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        import signal

        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.wait(timeout=60)
        self.process = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill)
        self.start()

    def get(self, path: str) -> Any:
        response = self.http.get(self.url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.http.post(self.url + path, data=data, timeout=60)
        response.raise_for_status()
        return response.json()

    def delete(self, path: str) -> None:
        self.http.delete(self.url + path, timeout=30).raise_for_status()

    def upload(self, dicom: bytes) -> dict[str, Any]:
        """POST /instances; the answer names the instance, its study, its
        patient. Orthanc's own SQLite index can be busy under parallel
        uploads (HTTP 500): tried again, as a modality would."""
        import requests

        for attempt in range(5):
            try:
                return self.post("/instances", dicom)
            except requests.HTTPError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def studies(self) -> list[str]:
        return self.get("/studies?since=0&limit=100000")


def new_uid() -> str:
    """A fresh DICOM UID (2.25 + a random 128-bit number, as DICOM allows)."""
    import uuid

    return f"2.25.{uuid.uuid4().int}"


def dicom_instance(
    patient_id: str = "12345678-5",
    patient_name: str = "PEREZ^JUAN",
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
    study_date: str = "20240517",
    study_time: str = "094210.000",
    study_description: str | None = "TC DE CEREBRO",
) -> bytes:
    """A small DICOM file (one 2x2 secondary capture image), as bytes."""
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_uid = new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.PatientID, ds.PatientName = patient_id, patient_name
    ds.StudyInstanceUID = study_uid or new_uid()
    ds.SeriesInstanceUID = series_uid or new_uid()
    ds.Modality, ds.StudyDate, ds.StudyTime = modality, study_date, study_time
    if study_description is not None:
        ds.StudyDescription = study_description
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = b"\x00\x01\x02\x03"
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)  # pydicom 3
    except TypeError:  # pydicom 2 (Python 3.8, 3.9)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.preamble = b"\x00" * 128
        pydicom.dcmwrite(buffer, ds, write_like_original=False)
    return buffer.getvalue()


class TableReads:
    """The rows each table of one database has read, as its server counts
    them: what statements cost the PACS, whoever ran them and however they
    were planned. PostgreSQL: pg_stat_user_tables' rows read by sequential
    scans plus pg_stat_user_indexes' entries read by index scans (a backend
    hands its counts over when it ends, so the snapshot waits for the
    client's backends to end). MariaDB: information_schema.TABLE_STATISTICS
    (userstat, switched on while this is open); MySQL: performance_schema's
    rows fetched per table.

    `connect()` opens an administrator's connection to that database."""

    def __init__(self, engine: str, connect: Callable[[], Any]) -> None:
        self.engine = engine
        self.connect = connect
        self.userstat_was: str | None = None
        self.mysql_source = ""

    def __enter__(self) -> TableReads:
        if self.engine == "mysql":
            with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
                cur.execute("SHOW GLOBAL VARIABLES LIKE 'userstat'")
                row = cur.fetchone()
                if row is not None:
                    self.userstat_was = _values(row)[1]
                    cur.execute("SET GLOBAL userstat = 1")
                    self.mysql_source = "userstat"
                else:
                    self.mysql_source = "performance_schema"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.userstat_was is not None and self.userstat_was.upper() in ("OFF", "0"):
            with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
                cur.execute("SET GLOBAL userstat = 0")

    def snapshot(self, wait_for_backends: str | None = "dicom-indexer") -> dict[str, int]:
        """Rows read so far, by table. On PostgreSQL, first waits until no
        backend of that application_name (None: no other client backend at
        all) is connected to the database, so that theirs are counted."""
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            if self.engine == "postgresql":
                return self._pg_snapshot(cur, wait_for_backends)
            if self.mysql_source == "userstat":
                cur.execute(
                    "SELECT TABLE_NAME, ROWS_READ FROM information_schema.TABLE_STATISTICS"
                    " WHERE TABLE_SCHEMA = DATABASE()"
                )
            else:
                cur.execute(
                    "SELECT OBJECT_NAME, COUNT_FETCH"
                    " FROM performance_schema.table_io_waits_summary_by_table"
                    " WHERE OBJECT_SCHEMA = DATABASE()"
                )
            return {str(name).lower(): int(count) for name, count in map(_values, cur.fetchall())}

    @staticmethod
    def _pg_snapshot(cur: Any, application: str | None) -> dict[str, int]:
        others = (
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND "
            + ("application_name = %s" if application else "backend_type = 'client backend'")
        )
        deadline = time.monotonic() + 30
        while True:
            cur.execute(others, (application,) if application else None)
            if int(_values(cur.fetchone())[0]) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        counts: dict[str, int] = {}
        for _ in range(50):  # before 15, a statistics collector: its file lags
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute(
                "SELECT t.relname, t.seq_tup_read + COALESCE(SUM(i.idx_tup_read), 0)"
                " FROM pg_stat_user_tables t"
                " LEFT JOIN pg_stat_user_indexes i ON i.relid = t.relid"
                " GROUP BY t.relname, t.seq_tup_read"
            )
            now = {str(name): int(count) for name, count in map(_values, cur.fetchall())}
            cur.execute("SELECT current_setting('server_version_num')::int >= 150000")
            if now == counts or _values(cur.fetchone())[0]:
                return now
            counts = now
            time.sleep(0.1)
        return counts

    @staticmethod
    def difference(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        """Rows read between two snapshots, by table (tables that read none left out)."""
        read = {table: after[table] - before.get(table, 0) for table in after}
        return {table: rows for table, rows in sorted(read.items()) if rows}


def _values(row: Any) -> tuple:
    """A row's values, whether the cursor gives tuples or dicts."""
    return tuple(row.values()) if isinstance(row, dict) else tuple(row)


# -- DICOMweb: an Orthanc with its plugin, and studies to fill it with ------------

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def dicomweb_orthanc_settings(**extra: Any) -> dict[str, Any]:
    """OrthancServer's extra settings for a QIDO-RS service at /dicom-web/:
    the DICOMweb plugin (Debian's orthanc-dicomweb), answering in UTF-8
    (Orthanc's default, Latin-1, drops what Latin-1 lacks)."""
    return {
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DefaultEncoding": "Utf8",
        **extra,
    }


def dicom_instance_with(
    patient_name: str = "PEREZ^JUAN",
    charset: str | None = "ISO_IR 192",
    timezone_offset: str | None = None,
    absent: tuple[str, ...] = (),
    **kwargs: Any,
) -> bytes:
    """dicom_instance, with a SpecificCharacterSet (UTF-8 by default, for
    names in any script and with ideographic and phonetic groups), a
    TimezoneOffsetFromUTC, and the named attributes left out ("StudyDate",
    "StudyTime": an undated or untimed study)."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_instance(patient_name="PLACEHOLDER", **kwargs)))
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = patient_name
    if timezone_offset is not None:
        ds.TimezoneOffsetFromUTC = timezone_offset
    for keyword in absent:
        delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def store_instances(orthanc: OrthancServer, instances: list[bytes]) -> list[str]:
    """POSTs each instance to Orthanc's /instances; the Orthanc IDs of their
    studies, in order."""
    return [orthanc.upload(dicom)["ParentStudy"] for dicom in instances]


def dicom_instance_keyed(
    keys: dict[str, Any],
    specific_character_set: str | list[str] | None = "ISO_IR 192",
    modality: str = "CT",
) -> bytes:
    """A small DICOM file with these study-level keys (StudyInstanceUID,
    PatientName, StudyDate...; a key left out is absent: an undated or
    untimed study) written in this character set (None: none declared)."""
    import io

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_uid = new_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    if specific_character_set is not None:
        ds.SpecificCharacterSet = specific_character_set
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.SeriesInstanceUID = new_uid()
    ds.Modality = modality
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    if "StudyInstanceUID" not in keys:
        ds.StudyInstanceUID = new_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = b"\x00\x01\x02\x03"
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)  # pydicom 3
    except TypeError:  # pydicom 2 (Python 3.8, 3.9)
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.preamble = b"\x00" * 128
        pydicom.dcmwrite(buffer, ds, write_like_original=False)
    return buffer.getvalue()
