"""Exit codes and the errors that end a run with one of them."""

from __future__ import annotations

from pathlib import Path

# Exit codes, documented in the README ("Códigos de salida") and in --help
# (EXIT_CODE_HELP, tested against the README).
EXIT_OK = 0
EXIT_INTERNAL = 1  # an unexpected error (a bug): one line; -v shows the traceback
EXIT_USAGE = 2  # argparse's own
EXIT_CONFIG = 3  # a configuration file is missing or wrong
EXIT_DATABASE = 4  # the database is unreachable, refused us, or is not installed
EXIT_DELIVERY = 5  # the service is down or failing: studies left pending
EXIT_REJECTED = 6  # the service refused studies (4xx)
EXIT_KEY_REFUSED = 7  # the service refused the API key
EXIT_LOCKED = 8  # another run holds the lock on this database
EXIT_NO_PYTHON = 9  # this Python lacks the packages (extras/dicom_indexer.sh: or is too old)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143  # SIGTERM (systemd stop, kill): what was acknowledged is recorded

EXIT_CODE_HELP = (
    (EXIT_OK, "everything pending was delivered"),
    (EXIT_INTERNAL, "internal error (a bug): one line, -v for the traceback; nothing is lost"),
    (EXIT_USAGE, "wrong command line"),
    (EXIT_CONFIG, "configuration: a file or field is missing or wrong"),
    (EXIT_DATABASE, "the PACS (its database, Orthanc, DICOMweb or DIMSE): unreachable,"
     " refused us, or indexer not installed"),
    (EXIT_DELIVERY, "delivery failed: the service is down or failing; studies stay pending"),
    (EXIT_REJECTED, "the service refused studies (4xx): marked failed, or pending if it"
     " refused every one"),
    (EXIT_KEY_REFUSED, "the service refused the API key (401, or 403 for every study)"),
    (EXIT_LOCKED, "another run is working on the same database"),
    (EXIT_NO_PYTHON, "this Python lacks PyMySQL or requests (or, from cron, is too old)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C); what was acknowledged is recorded"),
    (EXIT_TERMINATED, "terminated (SIGTERM); what was acknowledged is recorded"),
)  # fmt: skip


class IndexerError(Exception):
    """An expected failure, reported as one line with its exit code."""

    exit_code = EXIT_INTERNAL


class ConfigError(IndexerError):
    """A configuration file is missing, unreadable, or has a wrong field."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # 'database.name', 'key', ...: None for the whole file


class DatabaseError(IndexerError):
    """The database is unreachable, refused the login, or lacks the indexer."""

    exit_code = EXIT_DATABASE


class LockedError(IndexerError):
    """Another run is working on the same database."""

    exit_code = EXIT_LOCKED


def internal_error_line(exc: BaseException) -> str:
    """One line for an error nobody expected: its kind and where it came
    from, never its text (which may hold patient data)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return (
        f"internal error: {type(exc).__name__}{where}; what was acknowledged is recorded;"
        " run again with -v for the traceback and report it"
    )
