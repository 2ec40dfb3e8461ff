"""The harvest (dicom_indexer/sources/harvest.py), through both protocols, on
a real Orthanc whose queries are capped (LimitFindResults): what
docs/cosecha.md and the README promise of a PACS that only answers queries.

- `initial` sends every study, undated ones included, though no answer
  holds more than the cap: a capped slice is split, never trusted;
- an idle tick asks a handful of queries;
- an edit, a deletion and a late import under an old date, and a study with
  no date, arrive within one cold cycle, and nothing else is sent again;
- no password or key appears in any output, and a PACS that cannot be
  asked ends the run in one line with exit 4.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import pytest
from conftest import API_KEY
from contract import HarvestUnderTest
from testkit import DICOMWEB_PLUGIN, ORTHANC_BINARY, CentralService, OrthancServer

from dicom_indexer.cli import main
from dicom_indexer.errors import EXIT_DATABASE, EXIT_OK
from dicom_indexer.sources.dicomweb import DicomwebFinder
from dicom_indexer.sources.harvest import COLD_MAX_QUERIES_PER_TICK

pytestmark = pytest.mark.skipif(
    not (os.path.exists(ORTHANC_BINARY) and os.path.exists(DICOMWEB_PLUGIN)),
    reason="needs Debian's orthanc and orthanc-dicomweb packages (.ci/run installs them)",
)

CAP = 4  # Orthanc's LimitFindResults: C-FIND stops at 4 (0xFE00), QIDO at 5 without a word
PROTOCOLS = ["dicomweb", "dimse"]


def _needs(protocol: str) -> None:
    if protocol == "dimse":
        pytest.importorskip("pynetdicom")


@pytest.fixture(params=PROTOCOLS)
def capped(request: Any, tmp_path: Any, service: CentralService) -> Iterator[HarvestUnderTest]:
    """An Orthanc that answers at most CAP studies a query, with an archive
    of 14 studies: 6 of one old day (more than the cap), 5 over the years,
    3 undated (PatientIDs starting with a digit, a capital, a small letter).
    The DICOMweb site knows its cap (result_cap): Orthanc's QIDO cuts
    without a word."""
    _needs(request.param)
    extra = {"result_cap": CAP + 1} if request.param == "dicomweb" else {}
    under_test = HarvestUnderTest(
        tmp_path, service, request.param, {"LimitFindResults": CAP}, section_extra=extra
    )
    under_test.add_studies(6, study_date="20190311")
    for day in ("20120105", "20150620", "20170909", "20210228", "20240101"):
        under_test.add_studies(1, study_date=day)
    for patient in ("7001-K", "U-77", "x-55"):
        under_test.add_studies(1, study_date=None, patient_id=patient)
    yield under_test
    under_test.close()


def posted(service: CentralService) -> list[int]:
    return [r.json["study_pk"] for r in service.received if r.method == "POST"]


def test_initial_sends_every_study_though_no_answer_holds_them_all(capped, service):
    assert main(["initial", *capped.configs]) == EXIT_OK
    assert sorted(posted(service)) == sorted(capped.studies)  # each once
    undated = [d for d in service.documents if d["study_datetime"] is None]
    assert {d["patient_id"] for d in undated} == {"7001-K", "U-77", "x-55"}
    assert {row["status"] for row in capped.queue().values()} == {"sent"}
    service.clear()
    assert main(capped.configs) == EXIT_OK  # nothing changed: nothing sent
    assert posted(service) == []


def test_old_edits_deletions_late_imports_and_undated_studies_arrive_within_a_cold_cycle(
    capped, service
):
    assert main(["initial", *capped.configs]) == EXIT_OK
    service.clear()
    by_date: dict[str, list[int]] = {}
    for pk, ident in capped.studies.items():
        date = capped.orthanc.get(f"/studies/{ident}")["MainDicomTags"].get("StudyDate", "")
        by_date.setdefault(date, []).append(pk)
    [edited] = by_date["20150620"]
    [deleted] = by_date["20170909"]
    capped.change(edited)  # a series added to a 2015 study
    capped.delete(deleted)
    [imported] = capped.add_studies(1, study_date="20130707")  # a prior, imported late
    [undated] = capped.add_studies(1, study_date=None, patient_id="5512-3")
    wanted = {edited, imported, undated}
    ticks = 0
    while ticks < 150 and not (wanted <= set(posted(service)) and _deletes(service)):
        assert main(capped.configs) == EXIT_OK
        ticks += 1
    assert wanted <= set(posted(service)), f"not arrived after {ticks} ticks"
    assert len(_deletes(service)) == 1
    assert sorted(posted(service)) == sorted(wanted)  # nothing else sent again
    [document] = [d for d in service.documents if d["study_pk"] == edited]
    assert document["study_modality"] == "CT\\MR"
    assert document["study_series"] == 2
    assert capped.queue()[deleted]["status"] == "deleted"


def _deletes(service: CentralService) -> list[Any]:
    return [r for r in service.received if r.method == "DELETE"]


def test_an_idle_tick_asks_a_handful_of_queries(tmp_path, service):
    """Counted from outside the client, at the QIDO-RS front."""
    under_test = HarvestUnderTest(tmp_path, service, "dicomweb")
    try:
        for day in ("20120105", "20150620", "20170909", "20210228", "20240101"):
            under_test.add_studies(2, study_date=day)
        assert main(["initial", *under_test.configs]) == EXIT_OK
        assert under_test.front is not None
        for _ in range(3):
            asked = under_test.front.count("/studies$")
            assert main(under_test.configs) == EXIT_OK
            # Today and yesterday, one warm day, and the cold sweep's share:
            # its answers bounded, its queries (most of them empty ones, in
            # the undated sweep) at most COLD_MAX_QUERIES_PER_TICK.
            assert 3 <= under_test.front.count("/studies$") - asked <= 2 + COLD_MAX_QUERIES_PER_TICK
        assert len(posted(service)) == 10
    finally:
        under_test.close()


def test_a_cold_slice_the_queue_knows_at_a_usual_cap_is_asked_once(tmp_path, service, monkeypatch):
    """A cold slice sized to the tick's share (100 here, as C-FIND's) that
    holds exactly a usual cap's count (100: a PACS's silent cut) would be
    split as if cut, at the cost of more queries and more ticks: sized from
    the queue, it takes the next older studies' days too, and is asked once."""
    monkeypatch.setattr(DicomwebFinder, "cold_answers_per_tick", 100)
    under_test = HarvestUnderTest(tmp_path, service, "dicomweb")
    try:
        under_test.add_studies(100, study_date="20190311")
        for day in ("20150620", "20120105", "20100101"):
            under_test.add_studies(1, study_date=day)
        assert main(["initial", *under_test.configs]) == EXIT_OK
        assert under_test.front is not None
        asked = len(under_test.front.seen)
        assert main(under_test.configs) == EXIT_OK
        dated = [seen.path for seen in under_test.front.seen[asked:] if "StudyDate=" in seen.path]
        # Today and yesterday, one warm day, and one cold slice: 100 + 1 would
        # both be usual caps; from 2012-01-05 it holds 102, trusted whole.
        assert len(dated) == 3, dated
        assert "StudyDate=20120105-" in dated[-1], dated
        assert len(posted(service)) == 103
    finally:
        under_test.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_secret_in_any_output_and_one_line_when_the_pacs_refuses(
    protocol, tmp_path, service, capsys
):
    """The API key and the PACS's password never show, at -v either; a PACS
    that cannot be asked ends the run in one line with exit 4."""
    _needs(protocol)
    under_test = HarvestUnderTest(tmp_path, service, protocol)
    try:
        under_test.add_studies(2, days_ago=400)
        for args in (["-v", "initial"], ["-v"], ["-v", "check"], ["-v", "reconcile"]):
            main([*args, *under_test.configs])
        if protocol == "dicomweb":
            under_test.set_section(password="wrong-" + OrthancServer.PASSWORD)
        else:
            under_test.set_section(indexer_ae="NOT_REGISTERED")
        capsys.readouterr()
        assert main(under_test.configs) == EXIT_DATABASE
        out = capsys.readouterr()
        errors = [line for line in out.err.splitlines() if re.search(r" (ERROR|CRITICAL) ", line)]
        assert len(errors) == 1, errors
        assert "NOT_REGISTERED" in errors[0] or "credentials" in errors[0]
        under_test.orthanc.stop(kill=True)
        assert main(under_test.configs) == EXIT_DATABASE  # nobody answers
        printed = out.out + out.err + "".join(capsys.readouterr())
        for secret in (API_KEY, OrthancServer.PASSWORD):
            assert secret not in printed
    finally:
        under_test.close()
