"""The storm, bounded for CI: a dcm4chee-like writer (2.x, and arc-light 5
with its size scheduler), ticks every 2 s and every fault injected several
times, a poison study all along (dev/storm.py); then one reconcile and one
retry-failed, and the central index must equal the PACS, study by study."""

from __future__ import annotations

import shutil
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "dev"))
import storm  # noqa: E402

# schema: (seconds of faults, times each fault is injected)
STORMS = {"dcm4chee2": (75, 3), "arc5": (60, 2)}


@pytest.mark.skipif(
    not (shutil.which("mariadbd") or shutil.which("/usr/sbin/mariadbd"))
    or not shutil.which("mariadb-install-db"),
    reason="the storm needs a private MariaDB server (mariadbd, mariadb-install-db)",
)
@pytest.mark.parametrize("schema", sorted(STORMS))
def test_storm_ends_with_the_index_equal_to_the_pacs(schema, capsys):
    seconds, repeats = STORMS[schema]
    result = storm.run_storm(seconds, seed=20261128, repeats=repeats, schema=schema)
    with capsys.disabled():
        print(
            f"\nstorm ({schema}): {result['seconds']} s, faults {result['faults']},"
            f" ticks {result['tick_exit_codes']}, writer {result['writer']},"
            f" {result['studies_in_pacs']} studies in the PACS, {result['posts']} posts"
            f" ({result['posts_per_study']} per study, at most {result['max_posts_one_study']}),"
            f" {result['deletes']} deletes, {result['posts_without_counts']} without counts,"
            f" differences {len(result['differences'])}"
        )
    # Each difference whole, and the storm's log above it, to see how it came.
    assert result["differences"] == [], "\n".join(result["differences"][:10])
    # The poison study was tried, and kept no other study waiting (every
    # other study converged above); one study was refused for good.
    assert result["poison_posts"] >= 1
    assert result["refused_studies"], "the 403 phase refused no study"
    assert result["final_exit_codes"] == [0, 0]
    # Never a study before its counts exist (the final reconcile would mend it).
    assert result["posts_without_counts"] == 0
    assert all(result["faults"][fault] >= repeats for fault in storm.FAULTS)
    assert "unexpected" not in result["tick_exit_codes"]
    for fault in ("sigkill", "sigterm", "kill_connection", "db_restart"):
        assert result["faults"].get(f"{fault} (mid-run)", 0) >= 1, fault
    assert result["tick_exit_codes"].get("143", 0) >= 1  # SIGTERM handled mid-run
    assert result["tick_exit_codes"].get("-9", 0) >= 1
    # The writer did each kind of thing, and the faults did bite.
    for kind in ("studies stored", "series stored", "patient edits", "patient merges"):
        assert result["writer"][kind] > 0, kind
    assert result["writer"]["studies deleted"] > 0 and result["deletes"] > 0
    assert result["writer"].get("late commits", 0) > 0
    if schema == "arc5":
        for kind in ("series rejected", "studies rejected", "studies settled"):
            assert result["writer"].get(kind, 0) > 0, kind
