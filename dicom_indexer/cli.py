"""The command line: argparse, logging setup, signals, exit codes."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import platform
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import HERE, __version__
from .commands import run_adopt, run_check, run_reconcile, run_send, run_status
from .config import load_settings
from .delivery import print_pending_documents
from .errors import (
    EXIT_CODE_HELP,
    EXIT_CONFIG,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_NO_PYTHON,
    EXIT_OK,
    ConfigError,
    IndexerError,
    LockedError,
    internal_error_line,
)
from .http import TERMINATION
from .logs import _add_log_file, _setup_logging, use_secrets
from .metrics import write_metrics
from .run import RunReport, Stop
from .sources import KNOWN_SOURCES, open_pacs

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("dicom_indexer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="client.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Registers the studies of a PACS with the central indexer. The PACS\n"
        "is read through the source that config.json's section names:\n"
        + "".join(
            f'  "{known.section}": {known.description}\n' for known in KNOWN_SOURCES.values()
        ),
        epilog="exit codes:\n"
        + "".join(f"  {code:<4} {meaning}\n" for code, meaning in EXIT_CODE_HELP),
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=(*SENDING_COMMANDS, "reconcile", "status", "check", "adopt"),
        help=(
            "run (default): enqueue new and changed studies and send what is pending;"
            " initial: send the whole archive (resumable); retry-failed: send the refused"
            " studies again; reconcile: find patient edits, merges and deletions (nightly);"
            " status: what is pending, failed, sent; check: test the setup;"
            " adopt --from OLD/config.json: while a center migrates to a new archive, mark"
            " sent the pending studies that the old archive's indexer already delivered"
        ),
    )
    parser.add_argument(
        "--from",
        dest="adopt_from",
        type=Path,
        metavar="CONFIG",
        help="adopt: the old archive's config.json (its server.json beside it)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=HERE / "config.json",
        help="database, webservice_url, key and settings (default: beside client.py)",
    )
    parser.add_argument(
        "--server",
        type=Path,
        default=HERE / "server.json",
        help='the center\'s code, {"server": "000"} (default: beside client.py)',
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the JSON that would be sent; send and change nothing",
    )
    parser.add_argument(
        "--limit",
        type=int,
        dest="max_studies",
        metavar="N",
        help="send (reconcile: check) at most N studies in this run",
    )
    parser.add_argument("--json", action="store_true", help="status: machine-readable output")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="one line per study")
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="print only errors (for cron)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


# Imported by module name; the README's requirements.txt installs them.
REQUIRED_PACKAGES = {"pymysql": "PyMySQL", "requests": "requests", "urllib3": "urllib3"}


def missing_packages() -> list[str]:
    """The required packages this Python cannot import (found without importing)."""
    import importlib.util

    return [
        name for module, name in REQUIRED_PACKAGES.items() if not importlib.util.find_spec(module)
    ]


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_packages()
    if missing:
        # Before logging is set up: this must reach cron's mail whatever -q says.
        print(
            f"client.py: {', '.join(missing)} not installed for {sys.executable}"
            f" (Python {platform.python_version()}); run: {sys.executable} -m pip install"
            f" -r {HERE / 'requirements.txt'}",
            file=sys.stderr,
        )
        return EXIT_NO_PYTHON
    if args.max_studies is not None and args.max_studies < 1:
        parser.error("--limit must be at least 1")
    if (args.command == "adopt") != (args.adopt_from is not None):
        parser.error("adopt needs --from OLD/config.json, and only adopt takes it")
    _setup_logging(args.verbose, args.quiet)
    try:
        return run_command(args)
    except Exception as exc:  # a bug outside a command (its own handler writes metrics)
        log.debug("internal error", exc_info=True)
        log.error("%s", internal_error_line(exc))
        return EXIT_INTERNAL


def run_command(args: argparse.Namespace) -> int:
    """Loads the settings, runs the command, writes the metrics: main()
    after the command line is parsed and logging set up."""
    try:
        settings = load_settings(args.config, args.server)
    except ConfigError as exc:
        log.error("%s", exc)
        return exc.exit_code
    use_secrets(settings.secrets)
    sending = args.command in SENDING_COMMANDS and not args.dry_run
    if args.command != "check":  # check lists every problem and warning itself
        problems = list(settings.problems)
        key_problem = settings.key_problem() if sending else None
        if key_problem is not None:
            problems.append(key_problem)
        if problems:
            more = len(problems) - 1
            log.error("%s%s", problems[0], f" ({more} more: see client.py check)" if more else "")
            return EXIT_CONFIG
        # Under cron (-q) too: a secret readable by every user of the PACS
        # server, or sent in clear, is worth a mail until it is fixed.
        for warning in settings.warnings:
            log.warning("%s", warning)
    if settings.log_file:
        _add_log_file(settings.log_file, args.verbose)
    report, stop = RunReport(), Stop()
    long_running = sending or args.command == "reconcile"
    if long_running:
        _yield_cpu_to_the_pacs(settings.nice)
    with _sigterm_requests(stop, long_running):
        exit_code = _run_guarded(lambda: COMMANDS[args.command](args, settings, report, stop))
    if exit_code is None:
        return EXIT_LOCKED  # no metrics: the run that holds the lock writes them
    if sending and settings.metrics_file:
        write_metrics(settings.metrics_file, report, exit_code)
    return exit_code


def _run_guarded(command: Callable[[], int]) -> int | None:
    """Runs a command; an expected failure becomes one line and its exit
    code, anything else one line and EXIT_INTERNAL (-v: the traceback).
    None: the run stood aside for another."""
    try:
        return command()
    except LockedError as exc:
        # Standing aside is routine (cron while a long initial runs): INFO,
        # so that -q keeps cron quiet.
        log.info("%s", exc)
        return None
    except IndexerError as exc:
        log.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; what was acknowledged is recorded, the rest stays pending")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for cron, the traceback with -v
        log.debug("internal error", exc_info=True)
        log.error("%s", internal_error_line(exc))
        return EXIT_INTERNAL


class _sigterm_requests:  # noqa: N801 (used as a context manager, like a function)
    """SIGTERM asks `stop` to end the run, for as long as the block runs.
    Python takes signals in the main thread only (tests call main()
    elsewhere): there, or when not wanted, it changes nothing.

    The HTTP layer's clients made in the block watch the same flag
    (TERMINATION): a thread blocked on a socket (an Orthanc read, a request
    to the service) has its exchange ended, at once or after the sending's
    grace, and the run ends within the README's 10 seconds."""

    def __init__(self, stop: Stop, wanted: bool) -> None:
        self.stop = stop
        self.active = wanted and threading.current_thread() is threading.main_thread()
        self.previous: Any = None
        self.token: Any = None

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self.stop.request)
            self.token = TERMINATION.set(self.stop.event)

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            TERMINATION.reset(self.token)
            signal.signal(signal.SIGTERM, self.previous)


def _yield_cpu_to_the_pacs(nice: int) -> None:
    """On the PACS server, the PACS and its database come first: when the
    CPU is short, the scheduler serves them before the indexer."""
    if hasattr(os, "nice"):
        current = os.nice(0)
        if current < nice:
            os.nice(nice - current)


def run_dry(settings: Settings, max_studies: int | None) -> int:
    """--dry-run: the documents the pending studies would be sent as."""
    pacs = open_pacs(settings)
    try:
        print_pending_documents(pacs, settings, sys.stdout, max_studies)
    except pacs.Error as exc:
        raise pacs.explain(exc) from None
    finally:
        pacs.close()
    return EXIT_OK


SENDING_COMMANDS = ("run", "initial", "retry-failed")
# What each command runs: (args, settings, report, stop) -> exit code.
COMMANDS: dict[str, Callable[[argparse.Namespace, Settings, RunReport, Stop], int]] = {
    "status": lambda args, settings, report, stop: run_status(settings, args.json),
    "check": lambda args, settings, report, stop: run_check(settings),
    "reconcile": lambda args, settings, report, stop: run_reconcile(
        settings, args.max_studies, stop
    ),
    "adopt": lambda args, settings, report, stop: run_adopt(settings, args.adopt_from),
    **{
        name: lambda args, settings, report, stop: (
            run_dry(settings, args.max_studies)
            if args.dry_run
            else run_send(settings, args.command, args.max_studies, report, stop)
        )
        for name in SENDING_COMMANDS
    },
}
