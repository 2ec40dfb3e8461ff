"""The central index's client: one POST (or DELETE) per study."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .errors import EXIT_DELIVERY, EXIT_KEY_REFUSED, EXIT_OK
from .http import (
    ERROR_BODY_BYTES,
    ERROR_TEXT_CHARS,
    SUCCESS_BODY_BYTES,
    Answer,
    HttpClient,
    _transport_retries,
    safe_url,
)
from .run import TERMINATION_GRACE_SECONDS

if TYPE_CHECKING:
    from .config import ServiceSettings
    from .delivery import Outcome


class Sender:
    """One exchange at a time per worker thread, over one pool of keep-alive
    connections that the threads share (the HTTP layer's HttpClient).

    It calls urllib3, the transport under requests, directly: requests'
    per-request objects (sessions, prepared requests, cookie jars, responses)
    cost 7% of the throughput over a 50 ms network with 16 connections (286
    studies/s against 306, measured). requests still reads the proxy
    settings of the environment, when there are any. Every exchange is
    bounded: a deadline on the whole of it, and the body of an answer read up
    to a small cap, the rest never read (a 2xx's body is not used: its status
    is the answer, however long the body). A service that lets STALLED_DEADLINES
    deadlines in a row expire stops the run (Outcome.run_stop).
    """

    def __init__(self, service: ServiceSettings) -> None:
        self.secrets = service.secrets
        self.retries = _transport_retries(service.max_retries, service.backoff_seconds)
        self.http = HttpClient(
            service.url,
            peer="the service",
            connect_timeout=service.connect_timeout_seconds,
            read_timeout=service.read_timeout_seconds,
            retries=self.retries,
            max_connections=service.max_connections,
            ca_bundle=service.ca_bundle
            or os.environ.get("REQUESTS_CA_BUNDLE")
            or os.environ.get("CURL_CA_BUNDLE"),
            headers={"Content-Type": "application/json", "X-Api-Key": service.key},
            # After SIGTERM, the answers in flight may still come (and be
            # recorded) for as long as the run waits for them.
            termination_grace=TERMINATION_GRACE_SECONDS,
            secrets=service.secrets,
        )
        self.url = self.http.url  # without credentials, if the URL had some

    def close(self) -> None:
        self.http.close()

    def send(self, outcome: Outcome, body: bytes) -> None:
        """Registers (POST) or removes (DELETE) one study; records the answer
        in `outcome`. Never raises for network trouble."""
        outcome.tries += 1
        answer = self._exchange("DELETE" if outcome.deletion else "POST", body)
        status = answer.status
        outcome.status_code = status
        outcome.latency = answer.latency
        outcome.retry_after = answer.retry_after
        outcome.timed_out = answer.timed_out
        outcome.run_stop = answer.stalled
        # For a DELETE, 404 means already gone: done.
        outcome.delivered = status is not None and (
            200 <= status < 300 or (outcome.deletion and status == 404)
        )
        if status is None:
            outcome.error = answer.error
        elif outcome.delivered:
            outcome.error = None
        else:
            outcome.error = self.secrets.redact(_answer_line(answer))

    def probe(self) -> tuple[int, str]:
        """For `check`: reaches the service with the key without registering
        anything (a GET); the exit code a run would meet (EXIT_OK: fine)
        and one line. A redirect fails: a POST would not follow it. A
        service that answers a GET (405, 200) may not look at the key for it,
        and only a POST would prove it, which could register a study: the
        line says so rather than call the key good."""
        where = self.http.where
        answer = self._exchange("GET", None)
        code = answer.status
        if code is None:
            return EXIT_DELIVERY, f"{where}: {answer.error}"
        if 300 <= code < 400:
            return EXIT_DELIVERY, (
                f"{where} answered HTTP {code}, a redirect to"
                f" {safe_url(answer.location or '(no Location)')}: set webservice_url to the"
                " address it redirects to (a POST is never redirected)"
            )
        if code in (401, 403):
            return EXIT_KEY_REFUSED, f"the service refused the key (HTTP {code})"
        if code >= 500:
            return EXIT_DELIVERY, f"the service is failing (HTTP {code})"
        return EXIT_OK, (
            f"{where} answered HTTP {code}; the API key is verified only when the first"
            " study is sent"
        )

    def _exchange(self, method: str, body: bytes | None) -> Answer:
        answer = self.http.exchange(
            method, "", body, bound=SUCCESS_BODY_BYTES, error_bound=ERROR_BODY_BYTES
        )
        if answer.status is None:
            return answer
        answer.text = " ".join(bytes(answer.data).decode("utf-8", "replace").split())
        if answer.terminated and not answer.complete:
            answer.text = "(its body was cut short by SIGTERM)"
        elif answer.timed_out and not answer.complete:
            answer.text = f"(its body did not arrive within {self.http.deadline_seconds:g} s)"
        return answer


def _answer_line(answer: Answer) -> str:
    """'HTTP 422: {"error": ...}', for last_error and the log."""
    line = f"HTTP {answer.status}"
    if answer.status is not None and 300 <= answer.status < 400:
        line += f" (a redirect to {safe_url(answer.location or '(no Location)')})"
    text = answer.text[:ERROR_TEXT_CHARS]
    return f"{line}: {text}" if text else line
