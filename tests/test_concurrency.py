"""Adaptive delivery ("concurrency": "auto"): the limit goes up on a fast
service, comes down on one whose latency rises with load, stays within its
bounds, and a 429 with Retry-After pauses every request, losing nothing.

Assertions are on what the service saw and what the run reported, never on
timings tight enough to flake on a shared 2-core machine."""

from __future__ import annotations

import re

import pytest
from conftest import read_metrics, write_configs

from dicom_indexer.cli import main
from dicom_indexer.concurrency import ConcurrencyLimit
from dicom_indexer.errors import EXIT_CONFIG


def _run(args, *extra):
    return main([*extra, *args])


def test_auto_raises_the_limit_on_a_service_that_stays_fast(pacs, service, tmp_path):
    """What "auto" sees is the latency the client measures, its own machine's
    delays included: a busy 2-core machine adds tens of milliseconds to each
    answer. The service's 500 ms stand well above that, so that the climb is
    the code's decision, whatever else the machine is doing."""
    metrics = tmp_path / "indexer.prom"
    args = write_configs(
        tmp_path, pacs.name, service.url, metrics_file=str(metrics), max_concurrency=16
    )
    pks = pacs.add_studies(120)
    service.delay_seconds = 0.5  # a slow WAN: 500 ms whatever the load
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks
    values = read_metrics(metrics)
    # Started at 1; a service that stays fast lets it climb past the old fixed 4.
    assert service.max_in_flight > 4
    assert 4 < values["concurrency_limit"] <= 16
    assert values["unloaded_latency_seconds"] >= 0.5
    assert values["latency_seconds"] >= values["unloaded_latency_seconds"]


def test_auto_lowers_the_limit_when_latency_rises_with_load(pacs, service, tmp_path, capsys):
    """A service answering in 500 ms lets "auto" climb; then it serves one
    request at a time, 250 ms each, so that every request more in flight
    only waits 250 ms longer in its queue, and "auto" comes down.

    Whatever a busy machine adds to what the client measures stays well
    under these delays, and from max_concurrency 8 the 40 answers after the
    change are enough to come down (30% per round trip), however far it had
    climbed."""
    metrics = tmp_path / "indexer.prom"
    args = write_configs(
        tmp_path, pacs.name, service.url, metrics_file=str(metrics), max_concurrency=8
    )
    pks = pacs.add_studies(100)
    service.delay_seconds = 0.5
    in_flight_when_fast = []

    def saturate_after_60(number, request):
        if number == 60:
            in_flight_when_fast.append(service.max_in_flight)
            service.serve_at_most(1, 0.25)  # delay_seconds: now the time each one takes
        return 201, "{}"

    service.respond = saturate_after_60
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks
    assert in_flight_when_fast[0] > 4  # it had climbed...
    assert read_metrics(metrics)["concurrency_limit"] <= 2  # ...and came down
    # The summary line says where it settled and what the service's latency was.
    summary = capsys.readouterr().err.splitlines()[-1]
    pattern = r", concurrency [12] \(auto, up to 8\), latency \d+ ms \(unloaded (\d+) ms\)"
    found = re.search(pattern, summary)
    assert found, summary
    assert int(found.group(1)) >= 250  # the service's own 250 ms: never less


def test_fixed_concurrency_keeps_its_number(pacs, service, tmp_path):
    metrics = tmp_path / "indexer.prom"
    args = write_configs(tmp_path, pacs.name, service.url, concurrency=3, metrics_file=str(metrics))
    pacs.add_studies(60)
    service.serve_at_most(1, 0.01)  # latency rises with load: "auto" would come down
    assert _run(args, "initial") == 0
    assert read_metrics(metrics)["concurrency_limit"] == 3
    assert service.max_in_flight == 3


def test_auto_never_exceeds_max_concurrency(pacs, service, tmp_path):
    args = write_configs(tmp_path, pacs.name, service.url, max_concurrency=6)
    pks = pacs.add_studies(300)
    service.delay_seconds = 0.03
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks
    assert service.max_in_flight <= 6  # reaching it is the machine's pace: see below


def test_429_with_retry_after_pauses_all_sending_and_loses_nothing(
    pacs, service, tmp_path, capsys, monkeypatch
):
    args = write_configs(tmp_path, pacs.name, service.url, concurrency=8)
    pks = pacs.add_studies(200)
    service.delay_seconds = 0.01
    service.retry_after = "2"
    refused = []

    def too_many_once(number, request):
        # One 429, the other requests in flight are served: only a pause of
        # all sending, not a retry of that one request, keeps the others back.
        if number == 40 and not refused:
            refused.append(request.json["study_pk"])
            return 429, '{"error": "slow down"}'
        return 201, "{}"

    # When each request was let go, and the pause, on the limit's own clock
    # and under its own lock (a Condition's RLock: the spies hold it across
    # the real call, so no decision falls between the call and the record).
    starts, pauses = [], []
    real_acquire, real_pause = ConcurrencyLimit.acquire, ConcurrencyLimit.pause

    def acquire(self, cancelled):
        with self.turn:
            taken = real_acquire(self, cancelled)
            if taken:
                starts.append(self.clock())
            return taken

    def pause(self, seconds):
        with self.turn:
            started = real_pause(self, seconds)
            pauses.append((self.clock(), self.paused_until))
            return started

    monkeypatch.setattr(ConcurrencyLimit, "acquire", acquire)
    monkeypatch.setattr(ConcurrencyLimit, "pause", pause)
    service.respond = too_many_once
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks  # the refused study was sent again
    assert pacs.statuses() == {"sent": 200}
    assert "the service answered HTTP 429: all sending paused for 2 s" in capsys.readouterr().err
    # No request of any of the 8 workers was let go until Retry-After had
    # passed (those already on their way were answered meanwhile); then
    # sending went on.
    [(paused_at, until)] = pauses
    assert until - paused_at == pytest.approx(2, abs=0.01)
    after = [t for t in starts if t >= paused_at]
    assert after and min(after) >= until
    tries = [r.json["study_pk"] for r in service.attempts]
    assert tries.count(refused[0]) == 2


@pytest.mark.parametrize("retry_after", [None, "soon"], ids=["absent", "malformed"])
def test_503_without_a_usable_retry_after_backs_off_that_study_only(
    pacs, service, tmp_path, retry_after
):
    args = write_configs(tmp_path, pacs.name, service.url, concurrency=4)
    pks = pacs.add_studies(40)
    service.retry_after = retry_after

    def busy_twice_for_one(number, request):
        tries = [r for r in service.attempts if r.json["study_pk"] == pks[5]]
        if request.json["study_pk"] == pks[5] and len(tries) < 2:
            return 503, "busy"
        return 201, "{}"

    service.respond = busy_twice_for_one
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks
    assert len([r for r in service.attempts if r.json["study_pk"] == pks[5]]) == 3


def test_concurrency_auto_and_bad_values_in_config_json(pacs, service, tmp_path, capsys):
    args = write_configs(tmp_path, pacs.name, service.url, concurrency="fast")
    assert _run(args, "check") == EXIT_CONFIG
    out = capsys.readouterr().out
    assert "config.json: field 'concurrency' must be \"auto\" or a number from 1 to 64" in out
    args = write_configs(tmp_path, pacs.name, service.url, concurrency="auto")
    pacs.add_studies(2)
    assert _run(args) == 0
    assert len(service.documents) == 2


# The decisions of "auto", fed answers as a clock of their own ticks: what
# the limit does does not depend on how busy the machine is.


class _Feed:
    """Answers for a ConcurrencyLimit, every slot it allows in use."""

    def __init__(self, limit: ConcurrencyLimit) -> None:
        self.limit = limit
        self.now = 1000.0
        limit.clock = lambda: self.now

    def answers(self, count: int, latency, failed: bool = False, seconds: float = 0.001) -> None:
        for _ in range(count):
            while self.limit.in_flight < int(self.limit.allowed):
                assert self.limit.acquire(lambda: False)
            self.now += seconds
            seconds_now = latency(self.limit.in_flight) if callable(latency) else latency
            if failed:
                self.limit.release(None, failed=True)
            else:
                self.limit.release(seconds_now)


def test_auto_grows_to_its_maximum_while_the_latency_holds():
    limit = ConcurrencyLimit(None, 64)
    feed = _Feed(limit)
    feed.answers(2000, 0.05)
    assert int(limit.allowed) == 64


def test_auto_sheds_when_each_request_more_only_waits_longer():
    limit = ConcurrencyLimit(None, 64)
    feed = _Feed(limit)
    feed.answers(2000, 0.05)
    # One at a time, 50 ms each: latency grows with what is in flight.
    feed.answers(400, lambda in_flight: 0.05 * in_flight)
    assert int(limit.allowed) <= 2


def test_a_backend_failing_one_request_in_four_does_not_lower_the_limit():
    limit = ConcurrencyLimit(None, 64)
    feed = _Feed(limit)
    feed.answers(2000, 0.05)
    assert int(limit.allowed) == 64
    for _ in range(200):
        feed.answers(3, 0.05)
        feed.answers(1, None, failed=True)
    assert int(limit.allowed) == 64


def test_mostly_5xx_halves_the_limit_at_most_once_per_round_trip():
    limit = ConcurrencyLimit(None, 64)
    feed = _Feed(limit)
    feed.answers(2000, 0.05)
    # 200 failures within one round trip (50 ms): one halving, not 200.
    feed.answers(200, None, failed=True, seconds=0.0001)
    assert int(limit.allowed) == 32
    feed.now += 0.06
    feed.answers(1, None, failed=True)
    assert int(limit.allowed) == 16


def test_fixed_concurrency_is_not_moved_by_latency_or_failures():
    limit = ConcurrencyLimit(3, 64)
    feed = _Feed(limit)
    feed.answers(100, lambda in_flight: 0.05 * in_flight)
    feed.answers(100, None, failed=True)
    assert limit.allowed == 3
