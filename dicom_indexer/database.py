"""One connection through an engine: what the queue and a dcm4chee source
run their statements on."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from .engines import DEADLOCK_RETRIES, statement_label
from .errors import DatabaseError
from .study_service import StudyServiceQueue

if TYPE_CHECKING:
    from .config import Settings

log = logging.getLogger("dicom_indexer")


class Database:
    """One connection through an engine: what the queue (and a dcm4chee
    source) run their statements on."""

    install_script = grant_script = ""  # set where a script installs the queue

    def __init__(self, settings: Settings, engine: Any, where: str) -> None:
        self.settings = settings
        self.where = where
        self.engine = engine
        self.Error = self.engine.Error
        self.statement = ""  # the last one run: named when it fails
        try:
            self.engine.connect()
        except self.Error as exc:
            raise DatabaseError(
                f"cannot connect to {self.where}: {self.engine.describe(exc)}"
            ) from None
        except DatabaseError as exc:
            raise DatabaseError(f"cannot connect to {self.where}: {exc}") from None
        self.queue = StudyServiceQueue(self)

    def query(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        """Runs one statement (autocommit, or inside begin()); rows as dicts."""
        self.statement = sql
        return self.engine.query(sql, args)

    def rowcount(self, sql: str, args: Any = None) -> int:
        self.statement = sql
        return self.engine.rowcount(sql, args)

    def execute_batch(self, sql: str, rows: list[tuple]) -> None:
        if rows:
            self.statement = sql
            self.engine.execute_batch(sql, rows)

    def try_lock(self, name: str) -> bool:
        # The SQLite queue locks a file, with no statement to name.
        self.statement = getattr(self.engine, "TRY_LOCK", "")
        return self.engine.try_lock(name)

    def unlock(self, name: str) -> None:
        self.statement = getattr(self.engine, "UNLOCK", "")
        self.engine.unlock(name)

    def begin(self) -> None:
        self.engine.begin()

    def commit(self) -> None:
        self.engine.commit()

    def rollback(self) -> None:
        self.engine.rollback()

    def in_transaction(self, work: Callable[[], Any]) -> None:
        """Runs work() in one transaction, again (DEADLOCK_RETRIES times at
        most) if the server chose it as a deadlock victim or a lock wait ran
        out: the initial load and the acknowledgements write rows that a PACS
        transaction, or the other, may hold. The server rolled the victim
        back, so all of work() runs again; it holds nothing but its writes."""
        for attempt in range(DEADLOCK_RETRIES + 1):
            self.begin()
            try:
                work()
                self.commit()
                return
            except self.Error as exc:
                self.rollback()
                if not self.engine.is_conflict(exc) or attempt == DEADLOCK_RETRIES:
                    raise
                log.info(
                    "%s, in %s: its transaction runs again (%d of %d)",
                    self.describe(exc),
                    statement_label(self.statement),
                    attempt + 1,
                    DEADLOCK_RETRIES,
                )
                time.sleep(0.1 * (attempt + 1))

    def describe(self, exc: BaseException) -> str:
        """One line for a driver error; it never holds the password."""
        return self.engine.describe(exc)

    def close(self) -> None:
        try:
            self.engine.close()
        except Exception:  # closing a dead connection: nothing left to do
            pass

    @property
    def install_fix(self) -> str:
        return f"run: {self.install_script.replace('DBNAME', self.settings.db_name)}"

    def explain(self, exc: BaseException) -> DatabaseError:
        """One line for a database error met mid-run, naming the statement
        that met it (a lock wait names what waited). A missing table, column
        or procedure raises check_installed()'s error, which names the fix;
        a missing privilege points at the grant script."""
        message = f"database error on {self.where}: {self.describe(exc)}"
        if self.statement:
            message += f", in {statement_label(self.statement)}"
        if self.engine.is_missing_object(exc):
            try:
                self.queue.check_installed()
            except self.Error:
                pass
            return DatabaseError(
                f"{message}; if the indexer's own user lacks it, run {self.grant_script}"
                " (see README)"
            )
        return DatabaseError(message)
