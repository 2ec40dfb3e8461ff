"""The one HTTP layer: deadlines, bounded bodies, proxies, safe URLs."""

from __future__ import annotations

import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .logs import hide_secrets

if TYPE_CHECKING:
    from .config import Settings

# --------------------------------------------------------------------------
# Delivery: sending, pacing, retries, answers
#
# Sender makes one exchange with the service, with a deadline on the whole
# of it; SendPool runs the exchanges on worker threads, as many at once as
# ConcurrencyLimit allows; StudyFates decides what each answer means for its
# study (sent, refused, to be tried again now or at a later run) and for the
# run (go on, or stop); Delivery and deliver() tie them together for one
# run, with studies_to_send() deciding what goes and in which order.
# --------------------------------------------------------------------------

# Retry-After can ask for hours; a cron tick should give up sooner.
MAX_RETRY_AFTER_SECONDS = 30
# "Too many requests" and "overloaded": with Retry-After, they pause every
# request and lower the concurrency limit.
OVERLOAD_STATUSES = (429, 503)
ERROR_TEXT_CHARS = 200  # how much of a refusal's body is kept in last_error
ERROR_BODY_BYTES = 4096  # read of an error's body; the rest is never read
SUCCESS_BODY_BYTES = 65536  # read of a 2xx body (unused), to keep the connection
DEADLINE_CHECK_SECONDS = 0.1


# The DeadlineWatch of the request running on each thread, for the
# connections that urllib3 opens on it.
_THREAD_WATCH = threading.local()


class DeadlineWatch:
    """Ends any request still running at its deadline (connect + read
    timeouts), by shutting its socket down. urllib3's timeouts bound each
    wait for a byte, not the exchange: a service that trickles its answer a
    byte at a time would hold a worker, and the run, as long as it liked.

    Each thread writes only its own entry (deadline, connections, expired),
    and the watching thread reads a copy: under the interpreter lock that
    needs no lock of its own, which 64 senders would queue on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # thread id -> [deadline, connections, expired (ever), shut (this attempt)]
        self.running: dict[int, list[Any]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="deadlines", daemon=True)
        self.thread.start()

    def begin(self) -> None:
        """A request starts on this thread."""
        _THREAD_WATCH.value = self
        self.running[threading.get_ident()] = [time.monotonic() + self.seconds, (), False, False]

    def attempt(self, connection: Any) -> None:
        """urllib3 starts an attempt on `connection` (its first, or a retry):
        each attempt has the whole deadline."""
        entry = self.running.get(threading.get_ident())
        if entry is not None:
            entry[0], entry[1], entry[3] = time.monotonic() + self.seconds, (connection,), False

    def end(self) -> bool:
        """The request is over; True if its deadline passed meanwhile."""
        entry = self.running.pop(threading.get_ident(), None)
        return entry is not None and entry[2]

    def close(self) -> None:
        self.stopping.set()

    def _watch(self) -> None:
        while not self.stopping.wait(DEADLINE_CHECK_SECONDS):
            now = time.monotonic()
            for entry in list(self.running.values()):
                if entry[0] <= now and not entry[3]:
                    entry[2] = entry[3] = True
                    for connection in entry[1]:
                        _shut_down(connection)


def _shut_down(connection: Any) -> None:
    """Ends a connection's exchange from another thread: the waiting read
    returns at once, and urllib3 treats the connection as lost."""
    import socket

    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


_URLLIB3_CLASSES: dict[str, Any] = {}


def _urllib3_classes() -> dict[str, Any]:
    """urllib3's pools, with connections that tell the thread's DeadlineWatch
    of every attempt they start, and its Retry with jitter and a bounded
    Retry-After. Made on first use: urllib3 is imported only by a run that
    sends something (a tick with nothing to send never pays for it)."""
    if _URLLIB3_CLASSES:
        return _URLLIB3_CLASSES
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import InvalidHeader
    from urllib3.util.retry import Retry

    def watched(base: type) -> type:
        class Watched(base):  # type: ignore[misc, valid-type]
            def connect(self, *args: Any, **kwargs: Any) -> Any:
                _tell_watch(self)
                return super().connect(*args, **kwargs)

            def request(self, *args: Any, **kwargs: Any) -> Any:
                _tell_watch(self)
                return super().request(*args, **kwargs)

        return Watched

    class WatchedHTTPPool(HTTPConnectionPool):
        ConnectionCls = watched(HTTPConnection)

    class WatchedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = watched(HTTPSConnection)

    class BoundedRetry(Retry):
        """Jitter keeps several clients from retrying in lockstep; the cap
        keeps a cron tick from sleeping for hours on a Retry-After."""

        def get_backoff_time(self) -> float:
            return super().get_backoff_time() * random.uniform(0.5, 1.5)

        def get_retry_after(self, response: Any) -> float | None:
            try:
                seconds = super().get_retry_after(response)
            except InvalidHeader:  # "Retry-After: soon": as if absent
                return None
            return None if seconds is None else min(seconds, MAX_RETRY_AFTER_SECONDS)

    _URLLIB3_CLASSES.update(
        pools={"http": WatchedHTTPPool, "https": WatchedHTTPSPool}, retry=BoundedRetry
    )
    return _URLLIB3_CLASSES


def _tell_watch(connection: Any) -> None:
    watch = getattr(_THREAD_WATCH, "value", None)
    if watch is not None:
        watch.attempt(connection)


def _transport_retries(settings: Settings) -> Any:
    """urllib3's Retry for what never got an answer (refused or lost
    connections, timeouts), with exponential backoff. Answers, 5xx included,
    come back at once: what they mean is StudyFates' business, and a study
    retried later does not keep a worker asleep."""
    retry = _urllib3_classes()["retry"]
    options: dict[str, Any] = {
        "total": settings.max_retries,
        "connect": settings.max_retries,
        "read": settings.max_retries,
        "status": 0,
        "other": 0,
        "redirect": 0,
        "backoff_factor": settings.backoff_seconds,
        "respect_retry_after_header": False,
        "raise_on_status": False,
        "raise_on_redirect": False,
    }
    methods = frozenset({"POST", "DELETE", "GET"})
    try:
        return retry(allowed_methods=methods, **options)
    except TypeError:  # urllib3 < 1.26: method_whitelist, and no `other`
        del options["other"]
        return retry(method_whitelist=methods, **options)


@dataclass
class Answer:
    """What one exchange with the service gave."""

    status: int | None = None  # None: no complete HTTP answer
    text: str = ""  # the start of the body, on one line
    location: str | None = None  # a redirect's
    retry_after: float | None = None
    latency: float | None = None  # one round trip; None if urllib3 retried it
    error: str | None = None  # why there is no answer
    timed_out: bool = False


def _default_ca_bundle() -> str:
    """certifi's bundle, which is what requests uses."""
    import certifi

    return certifi.where()


def _environment_proxy(url: str) -> tuple[str, dict[str, str]] | None:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY, read as requests reads them and
    taken as curl takes them: "host:port" without a scheme is an HTTP proxy,
    and user:password in it is sent as Proxy-Authorization (and hidden from
    every log line). requests itself (5 MB of memory: measured) is imported
    only when one of them is set, which on most PACS servers none is."""
    if not any(name.lower().endswith("_proxy") and value for name, value in os.environ.items()):
        return None
    import urllib3
    from requests.utils import get_auth_from_url, get_environ_proxies, select_proxy

    proxy = select_proxy(url, get_environ_proxies(url))
    if not proxy:
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    user, password = get_auth_from_url(proxy)
    parts = urllib.parse.urlsplit(proxy)
    headers: dict[str, str] = {}
    if user or password:
        hide_secrets(password, parts.password)
        headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        netloc += f":{parts.port}" if parts.port else ""
        proxy = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return proxy, headers


def _caused_by(exc: BaseException, kind: Any) -> bool:
    return any(isinstance(e, kind) for e in _cause_chain(exc))


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """exc, then what caused it (urllib3 keeps it in .reason), innermost last."""
    chain = [exc]
    while len(chain) < 10:
        inner = chain[-1]
        nxt = getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if not isinstance(nxt, BaseException) or nxt in chain:
            break
        chain.append(nxt)
    # requests and urllib3 also wrap causes in their args.
    for arg in chain[-1].args if chain[-1].args else exc.args:
        if isinstance(arg, BaseException) and arg not in chain:
            chain.extend(_cause_chain(arg))
            break
    return chain


def _reason(chain: list[BaseException]) -> str:
    """The innermost cause, short enough for one line."""
    inner = chain[-1]
    text = str(inner)
    if text.startswith("<") and "]: " in text:  # "<urllib3.connection...>: Failed to ..."
        text = text.split("]: ", 1)[1]
    elif text.startswith("<") and ">: " in text:
        text = text.split(">: ", 1)[1]
    return text.strip()[:ERROR_TEXT_CHARS] or type(inner).__name__


def _safe_url(url: str) -> str:
    """The URL without any query string, which might hold a token."""
    return url.split("?", 1)[0]
