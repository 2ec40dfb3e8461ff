"""dev/benchmark.py still runs end to end: a tiny archive, no waiting.
The real measurements are in the README; this only keeps the tool working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, connect

sys.path.insert(0, str(ROOT / "dev"))
import benchmark  # noqa: E402
from testkit import ORTHANC_BINARY  # noqa: E402


def run_benchmark(tmp_path: Path, *args: str, timeout: int) -> tuple[str, dict]:
    """dev/benchmark.py as a user runs it: its report, and what it wrote in --json."""
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "dev" / "benchmark.py"), *args, "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout, json.loads(results.read_text())


@pytest.mark.parametrize("schema", ["dcm4chee2", "arc5"])
def test_benchmark_reports_every_study_delivered_once(tmp_path, schema):
    stdout, report = run_benchmark(
        tmp_path,
        *("--schema", schema, "--studies", "300", "--reference-studies", "100"),
        *("--baseline-seconds", "1", "--max-settle-seconds", "0", "--no-wait"),
        timeout=400,
    )
    assert "| ratio client / reference" in stdout
    assert "PACS probe during initial: longest update" in stdout
    assert report["initial"]["exit_code"] == 0
    assert report["initial"]["posts"] == report["initial"]["unique_studies"] == 300
    assert report["noop_tick"]["posts"] == 0
    assert report["pacs_probe"]["updates"] > 0
    with connect() as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES LIKE %s", (report["database"],))
        assert not cur.fetchall()  # the throwaway archive is dropped


def test_adaptive_scenes_run_and_lose_nothing(tmp_path):
    """The four scenes of adaptive delivery at 1% of their size."""
    stdout, report = run_benchmark(tmp_path, "--scene", "adaptive", "--scale", "0.01", timeout=400)
    assert "Scene 3: 10 centers" in stdout
    assert [r["concurrency"] for r in report["wan"]] == [4, 16, 64, "auto"]
    for r in report["wan"] + report["capacity"]:
        assert r["exit_code"] == 0
        assert r["posts"] == r["unique_studies"] == r["studies"]
    centers = report["centers"]
    assert centers["exit_codes"] == [0]
    assert (centers["lost"], centers["posted_twice"]) == (0, 0)
    flaky = report["flaky"]
    for label in ("clean", "flaky"):  # every study in one run, whatever the 503s
        assert flaky[label]["exit_code"] == 0
        assert flaky[label]["unique_studies"] == flaky[label]["studies"]
    assert flaky["flaky"]["failed_posts"] > 0


def test_peak_memory_reported_is_the_clients_not_the_benchmarks():
    """wait4's ru_maxrss keeps the size of the parent a child was forked
    from: a 200 MB benchmark would have reported 200 MB for any client."""
    ballast = bytearray(200 * 2**20)
    ballast[:: 2**12] = b"x" * len(ballast[:: 2**12])  # resident, not just reserved
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; x = bytearray(40 * 2**20); time.sleep(0.3)"]
    )
    code, peak_mb, _ = benchmark._wait_client(child)
    assert code == 0
    assert 40 < peak_mb < 100, peak_mb
    del ballast


@pytest.mark.skipif(not Path(ORTHANC_BINARY).exists(), reason="needs Debian's orthanc package")
def test_orthanc_benchmark_runs_and_loses_nothing(tmp_path):
    """--source orthanc with a handful of studies: it keeps working."""
    _, report = run_benchmark(tmp_path, "--source", "orthanc", "--studies", "20", timeout=300)
    assert report["initial"]["exit_code"] == 0
    assert report["initial"]["unique_studies"] == report["initial"]["posts"] == 20
    assert report["idle_tick_posts"] == 0


@pytest.mark.skipif(not Path(ORTHANC_BINARY).exists(), reason="needs Debian's orthanc package")
@pytest.mark.parametrize("source", ["dicomweb", "dimse"])
def test_harvest_benchmark_runs_and_loses_nothing(tmp_path, source):
    """--source dicomweb and dimse at 200 studies (one undated, found only by
    the PatientID sweep): every study arrives once, the bare loop asks the
    same queries and posts as many, the cold ticks reach the undated sweep
    and send nothing, and each figure is reported. (At 200 studies a tick
    holds whole cycles: the cycle without the undated sweep shows at
    10,000, dev/BENCHMARK.md.)"""
    stdout, report = run_benchmark(
        tmp_path, "--source", source, "--studies", "200", "--cold-ticks", "5", timeout=300
    )
    initial = report["initial"]
    assert initial["exit_code"] == 0
    assert initial["unique_studies"] == initial["posts"] == 200
    assert report["undated"] == 1
    assert initial["kinds"]["PatientID"] > 0  # the undated study's sweep ran
    assert report["bare_loop"]["studies"] == 200
    assert report["ratio"] > 0 and initial["peak_rss_mb"] > 0
    assert report["idle_tick_posts"] == 0
    assert 0 < report["idle_tick_queries"] <= report["idle_tick_formula"]["total"], [
        t["kinds"] for t in report["idle_ticks"]
    ]
    busy = report["busy_tick"]
    assert (busy["exit_code"], busy["posts"]) == (0, benchmark.HARVEST_BUSY_STUDIES)
    reconcile = report["reconcile"]
    assert (reconcile["exit_code"], reconcile["posts"]) == (0, 0)
    assert reconcile["queries"] > 0
    cold = report["cold_cycle"]
    assert cold["ticks_run"] == 5 and cold["undated_phase"]["ticks"] > 0, cold
    assert cold["posts"] == 0  # nothing new: a cold tick re-reads, it does not resend
    for label in (
        "ratio client / bare loop",
        "idle tick: queries",
        "reconcile: queries",
        "idle ticks, undated sweep",
        "cold ticks run",
    ):
        assert f"| {label}" in stdout
