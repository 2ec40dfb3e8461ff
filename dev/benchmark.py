#!/usr/bin/env python3
"""Benchmark of the DICOM Indexer client on this machine.

Builds a throwaway PACS database with N studies spread over ten years
(dcm4chee 2.x, or dcm4chee-arc-light 5 with --schema arc5; on MySQL/MariaDB,
or PostgreSQL with --engine postgresql), installs the indexer with that
schema's and engine's script, starts the central-service stand-in
(dev/testkit.py) in a process of its own, and measures:

  - `client.py initial` (enqueue and send) as a subprocess: studies/s, the
    client's own peak memory (VmHWM) and CPU
  - the same number of POSTs from a bare requests.Session loop, the reference
  - a no-op `client.py` tick: wall time
  - the PACS's view: while `initial` runs, a second connection updates random
    study rows every few ms, as dcm4chee does while storing images; the
    longest of those updates is reported, split into statement and commit,
    beside the same probe run alone first (the machine's own floor)

With --source orthanc, dicomweb or dimse: a real Orthanc fed DICOM files,
read through its REST API, QIDO-RS (its DICOMweb plugin) or C-FIND (its
DICOM port), each with the requests or queries it received, beside a bare
loop of the same queries and POSTs (dev/BENCHMARK.md, section 9).

With --scene, the scenes of adaptive delivery instead: a WAN (50 ms per
answer), a service at its capacity, ten centers loading at once, and a
service failing one request in four (flaky); --scene adaptive runs them all.

Before measuring, it waits until the database server has finished writing
what the build wrote (InnoDB quiet for 10 s): the probe should show the
client, not the build's aftermath.

    python dev/benchmark.py                      # 100,000 studies
    python dev/benchmark.py --studies 1000000
    python dev/benchmark.py --engine postgresql --schema arc5 --studies 100000
    python dev/benchmark.py --studies 20000 --latency-ms 50 --concurrency 16
    python dev/benchmark.py --scene adaptive --json scenes.json
    python dev/benchmark.py --json results.json
    python dev/benchmark.py --studies 1000000 --keep       # keep the archive
    python dev/benchmark.py --database dicom_indexer_bench_1a2b3c4d   # reuse it
    python dev/benchmark.py --source dimse --studies 10000 --site-venv   # as a site runs it

Needs a database server where it may create and drop a database (default
root@127.0.0.1:3306 or postgres@127.0.0.1:5432, or
DICOM_INDEXER_TEST_DB_* / DICOM_INDEXER_TEST_PG_*) and its command-line
client (mysql, or psql).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator

import pymysql
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from testkit import CentralService, PgConnection, Received, Reply, TableReads  # noqa: E402

from dicom_indexer.metrics import read_metrics  # noqa: E402  (the parser beside the writer)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_SQL = {
    ("dcm4chee2", "mysql"): ROOT / "tests" / "dcm4chee_schema.sql",
    ("dcm4chee2", "postgresql"): ROOT / "tests" / "dcm4chee_schema_postgresql.sql",
    ("arc5", "mysql"): ROOT / "tests" / "arclight5_schema.sql",
    ("arc5", "postgresql"): ROOT / "tests" / "arclight5_schema_postgresql.sql",
}
INDEXER_SQL = {
    ("dcm4chee2", "mysql"): ROOT / "extras" / "add_indexer.sql",
    ("dcm4chee2", "postgresql"): ROOT / "extras" / "add_indexer_postgresql.sql",
    ("arc5", "mysql"): ROOT / "extras" / "add_indexer_arclight5_mysql.sql",
    ("arc5", "postgresql"): ROOT / "extras" / "add_indexer_arclight5_postgresql.sql",
}
CLIENT = ROOT / "client.py"
METRICS_FILE = "indexer.prom"
# What a site installs (README): the client's venv holds these and nothing
# else. This machine's system Python also has numpy, which pydicom imports
# when present (about 11 MB of the DIMSE client's peak): --site-venv runs the
# client in a venv of only these files, as a site has it.
SITE_REQUIREMENTS = ("requirements.txt", "requirements-postgresql.txt", "requirements-dimse.txt")
SITE_VENV_CACHE = Path.home() / ".cache" / "dicom-indexer-bench"
# The interpreter that runs client.py: this one, or the site venv's.
client_python = sys.executable

SERVER_ROWS_PER_STATEMENT = 50_000  # one INSERT ... SELECT, one transaction
PROBE_INTERVAL_SECONDS = 0.005
PROBE_SLOW_SECONDS = 0.020  # updates slower than this are listed with their time
NOOP_REPEATS = 5
# indexer_process re-reads this much history on every tick (add_indexer.sql):
# the no-op ticks are measured once the probe's rewrites have left it.
SAFETY_WINDOW_SECONDS = 300
# Building (or resetting) the archive leaves InnoDB flushing pages for a
# while: a probe measured then shows the build, not the client. The server
# counts as quiet after this many seconds without InnoDB data reads or writes.
QUIET_SECONDS = 10
ARCHIVE_YEARS = 10
STUDY_PK_RE = re.compile(rb'"study_pk":\s*(\d+)')

# --------------------------------------------------------------------------
# The receiver: asyncio, in its own process, so that it is never the bottleneck
# --------------------------------------------------------------------------


CENTER_RE = re.compile(rb'"center":\s*"([^"]*)"')


def _receiver_process(
    port_out: Any, latency_seconds: float, capacity: int, fail_every: int
) -> None:
    """The service stand-in (testkit.CentralService), counting instead of
    keeping: answers every POST after `latency_seconds`. With `capacity`,
    serves at most that many at once, each taking `latency_seconds`, and
    queues the rest as a real service's worker pool would; the time each
    request waited in that queue is recorded (the service's view of the
    clients). With `fail_every`, every so many POSTs is answered 503 without
    Retry-After (one backend of several failing behind a load balancer).
    GET /stats and /reset answer at once."""
    service = CentralService(keep=False)
    state: dict[str, Any] = {}
    REGISTERED = Reply(201, b'{"status":"registered"}')  # noqa: N806 (made once, sent often)
    UNAVAILABLE = Reply(503, b'{"error": "no backend available"}')  # noqa: N806

    def reset() -> None:
        state.update(
            posts=0,
            failed=0,  # answered 503
            studies=set(),  # (center, study_pk)
            first={},  # per center: first and last post
            last={},
        )
        service.max_in_flight = 0
        service.queue_waits.clear()

    def stats() -> dict[str, Any]:
        waits = sorted(service.queue_waits)
        return {
            "posts": state["posts"],
            "failed_posts": state["failed"],
            "unique_studies": len(state["studies"]),
            "max_in_flight": service.max_in_flight,
            "queue_p99_ms": round(waits[int(len(waits) * 0.99)] * 1000, 1) if waits else 0.0,
            "queue_max_ms": round(waits[-1] * 1000, 1) if waits else 0.0,
            "centers": {
                center: {
                    "posts_per_second": round(
                        sum(1 for c, _ in state["studies"] if c == center)
                        / max(1e-6, state["last"][center] - state["first"][center]),
                        1,
                    ),
                    "first": state["first"][center],
                    "last": state["last"][center],
                }
                for center in state["first"]
            },
        }

    def tally(request: Received, answered: float) -> None:
        if request.method != "POST":
            return
        state["posts"] += 1
        if getattr(request, "failed", False):
            state["failed"] += 1
            return
        match, center = STUDY_PK_RE.search(request.body), CENTER_RE.search(request.body)
        name = center.group(1).decode() if center else ""
        if match:
            state["studies"].add((name, int(match.group(1))))
        state["first"].setdefault(name, request.at)
        state["last"][name] = answered

    def respond(number: int, request: Received) -> Reply:
        if request.path.startswith("/stats"):
            return Reply(201, json.dumps(stats()).encode(), delay_seconds=0)
        if request.path.startswith("/reset"):
            reset()
            return Reply(201, delay_seconds=0)
        state["arrived"] = state.get("arrived", 0) + 1
        if fail_every and state["arrived"] % fail_every == 0:
            request.failed = True  # type: ignore[attr-defined]
            return UNAVAILABLE
        return REGISTERED

    reset()
    service.respond = respond
    service.on_request = tally
    service.delay_seconds = latency_seconds
    if capacity:
        service.serve_at_most(capacity, latency_seconds)
    port_out.send(service.port)
    threading.Event().wait()  # until the benchmark terminates this process


class Receiver:
    def __init__(self, latency_ms: float, capacity: int = 0, fail_every: int = 0) -> None:
        parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(
            target=_receiver_process,
            args=(child, latency_ms / 1000.0, capacity, fail_every),
            daemon=True,
        )
        self.process.start()
        self.port = parent.recv()
        self.url = f"http://127.0.0.1:{self.port}/api/v1/register"

    def stats(self) -> dict[str, Any]:
        return requests.get(f"http://127.0.0.1:{self.port}/stats", timeout=30).json()

    def reset(self) -> None:
        requests.get(f"http://127.0.0.1:{self.port}/reset", timeout=30).raise_for_status()

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


# --------------------------------------------------------------------------
# The database
# --------------------------------------------------------------------------


def _connect(args: argparse.Namespace, database: str | None = None) -> Any:
    if args.engine == "postgresql":
        return PgConnection(
            args.host, args.port, args.user, args.password, database or "postgres", dict_rows=False
        )
    return pymysql.connect(
        host=args.host,
        port=args.port,
        user=args.user,
        password=args.password,
        database=database,
        charset="utf8mb4",
        autocommit=True,
    )


def _run_sql_file(args: argparse.Namespace, database: str, path: Path) -> None:
    if args.engine == "postgresql":
        subprocess.run(
            ["psql", "-h", args.host, "-p", str(args.port), "-U", args.user, "-d", database]
            + ["-q", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
            check=True,
            env=dict(os.environ, PGPASSWORD=args.password),
        )
        return
    client = shutil.which("mysql") or shutil.which("mariadb")
    if client is None:
        sys.exit("benchmark: the mysql command-line client is needed")
    with open(path, "rb") as stdin:
        subprocess.run(
            [client, "-h", args.host, "-P", str(args.port), "-u", args.user, database],
            stdin=stdin,
            check=True,
            env=dict(os.environ, MYSQL_PWD=args.password),
        )


def build_database(args: argparse.Namespace, name: str) -> float:
    """N studies over ten years, two per patient, in the schema and on the
    engine of `args`, with the indexer installed; returns seconds taken."""
    started = time.monotonic()
    with _connect(args) as conn, conn.cursor() as cur:
        if args.engine == "postgresql":
            cur.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
        else:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET latin1")
    _run_sql_file(args, name, SCHEMA_SQL[args.schema, args.engine])
    FILL_ARCHIVE[args.schema, args.engine](args, name)
    _run_sql_file(args, name, INDEXER_SQL[args.schema, args.engine])
    return time.monotonic() - started


def _generated_blocks(
    args: argparse.Namespace, name: str, tables: str
) -> Iterator[tuple[Any, tuple[int, int], tuple[int, int] | None]]:
    """What the MySQL archives are generated from: bench_numbers(n), holding
    0 to studies - 1, and, a block of SERVER_ROWS_PER_STATEMENT at a time, a
    cursor, the block of study numbers and that of patient numbers (two
    studies per patient; None past the last patient). At the end the numbers
    are dropped and `tables` analyzed. (A client-side insert of a million
    studies took over 20 minutes with a 128 MB buffer pool.)"""
    patients = (args.studies + 1) // 2
    with _connect(args, name) as conn, conn.cursor() as cur:
        cur.execute("SET unique_checks = 0, foreign_key_checks = 0")
        cur.execute("CREATE TABLE bench_numbers (n INT NOT NULL PRIMARY KEY) ENGINE=InnoDB")
        cur.execute("INSERT INTO bench_numbers VALUES (0)")
        size = 1
        while size < args.studies:
            cur.execute(
                "INSERT INTO bench_numbers SELECT n + %s FROM bench_numbers WHERE n + %s < %s",
                (size, size, args.studies),
            )
            size *= 2
        for start in range(0, args.studies, SERVER_ROWS_PER_STATEMENT):
            block = (start, start + SERVER_ROWS_PER_STATEMENT)
            yield cur, block, (start, min(block[1], patients)) if start < patients else None
        cur.execute("DROP TABLE bench_numbers")
        cur.execute(f"ANALYZE TABLE {tables}")


def _fill_dcm4chee2_mysql(args: argparse.Namespace, name: str) -> None:
    """Patients and studies as dcm4chee 2.x keeps them, generated by the
    server from a numbers table; the "random" parts come from CRC32 of the
    row number, so the archive is the same on every run."""
    span_seconds = ARCHIVE_YEARS * 365 * 86400
    for cur, block, patient_block in _generated_blocks(args, name, "patient, study"):
        if patient_block:
            cur.execute(
                "INSERT INTO patient (pk, pat_id, pat_name, pat_birthdate, pat_sex,"
                " created_time, updated_time)"
                " SELECT n + 1, CONCAT(10000000 + n, '-', n MOD 10),"
                " CONCAT('APELLIDO', n, '^NOMBRE^SEGUNDO'), '19700101', 'F', '2016-01-01',"
                " '2016-01-01' FROM bench_numbers WHERE n >= %s AND n < %s",
                patient_block,
            )
        # Spread over ten years, each updated seconds to two hours after it was created.
        cur.execute(
            "INSERT INTO study (pk, patient_fk, study_iuid, study_datetime, study_desc,"
            " mods_in_study, num_series, num_instances, availability, study_status,"
            " created_time, updated_time, study_attrs)"
            " SELECT n + 1, n DIV 2 + 1,"
            " CONCAT('1.2.840.113619.2.55.3.', n, '.', CRC32(CONCAT('u', n))), c,"
            " 'TC DE CEREBRO SIN CONTRASTE', ELT(1 + CRC32(CONCAT('m', n)) MOD 7,"
            " 'CT', 'MR', 'CR', 'US', 'CT\\\\SR', 'MR\\\\SR', 'DX'),"
            " 1 + CRC32(CONCAT('s', n)) MOD 12, 1 + CRC32(CONCAT('i', n)) MOD 2000, 0, 0, c,"
            " c + INTERVAL 5 + CRC32(CONCAT('t', n)) MOD 7196 SECOND,"
            " UNHEX(REPEAT('0800050043530a0049534f5f495220313030', 16))"
            " FROM (SELECT n, TIMESTAMP '2016-01-01 00:00:00' + INTERVAL %s * n DIV %s SECOND"
            " AS c FROM bench_numbers WHERE n >= %s AND n < %s) g",
            (span_seconds, args.studies, *block),
        )


def _fill_arclight5_mysql(args: argparse.Namespace, name: str) -> None:
    """Patients (a name, an ID), studies, and each study's counts for the view
    hideRejected: a settled archive, generated by the server as for 2.x."""
    span_seconds = ARCHIVE_YEARS * 365 * 86400
    tables = "person_name, patient, patient_id, study, study_query_attrs"
    for cur, block, patient_block in _generated_blocks(args, name, tables):
        if patient_block:
            cur.execute(
                "INSERT INTO person_name (pk, alphabetic_name, ideographic_name,"
                " phonetic_name) SELECT n + 1, CONCAT('APELLIDO', n, '^NOMBRE^SEGUNDO^^^'),"
                " '^^^^^', '^^^^^' FROM bench_numbers WHERE n >= %s AND n < %s",
                patient_block,
            )
            cur.execute(
                "INSERT INTO patient (pk, created_time, updated_time, version, pat_name_fk,"
                " num_studies) SELECT n + 1, '2016-01-01', '2016-01-01', 0, n + 1, 2"
                " FROM bench_numbers WHERE n >= %s AND n < %s",
                patient_block,
            )
            cur.execute(
                "INSERT INTO patient_id (pat_id, version, patient_fk)"
                " SELECT CONCAT(10000000 + n, '-', n MOD 10), 0, n + 1"
                " FROM bench_numbers WHERE n >= %s AND n < %s",
                patient_block,
            )
        cur.execute(
            "INSERT INTO study (pk, study_iuid, study_date, study_time, study_desc,"
            " patient_fk, created_time, updated_time, modified_time, access_time,"
            " version, rejection_state, study_size)"
            " SELECT n + 1, CONCAT('1.2.840.113619.2.55.3.', n, '.', CRC32(CONCAT('u', n))),"
            " DATE_FORMAT(c, '%%Y%%m%%d'), CONCAT(DATE_FORMAT(c, '%%H%%i%%s'), '.000'),"
            " 'TC DE CEREBRO SIN CONTRASTE', n DIV 2 + 1, c, u, u, u, 1, 0, 123456"
            " FROM (SELECT n, c, c + INTERVAL 5 + CRC32(CONCAT('t', n)) MOD 7196 SECOND AS u"
            " FROM (SELECT n, TIMESTAMP '2016-01-01 00:00:00' + INTERVAL %s * n DIV %s SECOND"
            " AS c FROM bench_numbers WHERE n >= %s AND n < %s) g) h",
            (span_seconds, args.studies, *block),
        )
        cur.execute(
            "INSERT INTO study_query_attrs (study_fk, view_id, num_series, num_instances,"
            " mods_in_study) SELECT n + 1, 'hideRejected', 1 + CRC32(CONCAT('s', n)) MOD 12,"
            " 1 + CRC32(CONCAT('i', n)) MOD 2000, ELT(1 + CRC32(CONCAT('m', n)) MOD 7,"
            " 'CT', 'MR', 'CR', 'US', 'SR\\\\CT', 'SR\\\\MR', 'DX')"
            " FROM bench_numbers WHERE n >= %s AND n < %s",
            block,
        )


def _fill_dcm4chee2_postgresql(args: argparse.Namespace, name: str) -> None:
    """The same archive on PostgreSQL, generated by the server itself
    (pg8000 would send a million rows one statement each)."""
    span_seconds = ARCHIVE_YEARS * 365 * 86400
    with _connect(args, name) as conn, conn.cursor() as cur:
        cur.execute("SELECT setseed(0.42)")
        cur.execute(
            "INSERT INTO patient (pat_id, pat_name, pat_birthdate, pat_sex, created_time,"
            " updated_time) SELECT (10000000 + i) || '-' || (i %% 10),"
            " 'APELLIDO' || i || '^NOMBRE^SEGUNDO', '19700101', 'F',"
            " '2016-01-01', '2016-01-01' FROM generate_series(0, %s) AS i",
            ((args.studies + 1) // 2 - 1,),
        )
        cur.execute(
            "INSERT INTO study (patient_fk, study_iuid, study_datetime, study_desc,"
            " mods_in_study, num_series, num_instances, availability, study_status,"
            " created_time, updated_time, study_attrs)"
            " SELECT i / 2 + 1, '1.2.840.113619.2.55.3.' || i || '.' || (random() * 1e9)::bigint,"
            " c, 'TC DE CEREBRO SIN CONTRASTE',"
            " (ARRAY['CT', 'MR', 'CR', 'US', 'CT\\SR', 'MR\\SR', 'DX'])[1 + (random() * 6)::int],"
            " 1 + (random() * 11)::int, 1 + (random() * 1999)::int, 0, 0, c,"
            " c + make_interval(secs => 5 + (random() * 7195)::int),"
            " decode(repeat('0800050043530a0049534f5f495220313030', 16), 'hex')"
            " FROM (SELECT i, TIMESTAMP '2016-01-01' + make_interval(secs => %s::float8 * i / %s)"
            " AS c FROM generate_series(0, %s) AS i) g",
            (span_seconds, args.studies, args.studies - 1),
        )
        cur.execute("VACUUM ANALYZE patient")
        cur.execute("VACUUM ANALYZE study")


def _fill_arclight5_postgresql(args: argparse.Namespace, name: str) -> None:
    span_seconds = ARCHIVE_YEARS * 365 * 86400
    patients = (args.studies + 1) // 2
    with _connect(args, name) as conn, conn.cursor() as cur:
        cur.execute("SELECT setseed(0.42)")
        cur.execute(
            "INSERT INTO person_name (pk, alphabetic_name, ideographic_name, phonetic_name)"
            " SELECT i, 'APELLIDO' || i || '^NOMBRE^SEGUNDO^^^', '^^^^^', '^^^^^'"
            " FROM generate_series(1, %s) AS i",
            (patients,),
        )
        cur.execute(
            "INSERT INTO patient (pk, created_time, updated_time, version, pat_name_fk,"
            " num_studies) SELECT i, '2016-01-01', '2016-01-01', 0, i, 2"
            " FROM generate_series(1, %s) AS i",
            (patients,),
        )
        cur.execute(
            "INSERT INTO patient_id (pat_id, version, patient_fk)"
            " SELECT (10000000 + i) || '-' || (i %% 10), 0, i FROM generate_series(1, %s) AS i",
            (patients,),
        )
        cur.execute(
            "INSERT INTO study (pk, study_iuid, study_date, study_time, study_desc, patient_fk,"
            " created_time, updated_time, modified_time, access_time, version,"
            " rejection_state, study_size)"
            " SELECT i + 1, '1.2.840.113619.2.55.3.' || i || '.' || (random() * 1e9)::bigint,"
            " to_char(c, 'YYYYMMDD'), to_char(c, 'HH24MISS') || '.000',"
            " 'TC DE CEREBRO SIN CONTRASTE', i / 2 + 1, c, u, u, u, 1, 0, 123456"
            " FROM (SELECT i, c, c + make_interval(secs => 5 + (random() * 7195)::int) AS u"
            " FROM (SELECT i, TIMESTAMP '2016-01-01' + make_interval(secs => %s::float8 * i / %s)"
            " AS c FROM generate_series(0, %s) AS i) g) h",
            (span_seconds, args.studies, args.studies - 1),
        )
        cur.execute(
            "INSERT INTO study_query_attrs (study_fk, view_id, num_series, num_instances,"
            " mods_in_study) SELECT pk, 'hideRejected', 1 + (random() * 11)::int,"
            " 1 + (random() * 1999)::int,"
            " (ARRAY['CT', 'MR', 'CR', 'US', 'SR\\CT', 'SR\\MR', 'DX'])[1 + (random() * 6)::int]"
            " FROM study"
        )
        cur.execute("SELECT setval('study_pk_seq', %s)", (args.studies,))
        for table in ("person_name", "patient", "patient_id", "study", "study_query_attrs"):
            cur.execute(f"VACUUM ANALYZE {table}")


FILL_ARCHIVE = {
    ("dcm4chee2", "mysql"): _fill_dcm4chee2_mysql,
    ("dcm4chee2", "postgresql"): _fill_dcm4chee2_postgresql,
    ("arc5", "mysql"): _fill_arclight5_mysql,
    ("arc5", "postgresql"): _fill_arclight5_postgresql,
}


def _innodb_io(cur: Any) -> tuple[tuple[str, str], ...]:
    """InnoDB's read and write counters and purge backlog: unchanged while quiet."""
    cur.execute(
        "SHOW GLOBAL STATUS WHERE Variable_name IN"
        " ('Innodb_data_reads', 'Innodb_data_writes', 'Innodb_history_list_length')"
    )
    return tuple(sorted(cur.fetchall()))


def wait_for_quiet_server(args: argparse.Namespace) -> float:
    """Waits until InnoDB has finished flushing and purging what the build
    wrote; returns seconds waited. PostgreSQL: a checkpoint writes it all."""
    started = time.monotonic()
    if args.engine == "postgresql":
        with _connect(args) as conn, conn.cursor() as cur:
            cur.execute("CHECKPOINT")
        time.sleep(min(QUIET_SECONDS, args.max_settle_seconds))
        return time.monotonic() - started
    with _connect(args) as conn, conn.cursor() as cur:
        before = _innodb_io(cur)
        while time.monotonic() - started < args.max_settle_seconds:
            time.sleep(QUIET_SECONDS)
            after = _innodb_io(cur)
            if after == before:
                break
            before = after
    return time.monotonic() - started


def reset_database(args: argparse.Namespace, name: str) -> int:
    """A database kept by an earlier --keep run, as if the indexer had just been
    installed: saves rebuilding a large archive between two measurements."""
    with _connect(args, name) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*), MAX(pk) FROM study")
        count, highest = cur.fetchone()
        if not count or count != highest:
            sys.exit(f"benchmark: {name} is not a database built by this benchmark")
        cur.execute("DROP TABLE IF EXISTS study_service")
    _run_sql_file(args, name, INDEXER_SQL[args.schema, args.engine])
    return int(count)


class PacsLoadProbe(threading.Thread):
    """dcm4chee storing images: random study rows rewritten every few ms.

    Each update is timed as a whole (what dcm4chee waits) and in its two
    parts: the statement (row locks, page reads, CPU: what another client
    can make worse) and the commit (the redo log's flush to disk: mostly the
    disk's own latency, which the baseline without the client shows)."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        super().__init__(daemon=True)
        self.conn = _connect(args, name)
        self.max_pk = args.studies
        # arc-light: a JPA update of the study row (@PreUpdate, @Version).
        self.update = (
            "UPDATE study SET updated_time = NOW(), access_time = NOW(), version = version + 1"
            " WHERE pk = %s"
            if args.schema == "arc5"
            else "UPDATE study SET num_instances = num_instances + 1, updated_time = NOW()"
            " WHERE pk = %s"
        )
        self.waits: list[float] = []
        self.longest_statement = 0.0
        self.longest_commit = 0.0
        self.slow_at: list[float] = []  # seconds since the start, of each slow update
        self.longest_at = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        rng = random.Random(7)
        began = time.perf_counter()
        longest = 0.0
        with self.conn.cursor() as cur:
            while not self.stopping.is_set():
                pk = rng.randint(1, self.max_pk)
                started = time.perf_counter()
                self.conn.begin()
                cur.execute(self.update, (pk,))
                updated = time.perf_counter()
                self.conn.commit()
                committed = time.perf_counter()
                wait = committed - started
                self.longest_statement = max(self.longest_statement, updated - started)
                self.longest_commit = max(self.longest_commit, committed - updated)
                if wait > PROBE_SLOW_SECONDS:
                    self.slow_at.append(started - began)
                if wait > longest:
                    longest, self.longest_at = wait, started - began
                self.waits.append(wait)
                time.sleep(PROBE_INTERVAL_SECONDS)

    def stop(self) -> dict[str, Any]:
        self.stopping.set()
        self.join()
        self.conn.close()
        waits = sorted(self.waits) or [0.0]
        return {
            "updates": len(self.waits),
            "max_ms": waits[-1] * 1000,
            "p99_ms": waits[int(len(waits) * 0.99)] * 1000,
            "p999_ms": waits[int(len(waits) * 0.999)] * 1000,
            "statement_max_ms": self.longest_statement * 1000,
            "commit_max_ms": self.longest_commit * 1000,
            "slow_updates": len(self.slow_at),
            # When they happened tells which phase of the load caused them.
            "longest_at_seconds": round(self.longest_at, 1),
            "slow_per_minute": dict(
                sorted(collections.Counter(int(t // 60) for t in self.slow_at).items())
            ),
        }


# What the database server as a whole did while the client ran: row lock
# waits (a PACS write that waited for a row the client held) and commits
# (each one a flush of the redo log or WAL, which the PACS's own commits queue
# behind).
SERVER_ACTIVITY = {
    "mysql": (
        "SHOW GLOBAL STATUS WHERE Variable_name IN"
        " ('Innodb_row_lock_waits', 'Innodb_row_lock_time', 'Com_commit', 'Innodb_log_writes')"
    ),
    "postgresql": (
        "SELECT 'xact_commit', xact_commit FROM pg_stat_database"
        " WHERE datname = current_database()"
        " UNION ALL SELECT 'deadlocks', deadlocks FROM pg_stat_database"
        " WHERE datname = current_database()"
    ),
}


def server_activity(args: argparse.Namespace, name: str) -> dict[str, int]:
    with _connect(args, name) as conn, conn.cursor() as cur:
        if args.engine == "postgresql":
            cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute(SERVER_ACTIVITY[args.engine])
        return {str(key): int(value) for key, value in cur.fetchall()}


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def client_environment(**extra: str) -> dict[str, str]:
    """The environment of client.py as cron runs it at a site, where Python
    keeps the client's compiled modules in __pycache__ (install step 4 gives
    the service user the project's directory; its first run, `check`,
    compiles them). A shell that sets PYTHONDONTWRITEBYTECODE (this one
    may) would add compiling, 75 ms here (measured), to every run's figures."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    environment.update(extra)
    return environment


def compile_client() -> None:
    """The client's modules compiled, as a site's first run leaves them:
    the first run measured here (`initial`) then pays no compiling either."""
    subprocess.run(
        [client_python, "-m", "compileall", "-q", str(ROOT / "dicom_indexer")],
        check=True,
        env=client_environment(),
        stdout=subprocess.DEVNULL,
    )


def _start_client(config_dir: Path, *command: str) -> subprocess.Popen:
    """client.py as cron runs it (-q), with the files of `config_dir`."""
    config, server = str(config_dir / "config.json"), str(config_dir / "server.json")
    return subprocess.Popen(
        [client_python, str(CLIENT), *command, "-q", "--config", config, "--server", server],
        env=client_environment(),
    )


def _wait_client(process: subprocess.Popen) -> tuple[int, float, float]:
    """Waits for it; returns (exit code, peak RSS in MB, CPU seconds: user +
    system, the client's own cost whatever the network).

    The peak is the client's VmHWM, read from /proc while it runs. Not
    wait4's ru_maxrss: Linux keeps in it the size of the memory a child
    leaves at exec, which after fork is this benchmark's own (about 50 MB
    with its drivers and receiver), so it reported the larger of the two."""
    peak_kb = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak_kb
        while not done.is_set():
            try:
                with open(f"/proc/{process.pid}/status") as status_file:
                    for line in status_file:
                        if line.startswith("VmHWM:"):
                            peak_kb = max(peak_kb, int(line.split()[1]))
            except OSError:
                return
            done.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    watcher.join()
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    process.returncode = code
    return code, peak_kb / 1024.0, usage.ru_utime + usage.ru_stime


def run_client(config_dir: Path, *command: str) -> tuple[float, float, int, float]:
    """Runs client.py; returns (wall seconds, peak RSS in MB, exit code, CPU seconds)."""
    started = time.monotonic()
    code, rss, cpu = _wait_client(_start_client(config_dir, *command))
    return time.monotonic() - started, rss, code, cpu


def write_client_config(
    config_dir: Path,
    args: argparse.Namespace,
    name: str,
    url: str,
    concurrency: int | str,
    center: str = "BENCH",
    metrics: bool = False,
) -> None:
    """config.json and server.json in the original client's shapes, as at
    every site; with `metrics`, a metrics_file in `config_dir` too."""
    config_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "database": {
            "engine": args.engine,
            "host": args.host,
            "port": args.port,
            "user": args.user,
            "password": args.password,
            "name": name,
        },
        "key": "bench-key",
        "webservice_url": url,
        "concurrency": concurrency,
        "max_studies_per_second": args.max_studies_per_second,
    }
    if metrics:
        config["metrics_file"] = str(config_dir / METRICS_FILE)
    for file_name, data in (("config.json", config), ("server.json", {"server": center})):
        (config_dir / file_name).write_text(json.dumps(data))
        (config_dir / file_name).chmod(0o600)


def reference_loop(url: str, count: int) -> float:
    """A bare requests.Session posting `count` identical documents: studies/s."""
    document = {
        "patient_pk": 1,
        "patient_id": "10000000-0",
        "patient_name": "APELLIDO0^NOMBRE^SEGUNDO",
        "study_pk": 0,
        "study_iuid": "1.2.840.113619.2.55.3.0.123456789",
        "study_datetime": "2016-01-01 00:00:00",
        "study_description": "TC DE CEREBRO SIN CONTRASTE",
        "study_modality": "CT",
        "study_series": 3,
        "study_instances": 250,
        "center": "BENCH",
    }
    headers = {"X-Api-Key": "bench-key"}
    with requests.Session() as session:
        started = time.monotonic()
        for _ in range(count):
            session.post(url, json=document, headers=headers, timeout=30).raise_for_status()
        return count / (time.monotonic() - started)


def _machine() -> str:
    client = "" if client_python == sys.executable else f"; client in the site venv {client_python}"
    return (
        f"{platform.node()}: {os.cpu_count()} cores,"
        f" {platform.processor() or platform.machine()}, Python {platform.python_version()}"
        f"{client}"
    )


def site_venv() -> str:
    """The python of a venv holding only SITE_REQUIREMENTS (built once, then
    reused: its name carries a hash of those files and of this Python)."""
    import hashlib
    import venv

    digest = hashlib.sha256(platform.python_version().encode())
    for name in SITE_REQUIREMENTS:
        digest.update((ROOT / name).read_bytes())
    directory = SITE_VENV_CACHE / f"site-{digest.hexdigest()[:12]}"
    python = directory / "bin" / "python"
    if not (directory / "ready").exists():
        print(f"building the site venv {directory} ...", file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        venv.EnvBuilder(with_pip=True).create(directory)
        requirements = [arg for name in SITE_REQUIREMENTS for arg in ("-r", str(ROOT / name))]
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *requirements], check=True)
        (directory / "ready").write_text("")
    return str(python)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    name = args.database or f"dicom_indexer_bench_{uuid.uuid4().hex[:8]}"
    receiver = Receiver(args.latency_ms)
    results: dict[str, Any] = {
        "studies": args.studies,
        "engine": args.engine,
        "schema": args.schema,
        "database": name,
        "concurrency": args.concurrency,
        "max_studies_per_second": args.max_studies_per_second,
        "latency_ms": args.latency_ms,
        "baseline_seconds": args.baseline_seconds,
        "machine": _machine(),
    }
    try:
        if args.database:
            results["studies"] = args.studies = reset_database(args, name)
            print(f"reusing {name}: {args.studies:,} studies", file=sys.stderr)
        else:
            print(f"building {name} with {args.studies:,} studies ...", file=sys.stderr)
            results["build_seconds"] = round(build_database(args, name), 1)
        print("waiting for the database server to finish writing ...", file=sys.stderr)
        results["settle_seconds"] = round(wait_for_quiet_server(args), 1)
        with _connect(args) as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            results["database_server"] = cur.fetchone()[0]
        with tempfile.TemporaryDirectory() as tmp, TableReads(
            args.engine, lambda: _connect(args, name)
        ) as reads:
            config_dir = Path(tmp)
            write_client_config(config_dir, args, name, receiver.url, args.concurrency)

            print("PACS probe alone (baseline) ...", file=sys.stderr)
            probe = PacsLoadProbe(args, name)
            probe.start()
            time.sleep(args.baseline_seconds)
            results["pacs_probe_idle"] = probe.stop()

            print("client.py initial ...", file=sys.stderr)
            probe = PacsLoadProbe(args, name)
            activity = server_activity(args, name)
            probe.start()
            wall, rss, code, cpu = run_client(config_dir, "initial")
            results["pacs_probe"] = probe.stop()
            after = server_activity(args, name)
            results["server_during_initial"] = {k: after[k] - activity[k] for k in after}
            probe_stopped = time.monotonic()
            stats = receiver.stats()
            results["initial"] = {
                "exit_code": code,
                "seconds": round(wall, 2),
                "studies_per_second": round(args.studies / wall, 1),
                "peak_rss_mb": round(rss, 1),
                "cpu_seconds_per_1000": round(cpu * 1000 / args.studies, 3),
                "posts": stats["posts"],
                "unique_studies": stats["unique_studies"],
            }
            if args.latency_ms:
                in_flight = 64 if args.concurrency == "auto" else args.concurrency
                ideal = in_flight * 1000.0 / args.latency_ms
                results["initial"]["ideal_studies_per_second"] = ideal
                results["initial"]["ratio_to_ideal"] = round(args.studies / wall / ideal, 3)

            # The probe rewrote studies during the load: one tick sends them,
            # then the ticks measured below have nothing to do.
            before = reads.snapshot()
            catch_up_wall = run_client(config_dir)[0]
            posts_before = receiver.stats()["posts"]
            results["catch_up_tick"] = {
                "seconds": round(catch_up_wall, 3),
                "studies_sent": posts_before - stats["posts"],
                "rows_read": reads.difference(before, reads.snapshot()),
            }

            reference_count = args.reference_studies or (
                min(args.studies, 500) if args.latency_ms else args.studies
            )
            print(f"reference: bare requests loop, {reference_count:,} posts ...", file=sys.stderr)
            probe = PacsLoadProbe(args, name)
            probe.start()
            rate = reference_loop(receiver.url, reference_count)
            results["pacs_probe_reference"] = probe.stop()
            probe_stopped = time.monotonic()  # its rewrites too must leave the window
            results["reference"] = {"posts": reference_count, "studies_per_second": round(rate, 1)}
            results["initial"]["ratio_to_reference"] = round(
                results["initial"]["studies_per_second"] / rate, 2
            )

            wait = SAFETY_WINDOW_SECONDS + 5 - (time.monotonic() - probe_stopped)
            if wait > 0 and not args.no_wait:
                print(f"waiting {wait:.0f} s for the safety window to pass ...", file=sys.stderr)
                time.sleep(wait)
            # One tick still re-reads the window behind the catch-up tick;
            # the ones after it are what a quiet PACS costs every 5 minutes.
            run_client(config_dir)
            posts_before = receiver.stats()["posts"]
            noop = []
            noop_reads: dict[str, int] = {}
            for _ in range(NOOP_REPEATS):
                before = reads.snapshot()
                noop.append(run_client(config_dir)[0])
                for table, rows in reads.difference(before, reads.snapshot()).items():
                    noop_reads[table] = max(noop_reads.get(table, 0), rows)
            results["noop_tick"] = {
                "median_seconds": round(statistics.median(noop), 3),
                "max_seconds": round(max(noop), 3),
                # the most any of them read, by table, as the server counts
                "rows_read": dict(sorted(noop_reads.items())),
                "posts": receiver.stats()["posts"] - posts_before,
                "probe_rewrites_in_window": wait > 0 and args.no_wait,
            }
    finally:
        receiver.stop()
        if not args.keep and not args.database:
            _drop_database(args, name)
    return results


# --------------------------------------------------------------------------
# Scenes of adaptive delivery: a WAN, a service of limited capacity, ten centers
# --------------------------------------------------------------------------

WAN_LATENCY_MS = 50.0
WAN_RUNS = ((4, 2_000), (16, 6_000), (64, 20_000), ("auto", 20_000))  # concurrency, studies
SCENE_STUDIES = 20_000
SERVICE_CAPACITY = 8  # requests served at once...
SERVICE_MS = 20.0  # ...each taking this long: 400 studies/s
CAPACITY_RUNS = (("auto", 5_000), (64, 5_000), (4, 5_000))
CENTERS = 10
CENTER_STUDIES = 2_000
FLAKY_STUDIES = 5_000
FLAKY_SERVICE_MS = 1.0
FLAKY_EVERY = 4  # every 4th POST answered 503
AUTO_MAX_CONCURRENCY = 64  # the client's default max_concurrency


def _scaled(args: argparse.Namespace, studies: int) -> int:
    """A scene's study count times --scale (CI runs the scenes at 1%)."""
    return max(10, int(studies * args.scale))


def _with_studies(args: argparse.Namespace, studies: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "studies": studies})


def _finish_client(process: subprocess.Popen, config_dir: Path) -> dict[str, Any]:
    """Waits for a client of a config written with `metrics`: its exit code,
    CPU and what its metrics file says (the limit it settled on, its latency)."""
    code, rss, cpu = _wait_client(process)
    metrics = read_metrics(config_dir / METRICS_FILE)
    return {
        "exit_code": code,
        "cpu_seconds": cpu,
        "peak_rss_mb": round(rss, 1),
        "sent": int(metrics.get("run_studies_sent", 0)),
        "settled_limit": int(metrics.get("concurrency_limit", 0)),
        "latency_ms": round(metrics.get("latency_seconds", 0) * 1000, 1),
        "unloaded_latency_ms": round(metrics.get("unloaded_latency_seconds", 0) * 1000, 1),
    }


def _initial_run(
    args: argparse.Namespace, name: str, receiver: Receiver, concurrency: int | str, studies: int
) -> dict[str, Any]:
    """One `client.py initial --limit studies` on a freshly reset database."""
    reset_database(args, name)
    receiver.reset()
    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp)
        write_client_config(config_dir, args, name, receiver.url, concurrency, metrics=True)
        started = time.monotonic()
        process = _start_client(config_dir, "initial", "--limit", str(studies))
        result = _finish_client(process, config_dir)
        wall = time.monotonic() - started
    stats = receiver.stats()
    result.update(
        # The pace the service saw, first to last post: the process's start
        # and the database work before the first post are not the service's.
        service_studies_per_second=round(_service_rate(stats), 1),
        concurrency=concurrency,
        studies=studies,
        seconds=round(wall, 2),
        studies_per_second=round(stats["unique_studies"] / wall, 1),
        cpu_seconds_per_1000=round(result.pop("cpu_seconds") * 1000 / studies, 3),
        posts=stats["posts"],
        unique_studies=stats["unique_studies"],
        max_in_flight=stats["max_in_flight"],
        queue_p99_ms=stats["queue_p99_ms"],
        queue_max_ms=stats["queue_max_ms"],
    )
    print(
        f"  concurrency {concurrency}: {result['studies_per_second']:,.0f} studies/s,"
        f" settled at {result['settled_limit']}",
        file=sys.stderr,
    )
    return result


def _service_rate(stats: dict[str, Any]) -> float:
    centers = stats["centers"].values()
    span = max(c["last"] for c in centers) - min(c["first"] for c in centers)
    return stats["unique_studies"] / max(span, 1e-6)


def _drop_database(args: argparse.Namespace, name: str) -> None:
    with _connect(args) as conn, conn.cursor() as cur:
        if args.engine == "postgresql":
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        else:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def scene_wan_and_capacity(args: argparse.Namespace) -> dict[str, Any]:
    """Scenes 1 and 2 on one archive of SCENE_STUDIES studies."""
    name = f"dicom_indexer_bench_{uuid.uuid4().hex[:8]}"
    results: dict[str, Any] = {"wan": [], "capacity": []}
    print(f"building {name} with {_scaled(args, SCENE_STUDIES):,} studies ...", file=sys.stderr)
    build_database(_with_studies(args, _scaled(args, SCENE_STUDIES)), name)
    try:
        print(f"scene 1: a WAN, every answer after {WAN_LATENCY_MS:g} ms", file=sys.stderr)
        receiver = Receiver(WAN_LATENCY_MS)
        try:
            for concurrency, studies in WAN_RUNS:
                run = _initial_run(args, name, receiver, concurrency, _scaled(args, studies))
                in_flight = AUTO_MAX_CONCURRENCY if concurrency == "auto" else concurrency
                run["ideal_studies_per_second"] = in_flight * 1000 / WAN_LATENCY_MS
                run["ratio_to_ideal"] = round(
                    run["studies_per_second"] / run["ideal_studies_per_second"], 2
                )
                results["wan"].append(run)
        finally:
            receiver.stop()
        print(
            f"scene 2: a service serving {SERVICE_CAPACITY} at once, {SERVICE_MS:g} ms each",
            file=sys.stderr,
        )
        receiver = Receiver(SERVICE_MS, capacity=SERVICE_CAPACITY)
        capacity = SERVICE_CAPACITY * 1000 / SERVICE_MS
        try:
            for concurrency, studies in CAPACITY_RUNS:
                run = _initial_run(args, name, receiver, concurrency, _scaled(args, studies))
                run["ratio_to_capacity"] = round(run["service_studies_per_second"] / capacity, 2)
                results["capacity"].append(run)
        finally:
            receiver.stop()
    finally:
        if not args.keep:
            _drop_database(args, name)
    return results


def scene_ten_centers(args: argparse.Namespace) -> dict[str, Any]:
    """Scene 3: CENTERS clients, each with its own archive, start together
    against one service of limited capacity."""
    names = [f"dicom_indexer_bench_{uuid.uuid4().hex[:8]}" for _ in range(CENTERS)]
    each = _scaled(args, CENTER_STUDIES)
    print(f"scene 3: {CENTERS} centers of {each:,} studies each", file=sys.stderr)
    receiver = Receiver(SERVICE_MS, capacity=SERVICE_CAPACITY)
    try:
        for name in names:
            build_database(_with_studies(args, each), name)
        with tempfile.TemporaryDirectory() as tmp:
            dirs = [Path(tmp) / f"C{n + 1:02d}" for n in range(CENTERS)]
            for name, config_dir in zip(names, dirs):
                write_client_config(
                    config_dir, args, name, receiver.url, "auto", config_dir.name, metrics=True
                )
            receiver.reset()
            started = time.monotonic()
            processes = [_start_client(config_dir, "initial") for config_dir in dirs]
            runs = [_finish_client(p, d) for p, d in zip(processes, dirs)]
            wall = time.monotonic() - started
        stats = receiver.stats()
    finally:
        receiver.stop()
        if not args.keep:
            for name in names:
                _drop_database(args, name)
    centers = stats["centers"]
    durations = {c: v["last"] - v["first"] for c, v in centers.items()}
    total = CENTERS * each
    capacity = SERVICE_CAPACITY * 1000 / SERVICE_MS
    rate = stats["unique_studies"] / wall
    service_rate = _service_rate(stats)
    return {
        "centers": CENTERS,
        "studies_each": each,
        "seconds": round(wall, 2),
        "studies_per_second": round(rate, 1),
        "service_studies_per_second": round(service_rate, 1),
        "ratio_to_capacity": round(service_rate / capacity, 2),
        "slowest_to_fastest": round(max(durations.values()) / min(durations.values()), 2),
        "center_seconds": {c: round(d, 1) for c, d in sorted(durations.items())},
        "queue_p99_ms": stats["queue_p99_ms"],
        "queue_max_ms": stats["queue_max_ms"],
        "max_in_flight": stats["max_in_flight"],
        "posts": stats["posts"],
        "unique_studies": stats["unique_studies"],
        "lost": total - stats["unique_studies"],
        "posted_twice": stats["posts"] - stats["unique_studies"],
        "exit_codes": sorted({run["exit_code"] for run in runs}),
        "settled_limits": [run["settled_limit"] for run in runs],
        "cpu_seconds_per_1000": round(sum(r["cpu_seconds"] for r in runs) * 1000 / total, 3),
    }


def scene_flaky(args: argparse.Namespace) -> dict[str, Any]:
    """Scene 4: a service of 1 ms whose every 4th POST is a 503 without
    Retry-After (one backend in four failing), against the same service
    clean, in the same run, with the default settings."""
    name = f"dicom_indexer_bench_{uuid.uuid4().hex[:8]}"
    studies = _scaled(args, FLAKY_STUDIES)
    print(f"scene 4: {studies:,} studies, every {FLAKY_EVERY}th POST answered 503", file=sys.stderr)
    build_database(_with_studies(args, studies), name)
    runs = {}
    try:
        for label, fail_every in (("clean", 0), ("flaky", FLAKY_EVERY)):
            receiver = Receiver(FLAKY_SERVICE_MS, fail_every=fail_every)
            try:
                runs[label] = _initial_run(args, name, receiver, "auto", studies)
                runs[label]["failed_posts"] = receiver.stats()["failed_posts"]
            finally:
                receiver.stop()
    finally:
        if not args.keep:
            _drop_database(args, name)
    runs["ratio"] = round(
        runs["flaky"]["studies_per_second"] / max(runs["clean"]["studies_per_second"], 1e-6), 2
    )
    return runs


# --------------------------------------------------------------------------
# Orthanc (--source orthanc): a real Orthanc, fed DICOM files
# --------------------------------------------------------------------------

ORTHANC_IMAGES_PER_STUDY = 3
ORTHANC_UPLOAD_THREADS = 8
# Real series are big: an expanded series lists every instance's ID (about
# 63 bytes each). At 1,000 studies and more, two of the archive's studies
# hold one series of this many images, and the busy tick's study one of
# ORTHANC_BUSY_SERIES_IMAGES; smaller runs (CI's) keep them small.
ORTHANC_BIG_SERIES_IMAGES = 1500
ORTHANC_BIG_STUDIES = 2
ORTHANC_BUSY_SERIES_IMAGES = 1000
ORTHANC_SMALL_RUN_SERIES_IMAGES = 10
ORTHANC_PAGE = 1000  # the bare paged loop's page, studies or series per request


def _orthanc_big_series_images(studies: int) -> tuple[int, int]:
    """(images in each big study's series, images in the busy tick's series)."""
    if studies >= 1000:
        return ORTHANC_BIG_SERIES_IMAGES, ORTHANC_BUSY_SERIES_IMAGES
    return ORTHANC_SMALL_RUN_SERIES_IMAGES, ORTHANC_SMALL_RUN_SERIES_IMAGES


def _orthanc_archive(orthanc: Any, studies: int) -> list[str]:
    """`studies` studies of ORTHANC_IMAGES_PER_STUDY images (two series),
    uploaded through POST /instances as a modality would, and among them
    ORTHANC_BIG_STUDIES of one big series; their IDs, once Orthanc calls
    every one stable."""
    import concurrent.futures

    from testkit import dicom_instance, new_uid

    big_images, _ = _orthanc_big_series_images(studies)

    def upload(number: int) -> str:
        study_uid, patient = (
            new_uid(),
            (f"{10_000_000 + number // 2}-{number % 10}", "APELLIDO^NOMBRE"),
        )
        series = [new_uid(), new_uid()]
        answer: dict[str, Any] = {}
        for image in range(ORTHANC_IMAGES_PER_STUDY):
            modality = "CT" if image % 2 == 0 else "SR"
            answer = orthanc.upload(
                dicom_instance(*patient, study_uid, series[image % 2], modality)
            )
        return answer["ParentStudy"]

    with concurrent.futures.ThreadPoolExecutor(ORTHANC_UPLOAD_THREADS) as pool:
        big = min(ORTHANC_BIG_STUDIES, studies)
        ids = [_orthanc_big_study(orthanc, pool, big_images, n) for n in range(big)]
        ids += list(pool.map(upload, range(big, studies)))
    _orthanc_wait_stable(orthanc)
    return ids


def _orthanc_big_study(orthanc: Any, pool: Any, images: int, number: int) -> str:
    """A study of one series of `images` images (a CT of that many slices)."""
    from testkit import dicom_instance, new_uid

    patient = (f"{20_000_000 + number}-0", "APELLIDO^GRANDE")
    study_uid, series_uid = new_uid(), new_uid()
    answers = list(
        pool.map(
            lambda _: orthanc.upload(dicom_instance(*patient, study_uid, series_uid, "CT")),
            range(images),
        )
    )
    return str(answers[-1]["ParentStudy"])


def _orthanc_wait_stable(orthanc: Any) -> None:
    while not all(s["IsStable"] for s in orthanc.get("/studies?expand&since=0&limit=1000000")):
        time.sleep(0.5)


class CountingProxy:
    """A loopback proxy in front of Orthanc, between it and every reader the
    benchmark measures (the client, the bare loops): forwards each request
    over keep-alive connections, unchanged, and counts it by kind."""

    def __init__(self, upstream: str) -> None:
        from hostile_http import HostileFront

        proxy = self

        class Front(HostileFront):
            def _forward(self, handler: Any, body: bytes) -> tuple[int, bytes]:
                return proxy._forward(handler, body)

        self.local = threading.local()
        self.front = Front(upstream)
        self.url = self.front.url

    def _forward(self, handler: Any, body: bytes) -> tuple[int, bytes]:
        import http.client
        import socket

        headers = {
            name: value
            for name, value in handler.headers.items()
            if name.lower() in ("authorization", "content-type", "accept")
        }
        for attempt in range(2):  # Orthanc closes idle connections after about 1 s
            connection = getattr(self.local, "connection", None)
            if connection is None:
                connection = http.client.HTTPConnection(*self.front.upstream, timeout=300)
                connection.connect()
                connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.local.connection = connection
            try:
                connection.request(
                    handler.command, handler.path, body=body or None, headers=headers
                )
                response = connection.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self.local.connection = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def mark(self) -> int:
        with self.front.lock:
            return len(self.front.seen)

    def requests_since(self, mark: int) -> dict[str, Any]:
        """The requests forwarded since `mark`: how many, and how many of each kind."""
        with self.front.lock:
            seen = self.front.seen[mark:]
        kinds = collections.Counter(_request_kind(s.method, s.path) for s in seen)
        return {"total": len(seen), "kinds": dict(kinds.most_common())}

    def stop(self) -> None:
        self.front.stop()


def _request_kind(method: str, path: str) -> str:
    """ "GET /studies?..." for a page, "GET /studies/{id}/series" for one study's read."""
    path, _, query = path.partition("?")
    parts = path.strip("/").split("/")
    kind = (
        "/"
        + parts[0]
        + ("/{id}" if len(parts) > 1 else "")
        + "".join("/" + part for part in parts[2:])
    )
    return f"{method} {kind}{'?...' if query else ''}"


def orthanc_reference_loop(orthanc: Any, base: str, url: str, ids: list[str]) -> float:
    """A bare requests.Session reading study by study, as the client did
    before it read in pages: the two REST reads, the document, the POST,
    one study at a time. Studies/s."""
    headers = {"X-Api-Key": "bench-key"}
    with requests.Session() as session:
        session.auth = orthanc.http.auth
        started = time.monotonic()
        for ident in ids:
            study = session.get(f"{base}/studies/{ident}", timeout=30).json()
            series = session.get(f"{base}/studies/{ident}/series", timeout=30).json()
            modalities = {s["MainDicomTags"]["Modality"] for s in series}
            counts = (modalities, len(series), sum(len(s["Instances"]) for s in series))
            document = _reference_document(study, *counts)
            session.post(url, json=document, headers=headers, timeout=30).raise_for_status()
        return len(ids) / (time.monotonic() - started)


def orthanc_paged_reference_loop(orthanc: Any, base: str, url: str) -> tuple[float, int]:
    """A bare requests.Session reading in pages, as the client does: every
    series (`/series?expand`, for modality and images) and every study
    (`/studies?expand`), ORTHANC_PAGE to a request, then one POST per
    study, one at a time; the join held in a dict. (Studies/s, studies.)"""
    headers = {"X-Api-Key": "bench-key"}
    counts: dict[str, tuple[set, int, int]] = {}
    with requests.Session() as session:
        session.auth = orthanc.http.auth
        started = time.monotonic()
        since = 0
        while True:
            page = session.get(
                f"{base}/series?expand&since={since}&limit={ORTHANC_PAGE}", timeout=300
            ).json()
            if not page:
                break
            since += len(page)
            for series in page:
                modalities, count, images = counts.get(series["ParentStudy"], (set(), 0, 0))
                modalities.add(series["MainDicomTags"]["Modality"])
                counts[series["ParentStudy"]] = (
                    modalities,
                    count + 1,
                    images + len(series["Instances"]),
                )
        since = posted = 0
        while True:
            page = session.get(
                f"{base}/studies?expand&since={since}&limit={ORTHANC_PAGE}", timeout=300
            ).json()
            if not page:
                break
            since += len(page)
            for study in page:
                document = _reference_document(study, *counts[study["ID"]])
                session.post(url, json=document, headers=headers, timeout=30).raise_for_status()
                posted += 1
        return posted / (time.monotonic() - started), posted


def _reference_document(study: dict, modalities: set, series: int, images: int) -> dict:
    tags, patient = study["MainDicomTags"], study["PatientMainDicomTags"]
    return {
        "patient_pk": int(study["ParentPatient"].replace("-", "")[:13], 16),
        "patient_id": patient.get("PatientID"),
        "patient_name": patient.get("PatientName"),
        "study_pk": int(study["ID"].replace("-", "")[:13], 16),
        "study_iuid": tags.get("StudyInstanceUID"),
        "study_datetime": tags.get("StudyDate"),
        "study_description": tags.get("StudyDescription"),
        "study_modality": "\\".join(sorted(modalities)),
        "study_series": series,
        "study_instances": images,
        "center": "BENCH",
    }


def _write_orthanc_config(config_dir: Path, orthanc: Any, url: str, orthanc_url: str) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    user, password = orthanc.http.auth
    config = {
        "orthanc": {"url": orthanc_url, "user": user, "password": password},
        "key": "bench-key",
        "webservice_url": url,
    }
    for file_name, data in (("config.json", config), ("server.json", {"server": "BENCH"})):
        (config_dir / file_name).write_text(json.dumps(data))
        (config_dir / file_name).chmod(0o600)


def _orthanc_run(
    proxy: CountingProxy, receiver: Receiver, config_dir: Path, *command: str
) -> dict[str, Any]:
    """One client.py run: its wall time, peak RSS, exit code, the requests
    Orthanc received (counted by the proxy) and the POSTs the service got."""
    mark, posts = proxy.mark(), receiver.stats()["posts"]
    wall, rss, code, cpu = run_client(config_dir, *command)
    return {
        "exit_code": code,
        "seconds": round(wall, 2),
        "peak_rss_mb": round(rss, 1),
        "cpu_seconds": round(cpu, 2),
        "requests": proxy.requests_since(mark),
        "posts": receiver.stats()["posts"] - posts,
    }


def benchmark_orthanc(args: argparse.Namespace) -> dict[str, Any]:
    """Against a real Orthanc behind a counting proxy: `client.py initial`,
    beside two bare loops (study by study, and in pages); an idle tick; a
    busy tick (a study of one big series arrived); `client.py reconcile`.
    Each with the requests Orthanc received."""
    from testkit import OrthancServer, dicom_instance, new_uid

    results: dict[str, Any] = {"source": "orthanc", "studies": args.studies, "machine": _machine()}
    big_images, busy_images = _orthanc_big_series_images(args.studies)
    results["big_series_images"] = big_images
    with tempfile.TemporaryDirectory() as tmp:
        orthanc = OrthancServer(Path(tmp) / "orthanc", stable_age_seconds=1)
        receiver = Receiver(args.latency_ms)
        proxy = CountingProxy(orthanc.url)
        try:
            print(f"uploading {args.studies:,} studies to Orthanc ...", file=sys.stderr)
            started = time.monotonic()
            ids = _orthanc_archive(orthanc, args.studies)
            results["orthanc_version"] = orthanc.get("/system")["Version"]
            results["upload_seconds"] = round(time.monotonic() - started, 1)
            config_dir = Path(tmp) / "client"
            _write_orthanc_config(config_dir, orthanc, receiver.url, proxy.url)
            print("client.py initial ...", file=sys.stderr)
            run = _orthanc_run(proxy, receiver, config_dir, "initial")
            stats = receiver.stats()
            run["studies_per_second"] = round(stats["unique_studies"] / run["seconds"], 1)
            run["cpu_seconds_per_1000"] = round(run["cpu_seconds"] * 1000 / args.studies, 3)
            run["unique_studies"] = stats["unique_studies"]
            results["initial"] = run
            print("reference: study by study, then in pages ...", file=sys.stderr)
            mark = proxy.mark()
            reference = orthanc_reference_loop(orthanc, proxy.url, receiver.url, ids)
            results["reference_requests"] = proxy.requests_since(mark)["total"]
            results["reference_studies_per_second"] = round(reference, 1)
            results["ratio"] = round(run["studies_per_second"] / reference, 2)
            mark = proxy.mark()
            paged, posted = orthanc_paged_reference_loop(orthanc, proxy.url, receiver.url)
            assert posted == args.studies, posted
            results["paged_reference_requests"] = proxy.requests_since(mark)["total"]
            results["paged_reference_studies_per_second"] = round(paged, 1)
            results["paged_ratio"] = round(run["studies_per_second"] / paged, 2)
            ticks = [_orthanc_run(proxy, receiver, config_dir) for _ in range(NOOP_REPEATS)]
            results["idle_tick_seconds"] = round(statistics.median(t["seconds"] for t in ticks), 3)
            results["idle_tick_max_seconds"] = round(max(t["seconds"] for t in ticks), 3)
            results["idle_tick_posts"] = sum(t["posts"] for t in ticks)
            results["idle_tick_requests"] = max(t["requests"]["total"] for t in ticks)
            print(f"busy tick: a study of one {busy_images}-image series ...", file=sys.stderr)
            patient, study_uid, series_uid = (
                ("30000000-0", "APELLIDO^OCUPADO"),
                new_uid(),
                new_uid(),
            )
            for _ in range(busy_images):
                orthanc.upload(dicom_instance(*patient, study_uid, series_uid, "MR"))
            _orthanc_wait_stable(orthanc)
            results["busy_tick"] = _orthanc_run(proxy, receiver, config_dir)
            print("client.py reconcile ...", file=sys.stderr)
            results["reconcile"] = _orthanc_run(proxy, receiver, config_dir, "reconcile")
        finally:
            proxy.stop()
            receiver.stop()
            orthanc.stop()
    return results


def print_orthanc(results: dict[str, Any]) -> None:
    run, busy, reconcile = results["initial"], results["busy_tick"], results["reconcile"]
    rows = [
        (
            "studies (images each; big series)",
            f"{results['studies']:,} ({ORTHANC_IMAGES_PER_STUDY}; {ORTHANC_BIG_STUDIES} of"
            f" {results['big_series_images']:,})",
        ),
        ("Orthanc", results["orthanc_version"]),
        ("initial: studies/s", f"{run['studies_per_second']:,.0f} ({run['seconds']} s)"),
        ("initial: requests to Orthanc", _requests_cell(run["requests"])),
        (
            "bare loop, in pages: studies/s (requests)",
            f"{results['paged_reference_studies_per_second']:,.0f}"
            f" ({results['paged_reference_requests']:,})",
        ),
        ("ratio client / bare loop in pages", f"{results['paged_ratio']:.2f}"),
        (
            "bare loop, study by study: studies/s (requests)",
            f"{results['reference_studies_per_second']:,.0f} ({results['reference_requests']:,})",
        ),
        ("ratio client / bare loop study by study", f"{results['ratio']:.2f}"),
        ("initial: peak RSS", f"{run['peak_rss_mb']} MB"),
        ("initial: CPU per 1,000 studies", f"{run['cpu_seconds_per_1000']} s"),
        ("initial: delivered (posts / unique)", f"{run['posts']:,} / {run['unique_studies']:,}"),
        (
            "idle tick: wall (median of 5)",
            f"{results['idle_tick_seconds']} s (max {results['idle_tick_max_seconds']} s)",
        ),
        ("idle tick: requests to Orthanc", str(results["idle_tick_requests"])),
        ("idle tick: posts", str(results["idle_tick_posts"])),
        ("busy tick (one big series arrived): wall", f"{busy['seconds']} s"),
        ("busy tick: requests to Orthanc", _requests_cell(busy["requests"])),
        ("reconcile: wall", f"{reconcile['seconds']} s"),
        ("reconcile: requests to Orthanc", _requests_cell(reconcile["requests"])),
        ("reconcile: peak RSS", f"{reconcile['peak_rss_mb']} MB"),
    ]
    print("| measure | value |\n| ------- | ----- |")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(f"\nmachine: {results['machine']}")


def _requests_cell(requests_seen: dict[str, Any]) -> str:
    kinds = ", ".join(f"{count:,} `{kind}`" for kind, count in requests_seen["kinds"].items())
    return f"{requests_seen['total']:,} ({kinds})" if kinds else "0"


# --------------------------------------------------------------------------
# DICOMweb and DIMSE (--source dicomweb, --source dimse): a real Orthanc with
# its DICOMweb plugin and its DICOM port, read by queries (sources/harvest.py)
# --------------------------------------------------------------------------

HARVEST_UPLOAD_THREADS = 8
HARVEST_UNDATED_SHARE = 0.002  # 20 undated studies in 10,000
HARVEST_TWO_SERIES_SHARE = 0.1  # studies of two series (two images); the rest one
HARVEST_BUSY_STUDIES = 20  # arrive today before the busy tick
HARVEST_MODALITIES = ("CT", "CT", "CR", "CR", "CR", "DX", "MR", "US", "US", "MG", "PT", "NM")
HARVEST_INDEXER_AE, HARVEST_PACS_AE = "DICOM_INDEXER", "ORTHANC"
# Every pending C-FIND status (pynetdicom's own constants are not imported
# here: the recorder runs inside the client's process).
CFIND_PENDING = (0xFF00, 0xFF01)
# Runs client.py in its own process with pynetdicom's send_c_find wrapped:
# each C-FIND's keys, answers, final status and seconds are appended to the
# file $BENCH_CFIND_LOG (one JSON line each), nothing else changed. That is
# what a counting front is to QIDO: the queries the client asked, for the
# bare loop to ask the same.
CFIND_RECORDER = r"""
import json, os, runpy, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
from dicom_indexer.sources.dimse import _pynetdicom
_pynetdicom()  # imported as the client imports it, before it is patched here
from pynetdicom.association import Association

_send = Association.send_c_find
_log = open(os.environ["BENCH_CFIND_LOG"], "a")


def send_c_find(self, dataset, *args, **kwargs):
    uids = dataset.get("StudyInstanceUID") or ""
    uids = [str(u) for u in uids] if not isinstance(uids, str) else ([uids] if uids else [])
    record = {
        "level": str(dataset.QueryRetrieveLevel),
        "StudyDate": str(dataset.get("StudyDate") or ""),
        "PatientID": str(dataset.get("PatientID") or ""),
        "uids": len(uids),
        "answers": 0,
        "final": None,
    }
    started = time.monotonic()
    try:
        for status, identifier in _send(self, dataset, *args, **kwargs):
            if status is not None and "Status" in status:
                if int(status.Status) in (0xFF00, 0xFF01):
                    record["answers"] += 1
                else:
                    record["final"] = int(status.Status)
            yield status, identifier
    finally:
        record["seconds"] = round(time.monotonic() - started, 4)
        _log.write(json.dumps(record) + "\n")
        _log.flush()


Association.send_c_find = send_c_find
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class QidoCountingProxy(CountingProxy):
    """The Orthanc scene's counting proxy, also recording each QIDO study
    query: its path, how many studies it answered, its bytes and seconds."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.queries: list[dict[str, Any]] = []

    def _forward(self, handler: Any, body: bytes) -> tuple[int, bytes]:
        started = time.monotonic()
        status, data = super()._forward(handler, body)
        record = {
            "path": handler.path,
            "status": status,
            "answers": data.count(b'"0020000D"'),
            "bytes": len(data),
            "seconds": round(time.monotonic() - started, 4),
        }
        with self.front.lock:
            self.queries.append(record)
        return status, data

    def mark(self) -> int:
        with self.front.lock:
            return len(self.queries)

    def queries_since(self, mark: int) -> list[dict[str, Any]]:
        with self.front.lock:
            return list(self.queries[mark:])


def _harvest_orthanc(directory: Path) -> tuple[Any, int]:
    """A real Orthanc as tests/contract.py's HarvestUnderTest sets it up: the
    DICOMweb plugin, its DICOM port (our AE registered, C-FIND allowed to it
    only), no result cap; started with TCP_NODELAY=1 (OrthancServer). Its
    DICOM port."""
    from testkit import OrthancServer, dicomweb_orthanc_settings, free_port

    dicom_port = free_port()
    orthanc = OrthancServer(
        directory,
        stable_age_seconds=1,
        **dicomweb_orthanc_settings(
            DicomServerEnabled=True,
            DicomPort=dicom_port,
            DicomAet=HARVEST_PACS_AE,
            DicomCheckCalledAet=True,
            DicomAlwaysAllowFind=False,
            DicomModalities={"indexer": [HARVEST_INDEXER_AE, "127.0.0.1", free_port()]},
        ),
    )
    return orthanc, dicom_port


def _rut(rng: random.Random) -> str:
    """A Chilean RUT as a PatientID: its number spread as a real archive's
    (mostly 10 to 25 million: first characters 1 and 2 hold most of it),
    and its check digit, K included."""
    number = rng.randint(3_000_000, 26_000_000)
    return f"{number}-{rng.choice('0123456789K')}"


def _harvest_study_files(rng: random.Random, study_date: str | None, today: bool) -> list[bytes]:
    """One study's DICOM files: one series of one image, or (one in ten)
    two series; dated over ten years, or today, or undated."""
    from testkit import dicom_instance, dicom_instance_with, new_uid

    patient = (_rut(rng), f"APELLIDO{rng.randint(0, 999)}^NOMBRE")
    study_uid = new_uid()
    time_of_day = f"{rng.randint(7, 21):02d}{rng.randint(0, 59):02d}00"
    description = rng.choice(("TC DE CEREBRO", "RX DE TORAX", "ECOGRAFIA ABDOMINAL", None))
    files = []
    series = 2 if rng.random() < HARVEST_TWO_SERIES_SHARE else 1
    for _ in range(series):
        modality = rng.choice(HARVEST_MODALITIES)
        common = {
            "patient_id": patient[0],
            "study_uid": study_uid,
            "series_uid": new_uid(),
            "modality": modality,
            "study_time": time_of_day,
            "study_description": description,
        }
        if study_date is None:
            files.append(
                dicom_instance_with(
                    patient_name=patient[1],
                    charset=None,
                    absent=("StudyDate", "StudyTime"),
                    **common,
                )
            )
        else:
            files.append(dicom_instance(patient_name=patient[1], study_date=study_date, **common))
    return files


def _harvest_archive(orthanc: Any, studies: int, seed: int = 32) -> int:
    """`studies` studies uploaded through POST /instances: dated over
    ARCHIVE_YEARS (a few today), HARVEST_UNDATED_SHARE undated (at least
    one), modalities mixed, PatientIDs RUTs. How many are undated."""
    import concurrent.futures
    import datetime

    rng = random.Random(seed)
    today = datetime.date.today()
    undated = max(1, round(studies * HARVEST_UNDATED_SHARE))
    dates: list[str | None] = [None] * undated
    for _ in range(studies - undated):
        day = today - datetime.timedelta(days=rng.randint(0, ARCHIVE_YEARS * 365))
        dates.append(day.strftime("%Y%m%d"))
    plans = [(random.Random(rng.random()), d) for d in dates]

    def upload(plan: tuple[random.Random, str | None]) -> None:
        for dicom in _harvest_study_files(plan[0], plan[1], False):
            orthanc.upload(dicom)

    with concurrent.futures.ThreadPoolExecutor(HARVEST_UPLOAD_THREADS) as pool:
        list(pool.map(upload, plans))
    return undated


def _write_harvest_config(
    config_dir: Path, source: str, orthanc: Any, dicom_port: int, front_url: str, url: str
) -> None:
    """config.json for the source, as a site writes it, and stable_age_seconds
    0 (the busy tick's studies of today go at once, as tests/contract.py)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    section: dict[str, Any]
    if source == "dicomweb":
        section = {
            "url": front_url + "/dicom-web",
            "user": orthanc.USER,
            "password": orthanc.PASSWORD,
        }
    else:
        section = {
            "host": "127.0.0.1",
            "port": dicom_port,
            "pacs_ae": HARVEST_PACS_AE,
            "indexer_ae": HARVEST_INDEXER_AE,
        }
    config = {
        source: section,
        "key": "bench-key",
        "webservice_url": url,
        "stable_age_seconds": 0,
    }
    for file_name, data in (("config.json", config), ("server.json", {"server": "BENCH"})):
        (config_dir / file_name).write_text(json.dumps(data))
        (config_dir / file_name).chmod(0o600)


class HarvestScene:
    """One source's client runs, each with the queries the PACS received:
    QIDO requests at the counting proxy, C-FINDs recorded in the client."""

    def __init__(
        self, source: str, config_dir: Path, receiver: Receiver, proxy: QidoCountingProxy
    ) -> None:
        self.source, self.config_dir, self.receiver, self.proxy = (
            source,
            config_dir,
            receiver,
            proxy,
        )
        self.cfind_log = config_dir / "cfind.jsonl"

    def _cfind_records(self) -> list[dict[str, Any]]:
        if not self.cfind_log.exists():
            return []
        return [json.loads(line) for line in self.cfind_log.read_text().splitlines()]

    def run(self, *command: str) -> dict[str, Any]:
        """One client.py run: wall time, peak RSS, CPU, exit code, POSTs, and
        the queries (how many, of which kind, how many answers)."""
        mark, cfinds = self.proxy.mark(), len(self._cfind_records())
        posts = self.receiver.stats()["posts"]
        started = time.monotonic()
        if self.source == "dimse":
            process = subprocess.Popen(
                [client_python, "-c", CFIND_RECORDER, str(CLIENT), *command, "-q"]
                + ["--config", str(self.config_dir / "config.json")]
                + ["--server", str(self.config_dir / "server.json")],
                env=client_environment(BENCH_CFIND_LOG=str(self.cfind_log)),
            )
        else:
            process = _start_client(self.config_dir, *command)
        code, rss, cpu = _wait_client(process)
        wall = time.monotonic() - started
        if self.source == "dimse":
            queries = self._cfind_records()[cfinds:]
            kinds = collections.Counter(_cfind_kind(q) for q in queries)
        else:
            queries = [q for q in self.proxy.queries_since(mark) if "/dicom-web/" in q["path"]]
            kinds = collections.Counter(_qido_kind(q["path"]) for q in queries)
        return {
            "exit_code": code,
            "seconds": round(wall, 3),
            "peak_rss_mb": round(rss, 1),
            "cpu_seconds": round(cpu, 2),
            "posts": self.receiver.stats()["posts"] - posts,
            "queries": len(queries),
            "kinds": dict(kinds.most_common()),
            "answers": sum(q["answers"] for q in queries),
            "query_seconds": round(sum(q["seconds"] for q in queries), 2),
            "log": queries,
        }

    def state(self, name: str) -> Any:
        """One of the harvest's states, read from the queue file."""
        import sqlite3

        path = self.config_dir / "dicom_indexer_queue.sqlite3"
        with contextlib.closing(sqlite3.connect(str(path))) as conn:
            row = conn.execute("SELECT value FROM harvest_state WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None


def _qido_kind(path: str) -> str:
    query = urllib.parse.parse_qs(path.partition("?")[2])
    if "StudyInstanceUID" in query:
        return "by UID list"
    if "/series" in path.partition("?")[0]:
        return "series"
    keys = [k for k in ("StudyDate", "PatientID") if k in query]
    return " + ".join(keys) if keys else "no keys"


def _cfind_kind(record: dict[str, Any]) -> str:
    if record["level"] != "STUDY":
        return record["level"].lower()
    if record["uids"] > 1 or (record["uids"] == 1 and not record["StudyDate"]):
        return "by UID list"
    keys = [k for k in ("StudyDate", "PatientID") if record[k]]
    return " + ".join(keys) if keys else "no keys"


def _bare_document(
    uid: str,
    patient_id: str | None,
    name: str | None,
    date: str | None,
    description: str | None,
    modalities: list[str],
    series: int | None,
    images: int | None,
) -> dict[str, Any]:
    """The document of a found study, built as simply as it can be."""
    import hashlib

    def pk(text: str) -> int:
        return int(hashlib.sha1(text.encode()).hexdigest()[:13], 16)

    return {
        "patient_pk": pk(f"patient:{patient_id}"),
        "patient_id": patient_id,
        "patient_name": name,
        "study_pk": pk(uid),
        "study_iuid": uid,
        "study_datetime": date,
        "study_description": description,
        "study_modality": "\\".join(sorted(modalities)),
        "study_series": series,
        "study_instances": images,
        "center": "BENCH",
    }


def qido_bare_loop(
    proxy: QidoCountingProxy, orthanc: Any, queries: list[dict[str, Any]], url: str
) -> tuple[float, int]:
    """One thread, one requests.Session: the client's QIDO queries, the same
    paths in the same order, each study POSTed once as it is first found.
    (Studies/s, studies)."""

    def first(entry: dict, tag: str) -> Any:
        values = entry.get(tag, {}).get("Value") or [None]
        return values[0]

    posted: set[str] = set()
    headers = {"X-Api-Key": "bench-key"}
    with requests.Session() as session:
        session.auth = (orthanc.USER, orthanc.PASSWORD)
        started = time.monotonic()
        for query in queries:
            answer = session.get(proxy.url + query["path"], timeout=300)
            answer.raise_for_status()
            for entry in answer.json() if answer.status_code == 200 else []:
                uid = first(entry, "0020000D")
                if uid in posted:
                    continue
                name = first(entry, "00100010")
                document = _bare_document(
                    uid,
                    first(entry, "00100020"),
                    name.get("Alphabetic") if name else None,
                    first(entry, "00080020"),
                    first(entry, "00081030"),
                    entry.get("00080061", {}).get("Value") or [],
                    first(entry, "00201206"),
                    first(entry, "00201208"),
                )
                session.post(url, json=document, headers=headers, timeout=30).raise_for_status()
                posted.add(uid)
        return len(posted) / (time.monotonic() - started), len(posted)


def cfind_bare_loop(dicom_port: int, queries: list[dict[str, Any]], url: str) -> tuple[float, int]:
    """One thread: the client's C-FINDs (the same keys, in the same order),
    on one association with TCP_NODELAY (another where the client's was
    aborted: an answer cut past its limit), reading as many answers as the
    client read; each study POSTed once, after its query, with one
    requests.Session. (Studies/s, studies)."""
    import socket

    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt

    from dicom_indexer.sources.dimse import STUDY_KEYS, STUDY_ROOT_FIND

    def nodelay(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=HARVEST_INDEXER_AE)
    ae.add_requested_context(STUDY_ROOT_FIND)
    posted: set[str] = set()
    headers = {"X-Api-Key": "bench-key"}
    assoc = None
    with requests.Session() as session:
        started = time.monotonic()
        for query in queries:
            if assoc is None or not assoc.is_established:
                assoc = ae.associate(
                    "127.0.0.1",
                    dicom_port,
                    ae_title=HARVEST_PACS_AE,
                    evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)],
                )
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.QueryRetrieveLevel = "STUDY"
            for keyword in STUDY_KEYS:
                setattr(ds, keyword, "")
            ds.StudyDate, ds.PatientID = query["StudyDate"], query["PatientID"]
            found = []
            for status, answer in assoc.send_c_find(ds, STUDY_ROOT_FIND):
                if "Status" not in status or int(status.Status) not in CFIND_PENDING:
                    break
                found.append(answer)
                if query["final"] is None and len(found) == query["answers"]:
                    assoc.abort()  # where the client stopped reading
                    break
            for answer in found:
                uid = str(answer.StudyInstanceUID)
                if uid in posted:
                    continue
                document = _bare_document(
                    uid,
                    str(answer.PatientID),
                    str(answer.PatientName),
                    str(answer.StudyDate) or None,
                    str(answer.StudyDescription) or None,
                    list(answer.ModalitiesInStudy or []),
                    _int_or_none(answer.NumberOfStudyRelatedSeries),
                    _int_or_none(answer.NumberOfStudyRelatedInstances),
                )
                session.post(url, json=document, headers=headers, timeout=30).raise_for_status()
                posted.add(uid)
        if assoc is not None and assoc.is_established:
            assoc.release()
        return len(posted) / (time.monotonic() - started), len(posted)


def _int_or_none(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


def _idle_tick_formula(source: str) -> dict[str, Any]:
    """An idle tick's queries by the documented formula (docs/cosecha.md):
    today and yesterday in one query, one warm day, and the cold sweep's
    share: about the finder's cold_answers_per_tick answers, in one query
    sized to them (in its undated sweep, up to COLD_MAX_QUERIES_PER_TICK,
    most of them finding nothing). None depends on the archive's size while
    a day holds fewer studies than the result cap (else that day's split
    adds queries)."""
    from dicom_indexer.sources import dicomweb, dimse, harvest

    finder = dimse.DimseFinder if source == "dimse" else dicomweb.DicomwebFinder
    return {
        "hot": 1,
        "warm": 1,
        "cold": harvest.COLD_MAX_QUERIES_PER_TICK,
        "cold_answers": finder.cold_answers_per_tick,
        "total": 2 + harvest.COLD_MAX_QUERIES_PER_TICK,
    }


def benchmark_harvest(args: argparse.Namespace) -> dict[str, Any]:
    """--source dicomweb or dimse: `client.py initial` beside a bare loop of
    the same queries and POSTs, idle ticks, a busy tick (new studies today),
    `client.py reconcile`, and (--cold-ticks) ticks until the cold sweep has
    covered the archive once. Each with the queries the PACS received."""
    import datetime

    source = args.source
    results: dict[str, Any] = {"source": source, "studies": args.studies, "machine": _machine()}
    with tempfile.TemporaryDirectory() as tmp:
        orthanc, dicom_port = _harvest_orthanc(Path(tmp) / "orthanc")
        receiver = Receiver(args.latency_ms)
        proxy = QidoCountingProxy(orthanc.url)
        try:
            print(f"uploading {args.studies:,} studies to Orthanc ...", file=sys.stderr)
            started = time.monotonic()
            results["undated"] = _harvest_archive(orthanc, args.studies)
            results["upload_seconds"] = round(time.monotonic() - started, 1)
            results["orthanc_version"] = orthanc.get("/system")["Version"]
            config_dir = Path(tmp) / "client"
            _write_harvest_config(config_dir, source, orthanc, dicom_port, proxy.url, receiver.url)
            scene = HarvestScene(source, config_dir, receiver, proxy)
            print("client.py initial ...", file=sys.stderr)
            run = scene.run("initial")
            stats = receiver.stats()
            run["unique_studies"] = stats["unique_studies"]
            run["studies_per_second"] = round(stats["unique_studies"] / run["seconds"], 1)
            run["cpu_seconds_per_1000"] = round(run["cpu_seconds"] * 1000 / args.studies, 3)
            initial_log = run.pop("log")
            results["initial"] = run
            print("bare loop: the same queries and POSTs ...", file=sys.stderr)
            if source == "dimse":
                rate, posted = cfind_bare_loop(dicom_port, initial_log, receiver.url)
            else:
                rate, posted = qido_bare_loop(proxy, orthanc, initial_log, receiver.url)
            results["bare_loop"] = {"studies_per_second": round(rate, 1), "studies": posted}
            results["ratio"] = round(run["studies_per_second"] / rate, 2)
            ticks = [scene.run() for _ in range(NOOP_REPEATS)]
            for tick in ticks:
                tick.pop("log")
            results["idle_ticks"] = ticks
            results["idle_tick_seconds"] = round(statistics.median(t["seconds"] for t in ticks), 3)
            results["idle_tick_max_seconds"] = round(max(t["seconds"] for t in ticks), 3)
            results["idle_tick_queries"] = max(t["queries"] for t in ticks)
            results["idle_tick_posts"] = sum(t["posts"] for t in ticks)
            results["idle_tick_formula"] = _idle_tick_formula(source)
            print(f"busy tick: {HARVEST_BUSY_STUDIES} new studies today ...", file=sys.stderr)
            rng = random.Random(3232)
            day = datetime.date.today().strftime("%Y%m%d")
            for _ in range(HARVEST_BUSY_STUDIES):
                for dicom in _harvest_study_files(rng, day, True):
                    orthanc.upload(dicom)
            busy = scene.run()
            busy.pop("log")
            results["busy_tick"] = busy
            print("client.py reconcile ...", file=sys.stderr)
            reconcile = scene.run("reconcile")
            reconcile.pop("log")
            results["reconcile"] = reconcile
            results["cold_cycle"] = _cold_cycle(scene, args.cold_ticks)
        finally:
            proxy.stop()
            receiver.stop()
            orthanc.stop()
    return results


def _undated_tick(tick: dict[str, Any]) -> bool:
    """A tick of the undated sweep: it asked by PatientID with no StudyDate."""
    return "PatientID" in tick["kinds"]


def _tick_stats(ticks: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not ticks:
        return None
    return {
        "ticks": len(ticks),
        "median_seconds": round(statistics.median(t["seconds"] for t in ticks), 3),
        "max_seconds": round(max(t["seconds"] for t in ticks), 3),
        "median_queries": statistics.median(t["queries"] for t in ticks),
        "max_queries": max(t["queries"] for t in ticks),
        "median_answers": statistics.median(t["answers"] for t in ticks),
        "max_answers": max(t["answers"] for t in ticks),
        "max_peak_rss_mb": max(t["peak_rss_mb"] for t in ticks),
    }


def _cycle_totals(ticks: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ticks": len(ticks),
        "undated_ticks": sum(1 for t in ticks if _undated_tick(t)),
        "queries": sum(t["queries"] for t in ticks),
        "answers": sum(t["answers"] for t in ticks),
        "undated_queries": sum(t["queries"] for t in ticks if _undated_tick(t)),
        "undated_answers": sum(t["answers"] for t in ticks if _undated_tick(t)),
        "max_tick_queries": max(t["queries"] for t in ticks),
        "max_tick_seconds": max(t["seconds"] for t in ticks),
        "median_tick_seconds": round(statistics.median(t["seconds"] for t in ticks), 3),
        "posts": sum(t["posts"] for t in ticks),
    }


def _cold_cycle(scene: HarvestScene, most_ticks: int) -> dict[str, Any] | None:
    """Idle ticks until the cold sweep has run one whole cycle without the
    undated sweep and one with it (UNDATED_EVERY_CYCLES: one in four), or
    `most_ticks` ticks: each cycle from one growth of the cycle count to the
    next (the ticks before the first growth are run, not counted as a
    cycle); and every tick run, split into the dated phase and the undated
    sweep (a tick that asked by PatientID). None when not asked for."""
    if most_ticks <= 0:
        return None
    every: list[dict[str, Any]] = []
    cycles: dict[str, dict[str, Any]] = {}
    current: list[dict[str, Any]] | None = None
    count = scene.state("cold_cycles") or 0
    while len(every) < most_ticks and not ("dated" in cycles and "with_undated" in cycles):
        tick = scene.run()
        tick.pop("log")
        every.append(tick)
        if current is not None:
            current.append(tick)
        now = scene.state("cold_cycles") or 0
        if now != count:
            count = now
            if current:
                kind = "with_undated" if any(_undated_tick(t) for t in current) else "dated"
                cycles.setdefault(kind, _cycle_totals(current))
            current = []
    return {
        "ticks_run": len(every),
        "cycles": cycles,
        "dated_phase": _tick_stats([t for t in every if not _undated_tick(t)]),
        "undated_phase": _tick_stats([t for t in every if _undated_tick(t)]),
        "posts": sum(t["posts"] for t in every),
    }


def _kinds_cell(run: dict[str, Any]) -> str:
    kinds = ", ".join(f"{count:,} {kind}" for kind, count in run["kinds"].items())
    return f"{run['queries']:,} ({kinds}; {run['answers']:,} answers)" if kinds else "0"


def _cold_rows(cold: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The idle ticks of the cold cycles, by phase, and each cycle's totals."""
    if not cold:
        return []
    rows = []
    for phase, label in (("dated_phase", "dated phase"), ("undated_phase", "undated sweep")):
        stats = cold[phase]
        if stats:
            rows.append(
                (
                    f"idle ticks, {label}: wall; queries; answers",
                    f"median {stats['median_seconds']} s, max {stats['max_seconds']} s;"
                    f" median {stats['median_queries']:g}, max {stats['max_queries']};"
                    f" median {stats['median_answers']:g}, max {stats['max_answers']}"
                    f" ({stats['ticks']} ticks; peak RSS at most {stats['max_peak_rss_mb']} MB)",
                )
            )
    for kind, label in (("dated", "without"), ("with_undated", "with")):
        cycle = cold["cycles"].get(kind)
        if cycle:
            rows.append(
                (
                    f"cold cycle {label} the undated sweep: ticks (hours at 5 min), queries",
                    f"{cycle['ticks']} ({cycle['ticks'] * 5 / 60:.1f} h; undated sweep"
                    f" {cycle['undated_ticks']} ticks), {cycle['queries']:,}"
                    f" ({cycle['answers']:,} answers; undated sweep {cycle['undated_queries']:,}"
                    f" queries, {cycle['undated_answers']:,} answers)",
                )
            )
        else:
            rows.append((f"cold cycle {label} the undated sweep", "not seen"))
    rows.append(("cold ticks run (posts)", f"{cold['ticks_run']} ({cold['posts']})"))
    return rows


def print_harvest(results: dict[str, Any]) -> None:
    run, busy, reconcile = results["initial"], results["busy_tick"], results["reconcile"]
    formula, bare = results["idle_tick_formula"], results["bare_loop"]
    protocol = "QIDO-RS" if results["source"] == "dicomweb" else "C-FIND"
    rows = [
        (
            "studies (undated)",
            f"{results['studies']:,} ({results['undated']}), Orthanc {results['orthanc_version']}",
        ),
        ("initial: studies/s", f"{run['studies_per_second']:,.0f} ({run['seconds']} s)"),
        (f"initial: {protocol} queries", _kinds_cell(run)),
        ("initial: seconds in queries", f"{run['query_seconds']} s"),
        (
            "bare loop, same queries: studies/s",
            f"{bare['studies_per_second']:,.0f} ({bare['studies']:,} studies)",
        ),
        ("ratio client / bare loop", f"{results['ratio']:.2f}"),
        ("initial: peak RSS", f"{run['peak_rss_mb']} MB"),
        ("initial: CPU per 1,000 studies", f"{run['cpu_seconds_per_1000']} s"),
        ("initial: delivered (posts / unique)", f"{run['posts']:,} / {run['unique_studies']:,}"),
        (
            "idle tick: wall (median of 5)",
            f"{results['idle_tick_seconds']} s (max {results['idle_tick_max_seconds']} s)",
        ),
        (
            "idle tick: queries (most of 5)",
            f"{results['idle_tick_queries']} (by the formula, at any size:"
            f" {formula['hot']} hot + {formula['warm']} warm + cold: about"
            f" {formula['cold_answers']} answers, in 1 to {formula['cold']} queries)",
        ),
        ("idle tick: posts", str(results["idle_tick_posts"])),
        (
            f"busy tick ({HARVEST_BUSY_STUDIES} new today): wall, posts",
            f"{busy['seconds']} s, {busy['posts']}",
        ),
        ("busy tick: queries", _kinds_cell(busy)),
        ("reconcile: wall, peak RSS", f"{reconcile['seconds']} s, {reconcile['peak_rss_mb']} MB"),
        ("reconcile: queries", _kinds_cell(reconcile)),
    ]
    rows += _cold_rows(results.get("cold_cycle"))
    print("| measure | value |\n| ------- | ----- |")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(f"\nmachine: {results['machine']}")


def print_scenes(results: dict[str, Any]) -> None:
    if "wan" in results:
        print(f"\nScene 1: WAN, {WAN_LATENCY_MS:g} ms per answer (`--scene wan`)\n")
        print("| concurrency | studies | studies/s | ideal | ratio | settled at | CPU s / 1,000 |")
        print("| ----------- | ------- | --------- | ----- | ----- | ---------- | ------------- |")
        for run in results["wan"]:
            print(
                f"| {run['concurrency']} | {run['studies']:,} | {run['studies_per_second']:,.0f}"
                f" | {run['ideal_studies_per_second']:,.0f} | {run['ratio_to_ideal']:.2f}"
                f" | {run['settled_limit']} | {run['cpu_seconds_per_1000']} |"
            )
    if "capacity" in results:
        capacity = SERVICE_CAPACITY * 1000 / SERVICE_MS
        print(
            f"\nScene 2: a service of {SERVICE_CAPACITY} at once x {SERVICE_MS:g} ms"
            f" = {capacity:,.0f}/s (`--scene capacity`)\n"
        )
        print(
            "| concurrency | studies/s (client) | studies/s (service) | of capacity | settled at"
            " | queue p99 | queue max |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for run in results["capacity"]:
            print(
                f"| {run['concurrency']} | {run['studies_per_second']:,.0f}"
                f" | {run['service_studies_per_second']:,.0f}"
                f" | {run['ratio_to_capacity']:.2f} | {run['settled_limit']}"
                f" | {run['queue_p99_ms']:.1f} ms | {run['queue_max_ms']:.1f} ms |"
            )
    if "centers" in results:
        run = results["centers"]
        print(
            f'\nScene 3: {run["centers"]} centers x {run["studies_each"]:,} studies, "auto",'
            " the same service (`--scene centers`)\n"
        )
        rows = [
            ("together: studies/s", f"{run['studies_per_second']:,.0f} ({run['seconds']} s)"),
            ("service saw (first to last post)", f"{run['service_studies_per_second']:,.0f}"),
            ("of capacity", f"{run['ratio_to_capacity']:.2f}"),
            ("slowest center / fastest", f"{run['slowest_to_fastest']:.2f}"),
            ("queue p99 / max", f"{run['queue_p99_ms']:.1f} ms / {run['queue_max_ms']:.1f} ms"),
            ("lost / posted twice", f"{run['lost']} / {run['posted_twice']}"),
            ("settled limits", ", ".join(map(str, run["settled_limits"]))),
            ("exit codes", ", ".join(map(str, run["exit_codes"]))),
        ]
        print("| measure | value |\n| ------- | ----- |")
        for label, value in rows:
            print(f"| {label} | {value} |")
    if "flaky" in results:
        _print_flaky(results["flaky"])


def _print_flaky(runs: dict[str, Any]) -> None:
    print(
        f"\nScene 4: a service of {FLAKY_SERVICE_MS:g} ms, every {FLAKY_EVERY}th POST answered"
        ' 503 without Retry-After, "auto" (`--scene flaky`)\n'
    )
    print("| service | studies/s | delivered / studies | POSTs (503) | settled at | exit |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label in ("clean", "flaky"):
        run = runs[label]
        print(
            f"| {label} | {run['studies_per_second']:,.0f}"
            f" | {run['unique_studies']:,} / {run['studies']:,}"
            f" | {run['posts']:,} ({run['failed_posts']:,}) | {run['settled_limit']}"
            f" | {run['exit_code']} |"
        )
    print(f"\nflaky / clean: {runs['ratio']:.2f}")


def _probe_summary(probe: dict[str, Any]) -> str:
    return (
        f"{probe['max_ms']:.1f} ms (p99 {probe['p99_ms']:.1f}, p99.9 {probe['p999_ms']:.1f} ms;"
        f" {probe['slow_updates']} of {probe['updates']:,} over {PROBE_SLOW_SECONDS * 1000:.0f} ms)"
    )


def _probe_parts(probe: dict[str, Any]) -> str:
    return f"{probe['statement_max_ms']:.1f} ms / {probe['commit_max_ms']:.1f} ms"


def _rows(read: dict[str, int]) -> str:
    return ", ".join(f"{table} {rows:,}" for table, rows in read.items()) or "none"


def _activity(activity: dict[str, int], studies: int) -> str:
    """Lock waits and commits during initial, per 1,000 studies where it helps."""
    parts = [
        f"{key} {value:,} ({value * 1000 / studies:.1f} per 1,000 studies)"
        if key in ("Com_commit", "xact_commit", "Innodb_log_writes")
        else f"{key} {value:,}"
        for key, value in sorted(activity.items())
    ]
    return "; ".join(parts)


def print_table(results: dict[str, Any]) -> None:
    initial = results["initial"]
    args_studies = max(results["studies"], 1)
    rows = [
        ("studies", f"{results['studies']:,}"),
        ("concurrency / latency", f"{results['concurrency']} / {results['latency_ms']:g} ms"),
        ("max_studies_per_second", f"{results['max_studies_per_second'] or 'no cap'}"),
        ("initial: studies/s", f"{initial['studies_per_second']:,.0f} ({initial['seconds']} s)"),
        (
            "reference requests loop: studies/s",
            f"{results['reference']['studies_per_second']:,.0f}",
        ),
        ("ratio client / reference", f"{initial['ratio_to_reference']:.2f}"),
    ]
    if "ratio_to_ideal" in initial:
        rows.append(
            (
                "ratio client / ideal (concurrency/latency)",
                f"{initial['ratio_to_ideal']:.2f} of {initial['ideal_studies_per_second']:,.0f}/s",
            )
        )
    probe = results["pacs_probe"]
    idle = results["pacs_probe_idle"]
    noop = results["noop_tick"]
    rows += [
        ("initial: peak RSS", f"{initial['peak_rss_mb']:.1f} MB"),
        ("initial: CPU per 1,000 studies (user + system)", f"{initial['cpu_seconds_per_1000']} s"),
        (
            "initial: delivered (posts / unique)",
            f"{initial['posts']:,} / {initial['unique_studies']:,}",
        ),
        ("PACS probe during initial: longest update", _probe_summary(probe)),
        ("  statement (locks, reads) / commit (disk)", _probe_parts(probe)),
        (
            f"PACS probe, client not running ({results['baseline_seconds']:g} s)",
            _probe_summary(idle),
        ),
        ("  statement (locks, reads) / commit (disk) ", _probe_parts(idle)),
        ("PACS probe beside the reference loop", _probe_summary(results["pacs_probe_reference"])),
        (
            "PACS probe p99.9: initial / alone / beside the reference",
            f"{probe['p999_ms'] / max(idle['p999_ms'], 0.001):.2f}x /"
            f" 1 / {results['pacs_probe_reference']['p999_ms'] / max(idle['p999_ms'], 0.001):.2f}x",
        ),
        ("server during initial", _activity(results["server_during_initial"], args_studies)),
        (
            f"catch-up tick: {results['catch_up_tick']['studies_sent']} studies, rows read",
            _rows(results["catch_up_tick"]["rows_read"]),
        ),
        ("no-op tick: posts", f"{noop['posts']}"),
        ("no-op tick: rows read (server's counters, most of 5)", _rows(noop["rows_read"])),
        (
            "no-op tick: wall (median of 5)",
            f"{noop['median_seconds']:.3f} s (max {noop['max_seconds']:.3f} s)",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"| {'measure':<{width}} | value |")
    print(f"| {'-' * width} | ----- |")
    for label, value in rows:
        print(f"| {label:<{width}} | {value} |")
    print(f"\nmachine: {results['machine']}; database: {results['database_server']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--studies", type=int, default=100_000, help="archive size (default 100000)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="receiver delay per request")
    parser.add_argument(
        "--concurrency",
        type=lambda text: text if text == "auto" else int(text),
        default="auto",
        help='the client\'s concurrency setting: "auto" (default) or a number',
    )
    parser.add_argument(
        "--source",
        choices=("dcm4chee", "orthanc", "dicomweb", "dimse"),
        default="dcm4chee",
        help="the PACS: a dcm4chee database (default), or a real Orthanc fed DICOM files"
        " (Debian's orthanc package; --studies, default 100000, is worth lowering) read by"
        " its REST API (orthanc), QIDO-RS (dicomweb, its plugin) or C-FIND (dimse)",
    )
    parser.add_argument(
        "--cold-ticks",
        type=int,
        default=300,
        help="dicomweb, dimse: at most this many ticks to see the cold sweep cover the"
        " archive once (default 300; 0: skip)",
    )
    parser.add_argument(
        "--scene",
        choices=("loopback", "wan", "capacity", "centers", "flaky", "adaptive"),
        default="loopback",
        help="loopback: the table above (default); wan, capacity, centers: the scenes of"
        " adaptive delivery; flaky: a service failing one request in four; adaptive: all four",
    )
    parser.add_argument(
        "--max-studies-per-second",
        type=int,
        default=0,
        help="the client's max_studies_per_second setting (default 0: no cap)",
    )
    parser.add_argument(
        "--reference-studies",
        type=int,
        default=0,
        help="posts in the reference loop (default: as many as studies; 500 in latency mode)",
    )
    parser.add_argument(
        "--baseline-seconds",
        type=float,
        default=60.0,
        help="how long the PACS probe runs alone before the load, as a baseline (default 60)",
    )
    parser.add_argument(
        "--max-settle-seconds",
        type=float,
        default=900.0,
        help="longest wait for a quiet database server before measuring (default 900)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="the scenes' study counts times this (default 1; CI checks them at 0.01)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument(
        "--database",
        help="reuse a database kept by --keep instead of building one (its study_service"
        " table is dropped and the indexer reinstalled; the database is kept)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="measure the no-op tick at once, with the probe's rewrites still in the safety window",
    )
    parser.add_argument(
        "--engine", choices=("mysql", "postgresql"), default="mysql", help="the PACS's database"
    )
    parser.add_argument(
        "--schema",
        choices=("dcm4chee2", "arc5"),
        default="dcm4chee2",
        help="the PACS's schema: dcm4chee 2.x (default) or dcm4chee-arc-light 5",
    )
    parser.add_argument("--host", help="database server (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="default 3306 or 5432, by engine")
    parser.add_argument("--user", help="an administrator (default root or postgres)")
    parser.add_argument("--password")
    parser.add_argument(
        "--site-venv",
        action="store_true",
        help="run client.py in a venv holding only requirements.txt, -postgresql and -dimse,"
        f" as a site has it (built once under {SITE_VENV_CACHE})",
    )
    args = parser.parse_args(argv)
    global client_python
    client_python = site_venv() if args.site_venv else sys.executable
    compile_client()
    prefix = "DICOM_INDEXER_TEST_PG_" if args.engine == "postgresql" else "DICOM_INDEXER_TEST_DB_"
    defaults = {
        "host": "127.0.0.1",
        "port": 5432 if args.engine == "postgresql" else 3306,
        "user": "postgres" if args.engine == "postgresql" else "root",
        "password": "",
    }
    for name, default in defaults.items():
        if getattr(args, name) is None:
            value = os.environ.get(prefix + name.upper(), default)
            setattr(args, name, int(value) if name == "port" else value)
    if args.source == "orthanc":
        results = benchmark_orthanc(args)
        print_orthanc(results)
    elif args.source in ("dicomweb", "dimse"):
        results = benchmark_harvest(args)
        print_harvest(results)
    elif args.scene == "loopback":
        results = benchmark(args)
        print_table(results)
    else:
        results = {"machine": _machine(), "engine": args.engine}
        if args.scene in ("wan", "capacity", "adaptive"):
            scenes = scene_wan_and_capacity(args)
            for scene in ("wan", "capacity"):
                if args.scene in (scene, "adaptive"):
                    results[scene] = scenes[scene]
        if args.scene in ("centers", "adaptive"):
            results["centers"] = scene_ten_centers(args)
        if args.scene in ("flaky", "adaptive"):
            results["flaky"] = scene_flaky(args)
        print_scenes(results)
        print(f"\nmachine: {results['machine']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
