"""reconcile: what the central index holds against what the PACS holds."""

from __future__ import annotations

import logging
import logging.handlers
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .document import document_fingerprint, encode_document, study_document
from .run import RateCap, _progress_bar
from .study_service import DELETED, DELETING, MAX_PK, SENT

if TYPE_CHECKING:
    from .config import Settings
    from .run import Stop
    from .sources import StudySchema
    from .sources.dcm4chee import PacsSource
    from .study_service import StudyServiceQueue

log = logging.getLogger("dicom_indexer")


@dataclass
class ReconcileReport:
    checked: int = 0
    changed: int = 0
    gone: int = 0
    untracked: int = 0
    seconds: float = 0.0
    finished: bool = False

    @property
    def rows_per_second(self) -> float:
        return self.checked / self.seconds if self.seconds else 0.0


def needs_resend(row: Mapping[str, Any], center: str, schema: StudySchema) -> bool:
    """Reconcile's verdict on one study: does the service hold a stale document?"""
    if schema.withdrawn(row) or not schema.settled(row):
        return False  # withdrawn: found by gone_between; unsettled: the tick sends it
    if row["status"] in (DELETED, DELETING):
        return True  # back from the trash: sent again as new
    if row["status"] != SENT:
        return False  # pending goes anyway; failed waits for a change or retry-failed
    body = encode_document(study_document(schema.fields(row), center))
    return document_fingerprint(body) != row["sent_version"]


def reconcile(
    source: PacsSource,
    queue: StudyServiceQueue,
    settings: Settings,
    max_studies: int | None,
    stop: Stop,
) -> ReconcileReport:
    """Sweeps the archive in pk pages, throttled, enqueueing what the tick
    cannot see: patient edits and merges, deletions, restored studies."""
    report = ReconcileReport()
    position = queue.reconcile_position()
    if position:
        log.info("resuming reconcile after study pk %d", position)
    rate = settings.reconcile_rows_per_second
    page_size = max(1, min(settings.page_size, rate))
    bar = _progress_bar(source.count_studies, "reconciling")
    cap = RateCap(rate)
    try:
        while (max_studies is None or report.checked < max_studies) and not stop.requested():
            size = (
                page_size if max_studies is None else min(page_size, max_studies - report.checked)
            )
            page = source.reconcile_page(position, size)
            upto = page[-1]["study_pk"] if page else MAX_PK
            changed = []
            for row in page:
                if row["status"] is None:
                    report.untracked += 1
                elif needs_resend(row, settings.center, source.schema):
                    changed.append(row["study_pk"])
            gone = source.gone_between(position, upto)
            queue.record_reconciled(changed, gone, upto if page else position)
            report.checked += len(page)
            report.changed += len(changed)
            report.gone += len(gone)
            bar.update(len(page))
            if not page:
                report.finished = True
                queue.finish_reconcile()
                break
            position = upto
            cap.passed(len(page))
    finally:
        bar.close()
        report.seconds = time.monotonic() - cap.started
    return report
