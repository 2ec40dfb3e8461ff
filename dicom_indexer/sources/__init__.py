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
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Settings


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
        description="dcm4chee 2.x or dcm4chee-arc-light 5, through its database",
        check_label="database",
    ),
    "orthanc": KnownSource(
        section="orthanc",
        module="orthanc",
        opener="OrthancPacs",
        description="Orthanc, through its REST API",
        check_label="source",
    ),
}


def known_source(settings: Settings) -> KnownSource:
    try:
        return KNOWN_SOURCES[settings.source]
    except KeyError:
        raise ConfigError(f"config.json: unknown source {settings.source!r}") from None


def open_pacs(settings: Settings) -> Any:
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
    return getattr(module, known.opener)(settings)
