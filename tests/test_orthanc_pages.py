"""`initial` and `reconcile` read Orthanc in pages (/studies?expand and
/series?expand), a tick reads a big series by its series, not by each image:
against a real Orthanc behind the counting, damaging proxy
(dev/orthanc_proxy.py). Pages are made small here (a few studies, a few KB)
so that a small archive crosses many of them."""

from __future__ import annotations

import concurrent.futures
import os
import types

import pytest
from conftest import write_orthanc_configs
from orthanc_proxy import Fault, OrthancProxy
from test_orthanc import posts_of, upload_study, wait_stable
from testkit import ORTHANC_BINARY, dicom_instance, new_uid

import dicom_indexer.sources.orthanc_pages as pages
from dicom_indexer.cli import main
from dicom_indexer.errors import EXIT_DATABASE, EXIT_OK
from dicom_indexer.sources.orthanc import orthanc_pk

pytestmark = pytest.mark.skipif(
    not os.path.exists(ORTHANC_BINARY),
    reason="needs Debian's orthanc package (.ci/run installs it)",
)

BIG_SERIES_IMAGES = 1000  # a CT of 1,000 slices: its expanded series is about 63 KB


@pytest.fixture
def proxy(orthanc):
    server = OrthancProxy(orthanc.url)
    yield server
    server.stop()


@pytest.fixture
def args(tmp_path, proxy, service):
    return write_orthanc_configs(tmp_path, types.SimpleNamespace(url=proxy.url), service.url)


@pytest.fixture
def small_pages(monkeypatch):
    """Pages of at most 5 studies or series, aiming at 4 KB, refused past
    32 KB: a 1,000-image series is past it alone, and is asked for alone
    with the bound of any answer."""
    monkeypatch.setattr(pages, "ORTHANC_PAGE_LIMIT", 5)
    monkeypatch.setattr(pages, "ORTHANC_PAGE_OVERLAP", 2)
    monkeypatch.setattr(pages, "ORTHANC_PAGE_TARGET_BYTES", 4 * 1024)
    monkeypatch.setattr(pages, "ORTHANC_PAGE_BODY_BYTES", 32 * 1024)


def stable_studies(orthanc, count, first=0):
    studies = [
        upload_study(orthanc, f"{i}-{i}", series=(("CT", 1), ("SR", 1)))
        for i in range(first, first + count)
    ]
    for study in studies:
        wait_stable(orthanc, study)
    return studies


def big_study(orthanc, images=BIG_SERIES_IMAGES):
    patient, study_uid, series_uid = ("99-9", "GRANDE^SERIE"), new_uid(), new_uid()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda _: orthanc.upload(dicom_instance(*patient, study_uid, series_uid, "CT")),
                range(images),
            )
        )
    study = answers[-1]["ParentStudy"]
    wait_stable(orthanc, study)
    return study


def reads_of_studies(proxy):
    """GETs of one study at a time (/studies/{id} and /studies/{id}/series)."""
    return proxy.count("/studies/")


def test_a_big_series_costs_a_tick_two_lookups_and_initial_reads_it_in_pages(
    orthanc, proxy, service, args, small_pages
):
    assert main(args) == EXIT_OK  # the queue is made; the change log's cursor set
    big = big_study(orthanc)
    assert main(args) == EXIT_OK
    [by_tick] = posts_of(service, big)
    assert (by_tick["study_instances"], by_tick["study_series"]) == (BIG_SERIES_IMAGES, 1)
    # Its series and one of its images looked up, not each image.
    assert proxy.count("/instances/") <= 2
    assert proxy.count("/series/") <= 4

    others = stable_studies(orthanc, 11)
    asked = len(proxy.seen)
    assert main(["initial", *args]) == EXIT_OK
    initial = proxy.seen[asked:]
    assert [s.path for s in initial if s.path.startswith("/studies/")] == []
    paths = [s.path for s in initial]
    assert sum(p.startswith("/studies?expand") for p in paths) <= 12
    assert sum(p.startswith("/series?expand") for p in paths) <= 16
    # The same documents as study-by-study reads give: the big study's too.
    [_, by_pages] = posts_of(service, big)
    assert by_pages == by_tick
    for study in others:
        [document] = posts_of(service, study)
        assert (document["study_modality"], document["study_series"]) == ("CT\\SR", 2)
        assert document["study_instances"] == 2

    asked = len(proxy.seen)
    assert main(["reconcile", *args]) == EXIT_OK
    assert [s.path for s in proxy.seen[asked:] if s.path.startswith("/studies/")] == []
    received = len(service.received)
    assert main(args) == EXIT_OK
    assert len(service.received) == received  # reconcile found nothing to send again


def test_studies_deleted_between_two_pages_make_no_other_study_skipped(
    orthanc, proxy, service, args, small_pages
):
    studies = stable_studies(orthanc, 12)
    assert main(args) == EXIT_OK  # the queue made after them: only initial finds them
    first_page = orthanc.get("/studies?since=0&limit=5")
    deleted = first_page[:3]  # every later study moves three places back

    def delete_after_first_page(path):
        if path.startswith("/studies?expand&since=0&") and deleted[0] in orthanc.studies():
            for ident in deleted:
                orthanc.delete(f"/studies/{ident}")

    proxy.on_answer = delete_after_first_page
    assert main(["initial", *args]) == EXIT_OK
    kept = [s for s in studies if s not in deleted]
    assert sorted(service.study_pks()) == sorted(orthanc_pk(s) for s in kept)


def test_a_study_changed_while_the_pages_are_read_is_sent_as_it_is_at_the_end(
    orthanc, proxy, service, args, small_pages
):
    studies = stable_studies(orthanc, 8)
    assert main(args) == EXIT_OK  # the queue made after them: only initial finds them
    changed = orthanc.get("/studies?since=0&limit=1")[0]
    info = orthanc.get(f"/studies/{changed}")
    uid, patient = info["MainDicomTags"]["StudyInstanceUID"], info["PatientMainDicomTags"]

    added = []

    def add_an_image_after_first_page(path):
        if path.startswith("/studies?expand&since=0&") and not added:
            added.append(
                orthanc.upload(dicom_instance(patient["PatientID"], "X^Y", uid, new_uid(), "MR"))
            )

    proxy.on_answer = add_an_image_after_first_page
    assert main(["initial", *args]) == EXIT_OK
    proxy.on_answer = None
    # Read again on its own at the end of the pages: not stable yet, so it
    # waits; never sent with what its page said.
    assert posts_of(service, changed) == []
    assert sorted(service.study_pks()) == sorted(orthanc_pk(s) for s in studies if s != changed)
    wait_stable(orthanc, changed)
    assert main(args) == EXIT_OK
    [document] = posts_of(service, changed)
    assert (document["study_modality"], document["study_series"]) == ("CT\\MR\\SR", 3)


def test_a_listing_that_repeats_its_page_stops_initial_in_one_line(
    orthanc, proxy, service, args, small_pages, monkeypatch, capsys
):
    monkeypatch.setattr(pages, "ORTHANC_PAGE_LIMIT", 4)
    monkeypatch.setattr(pages, "ORTHANC_PAGE_OVERLAP", 1)
    stable_studies(orthanc, 9)
    assert main(args) == EXIT_OK  # the queue made after them: only initial finds them
    first = orthanc.http.get(orthanc.url + "/studies?expand&since=0&limit=4").content
    proxy.faults.append(Fault("/studies", status=200, body=first))  # a cache ignoring `since`
    capsys.readouterr()
    assert main(["initial", *args]) == EXIT_DATABASE
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "its listing does not advance" in errors[0], errors
    assert proxy.count("/studies?") <= 3
    assert service.received == []  # nothing sent from a listing it could not trust
    proxy.faults.clear()
    assert main(["initial", *args]) == EXIT_OK
    assert len(service.study_pks()) == 9
