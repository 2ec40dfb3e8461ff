"""Keeping the central index true: patient edits and merges, deleted and
restored studies, rewrites that change nothing, the stability window, and
reconcile's throttle and resumption."""

from __future__ import annotations

import json
import re

from conftest import API_KEY, CENTER, LONG_AGO, write_configs

from dicom_indexer.cli import main
from dicom_indexer.document import document_fingerprint, encode_document, study_document
from dicom_indexer.errors import EXIT_DELIVERY


def _two_patients_with_studies(pacs):
    ana = pacs.add_patient("ROJAS^ANA", "11111111-1")
    luis = pacs.add_patient("SOTO^LUIS", "22222222-2")
    ana_studies = [pacs.add_study(ana, updated_time=LONG_AGO) for _ in range(2)]
    luis_studies = [pacs.add_study(luis, updated_time=LONG_AGO) for _ in range(3)]
    return ana, luis, ana_studies, luis_studies


def test_patient_name_edit_is_sent_again_after_reconcile_and_only_those(pacs, service, configs):
    ana, _, ana_studies, _ = _two_patients_with_studies(pacs)
    assert main(["initial", *configs]) == 0
    service.clear()
    # dcm4chee corrects the name: patient row only, study rows untouched.
    pacs.execute(
        "UPDATE patient SET pat_name = 'ROJAS^ANA MARÍA', updated_time = NOW() WHERE pk = %s",
        (ana,),
    )
    assert main(configs) == 0
    assert service.received == []  # the tick cannot see it: no study row changed
    assert main(["reconcile", *configs]) == 0
    assert main(configs) == 0
    assert service.study_pks() == ana_studies
    assert {d["patient_name"] for d in service.documents} == {"ROJAS^ANA MARÍA"}


def test_merged_patients_studies_arrive_with_the_dominant_patient(pacs, service, configs):
    ana, luis, ana_studies, luis_studies = _two_patients_with_studies(pacs)
    assert main(["initial", *configs]) == 0
    service.clear()
    # Merge: LUIS was a duplicate of ANA; his studies move, he gets merge_fk.
    pacs.execute("UPDATE study SET patient_fk = %s WHERE patient_fk = %s", (ana, luis))
    pacs.execute("UPDATE patient SET merge_fk = %s WHERE pk = %s", (ana, luis))
    assert main(["reconcile", *configs]) == 0
    assert main(configs) == 0
    assert service.study_pks() == luis_studies
    for document in service.documents:
        assert (document["patient_pk"], document["patient_id"], document["patient_name"]) == (
            ana,
            "11111111-1",
            "ROJAS^ANA",
        )


def test_deleted_study_sends_delete_when_enabled(pacs, service, tmp_path):
    patient = pacs.add_patient()
    keep, gone = pacs.add_study(patient), pacs.add_study(patient)
    args = write_configs(tmp_path, pacs.name, service.url, {"send_deletes": True})
    assert main(["initial", *args]) == 0
    iuid = next(d["study_iuid"] for d in service.documents if d["study_pk"] == gone)
    service.clear()
    pacs.execute("DELETE FROM study WHERE pk = %s", (gone,))  # moved to the trash
    assert main(["reconcile", *args]) == 0
    assert main(args) == 0
    [request] = service.received
    assert request.method == "DELETE"
    assert request.path == "/api/v1/register"
    assert request.headers["X-Api-Key"] == API_KEY
    assert request.json == {"study_iuid": iuid, "study_pk": gone, "center": CENTER}
    assert pacs.queue()[gone]["status"] == "deleted"
    assert pacs.queue()[keep]["status"] == "sent"


def test_delete_answered_404_counts_as_done(pacs, service, tmp_path):
    study = pacs.add_study(pacs.add_patient())
    args = write_configs(tmp_path, pacs.name, service.url, {"send_deletes": True})
    assert main(["initial", *args]) == 0
    pacs.execute("DELETE FROM study WHERE pk = %s", (study,))
    service.respond = lambda n, r: (404, "unknown study") if r.method == "DELETE" else (201, "")
    assert main(["reconcile", *args]) == 0
    assert main(args) == 0
    assert pacs.queue()[study]["status"] == "deleted"


def test_deleted_study_with_deletes_off_sends_nothing(pacs, service, configs, capsys):
    study = pacs.add_study(pacs.add_patient())
    assert main(["initial", *configs]) == 0
    service.clear()
    pacs.execute("DELETE FROM study WHERE pk = %s", (study,))
    assert main(["reconcile", *configs]) == 0
    assert "1 gone" in capsys.readouterr().err
    assert main(configs) == 0
    assert service.attempts == []
    assert pacs.queue()[study]["status"] == "deleted"


def test_study_restored_from_trash_is_sent_again_as_new(pacs, service, configs):
    study = pacs.add_study(pacs.add_patient(), updated_time=LONG_AGO)
    assert main(["initial", *configs]) == 0
    row = pacs.query("SELECT * FROM study WHERE pk = %s", (study,))[0]
    pacs.execute("DELETE FROM study WHERE pk = %s", (study,))
    assert main(["reconcile", *configs]) == 0
    columns = ", ".join(row)
    pacs.execute(
        f"INSERT INTO study ({columns}) VALUES ({', '.join(['%s'] * len(row))})",
        tuple(row.values()),
    )
    service.clear()
    assert main(["reconcile", *configs]) == 0
    assert main(configs) == 0
    assert service.study_pks() == [study]


def test_rewrite_that_changes_no_field_sends_nothing(pacs, service, configs, capsys):
    study = pacs.add_study(pacs.add_patient())
    assert main(configs) == 0
    service.clear()
    pacs.execute(
        "UPDATE study SET updated_time = NOW() + INTERVAL '1' SECOND, checked_time = NOW()"
        " WHERE pk = %s",
        (study,),
    )
    capsys.readouterr()
    assert main(configs) == 0
    assert service.attempts == []
    assert "enqueued 1, sent 0, unchanged 1" in capsys.readouterr().err
    assert pacs.queue()[study]["status"] == "sent"


def test_stability_window_holds_a_fresh_study_then_releases_it(pacs, service, tmp_path, capsys):
    args = write_configs(tmp_path, pacs.name, service.url, stable_age_seconds=60)
    old = pacs.add_study(pacs.add_patient(), updated_time=LONG_AGO)
    fresh = pacs.add_study(pacs.add_patient())  # still receiving images
    pacs.call_indexer_process()
    pacs.execute("UPDATE study_service SET status = 'pending' WHERE study_pk = %s", (old,))
    assert main(args) == 0
    assert service.study_pks() == [old]
    assert "still pending 1, held 1" in capsys.readouterr().err
    # Quiet for two minutes now.
    pacs.execute(
        "UPDATE study SET updated_time = NOW() - INTERVAL '120' SECOND WHERE pk = %s", (fresh,)
    )
    assert main(args) == 0
    assert service.study_pks() == [old, fresh]


REPORT = re.compile(
    r"reconcile (complete|paused): checked (\d+) studies in ([\d.]+) s \((\d+) rows/s, cap (\d+)\)"
)


def test_reconcile_respects_its_rate_cap_and_resumes(pacs, service, tmp_path, capsys):
    pacs.add_studies(3000)
    args = write_configs(tmp_path, pacs.name, service.url, reconcile_rows_per_second=1500)
    assert main(["initial", *args]) == 0
    capsys.readouterr()

    assert main(["reconcile", "--limit", "1000", *args]) == 0
    state, checked, _, _, _ = REPORT.search(capsys.readouterr().err).groups()
    assert (state, int(checked)) == ("paused", 1000)
    assert pacs.query("SELECT cursor_pk FROM study_service WHERE study_pk = -2")[0]["cursor_pk"]

    assert main(["reconcile", *args]) == 0
    err = capsys.readouterr().err
    state, checked, seconds, rate, cap = REPORT.search(err).groups()
    assert (state, int(checked), int(cap)) == ("complete", 2000, 1500)
    assert int(rate) <= 1500 * 1.2  # measured by reconcile itself
    assert float(seconds) >= 2000 / 1500 * 0.8
    assert "0 changed and enqueued, 0 gone" in err
    assert not pacs.query("SELECT * FROM study_service WHERE study_pk = -2")


def test_reconcile_leaves_studies_never_sent_by_this_client_alone(pacs, service, configs, capsys):
    """After an upgrade, the original client's studies have no fingerprint."""
    pacs.add_studies(4)
    pacs.archive_predates_install()
    assert main(["reconcile", *configs]) == 0
    assert "4 never sent by this client" in capsys.readouterr().err
    assert main(configs) == 0
    assert service.attempts == []


def test_status_json_counts_deletions(pacs, service, tmp_path, capsys):
    study = pacs.add_study(pacs.add_patient())
    args = write_configs(tmp_path, pacs.name, service.url, {"send_deletes": True})
    assert main(["initial", *args]) == 0
    pacs.execute("DELETE FROM study WHERE pk = %s", (study,))
    service.respond = lambda n, r: (503, "down")
    main(["reconcile", *args])
    assert main(args) == EXIT_DELIVERY
    capsys.readouterr()
    main(["status", "--json", *args])
    assert json.loads(capsys.readouterr().out)["counts"]["deleting"] == 1


def test_fingerprint_from_the_old_key_names_means_one_resend_then_quiet(
    pacs, service, configs, capsys
):
    """Until 2.0 this client sent study_num_series / study_num_instances. A
    study acknowledged under those names is re-sent once, by reconcile, with
    the contract's names; never by every tick, and never skipped."""
    pks = pacs.add_studies(3)
    assert main(["initial", *configs]) == 0
    row = pacs.query(
        "SELECT s.pk AS study_pk, s.study_iuid, s.study_datetime, s.study_desc,"
        " s.mods_in_study, s.num_series, s.num_instances, p.pk AS patient_pk, p.pat_id,"
        " p.pat_name FROM study s JOIN patient p ON p.pk = s.patient_fk WHERE s.pk = %s",
        (pks[0],),
    )[0]
    renamed = {"study_series": "study_num_series", "study_instances": "study_num_instances"}
    document = study_document(row, CENTER)
    old = {renamed.get(key, key): value for key, value in document.items()}
    old_version = document_fingerprint(encode_document(old))
    pacs.execute(
        "UPDATE study_service SET sent_version = %s WHERE study_pk = %s", (old_version, pks[0])
    )
    service.clear()

    assert main(configs) == 0  # a tick: nothing changed in the PACS
    assert service.attempts == []
    capsys.readouterr()
    assert main(["reconcile", *configs]) == 0
    assert "1 changed and enqueued" in capsys.readouterr().err
    assert main(configs) == 0
    [document] = service.documents
    assert (document["study_pk"], document["study_series"]) == (pks[0], 1)
    assert "study_num_series" not in document

    service.clear()
    assert main(["reconcile", *configs]) == 0
    assert "0 changed and enqueued" in capsys.readouterr().err
    assert main(configs) == 0
    assert service.attempts == []


def test_study_whose_answer_was_lost_then_deleted_still_gets_its_delete(pacs, service, tmp_path):
    """The service stored the POST but its answer never arrived (a cut
    connection, a crash): nothing was acknowledged, yet the central index
    holds the study. Deleted from the PACS, it must be DELETEd there too.
    Found by the storm test."""
    args = write_configs(tmp_path, pacs.name, service.url, {"send_deletes": True}, max_retries=0)
    study = pacs.add_study(pacs.add_patient())
    iuid = pacs.query("SELECT study_iuid FROM study WHERE pk = %s", (study,))[0]["study_iuid"]
    service.respond = lambda n, r: (503, "answer lost")
    assert main(args) == EXIT_DELIVERY
    assert [r.json["study_pk"] for r in service.attempts] == [study]  # it got there

    pacs.execute("DELETE FROM study WHERE pk = %s", (study,))
    service.respond = lambda n, r: (200, "{}")
    assert main(args) == 0
    [delete] = [r for r in service.received if r.method == "DELETE"]
    assert delete.json == {"study_iuid": iuid, "study_pk": study, "center": CENTER}
    assert pacs.queue()[study]["status"] == "deleted"
