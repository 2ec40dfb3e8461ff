"""The source contract: what every source keeps, written once and run by each
source through its own stand-in (tests/contract.py), the way fsspec's
abstract tests are run by s3fs and the other filesystems.

- every study arrives once, with the contract's 11 keys, and a change is
  sent again, alone;
- one study's trouble is that study's alone: the others are delivered in the
  same run, the bad one stays pending (or failed) with its error, `status`
  shows it, and it is never marked sent on a partial read;
- history lost (a cursor deleted, a queue emptied, a change log cleared)
  leads to one warning line and a full resynchronisation that loses nothing;
- a study is deleted at the index only once the source says it is gone.

A new source joins by adding its stand-in to tests/contract.py and a class
here naming it.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from contract import (
    ArcLightUnderTest,
    AzureFeedUnderTest,
    Dcm4cheeUnderTest,
    DicomwebUnderTest,
    HarvestUnderTest,
    OrthancUnderTest,
    SourceUnderTest,
)
from testkit import DICOMWEB_PLUGIN, ORTHANC_BINARY

from dicom_indexer.cli import main
from dicom_indexer.document import DOCUMENT_KEYS
from dicom_indexer.errors import EXIT_DATABASE, EXIT_DELIVERY, EXIT_OK, EXIT_REJECTED


def pytest_generate_tests(metafunc: Any) -> None:
    """Each source runs the faults and the losses of history it can meet."""
    under_test = getattr(metafunc.cls, "UNDER_TEST", None)
    for name, attribute in (
        ("fault", "READ_FAULTS"),
        ("loss", "HISTORY_LOSSES"),
        ("stall", "FEED_STALLS"),
        ("gone", "SPURIOUS_GONE"),
        ("forgotten", "FORGOTTEN"),
    ):
        if name in metafunc.fixturenames and under_test is not None:
            values = getattr(under_test, attribute)
            reason = f"{under_test.__name__} has no {attribute.lower().replace('_', ' ')}"
            metafunc.parametrize(
                name, values or [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
            )


def posted(service: Any) -> list[int]:
    """The pks the service accepted, in the order it accepted them."""
    return [r.json["study_pk"] for r in service.received if r.method == "POST"]


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if " WARNING " in line]


class SourceContract:
    """The promises; `source` is a SourceUnderTest, `service` the central
    service's stand-in that it sends to."""

    UNDER_TEST: type[SourceUnderTest] = SourceUnderTest

    def test_every_study_arrives_once_with_the_contract_keys(self, source, service):
        pks = source.add_studies(4)
        assert main(["initial", *source.configs]) == EXIT_OK
        assert service.study_pks() == sorted(pks)
        for document in service.documents:
            assert list(document) == list(DOCUMENT_KEYS)
            assert document["study_iuid"]
        assert {row["status"] for row in source.queue().values()} == {"sent"}
        assert main(source.configs) == EXIT_OK  # nothing changed: nothing sent
        assert len(service.received) == 4

    def test_a_change_is_sent_again_and_only_it(self, source, service):
        pks = source.add_studies(3)
        assert main(["initial", *source.configs]) == EXIT_OK
        service.clear()
        source.change(pks[1])
        assert main(source.configs) == EXIT_OK
        assert posted(service) == [pks[1]]

    @pytest.mark.parametrize(
        "answer, code, status",
        [
            ((500, "internal error"), EXIT_DELIVERY, "pending"),
            ((422, "bad"), EXIT_REJECTED, "failed"),
        ],
        ids=["500", "422"],
    )
    def test_a_study_the_service_fails_is_that_studys_alone(
        self, source, service, capsys, answer, code, status
    ):
        pks = source.add_studies(5)
        bad = pks[0]  # the first sent: nothing may wait behind it
        service.respond = lambda n, r: answer if r.json["study_pk"] == bad else (201, "{}")
        assert main(["initial", *source.configs]) == code
        assert service.study_pks() == sorted(pks[1:])
        row = source.queue()[bad]
        assert row["status"] == status
        assert row["last_error"] == f"HTTP {answer[0]}: {answer[1]}"
        capsys.readouterr()
        assert main(["status", *source.configs]) == EXIT_OK
        assert f"study {bad} ({status}, 1 attempts): HTTP {answer[0]}" in capsys.readouterr().out

        service.respond = lambda n, r: (201, "{}")
        assert main(["retry-failed", *source.configs]) == EXIT_OK
        assert service.study_pks() == sorted(pks)

    def test_a_study_whose_read_fails_is_that_studys_alone(self, source, service, capsys, fault):
        pks = source.add_studies(5)
        bad = pks[0]
        source.break_read(bad, fault)
        code = main(["initial", *source.configs])
        assert code not in (EXIT_OK, 1), code  # said, and no internal error
        assert service.study_pks() == sorted(pks[1:])  # the others, in the same run
        row = source.queue()[bad]
        assert row["status"] == "pending"  # never marked sent on a partial read
        assert row["last_error"]
        assert row["next_attempt_at"] is not None
        capsys.readouterr()
        assert main(["status", *source.configs]) == EXIT_OK
        assert f"study {bad} (pending" in capsys.readouterr().out

        source.heal()
        assert main(["retry-failed", *source.configs]) == EXIT_OK
        assert service.study_pks() == sorted(pks)

    def test_lost_history_is_one_warning_and_loses_nothing(self, source, service, capsys, loss):
        first = source.add_studies(2)
        assert main(["initial", *source.configs]) == EXIT_OK
        between = source.add_late_studies(2)  # stored before the loss, not yet sent
        source.lose_history(loss)
        after = source.add_studies(1)
        capsys.readouterr()
        assert main(source.configs) == EXIT_OK
        assert len(warnings_in(capsys.readouterr().err)) == 1
        assert set(service.study_pks()) == set(first + between + after)

        received = len(service.received)
        assert main(source.configs) == EXIT_OK  # resynchronised: quiet again
        assert warnings_in(capsys.readouterr().err) == []
        assert len(service.received) == received

    def test_a_change_feed_that_does_not_advance_stops_the_run(
        self, source, service, capsys, stall
    ):
        pks = source.add_studies(2)
        assert main(["initial", *source.configs]) == EXIT_OK
        source.stall_feed(stall)
        source.add_studies(2)
        asked = source.feed_requests()
        capsys.readouterr()
        assert main(source.configs) == EXIT_DATABASE
        errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
        assert len(errors) == 1, errors
        assert source.feed_requests() - asked <= 10  # a bounded number of requests
        assert service.study_pks() == sorted(pks)  # what was sent stays sent

    def test_a_study_said_gone_once_is_not_deleted(self, source, service, gone):
        pks = source.add_studies(3)
        assert main(["initial", *source.configs]) == EXIT_OK
        source.say_gone_once(pks[1], gone)
        source.change(pks[1])  # so that a tick reads it again
        main(source.configs)
        assert main(["reconcile", *source.configs]) == EXIT_OK
        assert main(source.configs) == EXIT_OK
        assert [r for r in service.received if r.method == "DELETE"] == []
        assert source.queue()[pks[1]]["status"] == "sent"

    def test_reconcile_sends_a_study_the_queue_lost(self, source, service, capsys, forgotten):
        pks = source.add_studies(3)
        assert main(["initial", *source.configs]) == EXIT_OK
        source.forget(pks[1], forgotten)
        service.clear()
        assert main(source.configs) == EXIT_OK  # a tick cannot know
        assert main(["reconcile", *source.configs]) == EXIT_OK
        assert main(source.configs) == EXIT_OK
        assert posted(service) == [pks[1]]
        assert source.queue()[pks[1]]["status"] == "sent"

    def test_a_study_is_deleted_at_the_index_once_the_source_says_it_is_gone(self, source, service):
        pks = source.add_studies(3)
        assert main(["initial", *source.configs]) == EXIT_OK
        source.delete(pks[1])
        # No source's change feed tells of a deletion: reconcile finds it.
        assert main(["reconcile", *source.configs]) == EXIT_OK
        assert main(source.configs) == EXIT_OK
        deletes = [r for r in service.received if r.method == "DELETE"]
        assert len(deletes) == 1
        assert source.queue()[pks[1]]["status"] == "deleted"
        assert {source.queue()[pk]["status"] for pk in (pks[0], pks[2])} == {"sent"}


# -- the sources ---------------------------------------------------------------


class TestDcm4chee2(SourceContract):
    UNDER_TEST = Dcm4cheeUnderTest

    @pytest.fixture
    def source(self, pacs, service, tmp_path):
        yield Dcm4cheeUnderTest(tmp_path, service, pacs)


class TestArcLight5(SourceContract):
    UNDER_TEST = ArcLightUnderTest

    @pytest.fixture
    def source(self, arc, service, tmp_path):
        yield ArcLightUnderTest(tmp_path, service, arc)


@pytest.mark.skipif(not os.path.exists(ORTHANC_BINARY), reason="needs Debian's orthanc package")
class TestOrthanc(SourceContract):
    UNDER_TEST = OrthancUnderTest

    @pytest.fixture
    def source(self, orthanc, service, tmp_path):
        under_test = OrthancUnderTest(tmp_path, service, orthanc)
        yield under_test
        under_test.close()


@pytest.mark.skipif(not os.path.exists(DICOMWEB_PLUGIN), reason="needs Debian's orthanc-dicomweb")
class TestDicomweb(SourceContract):
    UNDER_TEST = DicomwebUnderTest

    @pytest.fixture
    def source(self, service, tmp_path):
        under_test = DicomwebUnderTest(tmp_path, service)
        yield under_test
        under_test.close()


@pytest.mark.skipif(not os.path.exists(ORTHANC_BINARY), reason="needs Debian's orthanc package")
class TestDimse(SourceContract):
    UNDER_TEST = HarvestUnderTest

    @pytest.fixture
    def source(self, service, tmp_path):
        pytest.importorskip("pynetdicom")
        under_test = HarvestUnderTest(tmp_path, service, "dimse")
        yield under_test
        under_test.close()


@pytest.mark.skipif(not os.path.exists(DICOMWEB_PLUGIN), reason="needs Debian's orthanc-dicomweb")
class TestAzureChangeFeed(SourceContract):
    UNDER_TEST = AzureFeedUnderTest

    @pytest.fixture
    def source(self, service, tmp_path):
        under_test = AzureFeedUnderTest(tmp_path, service)
        yield under_test
        under_test.close()
