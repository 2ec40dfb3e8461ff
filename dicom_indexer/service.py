"""The central index's client: one POST (or DELETE) per study."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .errors import EXIT_DELIVERY, EXIT_KEY_REFUSED, EXIT_OK
from .http import (
    ERROR_BODY_BYTES,
    ERROR_TEXT_CHARS,
    OVERLOAD_STATUSES,
    SUCCESS_BODY_BYTES,
    Answer,
    DeadlineWatch,
    _cause_chain,
    _caused_by,
    _default_ca_bundle,
    _environment_proxy,
    _reason,
    _safe_url,
    _transport_retries,
    _urllib3_classes,
)
from .logs import redact

if TYPE_CHECKING:
    from .config import Settings
    from .delivery import Outcome


class Sender:
    """One exchange at a time per worker thread, over one pool of keep-alive
    connections that the threads share.

    It calls urllib3, the transport under requests, directly: requests'
    per-request objects (sessions, prepared requests, cookie jars, responses)
    cost 7% of the throughput over a 50 ms network with 16 connections (286
    studies/s against 306, measured). requests still reads the proxy
    settings of the environment, when there are any. Every exchange is
    bounded: a deadline on the whole of it (DeadlineWatch), and the body of
    an answer read up to a small cap, the rest never read.
    """

    def __init__(self, settings: Settings) -> None:
        import urllib3

        self.settings = settings
        self.url = settings.webservice_url
        self.headers = {"Content-Type": "application/json", "X-Api-Key": settings.key}
        self.retries = _transport_retries(settings)
        self.watch = DeadlineWatch(settings.request_deadline_seconds)
        options: dict[str, Any] = {
            "num_pools": 1,
            "maxsize": settings.concurrency or settings.max_concurrency,
            "block": True,
            "retries": self.retries,
            "timeout": urllib3.Timeout(
                connect=settings.connect_timeout_seconds, read=settings.read_timeout_seconds
            ),
        }
        if self.url.startswith("https://"):
            options["cert_reqs"] = "CERT_REQUIRED"
            options["ca_certs"] = (
                settings.ca_bundle
                or os.environ.get("REQUESTS_CA_BUNDLE")
                or os.environ.get("CURL_CA_BUNDLE")
                or _default_ca_bundle()
            )
        proxy = _environment_proxy(self.url)
        if proxy is not None:
            proxy_url, proxy_headers = proxy
            self.pool = urllib3.ProxyManager(proxy_url, proxy_headers=proxy_headers, **options)
        else:
            self.pool = urllib3.PoolManager(**options)
        self.pool.pool_classes_by_scheme = _urllib3_classes()["pools"]
        self.http_error = urllib3.exceptions.HTTPError
        self.read_timeout = urllib3.exceptions.ReadTimeoutError

    def close(self) -> None:
        self.watch.close()
        self.pool.clear()

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
        # For a DELETE, 404 means already gone: done.
        outcome.delivered = status is not None and (
            200 <= status < 300 or (outcome.deletion and status == 404)
        )
        if status is None:
            outcome.error = answer.error
        elif outcome.delivered:
            outcome.error = None
        else:
            outcome.error = redact(_answer_line(answer))

    def probe(self) -> tuple[int, str]:
        """For `check`: reaches the service with the key without registering
        anything (a GET); the exit code a run would meet (EXIT_OK: fine)
        and one line. A redirect fails: a POST would not follow it. A
        service that answers a GET (405, 200) may not look at the key for it,
        and only a POST would prove it, which could register a study: the
        line says so rather than call the key good."""
        where = _safe_url(self.url)
        answer = self._exchange("GET", None)
        code = answer.status
        if code is None:
            return EXIT_DELIVERY, f"{where}: {answer.error}"
        if 300 <= code < 400:
            return EXIT_DELIVERY, (
                f"{where} answered HTTP {code}, a redirect to"
                f" {_safe_url(answer.location or '(no Location)')}: set webservice_url to the"
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
        answer = Answer()
        self.watch.begin()
        started = time.monotonic()
        try:
            response = self.pool.urlopen(
                method,
                self.url,
                body=body,
                headers=self.headers,
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
        except self.http_error as exc:
            expired = self.watch.end()
            answer.timed_out = expired or _caused_by(exc, self.read_timeout)
            answer.error = self._describe(exc, expired)
            return answer
        answer.status = response.status
        answer.location = response.headers.get("Location")
        if response.status in OVERLOAD_STATUSES:
            answer.retry_after = self.retries.get_retry_after(response)
        complete = False
        try:
            cap = SUCCESS_BODY_BYTES if 200 <= response.status < 300 else ERROR_BODY_BYTES
            data = response.read(cap + 1)
            complete = len(data) <= cap
            answer.text = " ".join(data[:cap].decode("utf-8", "replace").split())
        except (self.http_error, OSError):
            pass  # the status line arrived: it is the answer
        finally:
            expired = self.watch.end()
            complete = complete and not expired  # a cut read can end without an error
            if not complete:
                # A body too long, or cut: never read the rest, drop the connection.
                response.close()
            response.release_conn()
        answer.timed_out = expired
        if expired and not complete:
            answer.text = f"(its body did not arrive within {self.watch.seconds:g} s)"
        retried = bool(response.retries and response.retries.history)
        answer.latency = None if retried else time.monotonic() - started
        return answer

    def _describe(self, exc: BaseException, expired: bool) -> str:
        """One line for an exchange without an answer: timeout, TLS, or unreachable."""
        import ssl

        import urllib3

        if expired:
            return f"no complete answer within {self.watch.seconds:g} s"
        chain = _cause_chain(exc)

        def caused_by(kind: Any) -> bool:
            return any(isinstance(e, kind) for e in chain)

        if caused_by(urllib3.exceptions.ReadTimeoutError):
            return f"no answer within {self.settings.read_timeout_seconds:g} s"
        # urllib3 makes NewConnectionError (refused, no route) a ConnectTimeoutError.
        if caused_by(urllib3.exceptions.ConnectTimeoutError) and not caused_by(
            urllib3.exceptions.NewConnectionError
        ):
            return f"no connection within {self.settings.connect_timeout_seconds:g} s"
        if caused_by((urllib3.exceptions.SSLError, ssl.SSLError)):
            return redact(f"TLS error: {_reason(chain)}")
        return redact(f"cannot reach the service: {_reason(chain)}")


def _answer_line(answer: Answer) -> str:
    """'HTTP 422: {"error": ...}', for last_error and the log."""
    line = f"HTTP {answer.status}"
    if answer.status is not None and 300 <= answer.status < 400:
        line += f" (a redirect to {_safe_url(answer.location or '(no Location)')})"
    text = answer.text[:ERROR_TEXT_CHARS]
    return f"{line}: {text}" if text else line
