"""dcm4chee-arc-light 5: the same documents as from 2.x, and the archive's
own ways (a cache of counts rebuilt minutes after each store, patient_id rows,
person_name's format, '*' for absent, rejections, hard deletes), replayed on
a test schema written from the facts, on both engines."""

from __future__ import annotations

import datetime
import json

import conftest
import pytest
from conftest import (
    CENTER,
    ArcDb,
    PacsDb,
    create_database,
    drop_database,
    grant_indexer_user,
    install,
    write_configs,
)

from dicom_indexer.cli import main
from dicom_indexer.document import DOCUMENT_KEYS
from dicom_indexer.errors import EXIT_DATABASE


@pytest.fixture
def args(arc, service, tmp_path):
    return write_configs(tmp_path, arc.name, service.url)


def _posts(service, study_pk):
    return [d for d in service.documents if d["study_pk"] == study_pk]


def test_document_has_the_2x_shape_from_arclight_rows(arc, service, args):
    patient = arc.add_patient("MUÑOZ^JOSÉ^ÁNGEL^^^", "12.345.678-5", "OTRO-ID-99")
    study = arc.add_study(patient, desc="TC DE CEREBRO SIN CONTRASTE", iuid="1.2.3.4")
    arc.settle(study, series=3, instances=254, mods="SR\\CT")
    assert main(["initial", *args]) == 0
    assert service.received[0].json == {
        "patient_pk": patient,
        "patient_id": "12.345.678-5",  # the primary ID: the patient's first patient_id row
        "patient_name": "MUÑOZ^JOSÉ^ÁNGEL",  # trailing empty components and sentinel dropped
        "study_pk": study,
        "study_iuid": "1.2.3.4",
        "study_datetime": "2024-05-17 09:42:10",
        "study_description": "TC DE CEREBRO SIN CONTRASTE",
        "study_modality": "CT\\SR",  # sorted: arc-light keeps them in no order
        "study_series": 3,
        "study_instances": 254,
        "center": CENTER,
    }
    assert list(service.received[0].json) == list(DOCUMENT_KEYS)


def test_same_study_gives_the_same_bytes_as_a_2x_site(arc, service, args, tmp_path):
    """A center migrating from 2.x: the index receives the same document."""
    engine = "postgresql" if arc.postgresql else "mysql"
    old_name = create_database("utf8", engine)
    old = PacsDb(old_name)
    try:
        old_patient = old.add_patient("MUÑOZ^JOSÉ^ÁNGEL", "12.345.678-5")
        old.add_study(
            old_patient,
            desc="TC DE CEREBRO SIN CONTRASTE",
            mods="CT\\SR",
            num_series=3,
            num_instances=254,
            study_datetime=datetime.datetime(2024, 5, 17, 9, 42, 10),
            iuid="1.2.840.99",
        )
        old_dir = tmp_path / "old"
        old_dir.mkdir()
        assert main(["initial", *write_configs(old_dir, old_name, service.url)]) == 0
        patient = arc.add_patient("MUÑOZ^JOSÉ^ÁNGEL^^^", "12.345.678-5")
        study = arc.add_study(patient, iuid="1.2.840.99")
        arc.settle(study, series=3, instances=254, mods="SR\\CT")
        assert main(["initial", *args]) == 0
        old_body, new_body = (r.body for r in service.received)
        assert old_body == new_body  # pks coincide: both archives start at 1
    finally:
        old.close()
        drop_database(old_name)


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (("*", "*", "*", "^^^^^"), (None, None, None)),
        (("20240517", "*", "ECO", "PEREZ^^^^^"), ("2024-05-17 00:00:00", "ECO", "PEREZ")),
        (("20240230", "101530.000", "RX", "^JUAN^^^^"), (None, "RX", "^JUAN")),
    ],
    ids=["all-absent", "no-time", "bad-date"],
)
def test_absent_values_follow_2x_conventions(arc, service, args, stored, expected):
    date, time, desc, name = stored
    study = arc.add_study(arc.add_patient(name), date=date, time=time, desc=desc)
    arc.settle(study, mods=None)
    assert main(["initial", *args]) == 0
    document = service.documents[0]
    assert (
        document["study_datetime"],
        document["study_description"],
        document["patient_name"],
    ) == expected
    assert document["study_modality"] is None


def test_patient_without_a_name_sends_null(arc, service, args):
    study = arc.add_study(arc.add_patient(None))
    arc.settle(study)
    assert main(["initial", *args]) == 0
    assert service.documents[0]["patient_name"] is None


def test_a_name_is_sent_with_its_groups_as_the_other_sources_send_it(arc, service, args):
    """values.person_name's one rule: every group that has something, empty
    trailing components and groups dropped (Orthanc, DICOMweb and DIMSE
    send this same name the same way)."""
    for name, ideographic, phonetic in (
        ("Wang^XiaoDong^^^^", "王^小東^^^^", "^^^^^"),
        ("Yamada^Tarou^^^^", "山田^太郎^^^^", "やまだ^たろう^^^^"),
        ("PEREZ^JUAN^^^^", "^^^^^", "^^^^^"),
    ):
        arc.settle(arc.add_study(arc.add_patient(name, ideographic=ideographic, phonetic=phonetic)))
    assert main(["initial", *args]) == 0
    assert sorted(d["patient_name"] for d in service.documents) == [
        "PEREZ^JUAN",
        "Wang^XiaoDong=王^小東",
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
    ]


def test_a_user_granted_before_2_5_sends_the_alphabetic_group_and_check_says_how(
    arc, service, args, capsys
):
    """The grant scripts before 2.5 gave no right on a name's other groups:
    such a site keeps working, sending what it sent, and check says what to
    run to send every group."""
    arc.settle(arc.add_study(arc.add_patient("Wang^XiaoDong^^^^", ideographic="王^小東^^^^")))
    grantee = conftest.INDEXER_USER if arc.postgresql else f"'{conftest.INDEXER_USER}'@'%'"
    arc.execute(f"REVOKE SELECT (ideographic_name, phonetic_name) ON person_name FROM {grantee}")
    try:
        assert main(["initial", *args]) == 0
        assert [d["patient_name"] for d in service.documents] == ["Wang^XiaoDong"]
        capsys.readouterr()
        assert main(["check", *args]) == 0
        out = capsys.readouterr().out
        assert "names are sent with their alphabetic group only" in out
        assert "extras/grant_indexer_arclight5_" in out
    finally:
        conftest.grant_indexer_user(arc.name)


def test_study_stored_in_several_associations_is_sent_once_it_has_settled(arc, service, args):
    patient = arc.add_patient()
    study = arc.add_study(patient)  # first association: the study is hot
    assert main(args) == 0
    assert service.documents == []  # waiting for the archive to compute its counts
    assert arc.statuses() == {"pending": 1}
    arc.settle(study, series=1, instances=40)  # a C-FIND computes the cache...
    arc.store_same_association(study)  # ...and the next object drops it again
    arc.execute("UPDATE study SET study_size = -1 WHERE pk = %s", (study,))
    assert main(args) == 0
    assert service.documents == []
    arc.store_same_association(study)
    arc.settle(study, series=3, instances=254)  # the scheduler, minutes later
    assert main(args) == 0
    assert [(d["study_series"], d["study_instances"]) for d in _posts(service, study)] == [(3, 254)]
    assert main(args) == 0
    assert len(_posts(service, study)) == 1  # settled and sent: nothing more
    assert arc.statuses() == {"sent": 1}


def test_more_images_later_are_sent_again_after_the_counts_are_rebuilt(arc, service, args):
    study = arc.add_study(arc.add_patient())
    arc.settle(study, series=1, instances=10)
    assert main(args) == 0
    arc.store_later(study)
    assert main(args) == 0
    assert len(_posts(service, study)) == 1  # held while the archive recomputes
    arc.settle(study, series=2, instances=30)
    assert main(args) == 0
    assert [d["study_instances"] for d in _posts(service, study)] == [10, 30]


def test_late_commit_inside_the_safety_window_is_caught(arc, service, args):
    patient = arc.add_patient()
    assert main(args) == 0  # a tick: the watermark moves to now
    # Stamped two minutes ago by the archive, committed only now.
    study = arc.add_study(patient, stamped_seconds_ago=120)
    arc.settle(study)
    assert main(args) == 0
    assert [d["study_pk"] for d in service.documents] == [study]


def test_patient_edit_is_found_by_reconcile(arc, service, args):
    patient = arc.add_patient("PEREZ^JUAN^^^^")
    studies = [arc.add_study(patient) for _ in range(2)]
    for study in studies:
        arc.settle(study)
    assert main(["initial", *args]) == 0
    arc.rename_patient(patient, "PEREZ^JUAN^CARLOS^^^")
    service.clear()
    assert main(args) == 0
    assert service.documents == []  # study rows untouched: the tick cannot see it
    assert main(["reconcile", *args]) == 0
    assert main(args) == 0
    assert sorted(d["study_pk"] for d in service.documents) == studies
    assert {d["patient_name"] for d in service.documents} == {"PEREZ^JUAN^CARLOS"}


def test_merge_moves_studies_and_the_tick_resends_them(arc, service, args):
    source = arc.add_patient("PEREZ^J^^^^", "11.111.111-1")
    target = arc.add_patient("PEREZ^JUAN^^^^", "12.345.678-5")
    study = arc.add_study(source)
    arc.settle(study)
    assert main(["initial", *args]) == 0
    arc.merge(source, target)
    assert main(args) == 0
    moved = _posts(service, study)[-1]
    assert (moved["patient_pk"], moved["patient_id"], moved["patient_name"]) == (
        target,
        "12.345.678-5",
        "PEREZ^JUAN",
    )


def test_partial_rejection_resends_the_visible_counts(arc, service, args):
    study = arc.add_study(arc.add_patient())
    arc.settle(study, series=2, instances=20)
    assert main(["initial", *args]) == 0
    arc.reject(study, complete=False)
    arc.settle(study, series=1, instances=12)  # rejected instances hidden by the view
    assert main(args) == 0
    assert [d["study_instances"] for d in _posts(service, study)] == [20, 12]


@pytest.mark.parametrize("send_deletes", [True, False])
def test_complete_rejection_withdraws_the_study(arc, service, tmp_path, send_deletes):
    args = write_configs(tmp_path, arc.name, service.url, send_deletes=send_deletes)
    study = arc.add_study(arc.add_patient(), iuid="1.2.3.9")
    arc.settle(study)
    assert main(["initial", *args]) == 0
    arc.reject(study, complete=True)
    assert main(args) == 0
    deletes = [r for r in service.received if r.method == "DELETE"]
    if send_deletes:
        assert [json.loads(r.body)["study_iuid"] for r in deletes] == ["1.2.3.9"]
    else:
        assert deletes == []
    assert len(_posts(service, study)) == 1  # never posted again
    assert arc.statuses() == {"deleted": 1}

    # The rejection revoked: rejection_state recomputed, the counts rebuilt.
    arc.touch(study, "rejection_state = 0")
    arc.settle(study)
    assert main(args) == 0
    assert len(_posts(service, study)) == 2  # back in the index, as new
    assert arc.statuses() == {"sent": 1}


def test_hard_delete_is_found_by_reconcile_and_deleted(arc, service, tmp_path):
    args = write_configs(tmp_path, arc.name, service.url, send_deletes=True)
    keep, gone = (arc.add_study(arc.add_patient()) for _ in range(2))
    for study in (keep, gone):
        arc.settle(study)
    assert main(["initial", *args]) == 0
    arc.delete_study(gone)
    assert main(["reconcile", *args]) == 0
    assert main(args) == 0
    deletes = [json.loads(r.body)["study_pk"] for r in service.received if r.method == "DELETE"]
    assert deletes == [gone]
    assert arc.statuses() == {"sent": 1, "deleted": 1}


def test_initial_holds_studies_still_being_stored_and_the_tick_sends_them(arc, service, args):
    patient = arc.add_patient()
    settled = [arc.add_study(patient) for _ in range(3)]
    for study in settled:
        arc.settle(study)
    hot = arc.add_study(patient)
    assert main(["initial", *args]) == 0
    assert sorted(service.study_pks()) == settled
    arc.settle(hot)
    assert main(args) == 0
    assert sorted(service.study_pks()) == sorted([*settled, hot])


def test_check_names_the_schema_and_the_access_time_index(arc, service, args, capsys):
    assert main(["check", *args]) == 0
    out = capsys.readouterr().out
    assert "schema: dcm4chee-arc-light 5.31 or later" in out
    assert "on study(access_time): each tick reads only the studies that changed" in out


def test_query_view_setting_picks_that_views_counts(arc, service, tmp_path):
    args = write_configs(tmp_path, arc.name, service.url, query_view="regularUse")
    study = arc.add_study(arc.add_patient())
    arc.settle(study, instances=5)
    arc.execute("UPDATE study_query_attrs SET num_instances = 7 WHERE view_id = 'regularUse'")
    assert main(["initial", *args]) == 0
    assert service.documents[0]["study_instances"] == 7


def test_archive_older_than_5_23_is_refused_with_its_version(arc, service, args, capsys):
    if arc.postgresql:
        arc.execute("ALTER TABLE person_name RENAME COLUMN alphabetic_name TO family_name")
    else:
        arc.execute(
            "ALTER TABLE person_name CHANGE alphabetic_name family_name VARCHAR(255) NOT NULL"
        )
    try:
        assert main(args) == EXIT_DATABASE
        err = capsys.readouterr().err
        assert "dcm4chee-arc-light database older than 5.23" in err
        assert "this client reads 5.23 to 5.35" in err
    finally:
        if arc.postgresql:
            arc.execute("ALTER TABLE person_name RENAME COLUMN family_name TO alphabetic_name")
        else:
            arc.execute(
                "ALTER TABLE person_name CHANGE family_name alphabetic_name VARCHAR(255) NOT NULL"
            )


@pytest.mark.parametrize("engine", conftest.ENGINES)
def test_arclight_before_5_31_reads_the_patients_one_id(service, tmp_path, engine):
    """5.23 to 5.30: patient.patient_id_fk names the patient's one patient_id row."""
    name = create_database("utf8", engine, schema="arc5")
    db = ArcDb(name)
    try:
        db.execute("ALTER TABLE patient ADD COLUMN patient_id_fk BIGINT")
        patient = db.add_patient("ROJAS^ANA^^^^", "9.876.543-2")
        db.execute(
            "UPDATE patient SET patient_id_fk ="
            " (SELECT pk FROM patient_id WHERE patient_fk = %s) WHERE pk = %s",
            (patient, patient),
        )
        # Before 5.34 no unique key; before 5.31 no patient_fk.
        if not db.postgresql:
            db.execute("ALTER TABLE patient_id DROP INDEX UKpatient_id")
            db.execute("ALTER TABLE patient_id DROP FOREIGN KEY FK1ydtnvm43pjsgdc1b6ef3tx2x")
        db.execute("ALTER TABLE patient_id DROP COLUMN pat_name")
        db.execute("ALTER TABLE patient_id DROP COLUMN patient_fk")
        install(name)
        grant_indexer_user(name)
        study = db.add_study(patient)
        db.settle(study)
        args = write_configs(tmp_path, name, service.url)
        assert main(["check", *args]) == 0
        assert main(["initial", *args]) == 0
        assert service.documents[0]["patient_id"] == "9.876.543-2"
        assert service.documents[0]["patient_name"] == "ROJAS^ANA"
    finally:
        db.close()
        drop_database(name)


def test_center_migrating_from_2x_keeps_its_registrations_and_sends_only_whats_new(
    arc, service, tmp_path
):
    """The README's migration: the old site's indexer keeps running until the
    cut-over; the new archive's indexer is installed before the migration
    imports anything; `adopt` runs before each tick while it does."""
    engine = "postgresql" if arc.postgresql else "mysql"
    old_name = create_database("utf8", engine)
    old = PacsDb(old_name)
    try:
        old_dir, new_dir = tmp_path / "old", tmp_path / "new"
        old_dir.mkdir()
        new_dir.mkdir()
        old_args = write_configs(old_dir, old_name, service.url)
        new_args = write_configs(new_dir, arc.name, service.url)
        patient = old.add_patient("ROJAS^ANA", "9.876.543-2")
        uids = [f"1.2.840.7.{n}" for n in range(3)]
        for uid in uids:
            old.add_study(patient, iuid=uid)
        assert main(["initial", *old_args]) == 0
        assert len(service.documents) == 3

        # The migration imports the old studies into arc-light (new pks),
        # and a new study arrives there after the cut-over.
        new_patient = arc.add_patient("ROJAS^ANA^^^^", "9.876.543-2")
        imported = [arc.add_study(new_patient, iuid=uid) for uid in uids]
        for study in imported[:2]:
            arc.settle(study)  # the third is still being stored
        fresh = arc.add_study(new_patient, iuid="1.2.840.7.99")
        arc.settle(fresh)
        adopt = ["adopt", "--from", str(old_dir / "config.json"), *new_args]
        assert main(adopt) == 0
        assert main(new_args) == 0
        assert [d["study_iuid"] for d in service.documents[3:]] == ["1.2.840.7.99"]

        arc.settle(imported[2])  # settles later: the next adopt sees it first
        assert main(adopt) == 0
        assert main(new_args) == 0
        assert len(service.documents) == 4  # the archive was not sent twice
        assert arc.statuses() == {"sent": 4}
    finally:
        old.close()
        drop_database(old_name)


def test_adopt_needs_from_and_from_needs_adopt(args, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["adopt", *args])
    assert exited.value.code == 2
    assert "adopt needs --from OLD/config.json" in capsys.readouterr().err
