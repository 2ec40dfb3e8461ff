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
    metrics = tmp_path / "indexer.prom"
    args = write_configs(tmp_path, pacs.name, service.url, metrics_file=str(metrics))
    pks = pacs.add_studies(600)
    service.delay_seconds = 0.05  # a WAN: 50 ms whatever the load
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks
    values = read_metrics(metrics)
    # Started at 1; a service that stays fast lets it climb past the old
    # fixed 4 (to 64 on a quiet machine: a busy one adds its own latency,
    # and how far it gets is the machine's; the climb is the code's).
    assert service.max_in_flight > 4
    assert values["concurrency_limit"] > 4
    assert values["unloaded_latency_seconds"] >= 0.05
    assert values["latency_seconds"] >= values["unloaded_latency_seconds"]


def test_auto_lowers_the_limit_when_latency_rises_with_load(pacs, service, tmp_path, capsys):
    """A service answering in 100 ms lets "auto" climb; then it serves one
    request at a time, 100 ms each, so that every request more in flight
    only waits 100 ms longer in its queue, and "auto" comes down.

    Slow enough for a loaded machine: the climb needs the client to keep 8
    requests in flight at 100 ms (80 studies/s, not its pace), and from
    max_concurrency 8 the 40 answers after the change are enough to come
    down (30% per round trip), however far it had climbed."""
    metrics = tmp_path / "indexer.prom"
    args = write_configs(
        tmp_path, pacs.name, service.url, metrics_file=str(metrics), max_concurrency=8
    )
    pks = pacs.add_studies(140)
    service.delay_seconds = 0.1
    in_flight_when_fast = []

    def saturate_after_100(number, request):
        if number == 100:
            in_flight_when_fast.append(service.max_in_flight)
            service.serve_at_most(1, 0.1)  # delay_seconds: now the time each one takes
        return 201, "{}"

    service.respond = saturate_after_100
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks
    assert in_flight_when_fast[0] > 4  # it had climbed...
    assert read_metrics(metrics)["concurrency_limit"] <= 2  # ...and came down
    # The summary line says where it settled and what the service's latency was.
    summary = capsys.readouterr().err.splitlines()[-1]
    pattern = r", concurrency [12] \(auto, up to 8\), latency \d+ ms \(unloaded (\d+) ms\)"
    found = re.search(pattern, summary)
    assert found, summary
    assert int(found.group(1)) >= 100  # the service's own 100 ms: never less


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


def test_429_with_retry_after_pauses_all_sending_and_loses_nothing(pacs, service, tmp_path):
    args = write_configs(tmp_path, pacs.name, service.url, concurrency=8)
    pks = pacs.add_studies(200)
    service.delay_seconds = 0.01
    service.retry_after = "2"
    burst = []  # when the service said "too many"

    def too_many_once(number, request):
        # One 429, the other requests in flight are served: only a pause of
        # all sending, not a retry of that one request, keeps the others back.
        if number == 40 and not burst:
            burst.append(request.at)
            return 429, '{"error": "slow down"}'
        return 201, "{}"

    service.respond = too_many_once
    assert _run(args, "initial") == 0
    assert service.study_pks() == pks  # each refused study was sent again
    assert pacs.statuses() == {"sent": 200}
    # After the 429, the requests already on their way arrive at once; then
    # nothing until Retry-After has passed, from any of the 8 workers.
    after = [r.at - burst[0] for r in service.attempts if r.at > burst[0]]
    assert after, "no request after the 429"
    assert not [t for t in after if 0.5 < t < 1.9], sorted(after)[:20]


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
