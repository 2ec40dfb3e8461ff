"""The DICOMweb Finder (dicom_indexer/sources/dicomweb.py) against a real
Orthanc with its DICOMweb plugin, loaded once with a small archive (dated,
undated and untimed studies, several modalities, names in several scripts
and component groups), and behind a hostile front (dev/hostile_http.py)
for what Orthanc never answers: a Warning, a 413, a refusal, a page that is
not DICOM JSON, a trickle. Each test asserts what the Finder decided: the
studies and values it found, whether it calls the answer complete, and the
one line it gives when the PACS cannot be asked, with no secret in it."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import pytest
from conftest import free_port
from hostile_http import HeaderFront, HeaderRule, Rule
from testkit import (
    ORTHANC_BINARY,
    OrthancServer,
    dicom_instance_with,
    dicomweb_orthanc_settings,
    new_uid,
    store_instances,
)

from dicom_indexer.config import DicomwebSettings
from dicom_indexer.errors import EXIT_DATABASE
from dicom_indexer.http import STALLED_DEADLINES, RunEnding
from dicom_indexer.logs import Secrets
from dicom_indexer.sources.dicomweb import DICOMWEB_BODY_BYTES, DICOMWEB_PAGE, DicomwebFinder
from dicom_indexer.sources.finding import FoundSeries, FoundStudy, PacsUnavailable, StudyQuery

pytestmark = pytest.mark.skipif(
    not os.path.exists(ORTHANC_BINARY)
    or not os.path.exists(dicomweb_orthanc_settings()["Plugins"][0]),
    reason="needs Debian's orthanc and orthanc-dicomweb packages (.ci/run installs them)",
)

DAY1, DAY2 = "20240301", "20240302"
STUDIES = "/dicom-web/studies$"  # a front's rule for study queries (paths without their query)
INCLUDE = "includefield=00081030&includefield=00080061&includefield=00201206" + (
    "&includefield=00201208&includefield=00080201"
)
TOKEN = "tok-3f9a1c77e2b54d0c"


def _archive() -> list[dict[str, Any]]:
    """The studies the module's Orthanc holds: a label, and dicom_instance_with's arguments."""
    studies: list[dict[str, Any]] = []

    def add(label: str, patient_id: str, **kwargs: Any) -> None:
        studies.append({"label": label, "patient_id": patient_id, **kwargs})

    for n in range(10):
        add(f"d1-{n}", f"P1{n}", study_date=DAY1, study_time=f"0800{n:02d}")
    for n in range(5):
        add(f"d2-{n}", f"Q2{n}", study_date=DAY2)
    for n, day in enumerate(("20230115", "20230301", "20230630", "20231001", "20231231")):
        add(f"y23-{n}", f"R3{n}", study_date=day)
    add("multi", "M40", study_date="20220505", modalities=("CT", "MR"))
    add("untimed", "M41", study_date="20220505", absent=("StudyTime",))
    add("spanish", "S50", study_date="20210101", patient_name="Muñoz^José")
    add("czech", "S51", study_date="20210101", patient_name="Dvořák^Antonín")
    add("greek", "S52", study_date="20210101", patient_name="Παπαδόπουλος^Νίκος")
    add("two-groups", "S53", study_date="20210202", patient_name="Wang^XiaoDong=王^小東")
    add("empty-middle", "S54", study_date="20210202", patient_name="Yamada^Tarou==やまだ^たろう")
    add("no-description", "S55", study_date="20210202", study_description=None)
    add("undated-0", "U60", absent=("StudyDate", "StudyTime"), timezone_offset="-0300")
    add("undated-1", "U61", absent=("StudyDate",))
    add("undated-2", "U62", absent=("StudyDate", "StudyTime"))
    return studies


@pytest.fixture(scope="module")
def archive(tmp_path_factory: Any) -> Iterator[tuple[OrthancServer, dict[str, str]]]:
    """One Orthanc with the DICOMweb plugin for the module, and the UID of each labelled study."""
    orthanc = OrthancServer(tmp_path_factory.mktemp("dicomweb"), **dicomweb_orthanc_settings())
    try:
        uids, instances = {}, []
        for spec in _archive():
            spec = dict(spec)
            label, uid = spec.pop("label"), new_uid()
            uids[label] = uid
            for modality in spec.pop("modalities", ("CT",)):
                instances.append(dicom_instance_with(study_uid=uid, modality=modality, **spec))
        store_instances(orthanc, instances)
        yield orthanc, uids
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def module_front(archive: Any) -> Iterator[HeaderFront]:
    hostile = HeaderFront(archive[0].url)
    yield hostile
    hostile.stop()


@pytest.fixture
def front(module_front: HeaderFront) -> HeaderFront:
    """The module's hostile front, with no rule and nothing seen yet."""
    with module_front.lock:
        module_front.rules.clear()
        module_front.seen.clear()
    return module_front


def _settings(
    url: str,
    auth: str = "basic",
    password: str = OrthancServer.PASSWORD,
    token: str = "",
    result_cap: int | None = None,
    timeouts: tuple[float, float] = (2, 10),
) -> DicomwebSettings:
    return DicomwebSettings(
        url=url + "/dicom-web",
        auth=auth,
        user=OrthancServer.USER if auth == "basic" else "",
        password=password if auth == "basic" else "",
        token=token,
        ca_bundle=None,
        result_cap=result_cap,
        change_feed="none",
        connect_timeout_seconds=timeouts[0],
        read_timeout_seconds=timeouts[1],
        secrets=Secrets(password, token),
    )


@pytest.fixture
def finder(archive: Any) -> Iterator[DicomwebFinder]:
    found = DicomwebFinder(_settings(archive[0].url))
    yield found
    found.close()


def _day(text: str | None) -> Any:
    import datetime

    return None if text is None else datetime.datetime.strptime(text, "%Y%m%d").date()


def _labels(uids: dict[str, str], studies: list[FoundStudy]) -> set[str]:
    by_uid = {uid: label for label, uid in uids.items()}
    return {by_uid[s.study_iuid] for s in studies}


# -- what a query finds ------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (DAY1, DAY1, {f"d1-{n}" for n in range(10)}),
        (DAY1, DAY2, {f"d1-{n}" for n in range(10)} | {f"d2-{n}" for n in range(5)}),
        (DAY2, None, {f"d2-{n}" for n in range(5)}),
        (
            None,
            "20221231",
            {"multi", "untimed", "spanish", "czech", "greek", "two-groups", "empty-middle"}
            | {"no-description"},
        ),
        # Undated studies match no range, however wide.
        ("19000101", "29991231", {s["label"] for s in _archive() if "undated" not in s["label"]}),
    ],
)
def test_a_date_range_finds_the_studies_of_those_days_and_says_it_found_them_all(
    archive, finder, start, end, expected
):
    result = finder.find_studies(StudyQuery(_day(start), _day(end), dated=True))
    assert (_labels(archive[1], result.studies), result.complete, result.problem) == (
        expected,
        True,
        "",
    )


def test_undated_studies_are_found_by_a_patient_id_prefix(archive, finder):
    result = finder.find_studies(StudyQuery(patient_id_prefix="U"))
    assert _labels(archive[1], result.studies) == {"undated-0", "undated-1", "undated-2"}
    assert result.complete
    # The same prefix within a date range: none (a range never matches them).
    dated = finder.find_studies(
        StudyQuery(_day("19000101"), None, patient_id_prefix="U", dated=True)
    )
    assert (dated.studies, dated.complete) == ([], True)


def test_a_uid_list_of_50_finds_the_studies_the_pacs_holds(archive, finder):
    uids = archive[1]
    unknown = tuple(new_uid() for _ in range(50 - len(uids)))
    assert finder.max_uids_per_query == 50
    result = finder.find_studies(StudyQuery(study_uids=tuple(uids.values()) + unknown))
    assert (_labels(uids, result.studies), result.complete) == (set(uids), True)


def test_each_study_carries_its_values_as_answered(archive, finder):
    uids = archive[1]
    result = finder.find_studies(StudyQuery(study_uids=tuple(uids.values())))
    found = {
        label: next(s for s in result.studies if s.study_iuid == uid) for label, uid in uids.items()
    }
    assert found["d1-3"] == FoundStudy(
        study_iuid=uids["d1-3"],
        patient_id="P13",
        patient_name="PEREZ^JUAN",
        study_date=DAY1,
        study_time="080003",
        timezone_offset=None,
        study_description="TC DE CEREBRO",
        modalities=("CT",),
        series_count=1,
        instance_count=1,
    )
    multi = found["multi"]
    assert (sorted(multi.modalities or ()), multi.series_count, multi.instance_count) == (
        ["CT", "MR"],
        2,
        2,
    )
    assert (found["untimed"].study_date, found["untimed"].study_time) == ("20220505", None)
    names = {label: found[label].patient_name for label in ("spanish", "czech", "greek")}
    assert names == {
        "spanish": "Muñoz^José",
        "czech": "Dvořák^Antonín",
        "greek": "Παπαδόπουλος^Νίκος",
    }
    # The groups as answered: an empty middle group kept (values.py trims).
    assert found["two-groups"].patient_name == "Wang^XiaoDong=王^小東"
    assert found["empty-middle"].patient_name == "Yamada^Tarou==やまだ^たろう"
    assert found["no-description"].study_description is None
    undated = found["undated-0"]
    assert (undated.study_date, undated.study_time, undated.timezone_offset) == (
        None,
        None,
        "-0300",
    )
    assert {s.problem for s in result.studies} == {None}


def test_the_query_string_is_written_by_hand_and_never_pages(archive, front):
    finder = DicomwebFinder(_settings(front.url))
    try:
        result = finder.find_studies(
            StudyQuery(_day(DAY1), _day(DAY2), patient_id_prefix="P1", dated=True)
        )
        two = tuple(archive[1][label] for label in ("d1-0", "d2-0"))
        by_uid = finder.find_studies(StudyQuery(study_uids=two))
        with pytest.raises(ValueError, match="PatientID prefix"):
            finder.find_studies(StudyQuery(patient_id_prefix="P*"))
    finally:
        finder.close()
    assert _labels(archive[1], result.studies) == {f"d1-{n}" for n in range(10)}
    assert len(by_uid.studies) == 2
    # `*`, `-` and `,` raw: Orthanc matches nothing percent-encoded.
    assert [seen.path for seen in front.seen] == [
        f"/dicom-web/studies?StudyDate={DAY1}-{DAY2}&PatientID=P1*&{INCLUDE}&limit={DICOMWEB_PAGE}",
        f"/dicom-web/studies?StudyInstanceUID={','.join(two)}&{INCLUDE}&limit={DICOMWEB_PAGE}",
    ]


def test_a_page_as_full_as_asked_is_not_complete(archive):
    finder = DicomwebFinder(_settings(archive[0].url, result_cap=10))
    try:
        full = finder.find_studies(StudyQuery(_day(DAY1), _day(DAY2), dated=True))
        under = finder.find_studies(StudyQuery(_day(DAY2), _day(DAY2), dated=True))
        # A UID list's answer can never fill a page.
        assert finder.max_uids_per_query == 9
    finally:
        finder.close()
    assert (len(full.studies), full.complete) == (10, False)
    assert full.problem == (
        f"DICOMweb at {archive[0].url}/dicom-web answered a full page (10 studies, as many as"
        " asked): more may match"
    )
    assert (len(under.studies), under.complete) == (5, True)


# -- what the PACS answers, hostile or refusing -----------------------------------------

WHERE = "DICOMweb at {}/dicom-web"
GOOD = {
    "0020000D": {"vr": "UI", "Value": ["1.2.3.4.5.6"]},
    "00100020": {"vr": "LO", "Value": ["X1"]},
}
BAD_ID = {
    "0020000D": {"vr": "UI", "Value": ["1.2.3.4.5.7"]},
    "00100020": {"vr": "LO", "Value": [12]},
}
NO_UID = {"00100020": {"vr": "LO", "Value": ["X2"]}}


@pytest.mark.parametrize(
    ("rule", "found", "complete", "problem"),
    [
        (
            HeaderRule(
                STUDIES, headers={"Warning": '299 pacs:8080 "There are 3 additional results"'}
            ),
            10,
            False,
            ' warns that its answer is partial (10 studies; Warning: 299 pacs:8080 "There are 3'
            ' additional results")',
        ),
        (
            Rule(STUDIES, status=413, body=b""),
            0,
            False,
            ": refused the query as matching too many studies (HTTP 413)",
        ),
        (
            # A reason that names a UID: never repeated.
            Rule(STUDIES, status=400, body=b'{"errorMessage": "no wildcard for 1.2.840.99.1"}'),
            0,
            False,
            ": refused the query (HTTP 400: no wildcard for <UID>)",
        ),
        (
            Rule(STUDIES, status=500, body=b"Internal error\n  in the database"),
            0,
            False,
            ": answered the query with HTTP 500 (a passing fault, or a query it cannot do:"
            " Internal error in the database)",
        ),
        (Rule(STUDIES, status=204, body=b""), 0, True, ""),
        (Rule(STUDIES, status=200, body=b"[]"), 0, True, ""),
        (
            Rule(STUDIES, status=200, body=b"<html>proxy</html>"),
            0,
            False,
            ": the answer is not JSON (a proxy's page?)",
        ),
        (
            Rule(STUDIES, status=200, body=b'{"0020000D": {}}'),
            0,
            False,
            ": the answer is not a list (a proxy's page?)",
        ),
        (
            Rule(STUDIES, status=200, body=json.dumps([GOOD, NO_UID]).encode()),
            0,
            False,
            ": study 2 of the answer has no readable StudyInstanceUID",
        ),
        (
            Rule(STUDIES, pad_bytes=DICOMWEB_BODY_BYTES),
            0,
            False,
            ": answered the query with more than 64 MB: not read",
        ),
    ],
    ids=[
        "warning-299",
        "413",
        "400",
        "500",
        "204",
        "empty",
        "not-json",
        "not-a-list",
        "no-uid",
        "too-large",
    ],
)
def test_what_a_study_query_answer_means(archive, front, rule, found, complete, problem):
    front.rules.append(rule)
    finder = DicomwebFinder(_settings(front.url))
    try:
        result = finder.find_studies(StudyQuery(_day(DAY1), _day(DAY1), dated=True))
    finally:
        finder.close()
    where = WHERE.format(front.url)
    assert (len(result.studies), result.complete, result.problem) == (
        found,
        complete,
        where + problem if problem else "",
    )


def test_a_study_answered_wrongly_is_that_study_s_alone(archive, front):
    front.rules.append(Rule(STUDIES, status=200, body=json.dumps([GOOD, BAD_ID]).encode()))
    finder = DicomwebFinder(_settings(front.url))
    try:
        result = finder.find_studies(StudyQuery(patient_id_prefix="X"))
    finally:
        finder.close()
    assert result.complete
    assert result.studies == [
        FoundStudy(study_iuid="1.2.3.4.5.6", patient_id="X1"),
        FoundStudy(
            study_iuid="1.2.3.4.5.7",
            problem="the DICOMweb answer for study 1.2.3.4.5.7 has a PatientID (0010,0020)"
            " that is not text",
        ),
    ]


def test_the_series_of_a_study(archive, finder, front):
    uids = archive[1]
    series = finder.find_series(uids["multi"])
    assert sorted(series, key=lambda s: s.modality or "") == [
        FoundSeries(modality="CT", instance_count=1),
        FoundSeries(modality="MR", instance_count=1),
    ]
    assert finder.find_series(new_uid()) == []  # a study the PACS no longer has
    front.rules.append(
        Rule("/series$", status=200, body=b'[{"00080060": {"vr": "CS", "Value": [5]}}]', times=1)
    )
    front.rules.append(Rule("/series$", status=500))
    hostile = DicomwebFinder(_settings(front.url))
    try:
        with pytest.raises(ValueError) as wrong:
            hostile.find_series(uids["multi"])
        with pytest.raises(ValueError) as failing:
            hostile.find_series(uids["multi"])
    finally:
        hostile.close()
    where = WHERE.format(front.url)
    assert str(wrong.value) == (
        f"{where}: the answer for the series of study {uids['multi']} has a Modality (0008,0060)"
        " that is not text"
    )
    assert str(failing.value).startswith(
        f"{where}: answered the series of study {uids['multi']} with HTTP 500"
    )


# -- check -------------------------------------------------------------------------


def test_check_names_the_service_and_what_it_answers(archive, finder):
    url = archive[0].url
    assert finder.version() == f"DICOMweb at {url}/dicom-web"
    assert finder.describe() == [
        (
            "ok",
            f"source: DICOMweb at {url}/dicom-web (auth basic, user indexer) answers QIDO-RS",
            0,
        ),
        ("ok", "answers study-level counts and modalities", 0),
        (
            "ok",
            f"result cap: not configured (dicomweb.result_cap): a query asks for {DICOMWEB_PAGE}"
            " studies, and a full page is split",
            0,
        ),
    ]


def test_check_warns_of_missing_counts_and_a_latin1_character_set(archive, front):
    study = {
        "00080005": {"vr": "CS", "Value": ["ISO_IR 100"]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3.4.5.6"]},
        "00080061": {"vr": "CS", "Value": ["CT"]},
    }
    body = json.dumps([study]).encode()
    front.rules.append(
        HeaderRule(STUDIES, status=200, body=body, headers={"Server": "Acme PACS 7"})
    )
    finder = DicomwebFinder(_settings(front.url, result_cap=500))
    try:
        lines = finder.describe()
        version = finder.version()
    finally:
        finder.close()
    where = WHERE.format(front.url)
    assert version == f"{where} (Acme PACS 7)"
    assert lines == [
        ("ok", f"source: {where} (Acme PACS 7) (auth basic, user indexer) answers QIDO-RS", 0),
        (
            "warning",
            "does not answer NumberOfStudyRelatedSeries nor NumberOfStudyRelatedInstances at study"
            " level: each new or changed study costs one more query, for its series",
            0,
        ),
        ("ok", "result cap: 500 studies a query (dicomweb.result_cap)", 0),
        (
            "warning",
            "character set: answers in ISO_IR 100, not UTF-8 (ISO_IR 192): names in scripts it"
            " lacks are lost (Latin-1 drops all but Western ones); for Orthanc, set"
            ' "DefaultEncoding": "Utf8"',
            0,
        ),
    ]
    assert front.count(STUDIES) == 1  # one probe, for both


# -- who may ask, and a PACS that cannot be asked ------------------------------------


@pytest.mark.parametrize(
    ("auth", "refused"),
    [
        (
            "basic",
            "the credentials of indexer: check dicomweb.user and dicomweb.password in config.json",
        ),
        (
            "none",
            "a query without credentials: set dicomweb.auth, with dicomweb.user and password"
            " (basic) or a token (bearer)",
        ),
    ],
)
def test_credentials_orthanc_refuses_are_one_line_without_them(archive, auth, refused):
    url = archive[0].url
    wrong = "wrong-pw-7d41a9"
    finder = DicomwebFinder(_settings(url, auth=auth, password=wrong))
    try:
        with pytest.raises(PacsUnavailable) as caught:
            finder.find_studies(StudyQuery(patient_id_prefix="P"))
        lines = finder.describe()
    finally:
        finder.close()
    assert str(caught.value) == f"DICOMweb at {url}/dicom-web refused {refused}"
    assert caught.value.exit_code == EXIT_DATABASE
    assert lines == [("FAILED", f"source: {caught.value}", EXIT_DATABASE)]
    assert wrong not in repr(caught.value) + repr(lines)


def test_a_bearer_token_travels_in_its_header_and_never_in_a_message(archive, front):
    front.rules.append(Rule(STUDIES, status=200, body=b"[]", times=1))
    front.rules.append(
        Rule(STUDIES, status=401, body=b'{"error": "invalid token ' + TOKEN.encode() + b'"}')
    )
    finder = DicomwebFinder(_settings(front.url, auth="bearer", token=TOKEN))
    try:
        accepted = finder.find_studies(StudyQuery(patient_id_prefix="P"))
        with pytest.raises(PacsUnavailable) as caught:
            finder.find_studies(StudyQuery(patient_id_prefix="P"))
    finally:
        finder.close()
    assert (accepted.studies, accepted.complete) == ([], True)
    assert [seen.headers.get("Authorization") for seen in front.seen] == [f"Bearer {TOKEN}"] * 2
    assert str(caught.value) == (
        f"DICOMweb at {front.url}/dicom-web refused the token: check dicomweb.token (or"
        " token_file): expired, or not allowed to search studies?"
    )
    assert TOKEN not in repr(caught.value)


def test_a_pacs_that_cannot_be_asked_is_one_line(archive, front):
    url = archive[0].url
    front.rules.append(
        HeaderRule(
            STUDIES,
            status=302,
            body=b"",
            headers={"Location": f"https://elsewhere.example/qido?access_token={TOKEN}"},
        )
    )
    cases = [
        (
            _settings(f"http://127.0.0.1:{free_port()}"),
            "cannot reach DICOMweb at http://127.0.0.1:",
        ),
        (
            _settings(url + "/wrong"),
            f"DICOMweb at {url}/wrong/dicom-web has no QIDO-RS study search (HTTP 404",
        ),
        (
            _settings(front.url, auth="bearer", token=TOKEN),
            f"DICOMweb at {front.url}/dicom-web answered HTTP 302, a redirect to"
            " https://elsewhere.example/qido: check dicomweb.url (a redirect is never followed:"
            " the credentials stay here)",
        ),
    ]
    for settings, line in cases:
        finder = DicomwebFinder(settings)
        try:
            with pytest.raises(PacsUnavailable) as caught:
                finder.version()
        finally:
            finder.close()
        assert str(caught.value).startswith(line)
        assert "\n" not in str(caught.value) and TOKEN not in str(caught.value)


def test_a_trickling_server_ends_the_run_after_three_deadlines(archive, front):
    front.rules.append(Rule(STUDIES, trickle_seconds=0.5))
    finder = DicomwebFinder(_settings(front.url, timeouts=(0.5, 1)))
    query = StudyQuery(_day(DAY1), _day(DAY1), dated=True)
    try:
        first = [finder.find_studies(query) for _ in range(STALLED_DEADLINES - 1)]
        with pytest.raises(RunEnding) as ended:
            finder.find_studies(query)
        with pytest.raises(RunEnding):  # and asks nothing more
            finder.find_studies(query)
    finally:
        finder.close()
    where = WHERE.format(front.url)
    assert {(r.complete, r.problem) for r in first} == {
        (False, f"{where}: no complete answer to the query within 1.5 s")
    }
    assert ended.value.exit_code == EXIT_DATABASE
    assert str(ended.value).startswith(
        f"{where} gave no complete answer within 1.5 s to 3 requests"
    )
    assert front.count(STUDIES) == STALLED_DEADLINES
