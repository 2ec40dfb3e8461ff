"""Azure's DICOM change feed (dicom_indexer/sources/azure_feed.py) against
a stand-in for Azure's service (dev/azure_feed_stub.py: Azure cannot run
here; the stub keeps to its documented API v1). Each test asserts what the
harvest gets: the changes in order, where the next page starts (never stuck
on a stretch without entries, never past the newest change), and the one
line a broken feed, refused credentials or a stalled service end the run
with, without a UID or the token in it."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest
from azure_feed_stub import AzureFeedStub
from contract import HarvestUnderTest
from hostile_http import Rule
from testkit import DICOMWEB_PLUGIN, ORTHANC_BINARY, CentralService, new_uid

from dicom_indexer.cli import main
from dicom_indexer.config import DicomwebSettings
from dicom_indexer.errors import EXIT_DATABASE, EXIT_OK, ConfigError
from dicom_indexer.http import STALLED_DEADLINES, RunEnding
from dicom_indexer.logs import Secrets
from dicom_indexer.sources.azure_feed import AZURE_FEED_SPAN, AzureChangeFeed
from dicom_indexer.sources.dicomweb import DicomwebFinder
from dicom_indexer.sources.finding import ChangeFeedError, FeedChange, PacsUnavailable

TOKEN = "azure-tok-5c2e9d8b41f7"
FEED = r"^/v1/changefeed$"  # a front's rule for feed pages (paths without their query)
STUDY_A = "1.2.826.0.1.3680043.8.498.10001"
STUDY_B = "1.2.826.0.1.3680043.8.498.10002"
STUDY_C = "1.2.826.0.1.3680043.8.498.10003"


def _settings(
    url: str, change_feed: str = "azure", timeouts: tuple[float, float] = (2, 10)
) -> DicomwebSettings:
    return DicomwebSettings(
        url=url,
        auth="bearer",
        user="",
        password="",
        token=TOKEN,
        ca_bundle=None,
        result_cap=None,
        change_feed=change_feed,
        connect_timeout_seconds=timeouts[0],
        read_timeout_seconds=timeouts[1],
        secrets=Secrets(TOKEN),
    )


@pytest.fixture(scope="module")
def module_stub() -> Iterator[AzureFeedStub]:
    stub = AzureFeedStub()  # the feed alone: these tests ask no QIDO query
    yield stub
    stub.stop()


FINDERS: list[DicomwebFinder] = []  # closed after each test


def _finder(url: str, **kwargs: Any) -> DicomwebFinder:
    finder = DicomwebFinder(_settings(url, **kwargs))
    FINDERS.append(finder)
    return finder


@pytest.fixture
def stub(module_stub: AzureFeedStub) -> Iterator[AzureFeedStub]:
    """The module's stub with an empty feed, no fault and nothing seen yet."""
    with module_stub.lock:
        module_stub.rules.clear()
        module_stub.seen.clear()
    module_stub.reset()
    module_stub.repeat_from = None
    module_stub.backwards = False
    yield module_stub
    while FINDERS:
        FINDERS.pop().close()


def _feed(stub: AzureFeedStub, timeouts: tuple[float, float] = (2, 10)) -> AzureChangeFeed:
    finder = _finder(stub.root, timeouts=timeouts)
    feed = finder.change_feed()
    assert isinstance(feed, AzureChangeFeed)
    return feed


def _read_all(feed: AzureChangeFeed, cursor: int = 0) -> tuple[list[FeedChange], int, int]:
    """What the harvest does: pages until the cursor reaches latest(). The
    changes, the cursor at the end, and the pages read."""
    newest, changes, pages = feed.latest(), [], 0
    while cursor < newest:
        page, cursor = feed.changes_after(cursor)
        changes += page
        pages += 1
        assert pages < 1000, "the cursor does not advance"
    return changes, cursor, pages


def _one_clean_line(message: str) -> None:
    assert "\n" not in message
    for uid in (STUDY_A, STUDY_B, STUDY_C, "1.2.3."):  # studies, and the stub's series and SOPs
        assert uid not in message, message
    assert TOKEN not in message


# -- what the harvest reads --------------------------------------------------------


def test_pages_by_span_over_gaps_and_reads_each_change_once(stub: AzureFeedStub) -> None:
    stub.create(STUDY_A, sop="1.2.3.1")
    stub.create(STUDY_A, sop="1.2.3.2")
    stub.append("create", STUDY_B, sop="1.2.3.3", gap=150)
    stub.update(STUDY_B, sop="1.2.3.3")
    stub.append("delete", STUDY_A, sop="1.2.3.1", gap=30)
    assert stub.latest == 185

    changes, cursor, pages = _read_all(_feed(stub))

    assert [(c.sequence, c.study_iuid, c.action) for c in changes] == [
        (1, STUDY_A, "create"),
        (2, STUDY_A, "create"),
        (153, STUDY_B, "create"),
        (154, STUDY_B, "update"),
        (185, STUDY_A, "delete"),
    ]
    assert cursor == 185
    # (0, 100] then (100, 200]: an empty stretch costs no extra page.
    assert pages == 2
    asked = [s.path for s in stub.seen if s.path.startswith("/v1/changefeed?")]
    assert asked == [
        f"/v1/changefeed?offset={offset}&limit={AZURE_FEED_SPAN}&includemetadata=false"
        for offset in (0, 100)
    ]
    assert all(s.headers.get("Authorization") == f"Bearer {TOKEN}" for s in stub.seen)


def test_a_small_span_walks_past_empty_pages(stub: AzureFeedStub) -> None:
    stub.create(STUDY_A)
    stub.append("create", STUDY_B, gap=57)
    finder = _finder(stub.root)
    feed = AzureChangeFeed(finder, span=10)

    changes, cursor, pages = _read_all(feed)

    assert [(c.sequence, c.study_iuid) for c in changes] == [(1, STUDY_A), (59, STUDY_B)]
    assert (cursor, pages) == (59, 6)  # five pages of ten, four of them empty, then 51..59


def test_latest_is_zero_for_an_empty_feed_then_the_newest_sequence(stub: AzureFeedStub) -> None:
    feed = _feed(stub)
    assert feed.latest() == 0
    assert feed.changes_after(0) == ([], 0)
    stub.append("create", STUDY_A, gap=41)
    assert feed.latest() == 42


def test_the_cursor_never_passes_the_newest_change(stub: AzureFeedStub) -> None:
    """A span reaching past the newest change must not carry the cursor
    there: the changes still to come in that span would be skipped."""
    for n in range(5):
        stub.create(STUDY_A, sop=f"1.2.3.{n}")
    feed = _feed(stub)
    changes, cursor, _ = _read_all(feed)
    assert (len(changes), cursor) == (5, 5)

    stub.create(STUDY_C, sop="1.2.3.9")
    later, cursor, _ = _read_all(feed, cursor)
    assert [(c.sequence, c.study_iuid) for c in later] == [(6, STUDY_C)]
    assert cursor == 6


def test_a_change_after_latest_on_the_same_page_is_read_not_skipped(
    stub: AzureFeedStub,
) -> None:
    stub.create(STUDY_A)
    feed = _feed(stub)
    assert feed.latest() == 1
    stub.create(STUDY_B, sop="1.2.3.7")  # arrives between latest() and the page
    changes, cursor = feed.changes_after(0)
    assert [c.study_iuid for c in changes] == [STUDY_A, STUDY_B]
    assert cursor == 2


def test_an_action_it_does_not_know_is_read_as_an_update(stub: AzureFeedStub) -> None:
    stub.append("restore", STUDY_A)
    changes, _ = _feed(stub).changes_after(0)
    assert [(c.study_iuid, c.action) for c in changes] == [(STUDY_A, "update")]


# -- a page that is not a feed's -------------------------------------------------


def _page_body(*entries: str) -> bytes:
    return ("[" + ",".join(entries) + "]").encode()


GOOD = '{"Sequence": %s, "StudyInstanceUid": "%s", "Action": "create"}'


@pytest.mark.parametrize(
    "fault, body, expected",
    [
        ("repeats", None, "at sequence 1, not after it: the feed does not advance"),
        ("backwards", None, "at sequence 1 after 2: its sequences do not rise"),
        ("body", b'{"Sequence": 1}', "with no list of entries"),
        ("body", b"<html>proxy</html>", "with no list of entries"),
        ("body", _page_body(GOOD % ('"3"', STUDY_A)), "entry 1 without a Sequence"),
        ("body", _page_body(GOOD % (3, STUDY_A), "7"), "entry 2 that is not an entry"),
        (
            "body",
            _page_body('{"Sequence": 3, "StudyInstanceUid": 12, "Action": "create"}'),
            "entry 1 at sequence 3 without a StudyInstanceUid",
        ),
        (
            "body",
            _page_body(GOOD % (3, STUDY_A), GOOD % (250, STUDY_B)),
            "entry 2 at sequence 250, past the 100 sequences asked",
        ),
    ],
    ids=["repeats", "backwards", "object", "html", "text-sequence", "not-entry", "uid", "span"],
)
def test_a_page_that_is_not_a_feeds_stops_with_one_line(
    stub: AzureFeedStub, fault: str, body: bytes | None, expected: str
) -> None:
    stub.create(STUDY_A)
    stub.create(STUDY_B, sop="1.2.3.8")
    feed = _feed(stub)
    cursor = 0
    if fault == "repeats":
        cursor = 2  # read already; the service answers (0, 100] again
        stub.repeat_from = 0
    elif fault == "backwards":
        stub.backwards = True
    else:
        stub.rules.append(Rule(FEED, status=200, body=body or b""))

    with pytest.raises(ChangeFeedError) as caught:
        feed.changes_after(cursor)

    message = str(caught.value)
    assert expected in message
    assert message.startswith(f"DICOMweb at {stub.root}: the change feed answered the page")
    assert message.endswith("the cursor stays where it was")
    assert caught.value.exit_code == EXIT_DATABASE
    _one_clean_line(message)


def test_a_latest_entry_without_a_sequence_stops_with_one_line(stub: AzureFeedStub) -> None:
    stub.rules.append(Rule(r"^/v1/changefeed/latest$", status=200, body=b'{"Sequence": null}'))
    with pytest.raises(ChangeFeedError, match="latest entry without a Sequence"):
        _feed(stub).latest()


# -- a service that cannot be asked -------------------------------------------------


def test_a_refused_token_is_the_pacs_unavailable_without_the_token(stub: AzureFeedStub) -> None:
    stub.create(STUDY_A)
    stub.rules.append(Rule(r"^/v1/changefeed", status=401, body=f'"bad {TOKEN}"'.encode()))
    with pytest.raises(PacsUnavailable) as caught:
        _feed(stub).latest()
    assert str(caught.value) == (
        f"DICOMweb at {stub.root} refused the token: check dicomweb.token (or token_file):"
        " expired, or not allowed to search studies?"
    )
    assert caught.value.exit_code == EXIT_DATABASE
    _one_clean_line(str(caught.value))


def test_a_service_without_a_feed_names_the_url_to_give(stub: AzureFeedStub) -> None:
    stub.rules.append(Rule(r"^/v1/changefeed", status=404, body=b""))
    with pytest.raises(PacsUnavailable) as caught:
        _feed(stub).latest()
    assert "is not there (HTTP 404 for /changefeed)" in str(caught.value)
    assert "dicom.azurehealthcareapis.com/v1" in str(caught.value)


def test_a_failing_service_is_one_line(stub: AzureFeedStub) -> None:
    stub.create(STUDY_A)
    stub.rules.append(Rule(FEED, status=500, body=f'{{"error": "{STUDY_A} broke"}}'.encode()))
    with pytest.raises(PacsUnavailable) as caught:
        _feed(stub).changes_after(0)
    assert "answered the page after sequence 0 with HTTP 500" in str(caught.value)
    _one_clean_line(str(caught.value))


def test_a_trickling_feed_ends_the_run(stub: AzureFeedStub) -> None:
    stub.create(STUDY_A)
    feed = _feed(stub, timeouts=(0.5, 0.5))
    feed.latest()
    # Its head at once, then its body a byte every 0.2 s: past each 1 s deadline.
    stub.rules.append(Rule(FEED, trickle_seconds=0.2))

    with pytest.raises(RunEnding) as caught:
        feed.changes_after(0)

    assert caught.value.exit_code == EXIT_DATABASE
    assert f"to {STALLED_DEADLINES} requests in a row" in str(caught.value)
    assert stub.count(FEED) == STALLED_DEADLINES
    _one_clean_line(str(caught.value))


# -- configuration ------------------------------------------------------------------


def test_the_feed_is_asked_for_only_when_configured_and_shares_the_finders_client(
    stub: AzureFeedStub,
) -> None:
    assert _finder(stub.root, change_feed="none").change_feed() is None
    finder = _finder(stub.root)
    feed = finder.change_feed()
    assert isinstance(feed, AzureChangeFeed) and feed is finder.change_feed()
    assert feed.finder.http is finder.http
    assert stub.seen == []  # nothing asked until the harvest reads it


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_a_url_of_another_api_version_is_a_config_error(version: str) -> None:
    url = f"https://ws-svc.dicom.azurehealthcareapis.com/{version}"
    finder = _finder(url)
    with pytest.raises(ConfigError) as caught:
        finder.change_feed()
    finder.close()
    assert caught.value.field == "dicomweb.url"
    assert f"ends in /{version}: give the same URL ending in /v1" in str(caught.value)


@pytest.mark.parametrize("root", ["/v1", "/v1.0-prerelease", "", "/dicom-web"])
def test_a_v1_or_unversioned_url_is_taken(root: str) -> None:
    finder = _finder("https://ws-svc.dicom.azurehealthcareapis.com" + root)
    assert isinstance(finder.change_feed(), AzureChangeFeed)
    finder.close()


# -- client.py against the stand-in, its studies a real Orthanc's ------------------

needs_orthanc = pytest.mark.skipif(
    not (os.path.exists(ORTHANC_BINARY) and os.path.exists(DICOMWEB_PLUGIN)),
    reason="needs Debian's orthanc and orthanc-dicomweb packages (.ci/run installs them)",
)


@pytest.fixture
def azure(
    tmp_path: Any, service: CentralService
) -> Iterator[tuple[HarvestUnderTest, AzureFeedStub]]:
    """A site whose config.json reads Azure's change feed: QIDO-RS through
    the stand-in to a real Orthanc, two studies in it and in the feed, sent
    by `initial`."""
    under_test = HarvestUnderTest(
        tmp_path, service, "dicomweb", section_extra={"change_feed": "azure"}
    )
    front = AzureFeedStub(under_test.orthanc.url)
    try:
        under_test.set_section(url=front.root)
        for pk in under_test.add_studies(2):
            front.create(under_test.uids[pk], sop=new_uid())
        assert main(["initial", *under_test.configs]) == EXIT_OK
        assert sorted(_posted(service)) == sorted(under_test.studies)
        service.clear()
        yield under_test, front
    finally:
        front.stop()
        under_test.close()


def _posted(service: CentralService) -> list[int]:
    return [r.json["study_pk"] for r in service.received if r.method == "POST"]


@needs_orthanc
def test_a_tick_reads_only_the_feed_and_sends_what_it_names(azure: Any, service: Any) -> None:
    under_test, front = azure
    asked = len(front.seen)
    assert main(under_test.configs) == EXIT_OK  # nothing changed
    assert _posted(service) == []
    assert [s.path.split("?")[0] for s in front.seen[asked:]] == ["/v1/changefeed/latest"]

    changed, deleted = sorted(under_test.studies)
    under_test.change(changed)  # a series added: its instance is a create
    front.create(under_test.uids[changed], series=new_uid(), sop=new_uid())
    [added] = under_test.add_studies(1)
    front.create(under_test.uids[added], sop=new_uid())
    under_test.delete(deleted)
    front.delete(under_test.uids[deleted], sop=new_uid())
    asked = len(front.seen)
    assert main(under_test.configs) == EXIT_OK

    assert sorted(_posted(service)) == sorted([changed, added])
    [document] = [d for d in service.documents if d["study_pk"] == changed]
    assert document["study_series"] == 2
    assert [r for r in service.received if r.method == "DELETE"] != []
    assert under_test.queue()[deleted]["status"] == "deleted"
    queries = [s.path for s in front.seen[asked:] if s.path.startswith("/v1/studies?")]
    assert queries and all("StudyInstanceUID=" in q for q in queries)  # no StudyDate window
    assert not any("StudyDate=" in q for q in queries)


@needs_orthanc
def test_a_feed_that_repeats_a_page_stops_the_run_with_one_line(
    azure: Any, service: Any, capsys: Any
) -> None:
    under_test, front = azure
    [added] = under_test.add_studies(1)
    front.create(under_test.uids[added], sop=new_uid())
    front.repeat_from = 0  # the page after the cursor is the feed's first, again
    capsys.readouterr()

    assert main(under_test.configs) == EXIT_DATABASE

    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "the feed does not advance" in lines[0], lines
    assert under_test.uids[added] not in lines[0]
    assert _posted(service) == []
    front.repeat_from = None  # mended: the next tick sends it
    assert main(under_test.configs) == EXIT_OK
    assert _posted(service) == [added]


@needs_orthanc
def test_a_feed_reset_is_one_warning_and_the_archive_listed(
    azure: Any, service: Any, capsys: Any
) -> None:
    under_test, front = azure
    front.reset()  # its history lost: the newest sequence is now below the cursor
    [added] = under_test.add_studies(1)
    front.create(under_test.uids[added], sop=new_uid())
    capsys.readouterr()

    assert main(under_test.configs) == EXIT_OK

    err = capsys.readouterr().err
    assert err.count("no longer goes back to where this indexer left it") == 1, err
    assert _posted(service) == [added]  # listed whole, only what changed sent
