"""How many requests the central service is sent at once."""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import Callable

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
