"""Sources: what a PACS holds and how it changes.

One table (KNOWN_SOURCES) names every kind of source, the config.json section
that chooses it, the module that reads it and the driver it needs. A source's
module, and its driver, are imported only when config.json names it, as
fsspec's known_implementations do, so that a site installs only what its own
PACS needs. Nothing outside this table asks which source a site has.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Protocol

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings
    from ..errors import DatabaseError
    from ..reconciliation import ReconcileReport
    from ..run import Stop
    from ..study_service import StudyServiceQueue


class StudySchema(Protocol):
    """What one source's study rows mean (dcm4chee 2.x, arc-light 5, Orthanc)."""

    name: str
    UNSETTLED: str  # why a study the archive has not finished waits

    def join_args(self) -> tuple[Any, ...]:
        """The arguments its statements take beside the pks (arc-light's view)."""

    def fields(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """A row -> the fields study_document() takes."""

    def settled(self, row: Mapping[str, Any]) -> bool:
        """Whether the archive has computed everything the document carries."""

    def withdrawn(self, row: Mapping[str, Any]) -> bool:
        """Gone from the PACS since it was enqueued."""


class Source(Protocol):
    """What a source provides: how a tick finds what changed, the archive
    for `initial` and `reconcile`, and one study's row for its document."""

    pipelined_initial: bool  # whether initial sends while it still enqueues
    schema: StudySchema

    def enqueue_changes(self) -> int:
        """A tick's first step: enqueues what is new or changed; how many."""

    def count_studies(self) -> int:
        """The archive's size, for the progress bar."""

    def initial_page(self, after: int) -> tuple[list[tuple], int]:
        """`initial`'s next page of studies after a position, and the next position."""

    def initial_enqueued(self, queue: StudyServiceQueue, position: int) -> None:
        """Told that `initial` has enqueued everything up to `position`."""

    def new_studies(
        self, frontier: Callable[[int], int | None] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Pending studies never tried, each read into its document's row."""

    def due_studies(self) -> Iterator[dict[str, Any]]:
        """Pending studies whose next attempt is due."""

    def pending_studies(self) -> Iterator[dict[str, Any]]:
        """Both of the above, new ones first."""

    def reconcile(
        self, queue: StudyServiceQueue, settings: Settings, max_studies: int | None, stop: Stop
    ) -> ReconcileReport:
        """Compares the whole archive with what the index holds; a study is
        taken for deleted only once the source confirms it is gone."""

    def time_index(self) -> tuple[bool, str]:
        """`check`'s verdict on how a tick finds what changed."""

    def delivered_iuids(self, iuids: list[str | None]) -> set[str]:
        """Which of these Study Instance UIDs this source's queue has delivered."""


class Pacs(Protocol):
    """An opened PACS, as the commands see it: its source, its schema, its
    queue, and what `check` says of it."""

    where: str  # for messages: the database and its route, or the Orthanc's URL
    Error: tuple[type[BaseException], ...]  # the queue's driver errors
    schema: StudySchema
    source: Source
    queue: StudyServiceQueue
    install_script: str
    grant_script: str

    def explain(self, exc: BaseException) -> DatabaseError:
        """One line for an error met mid-run."""

    def describe(self, exc: BaseException) -> str:
        """One line for a driver error."""

    def server_version(self) -> str: ...

    def connection_lines(self) -> list[tuple[str, str, int]]:
        """check's first lines: what it connected to."""

    def installation_lines(self) -> list[tuple[str, str, int]]:
        """check's lines once the queue is found installed and current."""

    def privilege_problems(self) -> list[str]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class KnownSource:
    """One kind of source: where its code lives, what it is called in
    messages, and what a site installs when its driver is missing."""

    section: str  # config.json's section that chooses it
    module: str  # dicom_indexer.sources.<module>
    opener: str  # the module's class that opens the PACS
    description: str  # for --help
    check_label: str  # how check's lines name it
    install_hint: str = ""  # what to install when the module's import fails


KNOWN_SOURCES: dict[str, KnownSource] = {
    "dcm4chee": KnownSource(
        section="database",
        module="dcm4chee",
        opener="PacsDatabase",
        description="dcm4chee 2.x or dcm4chee-arc-light 5, through its database"
        " (MySQL/MariaDB or PostgreSQL)",
        check_label="database",
    ),
    "orthanc": KnownSource(
        section="orthanc",
        module="orthanc",
        opener="OrthancPacs",
        description="Orthanc, through its REST API",
        check_label="source",
    ),
    "dicomweb": KnownSource(
        section="dicomweb",
        module="dicomweb",
        opener="DicomwebPacs",
        description="any PACS through DICOMweb (QIDO-RS)",
        check_label="source",
    ),
    "dimse": KnownSource(
        section="dimse",
        module="dimse",
        opener="DimsePacs",
        description="any PACS through DIMSE (C-FIND)",
        check_label="source",
        install_hint="python3 -m pip install -r requirements-dimse.txt",
    ),
}


def known_source(settings: Settings) -> KnownSource:
    try:
        return KNOWN_SOURCES[settings.source]
    except KeyError:
        raise ConfigError(f"config.json: unknown source {settings.source!r}") from None


def open_pacs(settings: Settings) -> Pacs:
    """The PACS that config.json names, opened by its source's module: its
    source (the studies), its queue (study_service) and what check reports."""
    known = known_source(settings)
    try:
        module = importlib.import_module(f"{__name__}.{known.module}")
    except ImportError as exc:
        hint = f"; install: {known.install_hint}" if known.install_hint else ""
        raise ConfigError(
            f"config.json: source '{known.section}' needs {exc.name or exc}{hint}"
        ) from None
    pacs: Pacs = getattr(module, known.opener)(settings)
    return pacs
