"""The metrics textfile for node_exporter."""

from __future__ import annotations

import logging
import logging.handlers
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EXIT_OK

if TYPE_CHECKING:
    from .run import RunReport

log = logging.getLogger("dicom_indexer")

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
