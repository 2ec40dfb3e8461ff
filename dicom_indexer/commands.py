"""The commands: one run_*() each; they only translate into parts."""

from __future__ import annotations

import collections
import itertools
import json
import logging
import logging.handlers
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import load_settings
from .delivery import Outcome, deliver
from .document import _text, document_fingerprint, encode_document, study_document
from .errors import EXIT_CONFIG, EXIT_DATABASE, EXIT_OK, DatabaseError, IndexerError
from .run import STOP_EXIT_CODES, TERMINATED
from .service import Sender
from .sources import known_source, open_pacs
from .study_service import DELETED, DELETING, FAILED, PENDING, SENT

if TYPE_CHECKING:
    from .config import Settings
    from .run import RunReport, Stop
    from .sources import Pacs

log = logging.getLogger("dicom_indexer")

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
            sender = Sender(settings.service)
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


def run_reconcile(settings: Settings, max_studies: int | None, stop: Stop) -> int:
    pacs = open_pacs(settings)
    try:
        pacs.queue.acquire_run_lock()
        result = pacs.source.reconcile(pacs.queue, settings, max_studies, stop)
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


def _adopt(pacs: Pacs, old: Pacs, rows: list[dict[str, Any]], center: str) -> int:
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
    print(settings.secrets.redact("\n".join(_status_lines(pacs.where, status))))
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
        print(settings.secrets.redact(f"{state:<7} {message}"))
    failed = [code for state, _, code in results if state == "FAILED"]
    return failed[0] if failed else EXIT_OK


def _check_service(settings: Settings) -> tuple[str, str, int]:
    sender = Sender(settings.service)
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
        return [("FAILED", f"{known_source(settings).check_label}: {exc}", exc.exit_code)]
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


def _check_connection(settings: Settings, pacs: Pacs) -> list[tuple[str, str, int]]:
    results = pacs.connection_lines()
    try:
        pacs.queue.check_installed()
    except DatabaseError as exc:
        return [*results, ("FAILED", f"indexer: {exc}", EXIT_DATABASE)]
    return [*results, *pacs.installation_lines()]
