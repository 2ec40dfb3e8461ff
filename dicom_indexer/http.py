"""The one HTTP layer, for every peer (the central service's Sender, the
Orthanc source): HttpClient, with a deadline on each whole exchange, bodies
read up to a bound, no redirect followed, credentials in a header, safe URLs
in messages, proxies as curl takes them, and the run stopped when a peer
stalls or SIGTERM comes."""

from __future__ import annotations

import base64
import contextvars
import functools
import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, IndexerError
from .logs import Secrets

if TYPE_CHECKING:
    pass

# --------------------------------------------------------------------------
# HTTP: one client per peer (HttpClient). The Sender (service.py) and
# OrthancClient (sources/orthanc.py) are thin layers on it that say what an
# answer means to them; what bounds an exchange, in time and in memory, and
# what ends a run against a stalled peer, is here, once.
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
READ_CHUNK_BYTES = 65536  # a body is read this much at a time
# Answers past this size are read one at a time by a client made with
# one_large_body_at_a_time (Orthanc's: its fetch threads read at once).
LARGE_BODY_BYTES = 1024 * 1024
# This many deadlines expired in a row, no answer between them, and the peer
# is taken to trickle or stay silent: the run stops, rather than give every
# study its deadline (3 studies retried for 10 minutes, measured).
STALLED_DEADLINES = 3


# The DeadlineWatch of the request running on each thread, for the
# connections that urllib3 opens on it.
_THREAD_WATCH = threading.local()

# The run's SIGTERM flag, while cli lets a command end gracefully on it: every
# client made meanwhile watches it (a context variable, set and reset by
# cli's _sigterm_requests, so that nothing outlives the command).
TERMINATION: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "termination", default=None
)

# Entry of DeadlineWatch.running, one per thread with a request under way.
_DEADLINE, _CONNECTIONS, _EXPIRED, _SHUT, _TERMINATED = range(5)


class DeadlineWatch:
    """Ends any request still running at its deadline (connect + read
    timeouts), by shutting its socket down. urllib3's timeouts bound each
    wait for a byte, not the exchange: a peer that trickles its answer a
    byte at a time would hold a thread, and the run, as long as it liked.

    It also ends them after SIGTERM (`termination`, once `grace` seconds have
    passed): a thread blocked on a socket never sees the run's stop flag.

    Each thread writes only its own entry (deadline, connections, expired,
    shut, terminated), and the watching thread reads a copy: under the
    interpreter lock that needs no lock of its own, which 64 senders would
    queue on."""

    def __init__(
        self,
        seconds: float,
        termination: threading.Event | None = None,
        grace: float = 0.0,
        per_attempt: bool = True,
    ) -> None:
        self.seconds = seconds
        self.termination = termination
        self.grace = grace
        # True: each attempt urllib3 makes (a retry) has the whole deadline;
        # False: the deadline bounds the request, retries included.
        self.per_attempt = per_attempt
        self.terminated_at: float | None = None
        self.running: dict[int, list[Any]] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="deadlines", daemon=True)
        self.thread.start()

    def begin(self) -> None:
        """A request starts on this thread."""
        _THREAD_WATCH.value = self
        self.running[threading.get_ident()] = [
            time.monotonic() + self.seconds, (), False, False, False
        ]  # fmt: skip

    def attempt(self, connection: Any) -> None:
        """urllib3 starts an attempt on `connection` (its first, or a retry)."""
        entry = self.running.get(threading.get_ident())
        if entry is not None:
            if self.per_attempt:
                entry[_DEADLINE] = time.monotonic() + self.seconds
            entry[_CONNECTIONS], entry[_SHUT] = (connection,), False

    def over(self) -> bool:
        """Whether this thread's request was ended (deadline, or SIGTERM)."""
        entry = self.running.get(threading.get_ident())
        return entry is not None and (entry[_EXPIRED] or entry[_TERMINATED])

    def end(self) -> tuple[bool, bool]:
        """The request is over: whether its deadline passed meanwhile, and
        whether SIGTERM ended it."""
        entry = self.running.pop(threading.get_ident(), None)
        if entry is None:
            return False, False
        return entry[_EXPIRED] and not entry[_TERMINATED], entry[_TERMINATED]

    def terminating(self) -> bool:
        """SIGTERM came and its grace is over: no request may start."""
        if self.termination is None or not self.termination.is_set():
            return False
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()
        return time.monotonic() - self.terminated_at >= self.grace

    def close(self) -> None:
        self.stopping.set()

    def _watch(self) -> None:
        while not self.stopping.wait(DEADLINE_CHECK_SECONDS):
            now = time.monotonic()
            terminating = self.terminating()
            for entry in list(self.running.values()):
                if entry[_SHUT]:
                    continue
                if terminating:
                    entry[_TERMINATED] = True
                elif entry[_DEADLINE] <= now:
                    entry[_EXPIRED] = True
                else:
                    continue
                entry[_SHUT] = True
                for connection in entry[_CONNECTIONS]:
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


@functools.lru_cache(maxsize=None)
def _urllib3_classes() -> dict[str, Any]:
    """urllib3's pools, with connections that tell the thread's DeadlineWatch
    of every attempt they start, and its Retry with jitter and a bounded
    Retry-After. Made on first use (and once: the classes never change):
    urllib3 is imported only by a run that sends something (a tick with
    nothing to send never pays for it)."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import InvalidHeader
    from urllib3.util.retry import Retry

    def watched(base: type) -> type:
        class Watched(base):
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

    return {"pools": {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}, "retry": BoundedRetry}


def _tell_watch(connection: Any) -> None:
    watch = getattr(_THREAD_WATCH, "value", None)
    if watch is not None:
        watch.attempt(connection)


def _transport_retries(max_retries: int, backoff_seconds: float) -> Any:
    """urllib3's Retry for what never got an answer (refused or lost
    connections, timeouts), with exponential backoff. Answers, 5xx included,
    come back at once: what they mean is StudyFates' business, and a study
    retried later does not keep a worker asleep."""
    retry = _urllib3_classes()["retry"]
    options: dict[str, Any] = {
        "total": max_retries,
        "connect": max_retries,
        "read": max_retries,
        "status": 0,
        "other": 0,
        "redirect": 0,
        "backoff_factor": backoff_seconds,
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
    """What one exchange with a peer gave."""

    status: int | None = None  # None: no complete HTTP answer
    text: str = ""  # the start of the body, on one line (the sender's)
    data: bytes | bytearray = b""  # the body, up to its bound (its start, if too large)
    complete: bool = False  # the whole body arrived, within its bound and deadline
    too_large: bool = False  # the body grew past its bound: never read further
    location: str | None = None  # a redirect's
    retry_after: float | None = None
    latency: float | None = None  # one round trip; None if urllib3 retried it
    error: str | None = None  # why there is no answer
    timed_out: bool = False
    terminated: bool = False  # SIGTERM ended it, or it never started because of it
    stalled: str | None = None  # the peer stalls: the line the run stops with
    headers: dict[str, str] = field(default_factory=dict)  # names as title case ("Warning")


def _default_ca_bundle() -> str:
    """certifi's bundle, which is what requests uses."""
    import certifi

    return certifi.where()


def _environment_proxy(url: str, secrets: Secrets) -> tuple[str, dict[str, str]] | None:
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
        secrets.add(password, parts.password)
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


def _url_parts(url: str) -> tuple[str, str, str, str]:
    """(scheme, userinfo, host[:port], the rest) of an absolute URL; the
    authority ends at the first '/', '?' or '#' (RFC 3986)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, _, host = rest[:end].rpartition("@")
    return scheme, userinfo, host, rest[end:]


def safe_url(url: str) -> str:
    """A URL as it may be printed: without user and password (which go in a
    header, see split_credentials) and without any query string or fragment,
    which might hold a token. Every URL a message shows goes through here."""
    scheme, _, host, rest = _url_parts(url)
    path = rest.split("?", 1)[0].split("#", 1)[0]
    return f"{scheme}://{host}{path}" if scheme else path


_safe_url = safe_url  # the name the delivery code imports


def split_credentials(url: str) -> tuple[str, str, str]:
    """`http://user:password@host:port/path` -> the URL without them, the
    user and the password (percent-decoded, as curl reads them)."""
    scheme, userinfo, host, rest = _url_parts(url)
    if not scheme or not userinfo:
        return url, "", ""
    user, _, password = userinfo.partition(":")
    return f"{scheme}://{host}{rest}", urllib.parse.unquote(user), urllib.parse.unquote(password)


def credential_problem(value: str) -> str | None:
    """Why `value` (a user or password) cannot travel in HTTP Basic
    authentication, without showing it: the header carries Latin-1 only."""
    for position, char in enumerate(value, 1):
        if ord(char) > 255:
            return (
                f"character {position} of {len(value)} is not Latin-1, which HTTP Basic"
                " authentication cannot carry"
            )
    return None


def get_retries(times: int) -> Any:
    """urllib3's retries for GETs (safe to repeat) to a PACS: a connection
    its server had closed, or a read that failed, tried again `times` times;
    never a status, never a redirect (reported, not followed). The deadline
    bounds a GET as a whole, its retries included."""
    return _urllib3_classes()["retry"](
        total=times,
        connect=times,
        read=times,
        status=0,
        redirect=0,
        backoff_factor=0.1,
        raise_on_redirect=False,
        raise_on_status=False,
    )


def basic_authorization(user: str, password: str, secrets: Secrets) -> str:
    """The Authorization header's value; the password and the token join
    `secrets`, hidden from every line from now on."""
    problem = credential_problem(user) or credential_problem(password)
    if problem:  # config.py refuses them at load: this is the last guard
        raise ConfigError(f"credentials for an HTTP peer cannot be sent: {problem}")
    token = base64.b64encode(f"{user}:{password}".encode("latin-1")).decode("ascii")
    secrets.add(password, token)
    return f"Basic {token}"


class RunEnding(IndexerError):
    """Not one request's trouble, nor one study's, but the run's: the peer
    stalls (STALLED_DEADLINES deadlines in a row), or SIGTERM came. Whatever
    reads one study at a time must let it through: it ends the run with its
    one line and exit code, and every study not recorded stays pending."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class HttpClient:
    """The one HTTP client, for every peer (the central service, Orthanc):
    keep-alive connections over urllib3, and every exchange bounded.

    - A deadline on the whole exchange (connect, head and body): a
      DeadlineWatch shuts the socket of a request still running at it,
      however slowly its peer trickles.
    - Bodies read a chunk at a time up to a bound, success and error alike:
      an answer past it is never read further nor buffered
      (Answer.too_large), and its connection is dropped. With
      `one_large_body_at_a_time`, answers past LARGE_BODY_BYTES are read one
      at a time, so that threads reading at once hold one large body, not
      one each.
    - Redirects are never followed (a Location is reported, not visited):
      credentials never reach another origin.
    - Credentials written in the URL move to an Authorization header and
      become secrets; `where` is the URL as messages show it (safe_url).
    - STALLED_DEADLINES expired deadlines in a row, no answer between them:
      `stalled` holds the line the run stops with (each peer stops its run
      its own way, with its own exit code).
    - SIGTERM (TERMINATION, set by cli): after `termination_grace` seconds,
      requests under way are ended and none starts.
    """

    def __init__(
        self,
        url: str,
        *,
        peer: str,
        connect_timeout: float,
        read_timeout: float,
        retries: Any,
        max_connections: int,
        ca_bundle: str | None = None,
        headers: dict[str, str] | None = None,
        user: str = "",
        password: str = "",
        error_prefix: str = "",
        termination_grace: float = 0.0,
        environment_proxy: bool = True,
        deadline_per_attempt: bool = True,
        one_large_body_at_a_time: bool = False,
        secrets: Secrets | None = None,
    ) -> None:
        import urllib3

        self.secrets = secrets if secrets is not None else Secrets()
        self.url, url_user, url_password = split_credentials(url)
        self.where = safe_url(self.url)
        self.peer = peer  # "the service", "Orthanc at http://...": for "cannot reach ..."
        self.error_prefix = error_prefix  # before the other lines of _describe
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.headers = dict(headers or {})
        user, password = user or url_user, password or url_password
        if user or password:
            self.headers["Authorization"] = basic_authorization(user, password, self.secrets)
        self.watch = DeadlineWatch(
            connect_timeout + read_timeout,
            termination=TERMINATION.get(),
            grace=termination_grace,
            per_attempt=deadline_per_attempt,
        )
        self.large_body = threading.Semaphore(1) if one_large_body_at_a_time else None
        self.lock = threading.Lock()
        self.stalls = 0  # expired deadlines in a row
        self.stalled: str | None = None
        options: dict[str, Any] = {
            "num_pools": 1,
            "maxsize": max_connections,
            "block": True,
            "retries": retries,
            "timeout": urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        }
        if self.url.startswith("https://"):
            options["cert_reqs"] = "CERT_REQUIRED"
            options["ca_certs"] = ca_bundle or _default_ca_bundle()
        proxy = _environment_proxy(self.url, self.secrets) if environment_proxy else None
        self.pool: urllib3.PoolManager  # a ProxyManager is one
        if proxy is not None:
            proxy_url, proxy_headers = proxy
            self.pool = urllib3.ProxyManager(proxy_url, proxy_headers=proxy_headers, **options)
        else:
            self.pool = urllib3.PoolManager(**options)
        self.pool.pool_classes_by_scheme = _urllib3_classes()["pools"]
        self.http_error = urllib3.exceptions.HTTPError
        self.read_timeout_error = urllib3.exceptions.ReadTimeoutError

    @property
    def deadline_seconds(self) -> float:
        return self.watch.seconds

    def close(self) -> None:
        self.watch.close()
        self.pool.clear()

    def exchange(
        self,
        method: str,
        path: str = "",
        body: bytes | None = None,
        *,
        bound: int,
        error_bound: int | None = None,
    ) -> Answer:
        """One request to the client's URL (+ `path`); never raises for
        network trouble. The body is read up to `bound` bytes (a 2xx's;
        `error_bound`, if given, another status's)."""
        answer = Answer()
        if self.watch.terminating():
            answer.terminated = True
            answer.error = "not sent: terminated (SIGTERM)"
            return answer
        self.watch.begin()
        started = time.monotonic()
        try:
            response = self.pool.urlopen(
                method,
                self.url + path,
                body=body,
                headers=self.headers,
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
        except self.http_error as exc:
            expired, answer.terminated = self.watch.end()
            answer.timed_out = not answer.terminated and (
                expired or _caused_by(exc, self.read_timeout_error)
            )
            answer.error = self._describe(exc, expired, answer.terminated)
            self._count(answer)
            return answer
        answer.status = response.status
        answer.headers = {str(k).title(): str(v) for k, v in response.headers.items()}
        answer.location = response.headers.get("Location")
        if response.status in OVERLOAD_STATUSES:
            answer.retry_after = self.retries.get_retry_after(response)
        cap = bound if 200 <= response.status < 300 or error_bound is None else error_bound
        complete = False
        try:
            answer.data, complete, answer.too_large = self._read_body(response, cap)
        finally:
            expired, answer.terminated = self.watch.end()
            # A cut read can end without an error: the watch knows.
            complete = complete and not expired and not answer.terminated
            if not complete:
                # Too long, or cut: never read the rest; drop the connection.
                response.close()
            response.release_conn()
        answer.complete = complete
        answer.timed_out = expired
        retried = bool(response.retries and response.retries.history)
        answer.latency = None if retried else time.monotonic() - started
        self._count(answer)
        return answer

    def _read_body(self, response: Any, cap: int) -> tuple[bytes | bytearray, bool, bool]:
        """The body, a chunk at a time, never more than `cap` + one chunk:
        (data, whole, too large). Past the cap, only its start is kept."""
        declared = response.headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > cap:
            # Said too large before a byte of it is read: its start only.
            return _read_quietly(response, min(cap, SUCCESS_BODY_BYTES)), False, True
        # One buffer, grown in place: once large, the C library maps it on
        # its own and gives it back to the system when dropped. (A list of
        # chunks would stay in each thread's malloc arena after use: 8 fetch
        # threads refusing one 64 MB answer each kept 500 MB, measured.)
        data = bytearray()
        holding_gate = False
        try:
            while True:
                try:
                    chunk = response.read(min(READ_CHUNK_BYTES, cap + 1 - len(data)))
                except (self.http_error, OSError, ValueError):
                    return bytes(data), False, False  # the status line is the answer
                if not chunk:
                    return data, True, False  # (no copy of a large body)
                data += chunk
                del chunk
                if len(data) > cap:
                    return bytes(data[: min(cap, SUCCESS_BODY_BYTES)]), False, True
                gate = self.large_body
                if gate is not None and not holding_gate and len(data) > LARGE_BODY_BYTES:
                    holding_gate = self._wait_for_gate(gate)
                    if not holding_gate:
                        return b"", False, False  # its deadline, or SIGTERM
        finally:
            if holding_gate and self.large_body is not None:
                self.large_body.release()

    def _wait_for_gate(self, gate: threading.Semaphore) -> bool:
        while not gate.acquire(timeout=DEADLINE_CHECK_SECONDS):
            if self.watch.over():
                return False
        return True

    def _count(self, answer: Answer) -> None:
        """Counts deadlines expired in a row; an answer in time resets it."""
        with self.lock:
            if answer.timed_out:
                self.stalls += 1
            elif answer.status is not None and not answer.terminated:
                self.stalls = 0
            if self.stalls >= STALLED_DEADLINES and self.stalled is None:
                self.stalled = (
                    f"{self.peer} gave no complete answer within {self.deadline_seconds:g} s"
                    f" to {self.stalls} requests in a row, none answered between them: it"
                    " trickles its answers or stays silent; what was not recorded stays"
                    " pending"
                )
            if answer.timed_out and self.stalled is not None:
                answer.stalled = self.stalled

    def _describe(self, exc: BaseException, expired: bool, terminated: bool) -> str:
        """One line for an exchange without an answer: SIGTERM, a timeout,
        TLS, or unreachable."""
        import ssl

        import urllib3

        prefix = self.error_prefix
        if terminated:
            return f"{prefix}terminated (SIGTERM) before the answer arrived"
        if expired:
            return f"{prefix}no complete answer within {self.deadline_seconds:g} s"
        chain = _cause_chain(exc)

        def caused_by(kind: Any) -> bool:
            return any(isinstance(e, kind) for e in chain)

        if caused_by(urllib3.exceptions.ReadTimeoutError):
            return f"{prefix}no answer within {self.read_timeout:g} s"
        # urllib3 makes NewConnectionError (refused, no route) a ConnectTimeoutError.
        if caused_by(urllib3.exceptions.ConnectTimeoutError) and not caused_by(
            urllib3.exceptions.NewConnectionError
        ):
            return f"{prefix}no connection within {self.connect_timeout:g} s"
        if caused_by((urllib3.exceptions.SSLError, ssl.SSLError)):
            return self.secrets.redact(f"{prefix}TLS error: {_reason(chain)}")
        return self.secrets.redact(f"cannot reach {self.peer}: {_reason(chain)}")


def _read_quietly(response: Any, amount: int) -> bytes:
    try:
        return bytes(response.read(amount))
    except Exception:  # a cut connection: what came is enough
        return b""
