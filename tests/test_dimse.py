"""The DIMSE Finder (sources/dimse.py): C-FIND against a real Orthanc with its
DICOM port, and against a scripted SCP (dev/scripted_scp.py) for what Orthanc
cannot show: refusals, a silent cap, missing counts, `*` refused in dates, a
time zone, an abort mid-answer, a trickling PACS, character sets."""

from __future__ import annotations

import datetime
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pynetdicom")

from dev.scripted_scp import CANCEL, RecordStudy, ScriptedScp  # noqa: E402
from dev.testkit import OrthancServer, dicom_instance_keyed, free_port, new_uid  # noqa: E402
from dicom_indexer.config import DimseSettings  # noqa: E402
from dicom_indexer.errors import EXIT_DATABASE  # noqa: E402
from dicom_indexer.http import RunEnding  # noqa: E402
from dicom_indexer.logs import Secrets  # noqa: E402
from dicom_indexer.sources.dimse import DimseFinder  # noqa: E402
from dicom_indexer.sources.finding import PacsUnavailable, StudyQuery  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUR_AE = "DICOM_INDEXER"
TODAY = datetime.date.today()


def dimse_settings(port: int, pacs_ae: str, **changes: Any) -> DimseSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "pacs_ae": pacs_ae,
        "indexer_ae": OUR_AE,
        "tls_ca_bundle": None,
        "tls_certificate": None,
        "tls_key": None,
        "timezone": None,
        "result_cap": None,
        "connect_timeout_seconds": 5.0,
        "read_timeout_seconds": 10.0,
        "secrets": Secrets(),
        **changes,
    }
    return DimseSettings(**values)


def day(text: str) -> datetime.date:
    return datetime.datetime.strptime(text, "%Y%m%d").date()


def dated(start: str | None, end: str | None) -> StudyQuery:
    return StudyQuery(
        date_from=day(start) if start else None, date_to=day(end) if end else None, dated=True
    )


# --------------------------------------------------------------------------
# A real Orthanc, one per module, with a small archive loaded once
# --------------------------------------------------------------------------

# (PatientID, PatientName, StudyDate, StudyTime, modalities (one instance
# each), character set); None: the key is absent.
NAMES = [
    ("Muñoz^José", "ISO_IR 100"),  # Latin-1 file: Orthanc answers it in UTF-8
    ("Wałęsa^Łukasz", "ISO_IR 192"),
    ("Παπαδόπουλος^Νίκος", "ISO_IR 192"),
    ("Wang^XiaoDong=王^小東", "ISO_IR 192"),  # two component groups
    ("Dvořák^Antonín", "ISO_IR 192"),
]


def archive_spec() -> list[dict[str, Any]]:
    specs = []
    for n in range(24):
        name, charset = NAMES[n % len(NAMES)] if n < 10 else (f"PATIENT^NUMBER{n}", "ISO_IR 192")
        specs.append(
            {
                "PatientID": f"{'AB' if n % 3 else 'CD'}{n:04d}",
                "PatientName": name,
                "StudyDate": f"{2015 + n % 10}{1 + n % 12:02d}{1 + n % 27:02d}",
                "StudyTime": f"{8 + n % 10:02d}3000",
                "modalities": ("CT", "MR") if n % 7 == 0 else ("CT",),
                "charset": charset,
            }
        )
    specs += [
        {"PatientID": "UND001", "PatientName": "UNDATED^ONE", "modalities": ("US",)},
        {"PatientID": "UND002", "PatientName": "UNDATED^TWO", "StudyTime": "101010"},
        {"PatientID": "UNT001", "PatientName": "UNTIMED^ONE", "StudyDate": "20200606"},
        {"PatientID": "UNT002", "PatientName": "UNTIMED^TWO", "StudyDate": "20200607"},
        {
            "PatientID": "TODAY1",
            "PatientName": "HOY^UNO",
            "StudyDate": TODAY.strftime("%Y%m%d"),
            "StudyTime": "000001",
            "modalities": ("CT", "PT"),
        },
    ]
    for spec in specs:
        spec["StudyInstanceUID"] = new_uid()
        spec.setdefault("modalities", ("CT",))
        spec.setdefault("charset", "ISO_IR 192")
    return specs


def load(orthanc: OrthancServer, specs: list[dict[str, Any]]) -> None:
    for spec in specs:
        keys = {
            k: spec[k]
            for k in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime")
            if k in spec
        }
        for modality in spec["modalities"]:
            orthanc.upload(dicom_instance_keyed(keys, spec["charset"], modality=modality))


def orthanc_dicom_settings(**extra: Any) -> dict[str, Any]:
    return {
        "DicomServerEnabled": True,
        "DicomPort": free_port(),
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowFind": False,
        "DicomModalities": {"indexer": [OUR_AE, "127.0.0.1", 11112]},
        "DefaultEncoding": "Utf8",
        **extra,
    }


@pytest.fixture(scope="module")
def archive(tmp_path_factory: Any) -> Any:
    settings = orthanc_dicom_settings()
    orthanc = OrthancServer(tmp_path_factory.mktemp("dimse"), **settings)
    specs = archive_spec()
    try:
        load(orthanc, specs)
        yield orthanc, settings["DicomPort"], specs
    finally:
        orthanc.stop(kill=True)


@pytest.fixture
def finder(archive: Any) -> Any:
    _, port, _ = archive
    finder = DimseFinder(dimse_settings(port, "ORTHANC"))
    yield finder
    finder.close()


def test_orthanc_answers_every_study_with_its_values_decoded(finder: Any, archive: Any) -> None:
    _, _, specs = archive
    result = finder.find_studies(StudyQuery())
    assert result.complete, result.problem
    found = {s.study_iuid: s for s in result.studies}
    assert set(found) == {spec["StudyInstanceUID"] for spec in specs}
    for spec in specs:
        study = found[spec["StudyInstanceUID"]]
        assert study.problem is None
        assert study.patient_id == spec["PatientID"]
        assert study.patient_name == spec["PatientName"]  # accents, Polish, Greek, 2 groups
        assert (study.study_date or None) == spec.get("StudyDate")
        assert (study.study_time or "").split(".")[0] == spec.get("StudyTime", "")
        assert study.modalities == tuple(sorted(spec["modalities"]))
        assert study.series_count == len(spec["modalities"])
        assert study.instance_count == len(spec["modalities"])
        assert study.timezone_offset is None  # Orthanc never answers it
    assert finder.character_sets == {"ISO_IR 192"}


def test_orthanc_matches_date_ranges_prefixes_and_uid_lists(finder: Any, archive: Any) -> None:
    _, _, specs = archive

    def uids(query: StudyQuery) -> set[str]:
        result = finder.find_studies(query)
        assert result.complete, result.problem
        return {s.study_iuid for s in result.studies}

    def expected(keep: Any) -> set[str]:
        return {s["StudyInstanceUID"] for s in specs if keep(s)}

    assert uids(dated("20200101", "20201231")) == expected(
        lambda s: "20200101" <= s.get("StudyDate", "") <= "20201231"
    )
    # Open ends; undated studies match no range, not even the widest.
    assert uids(dated("20230101", None)) == expected(lambda s: s.get("StudyDate", "") >= "20230101")
    assert uids(dated(None, "20151231")) == expected(
        lambda s: "" < s.get("StudyDate", "") <= "20151231"
    )
    assert uids(dated("19000101", "29991231")) == expected(lambda s: "StudyDate" in s)
    assert uids(StudyQuery(patient_id_prefix="AB")) == expected(
        lambda s: s["PatientID"].startswith("AB")
    )
    # The undated are found by PatientID alone.
    assert uids(StudyQuery(patient_id_prefix="UND")) == expected(lambda s: "StudyDate" not in s)
    wanted = tuple(s["StudyInstanceUID"] for s in specs[::4])
    assert uids(StudyQuery(study_uids=wanted)) == set(wanted)
    assert uids(StudyQuery(study_uids=(specs[0]["StudyInstanceUID"],))) == {
        specs[0]["StudyInstanceUID"]
    }
    two = next(s for s in specs if len(s["modalities"]) == 2)
    series = finder.find_series(two["StudyInstanceUID"])
    assert sorted((s.modality, s.instance_count) for s in series) == [
        (m, 1) for m in sorted(two["modalities"])
    ]


def test_one_association_reused_with_tcp_nodelay(finder: Any) -> None:
    for n in range(4):
        assert finder.find_studies(dated("20200101", f"202001{n + 10}")).complete
    finder.find_series(new_uid())
    assert finder.associations == 1
    sock = finder.assoc.dul.socket.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finder.close()
    assert finder.assoc is None
    assert finder.find_studies(StudyQuery(patient_id_prefix="ZZZ")).complete
    assert finder.associations == 2


def test_orthanc_check_lines(finder: Any, archive: Any) -> None:
    _, port, _ = archive
    lines = finder.describe()
    assert lines == [
        ("ok", f"source: PACS ORTHANC at 127.0.0.1:{port} (C-FIND as {OUR_AE})", 0),
        ("ok", "answers: study-level counts and ModalitiesInStudy", 0),
        ("ok", "character set: answers in ISO_IR 192", 0),
    ]
    assert finder.version().startswith(f"PACS ORTHANC at 127.0.0.1:{port}")


def test_orthanc_aborts_an_unregistered_ae(archive: Any) -> None:
    _, port, _ = archive
    stranger = DimseFinder(dimse_settings(port, "ORTHANC", indexer_ae="STRANGER"))
    with pytest.raises(PacsUnavailable) as caught:
        stranger.find_studies(StudyQuery(patient_id_prefix="AB"))
    assert str(caught.value) == (
        f"PACS ORTHANC at 127.0.0.1:{port} aborted the association when asked C-FIND: is our AE"
        " title STRANGER registered in it, with C-FIND allowed?"
    )
    assert caught.value.exit_code == EXIT_DATABASE
    assert stranger.describe() == [("FAILED", f"source: {caught.value}", EXIT_DATABASE)]
    stranger.close()


def test_orthanc_rejects_a_wrong_called_ae(archive: Any) -> None:
    _, port, _ = archive
    wrong = DimseFinder(dimse_settings(port, "NOT_ORTHANC"))
    with pytest.raises(PacsUnavailable) as caught:
        wrong.find_studies(StudyQuery())
    assert str(caught.value) == (
        f"PACS NOT_ORTHANC at 127.0.0.1:{port} (C-FIND as {OUR_AE}) rejected the association:"
        " Called AE title not recognised (Rejected Permanent, by the Service User): check"
        " dimse.pacs_ae"
    )


def test_orthanc_cap_and_latin1_answers(tmp_path: Path) -> None:
    """LimitFindResults: Orthanc answers that many, then Cancel (0xFE00);
    its default encoding (Latin-1) drops letters, and check says so."""
    settings = orthanc_dicom_settings(LimitFindResults=2, DefaultEncoding="Latin1")
    orthanc = OrthancServer(tmp_path / "capped", **settings)
    try:
        every = archive_spec()
        specs = [every[1], every[3], every[-1]]  # Polish, Chinese, and one dated today
        load(orthanc, specs)
        finder = DimseFinder(dimse_settings(settings["DicomPort"], "ORTHANC"))
        result = finder.find_studies(StudyQuery())
        assert (len(result.studies), result.complete) == (2, False)
        assert result.problem == "cancelled by the PACS (0xFE00: Orthanc's result cap)"
        lines = finder.describe()
        assert lines[2] == (
            "warning",
            "character set: answers in ISO_IR 100 although ISO_IR 192 (UTF-8) was asked: names"
            ' in other scripts lose their letters; on Orthanc set DefaultEncoding to "Utf8"',
            0,
        )
        finder.close()
    finally:
        orthanc.stop(kill=True)


# --------------------------------------------------------------------------
# The scripted SCP: what Orthanc cannot show
# --------------------------------------------------------------------------

SCP_RECORD = [
    RecordStudy(
        f"1.2.826.0.1.{n}",
        {
            "PatientID": f"ABC{n:03d}" if n % 2 else f"XYZ{n:03d}",
            "PatientName": "Wałęsa^Łukasz" if n == 1 else f"P^{n}",
            "StudyDate": f"202401{n + 1:02d}",
            "StudyTime": "101010",
        },
        series=(("CT", 2), ("MR", 1)) if n == 3 else (("CT", 1),),
    )
    for n in range(8)
] + [
    RecordStudy("1.2.826.0.2.1", {"PatientID": "UND1"}),  # undated
    RecordStudy(
        "1.2.826.0.3.1",
        {"PatientID": "JP1", "PatientName": "Yamada^Tarou=山田^太郎=やまだ^たろう"},
        charset=["", "ISO 2022 IR 87"],
    ),
    RecordStudy(
        "1.2.826.0.3.2",
        {"PatientID": "KR1", "PatientName": "Hong^Gildong=洪^吉洞=홍^길동"},
        charset=["", "ISO 2022 IR 149"],
    ),
    RecordStudy(
        "1.2.826.0.3.3",
        {"PatientID": "CN1", "PatientName": "Wang^XiaoDong=王^小东", "StudyDate": "20240101"},
        charset="GB18030",
    ),
    RecordStudy(
        "1.2.826.0.3.4",
        {"PatientID": "TODAY", "StudyDate": TODAY.strftime("%Y%m%d"), "PatientName": "HOY^X"},
    ),
]
BAD_NAME = b"Ja\xc3\x28n^Bad"  # not UTF-8
UNDECODABLE = RecordStudy("1.2.826.0.4.1", {"PatientID": "BAD1", "PatientName": BAD_NAME})


@pytest.fixture(scope="module")
def scripted() -> Any:
    scp = ScriptedScp([*SCP_RECORD, UNDECODABLE])
    yield scp
    scp.stop()


@pytest.fixture
def scp(scripted: ScriptedScp) -> Any:
    scripted.set_script()
    yield scripted
    scripted.set_script()


@pytest.fixture
def scp_finder(scp: ScriptedScp) -> Any:
    finder = DimseFinder(dimse_settings(scp.port, scp.ae_title))
    yield finder
    finder.close()


def test_queries_sent_as_keys_one_association(scp: ScriptedScp, scp_finder: Any) -> None:
    scp_finder.find_studies(dated("20240102", "20240104"))
    scp_finder.find_studies(StudyQuery(patient_id_prefix="ABC"))
    uids = tuple(s.uid for s in SCP_RECORD[:3])
    result = scp_finder.find_studies(StudyQuery(study_uids=uids))
    assert {s.study_iuid for s in result.studies} == set(uids)
    queries = scp.queries()
    assert [(q.level, q.keys["StudyDate"], q.keys["PatientID"]) for q in queries] == [
        ("STUDY", "20240102-20240104", ""),
        ("STUDY", "", "ABC*"),
        ("STUDY", "", ""),
    ]
    assert queries[2].keys["StudyInstanceUID"] == "\\".join(uids)
    assert set(queries[0].keys) >= {
        "StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyTime",
        "TimezoneOffsetFromUTC", "StudyDescription", "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    }  # fmt: skip
    assert len({q.requestor_port for q in queries}) == 1  # one association
    sock = scp_finder.assoc.dul.socket.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (0xC000, "refused: unable to process (0xC000: too broad a query, or a fault)"),
        (0xA700, "refused: out of resources (0xA700)"),
        (CANCEL, "cancelled by the PACS (0xFE00: Orthanc's result cap)"),
    ],
)
def test_refusals_are_incomplete(
    scp: ScriptedScp, scp_finder: Any, status: int, problem: str
) -> None:
    scp.set_script(over=3, over_status=status)
    result = scp_finder.find_studies(StudyQuery())
    assert (result.complete, result.problem) == (False, problem)
    assert len(result.studies) == (3 if status == CANCEL else 0)
    narrow = scp_finder.find_studies(dated("20240101", "20240102"))  # 3 at most: answered
    assert narrow.complete and len(narrow.studies) == 3
    assert scp_finder.associations == 1  # a refusal keeps the association


def test_a_silent_cap_is_the_pacs_word(scp: ScriptedScp, scp_finder: Any) -> None:
    """Success after 4: complete by the PACS's word (the harvest distrusts
    a count at a cap, not the Finder)."""
    scp.set_script(over=4, over_status=None)
    result = scp_finder.find_studies(StudyQuery())
    assert (result.complete, len(result.studies)) == (True, 4)


def test_a_pacs_answering_more_than_a_query_may_bring_is_not_read_further(
    scp: ScriptedScp,
) -> None:
    """No cap of its own: past result_cap (else MAX_ANSWERS) answers the
    query is cut, not whole, and the next query still gets its answer."""
    finder = DimseFinder(dimse_settings(scp.port, scp.ae_title, result_cap=3))
    try:
        result = finder.find_studies(StudyQuery())
        assert (result.complete, len(result.studies)) == (False, 3)
        assert result.problem == "more than 3 answers: not read further"
        again = finder.find_studies(StudyQuery(study_uids=("1.2.826.0.2.1",)))
        assert (again.complete, [s.study_iuid for s in again.studies]) == (True, ["1.2.826.0.2.1"])
    finally:
        finder.close()


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 (a PACS's), made
    with openssl; and a CA that signed nothing here."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")  # fmt: skip
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "pacs.key", "-out", "pacs.csr")  # fmt: skip
    run("x509", "-req", "-in", "pacs.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "pacs.pem")  # fmt: skip
    return {name: directory / name for name in ("ca.pem", "other-ca.pem", "pacs.pem", "pacs.key")}


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")
def test_dicom_over_tls_checks_the_pacs_certificate(tmp_path: Path) -> None:
    """dimse.tls_ca_bundle: the PACS's certificate checked against that CA
    (a query answered); signed by another, one line and no query."""
    import ssl

    files = _certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files["pacs.pem"], files["pacs.key"])
    scp = ScriptedScp(SCP_RECORD, ae_title="TLSPACS", ssl_context=context)
    try:
        finder = DimseFinder(
            dimse_settings(scp.port, "TLSPACS", tls_ca_bundle=str(files["ca.pem"]))
        )
        try:
            result = finder.find_studies(StudyQuery(study_uids=("1.2.826.0.2.1",)))
            assert [s.study_iuid for s in result.studies] == ["1.2.826.0.2.1"]
            assert ", TLS)" in finder.describe()[0][1]
        finally:
            finder.close()
        stranger = DimseFinder(
            dimse_settings(scp.port, "TLSPACS", tls_ca_bundle=str(files["other-ca.pem"]))
        )
        try:
            with pytest.raises(PacsUnavailable) as refused:
                stranger.find_studies(StudyQuery())
            assert "TLS failed" in str(refused.value)
            assert "\n" not in str(refused.value)
        finally:
            stranger.close()
    finally:
        scp.stop()


def test_missing_counts_and_modalities_are_none(scp: ScriptedScp, scp_finder: Any) -> None:
    scp.set_script(no_counts=True, no_modalities=True)
    result = scp_finder.find_studies(dated("20240104", "20240104"))
    (study,) = result.studies
    assert (study.modalities, study.series_count, study.instance_count) == (None, None, None)
    series = scp_finder.find_series(study.study_iuid)
    assert sorted((s.modality, s.instance_count) for s in series) == [("CT", 2), ("MR", 1)]
    assert scp_finder.describe()[1] == (
        "warning",
        "answers: without NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances,"
        " ModalitiesInStudy at study level: each new or changed study costs a SERIES query",
        0,
    )


def test_no_star_in_dates_and_a_time_zone(scp: ScriptedScp, scp_finder: Any) -> None:
    """A PACS refusing `*` in dates: the Finder never sends one (no key
    for all dates); a TimezoneOffsetFromUTC answered is returned."""
    scp.set_script(refuse_in_dates="*", timezone_offset="-0300")
    result = scp_finder.find_studies(StudyQuery(patient_id_prefix="ABC"))
    assert result.complete and len(result.studies) == 4
    assert {s.timezone_offset for s in result.studies} == {"-0300"}
    assert all("*" not in q.keys["StudyDate"] for q in scp.queries())


def test_character_sets_and_an_undecodable_answer(scp_finder: Any) -> None:
    result = scp_finder.find_studies(StudyQuery())
    assert result.complete
    names = {s.study_iuid: s.patient_name for s in result.studies}
    assert names["1.2.826.0.3.1"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert names["1.2.826.0.3.2"] == "Hong^Gildong=洪^吉洞=홍^길동"
    assert names["1.2.826.0.3.3"] == "Wang^XiaoDong=王^小东"
    assert names["1.2.826.0.1.1"] == "Wałęsa^Łukasz"
    bad = next(s for s in result.studies if s.study_iuid == UNDECODABLE.uid)
    assert bad.problem == "its values cannot be decoded in its character set 'ISO_IR 192'"
    assert bad.patient_name is None
    assert len(result.studies) == len(SCP_RECORD) + 1  # the others are whole


def test_abort_mid_answer_is_incomplete(scp: ScriptedScp, scp_finder: Any) -> None:
    scp.set_script(abort_after=2)
    result = scp_finder.find_studies(StudyQuery())
    assert (result.complete, len(result.studies)) == (False, 2)
    assert result.problem == "the PACS aborted the association after 2 answers"
    scp.set_script()
    assert scp_finder.find_studies(StudyQuery()).complete  # a new association
    assert scp_finder.associations == 2


def test_an_association_closed_between_queries_is_opened_again(
    scp: ScriptedScp, scp_finder: Any
) -> None:
    assert scp_finder.find_studies(StudyQuery(patient_id_prefix="ABC")).complete
    for assoc in scp.server.active_associations:
        assoc.abort()
    result = scp_finder.find_studies(StudyQuery(patient_id_prefix="ABC"))
    assert result.complete and len(result.studies) == 4
    assert scp_finder.associations == 2


def test_a_trickling_pacs_ends_the_run(scp: ScriptedScp) -> None:
    """Each answer comes well within the DIMSE timeout, the whole query
    does not: incomplete; the third such query in a row ends the run."""
    scp.set_script(trickle_seconds=0.15)
    finder = DimseFinder(
        dimse_settings(
            scp.port, scp.ae_title, connect_timeout_seconds=0.2, read_timeout_seconds=0.4
        )
    )
    try:
        for _ in range(2):
            result = finder.find_studies(StudyQuery())
            assert not result.complete
            assert result.problem.startswith("no complete answer within 0.6 s (")
        with pytest.raises(RunEnding) as caught:
            finder.find_studies(StudyQuery())
        assert caught.value.exit_code == EXIT_DATABASE
        assert str(caught.value).startswith(
            f"PACS {scp.ae_title} at 127.0.0.1:{scp.port} gave no complete answer within 0.6 s"
            " to 3 C-FIND queries in a row"
        )
    finally:
        finder.close()


def test_an_answer_in_time_resets_the_stall_count(scp: ScriptedScp) -> None:
    finder = DimseFinder(
        dimse_settings(
            scp.port, scp.ae_title, connect_timeout_seconds=0.2, read_timeout_seconds=0.4
        )
    )
    try:
        for _ in range(2):
            scp.set_script(trickle_seconds=0.15)
            assert not finder.find_studies(StudyQuery()).complete
            scp.set_script()
            assert finder.find_studies(dated("20240101", "20240101")).complete
        assert finder.stalls == 0
    finally:
        finder.close()


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (
            {"reject": True},
            "PACS SCRIPTED at 127.0.0.1:{port} (C-FIND as DICOM_INDEXER) rejected the association:"
            " Calling AE title not recognised (Rejected Permanent, by the Service User): register"
            " our AE title in the PACS",
        ),
        (
            {"abort_on_find": True},
            "PACS SCRIPTED at 127.0.0.1:{port} aborted the association when asked C-FIND: is our"
            " AE title DICOM_INDEXER registered in it, with C-FIND allowed?",
        ),
    ],
)
def test_pacs_unavailable(scp: ScriptedScp, script: dict[str, Any], message: str) -> None:
    scp.set_script(**script)
    finder = DimseFinder(dimse_settings(scp.port, scp.ae_title))
    with pytest.raises(PacsUnavailable) as caught:
        finder.find_studies(StudyQuery())
    assert str(caught.value) == message.format(port=scp.port)
    assert finder.describe() == [("FAILED", f"source: {caught.value}", EXIT_DATABASE)]


def test_nothing_listening() -> None:
    port = free_port()
    finder = DimseFinder(dimse_settings(port, "PACS"))
    with pytest.raises(PacsUnavailable) as caught:
        finder.find_studies(StudyQuery())
    assert str(caught.value) == (
        f"PACS PACS at 127.0.0.1:{port} (C-FIND as DICOM_INDEXER): cannot connect:"
        " [Errno 111] Connection refused"
    )


def test_imported_without_pynetdicom() -> None:
    """A site without DIMSE installs nothing: the module imports without
    pynetdicom, and opening it says what to install."""
    code = (
        "import sys; sys.modules['pynetdicom'] = None\n"
        "import dicom_indexer.sources.dimse as dimse\n"
        "assert 'pydicom' not in sys.modules, 'pydicom imported'\n"
        "try:\n"
        "    dimse.DimseFinder(None)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    assert _python_prints(code) == [
        "ConfigError config.json: source 'dimse' needs pynetdicom; install:"
        " python3 -m pip install -r requirements-dimse.txt"
    ]


def test_pydicom_is_imported_without_its_downloader_dependencies() -> None:
    """pydicom's test-data downloader would bring requests and tqdm into
    every DIMSE run (5 MB): they stay out while pydicom is imported, and the
    client can still import them afterwards (proxies, progress bars)."""
    code = (
        "import sys\n"
        "from dicom_indexer.sources.dimse import _pynetdicom\n"
        "_pynetdicom()\n"
        "print(sorted(m for m in ('requests', 'tqdm', 'urllib3') if m in sys.modules))\n"
        "import requests, tqdm\n"
        "print(requests.utils.select_proxy('http://pacs', {}) is None, callable(tqdm.tqdm))\n"
    )
    assert _python_prints(code) == ["[]", "True True"]


def _python_prints(code: str) -> list[str]:
    """The lines a fresh Python prints running `code` in the project (it
    must end well): what is imported there is not this test process's."""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()
