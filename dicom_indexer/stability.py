"""When a study still receiving images waits before it is sent."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from .sources import StudySchema


@dataclass(frozen=True)
class StabilityWindow:
    """A study still receiving images waits until it has been quiet for
    `seconds` (stable_age_seconds), as the database's clock tells it."""

    now: datetime.datetime
    seconds: int

    def hold(self, row: Mapping[str, Any]) -> str | None:
        """Why this pending study waits, or None. A study dated in the future
        (a PACS clock set wrong) waits `seconds` from when it was enqueued,
        not until its date: it would otherwise wait, silently, for years."""
        cutoff = self.now - datetime.timedelta(seconds=self.seconds)
        updated, queued = row["updated_time"], row["queued_at"]
        if not isinstance(updated, datetime.datetime) or updated <= cutoff:
            return None
        if isinstance(queued, datetime.datetime) and queued <= cutoff:
            return None
        if updated > self.now:
            return (
                "dated in the future (updated_time is ahead of the database's clock):"
                " sent stable_age_seconds after it was enqueued"
            )
        return "still receiving images: sent once quiet for stable_age_seconds"


def hold_reason(
    row: Mapping[str, Any], schema: StudySchema, window: StabilityWindow | None
) -> str | None:
    """Why a pending study is not sent in this run, or None to send it."""
    reason = window.hold(row) if window is not None else None
    if reason is None and not schema.settled(row):
        reason = schema.UNSETTLED
    return reason
