"""Logging, and secrets kept out of every line."""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import urllib.parse
from pathlib import Path
from typing import Any

log = logging.getLogger("dicom_indexer")

LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
SHORT_SECRET_CHARS = 6


class Secrets:
    """One run's secrets: the API key, the passwords, and what is made of
    them on the way (a Basic token, a proxy's password). None of them appears
    in a log line or a printed message. load_settings() makes it with what
    config.json holds; the HTTP layer adds what it derives. Handed down with
    the settings, never kept in a module: two runs in one process (the tests)
    do not share theirs."""

    def __init__(self, *secrets: str | None) -> None:
        self._values: set[str] = set()
        self.add(*secrets)

    def add(self, *secrets: str | None) -> None:
        """From now on, these never appear in a line this object redacts."""
        self._values.update(secret for secret in secrets if secret)

    def redact(self, text: str) -> str:
        """`text` with every secret blanked out, also as a repr or a URL
        writes it: the last line of defence for text no one wrote for a log
        (a driver's error, a traceback, a service that echoes the key back)."""
        for secret in list(self._values):
            for form in {secret, repr(secret)[1:-1], urllib.parse.quote(secret, safe="")}:
                if len(form) >= SHORT_SECRET_CHARS:
                    text = text.replace(form, "***")
                elif form:
                    # A secret of a few characters (a test's) would blank every
                    # word it is part of: only where it stands alone.
                    text = re.sub(rf"(?<!\w){re.escape(form)}(?!\w)", "***", text)
        return text


class _RedactingFormatter(logging.Formatter):
    """Every line through the run's Secrets (set by use_secrets())."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self.secrets = Secrets()  # none known before the settings are loaded

    def format(self, record: logging.LogRecord) -> str:
        return self.secrets.redact(super().format(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        return self.secrets.redact(super().formatException(ei))


def use_secrets(secrets: Secrets) -> None:
    """From now on, the log's lines go through `secrets`."""
    for handler in log.handlers:
        if isinstance(handler.formatter, _RedactingFormatter):
            handler.formatter.secrets = secrets


class _LogFileHandler(logging.handlers.RotatingFileHandler):
    """log_file, rotated by the logging library. When it cannot be written
    midway (disk full, permissions changed), one warning on stderr instead of
    logging's traceback for every line; the delivery goes on."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        exc = sys.exc_info()[1]
        reason = getattr(exc, "strerror", None) or exc
        log.warning("cannot write log_file %s: %s; logging to it stops", self.baseFilename, reason)


def _add_log_file(path: Path, verbose: bool) -> None:
    """Also log to a file, rotated by the logging library (10 MB x 5)."""
    try:
        handler = _LogFileHandler(
            path, maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8"
        )
    except OSError as exc:
        log.warning("cannot open log_file %s: %s", path, exc.strerror or exc)
        return
    formatter = _RedactingFormatter(LOG_FORMAT)
    formatter.secrets = next(
        (h.formatter.secrets for h in log.handlers if isinstance(h.formatter, _RedactingFormatter)),
        formatter.secrets,
    )
    handler.setFormatter(formatter)
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.addHandler(handler)
    # The file keeps the INFO summary even when -q silences the terminal.
    log.setLevel(min(log.level, handler.level))


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(LOG_FORMAT))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    for old in log.handlers:
        old.close()
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(handler.level)
    # urllib3 warns on every retry; the run's own summary says what matters.
    logging.getLogger("urllib3").setLevel(logging.WARNING if verbose else logging.ERROR)
