"""One run's sending: what each answer means for a study and for the run
(StudyFates), the worker threads (SendPool), deliver()."""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import logging.handlers
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .concurrency import ConcurrencyLimit
from .document import _text, document_fingerprint, encode_document, study_document
from .errors import internal_error_line
from .http import MAX_RETRY_AFTER_SECONDS, _safe_url
from .run import (
    DELIVERED,
    FAILING,
    INTERNAL,
    KEY_REFUSED,
    REFUSED,
    REFUSING,
    TERMINATED,
    UNREACHABLE,
    WRONG_URL,
    RateCap,
    _progress_bar,
)
from .stability import hold_reason
from .study_service import DELETING, FAILED, PENDING, SENT

if TYPE_CHECKING:
    from .config import Settings
    from .run import RunReport, Stop
    from .service import Sender
    from .sources import Pacs
    from .stability import StabilityWindow
    from .study_service import StudyServiceQueue

log = logging.getLogger("dicom_indexer")

# Answers that say "not now" rather than "not this study": a study that gets
# one is tried up to 3 x max_retries more times in the run (a 500 says
# "this request breaks me": max_retries).
TRANSIENT_STATUSES = (408, 429, 502, 503, 504)
TRANSIENT_RETRY_FACTOR = 3
QUICK_RETRY_FACTOR = 0.1  # of the backoff, while most requests succeed
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
AUTO_REPORT_SECONDS = 5.0  # -v: a line about the concurrency limit this often


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
    run_stop: str | None = None  # the sender's: the service stalls, the run stops (HttpClient)

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
        if outcome.run_stop is not None and self.report.stop is None:
            # Deadlines expired in a row: the service trickles or is silent.
            self.report.stop = StopReason(UNREACHABLE, outcome.run_stop)
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
        """Studies handed over but not started stay pending, untried; one
        tried before in this run (a retry) comes back with its last answer,
        to be recorded."""
        while True:
            try:
                outcome = self.jobs.get_nowait()
            except queue.Empty:
                return
            if outcome is not None and outcome.tries:
                self.answers.put(outcome)
            else:
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
                # Not sent: a retry comes back with its last answer, to be recorded.
                self.answers.put(outcome if outcome.tries else None)
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
            if outcome.kind in (KEY_REFUSED, WRONG_URL, INTERNAL) or outcome.run_stop:
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
        pacs: Pacs,
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

    def unreadable(self, row: dict[str, Any]) -> None:
        """A study the source could not read (its answers were malformed,
        truncated, of the wrong types): never sent; pending, with its error
        and a next attempt, as a study whose delivery failed."""
        outcome = Outcome(
            row["queued_pk"], None, _text(row["known_iuid"]), attempts=row["attempts"]
        )
        outcome.error = row["unreadable"]
        self.fates._decide(outcome, PENDING, study_backoff_seconds(outcome.attempts + 1))

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
    pacs: Pacs,
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
    pacs: Pacs,
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
        if row.get("unreadable"):
            delivery.unreadable(row)
            continue
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


def delete_gone(pacs: Pacs, sender: Sender, settings: Settings, delivery: Delivery) -> None:
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
    pacs: Pacs, settings: Settings, out: Any, max_studies: int | None
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
        if row.get("unreadable"):
            log.info("dry run: study %d cannot be read: %s", row["queued_pk"], row["unreadable"])
            continue
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
