"""What the central service answers, taken as a hostile network would send
it: slow, huge, redirecting, refusing one study or all of them, failing now
and then. A run always ends, keeps its memory, and one study's trouble stays
that study's."""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest
from conftest import API_KEY, ROOT, Reply, write_configs
from testkit import peak_rss_mb

from dicom_indexer.cli import main
from dicom_indexer.errors import EXIT_DELIVERY, EXIT_INTERNAL, EXIT_KEY_REFUSED, EXIT_REJECTED
from dicom_indexer.service import Sender


def _fast(tmp_path, pacs, service, **extra):
    """Settings that keep a test short: a 3 s deadline per request."""
    return write_configs(
        tmp_path,
        pacs.name,
        service.url,
        {"read_timeout_seconds": 2, "connect_timeout_seconds": 1, "max_retries": 1, **extra},
    )


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line]


# -- bounded answers ---------------------------------------------------------


@pytest.mark.parametrize("part", ["body", "head"])
def test_an_answer_trickled_a_byte_at_a_time_ends_at_its_deadline(pacs, service, tmp_path, part):
    studies = pacs.add_studies(2)
    args = _fast(tmp_path, pacs, service)
    # One byte every 0.8 s: each read is well within read_timeout_seconds,
    # the whole answer would take minutes.
    service.respond = lambda n, r: Reply(
        500, b"x" * 400, trickle_seconds=0.8, trickle_head=part == "head"
    )
    assert main(["initial", *args]) == EXIT_DELIVERY
    # Each request ends at its deadline (connect + read: 3 s), the answer
    # unread: the errors below say so. A study is tried at most twice
    # (max_retries 1), and none is tried again after the run gave up.
    assert len(service.attempts) <= 2 * len(studies)
    rows = pacs.queue()
    assert {rows[pk]["status"] for pk in studies} == {"pending"}
    errors = {rows[pk]["last_error"] for pk in studies}
    if part == "body":
        assert errors == {"HTTP 500: (its body did not arrive within 3 s)"}
    else:
        assert errors == {"no complete answer within 3 s"}


@pytest.mark.parametrize("status", [500, 201])
def test_a_100_mb_answer_is_not_read_and_memory_stays_small(pacs, service, tmp_path, status):
    pks = pacs.add_studies(4)
    args = _fast(tmp_path, pacs, service)
    service.respond = lambda n, r: Reply(status, size=100 * 1024 * 1024)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "client.py"), "initial", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = peak_rss_mb(process)
    _, err = process.communicate(timeout=60)
    assert 0 < peak < 100, peak
    if status == 201:
        assert process.returncode == 0, err
        assert pacs.statuses() == {"sent": len(pks)}
    else:
        assert process.returncode == EXIT_DELIVERY, err
        assert pacs.statuses() == {"pending": len(pks)}
        assert {row["last_error"] for row in pacs.queue().values()} == {"HTTP 500: " + "x" * 200}


def test_a_redirect_stops_the_run_naming_where_it_points(pacs, service, configs, capsys):
    pacs.add_studies(5)
    moved = "https://indexador.example.cl/api/v2/register"
    service.respond = lambda n, r: Reply(
        301, body=b"", headers={"Location": moved + "?token=s3cr3t"}
    )
    assert main(["initial", *configs]) == EXIT_DELIVERY
    err = capsys.readouterr().err
    [line] = [line for line in _errors(err) if "run stopped" in line]
    assert f"the service answered HTTP 301 (a redirect to {moved}) at {service.url}" in line
    assert "s3cr3t" not in err
    assert pacs.statuses() == {"pending": 5}
    assert len(service.attempts) <= 2

    assert main(["check", *configs]) == EXIT_DELIVERY
    out = capsys.readouterr().out
    assert (
        f"FAILED  webservice: {service.url} answered HTTP 301, a redirect to {moved}:"
        " set webservice_url to the address it redirects to" in out
    )


def test_a_key_echoed_back_by_the_service_is_never_shown(pacs, service, configs, capsys):
    good, bad = pacs.add_studies(2)
    service.respond = lambda n, r: (
        (422, f'{{"error": "key {API_KEY} may not register this"}}')
        if r.json["study_pk"] == bad
        else (201, "{}")
    )
    assert main(["initial", "-v", *configs]) == EXIT_REJECTED
    assert main(["status", *configs]) == 0
    captured = capsys.readouterr()
    assert API_KEY not in captured.err + captured.out
    assert pacs.queue()[bad]["last_error"] == 'HTTP 422: {"error": "key *** may not register this"}'


# -- a worker that meets a bug ------------------------------------------------


def test_whatever_a_sender_thread_raises_ends_the_run_in_one_line(
    pacs, service, configs, capsys, monkeypatch
):
    pks = pacs.add_studies(20)
    real = Sender.send

    def broken(self, outcome, body):
        if outcome.study_pk == pks[3]:
            raise ValueError(f"header value {API_KEY}\n")
        return real(self, outcome, body)

    monkeypatch.setattr(Sender, "send", broken)
    assert main(["initial", *configs]) == EXIT_INTERNAL
    # The other workers stopped at once: no study after the broken one was
    # taken, but the few already on their way (the limit starts at 1 and
    # grows by half a request per answer: at most 2 others).
    tried = [r.json["study_pk"] for r in service.attempts]
    assert set(tried) <= set(pks[:6]), tried
    err = capsys.readouterr().err
    [line] = [line for line in _errors(err) if "run stopped" in line]
    assert re.search(r"run stopped: internal error: ValueError at test_answers\.py:\d+;", line)
    assert API_KEY not in err
    rows = pacs.queue()
    assert rows[pks[3]]["status"] == "pending"
    assert rows[pks[3]]["last_error"] == "internal error: ValueError"
    monkeypatch.undo()
    assert main(configs) == 0
    assert service.study_pks() == pks


# -- one study's trouble is that study's (issue 21) ----------------------------


def test_five_poison_studies_first_hold_back_no_other(pacs, service, configs, capsys):
    pks = pacs.add_studies(205)
    poison = set(pks[:5])
    service.respond = lambda n, r: (
        (500, "internal error") if r.json["study_pk"] in poison else (201, "{}")
    )
    assert main(["initial", *configs]) == EXIT_DELIVERY
    assert service.study_pks() == pks[5:]  # the 200 arrive in the same run
    rows = pacs.queue()
    for pk in poison:
        assert rows[pk]["status"] == "pending"
        assert rows[pk]["attempts"] == 1
        assert rows[pk]["last_error"] == "HTTP 500: internal error"
        assert rows[pk]["next_attempt_at"] is not None
    # Each tried 1 + max_retries times in the run, no more.
    assert [r.json["study_pk"] for r in service.attempts].count(pks[0]) == 4

    capsys.readouterr()
    assert main(["status", *configs]) == 0
    out = capsys.readouterr().out
    assert "waiting           5  failed, tried again from" in out
    assert f"study {pks[0]} (pending, 1 attempts): HTTP 500: internal error" in out

    # The next run does not try them before their wait is over...
    attempts = len(service.attempts)
    pacs.add_studies(2)
    assert main(configs) == 0
    assert len(service.attempts) == attempts + 2
    # ...then tries them again, after the new studies.
    pacs.execute("UPDATE study_service SET next_attempt_at = %s", ("2000-01-01 00:00:00",))
    pacs.add_studies(1)
    assert main(configs) == EXIT_DELIVERY
    tried = [r.json["study_pk"] for r in service.attempts[attempts + 2 :]]
    assert tried[0] not in poison and set(tried[1:]) == poison
    assert {pacs.queue()[pk]["attempts"] for pk in poison} == {2}


def test_a_403_for_one_study_is_its_refusal_not_the_keys(pacs, service, configs, capsys):
    pks = pacs.add_studies(40)
    blocked = pks[0]  # a firewall dislikes its description
    service.respond = lambda n, r: (
        (403, "<html>Request blocked</html>") if r.json["study_pk"] == blocked else (201, "{}")
    )
    assert main(["initial", *configs]) == EXIT_REJECTED
    assert service.study_pks() == pks[1:]
    assert pacs.queue()[blocked]["status"] == "failed"
    assert "1 studies were refused by the service" in capsys.readouterr().err


def test_403_for_every_study_is_the_key_and_leaves_them_pending(pacs, service, configs, capsys):
    pacs.add_studies(30)
    service.respond = lambda n, r: (403, "forbidden")
    assert main(["initial", *configs]) == EXIT_KEY_REFUSED
    err = capsys.readouterr().err
    assert "run stopped: the service refused the API key (HTTP 403: forbidden): 5 studies" in err
    assert pacs.statuses() == {"pending": 30}
    # One at a time while nothing is accepted: the 5, and what was on its way.
    assert len(service.attempts) <= 8


def test_a_service_refusing_every_study_is_not_a_verdict_on_them(pacs, service, configs, capsys):
    pks = pacs.add_studies(50)
    service.respond = lambda n, r: (400, "gateway misconfigured")
    assert main(["initial", *configs]) == EXIT_REJECTED
    [line] = [line for line in _errors(capsys.readouterr().err) if "run stopped" in line]
    assert line.endswith(
        "run stopped: the service refuses every study: the last 5 tried were all refused and"
        " none was accepted (last: HTTP 400: gateway misconfigured); they stay pending"
    )
    assert pacs.statuses() == {"pending": 50}  # not failed

    service.respond = lambda n, r: (201, "{}")  # the gateway is fixed
    assert main(configs) == 0  # a plain run, no retry-failed
    assert service.study_pks() == pks


def test_a_422_among_accepted_studies_is_final_for_that_study(pacs, service, configs):
    pks = pacs.add_studies(10)
    service.respond = lambda n, r: (422, "bad uid") if r.json["study_pk"] == pks[9] else (201, "")
    assert main(["initial", *configs]) == EXIT_REJECTED
    assert pacs.queue()[pks[9]]["status"] == "failed"


def test_a_backend_failing_one_request_in_four_delays_nothing(pacs, service, tmp_path):
    pks = pacs.add_studies(300)
    args = write_configs(tmp_path, pacs.name, service.url, backoff_seconds=0.05)
    service.retry_after = None  # a load balancer's 503: no Retry-After
    service.respond = lambda n, r: (
        (503, "no backend") if len(service.attempts) % 4 == 3 else (201, "{}")
    )
    assert main(["initial", *args]) == 0  # every study in one run
    assert service.study_pks() == pks
    assert pacs.statuses() == {"sent": 300}


# -- proxies as curl takes them --------------------------------------------------


def test_a_proxy_without_scheme_and_with_credentials(pacs, service, tmp_path, monkeypatch, capsys):
    url = "http://indexador.invalid/api/v1/register"
    args = write_configs(tmp_path, pacs.name, url)
    address = service.url.split("//", 1)[1].split("/", 1)[0]
    monkeypatch.setenv("HTTPS_PROXY", "")
    monkeypatch.setenv("http_proxy", f"indexer:p%40ss-w0rd@{address}")
    pacs.add_studies(2)
    assert main(["-v", *args]) == 0
    assert [r.path for r in service.received] == [url, url]
    expected = "Basic " + base64.b64encode(b"indexer:p@ss-w0rd").decode()
    sent = {
        value for r in service.received for name, value in r.headers.items()
        if name.lower() == "proxy-authorization"
    }  # fmt: skip
    assert sent == {expected}
    assert "w0rd" not in capsys.readouterr().err
