"""What a run carries: its stop flag, its report, its rate cap, its progress bar."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .errors import (
    EXIT_DELIVERY,
    EXIT_INTERNAL,
    EXIT_KEY_REFUSED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_TERMINATED,
)

if TYPE_CHECKING:
    from .concurrency import ConcurrencyLimit
    from .delivery import StopReason

# After SIGTERM, requests already in flight may finish for this long (their
# answers are recorded); systemd's default stop timeout is 90 s, a shutdown's
# patience often 10 s.
TERMINATION_GRACE_SECONDS = 7.0

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
